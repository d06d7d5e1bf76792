"""`make fleet` (``python -m tests.fleet``) as a newcomer runs it: three appliances answering for one
database, and Ctrl-C leaving nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from tests import processes

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_make_fleet_serves_one_task_through_every_appliance_and_ctrl_c_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    root = tmp_path / "fleet"
    out = (tmp_path / "fleet.out").open("wb")
    fleet = subprocess.Popen(
        [sys.executable, "-m", "tests.fleet", "--dir", str(root), "--lease", "5"],
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        processes.wait_until(
            lambda: (root / "fleet.json").exists() or fleet.poll() is not None, timeout=300, what="the fleet"
        )
        assert fleet.poll() is None, (tmp_path / "fleet.out").read_text()
        info = json.loads((root / "fleet.json").read_text())
        printed = (tmp_path / "fleet.out").read_text()
        assert [a["endpoint"] for a in info["appliances"]] == [
            line.split()[2] for line in printed.splitlines() if line.startswith("  appliance ")
        ]
        creds = info["credentials"]
        assert f"export AWS_ACCESS_KEY_ID={creds['access_key']}" in printed

        def ec2(endpoint: str):
            return boto3.client(
                "ec2",
                endpoint_url=endpoint,
                region_name=info["region"],
                aws_access_key_id=creds["access_key"],
                aws_secret_access_key=creds["secret_key"],
            )

        first, _, third = info["appliances"]
        manifest = f"{info['moto']['endpoint']}/disks/disk.raw.manifest.xml"
        task_id = ec2(first["endpoint"]).import_volume(
            AvailabilityZone="us-east-1a",
            Image={"Format": "RAW", "Bytes": 1 << 20, "ImportManifestUrl": manifest},
            Volume={"Size": 1},
        )["ConversionTask"]["ConversionTaskId"]
        seen = ec2(third["endpoint"]).describe_conversion_tasks(ConversionTaskIds=[task_id])[
            "ConversionTasks"
        ]
        assert [t["ConversionTaskId"] for t in seen] == [task_id]
        assert seen[0]["ImportVolume"]["Image"]["Format"] == "RAW"

        # everything the fleet started: its process tree (moto, each appliance's serve and worker and
        # what they started) and the PostgreSQL server (pg_ctl detaches it)
        started = processes.tree(fleet.pid) + processes.tree(info["postmaster_pid"])
        groups = [a[k] for a in info["appliances"] for k in ("serve_pid", "worker_pid")]
        assert {info["moto"]["pid"], info["postmaster_pid"], *groups} <= {p.pid for p in started}
        fleet.send_signal(signal.SIGINT)
        assert fleet.wait(timeout=180) == 0
        printed = (tmp_path / "fleet.out").read_text()
        assert "SIGINT: stopped the fleet" in printed
        assert [p for p in started if p.alive()] == []
        assert [g for g in groups if _group_alive(g)] == []
        assert not Path(info["cluster_dir"]).exists()
        assert not root.exists()
    finally:
        if fleet.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(fleet.pid, signal.SIGINT)
            fleet.wait(timeout=180)
        out.close()
