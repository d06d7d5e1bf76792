"""The container around an OVA's members: what an OVA must not be wrapped in, and members the
descriptor says are gzip-compressed.

An OVA is an uncompressed tar (DSP0243; ``ova-ovf.md`` §2, §6 #1): a gzip/xz/bzip2/zstd-compressed file or a
zip is refused from its first bytes with ``Ova.Compressed``, naming the tool that unwraps it (virt-v2v
accepts such files; the specification and VMware do not, and a compressed tar cannot be checked member by
member as it streams). A compressed file not claimed as an OVA gets the same refusal when its first
decompressed bytes are a tar whose first member is a ``.ovf`` (:func:`refuse_compressed_ova`, run by the
inspection of a compressed input and by the preflight of a compressed source, on bytes the confined
decompressor decoded): otherwise the tar would be taken for a RAW disk. A member whose ``File`` says
``ovf:compression="gzip"`` (ovftool ``--compress``, SUSE KIWI, …: ``§6 #12``) is decompressed after it was
verified against the manifest (which hashes the member as stored), by the confined decompressor, under a
cap of its capacity plus a VMDK's metadata.
"""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path
from typing import BinaryIO

from ..config import Limits
from ..errors import ImageRejected
from .decompress import decompress, detect_compression
from .formats import SIGNATURE_BYTES, ZIP_EMPTY_MAGIC, archive_of, compression_of, split_zip

_reject = ImageRejected.nothing_imported


class Prefixed:
    """A forward-only stream whose first bytes were already read (to look at the container's magic)."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head, self._rest = head, rest

    def read(self, size: int = -1) -> bytes:
        if not self._head:
            return self._rest.read(size)
        if size < 0:
            data, self._head = self._head + self._rest.read(), b""
            return data
        data, self._head = self._head[:size], self._head[size:]
        return data if len(data) == size else data + self._rest.read(size - len(data))


#: the tool that unwraps each container an OVA may come wrapped in
_UNWRAP = {"zip": "unzip", "gzip": "gunzip", "xz": "unxz", "bzip2": "bunzip2", "zstd": "unzstd"}
#: what makes one zip of the segments of a split zip (``zip -s``), whose segments unzip cannot read
JOIN_SPLIT_ZIP = (
    "join its segments first (zip -s 0 ARCHIVE.zip --out whole.zip, ARCHIVE.zip its last segment)"
)


def _compressed(kind: str) -> ImageRejected:
    return _reject(
        "Ova.Compressed",
        f"the file is {kind}-compressed, and an OVA is an uncompressed tar: decompress it ({_UNWRAP[kind]}) "
        "and import the .ova it holds",
    )


def refuse_wrapped(head: bytes) -> None:
    """``Ova.Compressed`` for an OVA wrapped in a compressed file or a zip (not a tar: DSP0243 §2). An empty
    zip wraps nothing: it is refused as not a tar, as any other file that is none."""
    if split_zip(head):
        raise _reject(
            "Ova.Compressed",
            "the file is the first segment of a split zip, and an OVA is an uncompressed tar: "
            f"{JOIN_SPLIT_ZIP}, unzip that and import the .ova it holds",
        )
    zipped = archive_of(head) == "zip" and not head.startswith(ZIP_EMPTY_MAGIC)
    kind = "zip" if zipped else compression_of(head[:SIGNATURE_BYTES])
    if kind is not None:
        raise _compressed(kind)


#: bytes of one PAX or GNU long-name header at most, and of all of an archive's together: ``tarfile`` parses
#: PAX records with regular expressions whose cost grows with the square of a record's length (CPython 3.11
#: before 3.11.10: CVE-2024-6232; 64 KB of digits measured 2.5 CPU-s), in the task's process holding the
#: GIL, so the cost of every header is bounded by the square of the total (~0.6 s). A real OVA's members
#: carry a few hundred bytes of them each (a name of at most 255 bytes, times, owners, a few xattrs)
MAX_EXTENDED_HEADER = 16 << 10
MAX_EXTENDED_TOTAL = 32 << 10
_EXTENDED = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


class ExtendedHeaderTooLarge(tarfile.TarError):
    """A PAX or GNU long-name header over :data:`MAX_EXTENDED_HEADER`, or the archive's over
    :data:`MAX_EXTENDED_TOTAL` together (not a ``HeaderError``: ``tarfile`` passes it on unchanged)."""


def capped_tarinfo() -> type[tarfile.TarInfo]:
    """A ``TarInfo`` class for ``tarfile.open(tarinfo=…)`` of one archive that refuses an extended header
    (PAX, GNU long name or link) before ``tarfile`` parses it when it is over :data:`MAX_EXTENDED_HEADER`
    or takes the archive's extended headers over :data:`MAX_EXTENDED_TOTAL`
    (:class:`ExtendedHeaderTooLarge`). A class per archive: it counts that archive's headers."""
    spent = 0

    class Capped(tarfile.TarInfo):
        def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
            nonlocal spent
            if self.type in _EXTENDED:
                spent += self.size
                if self.size > MAX_EXTENDED_HEADER or spent > MAX_EXTENDED_TOTAL:
                    raise ExtendedHeaderTooLarge(
                        f"an extended (PAX or long-name) header of {self.size} bytes, {spent} in all so far "
                        f"(at most {MAX_EXTENDED_HEADER} each, {MAX_EXTENDED_TOTAL} together)"
                    )
            return super()._proc_member(tar)  # type: ignore[misc]

    return Capped


#: bytes of a decompressed head that :func:`first_member` reads: a first member's ustar header with a
#: PAX or GNU long-name header before it (a descriptor name is at most 255 bytes) fits many times over.
#: Not more, though :func:`capped_tarinfo` bounds each header already: this sniff runs on every compressed
#: input, OVA or not, so its worst case stays far below that bound's (see :data:`MAX_EXTENDED_HEADER`)
FIRST_HEADER_BYTES = 8 << 10


def first_member(head: bytes) -> str | None:
    """The name of the first member of the tar that ``head`` begins (after PAX and GNU long names), or
    None when ``head`` does not begin a tar. Only the first :data:`FIRST_HEADER_BYTES` of ``head`` are
    read: a header that needs more is None."""
    try:
        with tarfile.open(
            fileobj=io.BytesIO(head[:FIRST_HEADER_BYTES]), mode="r|", tarinfo=capped_tarinfo()
        ) as tar:
            member = tar.next()
    except Exception:  # hostile bytes: whatever tarfile makes of them, they do not begin an OVA
        return None
    return member.name if member is not None else None


def begins_ova(head: bytes) -> bool:
    """Whether ``head``, a file's first bytes (:data:`FIRST_HEADER_BYTES` suffice), begin an OVA: a tar
    (:func:`~appliance.image.formats.archive_of`: its header's checksum holds) whose first member is a
    descriptor (``*.ovf``), where DSP0243 puts it. What an import given no format opens as an OVA."""
    if archive_of(head) != "tar":
        return False
    name = first_member(head)
    return name is not None and name.lower().endswith(".ovf")


def refuse_compressed_ova(kind: str, head: bytes) -> None:
    """``Ova.Compressed`` when ``head``, the first decompressed bytes of a ``kind``-compressed file, begin
    a tar whose first member is a descriptor (``*.ovf``): an OVA (DSP0243 puts the ``.ovf`` first)
    wrapped in ``kind``, which is refused as :func:`refuse_wrapped` refuses it, not read as a disk."""
    if begins_ova(head):
        raise _compressed(kind)


def gunzip_cap(capacity: int, limits: Limits) -> int:
    """The most a gzip ``File`` of a disk of ``capacity`` bytes may decompress to: the capacity and a
    VMDK's metadata, within the decompression limit."""
    return min(capacity + capacity // 64 + (1 << 20), limits.max_decompressed_size)


def gunzip(path: Path, name: str, capacity: int, limits: Limits, cancel: threading.Event | None) -> Path:
    """The disk of the ``File@compression="gzip"`` member ``name`` (at ``path``), decompressed by the
    confined decompressor beside it, at most its ``capacity`` plus a VMDK's metadata (more is
    ``SizeLimitExceeded.Decompressed``: a bomb); the member itself is removed."""
    if detect_compression(path) != "gzip":
        raise _reject("Ova.Corrupt", f"the descriptor says {name!r} is gzip-compressed; it is not")
    cap = gunzip_cap(capacity, limits)
    out = path.with_name(f"{path.name}.disk")
    decompress(path, out, "gzip", cap, cancel=cancel, limits=limits)
    path.unlink()
    return out
