"""The range buffers of a ranged read (appliance.sources.rangebuffers), through the reader against a
loopback server: memory bounded by parallel + 1 ranges, buffers used again once the consumer is done
with them, never while a view of theirs is held."""

from __future__ import annotations

import os
import time

from appliance.sources.reader import open_reader
from appliance.sources.urlfilter import UrlPolicy
from tests.httpfixtures import TestHTTPServer
from tests.processes import wait_until

from .rangereads import RS, SETTINGS


def test_memory_is_bounded_by_parallel_plus_one_ranges(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(40 * RS)
    server.add("/disk.raw", data)
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=SETTINGS)
    bound = (SETTINGS.parallel + 1) * RS
    with reader:
        first = reader.read(10)  # the consumer then stops: the fetches run ahead up to the bound
        wait_until(lambda: reader.stats.buffered == bound, what="the read-ahead to fill", interval=0.01)
        requests = reader.stats.requests
        time.sleep(0.3)  # give a broken bound the chance to show
        assert reader.stats.requests == requests == SETTINGS.parallel + 1
        rest = reader.read()
    assert first + rest == data
    assert reader.stats.peak_buffered == bound
    assert reader.stats.buffered == 0


def test_a_view_the_consumer_holds_keeps_its_bytes_while_later_ranges_arrive(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    # range buffers are used again for later ranges; a view handed out by readview must not see its
    # bytes overwritten by them while it is alive
    data = os.urandom(40 * RS)
    server.add("/disk.raw", data)
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=SETTINGS)
    rest = bytearray()
    with reader:
        held = reader.readview(RS)  # all of range 0, kept while the other 39 ranges pass
        second = reader.readview(RS // 2)  # half of range 1, kept too
        while view := reader.readview(10_000):
            with view:
                rest += view
    assert bytes(held) == data[:RS]
    assert bytes(second) == data[RS : RS + RS // 2]
    assert bytes(rest) == data[RS + RS // 2 :]
    assert held.readonly
    assert reader.stats.buffered == 0


def test_views_released_by_the_consumer_let_their_buffers_serve_later_ranges(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(40 * RS)
    server.add("/disk.raw", data)
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=SETTINGS)
    buffers: dict[int, object] = {}  # the range buffers under the views, kept so ids stay unique
    got = bytearray()
    with reader:
        while view := reader.readview(RS):
            with view:
                got += view
                buffers.setdefault(id(view.obj), view.obj)
    assert bytes(got) == data
    assert len(buffers) <= SETTINGS.parallel + 2  # used again, not one new buffer per range
