"""Rendezvous with the controller: fetch the full config for the compact user data, report status.

Protocol (version 1; both sides share the per-appliance ``secret`` from the compact user data
``imaging:v1:<appliance-id>:<controller-url>:<secret>``):

``GET <controller-url>/v1/appliances/<appliance-id>/config``
    The appliance asks for its configuration. The controller answers ``200`` with a JSON (or
    ``#cloud-config`` YAML) document holding an ``imaging:`` mapping — the same section as full user
    data. ``controller.url`` and ``controller.secret`` may be left out (the compact values apply);
    ``appliance_id``, if present, must equal the requested one.

``POST <controller-url>/v1/appliances/<appliance-id>/status``
    The appliance reports after configuring: a JSON body ``{"ver": 1, "type": "status",
    "appliance_id", "status": "configured"|"invalid-config", "timestamp", "addresses": [IPs],
    "parameters": {the imaging: section, secrets replaced by "REDACTED"}, "errors": [{field,
    message}]}``. The controller answers any 2xx. ``invalid-config`` reports (type
    ``config-error``) are also sent for full ``#cloud-config`` user data when its controller URL is
    known; without a valid secret they go unsigned.

``POST <controller-url>/v1/assignments`` (dynamic assignment)
    An appliance booted with the line ``imaging:v1::<controller-url>:<enrolment-secret>`` (no id)
    asks for an identity: a JSON body ``{"ver": 1, "instance_id"}`` naming the machine (its
    ``/etc/machine-id`` by default: stable across reboots), signed with the fleet's enrolment
    secret, ``X-Imaging-Appliance`` carrying the instance id. The controller answers ``200``
    ``{"ver": 1, "appliance_id", "secret"}`` signed with the enrolment secret: the first
    configuration registered for dynamic assignment that no instance holds, or the one this instance
    already holds (the same answer after a lost reply or a reboot); ``409`` when none is left. The
    appliance then continues as with ``imaging:v1:<appliance_id>:<controller-url>:<secret>``.

Signing (requests and responses alike). Three headers:

* ``X-Imaging-Appliance``: the appliance id;
* ``X-Imaging-Timestamp``: Unix time in whole seconds;
* ``X-Imaging-Signature``: lowercase hex HMAC-SHA256, keyed with the secret, of the canonical string
  ``<KIND>\\n<path>\\n<timestamp>\\n<hex SHA-256 of the body>``, where KIND is the request method
  (``GET``/``POST``) for requests and ``RESPONSE`` for the controller's answer, and ``path`` is the
  request's URL path (including any path prefix of the controller URL, no query). The body of a GET
  is empty. Binding the response to the request path stops a config response being replayed as
  another appliance's; the timestamp must be within :data:`MAX_SKEW` seconds of the verifier's clock.

A response without a valid signature is refused: a forged controller cannot configure the appliance.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any, cast
from urllib.parse import urlsplit

import yaml

from ..errors import ConfigError

HEADER_APPLIANCE = "X-Imaging-Appliance"
HEADER_TIMESTAMP = "X-Imaging-Timestamp"
HEADER_SIGNATURE = "X-Imaging-Signature"
MAX_SKEW = 300
PROTOCOL_VERSION = 1
#: a config document larger than this is not a config
MAX_BODY = 1024 * 1024


class RendezvousError(ConfigError):
    """The controller could not be reached, or its answer was unusable or not authentic."""

    code = "RendezvousFailed"


def config_path(base_path: str, appliance_id: str) -> str:
    """URL path of the config endpoint under a controller URL's own path."""
    return f"{base_path.rstrip('/')}/v1/appliances/{appliance_id}/config"


def assignment_path(base_path: str) -> str:
    """URL path of the dynamic-assignment endpoint under a controller URL's own path."""
    return f"{base_path.rstrip('/')}/v1/assignments"


def status_path(base_path: str, appliance_id: str) -> str:
    """URL path of the status endpoint under a controller URL's own path."""
    return f"{base_path.rstrip('/')}/v1/appliances/{appliance_id}/status"


def canonical(kind: str, path: str, timestamp: str, body: bytes) -> bytes:
    """The string both sides sign (see the module docstring)."""
    return f"{kind}\n{path}\n{timestamp}\n{hashlib.sha256(body).hexdigest()}".encode()


def sign(secret: str, kind: str, path: str, timestamp: str, body: bytes) -> str:
    """Hex HMAC-SHA256 of :func:`canonical` keyed with ``secret``."""
    return hmac.new(secret.encode(), canonical(kind, path, timestamp, body), hashlib.sha256).hexdigest()


def signed_headers(
    appliance_id: str, secret: str, kind: str, path: str, body: bytes, now: float | None = None
) -> dict[str, str]:
    """The three protocol headers for a request (``kind`` = method) or a response (``RESPONSE``)."""
    ts = str(int(now if now is not None else time.time()))
    return {
        HEADER_APPLIANCE: appliance_id,
        HEADER_TIMESTAMP: ts,
        HEADER_SIGNATURE: sign(secret, kind, path, ts, body),
    }


def verify(
    secret: str,
    kind: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    now: float | None = None,
    max_skew: int = MAX_SKEW,
) -> None:
    """Check the signature headers of a request or response; :class:`RendezvousError` says why not."""
    ts = headers.get(HEADER_TIMESTAMP)
    given = headers.get(HEADER_SIGNATURE)
    if not ts or not given:
        raise RendezvousError(f"{kind.lower()} is not signed (no {HEADER_SIGNATURE} header)")
    try:
        skew = abs((now if now is not None else time.time()) - int(ts))
    except ValueError as exc:
        raise RendezvousError(f"bad {HEADER_TIMESTAMP} {ts[:20]!r}") from exc
    if skew > max_skew:
        raise RendezvousError(
            f"{kind.lower()} timestamp is {skew:.0f}s away from this clock (at most {max_skew}s allowed)"
        )
    if not hmac.compare_digest(given, sign(secret, kind, path, ts, body)):
        raise RendezvousError(f"{kind.lower()} signature is invalid (wrong secret or altered body)")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def fetch_config(
    controller_url: str,
    appliance_id: str,
    secret: str,
    timeout: float = 10.0,
    attempts: int = 1,
    delay: float = 2.0,
) -> dict[str, Any]:
    """GET the signed config document and return its parsed mapping (holding ``imaging:``).

    Connection failures and 5xx answers are retried ``attempts`` times with doubling delays (the
    network or the controller may come up after the appliance); bad signatures and 4xx are not.
    """
    parts = urlsplit(controller_url)
    path = config_path(parts.path, appliance_id)
    url = f"{parts.scheme}://{parts.netloc}{path}"
    last = ""
    for attempt in range(max(1, attempts)):
        if attempt:
            time.sleep(min(delay * 2 ** (attempt - 1), 30.0))
        request = urllib.request.Request(url, headers=signed_headers(appliance_id, secret, "GET", path, b""))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                body = resp.read(MAX_BODY + 1)
                headers = resp.headers  # case-insensitive: proxies may lower-case header names
        except urllib.error.HTTPError as exc:
            last = _reason(exc)
            if exc.code < 500:
                break
            continue
        except (OSError, ValueError) as exc:
            last = _reason(exc)
            continue
        if len(body) > MAX_BODY:
            raise RendezvousError(f"controller config response is larger than {MAX_BODY} bytes")
        verify(secret, "RESPONSE", path, headers, body)
        try:
            doc = yaml.safe_load(body.decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise RendezvousError("controller config response is not JSON or YAML") from exc
        if not isinstance(doc, dict):
            raise RendezvousError("controller config response is not a mapping")
        return doc
    raise RendezvousError(f"cannot fetch the config from the controller at {url}: {last}")


def poll_config(
    controller_url: str, appliance_id: str, secret: str, have: int | None, timeout: float = 10.0
) -> dict[str, Any] | None:
    """GET the config as :func:`fetch_config` does (once), telling the controller the version this
    appliance runs (``?have=``): None when that is still the current one (a ``304`` whose signature
    headers sign an empty body), else the new document (with its ``version``)."""
    parts = urlsplit(controller_url)
    path = config_path(parts.path, appliance_id)
    query = f"?have={have}" if have is not None else ""
    request = urllib.request.Request(
        f"{parts.scheme}://{parts.netloc}{path}{query}",
        headers=signed_headers(appliance_id, secret, "GET", path, b""),
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            body = resp.read(MAX_BODY + 1)
            headers = resp.headers
    except urllib.error.HTTPError as exc:
        if exc.code == 304:
            # a Message: its get() ignores case, as a proxy may lower-case header names
            verify(secret, "RESPONSE", path, cast(Mapping[str, str], exc.headers), b"")
            return None
        raise RendezvousError(f"cannot fetch the config from the controller: {_reason(exc)}") from None
    except (OSError, ValueError) as exc:
        raise RendezvousError(f"cannot fetch the config from the controller: {_reason(exc)}") from None
    if len(body) > MAX_BODY:
        raise RendezvousError(f"controller config response is larger than {MAX_BODY} bytes")
    verify(secret, "RESPONSE", path, headers, body)
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise RendezvousError("controller config response is not JSON") from exc
    if not isinstance(doc, dict):
        raise RendezvousError("controller config response is not a mapping")
    return doc


def machine_id(path: str = "/etc/machine-id") -> str:
    """This machine's stable identity for dynamic assignment: systemd's machine id (generated on first
    boot from the image's empty one), else the host name."""
    try:
        with open(path) as f:
            value = f.read().strip()
    except OSError:
        value = ""
    return value or socket.gethostname()


def request_assignment(
    controller_url: str,
    enrol_secret: str,
    instance_id: str,
    timeout: float = 10.0,
    attempts: int = 1,
    delay: float = 2.0,
) -> tuple[str, str]:
    """Ask the controller which appliance this instance is (dynamic assignment): ``(appliance_id,
    secret)`` from an answer signed with the enrolment secret. Retried as :func:`fetch_config`."""
    parts = urlsplit(controller_url)
    path = assignment_path(parts.path)
    url = f"{parts.scheme}://{parts.netloc}{path}"
    body = json.dumps({"ver": PROTOCOL_VERSION, "instance_id": instance_id}, sort_keys=True).encode()
    last = ""
    for attempt in range(max(1, attempts)):
        if attempt:
            time.sleep(min(delay * 2 ** (attempt - 1), 30.0))
        headers = {"Content-Type": "application/json"}
        headers.update(signed_headers(instance_id, enrol_secret, "POST", path, body))
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                answer = resp.read(MAX_BODY + 1)
                answer_headers = resp.headers
        except urllib.error.HTTPError as exc:
            last = _reason(exc) + _error_code(exc)
            if exc.code < 500:
                break
            continue
        except (OSError, ValueError) as exc:
            last = _reason(exc)
            continue
        verify(enrol_secret, "RESPONSE", path, answer_headers, answer)
        try:
            doc = json.loads(answer)
        except ValueError as exc:
            raise RendezvousError("controller assignment response is not JSON") from exc
        aid, secret = (doc.get("appliance_id"), doc.get("secret")) if isinstance(doc, dict) else (None, None)
        if not isinstance(aid, str) or not isinstance(secret, str):
            raise RendezvousError("controller assignment response names no appliance_id and secret")
        return aid, secret
    raise RendezvousError(f"cannot get an assignment from the controller at {url}: {last}")


def _error_code(exc: urllib.error.HTTPError) -> str:
    """``: <code>`` of a JSON error answer (``{"error": {"code"}}``), else nothing."""
    try:
        code = json.loads(exc.read(65536))["error"]["code"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return f": {code}" if isinstance(code, str) else ""


def post_status(
    controller_url: str,
    appliance_id: str,
    secret: str | None,
    message: dict[str, Any],
    timeout: float = 5.0,
) -> None:
    """POST ``message`` to the status endpoint, signed when ``secret`` is known.

    Raises :class:`RendezvousError` when it was not accepted; callers treat reporting as best effort.
    """
    parts = urlsplit(controller_url)
    path = status_path(parts.path, appliance_id)
    body = json.dumps(message, sort_keys=True).encode()
    headers = {"Content-Type": "application/json", HEADER_APPLIANCE: appliance_id}
    if secret:
        headers.update(signed_headers(appliance_id, secret, "POST", path, body))
    request = urllib.request.Request(
        f"{parts.scheme}://{parts.netloc}{path}", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            resp.read(MAX_BODY)
    except (OSError, ValueError) as exc:
        raise RendezvousError(f"status report not accepted: {_reason(exc)}") from exc


def local_addresses(controller_url: str | None = None) -> list[str]:
    """This machine's global IP addresses (``ip -j addr``), plus the source address used to reach the
    controller (what it will see; the first entry when known)."""
    found: list[str] = []
    if controller_url:
        found += _route_source(controller_url)
    try:
        out = subprocess.run(
            ["ip", "-j", "addr", "show", "scope", "global"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
        for link in json.loads(out or "[]"):
            for info in link.get("addr_info", []):
                if info.get("local"):
                    found.append(info["local"])
    except (OSError, subprocess.SubprocessError, ValueError):
        pass  # no iproute2: the route source alone still tells the controller who we are
    return list(dict.fromkeys(found))


def _route_source(controller_url: str) -> list[str]:
    """The local address the kernel picks to reach the controller (a UDP connect sends nothing)."""
    parts = urlsplit(controller_url)
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 80, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return []
    for family, _, _, _, addr in infos:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(addr)
                return [s.getsockname()[0]]
        except OSError:
            continue
    return []
