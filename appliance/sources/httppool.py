"""Kept-alive connections for :class:`~.http.HttpClient`: one bounded pool per checked address.

The parallel reader sends many ranged GETs to one URL; without reuse each costs a TCP connect and, for
https, a TLS handshake. :class:`PinnedPools` keeps a urllib3 pool per ``(scheme, host, port,
address)``: ``address`` is one the URL policy has just checked for this very request, and a pool only
ever connects to its own address (an IP literal, so nothing is resolved), which
:class:`_Pinned` verifies on every connection it opens. A request never picks a pool by host name
alone: the client checks the URL (resolving it again) before each request and each redirect hop, so a
DNS answer that changes to a forbidden address is refused even while connections to the old address
sit idle here; an answer that changes to another allowed address gets a pool of its own.

Each pool keeps at most ``maxsize`` idle connections (the reader's ranges in flight and a little);
more requests at once than that open extra connections, which are closed when done rather than kept.
At most :data:`MAX_POOLS` pools are kept, the least recently used closed first.

A response goes back to its pool only when its body was read to the end and the server did not say
``Connection: close``; a body abandoned halfway (a stall, a cancel, an error) closes its connection,
so no later request can read the rest of an earlier answer.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import threading
from collections import OrderedDict
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection

from .urlfilter import CheckedUrl

#: pools kept per client (distinct origins x addresses); the least recently used beyond are closed
MAX_POOLS = 16
#: idle connections kept per pool when the configuration does not say (4 ranges in flight + 2)
DEFAULT_POOL_SIZE = 6
#: a response abandoned with at most this many body bytes unread is drained so its connection is
#: kept (an error page, a redirect); a longer remainder closes the connection instead
DRAIN_LIMIT = 64 * 1024
_DRAIN_TIMEOUT = 1.0

PoolKey = tuple[str, str, int, str, str | None]


class PinnedAddressMismatch(OSError):
    """A pooled connection reached another address than the one its pool was made for (never
    expected: the pool's host is an IP literal); the connection is closed unused."""


def _same_address(peer: str, pinned: str) -> bool:
    try:
        return ipaddress.ip_address(peer.split("%", 1)[0]) == ipaddress.ip_address(pinned.split("%", 1)[0])
    except ValueError:
        return False


class _Pinned:
    """Mixed into urllib3's connection classes: counts every connection opened (for https each is a
    TLS handshake) and checks that the peer is the pinned address before anything is sent."""

    #: set per pool class by :class:`PinnedPools` (a callable run once per connection opened)
    on_open: Any = None
    host: str

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        sock = getattr(self, "sock", None)
        peer = str(sock.getpeername()[0]) if sock is not None else ""
        if not _same_address(peer, self.host):
            self.close()  # type: ignore[attr-defined]
            raise PinnedAddressMismatch(f"connected to {peer!r}, not to the checked address")
        if self.on_open is not None:
            self.on_open()


class PinnedPools:
    """The pools of one :class:`~.http.HttpClient` (and of its copies, which share them). Thread-safe."""

    def __init__(self, maxsize: int = DEFAULT_POOL_SIZE) -> None:
        self.maxsize = max(1, maxsize)
        self._lock = threading.Lock()
        self._pools: OrderedDict[PoolKey, urllib3.HTTPConnectionPool] = OrderedDict()
        self._opened = 0
        self._local = threading.local()

        def opened() -> None:
            with self._lock:
                self._opened += 1

        # classes of this registry's own, so that the count is per client and not process-wide
        self._http_cls = type(
            "PinnedHTTPConnection", (_Pinned, HTTPConnection), {"on_open": staticmethod(opened)}
        )
        self._https_cls = type(
            "PinnedHTTPSConnection", (_Pinned, HTTPSConnection), {"on_open": staticmethod(opened)}
        )

    @property
    def opened(self) -> int:
        """Connections opened so far by these pools (for https: TLS handshakes)."""
        with self._lock:
            return self._opened

    @property
    def reused(self) -> bool:
        """Whether the last connection this thread took from a pool had been used before (then a
        failure before any answer may just mean the server closed it while it sat idle)."""
        return bool(getattr(self._local, "reused", False))

    def get(self, checked: CheckedUrl, address: str, ca_certs: str | None) -> urllib3.HTTPConnectionPool:
        """The pool for ``address`` (one of ``checked.addresses``, checked by the policy just now)."""
        assert address in checked.addresses, "a pool is only made for an address the policy checked"
        key: PoolKey = (checked.scheme, checked.host, checked.port, address, ca_certs)
        evicted: list[urllib3.HTTPConnectionPool] = []
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
            pool = self._new_pool(checked, address, ca_certs)
            self._pools[key] = pool
            while len(self._pools) > MAX_POOLS:
                evicted.append(self._pools.popitem(last=False)[1])
        for old in evicted:
            old.close()  # idle connections now; those in use are closed when they are returned
        return pool

    def _new_pool(
        self, checked: CheckedUrl, address: str, ca_certs: str | None
    ) -> urllib3.HTTPConnectionPool:
        local = self._local

        def note_reuse(conn: Any) -> Any:
            # after urllib3's own check for a dropped connection, which closes it (sock None)
            local.reused = getattr(conn, "sock", None) is not None
            return conn

        pool: urllib3.HTTPConnectionPool
        if checked.scheme == "https":
            pool = _HTTPSPool(
                address,
                checked.port,
                maxsize=self.maxsize,
                block=False,
                retries=False,
                cert_reqs="CERT_REQUIRED",
                ca_certs=ca_certs,
                # the certificate must be valid for the URL's host, not for the pinned address
                server_hostname=checked.host,
                assert_hostname=checked.host,
            )
            pool.ConnectionCls = self._https_cls
        else:
            pool = _HTTPPool(address, checked.port, maxsize=self.maxsize, block=False, retries=False)
            pool.ConnectionCls = self._http_cls
        pool.note_reuse = note_reuse
        return pool

    def close(self) -> None:
        """Close every idle connection and forget the pools (in-use ones close when returned)."""
        with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
        for pool in pools:
            pool.close()


class _NoteReuse:
    """Mixed into the pools: tells :class:`PinnedPools` whether the connection handed out is reused,
    and closes a connection the full pool cannot keep without a warning."""

    note_reuse: Any

    def _get_conn(self, timeout: float | None = None) -> Any:
        return self.note_reuse(super()._get_conn(timeout))  # type: ignore[misc]

    def _put_conn(self, conn: Any) -> None:
        queue = getattr(self, "pool", None)
        if conn is not None and queue is not None and queue.full():
            # more were in flight than the pool keeps: closing the extra one is the bound working,
            # not the problem urllib3's warning ("pool is full, discarding connection") reports
            conn.close()
            return
        super()._put_conn(conn)  # type: ignore[misc]


class _HTTPPool(_NoteReuse, urllib3.HTTPConnectionPool):
    pass


class _HTTPSPool(_NoteReuse, urllib3.HTTPSConnectionPool):
    pass


def finish(raw: urllib3.BaseHTTPResponse) -> None:
    """Done with ``raw``: its connection back to the pool when the answer was read to its end (or
    only a small remainder is left, read now) and may be reused; else the connection closed."""
    fp = getattr(raw, "_fp", None)
    conn = getattr(raw, "_connection", None)
    if conn is None:
        raw.close()  # urllib3 already gave the connection back (body read to the end), or it is gone
        return
    if isinstance(fp, http.client.HTTPResponse) and not fp.will_close and not fp.chunked:
        remaining = fp.length
        # only the short body of an answer that is not the data (a redirect, 404, 412): the server
        # wrote it whole; a data body left unread may be one that stalled
        if raw.status >= 300 and not fp.isclosed() and remaining is not None and 0 < remaining <= DRAIN_LIMIT:
            with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
                if conn.sock is not None:
                    conn.sock.settimeout(_DRAIN_TIMEOUT)  # the next request sets its own
                fp.read()
        if fp.length == 0:  # read to its end (a body cut short closes fp with bytes still due)
            fp.close()
            raw.release_conn()
            return
    raw.close()  # closes the connection: an unread remainder must not reach the next request
    raw.release_conn()  # its (closed) slot back to the pool, reopened by the next request
