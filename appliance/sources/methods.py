"""Import methods: the ways a disk reaches the appliance, and whether the operator enabled each.

``manifest`` (ImportVolume/ImportInstance: a presigned import manifest of byte-range parts), ``s3``
(ImportImage/ImportSnapshot: ``UserBucket`` or an ``s3://`` Url), ``url`` (an ``https://`` or
``http://`` Url) and ``upload`` (bytes staged on the appliance, ``upload://{id}``; see
:mod:`.staged`). ``sources.methods`` lists the enabled ones (Glance's ``enabled_import_methods``);
the API refuses another when the request arrives, and the steps that fetch a disk refuse it again
when they run (a task submitted by ``imaging run``, or before the operator disabled the method).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import SourcesConfig
from ..errors import ImagingError

MANIFEST = "manifest"
S3 = "s3"
URL = "url"
UPLOAD = "upload"
#: every import method, in the order the documents list them
METHODS = (MANIFEST, S3, URL, UPLOAD)
#: the methods enabled when ``sources.methods`` is not configured
DEFAULT_METHODS = (MANIFEST, S3, URL)
UPLOAD_SCHEME = "upload://"


class ImportMethodDisabled(ImagingError):
    """The request's import method is not in ``sources.methods``."""

    code = "ImportMethodDisabled"


def is_upload_url(url: str | None) -> bool:
    return bool(url) and str(url).lower().startswith(UPLOAD_SCHEME)


def method_of_url(url: str) -> str:
    """The method of an ImportImage/ImportSnapshot ``Url``: ``s3``, ``upload`` or ``url``."""
    lowered = url.lower()
    if lowered.startswith("s3://"):
        return S3
    if lowered.startswith(UPLOAD_SCHEME):
        return UPLOAD
    return URL


def method_of_source(source: Mapping[str, Any]) -> str:
    """The method of a disk container (``{url}`` or ``{bucket, key}``)."""
    url = source.get("url")
    return method_of_url(str(url)) if url else S3


def method_of_manifest(url: str) -> str:
    """The method of an ImportVolume/ImportInstance ``ImportManifestUrl``: ``upload`` for
    ``upload://{id}`` (no manifest: the staged bytes are the disk), else ``manifest``."""
    return UPLOAD if is_upload_url(url) else MANIFEST


def enabled_methods(sources: SourcesConfig | None) -> tuple[str, ...]:
    return sources.methods if sources is not None else DEFAULT_METHODS


def check_enabled(sources: SourcesConfig | None, method: str, what: str) -> None:
    """Raise :class:`ImportMethodDisabled` unless ``method`` is enabled; ``what`` names the request's
    member that chose it (``Url upload://…``)."""
    enabled = enabled_methods(sources)
    if method not in enabled:
        raise ImportMethodDisabled(
            f"the import method {method} ({what}) is disabled on this appliance (sources.methods: "
            f"{', '.join(enabled) or 'none'}); import with an enabled method, or ask the operator to "
            f"enable {method}"
        )
