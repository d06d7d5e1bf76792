"""Who talks to the controller while a reporter is being replaced (a live configuration update).

The worker replaces its reporter when the ``controller`` section changes (an endpoint rotation, a
pull reporter's new configuration). The old reporter may be inside a request to a slow or dead
controller for up to ``controller.timeout``, and the worker's loop (task starts, its heartbeat file,
cancels passed on) must not wait for it. So the worker asks the old one to stop without waiting
(``stop(timeout=0)``) and starts the new one at once; the old one finishes in the background. During
that overlap both see the same work (a push reporter's outbox rows of its appliance, a pull
reporter's held tasks), and each message must still go out exactly once, in order:

- the newest reporter for a piece of work *owns* it from the moment it runs (:meth:`Turns.claim`);
  a reporter that is no longer the owner starts no request (its final flush included);
- a request is made only during a *turn* (:meth:`Turns.turn`), one reporter at a time: the new
  reporter sends the head of the outbox only once the old one's request in flight has ended, either
  acknowledged (the message left the outbox: the new one never sends it again) or failed (it is still
  the head: the new one sends it, so nothing is lost). The old request is bounded by the old
  ``controller.timeout``; until it ends, the new reporter keeps turning events into messages and
  queueing heartbeats and simply skips sending (it never blocks on the turn in its loop).

Turns are per process (the reporters of one worker); appliances of a fleet sharing a task database
are told apart by the outbox itself (each delivers its own rows).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager


class Turns:
    """The owner of one piece of reporting work and whose request is in flight."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._owner: object | None = None
        self._busy: object | None = None

    def claim(self, reporter: object) -> None:
        """``reporter`` owns the work from now on (the previous owner sends nothing more)."""
        with self._cond:
            self._owner = reporter
            self._cond.notify_all()

    def release(self, reporter: object) -> None:
        """``reporter`` ended: it no longer owns the work (a newer owner keeps it)."""
        with self._cond:
            if self._owner is reporter:
                self._owner = None
            self._cond.notify_all()

    def owns(self, reporter: object) -> bool:
        with self._cond:
            return self._owner is reporter

    @property
    def busy(self) -> bool:
        """Whether a request is in flight."""
        with self._cond:
            return self._busy is not None

    @contextmanager
    def turn(self, reporter: object, wait: float = 0.0) -> Iterator[bool]:
        """Yield True when ``reporter`` owns the work and no other request is in flight (it then
        holds the turn until the block ends); False otherwise (send nothing). ``wait``: how long to
        wait for another reporter's request in flight to end first (0: do not wait)."""
        deadline = time.monotonic() + wait
        with self._cond:
            while self._owner is reporter and self._busy is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            mine = self._owner is reporter and self._busy is None
            if mine:
                self._busy = reporter
        try:
            yield mine
        finally:
            if mine:
                with self._cond:
                    self._busy = None
                    self._cond.notify_all()


_lock = threading.Lock()
_turns: dict[Hashable, Turns] = {}


def turns_for(key: Hashable) -> Turns:
    """The turns of the work ``key`` names (the same object for every reporter of this process)."""
    with _lock:
        found = _turns.get(key)
        if found is None:
            found = _turns[key] = Turns()
        return found
