"""Safe image inspection end to end (appliance.image.inspect) on real images built by tests.imagefactory."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.config import Config
from appliance.errors import Cancelled, ImageRejected, Severity, UsageError
from appliance.image import qemuimg
from appliance.image.inspect import (
    PREFLIGHT_HEAD,
    PREFLIGHT_TAIL,
    InspectionResult,
    assess_info,
    inspect_image,
    preflight,
    require_safe,
    verify_output,
)
from tests import imagefactory as factory
from tests import streamfactory as sf

MiB = factory.MiB


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    data: dict[str, Any] = {"state_dir": str(tmp_path / "state")}
    data.update(overrides)
    return config_mod.from_dict(data, base_dir=tmp_path)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    return d


@pytest.fixture
def work(tmp_path: Path) -> Path:
    w = tmp_path / "work"
    w.mkdir()
    return w


@pytest.fixture
def qemu_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[str]]:
    """Put a recording ``qemu-img`` (a real script that then runs the real binary) first on PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "qemu-img-calls.log"
    script = bindir / "qemu-img"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexec {factory.QEMU_IMG} "$@"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return lambda: log.read_text().splitlines() if log.exists() else []


def codes(result: InspectionResult) -> list[str]:
    return [f.code for f in result.errors]


def assert_rejected(result: InspectionResult, code: str, work: Path) -> None:
    """Unsafe, ``code`` first, require_safe raises it, nothing is left in ``work``."""
    assert result.safe is False
    assert codes(result)[0] == code, result.findings
    with pytest.raises(ImageRejected) as exc:
        require_safe(result)
    assert exc.value.code == code
    assert exc.value.findings[0].code == code
    assert sorted(p.name for p in work.iterdir()) == []
    json.dumps(result.to_dict())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ good images

GOOD = [
    # builder, claim, format, qemu format, detail key → value
    (factory.raw_mbr, "raw", "raw", "raw", ("partition_table", "mbr")),
    (factory.qcow2_with_data, "qcow2", "qcow2", "qcow2", ("qcow2_compat", "1.1")),
    (factory.vmdk_sparse, "vmdk", "vmdk", "vmdk", ("vmdk_create_type", "monolithicSparse")),
    (factory.vmdk_stream, "vmdk", "vmdk", "vmdk", ("vmdk_create_type", "streamOptimized")),
    (factory.vhd_dynamic, "vhd", "vhd", "vpc", ("vhd_subformat", "dynamic")),
    (factory.vhd_fixed, "vhd", "vhd", "vpc", ("vhd_subformat", "fixed")),
    (factory.vhdx, "vhdx", "vhdx", "vhdx", ("detected_formats", ["vhdx"])),
    (factory.iso, "iso", "iso", "raw", ("detected_formats", ["iso"])),
]


@pytest.mark.parametrize(
    ("builder", "claim", "fmt", "qemu_fmt", "detail"),
    GOOD,
    ids=[g[0].__name__ for g in GOOD],
)
@pytest.mark.parametrize("claimed", [True, False], ids=["claimed", "unclaimed"])
def test_accepts_good_image(
    builder,
    claim: str,
    fmt: str,
    qemu_fmt: str,
    detail: tuple[str, Any],
    claimed: bool,
    images: Path,
    work: Path,
    config: Config,
) -> None:
    image = builder(images)
    result = inspect_image(image, claim if claimed else None, config=config, workdir=work)
    assert result.safe, result.findings
    assert (result.format, result.qemu_format) == (fmt, qemu_fmt)
    assert result.details[detail[0]] == detail[1]
    assert result.path == result.source == image
    assert result.compression is None
    assert result.virtual_size and result.virtual_size >= (MiB if fmt == "iso" else 16 * MiB)
    assert 0 < result.actual_size <= image.stat().st_size + 64 * 1024
    assert list(work.iterdir()) == []  # private qemu-img directories are gone
    d = result.to_dict()
    assert {"format", "virtual_size", "actual_size", "safe", "findings", "compression", "path"} <= d.keys()
    assert d["safe"] is True and json.loads(json.dumps(d)) == d


def test_good_image_runs_info_and_check_with_explicit_format(
    images: Path, work: Path, config: Config, qemu_calls
) -> None:
    result = inspect_image(factory.qcow2_with_data(images), "qcow2", config=config, workdir=work)
    assert result.safe
    calls = qemu_calls()
    assert [c.split()[0] for c in calls] == ["info", "check"]
    assert all("-f qcow2" in c and "--force-share" in c and "--output=json" in c for c in calls)


def test_vhd_is_inspected_as_vpc_and_not_checked(
    images: Path, work: Path, config: Config, qemu_calls
) -> None:
    result = inspect_image(factory.vhd_fixed(images), None, config=config, workdir=work)
    assert (result.format, result.qemu_format) == ("vhd", "vpc")
    assert [c.split()[:3] for c in qemu_calls()] == [["info", "-f", "vpc"]]


def test_leaked_clusters_are_a_warning_not_a_rejection(images: Path, work: Path, config: Config) -> None:
    result = inspect_image(factory.qcow2_leaked_cluster(images), "qcow2", config=config, workdir=work)
    assert result.safe
    assert [(f.code, f.severity) for f in result.findings] == [("Integrity.LeakedClusters", Severity.WARNING)]
    assert require_safe(result) is result


# ---------------------------------------------------------------------------------------- hostile images

HOSTILE = [
    # id, builder, claim, code
    ("qcow2-backing-file", factory.qcow2_backing, "qcow2", "UnsafeImage.BackingFile"),
    ("qcow2-data-file", factory.qcow2_data_file, "qcow2", "UnsafeImage.DataFile"),
    ("qcow2-unknown-feature", factory.qcow2_feature_bit, "qcow2", "UnsafeImage.UnknownFeatures"),
    ("qcow2-v1", lambda d: factory.qcow2_version(d, 1), "qcow2", "UnsafeImage.UnknownFeatures"),
    ("qcow2-v4", lambda d: factory.qcow2_version(d, 4), None, "UnsafeImage.UnknownFeatures"),
    ("qcow2-truncated", factory.qcow2_truncated, "qcow2", "CorruptImage"),
    ("qcow2-corrupt-l1", factory.qcow2_corrupt_l1, "qcow2", "CorruptImage"),
    ("qcow2-corrupt-refcount", factory.qcow2_corrupt_refcount, None, "CorruptImage"),
    ("qcow2-corrupt-flag", factory.qcow2_corrupt_flag, "qcow2", "CorruptImage"),
    ("vmdk-monolithic-flat", factory.vmdk_flat, "vmdk", "UnsafeImage.VmdkCreateType"),
    (
        "vmdk-absolute-extent",
        lambda d: factory.vmdk_descriptor(d, "/etc/passwd"),
        "vmdk",
        "UnsafeImage.VmdkDescriptor",
    ),
    (
        "vmdk-parent-extent",
        lambda d: factory.vmdk_descriptor(d, "../x.vmdk"),
        "vmdk",
        "UnsafeImage.VmdkDescriptor",
    ),
    ("vmdk-sibling-extent", factory.vmdk_sibling_extent, "vmdk", "UnsafeImage.VmdkDescriptor"),
    ("vmdk-delta-disk", factory.vmdk_delta, "vmdk", "UnsafeImage.BackingFile"),
    ("qed", factory.qed, None, "UnsafeImage.BannedFormat"),
    ("qed-claimed", factory.qed, "qed", "UnsafeImage.BannedFormat"),
    ("iso-qcow2-polyglot", factory.iso_qcow2_polyglot, "iso", "UnsafeImage.Polyglot"),
    (
        "mbr-invalid-boot-flag",
        lambda d: factory.raw_mbr(d, boot_flag=0x12),
        "raw",
        "UnsafeImage.PartitionTable",
    ),
    ("qcow2-claimed-raw", factory.raw_hiding_qcow2, "raw", "FormatMismatch"),
    ("raw-claimed-qcow2", factory.raw_mbr, "qcow2", "FormatMismatch"),
    ("iso-claimed-raw", factory.iso, "raw", "FormatMismatch"),
    ("qcow2-in-fixed-vhd-claimed-vhd", factory.vhd_fixed_with_qcow2, "vhd", "FormatMismatch"),
]


@pytest.mark.parametrize(("builder", "claim", "code"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_rejects_hostile_image(
    builder, claim: str | None, code: str, images: Path, work: Path, config: Config
) -> None:
    result = inspect_image(builder(images), claim, config=config, workdir=work)
    assert_rejected(result, code, work)
    message = result.errors[0].message
    assert len(message) > 40 and ";" in message  # says what is wrong; what to do


def test_rejects_qcow2_with_backing_file_claimed_as_raw(images: Path, work: Path, config: Config) -> None:
    # CVE-2024-40767: a "raw" upload that is really a qcow2 pointing at a host file
    result = inspect_image(factory.qcow2_backing(images), "raw", config=config, workdir=work)
    assert_rejected(result, "UnsafeImage.BackingFile", work)
    assert "FormatMismatch" in codes(result)
    mismatch = next(f for f in result.errors if f.code == "FormatMismatch")
    assert "claimed raw, detected qcow2" in mismatch.message


def test_format_mismatch_message_names_claim_and_detection(images: Path, work: Path, config: Config) -> None:
    result = inspect_image(factory.raw_mbr(images), "qcow2", config=config, workdir=work)
    assert "claimed qcow2, detected raw" in result.errors[0].message


@pytest.mark.parametrize(
    ("builder", "claim"),
    [
        (factory.qcow2_backing, "qcow2"),
        (factory.qcow2_backing, "raw"),
        (factory.qcow2_data_file, "qcow2"),
        (factory.qcow2_feature_bit, None),
        (factory.vmdk_sibling_extent, "vmdk"),
        (factory.vmdk_flat, None),
        (factory.vmdk_delta, "vmdk"),
        (factory.qed, None),
        (factory.iso_qcow2_polyglot, None),
        (factory.raw_hiding_qcow2, "raw"),
        (lambda d: factory.qcow2_huge(d, "3T"), "qcow2"),
    ],
    ids=[
        "backing",
        "backing-claimed-raw",
        "data-file",
        "unknown-feature",
        "vmdk-sibling",
        "vmdk-flat",
        "vmdk-delta",
        "qed",
        "polyglot",
        "qcow2-as-raw",
        "oversize",
    ],
)
def test_qemu_img_never_runs_when_the_content_inspector_rejects(
    builder, claim: str | None, images: Path, work: Path, config: Config, qemu_calls
) -> None:
    result = inspect_image(builder(images), claim, config=config, workdir=work)
    assert result.safe is False
    assert qemu_calls() == []
    # control: the recording qemu-img on PATH is really the one the toolkit runs
    assert inspect_image(factory.qcow2(images, "control.qcow2"), "qcow2", config=config).safe
    assert [c.split()[0] for c in qemu_calls()] == ["info", "check"]


def test_rejects_oversize_virtual_size(tmp_path: Path, images: Path, work: Path) -> None:
    config = make_config(tmp_path, limits={"max_virtual_size": "1TiB"})
    result = inspect_image(factory.qcow2_huge(images, "3T"), "qcow2", config=config, workdir=work)
    assert_rejected(result, "SizeLimitExceeded", work)
    assert result.virtual_size == 3 << 40
    assert "limits.max_virtual_size" in result.errors[0].message


def test_qemu_img_killed_by_address_space_limit_rejects(tmp_path: Path, images: Path, work: Path) -> None:
    config = make_config(tmp_path, limits={"qemu_img_address_space": 1_000_000})
    result = inspect_image(factory.qcow2(images), "qcow2", config=config, workdir=work)
    assert_rejected(result, "UnsafeImage.ResourceLimit", work)


# ---------------------------------------------------------------------------------- policy from config


@pytest.mark.parametrize(
    ("policy", "builder", "expected"),
    [
        ("allow-hybrid", factory.iso, None),
        ("allow-hybrid", factory.iso_hybrid, None),
        ("allow-hybrid", factory.iso_qcow2_polyglot, "UnsafeImage.Polyglot"),
        ("allow", factory.iso, None),
        ("allow", factory.iso_hybrid, "UnsafeImage.Polyglot"),
        ("reject", factory.iso, "UnsafeImage.BannedFormat"),
        ("reject", factory.iso_hybrid, "UnsafeImage.Polyglot"),
    ],
)
def test_iso_policy(
    policy: str, builder, expected: str | None, tmp_path: Path, images: Path, work: Path
) -> None:
    config = make_config(tmp_path, safety={"iso_policy": policy})
    result = inspect_image(builder(images), None, config=config, workdir=work)
    if expected is None:
        assert result.safe and result.format == "iso" and result.qemu_format == "raw"
    else:
        assert_rejected(result, expected, work)


def test_hybrid_iso_is_reported_as_hybrid(images: Path, work: Path, config: Config) -> None:
    result = inspect_image(factory.iso_hybrid(images), "iso", config=config, workdir=work)
    assert result.safe and result.details["hybrid_iso"] is True
    assert [f.code for f in result.findings] == ["Iso.Hybrid"]


@pytest.mark.parametrize("claimed", ["vhd", None])
def test_a_fixed_vhd_whose_guest_disk_is_a_live_iso_is_a_vhd(
    claimed: str | None, images: Path, work: Path, config: Config
) -> None:
    """A fixed VHD is its guest's disk and a footer; a live ISO written to that disk (``dd if=live.iso``) is
    the guest's, judged once decoded (as a conversion's output is), not the file's format."""
    guest = factory.iso_hybrid(images, "live.iso")
    vhd = images / "live.vhd"
    factory.qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on", guest, vhd)
    result = inspect_image(vhd, claimed, config=config, workdir=work)
    assert result.safe and result.format == "vhd", [f.code for f in result.findings]
    assert result.details["vhd_subformat"] == "fixed" and "hybrid_iso" not in result.details
    assert [f.code for f in result.findings] == []
    # claimed as what it holds, it is still the file it is
    as_raw = inspect_image(vhd, "raw", config=config, workdir=work)
    assert [f.code for f in as_raw.errors] == ["FormatMismatch"]


def test_vmdk_create_type_outside_the_allow_list(tmp_path: Path, images: Path, work: Path) -> None:
    config = make_config(tmp_path, safety={"vmdk_allowed_types": ["streamOptimized"]})
    assert inspect_image(factory.vmdk_stream(images), "vmdk", config=config, workdir=work).safe
    result = inspect_image(factory.vmdk_sparse(images), "vmdk", config=config, workdir=work)
    assert_rejected(result, "UnsafeImage.VmdkCreateType", work)
    assert "monolithicsparse" in result.errors[0].message.lower()


def test_banned_format_from_config(tmp_path: Path, images: Path, work: Path) -> None:
    config = make_config(tmp_path, safety={"banned_formats": ["qed", "vhdx"]})
    assert_rejected(
        inspect_image(factory.vhdx(images), None, config=config, workdir=work),
        "UnsafeImage.BannedFormat",
        work,
    )


# ------------------------------------------------------------------------- fixed VHD (closing an oslo gap)


def test_fixed_vhd_is_raw_to_oslo_but_vhd_to_us(images: Path, work: Path, config: Config) -> None:
    image = factory.vhd_fixed(images)
    result = inspect_image(image, None, config=config, workdir=work)
    assert result.details["detected_formats"] == ["gpt"]  # what oslo.utils alone says
    assert (result.format, result.qemu_format, result.details["vhd_subformat"]) == ("vhd", "vpc", "fixed")
    assert result.virtual_size == image.stat().st_size - 512


def test_fixed_vhd_claimed_raw_is_a_mismatch(images: Path, work: Path, config: Config) -> None:
    result = inspect_image(factory.vhd_fixed(images), "raw", config=config, workdir=work)
    assert_rejected(result, "FormatMismatch", work)
    assert "claimed raw, detected vhd" in result.errors[0].message


@pytest.mark.parametrize(
    ("offset", "value", "problem"),
    [(64, b"\x00\x00\x00\x01", "bad checksum"), (60, b"\x00\x00\x00\x03", "bad checksum")],
)
def test_fixed_vhd_with_damaged_footer_is_not_vhd(
    offset: int, value: bytes, problem: str, images: Path, work: Path, config: Config
) -> None:
    image = factory.vhd_fixed(images)
    factory.patch(image, image.stat().st_size - 512 + offset, value)
    result = inspect_image(image, "vhd", config=config, workdir=work)
    assert_rejected(result, "FormatMismatch", work)
    assert "claimed vhd, detected raw" in result.errors[0].message and problem in result.errors[0].message


def test_fixed_footer_with_non_fixed_disk_type_is_not_vhd(images: Path, work: Path, config: Config) -> None:
    image = factory.vhd_fixed(images)
    footer_at = image.stat().st_size - 512
    footer = bytearray(image.read_bytes()[footer_at:])
    footer[60:64] = (3).to_bytes(4, "big")  # "dynamic", but there is no dynamic header
    footer[64:68] = b"\0\0\0\0"
    footer[64:68] = (~sum(footer) & 0xFFFFFFFF).to_bytes(4, "big")
    factory.patch(image, footer_at, bytes(footer))
    result = inspect_image(image, None, config=config, workdir=work)
    assert result.format == "raw" and "not a fixed disk" in result.details["vhd_footer_problem"]


# --------------------------------------------------------------------- qemu-img stage on real info output


def test_qemu_stage_rejects_backing_file_of_vmdk_delta(images: Path, work: Path, config: Config) -> None:
    # oslo.utils 10.2 passes a delta VMDK; qemu-img info shows its parent
    info = qemuimg.info(factory.vmdk_delta(images), "vmdk", config.limits, workdir=work)
    assert info["backing-filename"] == "base.vmdk"
    assert [f.code for f in assess_info(info, "vmdk", config)] == ["UnsafeImage.BackingFile"]


def test_qemu_stage_rejects_qcow2_backing_and_data_file(images: Path, work: Path, config: Config) -> None:
    backing = qemuimg.info(
        factory.qcow2_backing(images, "/nonexistent/base"), "qcow2", config.limits, workdir=work
    )
    assert [f.code for f in assess_info(backing, "qcow2", config)] == ["UnsafeImage.BackingFile"]
    data_file = qemuimg.info(factory.qcow2_data_file(images), "qcow2", config.limits, workdir=work)
    assert [f.code for f in assess_info(data_file, "qcow2", config)] == ["UnsafeImage.DataFile"]


def test_qemu_stage_checks_create_type_and_format_agreement(tmp_path: Path, images: Path, work: Path) -> None:
    config = make_config(tmp_path, safety={"vmdk_allowed_types": ["streamOptimized"]})
    info = qemuimg.info(factory.vmdk_sparse(images), "vmdk", config.limits, workdir=work)
    assert [f.code for f in assess_info(info, "vmdk", config)] == ["UnsafeImage.VmdkCreateType"]
    assert "FormatMismatch" in [f.code for f in assess_info(info, "qcow2", config)]


def test_qemu_stage_rejects_oversize(tmp_path: Path, images: Path, work: Path) -> None:
    config = make_config(tmp_path, limits={"max_virtual_size": "16MiB"})
    info = qemuimg.info(factory.qcow2(images, virtual_size="17M"), "qcow2", config.limits, workdir=work)
    assert [f.code for f in assess_info(info, "qcow2", config)] == ["SizeLimitExceeded"]


# ------------------------------------------------------------------------------------ compressed inputs


@pytest.mark.parametrize("kind", ["gzip", "xz", "zstd", "bzip2"])
def test_compressed_raw_is_decompressed_sparsely_and_inspected(
    kind: str, images: Path, work: Path, config: Config
) -> None:
    raw = factory.raw_mbr(images)
    archive = factory.compress(raw, kind)
    result = inspect_image(archive, f"raw.{factory.SUFFIXES[kind]}", config=config, workdir=work)
    assert result.safe, result.findings
    assert (result.format, result.compression, result.source) == ("raw", kind, archive)
    assert result.path == work / "disk.raw"
    assert [p.name for p in work.iterdir()] == ["disk.raw"]  # only the decompressed image stays
    assert sha(result.path) == sha(raw)
    assert result.actual_size < result.virtual_size // 4  # written sparsely
    assert archive.exists()


def test_compressed_qcow2_without_a_claim(images: Path, work: Path, config: Config) -> None:
    archive = factory.compress(factory.qcow2_with_data(images), "zstd")
    result = inspect_image(archive, None, config=config, workdir=work)
    assert result.safe and (result.format, result.compression) == ("qcow2", "zstd")


def test_compressed_hostile_image_leaves_nothing_behind(images: Path, work: Path, config: Config) -> None:
    archive = factory.compress(factory.qcow2_backing(images), "gzip")
    result = inspect_image(archive, "qcow2.gz", config=config, workdir=work)
    assert_rejected(result, "UnsafeImage.BackingFile", work)
    assert result.path == archive  # the removed decompressed copy is not reported


def test_corrupt_qcow2_inside_an_archive_leaves_nothing_behind(
    images: Path, work: Path, config: Config
) -> None:
    archive = factory.compress(factory.qcow2_truncated(images), "xz")
    assert_rejected(inspect_image(archive, None, config=config, workdir=work), "CorruptImage", work)


@pytest.mark.parametrize(
    ("claim", "compress_with", "fragment"),
    [
        ("raw.gz", "xz", "claimed raw.gz, detected xz-compressed"),
        ("raw.gz", None, "claimed raw.gz, detected no compression"),
        ("qcow2.gz", "gzip", "claimed qcow2, detected raw"),
    ],
)
def test_compression_claim_must_match(
    claim: str, compress_with: str | None, fragment: str, images: Path, work: Path, config: Config
) -> None:
    raw = factory.raw_mbr(images)
    image = factory.compress(raw, compress_with) if compress_with else raw
    result = inspect_image(image, claim, config=config, workdir=work)
    assert_rejected(result, "FormatMismatch", work)
    assert fragment in result.errors[0].message


def test_rejects_gzip_bomb_and_leaves_nothing_behind(images: Path, work: Path, config: Config) -> None:
    bomb = factory.gzip_bomb(images, 2 * factory.GiB)
    result = inspect_image(bomb, "raw.gz", config=config, workdir=work, max_decompressed=64 * MiB)
    assert_rejected(result, "SizeLimitExceeded.Decompressed", work)


def test_decompression_cap_defaults_to_config(tmp_path: Path, images: Path, work: Path) -> None:
    config = make_config(tmp_path, limits={"max_decompressed_size": "8MiB"})
    archive = factory.compress(factory.raw_mbr(images), "gzip")  # 16 MiB inside
    assert_rejected(
        inspect_image(archive, None, config=config, workdir=work), "SizeLimitExceeded.Decompressed", work
    )


def test_compressed_input_needs_a_workdir(images: Path, config: Config) -> None:
    with pytest.raises(UsageError, match="work directory"):
        inspect_image(factory.compress(factory.raw_mbr(images), "gzip"), None, config=config)


def test_cancel_before_start_raises_and_leaves_nothing(images: Path, work: Path, config: Config) -> None:
    cancel = threading.Event()
    cancel.set()
    archive = factory.compress(factory.raw_mbr(images), "gzip")
    with pytest.raises(Cancelled):
        inspect_image(archive, None, config=config, workdir=work, cancel=cancel)
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("claim", ["vdi", "raw.rar", "floppy"])
def test_unknown_claim_is_a_usage_error(claim: str, images: Path, config: Config) -> None:
    with pytest.raises(UsageError):
        inspect_image(factory.raw_mbr(images), claim, config=config)


def test_missing_file_is_a_usage_error(tmp_path: Path, config: Config) -> None:
    with pytest.raises(UsageError):
        inspect_image(tmp_path / "nope.raw", None, config=config)


# ------------------------------------------------------------------------------------ conversion output


@pytest.mark.parametrize(
    ("builder", "expected", "fmt"),
    [
        (factory.raw_mbr, "raw", "raw"),
        (factory.iso, "raw", "iso"),  # raw conversion of an ISO is still ISO content
        (factory.qcow2_with_data, "qcow2", "qcow2"),
        (factory.vmdk_stream, "vmdk", "vmdk"),
        (factory.vhd_fixed, "vhd", "vhd"),
        (factory.vhd_dynamic, "vhd", "vhd"),
        (factory.vhdx, "vhdx", "vhdx"),
    ],
)
def test_verify_output_accepts_the_expected_format(
    builder, expected: str, fmt: str, images: Path, config: Config
) -> None:
    result = verify_output(builder(images), expected, config=config)
    assert result.safe, result.findings
    assert result.format == fmt


@pytest.mark.parametrize(
    ("builder", "expected"),
    [
        (factory.raw_hiding_qcow2, "raw"),
        (factory.vmdk_sparse, "raw"),
        (factory.vhd_fixed, "raw"),
        (factory.raw_mbr, "vhd"),
        (factory.iso_qcow2_polyglot, "raw"),
    ],
)
def test_verify_output_rejects_unexpected_or_hidden_format(
    builder, expected: str, images: Path, config: Config, qemu_calls
) -> None:
    result = verify_output(builder(images), expected, config=config)
    assert result.safe is False
    assert "ConversionFailed.UnexpectedFormat" in codes(result)
    assert qemu_calls() == []  # the mismatch is found before qemu-img would read the output


def test_verify_output_rejects_unsafe_output(images: Path, config: Config) -> None:
    result = verify_output(factory.qcow2_truncated(images), "qcow2", config=config)
    assert codes(result) == ["CorruptImage"]


def test_verify_output_refuses_an_input_only_format(images: Path, config: Config) -> None:
    with pytest.raises(UsageError):
        verify_output(factory.iso(images), "iso", config=config)


# --------------------------------------------------------------- preflight: a download's first and last bytes


def _preflight_parts(path: Path) -> tuple[bytes, bytes, int]:
    data = path.read_bytes()
    return data[:PREFLIGHT_HEAD], data[-PREFLIGHT_TAIL:], len(data)


@pytest.mark.parametrize(
    ("make", "claim"),
    [
        (factory.qcow2_backing, "qcow2"),
        (factory.qcow2_data_file, "qcow2"),
        (factory.vmdk_flat, "vmdk"),
        (factory.qed, "qcow2"),
        (factory.iso_qcow2_polyglot, "raw"),
        (factory.vhd_fixed, "vhd"),
        (factory.vmdk_stream, "vmdk"),
        (factory.raw_mbr, "qcow2"),
    ],
)
def test_preflight_decides_as_the_file_inspection_does(
    images: Path, work: Path, config: Config, make: Callable[[Path], Path], claim: str
) -> None:
    path = make(images)
    head, tail, size = _preflight_parts(path)
    pre = preflight(head, tail, claim, config=config, size=size)
    full = inspect_image(path, claim, config=config, workdir=work)
    assert pre.format == full.format
    assert pre.virtual_size == full.virtual_size
    assert [f.code for f in pre.errors] == [f.code for f in full.errors][: len(pre.errors)]
    assert pre.safe == full.safe
    assert pre.complete


def _spec_stream(**kw: Any) -> bytes:
    rnd = random.Random(3)
    grains = [sf.Grain(128 * i, rnd.randbytes(65536)) for i in range(40)]
    data = sf.build(sf.Stream(capacity=128 * 2048, grains=grains, **kw))
    assert len(data) > PREFLIGHT_HEAD + PREFLIGHT_TAIL
    return data


def test_preflight_of_a_vmdk_stream_leaves_its_footer_pending_without_the_tail(config: Config) -> None:
    data = _spec_stream()
    pre = preflight(data[:PREFLIGHT_HEAD], None, "vmdk", config=config, size=len(data))
    assert (pre.format, pre.virtual_size, pre.safe, pre.pending) == (
        "vmdk",
        128 * 2048 * 512,
        True,
        ["footer"],
    )
    pre = preflight(data[:PREFLIGHT_HEAD], data[-PREFLIGHT_TAIL:], "vmdk", config=config, size=len(data))
    assert (pre.format, pre.safe, pre.pending) == ("vmdk", True, [])


def test_preflight_refuses_a_vmdk_stream_whose_footer_disagrees_with_its_header(config: Config) -> None:
    data = _spec_stream(footer={"desc_size": 19})
    pre = preflight(data[:PREFLIGHT_HEAD], data[-PREFLIGHT_TAIL:], "vmdk", config=config, size=len(data))
    assert [f.code for f in pre.errors] == ["UnsafeImage.VmdkFooter"]


def test_preflight_of_a_fixed_vhd_needs_its_last_sector(images: Path, config: Config) -> None:
    path = factory.vhd_fixed(images)
    data = path.read_bytes()
    big = data[:-512].ljust(PREFLIGHT_HEAD + 8192, b"\0") + data[-512:]  # more than the head
    pre = preflight(big[:PREFLIGHT_HEAD], None, "vhd", config=config, size=len(big))
    assert (pre.format, pre.safe, pre.pending) == ("raw", True, ["tail"])  # undecided, not a mismatch
    pre = preflight(big[:PREFLIGHT_HEAD], big[-PREFLIGHT_TAIL:], "vhd", config=config, size=len(big))
    assert (pre.format, pre.pending) == ("vhd", [])


def test_preflight_of_a_compressed_head_decides_only_the_compression(images: Path, config: Config) -> None:
    packed = factory.compress(factory.raw_mbr(images), "gzip").read_bytes()
    pre = preflight(packed[:PREFLIGHT_HEAD], None, "raw.gz", config=config)
    assert (pre.compression, pre.format, pre.pending, pre.safe) == ("gzip", None, ["content"], True)
    pre = preflight(packed[:PREFLIGHT_HEAD], None, "raw.xz", config=config)
    assert [f.code for f in pre.errors] == ["FormatMismatch"]


def test_preflight_of_a_qcow2_claimed_raw_is_a_mismatch_from_the_head_alone(
    images: Path, config: Config
) -> None:
    head = factory.qcow2(images).read_bytes()
    pre = preflight(head, None, "raw", config=config)
    assert "FormatMismatch" in [f.code for f in pre.errors]


def test_preflight_needs_the_size_to_place_a_tail(config: Config) -> None:
    with pytest.raises(UsageError):
        preflight(b"\0" * 512, b"\0" * 512, "raw", config=config)
