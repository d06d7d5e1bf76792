"""OVA in (appliance.image.ova.unpack_ova): a well-formed OVA is read as a stream, verified against its
manifest and inspected disk by disk, boot disk first; every hostile OVA of issue 13 §7 is refused with its
code and leaves nothing behind (the package directory is gone, the work directory as it was)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from appliance.config import Config
from appliance.errors import ImageRejected, InsufficientScratch
from appliance.image.ova import MAX_MEMBERS, is_ova, manifest, unpack_ova
from appliance.image.ovaconvert import convert_ova
from appliance.image.ovf import parse
from appliance.image.ovfenvelope import OvfDisk, envelope
from tests import imagefactory as factory

MiB = factory.MiB


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def raw_disk(seed: int, size: int = 2 * MiB) -> bytes:
    """A small raw disk: a text header and a marker per seed (detected as raw, safe)."""
    data = bytearray(size)
    data[0:64] = (b"disk %d " % seed).ljust(64, b".")
    data[size // 2 : size // 2 + 5] = b"%05d" % seed
    return bytes(data)


def member(name: str, body: bytes = b"", kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tuple:
    return (name, body, kind, linkname)


def build(members: list[tuple], *, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, body, kind, linkname in members:
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname, ti.mode = kind, linkname, 0o644
            ti.size = len(body) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
            tar.addfile(ti, io.BytesIO(body) if ti.size else None)
    return out.getvalue()


def package(
    disks: list[tuple[str, bytes]] | None = None,
    *,
    ovf: bytes | None = None,
    mf: bytes | None = None,
    with_mf: bool = True,
    extra: list[tuple] | None = None,
    before_ovf: list[tuple] | None = None,
) -> bytes:
    """An OVA: ``vm.ovf``, ``vm.mf`` (SHA256 of the others), then the disks; overrides for hostile ones."""
    disks = disks if disks is not None else [("vm-disk1.raw", raw_disk(1)), ("vm-disk2.raw", raw_disk(2))]
    if ovf is None:
        ovf = envelope("vm", [OvfDisk(n, len(b), len(b)) for n, b in disks], firmware="efi")
    if mf is None:
        mf = manifest(
            [("vm.ovf", hashlib.sha256(ovf).hexdigest())]
            + [(n, hashlib.sha256(b).hexdigest()) for n, b in disks]
        )
    members = [*(before_ovf or []), member("vm.ovf", ovf)]
    if with_mf:
        members.append(member("vm.mf", mf))
    members += [member(n, b) for n, b in disks] + (extra or [])
    return build(members)


def unpack(data: bytes, tmp_path: Path, cfg: Config) -> object:
    (tmp_path / "work").mkdir(exist_ok=True)
    return unpack_ova(io.BytesIO(data), tmp_path / "work" / "pkg", config=cfg)


def rejected(data: bytes, tmp_path: Path, cfg: Config) -> str:
    """The code the OVA is rejected with; asserts nothing was left in the work directory."""
    (tmp_path / "work").mkdir(exist_ok=True)
    before = sorted(os.listdir(tmp_path / "work"))
    with pytest.raises(ImageRejected) as exc:
        unpack(data, tmp_path, cfg)
    assert not (tmp_path / "work" / "pkg").exists()
    assert sorted(os.listdir(tmp_path / "work")) == before
    return exc.value.code


# ---------------------------------------------------------------------------------------- good OVAs


def test_a_two_disk_ova_is_verified_and_inspected_boot_disk_first(
    tmp_path: Path, cfg: Config, workdir: Path
) -> None:
    pkg = unpack(package(), tmp_path, cfg)
    try:
        assert [d.name for d in pkg.disks] == ["vm-disk1.raw", "vm-disk2.raw"]
        assert pkg.manifest_verified and pkg.ovf.firmware == "efi"
        for i, d in enumerate(pkg.disks, 1):
            assert d.path.read_bytes() == raw_disk(i)
            assert d.inspection is not None and d.inspection.format == "raw" and d.inspection.safe
            assert d.capacity == 2 * MiB and d.sha256 == hashlib.sha256(raw_disk(i)).hexdigest()
        assert sorted(os.listdir(pkg.directory)) == ["vm-disk1.raw", "vm-disk2.raw"]
    finally:
        pkg.remove()
    assert os.listdir(workdir) == []


def test_the_hardware_section_decides_the_boot_disk(tmp_path: Path, cfg: Config) -> None:
    disks = [("a.raw", raw_disk(1)), ("b.raw", raw_disk(2))]
    ovf = envelope("vm", [OvfDisk(n, len(b), len(b)) for n, b in disks])
    # the hardware section names disk 2 first: it is the boot disk
    ovf = ovf.replace(b"ovf:/disk/vmdisk1<", b"ovf:/disk/TMP<").replace(
        b"ovf:/disk/vmdisk2<", b"ovf:/disk/vmdisk1<"
    )
    ovf = ovf.replace(b"ovf:/disk/TMP<", b"ovf:/disk/vmdisk2<")
    pkg = unpack(package(disks, ovf=ovf), tmp_path, cfg)
    try:
        assert [d.name for d in pkg.disks] == ["b.raw", "a.raw"]
    finally:
        pkg.remove()


def test_an_ova_without_a_manifest_is_accepted_with_a_warning(tmp_path: Path, cfg: Config) -> None:
    pkg = unpack(package(with_mf=False), tmp_path, cfg)
    try:
        assert not pkg.manifest_verified
        assert [f.code for f in pkg.findings] == ["Ova.NoManifest"]
    finally:
        pkg.remove()


def test_large_members_in_pax_form_are_read(tmp_path: Path, cfg: Config) -> None:
    disks = [("d.raw", raw_disk(3))]
    ovf = envelope("vm", [OvfDisk("d.raw", len(disks[0][1]), len(disks[0][1]))])
    mf = manifest(
        [("vm.ovf", hashlib.sha256(ovf).hexdigest()), ("d.raw", hashlib.sha256(disks[0][1]).hexdigest())]
    )
    data = build(
        [member("vm.ovf", ovf), member("vm.mf", mf), member("d.raw", disks[0][1])], fmt=tarfile.PAX_FORMAT
    )
    pkg = unpack(data, tmp_path, cfg)
    pkg.remove()


def test_convert_writes_every_disk_and_removes_the_package(
    tmp_path: Path, cfg: Config, workdir: Path
) -> None:
    src = tmp_path / "vm.ova"
    src.write_bytes(package())
    assert is_ova(src)
    out = tmp_path / "out"
    out.mkdir()
    result = convert_ova(src, out / "vm.qcow2", "qcow2", config=cfg, workdir=workdir)
    assert [o.dst.name for o in result.outputs] == ["vm.qcow2", "vm-disk2.qcow2"]
    for i, o in enumerate(result.outputs, 1):
        (tmp_path / f"want{i}.raw").write_bytes(raw_disk(i))
        factory.qemu_img("compare", "-f", "raw", "-F", "qcow2", tmp_path / f"want{i}.raw", o.dst)
    assert os.listdir(workdir) == []


# ------------------------------------------------------------------------------------- hostile OVAs


@pytest.mark.parametrize("name", ["../evil.raw", "/etc/evil.raw", "sub/evil.raw", "a\\b.raw"])
def test_a_member_name_that_leaves_the_package_is_refused(name: str, tmp_path: Path, cfg: Config) -> None:
    assert rejected(package(extra=[member(name, b"x" * 10)]), tmp_path, cfg) == "Ova.UnsafeMember"


@pytest.mark.parametrize(
    "kind,linkname",
    [
        (tarfile.SYMTYPE, "/etc/shadow"),
        (tarfile.LNKTYPE, "vm.ovf"),
        (tarfile.CHRTYPE, ""),
        (tarfile.BLKTYPE, ""),
        (tarfile.FIFOTYPE, ""),
    ],
)
def test_links_and_devices_are_refused(kind: bytes, linkname: str, tmp_path: Path, cfg: Config) -> None:
    data = package(before_ovf=[member("disk.vmdk", b"", kind, linkname)])
    assert rejected(data, tmp_path, cfg) == "Ova.UnsafeMember"


def test_a_wrong_manifest_digest_is_refused(tmp_path: Path, cfg: Config) -> None:
    disks = [("vm-disk1.raw", raw_disk(1))]
    ovf = envelope("vm", [OvfDisk("vm-disk1.raw", 2 * MiB, 2 * MiB)])
    altered = bytearray(raw_disk(1))
    altered[100] ^= 1
    mf = manifest(
        [("vm.ovf", hashlib.sha256(ovf).hexdigest()), ("vm-disk1.raw", hashlib.sha256(altered).hexdigest())]
    )
    assert rejected(package(disks, ovf=ovf, mf=mf), tmp_path, cfg) == "Ova.DigestMismatch"


def test_a_manifest_that_skips_a_member_is_refused(tmp_path: Path, cfg: Config) -> None:
    disks = [("vm-disk1.raw", raw_disk(1))]
    ovf = envelope("vm", [OvfDisk("vm-disk1.raw", 2 * MiB, 2 * MiB)])
    mf = manifest([("vm.ovf", hashlib.sha256(ovf).hexdigest())])
    assert rejected(package(disks, ovf=ovf, mf=mf), tmp_path, cfg) == "Ova.BadManifest"


def test_a_huge_descriptor_is_refused(tmp_path: Path, cfg: Config) -> None:
    ovf = envelope("vm", [OvfDisk("vm-disk1.raw", 2 * MiB, 2 * MiB)])
    huge = ovf.replace(b"<ovf:References>", b"<!--" + b"x" * (2 * MiB) + b"--><ovf:References>")
    assert rejected(package([("vm-disk1.raw", raw_disk(1))], ovf=huge), tmp_path, cfg) == "Ova.TooLarge"


def test_entity_expansion_is_refused(tmp_path: Path, cfg: Config) -> None:
    lol = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        + b"".join(
            b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
            for i in range(1, 10)
        )
        + b']><Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1">&lol9;</Envelope>'
    )
    assert rejected(package([("vm-disk1.raw", raw_disk(1))], ovf=lol), tmp_path, cfg) == "Ova.BadDescriptor"


def test_an_external_entity_is_refused(tmp_path: Path, cfg: Config) -> None:
    xxe = (
        b'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b'<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1">&x;</Envelope>'
    )
    assert rejected(package([("vm-disk1.raw", raw_disk(1))], ovf=xxe), tmp_path, cfg) == "Ova.BadDescriptor"


def test_a_disk_listed_twice_is_refused(tmp_path: Path, cfg: Config) -> None:
    ovf = envelope(
        "vm", [OvfDisk("vm-disk1.raw", 2 * MiB, 2 * MiB), OvfDisk("vm-disk2.raw", 2 * MiB, 2 * MiB)]
    )
    ovf = ovf.replace(b'ovf:fileRef="file2"', b'ovf:fileRef="file1"')
    disks = [("vm-disk1.raw", raw_disk(1)), ("vm-disk2.raw", raw_disk(2))]
    assert rejected(package(disks, ovf=ovf), tmp_path, cfg) == "Ova.DuplicateDisk"


def test_a_file_listed_twice_is_refused(tmp_path: Path, cfg: Config) -> None:
    ovf = envelope(
        "vm", [OvfDisk("vm-disk1.raw", 2 * MiB, 2 * MiB), OvfDisk("vm-disk2.raw", 2 * MiB, 2 * MiB)]
    )
    ovf = ovf.replace(b'ovf:href="vm-disk2.raw"', b'ovf:href="vm-disk1.raw"')
    assert rejected(package([("vm-disk1.raw", raw_disk(1))], ovf=ovf), tmp_path, cfg) == "Ova.DuplicateDisk"


def test_two_members_of_one_name_are_refused(tmp_path: Path, cfg: Config) -> None:
    data = package(extra=[member("VM-DISK1.raw", raw_disk(9))])
    assert rejected(data, tmp_path, cfg) == "Ova.DuplicateMember"


def test_a_missing_disk_is_refused(tmp_path: Path, cfg: Config) -> None:
    ovf = envelope("vm", [OvfDisk("vm-disk1.raw", 2 * MiB, 2 * MiB), OvfDisk("gone.raw", 2 * MiB, 2 * MiB)])
    disks = [("vm-disk1.raw", raw_disk(1))]
    mf = manifest(
        [
            ("vm.ovf", hashlib.sha256(ovf).hexdigest()),
            ("vm-disk1.raw", hashlib.sha256(raw_disk(1)).hexdigest()),
        ]
    )
    assert rejected(package(disks, ovf=ovf, mf=mf), tmp_path, cfg) == "Ova.MissingDisk"


def test_a_qcow2_disk_with_a_backing_file_is_refused(tmp_path: Path, cfg: Config) -> None:
    body = factory.qcow2_backing(tmp_path).read_bytes()
    ovf = envelope("vm", [OvfDisk("vm-disk1.qcow2", len(body), MiB)])
    assert rejected(package([("vm-disk1.qcow2", body)], ovf=ovf), tmp_path, cfg) == "UnsafeImage.BackingFile"


def test_a_tar_that_claims_more_than_it_has_is_refused(tmp_path: Path, cfg: Config) -> None:
    data = package()
    # cut the archive inside the second disk: its header claims 2 MiB that never come
    assert rejected(data[: len(data) - 10240 - MiB], tmp_path, cfg) == "Ova.Corrupt"


def test_a_descriptor_size_that_disagrees_with_the_member_is_a_warning(tmp_path: Path, cfg: Config) -> None:
    # the tar header defines the member; the manifest and the inspection judge its bytes
    ovf = envelope("vm", [OvfDisk("vm-disk1.raw", 2 * MiB + 512, 2 * MiB)])
    pkg = unpack(package([("vm-disk1.raw", raw_disk(1))], ovf=ovf), tmp_path, cfg)
    try:
        [finding] = pkg.findings
        assert (finding.code, str(finding.severity)) == ("Ova.SizeMismatch", "warning")
        assert f"is {2 * MiB + 512} bytes; the member is {2 * MiB}" in finding.message
        assert "manifest" in finding.message and pkg.manifest_verified
        assert pkg.disks[0].path.read_bytes() == raw_disk(1)
    finally:
        pkg.remove()


def test_a_disk_larger_than_its_capacity_is_refused(tmp_path: Path, cfg: Config) -> None:
    ovf = envelope("vm", [OvfDisk("vm-disk1.raw", 2 * MiB, MiB)])
    assert (
        rejected(package([("vm-disk1.raw", raw_disk(1))], ovf=ovf), tmp_path, cfg) == "Ova.CapacityMismatch"
    )


def test_too_many_members_are_refused(tmp_path: Path, cfg: Config) -> None:
    extra = [member(f"junk{i}.txt", b"x") for i in range(MAX_MEMBERS)]
    assert rejected(package(extra=extra), tmp_path, cfg) == "Ova.TooLarge"


def test_a_url_href_is_refused(tmp_path: Path, cfg: Config) -> None:
    ovf = envelope("vm", [OvfDisk("vm-disk1.raw", 2 * MiB, 2 * MiB)])
    ovf = ovf.replace(b'ovf:href="vm-disk1.raw"', b'ovf:href="http:169.254.169.254"')
    assert (
        rejected(package([("vm-disk1.raw", raw_disk(1))], ovf=ovf, with_mf=False), tmp_path, cfg)
        == "Ova.UnsafeMember"
    )


def test_not_a_tar_is_refused(tmp_path: Path, cfg: Config) -> None:
    assert rejected(b"MZ\x90\x00" + bytes(2000), tmp_path, cfg) in (
        "Ova.NotAnOva",
        "Ova.Corrupt",
        "Ova.BadDescriptor",
    )


def test_the_envelope_parses_back(tmp_path: Path) -> None:
    ovf = envelope(
        "vm",
        [OvfDisk("a.vmdk", 10, 3 * MiB), OvfDisk("b.vmdk", 20, 5 * MiB)],
        cpus=4,
        memory_mib=4096,
        firmware="efi",
    )
    info = parse(ovf)
    assert [d["capacity"] for d in info.disks] == [3 * MiB, 5 * MiB]
    assert info.firmware == "efi" and info.cpus == 4 and info.memory_mib == 4096
    assert {f["href"] for f in info.files.values()} == {"a.vmdk", "b.vmdk"}


def test_a_sha512_manifest_after_the_disks_is_refused_with_what_to_do(tmp_path: Path, cfg: Config) -> None:
    disk = raw_disk(1)
    ovf = envelope("vm", [OvfDisk("vm-disk1.raw", len(disk), len(disk))])
    lines = [
        f"SHA512({n})= {hashlib.sha512(b).hexdigest()}\n"
        for n, b in (("vm.ovf", ovf), ("vm-disk1.raw", disk))
    ]
    data = build(
        [member("vm.ovf", ovf), member("vm-disk1.raw", disk), member("vm.mf", "".join(lines).encode())]
    )
    assert rejected(data, tmp_path, cfg) == "Ova.BadManifest"


def test_a_sha1_manifest_at_the_end_is_verified(tmp_path: Path, cfg: Config) -> None:
    disk = raw_disk(1)
    ovf = envelope("vm", [OvfDisk("vm-disk1.raw", len(disk), len(disk))])
    lines = [
        f"SHA1({n})= {hashlib.sha1(b).hexdigest()}\n" for n, b in (("vm.ovf", ovf), ("vm-disk1.raw", disk))
    ]
    data = build(
        [member("vm.ovf", ovf), member("vm-disk1.raw", disk), member("vm.mf", "".join(lines).encode())]
    )
    pkg = unpack(data, tmp_path, cfg)
    try:
        assert pkg.manifest_verified
    finally:
        pkg.remove()


def test_twenty_one_disks_sit_on_scsi_units_vmware_accepts_and_keep_their_order() -> None:
    """15 disks per LSI Logic controller, never on unit 7 (the controller's own target): a second
    controller from the 16th disk on, every (controller, unit) once, the boot disk first."""
    disks = [OvfDisk(f"d{i}.vmdk", 10, (i + 1) * MiB) for i in range(21)]
    root = ET.fromstring(envelope("vm", disks))
    items = root.iter("{http://schemas.dmtf.org/ovf/envelope/1}Item")
    rasd = "{http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData}"
    fields = [{child.tag.removeprefix(rasd): child.text for child in item} for item in items]
    controllers = {f["InstanceID"] for f in fields if f["ResourceType"] == "6"}
    slots = [(f["Parent"], int(f["AddressOnParent"])) for f in fields if f["ResourceType"] == "17"]
    assert len(controllers) == 2 and {parent for parent, _ in slots} == controllers
    assert all(unit != 7 and 0 <= unit <= 15 for _, unit in slots)
    assert len(set(slots)) == 21
    ids = [f["InstanceID"] for f in fields]
    assert len(set(ids)) == len(ids)
    assert [d["capacity"] for d in parse(envelope("vm", disks)).disks] == [(i + 1) * MiB for i in range(21)]


def test_every_disk_member_is_reserved_before_its_bytes_are_written(tmp_path: Path, cfg: Config) -> None:
    """``reserve(n)`` is asked, before a disk member is written, for all the package will then hold; what
    it raises (a full scratch quota) stops the unpack and leaves nothing."""
    disks = [("vm-disk1.raw", raw_disk(1)), ("vm-disk2.raw", raw_disk(2, 3 * MiB))]
    work = tmp_path / "work"
    work.mkdir()
    asked: list[tuple[int, int]] = []  # (what was asked, what the package held then)

    def reserve(nbytes: int) -> None:
        held = sum(p.stat().st_size for p in (work / "pkg").rglob("*") if p.is_file())
        asked.append((nbytes, held))

    pkg = unpack_ova(io.BytesIO(package(disks)), work / "pkg", config=cfg, reserve=reserve)
    pkg.remove()
    assert asked == [(2 * MiB, 0), (5 * MiB, 2 * MiB)]

    def full(nbytes: int) -> None:
        if nbytes > 2 * MiB:
            raise InsufficientScratch("the quota is full")

    with pytest.raises(InsufficientScratch):
        unpack_ova(io.BytesIO(package(disks)), work / "pkg", config=cfg, reserve=full)
    assert os.listdir(work) == []
