"""`imaging COMMAND` loads the entry point named like the command first, and the others only when it
did not register the command: a service's start does not import every other command's modules."""

from __future__ import annotations

import subprocess
import sys

import pytest

from appliance.cli.main import build_parser, command_word

#: modules only other commands need (the HTTP service, the guest reader, the controller)
FOREIGN = ("api.app", "api.controller.app", "appliance.guest.reader")


def modules_after(*argv: str) -> tuple[int, set[str], str]:
    """Exit status, the imported modules of interest and the output of ``imaging ARGV`` run in a
    fresh interpreter."""
    code = (
        "import sys\n"
        "from appliance.cli.main import main\n"
        "try:\n"
        f"    rc = main({list(argv)!r})\n"
        "except SystemExit as exc:\n"
        "    rc = exc.code\n"
        f"print('MODULES', *sorted(m for m in {FOREIGN!r} if m in sys.modules))\n"
        "print('RC', rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    modules = set(next(line for line in lines if line.startswith("MODULES")).split()[1:])
    rc = int(next(line for line in lines if line.startswith("RC")).split()[1])
    return rc, modules, out.stdout + out.stderr


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["serve", "--bind", "x"], "serve"),
        (["-c", "/etc/imaging/imaging.yaml", "-v", "configure"], "configure"),
        (["--config=/x", "worker"], "worker"),
        (["--help", "serve"], None),
        (["-v"], None),
    ],
)
def test_the_command_word_skips_the_global_options(argv: list[str], word: str | None) -> None:
    assert command_word(argv) == word


def test_configure_does_not_import_the_http_service_or_the_guest_reader() -> None:
    rc, modules, out = modules_after("configure", "--help")
    assert rc == 0, out
    assert "--rendezvous-file" in out
    assert modules == set(), out


def test_a_command_registered_by_an_entry_point_of_another_name_still_works() -> None:
    # `reconfigure` comes from the `configure` entry point: every entry point is loaded then
    rc, _, out = modules_after("reconfigure", "--help")
    assert rc == 0, out
    assert "--watch" in out


def test_an_unknown_command_is_refused_listing_every_command() -> None:
    rc, _, out = modules_after("no-such-command")
    assert rc == 1, out
    assert "InvalidParameterValue" in out and "serve" in out and "configure" in out


def test_the_full_parser_still_has_every_command() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"serve", "configure", "reconfigure", "worker", "controller"} <= set(sub.choices or ())
