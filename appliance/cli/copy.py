"""``imaging copy-image``: copy a stored image or snapshot to another store (Glance's copy-image)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import Config
from ..redact import redact_text
from ..service.copies import CopyService, copy_outcome
from ..service.worker import cleanup_scratch
from ..store import TaskState
from ..targets.copy import ENDPOINTS
from ..workflow.engine import Engine
from .common import EXIT_OK, PROGRESS_MODES
from .tasks import ConsoleCallbacks, _print_json, task_exit_status


def add_commands(sub: Any) -> None:
    """Add ``copy-image`` to the ``imaging`` subcommands."""
    s = sub.add_parser(
        "copy-image",
        help="copy a stored image or snapshot to another store (file, S3 bucket)",
        description="Copy the disk the appliance stored for IMAGE_ID (an ami-… or snap-… it issued) to "
        "the destination --to: s3://BUCKET[/PREFIX], file:///DIRECTORY or image (the configured image "
        "target), as <prefix><task id>.<ext>. The bytes read are checked against the sha256 recorded "
        "when the image was stored (Source.DigestMismatch); the copy becomes one of the image's "
        "locations. Runs as a recorded task in this process (Ctrl-C or `imaging tasks cancel` stops it "
        "and leaves nothing), or with --queue for the worker.",
    )
    s.add_argument("image_id", metavar="IMAGE_ID")
    s.add_argument("--to", required=True, metavar="SPEC", help="s3://BUCKET[/PREFIX], file:///DIR or image")
    s.add_argument(
        "--endpoint",
        choices=ENDPOINTS,
        help="the S3 endpoint of an s3:// destination: image (targets.image) or sources (sources.s3); "
        "default: image for the image target's bucket, else sources",
    )
    s.add_argument("--queue", action="store_true", help="queue the task for the worker and print its id")
    s.add_argument("--progress", choices=PROGRESS_MODES, default="auto", help="progress on stderr")
    s.add_argument("--json", action="store_true", help="print the finished task as one JSON object")
    s.set_defaults(func=cmd_copy_image)


def cmd_copy_image(args: argparse.Namespace, cfg: Config) -> int:
    engine = Engine(cfg, callbacks=None if args.queue else ConsoleCallbacks(args.progress))
    copies = CopyService(cfg, engine.store, engine=engine)
    task = copies.copy_image(args.image_id, args.to, endpoint=args.endpoint)
    if args.queue:
        if args.json:
            _print_json(task.to_dict())
        else:
            print(f"task {task.id}: {task.state} (copy of {args.image_id} to {task.params['to']})")
        return EXIT_OK
    cleanup_scratch(cfg, engine.store)
    done = engine.run(task.id)
    if args.json:
        _print_json(done.to_dict())
    elif done.state is TaskState.COMPLETED:
        copied = copy_outcome(done)
        where = copied["location"]
        shown = where.get("path") or f"s3://{where.get('bucket')}/{where.get('key')}"
        print(
            f"{args.image_id}: copied to {shown} ({copied['size']} bytes, sha256 {copied['sha256']}, "
            f"{copied['method']}, task {done.id}, {copied['seconds']:.1f}s)"
        )
    else:
        message = redact_text(done.error_message or done.status_message)
        print(f"imaging: {done.error_code or done.state}: {message}", file=sys.stderr)
    return task_exit_status(done)
