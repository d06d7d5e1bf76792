"""Request authentication (api.ec2.auth) through the real Falcon resource: requests signed by
botocore's own signers are accepted; unsigned, forged, tampered and stale ones get AWS's codes."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote, urlsplit

import boto3
import falcon
import pytest
from botocore.auth import SigV2Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from api.ec2.auth import Authenticator, SignedRequest, decode_query
from appliance.service.imports import ImportService
from tests.api.ec2_support import (
    FORM,
    HOST,
    FixedTimeSigV4,
    Prepared,
    ec2_app,
    ec2_config,
    error_of,
    parse,
    send,
    sign,
)
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY

#: the protocol layer (signatures, parameters) in front of the store: the same store calls on either backend
pytestmark = pytest.mark.backends("sqlite")

DESCRIBE = {"Action": "DescribeConversionTasks", "Version": "2016-11-15"}


def make_app(tmp_path: Path, **api: object) -> falcon.App:
    config = ec2_config(tmp_path, **api)
    return ec2_app(config, ImportService(config))


@pytest.fixture
def app(tmp_path: Path) -> falcon.App:
    return make_app(tmp_path)


def ok(app: falcon.App, req: Prepared) -> dict:
    result = send(app, req)
    assert result.status_code == 200, result.text
    return parse("DescribeConversionTasks", result)


def test_botocore_signed_post_is_accepted(app: falcon.App) -> None:
    result = send(app, sign(DESCRIBE))
    assert result.status_code == 200
    parsed = parse("DescribeConversionTasks", result)
    assert parsed["ConversionTasks"] == []
    # the request id in the body is the one in the header
    assert parsed["ResponseMetadata"]["RequestId"] == result.headers["x-amzn-RequestId"]


def test_signed_get_with_parameters_in_the_query_string_is_accepted(app: falcon.App) -> None:
    req = sign(DESCRIBE | {"ConversionTaskId": ""}, method="GET")
    assert "Action=DescribeConversionTasks" in req.query_string
    assert ok(app, req)["ConversionTasks"] == []


def test_date_header_can_replace_x_amz_date(app: falcon.App) -> None:
    req = sign(DESCRIBE, extra_headers={"Date": "Thu, 01 Jan 1970 00:00:00 GMT"})
    assert "Date" in req.headers and "X-Amz-Date" not in req.headers
    assert ok(app, req)["ConversionTasks"] == []


def presigned_url(expires: int = 60, when: datetime | None = None, method: str = "GET") -> str:
    if when is None:
        client = boto3.client(
            "ec2",
            endpoint_url=f"http://{HOST}",
            region_name=REGION,
            aws_access_key_id=TEST_ACCESS_KEY,
            aws_secret_access_key=TEST_SECRET_KEY,
        )
        return client.generate_presigned_url(
            "describe_conversion_tasks", Params={}, ExpiresIn=expires, HttpMethod=method
        )

    class FixedTimeQuery(FixedTimeSigV4, SigV4QueryAuth):
        pass

    signer = FixedTimeQuery(Credentials(TEST_ACCESS_KEY, TEST_SECRET_KEY), "ec2", REGION, when)
    signer._expires = expires
    request = AWSRequest(method=method, url=f"http://{HOST}/", params=DESCRIBE)
    signer.add_auth(request)
    return request.url


def send_url(app: falcon.App, url: str, method: str = "GET") -> falcon.testing.Result:
    return send(app, Prepared(method, urlsplit(url).query, {"Host": HOST}, b""))


def test_presigned_url_from_boto3_is_accepted(app: falcon.App) -> None:
    url = presigned_url()
    assert "X-Amz-Signature=" in url and "Action=DescribeConversionTasks" in url
    result = send_url(app, url)
    assert result.status_code == 200, result.text
    assert parse("DescribeConversionTasks", result)["ConversionTasks"] == []
    # boto3's default presign method for an EC2 operation is the model's POST (empty body)
    assert send_url(app, presigned_url(method="POST"), method="POST").status_code == 200


def test_presigned_url_past_its_expiry_is_request_expired(app: falcon.App) -> None:
    # signed 20 minutes ago for 10 minutes: expired more than the 300 s clock-skew grace ago
    url = presigned_url(expires=600, when=datetime.now(UTC) - timedelta(minutes=20))
    assert error_of(send_url(app, url))[:2] == (400, "RequestExpired")
    # within the grace period it still works
    url = presigned_url(expires=600, when=datetime.now(UTC) - timedelta(minutes=12))
    assert send_url(app, url).status_code == 200


def test_presigned_url_with_a_tampered_parameter_is_refused(app: falcon.App) -> None:
    url = presigned_url().replace("Action=DescribeConversionTasks", "Action=DescribeImportImageTasks")
    assert error_of(send_url(app, url))[:2] == (403, "SignatureDoesNotMatch")


def test_unsigned_request_is_missing_authentication_token(app: falcon.App) -> None:
    req = Prepared("POST", "", {"Host": HOST, "Content-Type": FORM}, b"Action=DescribeConversionTasks")
    result = send(app, req)
    assert error_of(result) == (401, "MissingAuthenticationToken", "Request is missing Authentication Token")
    assert result.headers["x-amzn-RequestId"]


def test_unknown_access_key_is_auth_failure(app: falcon.App) -> None:
    req = sign(DESCRIBE, access_key="AKIAUNKNOWNKEY000001")
    assert error_of(send(app, req))[:2] == (401, "AuthFailure")


def test_wrong_secret_is_signature_does_not_match(app: falcon.App) -> None:
    req = sign(DESCRIBE, secret_key="not-the-secret-0123456789")
    assert error_of(send(app, req))[:2] == (403, "SignatureDoesNotMatch")


def test_tampered_body_is_signature_does_not_match(app: falcon.App) -> None:
    req = sign(DESCRIBE | {"ConversionTaskId.1": "import-vol-aaaaaaaa"})
    req.body = req.body.replace(b"aaaaaaaa", b"bbbbbbbb")
    assert error_of(send(app, req))[:2] == (403, "SignatureDoesNotMatch")


def test_tampered_query_parameter_is_signature_does_not_match(app: falcon.App) -> None:
    req = sign(DESCRIBE | {"ConversionTaskId.1": "import-vol-aaaaaaaa"}, method="GET")
    req.query_string = req.query_string.replace("aaaaaaaa", "bbbbbbbb")
    assert error_of(send(app, req))[:2] == (403, "SignatureDoesNotMatch")
    # adding a parameter the client never signed is tampering too
    req = sign(DESCRIBE)
    req.query_string = "DryRun=true"
    assert error_of(send(app, req))[:2] == (403, "SignatureDoesNotMatch")


def test_tampered_signature_is_signature_does_not_match(app: falcon.App) -> None:
    req = sign(DESCRIBE)
    auth = req.headers["Authorization"]
    last = auth[-1]
    req.headers["Authorization"] = auth[:-1] + ("0" if last != "0" else "1")
    assert error_of(send(app, req))[:2] == (403, "SignatureDoesNotMatch")


def test_request_sent_to_another_host_than_signed_for_is_refused(app: falcon.App) -> None:
    req = sign(DESCRIBE)
    req.headers["Host"] = "127.0.0.1:9999"
    assert error_of(send(app, req))[:2] == (403, "SignatureDoesNotMatch")


@pytest.mark.parametrize("offset", [timedelta(minutes=-6), timedelta(minutes=6)])
def test_signature_outside_the_clock_skew_is_request_expired(app: falcon.App, offset: timedelta) -> None:
    req = sign(DESCRIBE, when=datetime.now(UTC) + offset)
    assert error_of(send(app, req))[:2] == (400, "RequestExpired")
    assert ok(app, sign(DESCRIBE, when=datetime.now(UTC) - timedelta(minutes=4)))["ConversionTasks"] == []


def test_any_region_is_accepted_but_the_service_must_be_ec2(app: falcon.App) -> None:
    assert ok(app, sign(DESCRIBE, region="eu-west-1"))["ConversionTasks"] == []
    status, code, message = error_of(send(app, sign(DESCRIBE, service="s3")))
    assert (status, code) == (403, "SignatureDoesNotMatch") and "'ec2'" in message


def test_payload_hash_header_must_match_the_body(app: falcon.App) -> None:
    good = hashlib.sha256(b"Action=DescribeConversionTasks&Version=2016-11-15").hexdigest()
    req = sign(DESCRIBE, extra_headers={"X-Amz-Content-SHA256": good})
    assert ok(app, req)["ConversionTasks"] == []
    req = sign(DESCRIBE, extra_headers={"X-Amz-Content-SHA256": hashlib.sha256(b"other").hexdigest()})
    assert error_of(send(app, req))[:2] == (403, "SignatureDoesNotMatch")
    req = sign(DESCRIBE, extra_headers={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"})
    assert error_of(send(app, req))[:2] == (403, "SignatureDoesNotMatch")


@pytest.mark.parametrize(
    "authorization",
    [
        "AWS4-HMAC-SHA256 Credential=AKIATESTTESTTEST0001/20260101/us-east-1/ec2/aws4_request",
        f"AWS4-HMAC-SHA256 Credential=short, SignedHeaders=host;x-amz-date, Signature={'a' * 64}",
        f"AWS4-HMAC-SHA256 Credential={TEST_ACCESS_KEY}/D/R/ec2/aws4_request, SignedHeaders=x-amz-date, "
        f"Signature={'a' * 64}",
        "AWS AKIATESTTESTTEST0001:c2lnbmF0dXJl",
    ],
)
def test_malformed_authorization_is_incomplete_signature(app: falcon.App, authorization: str) -> None:
    req = sign(DESCRIBE)
    req.headers["Authorization"] = authorization
    assert error_of(send(app, req))[:2] == (400, "IncompleteSignature")


def test_x_amz_date_must_be_signed(app: falcon.App) -> None:
    req = sign(DESCRIBE)
    auth = req.headers["Authorization"]
    req.headers["Authorization"] = auth.replace(
        "SignedHeaders=content-type;host;x-amz-date", "SignedHeaders=content-type;host"
    )
    status, code, message = error_of(send(app, req))
    assert (status, code) == (400, "IncompleteSignature") and "x-amz-date" in message


# -- Signature Version 2 (old euca2ools / boto2) ----------------------------------------------------


def sigv2_botocore(params: dict[str, str], secret: str = TEST_SECRET_KEY) -> Prepared:
    request = AWSRequest(method="POST", url=f"http://{HOST}/", data=dict(params))
    SigV2Auth(Credentials(TEST_ACCESS_KEY, secret)).add_auth(request)
    body = request.prepare().body
    return Prepared(
        "POST", "", {"Host": HOST, "Content-Type": FORM}, body.encode() if isinstance(body, str) else body
    )


def sigv2_sha1_get(params: dict[str, str]) -> Prepared:
    """HMAC-SHA1 query auth computed independently, straight from the AWS Signature Version 2 spec."""
    params = params | {
        "AWSAccessKeyId": TEST_ACCESS_KEY,
        "SignatureVersion": "2",
        "SignatureMethod": "HmacSHA1",
    }
    encode = lambda s: quote(s, safe="-_.~")  # noqa: E731
    canonical = "&".join(f"{encode(k)}={encode(v)}" for k, v in sorted(params.items()))
    to_sign = f"GET\n{HOST}\n/\n{canonical}"
    signature = base64.b64encode(
        hmac.new(TEST_SECRET_KEY.encode(), to_sign.encode(), hashlib.sha1).digest()
    ).decode()
    return Prepared("GET", f"{canonical}&Signature={encode(signature)}", {"Host": HOST}, b"")


def now_iso(offset: timedelta = timedelta()) -> str:
    return (datetime.now(UTC) + offset).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_sigv2_is_refused_unless_enabled(app: falcon.App) -> None:
    status, code, message = error_of(send(app, sigv2_botocore(DESCRIBE)))
    assert (status, code) == (401, "AuthFailure") and "api.sigv2" in message


def test_sigv2_hmac_sha256_from_botocore_is_accepted_when_enabled(tmp_path: Path) -> None:
    app = make_app(tmp_path, sigv2=True)
    assert ok(app, sigv2_botocore(DESCRIBE))["ConversionTasks"] == []


def test_sigv2_hmac_sha1_query_auth_is_accepted_when_enabled(tmp_path: Path) -> None:
    app = make_app(tmp_path, sigv2=True)
    assert ok(app, sigv2_sha1_get(DESCRIBE | {"Timestamp": now_iso()}))["ConversionTasks"] == []
    assert (
        ok(app, sigv2_sha1_get(DESCRIBE | {"Expires": now_iso(timedelta(minutes=5))}))["ConversionTasks"]
        == []
    )


def test_sigv2_forged_tampered_or_stale_requests_are_refused(tmp_path: Path) -> None:
    app = make_app(tmp_path, sigv2=True)
    assert error_of(send(app, sigv2_botocore(DESCRIBE, secret="wrong-secret-0123456789")))[:2] == (
        403,
        "SignatureDoesNotMatch",
    )
    req = sigv2_botocore(DESCRIBE | {"ConversionTaskId.1": "import-vol-aaaaaaaa"})
    req.body = req.body.replace(b"aaaaaaaa", b"bbbbbbbb")
    assert error_of(send(app, req))[:2] == (403, "SignatureDoesNotMatch")
    stale = sigv2_sha1_get(DESCRIBE | {"Timestamp": now_iso(timedelta(minutes=-10))})
    assert error_of(send(app, stale))[:2] == (400, "RequestExpired")
    expired = sigv2_sha1_get(DESCRIBE | {"Expires": now_iso(timedelta(minutes=-10))})
    assert error_of(send(app, expired))[:2] == (400, "RequestExpired")


# -- the authenticator on its own ------------------------------------------------------------------


def test_authenticator_reports_who_signed_and_how(tmp_path: Path) -> None:
    auth = Authenticator(ec2_config(tmp_path).api)
    req = sign(DESCRIBE, region="ap-south-1")
    signed = SignedRequest(
        method="POST",
        path="/",
        query_string="",
        headers={k.lower(): v for k, v in req.headers.items()},
        body=req.body,
        params={k: [v] for k, v in decode_query(req.body.decode())},
    )
    identity = auth.authenticate(signed)
    assert (identity.access_key, identity.scheme, identity.region) == (TEST_ACCESS_KEY, "sigv4", "ap-south-1")
    # the same request replayed 10 minutes later is stale
    with pytest.raises(Exception) as info:
        auth.authenticate(signed, now=datetime.now(UTC) + timedelta(minutes=10))
    assert getattr(info.value, "code", None) == "RequestExpired"


def test_query_string_that_is_not_utf8_is_malformed(app: falcon.App) -> None:
    req = sign(DESCRIBE)
    req.query_string = "Foo=%ff"
    assert error_of(send(app, req))[:2] == (400, "MalformedQueryString")


# -- dates and numbers no client can make the server fail on (issue 10, item 6) -------------------


def presigned_query(**overrides: str) -> str:
    """A boto3 presigned query with some of its X-Amz-* values replaced (the signature no longer
    matches: these requests must be refused before or at the signature check)."""
    pairs = decode_query(urlsplit(presigned_url()).query)
    return "&".join(f"{k}={quote(overrides.get(k, v), safe='')}" for k, v in pairs)


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"X-Amz-Date": "99991231T235959Z"}, "RequestExpired"),
        ({"X-Amz-Date": "00010101T000000Z"}, "RequestExpired"),
        ({"X-Amz-Date": "99991231T235959Z", "X-Amz-Expires": "604800"}, "RequestExpired"),
        ({"X-Amz-Expires": "²"}, "IncompleteSignature"),
        ({"X-Amz-Expires": "\u0661\u0660"}, "IncompleteSignature"),
        ({"X-Amz-Expires": "9" * 5000}, "IncompleteSignature"),
        ({"X-Amz-Date": "\u0662\u0660\u0662\u0666\u0660\u0661\u0660\u0661T000000Z"}, "IncompleteSignature"),
    ],
)
def test_presigned_request_with_an_extreme_date_or_a_non_ascii_number_is_a_client_error(
    app: falcon.App, overrides: dict[str, str], code: str
) -> None:
    result = send(app, Prepared("GET", presigned_query(**overrides), {"Host": HOST}, b""))
    assert error_of(result)[:2] == (400, code)


@pytest.mark.parametrize("date", ["Fri, 31 Dec 9999 23:59:59 -1400", "Mon, 01 Jan 0999 00:00:00 +1400"])
def test_date_header_at_the_ends_of_the_calendar_is_request_expired(app: falcon.App, date: str) -> None:
    req = sign(DESCRIBE)
    del req.headers["X-Amz-Date"]
    req.headers["Date"] = date
    req.headers["Authorization"] = req.headers["Authorization"].replace(
        "SignedHeaders=content-type;host;x-amz-date", "SignedHeaders=content-type;date;host"
    )
    assert error_of(send(app, req))[:2] == (400, "RequestExpired")


def test_sigv2_expires_far_in_the_future_is_request_expired(tmp_path: Path) -> None:
    app = make_app(tmp_path, sigv2=True)
    # correctly signed, but valid until the end of time: refused like a SigV4 presigned URL of more
    # than a week
    for expires in ("9999-12-31T23:59:59", now_iso(timedelta(days=8))):
        status, code, message = error_of(send(app, sigv2_sha1_get(DESCRIBE | {"Expires": expires})))
        assert (status, code) == (400, "RequestExpired") and "a week" in message
    near = sigv2_sha1_get(DESCRIBE | {"Expires": now_iso(timedelta(days=6))})
    assert ok(app, near)["ConversionTasks"] == []
    for bad in ("\u0669\u0669\u0669\u0669-12-31T23:59:59", "0001-01-01T00:00:00+14:00"):
        assert error_of(send(app, sigv2_sha1_get(DESCRIBE | {"Expires": bad})))[0] == 400
