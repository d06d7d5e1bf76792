"""What this appliance is and accepts, for discovery: its version (:func:`app_version`) and the
document of the formats, import methods, targets and limits its configuration allows
(:func:`info_document`, like Glance's ``/v2/info/import``).

Everything here is read from the configuration and the package metadata; the HTTP layers serve it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib import metadata
from typing import Any

from ..config import Config
from ..image import formats
from ..sources import methods
from ..sources.methods import enabled_methods
from .importtasks import CONTAINER_FORMATS, VOLUME_FORMATS


@cache
def app_version() -> str:
    """The installed package version (``0+unknown`` when running from an uninstalled tree)."""
    try:
        return metadata.version("imaging-appliance")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def info_document(config: Config, api_versions: Sequence[str], ec2_actions: Sequence[str]) -> dict[str, Any]:
    """What this appliance accepts and produces (like Glance's ``/v2/info/import``), for a server
    speaking ``api_versions`` of the admin API and the EC2 actions ``ec2_actions``."""
    banned = set(config.safety.banned_formats)
    inputs = [
        f
        for f in formats.INPUT_FORMATS
        if f not in banned and not (f == "iso" and config.safety.iso_policy == "reject")
    ]
    return {
        "version": app_version(),
        "api_versions": list(api_versions),
        "ec2": {
            "actions": list(ec2_actions),
            "region": config.api.region,
            "signature_versions": ["4", "2"] if config.api.sigv2 else ["4"],
            "sigv2": config.api.sigv2,
        },
        "import": {
            "input_formats": inputs,
            "compressions": list(formats.COMPRESSIONS),
            "wire_formats": {
                "ImportVolume": list(VOLUME_FORMATS),
                "ImportInstance": list(VOLUME_FORMATS),
                "ImportImage": list(CONTAINER_FORMATS),
                "ImportSnapshot": list(CONTAINER_FORMATS),
            },
            # every target writes the converted disk as raw (a volume, a file, an object)
            "output_formats": ["raw"],
            # the enabled import methods (sources.methods), each with what it serves and its limits
            "sources": list(enabled_methods(config.sources)),
            "methods": import_methods(config),
            "targets": {kind: t["type"] for kind, t in sorted(config.targets.items())},
        },
        "limits": {
            "max_virtual_size": config.limits.max_virtual_size,
            "max_decompressed_size": config.limits.max_decompressed_size,
            "scratch_quota": config.scratch.quota,
            "scratch_min_free": config.scratch.min_free,
            "max_active_tasks": config.max_active_tasks,
            "max_request_bytes": config.api.max_request_bytes,
            "expiration_hours": config.expiration_hours,
            "worker_concurrency": config.worker.concurrency,
        },
    }


def import_methods(config: Config) -> dict[str, Any]:
    """The enabled import methods (Glance's ``enabled_import_methods``), each with the actions and
    request members that use it and its limits."""
    limits = config.limits
    download = {
        "max_download_bytes": limits.max_decompressed_size,
        "max_virtual_size": limits.max_virtual_size,
    }
    described: dict[str, dict[str, Any]] = {
        methods.MANIFEST: {
            "actions": ["ImportVolume", "ImportInstance"],
            "member": "Image.ImportManifestUrl (a presigned https:// import manifest)",
            "limits": {"max_virtual_size": limits.max_virtual_size},
        },
        methods.S3: {
            "actions": ["ImportImage", "ImportSnapshot"],
            "member": "DiskContainer UserBucket, or Url s3://bucket/key",
            "limits": download,
        },
        methods.URL: {
            "actions": ["ImportImage", "ImportSnapshot"],
            "member": "DiskContainer Url https:// (under the SSRF policy: sources.allowed_endpoints)",
            "limits": download,
        },
    }
    upload = config.sources.upload
    if upload is not None:
        described[methods.UPLOAD] = {
            "actions": ["ImportImage", "ImportSnapshot", "ImportVolume", "ImportInstance"],
            "member": "DiskContainer Url or Image.ImportManifestUrl upload://{id} (PUT /v1/uploads/{id})",
            "limits": {
                "max_size": upload.max_size,
                "expire_hours": upload.expire_hours,
                "max_virtual_size": limits.max_virtual_size,
            },
        }
    return {name: described[name] for name in enabled_methods(config.sources) if name in described}
