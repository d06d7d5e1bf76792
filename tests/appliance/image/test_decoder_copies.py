"""The compressed decoders hand the gzip reader's whole blocks on as they are: a gzip disk decoded by the
confined decoder child does not copy (and fault in fresh pages for) every byte of the disk again.

Real parts: a gzip disk made in-process, the decoder child (``appliance.image.decoders``) run as a
process with ``--records``, its page faults read from ``wait4``.
"""

from __future__ import annotations

import gzip
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

from appliance.image import compressed as cz
from appliance.image.decoders import RECORD

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[3]
_CHILD = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from appliance.image.decoders import main; sys.exit(main())"
)


def test_whole_blocks_pass_through_the_regrouping_without_a_copy() -> None:
    pieces = [os.urandom(cz.BLOCK_SIZE), bytes(cz.BLOCK_SIZE), os.urandom(cz.BLOCK_SIZE)]
    out = list(cz.blocks(iter(pieces)))
    assert all(o is p for o, p in zip(out, pieces, strict=True))


def test_uneven_pieces_are_still_regrouped_into_whole_blocks() -> None:
    rng = random.Random(5)
    data = rng.randbytes(3 * cz.BLOCK_SIZE + 123)
    cuts = sorted(rng.sample(range(1, len(data)), 40))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    # a whole block after a partial one is regrouped too (it does not start a block)
    pieces.insert(3, os.urandom(cz.BLOCK_SIZE))
    data = b"".join(pieces)
    out = list(cz.blocks(iter(pieces)))
    assert [len(b) for b in out[:-1]] == [cz.BLOCK_SIZE] * (len(out) - 1)
    assert b"".join(out) == data


def _decode_records(gz: Path) -> tuple[bytes, int]:
    """The disk the decoder child's records describe, and the child's minor page faults."""
    argv = [sys.executable, "-I", "-c", _CHILD, str(REPO), "--records", "--format", "gzip"]
    argv += ["--max-virtual-size", str(1 << 40), "--max-decompressed-size", str(1 << 40)]
    with open(gz, "rb") as src:
        proc = subprocess.Popen(argv, stdin=src, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    disk = bytearray()
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        while head := proc.stdout.read(RECORD.size):
            tag, offset, length = RECORD.unpack(head)
            body = proc.stdout.read(length) if tag in (b"W", b"B") else b""
            if tag in (b"W", b"Z"):
                disk.extend(bytes(offset + length - len(disk)) if offset + length > len(disk) else b"")
            if tag == b"W":
                disk[offset : offset + length] = body
        done.set()

    reader = threading.Thread(target=read)
    reader.start()
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    proc.stdout.close()
    assert proc.returncode == 0 and done.is_set()
    return bytes(disk), usage.ru_minflt


def test_a_gzip_disk_decodes_without_a_fresh_page_per_byte_of_disk(tmp_path: Path) -> None:
    # 128 MiB of disk, a third of it data: the old regrouping copied every block three times into new
    # buffers, one page fault per 4 KiB of disk at the least (32768 here); the child's own start and
    # imports take a few thousand
    rng = random.Random(11)
    disk = bytearray(128 * MiB)
    for at in range(0, len(disk), 12 * MiB):
        disk[at : at + 4 * MiB] = rng.randbytes(4 * MiB)
    gz = tmp_path / "disk.raw.gz"
    gz.write_bytes(gzip.compress(bytes(disk), compresslevel=1))
    decoded, faults = _decode_records(gz)
    assert decoded == bytes(disk)
    pages = len(disk) // 4096
    assert faults < pages // 2, f"{faults} page faults for {pages} pages of disk"
