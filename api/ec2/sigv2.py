"""AWS Signature Version 2 query auth, for old euca2ools and boto2 (only with ``api.sigv2``)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime

from botocore.auth import SigV2Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from .errors import Ec2Error, shown
from .signing import (
    MAX_PRESIGN_EXPIRES,
    Identity,
    SignedRequest,
    Verifier,
    incomplete_signature,
    request_expired,
    signature_mismatch,
)

_V2_METHODS = {"HmacSHA256": hashlib.sha256, "HmacSHA1": hashlib.sha1}


class SigV2Verification(Verifier):
    """Verifies SigV2 query-signed requests (``AWSAccessKeyId``, ``SignatureVersion=2``, ...)."""

    def _v2(self, request: SignedRequest, now: datetime) -> Identity:
        params: dict[str, str] = {}
        for name, values in request.params.items():
            if len(values) != 1:
                raise incomplete_signature(f"The parameter {name} is given more than once")
            params[name] = values[0]
        missing = [
            n
            for n in ("AWSAccessKeyId", "SignatureVersion", "SignatureMethod", "Signature")
            if not params.get(n)
        ]
        if missing:
            raise Ec2Error("MissingParameter", f"The request must contain the parameter {missing[0]}")
        if params["SignatureVersion"] != "2":
            raise incomplete_signature(
                f"SignatureVersion {shown(params['SignatureVersion'])} is not supported; use 2 or 4"
            )
        digest = _V2_METHODS.get(params["SignatureMethod"])
        if digest is None:
            raise incomplete_signature(f"SignatureMethod must be one of {', '.join(_V2_METHODS)}")
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
            raise signature_mismatch()
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
                raise request_expired(
                    f"Request has expired: Timestamp {shown(params['Timestamp'])} is more than "
                    f"{int(self._skew.total_seconds())} s from now"
                )
        elif "Expires" in params:
            expires = _parse_iso(params["Expires"], "Expires")
            if now - expires > self._skew:
                raise request_expired(f"Request has expired: Expires is {shown(params['Expires'])}")
            if expires - now > self._max_expiry:
                # a far-future Expires would make the signed URL a credential that never expires
                raise request_expired(
                    f"Expires {shown(params['Expires'])} is more than {MAX_PRESIGN_EXPIRES} s (a week) "
                    "in the future; sign the request with a nearer expiry"
                )
        else:
            raise Ec2Error("MissingParameter", "The request must contain the parameter Timestamp")


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
