"""``imaging workflows upload``: validate a workflow, gather its resources, store it as one artifact."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

from ..artifacts.index import UploadResult
from ..artifacts.refs import ArtifactError
from ..artifacts.store import ArtifactStore
from .loader import WorkflowLoader
from .model import Workflow


def gather_resources(workflow: Workflow, given: Mapping[str, Path]) -> dict[str, Path]:
    """The local file for each resource of ``workflow`` that the artifact must carry.

    A resource written as a path is uploaded from ``given[NAME]`` (``--resource NAME=PATH``) or, when
    not given, from that path relative to the workflow file. Resources written as URIs stay URIs.
    Every problem is reported in one :class:`ArtifactError` (``Artifact.ResourceMissing`` when a
    resource has no content, else ``InvalidParameterValue``).
    """
    problems: list[str] = []
    missing = False
    for step in workflow.steps:
        ref = step.include_ref
        if ref is not None and step.include is not None and WorkflowLoader.is_path(ref):
            problems.append(
                f"step {step.name!r} includes {step.include_ref!r} by path, which the artifact would not "
                "hold; include workflows by name (shipped or operator directories) or by artifact:// URI"
            )
    for name in sorted(set(given) - set(workflow.resources)):
        declared = ", ".join(sorted(workflow.resources)) or "none"
        problems.append(
            f"--resource {name}: the workflow declares no resource {name!r} (its resources: {declared})"
        )
    out: dict[str, Path] = {}
    for name, spec in sorted(workflow.resources.items()):
        if spec.kind != "local":
            if name in given:
                problems.append(
                    f"--resource {name}: resources.{name} is {spec.uri} in the workflow, fetched from there "
                    "when it runs; only resources written as paths are uploaded"
                )
            continue
        path = Path(given[name]) if name in given else spec.path
        assert path is not None
        if path.is_file():
            out[name] = path
            continue
        missing = True
        if name in given:
            problems.append(f"--resource {name}={given[name]}: no such file")
        else:
            problems.append(
                f"resource {name!r} ({spec.written}) is not given and {path} does not exist: pass "
                f"--resource {name}=PATH"
            )
    if problems:
        raise ArtifactError(
            "; ".join(problems), "Artifact.ResourceMissing" if missing else "InvalidParameterValue"
        )
    return out


def upload_workflow(
    store: ArtifactStore,
    loader: WorkflowLoader,
    workflow_file: Path,
    given: Mapping[str, Path],
    *,
    version: str | None = None,
    cancel: threading.Event | None = None,
) -> UploadResult:
    """Validate ``workflow_file`` with ``loader``, then upload it and its resources as
    ``<workflow name>@<version>`` (see :meth:`ArtifactStore.upload`)."""
    workflow = loader.validate_file(workflow_file)
    files = gather_resources(workflow, given)
    return store.upload(workflow.name, Path(workflow.source), files, version=version, cancel=cancel)


def parse_resource_args(pairs: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` pairs of ``--resource`` (a name given twice is an error)."""
    out: dict[str, Path] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ArtifactError(f"--resource {pair!r} is not NAME=PATH", "InvalidParameterValue")
        if name in out:
            raise ArtifactError(f"--resource {name} is given twice", "InvalidParameterValue")
        out[name] = Path(path).expanduser()
    return out
