"""The OVA export (appliance.targets.exportova): several disks as one OVA, ordered ``.ovf``, ``.mf``, disks,
every member digested, round-tripping through the project's own OVA reader; to a file and streamed to S3
through a moto server process, leaving no scratch behind."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from xml.etree import ElementTree

from appliance.config import Config
from appliance.image.ova import unpack_ova
from appliance.targets.exportdest import FileDestination, S3Destination
from appliance.targets.exportova import OvaSource, export_ova
from tests import imagefactory as factory
from tests.appliance.targets.test_diskexport import bucket, cfg, leftovers, qemu, s3, source_disk, workdir

MiB = factory.MiB
__all__ = ["bucket", "cfg", "workdir"]  # fixtures, used by name

NS = {"ovf": "http://schemas.dmtf.org/ovf/envelope/1", "vmw": "http://www.vmware.com/schema/ovf"}


def q(prefix: str, name: str) -> str:
    """An attribute's qualified name for ElementTree."""
    return f"{{{NS[prefix]}}}{name}"


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


def test_the_ovf_describes_the_vm_to_a_plain_xml_reader(tmp_path: Path, cfg: Config, workdir: Path) -> None:
    # what VMware and VirtualBox read, checked with ElementTree rather than the project's OVF parser:
    # References and DiskSection agree with the tar, the disk format is streamOptimized, and the
    # VirtualSystem has its OS, CPUs, memory, a controller each disk hangs off, and the firmware
    boot = source_disk(tmp_path / "boot.raw", 12 * MiB, seed=3)
    data = source_disk(tmp_path / "data.raw", 6 * MiB, seed=4)
    out = tmp_path / "vm.ova"
    export_ova(
        [OvaSource(boot), OvaSource(data)],
        FileDestination(out),
        name="vm",
        config=cfg,
        workdir=workdir,
        firmware="efi",
        platform="windows",
        cpus=4,
        memory_mib=3072,
    )
    with tarfile.open(out) as tar:
        sizes = {m.name: m.size for m in tar.getmembers()}
        envelope = ElementTree.fromstring(tar.extractfile("vm.ovf").read())  # type: ignore[union-attr]
    files = envelope.findall("ovf:References/ovf:File", NS)
    assert [(f.get(q("ovf", "href")), int(f.get(q("ovf", "size")) or -1)) for f in files] == [
        ("vm-disk1.vmdk", sizes["vm-disk1.vmdk"]),
        ("vm-disk2.vmdk", sizes["vm-disk2.vmdk"]),
    ]
    disks = envelope.findall("ovf:DiskSection/ovf:Disk", NS)
    assert [d.get(q("ovf", "fileRef")) for d in disks] == [f.get(q("ovf", "id")) for f in files]
    assert [int(d.get(q("ovf", "capacity")) or -1) for d in disks] == [12 * MiB, 6 * MiB]
    assert {d.get(q("ovf", "capacityAllocationUnits"), "byte") for d in disks} == {"byte"}
    assert {d.get(q("ovf", "format")) for d in disks} == {
        "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
    }
    [system] = envelope.findall("ovf:VirtualSystem", NS)
    [os_section] = system.findall("ovf:OperatingSystemSection", NS)
    assert os_section.get(q("ovf", "id")) == "112" and os_section.get(q("vmw", "osType"), "").startswith(
        "windows"
    )
    [hardware] = system.findall("ovf:VirtualHardwareSection", NS)
    items = [
        {child.tag.split("}")[1]: (child.text or "") for child in item}
        for item in hardware.findall("ovf:Item", NS)
    ]
    by_type: dict[str, list[dict[str, str]]] = {}
    for item in items:
        by_type.setdefault(item["ResourceType"], []).append(item)
    [cpu], [memory] = by_type["3"], by_type["4"]
    assert cpu["VirtualQuantity"] == "4"
    assert (memory["VirtualQuantity"], memory["AllocationUnits"].replace(" ", "")) == ("3072", "byte*2^20")
    controllers = {c["InstanceID"] for t in ("5", "6", "20") for c in by_type.get(t, [])}
    assert controllers
    attached = by_type["17"]
    assert [d["HostResource"] for d in attached] == [f"ovf:/disk/{d.get(q('ovf', 'diskId'))}" for d in disks]
    assert all(d["Parent"] in controllers for d in attached)
    slots = [(d["Parent"], d["AddressOnParent"]) for d in attached]
    assert len(set(slots)) == len(slots)
    assert len({i["InstanceID"] for i in items}) == len(items)
    firmware = [c for c in hardware.findall("vmw:Config", NS) if c.get(q("vmw", "key")) == "firmware"]
    assert [c.get(q("vmw", "value")) for c in firmware] == ["efi"]
