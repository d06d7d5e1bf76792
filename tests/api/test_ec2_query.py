"""Wire-parameter parsing (api.ec2.query): what botocore's EC2Serializer and euca2ools send comes
back as the nested, typed input structure; everything else is refused with EC2 error codes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from botocore.serialize import create_serializer

from api.ec2 import model, query, rules
from api.ec2.errors import Ec2Error
from api.ec2.resource import ACTIONS

#: the protocol layer (query parsing): never opens the task database
pytestmark = pytest.mark.backends("sqlite")

SERIALIZER = create_serializer("ec2")


def wire(action: str, params: dict[str, Any]) -> dict[str, list[str]]:
    """The form parameters botocore itself sends for ``params`` (as decoded value lists)."""
    body = SERIALIZER.serialize_to_request(params, model.operation(action))["body"]
    return {k: [str(v)] for k, v in body.items()}


def error(action: str, params: dict[str, list[str]]) -> Ec2Error:
    with pytest.raises(Ec2Error) as info:
        query.parse(action, params)
    return info.value


IMPORT_INSTANCE = {
    "Description": "d",
    "Platform": "Windows",
    "LaunchSpecification": {
        "Architecture": "x86_64",
        "InstanceType": "m1.small",
        "GroupNames": ["default", "web"],
        "GroupIds": ["sg-1"],
        "Placement": {"AvailabilityZone": "zone-1", "PartitionNumber": 2},
        "UserData": {"Data": "aGVsbG8="},
        "SubnetId": "subnet-1",
        "PrivateIpAddress": "10.0.0.5",
        "Monitoring": True,
        "InstanceInitiatedShutdownBehavior": "stop",
    },
    "DiskImages": [
        {
            "Image": {"Format": "VMDK", "Bytes": 123, "ImportManifestUrl": "https://s3/x?sig&a=b c"},
            "Volume": {"Size": 8},
            "Description": "disk1",
        }
    ],
    "DryRun": False,
}

IMPORT_IMAGE = {
    "Description": "x",
    "Architecture": "x86_64",
    "Platform": "Linux",
    "LicenseType": "BYOL",
    "BootMode": "uefi",
    "RoleName": "vmimport",
    "DiskContainers": [
        {"Format": "VMDK", "UserBucket": {"S3Bucket": "b", "S3Key": "k.vmdk"}, "DeviceName": "/dev/sda"},
        {"Format": "RAW", "Url": "s3://b/k2.raw", "Description": "d2"},
    ],
    "ClientData": {
        "Comment": "c",
        "UploadSize": 1.5,
        "UploadStart": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    },
    "ClientToken": "tok",
    "Encrypted": False,
    "LicenseSpecifications": [{"LicenseConfigurationArn": "arn:1"}],
    "TagSpecifications": [{"ResourceType": "import-image-task", "Tags": [{"Key": "a", "Value": "b"}]}],
}


@pytest.mark.parametrize(
    ("action", "params"),
    [
        ("ImportInstance", IMPORT_INSTANCE),
        (
            "ImportVolume",
            {
                "AvailabilityZone": "zone-1",
                "Image": {"Format": "RAW", "Bytes": 1073741824, "ImportManifestUrl": "https://s3/m.xml?X=1"},
                "Volume": {"Size": 1},
                "Description": "v",
            },
        ),
        ("DescribeConversionTasks", {"ConversionTaskIds": ["import-i-ffvko9js", "import-vol-1"]}),
        ("CancelConversionTask", {"ConversionTaskId": "import-i-1", "ReasonMessage": "no"}),
        ("ImportImage", IMPORT_IMAGE),
        (
            "ImportSnapshot",
            {
                "DiskContainer": {"Format": "VHD", "UserBucket": {"S3Bucket": "b", "S3Key": "k.vhd"}},
                "Encrypted": True,
                "TagSpecifications": [
                    {"ResourceType": "import-snapshot-task", "Tags": [{"Key": "a", "Value": ""}]}
                ],
            },
        ),
        (
            "DescribeImportImageTasks",
            {
                "ImportTaskIds": ["import-ami-1", "import-ami-2"],
                "Filters": [{"Name": "task-state", "Values": ["active", "completed"]}],
                "MaxResults": 10,
                "NextToken": "t",
            },
        ),
        ("DescribeImportSnapshotTasks", {"Filters": [{"Name": "task-state", "Values": ["deleted"]}]}),
        ("CancelImportTask", {"ImportTaskId": "import-ami-1", "CancelReason": "r"}),
    ],
)
def test_parses_back_exactly_what_botocore_serializes(action: str, params: dict[str, Any]) -> None:
    assert query.parse(action, wire(action, params)) == params


def test_reads_the_irregular_wire_names_of_the_reference_examples() -> None:
    # Filters.N vs LicenseSpecifications.N vs TagSpecification.N, DiskContainer.N vs DiskContainer.
    params = {
        "Action": ["ImportImage"],
        "Version": ["2016-11-15"],
        "DiskContainer.1.Format": ["VMDK"],
        "DiskContainer.1.Url": ["s3://b/k2.vmdk"],
        "LicenseSpecifications.1.LicenseConfigurationArn": ["arn:1"],
        "TagSpecification.1.ResourceType": ["import-image-task"],
        "TagSpecification.1.Tag.1.Key": ["a"],
        "TagSpecification.1.Tag.1.Value": ["b"],
    }
    assert query.parse("ImportImage", params) == {
        "DiskContainers": [{"Format": "VMDK", "Url": "s3://b/k2.vmdk"}],
        "LicenseSpecifications": [{"LicenseConfigurationArn": "arn:1"}],
        "TagSpecifications": [{"ResourceType": "import-image-task", "Tags": [{"Key": "a", "Value": "b"}]}],
    }
    snapshot = query.parse(
        "ImportSnapshot", {"DiskContainer.Format": ["raw"], "DiskContainer.Url": ["s3://b/k"]}
    )
    assert snapshot == {"DiskContainer": {"Format": "RAW", "Url": "s3://b/k"}}


def test_ignores_protocol_and_signature_parameters() -> None:
    params = {
        "Action": ["DescribeConversionTasks"],
        "Version": ["2014-06-15"],
        "AWSAccessKeyId": ["AK"],
        "SignatureVersion": ["2"],
        "SignatureMethod": ["HmacSHA256"],
        "Timestamp": ["2026-01-01T00:00:00Z"],
        "Signature": ["abc="],
        "X-Amz-Credential": ["AK/20260101/us-east-1/ec2/aws4_request"],
        "ConversionTaskId.1": ["import-vol-abcdefgh"],
    }
    assert query.parse("DescribeConversionTasks", params) == {"ConversionTaskIds": ["import-vol-abcdefgh"]}


def test_accepts_euca2ools_launch_specification_forms() -> None:
    params = {
        "Platform": ["Linux"],
        "LaunchSpecification.Monitoring.Enabled": ["true"],
        "LaunchSpecification.UserData": ["aGk="],
        "LaunchSpecification.KeyName": ["mykey"],
        "LaunchSpecification.GroupName.1": ["default"],
        "DiskImage.1.Image.Format": ["vmdk"],
        "DiskImage.1.Image.Bytes": ["10"],
        "DiskImage.1.Image.ImportManifestUrl": ["https://m"],
        "DiskImage.1.Volume.Size": ["1"],
    }
    data = query.parse("ImportInstance", params)
    assert data["Platform"] == "Linux"
    assert data["LaunchSpecification"] == {
        "Monitoring": True,
        "UserData": {"Data": "aGk="},
        "KeyName": "mykey",
        "GroupNames": ["default"],
    }
    assert data["DiskImages"][0]["Image"]["Format"] == "VMDK"


def test_refuses_both_spellings_of_the_same_member() -> None:
    params = {
        "Platform": ["Windows"],
        "LaunchSpecification.Monitoring": ["true"],
        "LaunchSpecification.Monitoring.Enabled": ["true"],
    }
    assert error("ImportInstance", params).code == "InvalidParameterValue"


def test_missing_required_member_names_the_leaf_parameter() -> None:
    err = error("ImportVolume", {"AvailabilityZone": ["z"], "Volume.Size": ["1"]})
    assert (err.code, err.status) == ("MissingParameter", 400)
    assert err.message == "The request must contain the parameter Image.Format"

    err = error("ImportVolume", {"AvailabilityZone": ["z"], "Image.Format": ["RAW"], "Volume.Size": ["1"]})
    assert err.message == "The request must contain the parameter Image.Bytes"
    with pytest.raises(Ec2Error) as info:
        query.parse("CancelConversionTask", {"ReasonMessage": ["r"]})
    assert info.value.message == "The request must contain the parameter ConversionTaskId"


def test_missing_member_inside_a_list_item_is_named_with_its_index() -> None:
    params = {"Platform": ["Windows"], "DiskImage.1.Image.Format": ["RAW"], "DiskImage.1.Image.Bytes": ["5"]}
    err = error("ImportInstance", params)
    assert err.message == "The request must contain the parameter DiskImage.1.Image.ImportManifestUrl"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("Image.Bytes", "12x", "Expected an integer"),
        ("Image.Bytes", "1.5", "Expected an integer"),
        ("Image.Bytes", str(2**63), "Expected an integer"),
        ("Volume.Size", "", "Expected an integer"),
        ("DryRun", "yes", "Expected true or false"),
    ],
)
def test_refuses_values_of_the_wrong_type(key: str, value: str, expected: str) -> None:
    params = {
        "AvailabilityZone": ["z"],
        "Image.Format": ["RAW"],
        "Image.Bytes": ["1"],
        "Image.ImportManifestUrl": ["u"],
        "Volume.Size": ["1"],
    } | {key: [value]}
    err = error("ImportVolume", params)
    assert err.code == "InvalidParameterValue"
    assert key in err.message and expected in err.message


def test_converts_doubles_timestamps_and_booleans() -> None:
    data = query.parse(
        "ImportImage",
        {
            "ClientData.UploadSize": ["2.5e0"],
            "ClientData.UploadEnd": ["2026-11-22T04:00:00.000Z"],
            "Encrypted": ["TRUE"],
        },
    )
    assert data == {
        "ClientData": {"UploadSize": 2.5, "UploadEnd": datetime(2026, 11, 22, 4, tzinfo=UTC)},
        "Encrypted": True,
    }
    for bad in ("nan", "inf", "1,5"):
        assert error("ImportImage", {"ClientData.UploadSize": [bad]}).code == "InvalidParameterValue"
    assert error("ImportImage", {"ClientData.UploadEnd": ["yesterday"]}).code == "InvalidParameterValue"


@pytest.mark.parametrize(
    "key",
    ["Foo", "Image.Colour", "Image", "Image.Format.Extra", "DiskImage.1.Image.Format", "ConversionTaskId.1"],
)
def test_unknown_parameters_are_refused(key: str) -> None:
    params = {"AvailabilityZone": ["z"], key: ["x"]}
    err = error("ImportVolume", params)
    assert (err.code, err.message) == ("UnknownParameter", f"The parameter {key} is not recognized")


@pytest.mark.parametrize(
    "key", ["ConversionTaskId.0", "ConversionTaskId.01", "ConversionTaskId.x", "ConversionTaskId.1.Id"]
)
def test_list_indexes_must_be_positive_integers(key: str) -> None:
    assert error("DescribeConversionTasks", {key: ["import-i-1"]}).code == "UnknownParameter"


def test_list_indexes_must_be_contiguous_from_one() -> None:
    err = error("DescribeConversionTasks", {"ConversionTaskId.1": ["a"], "ConversionTaskId.3": ["c"]})
    assert err.code == "InvalidParameterValue"
    assert "ConversionTaskId" in err.message and "1, 3" in err.message
    # order of arrival does not matter, the index does
    data = query.parse("DescribeConversionTasks", {"ConversionTaskId.2": ["b"], "ConversionTaskId.1": ["a"]})
    assert data == {"ConversionTaskIds": ["a", "b"]}


def test_a_bare_list_name_is_an_empty_list() -> None:
    assert query.parse("DescribeConversionTasks", {"ConversionTaskId": [""]}) == {"ConversionTaskIds": []}


def test_a_parameter_given_twice_is_refused() -> None:
    err = error("CancelConversionTask", {"ConversionTaskId": ["import-i-1", "import-i-2"]})
    assert err.code == "InvalidParameterValue" and "ConversionTaskId" in err.message


@pytest.mark.parametrize(
    ("action", "params", "member"),
    [
        ("ImportVolume", {"Image.Format": ["QCOW2"]}, "Image.Format"),
        ("ImportInstance", {"Platform": ["Solaris"]}, "Platform"),
        (
            "ImportInstance",
            {"Platform": ["Windows"], "LaunchSpecification.Architecture": ["sparc"]},
            "Architecture",
        ),
        (
            "ImportInstance",
            {"Platform": ["Windows"], "LaunchSpecification.InstanceType": ["m9.huge"]},
            "InstanceType",
        ),
        ("ImportImage", {"DiskContainer.1.Format": ["QCOW2"]}, "DiskContainer.1.Format"),
        ("ImportImage", {"Architecture": ["sparc"]}, "Architecture"),
        ("ImportImage", {"BootMode": ["bios"]}, "BootMode"),
        ("ImportImage", {"TagSpecification.1.ResourceType": ["instance"]}, "ResourceType"),
        ("ImportSnapshot", {"DiskContainer.Format": ["VHDX2"]}, "DiskContainer.Format"),
        ("DescribeImportImageTasks", {"Filters.1.Name": ["state"]}, "Filters.1.Name"),
        (
            "DescribeImportSnapshotTasks",
            {"Filters.1.Name": ["task-state"], "Filters.1.Value.1": ["running"]},
            "Value",
        ),
    ],
)
def test_enum_values_are_validated_server_side(
    action: str, params: dict[str, list[str]], member: str
) -> None:
    err = error(action, params)
    assert err.code == "InvalidParameterValue"
    assert member in err.message and "Valid values" in err.message


def test_enum_case_is_normalised_where_aws_accepts_any_case() -> None:
    base = {
        "AvailabilityZone": ["z"],
        "Image.Bytes": ["1"],
        "Image.ImportManifestUrl": ["u"],
        "Volume.Size": ["1"],
    }
    for spelling in ("vmdk", "Vmdk", "VMDK"):
        assert query.parse("ImportVolume", base | {"Image.Format": [spelling]})["Image"]["Format"] == "VMDK"
    assert (
        query.parse("ImportImage", {"DiskContainer.1.Format": ["vhdx"]})["DiskContainers"][0]["Format"]
        == "VHDX"
    )
    assert query.parse("ImportImage", {"Platform": ["windows"]})["Platform"] == "Windows"
    # ...but not where AWS is case-sensitive
    assert (
        error("DescribeImportImageTasks", {"Filters.1.Name": ["Task-State"]}).code == "InvalidParameterValue"
    )


def test_ova_is_a_disk_container_format_of_import_image() -> None:
    parsed = query.parse("ImportImage", {"DiskContainer.1.Format": ["ova"]})
    assert parsed["DiskContainers"][0]["Format"] == "OVA"
    assert error("ImportImage", {"DiskContainer.1.Format": ["ovf"]}).code == "InvalidParameterValue"


def test_uefi_preferred_boot_mode_is_refused_for_imports() -> None:
    err = error("ImportImage", {"BootMode": ["uefi-preferred"]})
    assert err.code == "InvalidParameterValue" and "uefi-preferred" in err.message


def test_unknown_operation_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        query.parse("LaunchRockets", {})


def test_dry_run_check_raises_dry_run_operation_with_http_412() -> None:
    query.check_dry_run({"DryRun": False})
    with pytest.raises(Ec2Error) as info:
        query.check_dry_run({"DryRun": True})
    assert (info.value.code, info.value.status) == ("DryRunOperation", 412)
    assert info.value.message == "Request would have succeeded, but DryRun flag is set."


# -- Unicode digits, huge numbers and AWS's bounds (issue 10, items 7 and 8) -----------------------

VOLUME = {
    "AvailabilityZone": ["z"],
    "Image.Format": ["RAW"],
    "Image.Bytes": ["1"],
    "Image.ImportManifestUrl": ["u"],
    "Volume.Size": ["1"],
}


@pytest.mark.parametrize(
    ("action", "key"),
    [
        ("DescribeConversionTasks", "ConversionTaskId.²"),
        ("DescribeConversionTasks", "ConversionTaskId.\u0661"),
        ("DescribeImportImageTasks", "Filters.².Name"),
        ("DescribeImportImageTasks", "Filters.1.Value.³"),
        ("ImportImage", "TagSpecification.¹.ResourceType"),
        ("ImportImage", "DiskContainer.\u0663.Format"),
        ("ImportImage", "LicenseSpecifications.².LicenseConfigurationArn"),
        ("ImportInstance", "DiskImage.\U0001d7cf.Image.Format"),
    ],
)
def test_list_index_in_non_ascii_digits_is_an_unknown_parameter(action: str, key: str) -> None:
    assert not key.isascii() and any(c.isdigit() and not c.isascii() for c in key)
    assert error(action, {key: ["x"]}).code == "UnknownParameter"


def test_list_index_too_long_to_be_contiguous_is_refused() -> None:
    err = error("DescribeConversionTasks", {"ConversionTaskId." + "9" * 5000: ["x"]})
    assert err.code == "InvalidParameterValue" and "out of range" in err.message
    assert len(err.message) < 300  # the index is not echoed in full


@pytest.mark.parametrize(
    ("action", "key", "value"),
    [
        ("ImportVolume", "Volume.Size", "\u0661"),
        ("ImportVolume", "Image.Bytes", "\u0663\u0660"),
        ("ImportVolume", "Volume.Size", "²"),
        ("ImportVolume", "Image.Bytes", "1" * 5000),
        ("DescribeImportImageTasks", "MaxResults", "9" * 4301),
        ("DescribeImportSnapshotTasks", "MaxResults", "\u0661\u0660"),
        ("ImportImage", "ClientData.UploadSize", "\u0661.\u0665"),
        ("ImportImage", "ClientData.UploadEnd", "\u0662\u0660\u0662\u0666-01-01T00:00:00"),
    ],
)
def test_numbers_must_be_ascii_digits_of_sane_length(action: str, key: str, value: str) -> None:
    params = (VOLUME if action == "ImportVolume" else {}) | {key: [value]}
    err = error(action, params)
    assert (err.code, key in err.message) == ("InvalidParameterValue", True)
    assert len(err.message) < 300  # a 5,000-digit value is not echoed in full


@pytest.mark.parametrize(
    ("action", "key", "value"),
    [
        ("ImportVolume", "Volume.Size", "9223372036854775807"),
        ("ImportVolume", "Volume.Size", "16385"),
        ("ImportVolume", "Volume.Size", "0"),
        ("ImportVolume", "Volume.Size", "-1"),
        ("ImportVolume", "Image.Bytes", str(16 * 2**40 + 1)),
        ("ImportVolume", "Image.Bytes", "0"),
        ("ImportInstance", "DiskImage.1.Volume.Size", "16385"),
        ("ImportInstance", "DiskImage.1.Image.Bytes", "9223372036854775807"),
        ("ImportInstance", "LaunchSpecification.Placement.PartitionNumber", "8"),
        ("ImportInstance", "LaunchSpecification.Placement.PartitionNumber", "0"),
        ("DescribeImportImageTasks", "MaxResults", "0"),
        ("DescribeImportSnapshotTasks", "MaxResults", "1001"),
        ("ImportImage", "ClientData.UploadSize", "-1"),
        ("ImportSnapshot", "ClientData.UploadSize", "1e300"),
    ],
)
def test_numbers_outside_aws_bounds_are_invalid_parameter_values(action: str, key: str, value: str) -> None:
    params = (VOLUME if action == "ImportVolume" else {}) | {key: [value]}
    err = error(action, params)
    assert err.code == "InvalidParameterValue" and key in err.message and "must be" in err.message


def test_numbers_at_aws_bounds_are_accepted() -> None:
    top = query.parse("ImportVolume", VOLUME | {"Volume.Size": ["16384"], "Image.Bytes": [str(16 * 2**40)]})
    assert (top["Volume"]["Size"], top["Image"]["Bytes"]) == (16384, 16 * 2**40)
    padded = query.parse("ImportVolume", VOLUME | {"Volume.Size": ["0" * 5000 + "8"]})
    assert padded["Volume"]["Size"] == 8  # leading zeros are not digits int() has to count
    assert query.parse("DescribeImportImageTasks", {"MaxResults": ["1000"]}) == {"MaxResults": 1000}
    placement = query.parse(
        "ImportInstance", {"Platform": ["Windows"], "LaunchSpecification.Placement.PartitionNumber": ["7"]}
    )
    assert placement["LaunchSpecification"]["Placement"]["PartitionNumber"] == 7


def _numeric_members(shape: Any, path: tuple[str, ...] = (), seen: frozenset[str] = frozenset()) -> set:
    if shape.type_name == "structure":
        if shape.name in seen:
            return set()
        return {
            found
            for name, member in shape.members.items()
            for found in _numeric_members(member, (*path, name), seen | {shape.name})
        }
    if shape.type_name == "list":
        return _numeric_members(shape.member, (*path, "*"), seen)
    return {path} if shape.type_name in ("integer", "long", "double", "float") else set()


def test_every_numeric_member_of_every_served_action_has_aws_bounds() -> None:
    for action in ACTIONS:
        members = _numeric_members(model.operation(action).input_shape)
        assert members == set(rules.BOUNDS.get(action, {})), action
