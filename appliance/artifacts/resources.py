"""Fetching a workflow's ``resources:`` before its first step: verified, cached by digest, read-only.

Every resource ends as a file in the digest cache (``<cache_dir>/sha256/<hex>``, mode 0444) and
templates see ``resources.NAME`` = that path. Where the digest is known before fetching — an
artifact's file (its index) or a ``{uri, sha256}`` pin — a cached copy is used without any network
access; otherwise (an unpinned ``s3://``/``https://`` URI) the resource is downloaded every run,
since nothing says the remote content is still the same. A download whose digest differs from the
expected one fails with ``Artifact.DigestMismatch`` and leaves nothing in the cache.

``https://``/``http://`` resources go through the SSRF policy of ``sources.*`` and the pinned HTTP
client (:mod:`appliance.sources`); ``s3://`` resources use the artifact store's connection settings.
Dry runs do not fetch: :meth:`ResourceFetcher.plan` lists what would be fetched and what is cached.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import ImageRejected, ImagingError
from ..sources.fetch import fetch_to_file
from ..sources.http import HttpClient
from ..sources.urlfilter import UrlPolicy
from .refs import ArtifactError, ResourceSpec
from .s3 import download_object
from .store import ArtifactStore


@dataclass(frozen=True)
class FetchedResource:
    """A resource available locally: its verified, read-only cached file."""

    name: str
    uri: str
    path: Path
    sha256: str
    #: True when no bytes were downloaded (the cache had it)
    cached: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uri": self.uri,
            "path": str(self.path),
            "sha256": self.sha256,
            "cached": self.cached,
        }


class ResourceFetcher:
    """Resolves :class:`ResourceSpec` s to cached files for one configuration."""

    def __init__(
        self,
        config: Config,
        *,
        store: ArtifactStore | None = None,
        policy: UrlPolicy | None = None,
        http: HttpClient | None = None,
    ) -> None:
        self.config = config
        self.store = store or ArtifactStore.from_config(config)
        self.cache = self.store.cache
        self._policy = policy
        self._http = http

    @property
    def policy(self) -> UrlPolicy:
        if self._policy is None:
            self._policy = UrlPolicy.from_config(self.config.sources)
        return self._policy

    # -- fetching ------------------------------------------------------------------------------

    def fetch_all(
        self, specs: Mapping[str, ResourceSpec], *, cancel: threading.Event | None = None
    ) -> dict[str, FetchedResource]:
        """Fetch every resource of one workflow's ``resources:``, by name."""
        return {name: self.fetch(spec, cancel=cancel) for name, spec in specs.items()}

    def fetch(self, spec: ResourceSpec, *, cancel: threading.Event | None = None) -> FetchedResource:
        """The verified local file of ``spec`` (see the module docstring). Errors name the resource."""
        try:
            path, digest, cached = self._fetch(spec, cancel)
        except ImagingError as exc:
            exc.args = (f"resources.{spec.name} ({spec.uri}): {exc.message}",)
            raise
        return FetchedResource(spec.name, spec.uri, path, digest, cached)

    def _fetch(self, spec: ResourceSpec, cancel: threading.Event | None) -> tuple[Path, str, bool]:
        if spec.kind == "artifact":
            assert spec.artifact is not None
            path, entry, cached = self.store.fetch(spec.artifact, cancel=cancel, expected=spec.sha256)
            return path, entry.sha256, cached
        if spec.kind == "local":
            assert spec.path is not None
            if not spec.path.is_file():
                raise ArtifactError(
                    f"{spec.path} is not an existing regular file", "Artifact.ResourceMissing"
                )
            return self.cache.add_file(spec.path, spec.sha256, spec.uri)
        if spec.sha256 is not None:
            hit = self.cache.lookup(spec.sha256)
            if hit is not None:
                return hit, spec.sha256, True
        tmp = self.cache.temp_path()
        try:
            actual = (
                self._download_s3(spec, tmp, cancel)
                if spec.kind == "s3"
                else self._download_http(spec, tmp, cancel)
            )
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self.cache.install(tmp, actual, spec.sha256, spec.uri), actual, False

    def _too_large(self) -> ArtifactError:
        return ArtifactError(
            f"larger than artifacts.max_resource_size ({self.store.cfg.max_resource_size} bytes); "
            "nothing was cached",
            "Artifact.ResourceTooLarge",
        )

    def _download_s3(self, spec: ResourceSpec, tmp: Path, cancel: threading.Event | None) -> str:
        bucket, _, key = spec.uri[5:].partition("/")
        digest, _ = download_object(
            self.store.client,
            bucket,
            key,
            tmp,
            max_bytes=self.store.cfg.max_resource_size,
            cancel=cancel,
            what=spec.uri,
            on_error=self.store._s3_error,
            too_large=self._too_large,
        )
        return digest

    def _download_http(self, spec: ResourceSpec, tmp: Path, cancel: threading.Event | None) -> str:
        if self._http is None:
            self._http = HttpClient(self.policy)
        try:
            result = fetch_to_file(
                {"url": spec.uri},
                tmp,
                self.policy,
                max_bytes=self.store.cfg.max_resource_size,
                cancel=cancel,
                http=self._http,
            )
        except ImageRejected as exc:  # the size cap of fetch_to_file speaks of images
            raise self._too_large() from exc
        return result.sha256

    # -- dry runs ------------------------------------------------------------------------------

    def plan(self, workflow_name: str, specs: Mapping[str, ResourceSpec]) -> list[dict[str, Any]]:
        """What a run would fetch for one workflow's ``resources:``, without fetching: each
        resource's uri, known digest, and whether the cache has it (``cached`` is None when the
        digest is not known before downloading)."""
        entries = []
        for spec in specs.values():
            digest = spec.sha256 or self._known_digest(spec)
            entries.append(
                {
                    "workflow": workflow_name,
                    **spec.to_dict(),
                    "sha256": digest,
                    "cached": None if digest is None else self.cache.path_for(digest).is_file(),
                }
            )
        return entries

    def _known_digest(self, spec: ResourceSpec) -> str | None:
        if spec.kind != "artifact" or spec.artifact is None:
            return None
        local = self.store.cache.root / "artifacts" / spec.artifact.name / spec.artifact.version
        if not (local / "index.json").is_file():
            return None  # a dry run does not download indexes of other artifacts
        try:
            return self.store.index(spec.artifact).entry(spec.artifact.path or "").sha256
        except ArtifactError:
            return None
