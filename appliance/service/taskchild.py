"""A task's process: ``python -m appliance.service.worker run|resume TASK_ID`` (the worker starts
one per task, see :mod:`.children`) joins its cgroup, then runs or resumes the task to its end (or
to a suspend) with the workflow engine; its exit status tells the worker how it ended."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

from .. import config as config_mod
from .. import redact
from ..errors import ImagingError, LeaseLost, StoreUnavailable
from ..store import Lease
from ..workflow.engine import Engine
from . import taskcgroup

log = logging.getLogger(__name__)

#: exit status of a task's process that stopped because the task database went away (EX_TEMPFAIL)
EXIT_STORE_UNAVAILABLE = 75
#: exit status of a task's process that found another worker owning its task
EXIT_LEASE_LOST = 76


def _stop_at_once() -> None:
    """Another worker owns this process's task: stop everything this process group runs (the
    step's ``qemu-img``, a download, this process) so nothing more reaches the task's target. A
    task process leads a process group of its own (the worker starts it in a new session); a
    process that does not (a test running the child in-process) only raises :class:`LeaseLost`."""
    if os.getpgrp() == os.getpid():
        logging.shutdown()
        os.killpg(os.getpgrp(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    """Entry of a child process: run or resume one task to its end (or to a suspend)."""
    p = argparse.ArgumentParser(prog="python -m appliance.service.worker")
    p.add_argument("verb", choices=("run", "resume"))
    p.add_argument("task_id")
    p.add_argument("--config")
    p.add_argument("--cgroup", help="the task's cgroup, which the child joins before anything else")
    p.add_argument("--owner", help="the worker that claimed the task (run: take its lease over)")
    p.add_argument("--epoch", type=int, help="the task's fencing epoch of that claim")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="imaging-task %(levelname)s %(name)s: %(message)s")
    redact.install_logging()
    if args.cgroup:
        try:
            taskcgroup.join(Path(args.cgroup))
        except OSError as exc:
            log.error(
                "task %s: cannot join its cgroup %s: %s", args.task_id, args.cgroup, exc.strerror or exc
            )
            return taskcgroup.EXIT_CGROUP_JOIN_FAILED
    logging.getLogger("oslo_utils").setLevel(logging.ERROR)
    cfg = config_mod.load(args.config)
    engine = Engine(cfg, on_lease_lost=_stop_at_once, poll_interval=cfg.worker.task_poll_interval)
    lease = Lease(args.owner, args.epoch) if args.owner is not None and args.epoch is not None else None
    try:
        task = engine.run(args.task_id, lease=lease) if args.verb == "run" else engine.resume(args.task_id)
    except LeaseLost as exc:
        log.error("task %s: %s", args.task_id, exc.message)
        _stop_at_once()
        return EXIT_LEASE_LOST
    except StoreUnavailable as exc:
        # The task keeps this process as its owner, so once the database is back the worker sees
        # the owner gone and resumes the task from its last completed step.
        log.warning(
            "task %s: stopped, the task database is unreachable (%s); it resumes later",
            args.task_id,
            exc.message,
        )
        return EXIT_STORE_UNAVAILABLE
    except ImagingError as exc:  # e.g. another worker claimed it first
        log.warning("task %s: not run here: %s", args.task_id, exc)
        return 1
    log.info("task %s: %s", task.id, task.state)
    return 0
