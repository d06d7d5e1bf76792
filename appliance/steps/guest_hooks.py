"""Shipped guest-modifying hooks: ``hook.inject-metadata`` and ``hook.run-in-guest``.

Both follow the hook step interface: they get ``image`` (``{"path", "format", ...facts}``; only raw
images are accepted, anything else fails with ``Guest.NotRaw``) plus their parameters, and return
``{"image": image, ...}`` with the image unchanged in place.

``hook.inject-metadata`` mounts the guest read-write and writes, in this order:

- ``files: [{path, content | source, mode, owner}]`` — ``content`` is text, ``source`` a local
  file; ``mode`` an integer or octal string (default ``0644``); ``owner`` ``"user[:group]"`` or
  ``"uid:gid"`` resolved with the *guest's* passwd/group (default ``root``);
- ``ssh_authorized_keys: {user, keys}`` — appended (once each) to ``~user/.ssh/authorized_keys``
  with the guest uid/gid, ``.ssh`` 0700, the file 0600;
- ``cloud_init_seed: {meta_data, user_data, network_config?}`` — written as NoCloud seed files in
  ``/var/lib/cloud/seed/nocloud/`` (a mapping is dumped as YAML; ``user_data`` gets
  ``#cloud-config``).

Guest paths never leave the guest (see :mod:`appliance.guest.path`): ``..`` is refused, symlinks in
directories resolve inside the guest root, a symlink or special file as the final component is
refused (``Guest.UnsafePath``). Every file written is listed in a ``guest.changes`` event (path,
sha256, bytes, mode, owner), the guest-change manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import ImagingError, UsageError
from ..guest.path import GuestFS, UnsafeGuestPath, guest_parts
from ..workflow.step import Step, StepContext
from .run import DEFAULT_MAX_OUTPUT, EXEC_PROPERTIES, mount_for_step, run_in_guest

SEED_DIR = "/var/lib/cloud/seed/nocloud"
#: largest local ``source`` file copied into the guest
MAX_SOURCE_BYTES = 256 * 1024 * 1024

_IMAGE = {
    "type": "object",
    "required": ["path"],
    "properties": {"path": {"type": "string", "minLength": 1}, "format": {"type": ["string", "null"]}},
}
_MODE = {
    "oneOf": [
        {"type": "integer", "minimum": 0, "maximum": 0o7777},
        {"type": "string", "pattern": "^0?[0-7]{3,4}$"},
    ]
}
_TEXT_OR_MAP = {"oneOf": [{"type": "string"}, {"type": "object"}]}


class GuestWriteFailed(ImagingError):
    """Writing into the mounted guest failed (a file where a directory is needed, no space, …)."""

    code = "Guest.WriteFailed"


class UnknownGuestUser(ImagingError):
    """A user or group named for the guest is not in its /etc/passwd or /etc/group."""

    code = "Guest.UnknownUser"


def _mode(value: int | str | None, default: int) -> int:
    if value is None:
        return default
    return value if isinstance(value, int) else int(value, 8)


class _Accounts:
    """The guest's users and groups, read from its files (never through the host's NSS)."""

    def __init__(self, fs: GuestFS) -> None:
        self.users: dict[str, tuple[int, int, str]] = {}
        self.groups: dict[str, int] = {}
        for line in (fs.read_text("/etc/passwd") or "").splitlines():
            f = line.split(":")
            if len(f) >= 7 and f[2].isdigit() and f[3].isdigit():
                self.users.setdefault(f[0], (int(f[2]), int(f[3]), f[5]))
        for line in (fs.read_text("/etc/group") or "").splitlines():
            f = line.split(":")
            if len(f) >= 3 and f[2].isdigit():
                self.groups.setdefault(f[0], int(f[2]))

    def user(self, name: str) -> tuple[int, int, str]:
        if name not in self.users:
            raise UnknownGuestUser(
                f"user {name!r} is not in the guest's /etc/passwd; create it first or name another"
            )
        return self.users[name]

    def owner(self, spec: str | int | None) -> tuple[int, int]:
        """``"user[:group]"``, ``"uid:gid"`` or a uid → (uid, gid); default root."""
        if spec is None:
            return 0, 0
        if isinstance(spec, int):
            return spec, spec
        user, _, group = spec.partition(":")
        if user.isdigit():
            uid, gid = int(user), int(user)
        else:
            uid, gid, _home = self.user(user)
        if group:
            if group.isdigit():
                gid = int(group)
            elif group in self.groups:
                gid = self.groups[group]
            else:
                raise UnknownGuestUser(f"group {group!r} is not in the guest's /etc/group")
        return uid, gid


def _file_data(spec: dict[str, Any]) -> bytes:
    if ("content" in spec) == ("source" in spec):
        raise UsageError(f"inject-metadata: file {spec.get('path')!r} needs exactly one of content or source")
    if "content" in spec:
        return str(spec["content"]).encode()
    src = Path(spec["source"])
    if not src.is_file():
        raise UsageError(f"inject-metadata: source {src} is not a readable local file")
    if src.stat().st_size > MAX_SOURCE_BYTES:
        raise UsageError(f"inject-metadata: source {src} is larger than {MAX_SOURCE_BYTES} bytes")
    return src.read_bytes()


def _seed_text(value: str | dict[str, Any], header: str | None = None) -> bytes:
    if isinstance(value, str):
        return value.encode()
    text = yaml.safe_dump(value, sort_keys=False)
    return ((header + "\n" if header else "") + text).encode()


class InjectMetadataStep(Step):
    """Write files, SSH keys and a cloud-init NoCloud seed into the guest filesystem."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["image"],
        "properties": {
            "image": _IMAGE,
            "files": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["path"],
                    "properties": {
                        "path": {"type": "string", "pattern": "^/"},
                        "content": {"type": "string"},
                        "source": {"type": "string", "minLength": 1},
                        "mode": _MODE,
                        "owner": {"oneOf": [{"type": "string"}, {"type": "integer", "minimum": 0}]},
                    },
                },
            },
            "ssh_authorized_keys": {
                "type": "object",
                "additionalProperties": False,
                "required": ["user", "keys"],
                "properties": {
                    "user": {"type": "string", "minLength": 1},
                    "keys": {"type": "array", "items": {"type": "string", "minLength": 1}},
                },
            },
            "cloud_init_seed": {
                "type": "object",
                "additionalProperties": False,
                "required": ["meta_data", "user_data"],
                "properties": {
                    "meta_data": _TEXT_OR_MAP,
                    "user_data": _TEXT_OR_MAP,
                    "network_config": _TEXT_OR_MAP,
                },
            },
        },
    }

    def run(
        self,
        ctx: StepContext,
        image: dict[str, Any],
        files: list[dict[str, Any]] | None = None,
        ssh_authorized_keys: dict[str, Any] | None = None,
        cloud_init_seed: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        # everything that can be checked without the guest is checked before it is mounted
        planned = []
        for spec in files or []:
            guest_parts(spec["path"])
            planned.append((spec, _file_data(spec)))
        for key in (ssh_authorized_keys or {}).get("keys", []):
            if "\n" in key.strip():
                raise UsageError("inject-metadata: an SSH key must be a single line")
        changes: list[dict[str, Any]] = []
        with mount_for_step(ctx, image, writable=True) as gm:
            fs = gm.fs
            accounts = _Accounts(fs)
            try:
                for spec, data in planned:
                    ctx.check_cancelled()
                    owner = accounts.owner(spec.get("owner"))
                    changes.append(
                        fs.write_file(spec["path"], data, mode=_mode(spec.get("mode"), 0o644), owner=owner)
                    )
                if ssh_authorized_keys:
                    changes.append(self._ssh_keys(fs, accounts, ssh_authorized_keys))
                if cloud_init_seed:
                    changes.extend(self._seed(fs, cloud_init_seed))
            except OSError as exc:
                raise GuestWriteFailed(
                    f"writing into the guest failed: {exc.strerror or exc} ({exc.filename or 'guest path'})"
                ) from exc
            finally:
                # the manifest covers what was written even when a later write is refused
                ctx.event("guest.changes", changes=changes)
        return {"image": image, "changes": changes}

    @staticmethod
    def _ssh_keys(fs: GuestFS, accounts: _Accounts, spec: dict[str, Any]) -> dict[str, Any]:
        uid, gid, home = accounts.user(spec["user"])
        if not home.startswith("/"):
            raise UnsafeGuestPath(f"user {spec['user']!r} has no absolute home directory in the guest")
        ssh_dir = home.rstrip("/") + "/.ssh"
        fs.makedirs(ssh_dir, mode=0o700, owner=(uid, gid))
        target = ssh_dir + "/authorized_keys"
        existing = fs.read_text(target) or ""
        lines = existing.splitlines()
        for key in spec["keys"]:
            if key.strip() not in (line.strip() for line in lines):
                lines.append(key.strip())
        return fs.write_file(target, ("\n".join(lines) + "\n").encode(), mode=0o600, owner=(uid, gid))

    @staticmethod
    def _seed(fs: GuestFS, spec: dict[str, Any]) -> list[dict[str, Any]]:
        written = []
        items = [
            ("meta-data", spec["meta_data"], None, 0o644),
            ("user-data", spec["user_data"], "#cloud-config", 0o600),  # user data may hold secrets
        ]
        if spec.get("network_config") is not None:
            items.append(("network-config", spec["network_config"], None, 0o644))
        for name, value, header, mode in items:
            written.append(fs.write_file(f"{SEED_DIR}/{name}", _seed_text(value, header), mode=mode))
        return written

    def plan(self, ctx: StepContext, image: dict[str, Any], **args: Any) -> dict[str, Any]:
        for spec in args.get("files") or []:
            guest_parts(spec["path"])
        targets = [f["path"] for f in args.get("files") or []]
        if args.get("cloud_init_seed"):
            targets.append(SEED_DIR + "/")
        if args.get("ssh_authorized_keys"):
            targets.append(f"~{args['ssh_authorized_keys']['user']}/.ssh/authorized_keys")
        return {"image": image, "writes_in_guest": targets}


class RunInGuestStep(Step):
    """Run a command in the guest's chroot (read-only unless ``writable``), e.g. a scanner."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["image", "command"],
        "properties": {"image": _IMAGE, **EXEC_PROPERTIES},
    }

    def run(
        self,
        ctx: StepContext,
        image: dict[str, Any],
        command: str | list[str],
        writable: bool = False,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        ok_codes: list[int] | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> dict[str, Any]:
        result = run_in_guest(
            ctx,
            image,
            command,
            writable=writable,
            timeout=timeout,
            env=env,
            cwd=cwd,
            ok_codes=ok_codes,
            max_output=max_output,
        )
        return {"image": image, "run": result}
