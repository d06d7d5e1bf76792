"""``imaging run`` of an import refuses a method the operator disabled (``sources.methods``), coded,
before anything is fetched; an operator's task reads a staged upload of the account it names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from appliance import config as config_mod
from appliance.sources.staged import UploadArea
from appliance.sources.stagedproto import Range
from tests import imagefactory as imgs

MiB = 1 << 20


def imaging(*args: str | Path, config: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "IMAGING_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", "-c", str(config), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def write_config(tmp_path: Path, methods: list[str]) -> Path:
    path = tmp_path / "imaging.yaml"
    path.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "sources": {"methods": methods}}))
    return path


def test_a_disabled_method_is_refused_by_imaging_run_with_its_code(tmp_path: Path) -> None:
    config = write_config(tmp_path, ["manifest", "url"])
    disk = json.dumps({"format": "RAW", "bucket": "disks", "key": "disk.raw"})
    plan = imaging(
        "run", "import-snapshot", "-p", f"disk_container={disk}", "--dry-run", "--json", config=config
    )
    assert "ImportMethodDisabled" in plan.stdout + plan.stderr, plan.stdout + plan.stderr
    run = imaging(
        "run", "import-snapshot", "-p", f"disk_container={disk}", "--progress", "json", config=config
    )
    assert run.returncode == 3, run.stderr
    assert run.stderr.startswith("imaging: ImportMethodDisabled: ")
    assert "the import method s3 (UserBucket) is disabled" in run.stderr


def test_an_operator_run_imports_the_staged_upload_of_the_account_it_names(tmp_path: Path) -> None:
    config = write_config(tmp_path, ["upload"])
    disk = imgs.raw_mbr(tmp_path, "disk.raw", size=4 * MiB).read_bytes()
    area = UploadArea.from_sources(config_mod.load(config).sources)
    pos = [0]

    def read(n: int) -> bytes:
        chunk = disk[pos[0] : pos[0] + n]
        pos[0] += len(chunk)
        return chunk

    assert area.put("tenant", "d1", Range(0, len(disk), len(disk)), read)[0].complete
    container = json.dumps({"format": "RAW", "url": "upload://d1", "account": "tenant"})
    run = imaging("run", "import-snapshot", "-p", f"disk_container={container}", "--json", config=config)
    assert run.returncode == 0, run.stderr
    task = json.loads(run.stdout)
    [image] = list((tmp_path / "state" / "images").glob(f"{task['id']}.*"))
    assert image.read_bytes() == disk
    # another account's upload of that id does not exist for it
    other = json.dumps({"format": "RAW", "url": "upload://d1", "account": "someone-else"})
    run = imaging("run", "import-snapshot", "-p", f"disk_container={other}", config=config)
    assert run.returncode == 3 and "Upload.NotFound" in run.stderr, run.stderr
