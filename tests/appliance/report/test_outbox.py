"""The controller section of the configuration and the durable outbox (real SQLite files)."""

from __future__ import annotations

import pytest

from appliance.database import StoreConfig
from appliance.errors import ConfigError
from appliance.report.outbox import CursorMoved, NewMessage, Outbox
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


# -- appliances sharing one outbox (a fleet) ------------------------------------------------------------


def task_msg(n: int, task: str, appliance: str) -> NewMessage:
    return NewMessage("task", task, {"type": "task", "n": n}, appliance=appliance)


def test_an_events_cursor_another_reporter_moved_on_enqueues_nothing(store_target: StoreConfig) -> None:
    Store(store_target).close()
    a, b = Outbox(store_target), Outbox(store_target)
    try:
        read_by_both = a.cursor()
        a.enqueue([task_msg(1, "t-1", "a")], cursor=5, expect_cursor=read_by_both)
        with pytest.raises(CursorMoved):
            b.enqueue([task_msg(1, "t-1", "b")], cursor=5, expect_cursor=read_by_both)
        assert (a.backlog(), a.cursor()) == (1, 5)  # the event became one message, not two
    finally:
        a.close()
        b.close()


def test_each_appliance_delivers_its_own_heartbeat_and_its_tasks_messages(store_target: StoreConfig) -> None:
    Store(store_target).close()
    box = Outbox(store_target)
    try:
        box.enqueue([NewMessage("heartbeat", None, {"n": 1}, appliance="a")], replace_type="heartbeat")
        [b_beat] = box.enqueue(
            [NewMessage("heartbeat", None, {"n": 2}, appliance="b")], replace_type="heartbeat"
        )
        [a_beat] = box.enqueue(
            [NewMessage("heartbeat", None, {"n": 3}, appliance="a")], replace_type="heartbeat"
        )
        [b_task] = box.enqueue([task_msg(4, "t-2", "b")])
        # a's new heartbeat replaced a's undelivered one, not b's
        assert (box.backlog("a"), box.backlog("b")) == (1, 2)
        head_a, head_b = box.head("a"), box.head("b")
        assert head_a is not None and head_a.seq == a_beat
        assert head_b is not None and head_b.seq == b_beat
        delivered = box.deliver_head("b", lambda p: p.seq)
        assert delivered is not None and delivered[1] == b_beat
        next_b = box.head("b")
        assert next_b is not None and next_b.seq == b_task
    finally:
        box.close()


def test_a_task_taken_over_moves_its_waiting_messages_to_the_new_owner_in_order(
    store_target: StoreConfig,
) -> None:
    Store(store_target).close()
    box = Outbox(store_target)
    try:
        box.enqueue([task_msg(1, "t-1", "a"), task_msg(2, "t-1", "a"), task_msg(9, "t-9", "a")])
        [b_beat] = box.enqueue([NewMessage("heartbeat", None, {"n": 0}, appliance="b")])
        # appliance a died with t-1's messages undelivered; b runs t-1 now
        [after] = box.enqueue([task_msg(3, "t-1", "b")])
        sent: list[tuple[int, int]] = []
        while (got := box.deliver_head("b", lambda p: (p.seq, p.payload.get("n")))) is not None:
            sent.append(got[1])
        # b's heartbeat first; then t-1's messages in their order, re-queued with new seqs above b's
        assert [n for _, n in sent] == [0, 1, 2, 3]
        seqs = [seq for seq, _ in sent]
        assert seqs == sorted(seqs) and seqs[0] == b_beat and seqs[-1] == after
        # another task of the dead appliance stays its own (no appliance took it over)
        head = box.head("a")
        assert head is not None and head.payload["n"] == 9 and box.backlog("b") == 0
    finally:
        box.close()
