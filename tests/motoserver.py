"""The moto server the tests run as S3 and EC2 (``python motoserver.py -H HOST -p PORT``), with one race
of moto's closed.

moto computes a stored part's or object's ETag lazily, the first time an answer shows it: it seeks the
object's buffer to 0 and reads it to the end, hashing as it goes, without the lock it takes for every
other read of that buffer. Two requests that show the same part at once, ``UploadPart`` answering it and
a ``ListParts`` polled by a test beside it, move one read position between them: one of them hashes the
part's bytes twice over, caches that, and answers an ETag that is not the part's MD5 (about one part in
forty under four pollers). The appliance then refuses its own part as damaged on its way, rightly for an
S3 that did this. S3 does not: an ETag is fixed when the part is stored. Here the hash is taken under the
object's lock, as its other reads are.
"""

from __future__ import annotations

import sys
from typing import Any

from moto.s3.models import FakeKey
from moto.server import main

_unlocked_etag = FakeKey.etag.fget
assert _unlocked_etag is not None


def locked_etag(key: Any) -> str:
    """``key.etag``, hashed under the key's lock (the lock moto's own ``value`` reads the buffer under;
    moto never holds it while it hashes, so this cannot wait on itself)."""
    with key.lock:
        return str(_unlocked_etag(key))


if __name__ == "__main__":
    FakeKey.etag = property(locked_etag)  # type: ignore[method-assign,assignment]
    main(sys.argv[1:])
