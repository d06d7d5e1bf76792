"""``imaging configure`` and ``imaging health-responder``: boot-time configuration from user data."""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

from .. import config as config_mod
from ..boot import configure as configure_mod
from ..boot import live, liveeffects, worker_dropin
from ..boot.health_responder import serve
from ..config import Config


def cmd_configure(args: argparse.Namespace, _cfg: Config | None) -> int:
    opts = configure_mod.Options(
        user_data=Path(args.user_data) if args.user_data else None,
        output=Path(args.output),
        error_file=Path(args.error_file),
        owner=args.owner or None,
        attempts=args.attempts,
        instance_id=args.instance_id,
        rendezvous_file=Path(args.rendezvous_file) if args.rendezvous_file else None,
        timeout=args.timeout,
        unit_dir=Path(args.unit_dir) if args.unit_dir else None,
        wait_cloud_init=args.wait_cloud_init,
    )
    if opts.unit_dir != worker_dropin.DEFAULT_UNIT_DIR:
        opts.reload = None  # not the units systemd runs: nothing to reload
        opts.retrigger = None  # and not the machine's udev rules either
    return configure_mod.configure(opts)


def cmd_reconfigure(args: argparse.Namespace, _cfg: Config | None) -> int:
    config = Path(args.config or os.environ.get(config_mod.ENV_CONFIG) or config_mod.SYSTEM_CONFIG)
    opts = live.Options(
        config=config,
        owner=args.owner or None,
        timeout=args.timeout,
        api_pid_file=Path(args.api_pid_file) if args.api_pid_file else None,
        unit_dir=Path(args.unit_dir) if args.unit_dir else None,
    )
    if opts.unit_dir != worker_dropin.DEFAULT_UNIT_DIR:
        opts.reload_units = None  # not the units systemd runs: nothing to reload
    if args.restore:
        live.restore(opts)
        print(f"imaging: restored the previous configuration into {config}")
        return 0

    def show(outcome: live.Outcome) -> None:
        if args.json:
            print(json.dumps(outcome.to_dict()), flush=True)
        elif outcome.status == "applied":
            what = ", ".join(outcome.changes) or "no change"
            how = f" ({'; '.join(outcome.effects)})" if outcome.effects else ""
            print(f"imaging: applied configuration version {outcome.version}: {what}{how}", flush=True)
            for p in outcome.pending:
                print(f"imaging: pending: {p}", flush=True)
        elif outcome.status == "refused" and outcome.errors:
            for e in outcome.errors:
                print(f"imaging: configuration version {outcome.version} refused: {e}", flush=True)

    if not args.watch:
        outcome = live.poll(opts)
        show(outcome)
        return {"refused": 2, "unreachable": 1}.get(outcome.status, 0) if outcome.errors else 0
    why_not = live.unwatched_reason(config)
    if why_not:
        print(f"imaging: no configuration updates to watch for: {why_not}", flush=True)
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    live.watch(opts, args.interval, stop, show)
    return 0


def cmd_health_responder(args: argparse.Namespace, _cfg: Config | None) -> int:
    return serve(Path(args.error_file), args.bind)


def add_commands(sub: Any) -> None:
    """Register ``configure`` and ``health-responder`` on the ``imaging`` subcommand parser."""
    s = sub.add_parser(
        "configure",
        help="write the service configuration from cloud-init user data (boot time)",
        description="Read the '#cloud-config' imaging: section (or the compact "
        "imaging:v1:<id>:<controller-url>:<secret> line, then fetch the config from the controller; "
        "without the id, be assigned one by the controller first), "
        "validate it and write the config file atomically, mode 0600. Invalid or missing: write the "
        "error file, print each wrong field, tell the controller, exit 2.",
        epilog="Exit status: 0 configured, 1 the config could not be written, 2 invalid or missing config.",
    )
    s.add_argument(
        "--user-data", metavar="FILE", help="read user data from FILE (default: `cloud-init query userdata`)"
    )
    s.add_argument("--output", default=str(configure_mod.DEFAULT_OUTPUT), help="config file to write")
    s.add_argument(
        "--error-file",
        default=str(configure_mod.DEFAULT_ERROR_FILE),
        help="where the error document goes when the config is invalid (removed on success)",
    )
    s.add_argument("--owner", default="imaging", help="user owning the written files, if it exists")
    s.add_argument(
        "--attempts", type=int, default=5, help="rendezvous tries for the compact form (default 5)"
    )
    s.add_argument("--timeout", type=float, default=10.0, help="seconds per controller request")
    s.add_argument(
        "--wait-cloud-init",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="without --user-data: first wait up to SECONDS for cloud-init's init stage to store this "
        "boot's user data (the image's unit runs beside that stage, not after it; default 0: do not wait)",
    )
    s.add_argument(
        "--rendezvous-file",
        default=str(configure_mod.BAKED_RENDEZVOUS),
        help="read when there is no user data: the rendezvous line an image carries "
        f"(default {configure_mod.BAKED_RENDEZVOUS}; '' for none)",
    )
    s.add_argument(
        "--instance-id",
        help="how this machine names itself when the user data asks for an assignment "
        "(imaging:v1::<controller-url>:<enrolment-secret>; default: /etc/machine-id)",
    )
    s.add_argument(
        "--unit-dir",
        default=str(worker_dropin.DEFAULT_UNIT_DIR),
        help="systemd unit directory for the worker's guest-hooks drop-in, written when a configured hook "
        "mounts guests and removed otherwise; systemd is reloaded only for the default "
        f"({worker_dropin.DEFAULT_UNIT_DIR}); '' leaves the units alone",
    )
    s.set_defaults(func=cmd_configure, needs_config=False)

    s = sub.add_parser(
        "reconfigure",
        help="apply a new configuration version from the controller, live (no running task dropped)",
        description="Ask the controller for a configuration newer than the one applied (a cheap "
        "'not modified' while there is none), validate it as 'imaging configure' does, write it "
        "atomically (the previous kept as <config>.prev) and tell each service what it must: the "
        "worker re-reads between claims, the API reloads gracefully, the worker restarts only for "
        "per-task caps and guest-mount privileges. The applied version, or each field of a refused "
        "one, is reported to the controller; a refused version changes nothing.",
        epilog="Exit status (without --watch): 0 applied or nothing new, 1 controller unreachable, "
        "2 refused.",
    )
    s.add_argument("--watch", action="store_true", help="keep polling (and follow report replies)")
    s.add_argument("--interval", type=float, default=30.0, help="seconds between polls with --watch")
    s.add_argument("--timeout", type=float, default=10.0, help="seconds per controller request")
    s.add_argument("--owner", default="imaging", help="user owning the written files, if it exists")
    s.add_argument(
        "--api-pid-file",
        help="the API's pid file (imaging serve --pid-file), sent SIGHUP for a graceful reload "
        f"(default: systemctl reload {liveeffects.API_UNIT})",
    )
    s.add_argument(
        "--unit-dir",
        default=str(worker_dropin.DEFAULT_UNIT_DIR),
        help="systemd unit directory of the worker's guest-hooks drop-in ('' leaves the units alone)",
    )
    s.add_argument(
        "--restore",
        action="store_true",
        help="put back the configuration before the last live update (<config>.prev) and reload the API "
        "(the next poll applies the controller's current version again)",
    )
    s.add_argument("--json", action="store_true", help="print each outcome as a JSON line")
    s.set_defaults(func=cmd_reconfigure, needs_config=False)

    s = sub.add_parser(
        "health-responder",
        help="answer GET /v1/health with 503 and the config errors (invalid config only)",
        description="A minimal HTTP responder for an appliance whose configuration is invalid.",
    )
    s.add_argument("--error-file", default=str(configure_mod.DEFAULT_ERROR_FILE))
    s.add_argument(
        "--bind", help="address:port (default: api.bind from the user data if well-formed, else 0.0.0.0:8773)"
    )
    s.set_defaults(func=cmd_health_responder, needs_config=False)
