"""``imaging workflows upload`` and ``imaging workflows list --store``: the artifact store on the CLI."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..artifacts.store import ArtifactStore
from ..config import Config
from ..workflow.loader import WorkflowLoader
from ..workflow.upload import parse_resource_args, upload_workflow
from .common import EXIT_OK, print_json


def cmd_workflows_upload(args: argparse.Namespace, cfg: Config) -> int:
    """Validate the workflow, upload it with its resources, print the ``artifact://`` URI."""
    given = parse_resource_args(args.resource)
    store = ArtifactStore.from_config(cfg)
    loader = WorkflowLoader.from_config(cfg)
    result = upload_workflow(store, loader, Path(args.workflow), given, version=args.version)
    if args.json:
        print_json(result.to_dict())
        return EXIT_OK
    index = result.index
    if result.uploaded:
        note = f"uploaded workflow.yaml and {len(index.resources)} resource(s)"
    else:
        note = "already in the store with identical content; nothing uploaded"
    print(f"{index.uri}: {note}", file=sys.stderr)
    print(index.uri)
    return EXIT_OK


def cmd_workflows_list_store(args: argparse.Namespace, cfg: Config) -> int:
    """Every ``NAME@VERSION`` in the artifact store with its creation time and resource count."""
    skipped: list[tuple[str, Any]] = []
    indexes = ArtifactStore.from_config(cfg).list(skipped)
    for key, error in skipped:  # on stderr, so --json stays a list of artifacts
        print(f"warning: skipped {key}: {error}", file=sys.stderr)
    if args.json:
        print_json([{"uri": i.uri, **i.to_dict()} for i in indexes])
        return EXIT_OK
    print(f"{'ARTIFACT':40} {'CREATED':20} RESOURCES")
    for i in indexes:
        print(f"{i.name + '@' + i.version:40} {i.created:20} {len(i.resources)}")
    return EXIT_OK


def add_commands(workflows: Any) -> None:
    """Add ``upload`` to the ``workflows`` subparsers (``list --store`` is wired in cli_tasks)."""
    s = workflows.add_parser(
        "upload",
        help="upload a workflow and its resources to the artifact store",
        description="Validate WORKFLOW, then upload it and every resource it declares by path "
        "(from --resource NAME=PATH, else the path relative to the workflow file) as one immutable "
        "artifact NAME@VERSION (NAME is the workflow's name). Prints the artifact:// URI to run.",
    )
    s.add_argument("workflow", help="the workflow YAML file")
    s.add_argument(
        "--resource",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="the file for resource NAME (repeatable)",
    )
    s.add_argument(
        "--version",
        help="the version to create (default: 12 hex digits derived from the content, so an unchanged "
        "upload gives the same version)",
    )
    s.add_argument("--json", action="store_true", help="print the artifact's index as JSON")
    s.set_defaults(func=cmd_workflows_upload)
