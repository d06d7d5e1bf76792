"""Real Windows registry hives for the guest-validation tests.

hivex (``hivexsh -w``) edits hives but cannot create one from nothing, so :func:`empty_hive` writes the
smallest hive it (and Windows, and dissect.regf) accept, after the "regf" format as libyal documents it
(Windows NT Registry File format specification) and hivex's ``hivex-internal.h``:

* a 4096-byte **base block**: ``"regf"``, primary and secondary sequence numbers (equal: the hive was
  written cleanly), a FILETIME, format version 1.3, file type 0 (primary), format 1 (direct memory load),
  the **root cell offset** and the **size of the hive bins data** (offsets in a hive are relative to the
  first hive bin, i.e. file offset - 4096), clustering factor 1, and at 508 the **checksum**: the XOR of
  the first 508 bytes read as 127 little-endian uint32s;
* one 4096-byte **hive bin** (``"hbin"``, its own offset and size) holding cells. A cell starts with an
  int32 size that is negative while the cell is allocated, and is 8-byte aligned:

  - the root key, an ``"nk"`` cell with flags KEY_HIVE_ENTRY|KEY_NO_DELETE|KEY_COMP_NAME (ASCII name),
    no subkeys or values (list offsets 0xFFFFFFFF) and a security cell offset;
  - an ``"sk"`` security cell (a list of one: forward and backward links point to itself, reference
    count 1) with an empty self-relative security descriptor; hivex copies the parent's ``sk`` into
    every key it adds, so the root must have one;
  - the rest of the bin as one free cell (positive size).

Keys and values are then added with ``hivexsh -w`` (:func:`edit_hive`), so everything beyond the empty
root is written by a real registry library.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

BASE_BLOCK = 4096
HBIN = 4096
HBIN_HEADER = 32
KEY_HIVE_ENTRY, KEY_NO_DELETE, KEY_COMP_NAME = 0x0004, 0x0008, 0x0020
NO_CELL = 0xFFFFFFFF
# 2021-01-01T00:00:00Z as a FILETIME (100 ns since 1601)
FILETIME = 132539328000000000

#: what Windows Server 2022 Datacenter keeps in SOFTWARE\Microsoft\Windows NT\CurrentVersion
SERVER_2022 = {
    "ProductName": "Windows Server 2022 Datacenter",
    "EditionID": "ServerDatacenter",
    "InstallationType": "Server",
    "CurrentBuild": "20348",
    "CurrentBuildNumber": "20348",
    "CurrentVersion": "6.3",
    "DisplayVersion": "21H2",
    "ReleaseId": "2009",
    "CurrentMajorVersionNumber": 10,
    "CurrentMinorVersionNumber": 0,
}
CURRENT_VERSION = ("Microsoft", "Windows NT", "CurrentVersion")


def _cell(payload: bytes) -> bytes:
    """An allocated cell: negative size (including the size field), padded to 8 bytes."""
    size = (4 + len(payload) + 7) & ~7
    return struct.pack("<i", -size) + payload.ljust(size - 4, b"\0")


def _nk_root(name: bytes, sk_offset: int) -> bytes:
    return (
        struct.pack(
            "<2sHQ15IHH",
            b"nk",
            KEY_HIVE_ENTRY | KEY_NO_DELETE | KEY_COMP_NAME,
            FILETIME,
            0,  # access bits
            NO_CELL,  # parent: none (the root)
            0,  # number of subkeys
            0,  # number of volatile subkeys
            NO_CELL,  # subkey list
            NO_CELL,  # volatile subkey list
            0,  # number of values
            NO_CELL,  # value list
            sk_offset,  # security cell
            NO_CELL,  # class name
            0,  # largest subkey name length
            0,  # largest subkey class name length
            0,  # largest value name length
            0,  # largest value data size
            0,  # work var
            len(name),
            0,  # class name length
        )
        + name
    )


def _sk(own_offset: int) -> bytes:
    # self-relative security descriptor: revision 1, control SE_SELF_RELATIVE, no owner/group/SACL/DACL
    descriptor = struct.pack("<BBHIIII", 1, 0, 0x8000, 0, 0, 0, 0)
    return struct.pack("<2sHIIII", b"sk", 0, own_offset, own_offset, 1, len(descriptor)) + descriptor


def empty_hive(path: Path, root_name: str = "ROOT") -> Path:
    """Write a valid hive whose root key (named ``root_name``) has no subkeys and no values."""
    name = root_name.encode("ascii")
    nk_offset = HBIN_HEADER  # the root is the first cell of the first bin
    nk = _cell(_nk_root(name, 0))  # size only; the sk offset is patched below
    sk_offset = nk_offset + len(nk)
    nk = _cell(_nk_root(name, sk_offset))
    sk = _cell(_sk(sk_offset))
    used = HBIN_HEADER + len(nk) + len(sk)
    free = struct.pack("<i", HBIN - used).ljust(HBIN - used, b"\0")
    hbin = struct.pack("<4sIIQQI", b"hbin", 0, HBIN, 0, FILETIME, 0) + nk + sk + free
    assert len(hbin) == HBIN

    base = bytearray(BASE_BLOCK)
    struct.pack_into("<4sIIQIIIIIII", base, 0, b"regf", 1, 1, FILETIME, 1, 3, 0, 1, nk_offset, HBIN, 1)
    base[0x30 : 0x30 + 64] = (root_name.encode("utf-16-le") + b"\0\0")[:64].ljust(64, b"\0")
    checksum = 0
    for (word,) in struct.iter_unpack("<I", bytes(base[:508])):
        checksum ^= word
    struct.pack_into("<I", base, 508, checksum)
    path.write_bytes(bytes(base) + hbin)
    return path


def _hivexsh_value(value: str | int) -> str:
    if isinstance(value, int):
        return f"dword:0x{value:08x}"
    return f"string:{value}"


def edit_hive(path: Path, key: tuple[str, ...], values: dict[str, str | int]) -> Path:
    """Create ``key`` (its path components under the root) in the hive at ``path`` and set ``values``
    (``str`` → REG_SZ, ``int`` → REG_DWORD) with ``hivexsh -w``."""
    script = []
    for part in key:
        script += [f"add {part}", f"cd {part}"]
    script.append(f"setval {len(values)}")
    for name, value in values.items():
        script += [name, _hivexsh_value(value)]
    script.append("commit")
    subprocess.run(
        ["hivexsh", "-w", str(path)],
        input="\n".join(script) + "\n",
        text=True,
        check=True,
        capture_output=True,
    )
    return path


def software_hive(path: Path, values: dict[str, str | int] | None = None) -> Path:
    """A SOFTWARE hive holding ``Microsoft\\Windows NT\\CurrentVersion`` with ``values`` (Server 2022)."""
    empty_hive(path, "SOFTWARE")
    return edit_hive(path, CURRENT_VERSION, SERVER_2022 if values is None else values)


def system_hive(path: Path) -> Path:
    """A SYSTEM hive with the ``Select`` key Windows reads the current control set from."""
    empty_hive(path, "SYSTEM")
    return edit_hive(path, ("Select",), {"Current": 1, "Default": 1, "Failed": 0, "LastKnownGood": 1})
