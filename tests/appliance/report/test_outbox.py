"""The controller section of the configuration and the durable outbox (real SQLite files)."""

from __future__ import annotations

import pytest

from appliance.database import StoreConfig
from appliance.errors import ConfigError
from appliance.report.outbox import NewMessage, Outbox
from appliance.store import Store
from tests import stores

SECRET = "outbox-test-secret-0123456789"


def test_reporting_is_off_by_default() -> None:
    ctl = stores.config({}).controller
    assert (ctl.mode, ctl.report_interval, ctl.progress_interval) == ("off", 30.0, 5.0)


def test_push_mode_needs_url_secret_and_appliance_id() -> None:
    with pytest.raises(ConfigError) as exc:
        stores.config({"controller": {"mode": "push", "url": "http://ctl:8780"}})
    assert "controller: 'secret' is a required property" in str(exc.value)
    assert "'appliance_id' is a required property" in str(exc.value)


def test_controller_settings_are_typed_and_the_secret_stays_out_of_repr() -> None:
    cfg = stores.config(
        {
            "controller": {
                "mode": "push",
                "url": "http://ctl:8773/",
                "secret": SECRET,
                "appliance_id": "i-0123abcd",
                "report_interval": 2,
                "max_backoff": 5,
            }
        }
    )
    ctl = cfg.controller
    assert (ctl.url, ctl.mode, ctl.report_interval, ctl.max_backoff) == ("http://ctl:8773", "push", 2.0, 5.0)
    assert ctl.secret == SECRET and SECRET not in repr(cfg)


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"controller\.secret"):
        stores.config(
            {"controller": {"mode": "push", "url": "http://c", "secret": "short", "appliance_id": "a"}}
        )


def msg(n: int, type_: str = "task") -> NewMessage:
    return NewMessage(type_, "t-1", {"type": type_, "n": n})


def test_seq_keeps_growing_after_delivered_rows_are_deleted_and_the_db_is_reopened(
    store_target: StoreConfig,
) -> None:
    Store(store_target).close()  # migrates
    box = Outbox(store_target)
    first = box.enqueue([msg(1), msg(2)], cursor=7)
    head = box.head()
    assert head is not None and head.seq == first[0] and head.payload == {"type": "task", "n": 1}
    box.ack(first[0])
    box.ack(first[1])
    assert box.head() is None and box.cursor() == 7
    box.close()
    again = Outbox(store_target)
    [later] = again.enqueue([msg(3)])
    assert later > first[1] and again.cursor() == 7
    again.close()


def test_a_new_heartbeat_replaces_an_undelivered_one_but_not_task_messages(store_target: StoreConfig) -> None:
    Store(store_target).close()
    box = Outbox(store_target)
    box.enqueue([msg(1, "heartbeat")], replace_type="heartbeat")
    box.enqueue([msg(2)])
    [beat] = box.enqueue([msg(3, "heartbeat")], replace_type="heartbeat")
    assert box.backlog() == 2
    head = box.head()
    assert head is not None and head.payload["n"] == 2
    assert box.failed(head.seq, "connection refused") == 1
    assert box.failed(head.seq, "connection refused") == 2
    box.ack(head.seq)
    assert box.head() is not None and box.head().seq == beat
    box.close()
