"""`imaging digest`, as a user checks a downloaded export with it: a real process; the value it prints is
the one an export recorded and the definition's, computed here with hashlib; a flipped byte fails the
check."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

MiB = 1 << 20


def imaging(*args: str | Path, state: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "IMAGING_CONFIG"}
    env["XDG_STATE_HOME"] = str(state)
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *map(str, args)], env=env, capture_output=True, text=True
    )


def test_digest_prints_the_recorded_value_and_a_flipped_byte_fails_the_check(tmp_path: Path) -> None:
    src = tmp_path / "disk.raw"
    with open(src, "wb") as f:
        f.truncate(9 * MiB)
        f.seek(3 * MiB + 1)
        f.write(os.urandom(100_000))
    out = tmp_path / "disk.vhd"
    res = imaging("export", src, out, "--to", "vhd", "--json", state=tmp_path / "state")
    assert res.returncode == 0, res.stderr
    recorded = json.loads(res.stdout)["digest"]
    assert recorded["chunk_size"] == 64 * MiB
    body = out.read_bytes()
    ours = hashlib.sha256(hashlib.sha256(body).digest()).hexdigest()  # one chunk
    assert recorded["value"] == ours
    res = imaging(
        "digest",
        out,
        "--chunk-size",
        "64MiB",
        "--expect",
        recorded["value"],
        "--json",
        "--sha256",
        state=tmp_path / "state",
    )
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert (
        got["value"] == ours and got["matches"] is True and got["sha256"] == hashlib.sha256(body).hexdigest()
    )
    # S3's form is accepted too; smaller chunks give another value
    res = imaging("digest", out, "--expect", recorded["s3_checksum_sha256"], state=tmp_path / "state")
    assert res.returncode == 0, res.stderr
    # … exactly: base64 is case-sensitive, so the same letters in another case are another digest
    res = imaging(
        "digest", out, "--expect", recorded["s3_checksum_sha256"].swapcase(), state=tmp_path / "state"
    )
    assert res.returncode == 1 and "does not have the expected digest" in res.stderr
    # hex in capitals is the same digest
    res = imaging("digest", out, "--expect", recorded["value"].upper(), state=tmp_path / "state")
    assert res.returncode == 0, res.stderr
    res = imaging("digest", out, "--chunk-size", "1MiB", "--json", state=tmp_path / "state")
    chunks = [hashlib.sha256(body[i : i + MiB]).digest() for i in range(0, len(body), MiB)]
    assert json.loads(res.stdout)["value"] == hashlib.sha256(b"".join(chunks)).hexdigest()
    flipped = bytearray(body)
    flipped[len(body) // 2] ^= 0x80
    out.write_bytes(flipped)
    res = imaging("digest", out, "--expect", recorded["value"], state=tmp_path / "state")
    assert res.returncode == 1 and "does not have the expected digest" in res.stderr
