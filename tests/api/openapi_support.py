"""Checking responses against the admin API's served OpenAPI document (shared by test_admin and the
fuzz tests): the status and content type must be documented for the operation, and a JSON body
must validate against the documented schema, ``$ref``s resolved inside the document."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from api import admin

SPEC = admin.openapi_document()
_SPEC_URI = "urn:imaging-admin-openapi"


class Answer(Protocol):
    """What is checked of a response (falcon's test ``Result`` has it, so has the fuzzer's)."""

    status_code: int
    headers: Mapping[str, str]  # case-insensitive, or lower-case names

    @property
    def json(self) -> Any: ...


def _pointer(*parts: str) -> str:
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def documented_checker(spec: dict[str, Any], uri: str) -> Callable[..., None]:
    """:func:`assert_documented` for another OpenAPI document (``uri`` names it in the registry)."""
    registry = Registry().with_resource(uri, Resource.from_contents(spec, default_specification=DRAFT202012))

    def check(template: str, method: str, result: Answer, body: Any = None) -> None:
        """The response's status and content type are documented for the operation (its ``default``
        response covers undocumented statuses), and its JSON body (or ``body`` instead) validates
        against the documented schema."""
        operation = spec["paths"][template][method.lower()]
        status = str(result.status_code)
        if status not in operation["responses"] and "default" in operation["responses"]:
            status = "default"
        assert status in operation["responses"], f"{method} {template} answered undocumented {status}"
        base = ("paths", template, method.lower(), "responses", status)
        response = operation["responses"][status]
        if "$ref" in response:
            base = tuple(response["$ref"].removeprefix("#/").split("/"))
            response = spec["components"]["responses"][base[-1]]
        if "content" not in response:  # e.g. 204: no body
            return
        ctype = result.headers["content-type"].split(";")[0].strip()
        assert ctype in response["content"], f"{method} {template} {status}: undocumented type {ctype}"
        if ctype == "application/json":
            ref = f"{uri}#{_pointer(*base, 'content', ctype, 'schema')}"
            Draft202012Validator({"$ref": ref}, registry=registry).validate(
                result.json if body is None else body
            )

    return check


#: the admin API's check (see :func:`documented_checker`)
assert_documented = documented_checker(SPEC, _SPEC_URI)
