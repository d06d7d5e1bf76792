"""Workflow ``resources:`` by path, s3:// and http(s):// — validated when loaded, fetched before the
first step, verified by sha256, cached by digest and handed to templates as read-only files."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance import config as config_mod
from appliance.errors import WorkflowInvalid
from appliance.store import TaskState
from appliance.workflow import Engine
from tests import stores
from tests.httpfixtures import TestHTTPServer
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY, MotoServer

SCRIPT = b"#!/bin/sh\necho configured\n"
DIGEST = hashlib.sha256(SCRIPT).hexdigest()


def write_workflow(directory: Path, resources: dict[str, Any], name: str = "uses-resource") -> Path:
    """A workflow copying resource ``script`` to param ``dst``."""
    path = directory / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "params": {"dst": {"type": "string", "required": True}},
                "resources": resources,
                "steps": [
                    {
                        "name": "copy",
                        "action": "file.copy",
                        "with": {"src": "{{ resources.script }}", "dst": "{{ dst }}"},
                    }
                ],
            }
        )
    )
    return path


def run(cfg: config_mod.Config, workflow: Path, dst: Path) -> Any:
    engine = Engine(cfg)
    try:
        task = engine.run(engine.submit(workflow, {"dst": str(dst)}))
        return task, engine.store.step_results(task.id), engine.store.events(task_id=task.id)
    finally:
        engine.close()


def cache_files(cfg: config_mod.Config) -> set[str]:
    d = cfg.state_dir / "cache" / "sha256"
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


@pytest.fixture
def cfg(tmp_path: Path) -> config_mod.Config:
    return stores.config({"state_dir": str(tmp_path / "state")}, base_dir=tmp_path)


def test_relative_path_resource_is_read_from_next_to_the_workflow_as_a_readonly_cached_copy(
    tmp_path: Path, cfg: config_mod.Config
) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "setup.sh").write_bytes(SCRIPT)
    wf = write_workflow(tmp_path, {"script": "files/setup.sh"})
    dst = tmp_path / "copy.sh"
    task, steps, events = run(cfg, wf, dst)
    assert task.state is TaskState.COMPLETED, task.error_message
    assert dst.read_bytes() == SCRIPT
    src = Path(steps[0].args["src"])
    assert src == cfg.state_dir / "cache" / "sha256" / DIGEST
    assert src.stat().st_mode & 0o777 == 0o444
    fetched = next(e for e in events if e.kind == "resources.fetched").data["resources"]
    assert fetched == [
        {
            "name": "script",
            "uri": str(tmp_path / "files/setup.sh"),
            "path": str(src),
            "sha256": DIGEST,
            "cached": False,
        }
    ]


def test_pinned_digest_mismatch_fails_before_the_first_step_and_caches_nothing(
    tmp_path: Path, cfg: config_mod.Config
) -> None:
    (tmp_path / "setup.sh").write_bytes(SCRIPT)
    wrong = hashlib.sha256(b"what the author reviewed").hexdigest()
    wf = write_workflow(tmp_path, {"script": {"uri": "setup.sh", "sha256": wrong}})
    task, steps, _ = run(cfg, wf, tmp_path / "copy.sh")
    assert task.state is TaskState.FAILED
    assert task.error_code == "Artifact.DigestMismatch"
    assert f"resources.script ({tmp_path / 'setup.sh'})" in task.error_message
    assert DIGEST in task.error_message and wrong in task.error_message
    assert steps == []
    assert cache_files(cfg) == set()
    assert not (tmp_path / "copy.sh").exists()


def test_missing_local_resource_fails_the_task_with_a_coded_error(
    tmp_path: Path, cfg: config_mod.Config
) -> None:
    wf = write_workflow(tmp_path, {"script": "not-there.sh"})
    task, steps, _ = run(cfg, wf, tmp_path / "copy.sh")
    assert task.state is TaskState.FAILED
    assert task.error_code == "Artifact.ResourceMissing"
    assert str(tmp_path / "not-there.sh") in task.error_message
    assert steps == []


@pytest.mark.parametrize(
    ("resources", "template", "message", "field"),
    [
        (
            {"script": "a.sh"},
            "{{ resources.scirpt }}",
            "undefined resource 'scirpt' (resources: script)",
            "with",
        ),
        ({"script": "ftp://host/a.sh"}, "{{ resources.script }}", "unsupported scheme", "resources.script"),
        (
            {"script": "artifact://tools@1"},
            "{{ resources.script }}",
            "names an artifact, not a file in it",
            "resources.script",
        ),
        (
            {"script": {"uri": "a.sh", "sha256": "abc"}},
            "{{ resources.script }}",
            "does not match",
            "resources",
        ),
        ({}, "{{ resources.script }}", "undefined variable 'resources'", "with.src"),
    ],
    ids=["undeclared-name", "bad-scheme", "artifact-without-path", "bad-pin", "no-resources-key"],
)
def test_loader_reports_resource_problems_with_file_and_field(
    tmp_path: Path, cfg: config_mod.Config, resources: dict, template: str, message: str, field: str
) -> None:
    path = tmp_path / "wf.yaml"
    doc: dict[str, Any] = {
        "name": "wf",
        "steps": [{"name": "copy", "action": "file.copy", "with": {"src": template, "dst": "/tmp/x"}}],
    }
    if resources:
        doc["resources"] = resources
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(WorkflowInvalid) as exc:
        Engine(cfg).load(path)
    errors = exc.value.errors
    assert any(message in e.message and (e.field or "").startswith(field) for e in errors), errors
    assert all(e.file == str(path) for e in errors)


def test_resources_is_reserved_for_the_engine(tmp_path: Path, cfg: config_mod.Config) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "wf", "steps": [{"name": "e", "action": "util.echo", "register": "resources"}]}
        )
    )
    with pytest.raises(WorkflowInvalid, match="'resources' is reserved"):
        Engine(cfg).load(path)


def test_dry_run_plans_resources_without_fetching(tmp_path: Path, cfg: config_mod.Config) -> None:
    (tmp_path / "setup.sh").write_bytes(SCRIPT)
    wf = write_workflow(
        tmp_path,
        {"script": {"uri": "setup.sh", "sha256": DIGEST}, "other": "https://example.invalid/x.sh"},
    )
    plan = Engine(cfg).plan(wf, {"dst": str(tmp_path / "copy.sh")})
    assert {r["name"]: (r["kind"], r["sha256"], r["cached"]) for r in plan["resources"]} == {
        "script": ("local", DIGEST, False),
        "other": ("http", None, None),
    }
    assert plan["steps"][0]["args"]["src"] == "<resource 'script'>"
    assert not (cfg.state_dir / "cache").exists()


# --- remote resources ----------------------------------------------------------------------------


def test_http_resource_on_loopback_is_refused_by_the_ssrf_policy(tmp_path: Path) -> None:
    with TestHTTPServer() as server:
        server.add("/setup.sh", SCRIPT)
        # the port is allowed, so what refuses the URL is the loopback address itself
        cfg = stores.config(
            {"state_dir": str(tmp_path / "state"), "sources": {"allowed_ports": [server.port]}},
            base_dir=tmp_path,
        )
        wf = write_workflow(tmp_path, {"script": server.url("/setup.sh")})
        task, steps, _ = run(cfg, wf, tmp_path / "copy.sh")
        assert task.state is TaskState.FAILED
        assert task.error_code == "UrlNotAllowed"
        assert "loopback" in task.error_message and "resources.script" in task.error_message
        assert server.hits("/setup.sh") == []
        assert steps == []


def test_pinned_http_resource_from_an_allowed_endpoint_is_fetched_once_then_cached(
    tmp_path: Path,
) -> None:
    with TestHTTPServer() as server:
        server.add("/setup.sh", SCRIPT)
        cfg = stores.config(
            {"state_dir": str(tmp_path / "state"), "sources": {"allowed_endpoints": [server.endpoint]}},
            base_dir=tmp_path,
        )
        wf = write_workflow(tmp_path, {"script": {"uri": server.url("/setup.sh"), "sha256": DIGEST}})
        first, _, _ = run(cfg, wf, tmp_path / "one.sh")
        assert first.state is TaskState.COMPLETED, first.error_message
        assert len(server.hits("/setup.sh")) == 1
        second, _, events = run(cfg, wf, tmp_path / "two.sh")
        assert second.state is TaskState.COMPLETED, second.error_message
        assert len(server.hits("/setup.sh")) == 1  # the pinned digest was in the cache: no request
        assert (tmp_path / "two.sh").read_bytes() == SCRIPT
        assert next(e for e in events if e.kind == "resources.fetched").data["resources"][0]["cached"] is True


def test_http_resource_whose_content_changed_is_refused(tmp_path: Path) -> None:
    with TestHTTPServer() as server:
        server.add("/setup.sh", b"#!/bin/sh\nrm -rf /\n")
        cfg = stores.config(
            {"state_dir": str(tmp_path / "state"), "sources": {"allowed_endpoints": [server.endpoint]}},
            base_dir=tmp_path,
        )
        wf = write_workflow(tmp_path, {"script": {"uri": server.url("/setup.sh"), "sha256": DIGEST}})
        task, _, _ = run(cfg, wf, tmp_path / "copy.sh")
    assert task.error_code == "Artifact.DigestMismatch"
    assert cache_files(cfg) == set()


@pytest.fixture
def s3_cfg(tmp_path: Path, moto: MotoServer) -> tuple[config_mod.Config, str]:
    bucket = f"res-{uuid.uuid4().hex[:12]}"
    moto.client("s3").create_bucket(Bucket=bucket)
    moto.client("s3").put_object(Bucket=bucket, Key="scripts/setup.sh", Body=SCRIPT)
    cfg = stores.config(
        {
            "state_dir": str(tmp_path / "state"),
            # s3:// resources use the artifact store's connection; no store bucket is needed for them
            "artifacts": {
                "endpoint_url": moto.endpoint,
                "region": REGION,
                "access_key": TEST_ACCESS_KEY,
                "secret_key": TEST_SECRET_KEY,
            },
        },
        base_dir=tmp_path,
    )
    return cfg, bucket


def test_s3_resource_pinned_is_served_from_the_cache_after_the_object_is_gone(
    tmp_path: Path, moto: MotoServer, s3_cfg: tuple[config_mod.Config, str]
) -> None:
    cfg, bucket = s3_cfg
    pinned = write_workflow(
        tmp_path, {"script": {"uri": f"s3://{bucket}/scripts/setup.sh", "sha256": DIGEST}}
    )
    unpinned = write_workflow(tmp_path, {"script": f"s3://{bucket}/scripts/setup.sh"}, name="unpinned")
    first, _, _ = run(cfg, pinned, tmp_path / "one.sh")
    assert first.state is TaskState.COMPLETED, first.error_message
    assert (tmp_path / "one.sh").read_bytes() == SCRIPT
    moto.client("s3").delete_object(Bucket=bucket, Key="scripts/setup.sh")
    second, _, _ = run(cfg, pinned, tmp_path / "two.sh")
    assert second.state is TaskState.COMPLETED, second.error_message
    assert (tmp_path / "two.sh").read_bytes() == SCRIPT
    # without a pin nothing says the cached bytes are still what the URI holds: it is fetched again
    third, _, _ = run(cfg, unpinned, tmp_path / "three.sh")
    assert third.state is TaskState.FAILED
    assert third.error_code == "Artifact.NotFound"
    assert f"s3://{bucket}/scripts/setup.sh" in third.error_message
