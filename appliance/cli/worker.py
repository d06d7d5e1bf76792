"""``imaging worker``: the task worker."""

from __future__ import annotations

from typing import Any

from ..report.reporter import start_reporter
from ..service.worker import run_worker


def add_commands(sub: Any) -> None:
    """Add ``worker`` to the ``imaging`` subcommands."""
    s = sub.add_parser(
        "worker",
        help="run the task worker (claims and runs pending tasks)",
        description="Claim pending tasks and run each in a child process, up to "
        "worker.concurrency at once; resume tasks whose process died. SIGTERM suspends "
        "running tasks; they resume when a worker starts again.",
    )
    s.add_argument("--concurrency", type=int, help="override worker.concurrency")
    s.set_defaults(func=lambda args, cfg: run_worker(cfg, args.concurrency, start_reporter))
