"""Where disk images come from: policy-checked HTTP(S) URLs, S3 objects and EC2 import manifests.

Every URL — a manifest, its parts, an ImportImage URL, each redirect hop — passes :class:`UrlPolicy`
(SSRF filtering, :mod:`.urlfilter`) and is fetched from the address the check resolved.
"""

from .fetch import FetchResult, fetch_to_file, open_stream, parse_source
from .http import HttpClient, HttpResponse, SourceIntegrity, SourceUnavailable, TransferInterrupted
from .manifest import (
    ImportManifest,
    ManifestInvalid,
    Part,
    PartVerificationFailed,
    build_manifest,
    parse_manifest,
)
from .parts import download_parts
from .uploadwait import wait_for_manifest
from .urlfilter import CheckedUrl, UrlNotAllowed, UrlPolicy

__all__ = [
    "CheckedUrl",
    "FetchResult",
    "HttpClient",
    "HttpResponse",
    "ImportManifest",
    "ManifestInvalid",
    "Part",
    "PartVerificationFailed",
    "SourceIntegrity",
    "SourceUnavailable",
    "TransferInterrupted",
    "UrlNotAllowed",
    "UrlPolicy",
    "build_manifest",
    "download_parts",
    "fetch_to_file",
    "open_stream",
    "parse_manifest",
    "parse_source",
    "wait_for_manifest",
]
