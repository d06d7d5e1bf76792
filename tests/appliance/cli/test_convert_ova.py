"""`imaging convert` of OVAs a real producer wrote (tests.ovaproducers: GNU tar, qemu-img), as a user runs it:
an OVA requiring an extension the importer does not understand exits 2 with ``Ova.UnsupportedSection``
and writes nothing (the same OVA with ``ovf:required="false"`` converts); a gzip- or xz-compressed OVA
given without ``--from ova`` exits 2 with ``Ova.Compressed`` naming the tool that unwraps it, as with
``--from ova``, instead of converting the tar as a RAW disk. An oVirt export (GNU headers, a ``pad`` member,
UUID-named qcow2 disks, descriptor sizes that are not the members') converts both its disks with
``imaging convert`` given no ``--from`` and with ``imaging run convert-ova``; so does a XenCenter export
(tests.ovaproducers_xen: a descriptor declared ``utf-16`` but written as UTF-8, dynamic VHDs, the boot disk
second in the descriptor and marked ``xenovf:isBootable``), and an encrypted one exits 2 with
``Ova.Unsupported`` and writes nothing."""

from __future__ import annotations

import gzip
import lzma
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import ovaproducers as producers
from tests import ovaproducers_xen as xen
from tests.appliance.cli.test_export import env, imaging

__all__ = ["env"]  # a fixture, used by name
MiB = producers.MiB


def _ova(tmp_path: Path) -> Path:
    (tmp_path / "disks").mkdir()
    disk = producers.stream_vmdk(tmp_path / "disks" / "root.vmdk", 8 * MiB, data=b"root disk")
    return producers.ova_compose(tmp_path / "vm.ova", [disk])


def _scratch_files(tmp_path: Path) -> list[str]:
    """What the CLI's scratch holds besides its bookkeeping at its root (``.lock``, ``.peak.json``)."""
    scratch = tmp_path / "state" / "imaging" / "scratch"
    return [
        str(p.relative_to(scratch))
        for p in scratch.rglob("*")
        if p.is_file() and (p.parent != scratch or not p.name.startswith("."))
    ]


def test_convert_of_an_ova_requiring_an_unknown_section_exits_2_and_writes_nothing(
    tmp_path: Path, env: dict[str, str]
) -> None:
    ova = _ova(tmp_path)
    required = producers.with_extension(ova, tmp_path / "req.ova", "Envelope", producers.extension(None))
    out = tmp_path / "out"
    out.mkdir()
    res = imaging("convert", required, out / "vm.raw", "--to", "raw", env=env)
    assert res.returncode == 2, res.stderr
    assert "Ova.UnsupportedSection" in res.stderr and "ext:DiskKeySection" in res.stderr
    assert os.listdir(out) == [] and _scratch_files(tmp_path) == []
    optional = producers.with_extension(ova, tmp_path / "opt.ova", "Envelope", producers.extension("false"))
    res = imaging("convert", optional, out / "vm.raw", "--to", "raw", env=env)
    assert res.returncode == 0, res.stderr
    assert (out / "vm.raw").read_bytes()[:9] == b"root disk" and _scratch_files(tmp_path) == []


@pytest.mark.parametrize(
    ("wrap", "tool"),
    [(lambda b: gzip.compress(b, mtime=0), "gunzip"), (lzma.compress, "unxz")],
    ids=["gzip", "xz"],
)
def test_convert_of_a_compressed_ova_without_from_ova_is_refused_naming_the_tool(
    wrap: Callable[[bytes], bytes], tool: str, tmp_path: Path, env: dict[str, str]
) -> None:
    wrapped = tmp_path / "vm.ova.packed"
    wrapped.write_bytes(wrap(_ova(tmp_path).read_bytes()))
    out = tmp_path / "out"
    out.mkdir()
    for claim in ([], ["--from", "ova"]):
        res = imaging("convert", wrapped, out / "vm.raw", "--to", "raw", *claim, env=env)
        assert res.returncode == 2, res.stderr
        assert "Ova.Compressed" in res.stderr and f"decompress it ({tool})" in res.stderr, res.stderr
        assert os.listdir(out) == [] and _scratch_files(tmp_path) == []


#: the OVA each producer writes of a boot disk and a data disk: oVirt's lists the boot disk first (the
#: older namespace spelling); XenCenter's second, marked ``xenovf:isBootable``
PRODUCERS: dict[str, Callable[[Path, Path, Path], Path]] = {
    "ovirt": lambda out, boot, data: producers.ovirt(
        out, [boot, data], namespace=producers.OVIRT_OVF_NS + "/"
    ),
    "xencenter": lambda out, boot, data: xen.xencenter(out, [data, boot], bootable=[False, True]),
}


@pytest.mark.parametrize("how", ["convert", "run"])
@pytest.mark.parametrize("producer", PRODUCERS)
def test_an_ovirt_or_xencenter_ova_converts_both_its_disks_boot_disk_first(
    producer: str, how: str, tmp_path: Path, env: dict[str, str]
) -> None:
    boot, data = producers.two_disks(tmp_path / "src")
    ova = PRODUCERS[producer](tmp_path / "vm.ova", boot, data)
    out = tmp_path / "out"
    out.mkdir()
    if how == "convert":
        res = imaging("convert", ova, out / "vm.raw", "--to", "raw", env=env)
    else:
        params = ("-p", f"source={ova}", "-p", f"target={out / 'vm.raw'}", "-p", "format=raw")
        res = imaging("run", "convert-ova", *params, env=env)
    assert res.returncode == 0, res.stderr
    for raw, written in ((boot, out / "vm.raw"), (data, out / "vm-disk2.raw")):
        compared = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", raw, written])
        assert compared.returncode == 0
    assert _scratch_files(tmp_path) == []


def test_convert_of_an_encrypted_xencenter_ova_exits_2_and_writes_nothing(
    tmp_path: Path, env: dict[str, str]
) -> None:
    boot, _ = producers.two_disks(tmp_path / "src")
    ova = xen.xencenter(tmp_path / "vm.ova", [boot], encrypt=True)
    out = tmp_path / "out"
    out.mkdir()
    res = imaging("convert", ova, out / "vm.raw", "--to", "raw", env=env)
    assert res.returncode == 2 and "Ova.Unsupported" in res.stderr, res.stderr
    assert os.listdir(out) == [] and _scratch_files(tmp_path) == []
