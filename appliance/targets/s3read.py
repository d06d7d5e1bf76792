"""A stored S3 object read back at random offsets: ranged GETs of whole blocks, kept in a small cache.

:class:`ObjectRangeReader` is a read-only, seekable binary file over ``bucket/key`` (``read``, ``seek``,
``tell``, :meth:`~ObjectRangeReader.read_at`), for the checks that need random access to an image that was
streamed into S3 without a local copy: the content inspection of the written disk and the guest reader
(:func:`appliance.guest.validate.validate_ranges` serves the confined probe from it). Every GET asks for a
whole aligned block (``block_size``, default 1 MiB) with ``If-Match`` on the object's ETag, so an object
replaced under the reader fails (``Source.Changed``) instead of mixing two versions, and a short or long
answer is ``UploadFailed``; the last ``cache_blocks`` blocks (default 32: 32 MiB) are kept, least recently
used first out, so a parser's many small reads of the same metadata cost one GET per block.
``gets`` counts the GETs made. The reader uses the appliance's own S3 client: no URL or credential leaves
this process.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from ..errors import Cancelled, SourceChanged
from ..readat import ReadAtFile
from .base import TargetError

BLOCK = 1 << 20
CACHE_BLOCKS = 32


class ObjectRangeReader(ReadAtFile):
    """``bucket/key`` of ``size`` bytes with ETag ``etag``, read in cached blocks (module docstring)."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        key: str,
        *,
        size: int,
        etag: str,
        block_size: int = BLOCK,
        cache_blocks: int = CACHE_BLOCKS,
        cancel: threading.Event | None = None,
    ) -> None:
        super().__init__()
        self.client, self.bucket, self.key = client, bucket, key
        self.where = f"s3://{bucket}/{key}"
        self.size, self.etag = size, etag.strip('"')
        self.block_size, self.cache_blocks = block_size, max(1, cache_blocks)
        self.cancel = cancel
        self.gets = 0
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ the blocks

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer only at the end of the object)."""
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        pieces = []
        pos = offset
        while pos < end:
            index = pos // self.block_size
            block = self._block(index)
            start = pos - index * self.block_size
            take = min(end - pos, len(block) - start)
            pieces.append(block[start : start + take])
            pos += take
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _block(self, index: int) -> bytes:
        with self._lock:
            block = self._cache.get(index)
            if block is not None:
                self._cache.move_to_end(index)
                return block
        block = self._get(index)
        with self._lock:
            self._cache[index] = block
            while len(self._cache) > self.cache_blocks:
                self._cache.popitem(last=False)
        return block

    def _get(self, index: int) -> bytes:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"reading {self.where} cancelled")
        start = index * self.block_size
        end = min(self.size, start + self.block_size) - 1
        self.gets += 1
        try:
            resp = self.client.get_object(
                Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-{end}", IfMatch=f'"{self.etag}"'
            )
            data = resp["Body"].read()
        except Exception as exc:
            code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "412"):
                raise SourceChanged(
                    f"{self.where} was replaced while it was read back (its ETag is no longer {self.etag})"
                ) from exc
            raise TargetError(
                f"GetObject {self.where} bytes {start}-{end} failed: {code or type(exc).__name__}",
                "UploadFailed",
            ) from exc
        if len(data) != end + 1 - start:
            raise TargetError(
                f"GetObject {self.where} bytes {start}-{end} answered {len(data)} bytes", "UploadFailed"
            )
        return bytes(data)
