"""The daemon thread pool a multipart upload sends its parts in (:mod:`appliance.targets.partpool`)."""

from __future__ import annotations

import gc
import threading
from concurrent.futures import Future

import pytest

from appliance.errors import Cancelled
from appliance.targets.partpool import PartPool, wait_first
from tests.processes import wait_until


def pool_threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"{prefix}-")]


def test_a_shutdown_without_waiting_leaves_a_running_call_to_its_daemon_thread_and_cancels_the_queued() -> (
    None
):
    gate = threading.Event()
    pool = PartPool(1, "pool-nowait")
    running = pool.submit(gate.wait)
    wait_until(running.running, what="the first call to run")
    queued = pool.submit(lambda: 2)
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled() and not running.done()
    [thread] = pool_threads("pool-nowait")
    assert thread.daemon and thread.is_alive()  # it does not hold the process
    gate.set()
    thread.join()
    assert running.result() is True


def test_a_pool_dropped_without_a_shutdown_ends_its_threads() -> None:
    # an upload its caller abandoned: its idle threads must not wait for calls forever
    pool = PartPool(3, "pool-dropped")
    assert [pool.submit(lambda i=i: i * 2).result() for i in range(3)] == [0, 2, 4]
    threads = pool_threads("pool-dropped")
    assert threads
    del pool
    gc.collect()
    wait_until(lambda: not any(t.is_alive() for t in threads), what="the dropped pool's threads to end")


def test_a_wait_for_parts_ends_with_the_first_done_or_with_the_cancel_while_none_answers() -> None:
    gate, cancel = threading.Event(), threading.Event()
    pool = PartPool(2, "pool-wait")
    stalled = pool.submit(gate.wait)  # a part S3 never answers
    answered = pool.submit(lambda: 7)
    done, pending = wait_first({stalled, answered}, cancel, "upload")
    assert done == {answered} and pending == {stalled}
    assert wait_first(pending, cancel, "upload", block=False) == (set(), {stalled})
    assert wait_first(set[Future[bool]](), cancel, "upload") == (set(), set())
    waiting: list[BaseException] = []

    def wait_for_stalled() -> None:
        try:
            wait_first({stalled}, cancel, "upload")
        except BaseException as exc:
            waiting.append(exc)

    waiter = threading.Thread(target=wait_for_stalled, daemon=True)
    waiter.start()
    cancel.set()
    waiter.join(timeout=60)
    assert not waiter.is_alive() and not stalled.done()
    with pytest.raises(Cancelled, match="upload cancelled"):
        raise waiting[0]
    gate.set()
    pool.shutdown()
