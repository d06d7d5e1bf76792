"""Request authentication for the EC2 Query API: AWS Signature Version 4 (and opt-in Version 2).

The expected signature is computed by botocore's own signers — the same code boto3 and the AWS CLI
sign with — fed with the request exactly as received: method, path, the raw query string, the
headers the client says it signed, the exact body bytes, and the client's own timestamp, region
and service from its credential scope. Only the secret comes from us (``api.credentials``).
Signatures are compared with :func:`hmac.compare_digest`.

Accepted forms:

- ``Authorization: AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…`` with
  ``X-Amz-Date`` (or ``Date``) — what boto3, the AWS CLI and current euca2ools send;
- presigned query parameters ``X-Amz-Algorithm/-Credential/-Date/-Expires/-SignedHeaders/-Signature``;
- Signature Version 2 query auth (``AWSAccessKeyId``, ``SignatureVersion=2``, ``SignatureMethod``
  ``HmacSHA256``/``HmacSHA1``, ``Timestamp`` or ``Expires``, ``Signature``) only when
  ``api.sigv2`` is true, for old euca2ools/boto2.

Decisions (documented here because clients see them):

- **Region**: any region in the credential scope is accepted and logged. The appliance is one
  endpoint; clients often carry a default region unrelated to it, and the region only salts the
  signing key, so accepting it costs no security. The service must be ``ec2``.
- **Unsigned requests** get ``MissingAuthenticationToken`` (401), the code AWS documents for a
  request that carries no credentials; an unknown access key gets ``AuthFailure`` (401), a wrong
  signature ``SignatureDoesNotMatch`` (403), a malformed signature ``IncompleteSignature`` (400).
- **Time**: a signed timestamp more than ``api.max_clock_skew`` seconds away from now, or a
  presigned URL / SigV2 ``Expires`` more than that past its expiry (AWS's rule), or a SigV2
  ``Expires`` more than a week ahead (the lifetime limit of a SigV4 presigned URL), gives
  ``RequestExpired`` (400). Times are compared as differences from now, so any date a client can
  write (year 1 to 9999, any UTC offset) is answered, never an overflow; numbers and dates are
  ASCII digits only.
- **Payload**: the body is always hashed and checked; ``UNSIGNED-PAYLOAD`` is refused because the
  operation parameters travel in the body.
- **Accounts**: a request acts for the account of its key (``api.credentials[].account``). A key
  with ``role: frontend`` (a cloud's EC2 front end, one key for many accounts) acts for the account
  named in the ``X-Imaging-Account`` header when that header is covered by the signature: listed
  in ``SignedHeaders`` (``X-Amz-SignedHeaders`` of a presigned request). From a front end, the
  header present but not signed (SigV2 signs no header) is refused with ``IncompleteSignature``:
  ignoring it would file the task under the front end's own account, where every tenant whose
  header went unsigned would see it. From any other key the header is ignored, signed or not: only
  a front end may act for another account. An account name that is not one (``ACCOUNT_RE``) is
  ``InvalidParameterValue``. The header is read only once the signature is verified.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from urllib.parse import parse_qsl, quote

from botocore.auth import SIGV4_TIMESTAMP, SigV2Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import Credentials
from botocore.utils import normalize_url_path

from appliance.config import ACCOUNT_RE, FRONTEND, ApiConfig
from appliance.service.imports import Caller

from .errors import Ec2Error, shown

log = logging.getLogger(__name__)

SERVICE = "ec2"
ALGORITHM = "AWS4-HMAC-SHA256"
#: AWS's limit on a presigned URL's lifetime (one week)
MAX_PRESIGN_EXPIRES = 7 * 24 * 3600
#: the header in which a front end names the account it acts for (lower case, as received)
ACCOUNT_HEADER = "x-imaging-account"

_AUTH_HEADER_RE = re.compile(r"^AWS4-HMAC-SHA256\s+(?P<rest>.+)$", re.DOTALL)
_SIGNATURE_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_AMZ_DATE_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z$")
#: X-Amz-Expires: seconds, ASCII digits (at most MAX_PRESIGN_EXPIRES)
_EXPIRES_RE = re.compile(r"^[0-9]{1,7}$")
_V2_METHODS = {"HmacSHA256": hashlib.sha256, "HmacSHA1": hashlib.sha1}


def _auth_failure() -> Ec2Error:
    return Ec2Error("AuthFailure", "AWS was not able to validate the provided access credentials", 401)


def _mismatch(message: str | None = None) -> Ec2Error:
    return Ec2Error(
        "SignatureDoesNotMatch",
        message
        or "The request signature we calculated does not match the signature you provided. "
        "Check your AWS Secret Access Key and signing method.",
        403,
    )


def _incomplete(message: str) -> Ec2Error:
    return Ec2Error("IncompleteSignature", message, 400)


def _expired(message: str) -> Ec2Error:
    return Ec2Error("RequestExpired", message, 400)


@dataclass(frozen=True)
class SignedRequest:
    """The parts of an HTTP request a signature covers, exactly as received."""

    method: str
    #: the path as the client addressed it (decoded, including any mount prefix)
    path: str
    #: the raw query string, still percent-encoded ("" when there is none)
    query_string: str
    #: header name (lower case) → value
    headers: Mapping[str, str]
    body: bytes
    #: decoded parameters from the query string and the form body, as lists of values
    params: Mapping[str, Sequence[str]]


@dataclass(frozen=True)
class Identity:
    """Who signed a request, how, and for whom it acts."""

    access_key: str
    #: ``sigv4`` (Authorization header), ``sigv4-query`` (presigned) or ``sigv2``
    scheme: str
    region: str | None = None
    #: the headers the signature covers (lower case; none for SigV2)
    signed_headers: frozenset[str] = frozenset()
    #: the account the request acts for and the accounts whose tasks it sees (until
    #: :meth:`Authenticator.authenticate` knows them: none)
    caller: Caller = field(default_factory=lambda: Caller(sees=frozenset()))


def decode_query(query_string: str) -> list[tuple[str, str]]:
    """Decoded ``(name, value)`` pairs of a query string or form body (``+`` is a space).

    The same decoding is used to canonicalise the signed query and to read the parameters, so
    what is verified is what is acted on. Raises ``MalformedQueryString`` for invalid UTF-8.
    """
    try:
        return parse_qsl(query_string, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise Ec2Error(
            "MalformedQueryString", "The query string is not valid percent-encoded UTF-8"
        ) from None


class _SigV4Verifier(SigV4Auth):
    """botocore's SigV4 signer, restricted to the headers the client signed and to its path."""

    def __init__(
        self, credentials: Credentials, region: str, signed_headers: Sequence[str], path: str
    ) -> None:
        super().__init__(credentials, SERVICE, region)
        self._signed_headers = signed_headers
        self._path = path

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        # botocore picks headers itself (and skips e.g. user-agent); a server must use the
        # client's list, whatever it contains.
        headers = HTTPHeaders()
        for name in self._signed_headers:
            headers[name] = request.headers[name]
        return headers

    def _normalize_url_path(self, path: str) -> str:
        return quote(normalize_url_path(self._path), safe="/~")

    def expected_signature(self, request: AWSRequest, timestamp: str) -> str:
        request.context["timestamp"] = timestamp
        canonical = self.canonical_request(request)
        log.debug("SigV4 canonical request:\n%s", canonical)
        return self.signature(self.string_to_sign(request, canonical), request)


class Authenticator:
    """Verifies request signatures against the configured credentials."""

    def __init__(self, api: ApiConfig) -> None:
        self._credentials = dict(api.credentials)
        self._principals = dict(api.principals)
        self._sigv2 = api.sigv2
        self._skew = timedelta(seconds=api.max_clock_skew)
        #: the furthest a SigV2 ``Expires`` may lie ahead (as long as a SigV4 presigned URL lives)
        self._max_expiry = timedelta(seconds=MAX_PRESIGN_EXPIRES) + self._skew
        self._region = api.region

    def authenticate(self, request: SignedRequest, now: datetime | None = None) -> Identity:
        """The signer of ``request`` and the account it acts for, or an :class:`Ec2Error` saying why
        it is not authentic."""
        identity = self._signer(request, now or datetime.now(UTC))
        return replace(identity, caller=self._caller(identity, request.headers))

    def _caller(self, identity: Identity, headers: Mapping[str, str]) -> Caller:
        """Whom a verified request acts for (see the module's "Accounts")."""
        credential = self._principals[identity.access_key]
        own = Caller.of(credential)
        named = headers.get(ACCOUNT_HEADER)
        if named is None:
            return own
        if credential.role != FRONTEND:
            log.info(
                "ignoring X-Imaging-Account from %s (role %s): only a frontend key acts for other accounts",
                identity.access_key,
                credential.role,
            )
            return own
        if ACCOUNT_HEADER not in identity.signed_headers:
            raise _incomplete(
                "The X-Imaging-Account header must be one of the SignedHeaders: a front end names the "
                "account it acts for in a signed header (Signature Version 4)"
            )
        if not ACCOUNT_RE.fullmatch(named):
            raise Ec2Error(
                "InvalidParameterValue",
                f"The X-Imaging-Account header ({shown(named)}) is not an account name: 1 to 128 "
                "letters, digits, '.', '_', '@' and '-', starting with a letter or a digit",
            )
        return Caller.acting_for(named)

    def _signer(self, request: SignedRequest, now: datetime) -> Identity:
        query = decode_query(request.query_string)
        query_names = {name for name, _ in query}
        authorization = request.headers.get("authorization")
        if authorization is not None:
            if "X-Amz-Algorithm" in query_names:
                raise _incomplete(
                    "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter "
                    "or the Authorization header should be specified"
                )
            if not authorization.startswith(ALGORITHM):
                raise _incomplete(f"Unsupported Authorization type; use {ALGORITHM} (Signature Version 4)")
            return self._header_v4(request, authorization, query, now)
        if "X-Amz-Algorithm" in query_names:
            return self._presigned_v4(request, query, now)
        if {"Signature", "AWSAccessKeyId", "SignatureVersion"} & set(request.params):
            if not self._sigv2:
                raise _auth_failure_with(
                    "Signature Version 2 is disabled on this appliance; sign requests with Signature "
                    "Version 4 (or set api.sigv2: true for old clients)"
                )
            return self._v2(request, now)
        raise Ec2Error("MissingAuthenticationToken", "Request is missing Authentication Token", 401)

    # -- Signature Version 4 ----------------------------------------------------------------------

    def _header_v4(
        self, request: SignedRequest, authorization: str, query: list[tuple[str, str]], now: datetime
    ) -> Identity:
        match = _AUTH_HEADER_RE.match(authorization)
        fields: dict[str, str] = {}
        if match:
            for part in match["rest"].split(","):
                name, sep, value = part.strip().partition("=")
                if sep:
                    fields[name] = value.strip()
        missing = [f for f in ("Credential", "SignedHeaders", "Signature") if not fields.get(f)]
        if missing:
            raise _incomplete(f"Authorization header requires {', '.join(missing)}")
        signed = [h.strip().lower() for h in fields["SignedHeaders"].split(";")]
        signed_at = self._header_timestamp(request.headers, signed)
        self._check_time(signed_at, now)
        return self._verify_v4(
            request,
            credential=fields["Credential"],
            signed_headers=fields["SignedHeaders"],
            signature=fields["Signature"],
            timestamp=_amz_date(signed_at),
            query=query,
            scheme="sigv4",
        )

    @staticmethod
    def _header_timestamp(headers: Mapping[str, str], signed: Sequence[str]) -> datetime:
        """The signing time from ``X-Amz-Date`` (or ``Date``); aware, possibly not in UTC."""
        if "x-amz-date" in headers:
            name, raw = "x-amz-date", headers["x-amz-date"]
            parsed = _parse_amz_date(raw)
        elif "date" in headers:
            name, raw = "date", headers["date"]
            parsed = _parse_http_date(raw)
        else:
            raise _incomplete(
                "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header"
            )
        if parsed is None:
            raise _incomplete(f"The {name} header ({shown(raw)}) is not a valid date")
        if name not in signed:
            # An unsigned date could be replaced to replay the request indefinitely.
            raise _incomplete(f"The {name} header must be one of the SignedHeaders")
        return parsed

    def _presigned_v4(self, request: SignedRequest, query: list[tuple[str, str]], now: datetime) -> Identity:
        values: dict[str, str] = {}
        for name, value in query:
            if name.startswith("X-Amz-"):
                if name in values:
                    raise _incomplete(f"The query parameter {name} is given more than once")
                values[name] = value
        required = (
            "X-Amz-Credential",
            "X-Amz-Date",
            "X-Amz-Expires",
            "X-Amz-SignedHeaders",
            "X-Amz-Signature",
        )
        missing = [name for name in required if not values.get(name)]
        if missing:
            raise _incomplete(f"A presigned request requires the query parameters {', '.join(missing)}")
        if values["X-Amz-Algorithm"] != ALGORITHM:
            raise _incomplete(f"X-Amz-Algorithm must be {ALGORITHM}")
        raw_date = values["X-Amz-Date"]
        signed_at = _parse_amz_date(raw_date)
        if signed_at is None:
            raise _incomplete(f"X-Amz-Date ({shown(raw_date)}) is not a valid timestamp")
        expires = values["X-Amz-Expires"]
        if not _EXPIRES_RE.match(expires) or not 1 <= int(expires) <= MAX_PRESIGN_EXPIRES:
            raise _incomplete(f"X-Amz-Expires must be a number of seconds from 1 to {MAX_PRESIGN_EXPIRES}")
        # differences from now, never now ± something: X-Amz-Date may be 99991231T235959Z
        if now - signed_at > timedelta(seconds=int(expires)) + self._skew:
            raise _expired(
                f"Request has expired: the presigned URL signed at {raw_date} expired after {int(expires)} s"
            )
        if signed_at - now > self._skew:
            raise _expired(f"Signature not yet current: {raw_date} is later than now")
        unsigned_query = [(n, v) for n, v in query if n != "X-Amz-Signature"]
        return self._verify_v4(
            request,
            credential=values["X-Amz-Credential"],
            signed_headers=values["X-Amz-SignedHeaders"],
            signature=values["X-Amz-Signature"],
            timestamp=_amz_date(signed_at),
            query=unsigned_query,
            scheme="sigv4-query",
        )

    def _check_time(self, signed_at: datetime, now: datetime) -> None:
        # Differences, not now ± skew: the header may hold any date from year 1 to 9999.
        skew = int(self._skew.total_seconds())
        if now - signed_at > self._skew:
            raise _expired(
                f"Request has expired: it was signed at {signed_at.isoformat()}, more than {skew} s ago"
            )
        if signed_at - now > self._skew:
            raise _expired(
                f"Signature not yet current: {signed_at.isoformat()} is more than {skew} s in the future"
            )

    def _verify_v4(
        self,
        request: SignedRequest,
        *,
        credential: str,
        signed_headers: str,
        signature: str,
        timestamp: str,
        query: list[tuple[str, str]],
        scheme: str,
    ) -> Identity:
        parts = credential.split("/")
        if len(parts) != 5 or parts[4] != "aws4_request":
            raise _incomplete(
                f"Credential ({shown(credential)}) must have the form <key>/<date>/<region>/ec2/aws4_request"
            )
        access_key, scope_date, region, service, _ = parts
        headers = [h.strip().lower() for h in signed_headers.split(";") if h.strip()]
        if not _SIGNATURE_RE.match(signature):
            raise _incomplete("Signature must be 64 hexadecimal digits")
        if "host" not in headers:
            raise _incomplete("'Host' must be a 'SignedHeader' in the AWS Authorization")
        absent = [h for h in headers if h not in request.headers]
        if absent:
            raise _incomplete(f"Signed header(s) missing from the request: {', '.join(absent)}")
        secret = self._secret(access_key)
        if service != SERVICE:
            raise _mismatch(f"Credential should be scoped to correct service: '{SERVICE}'.")
        if scope_date != timestamp[:8]:
            raise _mismatch(
                f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
                f"from HTTP: '{scope_date}' != '{timestamp[:8]}'"
            )
        if region != self._region:
            log.debug("request signed for region %s (appliance region %s)", region, self._region)
        self._check_payload_hash(request, headers)

        aws_request = AWSRequest(
            method=request.method,
            url="http://appliance/",
            headers={name: request.headers[name] for name in headers},
            data=request.body,
        )
        # botocore signs a list of pairs as it signs a dict (repeated names kept); its stubs say dict
        aws_request.params = query  # type: ignore[assignment]
        verifier = _SigV4Verifier(Credentials(access_key, secret), region, headers, request.path)
        expected = verifier.expected_signature(aws_request, timestamp)
        if not hmac.compare_digest(expected, signature.lower()):
            raise _mismatch()
        return Identity(access_key, scheme, region, frozenset(headers))

    @staticmethod
    def _check_payload_hash(request: SignedRequest, signed_headers: Sequence[str]) -> None:
        claimed = request.headers.get("x-amz-content-sha256")
        if claimed is None or "x-amz-content-sha256" not in signed_headers:
            return  # botocore then hashes the body itself
        if claimed == "UNSIGNED-PAYLOAD" or claimed.startswith("STREAMING-"):
            raise _mismatch(
                "Unsigned or streaming payloads are not accepted: the operation parameters are in the body"
            )
        if not hmac.compare_digest(claimed.lower(), hashlib.sha256(request.body).hexdigest()):
            raise _mismatch("The x-amz-content-sha256 header does not match the SHA-256 of the body")

    # -- Signature Version 2 ----------------------------------------------------------------------

    def _v2(self, request: SignedRequest, now: datetime) -> Identity:
        params: dict[str, str] = {}
        for name, values in request.params.items():
            if len(values) != 1:
                raise _incomplete(f"The parameter {name} is given more than once")
            params[name] = values[0]
        missing = [
            n
            for n in ("AWSAccessKeyId", "SignatureVersion", "SignatureMethod", "Signature")
            if not params.get(n)
        ]
        if missing:
            raise Ec2Error("MissingParameter", f"The request must contain the parameter {missing[0]}")
        if params["SignatureVersion"] != "2":
            raise _incomplete(
                f"SignatureVersion {shown(params['SignatureVersion'])} is not supported; use 2 or 4"
            )
        digest = _V2_METHODS.get(params["SignatureMethod"])
        if digest is None:
            raise _incomplete(f"SignatureMethod must be one of {', '.join(_V2_METHODS)}")
        self._check_v2_time(params, now)
        secret = self._secret(params["AWSAccessKeyId"])

        host = request.headers.get("host", "")
        # botocore's SigV2 signer builds the canonical string (sorted, RFC 3986-encoded pairs);
        # it only knows HMAC-SHA256, so the digest is applied here from its string.
        aws_request = AWSRequest(method=request.method, url="http://appliance/")
        signer = SigV2Auth(Credentials(params["AWSAccessKeyId"], secret))
        canonical_query, _ = signer.calc_signature(aws_request, params)
        given = params["Signature"].encode()
        # boto2 lowercases the host it signs, botocore signs it as written: accept either spelling.
        for signed_host in dict.fromkeys((host, host.lower())):
            string_to_sign = (
                f"{request.method.upper()}\n{signed_host}\n{request.path or '/'}\n{canonical_query}"
            )
            expected = hmac.new(secret.encode(), string_to_sign.encode(), digest).digest()
            if hmac.compare_digest(base64.b64encode(expected), given):
                break
        else:
            raise _mismatch()
        return Identity(params["AWSAccessKeyId"], "sigv2")

    def _check_v2_time(self, params: Mapping[str, str], now: datetime) -> None:
        if "Timestamp" in params and "Expires" in params:
            raise Ec2Error(
                "InvalidParameterCombination", "Request can not contain both Timestamp and Expires"
            )
        # differences from now, never now ± skew: Expires may be 9999-12-31T23:59:59
        if "Timestamp" in params:
            when = _parse_iso(params["Timestamp"], "Timestamp")
            if abs(now - when) > self._skew:
                raise _expired(
                    f"Request has expired: Timestamp {shown(params['Timestamp'])} is more than "
                    f"{int(self._skew.total_seconds())} s from now"
                )
        elif "Expires" in params:
            expires = _parse_iso(params["Expires"], "Expires")
            if now - expires > self._skew:
                raise _expired(f"Request has expired: Expires is {shown(params['Expires'])}")
            if expires - now > self._max_expiry:
                # a far-future Expires would make the signed URL a credential that never expires
                raise _expired(
                    f"Expires {shown(params['Expires'])} is more than {MAX_PRESIGN_EXPIRES} s (a week) "
                    "in the future; sign the request with a nearer expiry"
                )
        else:
            raise Ec2Error("MissingParameter", "The request must contain the parameter Timestamp")

    def _secret(self, access_key: str) -> str:
        secret = self._credentials.get(access_key)
        if secret is None:
            log.info("authentication failed: unknown access key %s", access_key)
            raise _auth_failure()
        return secret


def _auth_failure_with(message: str) -> Ec2Error:
    return Ec2Error("AuthFailure", message, 401)


def _parse_amz_date(raw: str) -> datetime | None:
    """``YYYYMMDDTHHMMSSZ`` in ASCII digits (``strptime`` alone also takes other Unicode digits)."""
    if not _AMZ_DATE_RE.match(raw):
        return None
    try:
        return datetime.strptime(raw, SIGV4_TIMESTAMP).replace(tzinfo=UTC)
    except ValueError:
        return None


def _parse_http_date(raw: str) -> datetime | None:
    """An RFC 5322 ``Date`` header, aware (a zone-less date is UTC); None if it is not one."""
    if not raw.isascii():
        return None
    try:
        parsed = parsedate_to_datetime(raw)
    except (TypeError, ValueError, OverflowError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _amz_date(when: datetime) -> str:
    """``when`` (within the clock skew of now, so in range) as SigV4's ``YYYYMMDDTHHMMSSZ``."""
    return when.astimezone(UTC).strftime(SIGV4_TIMESTAMP)


def _parse_iso(raw: str, name: str) -> datetime:
    try:
        if not raw.isascii():
            raise ValueError(raw)  # fromisoformat takes some non-ASCII digits
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise Ec2Error(
            "InvalidParameterValue", f"Value ({shown(raw)}) for parameter {name} is invalid"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


_PAYLOAD_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
#: the x-amz-content-sha256 value of a body whose hash the signature does not cover
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


class StreamedPayloadAuthenticator(Authenticator):
    """SigV4 (or SigV2) for a request whose body streams past the API instead of being read first: a
    staged upload (``PUT /v1/uploads/{id}``). The signature is verified before the body is read,
    over the ``x-amz-content-sha256`` header, which must be signed: the SHA-256 of the body (checked
    as the body arrives: :func:`payload_sha256`) or ``UNSIGNED-PAYLOAD`` (as S3 allows: the body is
    then not covered by the signature)."""

    @staticmethod
    def _check_payload_hash(request: SignedRequest, signed_headers: Sequence[str]) -> None:
        claimed = request.headers.get("x-amz-content-sha256")
        if claimed is None or "x-amz-content-sha256" not in signed_headers:
            raise _incomplete(
                "An upload must sign the x-amz-content-sha256 header: the SHA-256 of the body (hex), "
                "or UNSIGNED-PAYLOAD"
            )
        if claimed != UNSIGNED_PAYLOAD and not _PAYLOAD_SHA256_RE.match(claimed.lower()):
            raise _incomplete(
                f"x-amz-content-sha256 ({shown(claimed)}) is not a SHA-256 nor UNSIGNED-PAYLOAD"
            )


def payload_sha256(headers: Mapping[str, str]) -> str | None:
    """The body's SHA-256 a verified upload request signed (lower case), None for UNSIGNED-PAYLOAD."""
    claimed = headers.get("x-amz-content-sha256")
    return None if claimed is None or claimed == UNSIGNED_PAYLOAD else claimed.lower()
