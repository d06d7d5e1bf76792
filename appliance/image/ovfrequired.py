"""The ``ovf:required`` rule of an untrusted OVF descriptor: the extensions a package demands that this
importer does not understand refuse it (``Ova.UnsupportedSection``).

OVF (DSP0243) lets a producer add elements of its own namespace to the envelope, to a virtual system (or
collection) and to a virtual hardware section, each with an ``ovf:required`` attribute whose default is
true; a consumer that meets a required extension it does not understand must refuse the package rather
than deploy something other than what the producer described. :func:`check_required` applies that rule to
the children of ``Envelope``, ``VirtualSystem``, ``VirtualSystemCollection`` and ``VirtualHardwareSection``;
it runs in the confined parser child with the rest of :func:`appliance.image.ovf.parse`.

A section may also be written in the generic form the OVF schema allows wherever a section may be, and
that OVF 0.9 (VirtualBox's legacy export, old VMware tools) uses throughout:
``<Section xsi:type="ovf:DiskSection_Type">``, a virtual system as
``<Content xsi:type="ovf:VirtualSystem_Type">``. :func:`section_name` says which section such an element
is (``DiskSection``), so the reader and this rule treat it as the named form; a generic section of a type
the specification does not define (:data:`OVF_SECTIONS`), or with no type, is an extension like any
other: refused when required, skipped when ``ovf:required="false"``.

What counts as understood:

* every element of the OVF namespace (``…/envelope/1``, also with older oVirt's trailing slash,
  ``…/envelope/2`` and 0.9's ``http://www.vmware.com/schema/ovf/1/envelope``) but a generic section of another
  type: the importer reads ``References``, ``DiskSection``, ``VirtualSystem``, ``OperatingSystemSection`` and
  ``VirtualHardwareSection``, and may safely ignore the other sections the specification defines, because they
  describe how to deploy and run the VM, not what its disks hold, and an image import deploys nothing:
  ``NetworkSection`` and ``ResourceAllocationSection`` (networks and reservations of the target host),
  ``ProductSection`` (properties handed to the guest at deployment), ``EulaSection`` and ``AnnotationSection``
  (texts for a person), ``StartupSection`` and ``InstallSection`` (power-on order, a first boot that
  installs), ``DeploymentOptionSection`` (configurations to choose from), ``Strings`` (translations). A
  section the specification defines is never refused for being required: a producer that wrote one wrote OVF,
  which this reader takes as far as an image import needs it. The exception is OVF 2's ``EncryptionSection``,
  which says the package's files are encrypted: their bytes are not the disks, and imported they would be
  ciphertext, so such a package is ``Ova.Unsupported`` wherever the section is; so is one with XenCenter's
  ``SecuritySection`` (XenOvf's ``Security.Encrypt`` puts it in the OVF namespace, listing the encrypted
  files with W3C XML Encryption's ``xenc:ReferenceList``), or with any XML Encryption element;
* the extensions real producers write without ``ovf:required="false"`` (:data:`UNDERSTOOD`): VMware's
  ``vmw:BootOrderSection`` (ovftool and vCenter exports: the boot disk, read), ``vmw:Config`` and
  ``vmw:ExtraConfig`` (VMware VM settings: ``firmware`` is read, the rest configures a VMware VM the import
  does not create; ova-compose writes ``ExtraConfig`` without the attribute unless told otherwise), and
  Citrix XenServer's ``xenovf:VirtualSystemOtherConfigurationData`` (Xen VM settings, written without the
  attribute by XenCenter's export);
* anything else outside the OVF namespace with ``ovf:required="false"`` (VirtualBox's ``vbox:Machine``,
  vCenter's ``vmw:StorageGroupSection`` and ``vmw:StorageSection``, …), ignored.

A hardware ``Item`` is never refused for its ``ResourceType``, required or not: the import realises the
package's disks (every ``DiskSection`` disk, whatever the items say) and nothing else of the VM, whose
hardware is the launching cloud's instance type; a required CD drive, floppy, sound card or vendor device
is nothing the import fails to provide. virt-v2v reads the item types it maps and ignores the rest; AWS
imports the disks of VMware exports that list such items; VirtualBox refuses a required item of a type
outside its list only because it builds a VM from the items.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from ..errors import ImageRejected

#: what every DMTF OVF envelope namespace starts with (``…/envelope/1`` and ``…/envelope/2``)
OVF_NAMESPACE_PREFIX = "http://schemas.dmtf.org/ovf/envelope/"
#: the envelope namespace of OVF 0.9 (VMware's draft, still written by VirtualBox's legacy export)
OVF09_NS = "http://www.vmware.com/schema/ovf/1/envelope"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
#: the sections OVF 0.9, 1.x and 2.x define (the names of their ``…_Type``), understood in the generic form
OVF_SECTIONS = frozenset(
    {
        "AnnotationSection",
        "BootDeviceSection",
        "DeploymentOptionSection",
        "DiskSection",
        "EncryptionSection",
        "EnvironmentFilesSection",
        "EulaSection",
        "InstallSection",
        "NetworkSection",
        "OperatingSystemSection",
        "PlacementGroupSection",
        "PlacementSection",
        "ProductSection",
        "ResourceAllocationSection",
        "ScaleOutSection",
        "SharedDiskSection",
        "StartupSection",
        "VirtualHardwareSection",
        "VirtualSystem",
        "VirtualSystemCollection",
    }
)
#: the sections that say the package's files are encrypted: OVF 2's, and the one XenCenter's XenOvf writes
#: (in the OVF namespace, though OVF defines no such section) when it encrypts an export's disks
ENCRYPTION_SECTIONS = frozenset({"EncryptionSection", "SecuritySection"})
#: W3C XML Encryption, whose elements (``xenc:EncryptedData``, ``xenc:DataReference``) describe encrypted data
XMLENC_NS = "http://www.w3.org/2001/04/xmlenc#"
#: the local names of the generic section and content elements, whose ``xsi:type`` says what they are
GENERIC = ("Section", "Content")
#: the extensions (namespace, local name) understood without ``ovf:required="false"`` (module docstring)
UNDERSTOOD = frozenset(
    {
        ("http://www.vmware.com/schema/ovf", "BootOrderSection"),
        ("http://www.vmware.com/schema/ovf", "Config"),
        ("http://www.vmware.com/schema/ovf", "ExtraConfig"),
        ("http://schemas.citrix.com/ovf/envelope/1", "VirtualSystemOtherConfigurationData"),
    }
)
#: the elements whose children the rule applies to
_PARENTS = ("VirtualSystem", "VirtualSystemCollection", "VirtualHardwareSection")
#: xs:boolean's false
_FALSE = ("false", "0")


def _split(tag: str) -> tuple[str, str]:
    """``(namespace, local name)`` of an ElementTree tag (``""`` for no namespace)."""
    if tag.startswith("{"):
        uri, _, local = tag[1:].partition("}")
        return uri, local
    return "", tag


def is_envelope(uri: str) -> bool:
    """Whether ``uri`` is an OVF envelope namespace (0.9, 1.x, 2.x)."""
    return uri.startswith(OVF_NAMESPACE_PREFIX) or uri == OVF09_NS


def generic_type(el: ET.Element) -> str | None:
    """The local name of a generic element's ``xsi:type`` (``DiskSection_Type``), None when it has none.

    The type's prefix is not resolved: ElementTree keeps no element's prefix bindings, so resolving it
    would take a second parse (``start-ns`` events) of the untrusted document; the element itself is
    already of the envelope namespace, the only one whose schema types these names are."""
    value = (el.get(f"{{{XSI_NS}}}type") or "").strip()
    return value.rpartition(":")[2] or None


def section_name(el: ET.Element, ns: str) -> str | None:
    """Which section of the envelope namespace ``ns`` the element ``el`` is: its local name for the named
    form (``DiskSection``), its type's name less ``_Type`` for a generic ``Section``/``Content``
    (``<Section xsi:type="ovf:DiskSection_Type">``: ``DiskSection``); None for one of another namespace,
    a generic one without a type, or a comment."""
    if not isinstance(el.tag, str):
        return None
    uri, local = _split(el.tag)
    if uri != ns:
        return None
    if local not in GENERIC:
        return local
    typ = generic_type(el)
    return typ.removesuffix("_Type") if typ and typ.endswith("_Type") else None


def _required(el: ET.Element) -> bool:
    """Whether ``el`` is required: its ``ovf:required`` (of any envelope namespace) is not false."""
    for uri in (
        f"{OVF_NAMESPACE_PREFIX}1",
        f"{OVF_NAMESPACE_PREFIX}1/",
        f"{OVF_NAMESPACE_PREFIX}2",
        OVF09_NS,
    ):
        value = el.get(f"{{{uri}}}required")
        if value is not None:
            return value.strip() not in _FALSE
    return True


def _qualified(uri: str, local: str, data: bytes) -> str:
    """``prefix:local`` as the descriptor spells it (the prefix its first declaration of ``uri`` binds),
    with the namespace: ElementTree keeps only the namespace."""
    if not uri:
        return f"{local} (of no namespace)"
    found = re.search(
        rb'xmlns:([A-Za-z_][\w.-]{0,40})\s*=\s*["\']' + re.escape(uri.encode()) + rb'["\']', data
    )
    prefix = f"{found.group(1).decode()}:" if found else ""
    return f"{prefix}{local} (namespace {uri[:120]})"


def check_required(root: ET.Element, ns: str, data: bytes) -> None:
    """Refuse the descriptor ``data`` (parsed as ``root``, an envelope of namespace ``ns``) with
    ``Ova.UnsupportedSection`` when a child of its envelope, of a virtual system or collection, or of a
    hardware section is a required extension not understood, and with ``Ova.Unsupported`` when it has an
    ``EncryptionSection``, XenCenter's ``SecuritySection`` or an XML Encryption element (module docstring)."""
    for el in root.iter():
        uri, local = _split(el.tag if isinstance(el.tag, str) else "")
        section = section_name(el, uri) if is_envelope(uri) else None
        if section in ENCRYPTION_SECTIONS or uri == XMLENC_NS:
            what = f"a {section}" if section else f"XML Encryption's {local} (namespace {XMLENC_NS})"
            raise ImageRejected.nothing_imported(
                "Ova.Unsupported",
                f"the OVF descriptor has {what}: the package's files are encrypted, and "
                "this importer does not decrypt them (their bytes imported would be ciphertext); "
                "export the VM unencrypted",
            )
    parents = [root] + [el for el in root.iter() if section_name(el, ns) in _PARENTS]
    for parent in parents:
        for child in parent:
            if not isinstance(child.tag, str):  # a comment or processing instruction
                continue
            uri, local = _split(child.tag)
            if is_envelope(uri) and local in GENERIC:
                if section_name(child, uri) in OVF_SECTIONS or not _required(child):
                    continue
                written = (child.get(f"{{{XSI_NS}}}type") or "").strip()
                what = (
                    f"a {local} of xsi:type {written[:80]!r}" if written else f"a {local} without an xsi:type"
                )
            elif is_envelope(uri) or (uri, local) in UNDERSTOOD or not _required(child):
                continue
            else:
                what = _qualified(uri, local, data)
            where = section_name(parent, ns) or _split(parent.tag)[1]
            raise ImageRejected.nothing_imported(
                "Ova.UnsupportedSection",
                f"the OVF descriptor requires {what} in its {where}, an extension "
                'this importer does not understand (its ovf:required is not "false"); export the VM '
                'without it, or mark it ovf:required="false" if the VM does without it',
            )
