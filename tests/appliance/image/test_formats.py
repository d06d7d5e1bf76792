"""Format names: user-facing ↔ qemu-img, claims with compression suffixes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from appliance.errors import UsageError
from appliance.image import formats


def test_vhd_is_vpc_to_qemu_and_back() -> None:
    assert formats.to_qemu("vhd") == "vpc"
    assert formats.from_qemu("vpc") == "vhd"
    assert formats.to_qemu("qcow2") == "qcow2"


@pytest.mark.parametrize(
    ("claim", "parsed"),
    [
        ("raw", ("raw", None)),
        ("raw.gz", ("raw", "gzip")),
        ("QCOW2.zst", ("qcow2", "zstd")),
        ("vpc", ("vhd", None)),
        ("vmdk.xz", ("vmdk", "xz")),
        ("raw.bz2", ("raw", "bzip2")),
        (None, (None, None)),
    ],
)
def test_parses_claims(claim: str | None, parsed: tuple[str | None, str | None]) -> None:
    assert formats.parse_claim(claim) == parsed


@pytest.mark.parametrize("claim", ["ova", "raw.rar", "vdi"])
def test_rejects_unknown_claims(claim: str) -> None:
    with pytest.raises(UsageError):
        formats.parse_claim(claim)


def test_output_formats_exclude_banned_and_read_only_ones() -> None:
    assert formats.check_output_format("vpc") == "vhd"
    for bad in ("qed", "iso"):
        with pytest.raises(UsageError):
            formats.check_output_format(bad)


@pytest.mark.parametrize(
    ("name", "reader"),
    [
        ("raw", "raw"),
        ("RAW", "raw"),
        ("gpt", "raw"),  # the inspector's name for raw with a partition table
        ("iso", "raw"),  # read as raw, as qemu-img does
        ("qcow2", "qcow2"),
        ("VMDK", "vmdk"),
        ("vhd", "vhd"),
        ("vpc", "vhd"),  # qemu-img's name, for fixed and dynamic alike
        ("VHD", "vhd"),
        ("vhdx", "vhdx"),
        ("vdi", "vdi"),  # detected (never claimed) and accepted by inspection
        ("qed", None),
        ("luks", None),
    ],
)
def test_guest_format_maps_every_name_the_appliance_uses_to_the_reader(name: str, reader: str | None) -> None:
    assert formats.guest_format(name) == reader


@pytest.mark.parametrize("name", ["raw.gz", "ova", ""])
def test_guest_format_refuses_compressed_and_unknown_names(name: str) -> None:
    with pytest.raises(UsageError):
        formats.guest_format(name)


# -- signatures, checked on files the real tools write -----------------------------------------------

CONTAINERS = {
    "qcow2": ["-O", "qcow2"],
    "vmdk": ["-O", "vmdk"],
    "vmdk-stream": ["-O", "vmdk", "-o", "subformat=streamOptimized"],
    "vhd": ["-O", "vpc"],
    "vhdx": ["-O", "vhdx"],
    "qed": ["-O", "qed"],
    "vdi": ["-O", "vdi"],
}


@pytest.mark.parametrize("kind", sorted(CONTAINERS))
def test_container_format_names_what_qemu_img_wrote(kind: str, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(4096) + bytes(1 << 20))
    out = tmp_path / "disk.out"
    subprocess.run(["qemu-img", "convert", "-f", "raw", *CONTAINERS[kind], str(raw), str(out)], check=True)
    head = out.read_bytes()[: formats.SIGNATURE_BYTES]
    assert formats.container_format(head) == kind.split("-")[0]
    assert formats.compression_of(head) is None


def test_raw_and_a_fixed_vhd_have_no_leading_signature(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(1 << 20))
    fixed = tmp_path / "fixed.vhd"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed", str(raw), str(fixed)],
        check=True,
    )
    assert formats.container_format(raw.read_bytes()[:68]) is None
    data = fixed.read_bytes()
    assert formats.container_format(data[:68]) is None  # only the footer says it
    assert data[-512:].startswith(formats.VHD_COOKIE)


@pytest.mark.parametrize(
    ("tool", "compression"), [("gzip", "gzip"), ("xz", "xz"), ("zstd", "zstd"), ("bzip2", "bzip2")]
)
def test_compression_of_names_what_the_compressor_wrote(tool: str, compression: str, tmp_path: Path) -> None:
    src = tmp_path / "data"
    src.write_bytes(os.urandom(1000))
    packed = subprocess.run([tool, "-c", str(src)], check=True, capture_output=True).stdout
    assert formats.compression_of(packed[: formats.SIGNATURE_BYTES]) == compression
    assert formats.container_format(packed[: formats.SIGNATURE_BYTES]) is None


def test_an_empty_bzip2_archive_is_bzip2_but_bzh_alone_is_not() -> None:
    empty = subprocess.run(["bzip2", "-c"], input=b"", check=True, capture_output=True).stdout
    assert formats.compression_of(empty) == "bzip2"
    assert formats.compression_of(b"BZh9 text that only starts like bzip2") is None


@pytest.mark.parametrize(
    ("name", "stripped"),
    [
        ("disk.raw.gz", "disk.raw"),
        ("DISK.RAW.ZST", "DISK.RAW"),
        ("d.vmdk.gzip", "d.vmdk"),
        ("d.raw", None),
        (".gz", None),
    ],
)
def test_strip_compression_suffix(name: str, stripped: str | None) -> None:
    assert formats.strip_compression_suffix(name) == stripped
