"""The export step's writer interface (appliance.targets.exportwriter.StreamingExportWriter): a disk
streamed to S3 through a moto server process, and removed again with nothing left."""

from __future__ import annotations

from pathlib import Path

from appliance import config as config_mod
from appliance.targets.exportwriter import StreamingExportWriter
from tests import imagefactory as factory
from tests.appliance.targets.test_diskexport import bucket, disk, leftovers, workdir
from tests.servers import REGION

MiB = factory.MiB
__all__ = ["bucket", "disk", "workdir"]  # fixtures, used by name


def test_the_export_step_interface_streams_and_removes(
    tmp_path: Path, workdir: Path, disk: Path, moto, bucket: str
) -> None:
    s3_settings = {
        "endpoint_url": moto.endpoint,
        "region": REGION,
        "access_key": "testing",
        "secret_key": "testing",
    }
    cfg = config_mod.from_dict(
        {"state_dir": str(tmp_path / "state"), "sources": {"s3": s3_settings}}, base_dir=tmp_path
    )
    writer = StreamingExportWriter(cfg, part_size=5 * MiB, threads=2)
    done = writer.write(
        disk,
        disk_format="VMDK",
        bucket=bucket,
        key="p/export-ami-1.vmdk",
        workdir=workdir,
        metadata={"task": "export-ami-1"},
    )
    head = moto.client("s3").head_object(Bucket=bucket, Key="p/export-ami-1.vmdk")
    assert head["Metadata"] == {
        "task": "export-ami-1",
        "sha256": done["sha256"],
        "digest-algorithm": "sha256-chunked",
        "digest-chunk-size": str(5 * MiB),
    }
    assert done["format"] == "vmdk" and done["digest"]["s3_verified"] is True
    writer.remove(bucket, "p/export-ami-1.vmdk")
    writer.remove(bucket, "p/export-ami-1.vmdk")  # gone already: fine
    assert leftovers(moto, bucket) == (0, [])


# ---------------------------------------------------------------------------------------- the digest
