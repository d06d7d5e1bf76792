"""The bitmap of a disk's grains, one bit per grain (grain ``g``: bit ``g & 7`` of byte ``g >> 3``): the
streamOptimized VMDK decoder's record of the grains it has seen and written. :func:`unset_runs` gives the
runs of grains never written (the decoder zeroes them at the end); :func:`pack` and :func:`unpack` are
its checkpoint form (zlib + base64), which comes back from the task store and so is read as untrusted:
bounded while it inflates, its length that of the disk's grains, no bit past the last grain.
"""

from __future__ import annotations

import base64
import re
import zlib


def pack(bitmap: bytes | bytearray) -> str:
    """The checkpoint form of ``bitmap``."""
    return base64.b64encode(zlib.compress(bitmap, 1)).decode("ascii")


def unpack(state: object, grains: int) -> bytearray:
    """The bitmap of a disk of ``grains`` grains from its checkpoint form; ValueError for anything
    :func:`pack` could not have made for such a disk."""
    size = -(-grains // 8)
    try:
        packed = base64.b64decode(str(state), validate=True)
        d = zlib.decompressobj()
        bitmap = d.decompress(packed, size + 1)  # bounded: never more than it should be
    except (ValueError, zlib.error) as exc:
        raise ValueError(f"the checkpoint's grain bitmap does not decode ({exc})") from exc
    if len(bitmap) != size or not d.eof or d.unused_data:
        raise ValueError("the checkpoint's grain bitmap does not fit the header")
    if grains % 8 and bitmap[-1] >> (grains % 8):
        raise ValueError("the checkpoint's grain bitmap marks grains beyond the capacity")
    return bytearray(bitmap)


def unset_runs(bitmap: bytearray, count: int) -> list[tuple[int, int]]:
    """``(first, end)`` runs of grains whose bit is clear, over grains ``[0, count)``."""
    runs: list[tuple[int, int]] = []

    def add(a: int, b: int) -> None:
        b = min(b, count)
        if a >= b:
            return
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((a, b))

    pos = 0
    for m in re.finditer(rb"[^\x00]", bytes(bitmap)):
        i = m.start()
        add(pos * 8, i * 8)
        byte = bitmap[i]
        for bit in range(8):
            if not byte >> bit & 1:
                add(i * 8 + bit, i * 8 + bit + 1)
        pos = i + 1
    add(pos * 8, len(bitmap) * 8)
    return runs
