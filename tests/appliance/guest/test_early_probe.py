"""A guest probe started before its disk is written (appliance.guest.early): the same report as a probe
started on the written disk, the same confinement, and no process left behind on any path.

Real parts: guest disks built by tests/guestfactory.py (ext4, GPT with an ESP, a data disk, squashfs, a
LUKS header, random bytes), the confined probe child.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance import confine
from appliance.errors import Cancelled
from appliance.guest import early, validate_image
from appliance.guest.early import PendingProbe
from appliance.guest.report import GuestReport
from tests import confinement
from tests import guestfactory as gf

IS_PROBE = confinement.is_python_module("appliance.guest.probe")


def _noise(tmp: Path) -> Path:
    noise = tmp / "noise"
    noise.write_bytes(os.urandom(4 * gf.MiB))
    return gf.disk(tmp / "noise.img", "mbr", [gf.Part(4, "83", noise, bootable=True)])


def _squashfs(tmp: Path) -> Path:
    (tmp / "tree").mkdir()
    (tmp / "tree/hello").write_text("hi")
    sq = tmp / "fs.squashfs"
    gf.run("mksquashfs", tmp / "tree", sq, "-quiet", "-noappend")
    return gf.disk(tmp / "sq.img", "mbr", [gf.Part(8, "83", sq, bootable=True)])


def _luks_next_to_root(tmp: Path) -> Path:
    luks = tmp / "luks"
    luks.write_bytes(b"LUKS\xba\xbe\0\x02" + b"\0" * 4096)
    tree = gf.linux_tree(tmp / "w/root", fstab=gf.fstab_by_uuid())
    root = gf.ext4(tmp / "w/root.ext4", 24, tree)
    return gf.disk(tmp / "two.img", "mbr", [gf.Part(24, "83", root, bootable=True), gf.Part(2, "83", luks)])


def _zeros(tmp: Path) -> Path:
    path = tmp / "zeros.img"
    with path.open("wb") as f:
        f.truncate(8 * gf.MiB)
    return path


GUESTS: dict[str, Callable[[Path], Path]] = {
    "linux-mbr-ext4": gf.linux_disk,
    "uefi-gpt-esp": gf.uefi_disk,
    "data-disk": gf.data_disk,
    "bare-ext4": gf.partition_image,
    "random-partition": _noise,
    "squashfs-partition": _squashfs,
    "luks-next-to-root": _luks_next_to_root,
    "all-zeros": _zeros,
}


@pytest.mark.parametrize("bootable", [True, False])
@pytest.mark.parametrize("guest", sorted(GUESTS))
def test_a_probe_started_before_the_disk_is_written_reports_what_a_probe_started_after_does(
    tmp_path: Path, guest: str, bootable: bool
) -> None:
    built = GUESTS[guest](tmp_path)
    expected = validate_image(built, bootable=bootable)
    written = tmp_path / "written.img"
    with PendingProbe("raw", workdir=tmp_path) as probe:
        # the disk appears only after the probe started, as a streamed import writes it
        confinement.wait_reading(probe.proc.pid)
        shutil.copyfile(built, written)
        report = probe.validate(written, bootable=bootable)
    assert report.to_dict() == expected.to_dict()


def test_a_probe_never_given_its_disk_is_killed_reaped_and_its_directory_removed(tmp_path: Path) -> None:
    with PendingProbe("raw", workdir=tmp_path) as probe:
        pid, directory = probe.proc.pid, probe.directory
        confinement.wait_reading(pid)  # started, imported, waiting: what a failed stream leaves
        assert directory.is_dir()
    assert probe.proc.returncode is not None and probe.proc.returncode < 0
    assert not Path(f"/proc/{pid}").exists(), "the probe child is still there (running or a zombie)"
    assert not directory.exists()


def test_a_probe_printing_past_its_output_cap_is_killed_reaped_and_the_guest_is_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(early, "CHILD", confinement.FLOODING_PROBE)
    disk = _zeros(tmp_path)
    with PendingProbe("raw", workdir=tmp_path) as probe:
        pid = probe.proc.pid
        report = probe.validate(disk)
    assert {f.code for f in report.findings} == {"Guest.Unreadable"}
    assert "the reader printed more than its output cap" in report.findings[0].message
    assert not Path(f"/proc/{pid}").exists(), "the probe child is still there (running or a zombie)"


def test_a_cancel_while_the_probe_reads_kills_and_reaps_it(tmp_path: Path) -> None:
    disk = gf.linux_disk(tmp_path)
    cancel = threading.Event()
    outcome: list[BaseException | GuestReport] = []
    with PendingProbe("raw", workdir=tmp_path) as probe:
        pid = probe.proc.pid

        def ask() -> None:
            try:
                outcome.append(probe.validate(disk, cancel=cancel))
            except BaseException as exc:
                outcome.append(exc)

        with confinement.lease(disk) as held:
            # the probe blocks in open() of the disk until the lease goes: cancelled while it reads
            asker = threading.Thread(target=ask)
            asker.start()
            held.wait_broken()
            cancel.set()
            asker.join(60)
        assert len(outcome) == 1 and isinstance(outcome[0], Cancelled), outcome
    assert not Path(f"/proc/{pid}").exists(), "the probe child is still there (running or a zombie)"


def test_the_pending_probe_runs_under_the_guest_probe_confinement_policy(tmp_path: Path) -> None:
    cfg = config_mod.from_dict({"state_dir": str(tmp_path / "state")}, base_dir=tmp_path)
    disk = gf.linux_disk(tmp_path)
    sentinel = tmp_path / "inherited-secret"
    sentinel.write_text("not for the reader")
    inherited = os.open(sentinel, os.O_RDONLY)
    os.set_inheritable(inherited, True)
    reports: list[GuestReport] = []
    try:
        with PendingProbe("raw", config=cfg, workdir=tmp_path) as probe, confinement.lease(disk) as held:
            runner = threading.Thread(target=lambda: reports.append(probe.validate(disk)))
            runner.start()
            held.wait_broken()
            seen = confinement.observe(confinement.find_descendant(IS_PROBE))
            held.release()
            runner.join(120)
    finally:
        os.close(inherited)
    assert reports and reports[0].os.get("family") == "linux", "the probe did not finish with a report"
    confinement.assert_confined(
        seen, confine.guest_probe(cfg.limits), cwd_entries=["image"], forbidden_fd_targets={str(sentinel)}
    )
    assert seen.argv[-1] == "--wait"
