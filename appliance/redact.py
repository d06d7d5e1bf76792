"""What a secret is, and how it is kept out of every output: one list, one URL scrubber.

Every surface that shows configuration, tasks, errors or logs goes through this module: the logs
of every process (:func:`install_logging`), task events and error messages as the store writes
them, the admin API, the EC2 responses, ``imaging config show`` and ``imaging tasks``, the reports
to the controller and the boot-time messages about user data. Secrets are replaced by
:data:`REDACTED`, so a reader sees *that* something was there.

What counts as a secret:

- the value under a secret key (:func:`is_secret_key`: ``secret_key``, ``secret``, ``password``,
  ``session_token``, ``private_key``…, in any case and spelling: ``SecretAccessKey`` too), and
  ``key`` inside a ``tls`` mapping (the private key);
- in a URL: the user info (``https://user:password@host`` → ``https://REDACTED@host``; an
  ``artifact://NAME@VERSION`` has none) and the values of credential query parameters
  (:data:`URL_SECRET_PARAMS`: presigned SigV4/SigV2/STS signatures, credentials and tokens, Google
  and Azure signed URLs) — the rest of the URL stays, so a redacted presigned URL still names its
  bucket and key;
- in free text: every URL as above, ``name=value``, ``"name": "value"`` and ``name: value`` lines
  whose name is a secret key or credential parameter, ``Authorization`` header values and PEM
  private key blocks;
- any value registered with :func:`remember` (the configuration registers the secrets it holds,
  see :mod:`appliance.config`), wherever it appears, e.g. a key pasted into the wrong field or
  echoed by a plugin or a library's error message. Values shorter than :data:`MIN_REMEMBERED`
  characters are not scrubbed as text (they would mangle ordinary words); they are still hidden
  under their keys.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote_plus

REDACTED = "REDACTED"

#: fragments of a (normalised: lower case, letters and digits only) key name that make its value a
#: secret wherever the key appears: ``secret_key``, ``aws_secret_access_key``, ``ClientSecret``,
#: ``db_password``, ``SessionToken``, ``x-amz-security-token``, ``private_key``…
SECRET_KEY_FRAGMENTS = (
    "secret",
    "password",
    "passwd",
    "passphrase",
    "privatekey",
    "apikey",
    "sessiontoken",
    "securitytoken",
    "accesstoken",
    "refreshtoken",
    "authtoken",
    "bearertoken",
    "apitoken",
    "signature",
    "credential",
)
#: whole (normalised) key names that are secrets but too short or common to match as fragments
SECRET_KEY_NAMES = frozenset({"token", "sig", "authorization", "cookie", "awsaccesskeyid", "googleaccessid"})
#: ``(mapping, key)`` pairs that are secrets only inside that mapping: ``tls.key`` is the private
#: key (a PEM in user data; a path in the service configuration, hidden as well)
SECRET_NESTED_KEYS = frozenset({("tls", "key")})
#: keys that look secret but are not: the access key list ``api.credentials`` (its ``secret_key``
#: members are still hidden), ``signature_versions`` of ``/v1/info``, SigV2's ``SignatureVersion``
#: and ``SignatureMethod``
NOT_SECRET_KEYS = frozenset({"credentials", "signatureversion", "signatureversions", "signaturemethod"})

#: query parameters of presigned or signed URLs whose values are credentials (compared
#: case-insensitively): SigV4 (``X-Amz-Credential`` names the access key), SigV2
#: (``AWSAccessKeyId``, ``Signature``), STS (``X-Amz-Security-Token``, SigV2's ``SecurityToken``),
#: Google (``X-Goog-…``, ``GoogleAccessId``), Azure SAS (``sig``); any parameter named like a secret
#: key (:func:`is_secret_key`) as well
URL_SECRET_PARAMS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "signature",
        "awsaccesskeyid",
        "securitytoken",
        "x-goog-signature",
        "x-goog-credential",
        "googleaccessid",
        "sig",
        "token",
        "access_token",
    }
)

#: URI schemes whose ``@`` is not user info: ``artifact://NAME@VERSION`` (:mod:`appliance.artifacts`)
NO_USERINFO_SCHEMES = frozenset({"artifact"})

#: remembered values shorter than this are not scrubbed from text
MIN_REMEMBERED = 8

_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>`]+")
#: ``name=value`` outside URLs (query strings, header dumps, ``key=value`` log fields)
_PAIR = re.compile(
    r"(?P<name>[A-Za-z][A-Za-z0-9_.-]*)(?P<sep>=)(?P<value>[^&\s,;\"'<>)\]}]*[^&\s,;\"'<>)\]}.:!?])"
)
#: ``"name": "value"`` / ``'name': 'value'`` (JSON text, Python reprs of dicts)
_QUOTED_PAIR = re.compile(
    r"(?P<q1>[\"'])(?P<name>[A-Za-z][A-Za-z0-9_.-]*)(?P=q1)(?P<sep>\s*:\s*)(?P<q2>[\"'])(?P<value>(?:(?!(?P=q2)).)*)(?P=q2)"
)
#: ``name: value`` lines (HTTP header dumps, YAML, a SigV4 canonical request's headers)
_LINE_PAIR = re.compile(
    r"(?m)^(?P<head>[ \t-]*[\"']?(?P<name>[A-Za-z][A-Za-z0-9_.-]*)[\"']?[ \t]*:[ \t]*)(?P<value>\S[^\r\n]*)$"
)
#: an ``Authorization`` header value (``Basic …``, ``Bearer …``, ``AWS4-HMAC-SHA256 Credential=…``)
_AUTHORIZATION = re.compile(r"(?i)(?P<head>\bauthorization[\"']?\s*[:=]\s*[\"']?)[^\r\n\"']+")
_PEM = re.compile(
    r"-----BEGIN (?P<kind>[A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END (?P=kind)PRIVATE KEY-----|\Z)", re.S
)

_remembered: set[str] = set()
_remembered_lock = threading.Lock()


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def is_secret_key(name: object, parent: object = None) -> bool:
    """Whether the value under mapping key ``name`` (inside a mapping under ``parent``) is a secret."""
    if not isinstance(name, str):
        return False
    norm = _normalise(name)
    if norm in NOT_SECRET_KEYS or not norm:
        return False
    if norm in SECRET_KEY_NAMES or any(f in norm for f in SECRET_KEY_FRAGMENTS):
        return True
    return isinstance(parent, str) and (_normalise(parent), norm) in SECRET_NESTED_KEYS


def is_secret_param(name: str) -> bool:
    """Whether the query parameter ``name`` (already decoded) carries a credential."""
    return name.lower() in URL_SECRET_PARAMS or is_secret_key(name)


# -- remembered values -----------------------------------------------------------------------------


def secret_values(obj: Any, parent: object = None) -> set[str]:
    """Every non-empty string stored under a secret key anywhere in ``obj``."""
    found: set[str] = set()
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if is_secret_key(k, parent) and isinstance(v, str) and v:
                found.add(v)
            else:
                found |= secret_values(v, k)
    elif isinstance(obj, list | tuple):
        for v in obj:
            found |= secret_values(v, parent)
    return found


def remember(values: Iterable[str]) -> None:
    """Scrub these values from all text this process redacts from now on (the configuration's
    secrets, registered when it is loaded)."""
    with _remembered_lock:
        _remembered.update(v for v in values if isinstance(v, str) and len(v) >= MIN_REMEMBERED)


def remembered() -> frozenset[str]:
    with _remembered_lock:
        return frozenset(_remembered)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each of ``secrets`` replaced (longest first, so overlapping secrets all go)."""
    for s in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(s, REDACTED)
    return text


# -- URLs and text ---------------------------------------------------------------------------------


def _redact_query(query: str) -> str:
    """The query string with credential values replaced; everything else byte for byte."""
    out = []
    for piece in query.split("&"):
        name, sep, _value = piece.partition("=")
        out.append(f"{name}={REDACTED}" if sep and is_secret_param(unquote_plus(name)) else piece)
    return "&".join(out)


def redact_url(url: str) -> str:
    """``url`` without user info and with the values of credential query parameters replaced.

    Works on the text (no parsing that could fail or re-encode): scheme, host, path, the other
    parameters and the fragment are kept exactly, so a redacted presigned URL still names its object.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _redact_query_text(url)
    end = len(rest)
    for ch in "/?#":
        i = rest.find(ch)
        if i != -1:
            end = min(end, i)
    netloc, tail = rest[:end], rest[end:]
    _userinfo, at, host = netloc.rpartition("@")
    if at and scheme.lower() not in NO_USERINFO_SCHEMES:
        netloc = f"{REDACTED}@{host}"
    tail, hash_, fragment = tail.partition("#")
    path, q, query = tail.partition("?")
    if q:
        tail = f"{path}?{_redact_query(query)}"
    if hash_:
        fragment = _redact_query(fragment)  # OAuth implicit flows put tokens in the fragment
        tail = f"{tail}#{fragment}"
    return f"{scheme}://{netloc}{tail}"


def _redact_query_text(text: str) -> str:
    return _PAIR.sub(
        lambda m: f"{m['name']}={REDACTED}" if is_secret_param(m["name"]) else m[0],
        text,
    )


def _redact_url_match(m: re.Match[str]) -> str:
    # punctuation that ends a sentence or a bracket after the URL is not part of it
    url = m[0].rstrip(".,;:!?)]}")
    return redact_url(url) + m[0][len(url) :]


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Free text (a message, a log line, command output) with every secret replaced: URLs
    (:func:`redact_url`), secret ``name=value``, ``"name": "value"`` and ``name: value`` (one per
    line) pairs, ``Authorization`` values, PEM private keys, and ``secrets`` plus the
    :func:`remember`-ed values."""
    if not text:
        return text
    text = scrub(text, {*remembered(), *secrets})
    text = _PEM.sub(REDACTED, text)
    text = _AUTHORIZATION.sub(lambda m: f"{m['head']}{REDACTED}", text)
    text = _LINE_PAIR.sub(lambda m: f"{m['head']}{REDACTED}" if is_secret_param(m["name"]) else m[0], text)
    text = _URL.sub(_redact_url_match, text)
    text = _redact_query_text(text)
    return _QUOTED_PAIR.sub(
        lambda m: (
            f"{m['q1']}{m['name']}{m['q1']}{m['sep']}{m['q2']}{REDACTED}{m['q2']}"
            if is_secret_param(m["name"]) and m["value"]
            else m[0]
        ),
        text,
    )


def redact(obj: Any, secrets: Iterable[str] = (), *, parent: object = None) -> Any:
    """A copy of ``obj`` (JSON-like: mappings, lists, scalars) fit to show: the non-empty values of
    secret keys replaced by :data:`REDACTED` and every string passed through :func:`redact_text`."""
    secrets = frozenset(secrets)
    if isinstance(obj, Mapping):
        return {
            k: REDACTED if is_secret_key(k, parent) and v not in (None, "") else redact(v, secrets, parent=k)
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [redact(v, secrets, parent=parent) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj


# -- logs ------------------------------------------------------------------------------------------


_base_factory: Any = None
_formatter = logging.Formatter()


def _redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record: logging.LogRecord = _base_factory(*args, **kwargs)
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: logging reports it when the record is emitted
        return record
    record.msg, record.args = redact_text(message), None
    if record.exc_info and not record.exc_text:
        try:
            record.exc_text = _formatter.formatException(record.exc_info)
        except Exception:  # an exception whose str() fails: the formatter's fallback later
            record.exc_text = f"{record.exc_info[0]} (its text could not be formatted)"
    if record.exc_text:
        record.exc_text = redact_text(record.exc_text)
    if record.stack_info:
        record.stack_info = redact_text(record.stack_info)
    return record


def install_logging() -> None:
    """Redact every log record this process creates, whatever logger or handler (gunicorn's
    included): the message is formatted and redacted when the record is made, and so is the text
    of an exception it carries. Idempotent."""
    global _base_factory
    current = logging.getLogRecordFactory()
    if current is _redacting_factory:
        return  # installed already (a second CLI run in one process): never wrap it in itself
    _base_factory = current
    logging.setLogRecordFactory(_redacting_factory)
