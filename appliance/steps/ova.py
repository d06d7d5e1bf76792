"""``ova.convert``: every disk of an untrusted OVA, verified and inspected, converted (boot disk first).

Wraps :func:`appliance.image.ovaconvert.convert_ova`: the package is unpacked into the task's scratch
directory (removed again when the step ends), each disk converted to the target format at the target name
(the boot disk) or beside it (``-disk2``, ``-disk3``, …); every output is in the cleanup ledger and removed
by ``undo``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..allowance import Allowance
from ..errors import ImageRejected
from ..image.formats import OUTPUT_FORMATS
from ..image.ova import unpack_ova
from ..image.ovacontainer import FIRST_HEADER_BYTES, begins_ova
from ..image.ovaconvert import convert_ova, output_names
from ..image.ovfguest import boot_mode_of, platform_of
from ..workflow.step import Step, StepContext


class OvaConvertStep(Step):
    """Unpack, verify and inspect an OVA, then convert each of its disks."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["source", "target", "format"],
        "properties": {
            "source": {"type": "string", "minLength": 1},
            "target": {"type": "string", "minLength": 1},
            "format": {"enum": list(OUTPUT_FORMATS)},
            "subformat": {"oneOf": [{"type": "null"}, {"enum": ["dynamic", "fixed"]}]},
        },
    }

    def run(
        self, ctx: StepContext, source: str, target: str, format: str, subformat: str | None = None
    ) -> dict[str, Any]:
        result = convert_ova(
            Path(source),
            Path(target),
            format,
            config=ctx.config,
            workdir=ctx.workdir,
            subformat=subformat,
            on_progress=ctx.progress,
            cancel=ctx.cancel,
            ledger=ctx,
        )
        for out in result.outputs:
            ctx.ledger_created(out.dst)
        return {**result.to_dict(), "outputs": [str(o.dst) for o in result.outputs]}

    def undo(self, ctx: StepContext, args: dict[str, Any], result: dict[str, Any]) -> None:
        for path in (result or {}).get("outputs", []):
            if Path(path).exists():
                Path(path).unlink()
                ctx.ledger_removed(path)

    def plan(
        self, ctx: StepContext, source: str, target: str, format: str, subformat: str | None = None
    ) -> dict[str, Any]:
        return {
            "source": source,
            "target": target,
            "format": format,
            "scratch_bytes": Path(source).stat().st_size if Path(source).is_file() else 0,
            "writes": str(output_names(Path(target), 1)[0]),
        }


class OvaOpenStep(Step):
    """``ova.open``: the disk an import goes on with. A fetched file claimed as ``ova`` is unpacked into
    the task's scratch (:func:`appliance.image.ova.unpack_ova`: every member checked, the OVF parsed
    under the sandbox policy, every ``.mf`` digest verified, every disk inspected); its boot disk (the
    one the OVF marks, else the first) is what the import inspects, validates and stores, and the
    others (``data_disks``: path, name, capacity, format, sha256) are imported after it as the image's
    data disks; the unpacked files go with the task's scratch directory and count against its quota
    (each disk member reserved before it is written: ``InsufficientScratch`` when it does not fit). The
    OVF's firmware and OS type are given as ``boot_mode`` (``uefi``/``legacy-bios``) and ``platform``
    (``Linux``/``Windows``) for guest validation (None when the OVF says nothing it knows).

    With ``sole_container`` (the disk is an ImportImage's only DiskContainer, the one place an OVA's data
    disks are imported after it), a file given no format is opened the same way when its first bytes are an
    OVA's (a tar whose first member is a ``.ovf``: :func:`appliance.image.ovacontainer.begins_ova`), as a
    client that names no format expects; without it such a file goes on unchanged and inspection refuses
    it as an archive (an OVA cannot be a data disk or a snapshot), and an OVA claimed there (by an
    operator's hook) that holds more than one disk is ``Ova.DisksLeftOut``, rather than imported without
    its data disks. Any other claim passes the file through unchanged
    (``ova`` is null). The path and claim are what the ``after_fetch`` hooks handed on: a format a hook
    names is the claim, and detection looks at the file a hook left unclaimed (one it decompressed, say),
    not at the download."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["path"],
        "properties": {
            "path": {"type": "string", "minLength": 1},
            "format": {"type": ["string", "null"]},
            "sole_container": {"type": "boolean"},
        },
    }

    def run(
        self, ctx: StepContext, path: str, format: str | None = None, sole_container: bool = False
    ) -> dict[str, Any]:
        if not _opens(path, format, sole_container):
            return {
                "path": path,
                "format": format,
                "ova": None,
                "data_disks": [],
                "boot_mode": None,
                "platform": None,
            }
        directory = ctx.workdir / "ova"
        # the unpacked members count against the task's scratch quota like any scratch file
        allowance = Allowance(ctx.scratch, "unpacking the OVA")
        try:
            with open(path, "rb") as src:
                pkg = unpack_ova(
                    src,
                    directory,
                    config=ctx.config,
                    cancel=ctx.cancel,
                    reserve=lambda nbytes: allowance.cover(nbytes, exact=True),
                )
        except BaseException:
            allowance.release()
            raise
        boot, *others = pkg.disks
        if others and not sole_container:
            pkg.remove()
            allowance.release()
            raise ImageRejected.nothing_imported(
                "Ova.DisksLeftOut",
                f"the OVA holds {len(pkg.disks)} disks, and here only its boot disk would be imported (an "
                "OVA's data disks are imported only as an ImportImage's only DiskContainer): import it with "
                "ImportImage as its only DiskContainer, or export the VM with its boot disk alone",
            )
        allowance.shrink_to(sum(d.path.stat().st_blocks * 512 for d in pkg.disks))
        return {
            "path": str(boot.path),
            "format": boot.inspection.format if boot.inspection else None,
            "ova": pkg.to_dict(),
            "data_disks": [d.to_dict() for d in others],
            "boot_mode": boot_mode_of(pkg.ovf.firmware),
            "platform": platform_of(pkg.ovf.os_type),
        }

    def plan(
        self, ctx: StepContext, path: str, format: str | None = None, sole_container: bool = False
    ) -> dict[str, Any]:
        # about the OVA's size: its disk members, unpacked beside it (a gzip File inflates beyond it)
        unpacks = Path(path).is_file() and _opens(path, format, sole_container)
        return {"path": path, "format": format, "scratch_bytes": Path(path).stat().st_size if unpacks else 0}


def _opens(path: str, format: str | None, detect: bool) -> bool:
    """Whether ``ova.open`` unpacks ``path``: claimed as ``ova``, or (``detect``: an ImportImage's only
    DiskContainer) claimed as nothing and beginning as an OVA does."""
    claim = (format or "").lower()
    if claim == "ova":
        return True
    if claim or not detect:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(FIRST_HEADER_BYTES)
    except OSError:
        return False  # the inspection that follows names what is wrong with the file
    return begins_ova(head)
