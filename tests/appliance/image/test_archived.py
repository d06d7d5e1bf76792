"""A disk image given inside an archive (:mod:`appliance.image.archived`): archives written by GNU tar, zip
(also split, and empty) and Python's ``zipfile``, plain or compressed, are refused as
``FormatMismatch.Archive`` naming the disk inside (a compressed one before the rest is decompressed), an OVA
given as a disk is told to be imported as one, and a disk whose first sector only resembles a tar header is
still a disk (also to ``imaging convert`` given no format, which takes a tar for an OVA), while only a tar
whose first member is a ``.ovf`` begins an OVA an import given no format opens as one."""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from appliance.config import Config
from appliance.image.formats import archive_of
from appliance.image.inspect import inspect_image
from appliance.image.ova import is_ova
from appliance.image.ovacontainer import begins_ova
from appliance.image.stream import RawStreamCheck
from tests import imagefactory as factory

MiB = 1 << 20
TAR_HEADER_BYTES = 512


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """``disk.raw``: a 16 MiB MBR disk (a valid RAW image by itself) in a directory of its own."""
    (tmp_path / "src").mkdir()
    return factory.raw_mbr(tmp_path / "src", "disk.raw")


def _tar(disk: Path, out: Path, *options: str) -> Path:
    subprocess.run(["tar", *options, "-f", str(out), "-C", str(disk.parent), disk.name], check=True)
    return out


def _error_codes(path: Path, claimed: str | None, cfg: Config, work: Path) -> tuple[list[str], str]:
    result = inspect_image(path, claimed, config=cfg, workdir=work)
    return [f.code for f in result.errors], " ".join(f.message for f in result.errors)


@pytest.mark.parametrize(
    "options",
    [
        ("-c", "--format=oldgnu", "-S"),
        ("-c", "--format=posix"),
        ("-c", "--format=ustar"),
        ("-c", "--format=gnu"),
        ("-c", "--format=v7"),
    ],
    ids=["gce-oldgnu-sparse", "posix", "ustar", "gnu", "v7-without-magic"],
)
@pytest.mark.parametrize("claimed", ["raw", None])
def test_a_disk_in_a_tar_is_refused_as_an_archive_naming_the_disk_inside(
    options: tuple[str, ...], claimed: str | None, disk: Path, tmp_path: Path, cfg: Config, work: Path
) -> None:
    packed = _tar(disk, tmp_path / "disk.tar", *options)
    codes, message = _error_codes(packed, claimed, cfg, work)
    assert codes == ["FormatMismatch.Archive"]
    assert "a tar archive (its first member is 'disk.raw')" in message and "(tar -xf)" in message
    assert os.listdir(work) == []


def test_a_disk_in_a_zip_is_refused_as_an_archive(
    disk: Path, tmp_path: Path, cfg: Config, work: Path
) -> None:
    packed = tmp_path / "disk.zip"
    with zipfile.ZipFile(packed, "w", zipfile.ZIP_STORED) as z:  # stored: the disk's own bytes follow
        z.write(disk, "disk.raw")
    subprocess.run(["zip", "-q", "-j", str(tmp_path / "deflated.zip"), str(disk)], check=True)
    for path in (packed, tmp_path / "deflated.zip"):
        codes, message = _error_codes(path, "raw", cfg, work)
        assert codes == ["FormatMismatch.Archive"], path
        assert "zip archive (its first member is 'disk.raw')" in message and "(unzip)" in message


@pytest.mark.parametrize("pack", ["zip", "tar"])
def test_an_ova_in_a_zip_or_a_tar_is_told_to_be_imported_as_the_ova_inside(
    pack: str, disk: Path, tmp_path: Path, cfg: Config, work: Path
) -> None:
    ova = _tar(disk, tmp_path / "vm.ova", "-c", "--format=ustar")  # (what is inside is not read)
    packed = tmp_path / f"vm.{pack}"
    if pack == "zip":
        subprocess.run(["zip", "-q", "-j", str(packed), str(ova)], check=True)
    else:
        subprocess.run(["tar", "-cf", str(packed), "-C", str(tmp_path), ova.name], check=True)
    codes, message = _error_codes(packed, None, cfg, work)
    assert codes == ["FormatMismatch.Archive"]
    assert "first member is 'vm.ova'" in message and "import the OVA it holds" in message, message


def test_the_first_segment_of_a_split_zip_and_an_empty_zip_are_refused_as_archives(
    disk: Path, tmp_path: Path, cfg: Config, work: Path
) -> None:
    # zip -s writes disk.z01, disk.z02, ... and disk.zip (its last segment); the first begins with a marker
    subprocess.run(["zip", "-q", "-j", "-s", "64k", str(tmp_path / "split.zip"), str(disk)], check=True)
    first = tmp_path / "split.z01"
    assert first.read_bytes()[:4] == b"PK\x07\x08"
    codes, message = _error_codes(first, "raw", cfg, work)
    assert codes == ["FormatMismatch.Archive"]
    assert "zip archive (its first member is 'disk.raw')" in message
    # unzip reads no segment alone (nor the last, split.zip): the message says to join them first
    assert "first segment of a split zip" in message and "zip -s 0" in message and "(unzip)" not in message
    empty = tmp_path / "empty.zip"
    zipfile.ZipFile(empty, "w").close()  # its end-of-central-directory record alone: 22 bytes
    assert archive_of(empty.read_bytes()) == "zip"
    codes, message = _error_codes(empty, None, cfg, work)
    assert codes == ["FormatMismatch.Archive"] and "a zip archive, not a disk image" in message
    assert "it is empty" in message and "(unzip)" not in message  # nothing in it to unpack
    # the marker alone does not make a zip: a local file header must follow it
    assert archive_of(b"PK\x07\x08" + bytes(1020)) is None


@pytest.mark.parametrize(
    ("flag", "kind"), [("-z", "gzip"), ("-J", "xz"), ("-j", "bzip2"), ("--zstd", "zstd")]
)
def test_a_compressed_tar_is_refused_from_its_first_decompressed_block(
    flag: str, kind: str, tmp_path: Path, cfg: Config, work: Path
) -> None:
    """As a GCE image is shipped (``tar --format=oldgnu -Sczf disk.tar.gz disk.raw``): refused before the
    rest is decompressed, so nothing is left in the work directory and no decompressed size is known."""
    (tmp_path / "src").mkdir()
    data = tmp_path / "src" / "disk.raw"
    data.write_bytes(os.urandom(8 * MiB))  # more than the first decoded block, in every compression
    packed = _tar(data, tmp_path / "disk.tar.x", "-c", "--format=oldgnu", "-S", flag)
    result = inspect_image(packed, None, config=cfg, workdir=work)
    assert [f.code for f in result.errors] == ["FormatMismatch.Archive"]
    assert f"a {kind}-compressed tar archive (its first member is 'disk.raw')" in result.errors[0].message
    assert "decompressed_size" not in result.details and os.listdir(work) == []


def test_an_archive_streamed_onto_a_volume_as_raw_is_refused_as_an_archive(
    disk: Path, tmp_path: Path
) -> None:
    """ImportVolume of a RAW upload and a bundle write onto the volume as the bytes stream past, checked by
    :class:`RawStreamCheck` (no file to inspect): the same refusal as the file's inspection, from the
    first bytes however the upload's parts cut them."""
    packed = _tar(disk, tmp_path / "disk.tar", "-c", "--format=posix")
    zipped = tmp_path / "disk.zip"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_STORED) as z:
        z.write(disk, "disk.raw")

    def verdict(path: Path, piece: int) -> list[str]:
        """The check's findings on ``path`` fed ``piece`` bytes at a time (its first 64 KiB; then 1 MiB)."""
        check = RawStreamCheck()
        data = memoryview(path.read_bytes())
        offsets = [*range(0, 64 << 10, piece), *range(64 << 10, len(data), MiB)]
        for start, end in zip(offsets, [*offsets[1:], len(data)], strict=True):
            check.eat(data[start:end])
        return [f"{f.code}: {f.message}" for f in check.verdict()]

    for piece in (100, 64 << 10):
        [tar_finding] = verdict(packed, piece)
        assert tar_finding.startswith(
            "FormatMismatch.Archive: the file is a tar archive (its first member is 'disk.raw')"
        ), piece
        [zip_finding] = verdict(zipped, piece)
        assert zip_finding.startswith("FormatMismatch.Archive: the file is a zip archive"), piece
        assert verdict(disk, piece) == []


@pytest.mark.parametrize("claimed", ["vhd", "vhd.gz", None])
def test_a_fixed_vhd_whose_guest_disk_begins_with_a_tar_is_a_vhd(
    claimed: str | None, disk: Path, tmp_path: Path, cfg: Config, work: Path
) -> None:
    """A fixed VHD is its guest's disk and a footer; a data disk written by ``tar -cf /dev/sdX`` begins
    with a tar. Its footer, not its first sector, says what it is (compressed and claimed a VHD, only
    once decompressed)."""
    packed = _tar(disk, tmp_path / "data.tar", "-c", "--format=gnu")
    with open(packed, "r+b") as f:
        f.truncate(16 * MiB)
    vhd = tmp_path / "disk.vhd"
    factory.qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed", packed, vhd)
    if claimed == "vhd.gz":
        subprocess.run(["gzip", "-1", str(vhd)], check=True)
        vhd = vhd.with_name("disk.vhd.gz")
    result = inspect_image(vhd, claimed, config=cfg, workdir=work)
    assert result.safe and result.format == "vhd", [f.message for f in result.errors]
    assert result.details.get("vhd_subformat") == "fixed"


def test_an_ova_given_as_a_disk_is_told_to_be_imported_as_an_ova(
    disk: Path, tmp_path: Path, cfg: Config, work: Path
) -> None:
    (disk.parent / "vm.ovf").write_text("<Envelope/>")
    packed = tmp_path / "vm.ova"
    subprocess.run(["tar", "-cf", str(packed), "-C", str(disk.parent), "vm.ovf", "disk.raw"], check=True)
    codes, message = _error_codes(packed, "raw", cfg, work)
    assert codes == ["FormatMismatch.Archive"]
    assert "first member is 'vm.ovf'" in message and "import it as an OVA (ImportImage Format=ova" in message


def test_a_long_first_member_name_is_read_through_its_extended_header(
    disk: Path, tmp_path: Path, cfg: Config, work: Path
) -> None:
    long_name = "a-disk-name-longer-than-the-hundred-bytes-of-a-ustar-header-" * 2 + "disk.raw"
    disk.rename(disk.with_name(long_name))
    for fmt in ("gnu", "posix"):
        packed = _tar(disk.with_name(long_name), tmp_path / f"{fmt}.tar", "-c", f"--format={fmt}")
        codes, message = _error_codes(packed, "raw", cfg, work)
        assert codes == ["FormatMismatch.Archive"] and f"'{long_name}'" in message, fmt


def test_a_disk_whose_first_sector_only_resembles_a_tar_header_is_a_disk(
    disk: Path, cfg: Config, work: Path
) -> None:
    """``ustar`` at 257 of a boot sector's code area, without a tar header's checksum at 148: not a tar."""
    head = bytearray(disk.read_bytes()[:512])
    head[257:263] = b"ustar\0"
    assert archive_of(bytes(head)) is None
    factory.patch(disk, 257, b"ustar\0")
    result = inspect_image(disk, "raw", config=cfg, workdir=work)
    assert result.safe and result.format == "raw", [f.code for f in result.findings]
    assert not is_ova(disk)  # imaging convert given no format converts it as a disk, not an OVA
    # the same sector given a valid checksum over it is a tar header
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    assert archive_of(bytes(head)) == "tar"


def test_a_tar_header_summed_as_signed_bytes_is_a_tar() -> None:
    """Old tars summed a header's bytes as signed chars; POSIX has readers accept that checksum too, so a
    first member whose name holds bytes above 127 still makes a tar."""
    head = bytearray(TAR_HEADER_BYTES)
    name = "disk-é.raw".encode()
    head[: len(name)] = name
    head[100:148] = b"0000644\x000000000\x000000000\x0000000001000\x0000000000000\x00"
    head[156:157], head[257:265] = b"0", b"ustar\x0000"
    head[148:156] = b" " * 8
    signed = sum(c - 256 if c >= 128 else c for c in head)
    head[148:156] = b"%06o\0 " % signed
    assert archive_of(bytes(head)) == "tar"


@pytest.mark.parametrize(
    ("head", "kind"),
    [(b"7z\xbc\xaf\x27\x1c\x00\x04", "7z"), (b"Rar!\x1a\x07\x01\x00", "rar"), (b"PK\x03\x04\x14\x00", "zip")],
)
def test_seven_zip_rar_and_zip_are_known_by_their_first_bytes(head: bytes, kind: str) -> None:
    assert archive_of(head + bytes(1024)) == kind
    assert archive_of(bytes(1) + head + bytes(1024)) is None


@pytest.mark.parametrize(
    ("first", "options", "ova"),
    [
        ("vm.ovf", ("--format=ustar",), True),
        ("VM.OVF", ("--format=posix",), True),
        ("vm.ovf", ("--format=v7",), True),  # no magic: imaging convert took it for a disk before
        ("disk.raw", ("--format=ustar",), False),
    ],
    ids=["ustar-ovf-first", "posix-upper-case", "v7-ovf-first", "disk-first"],
)
def test_an_ova_begins_with_a_tar_whose_first_member_is_its_descriptor(
    first: str, options: tuple[str, ...], ova: bool, tmp_path: Path
) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / first).write_bytes(b"<Envelope/>")
    (tmp_path / "in" / "vm-disk1.vmdk").write_bytes(bytes(4096))
    packed = tmp_path / "vm.ova"
    members = ["-C", str(tmp_path / "in"), first, "vm-disk1.vmdk"]
    subprocess.run(["tar", "-c", *options, "-f", str(packed), *members], check=True)
    head = packed.read_bytes()[: 8 << 10]
    assert begins_ova(head) is ova
    assert is_ova(packed)  # imaging convert given no format takes any tar for an OVA
    # the same header with one byte of its name changed no longer sums to its checksum: not a tar at all
    broken = bytes([head[0] ^ 1]) + head[1:]
    assert not begins_ova(broken)
