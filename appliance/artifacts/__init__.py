"""Workflow resources by URI and the artifact store (workflows + resources, verified by sha256).

- :mod:`.refs` parses ``artifact://NAME@VERSION/PATH`` and ``resources:`` entries (no I/O);
- :mod:`.cache` keeps verified files by digest, read-only;
- :mod:`.store` reads and writes artifacts (``index.json``, ``workflow.yaml``, ``resources/``) in S3;
- :mod:`.resources` fetches a workflow's resources before its first step.
"""

from __future__ import annotations

from .cache import DigestCache
from .index import ArtifactIndex, Entry, UploadResult
from .refs import ArtifactError, ArtifactRef, ResourceSpec, is_artifact_uri, parse_resource
from .resources import FetchedResource, ResourceFetcher
from .store import ArtifactStore

__all__ = [
    "ArtifactError",
    "ArtifactIndex",
    "ArtifactRef",
    "ArtifactStore",
    "DigestCache",
    "Entry",
    "FetchedResource",
    "ResourceFetcher",
    "ResourceSpec",
    "UploadResult",
    "is_artifact_uri",
    "parse_resource",
]
