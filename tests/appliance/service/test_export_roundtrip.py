"""The round trip of issue 13 §7: what the appliance exports, it imports again, unchanged.

One bootable Linux disk goes around four times, each import taking the previous export's object from
the export bucket (moto server) as its source: ImportImage RAW → ExportImage VMDK → ImportImage VMDK
→ ExportImage VHD → ImportImage VHD → ExportImage VMDK in the OVA container → ImportImage OVA →
ExportImage RAW. Every stored image and the last export are compared with the original by
``qemu-img compare``: each import format (RAW, VMDK, VHD, OVA) reads what the matching export wrote,
through the same checks as any untrusted upload.
"""

from __future__ import annotations

from pathlib import Path

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
