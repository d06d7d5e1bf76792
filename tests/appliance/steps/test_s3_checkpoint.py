"""A checkpoint of a streamed import into the S3 image target, loaded as untrusted input: one that does
not check out is a reason to start the stream afresh (``S3ResumePoint.load`` answers why), never an
exception that fails the task on every attempt, nor a part size that makes the writer hold GiBs."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.sources.savedhash import SavedHash, available
from appliance.steps.s3_checkpoint import KIND, S3ResumePoint

MiB = 1 << 20
PART = 16 * MiB
SOURCE = "s3://images/disk.raw"


def saved_checkpoint() -> dict[str, Any]:
    """A checkpoint as a RAW stream saves it after two 16 MiB parts (the running sha256 of the output
    at their end included)."""
    state = ""
    if available():
        h = SavedHash("sha256")
        h.update(bytes(2 * PART))
        state = h.state()
    return {
        "kind": KIND,
        "source": SOURCE,
        "decoder": "raw",
        "position": {
            "offset": 2 * PART,
            "size": 100 * MiB,
            "etag": "e" * 32,
            "last_modified": None,
            "tail": 4096,  # the source's last bytes before the offset, compared again on resume
            "tail_sha256": hashlib.sha256(bytes(4096)).hexdigest(),
        },
        "digests": None,
        "boundary": {"format": "raw", "input_offset": 2 * PART, "state": {}},
        "output": {"sink_position": 2 * PART, "produced": 2 * PART},
        "upload": {
            "bucket": "images",
            "key": "disk.raw.partial",
            "upload_id": "upload-1",
            "part_size": PART,
            "parts": [{"number": n, "size": PART, "etag": f'"{n:032x}"'} for n in (1, 2)],
            "sha256_state": state,
        },
    }


def load(saved: Any) -> tuple[S3ResumePoint | None, str | None]:
    limits = config_mod.from_dict({}).limits  # the defaults: 2 TiB disks at most
    return S3ResumePoint.load(saved, SOURCE, "raw", limits)


def test_the_checkpoint_of_a_raw_stream_loads_as_saved() -> None:
    point, why = load(saved_checkpoint())
    assert why is None and point is not None
    assert (point.upload.part_size, point.upload.size, point.sink_position) == (PART, 2 * PART, 2 * PART)


def tampered(change: Any) -> dict[str, Any]:
    saved = copy.deepcopy(saved_checkpoint())
    change(saved)
    return saved


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda s: s.update(upload=["not", "an", "object"]), "not an object"),
        (lambda s: s.update(output="nothing"), "not an object"),
        (lambda s: s["upload"].update(part_size=5 << 30), "part size"),  # would buffer 5 GiB parts
        (lambda s: s["upload"].update(part_size=MiB), "part size"),  # below S3's minimum
        (lambda s: s["upload"].update(parts=[]), "without its parts"),
        (lambda s: s["upload"].update(parts="12"), "without its parts"),
        (lambda s: s["upload"]["parts"].reverse(), "1..k in order"),
        (lambda s: s["upload"]["parts"][1].update(number=3), "1..k in order"),
        (lambda s: s["upload"]["parts"][0].update(size=PART - 1), "part size"),
        (lambda s: s["upload"]["parts"][0].update(etag="not-hex"), "no S3 ETag"),
        (lambda s: s["upload"].update(sha256_state=7), "state of its sha256"),
    ],
)
def test_a_tampered_upload_record_is_a_reason_to_restart_not_an_error(change: Any, said: str) -> None:
    point, why = load(tampered(change))
    assert point is None and why is not None and said in why, why


@pytest.mark.skipif(not available(), reason="libcrypto's saved hashes are not available")
def test_a_sha256_state_that_is_not_the_one_at_the_parts_end_is_a_reason_to_restart() -> None:
    h = SavedHash("sha256")
    h.update(bytes(PART))  # the state after one part, where two are recorded
    point, why = load(tampered(lambda s: s["upload"].update(sha256_state=h.state())))
    assert point is None and why is not None
