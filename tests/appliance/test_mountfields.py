"""The decoding of the octal escapes of fstab and mountinfo fields."""

from __future__ import annotations

import pytest

from appliance.mountfields import unescape_mount_field


@pytest.mark.parametrize(
    ("field", "decoded"),
    [
        ("/mnt/my\\040disk", "/mnt/my disk"),
        ("a\\011b", "a\tb"),
        ("a\\012b", "a\nb"),
        ("back\\134slash", "back\\slash"),
        ("\\134040", "\\040"),  # a decoded backslash does not start another escape
        ("\\\\040", "\\ "),  # a backslash before an escape is kept, the escape decoded
        ("bad\\08x\\9\\04", "bad\\08x\\9\\04"),  # not three octal digits: kept as is
        ("plain", "plain"),
    ],
)
def test_a_mount_field_has_its_octal_escapes_decoded_and_others_kept(field: str, decoded: str) -> None:
    assert unescape_mount_field(field) == decoded
