"""A live update moves the controller while the reporter's request hangs at the old one: the worker
goes on at once (real worker process, a real hanging socket, the reference controller process), and
every outbox message reaches a controller exactly once across the swap (:mod:`appliance.report.handover`);
in pull mode the new reporter takes work from the new controller once the old call ended, and
reports it once."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.report.receiver import ReceiverServer
from appliance.service.heartbeat import read_heartbeat
from appliance.store import TaskState
from appliance.workflow.engine import Engine
from tests import stores
from tests.appliance.report.test_pull import bucket, cloud_key, controller, final, statuses, uploaded
from tests.appliance.report.test_push import (
    WORKFLOW,
    ReceiverProcess,
    start_worker,
    states_of,
    store_state_events,
)
from tests.appliance.report.test_push import write_config as push_config
from tests.euca_upload import random_file
from tests.processes import stop_process, wait_until
from tests.servers import MotoServer

__all__ = ["bucket", "cloud_key", "controller"]  # the pull tests' fixtures, used here too

MiB = 1 << 20

pytestmark = pytest.mark.slow


class HangingController:
    """A controller that accepts every connection, reads the whole request and then answers nothing
    until :meth:`release` says how: ``"answered"`` (HTTP 200: the message was taken) or ``"dropped"``
    (the connection is reset: it was not)."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._cond = threading.Condition()
        #: the bodies received
        self.requests: list[bytes] = []
        self.held = 0
        self._how: str | None = None
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        with conn:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(body) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                body += chunk
            with self._cond:
                self.requests.append(body)
                self.held += 1
                self._cond.wait_for(lambda: self._how is not None)
                self.held -= 1
                how = self._how
            if how == "answered":
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                    b"Connection: close\r\n\r\n{}"
                )
            else:  # a reset: the client cannot take it for an answer
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def release(self, how: str) -> None:
        with self._cond:
            self._how = how
            self._cond.notify_all()

    def close(self) -> None:
        self.release("dropped")
        self._server.close()


@pytest.fixture
def hanging() -> Iterator[HangingController]:
    ctl = HangingController()
    yield ctl
    ctl.close()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[ReceiverProcess]:
    rcv = ReceiverProcess(tmp_path / "controller.jsonl")
    rcv.start()
    yield rcv
    rcv.stop()


def move_controller(cfg_file: Path, url: str) -> None:
    """The live update as ``imaging reconfigure`` writes it: a new file renamed over the old one, the
    controller's URL (and its timeout) changed."""
    doc = json.loads(cfg_file.read_text())
    doc["controller"] |= {"url": url, "timeout": 2}
    new = cfg_file.with_name(cfg_file.name + ".new")
    new.write_text(json.dumps(doc))
    os.replace(new, cfg_file)


@pytest.mark.parametrize("release", ["answered", "dropped"])
def test_a_controller_moved_while_a_report_hangs_at_the_old_one_leaves_the_worker_running_and_loses_nothing(
    tmp_path: Path, hanging: HangingController, receiver: ReceiverProcess, release: str
) -> None:
    # the old controller takes the connection and never answers; the reporter would wait 300 s for it
    cfg_file = push_config(tmp_path, hanging.url, timeout=300)
    engine = Engine(config_mod.load(cfg_file))
    first = engine.submit("nap", {"seconds": 0.2})
    worker = start_worker(cfg_file)
    try:
        wait_until(lambda: hanging.held == 1, what="the first report to hang at the old controller")
        stuck = json.loads(hanging.requests[0])
        assert stuck["type"] == "task" and stuck["task"]["id"] == first

        move_controller(cfg_file, receiver.url)
        second = engine.submit("nap", {"seconds": 0.2})
        # the worker's loop goes on while the old reporter is stuck: it starts and finishes a task
        wait_until(
            lambda: engine.store.get_task(second).state is TaskState.COMPLETED, what="the task queued after"
        )
        cfg = config_mod.load(cfg_file)
        beat = read_heartbeat(cfg)
        assert beat is not None
        wait_until(
            lambda: (read_heartbeat(cfg) or beat)["updated_at"] > beat["updated_at"],
            what="the worker's heartbeat to go on",
        )
        # ... and the old reporter is still inside its request: nothing overtook the message in it
        # (a later seq at the new controller would make it refuse that one as replayed)
        assert hanging.held == 1 and len(hanging.requests) == 1
        assert receiver.messages() == []

        hanging.release(release)
        wait_until(lambda: "completed" in states_of(receiver.messages(), second), what="the new controller")
        wait_until(
            lambda: any(m["type"] == "heartbeat" for m in receiver.messages()), what="a heartbeat there"
        )
        stop_process(worker)
        expected = store_state_events(engine.store)
    finally:
        stop_process(worker)
        engine.store.close()
    # the replaced reporter made no request after the one in flight
    assert len(hanging.requests) == 1
    taken = [stuck] if release == "answered" else []
    delivered = taken + receiver.messages()
    seqs = [m["seq"] for m in delivered]
    assert seqs == sorted(set(seqs)), "each message once, in order"
    # exactly once across both controllers: every state change the store recorded
    assert [(m["task"]["id"], m["task"]["state"]) for m in delivered if m.get("event") == "state"] == expected
    assert ("pending" in states_of(receiver.messages(), first)) is (release == "dropped")


def test_a_pull_controller_moved_while_a_call_hangs_at_the_old_one_takes_work_from_the_new_one_once(
    tmp_path: Path,
    hanging: HangingController,
    moto: MotoServer,
    bucket: str,
    controller: ReceiverServer,
    cloud_key: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the new controller's GetInstanceImportTask calls, counted as they arrive
    service = controller.controller.imaging
    assert service is not None
    asked: list[str] = []
    get_task = service.get_task

    def counted(params: dict[str, str], base_url: str) -> str:
        asked.append(params.get("InstanceId", ""))
        return get_task(params, base_url)

    monkeypatch.setattr(service, "get_task", counted)
    wf_dir = tmp_path / "workflows"
    wf_dir.mkdir()
    (wf_dir / "nap.yaml").write_text(WORKFLOW)
    cfg_file = tmp_path / "imaging.yaml"
    cfg_file.write_text(
        json.dumps(
            stores.with_store(
                {
                    "state_dir": str(tmp_path / "state"),
                    "workflows": {"extra_dirs": [str(wf_dir)]},
                    "worker": {"concurrency": 2, "poll_interval": 0.2},
                    "tasks": {"lease_seconds": 5},
                    "sources": {"allowed_endpoints": [moto.endpoint, controller.url]},
                    "controller": {
                        "mode": "pull",
                        "url": hanging.url,  # GetInstanceImportTask hangs there for up to 300 s
                        "metadata_url": controller.url,
                        "cloud_cert_file": str(cloud_key[1]),
                        "report_interval": 0.5,
                        "timeout": 300,
                        "max_backoff": 1,
                    },
                }
            )
        )
    )
    engine = Engine(config_mod.load(cfg_file))
    worker = start_worker(cfg_file)
    try:
        wait_until(lambda: hanging.held == 1, what="the first call to hang at the old controller")
        assert b"Action=GetInstanceImportTask" in hanging.requests[0]
        move_controller(cfg_file, controller.url)
        local = engine.submit("nap", {"seconds": 0.2})
        wait_until(lambda: engine.store.get_task(local).state is TaskState.COMPLETED, what="a local task")
        # the old reporter is still inside its call, and the new one made none meanwhile (one call at
        # a time: a task it took now would be reported beside the old one's call)
        assert hanging.held == 1 and asked == []

        disk = random_file(tmp_path / "disk.raw", MiB)
        task = {"importTaskId": "import-vol-0badf00d", "volumeId": "vol-0badf00d", "format": "RAW"}
        controller.controller.queue_pull_task(task | {"importManifestUrl": uploaded(moto, bucket, disk)})
        hanging.release("dropped")
        wait_until(lambda: final(tmp_path, "import-vol-0badf00d") is not None, timeout=90, what="DONE")
    finally:
        stop_process(worker)
        engine.store.close()
    assert len(hanging.requests) == 1  # the replaced reporter made no other call
    assert asked  # the new one asked the new controller
    reports = statuses(tmp_path, "import-vol-0badf00d")
    assert [s["Status"] for s in reports if s["Status"] in ("DONE", "FAILED")] == ["DONE"]
