"""How an imaging worker authenticates to the Eucalyptus Imaging service.

Credentials (``eucalyptus-worker-auth.md`` §3): the instance profile's temporary credentials, read
from the metadata service as the cloud serves them — ``latest/meta-data/iam/security-credentials/``
names the role, ``…/<role>`` is a JSON document with ``Code: "Success"``, ``AccessKeyId``,
``SecretAccessKey``, ``Token`` and ``Expiration`` (``yyyy-MM-ddTHH:mm:ssZ``). As boto did, they are read
again when fewer than 5 minutes (:data:`REFRESH_MARGIN`) remain before ``Expiration``, and the caller
forces a refresh (:meth:`InstanceCredentials.refresh`) when the service refuses a request (a token the
cloud revoked or let expire early). The worker's id (``InstanceId`` of every call) is
``latest/meta-data/instance-id``.

Signing (§4, §5.1): with botocore's signers, never by hand. ``signature_version`` ``2`` is what boto ≤ 2.34
sent (``SignatureV2Standard``: ``AWSAccessKeyId``, ``SignatureVersion=2``, ``SignatureMethod=HmacSHA256``,
``Timestamp``, ``SecurityToken`` in the signed form body); ``4`` what boto ≥ 2.35 sent (SigV4, the
token in the signed ``X-Amz-Security-Token`` header; Eucalyptus checks neither region nor service, so
the scope is the configured region and service ``imaging``). The secret key and the token never appear
in a log, an error or a repr.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field

from .. import redact
from ..errors import ImagingError

log = logging.getLogger(__name__)

METADATA_URL = "http://169.254.169.254"
CREDENTIALS_PATH = "/latest/meta-data/iam/security-credentials/"
INSTANCE_ID_PATH = "/latest/meta-data/instance-id"
#: refresh when fewer seconds than this remain before Expiration (boto's 5 minutes)
REFRESH_MARGIN = 300.0
EXPIRATION_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
SERVICE = "imaging"
MAX_DOCUMENT = 64 * 1024
#: the metadata service is reached directly, never through an HTTP proxy of the environment
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class CredentialsUnavailable(ImagingError):
    """The metadata service gave no usable instance-profile credentials."""

    code = "CredentialsUnavailable"


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)
    token: str = field(repr=False)
    expiration: dt.datetime


def parse_expiration(text: str) -> dt.datetime:
    """``Expiration`` as the cloud writes it (``Timestamps.iso8601Timestamp``), as an aware datetime."""
    return dt.datetime.strptime(text, EXPIRATION_FORMAT).replace(tzinfo=dt.UTC)


class InstanceCredentials:
    """The instance profile's credentials from the metadata service at ``metadata_url`` (thread-safe)."""

    def __init__(
        self, metadata_url: str = METADATA_URL, *, timeout: float = 10.0, margin: float = REFRESH_MARGIN
    ) -> None:
        self.metadata_url = metadata_url.rstrip("/")
        self.timeout = timeout
        self.margin = margin
        self._lock = threading.Lock()
        self._current: Credentials | None = None
        self._instance_id: str | None = None

    def _get(self, path: str) -> bytes:
        url = self.metadata_url + path
        try:
            with _OPENER.open(url, timeout=self.timeout) as resp:
                return bytes(resp.read(MAX_DOCUMENT))
        except urllib.error.HTTPError as exc:
            raise CredentialsUnavailable(
                f"the metadata service answered HTTP {exc.code} for {path}"
            ) from None
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CredentialsUnavailable(f"the metadata service is unreachable ({path}): {reason}") from None

    def instance_id(self) -> str:
        """This instance's id (``latest/meta-data/instance-id``), read once."""
        with self._lock:
            if self._instance_id is None:
                self._instance_id = self._get(INSTANCE_ID_PATH).decode("ascii", "replace").strip()
            return self._instance_id

    def _fetch(self) -> Credentials:
        roles = self._get(CREDENTIALS_PATH).decode("utf-8", "replace").split()
        if not roles:
            raise CredentialsUnavailable("the instance has no instance profile (no role in the metadata)")
        role = roles[0]  # as boto: the first role
        try:
            doc = json.loads(self._get(CREDENTIALS_PATH + urllib.parse.quote(role)))
            if doc.get("Code", "Success") != "Success":
                raise CredentialsUnavailable(f"the metadata service says {doc.get('Code')!r} for role {role}")
            creds = Credentials(
                doc["AccessKeyId"], doc["SecretAccessKey"], doc["Token"], parse_expiration(doc["Expiration"])
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CredentialsUnavailable(
                f"the credentials of role {role} are not a document the cloud writes ({type(exc).__name__})"
            ) from None
        redact.remember([creds.secret_key, creds.token])  # scrubbed from anything logged or reported
        log.info("read the instance-profile credentials of role %s, expiring %s", role, creds.expiration)
        return creds

    def get(self, now: dt.datetime | None = None) -> Credentials:
        """Current credentials, read again when they expire within the margin."""
        now = now or dt.datetime.now(dt.UTC)
        with self._lock:
            current = self._current
            if current is None or (current.expiration - now).total_seconds() < self.margin:
                self._current = current = self._fetch()
            return current

    def refresh(self) -> Credentials:
        """Read the credentials again now (the service refused the current ones)."""
        with self._lock:
            self._current = self._fetch()
            return self._current


def sign_request(
    url: str,
    params: Mapping[str, str],
    creds: Credentials,
    *,
    signature_version: str = "2",
    region: str = "eucalyptus",
) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of an EC2-query POST of ``params`` to ``url``, signed with ``creds``."""
    # botocore is heavy (boto3 loads it); only pull mode signs requests
    from botocore.auth import SigV2Auth, SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials as BotoCredentials

    boto_creds = BotoCredentials(creds.access_key, creds.secret_key, creds.token)
    content_type = "application/x-www-form-urlencoded; charset=utf-8"
    if signature_version == "2":
        request = AWSRequest(
            method="POST", url=url, data=dict(params), headers={"Content-Type": content_type}
        )
        SigV2Auth(boto_creds).add_auth(request)
        body = urllib.parse.urlencode(dict(request.data or {})).encode()
        return body, {"Content-Type": content_type}
    body = urllib.parse.urlencode(dict(params)).encode()
    request = AWSRequest(method="POST", url=url, data=body, headers={"Content-Type": content_type})
    SigV4Auth(boto_creds, SERVICE, region).add_auth(request)
    return body, {k: str(v) for k, v in request.headers.items()}
