"""Format names: user-facing ↔ qemu-img, claims with compression suffixes."""

from __future__ import annotations

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
