"""Bounded, confined access to an untrusted guest filesystem.

Symlinks are resolved here, one component at a time, *inside* the guest: an absolute target restarts at
the guest's root, ``..`` at the root stays there, and at most :data:`MAX_SYMLINKS` links are followed (a
loop ends as "absent"). Reads are capped (:data:`MAX_TEXT`), directory listings too (:data:`MAX_ENTRIES`),
and nothing walks a tree. On vfat/ntfs names match case-insensitively, as the guest would see them.
"""

from __future__ import annotations

from typing import BinaryIO

from .reader import Filesystem

MAX_SYMLINKS = 40
MAX_COMPONENTS = 256
MAX_TEXT = 64 * 1024
MAX_ENTRIES = 4096
MAX_LINK = 4096


class GuestFS:
    """A guest filesystem seen through confined path resolution (``fs`` from :mod:`.reader`)."""

    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs
        self.kind = fs.kind
        self.label = fs.label
        self.uuid = fs.uuid

    def _child(self, parent: str, name: str) -> str | None:
        """The path of ``name`` in ``parent`` (symlink-free), matching case-insensitively if the fs does."""
        path = (parent.rstrip("/") + "/" + name) if parent != "/" else "/" + name
        if self.fs.kind_of(path) is not None:
            return path
        if not self.fs.case_sensitive:
            try:
                names = self.fs.listdir(parent, MAX_ENTRIES)
            except Exception:
                return None
            folded = name.casefold()
            for candidate in names:
                if candidate.casefold() == folded:
                    return (parent.rstrip("/") + "/" + candidate) if parent != "/" else "/" + candidate
        return None

    def resolve(self, path: str, follow_last: bool = True) -> str | None:
        """The symlink-free guest path ``path`` refers to, or ``None`` when it does not exist (or loops)."""
        pending = [c for c in path.split("/") if c not in ("", ".")]
        current: list[str] = []
        hops = 0
        steps = 0
        while pending:
            steps += 1
            if steps > MAX_COMPONENTS + MAX_SYMLINKS * 16:
                return None
            name = pending.pop(0)
            if name == "..":
                if current:
                    current.pop()
                continue
            parent = "/" + "/".join(current)
            child = self._child(parent, name)
            if child is None:
                return None
            kind = self.fs.kind_of(child)
            if kind == "symlink" and (pending or follow_last):
                hops += 1
                if hops > MAX_SYMLINKS:
                    return None
                try:
                    target = self.fs.readlink(child)
                except Exception:
                    return None
                if not target or len(target) > MAX_LINK:
                    return None
                if target.startswith("/"):
                    current = []
                pending = [c for c in target.split("/") if c not in ("", ".")] + pending
                continue
            if pending and kind != "dir":
                return None
            current.append(child.rsplit("/", 1)[1])
        return "/" + "/".join(current)

    def kind_of(self, path: str) -> str | None:
        """``file``/``dir``/``other`` after following symlinks, ``None`` when absent."""
        real = self.resolve(path)
        return None if real is None else self.fs.kind_of(real)

    def is_file(self, path: str) -> bool:
        return self.kind_of(path) == "file"

    def is_dir(self, path: str) -> bool:
        return self.kind_of(path) == "dir"

    def read(self, path: str, limit: int = MAX_TEXT) -> bytes | None:
        """At most ``limit`` bytes of the regular file ``path`` (following symlinks), or ``None``."""
        real = self.resolve(path)
        if real is None or self.fs.kind_of(real) != "file":
            return None
        try:
            return self.fs.read(real, limit)
        except Exception:
            return None

    def read_text(self, path: str, limit: int = MAX_TEXT) -> str | None:
        data = self.read(path, limit)
        return None if data is None else data.decode("utf-8", "replace")

    def listdir(self, path: str, limit: int = MAX_ENTRIES) -> list[str]:
        """Up to ``limit`` names in directory ``path`` (empty when it is not a directory)."""
        real = self.resolve(path)
        if real is None or self.fs.kind_of(real) != "dir":
            return []
        try:
            return self.fs.listdir(real, limit)
        except Exception:
            return []

    def open(self, path: str) -> BinaryIO | None:
        """A lazy stream of regular file ``path`` (for registry hives), or ``None``."""
        real = self.resolve(path)
        if real is None or self.fs.kind_of(real) != "file":
            return None
        return self.fs.open(real)
