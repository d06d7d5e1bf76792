"""Request authentication for the EC2 Query API: AWS Signature Version 4 (and opt-in Version 2).

The expected signature is computed by botocore's own signers — the same code boto3 and the AWS CLI
sign with — fed with the request exactly as received: method, path, the raw query string, the
headers the client says it signed, the exact body bytes, and the client's own timestamp, region
and service from its credential scope. Only the secret comes from us (``api.credentials``).
Signatures are compared with :func:`hmac.compare_digest`.

The two versions are verified in :mod:`.sigv4` and :mod:`.sigv2`, over what :mod:`.signing` gives
both (the request as received, the secret lookup, the coded errors); this module puts them together
and decides whom a verified request acts for.

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

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from appliance.config import ACCOUNT_RE, FRONTEND
from appliance.service.importtasks import Caller

from .errors import Ec2Error, shown
from .signing import ALGORITHM, SignedRequest, decode_query, incomplete_signature
from .signing import MAX_PRESIGN_EXPIRES as MAX_PRESIGN_EXPIRES
from .signing import SERVICE as SERVICE
from .signing import Identity as Identity
from .sigv2 import SigV2Verification
from .sigv4 import SigV4Verification

log = logging.getLogger(__name__)

#: the header in which a front end names the account it acts for (lower case, as received)
ACCOUNT_HEADER = "x-imaging-account"


class Authenticator(SigV4Verification, SigV2Verification):
    """Verifies request signatures against the configured credentials."""

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
            raise incomplete_signature(
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
                raise incomplete_signature(
                    "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter "
                    "or the Authorization header should be specified"
                )
            if not authorization.startswith(ALGORITHM):
                raise incomplete_signature(
                    f"Unsupported Authorization type; use {ALGORITHM} (Signature Version 4)"
                )
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


def _auth_failure_with(message: str) -> Ec2Error:
    return Ec2Error("AuthFailure", message, 401)


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
            raise incomplete_signature(
                "An upload must sign the x-amz-content-sha256 header: the SHA-256 of the body (hex), "
                "or UNSIGNED-PAYLOAD"
            )
        if claimed != UNSIGNED_PAYLOAD and not _PAYLOAD_SHA256_RE.match(claimed.lower()):
            raise incomplete_signature(
                f"x-amz-content-sha256 ({shown(claimed)}) is not a SHA-256 nor UNSIGNED-PAYLOAD"
            )


def payload_sha256(headers: Mapping[str, str]) -> str | None:
    """The body's SHA-256 a verified upload request signed (lower case), None for UNSIGNED-PAYLOAD."""
    claimed = headers.get("x-amz-content-sha256")
    return None if claimed is None or claimed == UNSIGNED_PAYLOAD else claimed.lower()
