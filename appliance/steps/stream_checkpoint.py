"""Checkpoints of a streamed import into the file image target, and the resume from one (glue).

A streamed ImportImage/ImportSnapshot (:mod:`.image_stream`) reads its source once, feeds it through the
confined sequential decoder and writes the RAW disk into a partial file of the image target. Every
``sources.checkpoint_every`` bytes of source the decoder child reports a clean boundary
(:class:`~appliance.image.decoding.Boundary`: everything before its input offset ``B`` is decoded and
in the sink); :meth:`StreamCheckpoints.on_boundary` then fsyncs the partial and saves, in the task store
(the step's checkpoint, fenced by the run's lease):

* ``position``: the verified source offset ``A`` to read from again — the end of the last piece of
  source fed at or before ``B`` — with the object's size and validator (ETag, else Last-Modified) and the
  sha256 of the bytes just before ``A`` (:class:`~appliance.sources.ranges.ReadPosition`); the bytes
  ``[A, B)`` are read again on resume (less than one piece, 1 MiB) to bring the digests to ``B``;
* ``digests``: the running sha256 of the source at ``A``, and its MD5 when the object's ETag is one to
  check (a single-part S3 upload)
  (:class:`~appliance.sources.savedhash.SavedHash`, OpenSSL's context: hashlib's cannot be saved), so a
  resumed import still records the sha256 of the whole source and checks a single-part ETag's MD5,
  without fetching the first part again (where libcrypto cannot be used they are null and the sha256 of
  a resumed import is recorded as unknown, with the reason);
* ``boundary``: the decoder's state at ``B`` (raw and fixed VHD: the offset; stream-VMDK: its header
  facts, the bitmap of written grains, the counters; see each decoder's ``restore``);
* ``output``: the partial file's size once fsynced, and the disk bytes handed to it (progress);
* ``partial``: the partial's path (:data:`appliance.partials.CHECKPOINT_KEY`): the sweeps of a task that
  may still resume leave it; the task's end removes it if nothing published it.

A compressed source (gzip, xz, zstd, bzip2) has no decoder state past its start: it is never
checkpointed, and a task that resumes it decodes it again from byte 0 into a new partial.

Resume (:meth:`ResumePoint.load`): the step's next run (the worker's takeover after the task's process
was killed, a restart of the appliance, another appliance sharing the image directory) finds the
checkpoint, checks it as untrusted (the decoder's ``restore`` checks; a checkpoint that fails them is
dropped), takes the partial again, truncates it to the checkpointed size, reads the source from ``A``
— re-fetching the bytes before ``A`` and comparing their sha256, under ``If-Match`` with the saved ETag
and the same size — and continues; a ``stream.resumed`` event says where. An object replaced since
(another ETag or size, other bytes), a partial that is gone or a checkpoint that does not check out
restart from zero with a ``stream.restarted`` event that says why.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..config import Limits
from ..errors import SourceChanged, UsageError
from ..image.decoders import check_checkpoint, limits_of
from ..image.decoding import Boundary
from ..image.vhdfixed import FORMAT as VHD_FIXED
from ..partials import CHECKPOINT_KEY
from ..progress import StageMeter
from ..sources.hashthread import HashingThread
from ..sources.ranges import ReadPosition
from ..sources.reader import RangeReader
from ..sources.savedhash import SavedHash, available
from ..targets.rawio import RawWriter
from ..workflow.step import StepContext

#: what a checkpoint of this module is (a step's checkpoint of another kind is ignored)
KIND = "image.stream/1"
#: bytes before a position whose sha256 a resumed read fetches again and compares
TAIL = 64 << 10
#: source positions kept while the decoder catches up (one per piece of at most 1 MiB)
_MAX_MARKS = 4096
#: pieces (of at most 1 MiB) waiting for the hashing thread, at most (the feeder waits beyond that)
HASH_DEPTH = 8


class SourceReplaced(SourceChanged):
    """The source is not the object the checkpoint was made of (a resumed read's first GET)."""


@dataclass(frozen=True)
class _Mark:
    """A place in the source the feeder passed: the offset after a piece, the sha256 of the piece's
    last bytes, and the saved digests there."""

    offset: int
    tail: int
    tail_sha256: str
    sha256: str | None
    md5: str | None


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint that checked out: what the step's next run starts from."""

    position: ReadPosition
    boundary: Boundary
    partial: Path
    output_size: int
    produced: int
    sha256: SavedHash | None
    md5: SavedHash | None

    @classmethod
    def load(
        cls, saved: Any, source_key: str, decoder: str, limits: Limits
    ) -> tuple[ResumePoint | None, str | None]:
        """``(point, None)``, or ``(None, why)`` for a checkpoint that is not one to resume from (None
        and None: there is no checkpoint)."""
        if saved is None:
            return None, None
        try:
            return cls._load(saved, source_key, decoder, limits), None
        except (KeyError, TypeError, ValueError) as exc:
            return None, f"the checkpoint is not one to resume from ({exc})"

    @classmethod
    def _load(cls, saved: Any, source_key: str, decoder: str, limits: Limits) -> ResumePoint:
        position, boundary, sha256, md5 = load_source_point(saved, KIND, source_key, decoder, limits)
        output = saved["output"]
        size, produced = output["size"], output["produced"]
        if not all(type(v) is int and v >= 0 for v in (size, produced)) or size > limits.max_virtual_size:
            raise ValueError("the output size or count is not one")
        partial = saved[CHECKPOINT_KEY]
        if not isinstance(partial, str) or not os.path.isabs(partial):
            raise ValueError("the partial is not an absolute path")
        return cls(position, boundary, Path(partial), size, produced, sha256, md5)


def load_source_point(
    saved: Any, kind: str, source_key: str, decoder: str, limits: Limits
) -> tuple[ReadPosition, Boundary, SavedHash | None, SavedHash | None]:
    """The source side of a checkpoint of ``kind`` checked as untrusted: the read position, the decoder's
    boundary and the running digests of the source (None where saved hashes are not available).
    KeyError, TypeError or ValueError for anything that does not check out."""
    if not isinstance(saved, dict) or saved.get("kind") != kind:
        raise ValueError("not a streamed import's checkpoint")
    if saved.get("source") != source_key or saved.get("decoder") != decoder:
        raise ValueError("a checkpoint of another source or decoder")
    position = ReadPosition.from_dict(saved["position"])
    if position.size is None or not (position.etag or position.last_modified):
        raise ValueError("a position without the object's size and validator")
    input_size = position.size if decoder == VHD_FIXED else None  # as the decoder child is given
    boundary = check_checkpoint(decoder, saved["boundary"], limits_of(limits), input_size=input_size)
    if not position.offset <= boundary.input_offset <= position.size:
        raise ValueError(
            f"the boundary {boundary.input_offset} is not between the position {position.offset} and the end"
        )
    sha256 = md5 = None
    digests = saved.get("digests")
    if digests is not None and available():
        sha256 = SavedHash("sha256")
        sha256.load(str(digests["sha256"]), position.offset)  # ValueError: a tampered state
        if "md5" in digests:  # only a source whose ETag is its MD5 is hashed with MD5
            md5 = SavedHash("md5")
            md5.load(str(digests["md5"]), position.offset)
    return position, boundary, sha256, md5


def writing_meter(ctx: StepContext, point: Resume | None) -> StageMeter:
    """The ``writing`` stage's meter of a streamed import, going on from where ``point`` (a resumed run's
    checkpoint, file or S3 target) left the source read and the disk written."""
    return StageMeter(
        "writing",
        None,
        ctx.progress,
        read=point.boundary.input_offset if point is not None else 0,
        written=point.produced if point is not None else 0,
    )


class Resume(Protocol):
    """What a run of :class:`StreamCheckpoints` starts from (:class:`ResumePoint`, or the S3 target's
    :class:`~.s3_checkpoint.S3ResumePoint`)."""

    @property
    def position(self) -> ReadPosition: ...

    @property
    def boundary(self) -> Boundary: ...

    @property
    def produced(self) -> int: ...

    @property
    def sha256(self) -> SavedHash | None: ...

    @property
    def md5(self) -> SavedHash | None: ...


class StreamCheckpoints:
    """The checkpoints of one run of a streamed decode into ``out`` (the partial ``partial``), from the
    start or from ``resume`` (see the module docstring). :func:`~.image_stream.stream_source` calls
    :meth:`opened`, :meth:`passed` and :meth:`on_boundary`."""

    def __init__(
        self,
        ctx: StepContext,
        source_key: str,
        decoder: str,
        out: RawWriter | None,
        partial: Path | None,
        *,
        every: int,
        resume: Resume | None = None,
    ) -> None:
        self.ctx, self.source_key, self.decoder = ctx, source_key, decoder
        self.out, self.partial, self.every, self.resume = out, partial, every, resume
        #: bytes of the disk handed to the partial before this run (a resume's progress goes on there)
        self.base = resume.produced if resume is not None else 0
        # the running digests of the source: saved with each checkpoint where they can be (SavedHash),
        # else hashlib's (known for a run from byte 0 only)
        self._sha256: Any = None
        self._md5: Any = None
        self._saveable = False
        #: why the digests of the whole source are unknown (None: they are known)
        self.unknown: str | None = None
        if resume is not None:
            self._sha256, self._md5 = resume.sha256, resume.md5
            self._saveable = resume.sha256 is not None
            if resume.sha256 is None:
                self.unknown = (
                    "the import resumed after an interruption without the running digests of the source read "
                    "before it (libcrypto's saved hashes are not available): the sha256 of the whole source "
                    "is unknown"
                )
        elif available():
            self._sha256, self._md5, self._saveable = SavedHash("sha256"), SavedHash("md5"), True
        else:
            self._sha256, self._md5 = hashlib.sha256(), hashlib.md5()
        self._marks: deque[_Mark] = deque(maxlen=_MAX_MARKS)
        #: the source's digests and marks are taken here, off the feeding thread (started by passed)
        self._hasher: HashingThread | None = None
        self._lock = threading.Lock()
        self._size: int | None = None
        self._etag: str | None = None
        self._modified: str | None = None
        #: checkpoints saved by this run
        self.saved = 0
        self._checkpointing = True

    @property
    def position(self) -> ReadPosition | None:
        """Where the reader starts (None: at byte 0)."""
        return self.resume.position if self.resume is not None else None

    @property
    def boundary(self) -> Boundary | None:
        """Where the decoder starts (None: at byte 0)."""
        return self.resume.boundary if self.resume is not None else None

    def opened(self, reader: RangeReader) -> None:
        """The reader is open (on resume: the bytes before the position were fetched again and compared,
        a ``stream.resumed`` event says where the stream goes on): the object's size and validator are
        what positions will carry. A source without both is not checkpointed (nothing would tell a
        replaced object on resume)."""
        v = reader.validator
        if reader.size is not None and v:
            self._size, self._etag, self._modified = reader.size, v.etag, v.last_modified
        if reader.md5_etag is None:
            # only a single-part S3 ETag is an MD5 to check: no other source is hashed with MD5
            # (about half sha256's speed here), and its checkpoints carry the sha256 alone
            self._md5 = None
        if self.resume is not None:  # the reader checked the bytes before the position: it goes on
            at, total = self.resume.boundary.input_offset, reader.size
            self.ctx.event(
                "stream.resumed",
                offset=at,
                size=total,
                refetched_from=self.resume.position.offset,
                written=self.resume.produced,
                message=f"resumed at source byte {at} of {total} (an earlier run's checkpoint)",
            )

    def passed(self, start: int, chunk: bytes) -> bytes:
        """The feeder read ``chunk`` (source bytes from ``start``): hash it, mark where it ends, and
        return what the decoder is to get of it (a resumed run re-reads ``[A, B)``: hashed, not fed).
        The hashing and the mark are done in the hashing thread, in order: a mark's saved digests are
        those of the source up to its offset exactly, however far that thread lags."""
        end = start + len(chunk)
        if chunk and (self._sha256 is not None or self._md5 is not None or self._size is not None):
            if self._hasher is None:
                self._hasher = HashingThread(self._hash, depth=HASH_DEPTH)
            self._hasher.put(chunk)
            if self._size is not None:
                self._hasher.call(functools.partial(self._mark, end, chunk))
        skip_to = self.resume.boundary.input_offset if self.resume is not None else 0
        if end <= skip_to:
            return b""
        return chunk[max(0, skip_to - start) :]

    def _hash(self, piece: bytes) -> None:
        """(In the hashing thread.) The running digests take the next bytes of the source."""
        if self._sha256 is not None:
            self._sha256.update(piece)
        if self._md5 is not None:
            self._md5.update(piece)

    def _mark(self, end: int, chunk: bytes) -> None:
        """(In the hashing thread, once ``chunk`` is hashed.) A place to resume from: ``end``."""
        tail = min(TAIL, len(chunk))
        mark = _Mark(
            end,
            tail,
            hashlib.sha256(chunk[-tail:]).hexdigest(),
            self._sha256.state() if self._saveable else None,
            self._md5.state() if self._saveable and self._md5 is not None else None,
        )
        with self._lock:
            self._marks.append(mark)

    def _hashed(self) -> None:
        """Wait until everything the feeder passed is hashed and marked (the thread's error raised)."""
        if self._hasher is not None:
            self._hasher.drain()

    def close(self) -> None:
        """Stop the hashing thread (what was passed is hashed first); the digests stay readable."""
        if self._hasher is not None:
            self._hasher.close()
            self._hasher.drain()  # (closed: raises what the thread raised, if anything)

    def on_boundary(self, boundary: Boundary, produced: int) -> None:
        """The decoder child reached a clean ``boundary`` (``produced``: disk bytes this run handed to the
        partial, all before it): make the partial durable, then save the checkpoint (in the decoder's
        record thread; a lost lease raised here stops the decode)."""
        found = self.source_point(boundary)
        if found is None:
            return
        position, digests = found
        assert self.out is not None
        self.out.flush()  # fsync: what the checkpoint says is in the partial is durable first
        size = os.fstat(self.out.fd).st_size
        if not self._checkpointing:
            return
        try:
            self._save(
                {
                    "kind": KIND,
                    "source": self.source_key,
                    "decoder": self.decoder,
                    CHECKPOINT_KEY: str(self.partial),
                    "position": position.to_dict(),
                    "digests": digests,
                    "boundary": boundary.to_dict(),
                    "output": {"size": size, "produced": self.base + produced},
                }
            )
        except UsageError:  # not run under a lease (a bare engine run): nothing resumes it anyway
            self._checkpointing = False

    def source_point(self, boundary: Boundary) -> tuple[ReadPosition, dict[str, str] | None] | None:
        """Where a resume from ``boundary`` reads the source again (the last mark at or before it) and
        the running digests there; None before the first usable mark."""
        # the decoder got bytes up to the boundary after the feeder passed them: once the hashing
        # thread caught up, the mark at the boundary's piece is there
        self._hashed()
        with self._lock:
            usable = [m for m in self._marks if m.offset <= boundary.input_offset]
            if not usable:
                return None
            mark = usable[-1]
            while self._marks and self._marks[0].offset < mark.offset:
                self._marks.popleft()
        assert self._size is not None
        position = ReadPosition(
            mark.offset, self._size, self._etag, self._modified, mark.tail, mark.tail_sha256
        )
        digests = None
        if mark.sha256 is not None:
            digests = {"sha256": mark.sha256}
            if mark.md5 is not None:
                digests["md5"] = mark.md5
        return position, digests

    def _save(self, data: dict[str, Any]) -> None:
        self.ctx.save_checkpoint(data)
        self.saved += 1

    def sha256(self) -> str | None:
        """The sha256 of the whole source read (None: unknown, see :attr:`unknown`)."""
        self._hashed()
        return str(self._sha256.hexdigest()) if self._sha256 is not None else None

    def md5(self) -> str | None:
        """The MD5 of the whole source read (None: unknown)."""
        self._hashed()
        return str(self._md5.hexdigest()) if self._md5 is not None else None

    def replaced(self, exc: SourceChanged) -> SourceReplaced:
        return SourceReplaced(exc.message)
