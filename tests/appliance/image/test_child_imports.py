"""The children that parse hostile bytes (the decompressor, the sequential stream decoder) load only what they
parse with: not the configuration and its schema validator, not the store or the network clients. Each such
module costs every child start its import time (the configuration alone ~0.3 s, jsonschema's specifications
included) and widens what runs beside attacker-controlled bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
#: what neither child may load
FORBIDDEN = (
    "appliance.config",
    "appliance.store",
    "appliance.confine",
    "jsonschema",
    "yaml",
    "boto3",
    "botocore",
)


@pytest.mark.parametrize("module", ["appliance.image.decoders", "appliance.image.compressed"])
def test_a_decoding_child_imports_neither_the_configuration_nor_clients(module: str) -> None:
    # as the children start: python -I, the package's parent first on the path
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); "
        f"import {module}; print(json.dumps(sorted(sys.modules)))"
    )
    res = subprocess.run([sys.executable, "-I", "-c", code, str(ROOT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    loaded = set(json.loads(res.stdout))
    assert module in loaded
    leaked = sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    assert leaked == []
