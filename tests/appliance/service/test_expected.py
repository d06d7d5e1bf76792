"""The expected-digest rules of a request (:mod:`appliance.service.expected`): the extra member and
the ``Description`` token, as the EC2 handlers apply them before a task exists."""

from __future__ import annotations

import hashlib

import pytest

from appliance.errors import UsageError
from appliance.service import bootparams, expected

DIGEST = hashlib.sha256(b"disk").hexdigest()


def test_the_member_and_the_token_give_the_digest_in_lower_case() -> None:
    assert expected.resolve(DIGEST.upper(), None) == DIGEST
    assert expected.resolve(None, f"web tier [imaging:sha256={DIGEST.upper()}]") == DIGEST
    assert expected.resolve(DIGEST, f"[imaging:sha256={DIGEST}]") == DIGEST
    assert expected.resolve(None, "no token here") is None


def test_the_token_combines_with_the_boot_settings() -> None:
    description = f"[imaging:kernel=aki-1234abcd,sha256={DIGEST}]"
    assert expected.resolve(None, description) == DIGEST
    boot = bootparams.resolve({}, description)
    assert boot.kernel_id == "aki-1234abcd" and boot.virtualization_type == "paravirtual"


@pytest.mark.parametrize("value", ["abc", "z" * 64, DIGEST + "0", f"sha256:{DIGEST}"])
def test_a_malformed_digest_is_an_invalid_parameter_value_naming_where_it_came_from(value: str) -> None:
    with pytest.raises(UsageError) as member:
        expected.resolve(value, None)
    assert member.value.code == "InvalidParameterValue" and "ExpectedSha256" in member.value.message
    with pytest.raises(UsageError) as token:
        expected.resolve(None, f"[imaging:sha256={value}]")
    assert token.value.code == "InvalidParameterValue" and "Description" in token.value.message
    assert "64 hexadecimal digits" in token.value.message


def test_a_member_and_a_token_that_disagree_are_refused() -> None:
    other = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(UsageError) as exc:
        expected.resolve(DIGEST, f"[imaging:sha256={other}]")
    assert exc.value.code == "InvalidParameterCombination"
    assert DIGEST in exc.value.message and other in exc.value.message


def test_a_disks_own_digest_comes_from_its_member_or_its_descriptions_token() -> None:
    assert expected.resolve_disk(DIGEST.upper(), None, "DiskContainer.2") == DIGEST
    assert expected.resolve_disk(None, f"data [imaging:sha256={DIGEST}]", "DiskContainer.2") == DIGEST
    assert expected.resolve_disk(None, "data", "DiskContainer.2") is None
    with pytest.raises(UsageError) as exc:
        expected.resolve_disk("abc", None, "DiskContainer.2")
    assert exc.value.code == "InvalidParameterValue" and "DiskContainer.2.ExpectedSha256" in exc.value.message


def test_a_disks_token_takes_no_boot_setting() -> None:
    with pytest.raises(UsageError) as exc:
        expected.resolve_disk(None, f"[imaging:kernel=aki-1234abcd,sha256={DIGEST}]", "DiskContainer.3")
    assert exc.value.code == "InvalidParameterValue"
    assert "DiskContainer.3.Description" in exc.value.message and "kernel" in exc.value.message


def test_the_requests_digest_is_the_first_disks_and_may_not_differ_from_its_own() -> None:
    other = hashlib.sha256(b"other").hexdigest()
    assert expected.first_disk(DIGEST, None) == expected.first_disk(None, DIGEST) == DIGEST
    assert expected.first_disk(DIGEST, DIGEST) == DIGEST and expected.first_disk(None, None) is None
    with pytest.raises(UsageError) as exc:
        expected.first_disk(DIGEST, other)
    assert exc.value.code == "InvalidParameterCombination" and "DiskContainer.1" in exc.value.message
