"""ProgressTracker arithmetic, throttling and the two renderers."""

from __future__ import annotations

import io
import itertools
import json

import pytest

from appliance.progress import (
    RATE_WINDOW,
    UNFLUSHED_PERCENT,
    Progress,
    ProgressTracker,
    StageMeter,
    progress_printer,
)


class FakeClock:
    """A clock the test advances by hand, so rates and throttling are exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


class TtyStringIO(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_done_never_goes_backwards_nor_past_total(clock: FakeClock) -> None:
    seen: list[Progress] = []
    tracker = ProgressTracker("converting", 1000, seen.append, clock=clock, min_interval=0)
    for value in (100, 50, 400, 399, 5000):
        clock.tick(1)
        tracker.update(value)
    assert [p.done for p in seen] == [100, 100, 400, 400, 1000]
    assert seen[-1].percent == 100.0


def test_rate_and_eta_follow_a_steady_producer(clock: FakeClock) -> None:
    tracker = ProgressTracker("converting", 10_000, None, clock=clock)
    for i in range(1, 6):
        clock.tick(1)
        p = tracker.update(1000 * i)
    assert p.rate == pytest.approx(1000)
    assert p.eta == pytest.approx(5.0)
    assert p.percent == pytest.approx(50.0)


def test_rate_is_smoothed_not_instantaneous(clock: FakeClock) -> None:
    tracker = ProgressTracker("converting", 10**9, None, clock=clock)
    for i in range(1, 11):
        clock.tick(1)
        tracker.update(1000 * i)
    # one burst: the instantaneous rate is 100x the steady one, the smoothed rate moves partway
    clock.tick(1)
    p = tracker.update(10_000 + 100_000)
    assert 1000 < p.rate < 100_000 / 2


def test_rate_follows_a_slowdown_within_the_window(clock: FakeClock) -> None:
    tracker = ProgressTracker("converting", 10**9, None, clock=clock, window=5.0)
    done = 0
    for _ in range(20):
        clock.tick(1)
        done += 1000
        tracker.update(done)
    for _ in range(10):
        clock.tick(1)
        done += 100
        p = tracker.update(done)
    # older samples have left the window: the rate is the new speed, not a lifetime average
    assert p.rate == pytest.approx(100)


def test_callbacks_are_throttled_but_finish_is_always_emitted(clock: FakeClock) -> None:
    seen: list[Progress] = []
    tracker = ProgressTracker("converting", 1000, seen.append, clock=clock, min_interval=0.5)
    tracker.update(10)  # first update is emitted at once
    for done in range(20, 1000, 10):
        clock.tick(0.1)
        tracker.update(done)
    # 98 updates over 9.8 s at 0.5 s spacing: one every fifth update, never more
    assert 15 <= len(seen) <= 21
    assert all(b.done - a.done >= 50 for a, b in itertools.pairwise(seen))
    final = tracker.finish()
    assert seen[-1] is final
    assert final.done == 1000 and final.percent == 100.0 and final.eta == 0.0


def test_finish_is_idempotent_and_freezes_the_tracker(clock: FakeClock) -> None:
    seen: list[Progress] = []
    tracker = ProgressTracker("converting", 1000, seen.append, clock=clock, min_interval=0)
    tracker.update(300)
    tracker.finish()
    tracker.finish()
    clock.tick(1)
    tracker.update(500)
    assert [p.done for p in seen] == [300, 1000]


def test_unknown_total_has_no_percent_until_finish(clock: FakeClock) -> None:
    tracker = ProgressTracker("downloading", None, None, clock=clock)
    clock.tick(2)
    p = tracker.update(4096)
    assert p.total is None and p.percent is None and p.eta is None
    assert p.rate == pytest.approx(2048)
    final = tracker.finish()
    assert final.total == 4096 and final.percent == 100.0


def test_zero_total_finishes_at_100_percent(clock: FakeClock) -> None:
    final = ProgressTracker("converting", 0, None, clock=clock).finish()
    assert final.percent == 100.0 and final.done == 0


def test_failing_callback_is_disabled_and_work_continues(clock: FakeClock) -> None:
    calls = []

    def broken(p: Progress) -> None:
        calls.append(p)
        raise RuntimeError("renderer bug")

    tracker = ProgressTracker("converting", 100, broken, clock=clock, min_interval=0)
    tracker.update(10)
    tracker.update(20)
    assert tracker.finish().done == 100
    assert len(calls) == 1


def test_json_lines_printer_writes_one_parseable_object_per_update(clock: FakeClock) -> None:
    out = io.StringIO()  # not a tty → JSON lines chosen automatically
    tracker = ProgressTracker("converting", 2048, progress_printer(out), clock=clock, min_interval=0)
    clock.tick(1)
    tracker.update(1024)
    tracker.finish()
    lines = out.getvalue().splitlines()
    objects = [json.loads(line) for line in lines]
    assert len(objects) == 2
    assert all(set(o) == {"phase", "done", "total", "percent", "rate", "eta"} for o in objects)
    assert objects[0] == {
        "phase": "converting",
        "done": 1024,
        "total": 2048,
        "percent": 50.0,
        "rate": 1024.0,
        "eta": 1.0,
    }
    assert objects[1]["percent"] == 100.0 and objects[1]["eta"] == 0.0


def test_tty_printer_draws_a_bar_not_json(clock: FakeClock) -> None:
    out = TtyStringIO()
    tracker = ProgressTracker(
        "converting", 4 * 1024 * 1024, progress_printer(out), clock=clock, min_interval=0
    )
    clock.tick(1)
    tracker.update(1024 * 1024)
    tracker.finish()
    text = out.getvalue()
    assert "converting" in text and "100%" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.strip().splitlines()[-1])


def test_json_lines_can_be_forced_on_a_tty(clock: FakeClock) -> None:
    out = TtyStringIO()
    tracker = ProgressTracker("converting", 10, progress_printer(out, json_lines=True), clock=clock)
    tracker.finish()
    assert json.loads(out.getvalue())["percent"] == 100.0


def test_a_stage_meter_shows_a_stall_as_rate_zero_and_100_percent_only_once_flushed(clock: FakeClock) -> None:
    seen: list[dict[str, object]] = []
    meter = StageMeter("writing", 1000, seen.append, clock=clock, min_interval=0)
    for step in range(1, 5):
        clock.tick(1)
        meter.read(step * 200)
        meter.wrote(step * 200)
    assert seen[-1]["rate"] == 200.0 and seen[-1]["eta"] == 1.0
    meter.read(1000)
    meter.wrote(1000)  # all written, not yet flushed
    assert seen[-1]["percent"] == UNFLUSHED_PERCENT and seen[-1]["converted"] == 1000
    stalled = StageMeter("writing", 1000, seen.append, clock=clock, min_interval=0, read=300, written=300)
    clock.tick(1)
    stalled.wrote(400)
    assert seen[-1]["rate"] == 100.0  # counted from where the stage resumed, not from 0
    for _ in range(int(RATE_WINDOW) + 1):  # nothing moves: what the ticker reports each second
        clock.tick(1)
        seen.append(stalled.snapshot())
    assert seen[-1]["rate"] == 0.0 and seen[-1]["eta"] is None and seen[-1]["done"] == 400
    assert meter.flushed()["percent"] == 100.0
