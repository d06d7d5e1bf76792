"""``imaging serve``: the HTTP service, registered into the toolkit CLI through an entry point."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from appliance import config as config_mod
from appliance.config import Config


def add_commands(sub: Any) -> None:
    """Add ``serve`` to the ``imaging`` subcommands."""
    s = sub.add_parser(
        "serve",
        help="serve the EC2 import API and the admin API (gunicorn)",
        description="Serve the EC2 Query API (POST/GET /) and the JSON admin API (/v1/…) with gunicorn, "
        "bound to api.bind with api.workers workers; TLS when api.tls is configured.",
    )
    s.add_argument("--bind", help="override api.bind (HOST:PORT)")
    s.add_argument("--workers", type=int, help="override api.workers")
    s.add_argument(
        "--pid-file",
        help="write the arbiter's pid here (SIGHUP to it: graceful reload onto the configuration file)",
    )
    s.set_defaults(func=_serve)


def _serve(args: argparse.Namespace, cfg: Config) -> int:
    # gunicorn and the whole HTTP app: only `imaging serve` needs them, every other command loads
    # this module to register it
    from .server import serve

    def overridden(cfg: Config) -> Config:
        api = cfg.api
        if args.bind:
            api = dataclasses.replace(api, bind=args.bind)
        if args.workers:
            api = dataclasses.replace(api, workers=args.workers)
        return dataclasses.replace(cfg, api=api)

    def reread() -> Config:
        # a graceful reload (SIGHUP) serves the configuration file as it is now
        return overridden(config_mod.load(cfg.source) if cfg.source is not None else cfg)

    serve(overridden(cfg), reread=reread, pid_file=args.pid_file)
    return 0
