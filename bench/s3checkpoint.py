#!/usr/bin/env python3
"""What a checkpoint of a streamed import into the S3 image target costs: its size, and the digest work
behind it.

- ``record``: the JSON bytes of the checkpoint's upload record at ``--parts`` parts of ``--part-size``,
  in the earlier format (every part's number, size and ETag) and in the current one
  (:mod:`appliance.steps.s3_checkpoint`: count, ETag digest, digest states), and the bytes all the
  saves of one task write to the store (one save per acknowledged part). Computed, not timed.
- ``hash``: CPU seconds (user + system of this process) per GiB that the resumable writer's thread
  spends on the whole sha256 (:class:`~appliance.sources.savedhash.SavedHash`) and on the
  ``sha256-chunked`` (:class:`~appliance.targets.savedchunks.SavedChunkedSha256`), for random bytes
  and for zeros (a hole of a RAW disk), in ``--part-size`` updates as the writer cuts parts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.sources.savedhash import SavedHash
from appliance.targets.savedchunks import SavedChunkedSha256

MiB = 1 << 20


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def records(parts: int, part_size: int) -> dict[str, int]:
    sha, chunked = SavedHash("sha256"), SavedChunkedSha256()
    sha.update(b"x" * 4096)
    chunked.update(b"x" * 4096)
    common = {
        "bucket": "images",
        "key": "images/import-snap-0123456789abcdef0.raw.partial",
        "upload_id": "u" * 64,
        "part_size": part_size,
        "sha256_state": sha.state(),
    }
    etag = '"' + "a" * 32 + '"'

    def earlier(k: int) -> int:
        listed = [{"number": n, "size": part_size, "etag": etag} for n in range(1, k + 1)]
        return len(json.dumps(common | {"parts": listed}))

    current = common | {"count": parts, "etags_sha256": "b" * 64, "chunked_state": chunked.state()}
    one = earlier(1)
    per_part = earlier(2) - one
    return {
        "earlier_bytes": earlier(parts),
        "current_bytes": len(json.dumps(current)),
        # sum over the saves of one task: a record of k parts for k = 1..parts
        "earlier_task_bytes": sum(one + per_part * (k - 1) for k in range(1, parts + 1)),
        "current_task_bytes": parts * len(json.dumps(current)),
    }


def hashing(gib: int, part_size: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, part in (("random", os.urandom(part_size)), ("zeros", bytes(part_size))):
        for what in ("sha256", "sha256-chunked"):
            h = SavedHash("sha256") if what == "sha256" else SavedChunkedSha256()
            start = cpu()
            for _ in range(gib * (1 << 30) // part_size):
                h.update(part)
            out[f"{what} {name}"] = round((cpu() - start) / gib, 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", type=int, default=10_000)
    ap.add_argument("--part-size", type=int, default=16 * MiB)
    ap.add_argument("--gib", type=int, default=1, help="GiB hashed per case")
    args = ap.parse_args()
    print(
        json.dumps(
            {
                "record": records(args.parts, args.part_size),
                "cpu_s_per_gib": hashing(args.gib, args.part_size),
                "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
