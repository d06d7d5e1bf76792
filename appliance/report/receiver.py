"""Receiving reports: a verifier for front ends to reuse, and a small reference controller.

:class:`ReportVerifier` checks one pushed message: the HMAC-SHA256 signature over the exact body
(constant-time), the protocol version, ``seq`` strictly above the last one accepted from that
appliance (replays refused) and ``ts`` within ``window`` seconds of now (stale messages refused).

The reference controller (``python -m appliance.report.receiver --bind 127.0.0.1:PORT --secret S
--log FILE [--pull-task JSON]``) is a lab and test tool built on ``http.server``, not the
appliance's service API. It serves:

- ``POST /v1/reports``: verified messages are appended to the JSON-lines ``--log`` (one
  ``{"received_at", "message"}`` per line, in acceptance order) and answered ``200 {"ok": true,
  "cancel": [...]}``; 401 forged, 409 ``replayed`` / ``stale``, 400 malformed. After a restart
  the last seq per appliance is recovered from the log.
- ``POST /services/Imaging``: the Eucalyptus pull protocol (``GetInstanceImportTask``,
  ``PutInstanceImportTaskStatus``, EC2-query form bodies, XML replies in the 2014-02-14 imaging
  namespace); statuses are logged as ``{"received_at", "pull_status": {...}}`` lines.
- ``POST /admin/cancel`` ``{"task_ids": [...]}`` and ``POST /admin/pull-task`` (a task as for
  ``--pull-task``), ``POST /admin/pull-cancel`` ``{"task_id": ...}``, ``GET /health``: loopback
  test controls, unauthenticated.
- ``GET /appliances``: every appliance heard from, its last seq, and ``stale`` when it has been
  silent for longer than ``--stale-after`` seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import urllib.parse
from collections.abc import Iterable
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from ..timestamps import format_time, parse_time, utc_now
from . import messages

log = logging.getLogger(__name__)

IMAGING_NS = "http://www.eucalyptus.com/ns/imaging/2014-02-14/"
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
    ) -> None:
        self.secret = secret
        self.log_path = Path(log_path)
        self.stale_after = stale_after
        #: appliance id → when its last accepted message arrived
        self.last_seen: dict[str, datetime] = {}
        self._lock = threading.Lock()
        self.verifier = ReportVerifier(secret, window=window, last_seq=self._recover())
        self.cancel: set[str] = set()
        self.pull_queue: list[dict[str, Any]] = []
        #: remote task id → {"task": ..., "worker": InstanceId, "cancelled": bool, "finished": bool}
        self.assigned: dict[str, dict[str, Any]] = {}

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
            message = self.verifier.verify(body, signature)
            self.last_seen[message["appliance_id"]] = utc_now()
            self._append({"message": message})
            task = message.get("task") or {}
            if message.get("event") == "state" and task.get("state") in TERMINAL:
                self.cancel.discard(task.get("id"))
            return {"ok": True, "seq": message["seq"], "cancel": sorted(self.cancel)}

    def appliances(self, now: datetime | None = None) -> dict[str, dict[str, Any]]:
        """Every appliance heard from since start: last seq, when, and whether it is now stale."""
        now = now or utc_now()
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

    def queue_pull_task(self, task: dict[str, Any]) -> None:
        with self._lock:
            self.pull_queue.append(task)

    def cancel_pull_task(self, task_id: str) -> None:
        with self._lock:
            if task_id in self.assigned:
                self.assigned[task_id]["cancelled"] = True

    def imaging(self, body: bytes, signature: str | None) -> str:
        """Answer one EC2-query request to the Imaging service (XML)."""
        if not messages.signature_valid(self.secret, body, signature):
            raise ReportRejected(401, "forged", "signature missing or wrong")
        params = {k: v[-1] for k, v in urllib.parse.parse_qs(body.decode(), keep_blank_values=True).items()}
        action = params.get("Action")
        with self._lock:
            if action == "GetInstanceImportTask":
                return self._get_task(params)
            if action == "PutInstanceImportTaskStatus":
                return self._put_status(params)
        raise ReportRejected(400, "InvalidAction", f"unknown Action {action!r}")

    def _get_task(self, params: dict[str, str]) -> str:
        worker = params.get("InstanceId", "")
        if not self.pull_queue:
            return f'<GetInstanceImportTaskResponse xmlns="{IMAGING_NS}"/>'
        task = self.pull_queue.pop(0)
        self.assigned[task["importTaskId"]] = {"task": task, "worker": worker, "cancelled": False}
        item = (
            f"<manifestUrl>{escape(task['manifestUrl'])}</manifestUrl>"
            f"<format>{escape(task['format'])}</format>"
        )
        # <bytes> and <volumeSize> extend the Eucalyptus shape (its worker read both from the manifest)
        if "bytes" in task:
            item += f"<bytes>{int(task['bytes'])}</bytes>"
        volume = f"<volumeId>{escape(task.get('volumeId', ''))}</volumeId>"
        if "volumeSize" in task:
            volume += f"<volumeSize>{int(task['volumeSize'])}</volumeSize>"
        return (
            f'<GetInstanceImportTaskResponse xmlns="{IMAGING_NS}">'
            f"<importTaskId>{escape(task['importTaskId'])}</importTaskId>"
            "<importTaskType>import_volume</importTaskType>"
            f"<volumeTask>{volume}<imageManifestSet><item>{item}</item></imageManifestSet></volumeTask>"
            "</GetInstanceImportTaskResponse>"
        )

    def _put_status(self, params: dict[str, str]) -> str:
        record: dict[str, str | int | None] = {
            k: params.get(k) for k in ("InstanceId", "ImportTaskId", "Status", "VolumeId", "ErrorCode")
        }
        record["BytesConverted"] = int(params.get("BytesConverted") or 0)
        record["Message"] = params.get("Message")
        self._append({"pull_status": record})
        entry = self.assigned.get(params.get("ImportTaskId") or "")
        # As Eucalyptus: a status for a task this worker does not hold is answered with cancel.
        cancelled = entry is None or entry["worker"] != record["InstanceId"] or entry["cancelled"]
        if entry is not None and record["Status"] in ("DONE", "FAILED"):
            entry["cancelled"] = True  # finished: any further status is stray
        value = "true" if cancelled else "false"
        return (
            f'<PutInstanceImportTaskStatusResponse xmlns="{IMAGING_NS}">'
            f"<cancelled>{value}</cancelled></PutInstanceImportTaskStatusResponse>"
        )


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
        if self.path in ("/health", "/"):
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
                self._send(200, ctl.imaging(body, signature).encode(), "text/xml")
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
    p.add_argument("--pull-task", action="append", default=[], help="JSON of a task to hand out (repeatable)")
    p.add_argument("--cancel", action="append", default=[], help="task id to ask the appliance to cancel")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="imaging-controller %(levelname)s: %(message)s")
    controller = Controller(args.secret, args.log, window=args.window, stale_after=args.stale_after)
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
