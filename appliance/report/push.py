"""Push reporting: heartbeats and task events through the durable outbox to ``POST <url>/v1/reports``.

One thread does everything in a loop, so the outbox has one writer and delivery order is trivially
the enqueue order:

1. turn new rows of the store's ``events`` table into task messages (every ``task.state`` becomes a
   message; ``step.progress`` becomes a tick at most once per task per ``progress_interval``, the
   ticks in between are dropped because each tick carries cumulative counters);
2. every ``report_interval`` enqueue a heartbeat (an undelivered older heartbeat is dropped);
3. send the oldest message; on success delete it and act on the reply (``{"cancel": [ids]}``),
   on failure (connection refused, timeout, 5xx, …) retry it with exponential back-off capped at
   ``max_backoff``. A 409 ``replayed`` means the controller already has it (we stopped between its
   acknowledgement and our delete), so it counts as delivered.

When a live configuration update replaces the reporter, the worker does not wait for the old one
(``stop(timeout=0)``): it finishes its request in flight in the background while the new one already
runs, and the two take turns on the outbox (:mod:`.handover`), so no message goes out twice or is lost.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from typing import Any

from ..atomicfile import write_atomic
from ..config import Config
from ..errors import ImagingError
from ..paths import StatePaths
from ..store import REPORTER_RECORD, Event, Store, TaskState
from ..timestamps import parse_time
from . import messages, status
from .handover import turns_for
from .outbox import CursorMoved, NewMessage, Outbox, Pending

log = logging.getLogger(__name__)

#: how often the loop looks for new events (seconds); small so state changes go out promptly
TICK = 0.2
FIRST_BACKOFF = 0.5
#: the first heartbeat waits this long (at most one interval) so the worker's first poll has
#: written its heartbeat file and the health reported is the worker's, not "no heartbeat yet"
FIRST_HEARTBEAT_DELAY = 1.0
EVENT_BATCH = 500
CANCEL_REASON = "cancelled by the controller"


class DeliveryError(Exception):
    """A message did not reach the controller (it stays at the head of the outbox)."""


class PushReporter(threading.Thread):
    """The push reporter thread; :meth:`stop` ends it."""

    def __init__(self, config: Config, store: Store, *, tick: float = TICK) -> None:
        super().__init__(name="imaging-reporter", daemon=True)
        ctl = config.controller
        if not (ctl.url and ctl.secret and ctl.appliance_id):
            raise ImagingError("controller.url, controller.secret and controller.appliance_id are required")
        self.config = config
        self.store = store
        self.url = ctl.url + messages.REPORTS_PATH
        self.secret = ctl.secret
        self.appliance_id = ctl.appliance_id
        self.outbox = Outbox(store.settings)
        #: who of this process's reporters sends from this appliance's outbox rows (:mod:`.handover`)
        self.turns = turns_for(("push", store.settings.url, self.appliance_id))
        self.turns.claim(self)  # from now on: a replaced predecessor starts no new request
        self.tick = tick
        self.rates = status.RateTracker()
        self._stop = threading.Event()
        self._last_heartbeat = float("-inf")
        self._retry_at = 0.0
        self._backoff = FIRST_BACKOFF
        #: event time of the last progress tick enqueued per task (the throttle)
        self._last_tick: dict[str, float] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the loop and wait at most ``timeout`` seconds for it: it ends after the request in
        flight (bounded by ``controller.timeout``) and a final flush. With 0 it returns at once and the
        thread finishes on its own (a replaced reporter: its successor already owns the outbox, so the
        flush sends nothing more once the request in flight ended)."""
        self._stop.set()
        if self.ident is None:  # never started: nothing else uses the outbox
            self.turns.release(self)
            self.outbox.close()
        elif self.is_alive() and timeout > 0:
            self.join(timeout)

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.turns.release(self)
            self.outbox.close()

    def _run(self) -> None:
        log.info("reporting to %s as %s", self.url, self.appliance_id)
        interval = self.config.controller.report_interval
        self._last_heartbeat = time.monotonic() - interval + min(interval, FIRST_HEARTBEAT_DELAY)
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("reporter step failed; retrying")
            self._stop.wait(self.tick)
        # Last words: what happened during shutdown goes out now if the controller is reachable
        # (bounded by one request timeout per message); otherwise it waits in the outbox. A reporter
        # replaced meanwhile sends nothing more: its successor delivers.
        try:
            self.pump()
            if time.monotonic() >= self._retry_at and self.turns.owns(self):
                self.deliver(stopping=True)
        except Exception:
            log.exception("final report flush failed; the outbox keeps the messages")

    def step(self, now: float | None = None) -> None:
        """One round: pump events, maybe enqueue a heartbeat, deliver what is due."""
        now = time.monotonic() if now is None else now
        self.pump()
        if now - self._last_heartbeat >= self.config.controller.report_interval:
            self.enqueue_heartbeat()
            self._last_heartbeat = now
        if now >= self._retry_at:
            self.deliver()

    # -- events → outbox ------------------------------------------------------------------------

    def pump(self) -> int:
        """Turn new store events into outbox messages; returns how many messages were enqueued.

        Appliances sharing the store share the outbox and its cursor: whichever reporter gets there
        first turns an event into its message (the cursor moves only from where it was read), and
        the message goes to the appliance running the task (:data:`~appliance.store.REPORTER_RECORD`;
        this one for a task no appliance runs yet)."""
        enqueued = 0
        while True:
            cursor = self.outbox.cursor()
            events = self.store.events(cursor, limit=EVENT_BATCH)
            if not events:
                return enqueued
            batch = [m for m in (self._message(e) for e in events) if m is not None]
            try:
                self.outbox.enqueue(batch, cursor=events[-1].id, expect_cursor=cursor)
            except CursorMoved:
                continue  # another appliance's reporter took these events: read on from its cursor
            enqueued += len(batch)

    def _message(self, event: Event) -> NewMessage | None:
        message: NewMessage | None = None
        if event.kind == "task.state":
            message = self._state_message(event)
        elif event.kind == "step.progress":
            message = self._progress_message(event)
        elif event.kind == "task.takeover":
            message = self._takeover_message(event)
        if message is None:
            return None
        return replace(message, appliance=self._reporter_of(event.task_id))

    def _reporter_of(self, task_id: str) -> str:
        """The appliance that reports the task: the one whose run owns it now, else this one."""
        try:
            named = self.store.record(task_id, REPORTER_RECORD)
        except ImagingError:
            named = None
        return named if isinstance(named, str) and named else self.appliance_id

    def _takeover_message(self, event: Event) -> NewMessage:
        """Another appliance took the task over (its owner died or lost its lease): from here on its
        reports come from the new owner, in order after the earlier ones."""
        payload = {
            "type": "task",
            "event": "takeover",
            "event_id": event.id,
            "time": event.time,
            "task": {
                "id": event.task_id,
                "epoch": event.data.get("epoch"),
                "previous_epoch": event.data.get("previous_epoch"),
            },
        }
        return NewMessage("task", event.task_id, payload)

    def _task(self, task_id: str) -> dict[str, Any] | None:
        try:
            return status.task_snapshot(self.store.get_task(task_id))
        except ImagingError:
            return None

    def _state_message(self, event: Event) -> NewMessage:
        snapshot = self._task(event.task_id) or {"id": event.task_id}
        state = event.data.get("state")
        # The row may have moved on since the event; the event's own state is what is reported.
        snapshot.update(state=state, previous=event.data.get("previous"))
        if event.data.get("error_code"):
            snapshot["error"] = {"code": event.data["error_code"], "message": event.data.get("error_message")}
        elif state not in {str(s) for s in (TaskState.FAILED, TaskState.CANCELLED)}:
            snapshot["error"] = None
        if state and TaskState(state).terminal:
            self._last_tick.pop(event.task_id, None)
            self.rates.forget(event.task_id)
        payload = {
            "type": "task",
            "event": "state",
            "event_id": event.id,
            "time": event.time,
            "task": snapshot,
        }
        return NewMessage("task", event.task_id, payload)

    def _progress_message(self, event: Event) -> NewMessage | None:
        when = parse_time(event.time).timestamp()
        last = self._last_tick.get(event.task_id)
        if last is not None and when - last < self.config.controller.progress_interval:
            return None  # throttled: the next tick carries the same cumulative counters
        self._last_tick[event.task_id] = when
        data = dict(event.data)
        rate, eta = self.rates.sample(
            event.task_id, data.get("phase"), data.get("done"), data.get("total"), when
        )
        data.update(rate=rate, eta=eta)
        payload = {
            "type": "task",
            "event": "progress",
            "event_id": event.id,
            "time": event.time,
            "task": {"id": event.task_id, "progress": data},
        }
        return NewMessage("task", event.task_id, payload)

    def enqueue_heartbeat(self) -> int:
        backlog = self.outbox.backlog(self.appliance_id)
        payload = status.heartbeat(self.config, self.store, self.rates, backlog, appliance=self.appliance_id)
        message = NewMessage("heartbeat", None, payload, appliance=self.appliance_id)
        return self.outbox.enqueue([message], replace_type="heartbeat")[0]

    # -- outbox → controller --------------------------------------------------------------------

    def deliver(self, limit: int = 100, *, stopping: bool = False) -> int:
        """Send due messages in order until the outbox is empty, one fails, ``limit`` went out, or
        this reporter does not have the turn (:mod:`.handover`: a replaced reporter's request is still
        in flight, or this one was replaced)."""
        sent = 0
        tried: list[Pending] = []

        def send(pending: Pending) -> dict[str, Any]:
            tried.append(pending)
            return self._post(pending)

        # the final flush may wait for a predecessor's request in flight (bounded by its timeout)
        wait = self.config.controller.timeout if stopping else 0.0
        while sent < limit and (stopping or not self._stop.is_set()):
            tried.clear()
            try:
                with self.turns.turn(self, wait) as mine:
                    if not mine:
                        break
                    delivered = self.outbox.deliver_head(self.appliance_id, send)
            except DeliveryError as exc:
                pending = tried[-1]
                attempts = self.outbox.failed(pending.seq, str(exc))
                self._retry_at = time.monotonic() + self._backoff
                log.warning(
                    "controller did not take message %d (attempt %d): %s; retrying in %.1f s",
                    pending.seq,
                    attempts,
                    exc,
                    self._backoff,
                )
                self._backoff = min(self.config.controller.max_backoff, self._backoff * 2)
                break
            if delivered is None:
                break
            self._backoff = FIRST_BACKOFF
            sent += 1
            self._handle_reply(delivered[1])
        return sent

    def _post(self, pending: Pending) -> dict[str, Any]:
        body = messages.encode(self.appliance_id, pending.seq, pending.payload)
        req = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers=messages.headers(self.secret, self.appliance_id, body, "application/json"),
        )
        try:
            with urllib.request.urlopen(req, timeout=self.config.controller.timeout) as resp:
                text = resp.read(1 << 20)
        except urllib.error.HTTPError as exc:
            error = _json(exc.read(65536)).get("error")
            # the reference receiver answers {"error": "replayed"}, the shipped controller
            # {"error": {"code": "ReportReplayed", ...}}
            code = error.get("code") if isinstance(error, dict) else error
            if exc.code == 409 and code in ("replayed", "ReportReplayed"):
                return {}  # the controller already has this seq: delivered before a restart
            raise DeliveryError(f"HTTP {exc.code} {code or exc.reason}") from None
        except (OSError, ValueError) as exc:  # URLError, refused, reset, timeout
            raise DeliveryError(str(getattr(exc, "reason", exc)) or type(exc).__name__) from None
        return _json(text)

    def _handle_reply(self, reply: dict[str, Any]) -> None:
        version = reply.get("config_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > 0:
            self._announce(version)
        cancel = reply.get("cancel")
        if not isinstance(cancel, list):
            return
        for task_id in cancel:
            if not isinstance(task_id, str):
                continue
            try:
                task = self.store.get_task(task_id)
                if not task.terminal:
                    self.store.request_cancel(task_id, reason=CANCEL_REASON)
                    log.info("task %s: cancel requested by the controller", task_id)
            except ImagingError as exc:  # unknown task, or it finished meanwhile
                log.info("controller asked to cancel %s: %s", task_id, exc)

    def _announce(self, version: int) -> None:
        """Leave the controller's current configuration version for ``imaging reconfigure``."""
        path = StatePaths(self.config.state_dir).config_announced
        try:
            if path.exists() and path.read_text().strip() == str(version):
                return
            write_atomic(path, f"{version}\n", 0o644, None)
        except OSError as exc:
            log.warning("cannot record the announced configuration version: %s", exc.strerror or exc)


def _json(text: bytes) -> dict[str, Any]:
    try:
        value = json.loads(text or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
