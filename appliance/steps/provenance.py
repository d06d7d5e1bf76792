"""Provenance of a task: what ran, with which tools, on which input, producing which output.

One record shape for imports and exports, built by :func:`build_record` (this module is the one
place it is made):

- ``task_id``, ``kind`` (``import`` or ``export``);
- ``sources``: one entry per disk, in disk order — ``sha256`` computed while the source streamed
  (never by a second read of the source), ``size``, ``location`` (redacted), ``checked``: the
  source's own digests that were verified on the way (an S3 ETag MD5, ``x-amz-checksum-sha256``,
  each manifest part's MD5, the OVA ``.mf``), and ``expected_sha256`` when the user gave one;
- ``outputs``: one entry per disk — ``sha256`` of the volume, file or object as written, ``size``,
  where it is, and ``digest_method``: how the digests were taken (while writing, or one read of the
  output and why); ``digest``, the chunked SHA-256 (:mod:`appliance.targets.chunkdigest`:
  ``algorithm``, ``value``, ``chunk_size``, ``chunks``, ``s3_checksum_sha256``), which every export and
  every volume import records (a volume's is computed while its parts or grains are written; its
  ``sha256`` is null: the whole-volume sha256 would cost a second read); an export's ``sha256`` is null
  where the whole-object digest was not computed (:func:`appliance.targets.diskexport.wants_full_sha256`);
- ``source`` / ``output``: the first entries of those lists (the boot disk);
- ``tools``: appliance, qemu-img and (when guest validation ran) dissect versions;
- ``workflow``: the digests of the workflow file and of the hook set;
- ``timings``: ``started``, ``finished`` and per stage (step) its seconds.

An export keeps it in its result (``exported.provenance``) and as the object's user metadata
(:func:`object_metadata`); an import registers it as ``provenance`` (the ``provenance.record`` step,
:class:`ProvenanceRecordStep`, last of the import workflows), and its S3-stored image carries
:func:`import_metadata`. ``/v1/tasks/{id}`` shows it and controller reports carry it
(:mod:`appliance.service.provenance` finds it in a task).

A user-supplied expected sha256 of an import's source is checked by ``source.fetch`` as soon as the
source is read, and again here before the task completes (``Source.DigestMismatch``; the engine's undo
then removes the output).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ImagingError
from ..image.qemuimg import availability
from ..store import StepState
from ..targets.chunkdigest import ALGORITHM, digest_file
from ..targets.rawio import disk_size
from ..timestamps import format_time, parse_time, utc_now
from ..workflow.hookpoints import HOOKS_RECORD
from ..workflow.loader import WorkflowLoader
from ..workflow.step import Step, StepContext

#: how an output's sha256 was taken (``digest_method`` of an output entry)
WHILE_WRITING = "computed while writing"
READ_BEFORE_UPLOAD = (
    "one read of the converted disk before the upload: S3 takes the object's metadata (which carries "
    "the sha256) when the upload starts"
)
READ_AFTER_STREAM = (
    "one read of the image file after the streaming decoder wrote it (its holes skipped, 64 MiB chunks "
    "hashed in parallel: sha256-chunked only): "
)
WHILE_STREAMING_CHUNKED = (
    "sha256-chunked computed while the streaming decoder wrote the image file: its writes at their "
    "offsets, the ranges it left as holes as zeros (a chunk written out of order hashed again from the "
    "file); no whole-file sha256 (it would need a second read)"
)
WHILE_UPLOADING = (
    "computed while streaming: the sha256 of every byte handed to the multipart upload in order (zero "
    "ranges included); the object was checked at a staging key and copied to its key with the digest"
)
READ_AFTER_WRITE = (
    "one read of the volume after it was written (its holes skipped, 64 MiB chunks hashed in parallel: "
    "sha256-chunked only): "
)
WHILE_WRITING_VOLUME = (
    "sha256-chunked computed while writing: the RAW parts or decoded grains as they were written at their "
    "offsets, the ranges never written (holes, the volume past the image) as zeros; no hook changed the "
    "volume afterwards"
)


class SourceDigestMismatch(ImagingError):
    """A source's bytes do not have the sha256 they should (the user's expected digest, or the one a
    stored disk recorded when it was written)."""

    code = "Source.DigestMismatch"


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _dissect_version() -> str | None:
    try:
        return metadata.version("dissect.target")
    except metadata.PackageNotFoundError:
        return None


def tool_versions(dissect: bool = False) -> dict[str, str | None]:
    """``{appliance, qemu-img}`` versions (qemu-img's first ``--version`` line, None when absent),
    and ``dissect`` (dissect.target's version) when ``dissect``: the task read a guest with it."""
    tools: dict[str, str | None] = {"appliance": __version__, "qemu-img": availability()[1]}
    if dissect:
        tools["dissect"] = _dissect_version()
    return tools


def workflow_digests(ctx: StepContext) -> dict[str, Any]:
    """``{workflow, workflow_sha256, hooks_sha256}`` of the task ``ctx`` runs in: the sha256 of the
    workflow file it was submitted with, and of the hook set recorded on it (canonical JSON; the
    digest of ``{}`` when it runs none)."""
    out: dict[str, Any] = {"workflow": None, "workflow_sha256": None, "hooks_sha256": None}
    if ctx.store is None:
        return out
    task = ctx.store.get_task(ctx.task_id)
    out["workflow"] = task.workflow
    if task.workflow:
        try:
            path = WorkflowLoader(ctx.config.workflow_dirs).resolve(task.workflow)
            out["workflow_sha256"] = _file_digest(path)
        except Exception:  # an artifact no longer in the cache: the digest stays unknown
            out["workflow_sha256"] = None
    hooks = ctx.store.record(ctx.task_id, HOOKS_RECORD) or {}
    out["hooks_sha256"] = hashlib.sha256(json.dumps(hooks, sort_keys=True).encode()).hexdigest()
    return out


def stage_timings(ctx: StepContext) -> list[dict[str, Any]]:
    """Per completed step of the task so far (top-level and included, in the order they started):
    ``{step, name, action, seconds}``."""
    if ctx.store is None:
        return []
    out: list[dict[str, Any]] = []
    for record in ctx.store.step_results(ctx.task_id):
        if record.state is not StepState.COMPLETED or not record.started_at or not record.finished_at:
            continue
        seconds = (parse_time(record.finished_at) - parse_time(record.started_at)).total_seconds()
        out.append(
            {"step": record.idx, "name": record.name, "action": record.action, "seconds": round(seconds, 3)}
        )
    return out


def ran_action(ctx: StepContext, action: str) -> bool:
    """Whether the task completed a step of ``action`` (e.g. ``guest.validate``: dissect was used)."""
    if ctx.store is None:
        return False
    return any(
        r.action == action and r.state is StepState.COMPLETED for r in ctx.store.step_results(ctx.task_id)
    )


def build_record(
    ctx: StepContext,
    kind: str,
    sources: Sequence[Mapping[str, Any]],
    outputs: Sequence[Mapping[str, Any]],
    *,
    timings: Mapping[str, Any],
    dissect: bool = False,
) -> dict[str, Any]:
    """The provenance record (see the module docstring) of ``kind`` (``import``, ``export`` or ``copy``)."""
    return {
        "task_id": ctx.task_id,
        "kind": kind,
        "sources": [dict(s) for s in sources],
        "outputs": [dict(o) for o in outputs],
        "source": dict(sources[0]) if sources else None,
        "output": dict(outputs[0]) if outputs else None,
        "tools": tool_versions(dissect),
        "workflow": workflow_digests(ctx),
        "timings": dict(timings),
    }


def object_metadata(record: dict[str, Any]) -> dict[str, str]:
    """The S3 user metadata of an export's provenance (ASCII values, well under S3's 2 KiB)."""
    source = record.get("source") or {}
    tools = record.get("tools") or {}
    meta = {
        "export-task-id": record.get("task_id"),
        "source-id": source.get("id"),
        "source-sha256": source.get("sha256"),
        "source-sha256-chunked": (source.get("digest") or {}).get("value"),
        "appliance-version": tools.get("appliance"),
        "qemu-img-version": tools.get("qemu-img"),
        "workflow-sha256": (record.get("workflow") or {}).get("workflow_sha256"),
        "hooks-sha256": (record.get("workflow") or {}).get("hooks_sha256"),
    }
    return _ascii(meta)


def import_metadata(ctx: StepContext, source_sha256: str | None) -> dict[str, str]:
    """The S3 user metadata of an imported image's provenance, as far as it is known when the upload
    starts: the task, the source's sha256, the tool versions and the workflow and hook digests (the
    object's own sha256 is the target's ``sha256`` member)."""
    tools = tool_versions()
    digests = workflow_digests(ctx)
    meta = {
        "import-task-id": ctx.task_id,
        "source-sha256": source_sha256,
        "appliance-version": tools.get("appliance"),
        "qemu-img-version": tools.get("qemu-img"),
        "workflow-sha256": digests.get("workflow_sha256"),
        "hooks-sha256": digests.get("hooks_sha256"),
    }
    return _ascii(meta)


def _ascii(meta: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(v).encode("ascii", "replace").decode()[:256] for k, v in meta.items() if v}


def disk_label(disk: str | None) -> str:
    """How a message names the disk ``disk`` of an import (``disk2``: the second DiskContainer of an
    ImportImage, its name in scratch and in the image target): `` of disk2 (DiskContainer.2)``; empty
    for the first or only disk (no name)."""
    if not disk:
        return ""
    number = disk[4:] if disk.startswith("disk") and disk[4:].isdigit() else None
    return f" of {disk} (DiskContainer.{number})" if number else f" of {disk}"


def check_expected(expected: str | None, actual: str | None, where: str, disk: str | None = None) -> None:
    """``Source.DigestMismatch`` when the user's ``expected`` sha256 is not the ``actual`` one of the
    source at ``where`` (a redacted location) of the disk named ``disk`` (:func:`disk_label`). An
    unknown actual digest (a resumed stream) is a mismatch too: what was imported cannot be shown to
    be what was expected."""
    if not expected:
        return
    where += disk_label(disk)
    if actual is None:
        raise SourceDigestMismatch(
            f"the expected sha256 {expected} of {where} could not be checked: the source was read in "
            "two runs (the task resumed), so its sha256 is unknown; import it again"
        )
    if actual.lower() != expected.lower():
        raise SourceDigestMismatch(
            f"the source {where} has sha256 {actual}, not the expected {expected}; nothing was imported"
        )


def output_digest(ctx: StepContext, path: Path) -> dict[str, Any]:
    """The ``sha256-chunked`` of a written volume (a regular file, its holes not read, or a block
    device), read once, its chunks hashed in parallel."""
    return digest_file(path, cancel=ctx.cancel).to_dict()


def written_digest(digest: Any, size: int) -> dict[str, Any] | None:
    """The volume step's ``output_digest`` when it covers a ``size``-byte volume, else None."""
    if not isinstance(digest, Mapping) or digest.get("algorithm") != ALGORITHM:
        return None
    chunk = int(digest.get("chunk_size") or 0)
    if chunk <= 0 or int(digest.get("chunks") or 0) != max(1, -(-size // chunk)):
        return None
    return dict(digest)


def _source_entry(disk: Mapping[str, Any]) -> dict[str, Any]:
    """The ``sources`` entry of one disk: its ``source`` digest (``source.fetch`` result or a
    volume import's ``source``), the OVA's verified ``.mf`` when it was one, the expected digest."""
    src = dict(disk.get("source") or {})
    entry: dict[str, Any] = dict(src.get("digest") or src)
    for drop in ("path", "preflight", "digest"):
        entry.pop(drop, None)
    entry.setdefault("checked", [])
    ova = disk.get("ova")
    if isinstance(ova, Mapping) and ova.get("manifest_verified"):
        verified = [
            {"what": "ova-mf", "member": name, "sha256": digest}
            for name, digest in sorted((ova.get("digests") or {}).items())
            if not name.lower().endswith(".mf")
        ]
        entry["checked"] = [*entry["checked"], *verified]
    if disk.get("expected_sha256"):
        entry["expected_sha256"] = str(disk["expected_sha256"]).lower()
    return entry


def _from_include(result: Mapping[str, Any]) -> dict[str, Any]:
    """A ``disks`` item from the registered result of an ``import-disk`` include (or of an
    ``import-ova-disk`` one, whose source is the OVA member its ``member`` step names)."""
    opened = result.get("opened") if isinstance(result.get("opened"), Mapping) else {}
    # a disk streamed into the image target (image.stream) has its source digest and output there
    streamed = result.get("streamed") if isinstance(result.get("streamed"), Mapping) else {}
    return {
        "source": result.get("fetched") or (streamed or {}).get("source") or result.get("member"),
        "ova": (opened or {}).get("ova"),
        "output": result.get("stored") or (streamed or {}).get("stored"),
    }


class ProvenanceRecordStep(Step):
    """``provenance.record``: the import's provenance record (see the module docstring), last step of
    an import workflow. ``disks``: per disk, ``source`` (the ``source.fetch`` result, or the volume
    import's result whose ``source`` is the streamed digest), ``ova`` (``ova.open``'s package, when the
    source was an OVA), ``output`` (the image target's location, whose ``sha256`` it computed) or
    ``volume`` (a volume: ``written_digest``, its ``sha256-chunked`` as the volume step wrote it, is taken
    as it is unless ``hooks`` ran on the volume afterwards; else, or when there is none — the reason in
    ``written_digest_gap`` — the volume is read once here, its chunks hashed in parallel), and
    ``expected_sha256`` (the user's).
    ``imported``: more disks, each the registered result of an ``import-disk`` include (its
    ``fetched``, ``opened`` and ``stored``), listed after ``disks`` — what a per-disk loop registers
    (``imported: "{{ data_disks }}"``)."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["disks"],
        "properties": {
            "imported": {"type": "array", "items": {"type": "object"}},
            "disks": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "source": {"type": ["object", "null"]},
                        "ova": {"type": ["object", "null"]},
                        "output": {"type": ["object", "null"]},
                        "volume": {"type": ["object", "null"]},
                        "expected_sha256": {"type": ["string", "null"]},
                        # the volume's sha256-chunked as the volume step wrote it, or null
                        "written_digest": {"type": ["object", "null"]},
                        "written_digest_gap": {"type": ["string", "null"]},
                        # the hooks that ran on the volume after it was written (they may change it)
                        "hooks": {"type": ["array", "null"], "items": {"type": "string"}},
                    },
                },
            },
        },
    }

    def run(
        self, ctx: StepContext, disks: list[dict[str, Any]], imported: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        disks = [*disks, *(_from_include(r) for r in imported or [])]
        sources: list[dict[str, Any]] = []
        outputs: list[dict[str, Any]] = []
        for n, disk in enumerate(disks, 1):
            entry = _source_entry(disk)
            # before anything is handed over: a wrong source fails the task (its outputs are undone)
            where = str(entry.get("location"))
            check_expected(
                entry.get("expected_sha256"), entry.get("sha256"), where, f"disk{n}" if n > 1 else None
            )
            sources.append(entry)
        for disk in disks:
            outputs.append(self._output(ctx, disk))
        started = None
        if ctx.store is not None:
            started = ctx.store.get_task(ctx.task_id).started_at
        return build_record(
            ctx,
            "import",
            sources,
            outputs,
            timings={"started": started, "finished": format_time(utc_now()), "stages": stage_timings(ctx)},
            # image.stream validates the guest of the disk it wrote
            dissect=ran_action(ctx, "guest.validate") or ran_action(ctx, "image.stream"),
        )

    @staticmethod
    def _output(ctx: StepContext, disk: Mapping[str, Any]) -> dict[str, Any]:
        volume = disk.get("volume")
        if isinstance(volume, Mapping) and volume.get("path"):
            path = Path(str(volume["path"]))
            size = disk_size(path)
            hooks = [str(h) for h in disk.get("hooks") or []]
            written = written_digest(disk.get("written_digest"), size)
            entry = {"type": "volume", "volume_id": volume.get("id"), "sha256": None, "size": size}
            if written is not None and not hooks:
                return entry | {"digest": written, "digest_method": WHILE_WRITING_VOLUME}
            if hooks:
                why = f"the hooks {', '.join(hooks)} ran on it in place after it was written"
            elif written is None and disk.get("written_digest_gap"):
                why = str(disk["written_digest_gap"])
            else:
                why = "qemu-img wrote it (converted from the upload assembled in scratch)"
            clock = time.monotonic()
            digest = output_digest(ctx, path)
            return entry | {
                "digest": digest,
                "digest_method": READ_AFTER_WRITE + why,
                "digest_seconds": round(time.monotonic() - clock, 3),
            }
        location = dict(disk.get("output") or {})
        entry = {
            k: location.get(k)
            for k in ("type", "path", "bucket", "key", "etag", "size", "sha256", "digest", "format")
        }
        entry = {k: v for k, v in entry.items() if v is not None}
        entry.setdefault("sha256", None)  # null: not computed (a streamed image carries its digest only)
        entry["digest_method"] = location.get("digest_method") or (
            READ_BEFORE_UPLOAD if location.get("type") == "s3" else WHILE_WRITING
        )
        return entry

    def plan(
        self, ctx: StepContext, disks: list[dict[str, Any]], imported: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        return {"records": "the import's provenance (source and output digests, tools, timings)"}
