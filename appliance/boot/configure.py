"""``imaging configure``: turn cloud-init user data into the service configuration, or say why not.

Run once at boot (``imaging-configure.service``, before the API and worker units). Outcomes:

* valid: ``/etc/imaging/imaging.yaml`` (and TLS PEMs under ``/etc/imaging/tls/``) written atomically,
  mode 0600, owned by the service user; a stale error file removed; exit 0.
* invalid or missing: nothing replaced (an older config stays intact); the error document
  ``{"status": "invalid-config", "errors": [{field, message}], ...}`` written to the error file,
  whose presence keeps the real services from starting and starts the health responder instead;
  one ``imaging: invalid config: <field>: <message>`` line per error on stderr (the console); the
  controller told when its URL is known (best effort); exit 2.

Secrets are never printed: messages name fields, and values under secret keys are scrubbed.

Per-task caps (``limits.task_*``) this machine cannot enforce are printed as warnings (the worker's
health then says ``degraded`` too). While ``limits.task_io_weight`` is set, the flag file ``io-weight``
next to the error file makes the image's udev rule select the BFQ scheduler for the disks (IO weights
only act under BFQ or io.cost); the block devices are re-triggered when the flag changes.

Where the user data comes from when no file is named (cloud-init, and the wait for it) is
:mod:`.cloudinit`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from .. import config as config_mod
from ..atomicfile import write_atomic
from ..hooks.privileges import privileged_hooks
from ..paths import BAKED_RENDEZVOUS, CONFIG_ERROR_FILE, IO_WEIGHT_FLAG_NAME, SYSTEM_CONFIG
from ..redact import redact, redact_text, redact_url, secret_values
from ..service import taskcgroup
from ..timestamps import format_time
from . import rendezvous, userdata, worker_dropin
from .cloudinit import CLOUD_INIT_USER_DATA, read_user_data, wait_for_cloud_init
from .userdata import CompactUserData, EnrolUserData, FieldError, UserDataInvalid

log = logging.getLogger(__name__)

EXIT_CONFIGURED, EXIT_WRITE_FAILED, EXIT_INVALID = 0, 1, 2
DEFAULT_OUTPUT = SYSTEM_CONFIG
DEFAULT_ERROR_FILE = CONFIG_ERROR_FILE
#: next to the error file (``/run/imaging``): present while an IO weight is configured (udev selects BFQ)
IO_WEIGHT_FLAG = IO_WEIGHT_FLAG_NAME


def udev_retrigger() -> None:
    """Replay the block devices' udev rules (so the IO scheduler rule sees the flag); a no-op where
    systemd does not run this machine (e.g. a container)."""
    exe = shutil.which("udevadm")
    if exe is None or not Path("/run/systemd/system").is_dir():
        log.info("udev is not running: not re-triggering block devices")
        return
    subprocess.run(
        [exe, "trigger", "--action=change", "--subsystem-match=block", "--settle"],
        check=True,
        timeout=120,
        capture_output=True,
    )


@dataclass
class Options:
    """What ``imaging configure`` was asked to do (CLI flags)."""

    user_data: Path | None = None
    output: Path = DEFAULT_OUTPUT
    error_file: Path = DEFAULT_ERROR_FILE
    owner: str | None = "imaging"
    #: rendezvous tries for the compact form (the controller may not be up yet at boot)
    attempts: int = 5
    #: how this machine names itself when asking for an assignment (None: its machine id)
    instance_id: str | None = None
    #: read when the instance has no user data: a rendezvous line the image carries (None: none)
    rendezvous_file: Path | None = BAKED_RENDEZVOUS
    timeout: float = 10.0
    #: where the worker's guest-hooks drop-in goes (None: leave the units alone)
    unit_dir: Path | None = worker_dropin.DEFAULT_UNIT_DIR
    #: called after the drop-in changed (None: nobody to tell, e.g. a unit dir of a test)
    reload: Callable[[], None] | None = worker_dropin.systemd_reload
    #: called after the IO weight flag changed (None: nobody to tell)
    retrigger: Callable[[], None] | None = udev_retrigger
    #: seconds to wait for cloud-init's init stage to store this boot's user data (0: do not wait)
    wait_cloud_init: float = 0.0


@dataclass
class _Known:
    """What could be learnt from the user data even when it is invalid (for reporting the error)."""

    appliance_id: str | None = None
    controller_url: str | None = None
    secret: str | None = None
    bind: str = userdata.DEFAULT_BIND
    section: dict[str, Any] = field(default_factory=dict)
    secrets: set[str] = field(default_factory=set)


def _learn(section: Any, known: _Known) -> None:
    """Record what a (possibly invalid) section says about the controller, for the error report."""
    if not isinstance(section, dict):
        return
    known.section = section
    known.secrets |= secret_values(section)
    known.bind = userdata.best_effort_bind(section)
    aid = section.get("appliance_id")
    if isinstance(aid, str) and userdata.validate_section({"appliance_id": aid}) == []:
        known.appliance_id = aid
    ctl = section.get("controller")
    if isinstance(ctl, dict):
        url, secret = ctl.get("url"), ctl.get("secret")
        probe = {"appliance_id": "x", "controller": {"url": url, "secret": "x" * 16}}
        if isinstance(url, str) and userdata.validate_section(probe) == []:
            known.controller_url = url.rstrip("/")
        if isinstance(secret, str) and len(secret) >= 16:
            known.secret = secret


def _resolve_section(raw: bytes, opts: Options, known: _Known) -> tuple[dict[str, Any], bool]:
    """The ``imaging:`` section to apply and whether it came through the rendezvous."""
    parsed = userdata.parse_user_data(raw)
    if isinstance(parsed, EnrolUserData):
        parsed = _enrol(parsed, opts, known)
    if not isinstance(parsed, CompactUserData):
        _learn(parsed, known)
        return parsed, False
    known.appliance_id, known.controller_url, known.secret = (
        parsed.appliance_id,
        parsed.controller_url,
        parsed.secret,
    )
    known.secrets.add(parsed.secret)
    try:
        doc = rendezvous.fetch_config(
            parsed.controller_url, parsed.appliance_id, parsed.secret, opts.timeout, opts.attempts
        )
    except rendezvous.RendezvousError as exc:
        raise UserDataInvalid([FieldError("imaging.controller.url", exc.message)]) from exc
    section = userdata.imaging_section(doc)
    _learn(section, known)
    if section.get("appliance_id", parsed.appliance_id) != parsed.appliance_id:
        raise UserDataInvalid(
            [
                FieldError(
                    "imaging.appliance_id",
                    f"the controller's config is for {str(section['appliance_id'])[:80]!r}, "
                    f"not {parsed.appliance_id!r}",
                )
            ]
        )
    section = dict(section, appliance_id=parsed.appliance_id)
    ctl = section.get("controller", {})
    if isinstance(ctl, dict):
        # the compact line is the trust anchor: its URL and secret fill the gaps of the fetched config
        section["controller"] = {"url": parsed.controller_url, "secret": parsed.secret, **ctl}
    known.section = section  # the parameters reported are those applied
    return section, True


def _enrol(parsed: EnrolUserData, opts: Options, known: _Known) -> CompactUserData:
    """Dynamic assignment: the controller says which appliance this machine is (and its secret)."""
    known.controller_url = parsed.controller_url
    known.secrets.add(parsed.enrol_secret)
    instance = opts.instance_id or rendezvous.machine_id()
    try:
        appliance_id, secret = rendezvous.request_assignment(
            parsed.controller_url, parsed.enrol_secret, instance, opts.timeout, opts.attempts
        )
    except rendezvous.RendezvousError as exc:
        raise UserDataInvalid([FieldError("imaging.controller.url", exc.message)]) from exc
    known.secrets.add(secret)
    # the assigned identity passes the checks of the line it stands for
    assigned = userdata.parse_compact(
        f"{userdata.COMPACT_PREFIX}{appliance_id}:{parsed.controller_url}:{secret}"
    )
    if not isinstance(assigned, CompactUserData):
        raise UserDataInvalid([FieldError("imaging.appliance_id", "the controller assigned no appliance id")])
    log.info("assigned appliance %s by the controller", assigned.appliance_id)
    return assigned


def check_tls(files: dict[Path, str]) -> None:
    """The certificate and key load together (a mismatched pair would only fail when the API starts)."""
    if not files:
        return
    cert, key = (p for p in files)
    # a private temporary directory: the real files are only replaced once the pair is known good
    with tempfile.TemporaryDirectory(prefix="imaging-tls-check-") as scratch:
        c, k = Path(scratch) / "cert.pem", Path(scratch) / "key.pem"
        for p, text in ((c, files[cert]), (k, files[key])):
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(c, k)
        except ssl.SSLError as exc:
            raise UserDataInvalid(
                [FieldError("imaging.api.tls", f"certificate and key do not load together: {exc.reason}")]
            ) from exc


def render_yaml(rendered: userdata.Rendered) -> str:
    header = (
        "# written by `imaging configure` from cloud-init user data; secrets inside (mode 0600).\n"
        "# Re-run `imaging configure` instead of editing: the next boot rewrites this file.\n"
    )
    return header + yaml.safe_dump(rendered.config, sort_keys=False)


def _message(known: _Known, status: str, errors: list[FieldError], kind: str) -> dict[str, Any]:
    return {
        "ver": rendezvous.PROTOCOL_VERSION,
        "type": kind,
        "appliance_id": known.appliance_id,
        "status": status,
        "timestamp": format_time(),
        "addresses": rendezvous.local_addresses(known.controller_url),
        "parameters": redact(known.section, known.secrets),
        "errors": [e.to_dict() for e in errors],
    }


def _tell_controller(known: _Known, status: str, errors: list[FieldError], kind: str, timeout: float) -> None:
    if not known.controller_url:
        return
    try:
        rendezvous.post_status(
            known.controller_url,
            known.appliance_id or "unknown",
            known.secret,
            _message(known, status, errors, kind),
            timeout=timeout,
        )
    except rendezvous.RendezvousError as exc:
        log.warning("could not tell the controller: %s", exc.message)


def _fail(opts: Options, known: _Known, errors: list[FieldError], stderr: TextIO, exit_status: int) -> int:
    errors = [FieldError(e.field, redact_text(e.message, known.secrets)) for e in errors]
    doc = {
        "status": "invalid-config",
        "errors": [e.to_dict() for e in errors],
        "appliance_id": known.appliance_id,
        "bind": known.bind,
        "timestamp": format_time(),
    }
    for e in errors:
        print(f"imaging: invalid config: {e}", file=stderr)
    try:
        # readable by the health responder's user; it holds no secrets
        write_atomic(opts.error_file, json.dumps(doc, indent=2) + "\n", 0o644, None)
    except OSError as exc:
        print(f"imaging: cannot write the error file {opts.error_file}: {exc.strerror}", file=stderr)
    _tell_controller(known, "invalid-config", errors, "config-error", min(opts.timeout, 5.0))
    return exit_status


def configure(opts: Options, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Configure the appliance from its user data; returns the exit status (0, 1 write failed, 2 invalid)."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    known = _Known()
    waiting = opts.user_data is None and opts.wait_cloud_init > 0
    if waiting and not wait_for_cloud_init(opts.wait_cloud_init):
        log.warning("cloud-init stored no user data within %.0f s: reading it anyway", opts.wait_cloud_init)
    raw = read_user_data(opts.user_data)
    if raw is None and opts.rendezvous_file is not None and opts.rendezvous_file.is_file():
        # no user data: the image's own rendezvous line (the controller assigns who this is)
        raw = opts.rendezvous_file.read_bytes()
    if raw is None:
        where = opts.user_data or f"cloud-init (nor {CLOUD_INIT_USER_DATA})"
        return _fail(
            opts,
            known,
            [
                FieldError(
                    "user-data",
                    f"no user data from {where}: launch the appliance with '#cloud-config' user data "
                    f"holding an 'imaging:' section, or the line "
                    f"'{userdata.COMPACT_PREFIX}<appliance-id>:<controller-url>:<secret>' (or without "
                    f"the id, with the fleet's enrolment secret)",
                )
            ],
            stderr,
            EXIT_INVALID,
        )
    try:
        section, via_rendezvous = _resolve_section(raw, opts, known)
        rendered = userdata.render(section, opts.output.parent)
        check_tls(rendered.files)
    except UserDataInvalid as exc:
        return _fail(opts, known, exc.errors, stderr, EXIT_INVALID)
    privileged = privileged_of(rendered)
    try:
        # the drop-in first: a worker started on the new config must already have its privileges
        _sync_worker_privileges(opts, rendered, privileged)
    except (OSError, subprocess.SubprocessError) as exc:
        err = FieldError("imaging.hooks", f"cannot set the worker's privileges for guest hooks: {_why(exc)}")
        return _fail(opts, known, [err], stderr, EXIT_WRITE_FAILED)
    try:
        for path, text in rendered.files.items():
            write_atomic(path, text, 0o600, opts.owner)
        write_atomic(opts.output, render_yaml(rendered), 0o600, opts.owner)
    except OSError as exc:
        err = FieldError("output", f"cannot write {exc.filename or opts.output}: {exc.strerror or exc}")
        return _fail(opts, known, [err], stderr, EXIT_WRITE_FAILED)
    with contextlib.suppress(FileNotFoundError):
        opts.error_file.unlink()
    _task_caps(opts, rendered, stderr)
    if via_rendezvous:
        _tell_controller(known, "configured", [], "status", min(opts.timeout, 5.0))
    ctl = rendered.config["controller"]
    where = f", controller {redact_url(ctl['url'])} ({ctl['mode']})" if ctl.get("url") else ""
    print(f"imaging: configured appliance {rendered.appliance_id}: wrote {opts.output}{where}", file=stdout)
    if privileged and opts.unit_dir is not None:
        print(f"imaging: the worker runs as root to mount guests for: {', '.join(privileged)}", file=stdout)
    return EXIT_CONFIGURED


def privileged_of(rendered: userdata.Rendered) -> list[str]:
    """The configured hooks that mount the guest (they need the worker's drop-in)."""
    points = rendered.config.get("hooks", {}).get("points") or {}
    return privileged_hooks(config_mod.hooks_from_dict(points))


def _sync_worker_privileges(opts: Options, rendered: userdata.Rendered, privileged: list[str]) -> None:
    """Write or remove the worker's drop-in; reload systemd only when that changed a file."""
    if opts.unit_dir is None:
        return
    # the SQLite file the drop-in creates first; none when the tasks are in PostgreSQL
    db_path = config_mod.from_dict(rendered.config, base_dir=opts.output.parent).db_path
    if worker_dropin.sync_dropin(opts.unit_dir, privileged, db_path) and opts.reload is not None:
        opts.reload()


def _task_caps(opts: Options, rendered: userdata.Rendered, stderr: TextIO) -> None:
    """Select BFQ while an IO weight is configured; warn about caps this machine cannot enforce."""
    caps = taskcgroup.TaskCaps.from_config(config_mod.from_dict(rendered.config, opts.output.parent).worker)
    flag = opts.error_file.parent / IO_WEIGHT_FLAG
    try:
        if caps.io_weight is not None and not flag.exists():
            write_atomic(flag, "limits.task_io_weight is set: the disks use the BFQ scheduler\n", 0o644, None)
            changed = True
        elif caps.io_weight is None and flag.exists():
            flag.unlink()
            changed = True
        else:
            changed = False
        if changed and opts.retrigger is not None:
            opts.retrigger()
    except (OSError, subprocess.SubprocessError) as exc:
        why = f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ") if isinstance(exc, OSError) else exc
        print(f"imaging: warning: cannot select the BFQ IO scheduler for IO weights: {why}", file=stderr)
    for problem in taskcgroup.host_problems(caps):
        print(f"imaging: warning: {problem}", file=stderr)


def _why(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        out = exc.stderr.decode(errors="replace").strip() if isinstance(exc.stderr, bytes) else ""
        return f"systemctl daemon-reload failed ({exc.returncode}): {out[:200]}"
    if isinstance(exc, OSError):
        return f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
    return str(exc)
