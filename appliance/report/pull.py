"""Pull mode: the appliance stands in for a Eucalyptus imaging worker.

The loop, as the Eucalyptus imaging worker ran it, against ``<controller.url>/services/Imaging``
with EC2-query form bodies (``Action``, ``Version=2014-02-14``, ``InstanceId`` = the instance id from
the metadata service) signed with the instance profile's temporary credentials and their
``SecurityToken`` (:mod:`.euca_auth`: SigV2 or SigV4 by botocore; a refused request makes it read the
credentials again and retry once); replies are parsed with defusedxml, namespaced or not:

- while it has a free task slot, every ``report_interval`` it asks ``GetInstanceImportTask``; a
  returned ``import_volume`` task names a signed **download manifest** (``imaging@`` marker stripped),
  which is verified against the cloud certificate (``controller.cloud_cert``/``cloud_cert_file``)
  before anything else is read from it or any part is fetched (:mod:`appliance.sources.euca_manifest`);
  it then becomes a local import-volume task through
  :class:`~appliance.service.imports.ImportService` (the worker runs it, verifying the manifest again
  and writing the volume the task names when the volume target is ``ec2``). Each volume of an
  ImportInstance comes as its own worker task (same ``importTaskId``, its own ``VolumeId``) and is
  reported with its own ``BytesConverted``. ``convert_image`` (``instanceStoreTask``) and ``BUNDLE``
  manifests are refused at once with ``FAILED``;
- every ``report_interval`` while a task runs it sends ``PutInstanceImportTaskStatus`` ``EXTANT``
  with ``BytesConverted`` (bytes written to the target, not downloaded, as Eucalyptus counts them),
  and when it ends ``DONE`` or ``FAILED`` with a Eucalyptus ``ErrorCode`` (:data:`EUCA_CODES`) and
  ``Message`` ``"<appliance code>: <message>"``, always with the controller's ``VolumeId``;
- a reply ``<cancelled>true</cancelled>`` cancels the task, after which nothing more is reported
  (as Eucalyptus). Unlike Eucalyptus, an unparseable reply is treated as a failed call and retried,
  not as a cancel.

Which remote task maps to which local task is kept in ``pull_tasks``, so a restarted appliance
keeps reporting the tasks it holds and never creates one twice.

A reporter replaced by a live configuration update is not waited for (``stop(timeout=0)``): it ends
its call in flight in the background and makes no other, while its successor runs at once and makes
its first call when that one ended (one call at a time, :mod:`.handover`), so a held task's final
status is sent once and a task handed out in that reply is still taken.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..config import Config
from ..database import Row, StoreConfig
from ..errors import ImagingError, TaskNotFound, UsageError
from ..redact import redact_text
from ..service.imports import ImportService
from ..service.importtasks import DiskImage
from ..service.importviews import outcome
from ..sources.euca_manifest import DownloadManifest, cloud_keys, fetch_download_manifest, strip_marker
from ..sources.http import HttpClient
from ..sources.urlfilter import UrlPolicy
from ..store import Store, Task, TaskState, open_database
from ..timestamps import utcnow
from . import messages
from .euca_auth import CredentialsUnavailable, InstanceCredentials, sign_request
from .handover import turns_for
from .imaging_wire import (
    CONVERT_IMAGE_REFUSED,
    EUCA_CODES,
    PullError,
    Refused,
    RemoteTask,
    euca_code,
    parse_cancelled,
    parse_task,
    remote_task_id,
)

__all__ = [
    "EUCA_CODES",
    "PullReporter",
    "PullTasks",
    "euca_code",
    "parse_cancelled",
    "parse_task",
    "strip_marker",
]

log = logging.getLogger(__name__)

API_VERSION = "2014-02-14"
GiB = 1 << 30
TICK = 0.5
FIRST_BACKOFF = 1.0
CANCEL_REASON = "cancelled by the controller"
MAX_REPLY = 1 << 20


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
        if not ctl.url:
            raise ImagingError("controller.url is required")
        self.config = config
        self.store = store
        self.url = ctl.url + messages.IMAGING_PATH
        self.credentials = InstanceCredentials(ctl.metadata_url, timeout=ctl.timeout)
        self._instance_id: str | None = None
        self.service = ImportService(config, store)
        self.tasks = PullTasks(store.settings)
        #: who of this process's pull reporters talks to the controller (:mod:`.handover`)
        self.turns = turns_for(("pull", store.settings.url))
        self.turns.claim(self)  # from now on: a replaced predecessor makes no new call
        self.tick = tick
        self._stop = threading.Event()
        self._last_poll = float("-inf")
        self._last_status: dict[str, float] = {}
        self._retry_at = 0.0
        self._backoff = FIRST_BACKOFF

    @property
    def instance_id(self) -> str:
        """This worker's ``InstanceId``: the instance id from the metadata service."""
        if self._instance_id is None:
            try:
                self._instance_id = self.credentials.instance_id()
            except CredentialsUnavailable as exc:
                raise PullError(exc.message) from None
        return self._instance_id

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the loop and wait at most ``timeout`` seconds for it (it ends after the call in
        flight, bounded by ``controller.timeout``; the tasks keep running under the worker). With 0 it
        returns at once and the thread finishes on its own (a replaced reporter)."""
        self._stop.set()
        if self.ident is None:  # never started: nothing else uses the table
            self.turns.release(self)
            self.tasks.close()
        elif self.is_alive() and timeout > 0:
            self.join(timeout)

    def run(self) -> None:
        try:
            log.info("pulling work from %s as %s", self.url, self.instance_id)
            while not self._stop.is_set():
                try:
                    self.step()
                except Exception:
                    log.exception("pull step failed; retrying")
                self._stop.wait(self.tick)
        finally:
            self.turns.release(self)
            self.tasks.close()

    def step(self, now: float | None = None) -> None:
        """Report on held tasks, then ask for work when a slot is free; nothing while another
        reporter's call is in flight or this one was replaced (:mod:`.handover`)."""
        with self.turns.turn(self) as mine:
            if mine:
                self._step(time.monotonic() if now is None else now)

    def _step(self, now: float) -> None:
        if now < self._retry_at:
            return
        try:
            held = self.report(now)
            interval = self.config.controller.report_interval
            if self._stop.is_set():
                return  # stopping (replaced, or the worker stops): no new call
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
        """One signed EC2-query POST; the reply body (raises :class:`PullError`).

        A request refused as unauthenticated (HTTP 401/403: a token the cloud revoked or let expire)
        is signed again with freshly read credentials and sent once more.
        """
        form = {"Action": action, "Version": API_VERSION, "InstanceId": self.instance_id}
        form.update({k: str(v) for k, v in params.items() if v is not None})
        ctl = self.config.controller
        for attempt in (1, 2):
            try:
                creds = self.credentials.get() if attempt == 1 else self.credentials.refresh()
            except CredentialsUnavailable as exc:
                raise PullError(f"{action}: {exc.message}") from None
            body, headers = sign_request(
                self.url, form, creds, signature_version=ctl.signature_version, region=ctl.region
            )
            req = urllib.request.Request(self.url, data=body, method="POST", headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=ctl.timeout) as resp:
                    return bytes(resp.read(MAX_REPLY))
            except urllib.error.HTTPError as exc:
                detail = redact_text(exc.read(2000).decode("utf-8", "replace"))
                if exc.code in (401, 403) and attempt == 1:
                    log.info("%s refused (HTTP %d); reading the instance credentials again", action, exc.code)
                    continue
                raise PullError(f"{action}: HTTP {exc.code} {detail}") from None
            except (OSError, ValueError) as exc:
                raise PullError(f"{action}: {getattr(exc, 'reason', exc)}") from None
        raise AssertionError("unreachable")

    def put_status(self, remote_id: str, status: str, **params: Any) -> bool:
        """``PutInstanceImportTaskStatus``; whether the controller says the task is cancelled."""
        if params.get("Message"):
            params["Message"] = redact_text(str(params["Message"]))
        reply = self.call(
            "PutInstanceImportTaskStatus", ImportTaskId=remote_task_id(remote_id), Status=status, **params
        )
        return parse_cancelled(reply)

    # -- reporting ------------------------------------------------------------------------------

    def report(self, now: float) -> int:
        """Status of every held task that is due; returns how many tasks are still held."""
        held = 0
        for row in self.tasks.active():
            if self._stop.is_set():
                break  # stopping: the rest is reported by the successor or after the next start
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
            # The controller's volume: an ImportInstance matches each status to its volume by it.
            produced = outcome(task).get("volume_id")
            self.put_status(
                remote_id, "DONE", VolumeId=volume_id or produced, BytesConverted=task.bytes_converted
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
        known = self.tasks.get(remote.key)
        if known is not None:
            # Eucalyptus re-queues a task when its worker seems to restart; we still hold it.
            log.info("controller handed out %s again; it is task %s here", remote.task_id, known["task_id"])
            return known["task_id"]
        try:
            task = self._create(remote)
        except ImagingError as exc:
            log.warning("cannot take task %s: %s", remote.key, exc)
            self.tasks.add(remote.key, None, remote.volume_id, state="reported")
            refused = isinstance(exc, Refused)
            self.put_status(
                remote.key,
                "FAILED",
                VolumeId=remote.volume_id,
                ErrorCode=exc.euca if isinstance(exc, Refused) else euca_code(exc.code),
                Message=(exc.message if refused else f"{exc.code}: {exc.message}")[:1000],
            )
            return None
        self.tasks.add(remote.key, task.id, remote.volume_id)
        log.info("took task %s from the controller as %s", remote.task_id, task.id)
        return task.id

    def _create(self, remote: RemoteTask) -> Task:
        if remote.task_type == "convert_image" or remote.instance_store:
            raise Refused(*CONVERT_IMAGE_REFUSED)
        if remote.task_type != "import_volume":
            raise UsageError(f"task type {remote.task_type!r} is not supported (only import_volume)")
        if not remote.manifest_url or not remote.format:
            raise UsageError("the task has no imageManifestSet item with manifestUrl and format")
        url = strip_marker(remote.manifest_url)
        # Verified before anything in it is believed (or any part fetched); the task verifies it again.
        # Its file-format is RAW for every import (the cloud's ImportImageManifest): the task's format counts.
        manifest = self._manifest(url)
        # a BUNDLE: image/size is the ciphertext's; the volume holds the unbundled image
        size = manifest.bundle.unbundled_size if manifest.bundle is not None else manifest.size
        volume_size = remote.volume_size or max(1, -(-size // GiB))
        image = DiskImage(remote.format, size, url, volume_size)
        return self.service.import_volume(
            image,
            availability_zone=None,
            description=f"pulled from the controller as {remote.key}",
            signed_manifest=True,
            volume_id=remote.volume_id,
        )

    def _manifest(self, url: str) -> DownloadManifest:
        self.service.check_url(url)
        client = HttpClient(UrlPolicy.from_config(self.config.sources))
        return fetch_download_manifest(url, cloud_keys(self.config.controller), client)
