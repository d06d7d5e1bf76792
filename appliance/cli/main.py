"""The ``imaging`` command line: the root parser, the subcommands and the one error path.

Every subcommand, the toolkit's own and those of other packages (``imaging serve`` comes from
``api``), is registered the same way: a module with ``add_commands(subparsers)`` named by an entry
point of the group ``imaging.commands``. The toolkit itself never imports the HTTP layer.

Errors are one line on stderr: ``imaging: <Code>: <message>``. Results go to stdout (``--json``
for one JSON object); progress goes to stderr (a bar on a terminal, JSON lines otherwise). Exit
statuses are in :mod:`.common`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import EntryPoint, entry_points
from typing import Any, NoReturn

from .. import __version__, redact
from .. import config as config_mod
from ..errors import Cancelled, ImageRejected, ImagingError
from .common import EXIT_CANCELLED, EXIT_ERROR, EXIT_REJECTED

#: the entry-point group of ``imaging`` subcommands: ``NAME = module:add_commands``
COMMANDS_GROUP = "imaging.commands"

log = logging.getLogger("imaging")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line with a code, exit 1 (argparse uses 2 = "rejected")
        self.print_usage(sys.stderr)
        print(f"imaging: InvalidParameterValue: {message}", file=sys.stderr)
        sys.exit(EXIT_ERROR)


def _load(ep: EntryPoint, sub: Any) -> None:
    try:
        add_commands = ep.load()
    except Exception as exc:  # one broken package must not take every other command with it
        log.warning("imaging commands %s (%s) could not be loaded: %s", ep.name, ep.value, exc)
        return
    add_commands(sub)


def command_word(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (``serve`` of ``-c FILE serve --bind …``); None when it names
    none or asks for the root help or version first."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help", "--version"):
            return None
        if arg in ("-c", "--config"):
            i += 2
        elif arg.startswith("-"):
            i += 1
        else:
            return arg
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests).

    With ``command``, the entry point of that name is loaded first, and the others only when it did
    not register ``command``: a service starting ``imaging serve`` or ``imaging configure`` does not
    import every other command's modules (seconds of a boot under emulation).
    """
    p = _Parser(
        prog="imaging",
        description="Inspect, convert and import disk images safely; run declarative imaging workflows.",
        epilog="Exit status: 0 ok, 1 usage/internal error, 2 image rejected, 3 task failed, 130 cancelled.",
    )
    p.add_argument("--version", action="version", version=f"imaging {__version__}")
    p.add_argument(
        "-c",
        "--config",
        help="configuration file (default: $IMAGING_CONFIG, "
        "/etc/imaging/imaging.yaml, else embedded defaults)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    eps = sorted(entry_points(group=COMMANDS_GROUP), key=lambda ep: ep.name)
    first = [ep for ep in eps if command is not None and ep.name == command]
    for ep in first:
        _load(ep, sub)
    if command is not None and command in (sub.choices or ()):
        return p
    for ep in eps:
        if ep not in first:
            _load(ep, sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``imaging`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(command_word(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="imaging: %(levelname)s %(name)s: %(message)s",
    )
    redact.install_logging()
    if not args.verbose:
        # The inspector logs what it finds as warnings; the findings already say it, once.
        logging.getLogger("oslo_utils").setLevel(logging.ERROR)
    try:
        # Commands that create the configuration (configure, config init) must work while an
        # old one is missing or broken: they do not get one.
        cfg = config_mod.load(args.config) if getattr(args, "needs_config", True) else None
        return int(args.func(args, cfg))
    except ImageRejected as exc:
        print(f"imaging: {exc.code}: {exc.message}", file=sys.stderr)
        for f in exc.findings[1:]:
            print(f"imaging:   also {f.code}: {f.message}", file=sys.stderr)
        return EXIT_REJECTED
    except Cancelled as exc:
        print(f"imaging: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        print("imaging: Cancelled: interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    except ImagingError as exc:
        print(f"imaging: {exc.code}: {exc.message}", file=sys.stderr)
        return exc.exit_status
    except BrokenPipeError:
        return EXIT_ERROR
    except Exception as exc:  # a bug: one line for the user, the trace only with -v
        log.debug("internal error", exc_info=True)
        print(
            f"imaging: InternalError: {type(exc).__name__}: {redact.redact_text(str(exc))} "
            "(run with -v for details)",
            file=sys.stderr,
        )
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
