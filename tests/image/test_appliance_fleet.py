"""The booted image against the shipped controller, `imaging controller serve` on the host.

One boot (TCG boots are slow) carries the scenarios in sequence; the tests of this module run in file
order over the same VM:

1. the appliance is launched with only the rendezvous address as its user data
   (``imaging:v1::<controller-url>:<enrolment-secret>``): `imaging configure` asks the controller for an
   identity (dynamic assignment), is handed the first of two pooled registrations, fetches that
   configuration (the compact form's signed fetch) and reports it; its worker's heartbeats then keep
   the controller's record current;
2. a configuration published on the controller (a rotated API key, and TLS turned on) is applied in
   the running VM by the image's ``imaging-reconfigure.service`` (the reply to a heartbeat announces
   it): the API answers HTTPS with the new key only, after a graceful reload (same process);
3. an update the appliance refuses (a certificate and key that do not load together): the field is
   named to the controller and the previous configuration keeps serving;
4. an update switching the controller section to pull mode: the worker's reporter becomes a
   Eucalyptus imaging worker and asks the cloud on the host (:class:`tests.euca_controller.EucaCloud`:
   metadata credentials, SigV2-checked Imaging service) for work.

The user data is one line, so root's SSH key for the checks inside the guest comes as NoCloud
vendor data, which cloud-init applies alongside.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import processes
from tests.api.controller_support import ENROL_SECRET, ControllerProcess, running_controller
from tests.euca_controller import EucaCloud, make_cloud_key
from tests.httpfixtures import self_signed_cert
from tests.image import vm as vmlib

pytestmark = [pytest.mark.slow, pytest.mark.image, pytest.mark.timeout(1800)]

#: guest-side addresses of the host's controller and Eucalyptus cloud (qemu guestfwd)
CONTROLLER_GUEST_IP = "10.0.2.102"
EUCA_GUEST_IP = "10.0.2.103"
POOL = ("pool-01", "pool-02")
SECRETS = {"pool-01": "pool-01-secret-0123456789abcdef", "pool-02": "pool-02-secret-0123456789abcdef"}
OLD = {"access_key": "AKIAFLEETOLD00000001", "secret_key": "old-fleet-secret-0123456789abcdefghij"}
NEW = {"access_key": "AKIAFLEETNEW00000002", "secret_key": "new-fleet-secret-0123456789abcdefghij"}


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 240.0) -> None:
    processes.wait_until(condition, timeout=timeout, interval=1.0, what=what)


def section(**overrides: Any) -> dict[str, Any]:
    """A pooled appliance's ``imaging:`` section (the boot line supplies the controller's URL and secret)."""
    doc: dict[str, Any] = {
        "api": {"bind": f"0.0.0.0:{vmlib.GUEST_API_PORT}", "credentials": [OLD]},
        "controller": {"report_interval": 5},
        "targets": {"volume": {"type": "file"}},
        "limits": {"concurrent_tasks": 1},
        "log_level": "debug",
    }
    doc.update(overrides)
    return doc


@dataclass
class Fleet:
    ctl: ControllerProcess
    vm: vmlib.Vm
    cloud: EucaCloud
    cloud_cert: Path
    tls: tuple[Path, Path]
    other_tls: tuple[Path, Path]

    def show(self, appliance_id: str) -> dict[str, Any]:
        status, body = self.ctl.admin("GET", f"/v1/appliances/{appliance_id}")
        assert status == 200, body
        view: dict[str, Any] = body
        return view

    def publish(self, appliance_id: str, config: dict[str, Any]) -> int:
        status, body = self.ctl.admin("POST", f"/v1/appliances/{appliance_id}/configs", {"config": config})
        assert status == 201, body
        version: int = body["config_version"]
        return version

    def guest(self, command: str) -> str:
        return self.vm.ssh(command, timeout=120).stdout.strip()

    def main_pid(self, unit: str) -> str:
        return self.guest(f"systemctl show -p MainPID --value {unit}")


@pytest.fixture(scope="module")
def fleet(appliance_image: Path, image_workdir: Path, ssh_key: Path) -> Iterator[Fleet]:
    work = image_workdir / "fleet"
    (work / "controller").mkdir(parents=True)
    (work / "tls").mkdir()
    (work / "other-tls").mkdir()
    cloud_key, cloud_cert = make_cloud_key(work)
    with (
        running_controller(work / "controller", workers=2) as ctl,
        EucaCloud(cloud_key) as cloud,
    ):
        for name in POOL:
            ctl.register(name, section(), SECRETS[name], dynamic=True)
        ctl_port = int(ctl.url.rsplit(":", 1)[1])
        forwards = [
            vmlib.GuestForward(CONTROLLER_GUEST_IP, 8780, ctl_port),
            vmlib.GuestForward(EUCA_GUEST_IP, cloud.port, cloud.port),
        ]
        vendor = {
            "disable_root": False,
            "ssh_pwauth": False,
            "ssh_authorized_keys": [ssh_key.with_suffix(".pub").read_text().strip()],
        }
        vm = vmlib.boot(
            appliance_image,
            work / "vm",
            f"imaging:v1::{forwards[0].guest_url}:{ENROL_SECRET}\n",
            ssh_key,
            vendor_data=vendor,
            forwards=forwards,
            ssh_timeout=900,  # a shared, loaded machine can take longer than the default under TCG
        )
        try:
            vm.wait_for("the API's /v1/health", lambda: vm.get_json("/v1/health")[0] in (200, 503), 300)
            vm.boot_seconds["api"] = time.monotonic() - vm.boot_seconds["started"]
            sys.stderr.write(f"\n[image] fleet VM ({vm.accel}): {vm.boot_seconds}\n")
            yield Fleet(
                ctl,
                vm,
                cloud,
                cloud_cert,
                self_signed_cert(work / "tls", ["appliance.test"]),
                self_signed_cert(work / "other-tls", ["other.test"]),
            )
        finally:
            vm.stop()


def api_status(fleet: Fleet, cred: dict[str, str], *, tls: bool) -> int:
    """HTTP status of an authenticated admin request (``GET /v1/tasks``) on the forwarded API port."""
    token = base64.b64encode(f"{cred['access_key']}:{cred['secret_key']}".encode()).decode()
    scheme = "https" if tls else "http"
    request = urllib.request.Request(
        f"{scheme}://127.0.0.1:{fleet.vm.api_port}/v1/tasks", headers={"Authorization": f"Basic {token}"}
    )
    context = None
    if tls:
        # the certificate the controller published is the trust anchor; the name is the test's own
        context = ssl.create_default_context(cafile=str(fleet.tls[0]))
        context.check_hostname = False
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def unit_state(fleet: Fleet, unit: str) -> str:
    return fleet.vm.ssh(f"systemctl is-active {unit}.service", check=False).stdout.strip()


def answers(fleet: Fleet, cred: dict[str, str], status: int) -> bool:
    """Whether HTTPS with ``cred`` gets ``status`` now (False while the API still speaks plain HTTP)."""
    try:
        return api_status(fleet, cred, tls=True) == status
    except (OSError, http.client.HTTPException):
        return False


def test_an_appliance_booted_with_only_the_rendezvous_address_is_assigned_one_pooled_configuration(
    fleet: Fleet,
) -> None:
    views = {name: fleet.show(name) for name in POOL}
    assigned = [name for name, v in views.items() if v["assigned_to"]]
    assert assigned == ["pool-01"], views  # the first unassigned registration, and only that one
    view = views["pool-01"]
    # the machine that asked is the VM, named by its machine id
    assert view["assigned_to"] == fleet.guest("cat /etc/machine-id")
    assert view["status"] == "configured", view
    assert "10.0.2.15" in view["addresses"], view
    assert [e["appliance_id"] for e in fleet.ctl.events("assigned")] == ["pool-01"]

    # the appliance runs as pool-01, with the controller of its boot line
    config = yaml.safe_load(fleet.guest("cat /etc/imaging/imaging.yaml"))
    assert config["controller"]["appliance_id"] == "pool-01"
    assert config["controller"]["url"] == f"http://{CONTROLLER_GUEST_IP}:8780"
    assert api_status(fleet, OLD, tls=False) == 200
    wait_until(lambda: unit_state(fleet, "imaging-reconfigure") == "active", "imaging-reconfigure.service")


def test_heartbeats_of_the_booted_appliance_keep_its_controller_record_current(fleet: Fleet) -> None:
    # last_seen also moves when the appliance polls for its configuration, which it may do before
    # its first heartbeat: only the fields a heartbeat alone carries show that one arrived
    wait_until(lambda: fleet.show("pool-01")["health"] is not None, "the first heartbeat")
    view = fleet.show("pool-01")
    assert view["health"] in ("ok", "degraded"), view
    assert "10.0.2.15" in view["addresses"], view
    assert view["applied_version"] in (None, 1), view
    updates = [e for e in fleet.ctl.events("updated") if e["appliance_id"] == "pool-01"]
    assert any("health" in e["data"]["changed"] for e in updates), updates
    # and the next heartbeats keep the record current
    first = view["last_seen"]
    wait_until(lambda: fleet.show("pool-01")["last_seen"] != first, "a later report")
    assert fleet.show("pool-01")["health"] is not None


def test_a_published_key_rotation_turning_on_tls_is_applied_live_by_a_graceful_reload(fleet: Fleet) -> None:
    api_pid, worker_pid = fleet.main_pid("imaging-api"), fleet.main_pid("imaging-worker")
    cert, key = fleet.tls
    api = {
        "bind": f"0.0.0.0:{vmlib.GUEST_API_PORT}",
        "credentials": [NEW],
        "tls": {"cert": cert.read_text(), "key": key.read_text()},
    }
    version = fleet.publish("pool-01", section(api=api))
    assert version == 2
    wait_until(lambda: fleet.show("pool-01")["applied_version"] == 2, "the appliance to apply version 2")

    wait_until(lambda: answers(fleet, NEW, 200), "HTTPS with the new key")
    assert api_status(fleet, OLD, tls=True) in (401, 403)
    with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP to the TLS port
        api_status(fleet, NEW, tls=False)
    # a graceful reload of the API and a re-read by the worker: neither process was replaced
    assert fleet.main_pid("imaging-api") == api_pid
    assert fleet.main_pid("imaging-worker") == worker_pid
    assert [e["data"].get("version") for e in fleet.ctl.events("config-refused")] == []


def test_an_update_the_booted_appliance_refuses_is_reported_by_field_and_the_old_one_keeps_serving(
    fleet: Fleet,
) -> None:
    cert, _ = fleet.tls
    _, other_key = fleet.other_tls
    api = {
        "bind": f"0.0.0.0:{vmlib.GUEST_API_PORT}",
        "credentials": [OLD],
        "tls": {"cert": cert.read_text(), "key": other_key.read_text()},
    }
    version = fleet.publish("pool-01", section(api=api))
    wait_until(
        lambda: any(e["data"].get("version") == version for e in fleet.ctl.events("config-refused")),
        f"the appliance to refuse version {version}",
    )
    refused = next(e for e in fleet.ctl.events("config-refused") if e["data"].get("version") == version)
    assert [err["field"] for err in refused["data"]["errors"]] == ["imaging.api.tls"], refused
    assert "PRIVATE KEY" not in json.dumps(refused)
    assert fleet.show("pool-01")["applied_version"] == 2
    assert api_status(fleet, NEW, tls=True) == 200
    assert api_status(fleet, OLD, tls=True) in (401, 403)


def test_an_update_to_pull_mode_makes_the_booted_appliance_ask_the_eucalyptus_cloud_for_work(
    fleet: Fleet,
) -> None:
    euca = f"http://{EUCA_GUEST_IP}:{fleet.cloud.port}"
    cert, key = fleet.tls
    config = section(
        api={
            "bind": f"0.0.0.0:{vmlib.GUEST_API_PORT}",
            "credentials": [NEW],
            "tls": {"cert": cert.read_text(), "key": key.read_text()},
        },
        controller={
            "url": euca,
            "mode": "pull",
            "metadata_url": euca,
            "cloud_cert": fleet.cloud_cert.read_text(),
            "report_interval": 5,
        },
        sources={"allowed_endpoints": [euca]},
    )
    fleet.publish("pool-01", config)
    # the worker's reporter restarts as a Eucalyptus imaging worker: it takes credentials from the
    # metadata service and signs GetInstanceImportTask with them (the cloud checks SigV2 and the token)
    # (keys_used records only requests whose signature and token the cloud accepted)
    wait_until(lambda: fleet.cloud.keys_used, "a signed request from the booted appliance to the cloud")
    assert all(k.startswith("ASIA") for k in fleet.cloud.keys_used)
    running = yaml.safe_load(fleet.guest("cat /etc/imaging/imaging.yaml"))
    assert running["controller"]["mode"] == "pull"
    assert api_status(fleet, NEW, tls=True) == 200
    # a cloud in pull mode publishes no configuration versions: the watcher says so and ends
    wait_until(lambda: unit_state(fleet, "imaging-reconfigure") == "inactive", "imaging-reconfigure to end")
    assert fleet.guest("systemctl show -p Result --value imaging-reconfigure.service") == "success"
