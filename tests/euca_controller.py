"""An independent Eucalyptus cloud for pull-mode tests, written from the reference documents alone.

It shares nothing with the appliance's modules (not its signing, manifest, XML or credential code), so
that a misunderstanding of the protocol in the appliance cannot be mirrored here and pass:

- the **metadata service** as ``VmInstanceMetadata`` serves it (``eucalyptus-worker-auth.md`` §3):
  ``latest/meta-data/instance-id``, ``iam/security-credentials/`` (the role) and ``…/<role>`` (JSON with
  ``Code``, ``AccessKeyId``, ``SecretAccessKey``, ``Token``, ``Expiration`` as ``yyyy-MM-ddTHH:mm:ssZ``);
  every read of the role document mints new credentials, declared to expire ``declared_lifetime`` seconds
  later; :meth:`EucaCloud.expire_all` ends the current ones early, as a revoked token;
- the **Imaging service** (§4, §5.1): SigV2 checked by hand with ``hmac``/``hashlib`` — string to sign
  ``POST\\n<host>\\n<path>\\n<sorted RFC 3986-encoded parameters>``, ``HmacSHA256``, base64, tried with the
  ``Host`` header with and without its port; ``SecurityToken`` must be the key's token — and SigV4 (the
  canonical request of the signed headers, the ``AWS4`` key derivation, the token in
  ``X-Amz-Security-Token``; region and service not checked, as Eucalyptus); a refusal is a 403
  ``<Response><Errors><Error><Code>…``;
- **download manifests** (§7.1): serialized by string concatenation, no whitespace, and signed with the
  ``openssl dgst -sha256 -sign`` command over ``<version>…</version><file-format>…</file-format><image>…
  </image>``, lowercase hex in ``<signature algorithm="RSA-SHA256">``; handed out as
  ``http://imaging@host:port/dm/<name>``;
- a **part server** that counts requests and answers ``Range: bytes=0-0``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
import subprocess
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.servers import free_port

NS = "http://www.eucalyptus.com/ns/imaging/2014-02-14/"
ROLE = "euca-internal-imaging-worker-role"


def make_cloud_key(directory: Path) -> tuple[Path, Path]:
    """(private key, certificate) of a fresh cloud identity, made by the openssl command."""
    key, cert = directory / "cloud-pk.pem", directory / "cloud-cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=cloud/OU=Eucalyptus/O=Cloud/C=US",
            "-days",
            "2",
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


def openssl_sign(key: Path, data: bytes) -> str:
    """SHA256withRSA of ``data`` with ``key``, as lowercase hex (the ``openssl`` command)."""
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", str(key)], input=data, capture_output=True, check=True
    )
    return out.stdout.hex()


def _xml_text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def download_manifest(key: Path | None, file_format: str, size: int, urls: list[str]) -> tuple[bytes, bytes]:
    """(document, signed bytes) of a download manifest as the cloud writes it; unsigned without ``key``."""
    parts = "".join(f'<part index="{i}"><get-url>{_xml_text(u)}</get-url></part>' for i, u in enumerate(urls))
    signed = (
        f"<version>2014-01-14</version><file-format>{file_format}</file-format>"
        f"<image><size>{size}</size><parts>{parts}</parts></image>"
    ).encode()
    signature = (
        f'<signature algorithm="RSA-SHA256">{openssl_sign(key, signed)}</signature>'.encode() if key else b""
    )
    head = b'<?xml version="1.0" encoding="UTF-8" standalone="no"?><manifest>'
    return head + signed + signature + b"</manifest>", signed


def _rfc3986(value: str) -> str:
    return urllib.parse.quote(value, safe="-_.~")


def sigv2_string(host: str, path: str, params: dict[str, str]) -> str:
    pairs = "&".join(f"{_rfc3986(k)}={_rfc3986(v)}" for k, v in sorted(params.items()) if k != "Signature")
    return f"POST\n{host.lower()}\n{path}\n{pairs}"


def sigv2(secret: str, host: str, path: str, params: dict[str, str]) -> str:
    mac = hmac.new(secret.encode(), sigv2_string(host, path, params).encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


SIGV4 = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)"
    r"/aws4_request,"
    r" ?SignedHeaders=(?P<signed>[a-z0-9;-]+), ?Signature=(?P<signature>[0-9a-f]{64})$"
)


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def sigv4(secret: str, auth: re.Match[str], path: str, headers: Any, body: bytes) -> str:
    """The SigV4 signature of a POST with no query string, from the request's own signed headers."""
    names = auth.group("signed").split(";")
    canonical_headers = "".join(f"{n}:{' '.join((headers.get(n) or '').split())}\n" for n in names)
    canonical = "\n".join(
        ["POST", path, "", canonical_headers, auth.group("signed"), hashlib.sha256(body).hexdigest()]
    )
    stamp = headers.get("X-Amz-Date") or ""
    scope = f"{auth.group('date')}/{auth.group('region')}/{auth.group('service')}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(("AWS4" + secret).encode(), auth.group("date"))
    for part in (auth.group("region"), auth.group("service"), "aws4_request"):
        key = _hmac(key, part)
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


class EucaCloud:
    """Metadata service + Imaging service + download manifests, on one loopback port."""

    def __init__(
        self, cloud_key: Path, *, instance_id: str = "i-0a1b2c3d", declared_lifetime: float = 3600.0
    ):
        self.cloud_key = cloud_key
        self.instance_id = instance_id
        self.declared_lifetime = declared_lifetime
        self.lock = threading.Lock()
        #: access key → {"secret", "token", "expired"}
        self.creds: dict[str, dict[str, Any]] = {}
        #: the secret the service checks, when it should differ from the one handed out (a forgery test)
        self.service_secret: Callable[[str], str] | None = None
        self.queue: list[dict[str, Any]] = []
        self.assigned: dict[tuple[str, str], str] = {}
        self.manifests: dict[str, bytes] = {}
        self.statuses: list[dict[str, str]] = []
        self.refusals: list[str] = []
        self.keys_used: list[str] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def send(self, status: int, body: bytes, ctype: str = "text/xml") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                status, body = cloud.get(self.path.split("?", 1)[0])
                self.send(status, body, "text/plain")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, reply = cloud.imaging(self.headers.get("Host") or "", self.path, body, self.headers)
                self.send(status, reply)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> EucaCloud:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- metadata -------------------------------------------------------------------------------

    def expire_all(self) -> None:
        """The tokens handed out so far stop working (the metadata still serves fresh ones)."""
        with self.lock:
            for c in self.creds.values():
                c["expired"] = True

    def get(self, path: str) -> tuple[int, bytes]:
        meta = "/latest/meta-data/"
        if path == meta + "instance-id":
            return 200, self.instance_id.encode()
        if path in (meta + "iam/security-credentials/", meta + "iam/security-credentials"):
            return 200, ROLE.encode()
        if path == meta + "iam/security-credentials/" + ROLE:
            key, secret, token = (
                "ASIA" + secrets.token_hex(8).upper(),
                secrets.token_hex(20),
                secrets.token_hex(40),
            )
            expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.declared_lifetime)
            with self.lock:
                self.creds[key] = {"secret": secret, "token": token, "expired": False}
            doc = {
                "Code": "Success",
                "LastUpdated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "Type": "AWS-HMAC",
                "AccessKeyId": key,
                "SecretAccessKey": secret,
                "Token": token,
                "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            return 200, json.dumps(doc).encode()
        if path.startswith("/dm/") and path[4:] in self.manifests:
            return 200, self.manifests[path[4:]]
        return 404, b"not found"

    # -- the Imaging service --------------------------------------------------------------------

    def refuse(self, code: str) -> tuple[int, bytes]:
        with self.lock:
            self.refusals.append(code)
        return (
            403,
            f"<Response><Errors><Error><Code>{code}</Code><Message>{code}</Message></Error></Errors></Response>".encode(),
        )

    def imaging(self, host: str, path: str, body: bytes, headers: Any = None) -> tuple[int, bytes]:
        params = dict(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
        auth = (headers.get("Authorization") if headers is not None else None) or ""
        v4 = SIGV4.match(auth)
        key = v4.group("key") if v4 else params.get("AWSAccessKeyId", "")
        with self.lock:
            cred = self.creds.get(key)
        if cred is None:
            return self.refuse("AuthFailure")
        secret = self.service_secret(key) if self.service_secret else cred["secret"]
        if v4:  # SignatureV4Standard: token in X-Amz-Security-Token, region and service not checked
            if headers.get("X-Amz-Security-Token") != cred["token"]:
                return self.refuse("AuthFailure")
            if not hmac.compare_digest(sigv4(secret, v4, path, headers, body), v4.group("signature")):
                return self.refuse("SignatureDoesNotMatch")
        else:
            if params.get("SignatureVersion") != "2" or params.get("SignatureMethod") != "HmacSHA256":
                return self.refuse("AuthFailure")
            if params.get("SecurityToken") != cred["token"]:
                return self.refuse("AuthFailure")
            hosts = {host, host.rsplit(":", 1)[0]}
            signature = params.get("Signature", "")
            if not any(hmac.compare_digest(sigv2(secret, h, path, params), signature) for h in hosts):
                return self.refuse("SignatureDoesNotMatch")
        if cred["expired"]:
            return self.refuse("ExpiredToken")
        if params.get("Version") != "2014-02-14":
            return (
                400,
                b"<Response><Errors><Error><Code>InvalidParameterValue</Code></Error></Errors></Response>",
            )
        with self.lock:
            self.keys_used.append(key)
        if params.get("Action") == "GetInstanceImportTask":
            return 200, self.next_task(params["InstanceId"]).encode()
        if params.get("Action") == "PutInstanceImportTaskStatus":
            with self.lock:
                self.statuses.append({**params, "AWSAccessKeyId": key})
                holder = self.assigned.get((params.get("ImportTaskId", ""), params.get("VolumeId", "")))
            cancelled = "false" if holder == params["InstanceId"] else "true"
            return 200, (
                f'<PutInstanceImportTaskStatusResponse xmlns="{NS}"><requestId>r</requestId>'
                f"<cancelled>{cancelled}</cancelled></PutInstanceImportTaskStatusResponse>"
            ).encode()
        return 400, b"<Response><Errors><Error><Code>InvalidAction</Code></Error></Errors></Response>"

    def add_volume_task(self, task_id: str, volume_id: str, file_format: str, manifest: bytes) -> None:
        """Hand out ``manifest`` (a download manifest document) for ``volume_id`` of ``task_id``."""
        name = f"DM-{task_id}-{volume_id}"
        with self.lock:
            self.manifests[name] = manifest
            self.queue.append(
                {
                    "id": task_id,
                    "volume": volume_id,
                    "format": file_format,
                    "url": f"http://imaging@127.0.0.1:{self.port}/dm/{name}?AWSAccessKeyId=AKI&Expires=1",
                }
            )

    def add_convert_image_task(self, task_id: str) -> None:
        with self.lock:
            self.queue.append({"id": task_id, "convert": True})

    def next_task(self, worker: str) -> str:
        with self.lock:
            item = self.queue.pop(0) if self.queue else None
            if item is not None:
                self.assigned[(item["id"], item.get("volume", ""))] = worker
        if item is None:
            return (
                f'<euca:GetInstanceImportTaskResponse xmlns:euca="{NS}"><euca:requestId>r</euca:requestId>'
                "</euca:GetInstanceImportTaskResponse>"
            )
        if item.get("convert"):
            return (
                f'<GetInstanceImportTaskResponse xmlns="{NS}"><importTaskId>{item["id"]}</importTaskId>'
                "<importTaskType>convert_image</importTaskType><instanceStoreTask><accountId>1</accountId>"
                "</instanceStoreTask></GetInstanceImportTaskResponse>"
            )
        url = _xml_text(item["url"])
        return (
            f'<euca:GetInstanceImportTaskResponse xmlns:euca="{NS}"><euca:requestId>r</euca:requestId>'
            f"<euca:importTaskId>{item['id']}</euca:importTaskId><euca:importTaskType>import_volume</euca:importTaskType>"
            f"<euca:volumeTask><euca:volumeId>{item['volume']}</euca:volumeId><euca:imageManifestSet><euca:item>"
            f"<euca:manifestUrl>{url}</euca:manifestUrl><euca:format>{item['format']}</euca:format>"
            "</euca:item></euca:imageManifestSet></euca:volumeTask></euca:GetInstanceImportTaskResponse>"
        )

    def final(self, task_id: str, volume_id: str) -> dict[str, str] | None:
        with self.lock:
            return next(
                (
                    s
                    for s in self.statuses
                    if s.get("ImportTaskId") == task_id
                    and s.get("VolumeId") == volume_id
                    and s.get("Status") in ("DONE", "FAILED")
                ),
                None,
            )


class PartServer:
    """Serves a file's parts (``/part/<i>``, ``part_size`` bytes each) and counts every request."""

    def __init__(self, source: Path, part_size: int, *, delay: Callable[[int], None] | None = None) -> None:
        self.data = source.read_bytes()
        self.part_size = part_size
        self.requests: list[str] = []
        self.delay = delay
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append(self.path)
                index = int(self.path.split("?")[0].rsplit("/", 1)[1])
                body = server.data[index * server.part_size : (index + 1) * server.part_size]
                if self.headers.get("Range") == "bytes=0-0":
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes 0-0/{len(body)}")
                    self.send_header("Content-Length", "1")
                    self.end_headers()
                    self.wfile.write(body[:1])
                    return
                if server.delay is not None:
                    server.delay(index)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def urls(self) -> list[str]:
        count = -(-len(self.data) // self.part_size)
        return [f"{self.url}/part/{i}?Signature=s&Expires=1" for i in range(count)]

    def __enter__(self) -> PartServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
