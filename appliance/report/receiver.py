"""Receiving reports: a verifier for front ends to reuse, and a small reference controller.

:class:`ReportVerifier` checks one pushed message: the HMAC-SHA256 signature over the exact body
(constant-time), the protocol version, ``seq`` strictly above the last one accepted from that
appliance (replays refused) and ``ts`` within ``window`` seconds of now (stale messages refused).

The reference controller (``python -m appliance.report.receiver --bind 127.0.0.1:PORT --secret S
--log FILE [--cloud-key PEM --pull-task JSON]``) is a lab and test tool built on ``http.server``, not
the appliance's service API. It serves:

- ``POST /v1/reports``: verified messages are appended to the JSON-lines ``--log`` (one
  ``{"received_at", "message"}`` per line, in acceptance order) and answered ``200 {"ok": true,
  "cancel": [...]}``; 401 forged, 409 ``replayed`` / ``stale``, 400 malformed. After a restart
  the last seq per appliance is recovered from the log.
- with ``--cloud-key`` (the cloud's RSA private key), the Eucalyptus side of pull mode
  (:mod:`.imaging_service`): ``POST /services/Imaging`` (``GetInstanceImportTask``,
  ``PutInstanceImportTaskStatus``; SigV2/SigV4 with the temporary credentials it issued, XML replies
  in the 2014-02-14 imaging namespace; statuses logged as ``{"received_at", "pull_status": {...}}``
  lines), ``GET /latest/meta-data/…`` (instance id and instance-profile credentials, as the cloud's
  metadata service) and ``GET /download-manifests/DM-…`` (the signed download manifests it made);
- ``POST /admin/cancel`` ``{"task_ids": [...]}`` and ``POST /admin/pull-task`` (a task as for
  ``--pull-task``: ``{"importTaskId", "format", "volumeId", "importManifestUrl"}`` or several
  ``volumes``), ``POST /admin/pull-cancel`` ``{"task_id": ...}``, ``GET /health``: loopback
  test controls, unauthenticated.
- ``GET /appliances``: every appliance heard from, its last seq, and ``stale`` when it has been
  silent for longer than ``--stale-after`` seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..timestamps import format_time, parse_time, utc_now
from . import messages
from .imaging_service import DM_PATH, ImagingService, Refusal

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 300.0
#: an appliance silent for longer is listed as stale (Octavia's heartbeat_timeout is 60 s)
DEFAULT_STALE_AFTER = 90.0
MAX_BODY = 1 << 20
TERMINAL = ("completed", "failed", "cancelled", "cancelling")


class ReportRejected(Exception):
    """A message was refused; ``status`` is the HTTP status to answer, ``error`` a stable word."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error


class ReportVerifier:
    """Verifies and decodes pushed messages (thread-safe). ``secrets`` maps appliance id → key;
    a plain string is one key for every appliance."""

    def __init__(
        self,
        secrets: str | dict[str, str],
        *,
        window: float = DEFAULT_WINDOW,
        last_seq: dict[str, int] | None = None,
    ) -> None:
        self._secrets = secrets
        self.window = window
        self.last_seq: dict[str, int] = dict(last_seq or {})
        self._lock = threading.Lock()

    def secret_for(self, appliance_id: str | None) -> str | None:
        if isinstance(self._secrets, str):
            return self._secrets
        return self._secrets.get(appliance_id or "")

    def verify(self, body: bytes, signature: str | None, now: datetime | None = None) -> dict[str, Any]:
        """The decoded message, or :class:`ReportRejected`. Accepting it advances the appliance's seq."""
        try:
            message = json.loads(body)
        except ValueError:
            message = None
        claimed = message.get("appliance_id") if isinstance(message, dict) else None
        if not isinstance(claimed, str):  # a shared secret signs messages without one too
            claimed = None
        secret = self.secret_for(claimed)
        # The signature is checked before anything in the body is believed.
        if secret is None or not messages.signature_valid(secret, body, signature):
            raise ReportRejected(401, "forged", "signature missing or wrong")
        if not isinstance(message, dict):
            raise ReportRejected(400, "malformed", "body is not a JSON object")
        if message.get("ver") != messages.VERSION:
            raise ReportRejected(400, "version", f"unsupported message version {message.get('ver')!r}")
        seq, ts = message.get("seq"), message.get("ts")
        if not isinstance(seq, int) or not isinstance(ts, str) or message.get("type") not in messages.TYPES:
            raise ReportRejected(400, "malformed", "seq, ts and type are required")
        try:
            age = ((now or utc_now()) - parse_time(ts)).total_seconds()
        except ValueError:
            raise ReportRejected(400, "malformed", f"ts {ts!r} is not ISO-8601") from None
        if abs(age) > self.window:
            raise ReportRejected(
                409, "stale", f"ts is {age:.0f} s away from now (window {self.window:.0f} s)"
            )
        with self._lock:
            last = self.last_seq.get(claimed or "", 0)
            if seq <= last:
                raise ReportRejected(409, "replayed", f"seq {seq} is not above {last}")
            self.last_seq[claimed or ""] = seq
        return message


# --------------------------------------------------------------------------------------------- controller


class Controller:
    """The reference controller's state: accepted messages, cancel requests and the pull queue."""

    def __init__(
        self,
        secret: str,
        log_path: Path,
        *,
        window: float = DEFAULT_WINDOW,
        stale_after: float = DEFAULT_STALE_AFTER,
        imaging: ImagingService | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.secret = secret
        #: the time now (aware UTC): messages' freshness and when an appliance was last heard from
        self.clock = clock
        self.log_path = Path(log_path)
        self.stale_after = stale_after
        #: appliance id → when its last accepted message arrived
        self.last_seen: dict[str, datetime] = {}
        self._lock = threading.Lock()
        self.verifier = ReportVerifier(secret, window=window, last_seq=self._recover())
        self.cancel: set[str] = set()
        #: the Eucalyptus side (pull mode); None: /services/Imaging is not served
        self.imaging = imaging

    def _recover(self) -> dict[str, int]:
        last: dict[str, int] = {}
        if self.log_path.exists():
            for line in self.log_path.read_text().splitlines():
                message = json.loads(line).get("message")
                if message:
                    last[message["appliance_id"]] = max(last.get(message["appliance_id"], 0), message["seq"])
        return last

    def _append(self, record: dict[str, Any]) -> None:
        record = {"received_at": format_time(), **record}
        with self.log_path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def request_cancel(self, task_ids: Iterable[str]) -> None:
        """Ask, in every reply from now on, for these tasks to be cancelled (until they are over)."""
        with self._lock:
            self.cancel.update(task_ids)

    def accept(self, body: bytes, signature: str | None) -> dict[str, Any]:
        """Verify and record one pushed message; the reply body."""
        with self._lock:  # verify + append under one lock: the log is in acceptance order
            now = self.clock()
            message = self.verifier.verify(body, signature, now)
            self.last_seen[message["appliance_id"]] = now
            self._append({"message": message})
            task = message.get("task") or {}
            if message.get("event") == "state" and task.get("state") in TERMINAL:
                self.cancel.discard(task.get("id"))
            return {"ok": True, "seq": message["seq"], "cancel": sorted(self.cancel)}

    def appliances(self, now: datetime | None = None) -> dict[str, dict[str, Any]]:
        """Every appliance heard from since start: last seq, when, and whether it is now stale."""
        now = now or self.clock()
        with self._lock:
            return {
                appliance: {
                    "last_seq": self.verifier.last_seq.get(appliance),
                    "last_seen": format_time(seen),
                    "stale": (now - seen).total_seconds() > self.stale_after,
                }
                for appliance, seen in self.last_seen.items()
            }

    # -- pull protocol --------------------------------------------------------------------------

    def _service(self) -> ImagingService:
        if self.imaging is None:
            raise ReportRejected(404, "not found", "pull mode needs --cloud-key")
        return self.imaging

    def queue_pull_task(self, task: dict[str, Any]) -> None:
        self._service().queue(task)

    def cancel_pull_task(self, task_id: str) -> None:
        self._service().cancel(task_id)

    def imaging_request(self, host: str, headers: Any, body: bytes, base_url: str) -> str:
        """Answer one signed EC2-query request to the Imaging service (XML); :class:`Refusal` when the
        signature does not check out."""
        service = self._service()
        params = service.authenticate(host, messages.IMAGING_PATH, headers, body)
        action = params.get("Action")
        if action == "GetInstanceImportTask":
            return service.get_task(params, base_url)
        if action == "PutInstanceImportTaskStatus":
            reply, record = service.put_status(params)
            with self._lock:
                self._append({"pull_status": record})
            return reply
        raise Refusal(400, "InvalidAction", f"unknown Action {action!r}")


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value).encode())

    def do_GET(self) -> None:
        imaging = self.server.controller.imaging
        path = self.path.split("?", 1)[0]
        if imaging is not None and path.startswith("/latest/"):
            document = imaging.metadata(path)
            if document is None:
                self._send(404, b"Not Found", "text/plain")
            else:
                self._send(200, document, "text/plain")
        elif imaging is not None and path.startswith(DM_PATH):
            manifest = imaging.download_manifest(path[len(DM_PATH) :])
            if manifest is None:
                self._send(404, b"<Error><Code>NoSuchKey</Code></Error>", "application/xml")
            else:
                self._send(200, manifest, "application/xml")
        elif self.path in ("/health", "/"):
            self._json(200, {"ok": True})
        elif self.path == "/appliances":
            self._json(200, self.server.controller.appliances())
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._json(413, {"error": "too large"})
            return
        body = self.rfile.read(length)
        ctl = self.server.controller
        signature = self.headers.get(messages.SIGNATURE_HEADER)
        try:
            if self.path == messages.REPORTS_PATH:
                self._json(200, ctl.accept(body, signature))
            elif self.path == messages.IMAGING_PATH:
                host = self.headers.get("Host") or ""
                try:
                    reply = ctl.imaging_request(host, self.headers, body, f"http://{host}")
                except Refusal as exc:
                    log.warning("refused an Imaging request: %s %s", exc.code, exc)
                    self._send(exc.status, exc.xml(), "text/xml")
                    return
                self._send(200, reply.encode(), "text/xml")
            elif self.path == "/admin/cancel":
                ctl.request_cancel(json.loads(body)["task_ids"])
                self._json(200, {"ok": True})
            elif self.path == "/admin/pull-task":
                ctl.queue_pull_task(json.loads(body))
                self._json(200, {"ok": True})
            elif self.path == "/admin/pull-cancel":
                ctl.cancel_pull_task(json.loads(body)["task_id"])
                self._json(200, {"ok": True})
            else:
                self._json(404, {"error": "not found"})
        except ReportRejected as exc:
            log.warning("refused a report: %s", exc)
            self._json(exc.status, {"error": exc.error, "message": str(exc)})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, bind: tuple[str, int], controller: Controller) -> None:
        super().__init__(bind, _Handler)
        self.controller = controller


class ReceiverServer:
    """The reference controller serving in a thread (for tests and labs); :meth:`stop` closes it."""

    def __init__(self, bind: str, controller: Controller) -> None:
        host, _, port = bind.rpartition(":")
        self.controller = controller
        self.httpd = _Server((host.strip("[]"), int(port)), controller)
        self.url = f"http://{bind}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="receiver", daemon=True)

    def start(self) -> ReceiverServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(10)


def main(argv: list[str] | None = None) -> int:
    """``python -m appliance.report.receiver``: run the reference controller until interrupted."""
    p = argparse.ArgumentParser(
        prog="python -m appliance.report.receiver", description=__doc__.splitlines()[0]
    )
    p.add_argument("--bind", default="127.0.0.1:8780", help="HOST:PORT to listen on")
    p.add_argument("--secret", required=True, help="the shared HMAC key")
    p.add_argument("--log", required=True, type=Path, help="JSON-lines file of accepted messages")
    p.add_argument("--window", type=float, default=DEFAULT_WINDOW, help="max clock skew / staleness (s)")
    p.add_argument(
        "--stale-after", type=float, default=DEFAULT_STALE_AFTER, help="flag appliances silent this long (s)"
    )
    p.add_argument("--cloud-key", type=Path, help="the cloud's RSA private key (PEM): serve pull mode")
    p.add_argument("--instance-id", default="i-00000001", help="instance id its metadata service gives")
    p.add_argument(
        "--credential-lifetime", type=float, default=3600.0, help="seconds issued credentials stay valid"
    )
    p.add_argument("--pull-task", action="append", default=[], help="JSON of a task to hand out (repeatable)")
    p.add_argument("--cancel", action="append", default=[], help="task id to ask the appliance to cancel")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="imaging-controller %(levelname)s: %(message)s")
    imaging = None
    if args.cloud_key is not None:
        imaging = ImagingService(
            args.cloud_key.read_bytes(), instance_id=args.instance_id, lifetime=args.credential_lifetime
        )
    controller = Controller(
        args.secret, args.log, window=args.window, stale_after=args.stale_after, imaging=imaging
    )
    controller.request_cancel(args.cancel)
    for text in args.pull_task:
        controller.queue_pull_task(json.loads(text))
    server = ReceiverServer(args.bind, controller)
    log.info("reference controller on %s, logging to %s", server.url, args.log)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
