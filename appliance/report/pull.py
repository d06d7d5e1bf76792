"""Pull mode: the appliance stands in for a Eucalyptus imaging worker.

The loop, as the Eucalyptus imaging worker ran it, against ``<controller.url>/services/Imaging``
with EC2-query form bodies (``Action``, ``Version=2014-02-14``, ``InstanceId`` = ``controller.appliance_id``,
``Timestamp``) signed like push messages (``X-Imaging-Signature`` over the form body; Eucalyptus
used instance-profile SigV2 instead):

- while it has a free task slot, every ``report_interval`` it asks ``GetInstanceImportTask``; a
  returned ``import_volume`` task becomes a local import-volume task through
  :class:`~appliance.service.imports.ImportService` (the worker runs it). Sizes come from the optional
  ``<bytes>``/``<volumeSize>`` elements, else from the import manifest itself;
- every ``report_interval`` while a task runs it sends ``PutInstanceImportTaskStatus`` ``EXTANT``
  with ``BytesConverted`` (bytes written to the target, not downloaded, as Eucalyptus counts them),
  and when it ends ``DONE`` (with ``VolumeId``: the volume written, else the controller's) or
  ``FAILED`` with a Eucalyptus ``ErrorCode`` and ``Message`` ``"<appliance code>: <message>"``;
- a reply ``<cancelled>true</cancelled>`` cancels the task, after which nothing more is reported
  (as Eucalyptus). Unlike Eucalyptus, an unparseable reply is treated as a failed call and retried,
  not as a cancel.

Which remote task maps to which local task is kept in ``pull_tasks``, so a restarted appliance
keeps reporting the tasks it holds and never creates one twice.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..database import Row, StoreConfig
from ..errors import ImagingError, TaskNotFound, UsageError, is_rejection
from ..redact import redact_text
from ..service.imports import DiskImage, ImportService, outcome
from ..sources.http import HttpClient
from ..sources.manifest import MAX_MANIFEST_BYTES, parse_manifest
from ..sources.urlfilter import UrlPolicy
from ..store import Store, Task, TaskState, open_database
from ..timestamps import utcnow
from . import messages

log = logging.getLogger(__name__)

API_VERSION = "2014-02-14"
TICK = 0.5
FIRST_BACKOFF = 1.0
CANCEL_REASON = "cancelled by the controller"
MAX_REPLY = 1 << 20

#: appliance error codes → the Eucalyptus worker's failure codes (task_exit_codes.py)
EUCA_CODES: dict[str, str] = {
    "ManifestInvalid": "InvalidInputData",
    "InsufficientVolumeSize": "InvalidInputData",
    "InvalidParameterValue": "InvalidInputData",
    "SourceUnavailable": "FailureToDownloadData",
    "SourceIntegrity": "FailureToDownloadData",
    "UrlNotAllowed": "FailureToDownloadData",
    "InsufficientScratch": "InsufficientDiskSize",
    "InsufficientStorage": "InsufficientDiskSize",
    "ConversionFailed": "FailureToRunWorkflow",
    "StepFailed": "FailureToRunWorkflow",
    "StepTimeout": "FailureToRunWorkflow",
    "Cancelled": "Canceled",
}


def euca_code(code: str | None) -> str:
    """The Eucalyptus ``ErrorCode`` for an appliance error code."""
    if is_rejection(code):
        return "InvalidInputData"
    return EUCA_CODES.get(code or "", "GeneralFailure")


class PullError(Exception):
    """A call to the Imaging service failed (transport, HTTP status or reply shape)."""


@dataclass(frozen=True)
class RemoteTask:
    """What ``GetInstanceImportTask`` handed out."""

    task_id: str
    task_type: str
    volume_id: str | None
    manifest_url: str | None
    format: str | None
    bytes: int | None
    volume_size: int | None


def _local(tag: str) -> str:
    # the worker's match_name accepted both "name" and "euca:name": compare local names only
    return tag.rsplit("}", 1)[-1].rsplit(":", 1)[-1]


def _find(el: ET.Element | None, *path: str) -> ET.Element | None:
    for name in path:
        if el is None:
            return None
        el = next((c for c in el if _local(c.tag) == name), None)
    return el


def _text(el: ET.Element | None, *path: str) -> str | None:
    found = _find(el, *path)
    text = (found.text or "").strip() if found is not None else ""
    return text or None


def parse_task(xml: bytes) -> RemoteTask | None:
    """The task in a ``GetInstanceImportTaskResponse``, or None when there is no work."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise PullError(f"GetInstanceImportTask reply is not XML: {exc}") from None
    task_id = _text(root, "importTaskId")
    if not task_id:
        return None
    item = _find(root, "volumeTask", "imageManifestSet", "item")
    size, vsize = _text(item, "bytes"), _text(root, "volumeTask", "volumeSize")
    return RemoteTask(
        task_id=task_id,
        task_type=_text(root, "importTaskType") or "import_volume",
        volume_id=_text(root, "volumeTask", "volumeId"),
        manifest_url=_text(item, "manifestUrl"),
        format=(_text(item, "format") or "").upper() or None,
        bytes=int(size) if size and size.isdigit() else None,
        volume_size=int(vsize) if vsize and vsize.isdigit() else None,
    )


def parse_cancelled(xml: bytes) -> bool:
    """Whether a ``PutInstanceImportTaskStatusResponse`` says the task is cancelled."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise PullError(f"PutInstanceImportTaskStatus reply is not XML: {exc}") from None
    value = _text(root, "cancelled")
    if value not in ("true", "false"):
        raise PullError(f"PutInstanceImportTaskStatus reply has no true/false <cancelled> ({value!r})")
    return value == "true"


def strip_marker(url: str) -> str:
    """Drop the ``imaging@`` userinfo marker Eucalyptus put in manifest URLs."""
    parts = urllib.parse.urlsplit(url)
    if parts.username == "imaging" and parts.password is None:
        netloc = parts.netloc.split("@", 1)[1]
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url


class PullTasks:
    """The ``pull_tasks`` table: remote task id → local task, on its own connection(s)."""

    def __init__(self, target: StoreConfig | Path | str) -> None:
        self._db = open_database(target)

    def close(self) -> None:
        self._db.close()

    def get(self, remote_id: str) -> Row | None:
        rows = self._db.read("SELECT * FROM pull_tasks WHERE remote_id = ?", (remote_id,))
        return rows[0] if rows else None

    def active(self) -> list[Row]:
        return self._db.read("SELECT * FROM pull_tasks WHERE state = 'active' ORDER BY created_at")

    def add(self, remote_id: str, task_id: str | None, volume_id: str | None, state: str = "active") -> None:
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO pull_tasks (remote_id, task_id, volume_id, state, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (remote_id, task_id, volume_id, state, utcnow()),
            )

    def set_state(self, remote_id: str, state: str) -> None:
        with self._db.transaction() as conn:
            conn.execute("UPDATE pull_tasks SET state = ? WHERE remote_id = ?", (state, remote_id))


class PullReporter(threading.Thread):
    """The pull loop thread; :meth:`stop` ends it."""

    def __init__(self, config: Config, store: Store, *, tick: float = TICK) -> None:
        super().__init__(name="imaging-pull", daemon=True)
        ctl = config.controller
        if not (ctl.url and ctl.secret and ctl.appliance_id):
            raise ImagingError("controller.url, controller.secret and controller.appliance_id are required")
        self.config = config
        self.store = store
        self.url = ctl.url + messages.IMAGING_PATH
        self.secret = ctl.secret
        self.instance_id = ctl.appliance_id
        self.service = ImportService(config, store)
        self.tasks = PullTasks(store.settings)
        self.tick = tick
        self._stop = threading.Event()
        self._last_poll = float("-inf")
        self._last_status: dict[str, float] = {}
        self._retry_at = 0.0
        self._backoff = FIRST_BACKOFF

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the loop and wait for it (the tasks keep running under the worker)."""
        self._stop.set()
        if self.is_alive():
            self.join(timeout)
        self.tasks.close()

    def run(self) -> None:
        log.info("pulling work from %s as %s", self.url, self.instance_id)
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("pull step failed; retrying")
            self._stop.wait(self.tick)

    def step(self, now: float | None = None) -> None:
        """Report on held tasks, then ask for work when a slot is free."""
        now = time.monotonic() if now is None else now
        if now < self._retry_at:
            return
        try:
            held = self.report(now)
            interval = self.config.controller.report_interval
            if held < self.config.worker.concurrency and now - self._last_poll >= interval:
                self._last_poll = now
                self.poll()
        except PullError as exc:
            self._retry_at = now + self._backoff
            log.warning("imaging service call failed: %s; retrying in %.1f s", exc, self._backoff)
            self._backoff = min(self.config.controller.max_backoff, self._backoff * 2)
            return
        self._backoff = FIRST_BACKOFF

    # -- the calls ------------------------------------------------------------------------------

    def call(self, action: str, **params: Any) -> bytes:
        """One signed EC2-query POST; the reply body (raises :class:`PullError`)."""
        form = {"Action": action, "Version": API_VERSION, "InstanceId": self.instance_id}
        form.update({k: str(v) for k, v in params.items() if v is not None})
        form["Timestamp"] = utcnow()
        body = urllib.parse.urlencode(form).encode()
        req = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers=messages.headers(
                self.secret, self.instance_id, body, "application/x-www-form-urlencoded; charset=utf-8"
            ),
        )
        try:
            with urllib.request.urlopen(req, timeout=self.config.controller.timeout) as resp:
                return resp.read(MAX_REPLY)
        except urllib.error.HTTPError as exc:
            raise PullError(f"{action}: HTTP {exc.code} {exc.read(2000)!r}") from None
        except (OSError, ValueError) as exc:
            raise PullError(f"{action}: {getattr(exc, 'reason', exc)}") from None

    def put_status(self, remote_id: str, status: str, **params: Any) -> bool:
        """``PutInstanceImportTaskStatus``; whether the controller says the task is cancelled."""
        if params.get("Message"):
            params["Message"] = redact_text(str(params["Message"]))
        reply = self.call("PutInstanceImportTaskStatus", ImportTaskId=remote_id, Status=status, **params)
        return parse_cancelled(reply)

    # -- reporting ------------------------------------------------------------------------------

    def report(self, now: float) -> int:
        """Status of every held task that is due; returns how many tasks are still held."""
        held = 0
        for row in self.tasks.active():
            remote_id = row["remote_id"]
            try:
                task = self.store.get_task(row["task_id"])
            except TaskNotFound:  # deleted by hand: tell the controller rather than hold it forever
                self.put_status(remote_id, "FAILED", ErrorCode="GeneralFailure", Message="task lost")
                self.tasks.set_state(remote_id, "reported")
                continue
            if task.terminal:
                self._final(remote_id, row["volume_id"], task)
                continue
            held += 1
            if now - self._last_status.get(remote_id, float("-inf")) < self.config.controller.report_interval:
                continue
            cancelled = self.put_status(
                remote_id, "EXTANT", VolumeId=row["volume_id"], BytesConverted=task.bytes_converted
            )
            self._last_status[remote_id] = now
            if cancelled:
                self._cancel(remote_id, task)
                held -= 1
        return held

    def _final(self, remote_id: str, volume_id: str | None, task: Task) -> None:
        if task.state is TaskState.CANCELLED and task.cancel_reason == CANCEL_REASON:
            self.tasks.set_state(remote_id, "cancelled")  # the controller knows; Eucalyptus said nothing more
            return
        if task.state is TaskState.COMPLETED:
            produced = outcome(task).get("volume_id")
            self.put_status(
                remote_id, "DONE", VolumeId=produced or volume_id, BytesConverted=task.bytes_converted
            )
        else:
            message = f"{task.error_code}: {task.error_message}" if task.error_code else str(task.state)
            self.put_status(
                remote_id,
                "FAILED",
                VolumeId=volume_id,
                BytesConverted=task.bytes_converted,
                ErrorCode=euca_code(task.error_code),
                Message=message[:1000],
            )
        self.tasks.set_state(remote_id, "reported")
        self._last_status.pop(remote_id, None)
        log.info("task %s (%s): reported %s to the controller", task.id, remote_id, task.state)

    def _cancel(self, remote_id: str, task: Task) -> None:
        log.info("task %s (%s): cancelled by the controller", task.id, remote_id)
        try:
            self.store.request_cancel(task.id, reason=CANCEL_REASON)
        except ImagingError as exc:  # it finished meanwhile
            log.info("task %s: %s", task.id, exc)
        self.tasks.set_state(remote_id, "cancelled")
        self._last_status.pop(remote_id, None)

    # -- taking work ----------------------------------------------------------------------------

    def poll(self) -> str | None:
        """``GetInstanceImportTask``; the local id of the task created, or None."""
        remote = parse_task(self.call("GetInstanceImportTask"))
        if remote is None:
            return None
        known = self.tasks.get(remote.task_id)
        if known is not None:
            # Eucalyptus re-queues a task when its worker seems to restart; we still hold it.
            log.info("controller handed out %s again; it is task %s here", remote.task_id, known["task_id"])
            return known["task_id"]
        try:
            task = self._create(remote)
        except ImagingError as exc:
            log.warning("cannot take task %s: %s", remote.task_id, exc)
            self.tasks.add(remote.task_id, None, remote.volume_id, state="reported")
            self.put_status(
                remote.task_id,
                "FAILED",
                VolumeId=remote.volume_id,
                ErrorCode=euca_code(getattr(exc, "code", None)),
                Message=f"{exc.code}: {exc.message}"[:1000],
            )
            return None
        self.tasks.add(remote.task_id, task.id, remote.volume_id)
        log.info("took task %s from the controller as %s", remote.task_id, task.id)
        return task.id

    def _create(self, remote: RemoteTask) -> Task:
        if remote.task_type != "import_volume":
            raise UsageError(f"task type {remote.task_type!r} is not supported (only import_volume)")
        if not remote.manifest_url or not remote.format:
            raise UsageError("the task has no imageManifestSet item with manifestUrl and format")
        url = strip_marker(remote.manifest_url)
        size, volume_size = remote.bytes, remote.volume_size
        if size is None or volume_size is None:
            manifest = self._manifest(url)
            size = size if size is not None else manifest.size
            volume_size = volume_size if volume_size is not None else manifest.volume_size
        image = DiskImage(remote.format, size, url, volume_size)
        return self.service.import_volume(
            image, availability_zone=None, description=f"pulled from the controller as {remote.task_id}"
        )

    def _manifest(self, url: str) -> Any:
        self.service.check_url(url)
        client = HttpClient(UrlPolicy.from_config(self.config.sources))
        with client.get_stream(url) as response:
            if response.status != 200:
                raise UsageError(f"the manifest cannot be read (HTTP {response.status})")
            return parse_manifest(response.read(MAX_MANIFEST_BYTES))
