"""A guest probe started before its disk is written, so that its start and imports overlap the writing.

A streamed import (``image.stream``) writes the disk, then validates the guest on it: the probe child's
interpreter start, its imports (dissect) and dissect's import of its filesystem modules cost ~0.6 s, all
of it after the disk's last byte. :class:`PendingProbe` starts the same child (same sandbox policy and
limits as :func:`.validate.validate_image`, ``--wait`` instead of the image argument) when the stream
starts; the child imports everything and waits on stdin. :meth:`PendingProbe.validate` links the written
disk into the child's private directory, sends the link's name and interprets the answer as
:func:`.validate.validate_image` does (the same findings); its wall-clock limit counts from then.

Use as a context manager: leaving it kills and reaps the child (a cancelled or failed stream leaves no
probe behind) and removes its private directory.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

from .. import config as config_mod
from .. import confine
from ..confine import Completed
from ..errors import Cancelled, UsageError
from ..image.formats import guest_format
from .codes import for_data_disk
from .report import GuestReport
from .validate import CHILD, PACKAGE_PARENT, interpret, probe_policy


class PendingProbe:
    """A probe child of format ``fmt`` waiting for its disk (module docstring)."""

    def __init__(
        self,
        fmt: str = "raw",
        *,
        config: config_mod.Config | None = None,
        wall_seconds: float | None = None,
        workdir: Path | None = None,
    ) -> None:
        reader_format = guest_format(fmt)
        if reader_format is None:
            raise UsageError(f"{fmt} images are not read directly; a pending probe reads what it can read")
        cfg = config if config is not None else config_mod.from_dict({})
        self.policy = probe_policy(cfg.limits, wall_seconds)
        self._dir = confine.private_dir(workdir, prefix="guest-probe.")
        #: the child's empty private directory (its working directory)
        self.directory = self._dir.__enter__()
        self._asked = self._closed = False
        try:
            argv = [sys.executable, "-I", "-c", CHILD, PACKAGE_PARENT, "--format", reader_format, "--wait"]
            self.proc = confine.spawn(argv, self.policy, cwd=self.directory, stdin=subprocess.PIPE)
        except BaseException:
            self._dir.__exit__(None, None, None)
            raise

    def _argument(self, path: Path) -> str:
        """What the child opens: a link in its private directory for a file, the device's path."""
        if stat.S_ISBLK(path.stat().st_mode):
            return str(path.resolve())
        return confine.link_into(self.directory, path).name

    def validate(
        self, path: str | Path, *, bootable: bool = True, cancel: threading.Event | None = None
    ) -> GuestReport:
        """The report of the disk at ``path`` (written and flushed), as :func:`.validate.validate_image`
        gives it. Once per probe. Raises :class:`~appliance.errors.Cancelled` (the child is killed)."""
        if self._asked:
            raise UsageError("a pending guest probe reads one disk")
        self._asked = True
        src = Path(path)
        if not src.exists():
            raise UsageError(f"no such image: {src}")
        line = os.fsencode(self._argument(src)) + b"\n"
        report = interpret(self._answer(line, cancel), self.policy)
        if not bootable:
            report = report.with_findings([for_data_disk(f) for f in report.findings])
        return report

    def _answer(self, line: bytes, cancel: threading.Event | None) -> Completed:
        assert self.proc.stdin is not None
        try:
            # a line is far below a pipe's capacity: written whole at once, so the output can be read
            # under its cap (which collect takes without input) from the start
            # (a broken pipe: the child has ended, and its exit says how)
            with contextlib.suppress(BrokenPipeError), self.proc.stdin:
                self.proc.stdin.write(line)
            return confine.collect(self.proc, self.policy, cancel, max_output=self.policy.max_output)
        except Cancelled:
            self.close()
            raise

    def close(self) -> None:
        """Kill the child unless it has ended, reap it, remove its private directory."""
        if self._closed:
            return
        self._closed = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()
        self._dir.__exit__(None, None, None)

    def __enter__(self) -> PendingProbe:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
