"""Upload a disk image the way euca2ools' ``euca-import-volume`` / ``resume-import`` does.

euca2ools presigns the manifest, creates the task, then uploads the manifest and the parts.

Two steps, so a test can create the import task between them, as euca2ools does:

1. :func:`presign_manifest_url` presigns a GET for ``[prefix/]<uuid4>/<name>.manifest.xml``, a key that
   does not exist yet (the URL sent as ``ImportManifestUrl``);
2. :func:`upload` builds the manifest (10 MiB parts ``<dir>/<name>.part.<i>`` with presigned HEAD, GET
   and DELETE URLs, self-destruct = presigned DELETE of the manifest), PUTs it, then HEADs each part and
   uploads it only when the HEAD says 404 (resumable).

SigV4 presigned URLs live at most 7 days, so euca2ools' 30-day default is capped.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions

from appliance.sources.manifest import DEFAULT_PART_SIZE, Part, build_manifest, plan_parts

MAX_PRESIGN_SECONDS = 7 * 86400
GiB = 2**30


@dataclass(frozen=True)
class PendingUpload:
    bucket: str
    #: manifest key, ``[prefix/]<uuid>/<name>.manifest.xml``
    key: str
    #: presigned GET of the (not yet existing) manifest: the ImportManifestUrl
    url: str
    expires: int


def _presign(s3: Any, method: str, bucket: str, key: str, expires: int) -> str:
    return s3.generate_presigned_url(method, Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires)


def presign_manifest_url(
    s3: Any, bucket: str, prefix: str | None, file: Path, *, expires_days: int = 30
) -> PendingUpload:
    """Step 1: the manifest URL, before anything is uploaded."""
    key = "/".join(p for p in (prefix, str(uuid.uuid4()), f"{file.name}.manifest.xml") if p)
    expires = min(expires_days * 86400, MAX_PRESIGN_SECONDS)
    return PendingUpload(bucket, key, _presign(s3, "get_object", bucket, key, expires), expires)


def upload(
    s3: Any,
    pending: PendingUpload,
    file: Path,
    *,
    file_format: str = "RAW",
    image_size: int | None = None,
    volume_size: int | None = None,
    part_size: int = DEFAULT_PART_SIZE,
) -> bytes:
    """Step 2: PUT the manifest, then each missing part. Returns the manifest bytes.

    ``image_size`` and ``volume_size`` are what the server echoed (``image.size``, ``volume.size``);
    they default to the file size and its size in GiB rounded up.
    """
    file_size = file.stat().st_size
    size = image_size if image_size is not None else file_size
    vol = volume_size if volume_size is not None else max(1, -(-size // GiB))
    key_dir = pending.key.rsplit("/", 1)[0]
    parts = []
    for index, start, end in plan_parts(file_size, part_size):
        key = f"{key_dir}/{file.name}.part.{index}"
        parts.append(
            Part(
                index=index,
                start=start,
                end=end,
                key=key,
                head_url=_presign(s3, "head_object", pending.bucket, key, pending.expires),
                get_url=_presign(s3, "get_object", pending.bucket, key, pending.expires),
                delete_url=_presign(s3, "delete_object", pending.bucket, key, pending.expires),
            )
        )
    manifest = build_manifest(
        file_format=file_format,
        size=size,
        volume_size=vol,
        parts=parts,
        self_destruct_url=_presign(s3, "delete_object", pending.bucket, pending.key, pending.expires),
        pretty_print=True,  # resume-import writes it pretty-printed
    )
    s3.put_object(Bucket=pending.bucket, Key=pending.key, Body=manifest)
    with open(file, "rb") as f:
        for part in parts:
            try:
                s3.head_object(Bucket=pending.bucket, Key=part.key)
                continue  # already uploaded by an earlier run
            except botocore.exceptions.ClientError as exc:
                if exc.response["ResponseMetadata"]["HTTPStatusCode"] != 404:
                    raise
            f.seek(part.start)
            s3.put_object(Bucket=pending.bucket, Key=part.key, Body=f.read(part.length))
    return manifest


def upload_like_euca2ools(
    s3: Any,
    bucket: str,
    prefix: str | None,
    file: Path,
    *,
    part_size: int = DEFAULT_PART_SIZE,
    expires_days: int = 30,
    file_format: str = "RAW",
) -> str:
    """Both steps at once; returns the manifest URL."""
    pending = presign_manifest_url(s3, bucket, prefix, file, expires_days=expires_days)
    upload(s3, pending, file, file_format=file_format, part_size=part_size)
    return pending.url


def random_file(path: Path, size: int, seed: int = 0) -> Path:
    """A file of ``size`` pseudo-random bytes (incompressible, so ranges are distinguishable)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n
    return path
