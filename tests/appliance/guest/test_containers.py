"""Guest validation sees through every container exactly as it sees raw: the same real filesystems, bare
(a partition image) and in a partitioned disk, as raw, qcow2, vmdk (sparse, stream), vhd (dynamic, fixed),
vhdx and vdi give the same report, findings included.

Each filesystem is made once per session and converted into each container once. The whole matrix is
read in this process with the reader the limited child runs (``probe.main`` does exactly
``analyze(open_disk(...))``), so it costs no interpreter start per image; the bare filesystems also go
through :func:`validate_image` and its child, in every container, under every name inspection gives
the format (what the import workflows pass on).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.guest import validate_image
from appliance.guest.analyze import analyze
from appliance.guest.reader import READABLE_FORMATS, open_disk
from appliance.image import formats
from appliance.image.inspect import inspect_image
from tests import guestfactory as gf

FILESYSTEMS = list(gf.FILESYSTEM_MIB)
LAYOUTS = ("partition", "disk")
#: containers: name → (qemu-img output format, options, format given to the validator)
CONTAINERS = {
    "qcow2": ("qcow2", None, "qcow2"),
    "vmdk-sparse": ("vmdk", "subformat=monolithicSparse", "vmdk"),
    "vmdk-stream": ("vmdk", "subformat=streamOptimized", "vmdk"),
    "vhd-dynamic": ("vpc", "subformat=dynamic,force_size=on", "vhd"),
    "vhd-fixed": ("vpc", "subformat=fixed,force_size=on", "vhd"),
    "vhdx": ("vhdx", None, "vhdx"),
    "vdi": ("vdi", None, "vdi"),
}
FORMATS = {"raw": "raw", **{name: fmt for name, (_, _, fmt) in CONTAINERS.items()}}


@pytest.fixture(scope="session")
def guest_images(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, str], Path]:
    """(filesystem, layout, container) → image: each filesystem made once, bare and in an MBR disk, each of
    those converted once into each container."""
    d = tmp_path_factory.mktemp("guest-containers")
    tree = gf.portable_root(d / "root")
    images: dict[tuple[str, str, str], Path] = {}
    for kind in FILESYSTEMS:
        fs = gf.filesystem(kind, d / f"{kind}.partition.raw", tree)
        images[kind, "partition", "raw"] = fs
        images[kind, "disk", "raw"] = gf.filesystem_disk(kind, fs, d / f"{kind}.disk.raw")
        for layout in LAYOUTS:
            raw = images[kind, layout, "raw"]
            for name, (qemu_format, options, _) in CONTAINERS.items():
                images[kind, layout, name] = gf.convert(
                    raw, d / f"{kind}.{layout}.{name}", qemu_format, options
                )
    return images


@functools.cache
def read(path: Path, fmt: str) -> dict[str, Any]:
    """The report the limited child would print for ``path``, read in this process."""
    with open(path, "rb") as fh:
        return analyze(open_disk(fh, fmt))


@functools.cache
def validated(path: Path, fmt: str) -> dict[str, Any]:
    """The report of :func:`validate_image` (the limited child) for ``path``."""
    return validate_image(path, fmt).to_dict()


@pytest.mark.parametrize("container", list(CONTAINERS))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", FILESYSTEMS)
def test_container_gives_the_same_guest_report_as_raw(
    kind: str, layout: str, container: str, guest_images: dict[tuple[str, str, str], Path], tmp_path: Path
) -> None:
    raw = read(guest_images[kind, layout, "raw"], "raw")
    # control: raw is read completely, so equal reports cannot both be empty-handed
    assert raw["layout"] == layout and [p["filesystem"] for p in raw["partitions"]] == [kind]
    assert raw["partitions"][0]["label"] == gf.GUEST_LABEL
    assert raw["os"]["distribution"] == "debian" and raw["root"]["filesystem"] == kind
    assert raw["fstab"][0]["found"] is True and raw["kernels"]
    image = guest_images[kind, layout, container]
    # nobody has to say which container it is: inspection's names for it are the reader's
    found = inspect_image(image, None, config=config_mod.from_dict({}), workdir=tmp_path)
    assert found.safe, found.to_dict()
    assert formats.guest_format(found.format) == formats.guest_format(found.qemu_format) == FORMATS[container]
    assert read(image, FORMATS[container]) == raw


@pytest.mark.parametrize("container", list(FORMATS))
@pytest.mark.parametrize("kind", ["ext2", "ntfs"])
def test_bare_filesystem_in_any_container_is_a_partition_image_through_the_limited_child(
    kind: str, container: str, guest_images: dict[tuple[str, str, str], Path]
) -> None:
    report = validated(guest_images[kind, "partition", container], FORMATS[container])
    assert (report["layout"], report["partition_table"]) == ("partition", None)
    assert [p["filesystem"] for p in report["partitions"]] == [kind] and report["os"][
        "distribution"
    ] == "debian"
    assert "Guest.NoFilesystem" not in {f["code"] for f in report["findings"]}
    assert report == validated(guest_images[kind, "partition", "raw"], "raw")


def test_the_reader_opens_every_format_the_name_mapping_says_it_reads() -> None:
    assert set(formats.GUEST_FORMATS) == READABLE_FORMATS


@pytest.mark.parametrize("container", list(FORMATS))
@pytest.mark.parametrize("kind", ["ext2", "ntfs"])
def test_every_name_inspection_gives_a_bare_filesystem_reads_it_as_raw(
    kind: str, container: str, guest_images: dict[tuple[str, str, str], Path], tmp_path: Path
) -> None:
    # the import workflows validate with the format inspection found; qemu-img's name (vpc) must do too
    image = guest_images[kind, "partition", container]
    found = inspect_image(image, None, config=config_mod.from_dict({}), workdir=tmp_path)
    assert found.safe and found.format == FORMATS[container], found.to_dict()
    raw = validated(guest_images[kind, "partition", "raw"], "raw")
    for name in {found.format, found.qemu_format, found.format.upper()}:
        assert validated(image, name) == raw, name
