"""What an import's Encrypted/KmsKeyId ask for, the KMS key forms accepted, and when what a store
reports applying counts as what was asked."""

from __future__ import annotations

import pytest

from appliance.errors import ImagingError
from appliance.targets.encryption import Encryption, check_kms_key_id, requested, satisfies

KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
KEY_ARN = f"arn:aws:kms:us-east-1:012345678910:key/{KEY_ID}"
OTHER_KEY_ARN = "arn:aws:kms:us-east-1:012345678910:key/0000abcd-12ab-34cd-56ef-1234567890ab"


@pytest.mark.parametrize(
    "key",
    [
        KEY_ID,
        "mrk-1234abcd12ab34cd56ef1234567890ab",
        "alias/ExampleAlias",
        "alias/aws/ebs",
        "alias/team_a/disks-2",
        KEY_ARN,
        "arn:aws:kms:us-east-1:012345678910:alias/ExampleAlias",
        "arn:aws-us-gov:kms:us-gov-west-1:012345678910:key/mrk-1234abcd12ab34cd56ef1234567890ab",
        "arn:aws-cn:kms:cn-north-1:012345678910:alias/disks",
    ],
)
def test_kms_key_ids_in_every_form_kms_knows_are_accepted(key: str) -> None:
    assert check_kms_key_id(key) == key
    assert requested(True, key) == Encryption("aws:kms", key)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "k",
        "1234abcd-12ab-34cd-56ef-1234567890",  # one group short
        "1234ABCD-12AB-34CD-56EF-1234567890AB",  # KMS key ids are lower-case hex
        "mrk-1234",
        "alias/",
        "alias/with space",
        "alias/" + "a" * 251,
        "ExampleAlias",
        "arn:aws:kms:us-east-1:012345678910:ExampleAlias",
        "arn:aws:kms:us-east-1:12345:key/" + KEY_ID,  # account ids have 12 digits
        "arn:aws:s3:us-east-1:012345678910:key/" + KEY_ID,  # not a KMS ARN
        "arn:aws:kms:us-east-1:012345678910:key/not-a-key",
        KEY_ID + "\n",
    ],
)
def test_malformed_kms_key_ids_are_invalid_parameter_value(key: str) -> None:
    with pytest.raises(ImagingError) as exc:
        requested(True, key)
    assert exc.value.code == "InvalidParameterValue"
    assert "alias/ExampleAlias" in exc.value.message  # the message shows the accepted forms


def test_encrypted_alone_asks_for_aes256_and_nothing_asks_for_nothing() -> None:
    assert requested(True, None) == Encryption("AES256")
    assert requested(False, None) is None


@pytest.mark.parametrize("key", [KEY_ID, "", "not even a key"])
def test_kms_key_id_without_encrypted_is_invalid_parameter_dependency(key: str) -> None:
    with pytest.raises(ImagingError) as exc:
        requested(False, key)
    assert exc.value.code == "InvalidParameterDependency"
    assert exc.value.message == "The parameter KmsKeyId requires the parameter Encrypted to be set."


@pytest.mark.parametrize(
    ("applied", "wanted", "ok"),
    [
        (Encryption("AES256"), Encryption("AES256"), True),
        (None, Encryption("AES256"), False),
        (Encryption("aws:kms", KEY_ARN), Encryption("AES256"), False),
        (Encryption("AES256"), Encryption("aws:kms", KEY_ID), False),
        (Encryption("aws:kms"), Encryption("aws:kms", KEY_ID), False),  # no key named
        (Encryption("aws:kms", KEY_ID), Encryption("aws:kms", KEY_ID), True),
        # S3 on AWS reports the key's ARN whatever form the request used
        (Encryption("aws:kms", KEY_ARN), Encryption("aws:kms", KEY_ID), True),
        (Encryption("aws:kms", KEY_ID), Encryption("aws:kms", KEY_ARN), True),
        (Encryption("aws:kms", OTHER_KEY_ARN), Encryption("aws:kms", KEY_ID), False),
        (Encryption("aws:kms", OTHER_KEY_ARN), Encryption("aws:kms", KEY_ARN), False),
        # an alias is resolved by KMS: any key the store names is taken
        (Encryption("aws:kms", KEY_ARN), Encryption("aws:kms", "alias/disks"), True),
        (Encryption("aws:kms", "alias/disks"), Encryption("aws:kms", "alias/disks"), True),
        (Encryption("aws:kms:dsse", KEY_ARN), Encryption("aws:kms", KEY_ID), False),
    ],
)
def test_what_the_store_applied_satisfies_the_request_only_when_it_is_what_was_asked(
    applied: Encryption | None, wanted: Encryption, ok: bool
) -> None:
    assert satisfies(applied, wanted) is ok


def test_encryption_round_trips_through_its_stored_form() -> None:
    for e in (Encryption("AES256"), Encryption("aws:kms", KEY_ARN)):
        assert Encryption.from_dict(e.to_dict()) == e
    assert Encryption.from_dict(None) is None
