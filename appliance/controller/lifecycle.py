"""The appliance lifecycle the controller runs (Matahari/Deltacloud style): the rules, no SQL, no HTTP.

* :meth:`Registry.pre_register` — an admin registers an appliance id, its configuration (the
  ``imaging:`` section of user data, validated as ``imaging configure`` will validate it) and a
  secret shared with that appliance, before it is launched. ``dynamic`` registrations form the pool
  that appliances booting without an identity are assigned from.
* :meth:`Registry.serve_config` — ``GET /v1/appliances/<id>/config``, signed both ways exactly as
  :mod:`appliance.boot.rendezvous` checks it.
* :meth:`Registry.record_status` and :meth:`Registry.record_report` — ``update``: what the appliance
  reports at configure time (``POST …/<id>/status``: status, addresses, parameter map) and with
  every pushed report (``POST /v1/reports``: each heartbeat carries health, addresses and the
  running tasks), each signed with the appliance's secret. A change is recorded as an ``updated``
  event.
* :meth:`Registry.publish` — live configuration updates: an admin publishes a new configuration
  version (validated as at registration). The appliance learns of it by polling its config with
  the version it runs (``GET …/config?have=<version>``: a signed ``304`` while nothing is newer) and
  from the ``config_version`` of the reply to each pushed report; it reports the version it applied
  (``config_version`` in its status post, ``applied_version`` in the admin view) or the fields
  that made it refuse the update (status ``config-refused``).
* :meth:`Registry.remove` and :meth:`Registry.remove_stale` — an appliance silent for longer than
  the timeout is removed, with a ``removed-stale`` event naming the tasks it was running.
* :meth:`Registry.assign` — dynamic assignment. An appliance booted with only the rendezvous
  address (``imaging:v1::<controller-url>:<enrolment-secret>``) signs ``POST /v1/assignments``
  with the fleet's **enrolment secret** (given to the controller with ``--enrol-secret-file`` and
  baked into the image or the user data), naming a stable instance id (its machine id). It gets
  the first unassigned dynamic registration — its appliance id and per-appliance secret, in a
  response signed with the enrolment secret — and from then on is that appliance. Each
  registration is handed out once (:meth:`.store.ControllerStore.assign`); the same instance
  asking again (a lost answer, a reboot) gets the same one.

Secrets never leave through the admin views (:func:`appliance_view`), events or errors; the only
answers carrying one are those to the appliance that proved it holds the key: its configuration,
and the per-appliance secret in an assignment. Serve the controller over HTTPS for those.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..boot import rendezvous, userdata
from ..boot.userdata import FieldError, UserDataInvalid
from ..errors import ConfigError, ImagingError, UsageError
from ..redact import redact
from ..report import messages
from ..report.receiver import ReportRejected, ReportVerifier
from ..schemas import load
from ..timestamps import format_time, utc_now
from .store import ApplianceNotFound, ApplianceRow, ControllerStore, EventRow, Update

APPLIANCE_ID_RE = re.compile(load("userdata")["properties"]["appliance_id"]["pattern"])
SECRET_MIN = load("userdata")["properties"]["controller"]["properties"]["secret"]["minLength"]
#: an instance names itself by its machine id, a cloud instance id, a host name
INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
#: stand-in for the controller URL while validating (the appliance fills in the one it was given)
_PLACEHOLDER_URL = "https://controller.invalid"
MAX_ADDRESSES = 64
STATUS_RE = re.compile(r"^[a-z][a-z-]{0,31}$")


class ConfigurationInvalid(ConfigError):
    """A configuration an appliance would refuse; ``errors`` names each field."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


class AuthFailure(ImagingError):
    """A request of the appliance protocol without a valid signature (or from an unknown appliance:
    the same answer, so that the answer does not tell which ids exist)."""

    code = "AuthFailure"


class EnrolmentDisabled(ImagingError):
    """Dynamic assignment asked for, but the controller has no enrolment secret."""

    code = "EnrolmentDisabled"


class NoUnassignedConfiguration(ImagingError):
    code = "NoUnassignedConfiguration"


class ReportRefused(ImagingError):
    """A pushed report refused as replayed, stale or malformed; ``status`` is the HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, code)
        self.status = status


def _check_id(appliance_id: str) -> None:
    if not isinstance(appliance_id, str) or not APPLIANCE_ID_RE.fullmatch(appliance_id):
        raise UsageError(
            f"appliance id {str(appliance_id)[:64]!r} is not valid: 1-128 letters, digits, '.', '_', '-', "
            "starting with a letter or digit"
        )


def validate_config(appliance_id: str, config: Any, secret: str) -> dict[str, Any]:
    """The ``imaging:`` section to store for ``appliance_id``, or :class:`ConfigurationInvalid`.

    ``config`` is the section (or a document holding ``imaging:``). It is checked as the appliance
    will check it after the rendezvous: its ``controller`` URL and secret filled in from the boot
    line, then the user-data schema, the service configuration, targets and hooks. The id is the
    registered one (``appliance_id`` may be left out); ``controller.secret`` must be left out or be
    the registered secret, since the appliance signs its reports with it.
    """
    if isinstance(config, dict) and set(config) == {"imaging"}:
        config = config["imaging"]
    if not isinstance(config, dict):
        raise ConfigurationInvalid([FieldError("imaging", "the configuration must be a mapping")])
    errors: list[FieldError] = []
    if "appliance_id" in config and config["appliance_id"] != appliance_id:
        errors.append(FieldError("imaging.appliance_id", f"must be left out or equal {appliance_id!r}"))
    ctl = config.get("controller", {})
    if isinstance(ctl, dict) and "secret" in ctl and ctl["secret"] != secret:
        errors.append(
            FieldError("imaging.controller.secret", "must be left out: the registered secret applies")
        )
    if errors:
        raise ConfigurationInvalid(errors)
    section = {k: v for k, v in config.items() if k != "appliance_id"}
    probe = dict(section, appliance_id=appliance_id)
    if isinstance(ctl, dict):
        probe["controller"] = {"url": _PLACEHOLDER_URL, "secret": secret, **ctl}
    try:
        # what `imaging configure` runs; it writes nothing (the directory only names TLS files)
        userdata.render(probe, Path("/etc/imaging"))
    except UserDataInvalid as exc:
        raise ConfigurationInvalid(exc.errors) from exc
    return section


def appliance_view(row: ApplianceRow) -> dict[str, Any]:
    """The admin view of an appliance (no secret)."""
    view = asdict(row)
    view.pop("seq")
    view.pop("last_seq")
    view["links"] = [{"rel": "self", "href": f"/v1/appliances/{row.id}"}]
    return redact(view)


def event_view(event: EventRow) -> dict[str, Any]:
    return redact(asdict(event))


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} is not JSON") from exc
    if not isinstance(doc, dict):
        raise UsageError(f"{what} is not a JSON object")
    return doc


def _strings(value: Any, what: str, limit: int = MAX_ADDRESSES) -> list[str]:
    if not isinstance(value, list) or len(value) > limit or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{what} must be a list of at most {limit} strings")
    return [v[:128] for v in value]


def _tasks(value: Any) -> list[dict[str, Any]]:
    """The id, kind and state of each running task a heartbeat lists."""
    out = []
    for task in value if isinstance(value, list) else []:
        if isinstance(task, dict) and isinstance(task.get("id"), str):
            out.append({k: task.get(k) for k in ("id", "kind", "state") if isinstance(task.get(k), str)})
    return out[:1000]


class Registry:
    """The lifecycle over a :class:`~.store.ControllerStore`."""

    def __init__(
        self, store: ControllerStore, *, enrol_secret: str | None = None, max_skew: int = rendezvous.MAX_SKEW
    ) -> None:
        self.store = store
        self.enrol_secret = enrol_secret
        self.max_skew = max_skew

    # -- admin ------------------------------------------------------------------------------

    def pre_register(
        self, appliance_id: str, config: Any, secret: str, *, dynamic: bool = False
    ) -> ApplianceRow:
        _check_id(appliance_id)
        if (
            not isinstance(secret, str)
            or len(secret) < SECRET_MIN
            or ":" in secret
            or secret != secret.strip()
        ):
            # ':' ends the secret in the compact boot line
            raise UsageError(
                f"the secret must be at least {SECRET_MIN} characters, without ':' or surrounding blanks"
            )
        section = validate_config(appliance_id, config, secret)
        return self.store.register(
            appliance_id, secret, section, dynamic=dynamic, event={"dynamic": dynamic, "config_version": 1}
        )

    def publish(self, appliance_id: str, config: Any) -> int:
        """Validate ``config`` as :meth:`pre_register` does and make it the appliance's next
        configuration version; that version."""
        _check_id(appliance_id)
        creds = self.store.credentials(appliance_id)
        if creds is None:
            raise ApplianceNotFound(f"no appliance {appliance_id!r} is registered")
        section = validate_config(appliance_id, config, creds.secret)
        return self.store.publish(appliance_id, section)

    def get(self, appliance_id: str) -> ApplianceRow:
        _check_id(appliance_id)
        return self.store.get(appliance_id)

    def appliances(self) -> list[ApplianceRow]:
        return self.store.appliances()

    def remove(self, appliance_id: str) -> None:
        _check_id(appliance_id)
        self.store.remove(appliance_id, {"reason": "removed by an admin"})

    def remove_stale(self, timeout: float) -> list[EventRow]:
        """Remove the appliances silent for longer than ``timeout`` seconds; their events."""
        if not timeout > 0:
            raise UsageError("the stale timeout must be a positive number of seconds")
        silent_since = format_time(utc_now() - timedelta(seconds=timeout))
        return self.store.remove_stale(silent_since, timeout)

    def events(self, after: int = 0, limit: int = 100, appliance_id: str | None = None) -> list[EventRow]:
        return self.store.events(after, limit, appliance_id)

    # -- the appliance protocol -------------------------------------------------------------

    def _verify(
        self, appliance_id: str, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> str:
        """The appliance's secret if the request is signed with it; :class:`AuthFailure` otherwise."""
        creds = self.store.credentials(appliance_id) if APPLIANCE_ID_RE.fullmatch(appliance_id) else None
        if creds is None:
            raise AuthFailure("the request is not signed by a registered appliance")
        try:
            rendezvous.verify(creds.secret, method, path, headers, body, max_skew=self.max_skew)
        except rendezvous.RendezvousError as exc:
            raise AuthFailure(exc.message) from exc
        return creds.secret

    def serve_config(
        self, appliance_id: str, path: str, headers: Mapping[str, str], have: int | None = None
    ) -> tuple[bytes | None, dict[str, str]]:
        """``GET <path>`` (``…/v1/appliances/<id>/config``): the body and signature headers of the
        answer; no body (``304``: the headers sign an empty body) when ``have`` is the current version."""
        secret = self._verify(appliance_id, "GET", path, headers, b"")
        if have is not None and have == self.store.current_version(appliance_id):
            self.store.seen(appliance_id)
            return None, rendezvous.signed_headers(appliance_id, secret, "RESPONSE", path, b"")
        version, section = self.store.config(appliance_id)
        body = json.dumps(
            {"version": version, "imaging": dict(section, appliance_id=appliance_id)}, sort_keys=True
        ).encode()
        self.store.config_fetched(appliance_id, version)
        return body, rendezvous.signed_headers(appliance_id, secret, "RESPONSE", path, body)

    def record_status(self, appliance_id: str, path: str, headers: Mapping[str, str], body: bytes) -> None:
        """``POST <path>`` (``…/v1/appliances/<id>/status``): what the appliance says about itself."""
        self._verify(appliance_id, "POST", path, headers, body)
        message = _json_object(body, "the status report")
        if message.get("appliance_id", appliance_id) != appliance_id:
            raise UsageError("the status report names another appliance")
        status = message.get("status")
        if not isinstance(status, str) or not STATUS_RE.fullmatch(status):
            raise UsageError("status must be a short lower-case word, e.g. 'configured'")
        parameters = message.get("parameters")
        errors = message.get("errors", [])
        if not isinstance(errors, list):
            raise UsageError("errors must be a list")
        applied = message.get("config_version")
        if applied is not None and (isinstance(applied, bool) or not isinstance(applied, int) or applied < 1):
            raise UsageError("config_version must be a configuration version (an integer from 1)")
        update = Update(
            status=status,
            applied_version=applied if status == "configured" else None,
            addresses=_strings(message.get("addresses", []), "addresses"),
            parameters=redact(parameters) if isinstance(parameters, dict) else None,
            errors=[
                {"field": str(e.get("field"))[:200], "message": str(e.get("message"))[:1000]}
                for e in errors[:100]
                if isinstance(e, dict)
            ],
        )
        self.store.update(appliance_id, update)
        if status == "config-refused" and applied is not None:
            self.store.event(appliance_id, "config-refused", {"version": applied, "errors": update.errors})

    def record_report(self, body: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
        """``POST /v1/reports``: a pushed message (:mod:`appliance.report.messages`); the reply."""
        claimed = headers.get(messages.APPLIANCE_HEADER) or ""
        creds = self.store.credentials(claimed) if APPLIANCE_ID_RE.fullmatch(claimed) else None
        if creds is None:
            raise AuthFailure("the report is not signed by a registered appliance")
        verifier = ReportVerifier(
            {claimed: creds.secret}, window=self.max_skew, last_seq={claimed: creds.last_seq}
        )
        try:
            message = verifier.verify(body, headers.get(messages.SIGNATURE_HEADER))
        except ReportRejected as exc:
            if exc.status == 401:
                raise AuthFailure(str(exc)) from exc
            code = {"replayed": "ReportReplayed", "stale": "ReportStale"}.get(exc.error, "MalformedReport")
            raise ReportRefused(exc.status, code, str(exc)) from exc
        if message.get("appliance_id") != claimed:
            raise AuthFailure("the report names another appliance than its header")
        update = Update()
        if message["type"] == "heartbeat":
            health = message.get("health")
            addresses = message.get("addresses")
            update = Update(
                health=health if isinstance(health, str) and STATUS_RE.fullmatch(health) else None,
                addresses=_strings(addresses, "addresses") if addresses is not None else None,
                tasks=_tasks(message.get("tasks")),
            )
        accepted, _ = self.store.update(claimed, update, seq=message["seq"])
        if not accepted:
            raise ReportRefused(409, "ReportReplayed", f"seq {message['seq']} was already accepted")
        version = self.store.current_version(claimed)
        return {"ok": True, "seq": message["seq"], "cancel": [], "config_version": version}

    def assign(self, path: str, headers: Mapping[str, str], body: bytes) -> tuple[bytes, dict[str, str]]:
        """``POST <path>`` (``…/v1/assignments``) signed with the enrolment secret: the body and
        signature headers of the answer naming the appliance this instance is."""
        if not self.enrol_secret:
            raise EnrolmentDisabled("this controller assigns no configurations (it has no enrolment secret)")
        try:
            rendezvous.verify(self.enrol_secret, "POST", path, headers, body, max_skew=self.max_skew)
        except rendezvous.RendezvousError as exc:
            raise AuthFailure(exc.message) from exc
        request = _json_object(body, "the assignment request")
        instance = request.get("instance_id")
        if not isinstance(instance, str) or not INSTANCE_ID_RE.fullmatch(instance):
            raise UsageError("instance_id must be 1-128 letters, digits, '.', '_', ':', '-'")
        if headers.get(rendezvous.HEADER_APPLIANCE) != instance:
            raise AuthFailure(f"the {rendezvous.HEADER_APPLIANCE} header must name the instance")
        got = self.store.assign(instance)
        if got is None:
            raise NoUnassignedConfiguration("every configuration registered for dynamic assignment is taken")
        creds, _new = got
        answer = json.dumps(
            {"ver": rendezvous.PROTOCOL_VERSION, "appliance_id": creds.appliance_id, "secret": creds.secret},
            sort_keys=True,
        ).encode()
        return answer, rendezvous.signed_headers(instance, self.enrol_secret, "RESPONSE", path, answer)
