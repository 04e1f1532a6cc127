"""Domain XML -> typed immutable :class:`DomainConfig`, and back (``virsh dumpxml``).

Parsing is deliberately strict: the mshv driver supports a small subset of libvirt's
domain format, and anything outside it is refused with a message naming the element,
attribute or value -- nothing is silently dropped. Where libvirt's own parser refuses a
document, the error has libvirt's code, domain and message (tests/domain/test_libvirt_errors.py
compares a corpus with libvirt's parser). Order of checks:

1. safe parse (size cap, no DTD / entities / network; syntax errors as libvirt prints them);
2. bounds (elements, attributes per element, depth, text size): RelaxNG validation is
   quadratic in the children and attributes of one element, so nothing unbounded reaches it;
3. with ``validate`` (libvirt's VALIDATE flags) libvirt's schema first, as libvirt does;
4. explicit allow-list walk that extracts the values (errors name what is unsupported);
5. libvirt's schema (when asked for and installed), then our RelaxNG schema
   (``xml_schemas/domain.rng``) as a structural backstop;
6. the canonical form must fit what the next daemon (and the next define) reads back.

``trusted=True`` is for configs this daemon stored itself after all of the above: it skips
steps 2, 3, 5 and 6 (so a daemon start never runs a validator) and builds the same config.

The canonical XML (``DomainConfig.xml``) is what libvirt would print for the same
definition: defaults filled, libvirt's element order, 2-space indent, single quotes.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import os
import re
import threading
import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError, unsupported

from . import metadata
from .addresses import PciAddress, assign_pci

__all__ = [
    "LIBVIRT_DOMAIN_SCHEMA",
    "MAX_ATTRIBUTES",
    "MAX_DEPTH",
    "MAX_ELEMENTS",
    "MAX_STORED_XML_BYTES",
    "MAX_TEXT_CHARS",
    "MAX_VCPUS",
    "MAX_XML_BYTES",
    "CharDevice",
    "CpuTopology",
    "Cputune",
    "DomainConfig",
    "GuestCpu",
    "format_domain_xml",
    "parse_domain_xml",
]

MAX_XML_BYTES = 1 << 20
# What a running domain's dumpxml adds to the stored form (id, pty path, aliases): the canonical form
# must leave this much room, so that every dumpxml is accepted again by define.
_RUNTIME_SLACK = 1024
# Configs this daemon stored are read back up to libvirt's RPC string limit (REMOTE_STRING_MAX), so a
# file written before the stored-size check existed is never dropped.
MAX_STORED_XML_BYTES = 4 << 20
# Bounds checked before any RelaxNG validator runs. libxml2's validator is quadratic in the children
# and in the attributes of one element (measured: 150 000 children 48 s, 30 000 attributes 60 s and
# 7 GiB); within these bounds the worst 1 MiB document validates in well under a second.
MAX_ELEMENTS = 5000
MAX_ATTRIBUTES = 256  # per element
MAX_DEPTH = 64
# Per text node or attribute value. Validation is linear in text size (measured: 900 KB in <name>, <title>,
# <kernel>, an attribute: at most 70 ms per schema), so this only states what the document limit implies.
MAX_TEXT_CHARS = 1_000_000
# Sanity bound only (rejects absurd numbers early); the VMM enforces the real host limit.
MAX_VCPUS = 254  # the VMM gives each vCPU an xAPIC id; 255 is the broadcast id
LIBVIRT_DOMAIN_SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")
_URL = "(domain_definition)"  # the document name libvirt's parser reports

_NOT_SUPPORTED = "is not supported by the mshv driver"
# libvirt's enumerations (src/conf, 9.0): a value outside them is libvirt's own error, a value inside
# them that we cannot honour is "unsupported configuration" naming it.
_VIRT_TYPES = (
    "none", "qemu", "kqemu", "kvm", "xen", "lxc", "uml", "openvz", "test", "vmware", "hyperv", "vbox", "phyp",
    "parallels", "bhyve", "vz", "hvf",
)  # fmt: skip
_OS_TYPES = ("hvm", "xen", "linux", "exe", "uml", "xenpvh")
_ARCHES = (
    "alpha", "armv6l", "armv7l", "armv7b", "aarch64", "cris", "i686", "ia64", "lm32", "m68k", "microblaze",
    "microblazeel", "mips", "mipsel", "mips64", "mips64el", "openrisc", "parisc", "parisc64", "ppc", "ppcle",
    "ppc64", "ppc64le", "ppcemb", "riscv32", "riscv64", "s390", "s390x", "sh4", "sh4eb", "sparc", "sparc64",
    "unicore32", "x86_64", "xtensa", "xtensaeb",
)  # fmt: skip
_LIFECYCLE_ACTIONS = ("destroy", "restart", "rename-restart", "preserve", "coredump-destroy", "coredump-restart")
_LIFECYCLE_OK = ("destroy", "restart", "preserve")
# on_crash only: the VMM writes the guest's memory to an ELF core file, then destroys or restarts.
_CRASH_ONLY = ("coredump-destroy", "coredump-restart")
_CLOCK_OFFSETS = ("utc", "localtime", "variable", "timezone", "absolute")
_FEATURES = (
    "acpi", "apic", "pae", "hap", "viridian", "privnet", "hyperv", "kvm", "pvspinlock", "capabilities", "pmu",
    "vmport", "gic", "smm", "ioapic", "hpt", "vmcoreinfo", "htm", "nested-hv", "msrs", "ccf-assist", "xen", "cfpc",
    "sbbc", "ibs", "tcg",
)  # fmt: skip
_CPU_MODES = ("custom", "host-model", "host-passthrough", "maximum")
# Modes accepted at define, as libvirt's QEMU driver does; whether the host offers them is decided at
# start (domcapabilities), where the QEMU driver refuses an unsupported mode too.
CPU_MODES_ACCEPTED = ("host-passthrough", "host-model", "maximum")
CPU_MODES_RUNNABLE = ("host-passthrough",)
_CPU_CHECKS = ("default", "none", "partial", "full")
_BOOT_DEVICES = ("fd", "cdrom", "hd", "network")
_PLACEMENTS = ("static", "auto")
_CHR_TYPES = (
    "null", "vc", "pty", "dev", "file", "pipe", "stdio", "udp", "tcp", "unix", "spicevmc", "spiceport", "nmdm",
    "qemu-vdagent", "dbus",
)  # fmt: skip
_SERIAL_TARGETS = (
    "none", "isa-serial", "usb-serial", "pci-serial", "spapr-vio-serial", "system-serial", "sclp-serial", "isa-debug",
)  # fmt: skip
_CONSOLE_TARGETS = ("none", "serial", "xen", "uml", "virtio", "lxc", "openvz", "sclp", "sclplm")
_SERIAL_MODELS = (
    "none", "isa-serial", "usb-serial", "pci-serial", "spapr-vty", "pl011", "sclpconsole", "sclplmconsole", "16550a",
    "isa-debugcon",
)  # fmt: skip
_MEMBALLOON_MODELS = ("virtio", "xen", "none", "virtio-transitional", "virtio-non-transitional")
_CONTROLLER_TYPES = ("ide", "fdc", "scsi", "sata", "virtio-serial", "ccid", "usb", "pci", "xenbus", "isa")
_USB_MODELS = (
    "piix3-uhci", "piix4-uhci", "ehci", "ich9-ehci1", "ich9-uhci1", "ich9-uhci2", "ich9-uhci3", "vt82c686b-uhci",
    "pci-ohci", "nec-xhci", "qusb1", "qusb2", "qemu-xhci", "none",
)  # fmt: skip
_DISK_BUSES = ("ide", "fdc", "scsi", "virtio", "xen", "usb", "uml", "sata", "sd")  # "none" is refused (NONZERO)
_DISK_DEVICES = ("disk", "cdrom", "floppy", "lun")
# virDomainDiskModel; 'default' is the absent model (libvirt accepts it and prints nothing).
_DISK_MODELS = ("default", "virtio", "virtio-transitional", "virtio-non-transitional")
DISK_MODELS_SUPPORTED = ("virtio", "virtio-non-transitional")  # as the rng's: modern-only virtio-pci
DISK_DEVICES_SUPPORTED = ("disk",)
DISK_BUSES_SUPPORTED = ("virtio",)
# libvirt's bus for a <disk> without target bus= (domain_postparse.c), by target name prefix.
_DISK_PREFIX_BUS = (("hd", "ide"), ("sd", "scsi"), ("vd", "virtio"), ("xvd", "xen"), ("ubd", "uml"))
_RNG_MODELS = ("virtio", "virtio-transitional", "virtio-non-transitional")
_RNG_MODELS_SUPPORTED = ("virtio", "virtio-non-transitional")  # both are what we build: modern-only virtio-pci
_RNG_BACKENDS = ("random", "egd", "builtin")
RNG_SOURCES = ("/dev/urandom", "/dev/random")
_RNG_DEFAULT_SOURCE = "/dev/random"  # virDomainRNGDefPostParse
_SERIAL_TARGET = "isa-serial"
_CONSOLE_TARGET = "serial"


@dataclass(frozen=True)
class CharDevice:
    """A ``<serial type='pty'>`` or ``<console type='pty'>`` device."""

    kind: str  # "serial" | "console"
    port: int
    target_type: str  # "isa-serial" for serial; "serial" for console


@dataclass(frozen=True)
class DiskDevice:
    """``<disk device='disk'>`` on ``bus='virtio'``: a virtio-blk PCI function (vmm DiskConfig)."""

    type: str  # 'file' | 'block' | 'volume'
    target: str  # <target dev>, e.g. 'vda'
    address: PciAddress
    model: str | None = None  # <disk model>: 'virtio' | 'virtio-non-transitional'; None when not given
    path: str | None = None  # <source file> or <source dev>; None for a volume disk
    pool: str | None = None  # <source pool volume> of a volume disk
    volume: str | None = None
    actual_type: str | None = None  # a volume disk's, once resolved at start: 'file' | 'block' (srcpool actualtype)
    driver_name: str | None = None  # <driver name>: only 'qemu'; None when not given (not printed)
    format: str | None = None  # <driver type>: 'raw' | 'qcow2'; None when not given (raw, no probing)
    cache: str | None = None
    io: str | None = None
    discard: str | None = None
    readonly: bool = False
    serial: str | None = None
    boot_order: int | None = None


@dataclass(frozen=True)
class RngDevice:
    """``<rng model='virtio'>`` with ``<backend model='random'>``: a virtio-rng PCI function."""

    model: str
    backend: str  # the random device: /dev/urandom or /dev/random
    address: PciAddress
    rate_bytes: int = 0  # <rate bytes>; 0: no limit (libvirt prints no <rate> then)
    rate_period_ms: int = 0  # <rate period>; 0: not given (the limit is then per 1000 ms, QEMU's default)


@dataclass(frozen=True)
class NetDevice:
    """``<interface type='network'|'bridge'|'ethernet'>`` with ``<model type='virtio'>``: a virtio-net PCI
    function on a tap the daemon creates at start (vmm NetConfig)."""

    type: str  # 'network' | 'bridge' | 'ethernet'
    mac: str  # lower-case 52:54:00:xx:xx:xx form; generated at define when absent
    address: PciAddress
    model: str = "virtio"  # 'virtio' | 'virtio-non-transitional' (both: modern-only virtio-pci)
    network: str | None = None  # <source network> of type='network'
    bridge: str | None = None  # <source bridge> of type='bridge'
    target: str | None = None  # <target dev> the user chose; None: a vnetN is generated at start
    mtu: int | None = None  # <mtu size>; None: not given (the tap keeps the bridge's)
    link_state: str | None = None  # <link state>: 'up' | 'down'; None: not given (up)
    queues: int = 0  # <driver queues>; 0: not given (one queue pair)


@dataclass(frozen=True)
class NetLive:
    """What a running interface adds to the live XML: the tap's name and, for type='network', the
    port libvirt's network driver gave it (its id and the network's bridge)."""

    ifname: str
    portid: str | None = None
    bridge: str | None = None


@dataclass(frozen=True)
class CpuTopology:
    """``<cpu><topology>``: sockets x dies x cores x threads, whose product is the vCPU count."""

    sockets: int
    dies: int
    cores: int
    threads: int


@dataclass(frozen=True)
class GuestCpu:
    """What ``<cpu>``'s children ask of the partition: a topology, and nested virtualization."""

    topology: CpuTopology | None = None
    # From <feature name='vmx'|'svm' policy=...>: "require" (force, require), "optional", or "off"
    # (disable, forbid, or not named).
    nested: str = "off"
    nested_feature: str | None = None  # the feature that asked for it

    @property
    def threads_per_core(self) -> int:
        return self.topology.threads if self.topology else 1


@dataclass(frozen=True)
class Cputune:
    """``<cputune>``: the host CPUs each vCPU's thread (vcpupin) and the VMM's other threads (emulatorpin)
    may run on; None where nothing is pinned (libvirt then uses every online host CPU)."""

    vcpupin: tuple[tuple[int, frozenset[int]], ...] = ()  # (vCPU, host CPUs), by vCPU
    emulatorpin: frozenset[int] | None = None

    def vcpu(self, index: int) -> frozenset[int] | None:
        return next((cpus for vcpu, cpus in self.vcpupin if vcpu == index), None)


@dataclass(frozen=True)
class DomainConfig:
    name: str
    uuid: uuid.UUID
    title: str | None
    description: str | None
    memory_kib: int
    current_memory_kib: int
    vcpus: int  # the maximum (<vcpu>M</vcpu>): described to the guest
    os_type: str
    arch: str
    kernel: str | None
    initrd: str | None
    cmdline: str | None
    acpi: bool
    apic: bool
    on_poweroff: str
    on_reboot: str
    on_crash: str
    serials: tuple[CharDevice, ...]
    consoles: tuple[CharDevice, ...]
    xml: str  # canonical inactive XML: what dumpxml prints for a shut-off domain
    cpu: GuestCpu = GuestCpu()
    current_vcpus: int = 0  # online at boot (<vcpu current='N'>); 0 in a hand-built config means vcpus
    cpu_mode: str | None = None  # <cpu mode>, None without <cpu> or for the modelless custom (default) CPU
    clock_offset: str = "utc"  # <clock offset>: 'utc' or 'localtime' (the CMOS RTC's zone)

    def __post_init__(self) -> None:
        if self.current_vcpus == 0:
            object.__setattr__(self, "current_vcpus", self.vcpus)

    cputune: Cputune = Cputune()
    rngs: tuple[RngDevice, ...] = ()
    disks: tuple[DiskDevice, ...] = ()
    nets: tuple[NetDevice, ...] = ()


@dataclass(frozen=True)
class _Extras:
    """Accepted settings that have no DomainConfig field but must survive in the XML."""

    machine: str | None
    boot_hd: bool
    cpu_attrs: tuple[tuple[str, str], ...] | None
    cpu_children: tuple[str, ...]  # canonical <topology>/<feature> lines
    pm: tuple[tuple[str, str], ...]
    usb_none: bool
    memballoon_none: bool
    metadata: tuple[str, ...]  # pre-serialized children, indented for their depth


# --------------------------------------------------------------------------- errors


def _xml_error(detail: str, domain: ErrorDomain = ErrorDomain.XML) -> VirtError:
    return VirtError(ErrorCode.XML_ERROR, detail, domain)


def _domain_xml_error(detail: str) -> VirtError:
    return VirtError(ErrorCode.XML_ERROR, detail, ErrorDomain.DOMAIN)


def _invalid_arg(detail: str) -> VirtError:
    return VirtError(ErrorCode.INVALID_ARG, detail, ErrorDomain.XML)


def _prop_enum_error(el: etree._Element, attr: str, value: str) -> VirtError:
    """libvirt's virXMLPropEnum refusal of a value outside the attribute's enumeration."""
    return _xml_error(f"Invalid value for attribute '{attr}' in element '{_qname(el)}': '{value}'.")


class _SchemaViolation(Exception):
    """Something libvirt's parser ignores and only its schema refuses (a duplicate element...):
    the caller reports libvirt's schema error for it where that schema is available."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _qname(el: etree._Element, name: str | bytes | None = None) -> str:
    """Display name of an element (or one of its attributes) with its prefix, e.g. ``qemu:commandline``."""
    raw = el.tag if name is None else name
    if not isinstance(raw, str):
        return "?"
    if not raw.startswith("{"):
        return raw
    ns, _, local = raw[1:].partition("}")
    if ns == "http://www.w3.org/XML/1998/namespace":
        return f"xml:{local}"  # implicit prefix, never in nsmap
    prefix = next((p for p, u in el.nsmap.items() if u == ns and p), None)
    return f"{prefix}:{local}" if prefix else f"{{{ns}}}{local}"


# --------------------------------------------------------------------------- safe parsing

_XML_DECL = re.compile(r"\A\s*<\?xml[^>]*\?>")
# A DOCTYPE can only sit in the prolog: after whitespace, comments and PIs, before the root.
# (single-character \s: a nested quantifier would backtrack exponentially on long whitespace)
_PROLOG_DOCTYPE = re.compile(r"\A(?:\s|<\?.*?\?>|<!--.*?-->)*<!DOCTYPE", re.DOTALL)
_DOCTYPE_REFUSED = f"{_URL}: DOCTYPE and entity declarations are not allowed in domain XML"


class _NoLoadResolver(etree.Resolver):
    """Answers every external load (DTD, entity, XInclude) with nothing, so no file or URL is read."""

    # (ignores: lxml-stubs give resolve() an outdated signature and lack resolve_empty)
    def resolve(self, url: str | None, pubid: str | None, context: object) -> object:  # type: ignore[override]
        return self.resolve_empty(context)  # type: ignore[attr-defined]


def _syntax_error(text: str, err: etree.XMLSyntaxError, log: etree._ListErrorLog) -> VirtError:
    """A syntax error as libvirt's catchXMLError prints it: file:line: message, then the line around
    libxml2's cursor and a pointer under the column (VIR_ERR_XML_DETAIL). libvirt reports the first
    fatal error (``log`` is this parse's own: the exception's log is shared by the thread)."""
    entry = next((e for e in log if e.level_name == "FATAL"), None)
    line = entry.line if entry is not None else (err.lineno or 0)
    column = entry.column if entry is not None else (err.offset or 0)
    message = entry.message if entry is not None else str(err.msg)
    data = text.encode("utf-8", "surrogatepass")
    # The cursor: the byte at (line, column), as libxml2 counted them.
    starts = [0] + [m.end() for m in re.finditer(rb"\n", data)]
    cur = min(starts[line - 1] if 0 < line <= len(starts) else len(data), len(data))
    cur = min(cur + max(column - 1, 0), len(data))
    origin = cur

    def at(i: int) -> int:
        return data[i] if i < len(data) else 0

    while cur > 0 and at(cur) in (10, 13):  # skip back over end-of-lines
        cur -= 1
    while cur > 0 and at(cur) not in (10, 13):  # to the start of that line
        cur -= 1
    if at(cur) in (10, 13):
        cur += 1
    col = origin - cur
    end = cur
    while end < len(data) and data[end] not in (10, 13):
        end += 1
    context = data[cur:end].decode("utf-8", "replace")
    pointer = "".join("\t" if c == "\t" else "-" for c in data[cur : cur + col].decode("utf-8", "replace")) + "^"
    shown = context if context else "(null)"  # libvirt prints an empty buffer with %s
    return VirtError(ErrorCode.XML_DETAIL, f"{_URL}:{line}: {message}\n{shown}\n{pointer}", ErrorDomain.DOMAIN)


def _parse_safely(text: str, limit: int = MAX_XML_BYTES) -> etree._Element:
    if not isinstance(text, str):
        raise _invalid_arg("domain XML must be a string")
    # Cheap check first so a huge string is never encoded or parsed.
    if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
        raise _xml_error(f"domain XML is larger than the {limit} byte limit")
    # lxml refuses str input carrying an encoding declaration; the text is already decoded, so
    # blank the declaration out (keeping its newlines so reported line numbers stay right).
    m = _XML_DECL.match(text)
    if m:
        text = re.sub(r"[^\n]", " ", m.group(0)) + text[m.end() :]
    # Refuse DTDs before libxml2 sees them: they are the vehicle for entity bombs and XXE.
    if _PROLOG_DOCTYPE.match(text):
        raise _xml_error(_DOCTYPE_REFUSED)
    # A fresh parser per call: lxml parsers must not be shared between threads.  Note: do not
    # pass collect_ids=False -- with lxml 6 it makes libxml2 load the external DTD subset.
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        attribute_defaults=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )
    parser.resolvers.add(_NoLoadResolver())
    try:
        root = etree.fromstring(text, parser)
    except etree.XMLSyntaxError as e:
        raise _syntax_error(text, e, parser.error_log) from None
    if root is None:  # lxml answers None for a document of whitespace only in some versions
        raise VirtError(ErrorCode.XML_DETAIL, f"{_URL}:1: Document is empty\n(null)\n^", ErrorDomain.DOMAIN)
    # Second line of defence, should the prolog scan ever miss a DOCTYPE spelling.
    # (getattr: lxml-stubs lack these DocInfo attributes)
    docinfo = root.getroottree().docinfo
    if getattr(docinfo, "doctype", "") or any(
        getattr(docinfo, a, None) is not None for a in ("internalDTD", "externalDTD")
    ):
        raise _xml_error(_DOCTYPE_REFUSED)
    return root


def _check_bounds(root: etree._Element) -> None:
    """Refuse documents whose validation would cost more than the bounds allow (linear, no recursion)."""
    count = 0
    stack: list[tuple[etree._Element, int]] = [(root, 1)]
    while stack:
        el, depth = stack.pop()
        count += 1
        if count > MAX_ELEMENTS:
            raise _xml_error(f"domain XML has more than {MAX_ELEMENTS} elements")
        if depth > MAX_DEPTH:
            raise _xml_error(f"element <{_qname(el)}> is nested deeper than {MAX_DEPTH} levels")
        attrib = el.attrib
        if len(attrib) > MAX_ATTRIBUTES:
            raise _xml_error(f"element <{_qname(el)}> has more than {MAX_ATTRIBUTES} attributes")
        for key, value in attrib.items():
            if len(value) > MAX_TEXT_CHARS:
                raise _xml_error(
                    f"attribute '{_qname(el, key)}' of <{_qname(el)}> is longer than {MAX_TEXT_CHARS} characters"
                )
        for piece, owner in ((el.text, el), (el.tail, el.getparent())):
            if piece is not None and len(piece) > MAX_TEXT_CHARS:
                where = _qname(owner if owner is not None else el)
                raise _xml_error(f"text in <{where}> is longer than {MAX_TEXT_CHARS} characters")
        stack.extend((child, depth + 1) for child in el)


# --------------------------------------------------------------------------- walk helpers


def _elements(el: etree._Element) -> Iterator[etree._Element]:
    for child in el:
        if not isinstance(child.tag, str):
            # Entity references / other node kinds: the parser should have refused them already.
            raise _xml_error(f"unexpected node in <{_qname(el)}>")
        yield child


def _check_attrs(el: etree._Element, allowed: Collection[str], where: str | None = None) -> None:
    for key in el.attrib:
        if key not in allowed:
            raise unsupported(f"attribute '{_qname(el, key)}' of <{where or _qname(el)}> {_NOT_SUPPORTED}")


def _singletons(el: etree._Element, allowed: Collection[str], what: str) -> dict[str, etree._Element]:
    """Children by tag; each allowed tag at most once, anything else is unsupported."""
    found: dict[str, etree._Element] = {}
    for child in _elements(el):
        tag = child.tag
        if not isinstance(tag, str) or tag not in allowed:
            raise unsupported(what.format(tag=_qname(child)))
        if tag in found:
            # libvirt's parser takes the first one; only its schema refuses the second.
            raise _SchemaViolation(f"element <{tag}> may appear only once in <{_qname(el)}>")
        found[tag] = child
    return found


def _leaf(el: etree._Element, where: str | None = None) -> None:
    for child in _elements(el):
        raise unsupported(f"element <{_qname(child)}> in <{where or _qname(el)}> {_NOT_SUPPORTED}")


def _text(el: etree._Element | None) -> str | None:
    """Element text, None when absent or empty (libvirt's virXPathString treats "" as unset)."""
    if el is None:
        return None
    _leaf(el)
    return el.text or None


_C_SPACE = " \t\n\v\f\r"
_DIGITS = frozenset("0123456789")
_ULLONG_MAX = (1 << 64) - 1
_UINT_MAX = (1 << 32) - 1


def _strtoul(s: str, *, positive: bool, maximum: int) -> int | None:
    """C strtoul(s, &end, 10) consuming all of ``s``, as libvirt's virStrToLong_* with no end pointer:
    leading white space and a sign are allowed, nothing after the digits. ``positive``: the ``*p``
    variants, which refuse a minus sign; otherwise ``-N`` wraps as in C. None: not a valid number."""
    i, n = 0, len(s)
    while i < n and s[i] in _C_SPACE:
        i += 1
    negative = False
    if i < n and s[i] in "+-":
        negative = s[i] == "-"
        i += 1
    j = i
    while j < n and s[j] in _DIGITS:
        j += 1
    if j == i or j != n or (negative and positive):
        return None
    digits = s[i:j].lstrip("0") or "0"
    if len(digits) > 20:  # beyond any 64-bit value (and int() of megabytes of digits is slow)
        return None
    value = int(digits)
    if value > _ULLONG_MAX:
        return None  # ERANGE
    if negative:
        if value > maximum:
            return None
        value = (-value) & maximum
    return value if value <= maximum else None


# --------------------------------------------------------------------------- field parsers

_LLONG_MAX = (1 << 63) - 1
_MAX_KIB = -(-_LLONG_MAX // 1024)  # libvirt: KiB >= VIR_DIV_UP(LLONG_MAX, 1024) is "size value too large"


def _scale(unit: str | None) -> int:
    """Bytes per unit: libvirt's virScaleInteger suffixes (case-insensitive)."""
    if unit is None:
        return 1024  # libvirt's default unit for memory is KiB
    u = unit.lower()
    if u in ("b", "byte", "bytes"):
        return 1
    if len(u) == 1 or u[1:] == "ib":
        base = 1024
    elif u[1] == "b" and len(u) == 2:
        base = 1000
    else:
        raise VirtError(ErrorCode.INVALID_ARG, f"unknown suffix '{unit}'", ErrorDomain.NONE)
    power = "kmgtpe".find(u[0]) + 1
    if power == 0:
        raise VirtError(ErrorCode.INVALID_ARG, f"unknown suffix '{unit}'", ErrorDomain.NONE)
    return int(base**power)


def _memory_kib(el: etree._Element | None) -> int:
    """libvirt's virDomainParseMemory: KiB, rounded up; 0 when absent or empty."""
    if el is None:
        return 0
    _check_attrs(el, ("unit",))
    raw = _text(el)
    if raw is None:
        return 0
    value = _strtoul(raw, positive=True, maximum=_ULLONG_MAX)
    if value is None:
        raise _xml_error(f"Invalid value '{raw}' for element or attribute './{el.tag}[1]'")
    unit = el.get("unit") or None
    scale = _scale(unit)
    if value and value > _LLONG_MAX // scale:
        raise VirtError(ErrorCode.OVERFLOW, f"value too large: {value}{unit or ''}", ErrorDomain.NONE)
    kib = -(-(value * scale) // 1024)
    if kib >= _MAX_KIB:
        raise VirtError(ErrorCode.OVERFLOW, "size value too large", ErrorDomain.DOMAIN)
    return kib


def _vcpus(el: etree._Element | None) -> tuple[int, int]:
    """(maximum, current) as libvirt's virDomainVcpuParse reads them."""
    if el is None:
        return 1, 1
    _check_attrs(el, ("placement", "current"))
    _leaf(el)
    maximum = _strtoul(el.text or "", positive=False, maximum=_UINT_MAX)
    if maximum is None:
        raise _domain_xml_error("maximum vcpus count must be an integer")
    current_raw = el.get("current")
    current = maximum
    if current_raw is not None:
        parsed = _strtoul(current_raw, positive=True, maximum=_UINT_MAX)
        if parsed is None:
            raise _xml_error(
                f"Invalid value for attribute 'current' in element 'vcpu': '{current_raw}'. "
                "Expected non-negative integer value"
            )
        current = parsed or maximum  # current='0' means unset
    placement = el.get("placement")
    if placement is not None and placement not in _PLACEMENTS:
        raise _prop_enum_error(el, "placement", placement)
    if maximum == 0:
        # libvirt's next check after an empty vCPU list (the <numa> CPU ids, none here, exceed it)
        raise VirtError(ErrorCode.INTERNAL_ERROR, "CPU IDs in <numa> exceed the <vcpu> count", ErrorDomain.DOMAIN)
    if current > maximum:
        raise unsupported("maximum vCPU count must not be less than current vCPU count")
    if maximum > MAX_VCPUS:
        raise unsupported(f"<vcpu> count {maximum} exceeds the {MAX_VCPUS} vCPUs the mshv driver supports")
    if placement == "auto":
        raise unsupported(f"vcpu placement 'auto' {_NOT_SUPPORTED}; use placement='static'")
    return maximum, current


# ---- <cputune>: vcpupin and emulatorpin, with libvirt's messages (virDomainDefTunablesParse)

_CPUMASK_LEN = 16384  # VIR_DOMAIN_CPUMASK_LEN: bits a cpuset may name
_BLANKS = " \t\n\v\f\r"


def parse_cpuset(text: str) -> frozenset[int]:
    """libvirt's cpuset syntax ("0-3,^2,8"), scanned as virBitmapParse does (blanks allowed around items)."""
    error = VirtError(ErrorCode.INVALID_ARG, f"Failed to parse bitmap '{text}'", ErrorDomain.NONE)
    n, cpus = len(text), set[int]()

    def skip(i: int) -> int:
        while i < n and text[i] in _BLANKS:
            i += 1
        return i

    def number(i: int) -> tuple[int, int]:
        j = i
        while j < n and "0" <= text[j] <= "9":
            j += 1
        if j == i or j - i > 9:
            raise error
        return int(text[i:j]), j

    i = skip(0)
    if i == n:
        raise error
    while i < n:
        neg = text[i] == "^"
        i += neg
        first, i = number(i)
        last = first
        i = skip(i)
        if i < n and text[i] == "-":
            if neg:
                raise error
            last, i = number(skip(i + 1))
            i = skip(i)
        if last < first or last >= _CPUMASK_LEN:
            raise error
        if neg:
            cpus.discard(first)
        else:
            cpus.update(range(first, last + 1))
        if i < n and text[i] == ",":
            i = skip(i + 1)  # (a trailing comma is accepted, as libvirt does)
        elif i < n:
            raise error
    return frozenset(cpus)


def format_cpuset(cpus: Collection[int]) -> str:
    """virBitmapFormat: sorted ranges, "0-2,5"."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and ranges[-1][1] == cpu - 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def _pin_cpuset(el: etree._Element, what: str) -> frozenset[int]:
    text = el.get("cpuset")
    if text is None:
        raise VirtError(ErrorCode.INTERNAL_ERROR, f"missing cpuset for {what}", ErrorDomain.DOMAIN)
    cpus = parse_cpuset(text)
    if not cpus:
        raise unsupported(f"Invalid value of 'cpuset': {text}")
    return cpus


def _cputune(el: etree._Element | None, vcpus: int) -> Cputune:
    """``<cputune>`` with vcpupin/emulatorpin; its scheduler and cache children need cgroups or resctrl the
    driver does not manage, so they are refused."""
    if el is None:
        return Cputune()
    _check_attrs(el, ())
    pins: dict[int, frozenset[int]] = {}
    emulator: frozenset[int] | None = None
    seen_emulator = False
    for child in _elements(el):
        tag = _qname(child)
        if tag == "vcpupin":
            _check_attrs(child, ("vcpu", "cpuset"), "cputune><vcpupin")
            _leaf(child)
            raw = child.get("vcpu")
            if raw is None:
                raise _xml_error("Missing required attribute 'vcpu' in element 'vcpupin'")
            m = re.fullmatch(rf"[{_BLANKS}]*\+?([0-9]{{1,10}})", raw)
            if m is None or int(m.group(1)) > _UINT_MAX:
                raise _xml_error(
                    f"Invalid value for attribute 'vcpu' in element 'vcpupin': '{raw}'. "
                    "Expected non-negative integer value"
                )
            vcpu = int(m.group(1))
            if vcpu >= vcpus:
                continue  # libvirt ignores (with a warning) pins of vCPUs the domain does not have
            if child.get("cpuset") is not None and vcpu in pins:
                raise VirtError(ErrorCode.INTERNAL_ERROR, f"duplicate vcpupin for vcpu '{vcpu}'", ErrorDomain.DOMAIN)
            pins[vcpu] = _pin_cpuset(child, "vcpupin")
        elif tag == "emulatorpin":
            if seen_emulator:
                raise VirtError(ErrorCode.XML_ERROR, "only one emulatorpin is supported", ErrorDomain.DOMAIN)
            seen_emulator = True
            _check_attrs(child, ("cpuset",), "cputune><emulatorpin")
            _leaf(child)
            emulator = _pin_cpuset(child, "emulatorpin")
        else:
            raise unsupported(f"element <{tag}> in <cputune> {_NOT_SUPPORTED}")
    return Cputune(tuple(sorted(pins.items())), emulator)


def _format_cputune(tune: Cputune) -> list[str]:
    if not tune.vcpupin and tune.emulatorpin is None:
        return []
    lines = ["<cputune>"]
    lines += [f"  <vcpupin vcpu='{vcpu}' cpuset='{format_cpuset(cpus)}'/>" for vcpu, cpus in tune.vcpupin]
    if tune.emulatorpin is not None:
        lines.append(f"  <emulatorpin cpuset='{format_cpuset(tune.emulatorpin)}'/>")
    return [*lines, "</cputune>"]


@dataclass(frozen=True)
class _Os:
    arch: str
    machine: str | None
    kernel: str | None
    initrd: str | None
    cmdline: str | None
    boot_hd: bool


def _os_type(os_el: etree._Element | None) -> tuple[str, str | None]:
    """(os type, arch attribute) with libvirt's checks for both (virDomainDefParseCaps)."""
    type_el = os_el.find("type") if os_el is not None else None
    os_type = _text(type_el) if type_el is not None else None
    if type_el is None or os_type is None:
        raise _domain_xml_error("an os <type> must be specified")
    if os_type not in _OS_TYPES:
        raise unsupported(f"unknown OS type '{os_type}'")
    arch = type_el.get("arch") or None
    if arch is not None and arch not in _ARCHES:
        raise unsupported(f"Unknown architecture {arch}")
    return os_type, arch


def _os(el: etree._Element) -> _Os:
    _check_attrs(el, ())
    allowed = ("type", "kernel", "initrd", "cmdline", "boot")
    kids = _singletons(el, allowed, f"element <{{tag}}> in <os> {_NOT_SUPPORTED}")
    type_el = kids["type"]
    _check_attrs(type_el, ("arch", "machine"), "os><type")
    os_type = _text(type_el)
    if os_type != "hvm":
        raise unsupported(f"<os><type> '{os_type}' {_NOT_SUPPORTED}; use 'hvm'")
    arch = type_el.get("arch") or "x86_64"
    if arch != "x86_64":
        raise unsupported(f"architecture '{arch}' {_NOT_SUPPORTED}; use arch='x86_64'")
    machine = type_el.get("machine") or None
    kernel = _text(kids.get("kernel"))
    initrd = _text(kids.get("initrd"))
    cmdline = _text(kids.get("cmdline"))
    for tag, value in (("initrd", initrd), ("cmdline", cmdline)):
        if value is not None and kernel is None:
            # Only direct kernel boot exists, so these would be silently ignored.
            raise unsupported(f"<os><{tag}> without <os><kernel> {_NOT_SUPPORTED}")
    boot_el = kids.get("boot")
    if boot_el is not None:
        _check_attrs(boot_el, ("dev",), "os><boot")
        _leaf(boot_el, "boot")
        dev = boot_el.get("dev")
        if dev is None:
            raise _xml_error("Missing required attribute 'dev' in element 'boot'")
        if dev not in _BOOT_DEVICES:
            raise _prop_enum_error(boot_el, "dev", dev)
        if dev != "hd":
            raise unsupported(f"boot device '{dev}' {_NOT_SUPPORTED}; only <boot dev='hd'/> is accepted")
    return _Os(arch, machine, kernel, initrd, cmdline, boot_el is not None)


def _features(el: etree._Element | None) -> tuple[bool, bool]:
    if el is None:
        return False, False
    _check_attrs(el, ())
    for child in _elements(el):
        if child.tag not in _FEATURES:
            raise unsupported(f"unexpected feature '{_qname(child)}'")
    kids = _singletons(el, ("acpi", "apic"), f"feature <{{tag}}> {_NOT_SUPPORTED}")
    for child in kids.values():
        _check_attrs(child, ())
        _leaf(child)
    return "acpi" in kids, "apic" in kids


def _cpu(el: etree._Element | None) -> tuple[tuple[str, str], ...] | None:
    if el is None:
        return None
    mode = el.get("mode")
    if mode is not None and mode not in _CPU_MODES:
        raise VirtError(ErrorCode.CONFIG_UNSUPPORTED, f"Invalid mode attribute '{mode}'", ErrorDomain.CPU)
    mode = mode or "custom"
    migratable = el.get("migratable")
    if migratable is not None:
        if migratable not in ("on", "off"):
            raise _prop_enum_error(el, "migratable", migratable)
        if mode not in ("host-passthrough", "maximum"):
            raise VirtError(
                ErrorCode.CONFIG_UNSUPPORTED,
                "Attribute migratable is only allowed for 'host-passthrough' / 'maximum' CPU mode",
                ErrorDomain.CPU,
            )
    check = el.get("check")
    if check is not None and check not in _CPU_CHECKS:
        raise _prop_enum_error(el, "check", check)
    _check_attrs(el, ("mode", "check", "migratable"))
    if mode == "custom":
        return _cpu_custom(el)
    if mode not in CPU_MODES_ACCEPTED:
        raise unsupported(f"cpu mode '{mode}' {_NOT_SUPPORTED}; use 'host-passthrough'")
    attrs = [("mode", mode)]
    if check not in (None, "default"):
        attrs.append(("check", check))
    if migratable is not None:
        attrs.append(("migratable", migratable))
    return tuple(attrs)


# ---- <cpu> children: topology and features (mode and its attributes are _cpu's)

_NESTED_FEATURES = ("vmx", "svm")  # Intel VT-x, AMD-V: a guest hypervisor needs one
_FEATURE_POLICIES = {
    "force": "require",
    "require": "require",
    "optional": "optional",
    "disable": "off",
    "forbid": "off",
}


def _cpu_custom(el: etree._Element) -> tuple[tuple[str, str], ...] | None:
    """``<cpu>`` without a mode (or mode='custom') and without a model: libvirt's default CPU, which
    here is the hypervisor's. It can carry a topology; libvirt then prints neither mode nor check, and
    drops an element with nothing in it."""
    if el.get("migratable") is not None:
        raise unsupported("Attribute migratable is only allowed for 'host-passthrough' / 'maximum' CPU mode")
    if any(child.tag == "model" for child in _elements(el)):
        raise unsupported(f"cpu mode 'custom' {_NOT_SUPPORTED}; use 'host-passthrough' or 'host-model'")
    return () if any(child.tag == "topology" for child in _elements(el)) else None


def _topology_uint(el: etree._Element, name: str, required: bool) -> int | None:
    """One topology attribute, refused with libvirt's virXMLPropUInt messages."""
    value = el.get(name)
    if value is None:
        if required:
            raise _xml_error(f"Missing required attribute '{name}' in element 'topology'")
        return None
    if not re.fullmatch(r"[0-9]{1,10}", value) or int(value) > _UINT_MAX:
        raise _xml_error(
            f"Invalid value for attribute '{name}' in element 'topology': '{value}'. "
            "Expected non-negative integer value"
        )
    if int(value) == 0:
        raise _xml_error(f"Invalid value for attribute '{name}' in element 'topology': Zero is not permitted")
    return int(value)


def _cpu_topology(el: etree._Element, vcpus: int) -> CpuTopology:
    _check_attrs(el, ("sockets", "dies", "cores", "threads"))
    _leaf(el)
    sockets = _topology_uint(el, "sockets", True)
    dies = _topology_uint(el, "dies", False) or 1
    cores = _topology_uint(el, "cores", True)
    threads = _topology_uint(el, "threads", True)
    assert sockets and cores and threads
    total = sockets * dies * cores * threads
    if total > _UINT_MAX:  # virDomainDefGetVcpusTopology
        raise unsupported(f"cpu topology results in more than {_UINT_MAX} cpus")
    if total != vcpus:  # as libvirt's QEMU driver validates it
        raise unsupported("CPU topology doesn't match maximum vcpu count")
    return CpuTopology(sockets, dies, cores, threads)


def _cpu_features(features: list[etree._Element]) -> tuple[str, str | None, tuple[str, ...]]:
    """(nested policy, the feature naming it, canonical lines) from the <feature> children."""
    nested, nested_feature, lines, seen = "off", None, [], set()
    rank = {"off": 0, "optional": 1, "require": 2}
    for f in features:
        _check_attrs(f, ("policy", "name"), "cpu><feature")
        _leaf(f, "cpu><feature")
        policy = f.get("policy", "require")
        if policy not in _FEATURE_POLICIES:
            raise unsupported("Invalid CPU feature policy")
        name = f.get("name")
        if not name:
            raise _xml_error("Invalid CPU feature name")
        if name in seen:
            raise _xml_error(f"CPU feature '{name}' specified more than once")
        seen.add(name)
        if name not in _NESTED_FEATURES:
            raise unsupported(
                f"CPU feature '{name}' {_NOT_SUPPORTED}; only vmx or svm (nested virtualization) can be set"
            )
        wanted = _FEATURE_POLICIES[policy]
        if rank[wanted] > rank[nested]:
            nested, nested_feature = wanted, name
        lines.append(_tag_line("feature", (("policy", policy), ("name", name))))
    return nested, nested_feature, tuple(lines)


def _guest_cpu(el: etree._Element | None, vcpus: int) -> tuple[GuestCpu, tuple[str, ...]]:
    """The ``<cpu>`` children: at most one <topology>, then <feature>s (libvirt's canonical order)."""
    if el is None:
        return GuestCpu(), ()
    topology_el, features = None, []
    for child in _elements(el):
        if child.tag == "topology":
            if topology_el is not None:
                raise _xml_error("element <topology> may appear only once in <cpu>")
            topology_el = child
        elif child.tag == "feature":
            features.append(child)
        else:
            raise unsupported(f"element <{_qname(child)}> in <cpu> {_NOT_SUPPORTED}")
    topology = _cpu_topology(topology_el, vcpus) if topology_el is not None else None
    custom = el.get("mode", "custom") == "custom"  # without a model: _cpu refuses <model>
    if custom and features:
        raise _xml_error("Non-empty feature list specified without CPU model")
    nested, nested_feature, lines = _cpu_features(features)
    if custom and el.get("check") is not None:  # libvirt's post-parse check, after the children
        raise unsupported("check attribute specified for CPU with no model")
    if topology is not None:
        t = topology
        attrs = (("sockets", t.sockets), ("dies", t.dies), ("cores", t.cores), ("threads", t.threads))
        lines = (_tag_line("topology", tuple((k, str(v)) for k, v in attrs)), *lines)
    return GuestCpu(topology, nested, nested_feature), lines


CLOCK_OFFSETS_SUPPORTED = ("utc", "localtime")


def _clock(el: etree._Element | None) -> str:
    """``<clock offset='utc'|'localtime'/>``: the zone the guest's CMOS RTC starts in (utc without
    <clock>). Other offsets, their attributes and every <timer> are refused naming what was asked."""
    if el is None:
        return "utc"
    offset = el.get("offset") or "utc"
    if offset not in _CLOCK_OFFSETS:
        raise unsupported(f"unknown clock offset '{offset}'")
    _check_attrs(el, ("offset",))
    for child in _elements(el):
        if child.tag == "timer":
            timer = child.get("name")
            raise unsupported(f"clock timer '{timer}' {_NOT_SUPPORTED}" if timer else f"clock timer {_NOT_SUPPORTED}")
    _leaf(el)
    if offset not in CLOCK_OFFSETS_SUPPORTED:
        raise unsupported(f"clock offset '{offset}' {_NOT_SUPPORTED}; use offset='utc' or offset='localtime'")
    return offset


def _lifecycle(el: etree._Element | None, default: str) -> str:
    if el is None:
        return default
    _check_attrs(el, ())
    value = _text(el)
    if value is None:
        return default  # empty: libvirt takes the default
    if value not in _LIFECYCLE_ACTIONS:
        raise unsupported(f"unknown {el.tag} action: {value}")
    if value in _CRASH_ONLY and el.tag != "on_crash":
        raise unsupported(f"Lifecycle event '{el.tag[3:]}' doesn't support '{value}' action")
    if value not in _LIFECYCLE_OK + _CRASH_ONLY:
        # rename-restart: libxl-only in libvirt; its QEMU driver refuses it too.
        raise unsupported(f"<{el.tag}> action '{value}' {_NOT_SUPPORTED}")
    return value


def _pm(el: etree._Element | None) -> tuple[tuple[str, str], ...]:
    if el is None:
        return ()
    _check_attrs(el, ())
    kids = _singletons(el, ("suspend-to-mem", "suspend-to-disk"), f"element <{{tag}}> in <pm> {_NOT_SUPPORTED}")
    out: list[tuple[str, str]] = []
    for tag in ("suspend-to-mem", "suspend-to-disk"):
        child = kids.get(tag)
        if child is None:
            continue
        enabled = child.get("enabled")
        if enabled is not None and enabled not in ("yes", "no"):
            raise _prop_enum_error(child, "enabled", enabled)
        _check_attrs(child, ("enabled",))
        _leaf(child)
        if enabled is None:
            continue  # unset: libvirt does not print it either
        if enabled == "yes":
            raise unsupported(f"<pm><{tag} enabled='yes'>: guest suspend {_NOT_SUPPORTED}")
        out.append((tag, enabled))
    return tuple(out)


def _metadata(el: etree._Element | None) -> tuple[str, ...]:
    if el is None:
        return ()
    _check_attrs(el, ())
    list(_elements(el))  # refuses node kinds the parser should never have let through
    chunks: list[str] = []
    # Application-owned content: what libvirt keeps (one element per namespace, see domain/metadata.py),
    # verbatim, re-indented for its depth the way libxml2 does, so mixed content is never altered.
    for child in metadata.sanitize(el):
        dup = copy.deepcopy(child)
        dup.tail = None
        metadata.strip_layout(dup)
        metadata.indent(dup, level=2)
        chunks.append(etree.tostring(dup, encoding="unicode", with_tail=False))
    return tuple(chunks)


def _char_target(parent: etree._Element, kind: str, default_type: str, allow_model: bool) -> tuple[int, str]:
    kids = _singletons(parent, ("target",), f"element <{{tag}}> in <{kind}> {_NOT_SUPPORTED}")
    target = kids.get("target")
    if target is None:
        return 0, default_type
    known = _SERIAL_TARGETS if kind == "serial" else _CONSOLE_TARGETS
    ttype = target.get("type")
    if ttype is not None and ttype not in known:
        raise unsupported(f"unknown target type '{ttype}' specified for character device")
    model_el = target.find("model")
    model = model_el.get("name") if model_el is not None else None
    if kind == "serial" and model is not None and model not in _SERIAL_MODELS:
        raise unsupported(f"unknown target model '{model}' specified for character device")
    port_raw = target.get("port")
    port = 0
    if port_raw is not None:
        parsed = _strtoul(port_raw, positive=False, maximum=_UINT_MAX)
        if parsed is None:
            raise _domain_xml_error(f"Invalid port number: {port_raw}")
        port = parsed
    _check_attrs(target, ("type", "port"), f"{kind}><target")
    ttype = ttype or default_type
    if ttype != default_type:
        raise unsupported(f"{kind} target type '{ttype}' {_NOT_SUPPORTED}; use type='{default_type}'")
    if port != 0:
        raise unsupported(f"{kind} port {port} {_NOT_SUPPORTED}; only port 0 (COM1) exists")
    allowed = ("model",) if allow_model else ()
    tkids = _singletons(target, allowed, f"element <{{tag}}> in <{kind}><target> {_NOT_SUPPORTED}")
    model_el = tkids.get("model")
    if model_el is not None:
        _check_attrs(model_el, ("name",), f"{kind}><target><model")
        _leaf(model_el)
        if model != _SERIAL_TARGET:
            raise unsupported(f"{kind} target model '{model}' {_NOT_SUPPORTED}; use name='{_SERIAL_TARGET}'")
    return port, ttype


def _drop_runtime_output(el: etree._Element, kind: str) -> None:
    """A running domain's dumpxml adds the allocated pty (``<source path>``, console ``tty``) and the device
    alias; like libvirt, a definition ignores them (the pty is allocated at start), so dumpxml output can be
    defined again. Anything else in those places is refused."""
    if kind == "console" and "tty" in el.attrib:
        del el.attrib["tty"]
    for child in list(_elements(el)):
        if child.tag == "source":
            _check_attrs(child, ("path",), f"{kind}><source")
            _leaf(child)
            el.remove(child)
        elif child.tag == "alias":
            _check_attrs(child, ("name",), f"{kind}><alias")
            _leaf(child)
            if child.get("name") != "serial0":
                raise unsupported(f"{kind} alias '{child.get('name')}' {_NOT_SUPPORTED}")
            el.remove(child)


def _chardev(el: etree._Element, kind: str) -> CharDevice:
    ctype = el.get("type")
    if ctype is not None and ctype not in _CHR_TYPES:
        raise unsupported(f"unknown type presented to host for character device: {ctype}")
    _check_attrs(el, ("type", "tty") if kind == "console" else ("type",))
    ctype = ctype or "pty"
    if ctype != "pty":
        raise unsupported(f"{kind} type '{ctype}' {_NOT_SUPPORTED}; use type='pty'")
    _drop_runtime_output(el, kind)
    if kind == "serial":
        port, ttype = _char_target(el, kind, _SERIAL_TARGET, allow_model=True)
    else:
        port, ttype = _char_target(el, kind, _CONSOLE_TARGET, allow_model=False)
    return CharDevice(kind, port, ttype)


_DISK_TYPES = ("file", "block", "dir", "network", "volume", "nvme", "vhostuser")
_DISK_TYPES_SUPPORTED = ("file", "block", "volume")
_DISK_CACHES = ("default", "none", "writethrough", "writeback", "directsync", "unsafe")
_DISK_IO = ("native", "threads", "io_uring")
_DISK_IO_SUPPORTED = _DISK_IO  # qemu-storage-daemon's aio= (Debian's 7.2 is built with io_uring)
_DISK_DISCARD = ("unmap", "ignore")
_DISK_DISCARD_SUPPORTED = ("ignore",)  # the backend's default; the device offers no discard
_DISK_FORMATS_SUPPORTED = ("raw", "qcow2")
_DISK_SOURCE_ATTRS = {"file": ("file",), "block": ("dev",), "volume": ("pool", "volume")}


@dataclass(frozen=True)
class _DiskRequest:
    """A parsed <disk> before its PCI address is assigned."""

    fields: dict[str, object]
    address: PciAddress | None


def _disk(el: etree._Element) -> _DiskRequest:
    """virDomainDiskDefParseXML's checks that matter here, then what this driver can run: a
    device='disk' on bus='virtio' backed by a file, a block device or a storage volume."""
    dtype = el.get("type", "file")
    if dtype not in _DISK_TYPES:
        raise _prop_enum_error(el, "type", dtype)
    device = el.get("device", "disk")
    if device not in _DISK_DEVICES:
        raise _prop_enum_error(el, "device", device)
    model = el.get("model")
    if model is not None and model not in _DISK_MODELS:
        raise _prop_enum_error(el, "model", model)
    target = el.find("target")
    dev = target.get("dev") if target is not None else None
    bus = target.get("bus") if target is not None else None
    if target is not None and bus is not None and bus not in _DISK_BUSES:
        raise _prop_enum_error(target, "bus", bus)
    if not dev:
        source = el.find("source")
        path = next((source.get(a) for a in ("file", "dev", "dir", "name") if source is not None and source.get(a)), "")
        raise VirtError(ErrorCode.NO_TARGET, path or "", ErrorDomain.DOMAIN)
    inferred = bus is None
    if bus is None:
        bus = "fdc" if device == "floppy" else next((b for p, b in _DISK_PREFIX_BUS if dev.startswith(p)), "ide")
    if el.find("address") is None and _disk_index(dev) is None:
        raise _domain_xml_error(f"Unknown disk name '{dev}' and no address specified")
    if device not in DISK_DEVICES_SUPPORTED:
        raise unsupported(f"disk device '{device}' {_NOT_SUPPORTED}; use device='disk'")
    if bus not in DISK_BUSES_SUPPORTED:
        how = f" (inferred from target '{dev}')" if inferred else ""
        raise unsupported(f"disk bus '{bus}'{how} {_NOT_SUPPORTED}; use bus='virtio'")
    if dtype not in _DISK_TYPES_SUPPORTED:
        raise unsupported(f"disk type '{dtype}' {_NOT_SUPPORTED}; use type='file', 'block' or 'volume'")
    if model not in (None, "default", *DISK_MODELS_SUPPORTED):
        raise unsupported(f"disk model '{model}' {_NOT_SUPPORTED}; use model='virtio'")
    _check_attrs(el, ("type", "device", "model"))
    fields: dict[str, object] = {"type": dtype, "target": dev}
    if model in DISK_MODELS_SUPPORTED:
        fields["model"] = model
    address: PciAddress | None = None
    seen: set[str] = set()
    for child in _elements(el):
        tag = _qname(child)
        if tag in seen:
            raise unsupported(f"more than one <{tag}> in <disk> {_NOT_SUPPORTED}")
        seen.add(tag)
        if tag == "driver":
            _check_attrs(child, ("name", "type", "cache", "io", "discard"), "disk><driver")
            _leaf(child)
            name, fmt = child.get("name"), child.get("type")
            if name is not None and name != "qemu":
                raise unsupported(f"disk driver name '{name}' {_NOT_SUPPORTED}; use name='qemu'")
            if fmt is not None and fmt not in _DISK_FORMATS_SUPPORTED:
                raise unsupported(f"disk format '{fmt}' {_NOT_SUPPORTED}; use type='raw' or type='qcow2'")
            for attr, values, supported in (
                ("cache", _DISK_CACHES, _DISK_CACHES),
                ("io", _DISK_IO, _DISK_IO_SUPPORTED),
                ("discard", _DISK_DISCARD, _DISK_DISCARD_SUPPORTED),
            ):
                value = child.get(attr)
                if value is None:
                    continue
                if value not in values:
                    raise _prop_enum_error(child, attr, value)
                if value not in supported:
                    raise unsupported(f"disk driver {attr}='{value}' {_NOT_SUPPORTED}")
                fields[attr] = value
            if fields.get("io") == "native" and fields.get("cache") not in ("none", "directsync"):
                # libvirt 9.0's qemu driver, at define: Linux AIO needs O_DIRECT (measured against its libvirtd)
                raise unsupported("io='native' needs either no disk cache or directsync cache mode")
            fields["driver_name"], fields["format"] = name, fmt
        elif tag == "source":
            attrs = _DISK_SOURCE_ATTRS[dtype]
            _check_attrs(child, attrs, "disk><source")
            _leaf(child)
            if dtype == "volume":
                pool, volume = child.get("pool"), child.get("volume")
                if not pool or not volume:
                    raise _domain_xml_error("'pool' and 'volume' must be specified together for 'pool' type source")
                fields["pool"], fields["volume"] = pool, volume
            else:
                fields["path"] = child.get(attrs[0]) or None
        elif tag == "target":
            _check_attrs(child, ("dev", "bus"), "disk><target")
            _leaf(child)
        elif tag == "readonly":
            _check_attrs(child, ())
            _leaf(child)
            fields["readonly"] = True
        elif tag == "serial":
            _check_attrs(child, ())
            _leaf(child)
            serial = _text(child)
            if serial is not None:
                if not re.fullmatch(r"[A-Za-z0-9_ .+-]+", serial):
                    raise _domain_xml_error(f"disk serial '{serial}' contains characters other than [A-Za-z0-9_ .+-]")
                if len(serial) > 20:
                    raise unsupported("disk serial longer than 20 characters (virtio-blk's ID) " + _NOT_SUPPORTED)
                fields["serial"] = serial
        elif tag == "boot":
            _check_attrs(child, ("order",), "disk><boot")
            _leaf(child)
            order = _prop_uint(child, "order")
            if order is None or order == 0:
                raise _domain_xml_error("boot order must be a positive integer")
            fields["boot_order"] = order
        elif tag == "address":
            address = _pci_address(child)
        else:
            raise unsupported(f"element <{tag}> in <disk> {_NOT_SUPPORTED}")
    if dtype != "volume" and "path" not in fields:
        raise unsupported(f"a <disk type='{dtype}'> without <source> (an empty drive) {_NOT_SUPPORTED}")
    if dtype == "volume" and "pool" not in fields:
        raise unsupported(f"a <disk type='volume'> without <source pool volume> {_NOT_SUPPORTED}")
    return _DiskRequest(fields, address)


def _check_disk_targets(disks: list[_DiskRequest]) -> None:
    """virDomainDiskDefCheckDuplicateInfo's duplicate target check (domain_validate.c)."""
    for i, a in enumerate(disks):
        for b in disks[i + 1 :]:
            if a.fields["target"] == b.fields["target"]:
                src_a, src_b = (d.fields.get("path") or "<null>" for d in (a, b))
                raise _xml_error(
                    f"target '{a.fields['target']}' duplicated for disk sources '{src_a}' and '{src_b}'",
                    ErrorDomain.DOMAIN,
                )


def _format_disk(disk: DiskDevice) -> list[tuple[int, str]]:
    """virDomainDiskDefFormat's lines for the subset this driver accepts."""
    model = f" model='{disk.model}'" if disk.model is not None else ""
    lines = [(2, f"<disk type='{disk.type}' device='disk'{model}>")]
    driver = tuple(
        (k, v)
        for k, v in (
            ("name", disk.driver_name),
            ("type", disk.format),
            ("cache", disk.cache),
            ("io", disk.io),
            ("discard", disk.discard),
        )
        if v is not None
    )
    if driver:
        lines.append((3, _tag_line("driver", driver)))
    if disk.type == "volume":
        lines.append((3, _tag_line("source", (("pool", disk.pool or ""), ("volume", disk.volume or "")))))
    else:
        lines.append((3, _tag_line("source", ((_DISK_SOURCE_ATTRS[disk.type][0], disk.path or ""),))))
    lines.append((3, _tag_line("target", (("dev", disk.target), ("bus", "virtio")))))
    if disk.readonly:
        lines.append((3, "<readonly/>"))
    if disk.serial is not None:
        lines.append((3, _tag_line("serial", text=disk.serial)))
    if disk.boot_order is not None:
        lines.append((3, _tag_line("boot", (("order", str(disk.boot_order)),))))
    lines.append((3, disk.address.xml()))
    lines.append((2, "</disk>"))
    return lines


def _disk_index(name: str) -> int | None:
    """libvirt's virDiskNameToIndex: sda -> 0, hdz -> 25, vdaa -> 26 (trailing digits ignored); None for
    names it cannot map."""
    prefix = next((p for p in ("fd", "hd", "vd", "sd", "xvd", "ubd") if name.startswith(p)), None)
    m = re.fullmatch(r"([a-z]+)[0-9]*", name[len(prefix) :]) if prefix is not None else None
    if m is None:
        return None
    idx = 0
    for i, ch in enumerate(m.group(1)):
        idx = (idx + (0 if i < 1 else 1)) * 26 + ord(ch) - ord("a")
    return idx


def _prop_uint(el: etree._Element, attr: str) -> int | None:
    """libvirt's virXMLPropUInt with base 0 (strtoul: 0x hex, 0 octal, decimal); None when absent."""
    raw = el.get(attr)
    if raw is None:
        return None
    text = raw.strip(_C_SPACE)
    m = re.fullmatch(r"\+?(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))", text, flags=re.ASCII)
    value = -1
    if m is not None:
        hexa, octal, decimal = m.groups()
        value = int(hexa, 16) if hexa else int(octal, 8) if octal else int(decimal)
    if not 0 <= value <= _UINT_MAX:
        expected = "Expected non-negative integer value"
        raise _xml_error(f"Invalid value for attribute '{attr}' in element '{_qname(el)}': '{raw}'. {expected}")
    return value


def _pci_address(el: etree._Element) -> PciAddress | None:
    atype = el.get("type")
    if atype is None:
        raise _domain_xml_error("No type specified for device address")
    if atype != "pci":
        raise unsupported(f"device address type '{atype}' {_NOT_SUPPORTED}; use type='pci'")
    _check_attrs(el, ("type", "domain", "bus", "slot", "function"))
    _leaf(el)
    domain, bus, slot, function = (_prop_uint(el, a) or 0 for a in ("domain", "bus", "slot", "function"))
    # virPCIDeviceAddressIsValid (util/virpci.c: no error domain)
    if bus > 0xFF:
        raise _xml_error(f"Invalid PCI address bus='0x{bus:x}', must be <= 0xFF", ErrorDomain.NONE)
    if slot > 0x1F:
        raise _xml_error(f"Invalid PCI address slot='0x{slot:x}', must be <= 0x1F", ErrorDomain.NONE)
    if function > 7:
        raise _xml_error(f"Invalid PCI address function=0x{function:x}, must be <= 7", ErrorDomain.NONE)
    if domain == bus == slot == 0:
        return None  # an empty address (virPCIDeviceAddressIsEmpty): one is assigned
    if domain != 0 or bus != 0:
        raise unsupported(f"PCI address {domain:04x}:{bus:02x} {_NOT_SUPPORTED}; devices live on bus 0000:00")
    if function != 0:
        raise unsupported(f"PCI function {function} {_NOT_SUPPORTED}; one function per slot")
    return PciAddress(slot)


def _rng(el: etree._Element) -> tuple[str, str, int, int, PciAddress | None]:
    """virDomainRNGDefParseXML's checks, in its order, then what this driver can run."""
    model = el.get("model")
    if model is None:
        raise _domain_xml_error("missing RNG device model")
    if model not in _RNG_MODELS:
        raise unsupported(f"unknown RNG model '{model}'")
    _check_attrs(el, ("model",))
    rate_el = el.find("rate")
    rate = period = 0
    if rate_el is not None:
        try:
            rate = _prop_uint(rate_el, "bytes") or 0
        except VirtError:
            raise _domain_xml_error("invalid RNG rate bytes value") from None
        if rate > 0:
            try:
                period = _prop_uint(rate_el, "period") or 0
            except VirtError:
                raise _domain_xml_error("invalid RNG rate period value") from None
    backends = [c for c in _elements(el) if c.tag == "backend"]
    if len(backends) != 1:
        raise _domain_xml_error("only one RNG backend is supported")
    backend = backends[0].get("model")
    if backend is None:
        raise _domain_xml_error("missing RNG device backend model")
    if backend not in _RNG_BACKENDS:
        raise unsupported(f"unknown RNG backend model '{backend}'")
    address: PciAddress | None = None
    for child in _elements(el):
        tag = _qname(child)
        if tag == "rate":
            _check_attrs(child, ("bytes", "period"))
            _leaf(child)
        elif tag == "address":
            address = _pci_address(child)
        elif tag != "backend":
            raise unsupported(f"element <{tag}> in <rng> {_NOT_SUPPORTED}")
    if model not in _RNG_MODELS_SUPPORTED:
        raise unsupported(f"rng model '{model}' {_NOT_SUPPORTED}; use model='virtio'")
    if backend != "random":
        raise unsupported(f"rng backend model '{backend}' {_NOT_SUPPORTED}; use model='random'")
    _check_attrs(backends[0], ("model",), "rng><backend")
    source = _text(backends[0])
    source = source.strip(_C_SPACE) if source is not None else None
    source = source or _RNG_DEFAULT_SOURCE
    if source not in RNG_SOURCES:
        raise unsupported(f"rng backend '{source}' {_NOT_SUPPORTED}; use {' or '.join(RNG_SOURCES)}")
    return model, source, rate, period, address


def parse_device_xml(text: str) -> etree._Element:
    """The device of attach-device/detach-device/update-device, checked as a define would check it: <rng>,
    <disk> or <interface>."""
    root = _parse_safely(text)
    _check_bounds(root)
    if root.tag == "rng":
        _rng(root)
    elif root.tag == "disk":
        _disk(root)
    elif root.tag == "interface":
        _interface(copy.deepcopy(root))  # (the check drops a live XML's runtime parts from what it reads)
    else:
        raise unsupported(f"device <{_qname(root)}> {_NOT_SUPPORTED} by attach-device or detach-device")
    return root


def disk_target(device: etree._Element) -> str:
    """The <target dev> of a <disk> parse_device_xml accepted."""
    return str(_disk(device).fields["target"])


def disk_volume(device: etree._Element) -> tuple[str, str] | None:
    """(pool, volume) of a <disk type='volume'> parse_device_xml accepted; None for other disks."""
    fields = _disk(device).fields
    if fields.get("type") != "volume":
        return None
    return str(fields["pool"]), str(fields["volume"])


def disk_insert_index(cfg: DomainConfig, target: str) -> int:
    """Where virDomainDiskInsert puts a new disk among ``cfg.disks``: before the first one whose target
    sorts after it (by virDiskNameToIndex; every disk here is on the virtio bus), else last. The attach
    refusal of a target in use is qemuDomainAttachDeviceConfig's."""
    if any(d.target == target for d in cfg.disks):
        raise VirtError(ErrorCode.OPERATION_INVALID, f"target {target} already exists", ErrorDomain.DOMAIN)
    index = _disk_index(target)
    for i, d in enumerate(cfg.disks):
        other = _disk_index(d.target)
        if index is not None and other is not None and other > index:
            return i
    return len(cfg.disks)


def find_disk(cfg: DomainConfig, device: etree._Element) -> int:
    """The index in ``cfg.disks`` of the disk with the device's target (qemuDomainDetachDeviceConfig matches
    on the target alone)."""
    target = disk_target(device)
    for i, d in enumerate(cfg.disks):
        if d.target == target:
            return i
    raise VirtError(ErrorCode.DEVICE_MISSING, f"no target device {target}", ErrorDomain.DOMAIN)


def find_net(cfg: DomainConfig, device: etree._Element) -> int:
    """virDomainNetFindIdx: the index in ``cfg.nets`` of the one interface with the MAC and the PCI address
    ``device`` gives (each only where given)."""
    request = _interface(copy.deepcopy(device))
    mac_el = device.find("mac")
    mac = request.fields["mac"] if mac_el is not None and mac_el.get("address") is not None else None
    found = [
        i
        for i, net in enumerate(cfg.nets)
        if (mac is None or net.mac == mac) and (request.address is None or net.address == request.address)
    ]
    if len(found) > 1:
        if mac is not None:
            raise VirtError(ErrorCode.OPERATION_FAILED, f"multiple devices matching MAC address {mac} found")
        raise VirtError(ErrorCode.OPERATION_FAILED, "multiple matching devices found")
    if not found:
        if mac is not None and request.address is not None:
            detail = f"no device matching MAC address {mac} found on {request.address}"
        elif request.address is not None:
            detail = f"no device found on {request.address}"
        elif mac is not None:
            detail = f"no device matching MAC address {mac} found"
        else:
            detail = "no device found"
        raise VirtError(ErrorCode.DEVICE_MISSING, detail, ErrorDomain.DOMAIN)
    return found[0]


def net_link_update(cfg: DomainConfig, device: etree._Element) -> tuple[int, str]:
    """update-device of an <interface> (virsh domif-setlink): the interface and the link state asked for;
    anything else changed is refused, as libvirt's QEMU driver refuses what it cannot change live."""
    index = find_net(cfg, device)
    request = _interface(copy.deepcopy(device))
    net = cfg.nets[index]
    for key in ("type", "model", "network", "bridge", "target", "mtu", "queues"):
        if request.fields.get(key, getattr(NetDevice, key, None)) != getattr(net, key):
            raise VirtError(
                ErrorCode.OPERATION_UNSUPPORTED,
                f"cannot modify network device {key} of the interface with MAC address {net.mac} "
                "(the mshv driver changes only its link state)",
            )
    state = request.fields.get("link_state")
    return index, state if isinstance(state, str) else "up"


def find_rng(cfg: DomainConfig, device: etree._Element) -> int:
    """The index in ``cfg.rngs`` of the first device ``device`` describes (virDomainRNGFind)."""
    model, source, rate, period, address = _rng(device)
    for i, rng in enumerate(cfg.rngs):
        if (rng.model, rng.backend, rng.rate_bytes, rng.rate_period_ms) != (model, source, rate, period):
            continue
        if address is None or address == rng.address:
            return i
    raise VirtError(ErrorCode.DEVICE_MISSING, "no matching RNG device was found", ErrorDomain.DOMAIN)


def _assign_pci(
    nets: list[_NetRequest], disks: list[_DiskRequest], rngs: list[tuple[str, str, int, int, PciAddress | None]]
) -> tuple[tuple[NetDevice, ...], tuple[DiskDevice, ...], tuple[RngDevice, ...]]:
    """The PCI devices with their addresses: addresses.assign_pci over all of them in libvirt's
    qemuDomainAssignDevicePCISlots order (interfaces, disks, rngs), each kind in document order."""
    requested = [n.address for n in nets] + [d.address for d in disks] + [address for *_, address in rngs]
    addresses = assign_pci(requested)
    net_addresses = addresses[: len(nets)]
    disk_addresses = addresses[len(nets) : len(nets) + len(disks)]
    rng_addresses = addresses[len(nets) + len(disks) :]
    net_devices = tuple(
        NetDevice(address=address, **n.fields)  # type: ignore[arg-type]
        for n, address in zip(nets, net_addresses, strict=True)
    )
    disk_devices = tuple(
        DiskDevice(address=address, **d.fields)  # type: ignore[arg-type]
        for d, address in zip(disks, disk_addresses, strict=True)
    )
    rng_devices = tuple(
        RngDevice(model, source, address, rate, period)
        for (model, source, rate, period, _), address in zip(rngs, rng_addresses, strict=True)
    )
    return net_devices, disk_devices, rng_devices


def _format_rng(rng: RngDevice) -> list[tuple[int, str]]:
    """virDomainRNGDefFormat's lines."""
    lines = [(2, f"<rng model='{rng.model}'>")]
    if rng.rate_bytes:
        period = f" period='{rng.rate_period_ms}'" if rng.rate_period_ms else ""
        lines.append((3, f"<rate bytes='{rng.rate_bytes}'{period}/>"))
    lines.append((3, _tag_line("backend", (("model", "random"),), rng.backend)))
    lines.append((3, rng.address.xml()))
    lines.append((2, "</rng>"))
    return lines


_NET_TYPES = (
    "user",
    "ethernet",
    "vhostuser",
    "server",
    "client",
    "mcast",
    "network",
    "bridge",
    "internal",
    "direct",
    "hostdev",
    "udp",
    "vdpa",
    "null",
    "vds",
)
_NET_TYPES_SUPPORTED = ("network", "bridge", "ethernet")
_NET_TYPES_WITH_SOURCE = ("network", "bridge", "internal", "direct", "hostdev", "vdpa", "vds")  # a <source> is required
_NET_MODELS_SUPPORTED = ("virtio", "virtio-non-transitional")  # modern-only virtio-pci, as for <rng>
_NET_MODELS_CASELESS = ("virtio", "virtio-transitional", "virtio-non-transitional")  # libvirt's enum is caseless
_NET_MODEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_NET_LINK_STATES = ("up", "down")
# virDomainNetDefParseXML drops these target names from an inactive definition: they are the ones
# libvirt generates (VIR_NET_GENERATED_VNET_PREFIX and the macvtap/macvlan ones) and a new is made at start.
NET_GENERATED_PREFIXES = ("vnet", "macvtap", "macvlan")
NET_MTU_RANGE = (68, 65535)  # virtio-net's MTU field; the VMM's config refuses anything else
NET_MAC_PREFIX = (0x52, 0x54, 0x00)  # libvirt's (QEMU's) locally administered prefix


@dataclass(frozen=True)
class _NetRequest:
    """A parsed <interface> before its PCI address is assigned."""

    fields: dict[str, object]
    address: PciAddress | None


def parse_mac(text: str) -> str | None:
    """libvirt's virMacAddrParse: six ':'-separated groups of one or two hex digits; the canonical
    lower-case form, or None."""
    parts = text.split(":")
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9a-fA-F]{1,2}", p, flags=re.ASCII) for p in parts):
        return None
    return ":".join(f"{int(p, 16):02x}" for p in parts)


def generate_mac() -> str:
    """virDomainNetGenerateMAC: 52:54:00 and three random bytes."""
    return ":".join(f"{b:02x}" for b in (*NET_MAC_PREFIX, *os.urandom(3)))


def _net_uint(el: etree._Element, attr: str) -> int | None:
    """virXMLPropUInt with base 10 (white space and '+' before the digits, no hex); None when absent."""
    raw = el.get(attr)
    if raw is None:
        return None
    value = _strtoul(raw, positive=True, maximum=_UINT_MAX)
    if value is None:
        expected = "Expected non-negative integer value"
        raise _xml_error(f"Invalid value for attribute '{attr}' in element '{_qname(el)}': '{raw}'. {expected}")
    return value


# <interface>'s children that are empty elements with these attributes and nothing else to check here
NET_MAX_QUEUES = 127  # the VMM's NET_MAX_QUEUE_PAIRS (vmm/config.py)

_NET_LEAVES = {"mac": ("address",), "model": ("type",), "driver": ("queues",), "mtu": ("size",), "link": ("state",)}


def _interface(el: etree._Element) -> _NetRequest:
    """virDomainNetDefParseXML's checks for the elements read here, in its order, then what this driver
    runs: a virtio-net device on a tap, attached to a libvirt network's bridge, a named bridge, or
    nothing (type='ethernet')."""
    ntype = el.get("type", "user")
    if ntype not in _NET_TYPES:
        raise _prop_enum_error(el, "type", ntype)
    kids: dict[str, etree._Element] = {}
    for child in _elements(el):
        kids.setdefault(_qname(child), child)  # libvirt reads the first of each
    source = kids.get("source")
    if source is None and ntype in _NET_TYPES_WITH_SOURCE:
        raise _domain_xml_error(f"interface type='{ntype}' requires a 'source' element")
    fields: dict[str, object] = {"type": ntype}
    mac_el = kids.get("mac")
    raw_mac = mac_el.get("address") if mac_el is not None else None
    if raw_mac is not None:
        mac = parse_mac(raw_mac)
        if mac is None:
            raise _domain_xml_error(f"unable to parse mac address '{raw_mac}'")
        if int(mac[:2], 16) & 1:
            raise _domain_xml_error(f"expected unicast mac address, found multicast '{mac}'")
    fields["mac"] = mac if raw_mac is not None else generate_mac()  # kept in the stored definition
    if source is not None and ntype in ("network", "bridge"):
        value = source.get(ntype)
        if value is None:
            raise _xml_error(f"Missing required attribute '{ntype}' in element 'source'")
        fields[ntype] = value
    model_el = kids.get("model")
    model = model_el.get("type") or None if model_el is not None else None
    if model is not None:
        if model.lower() in _NET_MODELS_CASELESS:
            model = model.lower()
        elif not set(model) <= _NET_MODEL_CHARS:
            raise VirtError(ErrorCode.INVALID_ARG, "Model name contains invalid characters", ErrorDomain.DOMAIN)
    driver = kids.get("driver")
    if driver is not None and (model is None or model in _NET_MODELS_CASELESS):
        fields["queues"] = _net_uint(driver, "queues") or 0
    mtu_el = kids.get("mtu")
    if mtu_el is not None and mtu_el.get("size"):  # an empty size is no size, as for libvirt
        mtu = _strtoul(mtu_el.get("size", ""), positive=True, maximum=_UINT_MAX)
        if mtu is None:
            raise _domain_xml_error("malformed mtu size")
        if mtu:
            fields["mtu"] = mtu
    link = kids.get("link")
    state = link.get("state") or None if link is not None else None
    if state is not None:
        if state not in _NET_LINK_STATES:
            raise unsupported(f"unknown interface link state '{state}'")
        fields["link_state"] = state
    # What this driver runs.
    if ntype not in _NET_TYPES_SUPPORTED:
        raise unsupported(
            f"interface type '{ntype}' {_NOT_SUPPORTED}; use type='network', type='bridge' or type='ethernet'"
        )
    if model is not None and model not in _NET_MODELS_SUPPORTED:
        raise unsupported(f"interface model '{model}' {_NOT_SUPPORTED}; use type='virtio'")
    fields["model"] = model or "virtio"  # the driver's default model (QEMU's post-parse fills in its own)
    _check_attrs(el, ("type",))
    address: PciAddress | None = None
    seen: set[str] = set()
    for child in list(_elements(el)):
        tag = _qname(child)
        if tag in seen:
            raise unsupported(f"more than one <{tag}> in <interface> {_NOT_SUPPORTED}")
        seen.add(tag)
        if tag in _NET_LEAVES:
            _check_attrs(child, _NET_LEAVES[tag], f"interface><{tag}")
            _leaf(child, f"interface><{tag}")
        elif tag == "source":
            if ntype == "ethernet":
                raise unsupported(f"element <source> in <interface type='ethernet'> {_NOT_SUPPORTED}")
            # A running domain's XML carries the port and its bridge in <source network>: libvirt
            # ignores them in a definition, so a dumpxml defines again.
            allowed = ("network", "portid", "bridge") if ntype == "network" else ("bridge",)
            _check_attrs(child, allowed, "interface><source")
            _leaf(child, "interface><source")
            if ntype == "network":
                for runtime in ("portid", "bridge"):
                    child.attrib.pop(runtime, "")
        elif tag == "target":
            _check_attrs(child, ("dev",), "interface><target")
            _leaf(child, "interface><target")
            dev = child.get("dev")
            if dev is not None and not dev.startswith(NET_GENERATED_PREFIXES):
                if not dev:
                    raise unsupported(f"an empty <target dev> in <interface> {_NOT_SUPPORTED}")
                fields["target"] = dev
        elif tag == "alias":
            # A running domain's netN alias: ignored by a definition, as libvirt ignores it.
            _check_attrs(child, ("name",), "interface><alias")
            _leaf(child, "interface><alias")
            name = child.get("name", "")
            if not re.fullmatch(r"net[0-9]+", name, flags=re.ASCII):
                raise unsupported(f"interface alias '{name}' {_NOT_SUPPORTED}")
            el.remove(child)
        elif tag == "address":
            address = _pci_address(child)
        else:
            raise unsupported(f"element <{tag}> in <interface> {_NOT_SUPPORTED}")
    queues = fields.get("queues", 0)
    if isinstance(queues, int) and queues > NET_MAX_QUEUES:
        # libvirt takes any number and leaves the limit to the tap (256 queues) and QEMU; this device's is
        # its MSI-X table (two vectors a pair, one for the control queue, one for config changes: 256).
        raise unsupported(f"interface driver queues='{queues}' {_NOT_SUPPORTED}; use 1 to {NET_MAX_QUEUES}")
    if not isinstance(queues, int) or queues <= 1:
        fields["queues"] = 0  # 1 is one queue pair: libvirt does not print it either
    size = fields.get("mtu")
    if isinstance(size, int) and not NET_MTU_RANGE[0] <= size <= NET_MTU_RANGE[1]:
        low, high = NET_MTU_RANGE
        raise unsupported(f"interface mtu size='{size}' {_NOT_SUPPORTED}; use {low} to {high}")
    return _NetRequest(fields, address)


def _format_net(net: NetDevice, live: NetLive | None = None, alias: str | None = None) -> list[tuple[int, str]]:
    """virDomainNetDefFormat's lines for the subset this driver accepts (``live``: a running domain's)."""
    lines = [(2, f"<interface type='{net.type}'>"), (3, _tag_line("mac", (("address", net.mac),)))]
    if net.type == "network":
        source: tuple[tuple[str, str], ...] = (("network", net.network or ""),)
        if live is not None and live.portid is not None:
            source += (("portid", live.portid),)
        if live is not None and live.bridge is not None:
            source += (("bridge", live.bridge),)
        lines.append((3, _tag_line("source", source)))
    elif net.type == "bridge":
        lines.append((3, _tag_line("source", (("bridge", net.bridge or ""),))))
    ifname = live.ifname if live is not None else net.target
    if ifname is not None:
        lines.append((3, _tag_line("target", (("dev", ifname),))))
    lines.append((3, _tag_line("model", (("type", net.model),))))
    if net.queues > 1:
        lines.append((3, _tag_line("driver", (("queues", str(net.queues)),))))
    if net.link_state is not None:  # (a running domain's is its live config's: domif-setlink changes that)
        lines.append((3, _tag_line("link", (("state", net.link_state),))))
    if net.mtu is not None:
        lines.append((3, _tag_line("mtu", (("size", str(net.mtu)),))))
    if alias is not None:
        lines.append((3, _tag_line("alias", (("name", alias),))))
    lines.append((3, net.address.xml()))
    lines.append((2, "</interface>"))
    return lines


@dataclass(frozen=True)
class _Devices:
    serials: tuple[CharDevice, ...]
    consoles: tuple[CharDevice, ...]
    usb_none: bool
    memballoon_none: bool
    rngs: tuple[RngDevice, ...] = ()
    disks: tuple[DiskDevice, ...] = ()
    nets: tuple[NetDevice, ...] = ()


def _devices(el: etree._Element | None) -> _Devices:
    if el is None:
        return _Devices((), (), False, False)
    _check_attrs(el, ())
    serials: list[CharDevice] = []
    consoles: list[CharDevice] = []
    rngs: list[tuple[str, str, int, int, PciAddress | None]] = []
    disks: list[_DiskRequest] = []
    nets: list[_NetRequest] = []
    usb_none = memballoon_none = False
    for child in _elements(el):
        tag = _qname(child)
        if tag == "rng":
            rngs.append(_rng(child))
        elif tag == "serial":
            serials.append(_chardev(child, "serial"))
        elif tag == "console":
            consoles.append(_chardev(child, "console"))
        elif tag == "disk":
            disks.append(_disk(child))
        elif tag == "interface":
            nets.append(_interface(child))
        elif tag == "memballoon":
            model = child.get("model")
            if model is None:
                raise _xml_error("Missing required attribute 'model' in element 'memballoon'")
            if model not in _MEMBALLOON_MODELS:
                raise _prop_enum_error(child, "model", model)
            if model != "none":
                raise unsupported(f"device <memballoon model='{model}'> {_NOT_SUPPORTED}")
            # Explicitly disabled: asks for nothing, so accepting it drops nothing.
            _check_attrs(child, ("model",))
            _leaf(child)
            if memballoon_none:
                raise _SchemaViolation("element <memballoon> may appear only once in <devices>")
            memballoon_none = True
        elif tag == "controller":
            ctype = child.get("type")
            if ctype is not None and ctype not in _CONTROLLER_TYPES:
                raise _prop_enum_error(child, "type", ctype)
            model = child.get("model")
            if ctype == "usb" and model is not None and model not in _USB_MODELS:
                raise unsupported(f"Unknown model type '{model}'")
            if ctype != "usb" or model != "none":
                detail = " ".join(f"{k}='{child.get(k)}'" for k in ("type", "model") if child.get(k) is not None)
                raise unsupported(f"device <controller{' ' + detail if detail else ''}> {_NOT_SUPPORTED}")
            _check_attrs(child, ("type", "model", "index"))
            _leaf(child)
            if child.get("index", "0") != "0":
                raise unsupported(f"controller index '{child.get('index')}' {_NOT_SUPPORTED}")
            if usb_none:
                raise _xml_error("duplicate <controller type='usb' model='none'> in <devices>")
            usb_none = True
        elif tag == "emulator":
            raise unsupported(f"element <emulator> {_NOT_SUPPORTED} (it runs no emulator binary)")
        else:
            raise unsupported(f"device <{tag}> {_NOT_SUPPORTED}")
    if len(serials) > 1:
        raise unsupported(f"more than one <serial> device {_NOT_SUPPORTED}; only port 0 exists")
    if len(consoles) > 1:
        raise unsupported(f"more than one <console> device {_NOT_SUPPORTED}")
    # libvirt keeps serial 0 and the first serial-type console as two views of one device.
    if consoles and not serials:
        serials.append(CharDevice("serial", 0, _SERIAL_TARGET))
    if serials and not consoles:
        consoles.append(CharDevice("console", 0, _CONSOLE_TARGET))
    _check_disk_targets(disks)
    net_devices, disk_devices, rng_devices = _assign_pci(nets, disks, rngs)
    return _Devices(tuple(serials), tuple(consoles), usb_none, memballoon_none, rng_devices, disk_devices, net_devices)


def _uuid(el: etree._Element | None) -> uuid.UUID:
    raw = _text(el) if el is not None else None
    if el is not None:
        _check_attrs(el, ())
    if raw is None:
        return uuid.uuid4()  # absent or empty: generated, as libvirt does
    # libvirt's virUUIDParse: surrounding white space, '-' or ' ' between hex digit pairs, 32 digits.
    if not re.fullmatch(r"[ \t\n\v\f\r]*(?:[- ]*[0-9a-fA-F]{2}){16}[ \t\n\v\f\r]*", raw, flags=re.ASCII):
        raise VirtError(ErrorCode.INTERNAL_ERROR, "malformed uuid element", ErrorDomain.DOMAIN)
    return uuid.UUID(hex=re.sub(r"[^0-9a-fA-F]", "", raw))


def _name(el: etree._Element | None) -> str:
    name = _text(el) if el is not None else None
    if el is not None:
        _check_attrs(el, ())
    if name is None:
        raise VirtError(ErrorCode.NO_NAME, "", ErrorDomain.DOMAIN)
    if "\n" in name:
        # what libvirt's drivers check at define (virXMLCheckIllegalChars)
        raise VirtError(ErrorCode.XML_DETAIL, "invalid char in name: \n", ErrorDomain.XML)
    if "/" in name:
        raise _domain_xml_error(f"name {name} cannot contain '/'")
    return name


# --------------------------------------------------------------------------- schemas

_schema_lock = threading.Lock()  # an lxml RelaxNG object's error_log is shared state


def _own_schema_path() -> Path:
    repo = Path(__file__).resolve().parents[2] / "xml_schemas" / "domain.rng"
    if repo.is_file():
        return repo
    return Path(str(importlib.resources.files("mshv_libvirt") / "data" / "domain.rng"))


@functools.cache
def _compile_schema(path: Path) -> etree.RelaxNG:
    try:
        return etree.RelaxNG(etree.parse(str(path)))
    except (OSError, etree.LxmlError) as e:
        raise VirtError(ErrorCode.INTERNAL_ERROR, f"cannot load schema {path}: {e}") from None


def _validate(root: etree._Element, path: Path) -> None:
    """The one RelaxNG validator call (tests count and hold it). Errors as libvirt's
    virXMLValidateAgainstSchema reports them: every message libxml2 gave, one per line."""
    schema = _compile_schema(path)
    with _schema_lock:
        if schema.validate(root):
            return
        messages = "".join(f"{e.message}\n" for e in schema.error_log) or "document does not validate\n"
    raise VirtError(ErrorCode.XML_INVALID_SCHEMA, f"Unable to validate doc against {path}\n{messages}", ErrorDomain.XML)


# --------------------------------------------------------------------------- formatting


def _esc(value: str) -> str:
    # Escape quotes too (like libvirt) and whitespace that XML parsing would normalise.
    return (
        value.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("'", "&apos;")
        .replace('"', "&quot;")
        .replace("\r", "&#13;")
    )


def _esc_attr(value: str) -> str:
    return _esc(value).replace("\n", "&#10;").replace("\t", "&#9;")


def _tag_line(tag: str, attrs: tuple[tuple[str, str], ...] = (), text: str | None = None, close: bool = True) -> str:
    a = "".join(f" {k}='{_esc_attr(v)}'" for k, v in attrs)
    if text is not None:
        return f"<{tag}{a}>{_esc(text)}</{tag}>"
    return f"<{tag}{a}/>" if close else f"<{tag}{a}>"


def _format(
    *,
    name: str,
    uid: uuid.UUID,
    title: str | None,
    description: str | None,
    memory_kib: int,
    current_memory_kib: int,
    vcpus: int,
    current_vcpus: int,
    cputune: Cputune,
    os: _Os,
    acpi: bool,
    apic: bool,
    lifecycle: tuple[str, str, str],
    devices: _Devices,
    extras: _Extras,
    clock_offset: str = "utc",
) -> str:
    lines = ["<domain type='hyperv'>"]

    def add(depth: int, line: str) -> None:
        lines.append("  " * depth + line)

    add(1, _tag_line("name", text=name))
    add(1, _tag_line("uuid", text=str(uid)))
    if title is not None:
        add(1, _tag_line("title", text=title))
    if description is not None:
        add(1, _tag_line("description", text=description))
    if extras.metadata:
        add(1, "<metadata>")
        lines.extend("    " + chunk for chunk in extras.metadata)
        add(1, "</metadata>")
    add(1, _tag_line("memory", (("unit", "KiB"),), str(memory_kib)))
    add(1, _tag_line("currentMemory", (("unit", "KiB"),), str(current_memory_kib)))
    vcpu_attrs = (("placement", "static"),) + ((("current", str(current_vcpus)),) if current_vcpus != vcpus else ())
    add(1, _tag_line("vcpu", vcpu_attrs, str(vcpus)))
    for line in _format_cputune(cputune):
        add(1, line)
    add(1, "<os>")
    type_attrs = (("arch", os.arch),) + ((("machine", os.machine),) if os.machine else ())
    add(2, _tag_line("type", type_attrs, "hvm"))
    for tag, value in (("kernel", os.kernel), ("initrd", os.initrd), ("cmdline", os.cmdline)):
        if value is not None:
            add(2, _tag_line(tag, text=value))
    if extras.boot_hd:
        add(2, _tag_line("boot", (("dev", "hd"),)))
    add(1, "</os>")
    if acpi or apic:
        add(1, "<features>")
        if acpi:
            add(2, "<acpi/>")
        if apic:
            add(2, "<apic/>")
        add(1, "</features>")
    if extras.cpu_attrs is not None and extras.cpu_children:
        add(1, _tag_line("cpu", extras.cpu_attrs, close=False))
        for line in extras.cpu_children:
            add(2, line)
        add(1, "</cpu>")
    elif extras.cpu_attrs is not None:
        add(1, _tag_line("cpu", extras.cpu_attrs))
    add(1, _tag_line("clock", (("offset", clock_offset),)))
    for tag, value in zip(("on_poweroff", "on_reboot", "on_crash"), lifecycle, strict=True):
        add(1, _tag_line(tag, text=value))
    if extras.pm:
        add(1, "<pm>")
        for tag, enabled in extras.pm:
            add(2, _tag_line(tag, (("enabled", enabled),)))
        add(1, "</pm>")
    body: list[tuple[int, str]] = []
    for disk in devices.disks:
        body += _format_disk(disk)
    if extras.usb_none:
        body.append((2, "<controller type='usb' index='0' model='none'/>"))
    for net in devices.nets:
        body += _format_net(net)
    for s in devices.serials:
        body += [
            (2, "<serial type='pty'>"),
            (3, _tag_line("target", (("type", s.target_type), ("port", str(s.port))), close=False)),
            (4, _tag_line("model", (("name", s.target_type),))),
            (3, "</target>"),
            (2, "</serial>"),
        ]
    for c in devices.consoles:
        body += [
            (2, "<console type='pty'>"),
            (3, _tag_line("target", (("type", c.target_type), ("port", str(c.port))))),
            (2, "</console>"),
        ]
    if extras.memballoon_none:
        body.append((2, "<memballoon model='none'/>"))
    for rng in devices.rngs:
        body += _format_rng(rng)
    if body:
        add(1, "<devices>")
        for depth, line in body:
            add(depth, line)
        add(1, "</devices>")
    else:
        add(1, "<devices/>")
    lines.append("</domain>")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- public API

_TOP_LEVEL = (
    "name",
    "uuid",
    "title",
    "description",
    "metadata",
    "memory",
    "currentMemory",
    "vcpu",
    "cputune",
    "os",
    "features",
    "cpu",
    "clock",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "pm",
    "devices",
)


def parse_domain_xml(
    text: str, *, check_libvirt_schema: bool = False, validate: bool = False, trusted: bool = False
) -> DomainConfig:
    """Parse and validate domain XML; raise :class:`VirtError` for anything not supported.

    ``check_libvirt_schema``: also validate against libvirt's installed schema (define does), after our
    own checks. ``validate``: libvirt's VALIDATE flags, the schema (libvirt's where installed) first, so the
    errors are libvirt's. ``trusted``: a config this daemon stored itself (see the module docstring)."""
    root = _parse_safely(text, MAX_STORED_XML_BYTES if trusted else MAX_XML_BYTES)
    if not trusted:
        _check_bounds(root)
    libvirt_schema = LIBVIRT_DOMAIN_SCHEMA if LIBVIRT_DOMAIN_SCHEMA.is_file() else None
    if validate:
        _validate(root, libvirt_schema or _own_schema_path())
    try:
        cfg = _walk(root)
    except _SchemaViolation as v:
        if not trusted and libvirt_schema is not None and (check_libvirt_schema or validate):
            _validate(root, libvirt_schema)  # libvirt's own words for it
        raise _xml_error(v.detail) from None
    if not trusted:
        if check_libvirt_schema and libvirt_schema is not None and not validate:
            _validate(root, libvirt_schema)
        # Explicit checks passed; our schema now catches structural leftovers (stray text etc.).
        _validate(root, _own_schema_path())
        stored = len(cfg.xml.encode("utf-8", "surrogatepass"))
        if stored > MAX_XML_BYTES - _RUNTIME_SLACK:
            # It could not be defined again from its own dumpxml; refuse it now rather than lose it later.
            raise _xml_error(
                f"domain XML is {stored} bytes once stored (escaped, defaults filled); "
                f"the limit is {MAX_XML_BYTES - _RUNTIME_SLACK} bytes"
            )
    return cfg


def _walk(root: etree._Element) -> DomainConfig:
    """The allow-list walk, in libvirt's order of checks (virDomainDefParseXML, then post-parse)."""
    if root.tag != "domain":
        raise _xml_error(f"expecting root element of 'domain', not '{_qname(root)}'")
    kids = _singletons(root, _TOP_LEVEL, f"element <{{tag}}> {_NOT_SUPPORTED}")
    name = _name(kids.get("name"))
    uid = _uuid(kids.get("uuid"))
    dtype = root.get("type") or None
    if dtype is None:
        raise VirtError(ErrorCode.INTERNAL_ERROR, "missing domain type attribute", ErrorDomain.DOMAIN)
    if dtype not in _VIRT_TYPES:
        raise unsupported(f"invalid domain type {dtype}")
    _os_type(kids.get("os"))  # libvirt's checks of <os><type> come this early
    # 'id' is runtime state: libvirt ignores it on define, and so do we.
    _check_attrs(root, ("type", "id"))
    if dtype != "hyperv":
        raise unsupported(f"emulator '{dtype}' (domain type) {_NOT_SUPPORTED}; use type='hyperv'")
    title = _text(kids["title"]) if "title" in kids else None
    if "title" in kids:
        _check_attrs(kids["title"], ())
    if title is not None and "\n" in title:
        raise _domain_xml_error("Domain title can't contain newlines")
    description = None
    if "description" in kids:
        _check_attrs(kids["description"], ())
        description = _text(kids["description"])
    metadata = _metadata(kids.get("metadata"))
    memory_kib = _memory_kib(kids.get("memory"))
    current_kib = _memory_kib(kids.get("currentMemory"))
    vcpus, current_vcpus = _vcpus(kids.get("vcpu"))
    os = _os(kids["os"])
    cputune = _cputune(kids.get("cputune"), vcpus)
    acpi, apic = _features(kids.get("features"))
    cpu_attrs = _cpu(kids.get("cpu"))
    guest_cpu, cpu_children = _guest_cpu(kids.get("cpu"), vcpus)
    clock_offset = _clock(kids.get("clock"))
    lifecycle = (
        _lifecycle(kids.get("on_poweroff"), "destroy"),
        _lifecycle(kids.get("on_reboot"), "restart"),
        _lifecycle(kids.get("on_crash"), "destroy"),
    )
    pm = _pm(kids.get("pm"))
    devices = _devices(kids.get("devices"))
    # post-parse (virDomainDefPostParseMemory)
    if memory_kib == 0:
        raise _domain_xml_error("Memory size must be specified via <memory> or in the <numa> configuration")
    if current_kib == 0 or current_kib > memory_kib:
        current_kib = memory_kib

    extras = _Extras(
        machine=os.machine,
        boot_hd=os.boot_hd,
        cpu_attrs=cpu_attrs,
        cpu_children=cpu_children,
        pm=pm,
        usb_none=devices.usb_none,
        memballoon_none=devices.memballoon_none,
        metadata=metadata,
    )
    xml = _format(
        name=name,
        uid=uid,
        title=title,
        description=description,
        memory_kib=memory_kib,
        current_memory_kib=current_kib,
        vcpus=vcpus,
        current_vcpus=current_vcpus,
        cputune=cputune,
        os=os,
        acpi=acpi,
        apic=apic,
        lifecycle=lifecycle,
        devices=devices,
        extras=extras,
        clock_offset=clock_offset,
    )
    return DomainConfig(
        name=name,
        uuid=uid,
        title=title,
        description=description,
        memory_kib=memory_kib,
        current_memory_kib=current_kib,
        vcpus=vcpus,
        os_type="hvm",
        arch=os.arch,
        kernel=os.kernel,
        initrd=os.initrd,
        cmdline=os.cmdline,
        acpi=acpi,
        apic=apic,
        on_poweroff=lifecycle[0],
        on_reboot=lifecycle[1],
        on_crash=lifecycle[2],
        serials=devices.serials,
        consoles=devices.consoles,
        xml=xml,
        cpu=guest_cpu,
        current_vcpus=current_vcpus,
        cpu_mode=cpu_attrs[0][1] if cpu_attrs else None,
        cputune=cputune,
        rngs=devices.rngs,
        disks=devices.disks,
        nets=devices.nets,
        clock_offset=clock_offset,
    )


_ROOT_OPEN = "<domain type='hyperv'>"


def _block(lines: list[tuple[int, str]]) -> str:
    return "".join("  " * depth + line + "\n" for depth, line in lines)


def format_domain_xml(
    cfg: DomainConfig,
    *,
    domain_id: int | None = None,
    pty: str | None = None,
    nets: Sequence[NetLive | None] = (),
) -> str:
    """``virsh dumpxml`` text: the canonical XML, plus ``id='N'`` while the domain runs and, like libvirt,
    the serial port's allocated pty (``<source path>``, console ``tty``) and its alias, and each running
    interface's tap (``<target dev>``), port (``<source portid bridge>``), live link state and ``netN`` alias
    (``nets``: by index in ``cfg.nets``; None for one not started)."""
    if domain_id is None or domain_id < 0:  # libvirt uses -1 for "not running"
        return cfg.xml
    if not cfg.xml.startswith(_ROOT_OPEN):
        raise VirtError(ErrorCode.INTERNAL_ERROR, "domain XML is not in canonical form")
    text = f"<domain type='hyperv' id='{int(domain_id)}'>" + cfg.xml[len(_ROOT_OPEN) :]
    cursor = 0
    for index, (net, live) in enumerate(zip(cfg.nets, nets, strict=False)):
        stored = _block(_format_net(net))
        at = text.find(stored, cursor)
        if at < 0:
            raise VirtError(ErrorCode.INTERNAL_ERROR, "domain XML is not in canonical form")
        shown = stored if live is None else _block(_format_net(net, live, f"net{index}"))
        text = text[:at] + shown + text[at + len(stored) :]
        cursor = at + len(shown)
    if pty is not None:
        src = f"      <source path='{_esc_attr(pty)}'/>\n"
        alias = "      <alias name='serial0'/>\n"
        text = text.replace("    <serial type='pty'>\n", "    <serial type='pty'>\n" + src, 1)
        text = text.replace("    </serial>\n", alias + "    </serial>\n", 1)
        text = text.replace("    <console type='pty'>\n", f"    <console type='pty' tty='{_esc_attr(pty)}'>\n" + src, 1)
        text = text.replace("    </console>\n", alias + "    </console>\n", 1)
    return text
