"""The artifact store: workflows and their resources in an S3 bucket, one immutable version each.

Layout under ``<bucket>/<prefix>/``::

    NAME/VERSION/index.json        what the artifact holds, with the sha256 and size of each file
    NAME/VERSION/workflow.yaml     the workflow file, byte for byte as uploaded
    NAME/VERSION/resources/RES     each resource the workflow declares by path

``index.json`` is ``{"name", "version", "created", "workflow": {"path", "sha256", "size"},
"resources": {RES: {"path", "sha256", "size"}}}``. It is written last (with ``If-None-Match: *``),
so an artifact exists exactly when its index does. Versions are immutable: uploading other content
under an existing ``NAME@VERSION`` is refused (``Artifact.VersionExists``); the same content again
is a no-op. Without an explicit version the version is the first 12 hex digits of a digest over
the workflow's and resources' digests, so re-uploading unchanged content gives the same URI.

Readers trust the index on first use: it is kept in ``<cache_dir>/artifacts/NAME/VERSION/`` and
every file fetched is verified against it (``Artifact.DigestMismatch``) and cached by digest, so a
second run of the same version reads nothing from S3.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..atomicfile import write_json_atomic
from ..config import ArtifactsConfig, Config
from ..errors import Cancelled
from .cache import DigestCache, digest_mismatch, hash_file
from .index import MAX_INDEX_BYTES, ArtifactIndex, Entry, UploadResult, content_version
from .refs import (
    INDEX_FILE,
    RESOURCE_DIR,
    WORKFLOW_FILE,
    ArtifactError,
    ArtifactRef,
    check_name,
    check_version,
)
from .s3 import download_object, s3_client, same_filesystem

log = logging.getLogger(__name__)


def _error_code(exc: Exception) -> tuple[str, int | None]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code") or "")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, status


class ArtifactStore:
    """Reads and writes artifacts in the configured bucket; caches what it reads.

    ``cfg`` is ``config.artifacts``. Nothing connects until an operation needs S3, and operations
    on a store without a bucket raise ``Artifact.NotConfigured``.
    """

    def __init__(self, cfg: ArtifactsConfig, *, client: Any = None) -> None:
        self.cfg = cfg
        self.bucket: str | None = cfg.bucket
        self.prefix: str = (cfg.prefix or "").strip("/")
        if cfg.cache_dir is None:
            raise ValueError("ArtifactStore needs artifacts.cache_dir (from_config defaults it)")
        self.cache = DigestCache(cfg.cache_dir)
        self._client = client
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Config) -> ArtifactStore:
        """The store of ``config.artifacts`` (its cache under ``<state_dir>/cache`` by default)."""
        cfg = config.artifacts
        if cfg.cache_dir is None:
            cfg = dataclasses.replace(cfg, cache_dir=config.paths.cache)
        return cls(cfg)

    # -- S3 ------------------------------------------------------------------------------------

    @property
    def configured(self) -> bool:
        return bool(self.bucket)

    def _require_bucket(self) -> str:
        if not self.bucket:
            raise ArtifactError(
                "no artifact store is configured; set artifacts.bucket (and endpoint_url, credentials) "
                "in the configuration",
                "Artifact.NotConfigured",
            )
        return self.bucket

    @property
    def client(self) -> Any:
        """The boto3 S3 client for the store (and for ``s3://`` resources), created on first use."""
        with self._lock:
            if self._client is None:
                self._client = s3_client(self.cfg.s3)
            return self._client

    def key(self, name: str, version: str, path: str) -> str:
        """The object key of ``path`` in artifact ``name@version``."""
        return "/".join(p for p in (self.prefix, name, version, path) if p)

    def _s3_error(self, exc: Exception, what: str) -> ArtifactError:
        code, status = _error_code(exc)
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return ArtifactError(f"{what} does not exist in the artifact store", "Artifact.NotFound")
        if code == "NoSuchBucket":
            return ArtifactError(
                f"the artifact store bucket {self.bucket!r} does not exist; create it or fix "
                "artifacts.bucket",
                "Artifact.StoreUnavailable",
            )
        detail = f"{code}: {exc}" if code else str(exc)
        return ArtifactError(f"{what}: the artifact store failed: {detail}", "Artifact.StoreUnavailable")

    # -- reading -------------------------------------------------------------------------------

    def _local_dir(self, ref: ArtifactRef) -> Path:
        return self.cache.root / "artifacts" / ref.name / ref.version

    def index(self, ref: ArtifactRef) -> ArtifactIndex:
        """The index of ``ref`` (from the local copy when this version was read before)."""
        local = self._local_dir(ref) / INDEX_FILE
        try:
            return ArtifactIndex.from_dict(json.loads(local.read_text()), str(local))
        except (OSError, ValueError, ArtifactError):
            pass  # not cached (or damaged): read it from the store
        index = self.fetch_index(ref)
        local.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(local, index.to_dict(), 0o644)
        return index

    def fetch_index(self, ref: ArtifactRef) -> ArtifactIndex:
        """The index as the store has it now (no local copy involved); ``Artifact.NotFound`` if none."""
        index = self._read_index(ref.name, ref.version)
        if index is None:
            raise ArtifactError(f"{ref.uri} does not exist in the artifact store", "Artifact.NotFound")
        return index

    def _read_index(self, name: str, version: str) -> ArtifactIndex | None:
        bucket = self._require_bucket()
        key = self.key(name, version, INDEX_FILE)
        where = f"{ArtifactRef(name, version).uri}/{INDEX_FILE}"
        try:
            out = self.client.get_object(Bucket=bucket, Key=key)
            body = out["Body"].read(MAX_INDEX_BYTES + 1)
        except Exception as exc:
            error = self._s3_error(exc, where)
            if error.code == "Artifact.NotFound":
                return None
            raise error from exc
        if len(body) > MAX_INDEX_BYTES:
            raise ArtifactError(f"{where} is larger than {MAX_INDEX_BYTES} bytes", "Artifact.IndexInvalid")
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise ArtifactError(f"{where} is not JSON: {exc}", "Artifact.IndexInvalid") from exc
        index = ArtifactIndex.from_dict(data, where)
        if (index.name, index.version) != (name, version):
            # an index copied to another key must not pass for that version
            raise ArtifactError(
                f"{where} describes {index.uri}, not artifact://{name}@{version}", "Artifact.IndexInvalid"
            )
        return index

    def fetch(
        self, ref: ArtifactRef, *, cancel: threading.Event | None = None, expected: str | None = None
    ) -> tuple[Path, Entry, bool]:
        """The verified local copy of the file ``ref.path`` names: ``(path, entry, was_cached)``.

        ``expected`` is an extra digest pin (from the workflow) that the index must agree with.
        """
        index = self.index(ref)
        entry = index.entry(ref.path or WORKFLOW_FILE)
        if expected is not None and expected != entry.sha256:
            raise digest_mismatch(f"{ref} (index of {ref.uri})", entry.sha256, expected)
        hit = self.cache.lookup(entry.sha256)
        if hit is not None:
            return hit, entry, True
        tmp = self.cache.temp_path()
        try:
            actual, _ = download_object(
                self.client,
                self._require_bucket(),
                self.key(ref.name, ref.version, entry.path),
                tmp,
                max_bytes=entry.size,
                cancel=cancel,
                what=f"{ref.uri}/{entry.path}",
                on_error=self._s3_error,
                too_large=lambda: ArtifactError(
                    f"{ref.uri}/{entry.path} is larger than the {entry.size} bytes its index says; it was "
                    "changed after it was published. Nothing was cached",
                    "Artifact.DigestMismatch",
                ),
            )
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self.cache.install(tmp, actual, entry.sha256, f"{ref.uri}/{entry.path}"), entry, False

    def workflow_file(self, ref: ArtifactRef) -> Path:
        """The artifact's workflow as a local file ``<cache>/artifacts/NAME/VERSION/workflow.yaml``.

        A per-artifact file (not the digest-named one) so error messages and includes can tell
        which artifact a workflow came from.
        """
        index = self.index(ref)
        if ref.path not in (None, index.workflow.path):
            raise ArtifactError(
                f"{ref} is not the artifact's workflow; run artifact://{ref.name}@{ref.version} "
                f"(or .../{index.workflow.path})",
                "Artifact.InvalidUri",
            )
        target = self._local_dir(ref) / WORKFLOW_FILE
        try:
            if hash_file(target)[0] == index.workflow.sha256:
                return target
        except FileNotFoundError:
            pass
        cached, _, _ = self.fetch(ref.with_path(index.workflow.path))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{WORKFLOW_FILE}.{secrets.token_hex(6)}")
        if same_filesystem(cached, tmp):
            os.link(cached, tmp)
        else:
            tmp.write_bytes(cached.read_bytes())
        os.replace(tmp, target)
        return target

    def list(self, skipped: list[tuple[str, ArtifactError]] | None = None) -> list[ArtifactIndex]:
        """Every artifact version in the store (read from the store, by name then creation time).

        An index that cannot be read or is not valid (a foreign or damaged object under the prefix) is
        logged and left out, so one bad key does not hide the rest; ``skipped`` collects ``(key, error)``.
        """
        bucket = self._require_bucket()
        base = f"{self.prefix}/" if self.prefix else ""
        found: list[ArtifactIndex] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base)
            keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        except Exception as exc:
            raise self._s3_error(exc, f"listing s3://{bucket}/{base}") from exc
        for key in keys:
            parts = key[len(base) :].split("/")
            if len(parts) == 3 and parts[2] == INDEX_FILE:
                try:
                    index = self._read_index(parts[0], parts[1])
                except ArtifactError as exc:
                    log.warning("artifact store: skipping s3://%s/%s: %s", bucket, key, exc)
                    if skipped is not None:
                        skipped.append((key, exc))
                    continue
                if index is not None:
                    found.append(index)
        return sorted(found, key=lambda i: (i.name, i.created, i.version))

    # -- writing -------------------------------------------------------------------------------

    def upload(
        self,
        name: str,
        workflow: Path,
        resources: Mapping[str, Path],
        *,
        version: str | None = None,
        cancel: threading.Event | None = None,
    ) -> UploadResult:
        """Upload ``workflow`` and ``resources`` (resource name → local file) as ``name@version``.

        Files go up first, the index last, so a failed upload leaves no artifact. Raises
        ``Artifact.VersionExists`` when the version holds other content.
        """
        bucket = self._require_bucket()
        check_name(name)
        wf_sha, wf_size = hash_file(workflow)
        hashed = {res: hash_file(path) for res, path in resources.items()}
        version = check_version(version or content_version(wf_sha, {k: v[0] for k, v in hashed.items()}))
        index = ArtifactIndex(
            name=name,
            version=version,
            created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            workflow=Entry(WORKFLOW_FILE, wf_sha, wf_size),
            resources={
                res: Entry(f"{RESOURCE_DIR}/{res}", sha, size) for res, (sha, size) in sorted(hashed.items())
            },
        )
        existing = self._read_index(name, version)
        if existing is not None:
            return self._same_or_refuse(existing, index)
        uploads = [(workflow, index.workflow), *((resources[r], e) for r, e in index.resources.items())]
        for path, entry in uploads:
            if cancel is not None and cancel.is_set():
                raise Cancelled("upload cancelled before the index was written; no artifact was created")
            key = self.key(name, version, entry.path)
            try:
                self.client.upload_file(
                    str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": entry.sha256}}
                )
            except Exception as exc:
                raise self._s3_error(exc, f"uploading {path} to s3://{bucket}/{key}") from exc
        body = json.dumps(index.to_dict(), indent=2, sort_keys=True).encode()
        key = self.key(name, version, INDEX_FILE)
        try:
            self.client.put_object(
                Bucket=bucket, Key=key, Body=body, ContentType="application/json", IfNoneMatch="*"
            )
        except Exception as exc:
            code, status = _error_code(exc)
            if code == "PreconditionFailed" or status == 412:
                # another upload of this version won the race
                existing = self._read_index(name, version)
                if existing is not None:
                    return self._same_or_refuse(existing, index)
            if code == "NotImplemented":  # a store without conditional writes: the check above stands
                self.client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")
            else:
                raise self._s3_error(exc, f"writing s3://{bucket}/{key}") from exc
        return UploadResult(index, True)

    @staticmethod
    def _same_or_refuse(existing: ArtifactIndex, new: ArtifactIndex) -> UploadResult:
        if existing.same_content(new):
            return UploadResult(existing, False)
        raise ArtifactError(
            f"{existing.uri} already exists (created {existing.created}) with different content; versions "
            "are immutable: upload with another --version (or without one, to get a content-derived version)",
            "Artifact.VersionExists",
        )
