"""What ``source.route`` streams (appliance.steps.source_route.sequential_decoder): RAW, a compressed RAW
disk, a stream-optimized VMDK and a fixed VHD have a sequential decoder; every other format, a
compressed container, a rejected or undecided preflight goes through scratch. Verdicts of real images."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.image.rawstream import RAW
from appliance.image.vhdfixed import FORMAT as VHD_FIXED
from appliance.image.vmdkformat import FORMAT as VMDK_STREAM
from appliance.steps.source_route import sequential_decoder
from tests.preflights import IMAGES, verdict_of

DECODERS = {
    "raw": RAW,
    "gzip-raw": "gzip",
    "vmdk-stream": VMDK_STREAM,
    "gzip-vmdk-stream": None,
    "vmdk-sparse": None,
    "vhd-fixed": VHD_FIXED,
    "vhd-dynamic": None,
    "qcow2": None,
    "qcow2-claimed-vmdk": None,
}


@pytest.mark.parametrize("name", IMAGES)
def test_a_source_streams_only_in_a_sequential_format(name: str, tmp_path: Path) -> None:
    assert sequential_decoder(verdict_of(name, tmp_path)) == DECODERS[name]


def test_a_source_without_a_preflight_goes_through_scratch() -> None:
    assert sequential_decoder(None) is None
