"""What an ImportVolume upload streams onto its volume (appliance.steps.volume_upload.sequential_decoder):
a stream-optimized VMDK and a fixed VHD are decoded as their parts arrive, any other format goes
through scratch (a RAW upload is written as it is, before this is asked). Verdicts of real images."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.image.vhdfixed import FORMAT as VHD_FIXED
from appliance.image.vmdkformat import FORMAT as VMDK_STREAM
from appliance.steps.volume_upload import sequential_decoder
from tests.appliance.steps.preflights import IMAGES, verdict_of

DECODERS = {
    "raw": None,
    "gzip-raw": None,
    "vmdk-stream": VMDK_STREAM,
    # the upload's preflight does not decompress: a verdict of a compressed stream never comes here
    "gzip-vmdk-stream": VMDK_STREAM,
    "vmdk-sparse": None,
    "vhd-fixed": VHD_FIXED,
    "vhd-dynamic": None,
    "qcow2": None,
    "qcow2-claimed-vmdk": None,
}


@pytest.mark.parametrize("name", IMAGES)
def test_an_upload_streams_onto_its_volume_only_as_a_stream_vmdk_or_a_fixed_vhd(
    name: str, tmp_path: Path
) -> None:
    assert sequential_decoder(verdict_of(name, tmp_path)) == DECODERS[name]
