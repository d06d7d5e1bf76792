"""Copy tasks: a stored image copied to another store (Glance's ``copy-image`` import method).

Glance's ``copy-image`` (``POST /v2/images/{id}/import`` with ``{"method": {"name": "copy-image"},
"stores": [...]}``) copies the data of an image that is already active into further stores, and the
image then has a location in each. Here :class:`CopyService` does the same for an image or snapshot
this appliance (or its fleet) stored: the id is resolved (:mod:`appliance.service.resolver`; an id
that names nothing this caller sees is ``InvalidAMIID.NotFound`` / ``InvalidSnapshot.NotFound`` when
the request arrives, and nothing is queued), the destination spec parsed
(:func:`appliance.targets.copy.parse_destination`: ``s3://BUCKET[/PREFIX]``, ``file:///DIR``,
``image``), and a ``copy-image`` task queued in the same store as imports and exports, run by the
same worker through the shipped workflow ``copy-image.yaml`` (step ``copy.image``). Progress, cancel
(``store.request_cancel``), the active-task limit and accounts work as for the other tasks.

The copy task belongs to the image's account (the account of the import that stored it), so the
image's owner sees the copy among the image's locations (:meth:`Resolver.copies`) whoever asked for it.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

from ..errors import ImagingError, UsageError
from ..store import Task
from ..targets.copy import describe_destination, parse_destination, same_place
from .importtasks import NO_ACCOUNT
from .resolver import COPY_IMAGE
from .resolving import ResolvingService

KINDS = (COPY_IMAGE,)
TASK_ID_PATTERN = re.compile(r"^copy-[0-9a-f]{17}$")


class FileDestinationDenied(ImagingError):
    """A caller that is not the operator named a file destination (a path on the appliance)."""

    code = "Copy.FileDestinationDenied"


def copy_outcome(task: Task) -> dict[str, Any]:
    """What a copy wrote (``location``, ``sha256``, ``size``, ``method``, …), or {} (not a copy task,
    or not finished)."""
    if task.kind not in KINDS:
        return {}
    result = task.result if isinstance(task.result, dict) else {}
    return dict(result.get("copied") or {})


def image_document(image: dict[str, Any]) -> dict[str, Any]:
    """An image as ``GET /v1/images/{id}`` shows it: its id, the import that stored it, its locations."""
    return {
        "id": image["id"],
        "task_id": image["task_id"],
        "size": image.get("size"),
        "locations": image.get("locations") or [image["location"]],
    }


class CopyService(ResolvingService):
    """Creates copy tasks and lists an image's locations. Shares the import service's store."""

    noun = "copy task"
    id_patterns = {COPY_IMAGE: TASK_ID_PATTERN}
    id_prefixes = {COPY_IMAGE: "copy-"}

    def not_found(self, task_id: str) -> str:
        return f"no copy task {task_id!r}"

    def resolve(self, image_id: str, sees: Collection[str] | None = None) -> dict[str, Any]:
        """The stored image ``image_id`` (``ami-…`` or ``snap-…``) names, with all its ``locations``."""
        if (image_id or "").startswith("snap-"):
            return self.resolver.snapshot(image_id, sees)
        return self.resolver.image(image_id, sees)

    def copy_image(
        self,
        image_id: str,
        to: str,
        *,
        endpoint: str | None = None,
        sees: Collection[str] | None = None,
        allow_files: bool = True,
    ) -> Task:
        """Queue the copy of the stored image ``image_id`` to the destination spec ``to``.

        ``endpoint`` names the S3 endpoint of an ``s3://`` destination (``image``, ``sources``;
        default: the image target's for its own bucket, else the user buckets'). ``allow_files``
        False (a caller that is not the operator) refuses a file destination
        (``Copy.FileDestinationDenied``): a path names the appliance's own disk."""
        source = self.resolve(image_id, sees)
        destination = parse_destination(to, self.config, endpoint)
        if destination["type"] == "file" and not allow_files:
            raise FileDestinationDenied(
                "a file destination names a directory of the appliance; only the operator (an admin "
                "key, or the imaging CLI) may copy an image there; use s3://BUCKET[/PREFIX]"
            )
        for location in source.get("locations") or [source["location"]]:
            if same_place(location, destination):
                raise UsageError(
                    f"{image_id} already has a copy in {describe_destination(destination)}; "
                    "choose another bucket, prefix or directory",
                    code="Copy.AlreadyThere",
                )
        owner = self.store.get_task(source["task_id"]).client_account or NO_ACCOUNT
        params = {
            "image_id": image_id,
            "source": {k: v for k, v in source.items() if k != "locations"},
            "destination": destination,
            "to": describe_destination(destination),
        }
        return self.submit_task(COPY_IMAGE, params, task_id=self.new_task_id(COPY_IMAGE), account=owner)

    def get(self, task_id: str, accounts: Collection[str] | None = None) -> Task:
        """The copy task ``task_id``; ``InvalidTaskId`` for a malformed id, ``TaskNotFound`` otherwise."""
        return self.get_task(task_id, KINDS, accounts)

    def cancel(self, task_id: str, accounts: Collection[str] | None = None) -> Task:
        """Stop a copy: the run aborts its upload or removes its partial file; nothing is left."""
        return self.cancel_task(task_id, KINDS, accounts)
