"""OVA in, ``ovf:required``: an extension a package requires and the importer does not understand refuses it
(``Ova.UnsupportedSection``, naming the element, nothing left behind), wherever OVF allows one (the envelope,
a virtual system, a hardware section); the same extension marked ``ovf:required="false"`` is ignored; what
real producers write without the attribute (VMware's boot order and settings, XenServer's settings,
hardware items of any type, OVF's own sections) still imports."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import Config
from appliance.errors import ImageRejected
from appliance.image.ovf import parse
from tests import ovaproducers as producers
from tests.appliance.image.test_ova import rejected
from tests.appliance.image.test_ova_interop import members_of, unpack

MiB, GiB = producers.MiB, producers.GiB


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    (tmp_path / "disks").mkdir()
    return producers.stream_vmdk(tmp_path / "disks" / "root.vmdk", 64 * MiB, data=b"root disk")


def _virtualbox2(out: Path, disks: list[Path]) -> Path:
    return producers.virtualbox(out, disks, version="2.0")


# each producer's layout, with the extension where that producer would put its own
CASES: list[tuple[str, Callable[[Path, list[Path]], Path], str]] = [
    ("ova-compose", producers.ova_compose, "Envelope"),
    ("ovftool", producers.ovftool, "VirtualSystem"),
    ("virtualbox-ovf2", _virtualbox2, "VirtualHardwareSection"),
]


@pytest.mark.parametrize(("producer", "build", "where"), CASES, ids=[c[0] for c in CASES])
def test_an_unknown_required_extension_is_refused_and_the_same_one_not_required_is_ignored(
    producer: str,
    build: Callable[[Path, list[Path]], Path],
    where: str,
    tmp_path: Path,
    cfg: Config,
    disk: Path,
) -> None:
    ova = build(tmp_path / "vm.ova", [disk])
    for required in (None, "true"):
        edited = producers.with_extension(ova, tmp_path / "edited.ova", where, producers.extension(required))
        with pytest.raises(ImageRejected) as exc:
            parse(next(b for n, b in members_of(edited) if n.endswith(".ovf")))
        assert exc.value.code == "Ova.UnsupportedSection"
        assert "ext:DiskKeySection (namespace http://example.com/ovf/disk-keys)" in exc.value.message
        assert f"in its {where}" in exc.value.message
        # the whole import: refused in the confined parser, the package directory gone
        assert rejected(edited.read_bytes(), tmp_path, cfg) == "Ova.UnsupportedSection"
    edited = producers.with_extension(ova, tmp_path / "optional.ova", where, producers.extension("false"))
    pkg = unpack(edited, tmp_path, cfg)
    try:
        assert pkg.manifest_verified and len(pkg.disks) == 1
        assert pkg.disks[0].inspection is not None and pkg.disks[0].inspection.format == "vmdk"
    finally:
        pkg.remove()


#: what real producers put without ovf:required="false", and OVF's own sections and items this importer
#: does not use: all understood
UNDERSTOOD = {
    "Envelope": b"""<StartupSection><Info>Power-on order</Info><Item ovf:id="vm" ovf:order="0"/>
</StartupSection>
<DeploymentOptionSection><Info>Sizes</Info><Configuration ovf:id="small"><Label>S</Label>
<Description>small</Description></Configuration></DeploymentOptionSection>
""",
    "VirtualSystem": b"""<ProductSection><Info>Product</Info><Product>An appliance</Product></ProductSection>
<EulaSection><Info>Licence</Info><License>Terms</License></EulaSection>
<AnnotationSection><Info>Note</Info><Annotation>text</Annotation></AnnotationSection>
<InstallSection ovf:initialBootStopDelay="300"><Info>First boot installs</Info></InstallSection>
<ResourceAllocationSection><Info>Reservations</Info></ResourceAllocationSection>
""",
    # XenCenter's export writes its VM settings without ovf:required; items of types the import does
    # not realise (floppy 14, VirtualBox's sound card 35, a vendor-reserved type) are required by default
    "VirtualHardwareSection": b"""<xenovf:VirtualSystemOtherConfigurationData \
xmlns:xenovf="http://schemas.citrix.com/ovf/envelope/1" id="a1" Name="HVM_boot_policy">\
<xenovf:Info>XenServer Specific Information</xenovf:Info><xenovf:Value>BIOS order</xenovf:Value>\
</xenovf:VirtualSystemOtherConfigurationData>
<vmw:ExtraConfig ovf:required="true" vmw:key="svga.present" vmw:value="TRUE"/>
<Item><rasd:ElementName>Floppy drive 1</rasd:ElementName><rasd:InstanceID>30</rasd:InstanceID>
<rasd:ResourceType>14</rasd:ResourceType></Item>
<Item><rasd:ElementName>Sound</rasd:ElementName><rasd:InstanceID>31</rasd:InstanceID>
<rasd:ResourceType>35</rasd:ResourceType></Item>
<Item><rasd:ElementName>Vendor device</rasd:ElementName><rasd:InstanceID>32</rasd:InstanceID>
<rasd:ResourceType>32768</rasd:ResourceType></Item>
""",
}


def test_what_producers_write_without_required_is_understood_but_not_an_unknown_vmware_section(
    tmp_path: Path, disk: Path
) -> None:
    ovf = producers.ovftool_ovf([disk], "vm")
    for where, elements in UNDERSTOOD.items():
        at = ovf.index(producers.EXTENSION_PLACES[where])
        ovf = ovf[:at] + elements + ovf[at:]
    info = parse(ovf)
    assert [d["id"] for d in info.disks] == ["vmdisk1"] and info.firmware == "efi"
    # a VMware section this importer does not know is no better than any other unknown one
    at = ovf.index(b"</VirtualSystem>")
    future = b'<vmw:ReplicationSection vmw:mode="sync"><Info>Replica</Info></vmw:ReplicationSection>\n'
    with pytest.raises(ImageRejected) as exc:
        parse(ovf[:at] + future + ovf[at:])
    assert exc.value.code == "Ova.UnsupportedSection"
    assert "vmw:ReplicationSection (namespace http://www.vmware.com/schema/ovf)" in exc.value.message


def test_an_ovf2_package_whose_files_are_encrypted_is_refused_as_unsupported(
    tmp_path: Path, cfg: Config, disk: Path
) -> None:
    # OVF 2's own EncryptionSection (the spec's, not an extension, and with ovf:required="false" even):
    # the files' bytes are ciphertext, which imported as a disk would be garbage that only guest
    # validation might notice
    ova = producers.virtualbox(tmp_path / "vm.ova", [disk], version="2.0")
    section = (
        b'<EncryptionSection ovf:required="false"><Info>Encrypted files</Info>'
        b'<xenc:EncryptedData xmlns:xenc="http://www.w3.org/2001/04/xmlenc#" Type="http://www.w3.org/2001/04/'
        b'xmlenc#Content"><xenc:CipherData><xenc:CipherReference URI="vm-disk1.vmdk"/></xenc:CipherData>'
        b"</xenc:EncryptedData></EncryptionSection>\n"
    )
    edited = producers.with_extension(ova, tmp_path / "encrypted.ova", "Envelope", section)
    with pytest.raises(ImageRejected) as exc:
        parse(next(b for n, b in members_of(edited) if n.endswith(".ovf")))
    assert exc.value.code == "Ova.Unsupported" and "EncryptionSection" in exc.value.message
    assert rejected(edited.read_bytes(), tmp_path, cfg) == "Ova.Unsupported"
