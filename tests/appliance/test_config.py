"""Configuration: schema validation with precise errors, size parsing, defaults, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import config
from appliance.errors import ConfigError
from appliance.redact import redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [(1024, 1024), ("1KiB", 1024), ("1K", 1000), ("20GiB", 20 * 1024**3), ("1.5G", 1_500_000_000), ("7", 7)],
)
def test_parses_sizes_with_units(text: int | str, expected: int) -> None:
    assert config.parse_size(text) == expected


def test_rejects_a_size_without_a_number() -> None:
    with pytest.raises(ConfigError, match="not a size"):
        config.parse_size("lots")


def test_embedded_defaults_apply_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.ENV_CONFIG, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    cfg = config.from_dict({})
    assert cfg.state_dir == tmp_path / "imaging"
    assert cfg.scratch.root == tmp_path / "imaging" / "scratch"
    assert cfg.safety.vmdk_allowed_types == ("monolithicSparse", "streamOptimized")
    assert "qed" in cfg.safety.banned_formats
    assert cfg.limits.qemu_img_address_space == 1024**3
    assert cfg.limits.qemu_img_output == 64 << 20


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    f = tmp_path / "etc" / "imaging.yaml"
    f.parent.mkdir()
    f.write_text("state_dir: ../state\nscratch:\n  root: scratch\n  quota: 2GiB\n")
    cfg = config.load(f)
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.scratch.root == tmp_path / "etc" / "scratch"
    assert cfg.scratch.quota == 2 * 1024**3
    assert cfg.db_path == tmp_path / "state" / "imaging.db"
    assert cfg.source == f


def test_schema_error_names_file_and_field(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("safety:\n  vmdk_allowed_types: [monolithicFlat]\n")
    with pytest.raises(ConfigError) as exc:
        config.load(f)
    assert str(f) in exc.value.message
    assert "safety.vmdk_allowed_types.0" in exc.value.message


def test_unknown_key_inside_a_known_section_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"scratch.*quotaa"):
        config.from_dict({"scratch": {"quotaa": 5}})


def test_invalid_yaml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "x.yaml"
    bad.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.yaml")


def test_env_variable_selects_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("log_level: debug\n")
    monkeypatch.setenv(config.ENV_CONFIG, str(f))
    assert config.load().log_level == "debug"


def test_the_task_database_is_sqlite_in_state_dir_unless_store_url_says_otherwise(tmp_path: Path) -> None:
    cfg = config.from_dict({"state_dir": str(tmp_path / "state")})
    assert (cfg.store.backend, cfg.store.path, cfg.db_path) == (
        "sqlite",
        tmp_path / "state" / "imaging.db",
    ) * 1 + (tmp_path / "state" / "imaging.db",)
    relative = config.from_dict({"store": {"url": "sqlite:///db/tasks.db"}}, base_dir=tmp_path)
    assert relative.store.path == tmp_path / "db" / "tasks.db"
    absolute = config.from_dict({"store": {"url": "sqlite:////srv/tasks.db"}}, base_dir=tmp_path)
    assert absolute.store.url == "sqlite:////srv/tasks.db"
    pg = config.from_dict(
        {
            "store": {
                "url": "postgresql://imaging@db.example:5432/imaging?application_name=x",
                "password_file": "db-password",
                "sslmode": "verify-full",
                "sslrootcert": "ca.pem",
            },
            "targets": {"volume": {"type": "ec2"}},
        },
        base_dir=tmp_path,
    )
    assert (pg.store.backend, pg.store.path, pg.db_path) == ("postgresql", None, None)
    assert (pg.store.password_file, pg.store.sslrootcert) == (tmp_path / "db-password", tmp_path / "ca.pem")
    assert (pg.store.connect_timeout, pg.store.pool_size) == (5.0, 4)


@pytest.mark.parametrize(
    ("store", "says"),
    [
        ({"url": "postgresql://imaging:Sekr1tSekr1t@db/imaging"}, "must not carry a password"),
        ({"url": "postgresql://imaging@db/imaging?password=Sekr1tSekr1t"}, "must not carry a password"),
        ({"url": "postgresql://db:99999/imaging"}, "not a valid PostgreSQL URL"),
        ({"url": "postgresql://db/x", "password": "Sekr1tSekr1t", "password_file": "f"}, "not both"),
    ],
)
def test_a_store_section_that_would_leak_or_confuse_is_refused_without_quoting_it(
    store: dict[str, str], says: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config.from_dict({"store": store})
    assert says in info.value.message and "Sekr1tSekr1t" not in info.value.message
    with pytest.raises(ConfigError, match=r"store\.url"):
        config.from_dict({"store": {"url": "mysql://db/x"}})


def test_the_store_password_is_a_secret_wherever_the_configuration_is_shown() -> None:
    cfg = config.from_dict(
        {
            "store": {"url": "postgresql://imaging@db/imaging", "password": "Sekr1tSekr1t"},
            "targets": {"volume": {"type": "device"}},
        }
    )
    assert cfg.store.password == "Sekr1tSekr1t" and "Sekr1tSekr1t" not in repr(cfg)
    assert "Sekr1tSekr1t" not in str(redact(cfg.raw))


@pytest.mark.parametrize("volume", [None, {"type": "file", "directory": "/srv/volumes"}])
def test_a_shared_store_with_a_file_volume_target_not_said_to_be_shared_is_refused(
    volume: dict[str, str] | None,
) -> None:
    data: dict[str, object] = {"store": {"url": "postgresql://imaging@db/imaging"}}
    if volume is not None:
        data["targets"] = {"volume": volume}
    with pytest.raises(ConfigError, match=r"targets\.volume\.shared: true"):
        config.from_dict(data)


def test_a_shared_volume_directory_or_a_single_appliance_store_is_accepted() -> None:
    shared = {"type": "file", "directory": "/srv/volumes", "shared": True}
    fleet = config.from_dict(
        {"store": {"url": "postgresql://imaging@db/imaging"}, "targets": {"volume": shared}}
    )
    assert fleet.targets["volume"]["shared"] is True
    assert config.from_dict({}).targets["volume"]["type"] == "file"  # SQLite: one appliance, its own disk


def test_api_key_without_account_or_role_is_a_user_of_its_own_account() -> None:
    keys = [
        {"access_key": "AKIAPLAINPLAINPLAIN1", "secret_key": "plain-secret-0123456789"},
        {
            "access_key": "AKIAFRONTFRONTFRONT1",
            "secret_key": "front-secret-0123456789",
            "account": "cloud",
            "role": "frontend",
        },
    ]
    api = config.from_dict({"api": {"credentials": keys}}).api
    assert api.principals == {
        "AKIAPLAINPLAINPLAIN1": config.Credential(
            "AKIAPLAINPLAINPLAIN1", "AKIAPLAINPLAINPLAIN1", "user", account_configured=False
        ),
        "AKIAFRONTFRONTFRONT1": config.Credential("AKIAFRONTFRONTFRONT1", "cloud", "frontend"),
    }
    assert api.credentials["AKIAFRONTFRONTFRONT1"] == "front-secret-0123456789"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"role": "root"}, "api.credentials.0.role"),
        ({"account": "two words"}, "api.credentials.0.account"),
        ({"account": ""}, "api.credentials.0.account"),
        ({"account": "a" * 129}, "api.credentials.0.account"),
    ],
)
def test_api_key_with_an_unknown_role_or_a_bad_account_is_refused(extra: dict[str, str], field: str) -> None:
    key = {"access_key": "AKIAPLAINPLAINPLAIN1", "secret_key": "plain-secret-0123456789"} | extra
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config.from_dict({"api": {"credentials": [key]}})


def test_pull_mode_takes_the_cloud_certificate_and_signing_settings_and_needs_no_secret() -> None:
    cfg = config.from_dict(
        {
            "controller": {
                "mode": "pull",
                "url": "http://imaging.cloud.example:8773/",
                "cloud_cert_file": "/etc/imaging/cloud-cert.pem",
                "metadata_url": "http://169.254.169.254/",
                "signature_version": "4",
            }
        }
    )
    ctl = cfg.controller
    assert (ctl.cloud_cert_file, ctl.metadata_url, ctl.signature_version, ctl.region, ctl.secret) == (
        Path("/etc/imaging/cloud-cert.pem"),
        "http://169.254.169.254",
        "4",
        "eucalyptus",
        None,
    )
    with pytest.raises(ConfigError, match=r"controller.*cloud_cert"):
        config.from_dict({"controller": {"mode": "pull", "url": "http://imaging.cloud.example:8773"}})
