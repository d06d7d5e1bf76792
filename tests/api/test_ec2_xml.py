"""EC2 XML responses (api.ec2.xml, api.ec2.errors, api.ec2.views): the acceptance criterion is that
botocore's own EC2QueryParser turns each document into exactly the structure we meant."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from typing import Any

import pytest
from botocore.parsers import create_parser

from api.ec2 import model, views, xml
from api.ec2.errors import ERROR_TABLE, Ec2Error, from_imaging_error, render_error
from appliance.database import StoreConfig
from appliance.errors import (
    ConversionFailed,
    ImagingError,
    IncorrectState,
    InvalidTaskId,
    TaskNotFound,
    UsageError,
)
from appliance.sources.urlfilter import UrlNotAllowed
from appliance.store import Store, StoreError, TaskState

NS = "{http://ec2.amazonaws.com/doc/2016-11-15/}"


def botocore_parse(action: str, body: bytes, status: int = 200) -> dict[str, Any]:
    op = model.operation(action)
    parsed = create_parser("ec2").parse({"body": body, "headers": {}, "status_code": status}, op.output_shape)
    meta = parsed.pop("ResponseMetadata")
    assert meta["HTTPStatusCode"] == status
    parsed["RequestId"] = meta["RequestId"]
    return parsed


def roundtrip(action: str, data: dict[str, Any]) -> dict[str, Any]:
    parsed = botocore_parse(action, xml.render(action, data, "req-1"))
    assert parsed.pop("RequestId") == "req-1"
    return parsed


# The parsed DescribeConversionTasks example of AWS's documentation, with the enum spelled right.
CONVERSION_TASKS = {
    "ConversionTasks": [
        {
            "ConversionTaskId": "import-i-fh95npoc",
            "ExpirationTime": "2010-12-22T12:01Z",
            "ImportInstance": {
                "Description": "",
                "InstanceId": "i-12655a7f",
                "Platform": "Windows",
                "Volumes": [
                    {
                        "AvailabilityZone": "us-east-1a",
                        "BytesConverted": 1000,
                        "Image": {
                            "Format": "VMDK",
                            "ImportManifestUrl": "https://s3/m?x=1&y=2",
                            "Size": 128696320,
                        },
                        "Status": "active",
                        "StatusMessage": "",
                        "Volume": {"Id": "vol-1", "Size": 8},
                    }
                ],
            },
            "State": "active",
            "StatusMessage": "",
            "Tags": [{"Key": "k", "Value": "v"}],
        },
        {
            "ConversionTaskId": "import-vol-1",
            "ImportVolume": {
                "AvailabilityZone": "us-east-1a",
                "BytesConverted": 0,
                "Description": "",
                "Image": {"Checksum": "abc", "Format": "RAW", "ImportManifestUrl": "u", "Size": 1073741824},
                "Volume": {"Id": "vol-2", "Size": 1},
            },
            "State": "cancelling",
            "StatusMessage": "Cancelled by user",
        },
    ]
}


def test_describe_conversion_tasks_parses_to_the_reference_example() -> None:
    assert roundtrip("DescribeConversionTasks", CONVERSION_TASKS) == CONVERSION_TASKS


def test_document_layout_root_namespace_request_id_first_and_bare_items() -> None:
    root = ET.fromstring(xml.render("DescribeConversionTasks", CONVERSION_TASKS, "req-1"))
    assert root.tag == f"{NS}DescribeConversionTasksResponse"
    children = list(root)
    assert children[0].tag == f"{NS}requestId" and children[0].text == "req-1"
    tasks = root.find(f"{NS}conversionTasks")
    items = list(tasks)
    # each <item> IS a ConversionTask (no <item><conversionTask> wrapper, which botocore reads as {})
    assert [i.tag for i in items] == [f"{NS}item", f"{NS}item"]
    assert items[0].find(f"{NS}conversionTaskId").text == "import-i-fh95npoc"
    assert items[0].find(f"{NS}tagSet/{NS}item/{NS}key").text == "k"
    assert items[0].find(f"{NS}importInstance/{NS}volumes/{NS}item/{NS}image/{NS}format").text == "VMDK"


def test_empty_list_is_an_empty_element_and_parses_to_an_empty_list() -> None:
    body = xml.render("DescribeConversionTasks", {"ConversionTasks": []}, "r")
    assert b"<conversionTasks/>" in body
    assert botocore_parse("DescribeConversionTasks", body) == {"ConversionTasks": [], "RequestId": "r"}


def test_operation_without_output_shape_returns_true() -> None:
    body = xml.render("CancelConversionTask", None, "r")
    root = ET.fromstring(body)
    assert root.tag == f"{NS}CancelConversionTaskResponse"
    assert root.find(f"{NS}return").text == "true"
    assert botocore_parse("CancelConversionTask", body) == {"RequestId": "r"}
    with pytest.raises(ValueError):
        xml.render("CancelConversionTask", {"Anything": 1}, "r")


def test_import_image_tasks_with_doubles_and_nested_structures() -> None:
    data = {
        "ImportImageTasks": [
            {
                "ImportTaskId": "import-ami-1",
                "Progress": "28",
                "SnapshotDetails": [
                    {"DiskImageSize": 1.5, "Format": "VMDK", "UserBucket": {"S3Bucket": "b", "S3Key": "k"}}
                ],
                "Status": "active",
                "StatusMessage": "converting",
                "BootMode": "uefi",
            }
        ],
        "NextToken": "abc",
    }
    assert roundtrip("DescribeImportImageTasks", data) == data


def test_booleans_render_as_true_false_and_parse_back() -> None:
    data = {
        "ImportTaskId": "import-snap-1",
        "SnapshotTaskDetail": {"Encrypted": False, "DiskImageSize": 1073741824.0, "Status": "completed"},
        "Tags": [{"Key": "a", "Value": "b"}],
    }
    body = xml.render("ImportSnapshot", data, "r")
    assert b"<encrypted>false</encrypted>" in body
    assert roundtrip("ImportSnapshot", data) == data
    cancel = {"ImportTaskId": "import-ami-1", "PreviousState": "active", "State": "deleting"}
    assert roundtrip("CancelImportTask", cancel) == cancel


def test_text_is_escaped_and_characters_xml_cannot_carry_are_replaced() -> None:
    data = {"ConversionTasks": [{"ConversionTaskId": "t", "StatusMessage": "a <b> & c\x00d\x1be"}]}
    parsed = roundtrip("DescribeConversionTasks", data)
    assert parsed["ConversionTasks"][0]["StatusMessage"] == "a <b> & c\ufffdd\ufffde"
    assert b"&amp;" in xml.render("DescribeConversionTasks", data, "r")


def test_timestamps_are_iso8601_utc_with_milliseconds() -> None:
    assert (
        xml.format_timestamp(datetime(2026, 11, 22, 4, 0, 0, 123456, tzinfo=UTC))
        == "2026-11-22T04:00:00.123Z"
    )
    assert xml.format_timestamp("2026-11-22T04:00:00.000000Z") == "2026-11-22T04:00:00.000Z"
    assert xml.format_timestamp("2026-11-22T06:00:00+02:00") == "2026-11-22T04:00:00.000Z"


@pytest.mark.parametrize(
    "data",
    [
        {"ConversionTasks": [{"NoSuchMember": "x"}]},
        {"ConversionTasks": {"ConversionTaskId": "not a list"}},
        {"ConversionTasks": [{"ImportVolume": {"BytesConverted": "12"}}]},
        {"ConversionTasks": [{"ImportVolume": {"BytesConverted": True}}]},
        {"ConversionTasks": [{"ConversionTaskId": 5}]},
    ],
)
def test_render_refuses_data_that_does_not_fit_the_shape(data: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        xml.render("DescribeConversionTasks", data, "r")


# -- errors ----------------------------------------------------------------------------------------


def test_error_document_parses_to_code_message_and_request_id() -> None:
    body = render_error(
        Ec2Error("InvalidConversionTaskId", "The conversion task ID 'import-i-x' & co"), "req-9"
    )
    assert body.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>')
    parsed = create_parser("ec2").parse({"body": body, "headers": {}, "status_code": 400}, None)
    assert parsed["Error"] == {
        "Code": "InvalidConversionTaskId",
        "Message": "The conversion task ID 'import-i-x' & co",
    }
    assert parsed["ResponseMetadata"]["RequestId"] == "req-9"


@pytest.mark.parametrize(
    ("exc", "code", "status"),
    [
        (TaskNotFound("the task 'import-vol-aaaaaaaa' does not exist"), "InvalidConversionTaskId", 400),
        (InvalidTaskId("malformed"), "InvalidConversionTaskId.Malformed", 400),
        (IncorrectState("already completed"), "IncorrectState", 400),
        (ImagingError("5 active", code="ResourceLimitExceeded"), "ResourceLimitExceeded", 400),
        (UsageError("bad size"), "InvalidParameterValue", 400),
        (StoreError("database is locked"), "Unavailable", 503),
    ],
)
def test_appliance_errors_map_to_ec2_codes_keeping_the_message(
    exc: ImagingError, code: str, status: int
) -> None:
    mapped = from_imaging_error(exc)
    assert (mapped.code, mapped.status, mapped.message) == (code, status, exc.message)


def test_url_not_allowed_becomes_invalid_parameter_value_saying_why() -> None:
    mapped = from_imaging_error(UrlNotAllowed("127.0.0.1 is not a public address (loopback)"))
    assert mapped.code == "InvalidParameterValue"
    assert "not allowed" in mapped.message and "loopback" in mapped.message


def test_unexpected_appliance_errors_become_internal_error_without_details() -> None:
    mapped = from_imaging_error(ConversionFailed("qemu-img crashed at /tmp/secret/path"))
    assert (mapped.code, mapped.status) == ("InternalError", 500)
    assert "/tmp" not in mapped.message
    assert "ConversionFailed" not in ERROR_TABLE


# -- views: real tasks in every state, rendered and parsed back -------------------------------------

VOLUME_PARAMS = {
    "image_format": "RAW",
    "image_bytes": 1073741824,
    "manifest_url": "https://s3.example/b/m.xml?X-Amz-Signature=a&b=c",
    "volume_size": 1,
    "availability_zone": "us-east-1a",
    "description": "vol",
    "expiration_time": "2026-11-29T04:00:00.000000Z",
}
#: the manifest URL as Describe* echoes it: the bucket and key resume-import reads, not the signature
ECHOED_MANIFEST_URL = "https://s3.example/b/m.xml?X-Amz-Signature=REDACTED&b=c"


@pytest.fixture
def store(store_target: StoreConfig) -> Store:
    with Store(store_target) as s:
        yield s


def _running(store: Store, task_id: str, kind: str, params: dict[str, Any], **progress: Any):
    store.create_task(kind, kind, params, task_id=task_id)
    store.claim(task_id, "worker-1", 30)
    return store.update_progress(task_id, **progress) if progress else store.get_task(task_id)


def conversion(task) -> dict[str, Any]:
    parsed = roundtrip("DescribeConversionTasks", {"ConversionTasks": [views.conversion_task(task)]})
    return parsed["ConversionTasks"][0]


def test_pending_volume_task_is_active_and_echoes_what_euca2ools_reads_back(store: Store) -> None:
    task = store.create_task("import-volume", "import-volume", VOLUME_PARAMS, task_id="import-vol-abcd1234")
    assert conversion(task) == {
        "ConversionTaskId": "import-vol-abcd1234",
        "ExpirationTime": "2026-11-29T04:00:00.000Z",
        "State": "active",
        "StatusMessage": "pending",
        "ImportVolume": {
            "AvailabilityZone": "us-east-1a",
            "BytesConverted": 0,
            "Description": "vol",
            "Image": {
                "Format": "RAW",
                "Size": 1073741824,
                "ImportManifestUrl": ECHOED_MANIFEST_URL,
            },
            "Volume": {"Size": 1},
        },
    }


def test_running_task_reports_phase_and_bytes_written(store: Store) -> None:
    task = _running(store, "import-vol-run00001", "import-volume", VOLUME_PARAMS, phase="pending-upload")
    assert conversion(task)["StatusMessage"] == "Pending import-image upload"
    task = store.update_progress(task.id, phase="writing", bytes_done=10, bytes_converted=4096, percent=40)
    view = conversion(task)
    assert (view["State"], view["StatusMessage"]) == ("active", "writing")
    assert view["ImportVolume"]["BytesConverted"] == 4096


def test_cancel_states_carry_the_reason(store: Store) -> None:
    pending = store.create_task("import-volume", "w", VOLUME_PARAMS, task_id="import-vol-cancel01")
    cancelled = store.request_cancel(pending.id, reason="wrong disk")
    assert (conversion(cancelled)["State"], conversion(cancelled)["StatusMessage"]) == (
        "cancelled",
        "wrong disk",
    )
    running = _running(store, "import-vol-cancel02", "import-volume", VOLUME_PARAMS)
    cancelling = store.request_cancel(running.id)
    assert (conversion(cancelling)["State"], conversion(cancelling)["StatusMessage"]) == (
        "cancelling",
        "Cancelled by user",
    )


def test_failed_task_is_cancelled_with_client_error_message(store: Store) -> None:
    task = _running(store, "import-vol-failed01", "import-volume", VOLUME_PARAMS)
    failed = store.set_state(
        task.id,
        TaskState.FAILED,
        error_code="UnsafeImage.BackingFile",
        error_message="the image has a backing file",
    )
    view = conversion(failed)
    assert view["State"] == "cancelled"
    assert view["StatusMessage"] == "ClientError: UnsafeImage.BackingFile: the image has a backing file"


def test_completed_volume_task_names_its_volume(store: Store) -> None:
    task = _running(store, "import-vol-done0001", "import-volume", VOLUME_PARAMS)
    done = store.set_state(
        task.id, TaskState.COMPLETED, result={"volume": {"id": "vol-0123"}, "written": {"bytes_written": 5}}
    )
    view = conversion(done)
    assert view["State"] == "completed" and "StatusMessage" not in view
    assert view["ImportVolume"]["Volume"] == {"Id": "vol-0123", "Size": 1}


def test_instance_task_reports_one_volume_with_the_task_state(store: Store) -> None:
    params = VOLUME_PARAMS | {
        "platform": "Linux",
        "architecture": "x86_64",
        "instance_type": "m1.small",
        "launch": {"Monitoring": True},
        "volume_description": "root disk",
    }
    task = _running(store, "import-i-inst0001", "import-instance", params, phase="converting")
    view = conversion(task)
    assert "ImportVolume" not in view
    assert view["ImportInstance"]["Platform"] == "Linux"
    [volume] = view["ImportInstance"]["Volumes"]
    assert volume["Status"] == "active" and volume["StatusMessage"] == "converting"
    assert volume["Description"] == "root disk"
    assert volume["Image"] == {
        "Format": "RAW",
        "Size": 1073741824,
        "ImportManifestUrl": ECHOED_MANIFEST_URL,
    }


IMAGE_PARAMS = {
    "disk_containers": [
        {
            "format": "VMDK",
            "url": None,
            "bucket": "b",
            "key": "k.vmdk",
            "description": "d",
            "device_name": None,
        }
    ],
    "architecture": "x86_64",
    "platform": "Linux",
    "boot_mode": "uefi",
    "license_type": "BYOL",
    "hypervisor": None,
    "description": "img",
    "client_token": "tok",
    "tags": [{"key": "a", "value": "b"}],
}


def test_import_image_task_states(store: Store) -> None:
    task = _running(
        store, "import-ami-0123456789abcdef0", "import-image", IMAGE_PARAMS, phase="converting", percent=28.7
    )
    parsed = roundtrip("DescribeImportImageTasks", {"ImportImageTasks": [views.import_image_task(task)]})
    [view] = parsed["ImportImageTasks"]
    assert view == {
        "Architecture": "x86_64",
        "BootMode": "uefi",
        "Description": "img",
        "Encrypted": False,
        "ImportTaskId": "import-ami-0123456789abcdef0",
        "LicenseType": "BYOL",
        "Platform": "Linux",
        "Progress": "28",
        "SnapshotDetails": [
            {
                "Description": "d",
                "DeviceName": "/dev/sda1",
                "Format": "VMDK",
                "Progress": "28",
                "Status": "active",
                "StatusMessage": "converting",
                "UserBucket": {"S3Bucket": "b", "S3Key": "k.vmdk"},
            }
        ],
        "Status": "active",
        "StatusMessage": "converting",
        "Tags": [{"Key": "a", "Value": "b"}],
    }
    done = store.set_state(
        task.id,
        TaskState.COMPLETED,
        result={
            "ids": {"snapshot_id": "snap-1", "image_id": "ami-1"},
            "disk": {"source_image": {"virtual_size": 2048}},
        },
    )
    result = roundtrip("ImportImage", views.import_image_result(done))
    assert (result["Status"], result["ImageId"]) == ("completed", "ami-1")
    assert result["SnapshotDetails"][0]["SnapshotId"] == "snap-1"
    assert result["SnapshotDetails"][0]["DiskImageSize"] == 2048.0
    assert "Progress" not in result and "BootMode" not in result


def test_import_task_cancel_and_failure_states(store: Store) -> None:
    running = _running(store, "import-ami-00000000000000001", "import-image", IMAGE_PARAMS)
    cancelling = store.request_cancel(running.id, reason="r")
    assert views.import_image_task(cancelling)["Status"] == "deleting"
    before = store.create_task("import-image", "w", IMAGE_PARAMS, task_id="import-ami-00000000000000002")
    after = store.request_cancel(before.id)
    result = roundtrip("CancelImportTask", views.cancel_import_result(before, after))
    assert result == {"ImportTaskId": before.id, "PreviousState": "active", "State": "deleted"}
    failing = _running(store, "import-ami-00000000000000003", "import-image", IMAGE_PARAMS)
    failed = store.set_state(
        failing.id, TaskState.FAILED, error_code="FormatMismatch", error_message="not VMDK"
    )
    view = views.import_image_task(failed)
    assert (view["Status"], view["StatusMessage"]) == ("deleted", "ClientError: FormatMismatch: not VMDK")


def test_failed_snapshot_detail_status_is_error_so_the_waiter_stops(store: Store) -> None:
    params = {
        "disk_container": {"format": "RAW", "url": "https://h/d.raw", "bucket": None, "key": None},
        "description": "s",
        "client_token": None,
        "tags": [],
        "encrypted": False,
    }
    task = _running(store, "import-snap-00000000000000001", "import-snapshot", params)
    failed = store.set_state(task.id, TaskState.FAILED, error_code="CorruptImage", error_message="bad")
    parsed = roundtrip(
        "DescribeImportSnapshotTasks", {"ImportSnapshotTasks": [views.import_snapshot_task(failed)]}
    )
    detail = parsed["ImportSnapshotTasks"][0]["SnapshotTaskDetail"]
    assert detail["Status"] == "error"
    assert detail["StatusMessage"] == "ClientError: CorruptImage: bad"
    assert detail["Url"] == "https://h/d.raw" and detail["Encrypted"] is False
    assert views.import_status(failed) == "deleted"  # what the task-state filter sees


def test_a_multi_disk_image_has_one_snapshot_detail_per_disk_in_request_order(store: Store) -> None:
    def container(key: str, fmt: str, device: str | None = None) -> dict[str, Any]:
        return {
            "format": fmt,
            "url": None,
            "bucket": "b",
            "key": key,
            "description": None,
            "device_name": device,
        }

    params = IMAGE_PARAMS | {
        "disk_containers": [
            container("boot.vmdk", "VMDK"),
            container("d.raw", "RAW"),
            container("e.vhd", "VHD", "/dev/sdf"),
        ]
    }
    task = _running(
        store, "import-ami-0123456789abcdef1", "import-image", params, phase="downloading", percent=5
    )
    [running] = roundtrip("DescribeImportImageTasks", {"ImportImageTasks": [views.import_image_task(task)]})[
        "ImportImageTasks"
    ]
    assert [d["DeviceName"] for d in running["SnapshotDetails"]] == ["/dev/sda1", "/dev/sdb", "/dev/sdf"]
    assert [d.get("SnapshotId") for d in running["SnapshotDetails"]] == [None, None, None]

    def disk(size: int, name: str) -> dict[str, Any]:
        return {
            "source_image": {"virtual_size": size, "format": "raw"},
            "stored": {"type": "file", "path": name},
        }

    done = store.set_state(
        task.id,
        TaskState.COMPLETED,
        result={
            "ids": {"snapshot_id": "snap-123456789abcdef1", "image_id": "ami-123456789abcdef1"},
            "disk": disk(4096, "a.raw"),
            "data_disks": [disk(1024, "b.raw"), disk(2048, "c.raw")],
            "ova_data_disks": [],
        },
    )
    [view] = roundtrip("DescribeImportImageTasks", {"ImportImageTasks": [views.import_image_task(done)]})[
        "ImportImageTasks"
    ]
    details = view["SnapshotDetails"]
    assert [(d["DeviceName"], d["Format"], d["DiskImageSize"], d["Status"]) for d in details] == [
        ("/dev/sda1", "VMDK", 4096.0, "completed"),
        ("/dev/sdb", "RAW", 1024.0, "completed"),
        ("/dev/sdf", "VHD", 2048.0, "completed"),
    ]
    assert [d["UserBucket"]["S3Key"] for d in details] == ["boot.vmdk", "d.raw", "e.vhd"]
    ids = [d["SnapshotId"] for d in details]
    assert ids[0] == "snap-" + done.id[-17:] and len(set(ids)) == 3
    assert all(len(i) == len("snap-") + 17 for i in ids)
