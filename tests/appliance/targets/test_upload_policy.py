"""The BundleInstance upload policy is checked before use (appliance.targets.upload_policy): a policy made
and signed as euca-bundle-instance does (computed here with hmac/base64, not the appliance's code) is
accepted; a forged, changed, expired or too narrow one is refused with its code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from appliance.targets.upload_policy import UploadPolicyInvalid, check_upload_policy

SECRET = "bundle-owner-secret-key-0123456789"
NOW = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)


def _policy(conditions: list[Any], *, hours: int = 24) -> str:
    expiration = (NOW + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return base64.b64encode(
        json.dumps({"expiration": expiration, "conditions": conditions}).encode()
    ).decode()


def _sign(policy: str, secret: str = SECRET) -> str:
    return base64.b64encode(hmac.new(secret.encode(), policy.encode(), hashlib.sha1).digest()).decode()


EUCA = [{"acl": "ec2-bundle-read"}, {"bucket": "bundles"}, ["starts-with", "$key", "winvm"]]


def test_a_policy_as_euca_bundle_instance_writes_it_is_accepted() -> None:
    policy = _policy(EUCA)
    got = check_upload_policy(policy, _sign(policy), SECRET, bucket="bundles", prefix="winvm-2026", now=NOW)
    assert (got.bucket, got.acl, got.key_prefix) == ("bundles", "ec2-bundle-read", "winvm-2026")


def _refused(policy: str, signature: str, *, bucket: str = "bundles", prefix: str = "winvm") -> str:
    with pytest.raises(UploadPolicyInvalid) as info:
        check_upload_policy(policy, signature, SECRET, bucket=bucket, prefix=prefix, now=NOW)
    assert SECRET not in info.value.message and signature not in info.value.message
    return info.value.code


def test_a_forged_policy_is_refused() -> None:
    policy = _policy(EUCA)
    assert _refused(policy, _sign(policy, "someone-elses-secret")) == "UploadPolicyInvalid.Signature"
    # a policy widened after it was signed: the signature no longer covers it
    wider = _policy([{"acl": "ec2-bundle-read"}, {"bucket": "bundles"}, ["starts-with", "$key", ""]])
    assert _refused(wider, _sign(policy)) == "UploadPolicyInvalid.Signature"


@pytest.mark.parametrize(
    ("conditions", "hours", "bucket", "prefix", "code"),
    [
        (EUCA, -1, "bundles", "winvm", "UploadPolicyInvalid.Expired"),
        (EUCA, 24, "other-bucket", "winvm", "UploadPolicyInvalid.Bucket"),
        (EUCA, 24, "bundles", "linux", "UploadPolicyInvalid.Key"),
        (
            [{"bucket": "bundles"}, ["starts-with", "$key", "winvm"]],
            24,
            "bundles",
            "winvm",
            "UploadPolicyInvalid.Acl",
        ),
        (
            [{"acl": "private"}, {"bucket": "bundles"}, {"key": "winvm"}],
            24,
            "bundles",
            "winvm",
            "UploadPolicyInvalid.Key",
        ),
        ([["in", "$key", "x"]], 24, "bundles", "winvm", "UploadPolicyInvalid.Malformed"),
    ],
)
def test_a_policy_that_does_not_grant_the_bundle_is_refused(
    conditions: list[Any], hours: int, bucket: str, prefix: str, code: str
) -> None:
    policy = _policy(conditions, hours=hours)
    assert _refused(policy, _sign(policy), bucket=bucket, prefix=prefix) == code


def test_a_signed_document_that_is_not_json_is_malformed() -> None:
    policy = base64.b64encode(b"not json").decode()
    assert _refused(policy, _sign(policy)) == "UploadPolicyInvalid.Malformed"
