"""The `imaging` command as a user runs it: a real process, real images, documented exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance import config as config_mod
from appliance.store import Store
from tests import imagefactory as imgs
from tests import processes, stores
from tests.processes import wait_until

MiB = 1024 * 1024


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An environment whose embedded-default state lives under tmp_path."""
    e = dict(os.environ)
    e.pop("IMAGING_CONFIG", None)
    e["XDG_STATE_HOME"] = str(tmp_path / "state")
    return e


def imaging(
    *args: str | Path, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *map(str, args)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def db(env: dict[str, str]) -> Path:
    return Path(env["XDG_STATE_HOME"]) / "imaging" / "imaging.db"


def test_inspect_safe_image_exits_0_with_json_contract(tmp_path: Path, env: dict[str, str]) -> None:
    img = imgs.qcow2(tmp_path)
    r = imaging("inspect", img, "--format", "qcow2", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["format"] == "qcow2"
    assert out["safe"] is True
    assert out["virtual_size"] > 0 and out["actual_size"] > 0
    assert all(f["severity"] != "error" for f in out["findings"])


def test_inspect_rejected_image_exits_2_with_coded_finding(tmp_path: Path, env: dict[str, str]) -> None:
    img = imgs.qcow2_backing(tmp_path)
    r = imaging("inspect", img, "--format", "raw", "--json", env=env)
    assert r.returncode == 2
    out = json.loads(r.stdout)
    assert out["safe"] is False
    codes = [f["code"] for f in out["findings"]]
    assert codes[0] in ("FormatMismatch", "UnsafeImage.BackingFile")
    assert set(f) >= {"code", "severity", "message"} if (f := out["findings"][0]) else False


def test_inspect_text_output_names_the_code(tmp_path: Path, env: dict[str, str]) -> None:
    r = imaging("inspect", imgs.qed(tmp_path), env=env)
    assert r.returncode == 2
    assert "UnsafeImage.BannedFormat" in r.stdout


def test_usage_errors_exit_1_with_one_coded_line(tmp_path: Path, env: dict[str, str]) -> None:
    r = imaging("inspect", tmp_path / "missing.img", env=env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("imaging: InvalidParameterValue:")
    r = imaging("inspect", imgs.qcow2(tmp_path), "--format", "ova", env=env)
    assert r.returncode == 1
    assert "unknown image format 'ova'" in r.stderr
    r = imaging("convert", "a", "b", env=env)  # --to is required
    assert r.returncode == 1
    assert "imaging: InvalidParameterValue:" in r.stderr


def test_invalid_config_is_reported_with_file_and_field(tmp_path: Path, env: dict[str, str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("limits:\n  max_virtual_size: huge\n")
    r = imaging("--config", cfg, "inspect", imgs.qcow2(tmp_path), env=env)
    assert r.returncode == 1
    assert f"imaging: InvalidConfiguration: {cfg}: limits.max_virtual_size" in r.stderr


def test_convert_writes_identical_image_and_json_lines_progress(tmp_path: Path, env: dict[str, str]) -> None:
    src = imgs.qcow2_with_data(tmp_path)
    dst = tmp_path / "out.vhdx"
    r = imaging("convert", src, dst, "--to", "vhdx", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["format"] == "vhdx"
    lines = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert lines and lines[-1]["percent"] == 100.0
    assert [x["done"] for x in lines] == sorted(x["done"] for x in lines)
    cmp = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "vhdx", src, dst], capture_output=True)
    assert cmp.returncode == 0, cmp.stdout


def test_convert_of_rejected_image_exits_2_and_leaves_nothing(tmp_path: Path, env: dict[str, str]) -> None:
    src = imgs.vmdk_flat(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    r = imaging("convert", src, out / "x.raw", "--to", "raw", env=env)
    assert r.returncode == 2
    assert r.stderr.startswith("imaging: UnsafeImage.")
    assert list(out.iterdir()) == []
    scratch = Path(env["XDG_STATE_HOME"]) / "imaging" / "scratch"
    assert [p.name for p in scratch.iterdir() if not p.name.startswith(".")] == []


def test_decompression_bomb_is_rejected_without_filling_scratch(tmp_path: Path, env: dict[str, str]) -> None:
    bomb = imgs.bomb(tmp_path, "gzip", total=512 * MiB)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'st'}\nlimits:\n  max_decompressed_size: 32MiB\n")
    r = imaging("--config", cfg, "inspect", bomb, "--json", env=env)
    assert r.returncode == 2
    assert json.loads(r.stdout)["findings"][0]["code"] == "SizeLimitExceeded.Decompressed"
    leftovers = [p for p in (tmp_path / "st" / "scratch").rglob("*") if p.is_file() and p.name != ".lock"]
    assert leftovers == []


def test_tasks_list_lines_up_an_ec2_task_id_under_its_header(tmp_path: Path, env: dict[str, str]) -> None:
    # EC2 ids (import-snap- and 17 hex digits) are longer than a run's; the columns still line up
    cfg = tmp_path / "imaging.yaml"
    assert imaging("config", "init", cfg, env=env).returncode == 0
    with Store(config_mod.load(cfg).store) as store:
        store.create_task("import-snapshot", "import-snapshot", task_id="import-snap-0123456789abcdef0")
    listed = imaging("-c", cfg, "tasks", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert row.startswith("import-snap-0123456789abcdef0 ")
    assert row[header.index("STATE") :].startswith("pending")


def test_run_workflow_records_a_task_visible_to_tasks_commands(tmp_path: Path, env: dict[str, str]) -> None:
    src = imgs.qcow2_with_data(tmp_path)
    dst = tmp_path / "out.vmdk"
    r = imaging(
        "run",
        "convert-image",
        "-p",
        f"source={src}",
        "-p",
        f"target={dst}",
        "-p",
        "format=vmdk",
        "--json",
        "--progress",
        "none",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    task = json.loads(r.stdout)
    assert task["state"] == "completed"
    assert dst.is_file()
    listed = json.loads(imaging("tasks", "list", "--json", env=env).stdout)
    assert [t["id"] for t in listed] == [task["id"]]
    shown = json.loads(imaging("tasks", "show", task["id"], "--json", env=env).stdout)
    # validate-guest runs only when asked (validate_guest); after-inspect is the operator hooks'
    # insertion point (none configured: it passes the image on)
    names = ["validate-guest", "inspect", "after-inspect", "copy-unchanged", "convert"]
    assert [s["name"] for s in shown["steps"]] == names
    assert [s["state"] for s in shown["steps"]] == [
        "skipped",
        "completed",
        "completed",
        "skipped",
        "completed",
    ]
    assert any(e["action"] == "created" and e["resource"] == str(dst) for e in shown["ledger"])


def test_run_of_hostile_image_fails_task_with_rejection_code_and_exit_2(
    tmp_path: Path, env: dict[str, str]
) -> None:
    src = imgs.qcow2_data_file(tmp_path)
    r = imaging(
        "run",
        "convert-image",
        "-p",
        f"source={src}",
        "-p",
        f"target={tmp_path / 'o.raw'}",
        "--json",
        "--progress",
        "none",
        env=env,
    )
    assert r.returncode == 2, r.stderr
    task = json.loads(r.stdout)
    assert task["state"] == "failed"
    assert task["error_code"] == "UnsafeImage.DataFile"
    assert any(f["code"] == "UnsafeImage.DataFile" for f in task["findings"])
    assert not (tmp_path / "o.raw").exists()


def test_dry_run_plans_without_side_effects(tmp_path: Path, env: dict[str, str]) -> None:
    src = imgs.compress(imgs.qcow2_with_data(tmp_path), "gzip")
    r = imaging(
        "run",
        "convert-image",
        "-p",
        f"source={src}",
        "-p",
        f"target={tmp_path / 'o.raw'}",
        "--dry-run",
        "--json",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert [s["status"] for s in plan["steps"]] == ["skip", "run", "run", "skip", "run"]
    assert plan["steps"][1]["scratch_bytes"] > 0  # the gzip input will be decompressed into scratch
    assert not db(env).exists()
    assert not (tmp_path / "o.raw").exists()
    assert not (Path(env["XDG_STATE_HOME"]) / "imaging" / "scratch").exists()


def test_workflows_validate_reports_file_step_and_field(tmp_path: Path, env: dict[str, str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsteps:\n  - name: first\n    action: util.echo\n    whenn: true\n")
    r = imaging("workflows", "validate", bad, env=env)
    assert r.returncode == 1
    assert str(bad) in r.stderr and "first" in r.stderr and "whenn" in r.stderr
    shipped = imaging("workflows", "list", "--json", env=env)
    names = [w["name"] for w in json.loads(shipped.stdout)]
    assert "convert-image" in names


@pytest.mark.slow
def test_ctrl_c_stops_qemu_img_before_the_command_exits_and_removes_partial_output(
    tmp_path: Path, env: dict[str, str]
) -> None:
    # A sparse raw disk with 256 MiB of random data spread over 2 GiB: deflating it into a
    # stream-optimized VMDK keeps qemu-img busy for several seconds.
    src = tmp_path / "big.raw"
    with open(src, "wb") as f:
        f.truncate(2048 * MiB)
        for off in range(0, 2048 * MiB, 8 * MiB):
            f.seek(off)
            f.write(os.urandom(MiB))
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance.cli",
            "convert",
            str(src),
            str(out / "big.vmdk"),
            "--to",
            "vmdk",
            "--progress",
            "json",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=processes.interruptible,  # Ctrl-C reaches it even where the suite's SIGINT is ignored
    )
    try:
        line = proc.stderr.readline()  # first progress line: qemu-img is running
        assert line.startswith("{"), line
        children = _children(proc.pid)
        qemu = [p for p in children if "qemu-img" in _cmdline(p)]
        assert qemu
        # frozen where it is, qemu-img cannot finish by itself: only the interrupt can end the command
        for pid in qemu:
            os.kill(pid, signal.SIGSTOP)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)  # only keeps an interrupt that does not stop the command from hanging the test
        # the command reaps its qemu-img before it exits: none may outlive it (speed is in bench/)
        assert not [p for p in children if _alive(p)], "qemu-img outlived the cancelled command"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert list(out.iterdir()) == []


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_tasks_cancel_from_another_process_stops_a_running_workflow(
    tmp_path: Path, env: dict[str, str]
) -> None:
    wf = tmp_path / "slow.yaml"
    marker = tmp_path / "copied"
    (tmp_path / "a").write_text("data")
    wf.write_text(
        "name: slow\nsteps:\n"
        f"  - name: copy\n    action: file.copy\n    with: {{src: {tmp_path / 'a'}, dst: {marker}}}\n"
        "  - name: wait\n    action: util.sleep\n    with: {seconds: 60}\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance.cli",
            "run",
            str(wf),
            "--task-id",
            "t-cancelme",
            "--progress",
            "none",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: db(env).exists() and _step_running(db(env), "t-cancelme", "wait"),
            what="the workflow to reach its sleep step",
        )
        r = imaging("tasks", "cancel", "t-cancelme", env=env)
        assert r.returncode == 0, r.stderr
        proc.wait(timeout=60)  # only keeps a cancel that does not stop the run from hanging the test
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    with Store(db(env)) as store:
        task = store.get_task("t-cancelme")
        ledger = [(e.action, e.resource) for e in store.ledger("t-cancelme")]
    assert str(task.state) == "cancelled"
    assert not marker.exists()  # the copy was undone
    assert ("removed", str(marker)) in ledger


def _step_running(path: Path, task_id: str, name: str) -> bool:
    with Store(path) as store:
        return any(s.name == name and str(s.state) == "running" for s in store.step_results(task_id))


def test_config_init_writes_a_private_loadable_file_with_fresh_credentials(
    tmp_path: Path, env: dict[str, str]
) -> None:
    cfg = tmp_path / "var" / "imaging.yaml"
    r = imaging("config", "init", cfg, "--s3-endpoint", "http://127.0.0.1:5000", env=env)
    assert r.returncode == 0, r.stderr
    assert oct(cfg.stat().st_mode & 0o777) == "0o600"
    again = imaging("config", "init", cfg, env=env)
    assert again.returncode == 1 and "exists" in again.stderr  # never overwrites silently
    shown = imaging("-c", cfg, "config", "show", env=env)
    assert "REDACTED" in shown.stdout and "http://127.0.0.1:5000" in shown.stdout
    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in imaging("-c", cfg, "config", "show", "--env", env=env).stdout.splitlines()
    )
    assert exports["AWS_ACCESS_KEY_ID"].startswith("AKIA") and len(exports["AWS_ACCESS_KEY_ID"]) == 20
    assert exports["IMAGING_ENDPOINT"] == "http://127.0.0.1:8773"
    other = tmp_path / "other.yaml"
    imaging("config", "init", other, env=env)
    other_exports = imaging("-c", other, "config", "show", "--env", env=env).stdout
    assert (
        f"AWS_ACCESS_KEY_ID={exports['AWS_ACCESS_KEY_ID']}" not in other_exports
    )  # generated, not a constant
    assert imaging("-c", cfg, "config", "validate", env=env).returncode == 0
    # one key for the local appliance: the EC2 API in its own account, and all of the admin API
    [key] = yaml.safe_load(cfg.read_text())["api"]["credentials"]
    assert (key["account"], key["role"]) == ("local", "admin")
    shown = imaging("-c", cfg, "config", "show", "--credentials", env=env).stdout
    assert "account:    local (admin)" in shown


@pytest.mark.backends("postgresql")
def test_config_init_with_a_postgresql_store_and_tasks_commands_use_it(
    tmp_path: Path, env: dict[str, str], store_settings: dict[str, Any]
) -> None:
    password = "CliStorePassword0123456789"
    secret = tmp_path / "db-password"
    secret.write_text(password + "\n")
    login = stores.with_password(password)  # a role that needs the password
    cfg = tmp_path / "imaging.yaml"
    r = imaging("config", "init", cfg, "--store", login["url"], "--store-password-file", secret, env=env)
    assert r.returncode != 0 and "--shared-volumes" in r.stderr and not cfg.exists()
    volumes = tmp_path / "shared-volumes"
    r = imaging(
        "config", "init", cfg, "--store", login["url"], "--store-password-file", secret,
        "--shared-volumes", volumes, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    written = yaml.safe_load(cfg.read_text())
    assert written["store"] == {"url": login["url"], "password_file": str(secret)}
    assert written["targets"]["volume"] == {"type": "file", "directory": str(volumes), "shared": True}
    shown = imaging("-c", cfg, "config", "show", env=env)
    assert shown.returncode == 0 and password not in shown.stdout
    config = config_mod.load(cfg)
    with Store(config.store) as store:
        task = store.create_task("workflow", "x", task_id="t-in-postgres")
    listed = imaging("-c", cfg, "tasks", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert task.id in listed.stdout and not (tmp_path / "imaging.db").exists()
    assert imaging("-c", cfg, "tasks", "cancel", task.id, env=env).returncode == 0
    with Store(config.store) as store:
        assert str(store.get_task(task.id).state) == "cancelled"
    # a wrong password: a coded error on one line, without the password
    secret.write_text("not-the-password\n")
    refused = imaging("-c", cfg, "tasks", "list", env=env)
    assert refused.returncode == 1
    assert (
        refused.stderr.startswith("imaging: StateStoreError: task database")
        and password not in refused.stderr
    )


def test_run_removes_scratch_left_by_crashed_tasks_but_keeps_resumable_ones(
    tmp_path: Path, env: dict[str, str]
) -> None:
    from appliance.scratch import ScratchSpace

    space = ScratchSpace(Path(env["XDG_STATE_HOME"]) / "imaging" / "scratch", quota=1 << 30)
    with Store(db(env)) as store:
        store.create_task("workflow", "x", task_id="t-waiting")  # pending: may still run
    for name in ("t-gone", "t-waiting"):
        d = space.root / name
        d.mkdir()
        (d / ".scratch.json").write_text('{"pid": 4194000, "host": "elsewhere"}')
    wf = tmp_path / "noop.yaml"
    wf.write_text("name: noop\nsteps:\n  - name: hi\n    action: util.echo\n    with: {message: hi}\n")
    r = imaging("run", wf, "--progress", "none", env=env)
    assert r.returncode == 0, r.stderr
    assert not (space.root / "t-gone").exists()
    assert (space.root / "t-waiting").exists()


def test_commands_that_write_the_config_work_while_the_old_one_is_broken(
    tmp_path: Path, env: dict[str, str]
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("limits: {max_virtual_size: nope}\n")
    env = dict(env, IMAGING_CONFIG=str(broken))
    assert imaging("config", "init", tmp_path / "fresh.yaml", env=env).returncode == 0
    r = imaging(
        "configure",
        "--user-data",
        tmp_path / "missing-user-data",
        "--output",
        tmp_path / "out.yaml",
        "--error-file",
        tmp_path / "error.json",
        env=env,
    )
    assert r.returncode == 2  # invalid user data, reported as such — not the broken service config
    assert json.loads((tmp_path / "error.json").read_text())["status"] == "invalid-config"
    assert imaging("workflows", "list", env=env).returncode == 1  # everything else still refuses it


def test_workflows_show_json_lists_params_and_steps_with_the_configured_hooks(
    tmp_path: Path, env: dict[str, str]
) -> None:
    cfg = tmp_path / "hooks.yaml"
    cfg.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        "hooks:\n  points:\n    after_inspect:\n      - {hook: policy, with: {allow_formats: [raw]}}\n"
    )
    r = imaging("--config", cfg, "workflows", "show", "import-disk", "--json", env=env)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["params"]["disk"]["required"] is True
    steps = {s["name"]: s for s in shown["steps"]}
    assert steps["validate-guest"]["action"] == "guest.validate"
    hooks = steps["after-inspect"]["hook_steps"]
    assert [(h["action"], h["with"].get("allow_formats")) for h in hooks] == [("hook.policy", ["raw"])]
    assert steps["after-fetch"]["hook_steps"] == []


def test_config_show_redacts_every_secret_including_the_artifact_store_and_controller(
    tmp_path: Path, env: dict[str, str]
) -> None:
    cfg = tmp_path / "imaging.yaml"
    cfg.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        "artifacts: {bucket: ops-artifacts, access_key: AKIAOPS, secret_key: artifact-secret-123}\n"
        "controller: {mode: push, url: 'https://ctl.example', secret: controller-secret-456,"
        " appliance_id: i-0123456789abcdef0}\n"
    )
    shown = imaging("-c", cfg, "config", "show", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "artifact-secret-123" not in shown.stdout and "controller-secret-456" not in shown.stdout
    doc = yaml.safe_load(shown.stdout)
    assert doc["artifacts"]["secret_key"] == "REDACTED" and doc["artifacts"]["access_key"] == "AKIAOPS"
    assert doc["controller"]["secret"] == "REDACTED"


def test_the_run_step_is_a_hook_under_its_own_name(tmp_path: Path, env: dict[str, str]) -> None:
    cfg = tmp_path / "imaging.yaml"
    cfg.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        "hooks:\n  points:\n    after_inspect:\n"
        "      - {hook: run, with: {command: ['true'], where: local}}\n"
    )
    r = imaging("-c", cfg, "config", "validate", env=env)
    assert r.returncode == 0, r.stderr
    shown = json.loads(imaging("-c", cfg, "workflows", "show", "convert-image", "--json", env=env).stdout)
    hooks = next(s for s in shown["steps"] if s["name"] == "after-inspect")["hook_steps"]
    assert [h["action"] for h in hooks] == ["run"]
