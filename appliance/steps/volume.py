"""Volume steps of ``ImportVolume``/``ImportInstance``: ``manifest.wait``, ``volume.create`` and
``volume.finalize`` (``volume.import``, which writes the disk, is in :mod:`.volume_import`).

Restart safety: ``volume.create`` records the volume in the task's scratch directory the moment it
exists, so a resumed task reuses it.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from ..errors import Finding, ImageRejected, ImagingError
from ..sources.euca_manifest import (
    cloud_keys,
    fetch_download_manifest,
    part_lengths,
    strip_marker,
    to_import_manifest,
)
from ..sources.http import HttpClient
from ..sources.methods import check_enabled, is_upload_url, method_of_manifest
from ..sources.uploadwait import wait_for_manifest
from ..sources.urlfilter import UrlPolicy
from ..targets import earlyflush, get_volume_target
from ..targets.ec2 import Ec2VolumeTarget
from ..workflow.step import Step, StepContext
from .bundles import bundle_download
from .uploads import wait_for_upload

GiB = 1 << 30
#: the record of the volume in the task's scratch directory (a few hundred bytes, never reserved: task
#: state, not scratch data)
VOLUME_RECORD = "volume.json"


class InsufficientVolumeSize(ImagingError):
    """The disk's virtual size does not fit the requested volume."""

    code = "InsufficientVolumeSize"


def _policy(ctx: StepContext) -> UrlPolicy:
    return UrlPolicy.from_config(ctx.config.sources)


class ManifestWaitStep(Step):
    """Wait until the import manifest and all its parts are uploaded (or the task expires).

    ``signed`` (pull mode): the URL is a Eucalyptus download manifest, uploaded already; it is verified
    against the cloud certificate before anything is read from it or any part is fetched
    (``CertificateFailure``), then each part's length is asked for (:mod:`appliance.sources.euca_manifest`).
    """

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["url", "expires", "format"],
        "properties": {
            "url": {"type": "string"},
            "expires": {"type": "string"},
            "format": {"enum": ["RAW", "VMDK", "VHD"]},
            "signed": {"type": "boolean"},
        },
    }

    def run(
        self, ctx: StepContext, url: str, expires: str, format: str, signed: bool = False
    ) -> dict[str, Any]:
        deadline = dt.datetime.fromisoformat(expires.replace("Z", "+00:00"))
        check_enabled(ctx.config.sources, method_of_manifest(url), "ImportManifestUrl")
        ctx.progress({"phase": "pending-upload", "done": 0})
        if is_upload_url(url) and not signed:
            # a staged upload: no manifest, its bytes are the disk (volume.import checks their format)
            return wait_for_upload(ctx, url, deadline, format).to_dict()
        if signed:
            http = HttpClient(_policy(ctx))
            download = fetch_download_manifest(url, cloud_keys(ctx.config.controller), http, ctx.cancel)
            if (
                download.bundle is not None
            ):  # an instance-store bundle: volume.import unbundles it (bundles.py)
                return bundle_download(download)
            manifest = to_import_manifest(download, part_lengths(download, http, ctx.cancel), format)
        else:
            manifest = wait_for_manifest(
                url,
                _policy(ctx),
                deadline=deadline,
                cancel=ctx.cancel,
                on_wait=lambda status: ctx.event("waiting", message=status),
            )
        if manifest.file_format.upper() != format:
            raise ImageRejected(
                [
                    Finding.error(
                        "FormatMismatch",
                        f"claimed {format}, but the import manifest says {manifest.file_format}; "
                        "import again with the format of the uploaded file",
                    )
                ]
            )
        return manifest.to_dict()

    def plan(
        self, ctx: StepContext, url: str, expires: str, format: str, signed: bool = False
    ) -> dict[str, Any]:
        check_enabled(ctx.config.sources, method_of_manifest(url), "ImportManifestUrl")
        if is_upload_url(url):
            return {"waits_for": "the staged upload", "until": expires, "scratch_bytes": 0}
        _policy(ctx).check(strip_marker(url))
        return {"waits_for": "manifest and parts", "until": expires, "scratch_bytes": 0}


class VolumeCreateStep(Step):
    """Create the target volume (a file, a given device, or a cloud volume attached to this appliance).

    ``volume_id`` (pull mode) names a volume the cloud created for the task: the ``ec2`` target attaches
    that one instead (found by its serial, as its own volumes), and undoing only detaches it. Other
    targets cannot reach a cloud volume and create their own, as without it.
    """

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["size_gib"],
        "properties": {
            "size_gib": {"type": "integer", "minimum": 1},
            "availability_zone": {"type": ["string", "null"]},
            "volume_id": {"type": ["string", "null"]},
        },
    }

    def run(
        self,
        ctx: StepContext,
        size_gib: int,
        availability_zone: str | None = None,
        volume_id: str | None = None,
    ) -> dict[str, Any]:
        target = get_volume_target(ctx.config)
        record = ctx.workdir / VOLUME_RECORD
        if record.exists():  # the step ran before a crash: take the volume it created again
            volume = target.reopen(json.loads(record.read_text()))
        elif volume_id and isinstance(target, Ec2VolumeTarget):
            volume = target.adopt(volume_id, ctx.task_id)
            record.write_text(json.dumps(volume.info))
        else:
            # The token is this step's: a create that was interrupted before the record was written made (or
            # began) the volume this one takes again, where the target can.
            volume = target.create(
                ctx.task_id,
                size_gib * GiB,
                availability_zone=availability_zone,
                client_token=f"{ctx.task_id}/{ctx.idx}",
            )
            record.write_text(json.dumps(volume.info))
            ctx.ledger_created(f"volume {volume.id} ({volume.path})")
        return {"id": volume.id, **volume.info}

    def undo(self, ctx: StepContext, args: dict[str, Any], result: dict[str, Any]) -> None:
        if result and result.get("path"):
            # the flush volume.import started, ended before the volume is released or deleted
            earlyflush.discard(result["path"])
        if result and result.get("adopted"):  # the cloud's volume: handed back, never deleted
            target = get_volume_target(ctx.config)
            if isinstance(target, Ec2VolumeTarget):
                target.release(result)
        elif result:
            get_volume_target(ctx.config).delete(result)
            ctx.ledger_removed(f"volume {result['id']} ({result.get('path')})")

    def plan(
        self,
        ctx: StepContext,
        size_gib: int,
        availability_zone: str | None = None,
        volume_id: str | None = None,
    ) -> dict[str, Any]:
        return {
            "creates": f"a {size_gib} GiB volume",
            "target": ctx.config.targets["volume"]["type"],
            "scratch_bytes": 0,
        }


class VolumeFinalizeStep(Step):
    """Flush the volume and hand it over (an attached cloud volume is detached)."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["volume"],
        "properties": {"volume": {"type": "object"}},
    }

    def run(self, ctx: StepContext, volume: dict[str, Any]) -> dict[str, Any]:
        ctx.progress({"phase": "finalizing"})
        target = get_volume_target(ctx.config)
        ctx.fence()  # a run that lost the task to another worker hands over nothing
        reopened = target.reopen(volume)
        # the flush volume.import started when the disk was written: its error fails the hand-over
        earlyflush.finish(reopened.path, f"volume {reopened.id} ({reopened.path})")
        return target.finalize(reopened)
