"""The SQLite database itself: what happens when several processes open one fresh file together."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from appliance.database import _enter_wal
from appliance.store import Store


def _open_fresh(path: str, start: Any, out: Any) -> None:
    start.wait()
    try:
        Store(path).close()
        out.put("ok")
    except Exception as exc:  # reported to the test, which names it
        out.put(repr(exc))


def test_processes_opening_one_fresh_sqlite_database_together_are_never_told_it_is_locked(
    tmp_path: Path,
) -> None:
    # the switch of a new database into WAL answered "database is locked" at once (SQLite skips its
    # busy handler where waiting could deadlock) in about one round in ten; twenty rounds of four
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["appliance.store"])
    failures = []
    for round_ in range(20):
        path = str(tmp_path / f"round-{round_}" / "imaging.db")
        start, out = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_fresh, args=(path, start, out)) for _ in range(4)]
        for proc in procs:
            proc.start()
        try:
            failures += [r for r in (out.get(timeout=120) for _ in procs) if r != "ok"]
        finally:
            for proc in procs:
                proc.join(timeout=30)
    assert failures == []


class _BusyOnWal:
    """A connection whose first ``busy`` WAL switches answer SQLITE_BUSY, as a racing opener's do."""

    def __init__(self, busy: int, code: int = sqlite3.SQLITE_BUSY) -> None:
        self.busy, self.code, self.calls = busy, code, 0

    def execute(self, sql_text: str) -> None:
        assert sql_text == "PRAGMA journal_mode = WAL"
        self.calls += 1
        if self.calls <= self.busy:
            exc = sqlite3.OperationalError("database is locked")
            exc.sqlite_errorcode = self.code  # type: ignore[attr-defined]
            raise exc


def test_the_wal_switch_waits_out_a_busy_database_within_the_busy_timeout_and_no_longer() -> None:
    conn = _BusyOnWal(busy=3)
    _enter_wal(conn, busy_timeout=5)  # type: ignore[arg-type]
    assert conn.calls == 4
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _enter_wal(_BusyOnWal(busy=10**6), busy_timeout=0.05)  # type: ignore[arg-type]
    other = _BusyOnWal(busy=1, code=sqlite3.SQLITE_CORRUPT)
    with pytest.raises(sqlite3.OperationalError):
        _enter_wal(other, busy_timeout=5)  # type: ignore[arg-type]
    assert other.calls == 1
