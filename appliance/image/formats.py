"""Disk-image format names: the user-facing names, qemu-img's names, the inspector's and the guest reader's.

Users and the EC2 API say ``vhd``; qemu-img calls the same format ``vpc``. The oslo format
inspector says ``gpt`` for anything with an MBR/GPT partition table, which is raw to qemu-img.
The guest reader (:mod:`appliance.guest.reader`) opens a set of its own (:data:`GUEST_FORMATS`).
This module is the one place those names are translated, and the one place that knows how each
format announces itself in its bytes (:func:`container_format`, :func:`compression_of`, and
:func:`archive_of` for the archives a disk image is shipped in).
"""

from __future__ import annotations

from typing import overload

from ..errors import UsageError

#: formats a user may claim for an input image
INPUT_FORMATS = ("raw", "qcow2", "vmdk", "vhd", "vhdx", "qed", "iso")
#: formats the toolkit can write
OUTPUT_FORMATS = ("raw", "qcow2", "vmdk", "vhd", "vhdx")
#: compression containers recognised by magic and by a ``.gz``-style suffix on a claim
COMPRESSIONS = ("gzip", "xz", "zstd", "bzip2")
#: formats the content inspector may report beyond :data:`INPUT_FORMATS` (no claim names them): ``vdi``
#: passes inspection, ``luks`` is always rejected
DETECTED_ONLY_FORMATS = ("vdi", "luks")
#: formats the guest reader opens directly (its names; :mod:`appliance.guest.reader` has a container for each)
GUEST_FORMATS = ("raw", "qcow2", "vmdk", "vhd", "vhdx", "vdi")

_QEMU_NAMES = {"vhd": "vpc"}
_FROM_QEMU = {v: k for k, v in _QEMU_NAMES.items()}
_SUFFIXES = {"gz": "gzip", "gzip": "gzip", "xz": "xz", "zst": "zstd", "zstd": "zstd", "bz2": "bzip2"}
#: the inspector's name for raw with a partition table
_FROM_INSPECTOR = {"gpt": "raw"}
#: formats the guest reader reads under another name: an ISO as the raw bytes it is (qemu-img reads it as raw)
_GUEST_ALIASES = {"iso": "raw"}


def to_qemu(fmt: str) -> str:
    """qemu-img's name for a user-facing format name (``vhd`` → ``vpc``)."""
    return _QEMU_NAMES.get(fmt, fmt)


def from_qemu(fmt: str) -> str:
    """User-facing name for a qemu-img format name (``vpc`` → ``vhd``)."""
    return _FROM_QEMU.get(fmt, fmt)


def _split(claim: str) -> tuple[str, str | None]:
    """``"RAW.gz"`` → ``("raw", "gzip")``: the lower-case name and the compression its suffix names."""
    name = claim.strip().lower()
    compression = None
    if "." in name:
        name, _, suffix = name.partition(".")
        if suffix not in _SUFFIXES:
            raise UsageError(
                f"unknown compression suffix {suffix!r} in format {claim!r}; "
                f"use one of {', '.join(sorted(_SUFFIXES))}"
            )
        compression = _SUFFIXES[suffix]
    return from_qemu(name), compression


@overload
def parse_claim(claim: str) -> tuple[str, str | None]: ...
@overload
def parse_claim(claim: None) -> tuple[None, None]: ...
@overload
def parse_claim(claim: str | None) -> tuple[str | None, str | None]: ...


def parse_claim(claim: str | None) -> tuple[str | None, str | None]:
    """Split a claimed format such as ``raw.gz`` into ``("raw", "gzip")``.

    Raises :class:`UsageError` for a name the toolkit does not know.
    """
    if claim is None:
        return None, None
    name, compression = _split(claim)
    if name not in INPUT_FORMATS:
        raise UsageError(f"unknown image format {claim!r}; use one of {', '.join(INPUT_FORMATS)}")
    return name, compression


def guest_format(fmt: str) -> str | None:
    """The guest reader's name (one of :data:`GUEST_FORMATS`) for a format as any part of the appliance
    spells it: user-facing (``vhd``, fixed or dynamic alike), qemu-img's (``vpc``), the inspector's
    (``gpt``), in any case; ``iso`` is read as raw. ``None`` for a known format the reader does not open
    (``qed``, ``luks``).

    Raises :class:`UsageError` for a compressed format (``raw.gz``: the reader needs the uncompressed
    image) or an unknown name.
    """
    name, compression = _split(fmt)
    if compression is not None:
        raise UsageError(
            f"guest validation reads uncompressed images; decompress the {compression} input first"
        )
    name = _GUEST_ALIASES.get(name, _FROM_INSPECTOR.get(name, name))
    if name in GUEST_FORMATS:
        return name
    if name in INPUT_FORMATS or name in DETECTED_ONLY_FORMATS:
        return None
    raise UsageError(f"unknown image format {fmt!r}; use one of {', '.join(GUEST_FORMATS)}")


def check_output_format(fmt: str) -> str:
    """Validate an output format name and return its user-facing form."""
    name = from_qemu(fmt.strip().lower())
    if name not in OUTPUT_FORMATS:
        raise UsageError(f"cannot write format {fmt!r}; use one of {', '.join(OUTPUT_FORMATS)}")
    return name


# -- signatures: the bytes by which each format announces itself --------------------------------------

#: qcow2: ``QFI\xfb`` at offset 0; a big-endian header follows (version at 4, backing file offset at 8
#: and size at 16, incompatible features at 72 in version 3)
QCOW2_MAGIC = b"QFI\xfb"
#: VMDK sparse extent (monolithicSparse, streamOptimized): ``KDMV`` at offset 0, a little-endian header
#: (descriptor offset/size in sectors at 28/36, grain directory offset at 56); a streamOptimized
#: file repeats the header as a footer 1024 bytes before its end
VMDK_MAGIC = b"KDMV"
#: VMDK text descriptor: begins with this comment line
VMDK_DESCRIPTOR_START = b"# Disk DescriptorFile"
#: VHD (qemu-img's ``vpc``): the 512-byte footer in the last sector starts with this cookie (a
#: dynamic or differencing VHD also has a copy at offset 0; disk type, big-endian, at offset 60)
VHD_COOKIE = b"conectix"
#: VHDX: the file type identifier at offset 0
VHDX_MAGIC = b"vhdxfile"
#: QED: at offset 0
QED_MAGIC = b"QED\x00"
#: VDI: the signature 0xbeda107f (little-endian) at offset 0x40, after a 64-byte text banner
VDI_MAGIC_OFFSET, VDI_MAGIC = 0x40, b"\x7f\x10\xda\xbe"
#: how many leading bytes :func:`container_format` and :func:`compression_of` need
SIGNATURE_BYTES = VDI_MAGIC_OFFSET + len(VDI_MAGIC)

_CONTAINER_MAGICS = {
    QCOW2_MAGIC: "qcow2",
    VMDK_MAGIC: "vmdk",
    VHDX_MAGIC: "vhdx",
    QED_MAGIC: "qed",
    VHD_COOKIE: "vhd",
}
#: bzip2 block magics after ``BZh`` and the block size digit: pi (a data block) or sqrt(pi) (end of
#: stream: an empty archive)
_BZIP2_BLOCK_MAGICS = (b"\x31\x41\x59\x26\x53\x59", b"\x17\x72\x45\x38\x50\x90")
#: tar (POSIX ustar, PAX, GNU): every 512-byte header holds ``ustar`` at offset 257 (``ustar\0`` + version
#: ``00``, or GNU's ``ustar  \0``) and, at 148, its checksum: 6-8 octal digits, the sum of the header's
#: bytes with those 8 counted as spaces (unsigned; POSIX has readers accept the signed sum old tars wrote)
TAR_MAGIC_OFFSET, TAR_MAGIC = 257, b"ustar"
TAR_CHECKSUM_OFFSET, TAR_CHECKSUM_SIZE, TAR_HEADER = 148, 8, 512
#: a V7 tar header (``tar --format=v7``, old Unix tars) has no magic: after its name (0-99), its mode, uid,
#: gid, size and mtime (100-147) are octal numbers (digits, spaces, NULs) and its type (156) a digit or NUL
TAR_V7_NUMBERS, TAR_TYPE_OFFSET, TAR_V7_TYPES = (100, 148), 156, b"\x0001234567"
#: zip: a local file header at 0 (``PK\3\4``), its name's length at 26 (little-endian 16 bits), the name at 30
ZIP_LOCAL_MAGIC, ZIP_NAME_LENGTH_OFFSET, ZIP_NAME_OFFSET = b"PK\x03\x04", 26, 30
#: a zip without a member is only its end-of-central-directory record (22 bytes), which then begins it
ZIP_EMPTY_MAGIC = b"PK\x05\x06"
#: the first segment of a split or spanned zip (``zip -s``) begins with a marker of 4 bytes (``PK\7\8``, or
#: ``PK00`` from older tools), then the first local file header
ZIP_SPLIT_MARKERS = (b"PK\x07\x08", b"PK00")
#: other archive formats images are shipped in, by their magic at offset 0
_ARCHIVE_MAGICS = {b"7z\xbc\xaf\x27\x1c": "7z", b"Rar!\x1a\x07": "rar"}
#: the file-name suffix of each compression (``disk.raw.gz``)
COMPRESSION_SUFFIXES = {"gzip": ".gz", "xz": ".xz", "zstd": ".zst", "bzip2": ".bz2"}


def container_format(head: bytes) -> str | None:
    """The container format whose signature ``head`` (the first :data:`SIGNATURE_BYTES` bytes of a file)
    starts with, or None (raw, or a format announced only at its end such as a fixed VHD)."""
    for magic, name in _CONTAINER_MAGICS.items():
        if head.startswith(magic):
            return name
    if head[VDI_MAGIC_OFFSET : VDI_MAGIC_OFFSET + len(VDI_MAGIC)] == VDI_MAGIC:
        return "vdi"
    return None


def compression_of(head: bytes) -> str | None:
    """``gzip``, ``xz``, ``zstd`` or ``bzip2`` when ``head`` starts with that compression's magic:
    gzip ``1f 8b`` with method ``08`` (deflate); xz ``fd 37 7a 58 5a 00``; a zstd frame
    ``28 b5 2f fd``; bzip2 ``BZh``, a block size digit 1-9 and a block magic."""
    if head.startswith(b"\x1f\x8b\x08"):
        return "gzip"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[3:4] != b"0" and head[4:10] in _BZIP2_BLOCK_MAGICS:
        return "bzip2"
    return None


def strip_compression_suffix(name: str) -> str | None:
    """``disk.raw.gz`` → ``disk.raw`` (any case; ``.gzip`` and ``.zstd`` too); None without such a suffix."""
    for suffix in sorted({f".{s}" for s in _SUFFIXES}, key=len, reverse=True):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def archive_of(head: bytes) -> str | None:
    """``tar``, ``zip``, ``7z`` or ``rar`` when ``head`` (a file's first bytes, at least a tar header's
    512) begins such an archive, else None. A tar needs a valid header checksum and its magic, or for a V7
    tar (no magic) a name and the octal fields of a V7 header, so a disk whose first sector merely holds
    ``ustar`` at 257 is not taken for one."""
    if head.startswith((ZIP_LOCAL_MAGIC, ZIP_EMPTY_MAGIC)) or split_zip(head):
        return "zip"
    for magic, name in _ARCHIVE_MAGICS.items():
        if head.startswith(magic):
            return name
    if len(head) < TAR_HEADER:
        return None
    if head[TAR_MAGIC_OFFSET : TAR_MAGIC_OFFSET + len(TAR_MAGIC)] != TAR_MAGIC and not _v7_tar_header(head):
        return None
    field = head[TAR_CHECKSUM_OFFSET : TAR_CHECKSUM_OFFSET + TAR_CHECKSUM_SIZE]
    digits = field.replace(b"\0", b" ").strip()
    if not digits or any(c not in b"01234567" for c in digits):
        return None
    header = head[:TAR_HEADER]
    unsigned = sum(header) - sum(field) + 8 * ord(" ")
    signed = unsigned - 256 * sum(1 for c in header if c >= 128) + 256 * sum(1 for c in field if c >= 128)
    return "tar" if int(digits, 8) in (unsigned, signed) else None


def _v7_tar_header(head: bytes) -> bool:
    """Whether ``head`` has the shape of a V7 tar header (the checksum still to be checked)."""
    start, end = TAR_V7_NUMBERS
    numbers = head[start:end]
    return head[0] != 0 and head[TAR_TYPE_OFFSET] in TAR_V7_TYPES and not numbers.strip(b"01234567 \0")


def split_zip(head: bytes) -> bool:
    """Whether ``head`` begins the first segment of a split zip: its marker, then a local file header."""
    return head.startswith(ZIP_SPLIT_MARKERS) and head[4:8] == ZIP_LOCAL_MAGIC


def zip_first_name(head: bytes) -> str | None:
    """The first member's name of the zip ``head`` begins (its local file header's, after a split zip's
    marker), or None when the header does not fit in ``head`` or the zip has no member."""
    if split_zip(head):
        head = head[4:]
    if not head.startswith(ZIP_LOCAL_MAGIC) or len(head) < ZIP_NAME_OFFSET:
        return None
    length = int.from_bytes(head[ZIP_NAME_LENGTH_OFFSET : ZIP_NAME_LENGTH_OFFSET + 2], "little")
    name = head[ZIP_NAME_OFFSET : ZIP_NAME_OFFSET + length]
    return name.decode("utf-8", "replace") if len(name) == length else None
