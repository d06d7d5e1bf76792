"""The OVA export (appliance.targets.exportova): several disks as one OVA, ordered ``.ovf``, ``.mf``, disks,
every member digested, round-tripping through the project's own OVA reader; to a file and streamed to S3
through a moto server process, leaving no scratch behind."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

from appliance.config import Config
from appliance.image.ova import unpack_ova
from appliance.targets.exportdest import FileDestination, S3Destination
from appliance.targets.exportova import OvaSource, export_ova
from tests import imagefactory as factory
from tests.appliance.targets.test_diskexport import bucket, cfg, leftovers, qemu, s3, source_disk, workdir

MiB = factory.MiB
__all__ = ["bucket", "cfg", "workdir"]  # fixtures, used by name


def test_a_two_disk_ova_is_ordered_and_digested_and_round_trips(
    tmp_path: Path, cfg: Config, workdir: Path
) -> None:
    boot = source_disk(tmp_path / "boot.raw", 12 * MiB, seed=1)
    data = source_disk(tmp_path / "data.raw", 6 * MiB, seed=2)
    out = tmp_path / "vm.ova"
    result = export_ova(
        [OvaSource(boot), OvaSource(data)],
        FileDestination(out),
        name="vm",
        config=cfg,
        workdir=workdir,
        firmware="efi",
        cpus=2,
        memory_mib=2048,
    )
    with tarfile.open(out) as tar:
        names = tar.getnames()
        assert names == ["vm.ovf", "vm.mf", "vm-disk1.vmdk", "vm-disk2.vmdk"]
        ovf = tar.extractfile("vm.ovf").read()
        mf = tar.extractfile("vm.mf").read().decode()
        for n in names[2:]:
            body = tar.extractfile(n).read()
            assert f"SHA256({n})= {hashlib.sha256(body).hexdigest()}\n" in mf
    assert f"SHA256(vm.ovf)= {hashlib.sha256(ovf).hexdigest()}\n" in mf
    assert b'vmw:key="firmware" vmw:value="efi"' in ovf
    assert b"#streamOptimized" in ovf and b'ovf:capacity="12582912"' in ovf
    assert result.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert os.listdir(workdir) == []
    # and back in: the boot disk first, identical to the sources
    with open(out, "rb") as f:
        pkg = unpack_ova(f, workdir / "pkg", config=cfg)
    try:
        assert pkg.manifest_verified and pkg.ovf.firmware == "efi" and pkg.ovf.cpus == 2
        for disk, src in zip(pkg.disks, (boot, data), strict=True):
            assert disk.inspection is not None and disk.inspection.format == "vmdk"
            assert qemu("compare", "-f", "raw", "-F", "vmdk", src, disk.path).returncode == 0
    finally:
        pkg.remove()


def test_an_ova_streams_to_s3(tmp_path: Path, cfg: Config, workdir: Path, moto, bucket: str) -> None:
    boot = source_disk(tmp_path / "boot.raw", 8 * MiB)
    dest = S3Destination(s3(moto), bucket, "export-i-0abc.ova", part_size=5 * MiB)
    result = export_ova([OvaSource(boot)], dest, name="export-i-0abc", config=cfg, workdir=workdir)
    body = moto.client("s3").get_object(Bucket=bucket, Key=dest.key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == result.sha256
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert tar.getnames() == ["export-i-0abc.ovf", "export-i-0abc.mf", "export-i-0abc-disk1.vmdk"]
    assert leftovers(moto, bucket) == (1, []) and os.listdir(workdir) == []
