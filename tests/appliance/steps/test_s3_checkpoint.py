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
from appliance.steps.s3_checkpoint import KIND, KIND_LISTING_PARTS, S3ResumePoint
from appliance.targets.s3resume import etags_digest
from appliance.targets.savedchunks import SavedChunkedSha256

MiB = 1 << 20
PART = 16 * MiB
SOURCE = "s3://images/disk.raw"


def saved_checkpoint() -> dict[str, Any]:
    """A checkpoint as a RAW stream saves it after two 16 MiB parts (the running sha256 of the output
    at their end included)."""
    state, chunked = "", {}
    if available():
        h = SavedHash("sha256")
        h.update(bytes(2 * PART))
        state = h.state()
        c = SavedChunkedSha256()
        c.update(bytes(2 * PART))
        chunked = c.state()
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
            "count": 2,
            "etags_sha256": etags_digest([f'"{n:032x}"' for n in (1, 2)]),
            "sha256_state": state,
            "chunked_state": chunked,
        },
    }


def load(saved: Any) -> tuple[S3ResumePoint | None, str | None]:
    limits = config_mod.from_dict({}).limits  # the defaults: 2 TiB disks at most
    return S3ResumePoint.load(saved, SOURCE, "raw", limits)


def test_the_checkpoint_of_a_raw_stream_loads_as_saved() -> None:
    point, why = load(saved_checkpoint())
    assert why is None and point is not None
    assert (point.upload.part_size, point.upload.size, point.sink_position) == (PART, 2 * PART, 2 * PART)
    assert point.upload.parts == ()  # they come from ListParts, not from the checkpoint


def test_a_checkpoint_of_the_earlier_format_listing_every_part_is_a_reason_to_restart() -> None:
    # as appliances before the constant-size checkpoint saved it (in stores of running appliances)
    saved = saved_checkpoint()
    saved["kind"] = KIND_LISTING_PARTS
    saved["upload"] = {
        **{k: saved["upload"][k] for k in ("bucket", "key", "upload_id", "part_size", "sha256_state")},
        "parts": [{"number": n, "size": PART, "etag": f'"{n:032x}"'} for n in (1, 2)],
    }
    point, why = load(saved)
    assert point is None and why is not None and "earlier format" in why, why


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
        (lambda s: s["upload"].update(count=0), "count of parts"),
        (lambda s: s["upload"].update(count="2"), "count of parts"),
        (lambda s: s["upload"].update(count=10_001), "count of parts"),  # more than S3 allows
        (lambda s: s["upload"].update(etags_sha256="not-hex"), "digest of its parts' ETags"),
        (lambda s: s["upload"].update(etags_sha256=["a" * 64]), "digest of its parts' ETags"),
        (lambda s: s["upload"].update(sha256_state=7), "state of its sha256"),
        (lambda s: s["upload"].update(chunked_state="x"), "state of its sha256-chunked"),
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


@pytest.mark.skipif(not available(), reason="libcrypto's saved hashes are not available")
@pytest.mark.parametrize(
    "change",
    [
        lambda c: c.update(zeros=c["zeros"] + 1),  # zeros past the offset
        lambda c: c.update(chunk_size=16 * MiB),  # not the file target's chunk
        lambda c: c.update(outer="00"),
        lambda c: c.update(inner="ab" * 60),
    ],
)
def test_a_chunked_digest_state_that_is_not_one_at_the_parts_end_is_a_reason_to_restart(change: Any) -> None:
    point, why = load(tampered(lambda s: change(s["upload"]["chunked_state"])))
    assert point is None and why is not None and "checkpoint is not one" in why, why
