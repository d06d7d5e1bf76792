"""The local cache of verified resources, by content: ``<cache_dir>/sha256/<hex digest>``.

A file enters the cache only after its bytes hashed to the expected digest (a mismatch removes
the download and caches nothing). Cached files are read-only (0444) so a step cannot change what
the next task reads; their digest is checked again on every use, so a file altered in place
(by root, or by a disk error) is dropped and fetched again rather than trusted. Installing is an
atomic rename, so concurrent tasks fetching the same resource both end with the same file.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from ..targets.rawio import hash_file
from .refs import ArtifactError

CHUNK = 1024 * 1024
FILE_MODE = 0o444


def digest_mismatch(what: str, actual: str, expected: str) -> ArtifactError:
    """The coded error for bytes that do not hash to the digest they must have."""
    return ArtifactError(
        f"{what}: the sha256 of the received bytes is {actual}, but {expected} was expected; the content "
        "was changed after it was published (or corrupted on the way). Nothing was cached",
        "Artifact.DigestMismatch",
    )


class DigestCache:
    """Files by sha256 under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, digest: str) -> Path:
        return self.root / "sha256" / digest

    def lookup(self, digest: str) -> Path | None:
        """The cached file of ``digest`` after re-checking its content, else None."""
        path = self.path_for(digest)
        try:
            actual, _ = hash_file(path)
        except FileNotFoundError:
            return None
        if actual != digest:
            path.unlink(missing_ok=True)  # corrupted in place: fetch it again
            return None
        return path

    def temp_path(self) -> Path:
        """A fresh path for a download in progress (on the cache's file system, so install renames)."""
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
        return tmp / f"download-{secrets.token_hex(8)}"

    def install(self, tmp: Path, actual: str, expected: str | None, what: str) -> Path:
        """Move the downloaded ``tmp`` (whose sha256 is ``actual``) into the cache.

        With ``expected`` set and different, ``tmp`` is removed and ``Artifact.DigestMismatch`` raised.
        """
        if expected is not None and actual != expected:
            tmp.unlink(missing_ok=True)
            raise digest_mismatch(what, actual, expected)
        target = self.path_for(actual)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, target)
        return target

    def add_file(self, src: Path, expected: str | None, what: str) -> tuple[Path, str, bool]:
        """Cache a copy of the local file ``src``; returns ``(path, digest, was_already_cached)``."""
        if expected is not None:
            hit = self.lookup(expected)
            if hit is not None:
                return hit, expected, True
        tmp = self.temp_path()
        try:
            # copy first, then hash the copy: the cached bytes are exactly the verified ones
            shutil.copyfile(src, tmp)
            actual, _ = hash_file(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        hit = self.lookup(actual)
        if hit is not None and (expected is None or expected == actual):
            tmp.unlink(missing_ok=True)
            return hit, actual, True
        return self.install(tmp, actual, expected, what), actual, False
