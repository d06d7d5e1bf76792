"""AWS Signature Version 4: the ``Authorization`` header and presigned query parameters.

The expected signature is computed by botocore's own signer, restricted to the headers the client
signed and to the path it addressed, fed with the request exactly as received (see :mod:`.auth`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from urllib.parse import quote

from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import Credentials
from botocore.utils import normalize_url_path

from .errors import shown
from .signing import (
    ALGORITHM,
    MAX_PRESIGN_EXPIRES,
    SERVICE,
    Identity,
    SignedRequest,
    Verifier,
    incomplete_signature,
    request_expired,
    signature_mismatch,
)

log = logging.getLogger(__name__)

_AUTH_HEADER_RE = re.compile(r"^AWS4-HMAC-SHA256\s+(?P<rest>.+)$", re.DOTALL)
_SIGNATURE_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_AMZ_DATE_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z$")
#: X-Amz-Expires: seconds, ASCII digits (at most MAX_PRESIGN_EXPIRES)
_EXPIRES_RE = re.compile(r"^[0-9]{1,7}$")


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


class SigV4Verification(Verifier):
    """Verifies SigV4 requests: the ``Authorization`` header form and the presigned query form."""

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
            raise incomplete_signature(f"Authorization header requires {', '.join(missing)}")
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
            raise incomplete_signature(
                "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header"
            )
        if parsed is None:
            raise incomplete_signature(f"The {name} header ({shown(raw)}) is not a valid date")
        if name not in signed:
            # An unsigned date could be replaced to replay the request indefinitely.
            raise incomplete_signature(f"The {name} header must be one of the SignedHeaders")
        return parsed

    def _presigned_v4(self, request: SignedRequest, query: list[tuple[str, str]], now: datetime) -> Identity:
        values: dict[str, str] = {}
        for name, value in query:
            if name.startswith("X-Amz-"):
                if name in values:
                    raise incomplete_signature(f"The query parameter {name} is given more than once")
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
            raise incomplete_signature(
                f"A presigned request requires the query parameters {', '.join(missing)}"
            )
        if values["X-Amz-Algorithm"] != ALGORITHM:
            raise incomplete_signature(f"X-Amz-Algorithm must be {ALGORITHM}")
        raw_date = values["X-Amz-Date"]
        signed_at = _parse_amz_date(raw_date)
        if signed_at is None:
            raise incomplete_signature(f"X-Amz-Date ({shown(raw_date)}) is not a valid timestamp")
        expires = values["X-Amz-Expires"]
        if not _EXPIRES_RE.match(expires) or not 1 <= int(expires) <= MAX_PRESIGN_EXPIRES:
            raise incomplete_signature(
                f"X-Amz-Expires must be a number of seconds from 1 to {MAX_PRESIGN_EXPIRES}"
            )
        # differences from now, never now ± something: X-Amz-Date may be 99991231T235959Z
        if now - signed_at > timedelta(seconds=int(expires)) + self._skew:
            raise request_expired(
                f"Request has expired: the presigned URL signed at {raw_date} expired after {int(expires)} s"
            )
        if signed_at - now > self._skew:
            raise request_expired(f"Signature not yet current: {raw_date} is later than now")
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
            raise request_expired(
                f"Request has expired: it was signed at {signed_at.isoformat()}, more than {skew} s ago"
            )
        if signed_at - now > self._skew:
            raise request_expired(
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
            raise incomplete_signature(
                f"Credential ({shown(credential)}) must have the form <key>/<date>/<region>/ec2/aws4_request"
            )
        access_key, scope_date, region, service, _ = parts
        headers = [h.strip().lower() for h in signed_headers.split(";") if h.strip()]
        if not _SIGNATURE_RE.match(signature):
            raise incomplete_signature("Signature must be 64 hexadecimal digits")
        if "host" not in headers:
            raise incomplete_signature("'Host' must be a 'SignedHeader' in the AWS Authorization")
        absent = [h for h in headers if h not in request.headers]
        if absent:
            raise incomplete_signature(f"Signed header(s) missing from the request: {', '.join(absent)}")
        secret = self._secret(access_key)
        if service != SERVICE:
            raise signature_mismatch(f"Credential should be scoped to correct service: '{SERVICE}'.")
        if scope_date != timestamp[:8]:
            raise signature_mismatch(
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
            raise signature_mismatch()
        return Identity(access_key, scheme, region, frozenset(headers))

    @staticmethod
    def _check_payload_hash(request: SignedRequest, signed_headers: Sequence[str]) -> None:
        claimed = request.headers.get("x-amz-content-sha256")
        if claimed is None or "x-amz-content-sha256" not in signed_headers:
            return  # botocore then hashes the body itself
        if claimed == "UNSIGNED-PAYLOAD" or claimed.startswith("STREAMING-"):
            raise signature_mismatch(
                "Unsigned or streaming payloads are not accepted: the operation parameters are in the body"
            )
        if not hmac.compare_digest(claimed.lower(), hashlib.sha256(request.body).hexdigest()):
            raise signature_mismatch("The x-amz-content-sha256 header does not match the SHA-256 of the body")


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
