"""File steps: ``file.copy`` (undo removes the copy) and ``file.remove`` (irreversible).

``file.copy`` writes to a hidden partial file next to ``dst`` (mode 0600, in the ledger before it
exists: :mod:`appliance.partials`) and renames it into place, so ``dst`` either does not exist or is
complete: a cancelled or failed copy leaves nothing behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ImagingError, StepFailed
from ..nospace import is_no_space, no_space_error
from ..partials import partial_file, publish
from ..progress import ProgressTracker
from ..workflow.step import Step, StepContext

CHUNK = 1024 * 1024


def _file_error(action: str, path: str | Path, exc: OSError) -> ImagingError:
    if is_no_space(exc):
        return no_space_error(Path(path).parent, f"{action} {Path(path).name}")
    code = {2: "FileNotFound", 17: "FileExists", 13: "FileAccessDenied"}.get(exc.errno or 0, "FileError")
    return StepFailed(f"cannot {action} {path}: {exc.strerror or exc}", code)


class CopyStep(Step):
    """Copy the regular file ``src`` to ``dst`` (refuses to replace ``dst`` unless ``overwrite``)."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["src", "dst"],
        "properties": {
            "src": {"type": "string", "minLength": 1},
            "dst": {"type": "string", "minLength": 1},
            "overwrite": {"type": "boolean"},
        },
    }

    def run(self, ctx: StepContext, src: str, dst: str, overwrite: bool = False) -> Any:
        source, target = Path(src), Path(dst)
        if not source.is_file():
            raise StepFailed(f"cannot copy {src}: not an existing regular file", "FileNotFound")
        if target.exists() and not overwrite:
            raise StepFailed(
                f"cannot copy to {dst}: it exists (set overwrite: true to replace it)", "FileExists"
            )
        total = source.stat().st_size
        tracker = ProgressTracker(f"copy {source.name}", total, ctx.progress)
        done = 0
        try:
            with partial_file(target, ctx) as tmp:
                with source.open("rb") as fin, open(tmp, "wb") as fout:
                    while chunk := fin.read(CHUNK):
                        ctx.check_cancelled()
                        fout.write(chunk)
                        done += len(chunk)
                        tracker.update(done)
                publish(tmp, target)
        except OSError as exc:
            raise _file_error("copy to", dst, exc) from exc
        tracker.finish()
        ctx.ledger_created(target)
        return {"path": str(target), "bytes": done}

    def undo(self, ctx: StepContext, args: dict[str, Any], result: Any) -> None:
        """Remove the copy (which also means a replaced ``dst`` is gone, not restored)."""
        path = Path(result["path"] if isinstance(result, dict) else args["dst"])
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _file_error("remove", path, exc) from exc
        ctx.ledger_removed(path)

    def plan(self, ctx: StepContext, src: str, dst: str, overwrite: bool = False) -> dict[str, Any]:
        size = os.path.getsize(src) if os.path.isfile(src) else None
        out: dict[str, Any] = {"creates": dst, "bytes": size, "src_exists": size is not None}
        if size is not None and Path(dst).is_relative_to(ctx.workdir):
            out["scratch_bytes"] = size
        return out


class RemoveStep(Step):
    """Remove the file ``path`` (not directories). Irreversible, so there is no undo."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["path"],
        "properties": {
            "path": {"type": "string", "minLength": 1},
            "missing_ok": {"type": "boolean"},
        },
    }

    def run(self, ctx: StepContext, path: str, missing_ok: bool = False) -> Any:
        target = Path(path)
        if target.is_dir() and not target.is_symlink():
            raise StepFailed(f"cannot remove {path}: it is a directory", "FileError")
        try:
            target.unlink()
        except FileNotFoundError:
            if missing_ok:
                return {"path": path, "removed": False}
            raise StepFailed(f"cannot remove {path}: it does not exist", "FileNotFound") from None
        except OSError as exc:
            raise _file_error("remove", path, exc) from exc
        ctx.ledger_removed(target)
        return {"path": path, "removed": True}

    def plan(self, ctx: StepContext, path: str, missing_ok: bool = False) -> dict[str, Any]:
        return {"removes": path, "exists": os.path.lexists(path)}
