"""The EC2 VM import manifest: its XML, parsed and built.

The legacy ImportVolume/ImportInstance calls name a manifest of presigned part URLs
(``<manifest><import><parts><part index=…><byteRange start end/><get-url>…``); waiting for the
upload and downloading the parts is :mod:`.parts`.

The manifest is untrusted XML: it is parsed with defusedxml (no DTDs, no entities), must be small, and
every URL in it goes through the same :class:`UrlPolicy` as any other URL.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from ..errors import ImagingError
from .http import SourceIntegrity

log = logging.getLogger(__name__)

FILE_FORMATS = ("RAW", "VHD", "VMDK")
MANIFEST_VERSION = "2010-11-15"
#: euca2ools' default part size (``--part-size`` 10 MiB)
DEFAULT_PART_SIZE = 10 * 2**20
#: a manifest is ~1.2 KiB per part; 128 MiB covers > 1 TiB at 10 MiB parts
MAX_MANIFEST_BYTES = 128 * 2**20
_MAX_LONG = 2**63 - 1
_INT = re.compile(r"^[0-9]{1,19}$")


class ManifestInvalid(ImagingError):
    """The import manifest is not well-formed or not self-consistent; the message names the field."""

    code = "ManifestInvalid"


class PartVerificationFailed(SourceIntegrity):
    """A part's bytes do not match its declared length or MD5 (ETag), even after retries."""

    code = "SourceIntegrity"


@dataclass(frozen=True)
class Importer:
    name: str
    version: str
    release: str


@dataclass(frozen=True)
class Part:
    """One byte range of the uploaded file; ``end`` is INCLUSIVE."""

    index: int
    start: int
    end: int
    key: str
    head_url: str
    get_url: str
    delete_url: str | None = None

    @property
    def length(self) -> int:
        return self.end - self.start + 1


@dataclass(frozen=True)
class ImportManifest:
    version: str
    #: RAW, VHD or VMDK
    file_format: str
    importer: Importer | None
    self_destruct_url: str | None
    #: exact byte size of the uploaded file
    size: int
    #: volume size in GiB
    volume_size: int
    #: in index order, contiguous, covering 0..size-1
    parts: list[Part] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (a step result); :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImportManifest:
        """The manifest of :meth:`to_dict` (e.g. a stored step result)."""
        importer = data.get("importer")
        return cls(
            version=data["version"],
            file_format=data["file_format"],
            importer=Importer(**importer) if importer else None,
            self_destruct_url=data.get("self_destruct_url"),
            size=data["size"],
            volume_size=data["volume_size"],
            parts=[Part(**p) for p in data["parts"]],
        )


# --------------------------------------------------------------------------------------------- parsing


def _local(tag: object) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _children(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el if _local(c.tag) == name]


def _child(el: ET.Element, name: str, where: str, *, required: bool = True) -> ET.Element | None:
    found = _children(el, name)
    if len(found) > 1:
        raise ManifestInvalid(f"{where}/{name} appears {len(found)} times; the manifest must have one")
    if not found:
        if required:
            raise ManifestInvalid(f"{where}/{name} is missing")
        return None
    return found[0]


def _text(el: ET.Element, name: str, where: str, *, required: bool = True) -> str | None:
    child = _child(el, name, where, required=required)
    if child is None:
        return None
    value = (child.text or "").strip()
    if not value and required:
        raise ManifestInvalid(f"{where}/{name} is empty")
    return value or None


def _int(value: str | None, what: str) -> int:
    text = (value or "").strip()
    if not _INT.match(text) or int(text) > _MAX_LONG:
        raise ManifestInvalid(f"{what} must be a non-negative integer, not {value!r}")
    return int(text)


def parse_manifest(data: bytes) -> ImportManifest:
    """Parse and validate an import manifest. Raises :class:`ManifestInvalid` naming the bad field.

    Checks: root ``manifest``; ``file-format`` RAW|VHD|VMDK; ``import/size`` > 0; ``parts@count`` equals
    the number of parts; indices 0..count-1 each exactly once; byte ranges start at 0, are contiguous
    and non-overlapping with INCLUSIVE ends and sum to ``size``. The AWS sample's off-by-one (last part
    ending AT ``size``) is tolerated by capping that end at ``size - 1``.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestInvalid(f"the manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        root = SafeET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise ManifestInvalid(
            f"the manifest uses forbidden XML constructs (DTD or entities): {exc!r}"
        ) from exc
    except ET.ParseError as exc:
        raise ManifestInvalid(f"the manifest is not well-formed XML: {exc}") from exc
    if _local(root.tag) != "manifest":
        raise ManifestInvalid(f"the root element is <{_local(root.tag)}>, not <manifest>")

    version = _text(root, "version", "manifest")
    file_format = (_text(root, "file-format", "manifest") or "").upper()
    if file_format not in FILE_FORMATS:
        raise ManifestInvalid(
            f"manifest/file-format must be one of {', '.join(FILE_FORMATS)}, not {file_format!r}"
        )
    importer = None
    importer_el = _child(root, "importer", "manifest", required=False)
    if importer_el is not None:
        importer = Importer(
            name=_text(importer_el, "name", "manifest/importer", required=False) or "",
            version=_text(importer_el, "version", "manifest/importer", required=False) or "",
            release=_text(importer_el, "release", "manifest/importer", required=False) or "",
        )
    self_destruct = _text(root, "self-destruct-url", "manifest", required=False)
    imp = _child(root, "import", "manifest")
    assert imp is not None
    size = _int(_text(imp, "size", "manifest/import"), "manifest/import/size")
    if size <= 0:
        raise ManifestInvalid("manifest/import/size must be greater than 0")
    volume_size = _int(_text(imp, "volume-size", "manifest/import"), "manifest/import/volume-size")
    parts_el = _child(imp, "parts", "manifest/import")
    assert parts_el is not None
    count = _int(parts_el.get("count"), "manifest/import/parts@count")
    parts = _parse_parts(parts_el, count, size)
    return ImportManifest(
        version=version or "",
        file_format=file_format,
        importer=importer,
        self_destruct_url=self_destruct,
        size=size,
        volume_size=volume_size,
        parts=parts,
    )


#: the largest part a manifest may name: a part is downloaded into memory and written only once its
#: MD5 checks out, so a manifest claiming a 100 GiB part would otherwise have the task allocate it
#: (AWS's one-part sample manifest names a 948 MiB part; the importers write 10 MiB parts)
MAX_PART_LENGTH = 1 << 30


def _parse_parts(parts_el: ET.Element, count: int, size: int) -> list[Part]:
    elements = _children(parts_el, "part")
    if count == 0 or len(elements) != count:
        raise ManifestInvalid(
            f"manifest/import/parts@count is {count} but the manifest lists {len(elements)} parts"
            + ("" if count else " (there must be at least one)")
        )
    by_index: dict[int, Part] = {}
    for el in elements:
        index = _int(el.get("index"), "part@index")
        where = f"part {index}"
        if index in by_index:
            raise ManifestInvalid(f"{where} appears more than once")
        if index >= count:
            raise ManifestInvalid(
                f"{where}: index out of range (count is {count}; indices are 0..{count - 1})"
            )
        br = _child(el, "byte-range", where)
        assert br is not None
        by_index[index] = Part(
            index=index,
            start=_int(br.get("start"), f"{where} byte-range@start"),
            end=_int(br.get("end"), f"{where} byte-range@end"),
            key=_text(el, "key", where) or "",
            head_url=_text(el, "head-url", where) or "",
            get_url=_text(el, "get-url", where) or "",
            delete_url=_text(el, "delete-url", where, required=False),
        )
    parts = [by_index[i] for i in range(count)]  # all present: count distinct indices < count
    expected_start = 0
    for i, part in enumerate(parts):
        where = f"part {i}"
        if part.start != expected_start:
            relation = "overlaps" if part.start < expected_start else "leaves a gap after"
            raise ManifestInvalid(
                f"{where} starts at byte {part.start} but the previous part ends at {expected_start - 1}: it "
                f"{relation} the previous part (byte ranges must be contiguous; byte-range@end is inclusive)"
            )
        if i == count - 1 and part.end == size and part.end >= part.start:
            # AWS's one-part sample writes end = size (off by one); the bytes are 0..size-1
            log.info("manifest: last part ends at size (%d); reading it as size - 1", size)
            part = Part(
                part.index, part.start, size - 1, part.key, part.head_url, part.get_url, part.delete_url
            )
            parts[i] = part
        if part.end < part.start:
            raise ManifestInvalid(f"{where} ends (byte {part.end}) before it starts (byte {part.start})")
        if part.end >= size:
            raise ManifestInvalid(f"{where} ends at byte {part.end}, beyond the file size {size}")
        if part.length > MAX_PART_LENGTH:
            raise ManifestInvalid(
                f"{where} is {part.length} bytes: a part may hold at most {MAX_PART_LENGTH} (1 GiB), as each "
                "part is held in memory until its MD5 checks out (ec2-upload-disk-image and euca2ools "
                "write 10 MiB parts)"
            )
        expected_start = part.end + 1
    if expected_start != size:
        raise ManifestInvalid(
            f"the parts cover {expected_start} bytes but manifest/import/size is {size}; the upload is "
            "incomplete or the manifest was written for a different file"
        )
    return parts


# --------------------------------------------------------------------------------------------- writing


def plan_parts(file_size: int, part_size: int = DEFAULT_PART_SIZE) -> list[tuple[int, int, int]]:
    """``(index, start, end_inclusive)`` of each part, as euca2ools splits a file."""
    if file_size <= 0 or part_size <= 0:
        raise ValueError("file and part sizes must be positive")
    return [(i, s, min(s + part_size, file_size) - 1) for i, s in enumerate(range(0, file_size, part_size))]


def build_manifest(
    *,
    file_format: str,
    size: int,
    volume_size: int,
    parts: Sequence[Part],
    self_destruct_url: str,
    importer_version: str = "3.4.1",
    pretty_print: bool = False,
) -> bytes:
    """An import manifest exactly as euca2ools' ``ImportManifest.dump_to_str`` writes it: XML declaration
    with ``standalone='yes'``, version 2010-11-15, importer euca2ools/<version>/0, every part with
    byte-range, key, head-url, get-url and delete-url."""
    root = ET.Element("manifest")
    ET.SubElement(root, "version").text = MANIFEST_VERSION
    ET.SubElement(root, "file-format").text = file_format
    importer = ET.SubElement(root, "importer")
    ET.SubElement(importer, "name").text = "euca2ools"
    ET.SubElement(importer, "version").text = importer_version
    ET.SubElement(importer, "release").text = "0"
    ET.SubElement(root, "self-destruct-url").text = self_destruct_url
    imp = ET.SubElement(root, "import")
    ET.SubElement(imp, "size").text = str(size)
    ET.SubElement(imp, "volume-size").text = str(volume_size)
    parts_el = ET.SubElement(imp, "parts", count=str(len(parts)))
    for part in parts:
        p = ET.SubElement(parts_el, "part", index=str(part.index))
        ET.SubElement(p, "byte-range", start=str(part.start), end=str(part.end))
        ET.SubElement(p, "key").text = part.key
        ET.SubElement(p, "head-url").text = part.head_url
        ET.SubElement(p, "get-url").text = part.get_url
        ET.SubElement(p, "delete-url").text = part.delete_url or ""
    if pretty_print:
        ET.indent(root, space="  ")
    body = ET.tostring(root, encoding="unicode", short_empty_elements=True)
    return ("<?xml version='1.0' encoding='UTF-8' standalone='yes'?>\n" + body).encode("utf-8")
