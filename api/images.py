"""The admin API's image routes (``/v1/images/{id}``): an image or snapshot the appliance stored
with its locations, and ``POST /v1/images/{id}/copies``, which hands the request to
:mod:`appliance.service.copies` (what an image is, who sees it and what a copy destination may be
are decided there). Authenticated like every admin route, with the same account scoping
(``req.context.accounts``).
"""

from __future__ import annotations

import json
from typing import Any

import falcon

from appliance.config import Config
from appliance.errors import UsageError
from appliance.service.copies import CopyService, image_document

from .admin import StoreHandle, summary_document, task_href

#: the members a ``POST /v1/images/{id}/copies`` body may have
_COPY_MEMBERS = ("to", "endpoint")


def _json_body(req: falcon.Request, max_bytes: int) -> dict[str, Any]:
    """The request's JSON object body (at most ``max_bytes``); ``InvalidParameterValue`` otherwise."""
    length = req.content_length
    if length is None or length > max_bytes:
        raise UsageError(f"the body must be a JSON object of at most {max_bytes} bytes, with Content-Length")
    try:
        body = json.loads(req.bounded_stream.read(length) or b"null")
    except (ValueError, UnicodeDecodeError):
        raise UsageError("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise UsageError("the body must be a JSON object")
    return body


class ImageResource:
    """``GET /v1/images/{image_id}``: an image or snapshot the appliance stored, with every location
    (where its import stored it, then each completed copy)."""

    def __init__(self, config: Config, stores: StoreHandle) -> None:
        self._config = config
        self._stores = stores

    def on_get(self, req: falcon.Request, resp: falcon.Response, image_id: str) -> None:
        copies = CopyService(self._config, self._stores.get())
        resp.media = image_document(copies.resolve(image_id, req.context.accounts))


class ImageCopiesResource:
    """``POST /v1/images/{image_id}/copies``: queue a copy-image task; 202 with the task."""

    def __init__(self, config: Config, stores: StoreHandle) -> None:
        self._config = config
        self._stores = stores

    def on_post(self, req: falcon.Request, resp: falcon.Response, image_id: str) -> None:
        body = _json_body(req, 64 << 10)
        unknown = sorted(set(body) - set(_COPY_MEMBERS))
        if unknown:
            raise UsageError(f"unknown member {unknown[0][:64]!r}; the body takes {', '.join(_COPY_MEMBERS)}")
        to, endpoint = body.get("to"), body.get("endpoint")
        if not isinstance(to, str) or (endpoint is not None and not isinstance(endpoint, str)):
            raise UsageError("to (a string: s3://BUCKET[/PREFIX], file:///DIR or image) is required")
        copies = CopyService(self._config, self._stores.get())
        task = copies.copy_image(
            image_id,
            to,
            endpoint=endpoint,
            sees=req.context.accounts,
            # a file destination is a path on the appliance: the operator's (an admin key) only
            allow_files=req.context.accounts is None,
        )
        resp.status = falcon.HTTP_202
        resp.location = task_href(task.id)
        resp.media = summary_document(task)
