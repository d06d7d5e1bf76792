"""Confined symlink resolution and bounded reads on a real ext4 guest, and the text parsers."""

from __future__ import annotations

import os

import pytest

from appliance.guest.linux import parse_os_release
from appliance.guest.reader import open_filesystem
from appliance.guest.safefs import MAX_TEXT, GuestFS
from tests import guestfactory as gf


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestFS:
    tmp = tmp_path_factory.mktemp("safefs")
    root = tmp / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("guest\n")
    (root / "etc/up").symlink_to("../../../../../../../../etc/hostname")  # ".." at the root stays there
    (root / "etc/abs").symlink_to("/etc/hostname")  # absolute: the guest's root, never the host's
    (root / "etc/host-only").symlink_to("/proc/self/environ")  # exists on the host, not in the guest
    (root / "loop-a").symlink_to("loop-b")
    (root / "loop-b").symlink_to("loop-a")
    for i in range(60):
        (root / f"chain{i}").symlink_to(f"chain{i + 1}")
    (root / "chain60").write_text("end")
    (root / "big").write_bytes(os.urandom(3 * MAX_TEXT))
    image = gf.ext4(tmp / "fs.ext4", 8, root)
    fs = open_filesystem(open(image, "rb"))  # noqa: SIM115 - kept open for the module's tests
    assert fs is not None
    return GuestFS(fs)


def test_relative_and_absolute_links_stay_inside_the_guest(guest: GuestFS) -> None:
    assert guest.read("/etc/up") == b"guest\n"
    assert guest.read("/etc/abs") == b"guest\n"
    assert guest.resolve("/etc/abs") == "/etc/hostname"
    assert guest.read("/etc/host-only") is None


def test_symlink_loops_and_overlong_chains_resolve_to_nothing(guest: GuestFS) -> None:
    assert guest.resolve("/loop-a") is None and guest.read("/loop-a") is None
    assert guest.read("/chain30") == b"end"  # 30 hops: within the bound
    assert guest.resolve("/chain0") is None  # 60 hops: over it


def test_reads_are_bounded(guest: GuestFS) -> None:
    assert len(guest.read("/big") or b"") == MAX_TEXT
    assert guest.read("/etc") is None  # a directory is not read as a file


def test_os_release_parser_handles_quotes_and_junk() -> None:
    text = (
        "ID=fedora\nVERSION_ID=40\nPRETTY_NAME='Fedora Linux 40 (Server Edition)'\nNAME=\"unterminated\n=x\n"
    )
    values = parse_os_release(text)
    assert values["ID"] == "fedora" and values["VERSION_ID"] == "40"
    assert values["PRETTY_NAME"] == "Fedora Linux 40 (Server Edition)" and values["NAME"] == "unterminated"
