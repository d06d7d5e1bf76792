"""``python -m appliance.guest.probe --format FMT IMAGE``: the limited child that reads a guest disk.

The parent (:func:`appliance.guest.validate.validate_image`) runs this confined (:mod:`appliance.confine`:
CPU seconds, address space, no core dumps, no network, a parent-death signal) with a wall-clock timeout,
in an empty private directory. It prints ONE
JSON object on stdout: ``{"report": {...}}`` or ``{"error": "..."}`` when the image cannot be read as a
disk at all (with ``"code": "Guest.ExternalReference"`` when it names other files it needs). Anything
worse (a crash, a limit, a hang) is seen by the parent as a missing or broken answer.

``--piped SIZE`` instead of ``IMAGE``: the disk (``SIZE`` bytes) is read from the parent over stdin and
stdout (:mod:`.piped`; :func:`appliance.guest.validate.validate_ranges`), and the answer goes back as the
protocol's answer frame.

``--wait`` instead of ``IMAGE``: the probe is started before its disk is written
(:class:`appliance.guest.early.PendingProbe`): it imports its modules and dissect's filesystem modules
(:func:`.reader.preload`), then reads the image argument as one line on stdin and goes on as with
``IMAGE``; stdin closed without a line ends it without an answer (the parent gave up).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, BinaryIO

from .analyze import analyze
from .piped import PipedDisk, send_answer
from .reader import ExternalReference, ReaderError, open_disk, preload


def _read(fh: BinaryIO, fmt: str) -> dict[str, Any]:
    try:
        disk = open_disk(fh, fmt)
    except ExternalReference as exc:
        return {"error": str(exc), "code": "Guest.ExternalReference"}
    except ReaderError as exc:
        return {"error": str(exc)}
    return {"report": analyze(disk)}


def _guarded(fn: Any) -> dict[str, Any]:
    try:
        out: dict[str, Any] = fn()
    except RecursionError:
        out = {"error": "the image's structures nest too deeply (a loop in its metadata)"}
    except MemoryError:
        out = {"error": "reading the image needed more memory than allowed"}
    except Exception as exc:  # any parser failure on hostile input is an answer, not a crash
        out = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def main(argv: list[str] | None = None) -> int:
    """Read the image named on the command line (or served over the pipes) and answer the report."""
    parser = argparse.ArgumentParser(prog="appliance.guest.probe")
    parser.add_argument("--format", default="raw")
    parser.add_argument("--piped", type=int, default=None, metavar="SIZE")
    parser.add_argument("--wait", action="store_true", help="read IMAGE as a line on stdin, later")
    parser.add_argument("image", nargs="?")
    args = parser.parse_args(argv)
    if [args.piped is not None, args.image is not None, args.wait].count(True) != 1:
        parser.error("give IMAGE, --piped SIZE or --wait")
    # dissect logs parse problems of hostile images at warning level; the findings say what matters
    logging.disable(logging.CRITICAL)
    if args.piped is not None:
        # fd 1 is the protocol: keep it aside and send anything else printed to stderr
        proto = os.dup(1)
        os.dup2(2, 1)
        disk = PipedDisk(0, proto, args.piped)
        out = _guarded(lambda: _read(disk, args.format))  # type: ignore[arg-type]
        send_answer(proto, json.dumps(out, default=str).encode())
        return 0

    if args.wait:
        preload()
        line = sys.stdin.buffer.readline()
        if not line.endswith(b"\n"):
            return 0  # stdin closed: the parent no longer wants an answer
        args.image = os.fsdecode(line[:-1])

    def from_file() -> dict[str, Any]:
        with open(args.image, "rb") as fh:
            return _read(fh, args.format)

    out = _guarded(from_file)
    json.dump(out, sys.stdout, default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
