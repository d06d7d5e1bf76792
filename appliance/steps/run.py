"""Action ``run``: run a command locally or inside the mounted guest (chroot), output to task events.

``with``: ``command`` (argv list, or a string run with ``/bin/sh -c``), ``where`` (``local`` default,
or ``chroot``), ``image`` (chroot only: a path or an IMAGE dict ``{path, format}``; raw images or
block devices only), ``writable`` (mount the guest read-write; default read-only), ``timeout``
(seconds), ``env``, ``cwd``, ``ok_codes`` (default ``[0]``), ``max_output`` (bytes of output kept
in events, default 64 KiB).

The command runs in its own process group with stdin closed and a minimal environment (the
worker's own environment, which may hold credentials, is not passed on). Output lines go to
``run.output`` events in chunks; past ``max_output`` only a tail is kept for the result. An exit
status outside ``ok_codes`` fails with ``Run.Failed``, an expired ``timeout`` kills the process
group and fails with ``Run.Timeout``, a cancel kills it within about a second.

A chroot command runs the untrusted guest's own binaries, so it runs in the sandbox of
:mod:`appliance.guest.sandbox`: new pid, mount, network, IPC and UTS namespaces, a fresh read-only
``/proc`` that shows only its own processes, no capabilities at all (root in name only: it cannot
bypass file permissions, mount or reach the host) and no network (only ``lo``). If the sandbox
cannot be set up the step fails with ``Run.SandboxFailed``; the command is never run without it.

How the output becomes events is :mod:`.runoutput`'s.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypedDict, Unpack

from ..errors import ImagingError, UsageError
from ..guest import sandbox
from ..guest.mount import GuestMount, mount_guest
from ..image.convert import stop_process_group
from ..workflow.step import Step, StepContext
from .runoutput import Output, Stream, drain, pump, read_all

#: default bytes of output kept in task events
DEFAULT_MAX_OUTPUT = 64 * 1024
#: how long a process group gets after SIGTERM before SIGKILL when cancelled or timed out
KILL_GRACE = 0.5
#: after the command exits, how long to keep reading output a left-behind child still writes
DRAIN_AFTER_EXIT = 1.0
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class RunFailed(ImagingError):
    """The command exited with a status outside ``ok_codes``."""

    code = "Run.Failed"

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class RunTimeout(ImagingError):
    """The command did not finish within its ``timeout``; its process group was killed."""

    code = "Run.Timeout"


COMMAND_SCHEMA: dict[str, Any] = {
    "oneOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "items": {"type": "string"}},
    ]
}
IMAGE_SCHEMA: dict[str, Any] = {
    "oneOf": [
        {"type": "string", "minLength": 1},
        {
            "type": "object",
            "required": ["path"],
            "properties": {
                "path": {"type": "string", "minLength": 1},
                "format": {"type": ["string", "null"]},
            },
        },
    ]
}
#: the execution arguments shared by ``run`` and ``hook.run-in-guest``
EXEC_PROPERTIES: dict[str, Any] = {
    "command": COMMAND_SCHEMA,
    "timeout": {"type": "number", "exclusiveMinimum": 0},
    "env": {"type": "object", "additionalProperties": {"type": "string"}},
    "cwd": {"type": "string", "minLength": 1},
    "ok_codes": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
    "max_output": {"type": "integer", "minimum": 0},
    "writable": {"type": "boolean"},
}


def _argv(command: str | list[str]) -> list[str]:
    if isinstance(command, str):
        return ["/bin/sh", "-c", command]
    if not command or not all(isinstance(a, str) for a in command):
        raise UsageError("command must be a non-empty list of strings or a string")
    return list(command)


def execute(
    ctx: StepContext,
    command: str | list[str],
    *,
    root: Path | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    ok_codes: list[int] | None = None,
    max_output: int = DEFAULT_MAX_OUTPUT,
) -> dict[str, Any]:
    """Run ``command`` locally (``root`` None) or sandboxed in the guest mounted at ``root``
    (:mod:`appliance.guest.sandbox`: own namespaces, no capabilities, no network); stream output to events.

    Returns ``{exit_code, stdout_tail, stderr_tail, duration, output_bytes, truncated}``. Raises
    ``Run.Failed`` (exit status not in ``ok_codes``), ``Run.Timeout``, :class:`Cancelled`, and
    ``Run.SandboxFailed`` when the sandbox could not be set up (the command never ran unsandboxed).
    """
    ok = ok_codes or [0]
    argv = _argv(command)
    status_r: int | None = None
    pass_fds: tuple[int, ...]
    if root is None:
        base_env = {"PATH": os.environ.get("PATH", GUEST_PATH), "HOME": os.environ.get("HOME", "/root")}
        full_env = {**base_env, "LANG": "C", **(env or {})}
        proc_argv, proc_env, workdir, pass_fds = argv, full_env, cwd or str(ctx.workdir), ()
    else:
        # the guest's own binaries run as root: only ever inside the sandbox (appliance.guest.sandbox)
        full_env = {"PATH": GUEST_PATH, "HOME": "/root", "LANG": "C", **(env or {})}
        status_r, status_w = os.pipe()
        proc_argv = sandbox.launcher_argv(root, argv, cwd=cwd or "/", env=full_env, status_fd=status_w)
        proc_env, workdir, pass_fds = dict(sandbox.LAUNCHER_ENV), "/", (status_w,)
    ctx.event(
        "run.start", argv=argv, where="chroot" if root else "local", cwd=cwd or workdir, sandboxed=bool(root)
    )
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            proc_argv,
            cwd=workdir,
            env=proc_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
            start_new_session=True,  # own process group: a timeout or cancel kills it and its children
        )
    except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
        if status_r is not None:
            os.close(status_r)
            raise sandbox.SandboxFailed(f"cannot start the sandbox launcher: {exc.strerror}") from exc
        raise RunFailed(f"cannot start {argv[0]}: {exc.strerror}", 127) from exc
    finally:
        for fd in pass_fds:
            os.close(fd)  # the launcher holds the write end now
    out = Output(ctx, max_output)
    assert proc.stdout is not None and proc.stderr is not None
    streams = [Stream("stdout", proc.stdout.fileno()), Stream("stderr", proc.stderr.fileno())]
    try:
        rc = pump(proc, streams, out, None if timeout is None else start + timeout)
        if rc is None:
            stop_process_group(proc, grace=KILL_GRACE)
            drain(streams, out, 0.2)
            out.flush()
            raise RunTimeout(
                f"command did not finish within {timeout:g} s and was killed; last output: "
                + (" | ".join(out.combined) or "(none)")
            )
        drain(streams, out, DRAIN_AFTER_EXIT)
    except BaseException:
        stop_process_group(proc, grace=KILL_GRACE)
        raise
    finally:
        out.flush()
        for pipe in (proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                pipe.close()
        started = read_all(status_r) if status_r is not None else b"R"
    # children the command left in its group must not outlive the step (nor keep a guest mount busy)
    stop_process_group(proc, grace=KILL_GRACE)
    sandbox.check_status(started, rc, " | ".join(out.tails["stderr"]))
    duration = round(time.monotonic() - start, 3)
    result = {
        "exit_code": rc,
        "stdout_tail": "\n".join(out.tails["stdout"]),
        "stderr_tail": "\n".join(out.tails["stderr"]),
        "duration": duration,
        "output_bytes": out.total,
        "truncated": out.truncated,
    }
    if rc not in ok:
        last = " | ".join(list(out.combined)[-10:]) or "(no output)"
        status = f"signal {-rc}" if rc < 0 else f"status {rc}"
        raise RunFailed(f"command exited with {status} (allowed: {ok}); last output: {last}", rc)
    return result


def image_path(image: str | dict[str, Any]) -> tuple[str, str | None]:
    """(path, declared format) of a ``run``/hook ``image`` argument (a path means raw)."""
    if isinstance(image, str):
        return image, "raw"
    return str(image["path"]), image.get("format") or "raw"


def mount_for_step(
    ctx: StepContext, image: str | dict[str, Any], *, writable: bool, chroot: bool = False
) -> AbstractContextManager[GuestMount]:
    """:func:`mount_guest` for a step: owned by the task (so a crash is swept into its ledger),
    cancelled with it, every loop device and mount in its cleanup ledger."""
    path, fmt = image_path(image)

    def ledger(action: str, resource: str) -> None:
        (ctx.ledger_created if action == "created" else ctx.ledger_removed)(resource)

    return mount_guest(
        path,
        fmt=fmt,
        writable=writable,
        chroot=chroot,
        owner=ctx.task_id,
        state_dir=ctx.config.state_dir,
        cancel=ctx.cancel,
        on_change=ledger,
    )


class RunOptions(TypedDict, total=False):
    """The options of :func:`execute` that :func:`run_in_guest` passes on."""

    timeout: float | None
    env: dict[str, str] | None
    cwd: str | None
    ok_codes: list[int] | None
    max_output: int


def run_in_guest(
    ctx: StepContext,
    image: str | dict[str, Any],
    command: str | list[str],
    *,
    writable: bool = False,
    **kw: Unpack[RunOptions],
) -> dict[str, Any]:
    """Mount ``image``'s guest for a chroot, run ``command`` there (see :func:`execute`), unmount."""
    with mount_for_step(ctx, image, writable=writable, chroot=True) as gm:
        ctx.event("guest.mounted", root_device=gm.root_device, writable=writable, skipped=gm.skipped)
        return execute(ctx, command, root=gm.root, **kw)


class RunStep(Step):
    """Run a command locally (in the task workdir) or in the guest's chroot."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["command"],
        "properties": {
            **EXEC_PROPERTIES,
            "where": {"enum": ["local", "chroot"]},
            "image": IMAGE_SCHEMA,
        },
    }

    def run(
        self,
        ctx: StepContext,
        command: str | list[str],
        where: str = "local",
        image: str | dict[str, Any] | None = None,
        writable: bool = False,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        ok_codes: list[int] | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> dict[str, Any]:
        kw: RunOptions = {
            "timeout": timeout,
            "env": env,
            "cwd": cwd,
            "ok_codes": ok_codes,
            "max_output": max_output,
        }
        if where == "local":
            if image is not None:
                raise UsageError("run: 'image' is only used with where: chroot")
            return {**execute(ctx, command, **kw), "where": "local"}
        if image is None:
            raise UsageError("run: where: chroot needs 'image' (a raw image path or {path, format})")
        return {**run_in_guest(ctx, image, command, writable=writable, **kw), "where": "chroot"}

    def plan(self, ctx: StepContext, **args: Any) -> dict[str, Any]:
        if args.get("where") == "chroot" and not args.get("image"):
            raise UsageError("run: where: chroot needs 'image' (a raw image path or {path, format})")
        return {**args, "argv": _argv(args["command"])}
