"""Seeded fuzzing of both APIs against a real gunicorn on loopback (issue 10).

- The EC2 Query API: requests generated from botocore's ``ec2`` model for every served action,
  with the forms that broke it before (list indexes in Unicode digits, leading zeros or thousands
  of digits; numbers in other scripts, past a long, past AWS's bounds; repeated, unknown and
  over-nested parameters; huge values, control characters, S3 names S3 refuses), sent as a form
  POST or a GET query and signed with botocore's SigV4 signer so that they pass authentication
  and reach the parser, the handlers and the import service. A second fuzzer sends unsigned and
  presigned-looking requests whose dates, expiries and credentials are out of every range.
- The admin API: requests generated from its own OpenAPI document (hypothesis-jsonschema draws
  documented parameters from their schemas), mixed with undocumented parameters, values that
  break the schema and missing or wrong credentials.

Every answer must be below 500. Every EC2 answer must be EC2 XML that botocore parses (the
action's output, or an error with a code and a message); every admin answer must be documented
for its operation, JSON bodies valid against the documented schema.

Reproducible and bounded: ``derandomize=True`` (examples come from a seed fixed per test, no
example database), a fixed number of examples per test, no deadline (the machine is shared).
"""

from __future__ import annotations

import base64
import http.client
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.model import Shape
from botocore.parsers import create_parser
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from jsonschema import Draft202012Validator

from api.ec2 import model, rules
from api.ec2.resource import ACTIONS
from tests.api.ec2_support import MANIFEST_BASE
from tests.api.openapi_support import SPEC, assert_documented
from tests.processes import stop_process
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY, free_port, wait_for_http

#: slow; the protocol layer under fuzzing: the same store calls on either backend
pytestmark = [pytest.mark.slow, pytest.mark.backends("sqlite")]

#: examples per fuzzer: together about 30 s on this machine (2 shared cores)
EC2_EXAMPLES = 800
AUTH_EXAMPLES = 300
ADMIN_EXAMPLES = 250
FUZZ = settings(
    max_examples=EC2_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
FORM = "application/x-www-form-urlencoded; charset=utf-8"


# -- the server ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    port: int
    log: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``imaging serve`` (gunicorn, 2 workers) on a free loopback port; no worker runs, so tasks the
    fuzzer creates stay pending and nothing is fetched."""
    tmp = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    cfg = tmp / "imaging.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(tmp / "state"),
                "api": {
                    "bind": f"127.0.0.1:{port}",
                    "workers": 2,
                    "sigv2": True,
                    "credentials": [{"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY}],
                },
                "sources": {"allowed_endpoints": [MANIFEST_BASE]},
                # imports keep being created (and validated deep into the service) all run long
                "tasks": {"max_active": 100_000},
            }
        )
    )
    log = tmp / "server.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "-c", str(cfg), "serve"],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/v1/health", proc=proc)
        yield Server(port, log)
    finally:
        stop_process(proc)


@dataclass
class Answer:
    status_code: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def exchange(server: Server, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> Answer:
    """One HTTP request exactly as given (``target`` already percent-encoded)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        # header values as UTF-8 bytes: a fuzzed date may hold other scripts' digits
        conn.request(method, target, body=body or None, headers={k: v.encode() for k, v in headers.items()})
        resp = conn.getresponse()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


# -- EC2: what a response must be -------------------------------------------------------------------


def check_ec2_answer(answer: Answer, action: str | None) -> None:
    """Below 500, EC2 XML, and parsed by botocore into the action's output or a coded error."""
    assert answer.status_code < 500, answer.body[:2000]
    assert answer.headers.get("content-type", "").startswith("text/xml"), answer.headers
    root = ET.fromstring(answer.body)  # well-formed XML, or this raises
    response = {"body": answer.body, "headers": answer.headers, "status_code": answer.status_code}
    if answer.status_code == 200:
        assert action in ACTIONS and root.tag.endswith(f"{action}Response")
        parsed = create_parser("ec2").parse(response, model.operation(action).output_shape)
        assert parsed["ResponseMetadata"]["RequestId"]
        return
    assert root.tag == "Response"
    code, message = root.findtext("Errors/Error/Code"), root.findtext("Errors/Error/Message")
    assert code and message, answer.body
    parsed = create_parser("ec2").parse(response, None)
    assert (parsed["Error"]["Code"], parsed["Error"]["Message"]) == (code, message)
    assert "Traceback" not in message


# -- EC2: request strategies from botocore's model ------------------------------------------------

_UNICODE_DIGITS = "²³¹\u0660\u0661\u0663\u0669\u06f1\u0967\u09e7\uff11\U0001d7cf"
_INDEX_FORMS = st.one_of(
    st.sampled_from(["0", "01", "001", "-1", "+1", "1.0", " 1", "x", "", "1e2", "9" * 12]),
    st.text(alphabet=_UNICODE_DIGITS, min_size=1, max_size=3),
    st.integers(10, 6000).map(lambda n: "9" * n),
)
_NUMBER_FORMS = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(
        [
            "0",
            "1",
            "7",
            "8",
            "1000",
            "1001",
            "16384",
            "16385",
            str(16 * 2**40),
            str(16 * 2**40 + 1),
            str(2**31 - 1),
            str(2**31),
            str(2**63 - 1),
            str(2**63),
            str(-(2**63) - 1),
            "+5",
            "-0",
            "1e3",
            "0x10",
            "1_000",
            " 1",
            "1 ",
            "",
            "\u0661",
            "\u0663\u0660",
            "²",
            "\U0001d7cf",
            "1.5",
            "nan",
            "inf",
            "-inf",
            "1e309",
            "-0.0",
            "\u0661.\u0665",
            ".5",
            "5.",
        ]
    ),
    st.text(alphabet=_UNICODE_DIGITS + "0123456789", min_size=1, max_size=8),
    st.integers(4000, 6000).map(lambda n: "7" * n),
    st.integers(1, 6000).map(lambda n: "0" * n + "1"),
)
_BOOLEAN_FORMS = st.sampled_from(["true", "false", "TRUE", "False", "yes", "1", "", "\u0661"])
_TIMESTAMP_FORMS = st.sampled_from(
    [
        "2026-01-01T00:00:00Z",
        "2026-11-22T04:00:00.000Z",
        "9999-12-31T23:59:59",
        "0001-01-01T00:00:00",
        "9999-12-31T23:59:59-14:00",
        "0001-01-01T00:00:00+14:00",
        "\u0662\u0660\u0662\u0666-01-01T00:00:00",
        "yesterday",
        "",
        "2026-02-30T00:00:00",
        "2026-01-01T24:00:00",
    ]
)
_S3_NAMES = st.sampled_from(
    [
        *("disks", "Bad_Bucket", "bad bucket", "", "ab", "a" * 64, "192.168.5.4", "xn--b", "b--x-s3"),
        *("my..bucket", "k", "../other/k", "a/./b", "k" * 1025, "line\nbreak", "\x00"),
    ]
)
_URL_FORMS = st.sampled_from(
    [
        f"{MANIFEST_BASE}/bucket/disk.manifest.xml?X-Amz-Signature=abc",
        f"{MANIFEST_BASE}/b/disk.vmdk",
        "http://169.254.169.254/latest/meta-data/",
        "http://2130706433/x",
        "https://[::1]/x",
        "s3://disks/disk.raw",
        "s3://Bad_Bucket/k",
        "s3://disks/../other/k",
        "s3://disks/",
        "S3://disks/k",
        "ftp://host/x",
        "file:///etc/passwd",
        "http://" + "h" * 300 + "/x",
        "",
    ]
)
_ID_FORMS = st.sampled_from(
    [
        "import-vol-abcd1234",
        "import-i-abcd1234",
        "import-ami-0123456789abcdef0",
        "import-snap-01234567",
        "import-vol-ABCD1234",
        "aki-12345678",
        "ari-0123456789abcdef0",
        "eki-zzzzzzzz",
        "i-1",
        "",
    ]
)
_TEXT_FORMS = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=10),
    st.builds(lambda s, n: (s or "x") * n, st.text(min_size=1, max_size=5), st.integers(200, 6000)),
)


def _scalar(shape: Shape, enum: tuple[str, ...]) -> st.SearchStrategy[str]:
    kind = shape.type_name
    if kind in ("integer", "long", "double", "float"):
        return _NUMBER_FORMS
    if kind == "boolean":
        return _BOOLEAN_FORMS
    if kind == "timestamp":
        return _TIMESTAMP_FORMS
    choices = list(enum) or list(getattr(shape, "enum", None) or ())
    special = st.one_of(_URL_FORMS, _S3_NAMES, _ID_FORMS)
    if choices:
        swapped = [c.swapcase() for c in choices]
        return st.one_of(st.sampled_from(choices + swapped), _TEXT_FORMS, special)
    return st.one_of(special, _TEXT_FORMS)


@st.composite
def _members(
    draw: st.DrawFn, action: str, shape: Shape, wire: str, path: tuple[str, ...], depth: int
) -> list[tuple[str, str]]:
    """Wire parameters for ``shape`` at ``wire`` (its name so far) and member path ``path``."""
    enums = rules.ENUMS.get(action, {})
    if shape.type_name == "structure":
        members = list(model.request_members(shape).items())
        if not members or depth > 5:
            return []
        chosen = draw(
            st.lists(st.sampled_from(members), max_size=min(5, len(members)), unique_by=lambda m: m[0])
        )
        out: list[tuple[str, str]] = []
        for wire_name, (name, member) in chosen:
            child = f"{wire}.{wire_name}" if wire else wire_name
            out += draw(_members(action, member, child, (*path, name), depth + 1))
        return out
    if shape.type_name == "list":
        count = draw(st.integers(0, 3))
        if count == 0:
            return [(wire, "")] if draw(st.booleans()) else []
        out = []
        for i in range(1, count + 1):
            index = draw(st.one_of(st.just(str(i)), _INDEX_FORMS)) if draw(st.integers(0, 5)) == 0 else str(i)
            out += draw(_members(action, shape.member, f"{wire}.{index}", (*path, "*"), depth + 1))
        return out
    enum = enums.get(path)
    return [(wire, draw(_scalar(shape, enum.values if enum else ())))]


_MANIFEST = f"{MANIFEST_BASE}/bucket/disk.manifest.xml?X-Amz-Signature=abc"
#: a valid request of each action (wire names): the fuzzer mutates these so that it also reaches the
#: handlers and the import service behind the parser, not only the parser's refusals
VALID: dict[str, list[tuple[str, str]]] = {
    "ImportVolume": [
        ("AvailabilityZone", "us-east-1a"),
        ("Image.Format", "RAW"),
        ("Image.Bytes", str(2**30)),
        ("Image.ImportManifestUrl", _MANIFEST),
        ("Volume.Size", "1"),
        ("Description", "data disk"),
    ],
    "ImportInstance": [
        ("Platform", "Linux"),
        ("LaunchSpecification.Architecture", "x86_64"),
        ("LaunchSpecification.InstanceType", "m1.small"),
        ("LaunchSpecification.Placement.AvailabilityZone", "us-east-1a"),
        ("DiskImage.1.Image.Format", "VMDK"),
        ("DiskImage.1.Image.Bytes", str(2**30)),
        ("DiskImage.1.Image.ImportManifestUrl", _MANIFEST),
        ("DiskImage.1.Volume.Size", "8"),
    ],
    "DescribeConversionTasks": [],
    "CancelConversionTask": [("ConversionTaskId", "import-vol-abcd1234")],
    "ImportImage": [
        ("Architecture", "x86_64"),
        ("Platform", "Linux"),
        ("DiskContainer.1.Format", "VMDK"),
        ("DiskContainer.1.UserBucket.S3Bucket", "disks"),
        ("DiskContainer.1.UserBucket.S3Key", "disk.vmdk"),
        ("TagSpecification.1.ResourceType", "import-image-task"),
        ("TagSpecification.1.Tag.1.Key", "k"),
        ("TagSpecification.1.Tag.1.Value", "v"),
    ],
    "ImportSnapshot": [("DiskContainer.Format", "RAW"), ("DiskContainer.Url", f"{MANIFEST_BASE}/b/disk.raw")],
    "DescribeImportImageTasks": [
        ("MaxResults", "5"),
        ("Filters.1.Name", "task-state"),
        ("Filters.1.Value.1", "active"),
    ],
    "DescribeImportSnapshotTasks": [],
    "CancelImportTask": [("ImportTaskId", "import-ami-0123456789abcdef0")],
    "CreateInstanceExportTask": [
        ("InstanceId", "i-0123456789abcdef0"),
        ("TargetEnvironment", "vmware"),
        ("ExportToS3.DiskImageFormat", "VMDK"),
        ("ExportToS3.S3Bucket", "exports"),
        ("ExportToS3.S3Prefix", "vms/"),
    ],
    "DescribeExportTasks": [("Filter.1.Name", "state"), ("Filter.1.Value.1", "active")],
    "CancelExportTask": [("ExportTaskId", "export-i-0123456789abcdef0")],
    "ExportImage": [
        ("ImageId", "ami-0123456789abcdef0"),
        ("DiskImageFormat", "VHD"),
        ("S3ExportLocation.S3Bucket", "exports"),
        ("S3ExportLocation.S3Prefix", "p/"),
    ],
    "DescribeExportImageTasks": [
        ("MaxResults", "5"),
        ("Filter.1.Name", "task-state"),
        ("Filter.1.Value.1", "active"),
    ],
    "BundleInstance": [
        ("InstanceId", "i-0123456789abcdef0"),
        ("Storage.S3.Bucket", "bundles"),
        ("Storage.S3.Prefix", "winvm"),
        ("Storage.S3.AWSAccessKeyId", "AKIDEXAMPLE"),
        ("Storage.S3.UploadPolicy", "eyJleHBpcmF0aW9uIjoieCJ9"),
        ("Storage.S3.UploadPolicySignature", "c2lnbmF0dXJl"),
    ],
    "DescribeBundleTasks": [("BundleId.1", "bun-0123456789abcdef0"), ("Filter.1.Name", "state")],
    "CancelBundleTask": [("BundleId", "bun-0123456789abcdef0")],
    "CreateImage": [
        ("InstanceId", "i-0123456789abcdef0"),
        ("Name", "web server"),
        ("NoReboot", "true"),
        ("BlockDeviceMapping.1.DeviceName", "/dev/sdb"),
        ("BlockDeviceMapping.1.Ebs.VolumeSize", "8"),
    ],
}
_ANY_VALUE = st.one_of(
    _NUMBER_FORMS, _TEXT_FORMS, _URL_FORMS, _S3_NAMES, _ID_FORMS, _BOOLEAN_FORMS, _TIMESTAMP_FORMS
)


@st.composite
def _mutated(draw: st.DrawFn, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``pairs`` with up to three values replaced, or list indexes in their names rewritten."""
    out = list(pairs)
    for _ in range(draw(st.integers(0, 3)) if out else 0):
        i = draw(st.integers(0, len(out) - 1))
        name, value = out[i]
        if draw(st.booleans()) and any(part.isdigit() for part in name.split(".")):
            parts = name.split(".")
            j = draw(st.sampled_from([k for k, part in enumerate(parts) if part.isdigit()]))
            parts[j] = draw(_INDEX_FORMS)
            out[i] = (".".join(parts), value)
        else:
            out[i] = (name, draw(_ANY_VALUE))
    return out


@st.composite
def ec2_requests(draw: st.DrawFn) -> tuple[str | None, list[tuple[str, str]]]:
    """``(action, parameters)``: a served action's valid request, mutated, plus members drawn from
    botocore's model and protocol-level mutations. Hypothesis favours small draws, so each 0 below
    is the unmutated choice."""
    action = draw(st.sampled_from(sorted(ACTIONS)))
    params = draw(_mutated(VALID[action]))
    if draw(st.integers(0, 2)):
        params += draw(_members(action, model.operation(action).input_shape, "", (), 0))
    extras = rules.EXTRA_MEMBERS.get(action, {})
    if extras and draw(st.integers(0, 3)) == 3:
        params.append((draw(st.sampled_from(sorted(extras))), draw(st.one_of(_ID_FORMS, _TEXT_FORMS))))
    mutation = draw(st.integers(0, 9))
    if mutation == 6 and params:  # the same parameter twice
        params.append(draw(st.sampled_from(params)))
    elif mutation == 7:  # an unknown or over-nested parameter
        base = draw(st.sampled_from([name for name, _ in params] or ["Foo"]))
        params.append((draw(st.sampled_from([base + ".Extra", base + ".1", "Foo", base + ".1.x"])), "x"))
    elif mutation == 8:  # a random name
        params.append((draw(st.text(min_size=1, max_size=30)), draw(_TEXT_FORMS)))
    elif mutation == 9 and params:  # a huge value (sometimes past api.max_request_bytes: 413 or 414)
        name, _ = draw(st.sampled_from(params))
        params.append((name, "v" * draw(st.one_of(st.integers(10_000, 60_000), st.just(1_100_000)))))
    wire_action: str | None = action
    which = draw(st.integers(0, 24))
    if which == 22:
        wire_action = None
    elif which == 23:
        wire_action = draw(
            st.sampled_from(["RunInstances", "importvolume", "", "ImportVolume\x00", "\u0661"])
        )
    head = [("Action", wire_action)] if wire_action is not None else []
    if which == 24:
        head.append(("Action", action))  # Action twice
    if draw(st.integers(0, 9)) != 9:
        head.append(("Version", model.API_VERSION))
    return (action if wire_action == action else None), head + params


def _encode(pairs: list[tuple[str, str]]) -> str:
    """RFC 3986 form encoding, as botocore canonicalises (so the signature covers exactly this)."""
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in pairs)


def signed(server: Server, method: str, pairs: list[tuple[str, str]]) -> tuple[str, dict[str, str], bytes]:
    """``(target, headers, body)`` signed with botocore's SigV4 signer (Authorization header)."""
    encoded = _encode(pairs)
    target = "/" if method == "POST" else f"/?{encoded}"
    body = encoded.encode() if method == "POST" else b""
    request = AWSRequest(
        method=method, url=f"http://{server.host}{target}", headers={"Host": server.host}, data=body
    )
    if method == "POST":
        request.headers["Content-Type"] = FORM
    SigV4Auth(Credentials(TEST_ACCESS_KEY, TEST_SECRET_KEY), "ec2", REGION).add_auth(request)
    return target, {k: v for k, v in request.headers.items()}, body


@FUZZ
@given(request=ec2_requests(), method=st.sampled_from(["POST", "POST", "POST", "GET"]))
def test_signed_ec2_requests_never_fail_the_server_and_always_answer_ec2_xml(
    server: Server, request: tuple[str | None, list[tuple[str, str]]], method: str
) -> None:
    action, pairs = request
    target, headers, body = signed(server, method, pairs)
    answer = exchange(server, method, target, headers, body)
    check_ec2_answer(answer, action)
    if answer.status_code in (401, 403):
        # signed correctly, so never refused for authentication (unless gunicorn refused it first)
        assert len(target) > 8000, answer.body


# -- EC2 authentication: dates, expiries and credentials out of range --------------------------------

_AMZ_DATES = st.one_of(
    st.sampled_from(
        [
            "99991231T235959Z",
            "00010101T000000Z",
            "20260101T000000Z",
            "\u0662\u0660\u0662\u0666\u0660\u0661\u0660\u0661T000000Z",
            "20261301T000000Z",
            "2026-01-01T00:00:00Z",
            "",
            "9" * 5000,
        ]
    ),
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)).map(
        lambda d: d.strftime("%Y%m%dT%H%M%SZ").rjust(16, "0")
    ),
)
_HTTP_DATES = st.sampled_from(
    [
        *("Fri, 31 Dec 9999 23:59:59 -1400", "Mon, 01 Jan 0001 00:00:00 +1400"),
        *("Mon, 01 Jan 0999 00:00:00 +1400", "Thu, 01 Jan 1970 00:00:00 GMT"),
        *("not a date", "", "Fri, 31 Dec 9999 23:59:59 +9999"),
    ]
)
_ISO_DATES = st.one_of(
    st.sampled_from(
        [
            "9999-12-31T23:59:59",
            "0001-01-01T00:00:00",
            "9999-12-31T23:59:59-14:00",
            "0001-01-01T00:00:00+14:00",
        ]
    ),
    _TIMESTAMP_FORMS,
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)).map(lambda d: d.isoformat()),
)
_CREDENTIALS = st.sampled_from(
    [
        f"{TEST_ACCESS_KEY}/20260101/us-east-1/ec2/aws4_request",
        f"{TEST_ACCESS_KEY}/99991231/us-east-1/ec2/aws4_request",
        "AKIAUNKNOWNUNKNOWN01/20260101/us-east-1/ec2/aws4_request",
        f"{TEST_ACCESS_KEY}/20260101/us-east-1/s3/aws4_request",
        "short",
        "",
        "a/" * 3000,
    ]
)


@st.composite
def auth_requests(draw: st.DrawFn) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Query parameters and headers of a request whose authentication is wrong in some way."""
    pairs: list[tuple[str, str]] = [("Action", "DescribeConversionTasks"), ("Version", model.API_VERSION)]
    headers: dict[str, str] = {}
    # (hypothesis draws the first choices most: the extremes come first)
    scheme = draw(st.sampled_from(["presigned", "sigv2", "header", "none"]))
    if scheme == "presigned":
        values = {
            "X-Amz-Algorithm": draw(st.sampled_from(["AWS4-HMAC-SHA256", "AWS4-HMAC-SHA1", ""])),
            "X-Amz-Credential": draw(_CREDENTIALS),
            "X-Amz-Date": draw(_AMZ_DATES),
            "X-Amz-Expires": draw(st.one_of(st.sampled_from(["60", "604800", "1"]), _NUMBER_FORMS)),
            "X-Amz-SignedHeaders": draw(st.sampled_from(["host", "host;x-amz-date", "", "date"])),
            "X-Amz-Signature": draw(st.sampled_from(["0" * 64, "z" * 64, "", "0" * 6000])),
        }
        drop = draw(st.sets(st.sampled_from(sorted(values)), max_size=2))
        pairs += [(k, v) for k, v in values.items() if k not in drop]
    elif scheme == "header":
        credential = draw(_CREDENTIALS)
        signed_headers = draw(st.sampled_from(["host;x-amz-date", "date;host", "host", ""]))
        headers["Authorization"] = draw(
            st.sampled_from(
                [
                    f"AWS4-HMAC-SHA256 Credential={credential}, SignedHeaders={signed_headers}, "
                    f"Signature={'a' * 64}",
                    f"AWS4-HMAC-SHA256 Credential={credential}",
                    "AWS4-HMAC-SHA256",
                    "Basic Zm9vOmJhcg==",
                ]
            )
        )
        if draw(st.booleans()):
            headers["X-Amz-Date"] = draw(_AMZ_DATES)[:200]
        else:
            headers["Date"] = draw(_HTTP_DATES)
    elif scheme == "sigv2":
        pairs += [
            ("AWSAccessKeyId", draw(st.sampled_from([TEST_ACCESS_KEY, "AKIAUNKNOWNUNKNOWN01", ""]))),
            ("SignatureVersion", draw(st.sampled_from(["2", "1", "\u0662", ""]))),
            ("SignatureMethod", draw(st.sampled_from(["HmacSHA256", "HmacSHA1", "HmacMD5"]))),
            ("Signature", draw(st.sampled_from(["abc", "", "A" * 100]))),
        ]
        when = draw(st.sampled_from(["Expires", "Timestamp", "both", "none"]))
        if when in ("Expires", "both"):
            pairs.append(("Expires", draw(_ISO_DATES)))
        if when in ("Timestamp", "both"):
            pairs.append(("Timestamp", draw(_ISO_DATES)))
    return pairs, headers


@settings(FUZZ, max_examples=AUTH_EXAMPLES)
@given(request=auth_requests(), method=st.sampled_from(["GET", "POST"]))
def test_requests_with_broken_authentication_are_refused_with_ec2_codes(
    server: Server, request: tuple[list[tuple[str, str]], dict[str, str]], method: str
) -> None:
    pairs, headers = request
    encoded = _encode(pairs)
    headers = {"Host": server.host, **headers}
    if method == "GET":
        answer = exchange(server, "GET", f"/?{encoded}", headers)
    else:
        answer = exchange(server, "POST", "/", headers | {"Content-Type": FORM}, encoded.encode())
    check_ec2_answer(answer, None)
    assert answer.status_code != 200, "a request without a valid signature was accepted"


# -- the admin API, from its OpenAPI document -------------------------------------------------------


def _basic(key: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()


_OPERATIONS = sorted(
    (template, method)
    for template, item in SPEC["paths"].items()
    for method in item
    if method == "get"  # POST / is the EC2 API, fuzzed above
)


def _schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A parameter schema with its ``$ref``s to components resolved (hypothesis-jsonschema needs
    self-contained schemas)."""
    text = json.dumps(schema)
    for name, component in SPEC["components"]["schemas"].items():
        text = text.replace(json.dumps({"$ref": f"#/components/schemas/{name}"}), json.dumps(component))
    return json.loads(text)


def _query_value(value: Any) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [json.dumps(v) if isinstance(v, bool | dict) else str(v) for v in values]


@dataclass
class AdminRequest:
    template: str
    path: str
    query: list[tuple[str, str]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    #: the route needs credentials and the request has the right ones (None: an open route)
    authorized: bool | None = None
    #: every parameter was drawn from its documented schema, each single-valued one at most once
    schema_valid: bool = True
    #: a parameter the operation does not document
    undocumented: bool = False
    #: a path parameter holds a "/", so the request reaches another route (or none)
    rerouted: bool = False


@st.composite
def admin_requests(draw: st.DrawFn) -> AdminRequest:
    template, method = draw(st.sampled_from(_OPERATIONS))
    operation = SPEC["paths"][template][method]
    request = AdminRequest(template, template)
    for param in operation.get("parameters", ()):
        schema = _schema(param["schema"])
        if param["in"] == "path":
            value = str(draw(st.one_of(from_schema(schema), st.text(min_size=1, max_size=20), _ID_FORMS)))
            request.schema_valid &= Draft202012Validator(schema).is_valid(value)
            request.rerouted |= "/" in value
            request.path = request.path.replace("{" + param["name"] + "}", quote(value or "x", safe=""))
        elif draw(st.booleans()):
            valid = from_schema(schema).map(_query_value)
            broken = st.lists(st.one_of(st.text(max_size=20), _NUMBER_FORMS), min_size=1, max_size=3)
            is_valid = draw(st.integers(0, 2)) != 2
            values = draw(valid if is_valid else broken)
            request.schema_valid &= is_valid
            request.query += [(param["name"], v) for v in values]
    if draw(st.integers(0, 4)) == 4:  # an undocumented parameter (never an EC2 one: lower case)
        name = draw(st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True))
        documented = {p["name"] for p in operation.get("parameters", ())}
        request.undocumented = name not in documented
        request.query.append((name, draw(st.text(max_size=10))))
    auth = draw(st.sampled_from(["good", "good", "good", "none", "wrong", "garbage"]))
    request.headers = {
        "good": {"Authorization": _basic(TEST_ACCESS_KEY, TEST_SECRET_KEY)},
        "none": {},
        "wrong": {"Authorization": _basic(TEST_ACCESS_KEY, "wrong-secret")},
        "garbage": {
            "Authorization": draw(st.sampled_from(["Basic", "Basic ###", "Bearer x", "Basic " + "A" * 300]))
        },
    }[auth]
    if operation.get("security", SPEC["security"]) != []:
        request.authorized = auth == "good"
    return request


@settings(FUZZ, max_examples=ADMIN_EXAMPLES)
@given(request=admin_requests())
def test_admin_requests_from_the_openapi_document_get_documented_answers(
    server: Server, request: AdminRequest
) -> None:
    target = request.path + ("?" + _encode(request.query) if request.query else "")
    # longer request lines are refused by gunicorn before routing (documented, as EC2 XML)
    assume(len(target) < 8000)
    answer = exchange(server, "GET", target, request.headers)
    assert answer.status_code < 500, answer.body[:2000]
    assert_documented(request.template, "GET", answer)
    code = answer.json["error"]["code"] if answer.status_code >= 400 else None
    if code is not None:
        assert answer.json["error"]["request_id"] == answer.headers["x-request-id"]
    # what the document promises for what was sent
    if request.rerouted:
        return
    if request.authorized is False:
        assert (answer.status_code, code) == (401, "AuthFailure")
    elif request.undocumented:
        assert (answer.status_code, code) == (400, "UnknownParameter"), answer.body
    elif request.schema_valid:
        marker = dict(request.query).get("marker")
        allowed = {None, "TaskNotFound"} | ({"InvalidMarker"} if marker else set())
        if "403" in SPEC["paths"][request.template]["get"]["responses"]:
            # admin-only routes (documented 403 AccessDenied): the fuzzed server's keys are not admin
            allowed.add("AccessDenied")
        if request.template == "/v1/images/{image_id}":
            # no image was stored on the fuzzed server: a well-formed id names nothing
            allowed |= {"InvalidAMIID.NotFound", "InvalidSnapshot.NotFound"}
        if request.template == "/v1/uploads/{upload_id}":
            # no upload exists, and the fuzzed server may not enable the upload method
            allowed |= {"Upload.NotFound", "ImportMethodDisabled"}
        assert code in allowed, f"a request the document allows was refused: {answer.body[:1000]!r}"


def test_the_fuzzed_server_logged_no_internal_error(server: Server) -> None:
    # runs after the fuzzers (file order): no request reached an unexpected exception
    log = server.log.read_text(errors="replace")
    assert "Traceback" not in log and "internal error" not in log, log[-5000:]
