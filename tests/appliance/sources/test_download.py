"""Downloading a source into a file with the ranged reader (appliance.sources.download), from a real
loopback HTTP server and the moto S3 server: parallel ranges, the download limit, checkpoints and a
resume from one."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import Cancelled, ImageRejected
from appliance.sources.download import download_to_file
from appliance.sources.ranges import ReaderSettings, ReaderStats
from appliance.sources.urlfilter import UrlPolicy
from tests.httpfixtures import TestHTTPServer
from tests.servers import MotoServer

RS = 64 * 1024
SETTINGS = ReaderSettings(
    parallel=3, range_size=RS, stall_seconds=5, retries=2, backoff=0.01, backoff_max=0.05, checkpoint_every=RS
)
DATA = os.urandom(100 * RS + 5)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server() -> Iterator[TestHTTPServer]:
    with TestHTTPServer() as srv:
        srv.add("/disk.raw", DATA)
        yield srv


@pytest.fixture
def policy(server: TestHTTPServer) -> UrlPolicy:
    return UrlPolicy(allowed_endpoints=[server.endpoint])


def range_starts(server: TestHTTPServer) -> list[int]:
    return [int(h.headers["Range"].removeprefix("bytes=").split("-")[0]) for h in server.hits("/disk.raw")]


def test_a_url_is_downloaded_in_parallel_ranges_with_its_sha256_and_progress(
    server: TestHTTPServer, policy: UrlPolicy, tmp_path: Path
) -> None:
    progress: list[tuple[int, int | None]] = []
    reserved: list[tuple[int, bool]] = []
    stats = ReaderStats()
    result = download_to_file(
        {"url": server.url("/disk.raw")}, tmp_path / "d", policy, max_bytes=len(DATA), settings=SETTINGS,
        on_progress=lambda d, t: progress.append((d, t)), reserve=lambda n, w: reserved.append((n, w)),
        stats=stats,
    )  # fmt: skip
    assert (result.size, result.sha256) == (len(DATA), SHA)
    assert (tmp_path / "d").read_bytes() == DATA
    assert os.stat(tmp_path / "d").st_mode & 0o777 == 0o600
    assert reserved == [(len(DATA), True)]  # the declared size, once, before any byte
    assert progress[-1] == (len(DATA), len(DATA))
    assert sorted(range_starts(server)) == list(range(0, len(DATA), RS))  # every range once
    assert stats.requests == len(range_starts(server)) and stats.received == len(DATA)


def test_an_s3_object_over_the_limit_is_refused_before_any_byte_and_leaves_no_file(
    moto: MotoServer, tmp_path: Path
) -> None:
    s3 = moto.client("s3")
    s3.create_bucket(Bucket="dl-limit")
    s3.put_object(Bucket="dl-limit", Key="disk.raw", Body=DATA)
    cfg = {"endpoint_url": moto.endpoint, "access_key": "testing", "secret_key": "testing"}
    reserved: list[int] = []
    stats = ReaderStats()
    with pytest.raises(ImageRejected) as err:
        download_to_file(
            {"bucket": "dl-limit", "key": "disk.raw"}, tmp_path / "d",
            UrlPolicy(allowed_endpoints=[moto.endpoint]), cfg, max_bytes=len(DATA) - 1, settings=SETTINGS,
            reserve=lambda n, w: reserved.append(n), stats=stats,
        )  # fmt: skip
    assert err.value.code == "SizeLimitExceeded.Download"
    assert f"s3://dl-limit/disk.raw is larger ({len(DATA)} bytes)" in err.value.message
    assert (reserved, stats.received) == ([], 0)
    assert not (tmp_path / "d").exists()


def interrupted_download(
    server: TestHTTPServer, policy: UrlPolicy, dst: Path, stop_at: int
) -> list[dict[str, Any]]:
    """Download until ``stop_at`` bytes are written, then cancel (keeping the file); the checkpoints."""
    cancel = threading.Event()
    saved: list[dict[str, Any]] = []

    def progress(done: int, total: int | None) -> None:
        if done >= stop_at:
            cancel.set()

    with pytest.raises(Cancelled):
        download_to_file(
            {"url": server.url("/disk.raw")}, dst, policy, max_bytes=len(DATA), settings=SETTINGS,
            cancel=cancel, on_progress=progress, checkpoint=saved.append, keep_on_cancel=True,
        )  # fmt: skip
    assert dst.exists() and saved
    return saved


def test_a_download_resumed_from_its_checkpoint_fetches_only_from_there_and_hashes_the_whole_file(
    server: TestHTTPServer, policy: UrlPolicy, tmp_path: Path
) -> None:
    dst = tmp_path / "d"
    saved = interrupted_download(server, policy, dst, stop_at=50 * RS)
    position = saved[-1]["position"]
    # at a range boundary, near where it stopped (ranges already fetched ahead are read before the cancel)
    assert position["offset"] % RS == 0 and 0 < position["offset"] <= (50 + SETTINGS.parallel + 1) * RS
    assert dst.stat().st_size >= position["offset"]  # the bytes before it were written (and fsynced)
    before = len(server.hits("/disk.raw"))
    result = download_to_file(
        {"url": server.url("/disk.raw")}, dst, policy, max_bytes=len(DATA), settings=SETTINGS,
        resume=saved[-1],
    )  # fmt: skip
    assert (result.size, result.sha256) == (len(DATA), SHA)
    assert dst.read_bytes() == DATA
    resumed = range_starts(server)[before:]
    assert min(resumed) == position["offset"] - RS  # the last range before the checkpoint, checked again
    assert sorted(resumed) == list(range(position["offset"] - RS, len(DATA), RS))
    assert server.sent <= 1.1 * len(DATA)  # both attempts together


def test_a_resume_whose_file_does_not_match_its_checkpoint_starts_again_from_zero(
    server: TestHTTPServer, policy: UrlPolicy, tmp_path: Path
) -> None:
    dst = tmp_path / "d"
    saved = interrupted_download(server, policy, dst, stop_at=30 * RS)
    offset = saved[-1]["position"]["offset"]
    with open(dst, "r+b") as f:  # a byte of the last range before the checkpoint is not what was read
        f.seek(offset - 10)
        byte = f.read(1)
        f.seek(offset - 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = len(server.hits("/disk.raw"))
    result = download_to_file(
        {"url": server.url("/disk.raw")}, dst, policy, max_bytes=len(DATA), settings=SETTINGS,
        resume=saved[-1],
    )  # fmt: skip
    assert result.sha256 == SHA and dst.read_bytes() == DATA
    assert min(range_starts(server)[before:]) == 0


def test_a_failed_download_removes_its_file_and_a_cancelled_one_keeps_it_only_when_asked(
    server: TestHTTPServer, policy: UrlPolicy, tmp_path: Path
) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        download_to_file(
            {"url": server.url("/disk.raw")}, tmp_path / "d", policy, max_bytes=len(DATA), settings=SETTINGS,
            cancel=cancel,
        )  # fmt: skip
    assert not (tmp_path / "d").exists()
    server.routes["/disk.raw"].script.extend(["404"])
    with pytest.raises(Exception) as err:
        download_to_file(
            {"url": server.url("/disk.raw")}, tmp_path / "e", policy, max_bytes=len(DATA), settings=SETTINGS,
        )  # fmt: skip
    assert getattr(err.value, "code", None) == "SourceUnavailable"
    assert not (tmp_path / "e").exists()
