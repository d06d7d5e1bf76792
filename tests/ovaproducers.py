"""OVAs as the tools outside this repository write them, for the interop tests of the OVA importer.

Each builder writes, byte for byte where the producer's source was read (``ova-ovf.md`` §2-§4), what that
producer puts in an OVA; the disks are streamOptimized VMDKs made by the real ``qemu-img``:

* :func:`ova_compose` — open-vmdk's ``ova-compose`` (its ``to_xml``, with ``extra_configs`` as its README
  shows them: ``vmw:ExtraConfig`` without ``ovf:required`` or with ``"true"``; its ``write_manifest``,
  ``sign_manifest`` and ``tar --format=gnu -h --owner=0 --group=0 --mode=0644 -cf`` run with the real GNU
  tar; the certificate signed by the real ``openssl dgst -sign`` with a key file made by ``openssl req
  -x509``, as open-vmdk's own signing test makes it); capacity in the chosen unit, truncated as
  ``int(capacity / factor)`` truncates;
* :func:`ovftool` — a VMware ESXi/ovftool export: ``vmw:buildId``, capacity in ``byte * 2^30``, ``vmw:Config``
  inside items and in the hardware section, ``vmw:ExtraConfig`` naming an NVRAM file member, a
  ``vmw:BootOrderSection`` (without ``ovf:required``), vCenter's storage-policy sections
  (``vmw:StorageGroupSection``, ``vmw:StorageSection``, not required); an SHA256 or SHA1 manifest, or old
  ovftool's ``SHA1 (name) = hex``; a USTAR tar (owner ``someone``, uid 64, as ovftool's OVAs list
  **[inferred]**), members ``.ovf``, ``.mf``, disks, NVRAM;
* :func:`virtualbox` — VirtualBox's ``Appliance::i_writeFSOVA`` (ApplianceImplExport.cpp): OVF 1.0 or 2.0
  (then disks are ``StorageItem`` in the ``…CIM_StorageAllocationSettingData.xsd`` namespace), or the legacy
  OVF 0.9 (:func:`virtualbox09_ovf`: generic ``Section``/``Content`` elements with an ``xsi:type``), memory in
  ``MegaBytes``, ``File`` without a size, capacity in bytes, ``vbox:OSType`` and a ``vbox:Machine``
  section; a USTAR tar owned by ``vboxovf09``/``vboxovf10``/``vboxovf20`` (uid 7), mode 0640, members
  ``.ovf``, the disks, then the ``.mf`` last (``RTManifestWriteStandard``: ``SHA256 (name) = hex``, SHA1
  for OVF 0.9 and 1.0), optionally with CRLF line ends (a manifest that passed through Windows);
* :func:`ovirt` — oVirt/RHV's "Export as OVA" (ovirt-engine's ``pack_ova.py`` and ``OvfOvaWriter``): each
  header written alone by ``TarInfo.tobuf(format=tarfile.GNU_FORMAT)`` (float mtime), members ``<vm>.ovf``,
  optional ``tpm.dat`` and ``nvram.dat``, a zero-filled ``pad`` member that puts the first disk's data on a
  4 KiB boundary, then each disk as a member named by its image UUID without extension, a qcow2 written by
  ``qemu-img convert -O qcow2`` cut after its last data and zero-padded so the next member's data starts on
  a 4 KiB boundary, two zero blocks at the end, no manifest; the OVF's default namespace the envelope's
  (``…/envelope/1``, or ``…/envelope/1/`` as older oVirt spells it), an ``ovirt:`` namespace, ``File`` sizes
  that are the volumes' sizes on oVirt's storage (not the members'), capacities in ``byte * 2^30`` rounded
  up, the CIM OS type oVirt maps its own OS id to, and ``BiosType`` in the virtual system.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import uuid
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
_UNITS = {"byte": 1, "byte * 2^10": 1 << 10, "byte * 2^20": MiB, "byte * 2^30": GiB}


def two_disks(directory: Path) -> list[Path]:
    """A boot disk and a data disk as RAW in ``directory`` (made): 2 MiB (the first half data) and 3 MiB
    (data throughout), each beginning with its name: the VM disks the oVirt and XenCenter tests export."""
    directory.mkdir(parents=True, exist_ok=True)
    boot, data = directory / "boot.raw", directory / "data.raw"
    boot.write_bytes(b"boot disk".ljust(MiB, b"\x5a") + bytes(MiB))
    data.write_bytes(b"data disk".ljust(3 * MiB, b"\xa5"))
    return [boot, data]


def stream_vmdk(dst: Path, size: int, *, data: bytes = b"") -> Path:
    """A streamOptimized VMDK of virtual ``size`` whose first bytes are ``data`` (real qemu-img)."""
    raw = dst.with_suffix(".src.raw")
    with open(raw, "wb") as f:
        f.truncate(size)
        f.write(data)
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, dst],
        check=True,
    )
    raw.unlink()
    return dst


def virtual_size(path: Path) -> int:
    out = subprocess.run(
        ["qemu-img", "info", "-f", "vmdk", "--output=json", path], check=True, capture_output=True
    ).stdout
    return int(json.loads(out)["virtual-size"])


def _hex(data: bytes, alg: str) -> str:
    return hashlib.new(alg, data).hexdigest()


# ------------------------------------------------------------------------------------ ova-compose


def ova_compose_ovf(disks: list[Path], name: str, units: str = "byte", firmware: str = "efi") -> bytes:
    """The descriptor ``ova-compose`` writes for a VM with ``disks`` on one SCSI controller (lxml's
    serialisation: single-quoted declaration, the generator comment, two-space indent)."""
    files = "".join(
        f'    <File ovf:href="{d.name}" ovf:id="file{i}" ovf:size="{d.stat().st_size}"/>\n'
        for i, d in enumerate(disks)
    )
    section = "".join(
        f'    <Disk ovf:diskId="vmdisk{i}" ovf:capacity="{int(virtual_size(d) / _UNITS[units])}" '
        f'ovf:capacityAllocationUnits="{units}" ovf:fileRef="file{i}" '
        f'ovf:populatedSize="{d.stat().st_size}" '
        'ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>\n'
        for i, d in enumerate(disks)
    )
    items = "".join(
        f"""      <Item>
        <rasd:AddressOnParent>{i}</rasd:AddressOnParent>
        <rasd:Description>Hard Disk</rasd:Description>
        <rasd:ElementName>disk{i}</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk{i}</rasd:HostResource>
        <rasd:InstanceID>{5 + i}</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
"""
        for i in range(len(disks))
    )
    return f"""<?xml version='1.0' encoding='UTF-8'?>
<!-- Generated by ova-compose 06-12-2026 14:00:00 +0000 -->
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" \
xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" \
xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" \
xmlns:vmw="http://www.vmware.com/schema/ovf" \
xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData">
  <References>
{files}  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
{section}  </DiskSection>
  <NetworkSection>
    <Info>Virtual Networks</Info>
    <Network ovf:name="VM Network">
      <Description>The VM Network Network</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="vm">
    <Info>Virtual System</Info>
    <Name>{name}</Name>
    <OperatingSystemSection ovf:id="100" vmw:osType="other4xLinux64Guest">
      <Info>Operating System</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual Hardware</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-20</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Virtual CPUs</rasd:Description>
        <rasd:ElementName>cpus</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Virtual Memory</rasd:Description>
        <rasd:ElementName>memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>2048</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Description>SCSI Controller</rasd:Description>
        <rasd:ElementName>scsi1</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:Description>Ethernet Adapter</rasd:Description>
        <rasd:ElementName>ethernet1</rasd:ElementName>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="connectable.allowGuestControl" vmw:value="true"/>
        <vmw:Config ovf:required="false" vmw:key="wakeOnLanEnabled" vmw:value="false"/>
      </Item>
{items}      <vmw:ExtraConfig vmw:key="log.rotateSize" vmw:value="2048000"/>
      <vmw:ExtraConfig ovf:required="true" vmw:key="feature.enabled" vmw:value="true"/>
      <vmw:Config ovf:required="false" vmw:key="cpuHotAddEnabled" vmw:value="false"/>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="{firmware}"/>
      <vmw:Config ovf:required="false" vmw:key="bootOptions.efiSecureBootEnabled" vmw:value="false"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
""".encode()


def signing_key(directory: Path) -> Path:
    """A key file holding an RSA key and its self-signed certificate (open-vmdk's signing test)."""
    key = directory / "test_key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-sha256", "-days", "365", "-newkey", "rsa:2048"),
            *("-keyout", key, "-out", key, "-subj", "/CN=Test Certificate"),
        ],
        check=True,
        capture_output=True,
    )
    return key


def ova_compose(
    out: Path,
    disks: list[Path],
    *,
    units: str = "byte",
    checksum: str = "sha256",
    sign_key: Path | None = None,
    firmware: str = "efi",
) -> Path:
    """The OVA ``ova-compose -o out`` writes (module docstring); the disks must lie in one directory."""
    work = out.parent / f"{out.stem}-compose"
    work.mkdir()
    name = out.stem
    (work / f"{name}.ovf").write_bytes(ova_compose_ovf(disks, name, units, firmware))
    members = [f"{name}.ovf", f"{name}.mf"]
    for d in disks:
        (work / d.name).symlink_to(d)
        members.append(d.name)
    lines = [f"{checksum.upper()}({f})= {_hex((work / f).read_bytes(), checksum)}\n" for f in members[:1]]
    lines += [f"{checksum.upper()}({d.name})= {_hex(d.read_bytes(), checksum)}\n" for d in disks]
    (work / f"{name}.mf").write_text("".join(lines))
    if sign_key is not None:
        signature = subprocess.run(
            ["openssl", "dgst", f"-{checksum}", "-sign", sign_key, "-out", "-", f"{name}.mf"],
            cwd=work,
            check=True,
            capture_output=True,
        ).stdout
        pem = sign_key.read_text()
        cert = pem[pem.index("-----BEGIN CERTIFICATE") :]
        cert = cert[: cert.index("-----END CERTIFICATE")] + "-----END CERTIFICATE-----\n"
        (work / f"{name}.cert").write_text(f"{checksum.upper()}({name}.mf)= {signature.hex()}\n{cert}")
        members.append(f"{name}.cert")
    subprocess.run(
        ["tar", "--format=gnu", "-h", "--owner=0", "--group=0", "--mode=0644", "-cf", out, *members],
        cwd=work,
        check=True,
    )
    return out


# ----------------------------------------------------------------------------------------- ovftool


def _tar(out: Path, members: list[tuple[str, bytes]], fmt: int, owner: tuple[int, str], mode: int) -> Path:
    with tarfile.open(out, "w", format=fmt) as tar:
        for name, body in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(body), mode, 1765000000
            ti.uid = ti.gid = owner[0]
            ti.uname = ti.gname = owner[1]
            tar.addfile(ti, io.BytesIO(body))
    return out


def ovftool_ovf(disks: list[Path], name: str, firmware: str = "efi") -> bytes:
    """What ESXi's ovftool export writes for a VM with ``disks`` (capacities in GiB) and an NVRAM file."""
    files = (
        "".join(
            f'    <File ovf:href="{name}-disk{i}.vmdk" ovf:id="file{i}" ovf:size="{d.stat().st_size}"/>\n'
            for i, d in enumerate(disks, 1)
        )
        + f'    <File ovf:href="{name}-file1.nvram" ovf:id="file{len(disks) + 1}" ovf:size="8684"/>\n'
    )
    section = "".join(
        f'    <Disk ovf:capacity="{virtual_size(d) // GiB}" ovf:capacityAllocationUnits="byte * 2^30" '
        f'ovf:diskId="vmdisk{i}" ovf:fileRef="file{i}" '
        'ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" '
        f'ovf:populatedSize="{d.stat().st_size}"/>\n'
        for i, d in enumerate(disks, 1)
    )
    items = "".join(
        f"""      <Item>
        <rasd:AddressOnParent>{i - 1}</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk {i}</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk{i}</rasd:HostResource>
        <rasd:InstanceID>{5 + i}</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="backing.writeThrough" vmw:value="false"/>
      </Item>
"""
        for i in range(1, len(disks) + 1)
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!--Generated by VMware ovftool 4.6.0 (build-21452615), UTC time: 2026-12-06T14:00:00.000Z-->
<Envelope vmw:buildId="build-21452615" xmlns="http://schemas.dmtf.org/ovf/envelope/1" \
xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" \
xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" \
xmlns:vmw="http://www.vmware.com/schema/ovf" \
xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" \
xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
{files}  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
{section}  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network">
      <Description>The VM Network network</Description>
    </Network>
  </NetworkSection>
  <vmw:StorageGroupSection ovf:required="false" vmw:id="group1" vmw:name="vSAN Default Storage Policy">
    <Info>Storage policy for group of disks</Info>
    <vmw:Description>vSAN Default Storage Policy storagepolicy group</vmw:Description>
  </vmw:StorageGroupSection>
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine</Info>
    <Name>{name}</Name>
    <OperatingSystemSection ovf:id="101" vmw:osType="debian11_64Guest">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian GNU/Linux 11 (64-bit)</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-19</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of Virtual CPUs</rasd:Description>
        <rasd:ElementName>2 virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
        <vmw:CoresPerSocket ovf:required="false">1</vmw:CoresPerSocket>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^30</rasd:AllocationUnits>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>4096MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>4</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SCSI Controller</rasd:Description>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="slotInfo.pciSlotNumber" vmw:value="160"/>
      </Item>
{items}      <Item ovf:required="false">
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:ElementName>Video card</rasd:ElementName>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceType>24</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="enable3DSupport" vmw:value="false"/>
        <vmw:Config ovf:required="false" vmw:key="videoRamSizeInKB" vmw:value="8192"/>
      </Item>
      <vmw:Config ovf:required="false" vmw:key="cpuHotAddEnabled" vmw:value="false"/>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="{firmware}"/>
      <vmw:Config ovf:required="false" vmw:key="bootOptions.efiSecureBootEnabled" vmw:value="false"/>
      <vmw:Config ovf:required="false" vmw:key="tools.syncTimeWithHost" vmw:value="false"/>
      <vmw:ExtraConfig ovf:required="false" vmw:key="nvram" vmw:value="ovf:/file/file{len(disks) + 1}"/>
      <vmw:ExtraConfig ovf:required="false" vmw:key="svga.autodetect" vmw:value="TRUE"/>
    </VirtualHardwareSection>
    <vmw:BootOrderSection vmw:instanceId="6" vmw:type="disk">
      <Info>Virtual hardware device boot order</Info>
    </vmw:BootOrderSection>
    <vmw:StorageSection ovf:required="false" vmw:group="group1">
      <Info>Storage policy group reference</Info>
    </vmw:StorageSection>
  </VirtualSystem>
</Envelope>
""".encode()


def ovftool(
    out: Path, disks: list[Path], *, checksum: str = "sha256", spaced: bool = False, firmware: str = "efi"
) -> Path:
    """The OVA ``ovftool vi://host/vm out.ova`` writes (module docstring); ``spaced``: old ovftool's
    ``SHA1 (name) = hex`` manifest lines."""
    name = out.stem
    ovf = ovftool_ovf(disks, name, firmware)
    members = [(f"{name}.ovf", ovf)] + [
        (f"{name}-disk{i}.vmdk", d.read_bytes()) for i, d in enumerate(disks, 1)
    ]
    members.append((f"{name}-file1.nvram", b"NVRAM" + bytes(8679)))
    form = "{alg} ({file}) = {hex}\n" if spaced else "{alg}({file})= {hex}\n"
    mf = "".join(form.format(alg=checksum.upper(), file=n, hex=_hex(b, checksum)) for n, b in members)
    members.insert(1, (f"{name}.mf", mf.encode()))
    return _tar(out, members, tarfile.USTAR_FORMAT, (64, "someone"), 0o644)


# -------------------------------------------------------------------------------------- VirtualBox


def virtualbox_ovf(disks: list[Path], name: str, version: str = "2.0") -> bytes:
    """What VirtualBox's ``Appliance::i_buildXML`` writes for a VM with ``disks`` on its SATA controller."""
    if version == "0.9":
        return virtualbox09_ovf(disks, name)
    ns = "http://schemas.dmtf.org/ovf/envelope/" + version[0]
    extra = (
        ' xmlns:epasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_EthernetPortAllocationSettingData.xsd"'
        ' xmlns:sasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData.xsd"'
        if version == "2.0"
        else ""
    )
    files = "".join(
        f'    <File ovf:id="file{i}" ovf:href="{name}-disk{i:03d}.vmdk"/>\n' for i in range(1, len(disks) + 1)
    )
    section = "".join(
        f'    <Disk ovf:capacity="{virtual_size(d)}" ovf:diskId="vmdisk{i}" ovf:fileRef="file{i}" '
        'ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" '
        f'vbox:uuid="00000000-0000-4000-8000-00000000000{i}"/>\n'
        for i, d in enumerate(disks, 1)
    )
    p, tag = ("sasd", "StorageItem") if version == "2.0" else ("rasd", "Item")
    # OVF 1.0 items carry an ElementName (the caption again); VirtualBox omits it in 2.0
    names = [
        f"\n        <{p}:ElementName>disk{i}</{p}:ElementName>" if version == "1.0" else ""
        for i in range(1, len(disks) + 1)
    ]
    items = "".join(
        f"""      <{tag}>
        <{p}:AddressOnParent>{i - 1}</{p}:AddressOnParent>
        <{p}:Caption>disk{i}</{p}:Caption>
        <{p}:Description>Disk Image</{p}:Description>{names[i - 1]}
        <{p}:HostResource>/disk/vmdisk{i}</{p}:HostResource>
        <{p}:InstanceID>{3 + i}</{p}:InstanceID>
        <{p}:Parent>3</{p}:Parent>
        <{p}:ResourceType>17</{p}:ResourceType>
      </{tag}>
"""
        for i in range(1, len(disks) + 1)
    )
    return f"""<?xml version="1.0"?>
<Envelope ovf:version="{version}" xml:lang="en-US" xmlns="{ns}" xmlns:ovf="{ns}" \
xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" \
xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" \
xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vbox="http://www.virtualbox.org/ovf/machine"{extra}>
  <References>
{files}  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
{section}  </DiskSection>
  <NetworkSection>
    <Info>Logical networks used in the package</Info>
    <Network ovf:name="NAT">
      <Description>Logical network used by this appliance.</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine</Info>
    <OperatingSystemSection ovf:id="96">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian_64</Description>
      <vbox:OSType ovf:required="false">Debian_64</vbox:OSType>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>virtualbox-2.2</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:Caption>1 virtual CPU</rasd:Caption>
        <rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>
        <rasd:Caption>2048 MB of memory</rasd:Caption>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>2048</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>sataController0</rasd:Caption>
        <rasd:Description>SATA Controller</rasd:Description>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>AHCI</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </Item>
{items}    </VirtualHardwareSection>
    <vbox:Machine ovf:required="false" version="1.19-linux" uuid="{{00000000-0000-4000-8000-0000000000aa}}" \
name="{name}" OSType="Debian_64">
      <ovf:Info>Complete VirtualBox machine configuration in VirtualBox format</ovf:Info>
      <Hardware>
        <Memory RAMSize="2048"/>
        <Firmware type="EFI"/>
      </Hardware>
    </vbox:Machine>
  </VirtualSystem>
</Envelope>
""".encode()


def virtualbox09_ovf(disks: list[Path], name: str) -> bytes:
    """What ``Appliance::i_buildXML`` writes in its legacy "OVF 0.9" mode (``OVFVersion_0_9``) for a VM with
    two CPUs, 2048 MB, ``disks`` on its SATA controller, product details, a description and a licence: the
    0.9 envelope namespace, every section a generic ``Section`` (the virtual system a ``Content``) with an
    ``xsi:type``, ``InstanceId`` with a lower-case d, ``BusNumber`` in controller items and no
    ``ElementName`` in items, ``vmx-6`` hardware, the ``#sparse`` format URI for what is a streamOptimized
    VMDK. Its ``ProductSection_Type`` carries no ``ovf:required``: the code's comment shows one, its code
    sets only the type."""
    ns = "http://www.vmware.com/schema/ovf/1/envelope"
    files = "".join(
        f'    <File ovf:id="file{i}" ovf:href="{name}-disk{i:03d}.vmdk"/>\n' for i in range(1, len(disks) + 1)
    )
    section = "".join(
        f'    <Disk ovf:capacity="{virtual_size(d)}" ovf:diskId="vmdisk{i}" ovf:fileRef="file{i}" '
        'ovf:format="http://www.vmware.com/specifications/vmdk.html#sparse" '
        f'vbox:uuid="00000000-0000-4000-8000-00000000000{i}"/>\n'
        for i, d in enumerate(disks, 1)
    )
    items = "".join(
        f"""      <Item>
        <rasd:AddressOnParent>{i - 1}</rasd:AddressOnParent>
        <rasd:Caption>disk{i}</rasd:Caption>
        <rasd:Description>Disk Image</rasd:Description>
        <rasd:HostResource>/disk/vmdisk{i}</rasd:HostResource>
        <rasd:InstanceId>{3 + i}</rasd:InstanceId>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
"""
        for i in range(1, len(disks) + 1)
    )
    return f"""<?xml version="1.0"?>
<Envelope ovf:version="0.9" xml:lang="en-US" xmlns="{ns}" xmlns:ovf="{ns}" \
xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" \
xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" \
xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vbox="http://www.virtualbox.org/ovf/machine">
  <References>
{files}  </References>
  <Section xsi:type="ovf:DiskSection_Type">
    <Info>List of the virtual disks used in the package</Info>
{section}  </Section>
  <Section xsi:type="ovf:NetworkSection_Type">
    <Info>Logical networks used in the package</Info>
    <Network ovf:name="NAT">
      <Description>Logical network used by this appliance.</Description>
    </Network>
  </Section>
  <Content xsi:type="ovf:VirtualSystem_Type" ovf:id="{name}">
    <Info>A virtual machine</Info>
    <Section xsi:type="ovf:ProductSection_Type">
      <Info>Meta-information about the installed software</Info>
      <Product>Build box</Product>
      <Vendor>Example</Vendor>
      <Version>1.0</Version>
    </Section>
    <Section xsi:type="ovf:AnnotationSection_Type">
      <Info>A human-readable annotation</Info>
      <Annotation>Exported from VirtualBox</Annotation>
    </Section>
    <Section xsi:type="ovf:EulaSection_Type">
      <Info>License agreement for the virtual system</Info>
      <License>Use it as you like.</License>
    </Section>
    <Section xsi:type="ovf:OperatingSystemSection_Type" ovf:id="96">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian_64</Description>
      <vbox:OSType ovf:required="false">Debian_64</vbox:OSType>
    </Section>
    <Section xsi:type="ovf:VirtualHardwareSection_Type">
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceId>0</vssd:InstanceId>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-6</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:Caption>2 virtual CPU</rasd:Caption>
        <rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>
        <rasd:Caption>2048 MB of memory</rasd:Caption>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>2048</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:BusNumber>0</rasd:BusNumber>
        <rasd:Caption>sataController0</rasd:Caption>
        <rasd:Description>SATA Controller</rasd:Description>
        <rasd:InstanceId>3</rasd:InstanceId>
        <rasd:ResourceSubType>AHCI</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </Item>
{items}    </Section>
    <vbox:Machine ovf:required="false" version="1.19-linux" uuid="{{00000000-0000-4000-8000-0000000000aa}}" \
name="{name}" OSType="Debian_64">
      <ovf:Info>Complete VirtualBox machine configuration in VirtualBox format</ovf:Info>
      <Hardware>
        <Memory RAMSize="2048"/>
      </Hardware>
    </vbox:Machine>
  </Content>
</Envelope>
""".encode()


def virtualbox(out: Path, disks: list[Path], *, version: str = "2.0", crlf: bool = False) -> Path:
    """The OVA VirtualBox's "Export Appliance" writes (module docstring)."""
    name = out.stem
    members = [(f"{name}.ovf", virtualbox_ovf(disks, name, version))]
    members += [(f"{name}-disk{i:03d}.vmdk", d.read_bytes()) for i, d in enumerate(disks, 1)]
    alg = "SHA256" if version == "2.0" else "SHA1"
    end = "\r\n" if crlf else "\n"
    mf = "".join(f"{alg} ({n}) = {_hex(b, alg.lower())}{end}" for n, b in members)
    members.append((f"{name}.mf", mf.encode()))
    owner = f"vboxovf{version[0]}{version[2]}"
    return _tar(out, members, tarfile.USTAR_FORMAT, (7, owner), 0o640)


# ------------------------------------------------------------------------------ an extension added


#: where :func:`with_extension` puts the element: before what, in the descriptor
EXTENSION_PLACES = {
    "Envelope": b"<VirtualSystem ",
    "VirtualSystem": b"</VirtualSystem>",
    "VirtualHardwareSection": b"</VirtualHardwareSection>",
    # OVF 0.9 (VirtualBox's legacy export): the virtual system is a generic Content element
    "Content": b"</Content>",
    "Envelope 0.9": b"<Content ",
}


def extension(required: str | None) -> bytes:
    """An extension section of a namespace no importer knows (keys for encrypted disks: a consumer
    that ignored it would import ciphertext), with ``ovf:required`` set to ``required`` (None: absent,
    that is true)."""
    attribute = f' ovf:required="{required}"' if required is not None else ""
    return (
        f'<ext:DiskKeySection xmlns:ext="http://example.com/ovf/disk-keys"{attribute}>'
        '<Info>Keys of the encrypted disks</Info><ext:Key ext:disk="vmdisk1">00ff</ext:Key>'
        "</ext:DiskKeySection>\n"
    ).encode()


def with_extension(ova: Path, out: Path, where: str, element: bytes) -> Path:
    """``ova`` with ``element`` added to its descriptor's ``where`` (:data:`EXTENSION_PLACES`), its
    manifest written again with the descriptor's new digest (in its own algorithm and line form), the
    members in their order: what the producer would have written with that extension."""
    with tarfile.open(ova) as tar:
        members = [(ti, tar.extractfile(ti).read()) for ti in tar]  # type: ignore[union-attr]
    descriptors = [body for ti, body in members if ti.name.endswith(".ovf")]
    [old] = descriptors
    before = EXTENSION_PLACES[where]
    at = old.index(before)
    new = old[:at] + element + old[at:]
    edited = []
    for ti, body in members:
        if ti.name.endswith(".ovf"):
            body = new
        elif ti.name.endswith(".mf"):
            text = body.decode()
            for alg in ("sha1", "sha256", "sha512"):
                text = text.replace(_hex(old, alg), _hex(new, alg))
            body = text.encode()
        ti.size = len(body)
        edited.append((ti, body))
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        for ti, body in edited:
            tar.addfile(ti, io.BytesIO(body))
    return out


# ------------------------------------------------------------------------------------- oVirt / RHV

#: the envelope namespace of newer oVirt; older oVirt (and RHEV export domains) add a trailing slash
OVIRT_OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"
#: the ``ovf:format`` oVirt gives a qcow2 disk
QCOW_FORMAT = "http://www.gnome.org/~markmc/qcow-image-format.html"
_TAR_BLOCK, _FS_BLOCK = 512, 4096


def _ovirt_ids(name: str, i: int) -> tuple[str, str]:
    """``(disk id, image id)`` of the ``i``-th disk of VM ``name``: UUIDs, stable across runs."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{name}/disk/{i}")), str(
        uuid.uuid5(uuid.NAMESPACE_URL, f"{name}/image/{i}")
    )


def ovirt_ovf(
    disks: list[tuple[int, int]],
    name: str,
    *,
    namespace: str = OVIRT_OVF_NS,
    extra_files: dict[str, int] | None = None,
    os_id: int = 80,
    bios_type: int | None = 2,
    extension: bytes = b"",
    boot_disk: int = 1,
) -> bytes:
    """What ``OvfOvaVmWriter`` writes for a VM with ``disks``, each ``(size on oVirt's storage, capacity in
    GiB)``; ``extra_files``: ``tpm.dat``/``nvram.dat`` and their sizes, referenced by no disk;
    ``bios_type``: oVirt 4.3's numbering (0 i440fx SeaBIOS, 1 q35 SeaBIOS, 2 q35 UEFI, 3 q35 SecureBoot);
    ``extension``: an element added at the end of the virtual system (:func:`extension`); ``boot_disk``: the
    disk (from 1) marked ``ovf:boot="true"``."""
    files, section, items = "", "", ""
    for i, (stored, gib) in enumerate(disks, 1):
        disk_id, image_id = _ovirt_ids(name, i)
        files += f'    <File ovf:href="{image_id}" ovf:id="{image_id}" ovf:size="{stored}"/>\n'
        section += (
            f'    <Disk ovf:diskId="{disk_id}" ovf:capacity="{gib}" '
            f'ovf:capacityAllocationUnits="byte * 2^30" ovf:populatedSize="{stored}" ovf:parentRef="" '
            f'ovf:fileRef="{image_id}" ovf:format="{QCOW_FORMAT}" '
            'ovf:volume-format="COW" ovf:volume-type="Sparse" ovf:disk-interface="VirtIO_SCSI" '
            f'ovf:boot="{str(i == boot_disk).lower()}" ovf:pass-discard="false" '
            f'ovf:disk-alias="{name}_Disk{i}" ovf:disk-description="" ovf:wipe-after-delete="false" '
            'ovf:description="" ovf:disk_storage_type="IMAGE" ovf:cinder_volume_type=""/>\n'
        )
        items += f"""      <Item>
        <rasd:Caption>{name}_Disk{i}</rasd:Caption>
        <rasd:InstanceID>{image_id}</rasd:InstanceID>
        <rasd:ResourceType>17</rasd:ResourceType>
        <rasd:HostResource>ovf:/disk/{disk_id}</rasd:HostResource>
        <rasd:Parent>00000000-0000-0000-0000-000000000000</rasd:Parent>
        <rasd:Template>00000000-0000-0000-0000-000000000000</rasd:Template>
        <rasd:ApplicationList></rasd:ApplicationList>
        <rasd:StorageId>5d9d2f72-0b6a-4c3e-9a55-{i:012d}</rasd:StorageId>
        <rasd:StoragePoolId>00000000-0000-0000-0000-000000000000</rasd:StoragePoolId>
        <rasd:CreationDate>2026/12/01 10:00:00</rasd:CreationDate>
        <rasd:LastModified>2026/12/01 10:00:00</rasd:LastModified>
        <rasd:last_modified_date>2026/12/01 10:00:00</rasd:last_modified_date>
        <Type>disk</Type>
        <Device>disk</Device>
        <Address></Address>
        <BootOrder>{1 if i == boot_disk else 0}</BootOrder>
        <IsPlugged>true</IsPlugged>
        <IsReadOnly>false</IsReadOnly>
        <Alias></Alias>
      </Item>
"""
    for href, size in (extra_files or {}).items():
        files += f'    <File ovf:href="{href}" ovf:id="{href}" ovf:size="{size}"/>\n'
    if "tpm.dat" in (extra_files or {}):  # the TPM device: an item of oVirt's "other" type naming its file
        items += """      <Item>
        <rasd:Caption>TPM</rasd:Caption>
        <rasd:ResourceType>0</rasd:ResourceType>
        <rasd:InstanceID>8c0e2f7e-2b1f-4c55-9d1e-2f6f4e6a1b10</rasd:InstanceID>
        <rasd:HostResource>ovf:/file/tpm.dat</rasd:HostResource>
        <Type>tpm</Type>
        <Device>tpm</Device>
        <Address></Address>
        <BootOrder>0</BootOrder>
        <IsPlugged>true</IsPlugged>
        <IsReadOnly>false</IsReadOnly>
        <Alias></Alias>
      </Item>
"""
    bios = f"    <BiosType>{bios_type}</BiosType>\n" if bios_type is not None else ""
    return f"""<?xml version='1.0' encoding='UTF-8'?>
<ovf:Envelope xmlns:ovf="{namespace}" \
xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" \
xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" \
xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns="{namespace}" \
xmlns:ovirt="http://www.ovirt.org/ovf" ovf:version="4.4.0.0">
  <References>
{files}  </References>
  <NetworkSection>
    <Info>List of networks</Info>
    <Network ovf:name="ovirtmgmt"></Network>
  </NetworkSection>
  <DiskSection>
    <Info>List of Virtual Disks</Info>
{section}  </DiskSection>
  <VirtualSystem ovf:id="{uuid.uuid5(uuid.NAMESPACE_URL, name)}">
    <Name>{name}</Name>
    <Description></Description>
    <Comment></Comment>
    <CreationDate>2026/12/01 10:00:00</CreationDate>
    <ExportDate>2026/12/06 14:00:00</ExportDate>
    <DeleteProtected>false</DeleteProtected>
    <SsoMethod>guest_agent</SsoMethod>
    <IsSmartcardEnabled>false</IsSmartcardEnabled>
    <NumOfIoThreads>1</NumOfIoThreads>
    <TimeZone>Etc/GMT</TimeZone>
    <default_boot_sequence>0</default_boot_sequence>
    <Generation>1</Generation>
    <ClusterCompatibilityVersion>4.7</ClusterCompatibilityVersion>
    <VmType>1</VmType>
    <ResumeBehavior>AUTO_RESUME</ResumeBehavior>
    <MinAllocatedMem>2048</MinAllocatedMem>
    <IsStateless>false</IsStateless>
    <IsRunAndPause>false</IsRunAndPause>
    <AutoStartup>false</AutoStartup>
    <Priority>1</Priority>
    <CustomEmulatedMachine></CustomEmulatedMachine>
{bios}    <CustomCpuName></CustomCpuName>
    <PredefinedProperties></PredefinedProperties>
    <UserDefinedProperties></UserDefinedProperties>
    <MaxMemorySizeMb>8192</MaxMemorySizeMb>
    <MultiQueuesEnabled>true</MultiQueuesEnabled>
    <VirtioScsiMultiQueuesEnabled>false</VirtioScsiMultiQueuesEnabled>
    <UseHostCpu>false</UseHostCpu>
    <BalloonEnabled>true</BalloonEnabled>
    <CpuPinningPolicy>0</CpuPinningPolicy>
    <TemplateId>00000000-0000-0000-0000-000000000000</TemplateId>
    <IsInitilized>true</IsInitilized>
    <Origin>3</Origin>
    <DefaultDisplayType>2</DefaultDisplayType>
    <TrustedService>false</TrustedService>
    <OriginalTemplateId>00000000-0000-0000-0000-000000000000</OriginalTemplateId>
    <OriginalTemplateName>Blank</OriginalTemplateName>
    <UseLatestVersion>false</UseLatestVersion>
    <OperatingSystemSection ovf:id="{os_id}" ovirt:id="24" ovf:required="false">
      <Info>Guest Operating System</Info>
      <Description>rhel_8x64</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>2 CPU, 2048 Memory</Info>
      <System>
        <vssd:VirtualSystemType>ENGINE 4.4.0.0</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:Caption>2 virtual cpu</rasd:Caption>
        <rasd:Description>Number of virtual CPU</rasd:Description>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:num_of_sockets>2</rasd:num_of_sockets>
        <rasd:cpu_per_socket>1</rasd:cpu_per_socket>
        <rasd:threads_per_cpu>1</rasd:threads_per_cpu>
        <rasd:max_num_of_vcpus>16</rasd:max_num_of_vcpus>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Caption>2048 MB of memory</rasd:Caption>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>
        <rasd:VirtualQuantity>2048</rasd:VirtualQuantity>
      </Item>
{items}    </VirtualHardwareSection>
{extension.decode()}  </VirtualSystem>
</ovf:Envelope>
""".encode()


def _gnu_header(name: str, size: int) -> bytes:
    """One member's header as ``pack_ova.py`` writes it: alone, GNU format, the export's float mtime."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime = size, 1765000000.25
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _block_pad(length: int) -> bytes:
    return bytes(-length % _TAR_BLOCK)


def ovirt(
    out: Path,
    disks: list[Path],
    *,
    namespace: str = OVIRT_OVF_NS,
    tpm: bool = False,
    nvram: bool = False,
    os_id: int = 80,
    bios_type: int | None = 2,
    capacities: list[int] | None = None,
    extension: bytes = b"",
    boot_disk: int = 1,
) -> Path:
    """The OVA oVirt's "Export as OVA" writes for a VM whose disks are the RAW files ``disks`` (module
    docstring); ``capacities``: the GiB the descriptor gives each disk (default: its size rounded up);
    ``extension``, ``boot_disk``: as :func:`ovirt_ovf`'s."""
    name = out.stem
    work = out.parent / f"{out.stem}-ovirt"
    work.mkdir()
    members: list[tuple[str, bytes]] = []
    facts = []
    for i, raw in enumerate(disks, 1):
        qcow = work / f"disk{i}.qcow2"
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, qcow], check=True)
        vsize = raw.stat().st_size
        # oVirt's File size is the volume's on its storage domain (here: the RAW source), not the member
        gib = capacities[i - 1] if capacities is not None else -(-vsize // GiB)
        facts.append((vsize + 3 * MiB, gib))
        members.append((_ovirt_ids(name, i)[1], qcow.read_bytes()))
    extra = {}
    if tpm:
        extra["tpm.dat"] = "dHBtIHN0YXRlIG9mIHRoZSB2bQ=="
    if nvram:
        extra["nvram.dat"] = "bnZyYW0gb2YgdGhlIHVlZmkgdm0="
    ovf = ovirt_ovf(
        facts, name, namespace=namespace, extra_files={k: len(v) for k, v in extra.items()},
        os_id=os_id, bios_type=bios_type, extension=extension, boot_disk=boot_disk,
    )  # fmt: skip
    with open(out, "wb") as f:
        for member, body in [(f"{name}.ovf", ovf), *((k, v.encode()) for k, v in extra.items())]:
            f.write(_gnu_header(member, len(body)) + body + _block_pad(len(body)))
        at = (f.tell() + _TAR_BLOCK) % _FS_BLOCK
        if at:  # a "pad" member whose end puts the first disk's data on a 4 KiB boundary
            size = _FS_BLOCK - at - _TAR_BLOCK
            f.write(_gnu_header("pad", size) + bytes(size))
        for member, body in members:
            # the qcow2 cut after its last data, zeros up to where the next member's data is 4 KiB aligned
            size = -(-(len(body) + _TAR_BLOCK) // _FS_BLOCK) * _FS_BLOCK - _TAR_BLOCK
            f.write(_gnu_header(member, size) + body + bytes(size - len(body)))
        f.write(bytes(2 * _TAR_BLOCK))
    return out
