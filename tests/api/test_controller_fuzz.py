"""Seeded, bounded fuzzing of the controller API (`imaging controller serve` under gunicorn) from its
OpenAPI document.

Every operation is drawn: path and query parameters from their schemas (hypothesis-jsonschema) or
broken, JSON bodies from the request schema or broken (other JSON, not JSON, empty), the admin token
right, wrong or missing, and the appliance protocol's requests signed with a registered appliance's
secret (or the enrolment secret) over the exact path and body, or with a wrong key, or not at all,
so that fuzzed bodies reach the lifecycle behind the signature check. Every answer must be below
500 and documented for its operation (JSON valid against the documented schema); the server must
log no traceback. ``derandomize=True``, a fixed number of examples, no deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from api.controller.bodies import openapi_document
from appliance.boot import rendezvous
from appliance.report import messages
from tests.api.controller_support import ADMIN_TOKEN, ENROL_SECRET, ControllerProcess, running_controller
from tests.api.openapi_support import documented_checker

# the controller has a database of its own (SQLite): the appliance store backends change nothing here,
# and the module-scoped controller would see both runs' registrations
pytestmark = [pytest.mark.slow, pytest.mark.backends("sqlite")]

EXAMPLES = 400
SPEC = openapi_document()
check_documented = documented_checker(SPEC, "urn:imaging-controller-openapi")
SIGNER, SIGNER_SECRET = "fuzz-signer", "fuzz-signer-secret-0123456789"
CONFIG = {
    "api": {
        "credentials": [{"access_key": "AKIAFUZZFUZZFUZZ0001", "secret_key": "fuzz-api-secret-0123456789"}]
    }
}
OPERATIONS = sorted((template, method) for template, item in SPEC["paths"].items() for method in item)


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProcess]:
    with running_controller(tmp_path_factory.mktemp("controller-fuzz"), stale_after=0) as ctl:
        ctl.register(SIGNER, CONFIG, SIGNER_SECRET)
        for i in range(3):
            ctl.register(f"fuzz-pool-{i}", CONFIG, f"{SIGNER_SECRET}-{i}", dynamic=True)
        yield ctl


def _resolve(schema: Any) -> Any:
    """A schema with its ``$ref``s to components replaced (hypothesis-jsonschema needs them inline)."""
    text = json.dumps(schema)
    for _ in range(3):
        for name, component in SPEC["components"]["schemas"].items():
            text = text.replace(json.dumps({"$ref": f"#/components/schemas/{name}"}), json.dumps(component))
    return json.loads(text)


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def values_of(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid against ``schema``: hypothesis-jsonschema for scalars, built here for objects
    and arrays (its object strategy does not run with the installed hypothesis)."""
    if schema.get("type") == "object":
        props = schema.get("properties", {})
        if not props:
            return st.dictionaries(st.text(max_size=8), _JSON_VALUES, max_size=4)
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: values_of(v) for k, v in props.items() if k in required},
            optional={k: values_of(v) for k, v in props.items() if k not in required},
        )
    if schema.get("type") == "array":
        return st.lists(values_of(schema.get("items", {})), max_size=schema.get("maxItems", 4) or 4)
    if not schema or set(schema) <= {"description"}:
        return _JSON_VALUES
    return from_schema(schema)


@dataclass
class Request:
    template: str
    method: str
    path: str
    query: list[tuple[str, str]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: an admin operation and the token is wrong or missing
    unauthorized: bool = False
    undocumented: bool = False


_IDS = st.one_of(
    st.sampled_from([SIGNER, "fuzz-pool-0", "no-such-appliance", "a" * 128, "a" * 129, "x:y", "..", "-a"]),
    st.text(max_size=20),
)
_JUNK = st.one_of(
    _JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"", b"{", b"\xff\xfe", b"null", b"[]", b"{}", b" " * 10]),
)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    template, method = draw(st.sampled_from(OPERATIONS))
    operation = SPEC["paths"][template][method]
    req = Request(template, method.upper(), template)
    for param in operation.get("parameters", ()):
        schema = _resolve(param["schema"])
        if param["in"] == "path":
            protocol = operation.get("security") == [{"applianceSignature": []}]
            # the protocol's routes mostly for the appliance whose key signs them, to get past the check
            ids = st.one_of(st.just(SIGNER), st.just(SIGNER), values_of(schema), _IDS) if protocol else _IDS
            value = str(draw(st.one_of(values_of(schema), ids)))
            if method == "delete":
                assume(value != SIGNER)  # the signer signs the protocol requests
            req.path = req.path.replace("{" + param["name"] + "}", quote(value or "x", safe=""))
        elif draw(st.booleans()):
            good = values_of(schema).map(lambda v: json.dumps(v) if isinstance(v, bool | dict) else str(v))
            req.query.append((param["name"], draw(st.one_of(good, st.text(max_size=12)))))
    if draw(st.integers(0, 12)) == 12:
        name = draw(st.from_regex(r"[a-z][a-z_]{0,9}", fullmatch=True))
        req.undocumented = name not in {p["name"] for p in operation.get("parameters", ())}
        req.query.append((name, "1"))
    content = (operation.get("requestBody") or {}).get("content", {}).get("application/json")
    if content is not None:
        schema = _resolve(content["schema"])
        valid = values_of(schema).map(lambda v: json.dumps(v).encode())
        req.body = draw(st.one_of(valid, valid, _JUNK))
        req.headers["Content-Type"] = draw(st.sampled_from(["application/json", "text/plain", ""]))
    security = operation.get("security", SPEC["security"])
    schemes = {name for s in security for name in s}
    path_and_query = req.path
    if "bearerAuth" in schemes:
        auth = draw(st.sampled_from(["good", "good", "good", "none", "wrong", "garbage"]))
        req.headers["Authorization"] = {
            "good": f"Bearer {ADMIN_TOKEN}",
            "none": "",
            "wrong": "Bearer not-the-admin-token-0000",
            "garbage": draw(st.sampled_from(["Bearer", "Basic Zm9vOmJhcg==", "bearer  " + "x" * 300])),
        }[auth]
        req.unauthorized = auth != "good"
    elif schemes & {"applianceSignature", "enrolmentSignature"}:
        kind = draw(st.sampled_from(["good", "good", "wrong", "none", "stale"]))
        secret = ENROL_SECRET if "enrolmentSignature" in schemes else SIGNER_SECRET
        who = SIGNER
        if "enrolmentSignature" in schemes and req.body:
            with contextlib.suppress(ValueError, AttributeError):
                who = str(json.loads(req.body).get("instance_id", SIGNER))
        if kind != "none":
            now = None if kind != "stale" else 1.0
            key = secret if kind != "wrong" else "wrong-secret-0123456789abc"
            signed = rendezvous.signed_headers(who, key, method.upper(), path_and_query, req.body, now=now)
            req.headers.update({k: v.encode("utf-8", "replace").decode("latin-1") for k, v in signed.items()})
    elif "reportSignature" in schemes:
        kind = draw(st.sampled_from(["envelope", "raw", "wrong", "none"]))
        body = req.body
        if kind == "envelope":  # a well-formed signed message around a fuzzed payload
            try:
                payload = json.loads(req.body)
            except ValueError:
                payload = {}
            payload = payload if isinstance(payload, dict) else {}
            payload.setdefault("type", draw(st.sampled_from(["heartbeat", "task", "other"])))
            seq = draw(st.integers(-5, 2**62))
            body = messages.encode(SIGNER, seq, payload)
        if kind != "none":
            key = SIGNER_SECRET if kind != "wrong" else "wrong-secret-0123456789abc"
            req.headers.update(messages.headers(key, SIGNER, body, "application/json"))
        req.body = body
    return req


def exchange(ctl: ControllerProcess, req: Request) -> tuple[int, dict[str, str], bytes]:
    port = int(ctl.url.rpartition(":")[2])
    target = req.path + ("?" + urlencode(req.query) if req.query else "")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {k: v for k, v in req.headers.items() if v}
        conn.request(req.method, target, body=req.body or None, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@dataclass
class _Answer:
    status_code: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(req=requests())
def test_requests_from_the_openapi_document_get_documented_answers(
    controller: ControllerProcess, req: Request
) -> None:
    assume(len(req.path) + len(urlencode(req.query)) < 8000)
    status, headers, body = exchange(controller, req)
    assert status < 500, body[:2000]
    rerouted = "%2F" in req.path.upper() or req.path != req.path.rstrip("/")
    if rerouted:
        return
    check_documented(req.template, req.method, _Answer(status, headers, body))
    if status >= 400:
        error = json.loads(body)["error"]
        assert error["request_id"] == headers["x-request-id"]
        assert SIGNER_SECRET not in error["message"] and ENROL_SECRET not in error["message"]
    if req.unauthorized:
        assert status == 401, body
    elif req.undocumented:
        assert (status, json.loads(body)["error"]["code"]) == (400, "UnknownParameter"), body


def test_the_fuzzed_controller_logged_no_internal_error(controller: ControllerProcess) -> None:
    log = Path(controller.log).read_text(errors="replace")
    assert "Traceback" not in log and "InternalError" not in log, log[-5000:]
