"""The rules of the ``policy`` hook (:func:`appliance.hooks.policy.check_policy`), and the hook run
on a real image by an engine: guest facts are passed in the image as ``guest.validate`` would add them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance.errors import ImageRejected
from appliance.hooks.policy import PolicyDenied, check_policy
from appliance.store import TaskState
from appliance.workflow import Engine, Registry
from tests import imagefactory as imgs

from ..workflow.support import write_workflow
from .test_points import make_cfg

GiB = 1 << 30

UBUNTU = {
    "layout": "disk",
    "os": {
        "family": "linux",
        "distribution": "ubuntu",
        "version": "22.04",
        "pretty_name": "Ubuntu 22.04 LTS",
    },
    "findings": [
        {"code": "Guest.FstabDeviceMissing", "severity": "warning", "message": "fix /etc/fstab"},
        {"code": "Guest.NoSwap", "severity": "info", "message": "nothing to do"},
    ],
}


def image(**facts: Any) -> dict[str, Any]:
    return {"path": "/scratch/disk.raw", "format": "raw", "virtual_size": 2 * GiB, **facts}


def denied(img: dict[str, Any], **rules: Any) -> PolicyDenied:
    with pytest.raises(PolicyDenied) as exc:
        check_policy(img, rules)
    return exc.value


def test_allow_formats_refuses_a_format_not_listed() -> None:
    exc = denied(image(format="vmdk"), allow_formats=["raw", "QCOW2"])
    assert exc.code == "Policy.FormatDenied"
    assert exc.message == "policy rule allow_formats: format 'vmdk' is not one of raw, qcow2"
    assert check_policy(image(format="qcow2"), {"allow_formats": ["raw", "QCOW2"]}) == ["allow_formats"]


def test_deny_formats_knows_qemu_names() -> None:
    exc = denied(image(format="vhd"), deny_formats=["vpc"])  # qemu-img's name for vhd
    assert (exc.code, exc.rule) == ("Policy.FormatDenied", "deny_formats")


def test_format_rule_at_a_point_without_a_known_format_denies() -> None:
    exc = denied(image(format=None), allow_formats=["raw"])
    assert "not known at this point" in exc.message


def test_max_virtual_size_accepts_size_strings_and_names_both_sizes() -> None:
    exc = denied(image(virtual_size=20 * GiB), max_virtual_size="10GiB")
    assert exc.code == "Policy.SizeExceeded"
    assert "20 GiB (21474836480 bytes) exceeds 10 GiB (10737418240 bytes)" in exc.message
    assert check_policy(image(virtual_size=10 * GiB), {"max_virtual_size": "10GiB"}) == ["max_virtual_size"]


def test_max_virtual_size_falls_back_to_the_inspection() -> None:
    img = {"path": "/x", "format": "qcow2", "inspection": {"virtual_size": 3 * GiB}}
    assert denied(img, max_virtual_size=GiB).code == "Policy.SizeExceeded"


def test_allow_os_matches_family_or_distribution() -> None:
    assert check_policy(image(guest=UBUNTU), {"allow_os": ["ubuntu"]}) == ["allow_os"]
    assert check_policy(image(guest=UBUNTU), {"allow_os": ["Linux"]}) == ["allow_os"]
    exc = denied(image(guest=UBUNTU), allow_os=["windows"])
    assert exc.code == "Policy.OsDenied"
    assert exc.message == "policy rule allow_os: the guest runs Ubuntu 22.04 LTS, not one of windows"


def test_deny_os_refuses_a_listed_distribution() -> None:
    exc = denied(image(guest=UBUNTU), deny_os=["debian", "ubuntu"])
    assert (exc.code, exc.rule) == ("Policy.OsDenied", "deny_os")


def test_os_rules_are_skipped_without_a_guest_report_unless_it_is_required() -> None:
    assert check_policy(image(), {"allow_os": ["windows"]}) == []
    exc = denied(image(), allow_os=["windows"], require_guest=True)
    assert exc.code == "Policy.GuestRequired"


def test_deny_findings_matches_code_prefixes_from_the_guest_report() -> None:
    exc = denied(image(guest=UBUNTU), deny_findings=["Guest.Fstab"])
    assert exc.code == "Policy.FindingDenied"
    assert "Guest.FstabDeviceMissing (warning) matches 'Guest.Fstab': fix /etc/fstab" in exc.message


def test_min_severity_ignores_lesser_findings() -> None:
    assert check_policy(image(guest=UBUNTU), {"deny_findings": ["*"], "min_severity": "error"}) == [
        "deny_findings"
    ]
    assert denied(image(guest=UBUNTU), deny_findings=["*"], min_severity="warning").code == (
        "Policy.FindingDenied"
    )


def test_findings_of_the_task_and_the_inspection_count_too() -> None:
    task = [{"code": "Image.Sparse", "severity": "info", "message": "mostly zeros"}]
    with pytest.raises(PolicyDenied):
        check_policy(image(), {"deny_findings": ["Image.Sparse"]}, findings=task)
    inspected = image(inspection={"findings": [{"code": "Image.Sparse", "severity": "info", "message": "m"}]})
    assert denied(inspected, deny_findings=["Image."]).code == "Policy.FindingDenied"


def test_a_denial_is_an_image_rejection_with_one_finding() -> None:
    exc = denied(image(format="vmdk"), deny_formats=["vmdk"])
    assert isinstance(exc, ImageRejected)
    assert [f.code for f in exc.findings] == ["Policy.FormatDenied"]


def test_policy_hook_rejects_a_guest_the_point_reports(tmp_path: Path) -> None:
    disk = imgs.raw_mbr(tmp_path)
    write_workflow(
        tmp_path,
        "checked",
        {
            "steps": [
                {
                    "name": "point",
                    "hooks": "before_write",
                    "with": {"image": {"path": str(disk), "format": "raw", "guest": UBUNTU}},
                }
            ]
        },
    )
    rules = {"allow_os": ["linux"], "deny_findings": ["Guest.Fstab"], "min_severity": "warning"}
    cfg = make_cfg(
        tmp_path, None, {"before_write": [{"hook": "policy", "name": "site-policy", "with": rules}]}
    )
    engine = Engine(cfg, registry=Registry())
    task = engine.run(engine.submit("checked"))
    assert (task.state, task.error_code) == (TaskState.FAILED, "Policy.FindingDenied")
    assert task.error_message.startswith("step 'site-policy' failed: policy rule deny_findings: ")
    assert [f["code"] for f in task.findings] == ["Policy.FindingDenied"]
