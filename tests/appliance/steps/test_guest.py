"""The ``guest.validate`` step run through the engine, and its dry-run plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance.guest import validate_image
from appliance.store import TaskState
from appliance.workflow import Engine
from tests import guestfactory as gf
from tests import imagefactory as imf

from ..workflow.support import make_config, make_registry, write_workflow

EARLIER = {"code": "UnsafeImage.Test", "severity": "warning", "message": "stored by an earlier step"}


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    e = Engine(make_config(tmp_path), registry=make_registry(), poll_interval=0.05)
    yield e
    e.store.close()


def _workflow(tmp: Path, args: dict[str, Any]) -> None:
    write_workflow(tmp, "v", {"steps": [{"name": "validate", "action": "guest.validate", "with": args,
                                         "register": "guest"}]})  # fmt: skip


def _run_with_earlier_finding(engine: Engine) -> Any:
    task_id = engine.submit("v")
    engine.store.add_findings(task_id, [EARLIER])
    return engine.run(task_id)


def test_error_findings_fail_the_task_with_the_first_code_and_are_kept(
    engine: Engine, tmp_path: Path
) -> None:
    img = gf.linux_disk(tmp_path, fstab=gf.fstab_by_uuid(root_uuid="deadbeef-0000-4000-8000-000000000000"))
    _workflow(tmp_path, {"source": str(img), "platform": "Windows"})
    task = _run_with_earlier_finding(engine)
    assert task.state is TaskState.FAILED
    assert task.error_code == "Guest.FstabDeviceMissing"  # the image's own errors come first
    stored = [f["code"] for f in task.findings]
    # merged with what was there, each finding once
    assert stored[0] == "UnsafeImage.Test"
    assert sorted(stored[1:]) == ["Guest.FstabDeviceMissing", "Guest.PlatformMismatch"]
    events = [e for e in engine.store.events(task_id=task.id) if e.kind == "guest.validated"]
    assert events and events[0].data["report"]["os"]["distribution"] == "debian"


def test_data_disk_passes_and_registers_the_report(engine: Engine, tmp_path: Path) -> None:
    img = gf.data_disk(tmp_path)
    _workflow(tmp_path, {"source": str(img), "bootable": False})
    task = _run_with_earlier_finding(engine)
    assert task.state is TaskState.COMPLETED
    report = task.result["guest"]
    assert report["layout"] == "disk" and report["ok"] is True
    assert {f["code"]: f["severity"] for f in report["findings"]} == {
        "Guest.NoBootablePartition": "info",
        "Guest.OsUnknown": "info",
    }
    assert [f["code"] for f in task.findings] == [
        "UnsafeImage.Test",
        "Guest.NoBootablePartition",
        "Guest.OsUnknown",
    ]


def test_fail_on_error_false_completes_with_the_errors_recorded(engine: Engine, tmp_path: Path) -> None:
    _workflow(tmp_path, {"source": str(gf.data_disk(tmp_path)), "fail_on_error": False})
    task = engine.run(engine.submit("v"))
    assert task.state is TaskState.COMPLETED and task.result["guest"]["ok"] is False
    assert {f["severity"] for f in task.findings} == {"error"}


def test_plan_validates_a_local_file_and_promises_to_validate_otherwise(
    engine: Engine, tmp_path: Path
) -> None:
    img = gf.uefi_disk(tmp_path, fallback=False)
    _workflow(tmp_path, {"source": str(img)})
    before = sorted(p.name for p in tmp_path.iterdir())
    (step,) = engine.plan("v")["steps"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no task database, no scratch
    assert step["plan"]["would_fail"] is True
    assert step["plan"]["report"]["partition_table"] == "gpt"
    assert [f["code"] for f in step["plan"]["findings"]] == ["Guest.UefiNoFallbackLoader"]

    _workflow(tmp_path, {"source": str(tmp_path / "fetched-later.img")})
    (step,) = engine.plan("v")["steps"]
    assert step["plan"]["will_validate"] is True and "report" not in step["plan"]


# --- the format the guest is read in: found out from the content, a claim checked against it -------------

#: containers of a bare filesystem: name → (qemu-img output format, options, what inspection calls it)
CONTAINERS = {
    "raw": (None, None, "raw"),
    "qcow2": ("qcow2", None, "qcow2"),
    "vmdk-sparse": ("vmdk", "subformat=monolithicSparse", "vmdk"),
    "vmdk-stream": ("vmdk", "subformat=streamOptimized", "vmdk"),
    "vhd-dynamic": ("vpc", "subformat=dynamic,force_size=on", "vhd"),
    "vhd-fixed": ("vpc", "subformat=fixed,force_size=on", "vhd"),
    "vhdx": ("vhdx", None, "vhdx"),
    "vdi": ("vdi", None, "vdi"),
}
#: what a user claims for each: inspection's name, except that nobody can claim vdi (it is only detected)
CLAIMS = {name: fmt for name, (_, _, fmt) in CONTAINERS.items() if fmt != "vdi"}


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """(filesystem, container) → a bare ext4 or NTFS filesystem holding a Linux root, in every container."""
    d = tmp_path_factory.mktemp("bare")
    tree = gf.portable_root(d / "root")
    images: dict[tuple[str, str], Path] = {}
    for kind in ("ext4", "ntfs"):
        raw = images[kind, "raw"] = gf.filesystem(kind, d / f"{kind}.raw", tree)
        for name, (qemu_format, options, _) in CONTAINERS.items():
            if qemu_format is not None:
                images[kind, name] = gf.convert(raw, d / f"{kind}.{name}", qemu_format, options)
    return images


@pytest.mark.parametrize("container", list(CONTAINERS))
def test_without_a_format_the_content_decides(
    engine: Engine, tmp_path: Path, bare: dict[tuple[str, str], Path], container: str
) -> None:
    # the step used to default to raw: a bare filesystem in a container then had Guest.NoFilesystem
    expected = validate_image(bare["ntfs", "raw"], "raw").to_dict()
    assert expected["layout"] == "partition" and expected["partitions"][0]["filesystem"] == "ntfs"
    _workflow(tmp_path, {"source": str(bare["ntfs", container])})
    task = engine.run(engine.submit("v"))
    assert task.state is TaskState.COMPLETED, (task.error_code, task.error_message)
    assert task.result["guest"] == expected


def test_a_claim_is_checked_against_the_content_before_the_guest_is_read(
    engine: Engine, tmp_path: Path, bare: dict[tuple[str, str], Path]
) -> None:
    _workflow(tmp_path, {"source": str(bare["ntfs", "qcow2"]), "claimed": "raw"})
    task = engine.run(engine.submit("v"))
    assert (task.state, task.error_code) == (TaskState.FAILED, "FormatMismatch")
    assert "claimed raw, detected qcow2" in task.error_message
    assert not [e for e in engine.store.events(task_id=task.id) if e.kind == "guest.validated"]
    assert [f["code"] for f in task.findings] == ["FormatMismatch"]  # kept on the task, as inspection does

    (step,) = engine.plan("v")["steps"]  # the dry run says so too
    assert step["plan"]["would_fail"] is True and "report" not in step["plan"]
    assert [f["code"] for f in step["plan"]["findings"]] == ["FormatMismatch"]

    _workflow(tmp_path, {"source": str(bare["ntfs", "vhd-fixed"]), "claimed": "VPC"})
    task = engine.run(engine.submit("v"))
    assert task.state is TaskState.COMPLETED and task.result["guest"]["partitions"][0]["filesystem"] == "ntfs"


def test_an_unsafe_image_is_rejected_with_its_code_not_read_as_raw(engine: Engine, tmp_path: Path) -> None:
    # several formats at once: the step used to fall back to raw and read it, whatever fail_on_error said
    _workflow(tmp_path, {"source": str(imf.iso_qcow2_polyglot(tmp_path)), "fail_on_error": False})
    task = engine.run(engine.submit("v"))
    assert (task.state, task.error_code) == (TaskState.FAILED, "UnsafeImage.Polyglot")
    _workflow(tmp_path, {"source": str(imf.qcow2_backing(tmp_path)), "bootable": False})
    task = engine.run(engine.submit("v"))
    assert (task.state, task.error_code) == (TaskState.FAILED, "UnsafeImage.BackingFile")


def test_a_verified_format_is_read_as_given(
    engine: Engine, tmp_path: Path, bare: dict[tuple[str, str], Path]
) -> None:
    # what image.inspect found (import-disk), in any of its names; no second inspection is needed
    for name in ("vpc", "vhd", "VHD"):
        _workflow(tmp_path, {"source": str(bare["ext4", "vhd-dynamic"]), "format": name})
        task = engine.run(engine.submit("v"))
        assert task.state is TaskState.COMPLETED and task.result["guest"]["layout"] == "partition", name
    _workflow(tmp_path, {"source": str(bare["ext4", "raw"]), "format": "raw", "claimed": "raw"})
    (step,) = engine.plan("v")["steps"]
    assert "not both" in step["error"]
    task = engine.run(engine.submit("v"))
    assert (task.state, task.error_code) == (TaskState.FAILED, "InvalidParameterValue")


def test_compressed_input_is_refused_with_what_to_do(
    engine: Engine, tmp_path: Path, bare: dict[tuple[str, str], Path]
) -> None:
    packed = imf.compress(bare["ext4", "raw"], "gzip", name="fs.raw.gz")
    _workflow(tmp_path, {"source": str(packed)})
    task = engine.run(engine.submit("v"))
    assert (task.state, task.error_code) == (TaskState.FAILED, "InvalidParameterValue")
    assert "gzip-compressed" in task.error_message and "decompress" in task.error_message


@pytest.mark.parametrize("claimed", [False, True])
# not vdi: image.convert refuses the name inspection gives it (a claim cannot be vdi), validated or not
@pytest.mark.parametrize("container", [c for c in CONTAINERS if c != "vdi"])
@pytest.mark.parametrize("kind", ["ext4", "ntfs"])
def test_convert_image_validates_a_bare_filesystem_in_any_container_as_raw(
    engine: Engine,
    tmp_path: Path,
    bare: dict[tuple[str, str], Path],
    kind: str,
    container: str,
    claimed: bool,
) -> None:
    if claimed and container not in CLAIMS:
        pytest.skip(f"{container} cannot be claimed")
    params = {
        "source": str(bare[kind, container]),
        "target": str(tmp_path / "out.raw"),
        "validate_guest": "system",
        "claimed_format": CLAIMS[container] if claimed else "",
    }
    task = engine.run(engine.submit("convert-image", params))
    assert task.state is TaskState.COMPLETED, (task.error_code, task.error_message)
    assert task.result["guest"] == validate_image(bare[kind, "raw"], "raw").to_dict()
    assert (tmp_path / "out.raw").read_bytes() == bare[kind, "raw"].read_bytes()


@pytest.mark.parametrize(
    ("container", "claim"), [("qcow2", "raw"), ("vhdx", "vhd"), ("vmdk-stream", "qcow2")]
)
def test_convert_image_with_a_wrong_claim_fails_as_a_mismatch_before_the_guest_is_judged(
    engine: Engine, tmp_path: Path, bare: dict[tuple[str, str], Path], container: str, claim: str
) -> None:
    # the guest used to be read in the claimed format: Guest.NoFilesystem (or Unreadable), not the real cause
    params = {
        "source": str(bare["ntfs", container]),
        "target": str(tmp_path / "out.raw"),
        "validate_guest": "system",
        "claimed_format": claim,
    }
    task = engine.run(engine.submit("convert-image", params))
    assert (task.state, task.error_code) == (TaskState.FAILED, "FormatMismatch"), task.error_message
    assert f"claimed {claim}, detected" in task.error_message and not (tmp_path / "out.raw").exists()
