"""Finding and reading workflow files.

A workflow is referenced by a file path (anything with a ``/`` or a ``.yaml``/``.yml`` suffix), by an
``artifact://NAME@VERSION[/workflow.yaml]`` URI (fetched, verified by digest, into the artifact cache)
or by a bare name, looked up as ``<name>.yaml`` (or ``.yml``) first in the operator's directories
(``config.workflow_dirs``, in order) and then in the workflows shipped in ``appliance/workflows``; the
first match wins, so an operator can override a shipped workflow by name. A file's YAML is read with
duplicate keys refused. Validating what was read is :mod:`appliance.workflow.loader`'s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..artifacts.refs import ArtifactError, ArtifactRef, is_artifact_uri
from ..artifacts.store import ArtifactStore
from ..errors import UsageError, WorkflowInvalid
from .model import WorkflowInfo
from .schema import WorkflowError, invalid

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "workflows"
SUFFIXES = (".yaml", ".yml")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_document(path: Path) -> Any:
    """Parse a workflow file's YAML (:class:`WorkflowInvalid` naming file and line on errors)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise invalid([WorkflowError(str(path), f"cannot read: {exc.strerror or exc}")]) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise invalid([WorkflowError(str(path), f"not valid YAML: {problem}", where)]) from None


class WorkflowFinder:
    """Locates workflow files (module docstring)."""

    def __init__(
        self,
        search_dirs: Sequence[Path | str] = (),
        *,
        shipped_dir: Path | None = SHIPPED_DIR,
        artifacts: ArtifactStore | None = None,
    ) -> None:
        self.search_dirs = [Path(d) for d in search_dirs]
        if shipped_dir is not None:
            self.search_dirs.append(shipped_dir)
        #: an :class:`~appliance.artifacts.ArtifactStore` for ``artifact://`` references (None: refused)
        self.artifacts = artifacts
        # local workflow file -> the artifact it was fetched from (relative resources live there)
        self._origins: dict[Path, ArtifactRef] = {}

    @staticmethod
    def is_path(ref: str | Path) -> bool:
        text = str(ref)
        if isinstance(ref, str) and is_artifact_uri(text):
            return False  # recorded as the URI itself, so a resumed task fetches the same version
        return isinstance(ref, Path) or os.sep in text or "/" in text or text.endswith(SUFFIXES)

    def resolve(self, ref: str | Path, *, relative_to: Path | None = None) -> Path:
        """The file ``ref`` names (:class:`UsageError` if there is none).

        An ``artifact://NAME@VERSION[/workflow.yaml]`` is fetched (verified by digest) into the cache.
        """
        if isinstance(ref, str) and is_artifact_uri(ref):
            return self._artifact_workflow(ref)
        if self.is_path(ref):
            path = Path(ref).expanduser()
            if not path.is_absolute():
                path = (relative_to or Path.cwd()) / path
            if not path.is_file():
                raise UsageError(f"workflow file {path} does not exist")
            return path.resolve()
        for directory in self.search_dirs:
            for suffix in SUFFIXES:
                candidate = directory / f"{ref}{suffix}"
                if candidate.is_file():
                    return candidate.resolve()
        where = ", ".join(str(d) for d in self.search_dirs) or "no directories"
        raise UsageError(f"no workflow named {str(ref)!r} (searched {where})")

    def list(self) -> list[WorkflowInfo]:
        """Every workflow reachable by name, operators' first; shadowed files are left out."""
        seen: dict[str, WorkflowInfo] = {}
        for directory in self.search_dirs:
            if not directory.is_dir():
                continue
            for path in sorted(directory.iterdir()):
                if path.suffix not in SUFFIXES or not path.is_file() or path.stem in seen:
                    continue
                seen[path.stem] = self._info(path)
        return sorted(seen.values(), key=lambda i: i.name)

    def _info(self, path: Path) -> WorkflowInfo:
        try:
            doc = read_document(path)
        except WorkflowInvalid as exc:
            return WorkflowInfo(path.stem, "", path, exc.message)
        if not isinstance(doc, dict):
            return WorkflowInfo(path.stem, "", path, "not a mapping")
        description = doc.get("description")
        if not isinstance(description, str):
            description = ""
        error = None
        if doc.get("name") != path.stem:
            error = f"name {doc.get('name')!r} does not match the file name {path.name!r}"
        return WorkflowInfo(path.stem, description.strip(), path, error)

    def _artifact_workflow(self, uri: str) -> Path:
        ref = ArtifactRef.parse(uri)
        if self.artifacts is None:
            raise ArtifactError(
                f"cannot load {uri}: this loader has no artifact store", "Artifact.NotConfigured"
            )
        path = self.artifacts.workflow_file(ref)
        self._origins[path] = ArtifactRef(ref.name, ref.version)
        return path
