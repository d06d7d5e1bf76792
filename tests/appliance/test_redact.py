"""appliance.redact: what a secret is, the URL scrubber, free text, structures, log records."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from appliance import config as config_mod
from appliance import redact
from appliance.errors import ConfigError, ImagingError

SIGNATURE = "5f1e0c9d2b7a4e8f90a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3"
TOKEN = "FwoGZXIvYXdzEFAaDSessionTokenValue0123456789"
PRESIGNED = (
    "https://objects.example:8773/uploads/euca/disk.raw.manifest.xml?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAUPLOADER000001%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z"
    f"&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token={TOKEN}&X-Amz-Signature={SIGNATURE}"
)


@pytest.mark.parametrize(
    ("key", "parent"),
    [
        ("secret_key", None),
        ("secret", "controller"),
        ("SecretAccessKey", None),
        ("aws_secret_access_key", None),
        ("password", None),
        ("db-password", None),
        ("session_token", None),
        ("SecurityToken", None),
        ("X-Amz-Signature", None),
        ("private_key", None),
        ("key", "tls"),
    ],
)
def test_secret_keys_are_recognised_in_any_spelling(key: str, parent: str | None) -> None:
    assert redact.is_secret_key(key, parent)


@pytest.mark.parametrize(
    ("key", "parent"),
    [
        ("access_key", None),
        ("credentials", "api"),
        ("key", "disk_container"),
        ("ClientToken", None),
        ("signature_versions", "ec2"),
        ("url", None),
    ],
)
def test_identifiers_that_only_look_secret_are_shown(key: str, parent: str | None) -> None:
    assert not redact.is_secret_key(key, parent)


def test_presigned_url_keeps_its_object_but_loses_signature_credential_and_token() -> None:
    shown = redact.redact_url(PRESIGNED)
    assert shown.startswith("https://objects.example:8773/uploads/euca/disk.raw.manifest.xml?")
    assert SIGNATURE not in shown and TOKEN not in shown and "AKIAUPLOADER000001" not in shown
    assert "X-Amz-Signature=REDACTED" in shown and "X-Amz-Security-Token=REDACTED" in shown
    assert "X-Amz-Expires=3600" in shown and "X-Amz-Date=20260101T000000Z" in shown


def test_sigv2_url_with_user_info_loses_both() -> None:
    url = "https://ops:hunter2hunter2@s3.example/b/k?AWSAccessKeyId=AKIAV2&Expires=9&Signature=abc%2Bdef%3D"
    assert redact.redact_url(url) == (
        "https://REDACTED@s3.example/b/k?AWSAccessKeyId=REDACTED&Expires=9&Signature=REDACTED"
    )


def test_url_without_secrets_is_unchanged_byte_for_byte() -> None:
    url = "https://s3.example/b/disk%20one.raw?versionId=3&x=a%2Fb#part"
    assert redact.redact_url(url) == url
    assert redact.redact_text("run artifact://fix-script@1.0 now") == "run artifact://fix-script@1.0 now"


def test_message_with_a_url_a_pair_a_header_and_a_pem_keeps_only_what_is_safe() -> None:
    pem = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIB\n-----END EC PRIVATE KEY-----"
    text = (
        f"GET {PRESIGNED}: HTTP 403; retry with password=correct-horse "
        f"{{'secret_key': 'wJalrXUtnFEMI', 'region': 'us-east-1'}} "
        f"Authorization: AWS4-HMAC-SHA256 Credential=AKIAX/20260101, Signature={SIGNATURE}\n{pem}"
    )
    shown = redact.redact_text(text)
    for secret in (SIGNATURE, TOKEN, "correct-horse", "wJalrXUtnFEMI", "MHcCAQEEIB"):
        assert secret not in shown
    assert "HTTP 403" in shown and "'region': 'us-east-1'" in shown and ": HTTP 403" in shown


def test_header_and_yaml_lines_with_secret_names_lose_their_values() -> None:
    text = "host:s3.example\nx-amz-security-token:FwoGZXIvYXdz\ncontroller:\n  secret: ctl-0123456789abcdef\n"
    assert redact.redact_text(text) == (
        "host:s3.example\nx-amz-security-token:REDACTED\ncontroller:\n  secret: REDACTED\n"
    )


def test_remembered_values_are_scrubbed_wherever_they_appear_but_short_ones_are_not() -> None:
    redact.remember(["a-remembered-secret-0001", "short"])
    assert redact.redact_text("plugin said a-remembered-secret-0001!") == "plugin said REDACTED!"
    assert redact.redact_text("a short note") == "a short note"


def test_structures_hide_secret_values_and_scrub_every_string() -> None:
    config = {
        "api": {
            "credentials": [{"access_key": "AKIAAPI", "secret_key": "api-secret"}],
            "tls": {"key": "/k.pem"},
        },
        "controller": {"url": "https://controller.example", "secret": "ctl-secret", "report_interval": 30},
        "sources": {"s3": {"secret_key": ""}},
        "hooks": {"points": {"before_write": [{"hook": "x.y", "with": {"note": PRESIGNED}}]}},
    }
    shown = redact.redact(config)
    assert shown["api"]["credentials"] == [{"access_key": "AKIAAPI", "secret_key": "REDACTED"}]
    assert shown["api"]["tls"]["key"] == "REDACTED"
    assert shown["controller"] == {
        "url": "https://controller.example",
        "secret": "REDACTED",
        "report_interval": 30,
    }
    assert shown["sources"]["s3"]["secret_key"] == ""  # not set stays visibly not set
    assert SIGNATURE not in str(shown)
    assert redact.secret_values(config) == {"api-secret", "/k.pem", "ctl-secret"}


def test_configuration_errors_never_quote_a_secret_not_even_a_wrong_one() -> None:
    pasted = "Pasted+The+Secret+0123456789"  # not a valid bucket name: the error is about it
    with pytest.raises(ConfigError) as exc:
        config_mod.from_dict(
            {
                "controller": {
                    "mode": "push",
                    "url": "https://c.example",
                    "appliance_id": "a",
                    "secret": "short1",
                },
                "artifacts": {"bucket": pasted, "access_key": "AKIA", "secret_key": pasted},
            }
        )
    message = exc.value.message
    assert "controller.secret: the value is not valid (minLength: 16)" in message
    assert "artifacts.bucket" in message  # the field is named, the value is not
    assert "short1" not in message and pasted not in message


def test_error_messages_are_redacted_where_they_are_read() -> None:
    exc = ImagingError(f"the part at {PRESIGNED} answered 403")
    assert SIGNATURE not in exc.message and SIGNATURE not in str(exc)
    assert exc.to_dict()["message"] == exc.message


@pytest.fixture
def redacting_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """install_logging() for one test: the record factory is put back afterwards."""
    saved = logging.getLogRecordFactory()
    # from the plain factory, whatever an earlier test of this process installed
    logging.setLogRecordFactory(logging.LogRecord)
    monkeypatch.setattr(redact, "_base_factory", None)
    redact.install_logging()
    redact.install_logging()  # twice, as two CLI runs in one process do: still one layer
    try:
        yield
    finally:
        logging.setLogRecordFactory(saved)


@pytest.mark.usefixtures("redacting_logs")
def test_log_records_are_redacted_with_their_exception_text(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("tests.redact")
    with caplog.at_level(logging.INFO, logger="tests.redact"):
        log.info("fetching %s", PRESIGNED)
        try:
            raise RuntimeError(f"boom at {PRESIGNED}")
        except RuntimeError:
            log.exception("failed")
    assert len(caplog.records) == 2 and "REDACTED" in caplog.text
    assert SIGNATURE not in caplog.text and TOKEN not in caplog.text
