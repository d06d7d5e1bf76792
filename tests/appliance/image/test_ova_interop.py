"""OVA in, against what real producers write (:mod:`tests.ovaproducers`: ova-compose, ESXi/ovftool,
VirtualBox) and against the rows of the hostile matrix (``ova-ovf.md`` §8) the first OVA tests leave out:
each producer's layout imports with its manifest verified; each refusal has its code and leaves nothing
behind (the package directory is gone, the work directory as it was)."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import subprocess
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import Config
from appliance.errors import ImageRejected
from appliance.image.inspect import inspect_image
from appliance.image.ova import OvaPackage, manifest, unpack_ova
from appliance.image.ovacontainer import FIRST_HEADER_BYTES, first_member, refuse_compressed_ova
from appliance.image.ovf import parse, parse_confined
from appliance.image.ovfenvelope import OvfDisk, envelope
from tests import ovaproducers as producers
from tests.appliance.image.test_ova import build, member, package, raw_disk, rejected

MiB, GiB = producers.MiB, producers.GiB


def unpack(data: bytes | Path, tmp_path: Path, cfg: Config) -> OvaPackage:
    (tmp_path / "work").mkdir(exist_ok=True)
    body = data.read_bytes() if isinstance(data, Path) else data
    return unpack_ova(io.BytesIO(body), tmp_path / "work" / "pkg", config=cfg)


def members_of(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(ti.name, tar.extractfile(ti).read()) for ti in tar if ti.isfile()]  # type: ignore[union-attr]


@pytest.fixture
def disks(tmp_path: Path) -> list[Path]:
    """Two streamOptimized VMDKs (1 GiB, 2 GiB virtual) in their own directory."""
    d = tmp_path / "disks"
    d.mkdir()
    return [
        producers.stream_vmdk(d / "root.vmdk", GiB, data=b"root disk"),
        producers.stream_vmdk(d / "data.vmdk", 2 * GiB, data=b"data disk"),
    ]


# ------------------------------------------------------------------------------- what producers write


@pytest.mark.parametrize("checksum", ["sha256", "sha512", "sha1"])
def test_an_ova_compose_package_imports_with_its_manifest_verified(
    checksum: str, tmp_path: Path, cfg: Config, disks: list[Path]
) -> None:
    ova = producers.ova_compose(tmp_path / "vm.ova", disks, checksum=checksum)
    pkg = unpack(ova, tmp_path, cfg)
    try:
        assert [d.name for d in pkg.disks] == ["root.vmdk", "data.vmdk"]
        assert [d.capacity for d in pkg.disks] == [GiB, 2 * GiB]
        assert pkg.manifest_verified and pkg.findings == []
        assert pkg.ovf.firmware == "efi" and pkg.ovf.memory_mib == 2048
        assert all(d.inspection is not None and d.inspection.format == "vmdk" for d in pkg.disks)
    finally:
        pkg.remove()


def test_an_ova_compose_capacity_in_gigabytes_is_the_size_rounded_down(tmp_path: Path, cfg: Config) -> None:
    # ova-compose writes int(capacity / 2^30): a 1.5 GiB disk is declared as 1 GiB
    (tmp_path / "d").mkdir()
    disk = producers.stream_vmdk(tmp_path / "d" / "odd.vmdk", GiB + GiB // 2, data=b"odd")
    pkg = unpack(producers.ova_compose(tmp_path / "vm.ova", [disk], units="byte * 2^30"), tmp_path, cfg)
    try:
        assert pkg.disks[0].capacity == GiB
        assert pkg.disks[0].inspection is not None and pkg.disks[0].inspection.virtual_size == GiB + GiB // 2
    finally:
        pkg.remove()


def test_a_signed_ova_compose_package_has_its_signature_verified(
    tmp_path: Path, cfg: Config, disks: list[Path]
) -> None:
    key = producers.signing_key(tmp_path)
    pkg = unpack(producers.ova_compose(tmp_path / "vm.ova", disks, sign_key=key), tmp_path, cfg)
    try:
        [finding] = pkg.findings
        assert finding.code == "Ova.SignatureVerified"
        assert "CN=Test Certificate" in finding.message and "self-signed" in finding.message
    finally:
        pkg.remove()


def test_a_manifest_changed_after_it_was_signed_is_refused(
    tmp_path: Path, cfg: Config, disks: list[Path]
) -> None:
    key = producers.signing_key(tmp_path)
    signed = members_of(producers.ova_compose(tmp_path / "vm.ova", disks, sign_key=key))
    # a blank line changes no digest, but the signed bytes
    altered = [(n, b + b"\n" if n.endswith(".mf") else b) for n, b in signed]
    assert rejected(build([member(n, b) for n, b in altered]), tmp_path, cfg) == "Ova.BadSignature"


def test_a_certificate_without_a_manifest_is_refused(tmp_path: Path, cfg: Config, disks: list[Path]) -> None:
    key = producers.signing_key(tmp_path)
    signed = members_of(producers.ova_compose(tmp_path / "vm.ova", disks, sign_key=key))
    data = build([member(n, b) for n, b in signed if not n.endswith(".mf")])
    assert rejected(data, tmp_path, cfg) == "Ova.BadCertificate"


@pytest.mark.parametrize(("checksum", "spaced"), [("sha256", False), ("sha1", False), ("sha1", True)])
def test_an_esxi_ovftool_export_imports(
    checksum: str, spaced: bool, tmp_path: Path, cfg: Config, disks: list[Path]
) -> None:
    ova = producers.ovftool(tmp_path / "vm.ova", disks, checksum=checksum, spaced=spaced)
    pkg = unpack(ova, tmp_path, cfg)
    try:
        assert [d.name for d in pkg.disks] == ["vm-disk1.vmdk", "vm-disk2.vmdk"]
        assert [d.capacity for d in pkg.disks] == [GiB, 2 * GiB]
        assert pkg.manifest_verified and "vm-file1.nvram" in pkg.digests
        # memory AllocationUnits "byte * 2^30", VirtualQuantity 4: 4 GiB, not 4 MiB
        assert pkg.ovf.memory_mib == 4096 and pkg.ovf.cpus == 2
        assert sorted(os.listdir(pkg.directory)) == ["vm-disk1.vmdk", "vm-disk2.vmdk"]
    finally:
        pkg.remove()


def test_the_disk_an_esxi_boot_order_section_names_is_the_boot_disk(
    tmp_path: Path, cfg: Config, disks: list[Path]
) -> None:
    members = members_of(producers.ovftool(tmp_path / "vm.ova", disks))
    # instance 7 is the item of the second disk: ESXi boots from it
    members = [(n, b.replace(b'vmw:instanceId="6"', b'vmw:instanceId="7"')) for n, b in members]
    data = build([member(n, b) for n, b in members if not n.endswith(".mf")])
    pkg = unpack(data, tmp_path, cfg)
    try:
        assert [d.name for d in pkg.disks] == ["vm-disk2.vmdk", "vm-disk1.vmdk"]
    finally:
        pkg.remove()


@pytest.mark.parametrize(("version", "crlf"), [("1.0", False), ("2.0", False), ("2.0", True)])
def test_a_virtualbox_export_imports(
    version: str, crlf: bool, tmp_path: Path, cfg: Config, disks: list[Path]
) -> None:
    ova = producers.virtualbox(tmp_path / "vm.ova", disks, version=version, crlf=crlf)
    pkg = unpack(ova, tmp_path, cfg)
    try:
        assert [d.name for d in pkg.disks] == ["vm-disk001.vmdk", "vm-disk002.vmdk"]
        assert pkg.manifest_verified and pkg.ovf.memory_mib == 2048  # "MegaBytes"
        assert pkg.ovf.os_type == "96"
    finally:
        pkg.remove()


def test_a_virtualbox_ovf09_export_imports_its_disks_in_hardware_order(
    tmp_path: Path, cfg: Config, disks: list[Path]
) -> None:
    # VirtualBox's legacy "OVF 0.9": the vmware.com envelope namespace, every section a generic
    # <Section xsi:type=...> (the VM a <Content>), InstanceId, the #sparse format URI, a SHA1 manifest last
    ova = producers.virtualbox(tmp_path / "vm.ova", disks, version="0.9")
    listed = members_of(ova)
    assert listed[-1][0] == "vm.mf" and listed[-1][1].startswith(b"SHA1 (vm.ovf) = ")
    pkg = unpack(ova, tmp_path, cfg)
    try:
        assert [d.name for d in pkg.disks] == ["vm-disk001.vmdk", "vm-disk002.vmdk"]
        assert [d.capacity for d in pkg.disks] == [GiB, 2 * GiB]
        assert pkg.manifest_verified
        assert (pkg.ovf.os_type, pkg.ovf.cpus, pkg.ovf.memory_mib) == ("96", 2, 2048)  # "MegaBytes"
        assert all(d.inspection is not None and d.inspection.format == "vmdk" for d in pkg.disks)
    finally:
        pkg.remove()
    # the generic hardware section decides the order: its first disk item names the second disk
    ovf = listed[0][1].replace(b"/disk/vmdisk1<", b"/disk/TMP<").replace(b"/disk/vmdisk2<", b"/disk/vmdisk1<")
    ovf = ovf.replace(b"/disk/TMP<", b"/disk/vmdisk2<")
    pkg = unpack(build([member("vm.ovf", ovf)] + [member(n, b) for n, b in listed[1:-1]]), tmp_path, cfg)
    try:
        assert [d.name for d in pkg.disks] == ["vm-disk002.vmdk", "vm-disk001.vmdk"]
    finally:
        pkg.remove()


def _generic(ovf: bytes, *sections: str) -> bytes:
    """The OVF 1.x descriptor ``ovf`` with ``sections`` written in the generic form the schema allows
    (``<ovf:Section xsi:type="ovf:DiskSection_Type">``; a virtual system as ``<ovf:Content>``)."""
    ovf = ovf.replace(
        b"<ovf:Envelope ", b'<ovf:Envelope xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
    )
    for name in sections:
        element = b"Content" if name == "VirtualSystem" else b"Section"
        typed = b"<ovf:" + element + b' xsi:type="ovf:' + name.encode() + b'_Type"'
        ovf = ovf.replace(b"<ovf:" + name.encode() + b">", typed + b">").replace(
            b"<ovf:" + name.encode() + b" ", typed + b" "
        )
        ovf = ovf.replace(b"</ovf:" + name.encode() + b">", b"</ovf:" + element + b">")
    return ovf


def test_an_ovf1_envelope_of_generic_sections_reads_as_the_named_form(tmp_path: Path, cfg: Config) -> None:
    named = envelope(
        "vm",
        [OvfDisk("a.vmdk", 10, GiB), OvfDisk("b.vmdk", 20, 2 * GiB)],
        cpus=4,
        memory_mib=3072,
        firmware="efi",
    )
    sections = (
        "DiskSection",
        "NetworkSection",
        "VirtualSystem",
        "OperatingSystemSection",
        "VirtualHardwareSection",
    )
    generic = _generic(named, *sections)
    assert b"<ovf:DiskSection" not in generic and b"<ovf:VirtualSystem" not in generic
    facts = parse(named).to_dict()
    assert facts["cpus"] == 4 and facts["firmware"] == "efi" and len(facts["disks"]) == 2
    assert parse(generic).to_dict() == facts
    # and through the confined child, as an import reads it
    assert parse_confined(generic, cfg.limits).to_dict() == facts


@pytest.mark.parametrize("where", ["Content", "Envelope 0.9"])
def test_a_generic_section_of_an_unknown_type_is_refused_when_required_and_skipped_when_not(
    where: str, tmp_path: Path, cfg: Config, disks: list[Path]
) -> None:
    ova = producers.virtualbox(tmp_path / "vm.ova", disks, version="0.9")
    section = (
        '<Section{} xsi:type="ovf:DiskKeySection_Type"><Info>Keys of the encrypted disks</Info></Section>\n'
    )
    for required in ("", ' ovf:required="true"'):
        edited = producers.with_extension(
            ova, tmp_path / "edited.ova", where, section.format(required).encode()
        )
        with pytest.raises(ImageRejected) as exc:
            parse(next(b for n, b in members_of(edited) if n.endswith(".ovf")))
        assert exc.value.code == "Ova.UnsupportedSection"
        assert "a Section of xsi:type 'ovf:DiskKeySection_Type'" in exc.value.message
        assert f"in its {'VirtualSystem' if where == 'Content' else 'Envelope'}" in exc.value.message
        assert rejected(edited.read_bytes(), tmp_path, cfg) == "Ova.UnsupportedSection"
    optional = section.format(' ovf:required="false"').encode()
    pkg = unpack(producers.with_extension(ova, tmp_path / "optional.ova", where, optional), tmp_path, cfg)
    try:
        assert pkg.manifest_verified and len(pkg.disks) == 2
    finally:
        pkg.remove()


def test_an_ovf2_storage_item_decides_the_boot_disk(tmp_path: Path, cfg: Config, disks: list[Path]) -> None:
    ovf = producers.virtualbox_ovf(disks, "vm", "2.0")
    ovf = ovf.replace(b"/disk/vmdisk1<", b"/disk/TMP<").replace(b"/disk/vmdisk2<", b"/disk/vmdisk1<")
    ovf = ovf.replace(b"/disk/TMP<", b"/disk/vmdisk2<").replace(b">MegaBytes<", b">byte * 2^20<")
    data = build(
        [member("vm.ovf", ovf)]
        + [member(f"vm-disk{i:03d}.vmdk", d.read_bytes()) for i, d in enumerate(disks, 1)]
    )
    pkg = unpack(data, tmp_path, cfg)
    try:
        assert [d.name for d in pkg.disks] == ["vm-disk002.vmdk", "vm-disk001.vmdk"]
    finally:
        pkg.remove()


def test_appledouble_members_and_directory_entries_are_skipped(
    tmp_path: Path, cfg: Config, disks: list[Path]
) -> None:
    # macOS tar writes "._NAME" (AppleDouble metadata) before each file that has extended attributes
    real = members_of(producers.ova_compose(tmp_path / "vm.ova", disks))
    apple = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(4000)
    listed = [member("meta/", kind=tarfile.DIRTYPE)]
    for name, body in real:
        listed += [member(f"._{name}", apple), member(name, body)]
    pkg = unpack(build(listed), tmp_path, cfg)
    try:
        assert pkg.manifest_verified and [d.name for d in pkg.disks] == ["root.vmdk", "data.vmdk"]
        assert sorted(os.listdir(pkg.directory)) == ["data.vmdk", "root.vmdk"]
    finally:
        pkg.remove()


def test_a_descriptor_after_the_disks_is_read(tmp_path: Path, cfg: Config) -> None:
    # the specification puts the .ovf first; VirtualBox, govmomi and virt-v2v take it anywhere
    disk = raw_disk(1)
    ovf = envelope("vm", [OvfDisk("d.raw", len(disk), len(disk))])
    mf = manifest([("vm.ovf", hashlib.sha256(ovf).hexdigest()), ("d.raw", hashlib.sha256(disk).hexdigest())])
    pkg = unpack(build([member("d.raw", disk), member("vm.mf", mf), member("vm.ovf", ovf)]), tmp_path, cfg)
    try:
        assert pkg.manifest_verified and [d.name for d in pkg.disks] == ["d.raw"]
    finally:
        pkg.remove()


def test_a_manifest_line_for_a_file_not_in_the_package_is_a_warning(tmp_path: Path, cfg: Config) -> None:
    disk = raw_disk(1)
    ovf = envelope("vm", [OvfDisk("vm-disk1.raw", len(disk), len(disk))])
    mf = manifest(
        [(n, hashlib.sha256(b).hexdigest()) for n, b in (("vm.ovf", ovf), ("vm-disk1.raw", disk))]
        + [("vm-file1.nvram", "0" * 64)]
    )
    pkg = unpack(package([("vm-disk1.raw", disk)], ovf=ovf, mf=mf), tmp_path, cfg)
    try:
        assert pkg.manifest_verified
        assert [(f.code, f.severity.value) for f in pkg.findings] == [("Ova.ManifestExtraEntry", "warning")]
    finally:
        pkg.remove()


def _gzip_file_ova(body: bytes, capacity: int, unit: int = 0) -> bytes:
    """A gzip ``File``; ``unit``: the capacity given as ``capacity >> unit`` units of ``byte * 2^unit``."""
    packed = gzip.compress(body, mtime=0)
    ovf = envelope("vm", [OvfDisk("vm-disk1.raw.gz", len(packed), capacity)])
    ovf = ovf.replace(b'ovf:href="vm-disk1.raw.gz"', b'ovf:compression="gzip" ovf:href="vm-disk1.raw.gz"')
    if unit:
        old = f'ovf:capacity="{capacity}" ovf:capacityAllocationUnits="byte"'.encode()
        assert old in ovf
        ovf = ovf.replace(
            old, f'ovf:capacity="{capacity >> unit}" ovf:capacityAllocationUnits="byte * 2^{unit}"'.encode()
        )
    return package([("vm-disk1.raw.gz", packed)], ovf=ovf)


def test_a_gzip_compressed_disk_file_is_decompressed_and_inspected(tmp_path: Path, cfg: Config) -> None:
    pkg = unpack(_gzip_file_ova(raw_disk(7), 2 * MiB), tmp_path, cfg)
    try:
        [disk] = pkg.disks
        assert disk.path.read_bytes() == raw_disk(7)
        assert disk.inspection is not None and disk.inspection.format == "raw"
        assert disk.sha256 == hashlib.sha256(gzip.compress(raw_disk(7), mtime=0)).hexdigest()
        assert sorted(os.listdir(pkg.directory)) == [disk.path.name]
    finally:
        pkg.remove()


def test_a_gzip_disk_file_that_inflates_past_its_capacity_is_refused(tmp_path: Path, cfg: Config) -> None:
    assert rejected(_gzip_file_ova(bytes(8 * MiB), MiB), tmp_path, cfg) == "SizeLimitExceeded.Decompressed"


def test_a_gzip_disk_whose_capacity_is_rounded_down_to_coarse_units_still_decompresses(
    tmp_path: Path, cfg: Config
) -> None:
    # ova-compose writes int(size / unit): a 31 MiB disk in units of 16 MiB says "1". The disk may hold up
    # to a unit more than that, and so may its decompressed file
    body = raw_disk(7) + bytes(31 * MiB - len(raw_disk(7)))
    pkg = unpack(_gzip_file_ova(body, 16 * MiB, unit=24), tmp_path, cfg)
    try:
        [disk] = pkg.disks
        assert disk.inspection is not None and disk.inspection.virtual_size == 31 * MiB
        assert disk.path.read_bytes() == body
    finally:
        pkg.remove()
    # past the unit the capacity stands for, it is still a bomb
    assert (
        rejected(_gzip_file_ova(bytes(40 * MiB), 16 * MiB, unit=24), tmp_path, cfg)
        == "SizeLimitExceeded.Decompressed"
    )


# --------------------------------------------------------------------------------- the hostile matrix


@pytest.mark.parametrize(
    "wrap",
    [
        lambda b: gzip.compress(b, mtime=0),
        lambda b: lzma.compress(b),
        lambda b: _zipped(b),
    ],
    ids=["gzip", "xz", "zip"],
)
def test_a_compressed_or_zipped_ova_is_refused_naming_what_to_do(
    wrap: Callable[[bytes], bytes], tmp_path: Path, cfg: Config
) -> None:
    with pytest.raises(ImageRejected) as exc:
        unpack(wrap(package()), tmp_path, cfg)
    assert exc.value.code == "Ova.Compressed" and "decompress it" in exc.value.message
    assert os.listdir(tmp_path / "work") == []


def test_the_first_segment_of_a_split_zip_is_refused_naming_the_join_and_an_empty_zip_is_not_an_ova(
    tmp_path: Path, cfg: Config
) -> None:
    # zip -s writes vm.z01, vm.z02, ... and vm.zip (its last segment); unzip reads none of them alone
    (tmp_path / "vm.ova").write_bytes(package() + os.urandom(200_000))
    subprocess.run(
        ["zip", "-q", "-j", "-s", "64k", str(tmp_path / "vm.zip"), str(tmp_path / "vm.ova")], check=True
    )
    with pytest.raises(ImageRejected) as exc:
        unpack(tmp_path / "vm.z01", tmp_path, cfg)
    assert exc.value.code == "Ova.Compressed" and "split zip" in exc.value.message
    assert "zip -s 0" in exc.value.message and "(unzip)" not in exc.value.message
    # an empty zip (its end-of-central-directory record alone) wraps no OVA: it is just not a tar
    with pytest.raises(ImageRejected) as exc:
        unpack(_empty_zip(), tmp_path, cfg)
    assert exc.value.code == "Ova.NotAnOva"
    assert os.listdir(tmp_path / "work") == []


def _empty_zip() -> bytes:
    out = io.BytesIO()
    zipfile.ZipFile(out, "w").close()
    return out.getvalue()


def test_a_compressed_ova_not_claimed_as_one_is_refused_from_its_first_decompressed_block(
    tmp_path: Path, cfg: Config
) -> None:
    """The inspection of a compressed input (what `imaging convert` and an ImportImage without
    ``Format=ova`` run) refuses a tar whose first member is a ``.ovf``, found after a PAX long name,
    before the rest is decompressed; a compressed tar that starts with a disk is not an OVA."""
    work = tmp_path / "work"
    work.mkdir()
    long_name = "a-descriptor-name-longer-than-the-hundred-bytes-of-a-ustar-header-" * 2 + "vm.ovf"
    ova = build(
        [member(long_name, b"<Envelope/>"), member("vm-disk1.raw", raw_disk(1))], fmt=tarfile.PAX_FORMAT
    )
    packed = tmp_path / "vm.ova.bz2"
    packed.write_bytes(bz2.compress(ova))
    result = inspect_image(packed, None, config=cfg, workdir=work)
    assert [f.code for f in result.errors] == ["Ova.Compressed"]
    assert "(bunzip2)" in result.errors[0].message and os.listdir(work) == []
    # a disk in a tar.gz (as some clouds ship RAW disks) is not an OVA: refused as the archive it is
    packed = tmp_path / "disk.tar.gz"
    packed.write_bytes(gzip.compress(build([member("disk.raw", raw_disk(2))]), mtime=0))
    result = inspect_image(packed, None, config=cfg, workdir=work)
    assert [f.code for f in result.errors] == ["FormatMismatch.Archive"]


def test_a_decompressed_head_is_sniffed_for_an_ova_on_its_first_headers_only() -> None:
    """``tarfile`` parses PAX records at a cost that grows with the square of their length (CPython 3.11
    before 3.11.10), in the task's process: the sniffing of every compressed input's first decompressed
    block (up to 2 MiB of the sender's choosing) reads no more than a first member's headers need."""

    def head(padding: int, name: str = "vm.ovf") -> bytes:
        descriptor = tarfile.TarInfo(name)
        descriptor.size = 11
        descriptor.pax_headers = {"comment": "x" * padding}  # a PAX record of that length before it
        return descriptor.tobuf(tarfile.PAX_FORMAT) + b"<Envelope/>".ljust(512, b"\0") + bytes(1 << 20)

    assert first_member(head(1000)) == "vm.ovf"
    refuse_compressed_ova("gzip", head(1000, "vm.raw"))  # a tar that begins with a disk: no refusal
    with pytest.raises(ImageRejected, match=r"gzip-compressed.*\(gunzip\)"):
        refuse_compressed_ova("gzip", head(1000))
    # a first member whose headers run past FIRST_HEADER_BYTES is not read (its head is inspected as a disk's)
    assert first_member(head(FIRST_HEADER_BYTES)) is None


def _zipped(data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("vm.ova", data)
    return out.getvalue()


def _flat_descriptor(tmp_path: Path, extent: str) -> bytes:
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            tmp_path / "f.vmdk",
            "1M",
        ],
        check=True,
    )
    text = (tmp_path / "f.vmdk").read_text()
    return text.replace('"f-flat.vmdk"', f'"{extent}"').encode()


def test_a_flat_vmdk_descriptor_naming_etc_passwd_is_refused(tmp_path: Path, cfg: Config) -> None:
    body = _flat_descriptor(tmp_path, "/etc/passwd")
    ovf = envelope("vm", [OvfDisk("vm-disk1.vmdk", len(body), MiB)])
    assert rejected(package([("vm-disk1.vmdk", body)], ovf=ovf), tmp_path, cfg).startswith("UnsafeImage.")


def test_a_flat_vmdk_descriptor_extent_is_never_read(tmp_path: Path, cfg: Config) -> None:
    # the extent is a FIFO holding bytes: anything that opened and read it would have taken them
    fifo = tmp_path / "extent"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(fd, b"x" * 4096)
        body = _flat_descriptor(tmp_path, str(fifo))
        ovf = envelope("vm", [OvfDisk("vm-disk1.vmdk", len(body), MiB)])
        assert rejected(package([("vm-disk1.vmdk", body)], ovf=ovf), tmp_path, cfg).startswith("UnsafeImage.")
        assert os.read(fd, 8192) == b"x" * 4096
    finally:
        os.close(fd)


def test_a_disk_smaller_than_its_declared_capacity_is_refused(tmp_path: Path, cfg: Config) -> None:
    ovf = envelope("vm", [OvfDisk("vm-disk1.raw", 2 * MiB, 2 * MiB + 512)])
    data = package([("vm-disk1.raw", raw_disk(1))], ovf=ovf)
    assert rejected(data, tmp_path, cfg) == "Ova.CapacityMismatch"


def test_a_disk_over_its_gigabyte_capacity_by_a_unit_is_refused(tmp_path: Path, cfg: Config) -> None:
    (tmp_path / "d").mkdir()
    disk = producers.stream_vmdk(tmp_path / "d" / "big.vmdk", 2 * GiB, data=b"big")
    ovf = producers.ova_compose_ovf([disk], "vm", "byte * 2^30").replace(
        b'ovf:capacity="2"', b'ovf:capacity="1"'
    )
    assert (
        rejected(package([("big.vmdk", disk.read_bytes())], ovf=ovf), tmp_path, cfg) == "Ova.CapacityMismatch"
    )


def test_twenty_two_disks_are_refused(tmp_path: Path, cfg: Config) -> None:
    disks = [(f"d{i}.raw", raw_disk(i, 64 << 10)) for i in range(22)]
    assert rejected(package(disks), tmp_path, cfg) == "Ova.BadDescriptor"


@pytest.mark.parametrize(
    "attribute", ['ovf:chunkSize="1048576"', 'ovf:compression="bzip2"'], ids=["chunked", "bzip2"]
)
def test_a_chunked_or_unknown_compressed_file_is_refused_as_unsupported(
    attribute: str, tmp_path: Path, cfg: Config
) -> None:
    ovf = envelope("vm", [OvfDisk("vm-disk1.raw", 2 * MiB, 2 * MiB)])
    ovf = ovf.replace(b'ovf:href="vm-disk1.raw"', f'{attribute} ovf:href="vm-disk1.raw"'.encode())
    assert rejected(package([("vm-disk1.raw", raw_disk(1))], ovf=ovf), tmp_path, cfg) == "Ova.Unsupported"
