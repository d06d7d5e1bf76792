"""The checkpoint marks of a streamed import, taken in the hashing thread: whatever boundary the
decoder reports, the mark chosen for it carries the running digests of exactly the source bytes
before its offset, so a resume from it completes the digest of the whole source."""

from __future__ import annotations

import contextlib
import hashlib
import random
from dataclasses import dataclass
from typing import Any

import pytest

from appliance.image.decoding import Boundary
from appliance.image.rawstream import RAW
from appliance.sources.ranges import Validator
from appliance.sources.savedhash import SavedHash, available
from appliance.steps.stream_checkpoint import StreamCheckpoints


@dataclass
class OpenedSource:
    """What :meth:`StreamCheckpoints.opened` reads of an open reader: its size and validator."""

    size: int
    validator: Validator
    md5_etag: str | None


@pytest.mark.skipif(not available(), reason="libcrypto's saved hashes are not usable here")
@pytest.mark.parametrize("md5_etag", [None, "an md5 etag"], ids=["sha256", "sha256+md5"])
def test_every_boundary_gets_a_mark_whose_saved_digests_cover_exactly_the_bytes_before_it(
    md5_etag: str | None,
) -> None:
    rng = random.Random(7)
    pieces = [rng.randbytes(rng.randrange(1, 1 << 20)) for _ in range(40)]
    source = b"".join(pieces)
    ctx: Any = None  # not used before a boundary is saved
    checkpoints = StreamCheckpoints(ctx, "s3://b/k", RAW, None, None, every=1 << 20)
    checkpoints.opened(OpenedSource(len(source), Validator("etag", None), md5_etag))  # type: ignore[arg-type]
    found = []
    with contextlib.closing(checkpoints):
        at = 0
        for piece in pieces:
            assert checkpoints.passed(at, piece) == piece  # a run from byte 0 feeds everything
            at += len(piece)
            # the decoder reports a boundary inside the piece just fed (hashing may lag behind)
            boundary = at - len(piece) // 2
            found.append((boundary, checkpoints.source_point(Boundary(RAW, boundary))))
        assert checkpoints.sha256() == hashlib.sha256(source).hexdigest()
        assert (checkpoints.md5() is None) == (md5_etag is None)
    for boundary, point in found[1:]:  # (the first boundary falls before the first mark)
        assert point is not None
        position, digests = point
        assert position.offset <= boundary and boundary - position.offset < 1 << 20  # the last piece's end
        assert digests is not None and set(digests) == ({"sha256"} | ({"md5"} if md5_etag else set()))
        resumed = SavedHash("sha256")
        resumed.load(digests["sha256"], position.offset)  # refused unless the state is at that offset
        resumed.update(source[position.offset :])
        assert resumed.hexdigest() == hashlib.sha256(source).hexdigest()
        tail = source[position.offset - position.tail : position.offset]
        assert hashlib.sha256(tail).hexdigest() == position.tail_sha256
