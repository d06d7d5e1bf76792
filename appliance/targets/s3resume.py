"""Resuming a multipart upload an earlier run left (:class:`.s3stream.MultipartWriter` with ``resume``):
what a checkpoint records of it (:class:`ResumedUpload`: constant in size, the parts' ETags as one
digest) and the check of that record against what S3 holds (:func:`verify_parts`, paginated
``ListParts``), which gives the writer the parts to complete the upload with.

A resumable writer (``resumable=True``, a streamed import into the S3 image target,
:mod:`appliance.steps.s3_checkpoint`) runs the sha256 and the ``sha256-chunked`` of the bytes written
(:class:`~appliance.sources.savedhash.SavedHash`, :class:`~.savedchunks.SavedChunkedSha256`) in its own
thread as each part is cut, and keeps their states at the end of every part until the acknowledged
prefix passes it (:class:`ResumableDigests`), so a checkpoint can name the parts completed so far —
their count and a digest of their ETags, constant in size — with the digest states at their end. A
writer made with ``resume`` (:class:`ResumedUpload`, its parts listed by ``ListParts`` and checked
against the record by :func:`verify_parts`) continues that multipart upload after its last recorded
part instead of creating one."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from dataclasses import dataclass
from typing import Any

from ..sources.savedhash import SavedHash
from .base import TargetError
from .chunkdigest import ChunkedDigest
from .s3parts import MAX_PARTS, upload_error
from .savedchunks import SavedChunkedSha256


@dataclass(frozen=True)
class UploadedPart:
    """A part S3 holds: its number, size and ETag (quoted as S3 answers it)."""

    number: int
    size: int
    etag: str


def _etag_line(etag: str) -> bytes:
    return etag.strip('"').lower().encode("ascii", "replace") + b"\n"


def etags_digest(etags: list[str]) -> str:
    """The digest a checkpoint records of the ordered ETags of parts 1..k (quotes and case ignored, as S3
    answers them either way): what ``ListParts`` must answer for the upload to be continued."""
    h = hashlib.sha256()
    for etag in etags:
        h.update(_etag_line(etag))
    return h.hexdigest()


@dataclass(frozen=True)
class ResumedUpload:
    """A multipart upload an earlier run left, to continue: its id, its part size, the count of parts
    1..k it completed (all ``part_size`` long: the short last part ends the object, nothing resumes
    after it), the digest of their ordered ETags (:func:`etags_digest`), the state of the sha256 of the
    bytes written at the end of part k (:meth:`SavedHash.state`) and that of their ``sha256-chunked``
    (:meth:`~.savedchunks.SavedChunkedSha256.state`). Of constant size whatever k: the parts themselves
    (``parts``) come from ``ListParts`` (:func:`verify_parts`), not from the checkpoint."""

    upload_id: str
    part_size: int
    count: int
    etags_sha256: str
    sha256_state: str
    chunked_state: dict[str, Any]
    #: the parts 1..k as ``ListParts`` answered them (empty until :func:`verify_parts` checked them)
    parts: tuple[UploadedPart, ...] = ()

    @property
    def size(self) -> int:
        """Bytes the parts 1..k hold."""
        return self.count * self.part_size


class PartReplaced(TargetError):
    """S3 refused to complete a continued upload (``InvalidPart``): a part no longer has the ETag this run
    uploaded it with. A run stopped to be resumed (a suspend, a lost lease) does not wait for the parts it
    has in flight, so one may land after the next run uploaded that part again. Its bytes are the same —
    part N is bytes ``[(N-1) x part size, N x part size)`` of the disk, decoded from the same source
    version (read under its ETag) with the part size the checkpoint records — so under MD5 ETags the
    part is the same part and Complete goes through; an ETag that is not the MD5 (SSE-KMS) differs for
    the same bytes, and S3's refusal is this error: the step streams again into a new upload."""

    code = "UploadFailed"


def completion_error(where: str, exc: Exception, *, resumed: bool) -> TargetError:
    """The error of a ``CompleteMultipartUpload`` that failed: :class:`PartReplaced` for a continued
    upload (``resumed``) whose parts S3 no longer holds as this run sent them, else ``UploadFailed``."""
    code = ((getattr(exc, "response", None) or {}).get("Error") or {}).get("Code")
    if resumed and code == "InvalidPart":
        return PartReplaced(
            f"CompleteMultipartUpload {where} refused: a part is no longer the one this run uploaded (a "
            "part an earlier run had in flight when it stopped landed after it, with another ETag)"
        )
    return upload_error(f"CompleteMultipartUpload {where}", exc)


#: answers to ``ListParts`` that say the upload cannot be checked, not that S3 is failing: the upload is
#: then not continued (AccessDenied: a policy without ``s3:ListMultipartUploadParts``)
_CANNOT_LIST = frozenset({"AccessDenied", "NotImplemented", "InvalidRequest", "MethodNotAllowed"})


def verify_parts(
    client: Any, bucket: str, key: str, upload: ResumedUpload, *, page: int = 1000
) -> tuple[ResumedUpload | None, str | None]:
    """Check that S3 still holds ``upload``'s parts 1..k as recorded by ``ListParts`` (paginated,
    ``page`` parts a page): every one there, ``part_size`` long, the digest of their ordered ETags the
    recorded one. ``(upload with its parts, None)`` when it does, else ``(None, why not)`` — the upload
    is gone (aborted, expired), a part is missing, of another size or was replaced, the listing is refused
    (no permission to list parts) or is not one to trust (a page marker that does not advance, a part
    without its number, size or ETag). The answer is S3's, so it is checked like any input; the caller
    then starts the upload afresh. Raises ``UploadFailed`` for an S3 that is failing (a server error, no
    connection): a later attempt may check it."""
    where = f"s3://{bucket}/{key}"
    last = upload.count
    listed: dict[int, tuple[int, str]] = {}
    marker = 0
    for _page in range(MAX_PARTS // page + 1):
        try:
            resp = client.list_parts(
                Bucket=bucket, Key=key, UploadId=upload.upload_id, PartNumberMarker=marker, MaxParts=page
            )
        except Exception as exc:
            response = getattr(exc, "response", None) or {}
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchUpload", "404", "NotFound"):
                return (
                    None,
                    f"the multipart upload {upload.upload_id} of {where} is gone (aborted or expired)",
                )
            if code in _CANNOT_LIST or (isinstance(status, int) and 400 <= status < 500 and status != 429):
                return (
                    None,
                    f"the parts of the multipart upload to {where} cannot be listed to check them ({code})",
                )
            raise upload_error(f"ListParts {where}", exc) from exc
        try:
            for part in resp.get("Parts", []):
                listed[int(part["PartNumber"])] = (int(part["Size"]), str(part["ETag"]))
            if not resp.get("IsTruncated") or max(listed, default=0) >= last:
                break
            following = int(resp["NextPartNumberMarker"])
        except (KeyError, TypeError, ValueError) as exc:
            return None, f"ListParts of the upload to {where} answered what is not a part listing ({exc!r})"
        if following <= marker:
            return (
                None,
                f"ListParts of the upload to {where} does not advance (marker {following} after {marker})",
            )
        marker = following
    else:
        return None, f"ListParts of the upload to {where} lists more pages than an upload can have"
    parts: list[UploadedPart] = []
    for number in range(1, last + 1):
        got = listed.get(number)
        if got is None:
            return None, f"part {number} of the upload to {where} is missing"
        if got[0] != upload.part_size:
            return None, (
                f"part {number} of the upload to {where} is not the one recorded (size {got[0]}, "
                f"recorded {upload.part_size})"
            )
        parts.append(UploadedPart(number, got[0], got[1]))
    if etags_digest([p.etag for p in parts]) != upload.etags_sha256:
        return None, (
            f"the ETags of parts 1..{last} of the upload to {where} are not the ones recorded (a part was "
            "uploaded again since)"
        )
    return dataclasses.replace(upload, parts=tuple(parts)), None


class ResumableDigests:
    """The digests of a resumable upload's bytes and its acknowledged prefix, for its checkpoints: the
    sha256 and the ``sha256-chunked`` run in the writer's thread as each part is cut (:meth:`cut`), their
    states at each part's end kept until the prefix of parts 1..k S3 acknowledged passes it
    (:meth:`advance`: part by part, the ETag digest running with it, so constant work per part
    whatever k); :meth:`load` goes on from a :class:`ResumedUpload` whose parts were listed."""

    def __init__(self) -> None:
        self.sha256 = SavedHash("sha256")
        self.chunked = SavedChunkedSha256()
        self._lock = threading.Lock()
        #: the states and the object's size at the end of each part past the prefix
        self._states: dict[int, tuple[str, dict[str, Any], int]] = {}
        self._count = 0
        self._etags = hashlib.sha256()
        self._at_prefix: tuple[str, dict[str, Any], int] | None = None

    def load(self, resume: ResumedUpload) -> None:
        """Go on after ``resume``'s parts 1..k (listed and checked by :func:`verify_parts`). ValueError
        for parts or states that are not the record's."""
        if [p.number for p in resume.parts] != list(range(1, resume.count + 1)):
            raise ValueError("the upload's parts 1..k were not listed")
        if any(p.size != resume.part_size for p in resume.parts):
            raise ValueError("a listed part is not of the upload's part size")
        if etags_digest([p.etag for p in resume.parts]) != resume.etags_sha256:
            raise ValueError("the listed parts are not the ones recorded")
        self.sha256.load(resume.sha256_state, resume.size)  # ValueError: not the state at that size
        self.chunked = SavedChunkedSha256.load(resume.chunked_state, resume.size)
        for p in resume.parts:
            self._etags.update(_etag_line(p.etag))
        self._count = resume.count
        if resume.count:
            self._at_prefix = (resume.sha256_state, resume.chunked_state, resume.size)

    def cut(self, number: int, data: bytes) -> None:
        """Part ``number`` is ``data`` (hashed in order, in the writer's thread)."""
        self.sha256.update(data)
        self.chunked.update(data)
        with self._lock:
            self._states[number] = (self.sha256.state(), self.chunked.state(), self.sha256.length)

    def advance(
        self, upload_id: str, part_size: int, etags: dict[int, str], sizes: dict[int, int]
    ) -> ResumedUpload | None:
        """The longest run of parts 1..k acknowledged (``etags``) and full-size (``sizes``), as a
        checkpoint records it (no ``parts``); None before the first."""
        with self._lock:
            n = self._count + 1
            while n in etags and sizes.get(n) == part_size and n in self._states:
                self._etags.update(_etag_line(etags[n]))
                self._at_prefix = self._states.pop(n)
                self._count = n
                n += 1
            if self._at_prefix is None:
                return None
            sha256_state, chunked_state, _size = self._at_prefix
            return ResumedUpload(
                upload_id, part_size, self._count, self._etags.hexdigest(), sha256_state, chunked_state
            )

    def result(self) -> tuple[str, ChunkedDigest]:
        """The sha256 and the ``sha256-chunked`` of every byte cut."""
        return self.sha256.hexdigest(), self.chunked.result()
