"""OVA packages: the format's rules, and reading an untrusted one.

Reading (:func:`unpack_ova`): a compressed or zipped file is ``Ova.Compressed`` from its first bytes
(:mod:`appliance.image.ovacontainer`); the tar is read as a stream (``tarfile`` ``r|``: never seeking, never
extracting through ``tarfile``), in any member order (the ``.ovf`` need not come first: every member is kept
within the caps below until the descriptor is read, as VirtualBox, govmomi and virt-v2v accept), and each
member is checked before anything of it is kept (``ova-ovf.md`` §6): only regular files
(``REGTYPE``/``AREGTYPE``, not sparse or contiguous; links, devices and FIFOs reject the whole OVA; directory
entries are skipped), a flat final name (after PAX and GNU long names: no ``/``, no ``..``, no backslash or
NUL, at most 255 bytes), no two members with the same name in any case, at most :data:`MAX_MEMBERS` members, a
descriptor of at most ``ovf.MAX_OVF_BYTES``, a manifest or certificate of at most :data:`MAX_SMALL_BYTES`,
disks of at most the virtual-size limit, a member whose data ends before the size its header claims is
``Ova.Corrupt``. AppleDouble members (``._NAME``, macOS tar's metadata, at most :data:`MAX_SMALL_BYTES`) are
skipped, as virt-v2v skips them. Disks are written into a private directory (sparse: all-zero blocks stay
holes) while their SHA-256 (and SHA-1 for an old manifest) is computed.

Then: exactly one ``.ovf``, parsed in a confined child (:func:`appliance.image.ovf.parse_confined`); every
``File`` a bare name present in the package (a disk whose size is not what the descriptor says is read as its
tar header says, with the warning ``Ova.SizeMismatch``: oVirt gives its volume's size); no file referenced by
two disks or two files with one name (``Ova.DuplicateDisk``); a missing file is ``Ova.MissingDisk``; the
manifest and certificate are checked by :mod:`appliance.image.ovamanifest`; a ``File`` compressed with gzip is
decompressed under a cap (:func:`appliance.image.ovacontainer.gunzip`); every disk is inspected like any
uploaded disk (:func:`appliance.image.inspect.inspect_image`: a qcow2 with a backing file, a flat VMDK, … are
rejected with the inspection's code) and its virtual size must be the capacity the descriptor gives, to within
a grain above it or, for a capacity in coarser units, to within one unit either way (ova-compose rounds down,
oVirt up). The boot disk is the one a ``vmw:BootOrderSection`` names, else oVirt's ``ovf:boot``, else the
first of the hardware section (then the rest in order). On any failure the private directory is removed:
nothing is left behind.

Writing an OVA is :mod:`appliance.image.ovawrite`; converting every disk of one is
:mod:`appliance.image.ovaconvert`; the member rules and storing a member are :mod:`appliance.image.ovamember`.
The manifest's line writer (:func:`manifest`) is re-exported here for both directions.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..config import Config
from ..errors import Cancelled, Finding, ImageRejected
from .formats import TAR_HEADER, archive_of
from .inspect import InspectionResult, inspect_image, require_safe
from .ovacontainer import ExtendedHeaderTooLarge, Prefixed, capped_tarinfo, gunzip, gunzip_cap, refuse_wrapped
from .ovamanifest import ALGORITHMS, check_certificate, check_manifest, parse_manifest
from .ovamanifest import manifest as manifest
from .ovamember import Member, check_member, flat_name, store_member
from .ovf import MAX_OVF_BYTES, OvfInfo, parse_confined

#: members one OVA may have (descriptor, manifest, certificate, disks, a few others)
MAX_MEMBERS = 64
#: the largest manifest or certificate
MAX_SMALL_BYTES = 64 << 10
#: how far a disk's virtual size may exceed its descriptor capacity (a VMDK rounds up to a grain)
_CAPACITY_SLACK = 64 << 10


_reject = ImageRejected.nothing_imported


# -------------------------------------------------------------------------------------------- reading


@dataclass
class OvaDisk:
    """One disk of an unpacked OVA, in boot order: its member name and file, descriptor facts, inspection."""

    name: str
    path: Path
    size: int
    capacity: int
    disk_id: str
    sha256: str
    inspection: InspectionResult | None = None
    #: the unit the descriptor gives the capacity in (``byte * 2^N``): its precision
    unit: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "size": self.size,
            "capacity": self.capacity,
            "disk_id": self.disk_id,
            "sha256": self.sha256,
            "format": self.inspection.format if self.inspection else None,
            "virtual_size": self.inspection.virtual_size if self.inspection else None,
        }


@dataclass
class OvaPackage:
    """An unpacked, verified OVA: its disks (boot disk first) in ``directory``, which the caller removes."""

    directory: Path
    ovf_name: str
    ovf: OvfInfo
    disks: list[OvaDisk]
    manifest_verified: bool
    digests: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ovf": self.ovf_name,
            "firmware": self.ovf.firmware,
            "os_type": self.ovf.os_type,
            "cpus": self.ovf.cpus,
            "memory_mib": self.ovf.memory_mib,
            "manifest_verified": self.manifest_verified,
            "digests": self.digests,
            "disks": [d.to_dict() for d in self.disks],
            "findings": [f.to_dict() for f in self.findings],
        }

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def unpack_ova(
    src: BinaryIO,
    directory: Path,
    *,
    config: Config,
    cancel: threading.Event | None = None,
    on_progress: Callable[[int], None] | None = None,
    inspect: bool = True,
    reserve: Callable[[int], None] | None = None,
) -> OvaPackage:
    """Read the OVA ``src`` (a forward-only stream) into the new private ``directory``, verify and inspect
    it (module docstring). Raises :class:`ImageRejected` with an ``Ova.*`` code (or the inspection's code
    for a bad disk) and removes ``directory``; the caller removes it (:meth:`OvaPackage.remove`) after use.
    ``reserve(n)``: called before bytes are written with all the unpacked package may then hold (a disk
    member's size; a gzip ``File``'s cap before it is decompressed); what it raises (``InsufficientScratch``)
    stops the unpack, ``directory`` removed."""
    os.mkdir(directory, 0o700)
    try:
        return _unpack(src, directory, config, cancel, on_progress, inspect, _Room(reserve))
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def _unpack(
    src: BinaryIO,
    directory: Path,
    config: Config,
    cancel: threading.Event | None,
    on_progress: Callable[[int], None] | None,
    inspect: bool,
    room: _Room,
) -> OvaPackage:
    limits = config.limits
    max_disk = limits.max_virtual_size + limits.max_virtual_size // 64 + (1 << 20)
    members: dict[str, Member] = {}
    seen: set[str] = set()
    order: list[str] = []
    manifest_algorithms: set[str] | None = None
    count = 0
    head = src.read(512)
    refuse_wrapped(head)
    try:
        tar = tarfile.open(fileobj=Prefixed(head, src), mode="r|", tarinfo=capped_tarinfo())  # type: ignore[call-overload]  # noqa: SIM115 - closed in the finally below
    except ExtendedHeaderTooLarge as exc:
        raise _reject("Ova.TooLarge", f"the OVA's first member has {exc}") from None
    except tarfile.TarError:
        raise _reject(
            "Ova.NotAnOva", "the file is not a tar archive (an OVA is an uncompressed tar)"
        ) from None
    try:
        while True:
            try:
                ti = tar.next()
            except ExtendedHeaderTooLarge as exc:
                raise _reject("Ova.TooLarge", f"the OVA's member {count + 1} has {exc}") from None
            except tarfile.TarError as exc:
                raise _reject(
                    "Ova.Corrupt", f"the tar stream is damaged after {count} members ({exc})"
                ) from None
            if ti is None:
                break
            count += 1
            if count > MAX_MEMBERS:
                raise _reject("Ova.TooLarge", f"the OVA has more than {MAX_MEMBERS} members")
            if ti.type == tarfile.DIRTYPE and flat_name(ti.name.rstrip("/")):
                continue
            check_member(ti)
            folded = ti.name.casefold()
            if folded in seen:
                raise _reject("Ova.DuplicateMember", f"the OVA holds two members named {ti.name!r}")
            seen.add(folded)
            if ti.name.startswith("._"):
                # macOS tar's AppleDouble metadata of the member after it: never a part of the package
                if ti.size > MAX_SMALL_BYTES:
                    raise _reject("Ova.TooLarge", f"the AppleDouble member {ti.name!r} is {ti.size} bytes")
                continue
            lower = ti.name.lower()
            f = tar.extractfile(ti)
            assert f is not None  # a regular member
            if lower.endswith((".ovf", ".mf", ".cert")):
                cap = MAX_OVF_BYTES if lower.endswith(".ovf") else MAX_SMALL_BYTES
                if ti.size > cap:
                    raise _reject(
                        "Ova.TooLarge", f"the OVA member {ti.name!r} is {ti.size} bytes (at most {cap})"
                    )
                try:
                    body = f.read(ti.size)
                except tarfile.TarError:
                    body = b""
                if len(body) != ti.size:
                    raise _reject("Ova.Corrupt", f"the OVA ends inside {ti.name!r}")
                digests = {a: hashlib.new(a, body).hexdigest() for a in ("sha1", "sha256", "sha512")}
                members[ti.name] = Member(ti.name, ti.size, None, digests, body)
                if lower.endswith(".mf"):
                    parsed = parse_manifest(body, ti.name)
                    manifest_algorithms = {ALGORITHMS[a] for a, _ in parsed.values()}
            else:
                if ti.size > max_disk:
                    raise _reject(
                        "Ova.TooLarge", f"the OVA member {ti.name!r} is {ti.size} bytes, over the disk limit"
                    )
                algorithms = {"sha256"} | (
                    manifest_algorithms if manifest_algorithms is not None else {"sha1"}
                )
                room.grow(ti.size)
                try:
                    digests = store_member(f, directory / ti.name, ti.size, algorithms, cancel, on_progress)
                except tarfile.TarError:
                    raise _reject("Ova.Corrupt", f"the OVA ends inside {ti.name!r}") from None
                members[ti.name] = Member(ti.name, ti.size, directory / ti.name, digests)
            order.append(ti.name)
    finally:
        with contextlib.suppress(tarfile.TarError):
            tar.close()
    return _verify(directory, members, order, config, cancel, inspect, room)


class _Room:
    """The bytes the unpacked package holds, told to ``reserve`` before they grow."""

    def __init__(self, reserve: Callable[[int], None] | None) -> None:
        self.reserve, self.held = reserve, 0

    def grow(self, nbytes: int) -> None:
        self.held += nbytes
        if self.reserve is not None:
            self.reserve(self.held)


def _verify(
    directory: Path,
    members: dict[str, Member],
    order: list[str],
    config: Config,
    cancel: threading.Event | None,
    inspect: bool,
    room: _Room,
) -> OvaPackage:
    ovfs = [n for n in order if n.lower().endswith(".ovf")]
    if len(ovfs) != 1:
        raise _reject(
            "Ova.BadDescriptor", f"the OVA holds {len(ovfs)} .ovf descriptors (exactly one is required)"
        )
    ovf_name = ovfs[0]
    ovf_body = members[ovf_name].body
    assert ovf_body is not None
    info = parse_confined(ovf_body, config.limits, workdir=directory)
    findings: list[Finding] = []
    mfs = [n for n in order if n.lower().endswith(".mf")]
    if len(mfs) > 1:
        raise _reject("Ova.BadManifest", f"the OVA holds {len(mfs)} manifests")
    verified = False
    if mfs:
        body = members[mfs[0]].body
        assert body is not None
        digests = {n: m.digests for n, m in members.items()}
        findings += check_manifest(mfs[0], body, order, digests)
        verified = True
    else:
        findings.append(
            Finding.warning("Ova.NoManifest", "the OVA has no manifest: its members were not verified")
        )
    certs = [n for n in order if n.lower().endswith(".cert")]
    if len(certs) > 1:
        raise _reject("Ova.BadCertificate", f"the OVA holds {len(certs)} certificates")
    for cert in certs:
        cert_body = members[cert].body
        assert cert_body is not None
        signed = {n: members[n].body or b"" for n in mfs}
        findings.append(check_certificate(cert, cert_body, signed, config.limits, directory))

    hrefs: dict[str, str] = {}
    for fid, f in info.files.items():
        href = str(f["href"])
        if not flat_name(href) or ":" in href:
            raise _reject(
                "Ova.UnsafeMember", f"File {fid!r} refers to {href[:100]!r}, not a member of the package"
            )
        if href in hrefs.values():
            raise _reject("Ova.DuplicateDisk", f"the descriptor lists the file {href!r} twice")
        hrefs[fid] = href
    used: set[str] = set()
    disks: list[OvaDisk] = []
    for d in info.disks:
        if d["file"] in used:
            raise _reject("Ova.DuplicateDisk", f"the file {hrefs[d['file']]!r} is listed as two disks")
        used.add(d["file"])
        href = hrefs[d["file"]]
        m = members.get(href)
        if m is None or m.path is None:
            raise _reject(
                "Ova.MissingDisk", f"disk {d['id']!r} is the file {href!r}, which the OVA does not hold"
            )
        declared = info.files[d["file"]]["size"]
        if declared is not None and declared != m.size:
            # the tar header defines the member (an early end was refused as it streamed); the manifest,
            # if any, and the inspection judge its bytes. oVirt writes its volume's size: said, not refused
            judged = "the manifest's digest and its inspection" if verified else "its inspection"
            said = f"the descriptor says {href!r} is {declared} bytes; the member is {m.size}"
            findings.append(
                Finding.warning("Ova.SizeMismatch", f"{said}: read as the tar says, judged by {judged}")
            )
        disk = OvaDisk(href, m.path, m.size, int(d["capacity"]), str(d["id"]), m.digests["sha256"])
        disk.unit = int(d.get("unit") or 1)
        if info.files[d["file"]].get("gzip"):
            # a capacity in coarse units may be rounded down by up to a unit: so may the disk be larger
            most = disk.capacity + disk.unit - 1
            room.grow(gunzip_cap(most, config.limits))
            disk.path = gunzip(disk.path, disk.name, most, config.limits, cancel)
        disks.append(disk)
    for name, m in members.items():  # members no disk uses (ISOs, NVRAM, …) are not kept
        if m.path is not None and name not in {d.name for d in disks}:
            m.path.unlink(missing_ok=True)
    if inspect:
        for disk in disks:
            if cancel is not None and cancel.is_set():
                raise Cancelled("OVA import cancelled")
            result = inspect_image(disk.path, None, config=config, workdir=directory, cancel=cancel)
            require_safe(result)
            disk.inspection = result
            vsize = result.virtual_size or 0
            # a capacity in coarse units is the size rounded to them: down by ova-compose, up by oVirt
            below = disk.unit - 1 if disk.unit > 1 else 0
            if not disk.capacity - below <= vsize <= disk.capacity + max(_CAPACITY_SLACK, disk.unit - 1):
                raise _reject(
                    "Ova.CapacityMismatch",
                    f"disk {disk.name!r} holds {vsize} bytes but the descriptor says {disk.capacity}",
                )
    return OvaPackage(
        directory,
        ovf_name,
        info,
        disks,
        verified,
        {n: m.digests["sha256"] for n, m in members.items()},
        findings,
    )


def is_ova(path: Path) -> bool:
    """Whether ``path`` is a regular file holding a tar archive (:func:`~appliance.image.formats.archive_of`:
    a tar header whose checksum holds, so a disk whose first sector merely has ``ustar`` at 257 is not
    one): how an OVA announces itself to ``imaging convert`` given no format. Any tar is taken for an OVA
    here, so one whose ``.ovf`` is not its first member is still read as one (and one without any fails
    as an OVA, with the reason)."""
    try:
        with open(path, "rb") as f:
            head = f.read(TAR_HEADER)
        return stat.S_ISREG(os.stat(path).st_mode) and archive_of(head) == "tar"
    except OSError:
        return False
