"""Mount a raw disk image's guest filesystems with loop devices, and always undo it.

``mount_guest(image)`` attaches the image to a loop device (read-only unless ``writable``), maps its
partitions with ``partx -a`` (this kernel has no device-mapper and loop ``max_part=0``), finds the
root filesystem, mounts it and the guest's other ``fstab`` filesystems that live on the same disk,
and with ``chroot=True`` gives it a minimal ``/dev`` (no ``/proc``, no ``/sys``: chroot commands
run in :mod:`appliance.guest.sandbox`, which mounts a ``/proc`` of its own). Everything is undone in
reverse order when the context exits — normally, on an exception, on cancel; a failure to undo
never masks the exception that ended the context (the record stays for the sweep).

Crash recovery: every loop device and mount point is recorded in
``<state_dir>/mounts/<owner>.json`` *before* it is created (and updated after), written atomically,
with the owner's PID; for the loop device that is its backing file (a loop attached by an owner
killed inside ``losetup`` is found with ``losetup -j`` and detached when its backing inode matches).
The owner holds an ``flock`` on ``<owner>.lock`` for its lifetime, so the kernel itself says when an
owner is gone; :func:`appliance.guest.mountrecord.sweep_stale` undoes the entries of dead owners
(the worker calls it at start and from crash recovery). It is safe to run concurrently, and a record
it cannot handle (a lock file it may not open, an umount that hangs) is logged and left for later.
The records live in :mod:`appliance.guest.mountrecord`; the command and loop-device plumbing in
:mod:`appliance.guest.loopdev`; the disk's partitions and the guest's ``fstab`` in
:mod:`appliance.guest.partitions`.

Security: the image is untrusted and the kernel's filesystem drivers parse it when mounting. Only
an allowlist of filesystem types is mounted (the type comes from ``blkid -p``, never from the
guest's fstab), always ``nosuid,nodev`` (and ``noexec`` unless the mount is for a chroot), and mount
points inside the guest are resolved without following symlinks out of it. A chroot alone is not
a sandbox: commands in it run the guest's binaries, so they must go through :mod:`appliance.guest.sandbox`
(as ``run``/``run-in-guest`` do).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Cancelled, ImagingError, UsageError
from ..image.formats import SIGNATURE_BYTES, container_format
from .fstab import parse_fstab
from .loopdev import MountFailed, run_cmd, unmount
from .mountrecord import StateFile, undo, undone
from .partitions import Partition, find_partition, partitions
from .path import GuestFS

log = logging.getLogger(__name__)

#: filesystem types we let the kernel parse from an untrusted image
MOUNTABLE_TYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "ntfs", "ntfs3"})


class NoRootFilesystem(ImagingError):
    """No filesystem of the image holds /etc/os-release, /etc/fstab or a Windows directory."""

    code = "Guest.NoRootFilesystem"


class NotRoot(ImagingError):
    """Loop devices and mounts need root."""

    code = "Run.NotRoot"


class NotRawImage(ImagingError):
    """The image is a container format; mounting needs a raw file or a block device."""

    code = "Guest.NotRaw"


@dataclass
class GuestMount:
    """What :func:`mount_guest` set up; ``root`` is the guest's ``/`` on the host."""

    root: Path
    loop: str
    partitions: list[Partition]
    writable: bool
    chroot: bool
    #: every mount point, in mount order (the root first)
    mounts: list[str] = field(default_factory=list)
    #: guest fstab entries not mounted, with the reason
    skipped: list[dict[str, str]] = field(default_factory=list)
    #: the partition holding the guest root
    root_device: str | None = None

    @property
    def fs(self) -> GuestFS:
        """Symlink-safe access to files in the guest."""
        return GuestFS(self.root)


# ------------------------------------------------------------------------------------------- mount


def check_raw(image: Path, declared_format: str | None = "raw") -> None:
    """Refuse anything but a raw image file or a block device.

    The declared format must be ``raw``, and the first bytes must not be a container header: the
    kernel would happily mount the filesystem *inside* a qcow2's data, bypassing its metadata.
    """
    if declared_format not in (None, "raw"):
        raise NotRawImage(f"{image} is {declared_format}; convert it to raw before mounting it")
    try:
        st = os.stat(image)
    except FileNotFoundError as exc:
        raise UsageError(f"{image}: no such image file or device") from exc
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise UsageError(f"{image} is neither a regular file nor a block device")
    with open(image, "rb") as f:
        name = container_format(f.read(SIGNATURE_BYTES))
    if name is not None:
        raise NotRawImage(f"{image} is a {name} image; convert it to raw before mounting it")


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("mounting the guest was cancelled")


class _Mounter:
    """Does the work of :func:`mount_guest`; every action is recorded before it is taken."""

    def __init__(
        self,
        state: StateFile,
        *,
        writable: bool,
        chroot: bool,
        cancel: threading.Event | None,
        on_change: Callable[[str, str], None] | None,
    ) -> None:
        self.state = state
        self.writable = writable
        self.chroot = chroot
        self.cancel = cancel
        self.on_change = on_change or (lambda action, resource: None)

    def _options(self, fstype: str) -> str:
        opts = ["rw" if self.writable else "ro", "nosuid", "nodev"]
        if not self.chroot:
            opts.append("noexec")
        if fstype == "vfat" or fstype.startswith("ntfs"):
            opts.append("umask=022")
        return ",".join(opts)

    def mount(self, device: str, fstype: str, point: Path, extra: str | None = None) -> None:
        """Mount ``device`` (of the allowlisted ``fstype``) on ``point``; record it first."""
        _check_cancel(self.cancel)
        if fstype not in MOUNTABLE_TYPES:
            raise MountFailed(f"{device}: filesystem type {fstype!r} is not mountable by policy")
        opts = self._options(fstype) + (f",{extra}" if extra else "")
        self.state.data["mounts"].append(str(point))
        self.state.save()
        argv = ["mount", "--no-canonicalize", "-t", fstype, "-o", opts, device, str(point)]
        proc = run_cmd(argv, check=False)
        if proc.returncode != 0 and not self.writable and fstype in ("ext3", "ext4", "xfs"):
            # a dirty journal cannot be replayed on a read-only loop device: mount without it
            retry = opts + (",noload" if fstype != "xfs" else ",norecovery")
            proc = run_cmd(
                ["mount", "--no-canonicalize", "-t", fstype, "-o", retry, device, str(point)], check=False
            )
        if proc.returncode != 0:
            self.state.data["mounts"].remove(str(point))
            self.state.save()
            raise MountFailed(f"mounting {device} ({fstype}) failed: {proc.stderr.strip()}")
        self.on_change("created", f"mount:{point}")

    def mount_special(self, fstype: str, point: Path, opts: str, source: str | None = None) -> None:
        _check_cancel(self.cancel)
        self.state.data["mounts"].append(str(point))
        self.state.save()
        proc = run_cmd(
            ["mount", "--no-canonicalize", "-t", fstype, "-o", opts, source or fstype, str(point)],
            check=False,
        )
        if proc.returncode != 0:
            self.state.data["mounts"].remove(str(point))
            self.state.save()
            raise MountFailed(f"mounting {fstype} on {point} failed: {proc.stderr.strip()}")
        self.on_change("created", f"mount:{point}")

    def unmount_last(self) -> None:
        point = self.state.data["mounts"].pop()
        unmount(point)
        self.state.save()
        self.on_change("removed", f"mount:{point}")


def _is_root_fs(root: Path) -> bool:
    fs = GuestFS(root)
    if fs.read_text("/etc/os-release") is not None or fs.read_text("/etc/fstab") is not None:
        return True
    return any((root / d).is_dir() and not (root / d).is_symlink() for d in ("Windows", "WINDOWS", "windows"))


def _populate_dev(dev: Path) -> None:
    """A minimal /dev for the chroot: the host's /dev would hand the guest every host disk."""
    for name, major, minor in (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
                               ("urandom", 1, 9), ("tty", 5, 0)):  # fmt: skip
        os.mknod(dev / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(dev / name, 0o666)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, dev / name)
    for name in ("pts", "shm"):
        (dev / name).mkdir(mode=0o755)
    os.chmod(dev / "shm", 0o1777)


def _setup(m: _Mounter, image: Path, state: StateFile) -> GuestMount:
    workdir = state.workdir
    workdir.mkdir(mode=0o700, exist_ok=True)
    root = workdir / "root"
    root.mkdir(mode=0o755, exist_ok=True)
    _check_cancel(m.cancel)

    st = os.stat(image)
    # recorded before attaching: a kill while losetup runs leaves a loop device we do not know yet,
    # which sweep_stale finds by this backing file (what losetup reports as BACK-MAJ:MIN, BACK-INO)
    state.data["backing"] = [st.st_dev, st.st_ino]
    state.data["backing_path"] = str(image.absolute())
    state.save()
    argv = ["losetup", "--show", "-f", *([] if m.writable else ["-r"]), str(image)]
    loop = run_cmd(argv).stdout.strip()
    state.data["loop"] = loop
    state.save()
    m.on_change("created", f"loop:{loop}")
    _check_cancel(m.cancel)

    parts = partitions(loop)
    candidates = [p for p in parts if p.fstype in MOUNTABLE_TYPES]
    gm = GuestMount(root=root, loop=loop, partitions=parts, writable=m.writable, chroot=m.chroot)
    for part in candidates:
        try:
            m.mount(part.device, part.fstype or "", root)
        except MountFailed as exc:
            log.info("not a mountable root candidate: %s", exc)
            continue
        if _is_root_fs(root):
            gm.root_device = part.device
            break
        m.unmount_last()
    if gm.root_device is None:
        seen = ", ".join(f"{p.device}={p.fstype}" for p in parts) or "none"
        raise NoRootFilesystem(
            f"no filesystem of {image.name} holds /etc/os-release, /etc/fstab or a Windows directory "
            f"(filesystems: {seen}); check that this is a system disk"
        )

    fstab = gm.fs.read_text("/etc/fstab") or ""
    entries = sorted(parse_fstab(fstab), key=lambda e: len([c for c in e.mountpoint.split("/") if c]))
    for entry in entries:
        spec, point, fstype, options = entry.spec, entry.mountpoint, entry.fstype, entry.options
        if point in ("/", "none", "swap") or not point.startswith("/") or fstype in ("swap", "none"):
            continue
        if "noauto" in options or "bind" in options:
            gm.skipped.append({"device": spec, "mount_point": point, "reason": "noauto or bind"})
            continue
        found = find_partition(spec, parts)
        if found is None:
            gm.skipped.append({"device": spec, "mount_point": point, "reason": "not on this disk"})
            continue
        if found.device == gm.root_device or found.fstype not in MOUNTABLE_TYPES:
            gm.skipped.append({"device": spec, "mount_point": point, "reason": f"type {found.fstype}"})
            continue
        target = gm.fs.resolve_dir(point)
        if target is None:
            gm.skipped.append({"device": spec, "mount_point": point, "reason": "mount point missing"})
            continue
        # btrfs subvolumes are part of which tree is meant; every other guest option is ignored
        extra = ",".join(o for o in options if o.startswith(("subvol=", "subvolid=")))
        m.mount(
            found.device, found.fstype or "", target, extra if found.fstype == "btrfs" and extra else None
        )

    if m.chroot:
        # Only a minimal /dev. No /proc: a proc mounted here would show the host's processes (and
        # /proc/<pid>/root leads back to the host); appliance.guest.sandbox mounts a fresh one of its own
        # pid namespace. No /sys: it exposes the host's devices and root-writable knobs.
        target = gm.fs.resolve_dir("/dev")
        if target is None:
            gm.skipped.append({"device": "tmpfs", "mount_point": "/dev", "reason": "mount point missing"})
        else:
            m.mount_special("tmpfs", target, "nosuid,noexec,mode=0755,size=1m")
            _populate_dev(target)
    gm.mounts = list(state.data["mounts"])
    return gm


@contextlib.contextmanager
def mount_guest(
    image: Path | str,
    *,
    fmt: str | None = "raw",
    writable: bool = False,
    chroot: bool = False,
    owner: str,
    state_dir: Path | str,
    cancel: threading.Event | None = None,
    on_change: Callable[[str, str], None] | None = None,
) -> Iterator[GuestMount]:
    """Mount the guest filesystems of raw ``image`` (a file or block device); undo it all on exit.

    ``owner`` names the state record (a task id). ``on_change(action, resource)`` is told of every
    loop device and mount created/removed (``"created"``/``"removed"``, ``"loop:/dev/loop3"`` or
    ``"mount:/path"``), e.g. to keep a task's cleanup ledger. Raises ``Run.NotRoot`` when not root,
    ``Guest.NotRaw`` for a container format, ``Guest.MountFailed``, ``Guest.NoRootFilesystem``,
    :class:`Cancelled` when ``cancel`` is set between actions.
    """
    if os.geteuid() != 0:
        raise NotRoot("mounting a guest needs root (loop devices and mount)")
    image = Path(image)
    check_raw(image, fmt)
    state = StateFile(Path(state_dir) / "mounts", owner, str(image))
    mounter = _Mounter(state, writable=writable, chroot=chroot, cancel=cancel, on_change=on_change)
    try:
        yield _setup(mounter, image, state)
    except BaseException:
        try:
            _finish(state, on_change)
        except Exception as exc:  # must not mask the error on its way (a hook's code, Cancelled)
            log.warning("undoing guest mount %s failed (left for sweep_stale): %s", state.path, exc)
        raise
    else:
        _finish(state, on_change)


def _finish(state: StateFile, on_change: Callable[[str, str], None] | None) -> None:
    """Undo the owner's mounts and loop device; remove the record only when all is undone."""
    clean = False
    try:
        undo(state.data, on_change)
        clean = undone(state.data)
    finally:
        if clean:
            state.close()
        else:
            # keep the record so a later sweep_stale retries (lazy unmounts can linger)
            log.warning("guest mount %s not fully undone; left for sweep_stale", state.path)
            os.close(state.lock_fd)


__all__ = [
    "GuestMount",
    "MountFailed",
    "NoRootFilesystem",
    "NotRawImage",
    "NotRoot",
    "Partition",
    "check_raw",
    "mount_guest",
]
