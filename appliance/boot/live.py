"""Live configuration updates: a new configuration version from the controller, applied without
dropping running tasks (``imaging reconfigure``).

The controller keeps configuration versions per appliance (``imaging controller publish``). The
appliance asks for its configuration with the version it runs (``GET …/config?have=<n>``: a signed
``304`` while nothing is newer), every ``--interval`` seconds and at once when the reply to a pushed
report announced a newer version (``STATE_DIR/config-announced``, :mod:`appliance.report.push`).

A new version is checked exactly as ``imaging configure`` checks user data (:func:`userdata.render`,
the TLS pair loading together), with the controller URL and secret this appliance runs with filling
the gaps as the compact boot line does. Refused: nothing is written, the running configuration keeps
serving, and the controller is told the version and each wrong field (status ``config-refused``).
Accepted: the previous file is kept as ``imaging.yaml.prev`` (``imaging reconfigure --restore`` puts
it back locally; the controller stays the source of truth, so the next poll applies its current
version again: roll a fleet back by publishing the earlier configuration as a new version), the
TLS files and the new file are written atomically, then each service is told what it must be told
(:data:`~appliance.boot.liveeffects.CHANGES`, one entry per kind of change):

* the worker (:class:`appliance.service.worker.Worker`) re-reads the file between polls: new claims
  follow the new limits, new task children read the new file, running ones keep the configuration
  they started with; its reporter restarts on a changed ``controller`` section, without the worker
  waiting for the old one's request in flight (:mod:`appliance.report.handover`);
* the API gets a graceful reload (``SIGHUP`` to gunicorn's arbiter, or ``systemctl reload``): new
  workers on the new file (a changed ``api.bind`` is re-bound), old ones finish their in-flight
  requests;
* the worker is *restarted* only for what it sets up once at start: per-task caps (its task cgroups)
  and the guest-mount privileges of its systemd drop-in. A restart suspends running tasks, which
  resume when it is back (nothing is undone); without systemd it is only reported as pending.

The applied version is recorded next to the file (``imaging.yaml.version``) and reported to the
controller (status ``configured`` with ``config_version``).
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import config as config_mod
from ..atomicfile import write_atomic
from ..errors import ConfigError
from ..paths import StatePaths
from ..redact import redact, secret_values
from ..timestamps import format_time
from . import configure, rendezvous, userdata, worker_dropin
from .liveeffects import Effect, changes, reload_api, systemctl
from .livefiles import (
    announced_version,
    applied_version,
    load_current,
    previous_file,
    record,
    refused_version,
    version_file,
)
from .userdata import FieldError, UserDataInvalid

log = logging.getLogger(__name__)


@dataclass
class Options:
    """What ``imaging reconfigure`` was asked to do."""

    #: the service configuration file the services run with
    config: Path
    owner: str | None = "imaging"
    timeout: float = 10.0
    #: gunicorn's pid file (``imaging serve --pid-file``); None: ``systemctl reload`` under systemd
    api_pid_file: Path | None = None
    #: the worker's drop-in directory (None: leave the units alone)
    unit_dir: Path | None = worker_dropin.DEFAULT_UNIT_DIR
    reload_units: Callable[[], None] | None = worker_dropin.systemd_reload


@dataclass
class Outcome:
    """What one poll did."""

    status: str  # "unchanged", "applied", "refused", "unreachable"
    version: int | None = None
    changes: list[str] = field(default_factory=list)
    effects: list[str] = field(default_factory=list)
    errors: list[FieldError] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "version": self.version,
            "changes": self.changes,
            "effects": self.effects,
            "errors": [e.to_dict() for e in self.errors],
            "pending": self.pending,
        }


@dataclass(frozen=True)
class Identity:
    appliance_id: str
    url: str
    secret: str


def identity(current: dict[str, Any]) -> Identity:
    """Who this appliance is to its controller, from the running configuration."""
    ctl = current.get("controller") or {}
    aid, url, secret = ctl.get("appliance_id"), ctl.get("url"), ctl.get("secret")
    if not (isinstance(aid, str) and isinstance(url, str) and isinstance(secret, str)):
        raise ConfigError("the running configuration names no controller (controller.url and secret)")
    return Identity(aid, url, secret)


def unwatched_reason(config: Path) -> str | None:
    """Why the running configuration has no controller to ask for new versions (None: it has one).

    ``imaging reconfigure --watch`` (the image's ``imaging-reconfigure.service``) then exits at once
    instead of failing every poll: a standalone appliance, or a Eucalyptus cloud in pull mode, which
    publishes no configuration versions. An unreadable configuration is an error (:class:`ConfigError`).
    """
    current = load_current(config)
    ctl = current.get("controller") or {}
    if not isinstance(ctl, dict) or not ctl.get("url"):
        return "no controller is configured"
    if ctl.get("mode") == "pull":
        return "the controller is in pull mode (a Eucalyptus cloud publishes no configuration versions)"
    try:
        identity(current)
    except ConfigError as exc:
        return exc.message
    return None


def _section(doc: dict[str, Any], who: Identity) -> dict[str, Any]:
    """The fetched ``imaging:`` section completed as ``imaging configure`` completes it."""
    section = userdata.imaging_section(doc)
    if section.get("appliance_id", who.appliance_id) != who.appliance_id:
        raise UserDataInvalid(
            [FieldError("imaging.appliance_id", f"the new configuration is not for {who.appliance_id!r}")]
        )
    section = dict(section, appliance_id=who.appliance_id)
    ctl = section.get("controller", {})
    if isinstance(ctl, dict):
        # as the compact boot line: the running URL and secret fill the gaps (a new URL rotates it)
        section["controller"] = {"url": who.url, "secret": who.secret, **ctl}
    return section


def _report(
    who: Identity, url: str, outcome: Outcome, section: dict[str, Any] | None, timeout: float
) -> None:
    message: dict[str, Any] = {
        "ver": rendezvous.PROTOCOL_VERSION,
        "type": "status",
        "appliance_id": who.appliance_id,
        "status": "configured" if outcome.status == "applied" else "config-refused",
        "timestamp": format_time(),
        "config_version": outcome.version,
        "addresses": rendezvous.local_addresses(url),
        "errors": [e.to_dict() for e in outcome.errors],
    }
    if section is not None:
        message["parameters"] = redact(section, secret_values(section))
    try:
        rendezvous.post_status(url, who.appliance_id, who.secret, message, timeout=timeout)
    except rendezvous.RendezvousError as exc:
        log.warning("could not tell the controller: %s", exc.message)


def apply(
    opts: Options, doc: dict[str, Any], who: Identity, current: dict[str, Any]
) -> tuple[Outcome, dict[str, Any] | None]:
    """Validate and apply one fetched configuration document (``{"version", "imaging"}``)."""
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        version = None
    section: dict[str, Any] | None = None
    try:
        section = _section(doc, who)
        rendered = userdata.render(section, opts.config.parent)
        configure.check_tls(rendered.files)
    except UserDataInvalid as exc:
        return Outcome("refused", version, errors=exc.errors), None
    new = rendered.config
    # the state directory is the image's, not the controller's: it never moves under a running appliance
    new["state_dir"] = current.get("state_dir", new["state_dir"])
    old_files: dict[Path, str | None] = {}
    for path in rendered.files:
        try:
            old_files[path] = path.read_text()
        except OSError:
            old_files[path] = None
    found = changes(current, new, old_files, rendered.files)
    outcome = Outcome("applied", version, changes=[c.field for c in found])
    effects = {e for c in found for e in c.effects}
    privileged = configure.privileged_of(rendered)
    if opts.unit_dir is not None:
        db = StatePaths(Path(new["state_dir"])).db
        if worker_dropin.sync_dropin(opts.unit_dir, privileged, db):
            effects.add(Effect.WORKER_RESTART)
            if opts.reload_units is not None:
                opts.reload_units()
    previous = opts.config.read_text()
    write_atomic(previous_file(opts.config), previous, 0o600, opts.owner)
    for path, text in rendered.files.items():
        write_atomic(path, text, 0o600, opts.owner)
    write_atomic(opts.config, configure.render_yaml(rendered), 0o600, opts.owner)
    record(opts.config, {"version": version})
    if Effect.API_RELOAD in effects:
        why = reload_api(opts.api_pid_file)
        if why:
            outcome.pending.append(why)
    if Effect.WORKER_RESTART in effects:
        why = systemctl("restart", worker_dropin.WORKER_UNIT)
        if why:
            outcome.pending.append(why)
    outcome.effects = sorted(str(e) for e in effects)
    return outcome, section


def poll(opts: Options) -> Outcome:
    """Ask the controller once; apply a new version; report the outcome to it."""
    current = load_current(opts.config)
    who = identity(current)
    have = applied_version(opts.config)
    try:
        doc = rendezvous.poll_config(who.url, who.appliance_id, who.secret, have, opts.timeout)
    except rendezvous.RendezvousError as exc:
        log.warning("cannot ask the controller for a new configuration: %s", exc.message)
        return Outcome("unreachable", errors=[FieldError("imaging.controller.url", exc.message)])
    if doc is None:
        return Outcome("unchanged", have)
    version = doc.get("version")
    if isinstance(version, int) and version == refused_version(opts.config):
        return Outcome("refused", version)  # told the controller already; wait for a newer one
    try:
        outcome, section = apply(opts, doc, who, current)
    except (OSError, subprocess.SubprocessError) as exc:
        # written files are whole (atomic); what could not be written is reported like a bad field
        why = f"{getattr(exc, 'filename', None) or opts.config}: {getattr(exc, 'strerror', None) or exc}"
        outcome, section = Outcome("refused", doc.get("version"), errors=[FieldError("output", why)]), None
    if outcome.status == "refused":
        with contextlib.suppress(OSError):
            record(opts.config, {"version": have, "refused": outcome.version})
        for e in outcome.errors:
            log.error("configuration version %s refused: %s", outcome.version, e)
    else:
        log.info(
            "configuration version %s applied: %s", outcome.version, ", ".join(outcome.changes) or "no change"
        )
    # the controller as the configuration now says (an endpoint rotation reports to the new one)
    url = ((section or {}).get("controller") or {}).get("url", who.url)
    _report(who, url.rstrip("/"), outcome, section, min(opts.timeout, 5.0))
    return outcome


def restore(opts: Options) -> None:
    """Put the configuration before the last live update back and reload the API gracefully (the
    worker re-reads it). The next poll applies the controller's current version again."""
    prev = previous_file(opts.config)
    try:
        text = prev.read_text()
    except OSError as exc:
        raise ConfigError(f"no previous configuration to restore ({prev}): {exc.strerror}") from exc
    config_mod.from_dict(yaml.safe_load(text) or {}, base_dir=opts.config.parent)  # it still loads
    write_atomic(opts.config, text, 0o600, opts.owner)
    with contextlib.suppress(FileNotFoundError):
        version_file(opts.config).unlink()  # the next poll fetches the controller's current version
    why = reload_api(opts.api_pid_file)
    if why:
        log.warning("%s", why)


def _announced_news(opts: Options) -> bool:
    """A report reply announced a version newer than the applied one (and not the refused one)."""
    try:
        state_dir = Path(load_current(opts.config).get("state_dir", "."))
    except ConfigError:
        return False
    announced = announced_version(state_dir)
    if announced is None or announced == refused_version(opts.config):
        return False
    have = applied_version(opts.config)
    return have is None or announced > have


def watch(
    opts: Options,
    interval: float,
    stop: threading.Event,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> None:
    """Poll every ``interval`` seconds, and at once when a report reply announced a newer version
    (looked for every second); return when the configuration no longer names a controller to ask
    (:func:`unwatched_reason`)."""
    tick = min(1.0, interval)
    waited = interval  # poll at start
    while not stop.is_set():
        if waited >= interval or _announced_news(opts):
            waited = 0.0
            try:
                why_not = unwatched_reason(opts.config)
                if why_not:  # e.g. a live update switched to pull mode
                    log.warning("no more configuration updates to watch for: %s", why_not)
                    return
                outcome = poll(opts)
            except (ConfigError, OSError) as exc:
                log.error("live configuration: %s", exc)
            else:
                if on_outcome is not None:
                    on_outcome(outcome)
        stop.wait(tick)
        waited += tick
