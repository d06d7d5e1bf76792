"""qemu-img under limits, in an empty private directory (appliance.image.qemuimg), with the real qemu-img."""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance import confine
from appliance.config import Limits
from appliance.errors import Cancelled, ImageRejected, Severity
from appliance.image import qemuimg
from tests import confinement
from tests import imagefactory as factory


@pytest.fixture
def limits(tmp_path: Path) -> Limits:
    return config_mod.from_dict({"state_dir": str(tmp_path / "state")}).limits


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    return d


@pytest.fixture
def work(tmp_path: Path) -> Path:
    w = tmp_path / "work"
    w.mkdir()
    return w


def shim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> Path:
    """Put a ``qemu-img`` shell script first on PATH (a real process standing in for qemu-img)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / "qemu-img"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return script


def with_limits(limits: Limits, **changes: int) -> Limits:
    values = {**limits.__dict__, **changes}
    return Limits(**values)


def test_isolated_directory_is_private_empty_and_removed(images: Path, work: Path) -> None:
    image = factory.qcow2(images)
    (images / "sibling.vmdk").write_text("must not be visible")
    with qemuimg.isolated(image, work) as link:
        directory = link.parent
        assert directory.parent == work
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert [p.name for p in directory.iterdir()] == [qemuimg.LINK_NAME]
        assert link.stat().st_ino == image.stat().st_ino  # same filesystem: a hard link
        assert not link.is_symlink()
    assert not directory.exists()
    assert list(work.iterdir()) == []
    assert image.exists()


def test_isolated_directory_is_removed_after_an_error(images: Path, work: Path) -> None:
    image = factory.qcow2(images)
    with pytest.raises(RuntimeError), qemuimg.isolated(image, work):
        raise RuntimeError("boom")
    assert list(work.iterdir()) == []


def test_isolated_falls_back_to_a_symlink_across_filesystems(images: Path, limits: Limits) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == images.stat().st_dev:
        pytest.skip("needs /dev/shm on a different filesystem")
    image = factory.qcow2(images)
    desc = factory.vmdk_descriptor(images, "other.vmdk", create_type="twoGbMaxExtentSparse")
    factory.qemu_img("create", "-q", "-f", "vmdk", images / "other.vmdk", "1M")
    parent = Path(tempfile.mkdtemp(dir=shm))
    try:
        with qemuimg.isolated(image, parent) as link:
            assert link.is_symlink() and link.resolve() == image.resolve()
        assert qemuimg.info(image, "qcow2", limits, workdir=parent)["format"] == "qcow2"
        # qemu resolves relative names next to the link, not next to its target: still nothing to follow
        with pytest.raises(ImageRejected) as exc:
            qemuimg.info(desc, "vmdk", limits, workdir=parent)
        assert exc.value.code == "CorruptImage" and "other.vmdk" in exc.value.message
        assert list(parent.iterdir()) == []
    finally:
        parent.rmdir()


def test_info_cannot_reach_a_sibling_extent(images: Path, limits: Limits, work: Path) -> None:
    # twoGbMaxExtentSparse is a text descriptor qemu-img happily follows to "other.vmdk" next to it ...
    desc = factory.vmdk_descriptor(images, "other.vmdk", create_type="twoGbMaxExtentSparse")
    factory.qemu_img("create", "-q", "-f", "vmdk", images / "other.vmdk", "1M")
    direct = subprocess.run(
        [factory.QEMU_IMG, "info", "-f", "vmdk", "--output=json", desc.name], cwd=images, capture_output=True
    )
    assert direct.returncode == 0, "control: outside isolation the sibling is read"
    # ... but inside the private directory there is nothing to follow.
    with pytest.raises(ImageRejected) as exc:
        qemuimg.info(desc, "vmdk", limits, workdir=work)
    assert exc.value.code == "CorruptImage"
    assert "other.vmdk" in exc.value.message
    assert list(work.iterdir()) == []


def test_info_returns_qemu_json(images: Path, limits: Limits, work: Path) -> None:
    data = qemuimg.info(factory.qcow2(images, virtual_size="5M"), "qcow2", limits, workdir=work)
    assert data["format"] == "qcow2"
    assert data["virtual-size"] == 5 * factory.MiB
    assert data["filename"] == qemuimg.LINK_NAME


def test_info_with_the_wrong_format_is_corrupt_with_qemus_message(
    images: Path, limits: Limits, work: Path
) -> None:
    with pytest.raises(ImageRejected) as exc:
        qemuimg.info(factory.raw_mbr(images), "qcow2", limits, workdir=work)
    assert exc.value.code == "CorruptImage"
    assert "qcow2" in exc.value.message and "Image is not in qcow2 format" in exc.value.message


def test_address_space_limit_stops_qemu_img(images: Path, limits: Limits, work: Path) -> None:
    # 1 MB is far too little for qemu-img to even start (measured: it dies with SIGSEGV).
    tiny = with_limits(limits, qemu_img_address_space=1_000_000)
    with pytest.raises(ImageRejected) as exc:
        qemuimg.info(factory.qcow2(images), "qcow2", tiny, workdir=work)
    assert exc.value.code == "UnsafeImage.ResourceLimit"
    assert list(work.iterdir()) == []


def test_cpu_limit_stops_a_spinning_qemu_img(
    tmp_path: Path, images: Path, limits: Limits, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = factory.qcow2(images)
    shim(tmp_path, monkeypatch, "while :; do :; done")
    with pytest.raises(ImageRejected) as exc:
        qemuimg.info(image, "qcow2", with_limits(limits, qemu_img_info_cpu_seconds=1), workdir=work)
    assert exc.value.code == "UnsafeImage.ResourceLimit"
    assert "SIGXCPU" in exc.value.message or "SIGKILL" in exc.value.message
    assert list(work.iterdir()) == []


def test_cancel_kills_qemu_img(
    tmp_path: Path, images: Path, limits: Limits, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = factory.qcow2(images)
    pidfile = tmp_path / "pid"
    shim(tmp_path, monkeypatch, f'echo $$ > "{pidfile}"\nexec sleep 30')
    cancel = threading.Event()
    timer = threading.Timer(0.5, cancel.set)
    timer.start()
    try:
        with pytest.raises(Cancelled):
            qemuimg.info(image, "qcow2", limits, workdir=work, cancel=cancel)
    finally:
        timer.cancel()
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped
    assert list(work.iterdir()) == []


def test_check_reports_leaks_as_a_warning(images: Path, limits: Limits, work: Path) -> None:
    findings = qemuimg.check(factory.qcow2_leaked_cluster(images), "qcow2", limits, workdir=work)
    assert [(f.code, f.severity) for f in findings] == [("Integrity.LeakedClusters", Severity.WARNING)]
    assert findings[0].message.startswith("1 leaked cluster")


@pytest.mark.parametrize("builder", [factory.qcow2_truncated, factory.qcow2_corrupt_l1])
def test_check_rejects_corruption_with_qemus_message(
    builder, images: Path, limits: Limits, work: Path
) -> None:
    with pytest.raises(ImageRejected) as exc:
        qemuimg.check(builder(images), "qcow2", limits, workdir=work)
    assert exc.value.code == "CorruptImage"
    assert "corruption" in exc.value.message and "ERROR" in exc.value.message
    assert list(work.iterdir()) == []


def test_check_printing_more_than_its_output_cap_is_killed_and_the_image_rejected(
    images: Path, limits: Limits, work: Path
) -> None:
    """``qemu-img check`` prints a line per damaged cluster: a crafted image's output grows with its size
    (here 1.8 MiB for 8 MiB of clusters; 20 % of any size). Past ``limits.qemu_img_output`` it is killed
    and the image rejected as exhausting a limit, its output never held beyond the cap; below the cap the
    same image is corrupt, as before."""
    image = factory.qcow2_unreferenced_clusters(images)
    with pytest.raises(ImageRejected) as exc:
        qemuimg.check(image, "qcow2", with_limits(limits, qemu_img_output=256 << 10), workdir=work)
    assert exc.value.code == "UnsafeImage.ResourceLimit"
    assert "qemu-img check printed more than its output cap" in exc.value.message
    assert list(work.iterdir()) == []
    with pytest.raises(ImageRejected) as exc:
        qemuimg.check(image, "qcow2", limits, workdir=work)
    assert exc.value.code == "CorruptImage" and "corruption" in exc.value.message


def test_info_printing_more_than_its_output_cap_is_killed_and_the_image_rejected(
    tmp_path: Path, images: Path, limits: Limits, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A qemu-img that floods (a stand-in: no real image makes ``info`` print megabytes) is killed at the
    cap, not read to its end."""
    shim(tmp_path, monkeypatch, "yes '{}' | head -c 100000000; sleep 60")
    with pytest.raises(ImageRejected) as exc:
        qemuimg.info(factory.qcow2_with_data(images), "qcow2", with_limits(limits, qemu_img_output=1 << 20))
    assert exc.value.code == "UnsafeImage.ResourceLimit"
    assert "qemu-img info printed more than its output cap" in exc.value.message
    assert "1 MiB of output" in exc.value.message


@pytest.mark.parametrize("builder", [factory.qcow2_with_data, factory.vmdk_stream, factory.vhdx, factory.vdi])
def test_check_passes_clean_images(builder, images: Path, limits: Limits, work: Path) -> None:
    image = builder(images)
    fmt = {"data.qcow2": "qcow2", "stream.vmdk": "vmdk", "disk.vhdx": "vhdx", "disk.vdi": "vdi"}[image.name]
    assert qemuimg.check(image, fmt, limits, workdir=work) == []


@pytest.mark.parametrize("fmt", ["raw", "vpc"])
def test_check_does_not_run_for_formats_without_a_checker(
    fmt: str, tmp_path: Path, images: Path, limits: Limits, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = factory.raw_mbr(images)
    calls = tmp_path / "calls.log"
    shim(tmp_path, monkeypatch, f'echo "$@" >> "{calls}"\nexit 1')
    assert qemuimg.check(image, fmt, limits) == []
    assert not calls.exists()


@pytest.mark.parametrize("action", ["info", "check"])
def test_qemu_img_runs_under_the_confinement_policy(
    action: str, images: Path, limits: Limits, work: Path, tmp_path: Path
) -> None:
    image = factory.qcow2(images)
    sentinel = tmp_path / "inherited-secret"
    sentinel.write_text("not for qemu-img")
    inherited = os.open(sentinel, os.O_RDONLY)
    os.set_inheritable(inherited, True)
    results: list[object] = []
    call = qemuimg.info if action == "info" else qemuimg.check
    try:
        with confinement.lease(image) as held:
            # qemu-img blocks in open() of the image until the lease is released: a deterministic hold
            runner = threading.Thread(
                target=lambda: results.append(call(image, "qcow2", limits, workdir=work))
            )
            runner.start()
            held.wait_broken()
            pid = confinement.find_descendant(confinement.is_tool("qemu-img", action))
            seen = confinement.observe(pid)
            held.release()
            runner.join(60)
    finally:
        os.close(inherited)
    assert results, "qemu-img did not finish"
    policy = confine.qemu_img_info(limits) if action == "info" else confine.qemu_img_check(limits)
    confinement.assert_confined(
        seen, policy, cwd_entries=[qemuimg.LINK_NAME], forbidden_fd_targets={str(sentinel)}
    )
    assert seen.cwd.parent == work and seen.argv[-1] == qemuimg.LINK_NAME
