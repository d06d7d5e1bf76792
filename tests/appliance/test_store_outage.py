"""The task database on PostgreSQL when the server goes away and comes back (a real ``pg_ctl stop`` and
``start``), and when it refuses the appliance: coded errors, nothing lost, the same store reconnects.

These tests stop their server, so they have one of their own (not the session's).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.database import StoreConfig
from appliance.errors import StoreError, StoreUnavailable
from appliance.service import health
from appliance.store import Store, TaskState
from tests.postgres import Cluster, postgres_cluster

PASSWORD = "OutageTestPassword0123456789"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with postgres_cluster(synchronous_commit=True) as c:
        yield c


@pytest.fixture
def target(cluster: Cluster) -> Iterator[StoreConfig]:
    """A fresh schema on the module's server, which is running again when the test ends."""
    schema = cluster.create_schema()
    try:
        yield StoreConfig(url=cluster.schema_url(schema), connect_timeout=2)
    finally:
        if not cluster.running():
            cluster.start()
        cluster.drop_schema(schema)


def test_an_outage_fails_calls_as_unavailable_and_the_same_store_carries_on_after_it(
    cluster: Cluster, target: StoreConfig
) -> None:
    store = Store(target)
    task = store.create_task("workflow", params={"a": 1})
    store.claim(task.id, "host:1", 30)
    before = store.events()[-1].id

    cluster.stop()
    for call in (
        lambda: store.get_task(task.id),
        lambda: store.create_task("workflow"),
        lambda: store.update_progress(task.id, bytes_done=5),
        lambda: Store(target),  # opening one too
    ):
        with pytest.raises(StoreUnavailable) as info:
            call()
        assert info.value.code == "StateStoreUnavailable"
        assert "cannot be reached" in info.value.message
    check = health.check_store(lambda: store)
    assert check["status"] == health.FAIL and check["transient"] is True
    assert "unreachable" in check["reason"]
    # an outage degrades the service; it does not take it out of rotation
    assert health.overall({"store": check})[0] == health.DEGRADED

    cluster.start()
    # the same store, its connections broken by the restart: the next call reconnects
    again = store.get_task(task.id)
    assert (again.state, again.params, again.owner) == (TaskState.RUNNING, {"a": 1}, "host:1")
    assert store.renew_lease(task.id, "host:1", 30)
    store.update_progress(task.id, bytes_done=7)
    assert store.add_event(task.id, "after").id > before
    assert health.check_store(lambda: store)["status"] == health.PASS
    store.close()


def test_a_write_that_fails_in_an_outage_leaves_nothing_half_done(
    cluster: Cluster, target: StoreConfig
) -> None:
    store = Store(target)
    task = store.create_task("workflow")
    with pytest.raises(StoreUnavailable), store._write() as conn:
        # a transaction cut off in the middle: the server goes away between two of its statements
        conn.execute("UPDATE tasks SET status_message = ? WHERE id = ?", ("half", task.id))
        cluster.stop("immediate")
        conn.execute("UPDATE tasks SET phase = ? WHERE id = ?", ("half", task.id))
    cluster.start()
    kept = store.get_task(task.id)
    assert (kept.status_message, kept.phase) == ("", None)
    store.close()


def test_a_refused_password_is_a_configuration_error_not_an_outage(
    cluster: Cluster, target: StoreConfig
) -> None:
    schema = target.url.rpartition("%3D")[2]
    role = cluster.create_login(schema, PASSWORD)
    url = cluster.schema_url(schema, user=role)
    with pytest.raises(StoreError) as info:
        Store(StoreConfig(url=url, password="not-" + PASSWORD))
    assert not isinstance(info.value, StoreUnavailable) and info.value.code == "StateStoreError"
    assert "refused the connection" in info.value.message and PASSWORD not in info.value.message
    check = health.check_store(lambda: Store(StoreConfig(url=url, password="wrong")))
    assert check["status"] == health.FAIL and "transient" not in check
    assert health.overall({"store": check})[0] == health.DISABLED
    with Store(StoreConfig(url=url, password=PASSWORD)) as store:
        assert store.create_task("workflow").state is TaskState.PENDING


def test_the_password_file_is_read_for_each_new_connection(
    cluster: Cluster, target: StoreConfig, tmp_path: Path
) -> None:
    schema = target.url.rpartition("%3D")[2]
    role = cluster.create_login(schema, PASSWORD)
    secret = tmp_path / "db-password"
    secret.write_text(PASSWORD + "\n")
    settings = StoreConfig(url=cluster.schema_url(schema, user=role), password_file=secret)
    store = Store(settings)
    task = store.create_task("workflow")
    # the password is rotated: the server's first, then the file; a restart drops every connection
    rotated = PASSWORD[::-1]
    cluster.admin(f"ALTER ROLE {role} PASSWORD '{rotated}'")
    secret.write_text(rotated + "\n")
    cluster.stop()
    cluster.start()
    assert store.get_task(task.id).id == task.id  # reconnected with the rotated password
    store.close()
    secret.write_text("")
    with pytest.raises(StoreError, match="is empty"):
        Store(settings)
    secret.unlink()
    with pytest.raises(StoreError, match=r"cannot read store\.password_file"):
        Store(settings)
