"""Walk and write paths inside a mounted guest filesystem without ever leaving it.

The guest is untrusted: any directory may be a symlink meant to redirect a write to the host
(``/root/.ssh -> /etc``), and a file may be a symlink, a FIFO or a device node. Every path here is
walked one component at a time from a directory file descriptor with ``O_NOFOLLOW``; a symlink met
on the way is resolved the way the guest itself would see it (an absolute target restarts at the
*guest* root, ``..`` stops at the guest root) — like ``openat2(RESOLVE_IN_ROOT)``. The last
component of a file to write must not be a symlink or a special file: that is refused.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from ..errors import ImagingError

#: how many symlinks one lookup may follow, as the kernel's limit
MAX_SYMLINKS = 40
#: the most a guest text file read by the host (passwd, group, fstab, os-release) may hold
MAX_GUEST_TEXT = 4 * 1024 * 1024


class UnsafeGuestPath(ImagingError):
    """A guest path escapes the guest root, or points at a symlink or a special file."""

    code = "Guest.UnsafePath"


def guest_parts(path: str) -> list[str]:
    """Split an absolute guest path; refuse ``..`` (a request that climbs is a bug or an attack)."""
    if not path.startswith("/"):
        raise UnsafeGuestPath(f"guest path {path!r} must be absolute (start with /)")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeGuestPath(f"guest path {path!r} contains '..'; give the path without it")
    if "\0" in path:
        raise UnsafeGuestPath("guest path contains a NUL byte")
    return parts


class GuestFS:
    """Directory-fd based access to a guest tree rooted at ``root`` (a mount point on the host)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @contextlib.contextmanager
    def _root_fd(self) -> Iterator[int]:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            yield fd
        finally:
            os.close(fd)

    def _walk(
        self,
        root_fd: int,
        parts: list[str],
        *,
        create: bool = False,
        mode: int = 0o755,
        owner: tuple[int, int] | None = None,
    ) -> tuple[int, list[str]]:
        """Open the directory ``parts`` names (resolving symlinks in-root); return (fd, resolved parts).

        With ``create``, missing directories are created with ``mode`` and ``owner`` (uid, gid).
        The caller closes the returned fd.
        """
        stack: list[int] = [os.dup(root_fd)]
        names: list[str] = []
        todo = list(parts)
        links = 0
        try:
            while todo:
                name = todo.pop(0)
                if name in ("", "."):
                    continue
                if name == "..":
                    if len(stack) > 1:  # ".." at the guest root stays at the guest root
                        os.close(stack.pop())
                        names.pop()
                    continue
                cur = stack[-1]
                try:
                    st = os.lstat(name, dir_fd=cur)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(name, mode, dir_fd=cur)
                    if owner is not None:
                        os.chown(name, owner[0], owner[1], dir_fd=cur, follow_symlinks=False)
                    st = os.lstat(name, dir_fd=cur)
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise UnsafeGuestPath(f"too many symlinks resolving /{'/'.join(parts)} in the guest")
                    target = os.readlink(name, dir_fd=cur)
                    if target.startswith("/"):
                        while len(stack) > 1:
                            os.close(stack.pop())
                        names.clear()
                    todo = [p for p in target.split("/") if p] + todo
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory in the guest", name)
                # O_NOFOLLOW: the entry checked above cannot have been swapped for a symlink since
                stack.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=cur))
                names.append(name)
            fd = stack.pop()
            return fd, names
        finally:
            for fd in stack:
                os.close(fd)

    def resolve_dir(self, path: str) -> Path | None:
        """The host path of guest directory ``path`` with every symlink resolved in-root, or None.

        The result contains no symlink component, so mounting on it cannot be redirected.
        """
        with self._root_fd() as root_fd:
            try:
                fd, names = self._walk(root_fd, guest_parts(path) if path.startswith("/") else [path])
            except (FileNotFoundError, NotADirectoryError, UnsafeGuestPath):
                return None
            os.close(fd)
        return self.root.joinpath(*names)

    def read_text(self, path: str, limit: int = MAX_GUEST_TEXT) -> str | None:
        """Read a regular guest file as text (symlinks resolved in-root); None when it is absent."""
        parts = guest_parts(path)
        if not parts:
            return None
        with self._root_fd() as root_fd:
            for _ in range(MAX_SYMLINKS):
                try:
                    dfd, parent = self._walk(root_fd, parts[:-1])
                except (FileNotFoundError, NotADirectoryError):
                    return None
                try:
                    name = parts[-1]
                    try:
                        st = os.lstat(name, dir_fd=dfd)
                    except FileNotFoundError:
                        return None
                    if stat.S_ISLNK(st.st_mode):
                        # /etc/os-release -> ../usr/lib/os-release is common: follow it, in-root
                        target = os.readlink(name, dir_fd=dfd)
                        tparts = [p for p in target.split("/") if p]
                        parts = tparts if target.startswith("/") else parent + tparts
                        if not parts:
                            return None
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        return None
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
                    with os.fdopen(fd, "rb") as f:
                        return f.read(limit).decode("utf-8", "replace")
                finally:
                    os.close(dfd)
        raise UnsafeGuestPath(f"too many symlinks resolving {path} in the guest")

    def makedirs(self, path: str, mode: int = 0o755, owner: tuple[int, int] | None = None) -> None:
        """Create guest directory ``path`` (and missing parents, with ``mode`` and ``owner``)."""
        with self._root_fd() as root_fd:
            fd, _ = self._walk(root_fd, guest_parts(path), create=True, mode=mode, owner=owner)
            os.close(fd)

    def write_file(
        self,
        path: str,
        data: bytes,
        *,
        mode: int = 0o644,
        owner: tuple[int, int] = (0, 0),
        parent_mode: int = 0o755,
        parent_owner: tuple[int, int] | None = None,
    ) -> dict[str, object]:
        """Atomically write ``data`` to guest ``path``; return ``{path, sha256, bytes, mode, uid, gid}``.

        Missing parent directories are created. The final component must be absent or a regular
        file: a symlink, directory or special file there is refused with ``Guest.UnsafePath``.
        """
        parts = guest_parts(path)
        if not parts:
            raise UnsafeGuestPath("cannot write to the guest root directory itself")
        name = parts[-1]
        with self._root_fd() as root_fd:
            dfd, _ = self._walk(root_fd, parts[:-1], create=True, mode=parent_mode, owner=parent_owner)
            try:
                try:
                    st = os.lstat(name, dir_fd=dfd)
                except FileNotFoundError:
                    st = None
                if st is not None and not stat.S_ISREG(st.st_mode):
                    kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                    raise UnsafeGuestPath(f"guest path {path} is {kind}; refusing to write through it")
                tmp = f".{name}.imaging-tmp-{os.getpid()}"
                with contextlib.suppress(OSError):  # a leftover of a crashed write (unlink never follows)
                    os.unlink(tmp, dir_fd=dfd)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
                try:
                    with os.fdopen(fd, "wb", closefd=False) as f:
                        f.write(data)
                    os.fchown(fd, owner[0], owner[1])
                    os.fchmod(fd, mode)  # after chown: chown clears set-id bits
                    os.fsync(fd)
                finally:
                    os.close(fd)
                try:
                    # rename replaces the directory entry; it never follows a symlink there
                    os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=dfd)
                    raise
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return {
            "path": "/" + "/".join(parts),
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "mode": f"{mode:04o}",
            "uid": owner[0],
            "gid": owner[1],
        }
