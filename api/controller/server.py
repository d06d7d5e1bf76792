"""``imaging controller serve``: the controller app under gunicorn, and its periodic stale sweep.

As :mod:`api.server`: gunicorn embedded (``BaseApplication``), ``preload_app`` off so each worker
opens the database after the fork, logs to stderr, TLS through the same hardened ``ssl_context``.
Each worker runs a :class:`Sweeper` thread calling ``remove_stale`` every ``sweep_interval``
seconds; the removal is one transaction, so with several workers each appliance is still removed
(and its ``removed-stale`` event written) once.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from gunicorn.app.base import BaseApplication

from appliance.controller.lifecycle import Registry
from appliance.controller.store import ControllerStore
from appliance.database import as_settings, describe
from appliance.errors import ImagingError

from ..server import (
    LIMIT_REQUEST_FIELD_SIZE,
    LIMIT_REQUEST_FIELDS,
    LIMIT_REQUEST_LINE,
    configure_logging,
    ssl_context,
)
from .app import Settings, create_app

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    bind: str = "127.0.0.1:8780"
    workers: int = 2
    timeout: int = 30
    log_level: str = "info"
    tls_cert: str | None = None
    tls_key: str | None = None


class Sweeper(threading.Thread):
    """Removes the appliances silent for longer than ``stale_after``, every ``interval`` seconds."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="imaging-controller-sweeper", daemon=True)
        self.settings = settings
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        store: ControllerStore | None = None
        stale_after = self.settings.stale_after
        assert stale_after is not None
        while not self._stop.wait(self.settings.sweep_interval):
            try:
                store = store or ControllerStore(self.settings.db)
                for event in Registry(store).remove_stale(stale_after):
                    log.warning("removed appliance %s: %s", event.appliance_id, event.data["reason"])
            except ImagingError as exc:
                log.warning("stale sweep failed: %s", exc.message)
            except Exception:
                log.exception("stale sweep failed")


def gunicorn_options(options: ServeOptions) -> dict[str, Any]:
    out: dict[str, Any] = {
        "bind": [options.bind],
        "workers": options.workers,
        "worker_class": "sync",
        "timeout": options.timeout,
        "graceful_timeout": min(30, options.timeout),
        "preload_app": False,
        "proc_name": "imaging-controller",
        "accesslog": None,
        "errorlog": "-",
        "loglevel": options.log_level,
        "limit_request_line": LIMIT_REQUEST_LINE,
        "limit_request_fields": LIMIT_REQUEST_FIELDS,
        "limit_request_field_size": LIMIT_REQUEST_FIELD_SIZE,
        "ssl_context": ssl_context,
        "control_socket_disable": True,
    }
    if os.path.isdir("/dev/shm"):
        out["worker_tmp_dir"] = "/dev/shm"
    if options.tls_cert:
        out["certfile"] = options.tls_cert
        out["keyfile"] = options.tls_key
    return out


class ControllerServer(BaseApplication):
    """gunicorn running :func:`api.controller.app.create_app`."""

    def __init__(self, settings: Settings, options: ServeOptions) -> None:
        self.settings = settings
        self.options = gunicorn_options(options)
        super().__init__()

    def load_config(self) -> None:
        for name, value in self.options.items():
            self.cfg.set(name, value)

    def load(self) -> Any:
        # in each worker, after the fork
        if self.settings.stale_after:
            Sweeper(self.settings).start()
        return create_app(self.settings)


def serve(settings: Settings, options: ServeOptions) -> None:
    """Serve until SIGTERM/SIGINT; the database is created (mode 0600) and migrated first."""
    configure_logging(options.log_level)
    ControllerStore(settings.db).close()  # a database that cannot be used stops the start here
    log.info("controller database %s", describe(as_settings(settings.db)))
    try:
        ControllerServer(settings, options).run()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
