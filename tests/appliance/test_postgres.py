"""The PostgreSQL connection pool (:mod:`appliance.postgres`) against a real server: what a call costs
on a pooled connection, and an idle connection the server ended being replaced."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.pq import Trace

from appliance.database import StoreConfig
from appliance.store import Store
from tests.postgres import Cluster


@pytest.fixture
def store(postgres: Cluster) -> Iterator[Store]:
    schema = postgres.create_schema()
    s = Store(StoreConfig(url=postgres.schema_url(schema)))
    try:
        yield s
    finally:
        s.close()
        postgres.drop_schema(schema)


def _idle(store: Store) -> psycopg.Connection:
    """The one idle connection of the store's pool (no call is running)."""
    (conn,) = store._db._pool._idle  # type: ignore[attr-defined]
    return conn


def test_a_read_on_a_pooled_connection_is_one_round_trip(store: Store, tmp_path: Path) -> None:
    task = store.create_task("workflow")
    store.get_task(task.id)
    conn = _idle(store)
    trace = tmp_path / "libpq.trace"
    with trace.open("w") as out:
        # libpq's own protocol trace: every message the client sends ("F") and receives ("B")
        conn.pgconn.trace(out.fileno())
        conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS)
        for _ in range(3):
            assert store.get_task(task.id).id == task.id
        conn.pgconn.untrace()
    sent = [line.split("\t") for line in trace.read_text().splitlines() if line.startswith("F\t")]
    # a request the server answers: a Sync (extended protocol) or a Query (simple protocol)
    round_trips = [fields[2] for fields in sent if fields[2] in ("Sync", "Query")]
    assert round_trips == ["Sync"] * 3, sent


def test_an_idle_connection_the_server_ended_is_replaced_without_failing_a_call(
    store: Store, postgres: Cluster
) -> None:
    task = store.create_task("workflow")
    pid = _idle(store).info.backend_pid
    postgres.admin(f"SELECT pg_terminate_backend({pid}, 10000)")  # returns once it has gone
    assert store.get_task(task.id).id == task.id
    assert _idle(store).info.backend_pid != pid
