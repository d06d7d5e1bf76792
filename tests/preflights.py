"""Preflight verdicts of real images, as the import steps get them: the header-only checks of an image's
first and last bytes against a claim; a compressed image preflighted on its decompressed head with the
claim's inner format, its compression recorded (as :func:`appliance.steps.imports.source_preflight` does).
The tests of what streams and what goes through scratch decide on these."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

from appliance import config as config_mod
from appliance.image.inspect import PREFLIGHT_HEAD, PREFLIGHT_TAIL, Preflight, preflight
from tests import imagefactory as factory

#: name -> (image maker, claim, compressed with gzip)
IMAGES: dict[str, tuple[Callable[[Path], Path], str, bool]] = {
    "raw": (factory.raw_mbr, "raw", False),
    "gzip-raw": (factory.raw_mbr, "raw", True),
    "vmdk-stream": (factory.vmdk_stream, "vmdk", False),
    "gzip-vmdk-stream": (factory.vmdk_stream, "vmdk", True),
    "vmdk-sparse": (factory.vmdk_sparse, "vmdk", False),
    "vhd-fixed": (factory.vhd_fixed, "vhd", False),
    "vhd-dynamic": (factory.vhd_dynamic, "vhd", False),
    "qcow2": (factory.qcow2, "qcow2", False),
    "qcow2-claimed-vmdk": (factory.qcow2, "vmdk", False),  # mislabelled: the preflight rejects it
}


def verdict_of(name: str, directory: Path) -> Preflight:
    """The preflight verdict of image ``name`` (:data:`IMAGES`), built in ``directory``."""
    make, claim, compressed = IMAGES[name]
    data = make(directory).read_bytes()
    config = config_mod.from_dict({})
    if not compressed:
        return preflight(data[:PREFLIGHT_HEAD], data[-PREFLIGHT_TAIL:], claim, config=config, size=len(data))
    outer = preflight(gzip.compress(data)[:PREFLIGHT_HEAD], None, f"{claim}.gz", config=config)
    assert outer.safe and outer.compression == "gzip" and outer.format is None
    inner = preflight(data[:PREFLIGHT_HEAD], None, claim, config=config)
    inner.compression = outer.compression
    return inner
