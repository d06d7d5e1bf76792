"""Disk-image format names: the user-facing names, qemu-img's names, the inspector's and the guest reader's.

Users and the EC2 API say ``vhd``; qemu-img calls the same format ``vpc``. The oslo format
inspector says ``gpt`` for anything with an MBR/GPT partition table, which is raw to qemu-img.
The guest reader (:mod:`appliance.guest.reader`) opens a set of its own (:data:`GUEST_FORMATS`).
This module is the one place those names are translated.
"""

from __future__ import annotations

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
