"""A disk image given inside an archive: refused, not imported as a RAW disk that holds the archive.

Images are often shipped in archives: a GCE image is ``disk.raw`` in a ``.tar.gz``, the Eucalyptus service
image a ``.tar.xz``, others come zipped. None of these is a disk, and none of their bytes says "not raw" to
the format inspector, so without this check such a file (or, compressed, what it decompresses to) passes
inspection as RAW and becomes a volume that holds an archive header where the boot sector should be.

:func:`archive_finding` sees the archive in an input's first bytes
(:func:`appliance.image.formats.archive_of`) and names its first member, so the refusal
(``FormatMismatch.Archive``) says what to import instead: the disk inside, unpacked, or an OVA (a tar whose
first member is a ``.ovf``) as an OVA. The content stage asks it of every input it would call RAW;
:func:`refuse_archived` is the decompressor's check of its first decoded block, so a compressed archive is
refused before the rest is decompressed.
"""

from __future__ import annotations

from ..errors import Finding, ImageRejected
from .formats import ZIP_EMPTY_MAGIC, archive_of, split_zip, zip_first_name
from .ovacontainer import FIRST_HEADER_BYTES, JOIN_SPLIT_ZIP, first_member, refuse_compressed_ova

#: the most of an input's first bytes :func:`archive_finding` reads (a tar's first header with a long name's
#: header before it; a zip's local header and name)
ARCHIVE_HEAD = FIRST_HEADER_BYTES
#: how each archive is unpacked
_UNPACK = {"tar": "tar -xf", "zip": "unzip", "7z": "7z x", "rar": "unrar x"}
#: at most this much of a member's name is quoted (a name is the uploader's text; a file name's usual limit)
_NAME_SHOWN = 255


def archive_finding(head: bytes, compression: str | None = None) -> Finding | None:
    """``FormatMismatch.Archive`` when ``head``, an input's first bytes (decompressed from
    ``compression`` when that is given), begins an archive; None otherwise."""
    kind = archive_of(head)
    if kind is None:
        return None
    name = first_member(head) if kind == "tar" else zip_first_name(head) if kind == "zip" else None
    shown = f" (its first member is {name[:_NAME_SHOWN]!r})" if name else ""
    wrapped = f"{compression}-compressed " if compression else ""
    if kind == "tar" and name is not None and name.lower().endswith(".ovf"):
        advice = "import it as an OVA (ImportImage Format=ova; imaging convert --from ova)"
    elif kind == "zip" and head.startswith(ZIP_EMPTY_MAGIC):
        advice = "it is empty (it holds no file); upload the disk image itself"
    elif kind == "zip" and split_zip(head):
        # unzip refuses a segment (and a split archive's last one): the segments are joined first
        advice = (
            f"it is the first segment of a split zip: {JOIN_SPLIT_ZIP}, unzip that and import the disk image"
        )
    elif name is not None and name.lower().endswith(".ova"):
        # an OVA zipped (or tarred) for the download: the OVA inside is what imports
        advice = f"unpack it ({_UNPACK[kind]}) and import the OVA it holds (ImportImage Format=ova)"
    else:
        advice = f"unpack it ({_UNPACK[kind]}) and import the disk image it holds"
    return Finding.error(
        "FormatMismatch.Archive",
        f"the file is a {wrapped}{kind} archive{shown}, not a disk image: {advice}",
    )


def refuse_archived(compression: str, head: bytes, claimed: str | None = None) -> None:
    """The check of a ``compression``-compressed input's first decoded block: ``Ova.Compressed`` for a
    compressed OVA (:func:`refuse_compressed_ova`), ``FormatMismatch.Archive`` for any other archive,
    unless ``claimed`` (the claim's format) is ``vhd``: a fixed VHD begins with its guest's disk, which may
    begin with a tar, and only its last sector, decompressed, tells it from an archive."""
    refuse_compressed_ova(compression, head)
    finding = None if claimed == "vhd" else archive_finding(head, compression)
    if finding is not None:
        raise ImageRejected.nothing_imported(finding.code, finding.message)
