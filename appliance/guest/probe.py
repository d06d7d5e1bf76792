"""``python -m appliance.guest.probe --format FMT IMAGE``: the limited child that reads a guest disk.

The parent (:func:`appliance.guest.validate.validate_image`) runs this confined (:mod:`appliance.confine`:
CPU seconds, address space, no core dumps, no network, a parent-death signal) with a wall-clock timeout,
in an empty private directory. It prints ONE
JSON object on stdout: ``{"report": {...}}`` or ``{"error": "..."}`` when the image cannot be read as a
disk at all (with ``"code": "Guest.ExternalReference"`` when it names other files it needs). Anything
worse (a crash, a limit, a hang) is seen by the parent as a missing or broken answer.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .analyze import analyze
from .reader import ExternalReference, ReaderError, open_disk


def main(argv: list[str] | None = None) -> int:
    """Read the image named on the command line and print the report as JSON."""
    parser = argparse.ArgumentParser(prog="appliance.guest.probe")
    parser.add_argument("--format", default="raw")
    parser.add_argument("image")
    args = parser.parse_args(argv)
    # dissect logs parse problems of hostile images at warning level; the findings say what matters
    logging.disable(logging.CRITICAL)
    out: dict
    try:
        with open(args.image, "rb") as fh:
            try:
                disk = open_disk(fh, args.format)
            except ExternalReference as exc:
                out = {"error": str(exc), "code": "Guest.ExternalReference"}
            except ReaderError as exc:
                out = {"error": str(exc)}
            else:
                out = {"report": analyze(disk)}
    except RecursionError:
        out = {"error": "the image's structures nest too deeply (a loop in its metadata)"}
    except MemoryError:
        out = {"error": "reading the image needed more memory than allowed"}
    except Exception as exc:  # any parser failure on hostile input is an answer, not a crash
        out = {"error": f"{type(exc).__name__}: {exc}"}
    json.dump(out, sys.stdout, default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
