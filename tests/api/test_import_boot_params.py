"""Kernel, ramdisk and virtualization type as extra import parameters, and findings in the EC2
statusMessage and the admin task view.

The EC2 calls go to the real server (``python -m api.server``: gunicorn) on loopback: boto3 for
what boto3 can send (the ``Description`` token), raw requests signed with botocore's SigV4 for
the extra members boto3 refuses to send. No worker runs, so tasks stay pending until a test moves
them on through the store, as the worker would.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError
from falcon import testing

from api.app import create_app
from api.ec2 import views
from appliance import config as config_mod
from appliance.config import Config
from appliance.database import StoreConfig
from appliance.errors import Finding, UsageError
from appliance.report.status import task_snapshot
from appliance.service import bootparams
from appliance.service.importviews import outcome
from appliance.service.summary import STATUS_MESSAGE_LIMIT, findings_summary
from appliance.store import Store, Task, TaskState
from tests import stores
from tests.api.ec2_support import MANIFEST_BASE, post_signed
from tests.api.test_admin import AUTH, assert_documented
from tests.postgres import Cluster
from tests.processes import stop_process
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY, free_port, wait_for_http

GiB = 1 << 30
MANIFEST = f"{MANIFEST_BASE}/bucket/disk.raw.manifest.xml?X-Amz-Signature=abc&Expires=1"
BUCKET = {"S3Bucket": "images", "S3Key": "web.raw"}

#: what a guest validation of a Linux partition image reports (the GuestReport.to_dict() shape)
PARTITION_REPORT = {
    "layout": "partition",
    "partition_table": None,
    "partitions": [],
    "boot_mode": None,
    "os": {"family": "linux", "distribution": "debian", "version": "12", "pretty_name": "Debian 12",
           "architecture": "x86_64"},
    "root": {"partition": None, "filesystem": "ext4"},
    "kernels": ["/boot/vmlinuz-6.1.0-18-amd64"],
    "initrds": ["/boot/initrd.img-6.1.0-18-amd64"],
    "bootloader": None,
    "findings": [Finding.warning("Guest.FstabDeviceMissing", "fix /etc/fstab").to_dict()],
}  # fmt: skip


@dataclass
class Server:
    endpoint: str
    host: str
    store: Store
    ec2: Any
    config: Config


@contextmanager
def api_server(tmp: Path, store: dict[str, Any]) -> Iterator[Server]:
    """The API server as a real gunicorn process, sharing its task database (``store``) with the test."""
    port = free_port()
    data: dict[str, Any] = {
        "state_dir": str(tmp / "state"),
        "api": {
            "bind": f"127.0.0.1:{port}",
            "workers": 1,
            "credentials": [{"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY}],
        },
        "sources": {"allowed_endpoints": [MANIFEST_BASE]},
        # no worker runs: every task the module creates stays active
        "tasks": {"max_active": 1000},
    }
    if store:
        data["store"] = store
        data = stores.shared_volumes(data)  # a fleet's volume target: one machine here
    conf = tmp / "imaging.yaml"
    conf.write_text(yaml.safe_dump(data))
    endpoint = f"http://127.0.0.1:{port}"
    with open(tmp / "server.err", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "api.server", "--config", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=Path(__file__).resolve().parents[2],
        )
    try:
        wait_for_http(f"{endpoint}/v1/health", proc=proc)
        client = boto3.client(
            "ec2",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id=TEST_ACCESS_KEY,
            aws_secret_access_key=TEST_SECRET_KEY,
            config=BotoConfig(retries={"max_attempts": 1}),
        )
        config = config_mod.from_dict(data, base_dir=tmp)
        with Store(config.store) as opened:
            yield Server(endpoint, f"127.0.0.1:{port}", opened, client, config)
    finally:
        stop_process(proc, grace=30)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str, Cluster | None], Server]]:
    """One API server per backend for the whole module, started when a test first needs it."""
    started: dict[str, Server] = {}
    with contextlib.ExitStack() as stack:

        def get(backend: str, cluster: Cluster | None) -> Server:
            if backend not in started:
                store: dict[str, Any] = {}
                if cluster is not None:
                    schema = cluster.create_schema()
                    stack.callback(cluster.drop_schema, schema)
                    store = {"url": cluster.schema_url(schema)}
                tmp = tmp_path_factory.mktemp(f"boot-params-{backend}")
                started[backend] = stack.enter_context(api_server(tmp, store))
            return started[backend]

        yield get


@pytest.fixture
def server(
    servers: Callable[[str, Cluster | None], Server], store_backend: str, request: pytest.FixtureRequest
) -> Server:
    """This run's backend's API server (see :func:`servers`)."""
    cluster = request.getfixturevalue("postgres") if store_backend == "postgresql" else None
    return servers(store_backend, cluster)


def raw_call(server: Server, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """POST ``params`` SigV4-signed to the server (see :func:`post_signed`)."""
    return post_signed(server.endpoint, params)


def code_of(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, str]:
    return exc.value.response["Error"]["Code"], exc.value.response["Error"]["Message"]


def import_image(server: Server, **kwargs: Any) -> dict[str, Any]:
    return server.ec2.import_image(DiskContainers=[{"Format": "RAW", "UserBucket": BUCKET}], **kwargs)


def import_instance(server: Server, **kwargs: Any) -> dict[str, Any]:
    return server.ec2.import_instance(
        Platform="Linux",
        DiskImages=[
            {"Image": {"Format": "RAW", "Bytes": GiB, "ImportManifestUrl": MANIFEST}, "Volume": {"Size": 1}}
        ],
        **kwargs,
    )["ConversionTask"]


IMAGE_PARAMS = {
    "Action": "ImportImage",
    "DiskContainer.1.Format": "RAW",
    "DiskContainer.1.UserBucket.S3Bucket": BUCKET["S3Bucket"],
    "DiskContainer.1.UserBucket.S3Key": BUCKET["S3Key"],
}
INSTANCE_PARAMS = {
    "Action": "ImportInstance",
    "Platform": "Linux",
    "DiskImage.1.Image.Format": "RAW",
    "DiskImage.1.Image.Bytes": str(GiB),
    "DiskImage.1.Image.ImportManifestUrl": MANIFEST,
    "DiskImage.1.Volume.Size": "1",
}


def boot_params(task: Task) -> tuple[Any, Any, Any]:
    return task.params["kernel_id"], task.params["ramdisk_id"], task.params["virtualization_type"]


# -- Description tokens through boto3 --------------------------------------------------------------


def test_import_image_description_token_records_kernel_and_ramdisk(server: Server) -> None:
    description = "web tier [imaging:kernel=aki-1234abcd, ramdisk=ARI-1234ABCD]"
    result = import_image(server, Description=description)
    # the description is echoed as given; the settings travel in the task's own parameters
    assert result["Description"] == description
    task = server.store.get_task(result["ImportTaskId"])
    assert boot_params(task) == ("aki-1234abcd", "ari-1234abcd", "paravirtual")


def test_import_instance_description_token_sets_hvm(server: Server) -> None:
    task_id = import_instance(server, Description="[imaging:virtualization=HVM] db")["ConversionTaskId"]
    task = server.store.get_task(task_id)
    assert boot_params(task) == ("", "", "hvm")  # workflow defaults fill what was not given


def test_import_without_boot_settings_leaves_them_empty(server: Server) -> None:
    task = server.store.get_task(import_image(server, Description="plain")["ImportTaskId"])
    assert boot_params(task) == ("", "", "")
    assert outcome(task)["boot"] == {
        "kernel_id": None,
        "ramdisk_id": None,
        "virtualization_type": None,
        "layout": None,
    }


@pytest.mark.parametrize(
    ("description", "code", "names"),
    [
        ("[imaging:kernel=aki-xyz]", "InvalidParameterValue", "Description [imaging:kernel=]"),
        ("[imaging:kernel=ari-1234abcd]", "InvalidParameterValue", "ari- is a ramdisk id"),
        ("[imaging:kernel=aki-1234abcd,virtualization=hvm]", "InvalidParameterCombination", "hvm"),
        ("[imaging:virtualization=pv]", "InvalidParameterValue", "Valid values: paravirtual, hvm"),
        ("[imaging:kernal=aki-1234abcd]", "InvalidParameterValue", "unknown setting 'kernal'"),
        ("[imaging:kernel=aki-1234abcd", "InvalidParameterValue", "not terminated"),
    ],
)
def test_bad_description_token_is_refused_before_a_task_exists(
    server: Server, description: str, code: str, names: str
) -> None:
    before = len(server.store.list_tasks(limit=None))
    with pytest.raises(ClientError) as exc:
        import_image(server, Description=description)
    got_code, message = code_of(exc)
    assert got_code == code and names in message
    assert len(server.store.list_tasks(limit=None)) == before


def test_uefi_boot_mode_with_a_kernel_is_a_combination_error(server: Server) -> None:
    with pytest.raises(ClientError) as exc:
        import_image(server, Description="[imaging:kernel=eki-1234abcd]", BootMode="uefi")
    code, message = code_of(exc)
    assert code == "InvalidParameterCombination" and message.startswith("BootMode uefi needs an hvm image")


# -- extra members through raw SigV4 requests --------------------------------------------------------


def test_import_image_extra_members_are_recorded(server: Server) -> None:
    status, parsed = raw_call(
        server,
        IMAGE_PARAMS
        | {
            "KernelId": "eki-0123456789abcdef0",
            "RamdiskId": "eri-89abcdef",
            "VirtualizationType": "paravirtual",
        },
    )
    assert status == 200, parsed
    task = server.store.get_task(parsed["ImportTaskId"])
    assert boot_params(task) == ("eki-0123456789abcdef0", "eri-89abcdef", "paravirtual")


def test_import_instance_launch_specification_members_are_recorded(server: Server) -> None:
    status, parsed = raw_call(
        server,
        INSTANCE_PARAMS
        | {
            "LaunchSpecification.KernelId": "aki-1234abcd",
            "LaunchSpecification.RamdiskId": "ari-1234abcd",
            "LaunchSpecification.InstanceType": "m1.small",
        },
    )
    assert status == 200, parsed
    task = server.store.get_task(parsed["ConversionTask"]["ConversionTaskId"])
    assert boot_params(task) == ("aki-1234abcd", "ari-1234abcd", "paravirtual")
    # the boot settings are not left in the launch specification handed on as-is
    assert task.params["launch"] == {}
    assert task.params["instance_type"] == "m1.small"


def test_member_and_matching_token_agree(server: Server) -> None:
    status, parsed = raw_call(
        server, IMAGE_PARAMS | {"KernelId": "AKI-1234ABCD", "Description": "[imaging:kernel=aki-1234abcd]"}
    )
    assert status == 200, parsed
    assert boot_params(server.store.get_task(parsed["ImportTaskId"]))[0] == "aki-1234abcd"


@pytest.mark.parametrize(
    ("extra", "code", "fragment"),
    [
        (
            {"LaunchSpecification.KernelId": "aki-123"},
            "InvalidParameterValue",
            "LaunchSpecification.KernelId",
        ),
        ({"LaunchSpecification.RamdiskId": "aki-1234abcd"}, "InvalidParameterValue", "aki- is a kernel id"),
        (
            {"LaunchSpecification.VirtualizationType": "xen"},
            "InvalidParameterValue",
            "parameter LaunchSpecification.VirtualizationType is invalid",
        ),
        (
            {
                "LaunchSpecification.RamdiskId": "ari-1234abcd",
                "LaunchSpecification.VirtualizationType": "hvm",
            },
            "InvalidParameterCombination",
            "LaunchSpecification.RamdiskId (ari-1234abcd) can only be used with a paravirtual image, "
            "but LaunchSpecification.VirtualizationType is hvm",
        ),
        (
            {"LaunchSpecification.KernelId": "aki-1234abcd", "Description": "[imaging:kernel=aki-99999999]"},
            "InvalidParameterCombination",
            "LaunchSpecification.KernelId (aki-1234abcd) and kernel=aki-99999999 in Description disagree",
        ),
        (
            {"LaunchSpecification.KernelId": "aki-1234abcd", "Description": "[imaging:virtualization=hvm]"},
            "InvalidParameterCombination",
            "but Description [imaging:virtualization=] is hvm",
        ),
    ],
)
def test_bad_import_instance_boot_members_get_coded_errors(
    server: Server, extra: dict[str, str], code: str, fragment: str
) -> None:
    before = len(server.store.list_tasks(limit=None))
    status, parsed = raw_call(server, INSTANCE_PARAMS | extra)
    assert status == 400
    assert parsed["Error"]["Code"] == code
    assert fragment in parsed["Error"]["Message"]
    assert len(server.store.list_tasks(limit=None)) == before


def test_hvm_with_a_kernel_member_is_refused_for_import_image(server: Server) -> None:
    status, parsed = raw_call(
        server, IMAGE_PARAMS | {"KernelId": "aki-1234abcd", "VirtualizationType": "hvm"}
    )
    assert (status, parsed["Error"]["Code"]) == (400, "InvalidParameterCombination")
    assert parsed["Error"]["Message"].startswith("KernelId (aki-1234abcd) can only be used")


def test_dry_run_validates_the_boot_settings_first(server: Server) -> None:
    status, parsed = raw_call(server, IMAGE_PARAMS | {"KernelId": "aki-bad", "DryRun": "true"})
    assert (status, parsed["Error"]["Code"]) == (400, "InvalidParameterValue")
    status, parsed = raw_call(server, IMAGE_PARAMS | {"KernelId": "aki-1234abcd", "DryRun": "true"})
    assert (status, parsed["Error"]["Code"]) == (412, "DryRunOperation")


def test_other_actions_still_refuse_the_extra_members(server: Server) -> None:
    status, parsed = raw_call(
        server,
        {
            "Action": "ImportSnapshot",
            "DiskContainer.Format": "RAW",
            "DiskContainer.UserBucket.S3Bucket": "b",
            "DiskContainer.UserBucket.S3Key": "k",
            "KernelId": "aki-1234abcd",
        },
    )
    assert (status, parsed["Error"]["Code"]) == (400, "UnknownParameter")


# -- findings in statusMessage -----------------------------------------------------------------------

WARNING = Finding.warning("Guest.FstabDeviceMissing", "Fix or remove the /home line in /etc/fstab.")
ERROR = Finding.error("Guest.NoBootablePartition", "Mark the root partition bootable.")
INFO = Finding.info("Guest.OsDetected", "Debian 12")


def _complete(store: Store, task_id: str, result: dict[str, Any]) -> Task:
    store.claim(task_id, "test-worker", 30)
    return store.set_state(task_id, TaskState.COMPLETED, result=result)


def test_image_task_status_message_lists_findings_most_severe_first(server: Server) -> None:
    task_id = import_image(server)["ImportTaskId"]
    server.store.add_findings(task_id, [INFO, WARNING, ERROR])
    [task] = server.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"]
    assert task["StatusMessage"] == (
        "pending; errors: Guest.NoBootablePartition (Mark the root partition bootable.); "
        "warnings: Guest.FstabDeviceMissing"
    )
    assert task["SnapshotDetails"][0]["StatusMessage"] == task["StatusMessage"]

    # a completed task names its findings after its status (no errors: only the warnings)
    task_id = import_image(server)["ImportTaskId"]
    _complete(server.store, task_id, {"ids": {"image_id": "ami-1"}})
    server.store.add_findings(task_id, [INFO, WARNING])
    [task] = server.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"]
    assert (task["Status"], task["StatusMessage"]) == (
        "completed",
        "completed; warnings: Guest.FstabDeviceMissing (Fix or remove the /home line in /etc/fstab.)",
    )


def test_completed_task_with_only_info_findings_has_no_status_message(server: Server) -> None:
    task_id = import_image(server)["ImportTaskId"]
    _complete(server.store, task_id, {"ids": {"image_id": "ami-1"}})
    server.store.add_findings(task_id, [INFO])
    [task] = server.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"]
    assert task["Status"] == "completed" and "StatusMessage" not in task


def test_failed_conversion_task_names_its_error_once_then_other_findings(server: Server) -> None:
    task_id = import_instance(server)["ConversionTaskId"]
    server.store.claim(task_id, "test-worker", 30)
    server.store.add_findings(task_id, [ERROR, WARNING])
    server.store.set_state(task_id, TaskState.FAILED, error_code=ERROR.code, error_message=ERROR.message)
    [task] = server.ec2.describe_conversion_tasks(ConversionTaskIds=[task_id])["ConversionTasks"]
    expected = (
        "ClientError: Guest.NoBootablePartition: Mark the root partition bootable.; "
        "warnings: Guest.FstabDeviceMissing (Fix or remove the /home line in /etc/fstab.)"
    )
    assert (task["State"], task["StatusMessage"]) == ("cancelled", expected)
    assert task["ImportInstance"]["Volumes"][0]["StatusMessage"] == expected


def test_snapshot_task_status_message_is_capped(server: Server) -> None:
    task_id = server.ec2.import_snapshot(DiskContainer={"Format": "RAW", "UserBucket": BUCKET})[
        "ImportTaskId"
    ]
    many = [Finding.warning(f"Guest.Warning{i:02d}", "x" * 300) for i in range(40)]
    server.store.add_findings(task_id, [*many, ERROR])
    [task] = server.ec2.describe_import_snapshot_tasks(ImportTaskIds=[task_id])["ImportSnapshotTasks"]
    message = task["SnapshotTaskDetail"]["StatusMessage"]
    assert len(message) <= STATUS_MESSAGE_LIMIT
    assert message.startswith("pending; errors: Guest.NoBootablePartition (Mark the root")
    assert "warnings: Guest.Warning00, Guest.Warning01" in message
    assert message.endswith(" more")


def test_pending_upload_message_stays_exact_for_euca2ools(store_target: StoreConfig) -> None:
    with Store(store_target) as store:
        params = {"image_format": "RAW", "image_bytes": GiB, "manifest_url": MANIFEST, "volume_size": 1}
        task = store.create_task("import-volume", "import-volume", params, task_id="import-vol-pend0001")
        store.claim(task.id, "w", 30)
        store.update_progress(task.id, phase="pending-upload")
        task = store.add_findings(task.id, [WARNING])
        assert views.conversion_task(task)["StatusMessage"] == "Pending import-image upload"


# -- the summary function ----------------------------------------------------------------------------


def test_summary_without_findings_is_the_base() -> None:
    assert findings_summary([], base="converting") == "converting"
    assert findings_summary([INFO.to_dict()], base=None) is None


def test_summary_lists_a_repeated_code_once_at_its_most_severe() -> None:
    repeated = [WARNING, Finding.error(WARNING.code, "worse"), WARNING]
    assert findings_summary(repeated, base="b") == "b; errors: Guest.FstabDeviceMissing (worse)"


def test_summary_shortens_the_first_message_before_dropping_codes() -> None:
    long = Finding.error("Guest.NoRootFilesystem", "Add a root filesystem. " * 20)
    text = findings_summary([long, WARNING], base="converting")
    assert text is not None and len(text) == STATUS_MESSAGE_LIMIT
    assert text.startswith("converting; errors: Guest.NoRootFilesystem (Add a root filesystem.")
    assert text.endswith("…); warnings: Guest.FstabDeviceMissing")


def test_summary_never_shortens_the_base() -> None:
    base = "ClientError: X: " + "y" * 300
    assert findings_summary([ERROR], base=base) == base
    near = "z" * 240
    assert findings_summary([ERROR, WARNING], base=near) == near + "; 2 findings"


# -- the rules, without HTTP -------------------------------------------------------------------------


def test_check_accepts_eucalyptus_and_aws_ids_of_both_lengths() -> None:
    assert bootparams.check("EKI-ABCDEF01", "ari-0123456789abcdef0") == bootparams.BootParams(
        "eki-abcdef01", "ari-0123456789abcdef0", "paravirtual"
    )
    assert bootparams.check(virtualization_type="hvm") == bootparams.BootParams(None, None, "hvm")
    # a ramdisk alone is allowed: the cloud's default kernel boots it
    assert bootparams.check(ramdisk_id="eri-12345678").virtualization_type == "paravirtual"


@pytest.mark.parametrize(
    "kernel", ["ami-1234abcd", "aki-1234abc", "aki-1234abcg", "aki_1234abcd", "1234abcd"]
)
def test_check_refuses_what_is_not_a_kernel_id(kernel: str) -> None:
    with pytest.raises(UsageError) as exc:
        bootparams.check(kernel, names={"kernel_id": "KernelId"})
    assert (
        exc.value.code == "InvalidParameterValue"
        and f"({kernel}) for parameter KernelId" in exc.value.message
    )


def test_description_tokens_refuses_two_tokens_and_repeated_keys() -> None:
    assert bootparams.description_tokens("no token here") == {}
    assert bootparams.description_tokens("[imaging:]") == {}
    for bad in ("[imaging:kernel=a][imaging:ramdisk=b]", "[imaging:kernel=a,kernel=b]", "[imaging:kernel]"):
        with pytest.raises(UsageError) as exc:
            bootparams.description_tokens(bad)
        assert exc.value.code == "InvalidParameterValue" and exc.value.message.startswith("Description: ")


def test_service_validates_boot_settings_for_callers_other_than_the_api(tmp_path: Path) -> None:
    from appliance.service.imports import ImportService
    from appliance.service.importtasks import DiskContainer

    service = ImportService(stores.config({"state_dir": str(tmp_path)}))
    with pytest.raises(UsageError) as exc:
        service.import_image(
            [DiskContainer("RAW", bucket="b", key="k")], kernel_id="aki-1", virtualization_type="hvm"
        )
    assert exc.value.code == "InvalidParameterValue"
    with pytest.raises(UsageError) as exc:
        service.import_image(
            [DiskContainer("RAW", bucket="b", key="k")], kernel_id="aki-1234abcd", virtualization_type="hvm"
        )
    assert exc.value.code == "InvalidParameterCombination"
    assert service.store.list_tasks(limit=None) == []


# -- outcome(), the admin view and the push snapshot -------------------------------------------------


def test_outcome_reads_the_guest_report_and_boot_settings_of_a_completed_task(server: Server) -> None:
    result = import_image(server, Description="[imaging:kernel=aki-1234abcd]")
    task_id = result["ImportTaskId"]
    before = outcome(server.store.get_task(task_id))
    assert before["guest"] is None and before["boot"]["layout"] is None
    # where a hook point registers it: the image facts of the import-disk include's result
    done = _complete(
        server.store,
        task_id,
        {
            "disk": {"image": {"path": "/x.raw", "format": "raw", "guest": PARTITION_REPORT}},
            "ids": {"image_id": "ami-1"},
        },
    )
    produced = outcome(done)
    assert produced["guest"] == PARTITION_REPORT
    assert produced["boot"] == {
        "kernel_id": "aki-1234abcd",
        "ramdisk_id": None,
        "virtualization_type": "paravirtual",
        "layout": "partition",
    }
    assert task_snapshot(done)["boot"] == produced["boot"]


def test_outcome_has_no_boot_settings_for_volume_and_snapshot_imports(store_target: StoreConfig) -> None:
    with Store(store_target) as store:
        task = store.create_task("import-volume", "import-volume", {}, task_id="import-vol-boot0001")
        store.claim(task.id, "w", 30)
        done = store.set_state(task.id, TaskState.COMPLETED, result={"guest": PARTITION_REPORT})
        assert outcome(done)["boot"] is None
        assert outcome(done)["guest"] == PARTITION_REPORT  # the report itself is still shown
        assert task_snapshot(done)["boot"] is None


def test_admin_task_view_shows_guest_report_and_boot(server: Server, tmp_path: Path) -> None:
    client = testing.TestClient(create_app(server.config, store=server.store))
    status, parsed = raw_call(
        server, INSTANCE_PARAMS | {"LaunchSpecification.VirtualizationType": "hvm", "Description": "db"}
    )
    assert status == 200, parsed
    task_id = parsed["ConversionTask"]["ConversionTaskId"]

    pending = client.simulate_get(f"/v1/tasks/{task_id}", headers=AUTH)
    assert_documented("/v1/tasks/{task_id}", "GET", pending)
    assert pending.json["guest"] is None
    assert pending.json["boot"] == {
        "kernel_id": None,
        "ramdisk_id": None,
        "virtualization_type": "hvm",
        "layout": None,
    }

    disk_report = PARTITION_REPORT | {"layout": "disk", "partition_table": "gpt"}
    _complete(server.store, task_id, {"guest": disk_report, "imported": {"volume": {"id": "vol-1"}}})
    done = client.simulate_get(f"/v1/tasks/{task_id}", headers=AUTH)
    assert_documented("/v1/tasks/{task_id}", "GET", done)
    assert done.json["guest"] == disk_report
    assert done.json["boot"]["layout"] == "disk"

    # a task of another kind (any workflow may run as a task) has neither
    other = server.store.create_task("convert-image", params={})
    shown = client.simulate_get(f"/v1/tasks/{other.id}", headers=AUTH)
    assert_documented("/v1/tasks/{task_id}", "GET", shown)
    assert (shown.json["guest"], shown.json["boot"]) == (None, None)
