"""``bundle.write``: a disk of this appliance (a file volume, a device, a stored image file) as an EC2
image bundle in the cloud's object store (``sources.s3``), for ``image.register`` to register.

The bundle (:mod:`appliance.targets.bundle`) is encrypted for the cloud: the certificate of
``controller.cloud_cert[_file]`` when one is configured, else the public half of ``bundles.cloud_private_key``
(so this appliance's own unbundler opens it); it is signed with ``bundles.cloud_private_key`` when that is
set (the cloud's certificate verifies it, as Walrus accepted), else ``UNSIGNED``. Parts go to
``bucket``/``key_prefix`` with the canned ACL ``acl``, the manifest last; undoing the step deletes them.

The disk is ``path``, or ``source``: a disk resolved by :mod:`appliance.service.resolver` (BundleInstance:
an instance's root volume), made readable as ``export.write`` does (a point-in-time copy of a cloud
volume attached here, a block device copied into scratch, everything removed after).
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from ..config import Config
from ..errors import ConfigError
from ..sources import s3 as s3mod
from ..sources.bundle_manifest import configured_cloud_key
from ..sources.euca_manifest import cloud_keys
from ..sources.urlfilter import UrlPolicy
from ..targets.bundle import ARCHITECTURES, BundleKeys, MachineConfiguration, S3Sink, write_bundle
from ..targets.upload_policy import ACLS, read_upload_policy
from ..workflow.step import Step, StepContext
from .export_source import Readable


def bundle_keys(config: Config) -> BundleKeys:
    """Whom a bundle this appliance writes is for, and who signs it (module docstring)."""
    signer: rsa.RSAPrivateKey | None = None
    if config.bundles.cloud_private_key or config.bundles.cloud_private_key_file:
        signer = configured_cloud_key(config.bundles)
    if config.controller.cloud_cert or config.controller.cloud_cert_file:
        cloud = cloud_keys(config.controller)[0]
    elif signer is not None:
        cloud = signer.public_key()
    else:
        raise ConfigError(
            "bundle.write needs the cloud's certificate (controller.cloud_cert[_file]) or the cloud key "
            "(bundles.cloud_private_key[_file]) to encrypt the bundle for"
        )
    return BundleKeys(cloud=cloud, signer=signer)


def _s3(config: Config) -> Any:
    return s3mod.s3_client(config.sources.s3, UrlPolicy.from_config(config.sources))


class BundleWriteStep(Step):
    """Bundle ``path`` as ``prefix`` into ``bucket``/``key_prefix``; ``{image_location, parts, ...}``."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["prefix", "bucket", "user"],
        "oneOf": [{"required": ["path"]}, {"required": ["source"]}],
        "properties": {
            "path": {"type": "string", "minLength": 1},
            "source": {"type": "object", "required": ["type"]},
            "prefix": {"type": "string", "minLength": 1, "maxLength": 100},
            "bucket": {"type": "string", "minLength": 3, "maxLength": 63},
            "key_prefix": {"type": "string", "default": ""},
            "acl": {"type": "string", "enum": list(ACLS)},
            "user": {"type": "string", "minLength": 1},
            "architecture": {"type": "string", "enum": list(ARCHITECTURES)},
            "kernel_id": {"type": ["string", "null"]},
            "ramdisk_id": {"type": ["string", "null"]},
            "upload_policy": {
                "type": "string",
                "description": "the verified upload policy (base64) the bundle is written under: its "
                "expiration and size limit are enforced at every object",
            },
        },
    }

    def run(
        self,
        ctx: StepContext,
        prefix: str,
        bucket: str,
        user: str,
        path: str | None = None,
        source: dict[str, Any] | None = None,
        key_prefix: str = "",
        acl: str = "aws-exec-read",
        architecture: str = "x86_64",
        kernel_id: str | None = None,
        ramdisk_id: str | None = None,
        upload_policy: str = "",
    ) -> dict[str, Any]:
        keys = bundle_keys(ctx.config)
        # checked again here: the policy may have expired while the task was queued
        policy = (
            read_upload_policy(upload_policy, bucket=bucket, prefix=key_prefix + prefix)
            if upload_policy
            else None
        )
        sink = S3Sink(_s3(ctx.config), bucket, key_prefix, acl, policy=policy)
        if source is not None:
            leftovers = ctx.load_checkpoint() or {}
            Readable.remove_leftovers(ctx, leftovers)
            with Readable(ctx, source) as readable:
                return self._write(
                    ctx,
                    str(readable),
                    prefix,
                    bucket,
                    user,
                    key_prefix,
                    keys,
                    sink,
                    architecture,
                    kernel_id,
                    ramdisk_id,
                )
        assert path is not None  # the schema requires path or source
        return self._write(
            ctx, path, prefix, bucket, user, key_prefix, keys, sink, architecture, kernel_id, ramdisk_id
        )

    @staticmethod
    def _write(
        ctx: StepContext,
        path: str,
        prefix: str,
        bucket: str,
        user: str,
        key_prefix: str,
        keys: BundleKeys,
        sink: S3Sink,
        architecture: str,
        kernel_id: str | None,
        ramdisk_id: str | None,
    ) -> dict[str, Any]:
        ctx.fence()
        with open(path, "rb") as src:
            size = src.seek(0, 2)
            src.seek(0)
            try:
                bundle = write_bundle(
                    src,
                    size,
                    prefix,
                    keys,
                    sink,
                    user=user,
                    machine=MachineConfiguration(architecture, kernel_id or None, ramdisk_id or None),
                    cancel=ctx.cancel,
                    on_progress=lambda done: ctx.progress(
                        {
                            "phase": "bundling",
                            "done": done,
                            "total": size,
                            "percent": 100.0 * done / max(1, size),
                        }
                    ),
                )
            except BaseException:
                sink.remove()
                raise
        for key in sink.written:
            ctx.ledger_created(f"s3://{bucket}/{key}")
        return {
            "image_location": f"{bucket}/{key_prefix}{bundle.manifest_name}",
            "bucket": bucket,
            "keys": sink.written,
            "parts": len(bundle.parts),
            "size": bundle.size,
            "bundled_size": bundle.bundled_size,
            "digest": bundle.digest,
            "signed": bundle.signed,
        }

    def undo(self, ctx: StepContext, args: dict[str, Any], result: dict[str, Any]) -> None:
        client = _s3(ctx.config)
        for key in (result or {}).get("keys") or []:
            client.delete_object(Bucket=result["bucket"], Key=key)
            ctx.ledger_removed(f"s3://{result['bucket']}/{key}")
