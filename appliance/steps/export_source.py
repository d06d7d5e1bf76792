"""The source disk of an export made readable as a path (:class:`Readable`), and removed again after.

- an image stored as a file, a file volume: read where it is;
- a block device (a device volume, an attached EC2 volume): read where it is (no scratch copy);
- an image stored in S3: downloaded into scratch (under a reservation), hashed as it arrives (a cancel
  ends a read the store stopped answering at once);
- an EC2 volume this appliance imported: attached here (found by serial), detached afterwards;
- an instance of the controlling cloud: a snapshot of its boot volume made into a volume attached
  here, all of it deleted afterwards (:class:`appliance.targets.ec2_export.CloudDiskCopy`; what it
  created is kept in the step's checkpoint, so a resumed run removes a killed run's leftovers).

``export.write`` (:mod:`.export`) and ``bundle.write`` (:mod:`.bundles_out`) read their source this way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..allowance import Allowance
from ..errors import ImagingError
from ..progress import ProgressTracker
from ..sources.s3 import S3Stream
from ..targets import get_image_target, get_volume_target
from ..targets.ec2 import Ec2VolumeTarget
from ..targets.ec2_export import CloudDiskCopy
from ..workflow.step import StepContext
from .export_check import SourceDigestCheck

CHUNK = 4 << 20


def _reading(ctx: StepContext, total: int | None) -> ProgressTracker:
    """Progress of reading the source (throttled: the task's row is not written for every chunk)."""
    return ProgressTracker(
        "reading source",
        total,
        lambda p: ctx.progress(
            {"phase": p.phase, "done": p.done, "total": p.total, "rate": p.rate, "eta": p.eta}
        ),
    )


def _download(ctx: StepContext, location: dict[str, Any], check: SourceDigestCheck) -> tuple[Path, Allowance]:
    """The S3-stored image into scratch, ``check`` fed as it arrives and verified before anything is
    written; ``(path, its scratch reservation)``."""
    target: Any = get_image_target(ctx.config)
    dst = ctx.workdir / "export-source.raw"
    dst.unlink(missing_ok=True)
    allowance = Allowance(ctx.scratch, f"downloading s3://{location['bucket']}/{location['key']}")
    ctx.ledger_created(dst)
    total = int(location.get("size") or 0)
    done = 0
    tracker = _reading(ctx, total or None)
    try:
        got = target.client.get_object(Bucket=location["bucket"], Key=location["key"])
        # read so that a cancel or suspend ends a read the store stopped answering at once (its
        # socket shut down), not at the read timeout: the worker's shutdown grace is seconds
        with S3Stream(got, location["bucket"], location["key"], ctx.cancel) as body, open(dst, "wb") as out:
            for chunk in body.iter_chunks(CHUNK):
                ctx.check_cancelled()
                check.read(done, chunk)
                done += len(chunk)
                allowance.cover(done)
                out.write(chunk)
                tracker.update(min(done, total) if total else done)
        check.verify(done)
    except BaseException:
        dst.unlink(missing_ok=True)
        ctx.ledger_removed(dst)
        allowance.release()
        check.close()
        raise
    allowance.shrink_to(done)
    return dst, allowance


class Readable:
    """Context manager: the path of the source, readable until exit (see the module docstring;
    ``bundle.write`` reads its source through it too)."""

    @staticmethod
    def remove_leftovers(ctx: StepContext, checkpoint: dict[str, Any]) -> None:
        """Remove what a killed run of the step left (cloud volume copies and their snapshots)."""
        records = [v for k, v in checkpoint.items() if k.startswith("cloud_copy") and v]
        for record in records:
            CloudDiskCopy(ctx.config.targets["volume"]).remove(record)
        if records:
            ctx.save_checkpoint({})

    def __init__(
        self,
        ctx: StepContext,
        source: dict[str, Any],
        *,
        slot: str = "cloud_copy",
        state: dict[str, Any] | None = None,
        check: SourceDigestCheck | None = None,
    ) -> None:
        """``slot``: the key of this source's cloud copy in the step's checkpoint ``state`` (shared by
        the readables of one step, which saves it whole); ``check``: fed and verified by the download
        of an S3-stored image (any other source is read in place by the writer, which feeds it)."""
        self.ctx = ctx
        self.source = source
        self.check = check
        self.slot = slot
        self.state: dict[str, Any] = {} if state is None else state
        self._cleanup: list[Callable[[], None]] = []

    def __enter__(self) -> Path:
        try:
            return self._open()
        except BaseException:
            self._close()
            raise

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        # every clean-up runs (a failed detach must not keep the snapshot); the first error is raised
        failed: BaseException | None = None
        while self._cleanup:
            try:
                self._cleanup.pop()()
            except BaseException as exc:
                failed = failed or exc
        if failed is not None:
            raise failed

    def _open(self) -> Path:
        ctx, source = self.ctx, self.source
        kind = source["type"]
        if kind == "image":
            location = source["location"]
            if location.get("type") == "s3":
                check = self.check if self.check is not None else SourceDigestCheck(source)
                path, allowance = _download(ctx, location, check)
                self._cleanup.append(allowance.release)
                self._cleanup.append(lambda: _drop(ctx, path))
                return path
            return Path(location["path"])
        if kind == "volume":
            volume = source["volume"]
            if volume.get("type") == "ec2":
                target = get_volume_target(ctx.config)
                if not isinstance(target, Ec2VolumeTarget):
                    raise ImagingError(
                        f"{source.get('id')} is an EC2 volume but the volume target is not ec2",
                        "NotExportable",
                    )
                attached = target.adopt(str(volume["volume_id"]), ctx.task_id)
                self._cleanup.append(lambda: target.release(attached.info))
                return attached.path
            return Path(volume["path"])
        if kind == "cloud-instance":
            copy = CloudDiskCopy(ctx.config.targets["volume"])
            record: dict[str, Any] = {}
            self.state[self.slot] = record
            ctx.save_checkpoint(self.state)

            def remove() -> None:
                copy.remove(record)
                self.state.pop(self.slot, None)
                ctx.save_checkpoint(self.state)

            self._cleanup.append(remove)
            attached = copy.create(ctx.task_id, str(source["volume_id"]), record, ctx.cancel)
            ctx.save_checkpoint(self.state)
            return attached.path
        raise ImagingError(f"cannot export a source of type {kind!r}", "NotExportable")


def _drop(ctx: StepContext, path: Path) -> None:
    if path.exists():
        path.unlink()
        ctx.ledger_removed(path)
