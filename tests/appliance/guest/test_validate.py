"""Static guest validation of real images built by tests/guestfactory.py (reader in a confined child)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance import confine
from appliance.errors import Severity, UsageError
from appliance.guest import CODES, check_request, validate_image
from appliance.guest import validate as guest_validate
from appliance.guest.report import GuestReport
from tests import confinement
from tests import guestfactory as gf
from tests import imagefactory as imf


def codes(report: GuestReport, severity: str | None = None) -> set[str]:
    return {f.code for f in report.findings if severity is None or f.severity == severity}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("guests")


@pytest.fixture(scope="module")
def linux_img(images: Path) -> Path:
    return gf.linux_disk(images)


def test_partitioned_linux_disk_validates_cleanly_with_os_and_boot_details(linux_img: Path) -> None:
    r = validate_image(linux_img)
    assert r.errors == [] and codes(r, "warning") == set()
    assert (r.layout, r.partition_table, r.boot_mode) == ("disk", "mbr", "bios")
    assert r.os == {
        "family": "linux",
        "distribution": "debian",
        "version": "12",
        "pretty_name": "Debian GNU/Linux 12 (bookworm)",
        "architecture": "x86_64" if os.uname().machine == "x86_64" else r.os["architecture"],
    }
    (part,) = r.partitions
    assert part["number"] == 1 and part["start"] == gf.MiB and part["size"] == 24 * gf.MiB
    assert (part["type"], part["filesystem"], part["label"], part["uuid"]) == (
        "0x83",
        "ext4",
        "rootfs",
        gf.ROOT_UUID,
    )
    assert part["bootable"] is True and part["esp"] is False
    assert r.root == {"partition": 1, "filesystem": "ext4"}
    assert r.kernels == ["/boot/vmlinuz-6.1.0-18-amd64"] and r.initrds == ["/boot/initrd.img-6.1.0-18-amd64"]
    assert r.bootloader == {"type": "grub2", "configs": ["/boot/grub/grub.cfg"]}
    assert r.to_dict()["fstab"][0] == {
        "spec": f"UUID={gf.ROOT_UUID}",
        "mountpoint": "/",
        "type": "ext4",
        "partition": 1,
        "found": True,
    }


def test_architecture_comes_from_the_guest_elf_binary(tmp_path: Path) -> None:
    # the host's /bin/true is the guest's /bin/sh: whatever the host is, the guest reports the same
    machine = {"x86_64": "x86_64", "aarch64": "arm64", "i686": "i386"}.get(os.uname().machine)
    r = validate_image(gf.linux_disk(tmp_path))
    assert r.os["architecture"] == machine


def test_fstab_naming_a_uuid_not_on_the_disk_is_an_error(tmp_path: Path) -> None:
    missing = "deadbeef-0000-4000-8000-000000000000"
    img = gf.linux_disk(tmp_path, fstab=gf.fstab_by_uuid(root_uuid=missing))
    r = validate_image(img)
    (f,) = r.errors
    assert f.code == "Guest.FstabDeviceMissing" and missing in f.message and "emergency" in f.message


def test_optional_fstab_entries_and_device_names_are_warnings(tmp_path: Path) -> None:
    extra = (
        "UUID=deadbeef-0000-4000-8000-000000000000 /srv ext4 defaults,nofail 0 2\n"
        "/dev/sda1 /mnt ext4 ro 0 0\n"
    )
    r = validate_image(gf.linux_disk(tmp_path, fstab=gf.fstab_by_uuid(extra=extra)))
    assert r.errors == []
    assert codes(r, "warning") == {"Guest.FstabDeviceMissing", "Guest.FstabDeviceName"}
    by_spec = {e["spec"]: e for e in r.to_dict()["fstab"]}
    assert by_spec["/dev/sda1"]["partition"] == 1  # resolvable, but fragile


def test_missing_kernel_initrd_and_bootloader_are_reported(tmp_path: Path) -> None:
    r = validate_image(gf.linux_disk(tmp_path, kernel=False, grub=False))
    assert codes(r, "error") == {"Guest.NoKernel", "Guest.NoBootloader"}
    r = validate_image(gf.linux_disk(tmp_path, "noinitrd.img", initrd=False))
    assert codes(r) == {"Guest.NoInitrd"} and r.ok


def test_bare_filesystem_is_layout_partition_and_boot_checks_are_relaxed(tmp_path: Path) -> None:
    r = validate_image(gf.partition_image(tmp_path))
    assert (r.layout, r.partition_table, r.boot_mode) == ("partition", None, None)
    assert r.ok, r.errors
    assert codes(r, "info") == {"Guest.NoPartitionTable", "Guest.NoBootloader"}
    assert r.root == {"partition": None, "filesystem": "ext4"}
    assert r.os["distribution"] == "debian" and r.partitions[0]["uuid"] == gf.ROOT_UUID


def test_uefi_gpt_disk_with_fallback_loader_boots_uefi(tmp_path: Path) -> None:
    r = validate_image(gf.uefi_disk(tmp_path))
    assert r.ok and (r.partition_table, r.boot_mode) == ("gpt", "uefi")
    esp, root = r.partitions
    assert esp["esp"] and esp["filesystem"] == "vfat" and esp["uuid"] == "1234-ABCD"
    assert root["type"] == gf.LINUX_TYPE_GUID.lower() and r.root == {"partition": 2, "filesystem": "ext4"}
    assert r.to_dict()["uefi_loaders"] == ["\\EFI\\BOOT\\BOOTX64.EFI"]
    # the ESP is mounted by its FAT volume id: resolvable
    assert {e["mountpoint"]: e["partition"] for e in r.to_dict()["fstab"]} == {"/": 2, "/boot/efi": 1}


def test_uefi_disk_without_fallback_loader_is_rejected(tmp_path: Path) -> None:
    r = validate_image(gf.uefi_disk(tmp_path, fallback=False))
    assert r.boot_mode is None
    assert [f.code for f in r.errors] == ["Guest.UefiNoFallbackLoader"]
    assert "BOOTX64.EFI" in r.errors[0].message


def test_data_disk_is_rejected_as_boot_disk_but_fine_as_data_volume(tmp_path: Path) -> None:
    img = gf.data_disk(tmp_path)
    boot = validate_image(img)
    assert {f.code for f in boot.errors} == {"Guest.NoBootablePartition", "Guest.OsUnknown"}
    data = validate_image(img, bootable=False)
    assert data.ok and codes(data, "info") == {"Guest.NoBootablePartition", "Guest.OsUnknown"}
    assert data.partitions[0]["label"] == "data"


def test_qcow2_is_validated_without_conversion(tmp_path: Path, linux_img: Path) -> None:
    qcow = gf.qcow2_of(linux_img, tmp_path / "linux.qcow2")
    before = set(tmp_path.iterdir())
    r = validate_image(qcow, "qcow2")
    assert set(tmp_path.iterdir()) == before  # nothing converted or written next to it
    assert r.ok and r.os["distribution"] == "debian" and r.boot_mode == "bios"
    assert r.to_dict() == validate_image(linux_img).to_dict()


def test_qcow2_read_as_raw_finds_no_partition_table(tmp_path: Path, linux_img: Path) -> None:
    qcow = gf.qcow2_of(linux_img, tmp_path / "linux.qcow2")
    r = validate_image(qcow, "raw")
    assert r.layout == "unknown" and codes(r, "error") == {"Guest.NoFilesystem"}


def test_squashfs_partition_is_an_unsupported_filesystem(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/hello").write_text("hi")
    sq = tmp_path / "fs.squashfs"
    gf.run("mksquashfs", tmp_path / "tree", sq, "-quiet", "-noappend")
    r = validate_image(gf.disk(tmp_path / "sq.img", "mbr", [gf.Part(8, "83", sq, bootable=True)]))
    assert r.partitions[0]["filesystem"] == "squashfs"
    assert [f.code for f in r.errors] == ["Guest.UnsupportedFilesystem"]


def test_partition_of_random_bytes_has_no_filesystem(tmp_path: Path) -> None:
    noise = tmp_path / "noise"
    noise.write_bytes(os.urandom(4 * gf.MiB))
    r = validate_image(gf.disk(tmp_path / "noise.img", "mbr", [gf.Part(4, "83", noise, bootable=True)]))
    assert r.partitions[0]["filesystem"] is None
    assert [f.code for f in r.errors] == ["Guest.NoFilesystem"]


def test_unsupported_filesystem_next_to_a_good_root_is_a_warning(tmp_path: Path) -> None:
    swap_like = tmp_path / "luks"
    swap_like.write_bytes(b"LUKS\xba\xbe\0\x02" + b"\0" * 4096)
    work = tmp_path / "w"
    tree = gf.linux_tree(work / "root", fstab=gf.fstab_by_uuid())
    root = gf.ext4(work / "root.ext4", 24, tree)
    img = gf.disk(
        tmp_path / "two.img", "mbr", [gf.Part(24, "83", root, bootable=True), gf.Part(2, "83", swap_like)]
    )
    r = validate_image(img)
    assert r.ok and codes(r, "warning") == {"Guest.UnsupportedFilesystem"}
    assert r.partitions[1]["filesystem"] == "crypto_LUKS"


def test_truncated_qcow2_is_unreadable_not_a_crash(tmp_path: Path, linux_img: Path) -> None:
    qcow = gf.qcow2_of(linux_img, tmp_path / "linux.qcow2")
    cut = tmp_path / "cut.qcow2"
    cut.write_bytes(qcow.read_bytes()[:300])
    r = validate_image(cut, "qcow2")
    assert [f.code for f in r.errors] == ["Guest.Unreadable"] and r.layout == "unknown"


def test_qcow2_with_a_backing_file_is_not_followed(tmp_path: Path, linux_img: Path) -> None:
    # a backing file next to the image would give the reader host data; it must refuse instead
    gf.run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(linux_img), tmp_path / "o.qcow2")
    r = validate_image(tmp_path / "o.qcow2", "qcow2")
    assert [f.code for f in r.errors] == ["Guest.ExternalReference"] and r.os["family"] is None


@pytest.mark.parametrize("fmt", ["vmdk", "qcow2"])
def test_image_naming_a_host_file_as_its_parent_is_refused_without_reading_it(
    tmp_path: Path, fmt: str
) -> None:
    # an uploaded child whose header names an absolute host path: the host disk's contents (here its
    # filesystem label) must not reach the report, and the refusal must say why (a data disk too)
    host = tmp_path / "host"
    host.mkdir()
    base = gf.convert(gf.ext4(host / "fs.img", 8, label="SECRETLABEL"), host / f"base.{fmt}", fmt)
    upload = tmp_path / "upload"
    upload.mkdir()
    child = upload / f"child.{fmt}"
    gf.run("qemu-img", "create", "-q", "-f", fmt, "-F", fmt, "-b", str(base.resolve()), child)
    for bootable in (True, False):
        r = validate_image(child, fmt, bootable=bootable)
        assert [(f.code, f.severity) for f in r.findings] == [("Guest.ExternalReference", Severity.ERROR)]
        assert str(base.resolve()) in r.findings[0].message
        assert "SECRETLABEL" not in json.dumps(r.to_dict()) and r.partitions == []


def _vhdx_file_parameters_offset(path: Path) -> int:
    from dissect.hypervisor.disk import vhdx as dvhdx

    with open(path, "rb") as fh:
        region = dvhdx.RegionTable(fh, 3 * dvhdx.ALIGNMENT).get(dvhdx.METADATA_REGION_GUID)
        table = dvhdx.MetadataTable(fh, region.file_offset, region.length)
    (entry,) = [e for e in table.entries if e.item_id == dvhdx.FILE_PARAMETERS_GUID.bytes_le]
    return region.file_offset + entry.offset


def test_differencing_vhd_and_vhdx_are_refused_as_external_references(tmp_path: Path) -> None:
    # qemu-img cannot create these children, so mark a dynamic disk as differencing the way a hypervisor
    # would: VHD disk type 4 (footer and its copy at 0), VHDX file parameter "has parent"
    vhd = tmp_path / "child.vhd"
    gf.run("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", vhd, "16M")
    with open(vhd, "r+b") as f:
        for offset in (0, vhd.stat().st_size - 512):
            f.seek(offset + 60)
            f.write((4).to_bytes(4, "big"))
    vhdx = tmp_path / "child.vhdx"
    gf.run("qemu-img", "create", "-q", "-f", "vhdx", vhdx, "16M")
    flags = _vhdx_file_parameters_offset(vhdx) + 4
    with open(vhdx, "r+b") as f:
        f.seek(flags)
        bits = f.read(1)[0]
        f.seek(flags)
        f.write(bytes([bits | 0x2]))
    for path, fmt in ((vhd, "vhd"), (vhdx, "vhdx")):
        r = validate_image(path, fmt)
        assert [f.code for f in r.findings] == ["Guest.ExternalReference"], fmt
        assert "differencing" in r.findings[0].message


def test_differencing_vdi_is_refused_as_an_external_reference(tmp_path: Path) -> None:
    # VirtualBox's differencing disks (image type 4) read their unallocated blocks from a parent disk
    vdi = gf.convert(gf.ext4(tmp_path / "fs.img", 8), tmp_path / "child.vdi", "vdi")
    assert validate_image(vdi, "vdi").partitions[0]["filesystem"] == "ext4"  # control: readable as type 1
    with open(vdi, "r+b") as f:
        f.seek(76)  # VDIHEADER1PLUS.u32Type, after the 72-byte pre-header and cbHeader
        assert int.from_bytes(f.read(4), "little") == 1
        f.seek(76)
        f.write((4).to_bytes(4, "little"))
    r = validate_image(vdi, "vdi")
    assert [f.code for f in r.findings] == ["Guest.ExternalReference"]
    assert "differencing VDI" in r.findings[0].message and r.partitions == []


def test_an_iso_is_read_as_the_raw_bytes_it_is(tmp_path: Path) -> None:
    # inspection accepts ISOs (and hands on "iso"); qemu-img reads them as raw, and so does the reader
    r = validate_image(imf.iso(tmp_path), "iso")
    assert r.layout == "partition" and r.partitions[0]["filesystem"] == "iso9660"
    assert [f.code for f in r.errors] == ["Guest.UnsupportedFilesystem"]


def test_partition_entry_beyond_the_end_of_the_image_is_ignored(tmp_path: Path) -> None:
    img = gf.disk(tmp_path / "short.img", "mbr", [gf.Part(8, "83", None, bootable=True)])
    os.truncate(img, 2 * gf.MiB)  # the partition now runs past the end of the file
    r = validate_image(img)
    assert r.layout == "disk" and not codes(r) & {"Guest.Unreadable"}
    assert codes(r, "error") == {"Guest.NoFilesystem"}


def test_reader_over_its_memory_limit_becomes_unreadable(tmp_path: Path, linux_img: Path) -> None:
    cfg = config_mod.from_dict(
        {"state_dir": str(tmp_path), "limits": {"guest_probe_address_space": "16MiB"}}, base_dir=tmp_path
    )
    r = validate_image(linux_img, config=cfg)
    (f,) = r.findings
    assert (f.code, f.severity) == ("Guest.Unreadable", Severity.ERROR)
    # a data disk that cannot be read is still worth a warning, not a rejection
    assert validate_image(linux_img, config=cfg, bootable=False).findings[0].severity is Severity.WARNING


def test_compressed_claims_and_missing_files_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        validate_image(tmp_path / "absent.img")
    (tmp_path / "x.img").write_bytes(b"\0" * 512)
    with pytest.raises(UsageError):
        validate_image(tmp_path / "x.img", "raw.gz")


def test_request_platform_and_architecture_are_checked(linux_img: Path) -> None:
    r = validate_image(linux_img)
    arch = r.os["architecture"]
    assert check_request(r, "Linux", arch) == []
    assert check_request(r, "linux", {"x86_64": "amd64", "arm64": "aarch64"}.get(arch, arch)) == []
    other = "arm64" if arch != "arm64" else "x86_64"
    found = check_request(r, "Windows", other)
    assert [f.code for f in found] == ["Guest.PlatformMismatch", "Guest.ArchitectureMismatch"]
    assert all(f.severity is Severity.ERROR for f in found) and "Debian" in found[0].message
    with pytest.raises(UsageError):
        check_request(r, "Plan9")
    # nothing detected: nothing to contradict (OsUnknown already says so)
    assert check_request(GuestReport(), "Windows", "arm64") == []


def test_every_code_has_severity_meaning_and_remediation() -> None:
    assert {"Guest.NoBootablePartition", "Guest.FstabDeviceMissing", "Guest.UnsupportedFilesystem"} <= set(
        CODES
    )
    for code, row in CODES.items():
        assert code.startswith("Guest.") and row.meaning.endswith(".") and row.remediation.endswith(".")


def test_report_round_trips_through_json_form(linux_img: Path) -> None:
    r = validate_image(linux_img)
    assert GuestReport.from_dict(r.to_dict()) == r


@pytest.mark.parametrize(
    ("kind", "mkfs"),
    [
        ("xfs", ["mkfs.xfs", "-q", "-L", "lbl"]),
        ("btrfs", ["mkfs.btrfs", "-q", "-L", "lbl"]),
        ("vfat", ["mkfs.vfat", "-n", "LBL"]),
        ("ntfs", ["mkfs.ntfs", "-q", "-F", "-f", "-L", "lbl"]),
    ],
)
def test_each_supported_filesystem_is_identified_as_blkid_names_it(
    tmp_path: Path, kind: str, mkfs: list[str]
) -> None:
    fs = tmp_path / f"bare.{kind}"
    with fs.open("wb") as f:
        f.truncate(320 * gf.MiB)
    gf.run(*mkfs, fs)
    blkid = dict(
        line.split("=", 1)
        for line in subprocess.run(
            ["blkid", "-p", "-o", "export", str(fs)], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    r = validate_image(fs)
    assert r.layout == "partition" and r.partition_table is None
    (part,) = r.partitions
    # fstab's UUID= and LABEL= are resolved against exactly these spellings
    assert (part["filesystem"], part["uuid"], part["label"]) == (blkid["TYPE"], blkid["UUID"], blkid["LABEL"])


def test_the_guest_reader_runs_under_the_confinement_policy(tmp_path: Path, linux_img: Path) -> None:
    cfg = config_mod.from_dict({"state_dir": str(tmp_path)}, base_dir=tmp_path)
    sentinel = tmp_path / "inherited-secret"
    sentinel.write_text("not for the reader")
    inherited = os.open(sentinel, os.O_RDONLY)
    os.set_inheritable(inherited, True)
    reports: list[GuestReport] = []
    try:
        with confinement.lease(linux_img) as held:
            # the reader blocks in open() of the image until the lease is released: a deterministic hold
            runner = threading.Thread(target=lambda: reports.append(validate_image(linux_img, config=cfg)))
            runner.start()
            held.wait_broken()
            pid = confinement.find_descendant(confinement.is_python_module("appliance.guest.probe"))
            seen = confinement.observe(pid)
            held.release()
            runner.join(120)
    finally:
        os.close(inherited)
    assert reports and reports[0].os.get("family") == "linux", "the reader did not finish with a report"
    confinement.assert_confined(
        seen, confine.guest_probe(cfg.limits), cwd_entries=["image"], forbidden_fd_targets={str(sentinel)}
    )
    assert seen.argv[-1] == "image"


def test_a_boot_mode_the_disk_cannot_boot_in_is_a_boot_mode_mismatch(tmp_path: Path, linux_img: Path) -> None:
    bios = validate_image(linux_img)
    uefi = validate_image(gf.uefi_disk(tmp_path))
    assert (bios.boot_mode, uefi.boot_mode) == ("bios", "uefi")
    (f,) = check_request(bios, boot_mode="uefi")
    assert f.code == "Guest.BootModeMismatch" and f.severity is Severity.ERROR and "BIOS" in f.message
    (g,) = check_request(uefi, boot_mode="legacy-bios")
    assert g.code == "Guest.BootModeMismatch" and "UEFI" in g.message
    # the mode the disk has, or none asked for: nothing to say
    assert check_request(bios, boot_mode="legacy-bios") == check_request(uefi, boot_mode="uefi") == []
    assert check_request(bios) == check_request(bios, boot_mode="uefi-preferred") == []


def test_a_reader_printing_past_its_output_cap_is_killed_and_the_guest_is_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader subverted by its disk may print without end: past its cap (9 MiB) it is killed, its output
    never held beyond that, and its answer after the flood is not taken."""
    monkeypatch.setattr(guest_validate, "CHILD", confinement.FLOODING_PROBE)
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(gf.MiB))
    report = validate_image(disk, workdir=tmp_path)
    assert codes(report) == {"Guest.Unreadable"}
    [message] = [f.message for f in report.findings]
    assert "the reader printed more than its output cap" in message and "9 MiB of output" in message
    assert [p.name for p in tmp_path.iterdir()] == ["disk.img"]
