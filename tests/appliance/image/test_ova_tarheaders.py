"""OVA in, the tar's extended headers: a PAX or GNU long-name header is refused before ``tarfile`` parses it
when it is over 16 KiB or takes the archive's over 32 KiB together (``Ova.TooLarge``, nothing left behind):
``tarfile`` parses PAX records in time that grows with the square of their length, in the task's process.
An OVA whose members carry the small PAX headers real tars write (GNU tar ``--format=pax``, Python's
``tarfile``, libarchive) is read as before."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from appliance.config import Config
from appliance.image.ovacontainer import MAX_EXTENDED_HEADER, MAX_EXTENDED_TOTAL
from tests import ovaproducers as producers
from tests.appliance.image.test_ova import rejected
from tests.appliance.image.test_ova_interop import members_of, unpack

MiB = producers.MiB


@pytest.fixture
def ova(tmp_path: Path) -> Path:
    (tmp_path / "disks").mkdir()
    disks = [
        producers.stream_vmdk(tmp_path / "disks" / f"disk{i}.vmdk", 64 * MiB, data=f"disk {i}".encode())
        for i in range(3)
    ]
    return producers.ova_compose(tmp_path / "vm.ova", disks)


def as_pax(ova: Path, extra: dict[str, int]) -> bytes:
    """``ova``'s members in their order as a PAX tar, each member named in ``extra`` given a PAX
    ``comment`` record of that many bytes (a record any reader must accept and may ignore)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, body in members_of(ova):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(body), 1_700_000_000.25, 0o644  # (a fractional mtime: PAX)
            if name in extra:
                ti.pax_headers = {"comment": "c" * extra[name]}
            tar.addfile(ti, io.BytesIO(body))
    return out.getvalue()


def test_an_ova_with_the_small_pax_headers_real_tars_write_is_read(
    tmp_path: Path, cfg: Config, ova: Path
) -> None:
    names = [n for n, _ in members_of(ova)]
    pkg = unpack(as_pax(ova, {n: 200 for n in names}), tmp_path, cfg)
    try:
        assert pkg.manifest_verified and len(pkg.disks) == 3
    finally:
        pkg.remove()


def test_one_pax_header_over_the_cap_refuses_the_ova_before_it_is_parsed(
    tmp_path: Path, cfg: Config, ova: Path
) -> None:
    disk = [n for n, _ in members_of(ova) if n.endswith(".vmdk")][1]
    assert rejected(as_pax(ova, {disk: MAX_EXTENDED_HEADER + 1024}), tmp_path, cfg) == "Ova.TooLarge"


def test_pax_headers_each_under_the_cap_but_over_it_together_refuse_the_ova(
    tmp_path: Path, cfg: Config, ova: Path
) -> None:
    names = [n for n, _ in members_of(ova)]
    each = MAX_EXTENDED_TOTAL // 3 + 1024  # three of them exceed the total, each is under the cap
    assert each < MAX_EXTENDED_HEADER
    assert rejected(as_pax(ova, {n: each for n in names[:3]}), tmp_path, cfg) == "Ova.TooLarge"


def test_a_gnu_long_name_over_the_cap_refuses_the_ova(tmp_path: Path, cfg: Config, ova: Path) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, body in members_of(ova):
            ti = tarfile.TarInfo(name)
            ti.size = len(body)
            tar.addfile(ti, io.BytesIO(body))
        ti = tarfile.TarInfo("n" * (MAX_EXTENDED_HEADER + 1))  # (a ././@LongLink header before it)
        tar.addfile(ti, io.BytesIO(b""))
    assert rejected(out.getvalue(), tmp_path, cfg) == "Ova.TooLarge"
