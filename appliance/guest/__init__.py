"""Static guest validation: what is on a disk image and whether it will boot, as coded findings.

Public API: :func:`validate_image`, :func:`check_request`, :class:`GuestReport`, :data:`CODES`. The
library that reads guest filesystems is confined to :mod:`appliance.guest.reader`.
"""

from .codes import CODES, Code
from .report import GuestReport
from .validate import check_request, normalize_architecture, validate_image

__all__ = ["CODES", "Code", "GuestReport", "check_request", "normalize_architecture", "validate_image"]
