"""The chunked SHA-256 of an export's output (``sha256-chunked``): cheap enough to take on every export,
checkable by anyone without the appliance.

Definition: cut the output into consecutive chunks of ``chunk_size`` bytes (the last one may be shorter);
``d_i = sha256(chunk_i)`` (32 raw bytes each); the digest is ``sha256(d_1 ‖ d_2 ‖ … ‖ d_N)``, recorded
with the chunk size and the chunk count. It is exactly S3's *composite* SHA-256 checksum of a multipart
object whose parts are the chunks (``ChecksumAlgorithm=SHA256``, shown by ``HeadObject`` with
``ChecksumMode=ENABLED`` as ``base64(digest)-N``), so S3 verifies every part and reports the same value.

Why not one sha256 of the whole output: SHA-256 is serial (one CPU) and costs ~0.86 CPU-s per GiB here,
more than ``qemu-img``'s whole conversion of a mostly empty disk. Chunks are hashed independently in a pool
of threads (hashlib releases the GIL: every CPU), and a chunk that is all zeros (a hole of a RAW export,
which the writer knows without reading it) is not hashed at all: its digest is the digest of a zero chunk
of its length, computed once per process.

Check a downloaded file with ``imaging digest FILE --chunk-size N``, or with coreutils and ``xxd``::

    split -b N --filter='sha256sum | cut -c1-64 | xxd -r -p' FILE | sha256sum
"""

from __future__ import annotations

import base64
import errno
import functools
import hashlib
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Cancelled, UsageError
from ..image.decoding import zeros
from ..image.readbuf import is_pooled

#: the algorithm name recorded with the digest
ALGORITHM = "sha256-chunked"
#: the default chunk: the default S3 part size (``sources.s3.part_size``), so a file export and an S3
#: export of the same disk as the same format carry the same digest — as long as the S3 part size is
#: that default and the output needs no more than 10,000 parts of it (640 GiB): beyond, the part size
#: grows and so does the S3 export's chunk (the chunk size is recorded with every digest)
DEFAULT_CHUNK = 64 << 20
#: the smallest chunk accepted (a file's digest may use chunks smaller than S3's 5 MiB minimum part)
MIN_CHUNK = 1 << 20
#: bytes of data queued for each hashing thread, at most (the writer waits beyond that; a bigger piece
#: still goes when nothing else is queued); per thread, so the writer fills the next chunk while the
#: previous one's thread catches up. Counted in bytes, not pieces: a writer of small pieces besides big
#: ones (a VHD block's 512-byte bitmap, then its 2 MiB of data) keeps as much ahead as a writer of big ones
QUEUE_BYTES = 32 << 20
#: zeros hashed at a time (a chunk that is partly hole: its zeros come from this cached buffer)
_ZERO_STEP = 4 << 20


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` is all zero bytes (compared in place against a cached zero buffer: no copy, no
    allocation of its size)."""
    z = zeros(min(len(data), _ZERO_STEP))
    if isinstance(data, memoryview):
        # (``==`` compares a memoryview item by item, 40x slower than memcmp; ``bytes.startswith`` with
        # the view as the prefix is a memcmp)
        return all(z.startswith(data[at : at + _ZERO_STEP]) for at in range(0, len(data), _ZERO_STEP))
    for at in range(0, len(data), _ZERO_STEP):
        n = min(_ZERO_STEP, len(data) - at)
        if not data.startswith(z if n == len(z) else z[:n], at):
            return False
    return True


class ByteBudget:
    """At most ``limit`` bytes handed out at a time: :meth:`take` waits until ``n`` more fit (or nothing
    is out: a piece bigger than the limit goes alone), :meth:`give` returns them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition(threading.Lock())

    def take(self, n: int) -> None:
        with self._cond:
            while self.used and self.used + n > self.limit:
                self._cond.wait()
            self.used += n

    def give(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify()


@functools.lru_cache(maxsize=8)
def zero_chunk_digest(length: int) -> bytes:
    """The sha256 of ``length`` zero bytes (computed once per length and process)."""
    h = hashlib.sha256()
    step = memoryview(zeros(min(length, _ZERO_STEP)))
    left = length
    while left:
        n = min(left, len(step))
        h.update(step[:n])
        left -= n
    return h.digest()


def combine(chunk_digests: list[bytes]) -> bytes:
    """The chunked digest of these chunk digests (in order)."""
    return hashlib.sha256(b"".join(chunk_digests)).digest()


@dataclass(frozen=True)
class ChunkedDigest:
    """A ``sha256-chunked`` digest: the value, its chunk size and count, the bytes it covers, and what it
    cost (``hashed_bytes``: bytes given to SHA-256; ``zero_chunks``: chunks taken as zero, not hashed)."""

    value: bytes
    chunk_size: int
    chunks: int
    size: int
    hashed_bytes: int = 0
    zero_chunks: int = 0
    #: chunks hashed again from the written output (a write landed behind the writer's position)
    reread_chunks: int = 0

    @property
    def hexdigest(self) -> str:
        return self.value.hex()

    @property
    def s3_checksum(self) -> str:
        """S3's composite form, ``base64(value)-N`` (what ``HeadObject`` answers with ``ChecksumMode``)."""
        return f"{base64.b64encode(self.value).decode('ascii')}-{self.chunks}"

    def to_dict(self) -> dict[str, Any]:
        """The ``digest`` member of an output's location and provenance entry."""
        return {
            "algorithm": ALGORITHM,
            "value": self.hexdigest,
            "chunk_size": self.chunk_size,
            "chunks": self.chunks,
            "s3_checksum_sha256": self.s3_checksum,
            "hashed_bytes": self.hashed_bytes,
            "zero_chunks": self.zero_chunks,
            **({"reread_chunks": self.reread_chunks} if self.reread_chunks else {}),
        }


def check_chunk_size(chunk_size: int) -> int:
    if chunk_size < MIN_CHUNK:
        raise UsageError(f"a digest chunk of {chunk_size} bytes is below the minimum of {MIN_CHUNK}")
    return chunk_size


class ChunkedSha256:
    """The chunked digest of a byte stream written in order: :meth:`update` with data, :meth:`zeros` with
    a run of zero bytes that need not exist (a hole). Each chunk is hashed whole by one thread while the
    writer goes on (a chunk that received only zeros is not hashed): the thread with the fewest bytes still
    to hash when the chunk gets its first data, ties going round in turn. (Not thread ``k mod threads``: a
    chunk that holds a few KiB of data and zeros to its end costs a whole chunk of hashing, and such chunks
    fall at regular intervals — an ext4 disk's backup superblocks every other 64 MiB chunk — so they would
    all queue on one thread, and at the end of a disk the export waited for it alone.) :meth:`result` waits
    and returns the :class:`ChunkedDigest`; :meth:`close` stops the threads (call it on every path)."""

    def __init__(
        self, chunk_size: int = DEFAULT_CHUNK, *, threads: int = 0, name: str = "chunk-sha256"
    ) -> None:
        self.chunk_size = check_chunk_size(chunk_size)
        count = threads or max(1, os.cpu_count() or 1)
        self._queues: list[queue.SimpleQueue[tuple[int, int, Any] | None]] = [
            queue.SimpleQueue() for _ in range(count)
        ]
        self._room = [ByteBudget(QUEUE_BYTES) for _ in range(count)]
        self._digests: dict[int, bytes] = {}
        self._hashed = [0] * count  # bytes each thread hashed (written by that thread only)
        self._sent = [0] * count  # bytes sent to each thread to hash (written by the writer only)
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"{name}-{i}", daemon=True)
            for i in range(count)
        ]
        for t in self._threads:
            t.start()
        self.size = 0
        self._index = 0  # the chunk being filled
        self._filled = 0  # its bytes so far
        self._pending_zeros = 0  # its zeros not yet sent (sent only once the chunk gets data)
        self._started = False  # whether its hashing thread has been sent anything
        self._slot = 0  # the thread hashing it (chosen when it is started)
        self._last_slot = -1  # the thread chosen last (where the turn of a tie starts)
        self._zero_chunks = 0
        self._result: ChunkedDigest | None = None
        self._closed = False

    # the hashing threads ---------------------------------------------------------------------------

    _DATA, _ZEROS, _END = 0, 1, 2

    def _run(self, slot: int) -> None:
        q = self._queues[slot]
        h = hashlib.sha256()
        step = memoryview(zeros(_ZERO_STEP))
        while (item := q.get()) is not None:
            kind, index, payload = item
            if kind == self._DATA:
                h.update(payload)
                self._hashed[slot] += len(payload)
                self._room[slot].give(len(payload))
            elif kind == self._ZEROS:
                left = int(payload)
                while left:
                    n = min(left, _ZERO_STEP)
                    h.update(step[:n])
                    left -= n
                self._hashed[slot] += int(payload)
            else:
                self._digests[index] = h.digest()
                h = hashlib.sha256()

    def _least_loaded(self) -> int:
        """The thread with the fewest bytes sent and not yet hashed; among equals the next after the one
        chosen last. (Reads another thread's counter without a lock: a stale value only makes the choice
        less even, never wrong.)"""
        count = len(self._queues)
        order = [(self._last_slot + 1 + i) % count for i in range(count)]
        return min(order, key=lambda slot: self._sent[slot] - self._hashed[slot])

    def _send(self, kind: int, payload: Any) -> None:
        if not self._started:
            self._slot = self._last_slot = self._least_loaded()
            self._started = True
        slot = self._slot
        if kind == self._DATA:
            self._room[slot].take(len(payload))
            self._sent[slot] += len(payload)
        elif kind == self._ZEROS:
            self._sent[slot] += int(payload)
        self._queues[slot].put((kind, self._index, payload))

    def _end_chunk(self) -> None:
        if self._started:
            if self._pending_zeros:
                self._send(self._ZEROS, self._pending_zeros)
            self._send(self._END, None)
        else:  # nothing but zeros: the precomputed digest, nothing hashed
            self._digests[self._index] = zero_chunk_digest(self._filled)
            self._zero_chunks += 1
        self._index += 1
        self._filled = self._pending_zeros = 0
        self._started = False

    # the writer's side -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed or self._result is not None:
            raise ValueError("update of a finished digest")

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` (copied unless it is ``bytes`` or a pooled read buffer, which is not refilled
        while this holds it: any other buffer the caller may reuse)."""
        self._check_open()
        buf = data if isinstance(data, bytes) or is_pooled(data) else bytes(data)
        view = memoryview(buf)
        while view:
            n = min(len(view), self.chunk_size - self._filled)
            if self._pending_zeros:
                self._send(self._ZEROS, self._pending_zeros)
                self._pending_zeros = 0
            self._send(self._DATA, view[:n])  # (starts the chunk on its thread)
            self._filled += n
            self.size += n
            view = view[n:]
            if self._filled == self.chunk_size:
                self._end_chunk()

    def zeros(self, length: int) -> None:
        """Append ``length`` zero bytes without their being given (a hole)."""
        self._check_open()
        while length:
            n = min(length, self.chunk_size - self._filled)
            self._pending_zeros += n  # sent to the chunk's thread only if the chunk gets data too
            self._filled += n
            self.size += n
            length -= n
            if self._filled == self.chunk_size:
                self._end_chunk()

    def result(self) -> ChunkedDigest:
        """The digest of everything appended (waits for the hashing threads)."""
        if self._result is None:
            if self._closed:
                raise ValueError("the digest was abandoned")
            if self._filled or self._index == 0:  # the last, short chunk (an empty stream: one chunk)
                self._end_chunk()
            self.close()
            digests = [self._digests[i] for i in range(self._index)]
            self._result = ChunkedDigest(
                combine(digests),
                self.chunk_size,
                len(digests),
                self.size,
                sum(self._hashed),
                self._zero_chunks,
            )
        return self._result

    @property
    def hashed_by_thread(self) -> tuple[int, ...]:
        """Bytes each hashing thread has hashed so far (data and zeros)."""
        return tuple(self._hashed)

    def chunk_digests(self) -> list[bytes]:
        """The digest of every chunk, in order (after :meth:`result`)."""
        if self._result is None:
            raise ValueError("the digest is not finished")
        return [self._digests[i] for i in range(self._index)]

    def close(self) -> None:
        """Stop the hashing threads (what was not hashed is dropped)."""
        if self._closed:
            return
        self._closed = True
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()


def _data_map(fd: int, size: int, start: int = 0) -> list[tuple[int, int]]:
    """``(start, end)`` data ranges of ``fd`` between ``start`` and ``size`` (``SEEK_DATA``/``SEEK_HOLE``;
    everything where unknown)."""
    ranges: list[tuple[int, int]] = []
    pos = start
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                ranges.append((pos, size))
            break
        if start >= size:
            break
        try:
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError:
            end = size
        ranges.append((start, end))
        pos = end
    return ranges


def digest_file(
    path: Path,
    chunk_size: int = DEFAULT_CHUNK,
    *,
    threads: int = 0,
    on_progress: Callable[[int], object] | None = None,
    cancel: threading.Event | None = None,
    whole: Any = None,
) -> ChunkedDigest:
    """The chunked digest of the file (or block device) at ``path``: its holes are not read. ``whole``: a
    ``hashlib`` object also fed every byte (the holes as zeros): a whole-file sha256 from the same read."""
    piece = 4 << 20
    hasher = ChunkedSha256(chunk_size, threads=threads, name="digest-file")
    try:
        with open(path, "rb", buffering=0) as f:
            fd = f.fileno()
            size = os.lseek(fd, 0, os.SEEK_END)
            pos = 0
            for start, end in _data_map(fd, size):
                if start > pos:
                    hasher.zeros(start - pos)
                    if whole is not None:
                        _hash_zeros(whole, start - pos)
                pos = start
                while pos < end:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("digest cancelled")
                    n = min(piece, end - pos)
                    data = os.pread(fd, n, pos)
                    if len(data) != n:
                        raise UsageError(f"{path} shrank while it was read (at byte {pos + len(data)})")
                    if data == zeros(n):
                        hasher.zeros(n)
                    else:
                        hasher.update(data)
                    if whole is not None:
                        whole.update(data)
                    pos += n
                    if on_progress is not None:
                        on_progress(pos)
            if size > pos:
                hasher.zeros(size - pos)
                if whole is not None:
                    _hash_zeros(whole, size - pos)
        return hasher.result()
    finally:
        hasher.close()


def range_digest(fd: int, start: int, end: int, *, cancel: threading.Event | None = None) -> bytes:
    """The sha256 of bytes ``[start, end)`` of the file or block device open as ``fd`` (its holes, and
    anything past its end, hashed as zeros without being read): one chunk hashed again."""
    h = hashlib.sha256()
    piece = 4 << 20
    size = os.lseek(fd, 0, os.SEEK_END)
    pos = start
    for data_start, data_end in _data_map(fd, min(end, size), start):  # that chunk's, not from byte 0
        if data_end <= start:
            continue
        data_start = max(data_start, start)
        if data_start > pos:
            _hash_zeros(h, data_start - pos)
            pos = data_start
        while pos < data_end:
            if cancel is not None and cancel.is_set():
                raise Cancelled("digest cancelled")
            data = os.pread(fd, min(piece, data_end - pos), pos)
            if not data:
                break
            h.update(data)
            pos += len(data)
    if end > pos:
        _hash_zeros(h, end - pos)
    return h.digest()


def _hash_zeros(h: Any, length: int) -> None:
    step = memoryview(zeros(min(length, _ZERO_STEP)))
    while length:
        n = min(length, len(step))
        h.update(step[:n])
        length -= n
