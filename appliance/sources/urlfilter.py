"""SSRF safety for every URL the appliance fetches: manifests, parts, import URLs and each redirect hop.

The rules follow Glance's fix for CVE-2026-34881 and close the two holes
that fix leaves open:

* the host is normalised strictly: an IP literal must be a canonical dotted quad or a bracketed IPv6
  address (``ipaddress`` parsing, no zone ids); decimal (``2130706433``), short (``127.1``), hex
  (``0x7f000001``) and octal (``0177.0.0.1``) encodings are refused instead of being handed to a resolver
  that would accept them;
* names are resolved once and EVERY address must be public (not loopback, link-local — which holds the
  cloud metadata service 169.254.169.254 —, private, shared, unspecified, multicast, reserved,
  documentation, nor an IPv6 form embedding one of those). The addresses are returned in
  :class:`CheckedUrl` and the HTTP client connects to them, never re-resolving, so a DNS answer that
  changes between check and connect (rebinding) cannot redirect the connection.

An operator lets the appliance reach an internal object store by listing its ``scheme://host[:port]`` in
``sources.allowed_endpoints``; such an endpoint skips the address and port checks. ``s3://bucket/key``
URLs are checked by checking the configured S3 endpoint, which is where the bytes come from.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..config import SourcesConfig
from ..errors import ConfigError, ImagingError
from ..redact import redact_url
from .s3names import bucket_problem, key_problem

#: URLs longer than this are refused (presigned S3 URLs are ~1-2 KiB)
MAX_URL_LENGTH = 8192
DEFAULT_PORTS = {"http": 80, "https": 443}

#: (host, port) -> addresses; injectable so tests can model DNS answers without a DNS server
Resolver = Callable[[str, int], Iterable[str]]

_IPv4 = ipaddress.IPv4Network
_IPv6 = ipaddress.IPv6Network
# Checked in order; the first match names the reason. Anything not listed must still be ``is_global``.
_DENIED_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_IPv4("0.0.0.0/8"), "unspecified ('this network')"),
    (_IPv4("127.0.0.0/8"), "loopback"),
    (_IPv4("169.254.0.0/16"), "link-local (the cloud metadata service 169.254.169.254 lives here)"),
    (_IPv4("10.0.0.0/8"), "private (RFC 1918)"),
    (_IPv4("172.16.0.0/12"), "private (RFC 1918)"),
    (_IPv4("192.168.0.0/16"), "private (RFC 1918)"),
    (_IPv4("100.64.0.0/10"), "shared address space (carrier-grade NAT)"),
    (_IPv4("192.0.0.0/24"), "reserved (IETF protocol assignments)"),
    (_IPv4("192.0.2.0/24"), "reserved (documentation)"),
    (_IPv4("198.51.100.0/24"), "reserved (documentation)"),
    (_IPv4("203.0.113.0/24"), "reserved (documentation)"),
    (_IPv4("198.18.0.0/15"), "reserved (benchmarking)"),
    (_IPv4("192.88.99.0/24"), "reserved (6to4 relay)"),
    (_IPv4("224.0.0.0/4"), "multicast"),
    (_IPv4("240.0.0.0/4"), "reserved"),
)
_DENIED_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_IPv6("::/128"), "unspecified"),
    (_IPv6("::1/128"), "loopback"),
    (_IPv6("::/96"), "reserved (IPv4-compatible)"),
    (_IPv6("fe80::/10"), "link-local"),
    (_IPv6("fec0::/10"), "site-local"),
    (_IPv6("fc00::/7"), "private (unique local)"),
    (_IPv6("ff00::/8"), "multicast"),
    (_IPv6("64:ff9b:1::/48"), "private (local NAT64)"),
    (_IPv6("100::/64"), "reserved (discard)"),
    (_IPv6("2001:db8::/32"), "reserved (documentation)"),
    (_IPv6("2002::/16"), "reserved (6to4)"),
    (_IPv6("2001::/23"), "reserved (IETF protocol assignments, Teredo)"),
)
_NAT64 = _IPv6("64:ff9b::/96")

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
# A label a resolver may read as a number: decimal, octal (leading 0) or hex (0x...).
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_BAD_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\]")


class UrlNotAllowed(ImagingError):
    """A URL (or a redirect target) is not one the appliance may fetch; the message says why and which
    configuration key would allow it."""

    code = "UrlNotAllowed"


@dataclass(frozen=True)
class CheckedUrl:
    """A URL that passed the policy, with the addresses the connection MUST use."""

    url: str
    #: ``http``, ``https`` or ``s3`` (then host/port/addresses are those of the S3 endpoint)
    scheme: str
    #: normalised host: lower case, IPv6 without brackets, no trailing dot
    host: str
    port: int
    #: resolved once at check time; connect to these (in order), never re-resolve ``host``
    addresses: tuple[str, ...]
    #: the URL matched ``sources.allowed_endpoints`` (address and port checks were skipped)
    endpoint_allowed: bool = False

    @property
    def host_header(self) -> str:
        """The ``Host`` header: the URL's authority exactly as written (presigned URLs sign it)."""
        return urlsplit(self.url).netloc

    @property
    def target(self) -> str:
        """Request target: path and query exactly as in the URL (signatures cover them); no fragment."""
        parts = urlsplit(self.url)
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def system_resolver(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to (IPv4 and IPv6), in resolver order, without duplicates."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    out: list[str] = []
    for info in infos:
        addr = str(info[4][0])
        if addr not in out:
            out.append(addr)
    return out


def address_problem(address: str) -> str | None:
    """Why ``address`` must not be connected to (e.g. ``"loopback"``), or None when it is public."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            why = address_problem(str(embedded))
            return f"{why}; IPv4 {embedded} embedded in IPv6" if why else None
        table: Iterable[tuple[Any, str]] = _DENIED_V6
    else:
        table = _DENIED_V4
    for net, why in table:
        if ip in net:
            return why
    if ip == ipaddress.IPv4Address("255.255.255.255"):
        return "broadcast"
    if not ip.is_global:
        return "not globally routable"
    return None


def _normalise_host(
    hostname: str, netloc: str
) -> tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
    """Strictly parse the host of a URL: (normalised host, IP if it is a literal). Raises UrlNotAllowed."""
    bracketed = netloc.rpartition("@")[2].startswith("[")
    if bracketed:
        if "%" in hostname:
            raise UrlNotAllowed(f"IPv6 zone identifiers are not allowed in URLs ({hostname!r})")
        try:
            return hostname, ipaddress.IPv6Address(hostname)
        except ValueError as exc:
            raise UrlNotAllowed(f"{hostname!r} is not a valid IPv6 address") from exc
    host = hostname[:-1] if hostname.endswith(".") else hostname
    if not host:
        raise UrlNotAllowed("the URL has no host")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise UrlNotAllowed(f"host {hostname!r} is not a valid internationalised domain name") from exc
    labels = host.split(".")
    if all(_NUMERIC_LABEL.match(label) for label in labels):
        # Only the canonical dotted quad is an address; 127.1, 2130706433, 0x7f000001 and 0177.0.0.1
        # are refused rather than risk a resolver (inet_aton) reading them as 127.0.0.1.
        try:
            return host, ipaddress.IPv4Address(host)
        except ValueError as exc:
            raise UrlNotAllowed(
                f"host {hostname!r} looks like an encoded IP address; write IPv4 addresses as a "
                "dotted quad (e.g. 192.0.2.10) and IPv6 addresses in brackets"
            ) from exc
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise UrlNotAllowed(f"host {hostname!r} is not a valid host name")
    if _NUMERIC_LABEL.match(labels[-1]):
        # a numeric top-level label cannot be a DNS name (RFC 3696 §2); it is an address in disguise
        raise UrlNotAllowed(f"host {hostname!r} is not a valid host name (numeric last label)")
    return host, None


class HostUnresolvable(UrlNotAllowed):
    """A URL whose host name does not resolve: the source cannot be reached (code ``Source.Unreachable``).

    A :class:`UrlNotAllowed` so every caller that refuses a URL it cannot check refuses this one too,
    but with its own code and words: the resolver's own text ("[Errno -2] Name or service not known")
    says nothing to a user and names no host.
    """

    code = "Source.Unreachable"


#: what getaddrinfo's errors mean to the user; any other keeps the resolver's words as its detail
_RESOLVER_ERRORS = {
    socket.EAI_NONAME: "",  # the name does not exist: nothing to add
    socket.EAI_AGAIN: " (the DNS server did not answer: a temporary failure, import again later)",
    getattr(socket, "EAI_NODATA", socket.EAI_NONAME): " (the name exists but has no address)",
}


def _unresolvable(url: str, host: str, exc: BaseException) -> HostUnresolvable:
    if isinstance(exc, socket.gaierror) and exc.errno in _RESOLVER_ERRORS:
        detail = _RESOLVER_ERRORS[exc.errno]
    else:
        detail = f" ({exc.strerror or exc})" if isinstance(exc, OSError) else f" ({exc})"
    return HostUnresolvable(
        f"cannot reach {redact_url(url)}: its host name {host!r} could not be resolved{detail}; check the "
        "URL's host name and the appliance's DNS settings"
    )


class UrlPolicy:
    """Which URLs may be fetched: http/https only, public addresses and allowed ports, or an endpoint
    the operator listed in ``sources.allowed_endpoints``."""

    def __init__(
        self,
        *,
        allowed_endpoints: Iterable[str] = (),
        allowed_ports: Iterable[int] = (80, 443),
        resolver: Resolver | None = None,
        sources: SourcesConfig | None = None,
    ) -> None:
        self.allowed_ports = frozenset(allowed_ports)
        self.resolver: Resolver = resolver or system_resolver
        #: the configuration this policy came from (HTTP client timeouts, S3 endpoint), when known
        self.sources = sources
        self._endpoints: dict[tuple[str, str, int], str] = {}
        for entry in allowed_endpoints:
            self._endpoints[self._parse_endpoint(entry)] = entry

    @classmethod
    def from_config(cls, sources: SourcesConfig, *, resolver: Resolver | None = None) -> UrlPolicy:
        """The policy of ``config.sources``."""
        return cls(
            allowed_endpoints=sources.allowed_endpoints,
            allowed_ports=sources.allowed_ports,
            resolver=resolver,
            sources=sources,
        )

    @staticmethod
    def _parse_endpoint(entry: str) -> tuple[str, str, int]:
        parts = urlsplit(entry.strip())
        if parts.scheme not in DEFAULT_PORTS:
            raise ConfigError(
                f"sources.allowed_endpoints: {entry!r} must be an http:// or https:// endpoint "
                "(for s3:// sources list the S3 endpoint_url itself)"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
            raise ConfigError(f"sources.allowed_endpoints: {entry!r} must be scheme://host[:port] only")
        try:
            host, _ = _normalise_host(parts.hostname or "", parts.netloc)
            port = parts.port or DEFAULT_PORTS[parts.scheme]
        except (UrlNotAllowed, ValueError) as exc:
            raise ConfigError(f"sources.allowed_endpoints: {entry!r}: {exc}") from exc
        return parts.scheme, host, port

    def check(self, url: str) -> CheckedUrl:
        """Validate ``url`` and resolve its host once. Raises :class:`UrlNotAllowed` with the reason."""
        if not isinstance(url, str) or not url:
            raise UrlNotAllowed("no URL given")
        if len(url) > MAX_URL_LENGTH:
            raise UrlNotAllowed(f"the URL is longer than {MAX_URL_LENGTH} characters")
        if _BAD_URL_CHARS.search(url):
            # urlsplit silently drops tabs/newlines and parsers disagree on backslashes: refuse them
            raise UrlNotAllowed("the URL contains whitespace, control characters or backslashes")
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise UrlNotAllowed(f"malformed URL: {exc}") from exc
        scheme = parts.scheme.lower()
        if scheme == "s3":
            return self._check_s3(url)
        if scheme not in DEFAULT_PORTS:
            raise UrlNotAllowed(f"scheme {parts.scheme or '(none)'!r} is not allowed; use http, https or s3")
        if "@" in parts.netloc:
            raise UrlNotAllowed("user names and passwords in URLs are not allowed")
        try:
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError as exc:
            raise UrlNotAllowed(f"invalid port in {parts.netloc!r}") from exc
        host, literal = _normalise_host(parts.hostname or "", parts.netloc)
        allowed = (scheme, host, port) in self._endpoints
        if not allowed and port not in self.allowed_ports:
            raise UrlNotAllowed(
                f"port {port} is not allowed (allowed: {', '.join(map(str, sorted(self.allowed_ports)))}); "
                f"add it to sources.allowed_ports, or add '{scheme}://{parts.netloc}' to "
                "sources.allowed_endpoints"
            )
        addresses = (str(literal),) if literal is not None else self._resolve(url, host, port)
        if not allowed:
            for address in addresses:
                why = address_problem(address)
                if why:
                    shown = host if literal is not None else f"{host} (resolves to {address})"
                    raise UrlNotAllowed(
                        f"{shown} is not a public address ({why}); the appliance does not fetch from it. "
                        f"If this is a trusted object store add '{scheme}://{parts.netloc}' to "
                        "sources.allowed_endpoints"
                    )
        return CheckedUrl(url, scheme, host, port, addresses, allowed)

    def _resolve(self, url: str, host: str, port: int) -> tuple[str, ...]:
        try:
            addresses = tuple(self.resolver(host, port))
        except (OSError, UnicodeError) as exc:
            raise _unresolvable(url, host, exc) from exc
        if not addresses:
            raise UrlNotAllowed(f"host {host!r} has no addresses")
        for a in addresses:
            try:
                ipaddress.ip_address(a.split("%", 1)[0])
            except ValueError as exc:
                raise UrlNotAllowed(f"host {host!r} resolved to a non-address {a!r}") from exc
        return addresses

    def s3_endpoint(self) -> str:
        """Where s3:// sources are read from: ``sources.s3.endpoint_url`` or AWS's regional endpoint."""
        s3cfg: dict[str, Any] = dict(self.sources.s3) if self.sources is not None else {}
        return s3_endpoint_url(s3cfg)

    def _check_s3(self, url: str) -> CheckedUrl:
        parse_s3_url(url)  # a malformed bucket or key is refused before anything is resolved
        endpoint = self.check(self.s3_endpoint())
        return CheckedUrl(
            url, "s3", endpoint.host, endpoint.port, endpoint.addresses, endpoint.endpoint_allowed
        )


def s3_endpoint_url(s3cfg: dict[str, Any]) -> str:
    """``endpoint_url`` from the S3 settings, else the AWS regional endpoint of ``region``."""
    endpoint = s3cfg.get("endpoint_url")
    if endpoint:
        return str(endpoint).rstrip("/")
    return f"https://s3.{s3cfg.get('region') or 'us-east-1'}.amazonaws.com"


def parse_s3_url(url: str) -> tuple[str, str]:
    """``(bucket, key)`` of ``s3://bucket/key``; raises UrlNotAllowed for a malformed one.

    The key is everything after the bucket, verbatim (S3 keys may contain ``?`` and ``#``); bucket
    and key must follow S3's naming rules (:mod:`appliance.sources.s3names`).
    """
    scheme, sep, rest = url.partition("://")
    if scheme.lower() != "s3" or not sep:
        raise UrlNotAllowed(f"not an s3:// URL: {url!r}")
    bucket, _, key = rest.partition("/")
    problem = bucket_problem(bucket)
    if problem is not None:
        raise UrlNotAllowed(f"{bucket[:80]!r} is not a valid S3 bucket name: {problem}")
    if not key:
        raise UrlNotAllowed(f"{url!r} names no object key; use s3://bucket/key")
    problem = key_problem(key)
    if problem is not None:
        raise UrlNotAllowed(f"the object key in {url[:120]!r} is not a valid S3 object key: {problem}")
    return bucket, key
