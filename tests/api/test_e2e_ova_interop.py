"""ImportImage ``Format=ova`` of OVAs written by tools outside this repository, as clients see it:
`imaging serve` (gunicorn) and `imaging worker` as real processes, S3 on a moto server process, boto3 as
the client. A VirtualBox 2.0 export (memory in ``MegaBytes``, disks as OVF 2.0 ``StorageItem``, the
manifest last in ``SHA256 (name) = hex`` form) imports, its boot disk stored identical to the guest it was
made from, and so does its legacy OVF 0.9 export (the vmware.com envelope namespace, every section a generic
``Section``/``Content`` with an ``xsi:type``, a SHA1 manifest) with a data disk after its boot disk; a
gzip-wrapped OVA fails with ``Ova.Compressed`` as the task's status message and leaves
nothing in scratch or in the image target, also when the request does not say it is an OVA (no
``Format``: the inspection of the download; ``Format=RAW``: the preflight of the object's compressed
head); an OVA requiring an extension the importer does not understand fails with
``Ova.UnsupportedSection`` and leaves nothing. An ovftool export given no ``Format`` as an ImportImage's only
DiskContainer imports as an OVA, every disk a snapshot; the same file as a data disk or an ImportSnapshot
(where an OVA cannot be) fails as an archive and leaves nothing. An oVirt "Export as OVA" (GNU headers, a
``pad`` member, qcow2 disks named by UUID, no manifest, ``File`` sizes that are not the members', capacities
rounded up to GiB, the envelope namespace with older oVirt's trailing slash) imports both its disks, with
``Format=ova`` and given no ``Format``; so does a XenCenter (Citrix Hypervisor / XCP-ng) export (a descriptor
declared ``utf-16`` but written as UTF-8, dynamic VHD disks, ``File`` sizes that are the VDIs' physical
utilisation, an SHA-256 manifest with CRLF lines)."""

from __future__ import annotations

import gzip
import lzma
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import guestfactory
from tests import ovaproducers as producers
from tests import ovaproducers_xen as xen
from tests.api.e2e_support import (
    Appliance,
    admin_task,
    failed_leaving_nothing,
    finished_import,
    import_object,
    leftovers,
    wait_for,
)
from tests.servers import MotoServer

pytestmark = pytest.mark.slow


def _same_disk(raw: Path, disk: dict[str, Any]) -> None:
    """The disk an import-disk (or import-ova-disk) result stored holds ``raw``'s bytes (qemu-img compare)."""
    stored = (disk.get("stored") or disk["streamed"]["stored"])["path"]
    compared = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw), stored], capture_output=True, text=True
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr


def _import(appliance: Appliance, moto: MotoServer, bucket: str, ova: Path, fmt: str | None = "ova") -> str:
    return import_object(appliance, moto, bucket, ova, "vms/vm.ova", fmt)


def test_a_virtualbox_ova_imports_its_boot_disk(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    boot = guestfactory.linux_disk(tmp_path)
    (tmp_path / "disks").mkdir()
    vmdk = guestfactory.convert(boot, tmp_path / "disks" / "boot.vmdk", "vmdk", "subformat=streamOptimized")
    ova = producers.virtualbox(tmp_path / "vm.ova", [vmdk], version="2.0")
    task_id = _import(appliance, moto, bucket, ova)

    final = finished_import(appliance, task_id)
    assert final["Status"] == "completed", final
    result = admin_task(appliance, task_id)["task"]["result"]
    opened = result["disk"]["opened"]
    assert opened["ova"]["manifest_verified"] and opened["ova"]["memory_mib"] == 2048
    assert opened["platform"] == "Linux"  # CIM OSType 96: Debian 64-bit
    _same_disk(boot, result["disk"])


def test_a_virtualbox_ovf09_ova_imports_its_boot_disk_and_data_disk(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    boot = guestfactory.linux_disk(tmp_path)
    (tmp_path / "disks").mkdir()
    stream = ("vmdk", "subformat=streamOptimized")
    vmdk = guestfactory.convert(boot, tmp_path / "disks" / "boot.vmdk", *stream)
    data = producers.stream_vmdk(tmp_path / "disks" / "data.vmdk", 2 << 20, data=b"data disk")
    ova = producers.virtualbox(tmp_path / "vm.ova", [vmdk, data], version="0.9")
    task_id = _import(appliance, moto, bucket, ova)

    final = finished_import(appliance, task_id)
    assert final["Status"] == "completed", final
    result = admin_task(appliance, task_id)["task"]["result"]
    opened = result["disk"]["opened"]
    assert opened["ova"]["manifest_verified"], opened
    assert (opened["ova"]["cpus"], opened["ova"]["memory_mib"]) == (2, 2048), opened
    assert [d["name"] for d in opened["ova"]["disks"]] == ["vm-disk001.vmdk", "vm-disk002.vmdk"]
    assert opened["platform"] == "Linux"  # CIM OSType 96, in a generic OperatingSystemSection_Type
    _same_disk(boot, result["disk"])


def test_a_gzip_wrapped_ova_fails_with_what_to_do_and_leaves_nothing(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    boot = guestfactory.linux_disk(tmp_path)
    (tmp_path / "disks").mkdir()
    vmdk = guestfactory.convert(boot, tmp_path / "disks" / "boot.vmdk", "vmdk", "subformat=streamOptimized")
    ova = producers.virtualbox(tmp_path / "vm.ova", [vmdk], version="2.0")
    wrapped = tmp_path / "vm.ova.gz"
    wrapped.write_bytes(gzip.compress(ova.read_bytes(), mtime=0))
    task_id = _import(appliance, moto, bucket, wrapped)

    final = finished_import(appliance, task_id)
    assert final["Status"] == "deleted", final
    assert "Ova.Compressed" in final["StatusMessage"] and "gunzip" in final["StatusMessage"], final
    assert leftovers(appliance) == []


def test_an_ova_requiring_an_unknown_section_fails_with_its_code_and_leaves_nothing(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    (tmp_path / "disks").mkdir()
    vmdk = producers.stream_vmdk(tmp_path / "disks" / "boot.vmdk", 64 << 20, data=b"boot")
    ova = producers.ovftool(tmp_path / "vm.ova", [vmdk])
    required = producers.with_extension(
        ova, tmp_path / "required.ova", "VirtualSystem", producers.extension(None)
    )
    task_id = _import(appliance, moto, bucket, required)
    final = failed_leaving_nothing(appliance, task_id, "Ova.UnsupportedSection")
    assert "ext:DiskKeySection" in final["StatusMessage"], final


@pytest.mark.parametrize(
    ("fmt", "wrap", "tool"),
    [(None, lambda b: gzip.compress(b, mtime=0), "gunzip"), ("RAW", lzma.compress, "unxz")],
    ids=["no-format-gzip", "raw-xz"],
)
def test_a_compressed_ova_not_claimed_as_one_fails_as_compressed_and_leaves_nothing(
    fmt: str | None,
    wrap: Callable[[bytes], bytes],
    tool: str,
    appliance: Appliance,
    moto: MotoServer,
    bucket: str,
    tmp_path: Path,
) -> None:
    (tmp_path / "disks").mkdir()
    vmdk = producers.stream_vmdk(tmp_path / "disks" / "boot.vmdk", 64 << 20, data=b"boot")
    ova = producers.ova_compose(tmp_path / "vm.ova", [vmdk])
    wrapped = tmp_path / "vm.ova.packed"
    wrapped.write_bytes(wrap(ova.read_bytes()))
    task_id = _import(appliance, moto, bucket, wrapped, fmt)
    final = failed_leaving_nothing(appliance, task_id, "Ova.Compressed")
    assert tool in final["StatusMessage"], final


def _ovftool_two_disks(tmp_path: Path) -> tuple[Path, list[Path]]:
    """An ovftool-style OVA of a BIOS Linux guest and a 2 MiB data disk (streamOptimized VMDKs made by
    qemu-img), and the two disks as RAW."""
    (tmp_path / "disks").mkdir()
    boot = guestfactory.linux_disk(tmp_path)
    data = tmp_path / "data.raw"
    data.write_bytes(b"data disk".ljust(1 << 20, b"\xa5") + bytes(1 << 20))
    stream = ("vmdk", "subformat=streamOptimized")
    vmdks = [guestfactory.convert(r, tmp_path / "disks" / f"{r.stem}.vmdk", *stream) for r in (boot, data)]
    return producers.ovftool(tmp_path / "vm.ova", vmdks, firmware="bios"), [boot, data]


def test_an_ova_given_no_format_as_the_only_disk_container_imports_every_disk(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    ova, raws = _ovftool_two_disks(tmp_path)
    task_id = _import(appliance, moto, bucket, ova, None)

    final = finished_import(appliance, task_id)
    assert final["Status"] == "completed", final
    details = final["SnapshotDetails"]
    assert [(d["DeviceName"], d["Format"]) for d in details] == [("/dev/sda1", "VMDK"), ("/dev/sdb", "VMDK")]
    assert [d["DiskImageSize"] for d in details] == [float(r.stat().st_size) for r in raws]
    result = admin_task(appliance, task_id)["task"]["result"]
    assert [d["name"] for d in result["disk"]["opened"]["ova"]["disks"]] == ["vm-disk1.vmdk", "vm-disk2.vmdk"]
    assert result["disk"]["opened"]["ova"]["manifest_verified"]
    for raw, disk in zip(raws, [result["disk"], *result["ova_data_disks"]], strict=True):
        _same_disk(raw, disk)


@pytest.mark.parametrize("where", ["second-disk-container", "import-snapshot"])
def test_an_ova_given_no_format_where_an_ova_cannot_be_fails_as_an_archive_and_leaves_nothing(
    where: str, appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    ova, raws = _ovftool_two_disks(tmp_path)
    s3 = moto.client("s3")
    s3.upload_file(str(ova), bucket, "vms/vm.ova")
    unclaimed = {"UserBucket": {"S3Bucket": bucket, "S3Key": "vms/vm.ova"}}
    if where == "import-snapshot":
        task_id = appliance.ec2.import_snapshot(DiskContainer=unclaimed)["ImportTaskId"]
    else:
        s3.upload_file(str(raws[0]), bucket, "vms/boot.raw")
        boot = {"Format": "RAW", "UserBucket": {"S3Bucket": bucket, "S3Key": "vms/boot.raw"}}
        task_id = appliance.ec2.import_image(DiskContainers=[boot, unclaimed])["ImportTaskId"]

    def task() -> dict[str, Any]:
        return dict(admin_task(appliance, task_id)["task"])

    wait_for(lambda: task()["state"] in ("completed", "failed"), what="the import")
    final = task()
    assert (final["state"], final["error_code"]) == ("failed", "FormatMismatch.Archive"), final
    assert "first member is 'vm.ovf'" in final["error_message"], final
    assert "import it as an OVA" in final["error_message"], final
    assert leftovers(appliance) == []


def _imports_both_disks(
    appliance: Appliance,
    moto: MotoServer,
    bucket: str,
    ova: Path,
    fmt: str | None,
    boot: Path,
    data: Path,
    opened_as: dict[str, Any],
) -> None:
    """``ova``, of the disks ``boot`` and ``data``, imported through ImportImage (``fmt``) completes with both
    disks a snapshot, each holding its source's bytes; the OVA as opened is ``opened_as``: its disks'
    ``formats``, ``manifest_verified``, ``firmware`` and finding ``codes``."""
    task_id = _import(appliance, moto, bucket, ova, fmt)
    final = finished_import(appliance, task_id)
    assert final["Status"] == "completed", final
    assert len(final["SnapshotDetails"]) == 2, final
    result = admin_task(appliance, task_id)["task"]["result"]
    opened = result["disk"]["opened"]
    package = opened["ova"]
    assert {
        "formats": [d["format"] for d in package["disks"]],
        "manifest_verified": package["manifest_verified"],
        "firmware": package["firmware"],
        "codes": sorted(f["code"] for f in package["findings"]),
    } == opened_as, opened
    assert opened["platform"] == "Linux", opened
    for raw, disk in zip([boot, data], [result["disk"], *result["ova_data_disks"]], strict=True):
        _same_disk(raw, disk)


@pytest.mark.parametrize("fmt", ["ova", None], ids=["format-ova", "no-format"])
def test_an_ovirt_ova_imports_both_its_disks(
    fmt: str | None, appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    boot = guestfactory.linux_disk(tmp_path)
    data = tmp_path / "data.raw"
    data.write_bytes(b"data disk".ljust(1 << 20, b"\xa5") + bytes(1 << 20))
    # BiosType 0 (i440fx with SeaBIOS): the guest boots with BIOS; CIM OSType 80 (RHEL 64-bit): Linux
    ova = producers.ovirt(
        tmp_path / "vm.ova", [boot, data], namespace=producers.OVIRT_OVF_NS + "/", bios_type=0, nvram=True
    )
    codes = ["Ova.NoManifest", "Ova.SizeMismatch", "Ova.SizeMismatch"]
    opened_as = {
        "formats": ["qcow2", "qcow2"],
        "manifest_verified": False,
        "firmware": "bios",
        "codes": codes,
    }
    _imports_both_disks(appliance, moto, bucket, ova, fmt, boot, data, opened_as)


@pytest.mark.parametrize("fmt", ["ova", None], ids=["format-ova", "no-format"])
def test_a_xencenter_ova_imports_both_its_disks(
    fmt: str | None, appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    boot = guestfactory.linux_disk(tmp_path)
    data = tmp_path / "data.raw"
    data.write_bytes(b"data disk".ljust(1 << 20, b"\xa5") + bytes(1 << 20))
    # the data disk's VBD is the VM's first; xenovf:isBootable marks the boot disk; a BIOS VM; CIM OSType 93
    # (Ubuntu): Linux
    ova = xen.xencenter(tmp_path / "vm.ova", [data, boot], bootable=[False, True], firmware="bios")
    codes = ["Ova.SizeMismatch", "Ova.SizeMismatch"]
    opened_as = {"formats": ["vhd", "vhd"], "manifest_verified": True, "firmware": "bios", "codes": codes}
    _imports_both_disks(appliance, moto, bucket, ova, fmt, boot, data, opened_as)
