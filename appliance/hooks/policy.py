"""The rules of the ``policy`` hook: reject an import by facts about its image.

Rules (all optional; every configured rule must pass):

- ``allow_formats`` / ``deny_formats``: the image's format (``raw``, ``qcow2``, ``vmdk``, ``vhd`` …).
- ``max_virtual_size``: bytes or a size string (``"10GiB"``).
- ``allow_os`` / ``deny_os``: the guest's OS family (``linux``, ``windows``) or distribution
  (``ubuntu``, ``debian`` …), from the guest report (``image.guest``).
- ``require_guest``: fail when no guest report is available at this point.
- ``deny_findings``: finding codes, or code prefixes (``Guest.Fstab`` matches
  ``Guest.FstabDeviceMissing``; ``*`` matches any), counted only at or above ``min_severity``
  (``info`` by default). Findings come from the guest report, the inspection and the task.

A fact the rule needs but the point does not know yet (no format claimed before inspection, no
virtual size) denies: a policy that cannot be checked must not pass silently. The OS rules are the
exception: without a guest report they are skipped, unless ``require_guest`` is set.

A denial is an :class:`~appliance.errors.ImageRejected` with one error finding whose code is
``Policy.FormatDenied``, ``Policy.SizeExceeded``, ``Policy.OsDenied``, ``Policy.GuestRequired``
or ``Policy.FindingDenied`` and whose message names the rule and the value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..config import SIZE, parse_size
from ..errors import Finding, ImageRejected
from ..image.formats import from_qemu

FORMAT_DENIED = "Policy.FormatDenied"
SIZE_EXCEEDED = "Policy.SizeExceeded"
OS_DENIED = "Policy.OsDenied"
GUEST_REQUIRED = "Policy.GuestRequired"
FINDING_DENIED = "Policy.FindingDenied"

_SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}
_NAMES = {"type": "array", "items": {"type": "string", "minLength": 1}}

#: jsonschema of the rules (the ``with`` arguments of ``hook.policy`` besides ``image``)
RULES_SCHEMA: dict[str, Any] = {
    "allow_formats": _NAMES,
    "deny_formats": _NAMES,
    "max_virtual_size": SIZE,
    "allow_os": _NAMES,
    "deny_os": _NAMES,
    "require_guest": {"type": "boolean"},
    "deny_findings": _NAMES,
    "min_severity": {"enum": list(_SEVERITY_RANK)},
}


class PolicyDenied(ImageRejected):
    """The image breaks a policy rule; ``rule`` names it."""

    def __init__(self, code: str, rule: str, message: str) -> None:
        super().__init__([Finding.error(code, f"policy rule {rule}: {message}")])
        self.rule = rule


def _format(name: Any) -> str | None:
    return from_qemu(str(name).strip().lower()) if name else None


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.4g} GiB ({n} bytes)"


def _findings(image: Mapping[str, Any], extra: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Every finding known about the image, once each (guest report, inspection, task)."""
    sources: list[Any] = [
        (image.get("guest") or {}).get("findings"),
        (image.get("inspection") or {}).get("findings"),
        list(extra),
    ]
    seen: set[tuple[Any, Any]] = set()
    out = []
    for findings in sources:
        for f in findings or []:
            if not isinstance(f, Mapping):
                continue
            key = (f.get("code"), f.get("message"))
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def _matches(code: str, patterns: Iterable[str]) -> str | None:
    for p in patterns:
        if p == "*" or code == p or code.startswith(p):
            return p
    return None


def check_policy(
    image: Mapping[str, Any], rules: Mapping[str, Any], *, findings: Iterable[Mapping[str, Any]] = ()
) -> list[str]:
    """Raise :class:`PolicyDenied` at the first rule ``image`` breaks; returns the rules checked."""
    checked: list[str] = []
    fmt = _format(image.get("format"))
    for rule in ("allow_formats", "deny_formats"):
        if rule not in rules:
            continue
        names = [_format(n) for n in rules[rule]]
        if fmt is None:
            raise PolicyDenied(
                FORMAT_DENIED,
                rule,
                "the image's format is not known at this point (check formats after_inspect)",
            )
        if (rule == "allow_formats") != (fmt in names):
            verdict = (
                f"not one of {', '.join(n for n in names if n)}" if rule == "allow_formats" else "denied"
            )
            raise PolicyDenied(FORMAT_DENIED, rule, f"format {fmt!r} is {verdict}")
        checked.append(rule)

    if "max_virtual_size" in rules:
        limit = parse_size(rules["max_virtual_size"])
        size = image.get("virtual_size")
        if size is None:
            size = (image.get("inspection") or {}).get("virtual_size")
        if size is None:
            raise PolicyDenied(
                SIZE_EXCEEDED, "max_virtual_size", "the image's virtual size is not known at this point"
            )
        if size > limit:
            raise PolicyDenied(
                SIZE_EXCEEDED, "max_virtual_size", f"virtual size {_gib(size)} exceeds {_gib(limit)}"
            )
        checked.append("max_virtual_size")

    guest = image.get("guest")
    if rules.get("require_guest") and not guest:
        raise PolicyDenied(
            GUEST_REQUIRED,
            "require_guest",
            "no guest report is available (validate the guest before this hook)",
        )
    if guest and ("allow_os" in rules or "deny_os" in rules):
        os_ = guest.get("os") or {}
        os_names = {str(v).lower() for v in (os_.get("family"), os_.get("distribution")) if v}
        shown = os_.get("pretty_name") or "/".join(sorted(os_names)) or "an unrecognised OS"
        if "allow_os" in rules:
            allowed = {n.lower() for n in rules["allow_os"]}
            if not os_names & allowed:
                raise PolicyDenied(
                    OS_DENIED,
                    "allow_os",
                    f"the guest runs {shown}, not one of {', '.join(rules['allow_os'])}",
                )
            checked.append("allow_os")
        if "deny_os" in rules:
            denied = os_names & {n.lower() for n in rules["deny_os"]}
            if denied:
                raise PolicyDenied(
                    OS_DENIED, "deny_os", f"the guest runs {shown} ({', '.join(sorted(denied))})"
                )
            checked.append("deny_os")

    if "deny_findings" in rules:
        floor = _SEVERITY_RANK[rules.get("min_severity", "info")]
        for f in _findings(image, findings):
            if _SEVERITY_RANK.get(str(f.get("severity")), 0) < floor:
                continue
            pattern = _matches(str(f.get("code", "")), rules["deny_findings"])
            if pattern is not None:
                raise PolicyDenied(
                    FINDING_DENIED,
                    "deny_findings",
                    f"finding {f.get('code')} ({f.get('severity')}) matches {pattern!r}: {f.get('message')}",
                )
        checked.append("deny_findings")
    return checked
