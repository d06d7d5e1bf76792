"""A boot with invalid user data: the real services stay down and the health answer names the field."""

from __future__ import annotations

import pytest

from tests.image.vm import Vm

pytestmark = [pytest.mark.slow, pytest.mark.image, pytest.mark.timeout(1800)]


def test_health_names_the_missing_field_and_the_services_stay_down(bad_config_vm: Vm) -> None:
    status, body = bad_config_vm.get_json("/v1/health")
    assert status == 503, body
    assert body["status"] == "invalid-config"
    assert any("appliance_id" in e["field"] for e in body["errors"]), body

    def state(unit: str) -> str:
        return bad_config_vm.ssh(f"systemctl is-active {unit}.service", check=False).stdout.strip()

    assert state("imaging-health-responder") == "active"
    assert state("imaging-api") != "active"
    assert state("imaging-worker") != "active"
    assert bad_config_vm.ssh("test -f /run/imaging/config-error.json", check=False).returncode == 0
    assert bad_config_vm.ssh("test -e /etc/imaging/imaging.yaml", check=False).returncode != 0
    # the console says which field is wrong
    assert "imaging: invalid config: imaging" in bad_config_vm.console.read_text(errors="replace")
