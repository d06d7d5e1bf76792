"""Waiting for an EC2 import upload: its manifest, then every part it lists.

The legacy ImportVolume/ImportInstance calls name a manifest URL that usually does not exist yet:
euca2ools presigns it, creates the task, and only then PUTs the manifest and the parts. So
:func:`wait_for_manifest` polls the manifest URL (404 or S3's 403 for a missing key mean "not yet"), then
HEADs each part until it is there (several at a time, answers taken in index order), all with
exponential back-off, until the task's deadline. Downloading the parts is :mod:`.parts`.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from ..errors import Cancelled
from ..redact import redact_url
from .http import HttpClient, SourceUnavailable, TransferInterrupted
from .httpio import sleep_or_cancel
from .manifest import (
    MAX_MANIFEST_BYTES,
    ImportManifest,
    ManifestInvalid,
    Part,
    PartVerificationFailed,
    parse_manifest,
)
from .ranges import DEFAULT_PARALLEL
from .urlfilter import UrlNotAllowed, UrlPolicy

#: S3 error codes on a presigned GET that will never turn into the manifest by waiting
_FATAL_S3_CODES = frozenset(
    {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AuthorizationQueryParametersError"}
)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _remaining(deadline: dt.datetime) -> float:
    if deadline.tzinfo is None:
        deadline = deadline.replace(tzinfo=dt.UTC)
    return (deadline - _now()).total_seconds()


def _s3_error(body: bytes) -> tuple[str, str]:
    """(Code, Message) of an S3 XML error body, or ("", "") when it is not one."""
    try:
        root = SafeET.fromstring(body[:65536], forbid_dtd=True)
    except (DefusedXmlException, ET.ParseError):
        return "", ""
    return (root.findtext("Code") or "").strip(), (root.findtext("Message") or "").strip()


class _Backoff:
    """Poll interval doubling from ``first`` up to ``cap``; reset when progress is made."""

    def __init__(self, first: float, cap: float) -> None:
        self.first, self.cap = first, max(cap, first)
        self.current = first

    def next(self) -> float:
        value = self.current
        self.current = min(self.cap, self.current * 2)
        return value

    def reset(self) -> None:
        self.current = self.first


def _wait(backoff: _Backoff, deadline: dt.datetime, cancel: threading.Event | None) -> None:
    delay = min(backoff.next(), max(0.0, _remaining(deadline)))
    # a little jitter so many tasks started together do not poll the object store in lock-step
    sleep_or_cancel(delay * random.uniform(0.9, 1.0), cancel, "waiting for the upload")


def wait_for_manifest(
    url: str,
    policy: UrlPolicy,
    *,
    deadline: dt.datetime,
    cancel: threading.Event | None = None,
    on_wait: Callable[[str], None] | None = None,
    poll_interval: float | None = None,
    max_interval: float | None = None,
    http: HttpClient | None = None,
) -> ImportManifest:
    """Wait until the manifest at ``url`` and every part it lists are uploaded; return the manifest.

    A 404, or S3's 403 for a key that does not exist yet, means "not uploaded yet": the URL is polled
    every ``poll_interval`` seconds, doubling up to ``max_interval`` (defaults: ``sources.manifest_poll_*``).
    Then each part's head-url is HEADed until it answers 200 (euca2ools uploads parts after the
    manifest): ``sources.parallel_ranges`` HEADs at a time, their answers taken in index order.
    ``on_wait`` gets a short status before each wait. Raises
    :class:`SourceUnavailable` ("the import manifest was not uploaded before the task expired") at
    ``deadline`` (aware datetime; naive means UTC), :class:`ManifestInvalid`, :class:`UrlNotAllowed` for
    a disallowed manifest or part URL, :class:`Cancelled` within about a second of ``cancel``.
    """
    client = http or HttpClient(policy)
    sources = policy.sources
    first = poll_interval or (sources.manifest_poll_interval if sources else 5.0)
    cap = max_interval or (sources.manifest_poll_max_interval if sources else 60.0)
    backoff = _Backoff(first, cap)
    notify = on_wait or (lambda _msg: None)

    while True:
        if cancel is not None and cancel.is_set():
            raise Cancelled("waiting for the import manifest cancelled")
        data, answer = _try_get_manifest(client, url, cancel)
        if data is not None:
            manifest = parse_manifest(data)
            break
        if _remaining(deadline) <= 0:
            raise SourceUnavailable(
                f"the import manifest was not uploaded before the task expired (last answer from "
                f"{redact_url(url)}: {answer}); upload the disk image (e.g. euca-resume-import) and import "
                "again"
            )
        notify(f"waiting for the import manifest to be uploaded ({answer})")
        _wait(backoff, deadline, cancel)

    _check_part_urls(manifest, policy)
    backoff.reset()
    count = len(manifest.parts)
    index = 0
    width = sources.parallel_ranges if sources else DEFAULT_PARALLEL
    # the parts' HEADs go ``width`` at a time (one after the other they were ~0.4 s of a 2 GiB
    # ImportVolume's 205 parts, before any byte moved); their answers are taken in index order, so
    # the first part not there yet, or the first refusal, is the one a sequential wait would meet
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="part-heads") as pool:
        while index < count:
            if cancel is not None and cancel.is_set():
                raise Cancelled("waiting for the import upload cancelled")
            batch = manifest.parts[index : index + 2 * width]
            answers = [pool.submit(_part_present, client, part, cancel) for part in batch]
            present, answer = True, ""
            try:
                for future in answers:
                    present, answer = future.result()
                    if not present:
                        break
                    index += 1
            finally:
                for future in answers:
                    future.cancel()  # the HEADs past a missing part are asked again after the wait
            if present:
                backoff.reset()
                continue
            part = manifest.parts[index]
            if _remaining(deadline) <= 0:
                raise SourceUnavailable(
                    f"part {index + 1} of {count} ({part.key}) was not uploaded before the task expired "
                    f"(last answer: {answer}); finish the upload (e.g. euca-resume-import) and import again"
                )
            notify(f"waiting for part {index + 1} of {count} to be uploaded ({answer})")
            _wait(backoff, deadline, cancel)
    return manifest


def _try_get_manifest(
    client: HttpClient, url: str, cancel: threading.Event | None
) -> tuple[bytes | None, str]:
    """(body, "") when the manifest is there, else (None, why not yet). Raises for permanent failures."""
    try:
        response = client.get_stream(url, cancel=cancel)
    except SourceUnavailable as exc:
        return None, exc.message  # the object store is down or flaky: keep waiting until the deadline
    with response:
        if response.status == 200:
            try:
                body = response.read(MAX_MANIFEST_BYTES)
            except TransferInterrupted as exc:
                return None, exc.message
            if len(body) > MAX_MANIFEST_BYTES:
                raise ManifestInvalid(f"the manifest is larger than {MAX_MANIFEST_BYTES} bytes")
            return body, ""
        try:
            body = response.read(65536)
        except TransferInterrupted:
            body = b""
    code, message = _s3_error(body)
    answer = f"HTTP {response.status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    if response.status == 404:
        return None, answer
    if response.status == 403 and code not in _FATAL_S3_CODES and "expired" not in message.lower():
        # S3 answers 403 for a missing key when the signer may not list the bucket
        return None, answer
    raise SourceUnavailable(
        f"the import manifest URL {redact_url(url)} cannot be read ({answer}); check that the presigned URL "
        "is valid and not expired",
        status=response.status,
    )


def _part_present(client: HttpClient, part: Part, cancel: threading.Event | None) -> tuple[bool, str]:
    try:
        response = client.head(part.head_url, cancel=cancel)
    except SourceUnavailable as exc:
        return False, exc.message
    with response:
        status, length = response.status, response.content_length
    if status == 200:
        if length is not None and length != part.length:
            raise PartVerificationFailed(
                f"part {part.index} ({part.key}) is {length} bytes but the manifest says {part.length}; the "
                "uploaded parts do not belong to this manifest (delete them and upload again)"
            )
        return True, ""
    if status in (403, 404):
        return False, f"HEAD answered {status}"
    raise SourceUnavailable(
        f"part {part.index} head-url {redact_url(part.head_url)} answered HTTP {status}", status=status
    )


def _check_part_urls(manifest: ImportManifest, policy: UrlPolicy) -> None:
    """Every part URL must pass the policy; each distinct scheme://host:port is resolved once."""
    seen: dict[str, None] = {}
    for part in manifest.parts:
        for name, url in (("head-url", part.head_url), ("get-url", part.get_url)):
            origin = url.split("/", 3)[:3]
            key = "/".join(origin)
            if key in seen:
                continue
            try:
                policy.check(url)
            except UrlNotAllowed as exc:
                # the same class: an unresolvable part host stays Source.Unreachable
                raise type(exc)(f"part {part.index} {name}: {exc.message}") from exc
            seen[key] = None
