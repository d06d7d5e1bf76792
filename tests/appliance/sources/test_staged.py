"""Staged uploads on disk (:mod:`appliance.sources.staged`) and read back as a source
(:mod:`appliance.sources.upload`): real files in a temporary directory, the ranged reader and
``fetch_to_file`` over the upload origin."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from appliance.config import UploadConfig
from appliance.errors import ImagingError
from appliance.sources.methods import ImportMethodDisabled, check_enabled
from appliance.sources.ranges import ReaderSettings, Validator
from appliance.sources.reader import RangeReader
from appliance.sources.staged import UploadArea
from appliance.sources.stagedproto import Range, parse_content_range, upload_refs
from appliance.sources.upload import UploadOrigin, read_parts, upload_manifest
from appliance.timestamps import utc_now

MiB = 1 << 20


@pytest.fixture
def area(tmp_path: Path) -> UploadArea:
    return UploadArea(
        UploadConfig(directory=tmp_path / "uploads", max_size=16 * MiB, min_free=0, expire_hours=1)
    )


def body(data: bytes, piece: int = 65536) -> Callable[[int], bytes]:
    """``read(n)`` over ``data``, at most ``piece`` bytes at a time."""
    pos = [0]

    def read(n: int) -> bytes:
        chunk = data[pos[0] : pos[0] + min(n, piece)]
        pos[0] += len(chunk)
        return chunk

    return read


def broken_after(data: bytes, cut: int) -> Callable[[int], bytes]:
    """A body whose connection breaks after ``cut`` bytes."""
    read = body(data[:cut])

    def reading(n: int) -> bytes:
        chunk = read(n)
        if not chunk:
            raise ConnectionResetError("the client went away")
        return chunk

    return reading


def code_of(call: Callable[[], object]) -> str:
    with pytest.raises(ImagingError) as err:
        call()
    return err.value.code


def data(n: int, seed: int = 1) -> bytes:
    out = bytearray()
    block = hashlib.sha256(bytes([seed])).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


def test_a_whole_upload_completes_and_reads_back_through_the_ranged_reader(area: UploadArea) -> None:
    disk = data(3 * MiB + 5)
    info, created = area.put("acct", "d1", parse_content_range(None, len(disk)), body(disk))
    assert created and info.complete and info.size == len(disk) and info.etag
    reader = RangeReader(
        UploadOrigin(area, "acct", "d1"), ReaderSettings(parallel=2, range_size=MiB), cancel=threading.Event()
    )
    with reader:
        assert reader.ranged and reader.size == len(disk)
        assert reader.read() == disk


def test_a_dropped_unsigned_body_keeps_its_prefix_and_the_upload_resumes_there(area: UploadArea) -> None:
    disk = data(2 * MiB)
    with pytest.raises(ConnectionResetError):
        area.put("acct", "d", Range(0, len(disk), len(disk)), broken_after(disk, MiB + 7))
    assert area.get("acct", "d").received == MiB + 7
    # a gap is refused before the body is read; a repeated range is compared, a different byte refused
    assert (
        code_of(lambda: area.put("acct", "d", Range(MiB + 8, 10, len(disk)), body(b"x" * 10)))
        == "Upload.RangeGap"
    )
    changed = bytearray(disk[MiB : MiB + 100])
    changed[3] ^= 1
    assert code_of(lambda: area.put("acct", "d", Range(MiB, 100, len(disk)), body(bytes(changed)))) == (
        "Upload.RangeMismatch"
    )
    assert area.get("acct", "d").received == MiB + 7
    rest = Range(MiB, len(disk) - MiB, len(disk))
    info, created = area.put("acct", "d", rest, body(disk[MiB:]))
    assert not created and info.complete
    assert area.data_path("acct", "d").read_bytes() == disk
    # complete: the same bytes again are accepted, anything new is refused
    assert area.put("acct", "d", Range(0, 10, len(disk)), body(disk[:10]))[0].complete
    assert code_of(lambda: area.put("acct", "d", Range(0, 10, 99), body(disk[:10]))) == "Upload.SizeMismatch"


def test_a_signed_body_is_kept_only_when_it_hashes_to_its_signature(area: UploadArea) -> None:
    disk = data(MiB)
    wrong = hashlib.sha256(b"other").hexdigest()
    assert code_of(lambda: area.put("a", "s", Range(0, MiB, MiB), body(disk), payload_sha256=wrong)) == (
        "Upload.PayloadMismatch"
    )
    assert area.get("a", "s").received == 0
    with pytest.raises(ConnectionResetError):  # a signed body cut short keeps nothing either
        area.put(
            "a",
            "s",
            Range(0, MiB, MiB),
            broken_after(disk, 1000),
            payload_sha256=hashlib.sha256(disk).hexdigest(),
        )
    assert area.get("a", "s").received == 0
    right = hashlib.sha256(disk).hexdigest()
    assert area.put("a", "s", Range(0, MiB, MiB), body(disk), payload_sha256=right)[0].complete


def test_the_size_cap_is_checked_before_the_body_and_as_it_arrives(area: UploadArea) -> None:
    never = body(b"")  # a body the cap refuses before it is read
    assert code_of(lambda: area.put("a", "big", Range(0, None, 17 * MiB), never)) == "Upload.TooLarge"
    chunked = Range(0, None, None)  # no length said: refused when the bytes pass the cap
    assert code_of(lambda: area.put("a", "big", chunked, body(bytes(17 * MiB), MiB))) == "Upload.TooLarge"
    assert not area.get("a", "big").complete


def test_uploads_belong_to_their_account(area: UploadArea) -> None:
    area.put("alice", "same", Range(0, 4, 4), body(b"abcd"))
    assert code_of(lambda: area.get("bob", "same")) == "Upload.NotFound"
    area.put("bob", "same", Range(0, 4, 4), body(b"wxyz"))
    assert area.data_path("alice", "same").read_bytes() == b"abcd"
    assert [i.account for i in area.uploads_of({"bob"})] == ["bob"]
    assert code_of(lambda: area.get("alice", "../bob")) == "Upload.InvalidId"


def test_an_origin_fails_with_a_change_once_its_upload_is_replaced(area: UploadArea) -> None:
    disk = data(MiB)
    info, _ = area.put("a", "r", Range(0, MiB, MiB), body(disk))
    manifest = upload_manifest(info, "RAW", part_size=256 * 1024)
    assert manifest.size == MiB and len(manifest.parts) == 4
    origin = UploadOrigin(area, "a", "r")
    out = bytearray(MiB)

    def write(offset: int, chunk: bytes) -> None:
        out[offset : offset + len(chunk)] = chunk

    assert read_parts(manifest, write, origin, Validator(etag=info.etag)) == MiB and bytes(out) == disk
    area.delete("a", "r", lambda *_: False)
    area.put("a", "r", Range(0, MiB, MiB), body(disk))  # the same bytes, another upload
    assert code_of(lambda: read_parts(manifest, write, origin, Validator(etag=info.etag))) == "Source.Changed"


def test_expired_uploads_are_swept_unless_an_active_import_reads_them(area: UploadArea) -> None:
    for name in ("old", "used", "new"):
        area.put("a", name, Range(0, 4, 4), body(b"data"))
    later = utc_now() + timedelta(hours=2)
    assert code_of(lambda: area.get("a", "old", now=later)) == "Upload.NotFound"
    removed = area.sweep(lambda account, upload_id: (account, upload_id) == ("a", "used"), now=later)
    assert sorted(p.name for p in removed) == ["new", "old"]
    assert area.data_path("a", "used").exists()
    assert code_of(lambda: area.delete("a", "used", lambda *_: True)) == "Upload.InUse"


def test_upload_references_and_disabled_methods() -> None:
    params = {"disk_container": {"url": "upload://x1"}, "other": ["upload://y", "s3://b/k", "upload://../z"]}
    assert upload_refs(params) == {"x1", "y"}
    with pytest.raises(ImportMethodDisabled) as err:
        check_enabled(None, "upload", "Url upload://x1")
    assert "import method upload" in err.value.message and err.value.code == "ImportMethodDisabled"
    assert json.dumps(err.value.to_dict())
