"""Format detection over bytes as they come (appliance.image.detect.Detector): oslo's InspectWrapper
decisions, plus end-of-file regions fed from a suffix range."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from oslo_utils.imageutils import format_inspector as fi

from appliance.image.detect import END_BYTES, Detector
from appliance.image.inspect import PREFLIGHT_HEAD
from tests import imagefactory as factory
from tests import streamfactory as sf


def _big_stream(**kw: Any) -> bytes:
    """A spec-layout VMDK stream larger than the preflight head (incompressible grains)."""
    rnd = random.Random(1)
    grains = [sf.Grain(128 * i, rnd.randbytes(65536)) for i in range(48)]
    data = sf.build(sf.Stream(capacity=128 * 1100, grains=grains, **kw))
    assert len(data) > PREFLIGHT_HEAD + END_BYTES
    return data


def _names(inspectors: list[fi.FileInspector]) -> list[str]:
    return sorted(i.NAME for i in inspectors)


def _wrapper_names(path: Path) -> list[str]:
    with open(path, "rb") as f:
        w = fi.InspectWrapper(f)
        while w.read(65536):
            pass
        w.close()
        return _names(list(w.formats or []))


@pytest.mark.parametrize("make", [factory.qcow2, factory.vmdk_stream, factory.vhdx, factory.vdi, factory.iso])
def test_the_detector_decides_as_oslos_inspect_wrapper(tmp_path: Path, make: object) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    det = Detector()
    with open(path, "rb") as f:
        while chunk := f.read(65536):
            det.feed(chunk)
    assert _names(det.finish()) == _wrapper_names(path)


def test_a_qcow2_header_decides_without_the_rest(tmp_path: Path) -> None:
    data = factory.qcow2(tmp_path).read_bytes().ljust(1 << 20, b"\0")  # as if it went on
    det = Detector()
    det.feed(data[:4096])
    assert det.formats is None  # the ISO and VHDX inspectors look further in
    det.feed(data[4096 : 1 << 20])
    assert det.formats is not None
    assert _names(det.formats) == ["qcow2"]
    assert not det.waiting_for_end()


def test_a_vmdk_stream_with_its_gd_at_the_end_waits_only_for_the_end_of_file() -> None:
    stream = _big_stream()
    det = Detector()
    det.feed(stream[:PREFLIGHT_HEAD])
    assert det.formats is None
    assert det.waiting_for_end()
    assert det.missing() == ["vmdk:footer"]
    det.feed_tail(stream[-END_BYTES:])
    formats = det.finish()  # the end of the file is there: end-of-file regions complete
    assert _names(formats) == ["vmdk"]
    assert det.missing() == []
    formats[0].safety_check()  # the footer agrees with the header


def test_a_bad_footer_from_the_suffix_fails_oslos_footer_check() -> None:
    stream = _big_stream(footer={"desc_size": 19})
    det = Detector()
    det.feed(stream[:PREFLIGHT_HEAD])
    det.feed_tail(stream[-END_BYTES:])
    (vmdk,) = det.finish()
    with pytest.raises(fi.SafetyCheckFailed) as err:
        vmdk.safety_check()
    assert "footer" in err.value.failures


def test_the_tail_is_refused_while_other_regions_are_still_missing(tmp_path: Path) -> None:
    det = Detector()
    det.feed(b"\0" * 512)  # the ISO and VHDX regions further in are still missing
    assert not det.waiting_for_end()
    with pytest.raises(ValueError):
        det.feed_tail(b"\0" * END_BYTES)
