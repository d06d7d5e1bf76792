"""``imaging config init|show|validate``: create, inspect and check the configuration file."""

from __future__ import annotations

import argparse
import json
import secrets
import string
import sys
from pathlib import Path
from typing import Any

import yaml

from .. import config as config_mod
from ..atomicfile import write_atomic
from ..errors import ConfigError, UsageError
from ..redact import redact
from ..service.taskcgroup import TaskCaps, host_problems
from ..targets import get_image_target, get_volume_target
from ..workflow.engine import Engine
from ..workflow.hookpoints import validate_hooks

_KEY_ALPHABET = string.ascii_uppercase + string.digits
#: the account of the key ``imaging config init`` writes
LOCAL_ACCOUNT = "local"


def generate_credentials() -> dict[str, str]:
    """A fresh access key (AWS-like: ``AKIA`` + 16) and a 40-character secret."""
    access = "AKIA" + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(16))
    secret = "".join(secrets.choice(string.ascii_letters + string.digits + "+/") for _ in range(40))
    return {"access_key": access, "secret_key": secret}


def local_config(
    state_dir: str,
    bind: str,
    s3_endpoint: str | None = None,
    store: str | None = None,
    store_password_file: str | None = None,
    shared_volumes: str | None = None,
) -> dict[str, Any]:
    """A configuration for running the appliance on this machine: SQLite, scratch and volumes under
    state_dir, one API key (account ``local``, ``role: admin``: the EC2 API and the whole admin API
    with one key pair); with ``s3_endpoint``, that S3 server is trusted as the source of uploads;
    with ``store`` (a ``postgresql://`` URL, its password in ``store_password_file``) the tasks are
    in that database instead, and the volumes in ``shared_volumes``, a directory every appliance
    sharing the database mounts (``targets.volume.shared``)."""
    sources: dict[str, Any] = {"allowed_endpoints": []}
    if s3_endpoint:
        endpoint = s3_endpoint.rstrip("/")
        sources = {
            "allowed_endpoints": [endpoint],
            # a local S3 stand-in (moto, s3rver) accepts any key
            "s3": {
                "endpoint_url": endpoint,
                "region": "us-east-1",
                "access_key": "local",
                "secret_key": "local",
            },
        }
    data: dict[str, Any] = {
        "state_dir": state_dir,
        "api": {
            "bind": bind,
            "credentials": [generate_credentials() | {"account": LOCAL_ACCOUNT, "role": config_mod.ADMIN}],
        },
        "scratch": {"quota": "20GiB"},
        "targets": {
            "volume": {"type": "file", "directory": "volumes"},
            "image": {"type": "file", "directory": "images"},
        },
        "sources": sources,
    }
    if store:
        data["store"] = {"url": store}
        if store_password_file:
            data["store"]["password_file"] = store_password_file
        if not shared_volumes:
            raise UsageError(
                "--store postgresql://… needs --shared-volumes DIR: the volume directory every appliance"
                " sharing the database mounts at that path (another appliance may take a task over)"
            )
        data["targets"]["volume"] = {"type": "file", "directory": shared_volumes, "shared": True}
    elif store_password_file or shared_volumes:
        raise UsageError("--store-password-file and --shared-volumes go with --store postgresql://…")
    return data


def cmd_init(args: argparse.Namespace, _cfg: config_mod.Config | None) -> int:
    path = Path(args.path)
    if path.exists() and not args.force:
        raise UsageError(f"{path} exists; use --force to replace it")
    data = local_config(
        args.state_dir, args.bind, args.s3_endpoint, args.store, args.store_password_file, args.shared_volumes
    )
    config_mod.from_dict(data, base_dir=path.resolve().parent)  # never write a file that would not load
    text = "# written by `imaging config init`; secrets inside: keep it private (mode 0600)\n"
    text += yaml.safe_dump(data, sort_keys=False)
    write_atomic(path, text, 0o600)
    print(f"wrote {path}")
    return 0


def _endpoint(cfg: config_mod.Config) -> str:
    scheme = "https" if cfg.api.tls_cert else "http"
    return f"{scheme}://{cfg.api.bind}"


def cmd_show(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    if args.env:
        # For `eval "$(imaging config show --env)"`: AWS clients then talk to this appliance.
        if not cfg.api.credentials:
            raise UsageError("the configuration has no api.credentials")
        access, secret = next(iter(cfg.api.credentials.items()))
        print(f"export AWS_ACCESS_KEY_ID={access}")
        print(f"export AWS_SECRET_ACCESS_KEY='{secret}'")
        print(f"export AWS_DEFAULT_REGION={cfg.api.region}")
        print(f"export IMAGING_ENDPOINT={_endpoint(cfg)}")
        return 0
    if args.credentials:
        # What a newcomer needs to point boto3 or the AWS CLI at this appliance.
        print(f"endpoint:   {_endpoint(cfg)}")
        for access, secret in cfg.api.credentials.items():
            print(f"access key: {access}")
            print(f"secret key: {secret}")
            print(f"account:    {cfg.api.principals[access].account} ({cfg.api.principals[access].role})")
        print(f"region:     {cfg.api.region}")
        return 0
    # every secret (API credentials, S3 sources, the artifact store, targets, the controller's
    # shared secret, hook arguments, URL user info and signatures) as appliance.redact defines it
    raw = redact(json.loads(json.dumps(cfg.raw, default=str)))
    yaml.safe_dump(raw, sys.stdout, sort_keys=False)
    return 0


def cmd_validate(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    # Loading already validated it (main() reports errors); targets validate their own settings.
    get_volume_target(cfg)
    get_image_target(cfg)
    _validate_hooks(cfg)
    # valid, but say what this machine cannot enforce (the worker's health says it too)
    for problem in host_problems(TaskCaps.from_config(cfg.worker)):
        print(f"imaging: warning: {problem}", file=sys.stderr)
    print(f"{cfg.source or 'embedded defaults'}: valid")
    return 0


def _validate_hooks(cfg: config_mod.Config) -> None:
    """Every configured hook must name a registered action (plugins loaded) with valid arguments."""
    engine = Engine(cfg)  # loads hooks.plugins_dir into the registry
    problems = [*engine.registry.plugin_errors.values(), *map(str, validate_hooks(engine.loader))]
    if problems:
        raise ConfigError("; ".join(problems))


def add_commands(sub: Any) -> None:
    c = sub.add_parser("config", help="create, show and validate the configuration").add_subparsers(
        dest="config_command", required=True, metavar="ACTION"
    )
    s = c.add_parser("init", help="write a local configuration with generated API credentials (mode 0600)")
    s.add_argument("path")
    s.add_argument(
        "--state-dir", default=".", help="state directory, relative to the file (default: its directory)"
    )
    s.add_argument("--bind", default="127.0.0.1:8773", help="API address (default 127.0.0.1:8773)")
    s.add_argument("--force", action="store_true", help="replace an existing file")
    s.add_argument(
        "--s3-endpoint", metavar="URL", help="trust this (local) S3 server as the source of uploads"
    )
    s.add_argument(
        "--store",
        metavar="URL",
        help="the task database: postgresql://USER@HOST[:PORT]/DATABASE, shared by appliances "
        "(default: SQLite in the state directory)",
    )
    s.add_argument(
        "--store-password-file", metavar="FILE", help="file holding the PostgreSQL password (with --store)"
    )
    s.add_argument(
        "--shared-volumes",
        metavar="DIR",
        help="with --store: the volume directory, mounted by every appliance sharing the database",
    )
    s.set_defaults(func=cmd_init, needs_config=False)
    s = c.add_parser("show", help="print the effective configuration (secrets redacted)")
    s.add_argument(
        "--credentials", action="store_true", help="print only the endpoint and the API credentials"
    )
    s.add_argument(
        "--env", action="store_true", help="print shell exports of the credentials for AWS clients"
    )
    s.set_defaults(func=cmd_show)
    s = c.add_parser("validate", help="load and validate the configuration, including target settings")
    s.set_defaults(func=cmd_validate)
