"""The checks of a source's answers (appliance.sources.rangecheck), through the ranged reader against a
loopback server with scripted answers.

The download limit is ``settings.max_size``. An origin that lies about what it sends (a Content-Range
other than the range asked, beyond its own total, more bytes than announced) is refused with a code,
not retried, and nothing of its answer is handed over."""

from __future__ import annotations

import dataclasses
import os

import pytest

from appliance.errors import ImageRejected
from appliance.sources.http import SourceIntegrity
from appliance.sources.reader import open_reader
from appliance.sources.urlfilter import UrlPolicy
from tests.httpfixtures import TestHTTPServer

from .rangereads import ONE_BY_ONE, RS, SETTINGS, hand_over, read_all


def test_a_source_larger_than_the_cap_is_refused_from_its_content_range_before_its_body_is_read(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(37 * RS + 5)
    server.add("/disk.raw", data)
    settings = dataclasses.replace(SETTINGS, max_size=10 * RS)
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=settings)
    got = bytearray()
    with pytest.raises(ImageRejected) as err:
        hand_over(reader, got)
    assert err.value.code == "SizeLimitExceeded.Download"
    assert f"({len(data)} bytes)" in err.value.message and f"limit of {10 * RS} bytes" in err.value.message
    assert (got, reader.stats.received) == (bytearray(), 0)  # refused on the headers
    assert len(server.hits("/disk.raw")) == 1


def test_a_whole_answer_larger_than_the_cap_is_refused_from_its_content_length(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(12 * RS)
    server.add("/disk.raw", data, honour_range=False)
    settings = dataclasses.replace(SETTINGS, max_size=10 * RS)
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=settings)
    got = bytearray()
    with pytest.raises(ImageRejected) as err:
        hand_over(reader, got)
    assert err.value.code == "SizeLimitExceeded.Download"
    assert (got, reader.stats.received) == (bytearray(), 0)


def test_a_source_without_a_size_is_cut_off_at_the_cap_while_it_streams(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(12 * RS)
    server.add("/disk.raw", data, honour_range=False, send_length=False)
    cap = 5 * RS + 3
    reader = open_reader(
        {"url": server.url("/disk.raw")}, http_policy, settings=dataclasses.replace(SETTINGS, max_size=cap)
    )
    got = bytearray()
    with pytest.raises(ImageRejected) as err:
        hand_over(reader, got)
    assert err.value.code == "SizeLimitExceeded.Download"
    assert len(got) <= cap and bytes(got) == data[: len(got)]
    # the same source under a cap it fits in reads back whole
    exact = dataclasses.replace(SETTINGS, max_size=len(data))
    fits = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=exact)
    assert read_all(fits) == data


def test_a_first_answer_with_another_range_than_asked_is_refused(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(8 * RS)
    server.add("/disk.raw", data).script.append(f"content-range:bytes 0-99/{len(data)}")
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=ONE_BY_ONE)
    with pytest.raises(SourceIntegrity, match=rf"answered bytes 0-99 for a request of bytes 0-{RS - 1}"):
        read_all(reader)
    assert len(server.hits("/disk.raw")) == 1  # not retried


def test_a_content_range_beyond_its_own_total_is_refused(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    # the origin says the object is 100 bytes long, and sends a whole range of it
    data = os.urandom(8 * RS)
    server.add("/disk.raw", data).script.append(f"content-range:bytes 0-{RS - 1}/100")
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=ONE_BY_ONE)
    with pytest.raises(SourceIntegrity, match="impossible Content-Range"):
        read_all(reader)


def test_a_later_range_answered_with_another_range_is_refused_and_nothing_of_it_is_handed_over(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(8 * RS)
    # the second range (bytes RS..2RS-1) is answered with the first range's header
    server.add("/disk.raw", data).script.extend(["ok", f"content-range:bytes 0-{RS - 1}/{len(data)}"])
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=ONE_BY_ONE)
    got = bytearray()
    with pytest.raises(SourceIntegrity, match=rf"for a request of bytes {RS}-{2 * RS - 1}"):
        hand_over(reader, got)
    assert bytes(got) == data[:RS]


def test_a_range_with_more_bytes_than_it_announces_is_refused(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(8 * RS)
    server.add("/disk.raw", data).script.extend(["ok", "pad:4096"])  # range 2: RS + 4 KiB bytes
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=ONE_BY_ONE)
    got = bytearray()
    announced = rf"announced {RS + 4096} bytes for the range {RS}-{2 * RS - 1}"
    with pytest.raises(SourceIntegrity, match=announced):
        hand_over(reader, got)
    assert bytes(got) == data[:RS]


def test_a_range_that_goes_on_past_its_end_without_a_length_is_refused(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(8 * RS)
    route = server.add("/disk.raw", data, send_length=False)  # bodies end when the connection closes
    route.script.extend(["ok", "pad:1"])  # range 2: one byte more than asked
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=ONE_BY_ONE)
    got = bytearray()
    with pytest.raises(SourceIntegrity, match=rf"sent more than the range at {RS}"):
        hand_over(reader, got)
    assert bytes(got) == data[:RS]
