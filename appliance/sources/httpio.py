"""Receiving an HTTP body without waste, and giving up on it when a task is cancelled.

The pieces under :mod:`.http` (and the S3 source's bodies) that know nothing of the client: the
``readinto`` that takes bytes from the socket straight into the caller's buffer, a watcher that shuts
a blocked connection down on cancel, and a sleep that a cancel ends. :mod:`.http` re-exports them.
"""

from __future__ import annotations

import contextlib
import http.client
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

from ..errors import Cancelled

CHUNK_SIZE = 256 * 1024
#: bytes received per call by :meth:`~.http.HttpResponse.fill`: large, so the Python work of a call
#: is nothing against its bytes; small enough that counters and the cancel check follow the transfer
FILL_STEP = 1 << 20
# How often a streaming body looks at the cancel event while a read is blocked.
_CANCEL_POLL = 0.1


def direct_readinto(raw: Any) -> Callable[[memoryview], int]:
    """The ``readinto`` of the http.client response under urllib3's ``raw`` (bytes straight from the
    socket into the caller's buffer), when urllib3 holds none of the body and decodes nothing; else
    urllib3's own (which reads a new bytes object and copies it). urllib3 2's ``readinto`` is
    ``read`` plus a copy, and http.client's ``read(n)`` allocates, fills and copies again: three
    passes over every byte where one does."""
    fp = getattr(raw, "_fp", None)
    decoded = getattr(raw, "_decoded_buffer", None)
    if (
        isinstance(fp, http.client.HTTPResponse)
        and not getattr(raw, "decode_content", True)
        and not getattr(raw, "_has_decoded_content", True)
        and decoded is not None
        and len(decoded) == 0
    ):
        return fp.readinto
    return cast("Callable[[memoryview], int]", raw.readinto)


def raise_if_cancelled(cancel: threading.Event | None, what: str) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{what} cancelled")


def sleep_or_cancel(seconds: float, cancel: threading.Event | None, what: str) -> None:
    """Sleep ``seconds``; raise :class:`Cancelled` as soon as ``cancel`` is set."""
    if cancel is None:
        time.sleep(seconds)
    elif cancel.wait(seconds):
        raise Cancelled(f"{what} cancelled")


@contextlib.contextmanager
def shutdown_on_cancel(cancel: threading.Event | None, shutdown: Callable[[], None]) -> Iterator[None]:
    """While the body runs, call ``shutdown`` (which shuts the connection's socket down) once
    ``cancel`` is set, so that a read blocked on a server that sends nothing more returns at once
    (within :data:`_CANCEL_POLL`) instead of at ``read_timeout``. The reader then sees the cancel.

    ``shutdown`` may raise ``ValueError``, ``RuntimeError`` or ``OSError`` (the connection is already
    closed or released): nothing is blocked on it then.
    """
    if cancel is None:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.wait(_CANCEL_POLL):
            if cancel.is_set():
                with contextlib.suppress(ValueError, RuntimeError, OSError):
                    shutdown()
                return

    watcher = threading.Thread(target=watch, name="cancel watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
