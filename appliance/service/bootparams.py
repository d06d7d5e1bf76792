"""Kernel, ramdisk and virtualization type of an imported image (beyond AWS, from Eucalyptus).

A paravirtual image is started by the hypervisor with a kernel (and optionally a ramdisk) that are
registered separately (``aki-``/``ari-`` in AWS, ``eki-``/``eri-`` in Eucalyptus); an hvm image
boots its own kernel from its disk. ImportImage and ImportInstance carry these settings in two
ways, both accepted (see the README, "Kernel, ramdisk and virtualization type"):

- extra request members the AWS model does not have (``KernelId``, ``RamdiskId``,
  ``VirtualizationType``; under ``LaunchSpecification.`` for ImportInstance), and
- a token in ``Description``, for clients such as boto3 that refuse unknown members::

      Description="web tier [imaging:kernel=aki-1234abcd,ramdisk=ari-1234abcd,virtualization=paravirtual]"

An explicit member and a token that disagree are refused rather than one silently winning. This
module holds the rules; the HTTP layer only says which wire names to use in messages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from ..errors import UsageError

KERNEL_PREFIXES = ("aki", "eki")
RAMDISK_PREFIXES = ("ari", "eri")
PARAVIRTUAL = "paravirtual"
HVM = "hvm"
VIRTUALIZATION_TYPES = (PARAVIRTUAL, HVM)
#: boot modes that only exist for hvm guests (firmware boots the disk's loader)
_FIRMWARE_BOOT_MODES = ("uefi", "uefi-preferred")

FIELDS = ("kernel_id", "ramdisk_id", "virtualization_type")
#: ``[imaging:KEY=VALUE,…]`` keys → field (``sha256``: the expected digest of the source,
#: :mod:`appliance.service.expected`; not a boot setting, ignored by :func:`resolve`)
TOKEN_KEYS = {
    "kernel": "kernel_id",
    "ramdisk": "ramdisk_id",
    "virtualization": "virtualization_type",
    "sha256": "expected_sha256",
}
TOKEN_OPEN = "[imaging:"
_TOKEN_RE = re.compile(r"\[imaging:([^\[\]]*)\]")
_ID_RE = re.compile(r"^([a-z]{3})-([0-9a-f]{8}|[0-9a-f]{17})$")
_KIND = {"aki": "kernel", "eki": "kernel", "ari": "ramdisk", "eri": "ramdisk", "ami": "machine image",
         "emi": "machine image"}  # fmt: skip


@dataclass(frozen=True)
class BootParams:
    """Validated boot settings; every member None when the request gave none."""

    kernel_id: str | None = None
    ramdisk_id: str | None = None
    virtualization_type: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        """``{kernel_id, ramdisk_id, virtualization_type}`` (the task parameter names)."""
        return asdict(self)


def _invalid(message: str) -> UsageError:
    return UsageError(message, code="InvalidParameterValue")


def _combination(message: str) -> UsageError:
    return UsageError(message, code="InvalidParameterCombination")


def _check_id(value: str, name: str, prefixes: tuple[str, ...], what: str) -> str:
    # EC2 ids are lower-case; Eucalyptus 3 printed upper-case hex, so any case is accepted.
    canonical = value.strip().lower()
    match = _ID_RE.match(canonical)
    if match and match.group(1) in prefixes:
        return canonical
    expected = f"{' or '.join(p + '-' for p in prefixes)} followed by 8 or 17 hexadecimal digits"
    if match and match.group(1) in _KIND:
        raise _invalid(
            f"Value ({value}) for parameter {name} is invalid: {match.group(1)}- is a "
            f"{_KIND[match.group(1)]} id; a {what} id is {expected}"
        )
    raise _invalid(
        f"Value ({value}) for parameter {name} is invalid. Expected a {what} id: {expected} "
        f"(e.g. {prefixes[0]}-1234abcd)"
    )


def _check_virtualization(value: str, name: str) -> str:
    canonical = value.strip().lower()
    if canonical not in VIRTUALIZATION_TYPES:
        raise _invalid(
            f"Value ({value}) for parameter {name} is invalid. "
            f"Valid values: {', '.join(VIRTUALIZATION_TYPES)}"
        )
    return canonical


def check(
    kernel_id: str | None = None,
    ramdisk_id: str | None = None,
    virtualization_type: str | None = None,
    *,
    boot_mode: str | None = None,
    names: Mapping[str, str] | None = None,
) -> BootParams:
    """Validate and normalise the boot settings (ids lower-cased, the type implied).

    A kernel or ramdisk implies ``paravirtual``; with ``hvm`` (or a UEFI ``boot_mode``) they are
    an ``InvalidParameterCombination``. A ramdisk without a kernel is allowed: the controlling
    cloud's default kernel boots it. ``names`` maps each field (and ``boot_mode``) to the name the
    caller knows it by, for messages. Raises :class:`UsageError` coded ``InvalidParameterValue``
    or ``InvalidParameterCombination``; empty strings count as absent.
    """
    label = {f: f for f in (*FIELDS, "boot_mode")} | dict(names or {})
    kernel = _check_id(kernel_id, label["kernel_id"], KERNEL_PREFIXES, "kernel") if kernel_id else None
    ramdisk = _check_id(ramdisk_id, label["ramdisk_id"], RAMDISK_PREFIXES, "ramdisk") if ramdisk_id else None
    vtype = (
        _check_virtualization(virtualization_type, label["virtualization_type"])
        if virtualization_type
        else None
    )
    given = [(label[f], v) for f, v in (("kernel_id", kernel), ("ramdisk_id", ramdisk)) if v]
    if given and vtype == HVM:
        listed = " and ".join(f"{n} ({v})" for n, v in given)
        raise _combination(
            f"{listed} can only be used with a {PARAVIRTUAL} image, but {label['virtualization_type']} is "
            f"{HVM}: an {HVM} image boots the kernel on its own disk. Leave out the kernel and ramdisk, "
            f"or import as {PARAVIRTUAL}"
        )
    if given and vtype is None:
        vtype = PARAVIRTUAL
    if vtype == PARAVIRTUAL and boot_mode in _FIRMWARE_BOOT_MODES:
        raise _combination(
            f"{label['boot_mode']} {boot_mode} needs an {HVM} image, but the import is {PARAVIRTUAL}"
            + (f" (given {given[0][0]})" if given else "")
            + ": a paravirtual guest is started by the hypervisor with its kernel, not by firmware"
        )
    return BootParams(kernel, ramdisk, vtype)


def description_tokens(description: str | None, *, name: str = "Description") -> dict[str, str]:
    """The settings of the ``[imaging:KEY=VALUE,…]`` token in ``description`` (field → raw value).

    Keys are ``kernel``, ``ramdisk``, ``virtualization`` and ``sha256`` (:mod:`.expected`). A
    description without the token gives ``{}``; a malformed one (unknown or repeated key, no ``=``,
    two tokens, unterminated) is an ``InvalidParameterValue`` naming ``name``. Values are not
    validated here (see :func:`check`).
    """
    if not description or TOKEN_OPEN not in description:
        return {}
    tokens = _TOKEN_RE.findall(description)
    if len(tokens) != description.count(TOKEN_OPEN):
        raise _invalid(f"{name}: the {TOKEN_OPEN}…] token is not terminated by ] or contains [")
    if len(tokens) > 1:
        raise _invalid(f"{name}: give one {TOKEN_OPEN}…] token, not {len(tokens)}")
    out: dict[str, str] = {}
    for item in tokens[0].split(","):
        if not item.strip():
            continue
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not value:
            raise _invalid(f"{name}: {item.strip()!r} in the {TOKEN_OPEN}…] token is not KEY=VALUE")
        field = TOKEN_KEYS.get(key.lower())
        if field is None:
            raise _invalid(
                f"{name}: unknown setting {key!r} in the {TOKEN_OPEN}…] token; "
                f"known settings: {', '.join(TOKEN_KEYS)}"
            )
        if field in out:
            raise _invalid(f"{name}: {key} is given twice in the {TOKEN_OPEN}…] token")
        out[field] = value
    return out


def resolve(
    explicit: Mapping[str, str | None],
    description: str | None,
    *,
    names: Mapping[str, str] | None = None,
    description_name: str = "Description",
    boot_mode: str | None = None,
) -> BootParams:
    """The boot settings of a request: explicit members (``explicit``, by field) and the
    ``Description`` token merged, then validated by :func:`check`.

    A setting given both ways must agree (after normalisation), else the request is an
    ``InvalidParameterCombination`` naming both: silently preferring one would import something
    other than one of the two things the user asked for.
    """
    member_label = {f: f for f in FIELDS} | dict(names or {})
    token_key = {field: key for key, field in TOKEN_KEYS.items()}
    token_label = {f: f"{description_name} [imaging:{token_key[f]}=]" for f in FIELDS}
    tokens = description_tokens(description, name=description_name)
    # each side's values are validated under its own name first
    from_members = check(**{f: explicit.get(f) for f in FIELDS}, names=member_label)
    from_tokens = check(**{f: tokens.get(f) for f in FIELDS}, names=token_label)
    merged: dict[str, str | None] = {}
    label = dict(member_label)
    for field in FIELDS:
        member, token = explicit.get(field), tokens.get(field)
        if member and token and getattr(from_members, field) != getattr(from_tokens, field):
            raise _combination(
                f"{member_label[field]} ({member}) and {token_key[field]}={token} in {description_name} "
                "disagree; give the setting once"
            )
        if token and not member:
            label[field] = token_label[field]
        # only what was given: a type implied on one side must not clash with the other side's
        merged[field] = member or token or None
    return check(**merged, names=label, boot_mode=boot_mode)
