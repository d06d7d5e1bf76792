"""An ImportImage's only DiskContainer given no format is opened as an OVA by what the ``after_fetch`` hooks
hand on, as a claimed OVA is: a gzip-compressed OVA that the operator's ``decompress`` hook unwraps is
opened and imported (without the hook it is ``Ova.Compressed``), while a hook that names a format of its
own makes that the claim, under which the OVA is inspected and refused as the archive it is. A hook that
claims ``ova`` where an OVA's data disks are not imported (ImportSnapshot, an image of several
DiskContainers) fails the task with ``Ova.DisksLeftOut`` for an OVA of two disks, rather than importing
its boot disk alone, and leaves nothing. Real parts:
the moto server for the OVA's bucket, the engine, the shipped hooks, an ova-compose layout of a
streamOptimized VMDK made by qemu-img."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import pytest

from appliance.service.imports import ImportService
from appliance.service.importtasks import DiskContainer
from appliance.store import TaskState
from tests import ovaproducers as producers
from tests import stores
from tests.appliance.service.test_imports import bucket, cfg_data
from tests.appliance.service.test_ova_scratch import _ova
from tests.servers import MotoServer
from tests.taskrun import run

__all__ = ["bucket"]  # a fixture, used by name

#: an operator's hook that hands the file on unchanged under a format of its own (from the object's name, say)
CLAIM_PLUGIN = """
from appliance.workflow.step import Step


class Claim(Step):
    schema = {"type": "object", "required": ["image", "format"]}

    def run(self, ctx, image, format):
        return {"image": {**image, "format": format}}


STEPS = {"site.claim": Claim}
"""
CLAIMS_RAW = {"hook": "site.claim", "with": {"format": "raw"}}


@pytest.mark.parametrize(
    ("after_fetch", "state", "code"),
    [
        ([{"hook": "decompress"}], TaskState.COMPLETED, None),
        ([{"hook": "decompress"}, CLAIMS_RAW], TaskState.FAILED, "FormatMismatch.Archive"),
    ],
    ids=["unwrapped-by-a-hook", "claimed-raw-by-a-hook"],
)
def test_a_gzip_ova_given_no_format_is_opened_as_the_after_fetch_hooks_hand_it_on(
    after_fetch: list[dict[str, Any]],
    state: TaskState,
    code: str | None,
    tmp_path: Path,
    moto: MotoServer,
    bucket: str,
) -> None:
    ova = _ova(tmp_path)
    moto.client("s3").put_object(
        Bucket=bucket, Key="vm.ova.gz", Body=gzip.compress(ova.read_bytes(), mtime=0)
    )
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "claim.py").write_text(CLAIM_PLUGIN)
    hooks = {"points": {"after_fetch": after_fetch}, "plugins_dir": str(plugins)}
    data = cfg_data(tmp_path, moto) | {"hooks": hooks}
    cfg = stores.config(data, base_dir=tmp_path)
    service = ImportService(cfg)
    try:
        task = service.import_image([DiskContainer(bucket=bucket, key="vm.ova.gz")])
        done = run(cfg, task)
        assert (done.state, done.error_code) == (state, code), done.error_message
        opened = next(s for s in service.store.step_results(task.id) if s.action == "ova.open").result or {}
        if code is None:
            assert [d["name"] for d in opened["ova"]["disks"]] == ["vm-disk1.vmdk"]
        else:
            assert "import it as an OVA" in (done.error_message or "")
            assert not (cfg.scratch.root / task.id).exists()
    finally:
        service.store.close()


@pytest.mark.parametrize("where", ["import-snapshot", "beside-a-second-disk-container"])
def test_an_ova_of_two_disks_claimed_by_a_hook_where_its_data_disk_would_be_dropped_fails_and_leaves_nothing(
    where: str, tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    disks = tmp_path / "disks"
    disks.mkdir()
    vmdks = [producers.stream_vmdk(disks / f"vm-disk{i}.vmdk", 4 << 20, data=b"disk%d" % i) for i in (1, 2)]
    ova = producers.ova_compose(tmp_path / "vm.ova", vmdks, firmware="bios")
    s3 = moto.client("s3")
    s3.upload_file(str(ova), bucket, "vm.ova")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "claim.py").write_text(CLAIM_PLUGIN)
    claims_ova = {"hook": "site.claim", "with": {"format": "ova"}}
    hooks = {"points": {"after_fetch": [claims_ova]}, "plugins_dir": str(plugins)}
    cfg = stores.config(cfg_data(tmp_path, moto) | {"hooks": hooks}, base_dir=tmp_path)
    service = ImportService(cfg)
    try:
        if where == "import-snapshot":
            # given no format (a format's preflight would refuse the tar before any hook runs)
            task = service.import_snapshot(DiskContainer(bucket=bucket, key="vm.ova"))
        else:
            s3.upload_file(str(vmdks[1]), bucket, "data.vmdk")
            containers = [
                DiskContainer(bucket=bucket, key="vm.ova"),
                DiskContainer(format="VMDK", bucket=bucket, key="data.vmdk"),
            ]
            task = service.import_image(containers)
        done = run(cfg, task)
        assert (done.state, done.error_code) == (TaskState.FAILED, "Ova.DisksLeftOut"), done.error_message
        assert "holds 2 disks" in (done.error_message or "")
        assert not (cfg.scratch.root / task.id).exists()
        images = tmp_path / "state" / "images"  # the file image target's directory
        assert not images.exists() or sorted(images.iterdir()) == []
    finally:
        service.store.close()
