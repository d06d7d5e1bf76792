"""Coded errors and findings shared by every part of the toolkit.

Every failure a user can see carries a stable ``code`` (dotted, CamelCase, e.g.
``UnsafeImage.BackingFile``) and a message that says what to do. Codes are part of the public
contract: the CLI prints them, the API maps them to EC2 status messages, tests assert on them.
An error's message is redacted (:mod:`appliance.redact`): it reaches users, logs, task records and
the controller, so a URL or a secret formatted into it never shows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum

from .redact import redact_text


class Severity(StrEnum):
    """How much a finding matters: ``error`` findings make an image unsafe."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class Finding:
    """One coded observation about an image, a guest or a task."""

    code: str
    severity: Severity
    message: str

    def to_dict(self) -> dict[str, str]:
        """Plain-JSON form (``{code, severity, message}``)."""
        d = asdict(self)
        d["severity"] = str(self.severity)
        return d

    @classmethod
    def error(cls, code: str, message: str) -> Finding:
        return cls(code, Severity.ERROR, message)

    @classmethod
    def warning(cls, code: str, message: str) -> Finding:
        return cls(code, Severity.WARNING, message)

    @classmethod
    def info(cls, code: str, message: str) -> Finding:
        return cls(code, Severity.INFO, message)


class ImagingError(Exception):
    """Base of every coded error the toolkit raises on purpose.

    Anything else escaping the toolkit is a bug and is reported as ``InternalError``.
    """

    code: str = "InternalError"
    #: process exit status the CLI uses for this error
    exit_status: int = 1

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        """The message, redacted (presigned URLs, user info and secrets replaced)."""
        return redact_text(str(self.args[0])) if self.args else self.code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ImageRejected(ImagingError):
    """An image failed inspection; ``findings`` holds every reason (errors first)."""

    exit_status = 2

    def __init__(self, findings: list[Finding]) -> None:
        errors = [f for f in findings if f.severity is Severity.ERROR] or findings
        first = errors[0] if errors else Finding.error("UnsafeImage", "image rejected")
        super().__init__(first.message, first.code)
        self.findings = findings

    @classmethod
    def nothing_imported(cls, code: str, message: str) -> ImageRejected:
        """Refused for one reason, before anything was imported (the message says so)."""
        return cls([Finding.error(code, f"{message}; nothing was imported")])


class UsageError(ImagingError):
    """The caller asked for something malformed (bad argument, unknown format name)."""

    code = "InvalidParameterValue"


class ConfigError(ImagingError):
    """The configuration file is missing, unreadable or does not match the schema."""

    code = "InvalidConfiguration"


class InsufficientScratch(ImagingError):
    """A scratch reservation would exceed the configured quota or the free disk space."""

    code = "InsufficientScratch"


class Cancelled(ImagingError):
    """The work was cancelled (Ctrl-C or a cancel request from elsewhere)."""

    code = "Cancelled"
    exit_status = 130


class SourceChanged(ImagingError):
    """The source object was replaced while it was being read (its ETag, size or bytes differ from
    what was read before, or from a saved read position): bytes already handed over cannot be taken
    back, so the read fails instead of mixing two versions."""

    code = "Source.Changed"


class SourceStalled(ImagingError):
    """A byte range of the source sent nothing for ``sources.stall_seconds``, on every attempt; the
    message names the (redacted) source and the offset where it stopped."""

    code = "Source.Stalled"


class ConversionFailed(ImagingError):
    """qemu-img failed, or its output did not re-inspect as the requested format."""

    code = "ConversionFailed"


class TaskNotFound(ImagingError):
    code = "TaskNotFound"


class InvalidTaskId(ImagingError):
    """A task id that is not of the form its kind uses (e.g. ``import-vol-`` + 8 characters)."""

    code = "InvalidTaskId.Malformed"


class ResourceLimitExceeded(ImagingError):
    """Accepting the work would exceed a configured limit (e.g. concurrently active tasks)."""

    code = "ResourceLimitExceeded"


class IdempotentParameterMismatch(ImagingError):
    """A client token already names a task that a different request created."""

    code = "IdempotentParameterMismatch"


class IncorrectState(ImagingError):
    """The task is in a state that does not allow the requested transition."""

    code = "IncorrectState"


class StoreError(ImagingError):
    """The task database cannot be used (written by a newer version, corrupt, unwritable)."""

    code = "StateStoreError"


class StoreUnavailable(StoreError):
    """The task database cannot be reached right now (PostgreSQL stopped or restarting, the network
    to it down, a SQLite file locked for longer than the busy timeout). Nothing was written;
    the same call succeeds once it is back."""

    code = "StateStoreUnavailable"


class DuplicateKey(StoreError):
    """A row with this key already exists (a unique constraint refused an insert)."""


class LeaseLost(StoreError):
    """A write of a task run was refused: the run's lease (owner, fencing epoch) is no longer the
    task's, because another worker claimed the task after the lease expired (failover). Nothing was
    written; the run must stop at once and touch neither the task nor its target again."""

    code = "TaskLeaseLost"


class WorkflowInvalid(ImagingError):
    """A workflow file fails validation; the message names file, step and field."""

    code = "WorkflowInvalid"


class StepFailed(ImagingError):
    """A workflow step failed; ``code`` is the step's own code when it raised a coded error."""

    code = "StepFailed"


class StepTimeout(ImagingError):
    code = "StepTimeout"


#: code prefixes that mean "the image was rejected" (by inspection, guest validation or an operator
#: policy: CLI exit status 2) rather than "the work failed"
REJECTION_CODES = (
    "FormatMismatch",
    "UnsafeImage",
    "CorruptImage",
    "SizeLimitExceeded",
    "Guest",
    "Policy",
    "Ova",
)


def is_rejection(code: str | None) -> bool:
    """Whether ``code`` says the input image was rejected by inspection."""
    return code is not None and any(code == p or code.startswith(p + ".") for p in REJECTION_CODES)


class BundleInvalid(ImagingError):
    """An EC2 image bundle (``ec2-bundle-image``: manifest + encrypted parts) cannot be unbundled safely:
    ``BundleInvalid.Manifest`` (malformed or hostile manifest), ``.Signature`` (does not verify against
    the user certificate), ``.Key`` (the cloud key does not decrypt the AES key/IV), ``.PartDigest``,
    ``.PartOutsideBucket``, ``.Decrypt`` (AES/gzip stream broken), ``.Tar`` (not exactly one safe regular
    member), ``.Digest`` (image SHA-1 differs), ``.Size``. Nothing is written when it is raised."""

    code = "BundleInvalid"

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message, f"BundleInvalid.{kind}")
