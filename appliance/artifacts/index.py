"""An artifact's index (``index.json``): what a version holds, with the sha256 and size of each file,
checked against its schema when read; and the content-derived version."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import schemas
from .refs import (
    ArtifactError,
    ArtifactRef,
)

#: an index larger than this is not an index
MAX_INDEX_BYTES = 1 << 20

#: the schema of ``index.json`` (``appliance/schemas/artifact-index.json``)
INDEX_SCHEMA: dict[str, Any] = schemas.load("artifact-index")
_INDEX_VALIDATOR = schemas.validator("artifact-index")


@dataclass(frozen=True)
class Entry:
    """One file of an artifact."""

    path: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class ArtifactIndex:
    """The parsed ``index.json`` of one artifact version."""

    name: str
    version: str
    created: str
    workflow: Entry
    resources: dict[str, Entry] = field(default_factory=dict)

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef(self.name, self.version)

    @property
    def uri(self) -> str:
        return self.ref.uri

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "workflow": self.workflow.to_dict(),
            "resources": {k: v.to_dict() for k, v in sorted(self.resources.items())},
        }

    def same_content(self, other: ArtifactIndex) -> bool:
        """Whether both hold the same files (``created`` aside)."""
        return self.workflow == other.workflow and self.resources == other.resources

    def entry(self, path: str) -> Entry:
        """The file at ``path`` (``workflow.yaml``, ``resources/RES``), or a resource by its name."""
        if path == self.workflow.path:
            return self.workflow
        for entry in self.resources.values():
            if entry.path == path:
                return entry
        if path in self.resources:
            return self.resources[path]
        have = ", ".join([self.workflow.path, *(e.path for e in self.resources.values())])
        raise ArtifactError(f"{self.uri} holds no {path!r} (it holds: {have})", "Artifact.NotFound")

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ArtifactIndex:
        """Validate and parse an index document (``Artifact.IndexInvalid``)."""
        errors = sorted(_INDEX_VALIDATOR.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
        if errors:
            e = errors[0]
            at = ".".join(str(p) for p in e.absolute_path) or "(top level)"
            raise ArtifactError(f"{where}: invalid index: {at}: {e.message}", "Artifact.IndexInvalid")

        def entry(d: dict[str, Any]) -> Entry:
            return Entry(d["path"], d["sha256"], d["size"])

        return cls(
            name=data["name"],
            version=data["version"],
            created=data["created"],
            workflow=entry(data["workflow"]),
            resources={k: entry(v) for k, v in data["resources"].items()},
        )


@dataclass(frozen=True)
class UploadResult:
    """What ``upload`` did: the artifact's index and whether anything was written."""

    index: ArtifactIndex
    #: False when the same content already was this version (nothing was written)
    uploaded: bool

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.index.uri, "uploaded": self.uploaded, **self.index.to_dict()}


def content_version(workflow_sha256: str, resources: Mapping[str, str]) -> str:
    """The default version: 12 hex digits of a digest over the workflow's and resources' digests."""
    doc = json.dumps({"workflow": workflow_sha256, "resources": dict(sorted(resources.items()))})
    return hashlib.sha256(doc.encode()).hexdigest()[:12]
