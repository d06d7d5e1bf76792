"""EC2 error responses and the one table that maps appliance error codes to EC2 error codes.

Body format (what botocore's ``EC2QueryParser`` reads; note ``RequestID``, not ``requestId``)::

    <?xml version="1.0" encoding="UTF-8"?>
    <Response><Errors><Error><Code>…</Code><Message>…</Message></Error></Errors><RequestID>…</RequestID></Response>
"""

from __future__ import annotations

from appliance.errors import ImagingError
from appliance.redact import redact_text

from .xml import escape_text


class Ec2Error(Exception):
    """An error the API returns to the client as an EC2 ``<Response><Errors>`` document."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return f"{self.code} ({self.status}): {self.message}"


#: how much of a client's value an error message quotes
SHOWN_CHARS = 64


def shown(value: str) -> str:
    """``value`` as an error message quotes it: at most :data:`SHOWN_CHARS` characters (a value
    may be as long as the request)."""
    return value if len(value) <= SHOWN_CHARS else value[:SHOWN_CHARS] + "…"


# Shorthands for the client errors raised all over the protocol layer.
def missing_parameter(name: str) -> Ec2Error:
    return Ec2Error("MissingParameter", f"The request must contain the parameter {name}")


def invalid_value(message: str) -> Ec2Error:
    return Ec2Error("InvalidParameterValue", message)


def dry_run_operation() -> Ec2Error:
    return Ec2Error("DryRunOperation", "Request would have succeeded, but DryRun flag is set.", 412)


INTERNAL_ERROR_MESSAGE = "An internal error has occurred"

#: Appliance error code → (EC2 error code, HTTP status). ``None`` keeps the appliance's message;
#: any code not listed becomes ``InternalError`` (500) and the real message is only logged.
#: Unknown task ids map to ``InvalidConversionTaskId`` for import-image/snapshot tasks as well:
#: AWS does the same, and the SDK waiters treat that code as "retry" rather than "fail".
ERROR_TABLE: dict[str, tuple[str, int]] = {
    "TaskNotFound": ("InvalidConversionTaskId", 400),
    "InvalidTaskId.Malformed": ("InvalidConversionTaskId.Malformed", 400),
    "IncorrectState": ("IncorrectState", 400),
    "ResourceLimitExceeded": ("ResourceLimitExceeded", 400),
    "InvalidParameterValue": ("InvalidParameterValue", 400),
    "InvalidParameterCombination": ("InvalidParameterCombination", 400),
    "InvalidParameterDependency": ("InvalidParameterDependency", 400),
    # EC2's InvalidParameter: "not valid, is unsupported, or cannot be used" (here: the image target
    # cannot encrypt)
    "EncryptionNotSupported": ("InvalidParameter", 400),
    "MissingParameter": ("MissingParameter", 400),
    "IdempotentParameterMismatch": ("IdempotentParameterMismatch", 400),
    "UrlNotAllowed": ("InvalidParameterValue", 400),
    # the URL's host name does not resolve (appliance.sources.urlfilter.HostUnresolvable)
    "Source.Unreachable": ("InvalidParameterValue", 400),
    # what an export names does not exist (appliance.service.resolver), in EC2's codes
    "InvalidAMIID.NotFound": ("InvalidAMIID.NotFound", 400),
    "InvalidAMIID.Malformed": ("InvalidAMIID.Malformed", 400),
    "InvalidInstanceID.NotFound": ("InvalidInstanceID.NotFound", 400),
    "InvalidInstanceID.Malformed": ("InvalidInstanceID.Malformed", 400),
    "InvalidSnapshot.NotFound": ("InvalidSnapshot.NotFound", 400),
    "InvalidSnapshot.Malformed": ("InvalidSnapshot.Malformed", 400),
    "InvalidVolume.NotFound": ("InvalidVolume.NotFound", 400),
    "InvalidVolume.Malformed": ("InvalidVolume.Malformed", 400),
    "NotExportable": ("NotExportable", 400),
    # CreateInstanceExportTask of an instance with several volumes and no OVA container, as AWS refuses it
    "UnsupportedOperation": ("UnsupportedOperation", 400),
    # an import method the operator disabled (sources.methods): the message names the method
    "ImportMethodDisabled": ("UnsupportedOperation", 400),
    # an upload://ID the caller's account does not have (or not yet complete)
    "Upload.NotFound": ("InvalidParameterValue", 400),
    "Upload.Incomplete": ("InvalidParameterValue", 400),
    "Upload.InvalidId": ("InvalidParameterValue", 400),
    # BundleInstance's upload policy, checked before anything is queued (appliance.targets.upload_policy)
    "UploadPolicyInvalid.Signature": ("UploadPolicyInvalid.Signature", 400),
    "UploadPolicyInvalid.Expired": ("UploadPolicyInvalid.Expired", 400),
    "UploadPolicyInvalid.Bucket": ("UploadPolicyInvalid.Bucket", 400),
    "UploadPolicyInvalid.Key": ("UploadPolicyInvalid.Key", 400),
    "UploadPolicyInvalid.Acl": ("UploadPolicyInvalid.Acl", 400),
    "UploadPolicyInvalid.Malformed": ("UploadPolicyInvalid.Malformed", 400),
    # CreateImage: the cloud refused a step, or the instance is instance-store (appliance.targets.ec2_images)
    "CreateImageFailed": ("CreateImageFailed", 400),
    # the state database is busy or unwritable: the client should retry later
    "StateStoreError": ("Unavailable", 503),
    # the task database cannot be reached (an outage): nothing was done, the client retries later
    "StateStoreUnavailable": ("ServiceUnavailable", 503),
}

#: what a client is told when the task database cannot be reached (where it is stays in the log)
STORE_UNAVAILABLE_MESSAGE = (
    "The service cannot reach its task database right now; nothing was changed. Retry the request later."
)


def from_imaging_error(exc: ImagingError) -> Ec2Error:
    """The EC2 error for a coded appliance error (``InternalError`` for anything unexpected)."""
    mapped = ERROR_TABLE.get(exc.code)
    if mapped is None:
        return Ec2Error("InternalError", INTERNAL_ERROR_MESSAGE, 500)
    code, status = mapped
    message = exc.message
    if exc.code == "UrlNotAllowed":
        message = f"The URL is not allowed: {message}"
    elif exc.code == "Source.Unreachable":
        message = f"The URL cannot be reached: {message}"
    elif exc.code == "StateStoreUnavailable":
        message = STORE_UNAVAILABLE_MESSAGE
    return Ec2Error(code, message, status)


def render_error(error: Ec2Error, request_id: str) -> bytes:
    """The XML body for ``error``."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{escape_text(error.code)}</Code>"
        f"<Message>{escape_text(redact_text(error.message))}</Message></Error></Errors>"
        f"<RequestID>{escape_text(request_id)}</RequestID></Response>"
    ).encode()
