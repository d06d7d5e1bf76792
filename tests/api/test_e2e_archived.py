"""ImportImage of a disk image inside an archive, as clients see it: `imaging serve` (gunicorn) and
`imaging worker` as real processes, S3 on a moto server process, boto3 as the client. A bootable disk
packed as GCE ships images (``tar --format=oldgnu -Sczf``), in a plain tar or in a zip fails with
``FormatMismatch.Archive`` as the task's status message, naming the disk inside, and leaves nothing in
scratch or in the image target, whether the request gives no ``Format`` (the inspection of the download)
or ``Format=RAW`` (the preflight of the object's head)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests import guestfactory
from tests.api.e2e_support import Appliance, failed_leaving_nothing, import_object
from tests.servers import MotoServer

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("command", "fmt", "advice"),
    [
        (["tar", "--format=oldgnu", "-Sczf"], None, "gzip-compressed tar archive"),
        (["tar", "-cf"], "RAW", "(tar -xf)"),
        (["zip", "-q", "-j"], "RAW", "(unzip)"),
    ],
    ids=["gce-tar-gz", "tar-raw", "zip-raw"],
)
def test_a_disk_in_an_archive_fails_as_an_archive_and_leaves_nothing(
    command: list[str],
    fmt: str | None,
    advice: str,
    appliance: Appliance,
    moto: MotoServer,
    bucket: str,
    tmp_path: Path,
) -> None:
    (tmp_path / "disk").mkdir()
    disk = guestfactory.linux_disk(tmp_path / "disk", "disk.raw")
    packed = tmp_path / "disk.pack"  # (a suffix of its own: zip adds .zip to a name without one)
    where = [str(disk)] if command[0] == "zip" else ["-C", str(disk.parent), disk.name]
    subprocess.run([*command, str(packed), *where], check=True)
    task_id = import_object(appliance, moto, bucket, packed, "images/disk.packed", fmt)
    final = failed_leaving_nothing(appliance, task_id, "FormatMismatch.Archive")
    assert "first member is 'disk.raw'" in final["StatusMessage"] and advice in final["StatusMessage"], final
