"""Each disk's own status of a running ImportImage (:mod:`appliance.service.diskstatus`), read from the
step records and step progress a task store holds, for the layouts the end-to-end tests do not hold
still: an OVA whose data disks are known once it is opened (claimed as one, or given no format and found
to be one), and a disk that failed while the task cleans up. (The DiskContainers layout is driven end to
end by the real worker in tests/api/test_e2e_multidisk.py.) The records are written as the engine writes
them: an include at a top-level step or loop item, its steps below it, progress through
``update_progress(step=…)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance.database import StoreConfig
from appliance.service.diskstatus import from_ova, may_open_ova, overall_percent, running_disks
from appliance.service.imports import ImportService
from appliance.store import Store, Task
from tests import stores

TASK = "import-ami-0123456789abcdef1"


@pytest.fixture
def store(store_target: StoreConfig) -> Store:
    return Store(store_target)


def _task(store: Store, containers: list[dict[str, Any]]) -> Task:
    store.create_task("import-image", "import-image", {"disk_containers": containers}, task_id=TASK)
    store.claim(TASK, "worker-1", 30)
    return store.get_task(TASK)


def _include(store: Store, idx: str, state: str, disk: dict[str, Any], name: str, **kw: Any) -> None:
    store.record_step(
        TASK,
        idx,
        name="d",
        action="include:import-disk",
        state=state,
        args={"disk": disk, "name": name},
        **kw,
    )


def test_an_ovas_data_disks_show_once_it_is_opened_each_with_its_own_status(store: Store) -> None:
    ova = {"format": "OVA", "bucket": "b", "key": "vm.ova", "device_name": None}
    task = _task(store, [ova])
    _include(store, "1", "running", ova, "")
    store.record_step(TASK, "1/include/2", name="fetch", action="source.fetch", state="running")
    store.update_progress(TASK, phase="downloading", bytes_total=9000, percent=20, step="1/include/2")
    # before the OVA is opened, its one container is its only known disk
    [boot] = running_disks(task, store.step_results(TASK))
    assert (boot["state"], boot["phase"], boot["percent"], boot["size"]) == (
        "active",
        "downloading",
        20.0,
        9000,
    )

    store.record_step(TASK, "1/include/2", name="fetch", action="source.fetch", state="completed")
    members = [
        {"path": "/s/vm-disk2.vmdk", "format": "vmdk", "name": "vm-disk2.vmdk"},
        {"path": "/s/vm-disk3.vmdk", "format": "vmdk", "name": "vm-disk3.vmdk"},
    ]
    store.record_step(
        TASK,
        "1/include/4",
        name="open-ova",
        action="ova.open",
        state="completed",
        result={"data_disks": members},
    )
    store.record_step(TASK, "1/include/5", name="inspect", action="image.inspect", state="running")
    disks = running_disks(task, store.step_results(TASK))
    assert [(d["index"], d["state"], d["phase"]) for d in disks] == [
        (1, "active", "validating"),  # a step that reports no phase: its EC2 sub-state
        (2, "pending", "pending"),
        (3, "pending", "pending"),
    ]
    assert [d["device_name"] for d in disks] == ["/dev/sda1", "/dev/sdb", "/dev/sdc"]
    assert {d["container"] for d in disks} == {1}

    result = {
        "source_image": {"format": "vmdk", "virtual_size": 4096},
        "stored": {"type": "file", "path": "a"},
    }
    _include(store, "1", "completed", ova, "", result=result)
    store.record_step(
        TASK, "3", name="ova", action="include:import-ova-disk", state="running", args={"items": [2, 3]}
    )
    store.record_step(
        TASK, "3.loop1", name="ova", action="include:import-ova-disk", state="running",
        args={"disk": members[0], "name": "disk2"},
    )  # fmt: skip
    store.record_step(TASK, "3.loop1/include/6", name="convert", action="image.convert", state="running")
    store.update_progress(TASK, phase="converting", bytes_total=2048, percent=40, step="3.loop1/include/6")
    disks = running_disks(task, store.step_results(TASK))
    assert [(d["state"], d["percent"], d["phase"], d["size"], d["format"]) for d in disks] == [
        ("completed", 100.0, None, 4096, "vmdk"),
        ("active", 40.0, "converting", 2048, "vmdk"),
        ("pending", 0.0, "pending", None, "vmdk"),
    ]
    assert disks[0]["snapshot_id"] == "snap-" + TASK[-17:] and disks[1]["snapshot_id"] is None
    assert [d["ova_disk"] for d in disks[1:]] == ["vm-disk2.vmdk", "vm-disk3.vmdk"]
    assert overall_percent(disks) == pytest.approx(140 / 3)


@pytest.mark.parametrize("is_an_ova", [True, False], ids=["an-ova", "a-disk"])
def test_a_disk_given_no_format_shows_its_ova_disks_once_opened_as_one_and_stays_one_disk_otherwise(
    is_an_ova: bool, store: Store, tmp_path: Path
) -> None:
    unclaimed = {"format": "", "bucket": "b", "key": "vm", "device_name": None}
    task = _task(store, [unclaimed])
    service = ImportService(stores.config({}, base_dir=tmp_path), store)
    assert may_open_ova(task)
    _include(store, "1", "running", unclaimed, "")
    store.record_step(TASK, "1/include/2", name="fetch", action="source.fetch", state="completed")
    store.record_step(TASK, "1/include/4", name="open-ova", action="ova.open", state="running")
    # while it is opened, nothing says it is an OVA: the task's one disk shows as the task
    [boot] = running_disks(task, store.step_results(TASK))
    assert boot["ova_disk"] is None and not from_ova(task, [boot])
    assert service.disk_status(task) is None

    members = [{"path": "/s/vm-disk2.vmdk", "format": "vmdk", "name": "vm-disk2.vmdk"}]
    opened = {
        "ova": {"disks": [{"name": "vm-disk1.vmdk"}, {"name": "vm-disk2.vmdk"}]} if is_an_ova else None,
        "data_disks": members if is_an_ova else [],
    }
    store.record_step(
        TASK, "1/include/4", name="open-ova", action="ova.open", state="completed", result=opened
    )
    store.record_step(TASK, "1/include/5", name="inspect", action="image.inspect", state="running")
    disks = service.disk_status(task)
    if not is_an_ova:
        assert disks is None  # a disk given no format is one disk, shown as the task
        return
    assert disks is not None and from_ova(task, disks)
    assert [(d["index"], d["state"], d["ova_disk"], d["container"]) for d in disks] == [
        (1, "active", "vm-disk1.vmdk", 1),
        (2, "pending", "vm-disk2.vmdk", 1),
    ]
    assert [d["device_name"] for d in disks] == ["/dev/sda1", "/dev/sdb"]


def test_several_disk_containers_given_no_format_are_never_opened_as_an_ova(store: Store) -> None:
    containers = [{"format": "", "url": f"https://h/{n}", "device_name": None} for n in range(2)]
    assert not may_open_ova(_task(store, containers))


def test_an_ova_opened_beside_other_disk_containers_leaves_the_disks_those_of_the_request(
    store: Store,
) -> None:
    # only an after_fetch hook's claim can open the boot disk as an OVA here; import-image then imports the
    # DiskContainers, not the OVA's data disks (they would take the same names)
    containers = [{"format": "RAW", "url": f"https://h/{n}.raw", "device_name": None} for n in range(2)]
    task = _task(store, containers)
    _include(store, "1", "running", containers[0], "")
    opened = {
        "ova": {"disks": [{"name": "vm-disk1.vmdk"}, {"name": "vm-disk2.vmdk"}, {"name": "vm-disk3.vmdk"}]},
        "data_disks": [
            {"path": f"/s/vm-disk{n}.vmdk", "format": "vmdk", "name": f"vm-disk{n}.vmdk"} for n in (2, 3)
        ],
    }
    store.record_step(
        TASK, "1/include/4", name="open-ova", action="ova.open", state="completed", result=opened
    )
    store.record_step(TASK, "1/include/5", name="inspect", action="image.inspect", state="running")
    disks = running_disks(task, store.step_results(TASK))
    assert [(d["index"], d["container"], d["state"], d["ova_disk"]) for d in disks] == [
        (1, 1, "active", None),
        (2, 2, "pending", None),
    ]
    assert not from_ova(task, disks)


def test_a_failed_disk_is_deleting_and_the_disks_after_it_stay_pending(store: Store) -> None:
    containers = [{"format": "RAW", "url": f"https://h/{n}.raw", "device_name": None} for n in range(3)]
    task = _task(store, containers)
    _include(store, "1", "completed", containers[0], "", result={"streamed": {"stored": {"size": 1024}}})
    store.record_step(
        TASK, "2", name="d", action="include:import-disk", state="running", args={"items": [2, 3]}
    )
    _include(
        store, "2.loop1", "failed", containers[1], "disk2", error={"code": "CorruptImage", "message": "x"}
    )
    disks = running_disks(task, store.step_results(TASK))
    assert [(d["state"], d["size"]) for d in disks] == [
        ("completed", 1024),
        ("deleting", None),
        ("pending", None),
    ]
    assert [d["container"] for d in disks] == [1, 2, 3]
