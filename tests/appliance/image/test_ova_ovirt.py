"""OVA in, as oVirt/RHV's "Export as OVA" writes it (:func:`tests.ovaproducers.ovirt`): GNU headers written
one by one, a ``pad`` member, ``tpm.dat``/``nvram.dat``, qcow2 disks named by their image UUID and padded
with zeros, no manifest, ``File`` sizes that are not the members', capacities rounded up to whole GiB, the
envelope namespace with or without its trailing slash. Each disk is compared with its source by the real
``qemu-img compare``."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from appliance.config import Config
from appliance.errors import ImageRejected
from appliance.image.formats import archive_of
from appliance.image.ova import OvaPackage, is_ova, unpack_ova
from appliance.image.ovacontainer import begins_ova
from appliance.image.ovaconvert import convert_ova
from appliance.image.ovfguest import platform_of
from tests import ovaproducers as producers
from tests.appliance.image.test_ova import rejected

MiB, GiB = producers.MiB, producers.GiB
#: both spellings oVirt has written the envelope namespace in
NAMESPACES = [producers.OVIRT_OVF_NS, producers.OVIRT_OVF_NS + "/"]


def unpack(ova: Path, tmp_path: Path, cfg: Config) -> OvaPackage:
    (tmp_path / "work").mkdir(exist_ok=True)
    return unpack_ova(io.BytesIO(ova.read_bytes()), tmp_path / "work" / "pkg", config=cfg)


def same(raw: Path, disk: Path, fmt: str) -> bool:
    compared = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", fmt, raw, disk], capture_output=True)
    return compared.returncode == 0


@pytest.mark.parametrize("namespace", NAMESPACES, ids=["envelope-1", "envelope-1-slash"])
def test_an_ovirt_export_of_two_disks_imports_them_in_order_with_a_size_warning(
    namespace: str, tmp_path: Path, cfg: Config, sources: list[Path]
) -> None:
    ova = producers.ovirt(tmp_path / "vm.ova", sources, namespace=namespace, tpm=True, nvram=True)
    with tarfile.open(ova) as tar:
        names = tar.getnames()
    assert names[0] == "vm.ovf" and names[1:4] == ["tpm.dat", "nvram.dat", "pad"]
    head = ova.read_bytes()[:8192]
    # Python's GNU-format headers (the GNU magic, not POSIX's) announce an OVA as ustar ones do
    assert head[257:265] == b"ustar  \0" and archive_of(head) == "tar" and begins_ova(head) and is_ova(ova)
    pkg = unpack(ova, tmp_path, cfg)
    try:
        assert [d.name for d in pkg.disks] == names[4:]
        assert [d.capacity for d in pkg.disks] == [GiB, GiB]  # 2 and 3 MiB, rounded up to a GiB
        assert pkg.ovf.os_type == "80" and platform_of(pkg.ovf.os_type) == "Linux"
        assert (pkg.ovf.cpus, pkg.ovf.memory_mib, pkg.ovf.firmware) == (2, 2048, "efi")
        codes = sorted((f.code, f.severity) for f in pkg.findings)
        assert codes == [
            ("Ova.NoManifest", "warning"),
            ("Ova.SizeMismatch", "warning"),
            ("Ova.SizeMismatch", "warning"),
        ]
        # the pad, TPM and NVRAM members are not kept: only the disks are in the package's directory
        assert sorted(p.name for p in pkg.directory.iterdir()) == sorted(names[4:])
        for raw, disk in zip(sources, pkg.disks, strict=True):
            assert disk.inspection is not None and disk.inspection.format == "qcow2"
            assert same(raw, disk.path, "qcow2")
    finally:
        pkg.remove()


def test_an_ovirt_export_converts_every_disk_from_qcow2(
    tmp_path: Path, cfg: Config, sources: list[Path]
) -> None:
    ova = producers.ovirt(tmp_path / "vm.ova", sources)
    (tmp_path / "scratch").mkdir()
    result = convert_ova(ova, tmp_path / "out.raw", "raw", config=cfg, workdir=tmp_path / "scratch")
    assert [d["format"] for d in result.package["disks"]] == ["qcow2", "qcow2"]
    assert same(sources[0], tmp_path / "out.raw", "raw") and same(
        sources[1], tmp_path / "out-disk2.raw", "raw"
    )


@pytest.mark.parametrize(
    ("bios_type", "firmware"), [(0, "bios"), (1, "bios"), (2, "efi"), (3, "efi"), (-1, None), (None, None)]
)
def test_an_ovirt_bios_type_says_the_firmware(
    bios_type: int | None, firmware: str | None, tmp_path: Path, cfg: Config, sources: list[Path]
) -> None:
    pkg = unpack(producers.ovirt(tmp_path / "vm.ova", sources, bios_type=bios_type), tmp_path, cfg)
    try:
        assert pkg.ovf.firmware == firmware
    finally:
        pkg.remove()


def test_an_ovirt_disk_more_than_a_gib_below_its_capacity_is_a_capacity_mismatch(
    tmp_path: Path, cfg: Config, sources: list[Path]
) -> None:
    # the boot disk holds 2 MiB; a capacity of 2 GiB is not its size rounded up
    ova = producers.ovirt(tmp_path / "vm.ova", sources, capacities=[2, 1])
    assert rejected(ova.read_bytes(), tmp_path, cfg) == "Ova.CapacityMismatch"


def test_an_ovirt_export_that_ends_inside_a_disk_is_corrupt(
    tmp_path: Path, cfg: Config, sources: list[Path]
) -> None:
    ova = producers.ovirt(tmp_path / "vm.ova", sources)
    with tarfile.open(ova) as tar:
        last = tar.getmembers()[-1]
    data = ova.read_bytes()[: last.offset_data + last.size // 2]
    assert rejected(data, tmp_path, cfg) == "Ova.Corrupt"
    with pytest.raises(ImageRejected) as exc:
        unpack_ova(io.BytesIO(data), tmp_path / "pkg", config=cfg)
    # the tar's own end, not the descriptor's File size (which oVirt never makes the member's)
    assert "ends inside" in exc.value.message and last.name in exc.value.message, exc.value.message


@pytest.mark.parametrize(("required", "code"), [("false", None), (None, "Ova.UnsupportedSection")])
def test_ovf_required_is_read_in_the_namespace_spelled_with_a_slash(
    required: str | None, code: str | None, tmp_path: Path, cfg: Config, sources: list[Path]
) -> None:
    ova = producers.ovirt(
        tmp_path / "vm.ova", sources, namespace=NAMESPACES[1], extension=producers.extension(required)
    )
    if code is not None:
        assert rejected(ova.read_bytes(), tmp_path, cfg) == code
    else:
        unpack(ova, tmp_path, cfg).remove()


def test_the_disk_ovirt_marks_as_boot_disk_comes_first(
    tmp_path: Path, cfg: Config, sources: list[Path]
) -> None:
    # the data disk is attached first: the hardware section lists it first, ovf:boot marks the other
    ova = producers.ovirt(tmp_path / "vm.ova", sources[::-1], boot_disk=2)
    with tarfile.open(ova) as tar:
        data, boot = [ti.name for ti in tar if "-" in ti.name and not ti.name.endswith(".ovf")]
    pkg = unpack(ova, tmp_path, cfg)
    try:
        assert [d.name for d in pkg.disks] == [boot, data]
        assert same(sources[0], pkg.disks[0].path, "qcow2")
    finally:
        pkg.remove()
