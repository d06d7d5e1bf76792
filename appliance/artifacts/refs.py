"""What a workflow's ``resources:`` entries and ``artifact://`` URIs mean, parsed without any I/O.

A resource is written as a string (the URI) or as ``{uri: ..., sha256: ...}`` (a digest pin):

* ``s3://bucket/key`` — read with the artifact store's S3 connection settings;
* ``https://…`` / ``http://…`` — through the SSRF policy (``sources.*``) and the pinned HTTP client;
* ``artifact://NAME@VERSION/PATH`` — a file of a stored artifact, verified against its index;
* anything else is a file path: relative to the workflow file, or — in a workflow loaded from an
  artifact — the artifact's own resource of that name (stored at ``resources/NAME``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes

from .. import schemas
from ..errors import ImagingError

SCHEME = "artifact://"
#: the name, version and digest patterns of the artifact index's schema (``artifact-index.json``)
_DEFS = schemas.load("artifact-index")["$defs"]
NAME_PATTERN: str = _DEFS["name"]["pattern"]
VERSION_PATTERN: str = _DEFS["version"]["pattern"]
SHA256_PATTERN: str = _DEFS["sha256"]["pattern"]
_NAME = re.compile(NAME_PATTERN)
_VERSION = re.compile(VERSION_PATTERN)
_SHA256 = re.compile(SHA256_PATTERN)
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
#: where the artifact layout keeps a resource's content, relative to ``<prefix>/NAME/VERSION/``
RESOURCE_DIR = "resources"
WORKFLOW_FILE = "workflow.yaml"
INDEX_FILE = "index.json"

#: the template variable resources are bound to
TEMPLATE_NAME = "resources"


class ArtifactError(ImagingError):
    """An artifact or resource could not be resolved, stored or verified; ``code`` says which way.

    Codes: ``Artifact.InvalidUri``, ``Artifact.NotConfigured``, ``Artifact.NotFound``,
    ``Artifact.VersionExists``, ``Artifact.DigestMismatch``, ``Artifact.IndexInvalid``,
    ``Artifact.ResourceMissing``, ``Artifact.StoreUnavailable``.
    """

    code = "Artifact.Error"


def is_artifact_uri(text: Any) -> bool:
    """Whether ``text`` is an ``artifact://`` URI (case-insensitive scheme)."""
    return isinstance(text, str) and text[: len(SCHEME)].lower() == SCHEME


@dataclass(frozen=True)
class ArtifactRef:
    """``artifact://NAME@VERSION[/PATH]``."""

    name: str
    version: str
    path: str | None = None

    @property
    def uri(self) -> str:
        """The artifact itself, without a path: ``artifact://NAME@VERSION``."""
        return f"{SCHEME}{self.name}@{self.version}"

    def __str__(self) -> str:
        return self.uri + (f"/{self.path}" if self.path else "")

    def with_path(self, path: str | None) -> ArtifactRef:
        return ArtifactRef(self.name, self.version, path)

    @classmethod
    def parse(cls, text: str) -> ArtifactRef:
        """Parse an ``artifact://`` URI; :class:`ArtifactError` ``Artifact.InvalidUri`` says what is wrong."""
        if not is_artifact_uri(text):
            raise ArtifactError(f"{text!r} is not an artifact:// URI", "Artifact.InvalidUri")
        rest = text[len(SCHEME) :]
        head, _, path = rest.partition("/")
        name, at, version = head.partition("@")
        if not at or not version:
            raise ArtifactError(
                f"{text!r} names no version; write artifact://NAME@VERSION[/PATH]", "Artifact.InvalidUri"
            )
        if not _NAME.match(name):
            raise ArtifactError(
                f"{name!r} is not a valid artifact name (letters, digits, '_', '.', '-')",
                "Artifact.InvalidUri",
            )
        if not _VERSION.match(version):
            raise ArtifactError(
                f"{version!r} is not a valid artifact version (letters, digits, '_', '.', '+', '-')",
                "Artifact.InvalidUri",
            )
        path = path.strip("/")
        if path and any(part in ("", ".", "..") for part in path.split("/")):
            raise ArtifactError(
                f"{text!r}: the path must not contain '.', '..' or '//'", "Artifact.InvalidUri"
            )
        return cls(name, version, path or None)


def check_name(name: str) -> str:
    """``name`` if it is a valid artifact name, else :class:`ArtifactError`."""
    if not _NAME.match(name):
        raise ArtifactError(f"{name!r} is not a valid artifact name", "Artifact.InvalidUri")
    return name


def check_version(version: str) -> str:
    """``version`` if it is a valid artifact version, else :class:`ArtifactError`."""
    if not _VERSION.match(version):
        raise ArtifactError(
            f"{version!r} is not a valid artifact version (letters, digits, '_', '.', '+', '-'; at most 64)",
            "Artifact.InvalidUri",
        )
    return version


@dataclass(frozen=True)
class ResourceSpec:
    """One entry of a workflow's ``resources:``, resolved to where its bytes come from.

    ``kind`` is ``local`` (``path``), ``s3`` or ``http`` (``uri``) or ``artifact`` (``artifact``).
    ``sha256`` is the digest pin written in the workflow, if any.
    """

    name: str
    kind: str
    uri: str
    sha256: str | None = None
    path: Path | None = None
    artifact: ArtifactRef | None = None
    #: the value as written in the workflow (a relative path stays relative here)
    written: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "uri": self.uri, "sha256": self.sha256}


def parse_resource(name: str, value: Any, *, base_dir: Path, origin: ArtifactRef | None) -> ResourceSpec:
    """The :class:`ResourceSpec` of ``resources.<name>`` (``value`` already passed the schema).

    ``origin`` is the artifact the workflow was loaded from (then a path means the artifact's own
    resource ``name``); otherwise paths are relative to ``base_dir`` (the workflow's directory).
    """
    if isinstance(value, dict):
        uri, pin = str(value["uri"]), value.get("sha256")
    else:
        uri, pin = str(value), None
    if pin is not None and not _SHA256.match(str(pin)):
        raise ArtifactError("sha256 must be 64 lower-case hex digits", "Artifact.InvalidUri")
    lowered = uri.lower()
    if is_artifact_uri(uri):
        ref = ArtifactRef.parse(uri)
        if ref.path is None:
            raise ArtifactError(
                f"{uri!r} names an artifact, not a file in it; write artifact://NAME@VERSION/PATH",
                "Artifact.InvalidUri",
            )
        return ResourceSpec(name, "artifact", str(ref), pin, artifact=ref, written=uri)
    if lowered.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        if not bucket or not key:
            raise ArtifactError(f"{uri!r} must be s3://bucket/key", "Artifact.InvalidUri")
        return ResourceSpec(name, "s3", uri, pin, written=uri)
    if lowered.startswith(("https://", "http://")):
        return ResourceSpec(name, "http", uri, pin, written=uri)
    if _URI_SCHEME.match(uri):
        raise ArtifactError(
            f"{uri!r}: unsupported scheme (use s3://, https://, http://, artifact:// or a file path)",
            "Artifact.InvalidUri",
        )
    if origin is not None:
        # Inside an artifact the file travelled with the workflow: it is the resource of this name.
        if Path(uri).is_absolute():
            raise ArtifactError(
                f"{uri!r}: a workflow in an artifact cannot use absolute paths", "Artifact.InvalidUri"
            )
        ref = origin.with_path(f"{RESOURCE_DIR}/{name}")
        return ResourceSpec(name, "artifact", str(ref), pin, artifact=ref, written=uri)
    path = Path(uri).expanduser()
    path = path if path.is_absolute() else base_dir / path
    return ResourceSpec(name, "local", str(path), pin, path=path, written=uri)


def resource_names_used(env: jinja2.Environment, value: Any, *, expression: bool = False) -> set[str]:
    """The ``NAME`` of every ``resources.NAME`` / ``resources['NAME']`` in the templates of ``value``.

    ``expression``: ``value`` is a ``when`` condition (a bare expression is allowed). Syntax errors
    are ignored here: the loader reports them already.
    """
    found: set[str] = set()
    for text in _strings(value):
        if "{{" not in text and "{%" not in text:
            if not expression:
                continue
            text = "{{ " + text + " }}"
        try:
            tree = env.parse(text)
        except jinja2.TemplateSyntaxError:
            continue
        for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
            # always true; find_all is typed as yielding their common base (nodes.Expr)
            if not isinstance(node, nodes.Getattr | nodes.Getitem):
                continue
            target = node.node
            if not (isinstance(target, nodes.Name) and target.name == TEMPLATE_NAME):
                continue
            if isinstance(node, nodes.Getattr):
                found.add(node.attr)
            elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
                found.add(node.arg.value)
    return found


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
