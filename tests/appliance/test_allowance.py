"""Allowance: a scratch reservation that grows ahead of a writer of unknown size and fails only when
the bytes themselves do not fit, within the quota shared across processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from appliance.allowance import Allowance
from appliance.errors import InsufficientScratch
from appliance.scratch import ScratchSpace

MiB = 1024 * 1024


def test_allowance_grows_ahead_and_fails_only_when_the_bytes_themselves_do_not_fit(tmp_path: Path) -> None:
    space = ScratchSpace(tmp_path, quota=10 * MiB)
    t = space.for_task("t")
    allowance = Allowance(t, "chunked download", step=4 * MiB)
    allowance.cover(MiB)
    assert t.reserved == 5 * MiB  # a step ahead
    allowance.cover(3 * MiB)
    assert t.reserved == 5 * MiB  # covered: nothing asked of the quota
    allowance.cover(7 * MiB)
    assert t.reserved == 7 * MiB  # 11 MiB would not fit; the bytes themselves do
    allowance.cover(10 * MiB)
    with pytest.raises(InsufficientScratch):
        allowance.cover(10 * MiB + 1)
    assert t.reserved == 10 * MiB
    allowance.shrink_to(3 * MiB)
    assert t.reserved == 3 * MiB
    allowance.cover(6 * MiB, exact=True)
    assert t.reserved == 6 * MiB
    allowance.release()
    assert t.reserved == 0


def test_growing_reservations_never_exceed_the_quota_across_processes(tmp_path: Path) -> None:
    # Eight processes grow a reservation 512 KiB at a time towards 3 MiB against a 10 MiB quota.
    code = textwrap.dedent(f"""
        import sys
        from appliance.errors import InsufficientScratch
        from appliance.allowance import Allowance
        from appliance.scratch import ScratchSpace
        s = ScratchSpace({str(tmp_path)!r}, quota={10 * MiB}).for_task(sys.argv[1])
        a = Allowance(s, "race", step=0)
        try:
            for n in range(1, 7):
                a.cover(n * {512 * 1024})
            print("won")
        except InsufficientScratch:
            a.release()
            print("lost")
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", code, f"t{i}"], stdout=subprocess.PIPE, text=True)
        for i in range(8)
    ]
    outcomes = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert set(outcomes) <= {"won", "lost"} and "won" in outcomes
    assert ScratchSpace(tmp_path, quota=10 * MiB).reserved() == 3 * MiB * outcomes.count("won") <= 10 * MiB
