"""OVA in, as Citrix Hypervisor / XenServer / XCP-ng's XenCenter exports it
(:func:`tests.ovaproducers_xen.xencenter`): a descriptor declared ``utf-16`` but written as UTF-8, named
sections with ``xenovf:`` extensions, disk items of ``ResourceType`` 19, ``File`` sizes that are the VDIs'
physical utilisation, the boot disk marked ``xenovf:isBootable``, the firmware in ``HVM_boot_params``,
dynamic VHD disks named by VDI UUID, an SHA-256 manifest with CRLF lines; signed (a certificate in Windows'
serialized form, the signature over the manifest's digest), gzipped whole, or encrypted. Each disk is
compared with its source by the real ``qemu-img compare``."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from appliance.config import Config
from appliance.errors import ImageRejected
from appliance.image.ovaconvert import convert_ova
from appliance.image.ovf import parse
from appliance.image.ovfguest import boot_mode_of, platform_of
from tests import ovaproducers_xen as xen
from tests.appliance.image.test_ova import rejected
from tests.appliance.image.test_ova_ovirt import same, unpack

MiB = 1 << 20


def test_a_xencenter_export_of_two_disks_imports_them_in_order_verified(
    tmp_path: Path, cfg: Config, sources: list[Path]
) -> None:
    ova = xen.xencenter(tmp_path / "vm.ova", sources)
    with tarfile.open(ova) as tar:
        names = tar.getnames()
    assert names[:2] == ["vm.ovf", "vm.mf"] and all(n.endswith(".vhd") for n in names[2:])
    assert ova.read_bytes()[512:560].startswith(b'<?xml version="1.0" encoding="utf-16"?>')
    pkg = unpack(ova, tmp_path, cfg)
    try:
        assert [d.name for d in pkg.disks] == names[2:]
        assert [d.capacity for d in pkg.disks] == [2 * MiB, 3 * MiB]
        assert pkg.ovf.os_type == "93" and platform_of(pkg.ovf.os_type) == "Linux"
        assert (pkg.ovf.cpus, pkg.ovf.memory_mib) == (2, 2048)
        assert pkg.ovf.firmware == "efi" and boot_mode_of(pkg.ovf.firmware) == "uefi"
        assert pkg.manifest_verified
        # the File sizes are the VDIs' physical utilisation, not the VHD members'
        codes = sorted((f.code, f.severity) for f in pkg.findings)
        assert codes == [("Ova.SizeMismatch", "warning"), ("Ova.SizeMismatch", "warning")]
        assert sorted(p.name for p in pkg.directory.iterdir()) == sorted(names[2:])
        for raw, disk in zip(sources, pkg.disks, strict=True):
            assert disk.inspection is not None and disk.inspection.format == "vhd"
            assert same(raw, disk.path, "vpc")
    finally:
        pkg.remove()


def test_a_xencenter_descriptor_declared_utf16_in_utf8_bytes_parses(sources: list[Path]) -> None:
    facts = [("a.vhd", MiB, 2 * MiB, True)]
    body = xen.xencenter_ovf("vm", facts, os_name="Ubuntu 22.04 \u2013 Jammy")  # an en dash: not ASCII
    assert body.startswith(b'<?xml version="1.0" encoding="utf-16"?>') and b"\xe2\x80\x93" in body
    assert [d["capacity"] for d in parse(body).disks] == [2 * MiB]
    # bytes that are not UTF-8 stay malformed XML
    with pytest.raises(ImageRejected) as exc:
        parse(body.replace(b"\xe2\x80\x93", b"\x96"))
    assert exc.value.code == "Ova.BadDescriptor"


def test_a_xencenter_export_converts_every_disk_from_vhd(
    tmp_path: Path, cfg: Config, sources: list[Path]
) -> None:
    ova = xen.xencenter(tmp_path / "vm.ova", sources)
    (tmp_path / "scratch").mkdir()
    result = convert_ova(ova, tmp_path / "out.raw", "raw", config=cfg, workdir=tmp_path / "scratch")
    assert [d["format"] for d in result.package["disks"]] == ["vhd", "vhd"]
    assert same(sources[0], tmp_path / "out.raw", "raw") and same(
        sources[1], tmp_path / "out-disk2.raw", "raw"
    )


def test_the_disk_xencenter_marks_bootable_comes_first(
    tmp_path: Path, cfg: Config, sources: list[Path]
) -> None:
    # the data disk's VBD is the VM's first: the descriptor lists it first, xenovf:isBootable the other
    ova = xen.xencenter(tmp_path / "vm.ova", sources[::-1], bootable=[False, True])
    pkg = unpack(ova, tmp_path, cfg)
    try:
        assert [d.capacity for d in pkg.disks] == [2 * MiB, 3 * MiB]
        assert same(sources[0], pkg.disks[0].path, "vpc") and same(sources[1], pkg.disks[1].path, "vpc")
    finally:
        pkg.remove()


@pytest.mark.parametrize(("firmware", "expected"), [("uefi", "efi"), ("bios", "bios"), (None, None)])
def test_xencenter_hvm_boot_params_say_the_firmware(
    firmware: str | None, expected: str | None, tmp_path: Path, cfg: Config, sources: list[Path]
) -> None:
    pkg = unpack(xen.xencenter(tmp_path / "vm.ova", sources, firmware=firmware), tmp_path, cfg)
    try:
        assert pkg.ovf.firmware == expected
    finally:
        pkg.remove()


@pytest.mark.parametrize("algorithm", ["sha256", "sha1"])
def test_a_signed_xencenter_export_verifies(
    algorithm: str, tmp_path: Path, cfg: Config, sources: list[Path]
) -> None:
    ova = xen.xencenter(tmp_path / "vm.ova", sources, sign=xen.xen_signing_key(algorithm))
    with tarfile.open(ova) as tar:
        assert tar.getnames()[:3] == ["vm.ovf", "vm.mf", "vm.cert"]
    pkg = unpack(ova, tmp_path, cfg)
    try:
        [signed] = [f for f in pkg.findings if f.code == "Ova.SignatureVerified"]
        assert "XenCenter Test Signer" in signed.message and "(self-signed)" in signed.message
        assert signed.message.startswith(f"the {algorithm.upper()} signature of 'vm.mf'")
        assert pkg.manifest_verified and len(pkg.disks) == 2
    finally:
        pkg.remove()


def test_a_xencenter_export_whose_manifest_changed_after_signing_is_refused(
    tmp_path: Path, cfg: Config, sources: list[Path]
) -> None:
    ova = xen.xencenter(tmp_path / "vm.ova", sources, sign=xen.xen_signing_key(), tamper=True)
    assert rejected(ova.read_bytes(), tmp_path, cfg) == "Ova.BadSignature"


def test_a_compressed_xencenter_export_is_refused_as_compressed(
    tmp_path: Path, cfg: Config, sources: list[Path]
) -> None:
    # XenCenter gzips the whole OVA (vm.ova.gz); a guard: refused from its first bytes, as any gzip OVA
    ova = xen.xencenter(tmp_path / "vm.ova", sources, compress=True)
    assert ova.name == "vm.ova.gz"
    assert rejected(ova.read_bytes(), tmp_path, cfg) == "Ova.Compressed"


def test_an_encrypted_xencenter_export_is_unsupported_and_leaves_nothing(
    tmp_path: Path, cfg: Config, sources: list[Path]
) -> None:
    ova = xen.xencenter(tmp_path / "vm.ova", sources, encrypt=True)
    assert rejected(ova.read_bytes(), tmp_path, cfg) == "Ova.Unsupported"
    with pytest.raises(ImageRejected) as exc:
        unpack(ova, tmp_path, cfg)
    assert "SecuritySection" in exc.value.message and "encrypted" in exc.value.message
