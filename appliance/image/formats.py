"""Disk-image format names: the user-facing names, qemu-img's names and the inspector's names.

Users and the EC2 API say ``vhd``; qemu-img calls the same format ``vpc``. The oslo format
inspector says ``gpt`` for anything with an MBR/GPT partition table, which is raw to qemu-img.
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

_QEMU_NAMES = {"vhd": "vpc"}
_FROM_QEMU = {v: k for k, v in _QEMU_NAMES.items()}
_SUFFIXES = {"gz": "gzip", "gzip": "gzip", "xz": "xz", "zst": "zstd", "zstd": "zstd", "bz2": "bzip2"}


def to_qemu(fmt: str) -> str:
    """qemu-img's name for a user-facing format name (``vhd`` → ``vpc``)."""
    return _QEMU_NAMES.get(fmt, fmt)


def from_qemu(fmt: str) -> str:
    """User-facing name for a qemu-img format name (``vpc`` → ``vhd``)."""
    return _FROM_QEMU.get(fmt, fmt)


def parse_claim(claim: str | None) -> tuple[str | None, str | None]:
    """Split a claimed format such as ``raw.gz`` into ``("raw", "gzip")``.

    Raises :class:`UsageError` for a name the toolkit does not know.
    """
    if claim is None:
        return None, None
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
    name = from_qemu(name)
    if name not in INPUT_FORMATS:
        raise UsageError(f"unknown image format {claim!r}; use one of {', '.join(INPUT_FORMATS)}")
    return name, compression


def check_output_format(fmt: str) -> str:
    """Validate an output format name and return its user-facing form."""
    name = from_qemu(fmt.strip().lower())
    if name not in OUTPUT_FORMATS:
        raise UsageError(f"cannot write format {fmt!r}; use one of {', '.join(OUTPUT_FORMATS)}")
    return name
