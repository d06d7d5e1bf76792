"""The confined parser child of OVF descriptors and OVA certificates (appliance.image.confinedparse):
what a hostile parse that floods its output or outlives its wall-clock limit costs, with real confined
children (tests/appliance/image/parserchild.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.errors import Finding, ImageRejected
from appliance.image import confinedparse
from tests import confinement, processes

CHILD = "tests.appliance.image.parserchild"


@pytest.fixture
def limits() -> config_mod.Limits:
    return config_mod.from_dict({}).limits


def _garbage(message: str) -> ImageRejected:
    return ImageRejected([Finding.error("Test.Garbage", message)])


def parse(request: str, limits: config_mod.Limits, tmp_path: Path, **kwargs: Any) -> dict[str, Any]:
    """What the test parser child answers to ``request`` (its verb and argument)."""
    return confinedparse.run_parser(
        CHILD, request.encode(), limits, what="test parser", failed=_garbage, workdir=tmp_path, **kwargs
    )


@contextlib.contextmanager
def hidden_grandchild(tmp_path: Path) -> Iterator[Path]:
    """The file a child writes the pid of the grandchild it hides to; that grandchild killed at the end
    whatever happened."""
    pid_file = tmp_path / "grandchild.pid"
    try:
        yield pid_file
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


def assert_killed(pid_file: Path) -> None:
    grandchild = int(pid_file.read_text())
    processes.wait_until(lambda: confinement.gone(grandchild), timeout=10, what="the grandchild killed")


def test_a_parser_that_answers_is_heard(limits: config_mod.Limits, tmp_path: Path) -> None:
    assert parse("answer 42", limits, tmp_path) == {"answer": "42"}


def test_a_parser_printing_garbage_is_the_callers_failure(limits: config_mod.Limits, tmp_path: Path) -> None:
    with pytest.raises(ImageRejected) as caught:
        parse("garbage", limits, tmp_path)
    assert caught.value.code == "Test.Garbage"
    assert caught.value.message == "the test parser failed (exit status 0)"


def test_a_parser_flooding_its_output_is_stopped_at_the_cap_and_costs_no_more_memory(
    limits: config_mod.Limits, tmp_path: Path
) -> None:
    flood = 8 * confinedparse.MAX_OUTPUT
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(ImageRejected) as caught:
            parse(f"flood {flood}", limits, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.code == "UnsafeImage.ResourceLimit"
    assert "printed more than its output cap" in caught.value.message
    # what the parent kept of the flood: the cap's worth (and its text), not the flood
    assert peak < 3 * confinedparse.MAX_OUTPUT


def test_a_parser_outliving_its_wall_clock_limit_is_killed_with_what_it_started(
    limits: config_mod.Limits, tmp_path: Path
) -> None:
    with hidden_grandchild(tmp_path) as pid_file:
        with pytest.raises(ImageRejected) as caught:
            parse(f"linger {pid_file}", limits, tmp_path, wall_seconds=2)
        assert caught.value.code == "UnsafeImage.ResourceLimit"
        assert "did not finish in time" in caught.value.message
        assert_killed(pid_file)


def test_a_parser_that_answers_and_exits_leaving_a_child_behind_is_heard_and_its_child_killed(
    limits: config_mod.Limits, tmp_path: Path
) -> None:
    with hidden_grandchild(tmp_path) as pid_file:
        assert parse(f"leave {pid_file}", limits, tmp_path) == {"answer": "left"}
        assert_killed(pid_file)
