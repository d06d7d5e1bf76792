"""S3 bucket names and object keys: S3's naming rules, checked where a request names them.

A name S3 (or botocore, which validates bucket names itself) would refuse is refused when the
import is submitted, with a message saying which rule it breaks, instead of a task that fails
later with a library's exception text. The rules are those of general purpose buckets
(docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html): 3 to 63 characters of
lower-case letters, digits, ``.`` and ``-``; a letter or digit first and last; no ``..``; not an
IPv4 address; none of the prefixes and suffixes S3 reserves. Legacy us-east-1 names with capitals
or ``_`` and directory buckets (``--x-s3``) cannot be imported from.

An object key is 1 to 1024 bytes of UTF-8 (S3's limit). Beyond S3's own rules, keys with control
characters (which S3's XML answers cannot carry) or with ``.``/``..`` path segments are refused:
with path-style addressing, which the appliance uses for non-AWS object stores, a proxy or an
object store that normalises the path would read ``bucket/../other/key`` from another bucket.
"""

from __future__ import annotations

import re

from ..errors import UsageError

MIN_BUCKET = 3
MAX_BUCKET = 63
MAX_KEY_BYTES = 1024
_BUCKET_CHARS = re.compile(r"^[a-z0-9.-]+$")
_IPV4_LIKE = re.compile(r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$")
_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
_CONTROL = re.compile("[\x00-\x1f\x7f]")
#: how much of a name an error message quotes
_SHOWN = 80


class InvalidS3Name(UsageError):
    """A bucket name or object key S3 would refuse (code ``InvalidParameterValue``)."""


def _shown(value: str) -> str:
    return repr(value if len(value) <= _SHOWN else value[:_SHOWN] + "…")


def bucket_problem(name: str) -> str | None:
    """Which rule ``name`` breaks as an S3 bucket name, or None if it is valid."""
    if not MIN_BUCKET <= len(name) <= MAX_BUCKET:
        return f"it must be {MIN_BUCKET} to {MAX_BUCKET} characters long"
    if not _BUCKET_CHARS.match(name):
        return "it may only contain lower-case letters, digits, '.' and '-'"
    if not (name[0].isalnum() and name[-1].isalnum()):
        return "it must begin and end with a letter or a digit"
    if ".." in name:
        return "it must not contain two adjacent periods"
    if _IPV4_LIKE.match(name):
        return "it must not be formatted as an IP address"
    for prefix in _RESERVED_PREFIXES:
        if name.startswith(prefix):
            return f"the prefix {prefix!r} is reserved"
    for suffix in _RESERVED_SUFFIXES:
        if name.endswith(suffix):
            return f"the suffix {suffix!r} is reserved"
    return None


def key_problem(key: str) -> str | None:
    """Which rule ``key`` breaks as an S3 object key, or None if it is valid."""
    if not key:
        return "it must not be empty"
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "it must be valid UTF-8"
    if size > MAX_KEY_BYTES:
        return f"it is {size} bytes of UTF-8, more than S3's limit of {MAX_KEY_BYTES}"
    if _CONTROL.search(key):
        return "it must not contain control characters"
    if any(segment in (".", "..") for segment in key.split("/")):
        return "it must not contain '.' or '..' path segments"
    return None


def check_bucket(name: str, member: str = "S3Bucket") -> str:
    """``name`` if it is a valid bucket name; else :class:`InvalidS3Name` naming ``member``."""
    problem = bucket_problem(name)
    if problem is not None:
        raise InvalidS3Name(f"{member} {_shown(name)} is not a valid S3 bucket name: {problem}")
    return name


def check_key(key: str, member: str = "S3Key") -> str:
    """``key`` if it is a valid object key; else :class:`InvalidS3Name` naming ``member``."""
    problem = key_problem(key)
    if problem is not None:
        raise InvalidS3Name(f"{member} {_shown(key)} is not a valid S3 object key: {problem}")
    return key
