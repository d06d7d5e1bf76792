"""``imaging controller …``: run the controller, and administer it over its REST API.

``serve`` runs it (gunicorn; imported only by that command). The admin commands (``register``,
``list``, ``show``, ``remove``, ``remove-stale``, ``events``) are clients of the REST API rather than
writers of the database: one path checks every change (the same validation, events and auth as a
script calling the API), they work from any machine that can reach the controller, and they do not
care which database (SQLite or PostgreSQL) is behind it. They find it with ``--url``
(``$IMAGING_CONTROLLER_URL``) and authenticate with the admin token (``--token-file``,
``$IMAGING_CONTROLLER_TOKEN``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from appliance.boot.userdata import COMPACT_PREFIX
from appliance.database import StoreConfig, check_store_url
from appliance.errors import ImagingError, UsageError

DEFAULT_URL = "http://127.0.0.1:8780"
TOKEN_ENV = "IMAGING_CONTROLLER_TOKEN"
URL_ENV = "IMAGING_CONTROLLER_URL"
ENROL_ENV = "IMAGING_CONTROLLER_ENROL_SECRET"


class ControllerApiError(ImagingError):
    """An error answer of the controller, with its code."""


def _secret(path: str | None, env: str | None, what: str, *, required: bool) -> str | None:
    """A secret from a file (``-`` is stdin) or, without one, an environment variable: never argv,
    which every user of the machine can read."""
    if path:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        value = text.strip()
    else:
        value = os.environ.get(env or "", "").strip()
    if not value and required:
        where = f"--{what}-file" + (f" or ${env}" if env else "")
        raise UsageError(f"no {what.replace('-', ' ')}: give {where}")
    return value or None


# -- the client -----------------------------------------------------------------------------------


def call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """One admin request; the decoded JSON answer (None for 204)."""
    token = _secret(args.token_file, TOKEN_ENV, "token", required=True)
    url = (args.url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/") + path
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as resp:
            text = resp.read()
    except urllib.error.HTTPError as exc:
        raise _api_error(exc) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ControllerApiError(
            f"cannot reach the controller at {url}: {reason}", "ControllerUnreachable"
        ) from None
    return json.loads(text) if text else None


def _api_error(exc: urllib.error.HTTPError) -> ControllerApiError:
    try:
        error = json.loads(exc.read(1 << 20))["error"]
        code, message = str(error["code"]), str(error["message"])
        fields = error.get("fields") or []
    except (OSError, ValueError, KeyError, TypeError):
        return ControllerApiError(f"HTTP {exc.code} {exc.reason}", "ControllerError")
    if fields:
        message = "; ".join(f"{f.get('field')}: {f.get('message')}" for f in fields)
    return ControllerApiError(message, code)


def _print(args: argparse.Namespace, value: Any, text: str) -> None:
    print(json.dumps(value, indent=2) if args.json else text)


# -- commands -------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, _cfg: Any) -> int:
    # gunicorn and the whole HTTP app: only `imaging controller serve` needs them
    from .server import ServeOptions, Settings, serve

    token = _secret(args.admin_token_file, TOKEN_ENV, "admin-token", required=True)
    assert token is not None
    if len(token) < 16:
        raise UsageError("the admin token must be at least 16 characters")
    enrol = _secret(args.enrol_secret_file, ENROL_ENV, "enrol-secret", required=False)
    if enrol is not None and (len(enrol) < 16 or ":" in enrol):
        raise UsageError("the enrolment secret must be at least 16 characters, without ':'")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    settings = Settings(
        db=_database(args.db, args.db_password_file),
        admin_token=token,
        enrol_secret=enrol,
        stale_after=args.stale_after or None,
        sweep_interval=args.sweep_interval,
    )
    options = ServeOptions(
        bind=args.bind,
        workers=args.workers,
        log_level=args.log_level,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    serve(settings, options)
    return 0


def _database(db: str, password_file: str | None) -> StoreConfig | Path:
    """``--db``: a SQLite file, or a ``postgresql://`` URL (its password in ``--db-password-file``)."""
    if not db.startswith("postgresql://"):
        if password_file:
            raise UsageError("--db-password-file goes with a postgresql:// --db")
        return Path(db)
    problem = check_store_url(db)
    if problem is not None:
        raise UsageError(f"--db {problem}")
    return StoreConfig(url=db, password_file=Path(password_file) if password_file else None)


def _load_config(path: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        return yaml.safe_load(text)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"{path} is not YAML or JSON") from exc


def cmd_register(args: argparse.Namespace, _cfg: Any) -> int:
    config = _load_config(args.config)
    secret = _secret(args.secret_file, None, "secret", required=False) if args.secret_file else None
    secret = secret or secrets.token_urlsafe(32)
    body = {"appliance_id": args.appliance_id, "secret": secret, "config": config, "dynamic": args.dynamic}
    view = call(args, "POST", "/v1/appliances", body)
    kind = "for dynamic assignment" if args.dynamic else "by id"
    _print(args, view, f"registered {view['id']} ({kind}), configuration version {view['config_version']}")
    if args.boot_line:
        # asked for: the user data to launch this appliance with (it holds the secret)
        url = (args.url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        print(f"{COMPACT_PREFIX}{view['id']}:{url}:{secret}")
    return 0


def cmd_publish(args: argparse.Namespace, _cfg: Any) -> int:
    config = _load_config(args.config)
    doc = call(args, "POST", f"/v1/appliances/{args.appliance_id}/configs", {"config": config})
    _print(args, doc, f"published configuration version {doc['config_version']} for {doc['appliance_id']}")
    return 0


def _row(a: dict[str, Any]) -> str:
    seen = a.get("last_seen") or "never"
    where = ",".join(a.get("addresses") or []) or "-"
    dyn = f"dynamic:{a.get('assigned_to') or 'unassigned'}" if a.get("dynamic") else "static"
    return f"{a['id']}\t{a['status']}\t{a.get('health') or '-'}\t{dyn}\t{seen}\t{where}"


def cmd_list(args: argparse.Namespace, _cfg: Any) -> int:
    doc = call(args, "GET", "/v1/appliances")
    lines = ["ID\tSTATUS\tHEALTH\tASSIGNMENT\tLAST SEEN\tADDRESSES", *(_row(a) for a in doc["appliances"])]
    _print(args, doc, "\n".join(lines))
    return 0


def cmd_show(args: argparse.Namespace, _cfg: Any) -> int:
    view = call(args, "GET", f"/v1/appliances/{args.appliance_id}")
    print(json.dumps(view, indent=2))
    return 0


def cmd_remove(args: argparse.Namespace, _cfg: Any) -> int:
    call(args, "DELETE", f"/v1/appliances/{args.appliance_id}")
    _print(args, {"removed": args.appliance_id}, f"removed {args.appliance_id}")
    return 0


def cmd_remove_stale(args: argparse.Namespace, _cfg: Any) -> int:
    body = {} if args.stale_timeout is None else {"timeout": args.stale_timeout}
    doc = call(args, "POST", "/v1/stale-removals", body)
    text = "\n".join(f"removed {e['appliance_id']}: {e['data']['reason']}" for e in doc["removed"])
    _print(args, doc, text or "no appliance is stale")
    return 0


def cmd_events(args: argparse.Namespace, _cfg: Any) -> int:
    query = f"?after={args.after}&limit={args.limit}"
    if args.appliance:
        query += f"&appliance={args.appliance}"
    doc = call(args, "GET", "/v1/events" + query)
    lines = [
        f"{e['id']}\t{e['time']}\t{e['appliance_id']}\t{e['kind']}\t{json.dumps(e['data'])}"
        for e in doc["events"]
    ]
    _print(args, doc, "\n".join(lines))
    return 0


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help=f"the controller (default: ${URL_ENV}, else {DEFAULT_URL})")
    p.add_argument(
        "--token-file", help=f"file holding the admin token (default: ${TOKEN_ENV}); '-' reads stdin"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="print the API's JSON answer")
    p.set_defaults(needs_config=False)


def add_commands(sub: Any) -> None:
    """Add ``controller`` and its subcommands to the ``imaging`` subcommands."""
    c = sub.add_parser(
        "controller",
        help="the controller of a fleet of appliances: serve it, register and remove appliances",
        description="Run the appliance controller (pre-registration, configuration at boot, dynamic "
        "assignment, status updates, stale removal) or administer a running one over its REST API.",
    )
    csub = c.add_subparsers(dest="controller_command", required=True, metavar="COMMAND")

    s = csub.add_parser("serve", help="serve the controller API (gunicorn)")
    s.add_argument(
        "--db",
        default="/var/lib/imaging/controller.db",
        help="the controller's database: a SQLite file, or a postgresql://user@host:port/db URL (a "
        "database or schema of its own; several controllers may share it)",
    )
    s.add_argument("--db-password-file", help="file holding the PostgreSQL password (first line)")
    s.add_argument("--bind", default="127.0.0.1:8780", help="HOST:PORT to listen on")
    s.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    s.add_argument(
        "--admin-token-file",
        help=f"file holding the admin bearer token (default: ${TOKEN_ENV}); at least 16 characters",
    )
    s.add_argument(
        "--enrol-secret-file",
        help=f"file holding the fleet's enrolment secret (default: ${ENROL_ENV}); "
        "without it no dynamic assignment",
    )
    s.add_argument(
        "--stale-after",
        type=float,
        default=90.0,
        help="remove appliances silent for longer than this many seconds (0: never; default 90)",
    )
    s.add_argument("--sweep-interval", type=float, default=10.0, help="seconds between two stale sweeps")
    s.add_argument("--tls-cert", help="serve HTTPS with this certificate chain (PEM file)")
    s.add_argument("--tls-key", help="the private key of --tls-cert (PEM file)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=cmd_serve, needs_config=False)

    r = csub.add_parser("register", help="pre-register an appliance with its configuration and secret")
    r.add_argument("appliance_id")
    r.add_argument(
        "--config",
        required=True,
        help="YAML or JSON file with the imaging: section of its user data ('-': stdin)",
    )
    r.add_argument(
        "--secret-file", help="file holding the secret shared with the appliance (default: a new random one)"
    )
    r.add_argument("--dynamic", action="store_true", help="hand it to an appliance booting without an id")
    r.add_argument(
        "--boot-line", action="store_true", help="print the compact user data line (it holds the secret)"
    )
    _client_options(r)
    r.set_defaults(func=cmd_register)

    pb = csub.add_parser(
        "publish",
        help="publish a new configuration version of an appliance (applied live by the appliance)",
    )
    pb.add_argument("appliance_id")
    pb.add_argument(
        "--config",
        required=True,
        help="YAML or JSON file with the whole new imaging: section ('-': stdin)",
    )
    _client_options(pb)
    pb.set_defaults(func=cmd_publish)

    ls = csub.add_parser("list", help="list the registered appliances")
    _client_options(ls)
    ls.set_defaults(func=cmd_list)

    sh = csub.add_parser("show", help="show one appliance (no secret)")
    sh.add_argument("appliance_id")
    _client_options(sh)
    sh.set_defaults(func=cmd_show)

    rm = csub.add_parser("remove", help="remove an appliance")
    rm.add_argument("appliance_id")
    _client_options(rm)
    rm.set_defaults(func=cmd_remove)

    st = csub.add_parser("remove-stale", help="remove the appliances silent for longer than a timeout")
    st.add_argument(
        "--stale-timeout", type=float, help="seconds of silence (default: the controller's --stale-after)"
    )
    _client_options(st)
    st.set_defaults(func=cmd_remove_stale)

    ev = csub.add_parser("events", help="list lifecycle events (registered, assigned, updated, removed, …)")
    ev.add_argument("--after", type=int, default=0, help="only events with a larger id")
    ev.add_argument("--limit", type=int, default=100)
    ev.add_argument("--appliance", help="only this appliance's events")
    _client_options(ev)
    ev.set_defaults(func=cmd_events)
