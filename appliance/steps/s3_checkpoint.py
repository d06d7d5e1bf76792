"""Checkpoints of a streamed import into the S3 image target, and the resume from one (glue).

A streamed ImportImage/ImportSnapshot into the S3 image target (:mod:`.image_stream_s3`) hands the
decoder's output, in order, to a multipart upload of the staging key ``<key>.partial``
(:class:`~appliance.targets.s3staged.StagedImage`). A decoder boundary (input offset ``B``, the sink at
disk offset ``P``) and the end of a part (the upload holds ``[0, E)``) rarely coincide, so a checkpoint
pairs a boundary with the parts already uploaded *past* it: at every boundary the source side is noted
(as for the file target, :class:`~.stream_checkpoint.StreamCheckpoints`: the read position, the running
source digests, the decoder's state), and the latest noted boundary with ``P <= E`` — ``E`` the end of
the longest run of parts 1..k S3 has acknowledged — is saved in the task store with

* ``upload``: the bucket, the staging key, the upload id, the part size, the count ``k`` of parts 1..k
  (all of the part size: ``E = k x part size``), the digest of their ordered ETags
  (:func:`~appliance.targets.s3resume.etags_digest`) and the states at ``E`` of the sha256 of the
  object's bytes (:class:`~appliance.sources.savedhash.SavedHash`) and of their ``sha256-chunked``
  (:class:`~appliance.targets.savedchunks.SavedChunkedSha256`: the outer hash over the finished chunks'
  digests and the inner one of the chunk being filled). Of constant size: a save per acknowledged part
  does not grow with the parts (a list of every part would make the saves of a 10,000-part upload
  write about 10 GB to the store). The chunked digest keeps its state rather than being recomputed from
  the parts' ranges on resume for the same reason: that needs either every chunk digest in the
  checkpoint or a read-back of the whole upload;
* ``output``: ``P`` and the disk bytes handed on before it (progress);
* ``partial``: the staging object's URL (:data:`appliance.partials.CHECKPOINT_KEY`): the sweeps of a
  task that may still resume leave its upload.

Resume (:meth:`S3ResumePoint.load`, then :func:`~appliance.targets.s3resume.verify_parts`): the step's
next run checks the checkpoint as untrusted, lists the upload's parts (``ListParts``, paginated) and
checks that parts 1..k are there, of the part size, with the recorded ETag digest; the decoder restarts
at ``B``, the reader re-fetches from the position before it (comparing the bytes, as for a file), the
sink starts at ``P`` and drops the output below ``E`` (``[P, E)`` is produced again: the upload holds
it), and the upload goes on with part k+1 (a ``stream.resumed`` event). An upload that is gone (aborted,
expired), a part that differs, a checkpoint that does not check out or a replaced source restart from
zero with a ``stream.restarted`` event (the old upload aborted).

A checkpoint of the earlier format (:data:`KIND_LISTING_PARTS`, every part listed in it, saved by
appliances before this one) is not continued: it restarts from zero with a ``stream.restarted`` event
saying so, and its upload, at the same staging key, is aborted as the new one begins. It is a
one-time cost for the tasks running across the upgrade, and it spares a second way of resuming that
carries no chunked digest state.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..config import Limits
from ..errors import UsageError
from ..image.decoding import Boundary
from ..partials import CHECKPOINT_KEY
from ..sources.ranges import ReadPosition
from ..sources.savedhash import SavedHash, available
from ..targets.chunkdigest import DEFAULT_CHUNK
from ..targets.inorder import InOrderSink
from ..targets.s3parts import MAX_PARTS, MIN_PART
from ..targets.s3resume import ResumedUpload
from ..targets.s3stream import MultipartWriter
from ..targets.savedchunks import SavedChunkedSha256
from ..workflow.step import StepContext
from .stream_checkpoint import StreamCheckpoints, load_source_point

#: what a checkpoint of this module is
KIND = "image.stream-s3/2"
#: the earlier format, every acknowledged part listed in it: restarted (module docstring)
KIND_LISTING_PARTS = "image.stream-s3/1"
#: boundaries kept while their output waits for its part to be uploaded
_MAX_PENDING = 1024


@dataclass(frozen=True)
class S3ResumePoint:
    """A checkpoint that checked out (its parts not yet listed): what the step's next run starts from."""

    position: ReadPosition
    boundary: Boundary
    produced: int
    sha256: SavedHash | None
    md5: SavedHash | None
    #: the disk offset the sink had reached at the boundary
    sink_position: int
    bucket: str
    key: str
    upload: ResumedUpload

    @classmethod
    def load(
        cls, saved: Any, source_key: str, decoder: str, limits: Limits
    ) -> tuple[S3ResumePoint | None, str | None]:
        """``(point, None)``, or ``(None, why)`` for a checkpoint that is not one to resume from (None
        and None: there is no checkpoint)."""
        if saved is None:
            return None, None
        if isinstance(saved, dict) and saved.get("kind") == KIND_LISTING_PARTS:
            return None, (
                "the checkpoint is of an earlier format that lists every part (saved before an upgrade): "
                "the stream starts again into a new upload"
            )
        try:
            return cls._load(saved, source_key, decoder, limits), None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return None, f"the checkpoint is not one to resume from ({exc})"

    @classmethod
    def _load(cls, saved: Any, source_key: str, decoder: str, limits: Limits) -> S3ResumePoint:
        # everything the writer will rely on is checked here, so a checkpoint that does not check out
        # restarts the stream (a stream.restarted event) instead of failing the task on every attempt
        position, boundary, sha256, md5 = load_source_point(saved, KIND, source_key, decoder, limits)
        output, up = saved["output"], saved["upload"]
        if not isinstance(output, dict) or not isinstance(up, dict):
            raise ValueError("the output or upload record is not an object")
        sink_position, produced = output["sink_position"], output["produced"]
        if not all(type(v) is int and v >= 0 for v in (sink_position, produced)):
            raise ValueError("the output position or count is not one")
        if not all(isinstance(up.get(k), str) and up[k] for k in ("bucket", "key", "upload_id")):
            raise ValueError("an upload record without its bucket, key and id")
        part_size = up["part_size"]
        if type(part_size) is not int or not MIN_PART <= part_size <= max_part_size(limits):
            raise ValueError(
                f"an upload record whose part size is not one this appliance uses ({part_size!r})"
            )
        count, etags = up["count"], up["etags_sha256"]
        if type(count) is not int or not 0 < count <= MAX_PARTS:
            raise ValueError(f"an upload record whose count of parts is not one ({count!r})")
        if not isinstance(etags, str) or not _SHA256.fullmatch(etags):
            raise ValueError("an upload record without the digest of its parts' ETags")
        if not isinstance(up["sha256_state"], str):
            raise ValueError("an upload record without the state of its sha256")
        if not isinstance(up["chunked_state"], dict):
            raise ValueError("an upload record without the state of its sha256-chunked")
        upload = ResumedUpload(
            str(up["upload_id"]), part_size, count, etags, up["sha256_state"], up["chunked_state"]
        )
        if not sink_position <= upload.size <= limits.max_virtual_size:
            raise ValueError("the uploaded parts do not reach the boundary's output")
        if available():  # the states the writer goes on from (ValueError: not ones at that size)
            SavedHash("sha256").load(upload.sha256_state, upload.size)
            chunked = SavedChunkedSha256.load(upload.chunked_state, upload.size)
            if chunked.chunk_size != DEFAULT_CHUNK:
                raise ValueError("a sha256-chunked state of another chunk size")
        return cls(position, boundary, produced, sha256, md5, sink_position, up["bucket"], up["key"], upload)


#: the digest of the parts' ETags
_SHA256 = re.compile(r"[0-9a-f]{64}")


def max_part_size(limits: Limits) -> int:
    """The largest part size a checkpoint is believed to have: the image target's parts (16 MiB by default,
    at most 1 GiB as configured by anyone sensible) grow only as far as S3's 10,000 parts of the largest
    disk allowed need. A checkpoint saying more restarts the stream: each part is held in memory while
    it uploads."""
    needed = -(-limits.max_virtual_size // MAX_PARTS)
    return max(1 << 30, -(-needed // (1 << 20)) << 20)


@dataclass(frozen=True)
class _Noted:
    """A boundary's source side and where the sink was, waiting for the parts that cover it."""

    boundary: Boundary
    position: ReadPosition
    digests: dict[str, str] | None
    sink_position: int
    produced: int


class S3StreamCheckpoints(StreamCheckpoints):
    """The checkpoints of one run of a streamed decode into a staging upload (module docstring)."""

    def __init__(
        self,
        ctx: StepContext,
        source_key: str,
        decoder: str,
        writer: MultipartWriter,
        sink: InOrderSink,
        *,
        every: int,
        resume: S3ResumePoint | None = None,
    ) -> None:
        super().__init__(ctx, source_key, decoder, None, None, every=every, resume=resume)
        self.writer, self.sink = writer, sink
        self._noted: deque[_Noted] = deque(maxlen=_MAX_PENDING)
        self._last: tuple[int, int] | None = None
        self._saving = threading.Lock()
        if writer.resumable:
            writer.on_part = self._advance

    def on_boundary(self, boundary: Boundary, produced: int) -> None:
        """Note the boundary (in the decoder's record thread, where the sink is written:
        ``sink.position`` is exact) and save what the acknowledged parts cover."""
        found = self.source_point(boundary)
        if found is None or not self._checkpointing or not self.writer.resumable:
            return
        position, digests = found
        with self._saving:
            self._noted.append(_Noted(boundary, position, digests, self.sink.position, self.base + produced))
        self._advance()

    def _advance(self) -> None:
        """Save the latest noted boundary whose output the upload's acknowledged parts cover, if it is
        further than the last saved (at a boundary, and when a part is acknowledged: in its upload
        thread, so a stalled source does not leave the checkpoint parts behind)."""
        if not self._checkpointing:
            return
        with self._saving:
            self._advance_locked()

    def _advance_locked(self) -> None:
        prefix = self.writer.uploaded_prefix()
        if prefix is None:
            return
        covered = [n for n in self._noted if n.sink_position <= prefix.size]
        if not covered:
            return
        noted = covered[-1]
        while self._noted and self._noted[0] is not noted:
            self._noted.popleft()
        if self._last == (noted.boundary.input_offset, prefix.count):
            return
        try:
            self._save(
                {
                    "kind": KIND,
                    "source": self.source_key,
                    "decoder": self.decoder,
                    CHECKPOINT_KEY: f"s3://{self.writer.bucket}/{self.writer.key}",
                    "position": noted.position.to_dict(),
                    "digests": noted.digests,
                    "boundary": noted.boundary.to_dict(),
                    "output": {"sink_position": noted.sink_position, "produced": noted.produced},
                    "upload": {
                        "bucket": self.writer.bucket,
                        "key": self.writer.key,
                        "upload_id": prefix.upload_id,
                        "part_size": prefix.part_size,
                        "count": prefix.count,
                        "etags_sha256": prefix.etags_sha256,
                        "sha256_state": prefix.sha256_state,
                        "chunked_state": prefix.chunked_state,
                    },
                }
            )
        except UsageError:  # not run under a lease (a bare engine run): nothing resumes it anyway
            self._checkpointing = False
            return
        self._last = (noted.boundary.input_offset, prefix.count)
