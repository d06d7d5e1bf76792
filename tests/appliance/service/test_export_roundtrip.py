"""The round trip of issue 13 §7: what the appliance exports, it imports again, unchanged.

One bootable Linux disk goes around four times, each import taking the previous export's object from
the export bucket (moto server) as its source: ImportImage RAW → ExportImage VMDK → ImportImage VMDK
→ ExportImage VHD → ImportImage VHD → ExportImage VMDK in the OVA container → ImportImage OVA →
ExportImage RAW. Every stored image and the last export are compared with the original by
``qemu-img compare``: each import format (RAW, VMDK, VHD, OVA) reads what the matching export wrote,
through the same checks as any untrusted upload.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from xml.etree import ElementTree

import pytest

from appliance.service.exports import ExportService, object_key
from appliance.service.imports import ImportService
from appliance.service.importtasks import DiskContainer
from appliance.service.importviews import outcome
from appliance.store import TaskState
from tests import guestfactory, stores
from tests.appliance.service.test_exports import buckets, cfg_data, qemu_compare, run
from tests.servers import MotoServer

pytestmark = pytest.mark.slow

__all__ = ["buckets"]  # a fixture, used by name

OVF = "http://schemas.dmtf.org/ovf/envelope/1"
VMW = "http://www.vmware.com/schema/ovf"

#: (the import's format, the export that follows it: DiskImageFormat, container)
LAPS = [("RAW", "VMDK", None), ("VMDK", "VHD", None), ("VHD", "VMDK", "ova"), ("OVA", "RAW", None)]


def test_an_image_exported_as_vmdk_vhd_ova_and_raw_reimports_identical_each_time(
    tmp_path: Path, moto: MotoServer, buckets: tuple[str, str]
) -> None:
    cfg = stores.config(cfg_data(tmp_path, moto.endpoint), base_dir=tmp_path)
    original = guestfactory.linux_disk(tmp_path)
    s3 = moto.client("s3")
    s3.upload_file(str(original), buckets[0], "disk.raw")
    source: tuple[str, str] = (buckets[0], "disk.raw")
    imports = ImportService(cfg)
    exports = ExportService(cfg, imports.store)
    seen: list[tuple[str, str]] = []
    try:
        for import_format, export_format, container in LAPS:
            imported = run(
                cfg,
                imports.import_image([DiskContainer(format=import_format, bucket=source[0], key=source[1])]),
            )
            assert imported.state is TaskState.COMPLETED, (
                import_format,
                imported.error_code,
                imported.error_message,
            )
            stored = Path(outcome(imported)["location"]["path"])
            compared = qemu_compare(original, stored, "raw")
            assert compared.returncode == 0, (import_format, compared.stdout + compared.stderr)

            task = exports.export_image(
                "ami-" + imported.id[-17:],
                disk_image_format=export_format,
                container_format=container,
                bucket=buckets[1],
                prefix="laps/",
            )
            exported = run(cfg, task)
            assert exported.state is TaskState.COMPLETED, (
                export_format,
                exported.error_code,
                exported.error_message,
            )
            source = (buckets[1], object_key(task))
            seen.append((import_format, source[1].rsplit(".", 1)[1]))
    finally:
        imports.store.close()
    assert seen == [("RAW", "vmdk"), ("VMDK", "vhd"), ("VHD", "ova"), ("OVA", "raw")]
    last = tmp_path / "last.raw"
    s3.download_file(*source, str(last))
    compared = qemu_compare(original, last, "raw")
    assert compared.returncode == 0, compared.stdout + compared.stderr


def test_a_windows_image_exported_as_an_ova_names_windows_in_its_ovf_and_reimports(
    tmp_path: Path, moto: MotoServer, buckets: tuple[str, str]
) -> None:
    # the OVF's OperatingSystemSection is what guest validation found, not a constant: the OVA
    # import checks the OVF's OS type against the boot disk, so a Windows guest described as Linux
    # would not come back in (Guest.PlatformMismatch)
    cfg = stores.config(cfg_data(tmp_path, moto.endpoint), base_dir=tmp_path)
    original = guestfactory.windows_disk(tmp_path)
    s3 = moto.client("s3")
    s3.upload_file(str(original), buckets[0], "windows.raw")
    imports = ImportService(cfg)
    exports = ExportService(cfg, imports.store)
    try:
        imported = run(
            cfg, imports.import_image([DiskContainer(format="RAW", bucket=buckets[0], key="windows.raw")])
        )
        assert imported.state is TaskState.COMPLETED, (imported.error_code, imported.error_message)
        task = exports.export_image(
            "ami-" + imported.id[-17:], disk_image_format="VMDK", container_format="ova", bucket=buckets[1]
        )
        exported = run(cfg, task)
        assert exported.state is TaskState.COMPLETED, (exported.error_code, exported.error_message)
        ova = tmp_path / "windows.ova"
        s3.download_file(buckets[1], object_key(task), str(ova))
        with tarfile.open(ova) as tar:
            member = tar.extractfile(f"{task.id}.ovf")
            assert member is not None
            envelope = ElementTree.fromstring(member.read())
        [os_section] = envelope.iter(f"{{{OVF}}}OperatingSystemSection")
        assert os_section.get(f"{{{VMW}}}osType", "").startswith("windows"), os_section.attrib
        again = run(
            cfg, imports.import_image([DiskContainer(format="OVA", bucket=buckets[1], key=object_key(task))])
        )
        assert again.state is TaskState.COMPLETED, (again.error_code, again.error_message)
        compared = qemu_compare(original, Path(outcome(again)["location"]["path"]), "raw")
        assert compared.returncode == 0, compared.stdout + compared.stderr
    finally:
        imports.store.close()
