"""S3 bucket-name and object-key rules (appliance.sources.s3names), as S3 documents them."""

from __future__ import annotations

import pytest

from appliance.sources.s3names import InvalidS3Name, bucket_problem, check_bucket, check_key, key_problem


@pytest.mark.parametrize(
    "name", ["abc", "my-bucket", "disks.example.com", "a" * 63, "1-2-3", "192.168.5", "import-disks-2026"]
)
def test_valid_bucket_names(name: str) -> None:
    assert bucket_problem(name) is None
    assert check_bucket(name) == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("ab", "3 to 63"),
        ("a" * 64, "3 to 63"),
        ("", "3 to 63"),
        ("Bad_Bucket", "lower-case"),
        ("bad bucket", "lower-case"),
        ("bücket", "lower-case"),
        ("-bucket", "begin and end"),
        ("bucket.", "begin and end"),
        ("my..bucket", "adjacent periods"),
        ("192.168.5.4", "IP address"),
        ("xn--bucket", "prefix"),
        ("sthree-bucket", "prefix"),
        ("amzn-s3-demo-bucket", "prefix"),
        ("bucket-s3alias", "suffix"),
        ("bucket--ol-s3", "suffix"),
        ("bucket.mrap", "suffix"),
        ("bucket--usw2-az1--x-s3", "suffix"),
        ("bucket--table-s3", "suffix"),
    ],
)
def test_invalid_bucket_names_say_which_rule_they_break(name: str, why: str) -> None:
    assert why in (bucket_problem(name) or "")
    with pytest.raises(InvalidS3Name) as info:
        check_bucket(name, "UserBucket.S3Bucket")
    assert info.value.code == "InvalidParameterValue"
    assert info.value.message.startswith("UserBucket.S3Bucket ") and why in info.value.message


@pytest.mark.parametrize("key", ["k", "disks/disk.vmdk", "a b/ü?x#y", "x" * 1024, "ü" * 512, "dir/.hidden"])
def test_valid_object_keys(key: str) -> None:
    assert key_problem(key) is None
    assert check_key(key) == key


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("", "empty"),
        ("x" * 1025, "1024"),
        ("ü" * 513, "1024"),
        ("a\x00b", "control"),
        ("line\nbreak", "control"),
        ("\x7f", "control"),
        ("../other-bucket/secret", "path segments"),
        ("a/./b", "path segments"),
        ("a/..", "path segments"),
        ("\ud800", "UTF-8"),
    ],
)
def test_invalid_object_keys_say_which_rule_they_break(key: str, why: str) -> None:
    assert why in (key_problem(key) or "")
    with pytest.raises(InvalidS3Name, match="is not a valid S3 object key"):
        check_key(key)


def test_messages_quote_a_long_name_only_in_part() -> None:
    with pytest.raises(InvalidS3Name) as info:
        check_key("x" * 100_000)
    assert len(info.value.message) < 300
