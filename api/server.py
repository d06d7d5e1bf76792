"""``imaging serve``: gunicorn embedded programmatically (no gunicorn config file, no argv parsing).

* :class:`ApplianceServer` subclasses ``gunicorn.app.base.BaseApplication``; its options come
  from ``config.api`` (:func:`gunicorn_options`).
* ``preload_app`` is off: each worker calls :func:`api.app.create_app` after the fork, so no
  SQLite connection or lock crosses a ``fork()``.
* TLS (when ``api.tls`` is configured) is set through gunicorn's ``ssl_context`` server hook
  (:func:`ssl_context`), which enforces TLS >= 1.2. gunicorn's own ``ssl_version`` option has
  been ignored since gunicorn 21, so it is not used.
* The worker class is gunicorn's ``sync`` worker answering the errors gunicorn raises itself
  (request line or header fields over the limits, malformed HTTP) as EC2 XML rather than HTML
  (:mod:`api.gunicorn_worker`).
* Logging goes to stderr: gunicorn's error log, and one access line per request from the app's
  ``api.access`` logger (with the request id; gunicorn's own access log is off so that requests
  are not logged twice).
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys
from collections.abc import Callable
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.config import Config as GunicornConfig

from appliance import config as config_mod
from appliance import redact
from appliance.config import Config
from appliance.errors import ConfigError
from appliance.statedir import secure_state_dir

from .app import create_app
from .gunicorn_worker import Ec2ErrorWorker

#: seconds workers get to finish in-flight requests after SIGTERM (EC2 calls are short)
GRACEFUL_TIMEOUT = 30
#: bytes of the request line (method, path and query string, version): gunicorn's maximum
LIMIT_REQUEST_LINE = 8190
#: header fields of a request (a SigV4-signed EC2 call sends about ten)
LIMIT_REQUEST_FIELDS = 64
#: bytes of one header field (an Authorization header is about 300)
LIMIT_REQUEST_FIELD_SIZE = 8190
LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
MIN_TLS = ssl.TLSVersion.TLSv1_2

# gunicorn's sync worker asks the hook for a context on every accepted connection; building one
# means re-reading the key and certificate, so each worker process keeps the one it built.
_contexts: dict[tuple[int, str | None, str | None], ssl.SSLContext] = {}


def ssl_context(
    conf: GunicornConfig, default_ssl_context_factory: Callable[[], ssl.SSLContext]
) -> ssl.SSLContext:
    """gunicorn ``ssl_context`` hook: the default server context with TLS 1.2 as the floor.

    Python's own floor is already 1.2 on current versions; setting it here keeps the policy
    independent of the Python build and of the system OpenSSL configuration.
    """
    key = (os.getpid(), conf.certfile, conf.keyfile)
    ctx = _contexts.get(key)
    if ctx is None:
        ctx = default_ssl_context_factory()
        harden(ctx)
        _contexts[key] = ctx
    return ctx


def harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Raise ``ctx``'s minimum protocol to TLS 1.2 (never lower a stricter one)."""
    if ctx.minimum_version < MIN_TLS:  # MINIMUM_SUPPORTED (-2) compares lower too
        ctx.minimum_version = MIN_TLS
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
    return ctx


def gunicorn_options(config: Config) -> dict[str, Any]:
    """gunicorn settings for ``config`` (names as in gunicorn's documentation)."""
    api = config.api
    options: dict[str, Any] = {
        "bind": [api.bind],
        "workers": api.workers,
        # gunicorn's sync worker, answering the errors gunicorn raises itself in EC2 XML
        "worker_class": Ec2ErrorWorker,
        "timeout": api.timeout,
        "graceful_timeout": min(GRACEFUL_TIMEOUT, api.timeout),
        "preload_app": False,
        "proc_name": "imaging-api",
        "accesslog": None,
        "errorlog": "-",
        "loglevel": config.log_level,
        # EC2 GET requests and presigned queries carry long query strings; 8190 is gunicorn's maximum.
        # Longer request lines, and more or longer header fields than below, are refused by gunicorn
        # before the app runs (414/431, as EC2 XML: api.gunicorn_worker).
        "limit_request_line": LIMIT_REQUEST_LINE,
        "limit_request_fields": LIMIT_REQUEST_FIELDS,
        "limit_request_field_size": LIMIT_REQUEST_FIELD_SIZE,
        "ssl_context": ssl_context,
        # No runtime control socket (gunicornc): unused here, and its default per-user path would be
        # shared by every instance on the machine.
        "control_socket_disable": True,
    }
    if os.path.isdir("/dev/shm"):
        # worker heartbeat files on tmpfs: a slow /tmp disk cannot make the arbiter kill workers
        options["worker_tmp_dir"] = "/dev/shm"
    if api.tls_cert is not None:
        options["certfile"] = str(api.tls_cert)
        options["keyfile"] = str(api.tls_key)
    return options


class ApplianceServer(BaseApplication):
    """gunicorn running :func:`api.app.create_app` for one configuration.

    With ``reread`` (``imaging serve``: the configuration file again, with the command line's
    overrides), a ``SIGHUP`` to the arbiter is a graceful reload onto the file as it is now: the
    arbiter re-reads the settings (a changed ``api.bind`` is re-bound), starts new workers on the
    new configuration and lets the old ones finish their in-flight requests
    (:func:`appliance.boot.liveeffects.reload_api` sends it after a live configuration update).
    A file that no longer loads keeps the configuration running.
    """

    def __init__(
        self,
        config: Config,
        options: dict[str, Any] | None = None,
        reread: Callable[[], Config] | None = None,
        pid_file: str | None = None,
    ) -> None:
        self.config = config
        self.options = gunicorn_options(config) if options is None else options
        self.reread = reread
        self.pid_file = pid_file
        self._loaded = False
        super().__init__()

    def load_config(self) -> None:
        if self._loaded and self.reread is not None:
            try:
                config = self.reread()
                check_tls(config)
            except ConfigError as exc:
                logging.getLogger(__name__).error("reload: keeping the running configuration: %s", exc)
            else:
                self.config = config
                self.options = gunicorn_options(config)
        self._loaded = True
        options = dict(self.options)
        if self.pid_file:
            options["pidfile"] = self.pid_file
        for name, value in options.items():
            self.cfg.set(name, value)

    def load(self) -> Any:
        # Runs in each worker after the fork (preload_app is off).
        return create_app(self.config)


def configure_logging(level: str) -> None:
    """Application logs (including the ``api.access`` lines) to stderr at ``level``, redacted (as are
    gunicorn's own, which the workers inherit)."""
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format=LOG_FORMAT, force=True)
    redact.install_logging()


def check_tls(config: Config) -> None:
    """Refuse to start with a configured but unreadable certificate or key (clearer than gunicorn's)."""
    for what, path in (("certificate", config.api.tls_cert), ("key", config.api.tls_key)):
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"api.tls: the TLS {what} {path} does not exist or is not readable")


def serve(config: Config, reread: Callable[[], Config] | None = None, pid_file: str | None = None) -> None:
    """Serve the EC2 Query API and the admin API until SIGTERM/SIGINT (graceful stop), then return;
    ``SIGHUP`` reloads gracefully (onto ``reread()`` when given)."""
    check_tls(config)
    configure_logging(config.log_level)
    secure_state_dir(config.state_dir)  # private, also what an older installation left
    try:
        ApplianceServer(config, reread=reread, pid_file=pid_file).run()
    except SystemExit as exc:
        # The arbiter ends with sys.exit(); a clean stop returns normally to the caller.
        if exc.code not in (0, None):
            raise


def main(argv: list[str] | None = None) -> int:
    """``python -m api.server [--config FILE]`` (``imaging serve`` is the usual entry point)."""
    parser = argparse.ArgumentParser(prog="python -m api.server", description=serve.__doc__)
    parser.add_argument(
        "--config", help="configuration file (default: $IMAGING_CONFIG, /etc/imaging/imaging.yaml)"
    )
    args = parser.parse_args(argv)
    try:
        config = config_mod.load(args.config)
        serve(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
