"""The reference controller's Eucalyptus side: an Imaging service, its metadata service and its cloud key.

A lab and test stand-in for the cloud (``eucalyptus-worker-auth.md``, ``ec2-import-api.md`` §11), used by
:mod:`.receiver`:

- **metadata service** (:meth:`ImagingService.metadata`): ``latest/meta-data/instance-id`` and the
  instance profile's credentials under ``latest/meta-data/iam/security-credentials/[<role>]`` as the
  cloud serves them; every read of the role document issues fresh temporary credentials (``lifetime``
  seconds) and the previous ones stay valid until they expire (:meth:`revoke` ends them early);
- **authentication** (:meth:`ImagingService.authenticate`): SigV2 (``SecurityToken`` form parameter) or
  SigV4 (``X-Amz-Security-Token``) recomputed with botocore from the credentials it issued; a wrong or
  unknown key, a token that does not belong to the key, or an expired credential is refused with 403
  (``AuthFailure``, ``ExpiredToken``);
- **tasks** (:meth:`queue`): each volume of a task is handed out as its own ``import_volume`` worker task
  (an ImportInstance's volumes share its ``import-i-`` id), pointing at a **download manifest** the service
  builds from the task's import manifest, signs with the cloud key (RSA-SHA256 over version, file-format
  and image, as ``DownloadManifestFactory``) and serves itself under ``/download-manifests/`` with the
  ``imaging@`` marker; ``PutInstanceImportTaskStatus`` is honoured only from the worker holding the volume
  and records ``BytesConverted`` per volume; a task queued with ``importTaskType: convert_image`` is
  handed out as an ``instanceStoreTask``.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import re
import secrets
import threading
import urllib.parse
import urllib.request
from typing import Any
from xml.sax.saxutils import escape

from ..sources.euca_manifest import build_download_manifest, rsa_signer
from ..sources.manifest import MAX_MANIFEST_BYTES, parse_manifest
from .euca_auth import EXPIRATION_FORMAT
from .imaging_wire import IMAGING_NS

ROLE = "imaging-worker-role"
META = "/latest/meta-data/"
DM_PATH = "/download-manifests/"
WINDOW = 300.0
_V4 = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
    r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})$"
)


class Refusal(Exception):
    """A request refused: HTTP ``status`` and an EC2-style ``code``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code

    def xml(self) -> bytes:
        return (
            f"<Response><Errors><Error><Code>{escape(self.code)}</Code><Message>{escape(str(self))}"
            "</Message></Error></Errors><RequestID>reference</RequestID></Response>"
        ).encode()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ImagingService:
    """The cloud side of the imaging-worker protocol (thread-safe)."""

    def __init__(
        self, cloud_key_pem: bytes, *, instance_id: str = "i-00000001", lifetime: float = 3600.0
    ) -> None:
        self.sign = rsa_signer(cloud_key_pem)
        self.instance_id = instance_id
        self.lifetime = lifetime
        self._lock = threading.Lock()
        #: access key → (secret, token, expires)
        self.credentials: dict[str, tuple[str, str, dt.datetime]] = {}
        self.queue_items: list[dict[str, Any]] = []
        #: (task id, volume id) → {"worker", "cancelled", "finished", "bytes", "status"}
        self.assigned: dict[tuple[str, str], dict[str, Any]] = {}
        self.manifests: dict[str, bytes] = {}
        #: access keys of the requests that were accepted, in order
        self.accepted_keys: list[str] = []
        self.refusals: list[str] = []

    # -- metadata service -----------------------------------------------------------------------

    def issue(self) -> dict[str, str]:
        """Fresh temporary credentials, as the metadata service's role document."""
        key = "ASIA" + secrets.token_hex(8).upper()
        secret, token = secrets.token_urlsafe(30), secrets.token_urlsafe(60)
        expires = _now().replace(microsecond=0) + dt.timedelta(seconds=self.lifetime)
        with self._lock:
            self.credentials[key] = (secret, token, expires)
        return {
            "Code": "Success",
            "LastUpdated": _now().strftime(EXPIRATION_FORMAT),
            "Type": "AWS-HMAC",
            "AccessKeyId": key,
            "SecretAccessKey": secret,
            "Token": token,
            "Expiration": expires.strftime(EXPIRATION_FORMAT),
        }

    def revoke(self, access_key: str | None = None) -> None:
        """End credentials early (all of them without ``access_key``)."""
        with self._lock:
            for key in [access_key] if access_key else list(self.credentials):
                secret, token, _ = self.credentials[key]
                self.credentials[key] = (secret, token, _now() - dt.timedelta(seconds=1))

    def metadata(self, path: str) -> bytes | None:
        """The metadata document at ``path``, or None (404)."""
        if path == META + "instance-id":
            return self.instance_id.encode()
        if path in (META + "iam/security-credentials/", META + "iam/security-credentials"):
            return ROLE.encode()
        if path == META + "iam/security-credentials/" + ROLE:
            return json.dumps(self.issue()).encode()
        return None

    # -- authentication -------------------------------------------------------------------------

    def authenticate(self, host: str, path: str, headers: Any, body: bytes) -> dict[str, str]:
        """The request's parameters once its signature checks out; :class:`Refusal` otherwise."""
        # botocore: the same signers the worker uses, run over what arrived
        from botocore.auth import SigV2Auth, SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        params = {k: v[-1] for k, v in urllib.parse.parse_qs(body.decode("utf-8", "replace")).items()}
        auth = headers.get("Authorization")
        url = f"http://{host}{path}"
        if auth:
            m = _V4.match(auth)
            if m is None:
                raise self._refuse(403, "IncompleteSignature", "Authorization is not a SigV4 header")
            key, _date, region, service, signed, signature = m.groups()
            secret = self._secret(key, headers.get("X-Amz-Security-Token"))
            stamp = headers.get("X-Amz-Date") or ""
            self._fresh(stamp, "%Y%m%dT%H%M%SZ")
            req = AWSRequest(
                method="POST",
                url=url,
                data=body,
                headers={h: headers.get(h) or "" for h in signed.split(";")},
            )
            req.context["timestamp"] = stamp
            signer = SigV4Auth(Credentials(key, secret), service, region)
            expected = signer.signature(signer.string_to_sign(req, signer.canonical_request(req)), req)
        else:
            key = params.get("AWSAccessKeyId", "")
            if params.get("SignatureVersion") != "2" or params.get("SignatureMethod") != "HmacSHA256":
                raise self._refuse(403, "AuthFailure", "SignatureVersion 2 with HmacSHA256 is required")
            secret = self._secret(key, params.get("SecurityToken"))
            self._fresh(params.get("Timestamp", ""), "%Y-%m-%dT%H:%M:%SZ")
            signature = params.get("Signature", "")
            _, expected = SigV2Auth(Credentials(key, secret)).calc_signature(
                AWSRequest(method="POST", url=url), params
            )
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise self._refuse(403, "SignatureDoesNotMatch", "the request signature does not match")
        with self._lock:
            self.accepted_keys.append(key)
        for name in ("AWSAccessKeyId", "SignatureVersion", "SignatureMethod", "Timestamp", "Signature"):
            params.pop(name, None)
        params.pop("SecurityToken", None)
        return params

    def _refuse(self, status: int, code: str, message: str) -> Refusal:
        with self._lock:
            self.refusals.append(code)
        return Refusal(status, code, message)

    def _secret(self, key: str, token: str | None) -> str:
        with self._lock:
            found = self.credentials.get(key)
        if found is None:
            raise self._refuse(403, "AuthFailure", "the access key is not valid")
        secret, expected_token, expires = found
        if not token or not hmac.compare_digest(token.encode(), expected_token.encode()):
            raise self._refuse(403, "AuthFailure", "the security token does not belong to the access key")
        if expires <= _now():
            raise self._refuse(403, "ExpiredToken", "the security token has expired")
        return secret

    def _fresh(self, stamp: str, fmt: str) -> None:
        try:
            when = dt.datetime.strptime(stamp, fmt).replace(tzinfo=dt.UTC)
        except ValueError:
            raise self._refuse(403, "AuthFailure", "the request has no valid timestamp") from None
        if abs((_now() - when).total_seconds()) > WINDOW:
            raise self._refuse(403, "RequestExpired", "the request timestamp is too far from now")

    # -- tasks ----------------------------------------------------------------------------------

    def queue(self, task: dict[str, Any]) -> None:
        """Queue a task: ``{"importTaskId", "format", "volumes": [{"volumeId", "importManifestUrl"}]}``
        (or one ``volumeId``/``importManifestUrl`` at the top), or ``importTaskType: convert_image``."""
        volumes = task.get("volumes") or [
            {"volumeId": task.get("volumeId", ""), "importManifestUrl": task.get("importManifestUrl")}
        ]
        with self._lock:
            for volume in volumes:
                self.queue_items.append({**task, **volume})

    def cancel(self, task_id: str) -> None:
        with self._lock:
            for (tid, _), entry in self.assigned.items():
                if tid == task_id:
                    entry["cancelled"] = True

    def volumes(self, task_id: str) -> dict[str, dict[str, Any]]:
        """The volumes of ``task_id`` handed out: worker, last status, BytesConverted."""
        with self._lock:
            return {vol: dict(e) for (tid, vol), e in self.assigned.items() if tid == task_id}

    def download_manifest(self, name: str) -> bytes | None:
        with self._lock:
            return self.manifests.get(name)

    def _make_manifest(self, item: dict[str, Any], base_url: str) -> str:
        with urllib.request.urlopen(item["importManifestUrl"], timeout=30) as resp:  # the cloud's own read
            imported = parse_manifest(resp.read(MAX_MANIFEST_BYTES))
        # file-format RAW, whatever was uploaded, as the cloud's ImportImageManifest writes it
        data = build_download_manifest("RAW", imported.size, [p.get_url for p in imported.parts], self.sign)
        name = f"DM-{item['importTaskId']}-{item['volumeId']}"
        with self._lock:
            self.manifests[name] = data
        parts = urllib.parse.urlsplit(base_url)
        return f"{parts.scheme}://imaging@{parts.netloc}{DM_PATH}{name}?Expires=0"

    def get_task(self, params: dict[str, str], base_url: str) -> str:
        """``GetInstanceImportTask``: the next volume, as the cloud writes it."""
        worker = params.get("InstanceId", "")
        with self._lock:
            item = self.queue_items.pop(0) if self.queue_items else None
        if item is None:
            return f'<GetInstanceImportTaskResponse xmlns="{IMAGING_NS}"/>'
        task_id = escape(item["importTaskId"])
        if item.get("importTaskType") == "convert_image":
            body = (
                "<importTaskType>convert_image</importTaskType><instanceStoreTask><accountId>0</accountId>"
                "<importImageSet><item><id>emi-00000001</id><format>PARTITION</format></item></importImageSet>"
                "</instanceStoreTask>"
            )
            with self._lock:
                self.assigned[(item["importTaskId"], "")] = {"worker": worker, "cancelled": False, "bytes": 0}
        else:
            url = item.get("manifestUrl") or self._make_manifest(item, base_url)
            body = (
                "<importTaskType>import_volume</importTaskType><volumeTask>"
                f"<volumeId>{escape(item['volumeId'])}</volumeId><imageManifestSet><item>"
                f"<manifestUrl>{escape(url)}</manifestUrl><format>{escape(item['format'])}</format>"
                "</item></imageManifestSet></volumeTask>"
            )
            with self._lock:
                self.assigned[(item["importTaskId"], item["volumeId"])] = {
                    "worker": worker,
                    "cancelled": False,
                    "bytes": 0,
                    "status": None,
                }
        return (
            f'<GetInstanceImportTaskResponse xmlns="{IMAGING_NS}"><importTaskId>{task_id}</importTaskId>'
            f"{body}</GetInstanceImportTaskResponse>"
        )

    def put_status(self, params: dict[str, str]) -> tuple[str, dict[str, Any]]:
        """``PutInstanceImportTaskStatus``: (the reply, the status record)."""
        record: dict[str, Any] = {
            k: params.get(k)
            for k in ("InstanceId", "ImportTaskId", "Status", "VolumeId", "ErrorCode", "Message")
        }
        text = params.get("BytesConverted") or "0"
        record["BytesConverted"] = int(text) if text.isdigit() else 0
        with self._lock:
            entry = self.assigned.get((record["ImportTaskId"] or "", record["VolumeId"] or ""))
            # As Eucalyptus: a status for a volume this worker does not hold is answered with cancel.
            cancelled = entry is None or entry["worker"] != record["InstanceId"] or entry["cancelled"]
            if entry is not None and not cancelled:
                entry["status"] = record["Status"]
                entry["bytes"] = max(entry["bytes"], record["BytesConverted"])
                if record["Status"] in ("DONE", "FAILED"):
                    entry["cancelled"] = True  # finished: any further status is stray
        value = "true" if cancelled else "false"
        reply = (
            f'<PutInstanceImportTaskStatusResponse xmlns="{IMAGING_NS}">'
            f"<cancelled>{value}</cancelled></PutInstanceImportTaskStatusResponse>"
        )
        return reply, record
