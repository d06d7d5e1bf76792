"""The digest of a source as it streams past (:mod:`appliance.sources.digest`)."""

from __future__ import annotations

import base64
import hashlib

from appliance.sources.digest import StreamDigest, b64_to_hex


def test_the_sha256_is_that_of_every_chunk_written_in_order() -> None:
    data = bytes(range(256)) * 1000
    digest = StreamDigest()
    written: list[tuple[int, bytes]] = []
    write = digest.wrap(lambda offset, chunk: written.append((offset, chunk)))
    for offset in range(0, len(data), 4096):
        write(offset, data[offset : offset + 4096])
    assert b"".join(c for _, c in written) == data  # the chunks still reach the writer
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert digest.to_dict() == {"sha256": digest.sha256, "size": len(data), "checked": []}


def test_a_stream_with_a_gap_has_no_sha256_and_says_why() -> None:
    digest = StreamDigest()
    digest.update(b"tail only")
    digest.gap("resumed at byte 42")
    out = digest.to_dict()
    assert out["sha256"] is None and out["sha256_unknown"] == "resumed at byte 42"


def test_checked_part_md5s_are_listed_in_part_order() -> None:
    digest = StreamDigest()
    digest.part_md5(1, "b" * 32)
    digest.part_md5(0, "a" * 32)
    digest.part_md5(2, None)  # no MD5 ETag to check
    (parts,) = digest.to_dict()["checked"]
    assert parts["what"] == "manifest-part-md5" and parts["verified"] == 2
    assert [p["index"] for p in parts["parts"]] == [0, 1, 2]


def test_an_s3_checksum_is_hex_only_when_it_is_a_whole_sha256() -> None:
    raw = hashlib.sha256(b"x").digest()
    assert b64_to_hex(base64.b64encode(raw).decode()) == raw.hex()
    assert b64_to_hex(base64.b64encode(raw).decode() + "-3") is None  # a multipart composite
    assert b64_to_hex(base64.b64encode(b"short").decode()) is None
