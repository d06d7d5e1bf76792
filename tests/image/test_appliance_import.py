"""A real import through the booted appliance: boto3 ImportVolume against the forwarded API port,
the parts on the host's moto S3 (reached by the guest through qemu's guestfwd), to completion."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from appliance.report.messages import encode, headers
from tests.euca_upload import random_file
from tests.image.conftest import APPLIANCE_ID, CONTROLLER_SECRET, Controller
from tests.image.ec2 import MiB, import_volume, volume_path
from tests.image.vm import Vm
from tests.servers import MotoServer

pytestmark = [pytest.mark.slow, pytest.mark.image, pytest.mark.timeout(1800)]


def test_import_volume_through_the_booted_appliance_writes_the_source_bytes(
    appliance_vm: Vm, moto: MotoServer, controller: Controller, tmp_path: Path
) -> None:
    disk = random_file(tmp_path / "disk.raw", 24 * MiB, seed=4)
    t = import_volume(appliance_vm, moto, "appliance-image-import", disk)
    task_id = t["ConversionTaskId"]
    assert t["State"] == "completed", t
    done = t["ImportVolume"]
    assert done["BytesConverted"] == disk.stat().st_size

    # The volume target is a sparse RAW file in the guest: the source bytes, then zeros to 1 GiB.
    volume = volume_path(t)
    size = disk.stat().st_size
    out = appliance_vm.ssh(
        f"stat -c %s {volume} && head -c {size} {volume} | sha256sum"
        f" && tail -c +{size + 1} {volume} | tr -d '\\000' | wc -c",
        timeout=300,
    ).stdout.split()
    assert int(out[0]) == 2**30
    assert out[1] == hashlib.sha256(disk.read_bytes()).hexdigest()
    assert out[-1] == "0", "bytes after the image are not zero"

    # The controller heard every state change of the task, signed, in order, with increasing seq.
    states = _reported_states(controller, task_id)
    assert states == ["pending", "running", "completed"], states
    _assert_forged_and_replayed_reports_are_refused(controller)


def _reported(controller: Controller) -> list[dict[str, Any]]:
    # the receiver logs each verified report as {"message": ..., "received_at": ...}
    return [json.loads(line)["message"] for line in controller.log.read_text().splitlines() if line.strip()]


def _reported_states(controller: Controller, task_id: str, timeout: float = 120) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        messages = [m for m in _reported(controller) if m.get("appliance_id") == APPLIANCE_ID]
        seqs = [m["seq"] for m in messages]
        assert seqs == sorted(set(seqs)), "the controller logged reports out of order or twice"
        states = [
            m["task"]["state"]
            for m in messages
            if m.get("type") == "task" and m.get("event") == "state" and m["task"].get("id") == task_id
        ]
        if (states and states[-1] == "completed") or time.monotonic() > deadline:
            return states
        time.sleep(1)


def _assert_forged_and_replayed_reports_are_refused(controller: Controller) -> None:
    url = f"http://127.0.0.1:{controller.forward.host_port}/v1/reports"
    last = max(m["seq"] for m in _reported(controller) if m.get("appliance_id") == APPLIANCE_ID)
    body = encode(APPLIANCE_ID, last + 1000, {"type": "heartbeat", "health": "ok"})
    forged = headers("not-the-shared-secret-0123456789", APPLIANCE_ID, body, "application/json")
    replayed_body = encode(APPLIANCE_ID, last, {"type": "heartbeat", "health": "ok"})
    replayed = headers(CONTROLLER_SECRET, APPLIANCE_ID, replayed_body, "application/json")
    for data, hdrs, status in ((body, forged, 401), (replayed_body, replayed, 409)):
        req = urllib.request.Request(url, data=data, headers=hdrs, method="POST")
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=10)
        assert exc.value.code == status
