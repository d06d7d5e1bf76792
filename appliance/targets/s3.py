"""S3 image target: finished images uploaded to ``bucket/prefix<task_id>.<ext>``.

Objects larger than one part go up as a multipart upload (``part_size``, default 16 MiB, grown only as
S3's 10,000 parts require; at most ``threads`` parts in flight, default 4, fewer when they would hold
more than ``memory``, default 128 MiB, with the part being read), smaller ones with a single PUT. The
object carries its sha256 as user metadata (``x-amz-meta-sha256``) and its ``sha256-chunked``
(``x-amz-meta-sha256-chunked`` with ``digest-algorithm``, ``digest-chunk-size``, ``digest-chunks``; also
the location's ``digest``, as a streamed import records it: an export checks its source by it). S3 takes
metadata when an upload *starts*, so the file is hashed once before the upload (both digests from one
read; hashlib runs at ~1.8 GB/s here, 20x the upload rate) and its sha256 again from the very bytes that
are sent; if the two differ the upload is aborted.
Memory use is about ``(threads + 1) * part_size``, at most ``memory`` (at least two parts).

Asked to encrypt (:mod:`.encryption`), the upload carries ``ServerSideEncryption`` (``AES256``, or
``aws:kms`` with ``SSEKMSKeyId``) on the PUT or on CreateMultipartUpload. After every upload the
object's headers are read back (HeadObject): what S3 reports applying is recorded as the location's
``encryption`` (a bucket's default encryption shows there too), and an object that is not encrypted
as asked is deleted and the store fails with ``EncryptionNotApplied`` (a store that ignores the
headers must not yield an import reported as encrypted).

Any failure, ``cancel`` (checked between parts) or interrupt aborts the multipart upload, so no
parts are left behind to be billed. ``delete`` removes the object and aborts any upload still
open for its key (a worker that died mid-upload); the same for its staging key
(``<key>.partial``), where an image streamed without scratch is uploaded and checked before it is
published (:mod:`.s3staged`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from .. import schemas
from ..config import parse_size
from ..errors import ConfigError, UsageError
from ..partials import Ledger
from ..progress import ProgressCallback, ProgressTracker
from .base import TargetError, boto_client, check_cancel, validate_settings
from .chunkdigest import digest_file
from .encryption import ALGORITHMS, SSE_KMS, Encryption, satisfies
from .file import extension_for
from .s3budget import PartBudget, fitted_part_size
from .s3parts import MIN_PART

log = logging.getLogger(__name__)

#: the key a streamed image is uploaded to before it is checked and published (:mod:`.s3staged`)
STAGING_SUFFIX = ".partial"

#: the settings schema (``appliance/schemas/target-s3.json``)
SCHEMA: dict[str, Any] = schemas.load("target-s3")


def _s3_error(operation: str, exc: Exception) -> TargetError:
    from botocore.exceptions import ClientError  # heavy; see targets.base.boto_client

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return TargetError(f"{operation} failed: {err.get('Code')}: {err.get('Message')}", "UploadFailed")
    return TargetError(f"{operation} failed: {exc}", "UploadFailed")


def digest_metadata(digest: Any) -> dict[str, str]:
    """The object metadata of an image's ``sha256-chunked`` (the ``digest`` a writer's ``close``
    answered; none for None), as an export's object carries it: checkable without the appliance."""
    if not isinstance(digest, dict):
        return {}
    return {
        "digest-algorithm": str(digest["algorithm"]),
        "digest-chunk-size": str(digest["chunk_size"]),
        "sha256-chunked": str(digest["value"]),
        "digest-chunks": str(digest["chunks"]),
    }


def sse_arguments(encryption: Encryption | None) -> dict[str, str]:
    """The PutObject / CreateMultipartUpload arguments that ask S3 for ``encryption``."""
    if encryption is None:
        return {}
    args = {"ServerSideEncryption": encryption.algorithm}
    if encryption.kms_key_id is not None:
        args["SSEKMSKeyId"] = encryption.kms_key_id
    return args


def applied_encryption(head: Mapping[str, Any]) -> Encryption | None:
    """The encryption a HeadObject answer reports (None: the object is not encrypted)."""
    algorithm = head.get("ServerSideEncryption")
    if not algorithm:
        return None
    key = head.get("SSEKMSKeyId") if str(algorithm).startswith(SSE_KMS) else None
    return Encryption(str(algorithm), key or None)


class S3ImageTarget:
    """Images as S3 objects, uploaded with sha256 metadata, optionally server-side encrypted."""

    sse_algorithms: frozenset[str] = frozenset(ALGORITHMS)

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = dict(settings)
        self.bucket: str = settings["bucket"]
        self.prefix: str = settings.get("prefix", "")
        self.part_size = parse_size(settings.get("part_size", "16MiB"))
        if self.part_size < MIN_PART:
            raise ConfigError(f"targets.image.part_size: {self.part_size} is below S3's minimum of 5 MiB")
        self.threads = int(settings.get("threads", 4))
        #: the most bytes of part buffers a streamed upload holds (:mod:`.s3staged`)
        self.memory = parse_size(settings.get("memory", "128MiB"))
        if self.memory < 2 * MIN_PART:
            raise ConfigError(f"targets.image.memory: {self.memory} is below two parts of 5 MiB")
        self._client: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> S3ImageTarget:
        """Build from ``config.targets["image"]``; :class:`ConfigError` names a bad key."""
        return cls(validate_settings(settings, SCHEMA, "targets.image"))

    @property
    def client(self) -> Any:
        """The boto3 S3 client (created on first use; shared by the part-upload threads)."""
        with self._lock:
            if self._client is None:
                self._client = boto_client(
                    "s3",
                    self.settings,
                    max_pool_connections=self.threads + 2,
                    s3={"addressing_style": self.settings.get("addressing_style", "auto")},
                )
            return self._client

    def key_for(self, task_id: str, format: str) -> str:
        """The object key an image of ``task_id`` gets."""
        return f"{self.prefix}{task_id}.{extension_for(format)}"

    def store(
        self,
        task_id: str,
        path: Path,
        *,
        format: str,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        ledger: Ledger | None = None,
        encryption: Encryption | None = None,
        fence: Callable[[], None] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Upload ``path`` (server-side encrypted as ``encryption`` asks); returns ``{type, bucket,
        key, etag, sha256, size, format, encryption}``, ``encryption`` being what S3 reports the
        stored object has (``Encryption.to_dict()``, or None). ``metadata``: more user metadata
        (``x-amz-meta-*``) for the object, besides ``sha256``.

        Raises ``UploadFailed`` (:class:`TargetError`) for S3 errors (a KMS key S3 cannot use among
        them), ``EncryptionNotApplied`` when the stored object is not encrypted as asked (it is
        deleted), :class:`Cancelled` on ``cancel``. Nothing is written locally, so ``ledger`` is not
        used.
        """
        key = self.key_for(task_id, format)
        size = path.stat().st_size
        # Metadata must be given when the upload starts, so the hashes have to be known first: the
        # sha256 and, from the same read, the sha256-chunked a streamed import records too (an export's
        # source check compares it; the bytes sent are hashed again below and must match)
        whole = hashlib.sha256()
        chunked = digest_file(path, cancel=cancel, whole=whole).to_dict()
        sha256 = whole.hexdigest()
        metadata = {**(metadata or {}), "sha256": sha256, **digest_metadata(chunked)}
        sse = sse_arguments(encryption)
        tracker = ProgressTracker("uploading", size, on_progress)
        if size <= self.part_size:
            check_cancel(cancel, "upload")
            if fence is not None:
                fence()
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != sha256:
                raise TargetError(f"{path} changed while it was being uploaded", "UploadFailed")
            try:
                etag = self.client.put_object(
                    Bucket=self.bucket, Key=key, Body=data, Metadata=metadata, **sse
                )["ETag"]
            except Exception as exc:
                raise _s3_error(f"PutObject s3://{self.bucket}/{key}", exc) from exc
        else:
            etag = self._multipart(path, key, size, sha256, metadata, sse, tracker, cancel, fence)
        applied = self.check_encryption(key, encryption)
        tracker.finish()
        return {
            "type": "s3",
            "bucket": self.bucket,
            "key": key,
            "etag": etag,
            "sha256": sha256,
            "digest": chunked,
            "size": size,
            "format": format.lower(),
            "encryption": applied.to_dict() if applied else None,
        }

    def check_encryption(self, key: str, wanted: Encryption | None) -> Encryption | None:
        """What S3 reports the stored object's encryption is; when it is not ``wanted``, the object
        is deleted and ``EncryptionNotApplied`` raised."""
        where = f"s3://{self.bucket}/{key}"
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            raise _s3_error(f"HeadObject {where}", exc) from exc
        applied = applied_encryption(head)
        if wanted is None or satisfies(applied, wanted):
            return applied
        try:
            self.delete({"bucket": self.bucket, "key": key})
            fate = "the object was deleted"
        except TargetError as exc:
            log.error("could not delete %s, stored without the encryption asked for: %s", where, exc)
            fate = "the object could not be deleted (see the worker log)"
        said = f"{applied.algorithm} with key {applied.kms_key_id}" if applied else "no encryption"
        asked = wanted.algorithm + (f" with key {wanted.kms_key_id}" if wanted.kms_key_id else "")
        raise TargetError(
            f"{where} was stored with {said} although {asked} was asked for; {fate}. "
            "The S3 endpoint (targets.image.endpoint_url) does not apply server-side encryption as "
            "asked: enable it there, or import without Encrypted",
            "EncryptionNotApplied",
        )

    def _multipart(
        self,
        path: Path,
        key: str,
        size: int,
        sha256: str,
        metadata: dict[str, str],
        sse: dict[str, str],
        tracker: ProgressTracker,
        cancel: threading.Event | None,
        fence: Callable[[], None] | None = None,
    ) -> str:
        where = f"s3://{self.bucket}/{key}"
        part_size = fitted_part_size(self.part_size, size)  # S3 allows 10,000 parts
        try:
            upload_id = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, Metadata=metadata, **sse
            )["UploadId"]
        except Exception as exc:
            raise _s3_error(f"CreateMultipartUpload {where}", exc) from exc
        try:
            parts, streamed = self._upload_parts(path, key, upload_id, size, part_size, tracker, cancel)
            if streamed != sha256:
                raise TargetError(f"{path} changed while it was being uploaded", "UploadFailed")
            check_cancel(cancel, "upload")
            if fence is not None:
                fence()
            try:
                done = self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
            except Exception as exc:
                raise _s3_error(f"CompleteMultipartUpload {where}", exc) from exc
        except BaseException:
            self._abort(key, upload_id)
            raise
        return done["ETag"]

    def _upload_parts(
        self,
        path: Path,
        key: str,
        upload_id: str,
        size: int,
        part_size: int,
        tracker: ProgressTracker,
        cancel: threading.Event | None,
    ) -> tuple[list[dict[str, Any]], str]:
        """Read parts in order (hashing them) and upload up to ``threads`` at once."""
        hasher = hashlib.sha256()
        parts: dict[int, str] = {}
        uploaded = 0
        pending: set[Future[tuple[int, str, int]]] = set()

        def upload(number: int, data: bytes) -> tuple[int, str, int]:
            try:
                resp = self.client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
                )
            except Exception as exc:
                raise _s3_error(f"UploadPart {number} of s3://{self.bucket}/{key}", exc) from exc
            return number, resp["ETag"], len(data)

        def harvest(block_until_one: bool) -> None:
            nonlocal uploaded, pending
            if not pending:
                return
            finished, pending = wait(
                pending, timeout=None if block_until_one else 0, return_when=FIRST_COMPLETED
            )
            for fut in finished:
                number, etag, n = fut.result()  # re-raises a failed part's error
                parts[number] = etag
                uploaded += n
            tracker.update(uploaded)

        # parts in flight: no more than the memory budget holds beside the part being read
        in_flight = PartBudget(part_size, self.threads, self.memory, grow=False).in_flight
        pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="s3-part")
        try:
            with open(path, "rb", buffering=0) as f:
                number, offset = 0, 0
                while offset < size:
                    check_cancel(cancel, "upload")
                    while len(pending) >= in_flight:
                        harvest(block_until_one=True)
                        check_cancel(cancel, "upload")
                    data = f.read(min(part_size, size - offset))
                    if not data:
                        raise TargetError(f"{path} shrank while it was being uploaded", "UploadFailed")
                    hasher.update(data)
                    number += 1
                    offset += len(data)
                    pending.add(pool.submit(upload, number, data))
                    del data
                    harvest(block_until_one=False)
                while pending:
                    harvest(block_until_one=True)
                    check_cancel(cancel, "upload")
        finally:
            # Parts not started yet are dropped; running ones finish (a request cannot be interrupted).
            pool.shutdown(wait=True, cancel_futures=True)
        return [{"PartNumber": n, "ETag": parts[n]} for n in sorted(parts)], hasher.hexdigest()

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:
            # The original failure matters more; a lifecycle rule can still reap the parts.
            log.error(
                "could not abort multipart upload %s of s3://%s/%s: %s", upload_id, self.bucket, key, exc
            )

    def delete(self, location: Mapping[str, Any]) -> None:
        """Delete the object and abort uploads still open for its key; a missing object or bucket is fine."""
        from botocore.exceptions import ClientError  # heavy; see targets.base.boto_client

        bucket, key = location.get("bucket"), location.get("key")
        if bucket != self.bucket or not key:
            raise UsageError(f"refusing to delete {location!r}: not an object in bucket {self.bucket}")
        try:
            # the key and its staging key (a streamed import's upload before it is published)
            for name in (key, key + STAGING_SUFFIX):
                self.client.delete_object(Bucket=bucket, Key=name)
            listing = self.client.list_multipart_uploads(Bucket=bucket, Prefix=key)
            for upload in listing.get("Uploads", []):
                if upload["Key"] in (key, key + STAGING_SUFFIX):
                    self._abort(upload["Key"], upload["UploadId"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
                return
            err = _s3_error(f"DeleteObject s3://{bucket}/{key}", exc)
            raise TargetError(err.message, "TargetDeleteFailed") from exc

    def describe(self) -> dict[str, Any]:
        """Bucket, prefix, endpoint and transfer settings; never the keys."""
        return {
            "type": "s3",
            "bucket": self.bucket,
            "prefix": self.prefix,
            "endpoint_url": self.settings.get("endpoint_url"),
            "region": self.settings.get("region"),
            "part_size": self.part_size,
            "threads": self.threads,
            "memory": self.memory,
        }
