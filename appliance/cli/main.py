"""The ``imaging`` command line.

Exit status (documented in the README; scripts and outside checks rely on it):
0 success · 1 usage or internal error · 2 image rejected · 3 task or workflow failed ·
130 cancelled (Ctrl-C, SIGTERM or a cancel request).

Errors are one line on stderr: ``imaging: <Code>: <message>``. Results go to stdout (``--json``
for one JSON object); progress goes to stderr (a bar on a terminal, JSON lines otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .. import __version__, redact
from .. import config as config_mod
from ..errors import Cancelled, ImageRejected, ImagingError, UsageError
from ..image.formats import INPUT_FORMATS, OUTPUT_FORMATS

EXIT_OK, EXIT_ERROR, EXIT_REJECTED, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 2, 3, 130

log = logging.getLogger("imaging")


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def _progress_callback(mode: str) -> Callable[..., None] | None:
    from ..progress import progress_printer

    if mode == "none":
        return None
    json_lines = {"auto": None, "bar": False, "json": True}[mode]
    return progress_printer(sys.stderr, json_lines=json_lines)


@contextlib.contextmanager
def _cancel_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM/SIGHUP; Ctrl-C keeps raising KeyboardInterrupt (handled by the work)."""
    event = threading.Event()
    previous = {}

    def handler(signum: int, _frame: object) -> None:
        event.set()

    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield event
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _cli_scratch(cfg: config_mod.Config, purpose: str) -> Iterator[Any]:
    """A private scratch directory for a standalone command, removed afterwards."""
    from ..scratch import ScratchSpace

    space = ScratchSpace.from_config(cfg)
    scratch = space.for_task(f"cli-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield scratch
    finally:
        scratch.cleanup()


def _decompression_budget(cfg: config_mod.Config, scratch: Any, src: Path) -> int | None:
    """Reserve scratch for decompressing ``src`` when it is compressed; return the output cap."""
    from ..image.decompress import detect_compression

    if detect_compression(src) is None:
        return None
    budget = min(cfg.limits.max_decompressed_size, scratch.space.free())
    scratch.reserve(budget, f"decompressing {src.name}")
    return budget


# --- inspect / convert ---------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from ..image.inspect import inspect_image

    src = Path(args.file)
    if not src.is_file():
        raise UsageError(f"no such image file: {src}")
    with _cli_scratch(cfg, "inspect") as scratch, _cancel_on_signals() as cancel:
        budget = _decompression_budget(cfg, scratch, src)
        result = inspect_image(
            src, args.format, config=cfg, workdir=scratch.path, max_decompressed=budget, cancel=cancel
        )
    if args.json:
        _print_json(result.to_dict())
    else:
        verdict = "safe" if result.safe else "REJECTED"
        print(f"{src}: {verdict}")
        print(
            f"  format:       {result.format or 'unknown'}"
            + (f" (compressed: {result.compression})" if result.compression else "")
        )
        if result.virtual_size is not None:
            print(f"  virtual size: {result.virtual_size} bytes")
        if result.actual_size is not None:
            print(f"  actual size:  {result.actual_size} bytes")
        for f in result.findings:
            print(f"  {f.severity.upper():7} {f.code}: {f.message}")
    return EXIT_OK if result.safe else EXIT_REJECTED


def cmd_convert(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    from ..image.convert import convert_image

    src = Path(args.src)
    if not src.is_file():
        raise UsageError(f"no such image file: {src}")
    with _cli_scratch(cfg, "convert") as scratch, _cancel_on_signals() as cancel:
        budget = _decompression_budget(cfg, scratch, src)
        del budget  # the reservation bounds the decompressor through the scratch quota
        result = convert_image(
            src,
            Path(args.dst),
            args.to,
            args.from_format,
            config=cfg,
            workdir=scratch.path,
            subformat=args.subformat,
            on_progress=_progress_callback(args.progress),
            cancel=cancel,
        )
    if args.json:
        _print_json(result.to_dict())
    else:
        print(
            f"{result.dst}: {result.format}"
            + (f" ({result.subformat})" if result.subformat else "")
            + f", virtual size {result.virtual_size} bytes, {result.bytes_written} bytes written"
            f" in {result.seconds:.1f}s"
        )
    return EXIT_OK


# --- argument parsing ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line with a code, exit 1 (argparse uses 2 = "rejected")
        self.print_usage(sys.stderr)
        print(f"imaging: InvalidParameterValue: {message}", file=sys.stderr)
        sys.exit(EXIT_ERROR)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
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

    s = sub.add_parser(
        "inspect",
        help="check an untrusted image and report its real format",
        description="Detect the real format of FILE from its content, run every safety "
        "check and qemu-img info/check under resource limits. Exit 0 when safe, 2 when rejected.",
    )
    s.add_argument("file")
    s.add_argument(
        "-f",
        "--format",
        metavar="CLAIMED",
        help=f"format the image claims to be ({', '.join(INPUT_FORMATS)}; '.gz'-style suffix "
        "for compressed input)",
    )
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser(
        "convert",
        help="inspect, then convert an image with qemu-img",
        description="Inspect SRC (rejected: exit 2, nothing written), convert it to FMT, "
        "re-inspect the output and move it to DST atomically (or write a block device).",
    )
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument(
        "-t",
        "--to",
        required=True,
        choices=OUTPUT_FORMATS,
        metavar="FMT",
        help=f"output format: {', '.join(OUTPUT_FORMATS)}",
    )
    s.add_argument("-f", "--from", dest="from_format", metavar="CLAIMED", help="format SRC claims to be")
    s.add_argument("--subformat", help="vhd: dynamic (default) or fixed")
    s.add_argument(
        "--progress",
        choices=("auto", "bar", "json", "none"),
        default="auto",
        help="progress on stderr: a bar on a terminal, JSON lines otherwise (auto)",
    )
    s.add_argument("--json", action="store_true", help="print the result as one JSON object")
    s.set_defaults(func=cmd_convert)

    _add_workflow_commands(sub)
    return p


def _add_workflow_commands(sub: Any) -> None:
    from . import config as cli_config
    from . import configure as cli_configure
    from . import tasks as cli_tasks

    cli_tasks.add_commands(sub)
    cli_config.add_commands(sub)
    cli_configure.add_commands(sub)
    s = sub.add_parser(
        "worker",
        help="run the task worker (claims and runs pending tasks)",
        description="Claim pending tasks and run each in a child process, up to "
        "worker.concurrency at once; resume tasks whose process died. SIGTERM suspends "
        "running tasks; they resume when a worker starts again.",
    )
    s.add_argument("--concurrency", type=int, help="override worker.concurrency")
    s.set_defaults(func=lambda args, cfg: _run_worker(cfg, args.concurrency))
    _add_plugin_commands(sub)


def _run_worker(cfg: config_mod.Config, concurrency: int | None) -> int:
    from ..service.worker import run_worker

    return run_worker(cfg, concurrency)


def _add_plugin_commands(sub: Any) -> None:
    """Commands contributed by other packages (``imaging serve`` comes from ``api``) through the
    ``imaging.commands`` entry points, so the toolkit never imports the HTTP layer."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="imaging.commands"):
        try:
            ep.load()(sub)
        except Exception as exc:  # a broken plugin must not break the toolkit's own commands
            log.warning("command plugin %s could not be loaded: %s", ep.name, exc)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``imaging`` console script."""
    parser = build_parser()
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
