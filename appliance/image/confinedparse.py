"""Running a parser of untrusted bytes in a confined Python child that answers with one JSON line.

The OVF descriptor (:mod:`appliance.image.ovf`) and an OVA's certificate (:mod:`appliance.image.ovamanifest`)
are parsed this way: the bytes go to the child on stdin, the child (the module's ``main``) prints
``{"error": code, "message": …}`` or its result as JSON; the child runs under the guest probe's policy
(:func:`appliance.confine.guest_probe`: CPU, memory and wall-clock limits, no network, an empty private
working directory), so a parser bug or a resource bomb costs a dead child, not the task.
"""

from __future__ import annotations

import json
import subprocess
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


def run_parser(
    module: str,
    data: bytes,
    limits: Limits,
    *,
    what: str,
    failed: Callable[[str], ImageRejected],
    workdir: Path | None = None,
) -> dict[str, Any]:
    """The JSON object the ``main`` of ``module`` prints for ``data`` on its stdin, run confined (module
    docstring). An ``{"error": …}`` answer is raised as :class:`ImageRejected` with its code; a child
    stopped by a limit is ``UnsafeImage.ResourceLimit``; a child that printed nothing usable raises
    ``failed(message)`` (``what`` names the parser in messages)."""
    policy = confine.guest_probe(limits, wall_seconds=60)
    with confine.private_dir(workdir, prefix="parse.") as cwd, tempfile.TemporaryFile(dir=cwd) as f:
        f.write(data)
        f.seek(0)
        proc = confine.spawn(
            [sys.executable, "-I", "-c", _CHILD, _PACKAGE_PARENT, module], policy, cwd=cwd, stdin=f.fileno()
        )
        try:
            out, err = proc.communicate(timeout=policy.wall_seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise ImageRejected(
                [Finding.error("UnsafeImage.ResourceLimit", f"the {what} did not finish in time")]
            ) from None
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
    hit = confine.limit_hit(proc.returncode, err.decode("utf-8", "replace"))
    if hit is not None:
        raise ImageRejected(
            [Finding.error("UnsafeImage.ResourceLimit", f"the {what} {hit} ({policy.describe()})")]
        )
    try:
        result = json.loads(out.decode("utf-8", "replace").strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        result = None
    if not isinstance(result, dict):
        raise failed(f"the {what} failed (exit status {proc.returncode})")
    if "error" in result:
        raise ImageRejected([Finding.error(str(result["error"]), str(result["message"]))])
    return result
