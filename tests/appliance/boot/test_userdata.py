"""The imaging: user-data section: parsing every accepted form, validation by field, the mapping."""

from __future__ import annotations

import gzip
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pytest
import yaml

from appliance import config as config_mod
from appliance import redact
from appliance.boot import userdata
from appliance.boot.userdata import CompactUserData, EnrolUserData, UserDataInvalid

SECRET = "controller-shared-secret-0123456789"
API_SECRET = "api-secret-key-abcdefghijklmnop"
CLOUD_CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def section(**over: object) -> dict:
    base = {
        "appliance_id": "appl-1",
        "controller": {
            "url": "https://ctl.example:8443/base/",
            "secret": SECRET,
            "mode": "pull",
            "cloud_cert": CLOUD_CERT,
        },
        "api": {"credentials": [{"access_key": "AKIAAPPLIANCE00001", "secret_key": API_SECRET}]},
        "limits": {
            "concurrent_tasks": 3,
            "scratch": {"path": "/mnt/scratch", "quota": "100GiB"},
            "task_cpu_quota": "50%",
            "task_io_weight": 200,
            "task_io_write_bandwidth": "20MiB",
        },
        "log_level": "debug",
    }
    base.update(over)
    return base


def errors_of(sec: dict, tmp_path: Path) -> dict[str, str]:
    with pytest.raises(UserDataInvalid) as exc:
        userdata.render(sec, tmp_path)
    return {e.field: e.message for e in exc.value.errors}


def test_maps_section_to_a_loadable_service_config(tmp_path: Path) -> None:
    rendered = userdata.render(section(), tmp_path)
    cfg = config_mod.from_dict(rendered.config, base_dir=tmp_path)
    assert cfg.state_dir == Path("/var/lib/imaging")
    assert cfg.scratch.root == Path("/mnt/scratch")
    assert cfg.scratch.quota == 100 * 1024**3
    assert cfg.api.bind == "0.0.0.0:8773"
    assert cfg.api.credentials == {"AKIAAPPLIANCE00001": API_SECRET}
    assert cfg.worker.concurrency == 3
    assert cfg.worker.task_cpu_quota == "50%"
    assert cfg.worker.task_io_weight == 200
    assert cfg.worker.task_io_write_bandwidth == 20 * 1024**2
    assert cfg.worker.task_io_read_bandwidth is None
    assert cfg.log_level == "debug"
    assert (cfg.controller.url, cfg.controller.mode) == ("https://ctl.example:8443/base", "pull")
    assert (cfg.controller.appliance_id, cfg.controller.secret) == ("appl-1", SECRET)
    assert (cfg.controller.cloud_cert, cfg.controller.signature_version) == (CLOUD_CERT, "2")


def test_pull_mode_needs_the_cloud_certificate_and_no_shared_secret(tmp_path: Path) -> None:
    ctl = {"url": "https://ctl.example:8443/", "mode": "pull"}
    assert errors_of(section(controller=ctl), tmp_path) == {
        "imaging.controller.cloud_cert": "required field is missing"
    }
    rendered = userdata.render(
        section(controller=ctl | {"cloud_cert_file": "/etc/imaging/cloud.pem"}), tmp_path
    )
    cfg = config_mod.from_dict(rendered.config, base_dir=tmp_path)
    assert cfg.controller.cloud_cert_file == Path("/etc/imaging/cloud.pem") and cfg.controller.secret is None
    push = section(controller={"url": "https://ctl.example/"})
    assert errors_of(push, tmp_path) == {"imaging.controller.secret": "required field is missing"}


def test_api_keys_keep_their_account_and_role(tmp_path: Path) -> None:
    front = {
        "access_key": "AKIAFRONTEND000001",
        "secret_key": API_SECRET,
        "account": "cloud",
        "role": "frontend",
    }
    sec = section(api={"credentials": [front]})
    cfg = config_mod.from_dict(userdata.render(sec, tmp_path).config, base_dir=tmp_path)
    assert cfg.api.principals["AKIAFRONTEND000001"] == config_mod.Credential(
        "AKIAFRONTEND000001", "cloud", "frontend"
    )
    assert errors_of(section(api={"credentials": [front | {"role": "root"}]}), tmp_path).keys() == {
        "imaging.api.credentials.0.role"
    }


def test_appliance_without_controller_gets_reporting_off(tmp_path: Path) -> None:
    sec = section()
    del sec["controller"]
    cfg = config_mod.from_dict(userdata.render(sec, tmp_path).config, base_dir=tmp_path)
    assert cfg.controller.mode == "off"
    assert cfg.controller.appliance_id == "appl-1"
    assert cfg.scratch.root == Path("/mnt/scratch")


def test_default_scratch_is_under_the_state_dir(tmp_path: Path) -> None:
    sec = section(limits={"concurrent_tasks": 1})
    cfg = config_mod.from_dict(userdata.render(sec, tmp_path).config, base_dir=tmp_path)
    assert cfg.scratch.root == Path("/var/lib/imaging/scratch")


def test_tls_pems_become_files_next_to_the_config(tmp_path: Path) -> None:
    cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    key = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"
    sec = section(api={"credentials": section()["api"]["credentials"], "tls": {"cert": cert, "key": key}})
    rendered = userdata.render(sec, tmp_path)
    assert rendered.files == {tmp_path / "tls" / "cert.pem": cert, tmp_path / "tls" / "key.pem": key}
    assert rendered.config["api"]["tls"] == {
        "cert": str(tmp_path / "tls" / "cert.pem"),
        "key": str(tmp_path / "tls" / "key.pem"),
    }


def test_bad_controller_url_names_the_field_and_the_pattern(tmp_path: Path) -> None:
    errs = errors_of(section(controller={"url": "ftp://x", "secret": SECRET}), tmp_path)
    assert errs == {"imaging.controller.url": "'ftp://x' does not match '^https?://'"}


def test_controller_url_with_user_info_is_refused_without_echoing_it(tmp_path: Path) -> None:
    errs = errors_of(section(controller={"url": "https://u:pw123@h/", "secret": SECRET}), tmp_path)
    assert "user info" in errs["imaging.controller.url"]
    assert "pw123" not in errs["imaging.controller.url"]


def test_controller_url_with_a_bad_port_is_refused(tmp_path: Path) -> None:
    errs = errors_of(section(controller={"url": "https://h:99999", "secret": SECRET}), tmp_path)
    assert errs["imaging.controller.url"].startswith("'https://h:99999' is not a valid URL")


def test_missing_appliance_id_is_named(tmp_path: Path) -> None:
    sec = section()
    del sec["appliance_id"]
    assert errors_of(sec, tmp_path) == {"imaging.appliance_id": "required field is missing"}


def test_unknown_key_is_named_with_the_allowed_ones(tmp_path: Path) -> None:
    errs = errors_of(section(api={"credentials": section()["api"]["credentials"], "port": 1}), tmp_path)
    assert list(errs) == ["imaging.api.port"]
    assert errs["imaging.api.port"].startswith("unknown key (allowed: bind, credentials, region, tls)")


def test_short_secret_is_reported_without_its_value(tmp_path: Path) -> None:
    creds = [{"access_key": "AKIAAPPLIANCE00001", "secret_key": "tiny-secret"}]
    errs = errors_of(section(api={"credentials": creds}), tmp_path)
    assert errs == {"imaging.api.credentials.0.secret_key": "the value is too short (at least 16 characters)"}


def test_every_problem_is_listed_not_only_the_first(tmp_path: Path) -> None:
    sec = section(log_level="loud", limits={"task_cpu_quota": "half", "scratch": {"quota": "lots"}})
    errs = errors_of(sec, tmp_path)
    assert set(errs) == {
        "imaging.log_level",
        "imaging.limits.task_cpu_quota",
        "imaging.limits.scratch.quota",
    }
    assert "not a size" in errs["imaging.limits.scratch.quota"]


def test_target_settings_are_checked_by_the_targets_own_schema(tmp_path: Path) -> None:
    errs = errors_of(section(targets={"volume": {"type": "ec2", "region": "r1"}}), tmp_path)
    assert errs == {"imaging.targets.volume.instance_id": "required field is missing"}


def test_cloud_config_document_is_parsed() -> None:
    doc = "#cloud-config\npackages: [htop]\n" + yaml.safe_dump({"imaging": section()})
    assert userdata.parse_user_data(doc) == section()


def test_gzip_and_mime_multipart_user_data_are_accepted() -> None:
    doc = "#cloud-config\n" + yaml.safe_dump({"imaging": section()})
    assert userdata.parse_user_data(gzip.compress(doc.encode())) == section()
    mime = MIMEMultipart()
    mime.attach(MIMEText("#!/bin/sh\necho hi\n", "x-shellscript"))
    mime.attach(MIMEText(doc, "cloud-config"))
    assert userdata.parse_user_data(mime.as_string()) == section()


def test_shell_script_user_data_is_refused_with_a_hint() -> None:
    with pytest.raises(UserDataInvalid) as exc:
        userdata.parse_user_data("#!/bin/sh\necho hi\n")
    assert exc.value.errors[0].field == "user-data"
    assert "'#!/bin/sh'" in exc.value.errors[0].message


def test_yaml_syntax_error_gives_the_line_but_not_its_text() -> None:
    with pytest.raises(UserDataInvalid) as exc:
        userdata.parse_user_data(f"#cloud-config\nimaging:\n  secret: [{SECRET}\n")
    message = exc.value.errors[0].message
    assert "line" in message
    assert SECRET not in message


def test_missing_imaging_section_is_named() -> None:
    with pytest.raises(UserDataInvalid) as exc:
        userdata.parse_user_data("#cloud-config\npackages: [htop]\n")
    assert exc.value.errors[0].field == "imaging"


def test_compact_form_splits_the_url_at_its_last_colon() -> None:
    parsed = userdata.parse_user_data(f"imaging:v1:appl-7:http://10.0.0.1:8080/ctl:{SECRET}\n")
    assert parsed == CompactUserData("appl-7", "http://10.0.0.1:8080/ctl", SECRET)


def test_compact_form_without_an_id_asks_for_an_assignment() -> None:
    parsed = userdata.parse_user_data(f"imaging:v1::https://ctl.example:8443/fleet:{SECRET}\n")
    assert parsed == EnrolUserData("https://ctl.example:8443/fleet", SECRET)


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("imaging:v1::https://ctl.example:short", "imaging.controller.secret"),
        (f"imaging:v1::ftp://ctl.example:{SECRET}", "imaging.controller.url"),
        (f"imaging:v1::https://u:p@ctl.example:{SECRET}", "imaging.controller.url"),
    ],
)
def test_compact_form_without_an_id_is_checked_as_the_full_line(line: str, field: str) -> None:
    with pytest.raises(UserDataInvalid) as exc:
        userdata.parse_user_data(line)
    assert {e.field for e in exc.value.errors} == {field}


def test_compact_form_with_unknown_version_is_refused() -> None:
    with pytest.raises(UserDataInvalid) as exc:
        userdata.parse_user_data(f"imaging:v2:a:http://h:{SECRET}")
    assert "v2 is not supported" in exc.value.errors[0].message


def test_compact_form_with_short_secret_names_the_secret_field() -> None:
    with pytest.raises(UserDataInvalid) as exc:
        userdata.parse_user_data("imaging:v1:appl-7:http://10.0.0.1:8080:short")
    assert {e.field for e in exc.value.errors} == {"imaging.controller.secret"}
    assert "short" not in exc.value.errors[0].message.replace("too short", "")


def test_redact_hides_secret_keys_and_url_passwords() -> None:
    red = redact.redact(section(sources={"allowed_endpoints": ["https://u:pw@s3.example"]}))
    text = repr(red)
    assert SECRET not in text and API_SECRET not in text and "pw@" not in text
    assert red["api"]["credentials"][0]["access_key"] == "AKIAAPPLIANCE00001"


# --- hooks and the artifact store -----------------------------------------------------------------

ARTIFACT_SECRET = "Artifact+Store/Secret_0123456789"
INJECT = {
    "hook": "inject-metadata",
    "name": "marker",
    "with": {"files": [{"path": "/etc/m", "content": "x"}]},
}


def test_hooks_and_artifacts_render_to_a_config_the_service_loads(tmp_path: Path) -> None:
    sec = section(
        hooks={"points": {"after_convert": [INJECT], "after_fetch": [{"hook": "decompress", "timeout": 60}]}},
        artifacts={
            "bucket": "imaging-artifacts",
            "prefix": "wf",
            "endpoint_url": "http://s3.lab:9000",
            "region": "eu-1",
            "access_key": "AKIASTORE",
            "secret_key": ARTIFACT_SECRET,
        },
    )
    out = tmp_path / "imaging.yaml"
    out.write_text(yaml.safe_dump(userdata.render(sec, tmp_path).config))

    cfg = config_mod.load(out)

    assert [(h.name, h.action, h.args) for h in cfg.hooks.at("after_convert")] == [
        ("marker", "hook.inject-metadata", INJECT["with"])
    ]
    assert [(h.action, h.timeout) for h in cfg.hooks.at("after_fetch")] == [("hook.decompress", 60)]
    assert cfg.hooks.at("before_write") == ()
    assert (cfg.artifacts.bucket, cfg.artifacts.prefix) == ("imaging-artifacts", "wf")
    assert cfg.artifacts.s3["secret_key"] == ARTIFACT_SECRET
    assert cfg.artifacts.s3["endpoint_url"] == "http://s3.lab:9000"


def test_unknown_hook_point_is_named_as_the_field(tmp_path: Path) -> None:
    errors = errors_of(section(hooks={"points": {"after_convret": [INJECT]}}), tmp_path)
    assert list(errors) == ["imaging.hooks.points.after_convret"]
    assert "after_convert" in errors["imaging.hooks.points.after_convret"]  # the allowed points are listed


def test_malformed_hook_entry_names_its_index_and_key(tmp_path: Path) -> None:
    errors = errors_of(section(hooks={"points": {"before_write": [INJECT, {"hok": "policy"}]}}), tmp_path)
    assert set(errors) == {
        "imaging.hooks.points.before_write.1.hok",
        "imaging.hooks.points.before_write.1.hook",
    }


def test_unknown_hook_name_and_bad_hook_arguments_are_refused_at_configure(tmp_path: Path) -> None:
    bad_args = {"hook": "inject-metadata", "with": {"files": [{"path": "/etc/m", "content": 3}]}}
    errors = errors_of(
        section(hooks={"points": {"after_convert": [{"hook": "inject-metdata"}, bad_args]}}), tmp_path
    )
    assert "unknown hook 'inject-metdata'" in errors["imaging.hooks.points.after_convert.0.hook"]
    assert "not of type 'string'" in errors["imaging.hooks.points.after_convert.1.with.files.0.content"]


def test_hooks_from_a_plugins_dir_are_left_to_the_worker(tmp_path: Path) -> None:
    # the operator's actions are only known once its code is loaded, which configure does not do
    sec = section(hooks={"plugins_dir": "/opt/hooks", "points": {"after_inspect": [{"hook": "acme.scan"}]}})
    cfg = config_mod.from_dict(userdata.render(sec, tmp_path).config, base_dir=tmp_path)
    assert cfg.hooks.plugins_dir == Path("/opt/hooks")
    assert [h.action for h in cfg.hooks.at("after_inspect")] == ["acme.scan"]


def test_artifact_store_secret_is_never_echoed_in_errors(tmp_path: Path) -> None:
    # the secret pasted into the bucket too, and a secret without its access key
    sec = section(artifacts={"bucket": ARTIFACT_SECRET, "secret_key": ARTIFACT_SECRET})
    with pytest.raises(UserDataInvalid) as exc:
        userdata.render(sec, tmp_path)
    fields = {e.field for e in exc.value.errors}
    assert {"imaging.artifacts.bucket", "imaging.artifacts"} <= fields
    assert ARTIFACT_SECRET not in str(exc.value)
    # what is reported to the controller: the key's value, and the secret wherever else it was pasted
    assert redact.redact(sec)["artifacts"]["secret_key"] == redact.REDACTED
    assert ARTIFACT_SECRET not in str(redact.redact(sec, redact.secret_values(sec)))


BUNDLE_KEY = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n"
    "-----END PRIVATE KEY-----\n"
)


def test_bundle_cloud_key_renders_to_the_service_config_and_is_redacted(tmp_path: Path) -> None:
    sec = section(bundles={"cloud_private_key": BUNDLE_KEY, "parallel_parts": 6})
    cfg = config_mod.from_dict(userdata.render(sec, tmp_path).config, base_dir=tmp_path)
    assert (cfg.bundles.cloud_private_key, cfg.bundles.parallel_parts) == (BUNDLE_KEY, 6)
    assert "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7" not in str(redact.redact(sec))
    assert "MIIEvQ" not in repr(cfg.bundles)


def test_limits_max_active_tasks_becomes_tasks_max_active_and_a_bad_one_is_named(tmp_path: Path) -> None:
    rendered = userdata.render({"appliance_id": "a-1", "limits": {"max_active_tasks": 7}}, tmp_path)
    assert config_mod.from_dict(rendered.config, base_dir=tmp_path).max_active_tasks == 7
    with pytest.raises(UserDataInvalid) as caught:
        userdata.render({"appliance_id": "a-1", "limits": {"max_active_tasks": 0}}, tmp_path)
    assert [e.field for e in caught.value.errors] == ["imaging.limits.max_active_tasks"]
