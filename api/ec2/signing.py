"""What both signature versions share: the request as received, who signed it, the secret of an
access key, and the coded errors a request that is not authentic gets.

:mod:`.sigv4` and :mod:`.sigv2` verify the two signature versions; :mod:`.auth` puts them together
(and documents the decisions clients see).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import parse_qsl

from appliance.config import ApiConfig
from appliance.service.importtasks import Caller

from .errors import Ec2Error

log = logging.getLogger(__name__)

SERVICE = "ec2"
ALGORITHM = "AWS4-HMAC-SHA256"
#: AWS's limit on a presigned URL's lifetime (one week)
MAX_PRESIGN_EXPIRES = 7 * 24 * 3600


def _auth_failure() -> Ec2Error:
    return Ec2Error("AuthFailure", "AWS was not able to validate the provided access credentials", 401)


def signature_mismatch(message: str | None = None) -> Ec2Error:
    return Ec2Error(
        "SignatureDoesNotMatch",
        message
        or "The request signature we calculated does not match the signature you provided. "
        "Check your AWS Secret Access Key and signing method.",
        403,
    )


def incomplete_signature(message: str) -> Ec2Error:
    return Ec2Error("IncompleteSignature", message, 400)


def request_expired(message: str) -> Ec2Error:
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


class Verifier:
    """The configured secrets, clock skew and region a signature is checked against (the signature
    versions' verifiers derive from it)."""

    def __init__(self, api: ApiConfig) -> None:
        self._credentials = dict(api.credentials)
        self._principals = dict(api.principals)
        self._sigv2 = api.sigv2
        self._skew = timedelta(seconds=api.max_clock_skew)
        #: the furthest a SigV2 ``Expires`` may lie ahead (as long as a SigV4 presigned URL lives)
        self._max_expiry = timedelta(seconds=MAX_PRESIGN_EXPIRES) + self._skew
        self._region = api.region

    def _secret(self, access_key: str) -> str:
        secret = self._credentials.get(access_key)
        if secret is None:
            log.info("authentication failed: unknown access key %s", access_key)
            raise _auth_failure()
        return secret
