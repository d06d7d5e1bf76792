"""build.sh and the elements without building an image: options, prerequisite messages, dib-lint."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build.sh"
ELEMENTS = ROOT / "elements"
HEADER = re.compile(
    r"\A#!/bin/bash\n(?:#.*\n|\n)*"
    r"if \[ \$\{DIB_DEBUG_TRACE:-0\} -gt 0 \]; then\n    set -x\nfi\nset -eu\nset -o pipefail\n"
)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BUILD), *args], capture_output=True, text=True, timeout=120, env=env or dict(os.environ)
    )


def test_unsupported_format_is_refused_by_name() -> None:
    out = run("-f", "vmdk")
    assert out.returncode == 1
    assert "build.sh: unsupported format 'vmdk': use qcow2 or raw" in out.stderr


def test_unknown_option_prints_usage() -> None:
    out = run("-q")
    assert out.returncode == 1
    assert "usage:" in out.stderr and "unknown option -q" in out.stderr


def test_size_must_be_whole_gigabytes() -> None:
    assert "size must be a whole number of GB, got '2.5'" in run("-s", "2.5").stderr


def test_debug_key_must_be_a_public_key(tmp_path: Path) -> None:
    not_a_key = tmp_path / "id.pub"
    not_a_key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    assert f"{not_a_key} is not an SSH public key" in run("-k", str(not_a_key)).stderr


@pytest.mark.parametrize(
    "content",
    [
        "imaging:v1:appliance-1:http://controller.test:8780:enrolment-secret-0123456789\n",  # an id
        "imaging:v1::http://controller.test:8780:short\n",  # secret under 16 characters
        "imaging:v1::http://controller.test:8780:enrolment-secret-0123456789\nsecond line\n",
        "#cloud-config\nimaging: {}\n",
    ],
)
def test_rendezvous_file_must_hold_the_one_enrolment_line(tmp_path: Path, content: str) -> None:
    line = tmp_path / "rendezvous"
    line.write_text(content)
    out = run("-r", str(line), "-o", str(tmp_path / "x.qcow2"))
    assert out.returncode == 1
    assert f"{line} must hold the one line imaging:v1::<controller-url>:<enrolment-secret>" in out.stderr
    assert "enrolment-secret-0123456789" not in out.stderr + out.stdout
    assert not (tmp_path / "x.qcow2").exists()


def test_unreadable_rendezvous_file_is_named(tmp_path: Path) -> None:
    out = run("-r", str(tmp_path / "missing"))
    assert out.returncode == 1
    assert f"cannot read the rendezvous file {tmp_path / 'missing'}" in out.stderr


def test_each_missing_prerequisite_gets_its_exact_message(tmp_path: Path) -> None:
    # A PATH holding only bash, coreutils-style basics and python3: the build tools are all missing.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "id", "python3", "grep", "cat", "env"):
        src = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout
        (bin_dir / tool).symlink_to(src.strip())
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    out = subprocess.run(
        ["/bin/bash", str(BUILD), "-o", str(tmp_path / "x.qcow2")], capture_output=True, text=True, env=env
    )
    assert out.returncode == 1
    # build.sh also looks in /usr/sbin and /sbin (sudo's secure_path); these live in /usr/bin only
    for cmd, pkg in [("qemu-img", "qemu-utils"), ("partx", "util-linux"), ("git", "git")]:
        assert f"build.sh: missing prerequisite: {cmd} (Debian package {pkg})" in out.stderr
    assert "install the missing prerequisites" in out.stderr
    assert not (tmp_path / "x.qcow2").exists()


@pytest.mark.parametrize("element", sorted(p.name for p in ELEMENTS.iterdir() if p.is_dir()))
def test_element_has_readme_deps_and_standard_script_headers(element: str) -> None:
    path = ELEMENTS / element
    assert (path / "README.rst").is_file()
    deps = (path / "element-deps").read_text().split()
    assert deps == sorted(deps), "dib-lint wants element-deps sorted"
    scripts = [p for p in path.glob("*.d/*") if p.is_file()]
    assert scripts, f"{element} has no hook scripts"
    for script in scripts:
        assert os.access(script, os.X_OK), f"{script} is not executable: DIB would skip it"
        assert HEADER.match(script.read_text()), f"{script} lacks the standard header"
    readme = (path / "README.rst").read_text()
    for var in sorted(
        set(re.findall(r"\$\{?(DIB_IMAGING_[A-Z_]+)", "".join(s.read_text() for s in scripts)))
    ):
        assert var in readme, f"{element}: {var} is used but not documented in README.rst"


def test_dib_lint_passes_on_the_elements(tmp_path: Path) -> None:
    lint = ROOT / ".build" / "dib-venv" / "bin" / "dib-lint"
    if not lint.exists():
        pytest.skip("diskimage-builder is not installed yet (build.sh installs it into .build/dib-venv)")
    env = dict(os.environ, ELEMENTS_DIR="elements", LIB_DIR=str(tmp_path))
    env["PATH"] = f"{lint.parent}:{env['PATH']}"
    out = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
