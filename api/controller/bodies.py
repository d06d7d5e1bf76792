"""What the controller's API reads from a request: its OpenAPI document (package data, the
``component`` schemas request bodies are checked against), a JSON body of at most
:data:`MAX_BODY` bytes valid against one of them (a message that names fields, never quotes a
value), and the path and headers an appliance's signature covers.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import falcon
import yaml
from jsonschema import Draft202012Validator, ValidationError
from referencing import Registry as SchemaRegistry
from referencing import Resource
from referencing.jsonschema import DRAFT202012

from appliance.errors import UsageError
from appliance.service.discovery import app_version

from ..app import ApiError

MAX_BODY = 1 << 20


@cache
def openapi_document() -> dict[str, Any]:
    """The controller API's OpenAPI 3.1 document (package data), version filled in."""
    text = resources.files(__package__).joinpath("openapi.yaml").read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    doc["info"]["version"] = app_version()
    return doc


_SPEC_URI = "urn:imaging-controller-openapi"


@cache
def _validator(component: str) -> Draft202012Validator:
    registry: SchemaRegistry[Any] = SchemaRegistry().with_resource(
        _SPEC_URI, Resource.from_contents(openapi_document(), default_specification=DRAFT202012)
    )
    return Draft202012Validator({"$ref": f"{_SPEC_URI}#/components/schemas/{component}"}, registry=registry)


def read_body(req: falcon.Request) -> bytes:
    """The request body, at most :data:`MAX_BODY` bytes (413 beyond)."""
    if req.content_length is not None and req.content_length > MAX_BODY:
        raise ApiError(falcon.HTTP_413, "RequestEntityTooLarge", f"the body is larger than {MAX_BODY} bytes")
    body = req.bounded_stream.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise ApiError(falcon.HTTP_413, "RequestEntityTooLarge", f"the body is larger than {MAX_BODY} bytes")
    return body


def json_body(req: falcon.Request, component: str | None, *, required: bool = True) -> dict[str, Any]:
    """The JSON object of the body, valid against the OpenAPI ``component`` schema."""
    body = read_body(req)
    if not body.strip():
        if required:
            raise UsageError("the request needs a JSON body")
        return {}
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError("the body is not JSON") from exc
    if not isinstance(doc, dict):
        raise UsageError("the body must be a JSON object")
    if component is not None:
        error = next(iter(sorted(_validator(component).iter_errors(doc), key=lambda e: list(e.path))), None)
        if error is not None:
            raise UsageError(_schema_message(error))
    return doc


def _schema_message(error: ValidationError) -> str:
    """What is wrong with a request body, by field, never quoting a value (it may be a secret)."""
    # "<field> …", not "<field>: …": a message reading "secret: x" would be redacted whole
    where = ".".join(str(p) for p in error.absolute_path) or "the body"
    if error.validator in ("required", "additionalProperties"):
        return f"in {where}, {error.message}"  # names keys only
    if error.validator == "type":
        return f"{where} must be of type {error.validator_value}"
    return f"{where} does not meet {error.validator} {json.dumps(error.validator_value)[:200]}"


def signed_path(req: falcon.Request) -> str:
    """The URL path as the appliance signed it (under any mount point)."""
    return req.root_path + req.path


def signed_headers(req: falcon.Request) -> dict[str, str]:
    return {k.title(): v for k, v in req.headers.items()}
