"""``imaging configure`` and ``imaging health-responder``: boot-time configuration from user data."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..boot import configure as configure_mod
from ..boot import worker_dropin
from ..boot.health_responder import serve
from ..config import Config


def cmd_configure(args: argparse.Namespace, _cfg: Config | None) -> int:
    opts = configure_mod.Options(
        user_data=Path(args.user_data) if args.user_data else None,
        output=Path(args.output),
        error_file=Path(args.error_file),
        owner=args.owner or None,
        attempts=args.attempts,
        timeout=args.timeout,
        unit_dir=Path(args.unit_dir) if args.unit_dir else None,
    )
    if opts.unit_dir != worker_dropin.DEFAULT_UNIT_DIR:
        opts.reload = None  # not the units systemd runs: nothing to reload
    return configure_mod.configure(opts)


def cmd_health_responder(args: argparse.Namespace, _cfg: Config | None) -> int:
    return serve(Path(args.error_file), args.bind)


def add_commands(sub: Any) -> None:
    """Register ``configure`` and ``health-responder`` on the ``imaging`` subcommand parser."""
    s = sub.add_parser(
        "configure",
        help="write the service configuration from cloud-init user data (boot time)",
        description="Read the '#cloud-config' imaging: section (or the compact "
        "imaging:v1:<id>:<controller-url>:<secret> line, then fetch the config from the controller), "
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
        "--unit-dir",
        default=str(worker_dropin.DEFAULT_UNIT_DIR),
        help="systemd unit directory for the worker's guest-hooks drop-in, written when a configured hook "
        "mounts guests and removed otherwise; systemd is reloaded only for the default "
        f"({worker_dropin.DEFAULT_UNIT_DIR}); '' leaves the units alone",
    )
    s.set_defaults(func=cmd_configure, needs_config=False)

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
