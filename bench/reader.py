#!/usr/bin/env python3
"""The parallel ranged reader against one GET stream, from the same moto server.

One object of ``--size`` random bytes is put into a **moto** server process on loopback, and the
same bytes as euca2ools-style 10 MiB part objects. Timed in rotating order, each reading every byte
into a sink (the reader's own verification included):

- ``one GET``: boto3 ``get_object`` of the whole object, its body read in 1 MiB pieces;
- ``reader``: :func:`appliance.sources.reader.open_reader` of the same object (``--parallel``
  ranges of ``--range-size`` in flight, ``IfMatch`` on each), ``readinto`` of one 1 MiB buffer until
  the end (as the import steps read it);
- ``parts x1`` / ``parts xN``: :func:`appliance.sources.parts.download_parts` of the part objects,
  one at a time and ``--parallel`` at a time (MD5 of each part checked);
- ``http one GET`` / ``http reader``: the same bytes from an https-style URL on a loopback HTTP server
  that slices ranges from memory (:class:`tests.httpfixtures.TestHTTPServer`): one stream through
  :class:`~appliance.sources.http.HttpClient` against the reader (``If-Match`` on each range);
- ``file one GET`` / ``file reader``: the same, from ``bench/rangeserver.py`` — a threaded ranged file
  server in a process of its own (``sendfile`` from the page cache): an origin whose cost per range is
  the range's bytes, unlike moto's, and that does not share the benchmark's GIL, unlike the test server.

Every scenario runs twice: straight to moto, and through a proxy that paces each connection to
``--throttle`` MB/s (:class:`tests.stallproxy.StallingProxy` with ``rate``): a real object store limits
what one connection gets (AWS's guidance for byte-range fetches), moto on loopback does not. Reported:
medians, MB/s, ``reader / one GET``, ``parts xN / parts x1`` and ``http reader / http one GET`` with
``file reader / file one GET`` with PASS/MISS against the goal (>= 1.5), the reader's peak buffered
bytes, and the CPU seconds (user + system) this process spent per GiB in each scenario: against
moto and the file server, which run in processes of their own, that is the reader's CPU alone, the
figure that does not depend on the machine's load; ``bench/out/reader-results.json``; ``--strict``
exits 1 on a miss.

Know before reading the figures: moto answers a ranged GET by loading the **whole** object and
slicing it (``moto/s3/responses.py`` ``_handle_range_header``, under the key's lock), so each range of
a big object costs as much as reading all of it; part objects are small and never hit that.

    .venv/bin/python bench/reader.py                 # 256 MiB, 3 runs, 50 MB/s throttle
    .venv/bin/python bench/reader.py --quick         # 64 MiB, 1 run
    .venv/bin/python bench/reader.py --size 512MiB --parallel 8 --throttle 100
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
# Run as ``python bench/reader.py``: bench/api.py would shadow the ``api`` package, and the
# repository root gives ``tests.servers`` / ``tests.stallproxy``.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import boto3  # noqa: E402
import botocore.config  # noqa: E402

from appliance.config import parse_size  # noqa: E402
from appliance.sources.http import HttpClient  # noqa: E402
from appliance.sources.manifest import ImportManifest, Part, plan_parts  # noqa: E402
from appliance.sources.parts import download_parts  # noqa: E402
from appliance.sources.ranges import ReaderSettings  # noqa: E402
from appliance.sources.reader import RangeReader, open_reader  # noqa: E402
from appliance.sources.urlfilter import UrlPolicy  # noqa: E402
from tests.httpfixtures import TestHTTPServer  # noqa: E402
from tests.servers import moto_server  # noqa: E402
from tests.stallproxy import StallingProxy  # noqa: E402

GOAL = 1.5
PIECE = 1 << 20
PART = 10 << 20


def client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=botocore.config.Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


def upload(endpoint: str, bucket: str, size: int) -> bytes:
    s3 = client(endpoint)
    s3.create_bucket(Bucket=bucket)
    block = os.urandom(PART)
    data = (block * (size // PART + 1))[:size]  # incompressible enough; moto does not compress anyway
    s3.put_object(Bucket=bucket, Key="disk.raw", Body=data)
    for i, start, end in plan_parts(size, PART):
        s3.put_object(Bucket=bucket, Key=f"disk.part{i}", Body=data[start : end + 1])
    return data


def http_one_get(url: str, policy: UrlPolicy) -> dict[str, Any]:
    n = 0
    with HttpClient(policy).get_stream(url) as response:
        for piece in response.iter_chunks(PIECE):
            n += len(piece)
    return {"bytes": n}


def http_ranged(url: str, policy: UrlPolicy, settings: ReaderSettings) -> dict[str, Any]:
    reader = open_reader({"url": url}, policy, settings=settings)
    return drain(reader)


def one_get(endpoint: str, bucket: str) -> dict[str, Any]:
    body = client(endpoint).get_object(Bucket=bucket, Key="disk.raw")["Body"]
    n = 0
    while piece := body.read(PIECE):
        n += len(piece)
    return {"bytes": n}


def ranged(endpoint: str, bucket: str, settings: ReaderSettings) -> dict[str, Any]:
    cfg = {"endpoint_url": endpoint, "region": "us-east-1", "access_key": "testing", "secret_key": "testing"}
    reader = open_reader({"bucket": bucket, "key": "disk.raw"}, UrlPolicy(allowed_endpoints=[endpoint]), cfg,
                         settings=settings)  # fmt: skip
    return drain(reader)


def drain(reader: RangeReader) -> dict[str, Any]:
    """Every byte of ``reader`` into one reused 1 MiB buffer (``readinto``, as the import steps read
    it): the copy out of the range buffers counts, no allocation per piece does."""
    buf = bytearray(PIECE)
    n = 0
    with reader:
        while k := reader.readinto(buf):
            n += k
    return {"bytes": n, "peak_buffered": reader.stats.peak_buffered, "requests": reader.stats.requests}


def parts(endpoint: str, bucket: str, size: int, parallel: int) -> dict[str, Any]:
    s3 = client(endpoint)
    plan = [
        Part(i, s, e, f"disk.part{i}", url, url)
        for i, s, e in plan_parts(size, PART)
        for url in [
            s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": f"disk.part{i}"})
        ]
    ]
    manifest = ImportManifest("2010-11-15", "RAW", None, None, size, 1, plan)
    n = download_parts(
        manifest, lambda _o, _c: None, UrlPolicy(allowed_endpoints=[endpoint]), parallel=parallel
    )
    return {"bytes": n}


@contextlib.contextmanager
def range_server(file: Path) -> Iterator[str]:
    """``bench/rangeserver.py`` serving ``file`` in a process of its own; its endpoint."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "rangeserver.py"), str(file)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, all its threads (moto and the file server are
    processes of their own: not counted; the in-process ``http`` server is)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    cpu, began = cpu_seconds(), time.perf_counter()
    out = fn()
    out["seconds"] = time.perf_counter() - began
    out["cpu_seconds"] = cpu_seconds() - cpu
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--range-size", default="8MiB")
    ap.add_argument(
        "--throttle", type=float, default=50.0, help="MB/s per connection of the paced run; 0: none"
    )
    ap.add_argument("--quick", action="store_true", help="64 MiB, 1 run")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a ratio misses the goal")
    args = ap.parse_args(argv)
    size = parse_size("64MiB" if args.quick else args.size)
    runs = 1 if args.quick else args.runs
    settings = ReaderSettings(
        parallel=args.parallel, range_size=parse_size(args.range_size), stall_seconds=60
    )
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-reader-"))
        moto = stack.enter_context(moto_server(Path(tmp)))
        web = stack.enter_context(TestHTTPServer())
        data = upload(moto.endpoint, bucket, size)
        web.add("/disk.raw", data)
        (Path(tmp) / "disk.raw").write_bytes(data)
        del data
        files = stack.enter_context(range_server(Path(tmp) / "disk.raw"))
        paths = [("moto", None)] + (
            [(f"{args.throttle:g} MB/s per connection", args.throttle)] if args.throttle else []
        )
        for label, rate in paths:
            pace = rate * 1e6 if rate else None
            with (
                StallingProxy(moto.endpoint, rate=pace) as proxy,
                StallingProxy(web.endpoint, rate=pace) as wp,
                StallingProxy(files, rate=pace) as fp,
            ):
                endpoint = proxy.endpoint if rate else moto.endpoint
                url = (wp.endpoint if rate else web.endpoint) + "/disk.raw"
                policy = UrlPolicy(allowed_endpoints=[wp.endpoint, web.endpoint])
                file_url = (fp.endpoint if rate else files) + "/disk.raw"
                file_policy = UrlPolicy(allowed_endpoints=[fp.endpoint, files])
                scenarios: dict[str, Callable[[], dict[str, Any]]] = {
                    "one GET": lambda e=endpoint: one_get(e, bucket),
                    "reader": lambda e=endpoint: ranged(e, bucket, settings),
                    "parts x1": lambda e=endpoint: parts(e, bucket, size, 1),
                    f"parts x{args.parallel}": lambda e=endpoint: parts(e, bucket, size, args.parallel),
                    "http one GET": lambda u=url, p=policy: http_one_get(u, p),
                    "http reader": lambda u=url, p=policy: http_ranged(u, p, settings),
                    "file one GET": lambda u=file_url, p=file_policy: http_one_get(u, p),
                    "file reader": lambda u=file_url, p=file_policy: http_ranged(u, p, settings),
                }
                results[label] = {name: [] for name in scenarios}
                names = list(scenarios)
                for run in range(runs):
                    for name in names[run % len(names) :] + names[: run % len(names)]:  # rotate the order
                        out = timed(scenarios[name])
                        assert out["bytes"] == size, (name, out)
                        results[label][name].append(out)
                        print(f"{label:>26}  run {run + 1}  {name:<13} {out['seconds']:7.2f} s  "
                              f"{size / out['seconds'] / 1e6:7.0f} MB/s  "
                              f"{out['cpu_seconds'] / (size / 2**30):5.2f} CPU-s/GiB  "
                              f"load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    return report(results, size, args, settings)


def report(results: dict[str, dict[str, list[dict[str, Any]]]], size: int, args: argparse.Namespace,
           settings: ReaderSettings) -> int:  # fmt: skip
    missed = False
    summary: dict[str, Any] = {"size": size, "parallel": settings.parallel, "range_size": settings.range_size,
                               "goal": GOAL, "paths": {}}  # fmt: skip
    print(
        f"\n{size / 2**20:.0f} MiB, parallel {settings.parallel}, "
        f"ranges of {settings.range_size / 2**20:g} MiB"
    )
    for label, by_name in results.items():
        med = {name: statistics.median(r["seconds"] for r in runs) for name, runs in by_name.items()}
        cpu = {
            name: statistics.median(r["cpu_seconds"] for r in runs) / (size / 2**30)
            for name, runs in by_name.items()
        }
        ratios = {
            "reader / one GET": med["one GET"] / med["reader"],
            f"parts x{args.parallel} / parts x1": med["parts x1"] / med[f"parts x{args.parallel}"],
            "http reader / http one GET": med["http one GET"] / med["http reader"],
            "file reader / file one GET": med["file one GET"] / med["file reader"],
        }
        peak = max(
            r["peak_buffered"] for r in by_name["reader"] + by_name["http reader"] + by_name["file reader"]
        )
        print(f"  {label}:")
        for name, seconds in med.items():
            print(f"    {name:<13} {seconds:7.2f} s  {size / seconds / 1e6:7.0f} MB/s  "
                  f"{cpu[name]:5.2f} CPU-s/GiB (this process)")  # fmt: skip
        for name, ratio in ratios.items():
            verdict = "PASS" if ratio >= GOAL else "MISS"
            missed |= ratio < GOAL
            print(f"    {name:<27} {ratio:5.2f}  (goal >= {GOAL})  {verdict}")
        bound = (settings.parallel + 1) * settings.range_size
        print(f"    reader peak buffered {peak / 2**20:.1f} MiB (bound {(bound) / 2**20:g} MiB)")
        summary["paths"][label] = {"median_seconds": med, "cpu_seconds_per_gib": cpu, "ratios": ratios,
                                   "reader_peak_buffered": peak}  # fmt: skip
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    (out / "reader-results.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
