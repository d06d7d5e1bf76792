"""A bare filesystem (a partition image: no partition table) imported in every container through the real
API path: boto3 → `imaging serve` (gunicorn) → `imaging worker` → S3 on moto. ImportImage and
ImportSnapshot of a bare ext4 and a bare NTFS as qcow2, VHD (dynamic and fixed), VMDK (streamOptimized)
and VHDX must each report the guest exactly as the same bytes read as raw, and store those bytes. qcow2 is
not an EC2 format and ImportSnapshot does not take VHDX (as in AWS), so those go without a Format and are
detected from their content. ImportVolume (VHD, VMDK, RAW) validates the RAW volume it wrote: the same
guest as the filesystem's bytes at the start of a volume-sized raw disk.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from appliance.guest import validate_image
from appliance.targets.chunkdigest import digest_file
from tests import guestfactory as gf
from tests.api.e2e_support import Appliance, admin_task, conversion_task, wait_for
from tests.euca_upload import presign_manifest_url, upload
from tests.servers import MotoServer

pytestmark = pytest.mark.slow

#: container → (qemu-img output format, options, EC2 Format of the request or None to let it be detected)
CONTAINERS = {
    "qcow2": ("qcow2", None, None),
    "vhd-dynamic": ("vpc", "subformat=dynamic,force_size=on", "VHD"),
    "vhd-fixed": ("vpc", "subformat=fixed,force_size=on", "VHD"),
    "vmdk-stream": ("vmdk", "subformat=streamOptimized", "VMDK"),
    "vhdx": ("vhdx", None, "VHDX"),
}
#: the Formats ImportSnapshot takes (DiskContainer.Format: VHD, VMDK, RAW)
SNAPSHOT_FORMATS = ("VHD", "VMDK", "RAW")
FILESYSTEMS = ("ext4", "ntfs")


@pytest.fixture(scope="module")
def bare_images(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """(filesystem, container) → image of a bare filesystem holding a Linux root; container ``raw`` is the
    filesystem itself."""
    d = tmp_path_factory.mktemp("bare-containers")
    tree = gf.portable_root(d / "root")
    images: dict[tuple[str, str], Path] = {}
    for kind in FILESYSTEMS:
        raw = images[kind, "raw"] = gf.filesystem(kind, d / f"{kind}.raw", tree)
        for name, (qemu_format, options, _) in CONTAINERS.items():
            images[kind, name] = gf.convert(raw, d / f"{kind}.{name}", qemu_format, options)
    return images


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _container(moto: MotoServer, bucket: str, image: Path, fmt: str | None) -> dict[str, Any]:
    moto.client("s3").upload_file(str(image), bucket, f"disks/{image.name}")
    container: dict[str, Any] = {"UserBucket": {"S3Bucket": bucket, "S3Key": f"disks/{image.name}"}}
    if fmt is not None:
        container["Format"] = fmt
    return container


def _task_state(appliance: Appliance, task_id: str) -> str:
    return admin_task(appliance, task_id)["task"]["state"]


@pytest.mark.parametrize("action", ["ImportImage", "ImportSnapshot"])
@pytest.mark.parametrize("kind", FILESYSTEMS)
def test_bare_filesystem_in_every_container_imports_with_the_raw_guest_report(
    kind: str,
    action: str,
    appliance: Appliance,
    moto: MotoServer,
    bucket: str,
    bare_images: dict[tuple[str, str], Path],
) -> None:
    raw = bare_images[kind, "raw"]
    system = action == "ImportImage"
    expected = validate_image(raw, "raw", bootable=system).to_dict()
    # control: the raw bytes are a partition image with the guest on it, so equality below means something
    assert (expected["layout"], expected["partition_table"]) == ("partition", None)
    assert [p["filesystem"] for p in expected["partitions"]] == [kind]
    assert expected["os"]["distribution"] == "debian" and expected["ok"] is True

    tasks: dict[str, str] = {}
    for name, (_, _, fmt) in CONTAINERS.items():  # five at once: tasks.max_active is 5
        if not system and fmt not in SNAPSHOT_FORMATS:
            fmt = None
        container = _container(moto, bucket, bare_images[kind, name], fmt)
        if system:
            answer = appliance.ec2.import_image(Description=f"{kind} {name}", DiskContainers=[container])
        else:
            answer = appliance.ec2.import_snapshot(Description=f"{kind} {name}", DiskContainer=container)
        tasks[name] = answer["ImportTaskId"]

    for name, task_id in tasks.items():
        wait_for(
            lambda task_id=task_id: _task_state(appliance, task_id) in ("completed", "failed", "cancelled"),
            timeout=180,
            what=f"the {action} of {kind} in {name}",
        )
    for name, task_id in tasks.items():
        detail = admin_task(appliance, task_id)
        assert detail["task"]["state"] == "completed", (name, detail["task"], detail["findings"])
        assert detail["guest"] == expected, name
        assert "Guest.NoFilesystem" not in {f["code"] for f in detail["findings"]}, name
        disk = detail["task"]["result"]["disk"]
        disk = disk.get("streamed") or disk  # a sequential format streamed into the image target
        assert disk["source_image"]["format"] == name.split("-")[0], name
        stored = disk["stored"]
        if stored["sha256"] is None:  # streamed: its sha256-chunked, taken while it was written
            assert stored["digest"]["value"] == digest_file(raw).hexdigest, name
        else:  # the very bytes of the filesystem
            assert stored["sha256"] == _sha256(raw), name
        if system:
            assert detail["boot"]["layout"] == "partition", name


@pytest.mark.parametrize("kind", FILESYSTEMS)
def test_bare_filesystem_imported_as_a_volume_is_read_from_the_written_raw_volume(
    kind: str,
    appliance: Appliance,
    moto: MotoServer,
    bucket: str,
    bare_images: dict[tuple[str, str], Path],
    tmp_path: Path,
) -> None:
    raw = bare_images[kind, "raw"]
    # what the volume holds: the filesystem at its start, zeros to its size (1 GiB)
    volume_like = tmp_path / "volume.raw"
    with open(volume_like, "wb") as f:
        f.write(raw.read_bytes())
        f.truncate(1 << 30)
    expected = validate_image(volume_like, "raw", bootable=False).to_dict()
    assert expected["layout"] == "partition" and expected["partitions"][0]["filesystem"] == kind  # control
    assert expected["os"]["distribution"] == "debian"

    s3 = moto.client("s3")
    tasks: dict[str, str] = {}
    for name, fmt in (("vhd-dynamic", "VHD"), ("vhd-fixed", "VHD"), ("vmdk-stream", "VMDK"), ("raw", "RAW")):
        image = bare_images[kind, name]
        pending = presign_manifest_url(s3, bucket, name, image)
        upload(s3, pending, image, file_format=fmt)
        tasks[name] = appliance.ec2.import_volume(
            AvailabilityZone="us-east-1a",
            Image={"Format": fmt, "Bytes": image.stat().st_size, "ImportManifestUrl": pending.url},
            Volume={"Size": 1},
        )["ConversionTask"]["ConversionTaskId"]
    for name, task_id in tasks.items():
        wait_for(
            lambda task_id=task_id: (
                conversion_task(appliance.ec2, task_id)["State"] in ("completed", "cancelled")
            ),
            timeout=180,
            what=f"the ImportVolume of {kind} in {name}",
        )
    for name, task_id in tasks.items():
        final = conversion_task(appliance.ec2, task_id)
        assert final["State"] == "completed", (name, final)
        detail = admin_task(appliance, task_id)
        assert detail["guest"] == expected, name
        with open(appliance.volume_file(final["ImportVolume"]["Volume"]["Id"]), "rb") as f:
            assert f.read(raw.stat().st_size) == raw.read_bytes(), name
