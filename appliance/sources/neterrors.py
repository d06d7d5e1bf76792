"""What went wrong on the network, in words a task's status message can carry.

:func:`describe_network_error` names a failure in fixed words ("connection refused", "read timed
out"…), never with the text of urllib3's, http.client's or botocore's exceptions, which is written
for programmers; :func:`is_stall` tells a source that stopped sending from one that could not be
reached. Both look through the exceptions a library wraps around the one that happened.
"""

from __future__ import annotations

import http.client
import socket
import ssl

#: how deep :func:`describe_network_error` looks through wrapped exceptions
_MAX_WRAPPED = 8
# Fixed words by exception class, most specific first (subclasses before their bases).
_NETWORK_PHRASES: tuple[tuple[type[BaseException], str], ...] = (
    (ConnectionRefusedError, "connection refused"),
    (http.client.RemoteDisconnected, "the server closed the connection without answering"),
    (ConnectionResetError, "connection reset by the server"),
    (ConnectionAbortedError, "connection aborted"),
    (BrokenPipeError, "connection closed by the server"),
    (http.client.IncompleteRead, "the connection closed before the whole body arrived"),
    (socket.gaierror, "the host name could not be resolved"),
    (ssl.SSLError, "TLS failure"),
    (TimeoutError, "timed out"),
)


def _wrapped(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it wraps, outermost first (urllib3's ``reason`` and protocol
    errors' second argument, botocore's ``error`` keyword, ``__cause__``/``__context__``)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < _MAX_WRAPPED:
        chain.append(current)
        inner = getattr(current, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((a for a in current.args[1:] if isinstance(a, BaseException)), None)
        if inner is None:
            kwargs = getattr(current, "kwargs", None)
            error = kwargs.get("error") if isinstance(kwargs, dict) else None
            inner = error if isinstance(error, BaseException) else None
        current = inner or current.__cause__ or current.__context__
    return chain


def is_stall(exc: BaseException) -> bool:
    """Whether ``exc`` is, or wraps, a read that timed out: the source stopped sending (a connection
    that could not be made is not a stall)."""
    chain = _wrapped(exc)
    names = [type(e).__name__ for e in chain]
    if any("ConnectTimeout" in n or "NewConnection" in n or "EndpointConnection" in n for n in names):
        return False
    return any("ReadTimeout" in n for n in names) or any(isinstance(e, TimeoutError) for e in chain)


def describe_network_error(exc: BaseException) -> str:
    """What went wrong on the network, in fixed words (no library's exception text)."""
    chain = _wrapped(exc)
    for inner in reversed(chain):  # the innermost cause says the most
        for cls, phrase in _NETWORK_PHRASES:
            if isinstance(inner, cls):
                if cls is ssl.SSLError and isinstance(inner, ssl.SSLError) and inner.reason:
                    return f"{phrase} ({inner.reason})"
                return phrase
    names = [type(e).__name__ for e in chain]
    if any("ConnectTimeout" in n for n in names):
        return "connection timed out"
    if any("ReadTimeout" in n for n in names):
        return "read timed out"
    for inner in reversed(chain):
        if isinstance(inner, OSError) and inner.strerror:
            return inner.strerror.lower()  # the operating system's words, e.g. "no route to host"
    return f"connection failed ({names[-1]})"
