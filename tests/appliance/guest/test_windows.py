"""Static validation of real Windows disks: NTFS filled through ntfs-3g, registry hives written by hivex.

The images come from :func:`tests.guestfactory.windows_disk` (MBR/BIOS or GPT/UEFI layouts) and their
SOFTWARE hives from :mod:`tests.winhive`; nothing here is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import Severity
from appliance.guest import check_request, validate_image
from appliance.guest.reader import registry_values
from appliance.guest.report import GuestReport
from tests import guestfactory as gf
from tests import winhive

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or not shutil.which("ntfs-3g") or not shutil.which("hivexsh"),
    reason="building NTFS images needs /dev/fuse and ntfs-3g, hives need hivexsh (libhivex-bin)",
)

SERVER_2022_OS = {
    "family": "windows",
    "distribution": "windows",
    "version": "10.0.20348",
    "pretty_name": "Windows Server 2022 Datacenter 21H2",
    "architecture": "x86_64",
    "edition": "ServerDatacenter",
    "installation_type": "Server",
}


def codes(report: GuestReport) -> list[str]:
    return [f.code for f in report.findings]


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("windows")


@pytest.fixture(scope="module")
def bios_disk(images: Path) -> Path:
    return gf.windows_disk(images, "server2022.img")


@pytest.fixture(scope="module")
def bios_report(bios_disk: Path) -> GuestReport:
    return validate_image(bios_disk)


@pytest.fixture(scope="module", autouse=True)
def no_mount_left_behind(images: Path) -> Iterator[None]:
    yield
    assert mounts_under(images) == []


def test_factory_software_hive_reads_back_with_hivex_and_the_reader(tmp_path: Path) -> None:
    hive = winhive.software_hive(tmp_path / "SOFTWARE")
    listing = subprocess.run(
        ["hivexsh", hive],
        input="cd \\Microsoft\\Windows NT\\CurrentVersion\nlsval\n",
        text=True,
        capture_output=True,
        check=True,
    ).stdout
    assert '"ProductName"="Windows Server 2022 Datacenter"' in listing
    assert '"CurrentMajorVersionNumber"=dword:0000000a' in listing
    with open(hive, "rb") as fh:
        assert registry_values(fh, "Microsoft\\Windows NT\\CurrentVersion") == winhive.SERVER_2022


def test_windows_server_2022_bios_disk_validates_with_version_from_the_registry(
    bios_disk: Path, bios_report: GuestReport
) -> None:
    r = bios_report
    assert r.findings == [] and r.ok
    assert (r.layout, r.partition_table, r.boot_mode) == ("disk", "mbr", "bios")
    assert r.os == SERVER_2022_OS
    assert r.root == {"partition": 1, "filesystem": "ntfs"}
    assert r.bootloader == {"type": "bootmgr", "configs": ["partition 1:/bootmgr"]}
    assert r.kernels == [] and r.initrds == []
    (part,) = r.partitions
    blkid_uuid = subprocess.run(
        ["blkid", "-o", "value", "-s", "UUID", bios_disk.parent / "server2022.img.d/c.ntfs"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert (part["type"], part["filesystem"], part["label"], part["bootable"]) == (
        "0x07",
        "ntfs",
        "Windows",
        True,
    )
    assert part["uuid"] == blkid_uuid  # what a Windows fstab-equivalent or blkid would call it


def test_windows_disk_requested_as_linux_is_a_platform_mismatch(bios_report: GuestReport) -> None:
    (f,) = check_request(bios_report, platform="Linux")
    assert f.code == "Guest.PlatformMismatch" and f.severity is Severity.ERROR
    assert "Windows Server 2022 Datacenter" in f.message
    assert check_request(bios_report, platform="Windows", architecture="x64") == []
    assert [f.code for f in check_request(bios_report, architecture="arm64")] == [
        "Guest.ArchitectureMismatch"
    ]


def test_cli_validate_json_rejects_linux_platform_and_accepts_windows(
    bios_disk: Path, tmp_path: Path
) -> None:
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
    env.pop("IMAGING_CONFIG", None)
    imaging = Path(sys.executable).with_name("imaging")

    def validate(platform: str) -> subprocess.CompletedProcess[str]:
        argv = [imaging, "validate", bios_disk, "--json", "--platform", platform]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)

    res = validate("Linux")
    assert res.returncode == 2, res.stderr
    report = json.loads(res.stdout)
    assert [f["code"] for f in report["findings"]] == ["Guest.PlatformMismatch"]
    assert report["os"]["family"] == "windows" and report["ok"] is False
    res = validate("Windows")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] is True and report["findings"] == [] and report["os"] == SERVER_2022_OS


@pytest.mark.parametrize(
    "software",
    [
        pytest.param(False, id="missing"),
        pytest.param(b"regf" + b"\xff" * 8188, id="garbage-after-signature"),
        pytest.param(b"\0" * 8192, id="zeroed"),
        pytest.param("truncated", id="truncated-to-base-block"),
        pytest.param("no-currentversion", id="hive-without-the-key"),
    ],
)
def test_unreadable_software_hive_is_os_version_unknown_not_a_crash(
    tmp_path: Path, software: bool | bytes | str
) -> None:
    if software == "truncated":
        software = winhive.software_hive(tmp_path / "SOFTWARE").read_bytes()[: winhive.BASE_BLOCK]
    elif software == "no-currentversion":
        hive = winhive.empty_hive(tmp_path / "SOFTWARE", "SOFTWARE")
        software = winhive.edit_hive(hive, ("Microsoft", "Windows"), {"ProgramFilesDir": "C:\\Program Files"})
        software = software.read_bytes()
    r = validate_image(gf.windows_disk(tmp_path, software=software))
    assert codes(r) == ["Guest.OsVersionUnknown"]
    (f,) = r.findings
    assert f.severity is Severity.WARNING and "SOFTWARE registry hive" in f.message
    # the rest of the analysis still ran: the disk is still known as a bootable x86_64 Windows
    assert r.os["family"] == "windows" and r.os["version"] is None and r.os["architecture"] == "x86_64"
    assert r.boot_mode == "bios" and r.bootloader is not None


def test_windows_disk_without_boot_manager_is_no_bootloader(tmp_path: Path) -> None:
    r = validate_image(gf.windows_disk(tmp_path, bootmgr=False))
    assert codes(r) == ["Guest.NoBootloader"]
    assert r.errors[0].severity is Severity.ERROR and "bcdboot" in r.errors[0].message
    assert r.os["pretty_name"] == SERVER_2022_OS["pretty_name"]


def test_uefi_windows_disk_with_fallback_loader_boots_uefi(images: Path) -> None:
    r = validate_image(gf.windows_disk(images, "uefi.img", uefi=True))
    assert r.findings == []
    assert (r.partition_table, r.boot_mode) == ("gpt", "uefi")
    assert r.to_dict()["uefi_loaders"] == ["\\EFI\\BOOT\\BOOTX64.EFI"]
    esp, msr, c = r.partitions
    assert esp["esp"] is True and esp["filesystem"] == "vfat"
    assert msr["type"] == gf.MSR_TYPE_GUID.lower() and msr["filesystem"] is None
    assert c["filesystem"] == "ntfs" and r.root == {"partition": 3, "filesystem": "ntfs"}
    assert r.bootloader == {"type": "bootmgr", "configs": ["esp:/EFI/Microsoft/Boot/bootmgfw.efi"]}
    assert r.os == SERVER_2022_OS


def test_uefi_windows_disk_without_fallback_loader_is_told_to_copy_bootmgfw(tmp_path: Path) -> None:
    r = validate_image(gf.windows_disk(tmp_path, uefi=True, fallback=False))
    assert codes(r) == ["Guest.UefiNoFallbackLoader"]
    (f,) = r.errors
    assert "the disk will not boot" in f.message and r.boot_mode is None
    # Windows remediation, not the grub/shim one given for Linux guests
    assert "bootmgfw.efi" in f.message and "bcdboot" in f.message and "grub" not in f.message


def test_arm64_windows_architecture_comes_from_the_ntoskrnl_pe_header(tmp_path: Path) -> None:
    r = validate_image(gf.windows_disk(tmp_path, uefi=True, machine=gf.PE_ARM64))
    assert r.findings == [] and r.os["architecture"] == "arm64"
    assert r.to_dict()["uefi_loaders"] == ["\\EFI\\BOOT\\BOOTAA64.EFI"]
    (f,) = check_request(r, platform="Windows", architecture="x86_64")
    assert f.code == "Guest.ArchitectureMismatch" and "arm64" in f.message


@pytest.mark.parametrize("fmt", ["vhdx", "vhd"])
def test_windows_11_client_in_a_vhd_container_is_named_windows_11(tmp_path: Path, fmt: str) -> None:
    # Windows 11 still writes "Windows 10 …" as ProductName; the build number (22000+) tells them apart
    values = dict(
        winhive.SERVER_2022,
        ProductName="Windows 10 Pro",
        EditionID="Professional",
        InstallationType="Client",
        CurrentBuild="22631",
        CurrentBuildNumber="22631",
        DisplayVersion="23H2",
    )
    hive = winhive.software_hive(tmp_path / "SOFTWARE", values).read_bytes()
    raw = gf.windows_disk(tmp_path, uefi=True, software=hive)
    image = tmp_path / f"win11.{fmt}"
    gf.run("qemu-img", "convert", "-f", "raw", "-O", "vpc" if fmt == "vhd" else fmt, raw, image)
    r = validate_image(image, fmt)
    assert r.findings == [] and r.boot_mode == "uefi"
    assert r.os["pretty_name"] == "Windows 11 Pro 23H2" and r.os["version"] == "10.0.22631"
    assert r.os["installation_type"] == "Client"


def test_ntfs_data_disk_without_windows_is_os_unknown(tmp_path: Path) -> None:
    (tmp_path / "files/Users/Public").mkdir(parents=True)
    (tmp_path / "files/Users/Public/report.docx").write_bytes(b"PK\3\4")
    fs = gf.ntfs(tmp_path / "data.ntfs", 16, tmp_path / "files", label="DATA")
    r = validate_image(gf.disk(tmp_path / "data.img", "mbr", [gf.Part(16, "7", fs)]))
    assert codes(r) == ["Guest.NoBootablePartition", "Guest.OsUnknown"]
    assert r.os["family"] is None and r.partitions[0]["label"] == "DATA"
    assert "bcdboot" in r.findings[0].message  # the remediation covers Windows guests too


def test_ntfs_builder_unmounts_when_copying_fails(tmp_path: Path) -> None:
    (tmp_path / "big").mkdir()
    (tmp_path / "big/too-large.bin").write_bytes(os.urandom(12 * gf.MiB))
    with pytest.raises(OSError):
        gf.ntfs(tmp_path / "small.ntfs", 8, tmp_path / "big")
    assert mounts_under(tmp_path) == []
    assert not list(tmp_path.glob("ntfs-mnt.*"))
