"""OVAs as Citrix Hypervisor / XenServer / XCP-ng write them (XenCenter's or XCP-ng Center's "Export" →
"OVF/OVA package", whose code is XenOvf), for the interop tests of the OVA importer.

:func:`xencenter` rebuilds what ``ExportApplianceAction`` and ``OVF.ConvertOVFtoOVA`` write for one VM:

* the descriptor (:func:`xencenter_ovf`) serialised by .NET's ``XmlSerializer`` to a UTF-16 string, so its
  declaration says ``encoding="utf-16"``, then saved with a default ``StreamWriter``: UTF-8 bytes, no
  byte-order mark, on one line; the OVF 1.0 envelope namespace as ``ovf:`` with Citrix's ``xenovf:``
  (``http://schemas.citrix.com/ovf/envelope/1``) and the others XenOvf declares; named sections;
* one ``File`` per disk whose ``ovf:id`` is also the disk's ``diskId`` and ``fileRef``, ``ovf:href`` the
  VDI's UUID with ``.vhd``, ``ovf:size`` the VDI's ``physical_utilisation`` (not the member's size);
  ``Disk`` capacity in bytes without units, ``ovf:format`` Microsoft's VHD specification URL, the VBD's
  ``bootable`` flag as ``xenovf:isBootable="true"`` (absent when false);
* disk items of ``ResourceType`` 19 ("Hard Disk Image") in the VBDs' order, ``HostResource``
  ``ovf:/disk/ID``, ``Connection`` ``ID,device=N``; CPUs; memory in ``byte * 2^20``; a CD drive (16); the
  OS section's ``ovf:id`` the CIM number XenOvf matches the guest's OS name to; the Xen settings as
  ``xenovf:VirtualSystemOtherConfigurationData`` (``HVM_boot_policy``, ``HVM_boot_params`` with
  ``firmware=uefi`` for a UEFI VM, ``platform``), without ``ovf:required``;
* the disks: dynamic VHDs (XAPI's ``export_raw_vdi`` with ``format=vhd``, written by ``vhd-tool``, whose
  footer's creator application is ``caml``, so a reader takes the footer's size, not the CHS geometry's);
* the tar (SharpZipLib's ``TarOutputStream``, GNU headers): ``<name>.ovf``, ``<name>.mf`` (``SHA256(file)=
  hex`` lines, CRLF, the descriptor then the disks), ``<name>.cert`` when signed, the disks in
  ``References`` order; compressed: the whole tar gzipped as ``<name>.ova.gz``;
* signed: ``<name>.cert`` holds ``SHA256(<name>.mf)= hex`` (RSA PKCS#1 v1.5 by
  ``RSACryptoServiceProvider.SignData`` over the manifest's SHA-256 digest, so of the digest's digest), or,
  for a certificate signed with SHA-1, ``SHA1(<name>.mf)= hex`` (``SignHash`` of the manifest's digest),
  then the certificate between PEM lines as the base64 of ``X509ContentType.SerializedCert`` (a Windows
  certificate store element: properties, each ``propID, 1, cb`` little-endian then ``cb`` bytes, the DER
  certificate as property 32), on one line;
* encrypted (XenOvf's ``Security.Encrypt``, hidden in today's wizard): the disks' bytes replaced by
  ciphertext and a ``SecuritySection`` of the OVF namespace listing them (``wsse:Security``,
  ``xenc:ReferenceList``/``DataReference``, ``xenc:EncryptionMethod`` AES-192-CBC).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import struct
import subprocess
import tarfile
import tempfile
import uuid
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

XENOVF_NS = "http://schemas.citrix.com/ovf/envelope/1"
#: the ``ovf:format`` XenOvf gives every VHD disk
VHD_FORMAT = "http://www.microsoft.com/technet/virtualserver/downloads/vhdspec.mspx"
_FOOTER = 512


def _uuid(name: str, what: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"xen/{name}/{what}"))


def xapi_vhd(raw: Path, dst: Path) -> Path:
    """``raw`` as the dynamic VHD XAPI exports (real ``qemu-img``, the footer's size exact, its creator
    application then made ``vhd-tool``'s ``caml`` in both footer copies, the checksum recomputed)."""
    options = ["-O", "vpc", "-o", "subformat=dynamic,force_size=on"]
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", *options, raw, dst], check=True)
    size = dst.stat().st_size
    with open(dst, "r+b") as f:
        for at in (0, size - _FOOTER):
            f.seek(at)
            footer = bytearray(f.read(_FOOTER))
            assert footer[:8] == b"conectix"
            footer[28:32] = b"caml"
            footer[64:68] = bytes(4)
            footer[64:68] = struct.pack(">I", ~sum(footer) & 0xFFFFFFFF)
            f.seek(at)
            f.write(footer)
    return dst


def xencenter_ovf(
    name: str,
    disks: list[tuple[str, int, int, bool]],
    *,
    firmware: str | None = "uefi",
    os_id: int = 93,
    os_name: str = "Ubuntu 22.04.3 LTS",
    security: str = "",
) -> bytes:
    """The descriptor XenOvf writes for VM ``name`` whose VBDs hold ``disks``, each ``(href,
    physical_utilisation, virtual_size, bootable)``; ``firmware``: ``firmware=`` of ``HVM_boot_params``
    (None: no such key); ``security``: a ``SecuritySection`` for encrypted disks
    (:func:`security_section`)."""
    files, section, items = "", "", ""
    for i, (href, used, size, bootable) in enumerate(disks):
        did = _uuid(name, f"disk{i}")
        files += f'<ovf:File ovf:id="{did}" ovf:href="{href}" ovf:size="{used}" />'
        boot = 'xenovf:isBootable="true" ' if bootable else ""
        section += (
            f'<ovf:Disk {boot}ovf:diskId="{did}" ovf:fileRef="{did}" ovf:capacity="{size}" '
            f'ovf:format="{VHD_FORMAT}" />'
        )
        items += (
            f"<ovf:Item><rasd:AddressOnParent>{i}</rasd:AddressOnParent>"
            "<rasd:AllocationUnits>Disk</rasd:AllocationUnits><rasd:AutomaticAllocation>true"
            "</rasd:AutomaticAllocation><rasd:Caption>Hard Disk Image</rasd:Caption>"
            f"<rasd:Connection>{did},device={i}</rasd:Connection><rasd:ConsumerVisibility>3"
            f"</rasd:ConsumerVisibility><rasd:Description>{name} disk {i}</rasd:Description>"
            f"<rasd:ElementName>{name} {i}</rasd:ElementName><rasd:HostResource>ovf:/disk/{did}"
            f"</rasd:HostResource><rasd:InstanceID>{did}</rasd:InstanceID><rasd:Limit>1</rasd:Limit>"
            "<rasd:MappingBehavior>0</rasd:MappingBehavior><rasd:ResourceSubType>Virtual Hard Disk Image"
            "</rasd:ResourceSubType><rasd:ResourceType>19</rasd:ResourceType><rasd:VirtualQuantity>1"
            "</rasd:VirtualQuantity><rasd:Weight>100</rasd:Weight></ovf:Item>"
        )
    params = "order=cd" + (f";firmware={firmware}" if firmware else "")
    other = "".join(
        f'<xenovf:VirtualSystemOtherConfigurationData id="{_uuid(name, key)}" Name="{key}"><xenovf:Info>'
        f"{info}</xenovf:Info><xenovf:Value>{value}</xenovf:Value></xenovf:VirtualSystemOtherConfigurationData>"
        for key, value, info in (
            ("HVM_boot_params", params, "HVM Boot Parameters"),
            ("HVM_boot_policy", "BIOS order", "HVM Boot Policy"),
            ("platform", "timeoffset=0;device-model=qemu-upstream-uefi;viridian=false;apic=true;acpi=1",
             "XCP-ng Platform Information"),
            ("hardware_platform_version", "2", "XCP-ng Specific Information"),
        )
    )  # fmt: skip
    vs = _uuid(name, "vs")
    return (
        '<?xml version="1.0" encoding="utf-16"?><ovf:Envelope xmlns:xenovf="http://schemas.citrix.com/ovf/'
        'envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocation'
        'SettingData" xmlns:xenc="http://www.w3.org/2001/04/xmlenc#" xmlns:wsu="http://docs.oasis-open.org/'
        'wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd" xmlns:wsse="http://docs.oasis-open.org/wss/'
        '2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd" xmlns:xsi="http://www.w3.org/2001/XMLSchema-'
        'instance" xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" xmlns:xs="http://www.w3.org/2001/'
        'XMLSchema" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSetting'
        'Data" xmlns:ds="http://www.w3.org/2000/09/xmldsig#" xml:lang="en-US" '
        f'xenovf:Name="{name}" xenovf:id="{_uuid(name, "envelope")}" xenovf:version="1.0.0" '
        f'xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><ovf:References>{files}</ovf:References>'
        f"<ovf:DiskSection><ovf:Info>Available Disks</ovf:Info>{section}</ovf:DiskSection>"
        "<ovf:NetworkSection><ovf:Info>List of networks</ovf:Info>"
        f'<ovf:Network ovf:name="{_uuid(name, "net")}"><ovf:Description>Pool-wide network associated with '
        "eth0</ovf:Description></ovf:Network></ovf:NetworkSection>"
        f'{security}<ovf:StartupSection><ovf:Info>Startup Options</ovf:Info><ovf:Item ovf:id="{vs}" '
        f'ovf:order="0" ovf:startDelay="0" ovf:stopDelay="0" /></ovf:StartupSection>'
        f'<ovf:VirtualSystem ovf:id="{vs}"><ovf:Info>{name}</ovf:Info><ovf:Name>{name}</ovf:Name>'
        f'<ovf:OperatingSystemSection ovf:id="{os_id}"><ovf:Info>Version: 22.4</ovf:Info><ovf:Description>'
        f"{os_name}</ovf:Description></ovf:OperatingSystemSection>"
        f'<ovf:VirtualHardwareSection xenovf:Id="{_uuid(name, "vhs")}"><ovf:Info>Virtual Hardware '
        f"Requirements: 2048 MB RAM; 2 CPU(s), {len(disks)} Disk(s), 1 Network(s)</ovf:Info><ovf:System>"
        "<vssd:Caption>Xen Virtual Machine</vssd:Caption><vssd:Description>XenOVF imported system."
        f"</vssd:Description><vssd:ElementName>{name}</vssd:ElementName><vssd:InstanceID>"
        f"{_uuid(name, 'vssd')}</vssd:InstanceID><vssd:VirtualSystemIdentifier>{_uuid(name, 'vsi')}"
        "</vssd:VirtualSystemIdentifier><vssd:VirtualSystemType>hvm-3.0-unknown</vssd:VirtualSystemType>"
        "</ovf:System><ovf:Item><rasd:AllocationUnits>Processor Cores</rasd:AllocationUnits>"
        "<rasd:AutomaticAllocation>true</rasd:AutomaticAllocation><rasd:Caption>Processor</rasd:Caption>"
        "<rasd:ConsumerVisibility>0</rasd:ConsumerVisibility><rasd:Description>Processor</rasd:Description>"
        f"<rasd:ElementName>Processor</rasd:ElementName><rasd:InstanceID>{_uuid(name, 'cpu')}"
        "</rasd:InstanceID><rasd:Limit>2</rasd:Limit><rasd:MappingBehavior>0</rasd:MappingBehavior>"
        "<rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity>"
        "<rasd:Weight>100</rasd:Weight></ovf:Item><ovf:Item><rasd:AllocationUnits>byte * 2^20"
        "</rasd:AllocationUnits><rasd:AutomaticAllocation>true</rasd:AutomaticAllocation><rasd:Caption>"
        "Memory</rasd:Caption><rasd:ConsumerVisibility>2</rasd:ConsumerVisibility><rasd:Description>Memory "
        f"Setting Data</rasd:Description><rasd:ElementName>Memory</rasd:ElementName><rasd:InstanceID>"
        f"{_uuid(name, 'mem')}</rasd:InstanceID><rasd:Limit>128</rasd:Limit><rasd:MappingBehavior>0"
        "</rasd:MappingBehavior><rasd:ResourceSubType>Machine Memory</rasd:ResourceSubType>"
        "<rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>2048</rasd:VirtualQuantity><rasd:Weight>0</rasd:Weight>"
        "</ovf:Item><ovf:Item><rasd:AddressOnParent>3</rasd:AddressOnParent><rasd:Caption>DVD Drive"
        "</rasd:Caption><rasd:Connection>device=3</rasd:Connection><rasd:ElementName>DVD Drive"
        f"</rasd:ElementName><rasd:InstanceID>{_uuid(name, 'cd')}</rasd:InstanceID><rasd:ResourceType>16"
        f"</rasd:ResourceType></ovf:Item>{items}{other}</ovf:VirtualHardwareSection></ovf:VirtualSystem>"
        "</ovf:Envelope>"
    ).encode()


def security_section(name: str, count: int) -> str:
    """The ``SecuritySection`` XenOvf's ``Security.Encrypt`` adds for the first ``count`` disks' files."""
    refs = "".join(
        f'<xenc:DataReference ValueType="{_uuid(name, f"disk{i}")}" URI="#{_uuid(name, f"disk{i}")}" />'
        for i in range(count)
    )
    return (
        "<ovf:SecuritySection><ovf:Info>Encrypted Content Definition</ovf:Info><wsse:Security "
        f'wsu:Id="xen_{_uuid(name, "security")}" xenovf:version="1.3.1"><xenc:ReferenceList>{refs}'
        '</xenc:ReferenceList><xenc:EncryptionMethod Algorithm="http://www.w3.org/2001/04/xmlenc#aes192-cbc">'
        "<xenc:KeySize>0</xenc:KeySize></xenc:EncryptionMethod><xenc:EncryptedData><xenc:CipherData>"
        "<xenc:CipherValue>q83vEjRWeJA=</xenc:CipherValue></xenc:CipherData></xenc:EncryptedData>"
        "</wsse:Security></ovf:SecuritySection>"
    )


def xen_signing_key(algorithm: str = "sha256") -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """An RSA key and its self-signed certificate, signed with ``algorithm`` (``sha256`` or ``sha1``), as
    the one a XenCenter user signs with (XenCenter signs with the certificate's algorithm); made by the
    real ``openssl req -x509`` (``cryptography`` no longer signs a certificate with SHA-1)."""
    with tempfile.TemporaryDirectory() as work:
        pem = Path(work) / "key.pem"
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-nodes", f"-{algorithm}", "-days", "9", "-newkey", "rsa:2048"),
                *("-keyout", pem, "-out", pem, "-subj", "/CN=XenCenter Test Signer"),
            ],
            check=True,
            capture_output=True,
        )
        body = pem.read_bytes()
    key = serialization.load_pem_private_key(body, None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key, x509.load_pem_x509_certificate(body)


def serialized_cert(cert: x509.Certificate) -> bytes:
    """``X509Certificate2.Export(X509ContentType.SerializedCert)``: a certificate store element, its
    SHA-1 hash property (3) then the DER certificate (32), each ``propID, 1, cb`` then the bytes."""
    der = cert.public_bytes(serialization.Encoding.DER)
    out = b""
    for prop, data in ((3, hashlib.sha1(der).digest()), (32, der)):
        out += struct.pack("<III", prop, 1, len(data)) + data
    return out


def xencenter(
    out: Path,
    disks: list[Path],
    *,
    bootable: list[bool] | None = None,
    firmware: str | None = "uefi",
    manifest: bool = True,
    sign: tuple[rsa.RSAPrivateKey, x509.Certificate] | None = None,
    tamper: bool = False,
    encrypt: bool = False,
    compress: bool = False,
) -> Path:
    """The OVA XenCenter exports for a VM whose VBDs hold the RAW ``disks`` in that order (module
    docstring); ``bootable``: each VBD's flag (default: the first only); ``sign``: a key and certificate
    (:func:`xen_signing_key`); ``tamper``: the manifest changed after it was signed; ``encrypt``: the disks
    encrypted (random bytes of their length here) and listed in a ``SecuritySection``; ``compress``: the
    tar gzipped, written to ``out`` with ``.gz`` added (returned)."""
    name = out.stem
    work = out.parent / f"{name}-xen"
    work.mkdir()
    flags = bootable if bootable is not None else [i == 0 for i in range(len(disks))]
    members: list[tuple[str, bytes]] = []
    facts = []
    for i, raw in enumerate(disks):
        href = f"{_uuid(name, f'vdi{i}')}.vhd"
        body = xapi_vhd(raw, work / href).read_bytes()
        if encrypt:
            body = os.urandom(len(body))
        # physical_utilisation: what the VDI takes on its SR (here the RAW source's size), not the VHD
        facts.append((href, raw.stat().st_size + (1 << 20), raw.stat().st_size, flags[i]))
        members.append((href, body))
    security = security_section(name, len(disks)) if encrypt else ""
    ovf = xencenter_ovf(name, facts, firmware=firmware, security=security)
    head = [(f"{name}.ovf", ovf)]
    if manifest or sign is not None:
        lines = [f"SHA256({n})= {hashlib.sha256(b).hexdigest()}\r\n" for n, b in [*head, *members]]
        mf = "".join(lines).encode("ascii")
        head.append((f"{name}.mf", mf))
        if sign is not None:
            key, cert = sign
            if cert.signature_hash_algorithm is not None and cert.signature_hash_algorithm.name == "sha1":
                # SignHash given the manifest's SHA-1 digest: a signature of the manifest itself
                alg, signature = "SHA1", key.sign(mf, padding.PKCS1v15(), hashes.SHA1())
            else:  # SignData given the SHA-256 digest: a signature of the digest
                alg = "SHA256"
                signature = key.sign(hashlib.sha256(mf).digest(), padding.PKCS1v15(), hashes.SHA256())
            pem = base64.b64encode(serialized_cert(cert)).decode("ascii")
            body = (
                f"{alg}({name}.mf)= {signature.hex()}\r\n-----BEGIN CERTIFICATE-----\r\n{pem}\r\n"
                "-----END CERTIFICATE-----\r\n"
            ).encode("ascii")
            if tamper:  # the manifest edited after signing: a line added
                head[1] = (f"{name}.mf", mf + b"SHA256(extra.iso)= " + b"0" * 64 + b"\r\n")
            head.append((f"{name}.cert", body))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for member, body in [*head, *members]:
            info = tarfile.TarInfo(member)
            info.size, info.mtime, info.mode = len(body), 1765000000, 0o644
            tar.addfile(info, io.BytesIO(body))
    if compress:
        out = out.with_name(out.name + ".gz")
        out.write_bytes(gzip.compress(buf.getvalue()))
    else:
        out.write_bytes(buf.getvalue())
    return out
