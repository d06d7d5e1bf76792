"""What every ``imaging`` subcommand shares: exit statuses, JSON output, progress, signals, scratch.

Exit status (documented in the README; scripts and outside checks rely on it):
0 success · 1 usage or internal error · 2 image rejected · 3 task or workflow failed ·
130 cancelled (Ctrl-C, SIGTERM or a cancel request).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..allowance import Allowance
from ..config import Config
from ..image.decompress import detect_compression
from ..progress import progress_printer
from ..scratch import ScratchSpace, TaskScratch

EXIT_OK, EXIT_ERROR, EXIT_REJECTED, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 2, 3, 130
#: ``--progress`` choices of commands that show progress
PROGRESS_MODES = ("auto", "bar", "json", "none")


def print_json(obj: Any) -> None:
    """One JSON document on stdout (sorted keys, non-JSON values as strings)."""
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def progress_callback(mode: str) -> Callable[..., None] | None:
    if mode == "none":
        return None
    json_lines = {"auto": None, "bar": False, "json": True}[mode]
    return progress_printer(sys.stderr, json_lines=json_lines)


@contextlib.contextmanager
def cancel_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM/SIGHUP; Ctrl-C keeps raising KeyboardInterrupt (handled by the work)."""
    event = threading.Event()
    previous = {}

    def handler(signum: int, _frame: object) -> None:
        event.set()

    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield event
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def decompression_reserve(scratch: TaskScratch, src: Path) -> Callable[[int, bool], None] | None:
    """For a compressed ``src``: the callback that reserves scratch as the decompressed output grows
    (an :class:`appliance.allowance.Allowance`); None otherwise."""
    if detect_compression(src) is None:
        return None
    return Allowance(scratch, f"decompressing {src.name}").cover


@contextlib.contextmanager
def cli_scratch(cfg: Config) -> Iterator[TaskScratch]:
    """A private scratch directory for a standalone command, removed afterwards."""
    space = ScratchSpace.from_config(cfg)
    scratch = space.for_task(f"cli-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield scratch
    finally:
        scratch.cleanup()
