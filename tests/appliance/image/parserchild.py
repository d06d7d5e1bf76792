"""Hostile parser children for tests/appliance/image/test_confinedparse.py, run by
``appliance.image.confinedparse.run_parser`` as a parser module's ``main``: what one does is the first
word of its stdin, its argument the rest."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _flood(size: int) -> None:
    """Print ``size`` bytes on stdout, with no line end."""
    chunk = b"x" * (1 << 20)
    while size > 0:
        sys.stdout.buffer.write(chunk[:size])
        size -= len(chunk)
    sys.stdout.buffer.flush()


def _hide_grandchild(pid_file: str) -> None:
    """Leave a grandchild in the process group (its stdio away from the pipes, as a parser exploited to
    hide one would) and write its pid to ``pid_file``."""
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        time.sleep(600)
        os._exit(0)
    Path(pid_file).write_text(str(pid))


def _linger(pid_file: str) -> None:
    """Hide a grandchild (:func:`_hide_grandchild`) and wait."""
    _hide_grandchild(pid_file)
    time.sleep(600)


def _leave(pid_file: str) -> None:
    """Hide a grandchild (:func:`_hide_grandchild`), then answer and exit at once, as a parser would that
    was subverted to hide one."""
    _hide_grandchild(pid_file)
    print(json.dumps({"answer": "left"}))


def main() -> int:
    verb, _, arg = sys.stdin.buffer.read().decode().partition(" ")
    if verb == "flood":
        _flood(int(arg))
    elif verb == "linger":
        _linger(arg)
    elif verb == "leave":
        _leave(arg)
    elif verb == "garbage":
        print("not a JSON object")
    else:
        print(json.dumps({"answer": arg}))
    return 0
