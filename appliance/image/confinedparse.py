"""Running a parser of untrusted bytes in a confined Python child that answers with one JSON line.

The OVF descriptor (:mod:`appliance.image.ovf`) and an OVA's certificate (:mod:`appliance.image.ovamanifest`)
are parsed this way: the bytes go to the child on stdin, the child (the module's ``main``) prints
``{"error": code, "message": …}`` or its result as JSON; the child runs under the guest probe's policy
(:func:`appliance.confine.guest_probe`: CPU, memory and wall-clock limits, no network, an empty private
working directory), in a process group of its own, and its output is collected under a cap
(:func:`appliance.confine.collect`), so a parser bug or a resource bomb, a flood of output included,
costs a dead child (and whatever it started), not the task.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import confine
from ..config import Limits
from ..errors import Finding, ImageRejected

_CHILD = (
    "import sys, importlib; sys.path.insert(0, sys.argv.pop(1)); "
    "sys.exit(importlib.import_module(sys.argv.pop(1)).main())"
)
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
#: bytes of stdout and stderr a parser child may print: its answer is one JSON line about a document
#: of at most 1 MiB (an OVF descriptor; a certificate and manifests are smaller), which JSON's escapes
#: may grow six-fold; a child printing more is killed, so a flood costs the task at most this much memory
MAX_OUTPUT = 8 << 20
#: seconds a parser child may run
WALL_SECONDS = 60.0


def run_parser(
    module: str,
    data: bytes,
    limits: Limits,
    *,
    what: str,
    failed: Callable[[str], ImageRejected],
    workdir: Path | None = None,
    wall_seconds: float = WALL_SECONDS,
) -> dict[str, Any]:
    """The JSON object the ``main`` of ``module`` prints for ``data`` on its stdin, run confined (module
    docstring). An ``{"error": …}`` answer is raised as :class:`ImageRejected` with its code; a child
    stopped by a limit (also: printing more than :data:`MAX_OUTPUT`, running past ``wall_seconds``) is
    ``UnsafeImage.ResourceLimit``; a child that printed nothing usable raises ``failed(message)``
    (``what`` names the parser in messages)."""
    policy = confine.guest_probe(limits, wall_seconds=wall_seconds)
    with confine.private_dir(workdir, prefix="parse.") as cwd, tempfile.TemporaryFile(dir=cwd) as f:
        f.write(data)
        f.seek(0)
        # a group of its own: a limit kills whatever the child started too
        proc = confine.spawn(
            [sys.executable, "-I", "-c", _CHILD, _PACKAGE_PARENT, module],
            policy,
            cwd=cwd,
            stdin=f.fileno(),
            new_session=True,
        )
        res = confine.collect(proc, policy, max_output=MAX_OUTPUT)
    hit = confine.limit_hit(res.returncode, res.stderr, res.timed_out, res.output_exceeded)
    if hit is not None:
        caps = f"{policy.describe()}, {wall_seconds:g} s, {MAX_OUTPUT >> 20} MiB of output"
        raise ImageRejected([Finding.error("UnsafeImage.ResourceLimit", f"the {what} {hit} ({caps})")])
    try:
        result = json.loads(res.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        result = None
    if not isinstance(result, dict):
        raise failed(f"the {what} failed (exit status {res.returncode})")
    if "error" in result:
        raise ImageRejected([Finding.error(str(result["error"]), str(result["message"]))])
    return result
