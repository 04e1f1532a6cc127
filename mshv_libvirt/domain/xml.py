"""Domain XML -> typed immutable :class:`DomainConfig`, and back (``virsh dumpxml``).

Parsing is deliberately strict: the mshv driver supports a small subset of libvirt's
domain format, and anything outside it is refused with a message naming the element,
attribute or value -- nothing is silently dropped.  Order of checks:

1. safe parse (size cap, no DTD / entities / network, line numbers on syntax errors);
2. explicit allow-list walk that extracts the values (errors name what is unsupported);
3. our RelaxNG schema (``xml_schemas/domain.rng``) as a structural backstop;
4. optionally libvirt's own schema, when installed.

The canonical XML (``DomainConfig.xml``) is what libvirt would print for the same
definition: defaults filled, libvirt's element order, 2-space indent, single quotes.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import re
import threading
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError, unsupported

__all__ = [
    "LIBVIRT_DOMAIN_SCHEMA",
    "MAX_VCPUS",
    "MAX_XML_BYTES",
    "CharDevice",
    "CpuTopology",
    "DomainConfig",
    "GuestCpu",
    "format_domain_xml",
    "parse_domain_xml",
]

MAX_XML_BYTES = 1 << 20
# Sanity bound only (rejects absurd numbers early); the VMM enforces the real host limit.
MAX_VCPUS = 254  # the VMM gives each vCPU an xAPIC id; 255 is the broadcast id
# Bytes must fit a signed 64-bit value, as in libvirt's memory parameters.
_MAX_MEMORY_BYTES = (1 << 63) - 1
LIBVIRT_DOMAIN_SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")

_NOT_SUPPORTED = "is not supported by the mshv driver"
_LIFECYCLE_OK = ("destroy", "restart", "preserve")
# Valid libvirt lifecycle actions that we cannot honour (libvirt rejects unknown ones as XML errors).
# on_crash only: the VMM writes the guest's memory to an ELF core file, then destroys or restarts.
_CRASH_ONLY = ("coredump-destroy", "coredump-restart")
# Renaming the crashed domain and booting a new one is libxl-only in libvirt; its QEMU driver refuses it too.
_LIFECYCLE_UNSUPPORTED = ("rename-restart",)
_SERIAL_TARGET = "isa-serial"
_CONSOLE_TARGET = "serial"


@dataclass(frozen=True)
class CharDevice:
    """A ``<serial type='pty'>`` or ``<console type='pty'>`` device."""

    kind: str  # "serial" | "console"
    port: int
    target_type: str  # "isa-serial" for serial; "serial" for console


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
class DomainConfig:
    name: str
    uuid: uuid.UUID
    title: str | None
    description: str | None
    memory_kib: int
    current_memory_kib: int
    vcpus: int
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


def _xml_error(detail: str) -> VirtError:
    return VirtError(ErrorCode.XML_ERROR, detail, ErrorDomain.XML)


def _invalid_arg(detail: str) -> VirtError:
    return VirtError(ErrorCode.INVALID_ARG, detail, ErrorDomain.XML)


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
_DOCTYPE_REFUSED = "(domain_definition): DOCTYPE and entity declarations are not allowed in domain XML"


class _NoLoadResolver(etree.Resolver):
    """Answers every external load (DTD, entity, XInclude) with nothing, so no file or URL is read."""

    # (ignores: lxml-stubs give resolve() an outdated signature and lack resolve_empty)
    def resolve(self, url: str | None, pubid: str | None, context: object) -> object:  # type: ignore[override]
        return self.resolve_empty(context)  # type: ignore[attr-defined]


def _parse_safely(text: str) -> etree._Element:
    if not isinstance(text, str):
        raise _invalid_arg("domain XML must be a string")
    # Cheap check first so a huge string is never encoded or parsed.
    if len(text) > MAX_XML_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_XML_BYTES:
        raise _xml_error(f"domain XML is larger than the {MAX_XML_BYTES} byte limit")
    # lxml refuses str input carrying an encoding declaration; the text is already decoded, so
    # blank the declaration out (keeping its newlines so reported line numbers stay right).
    m = _XML_DECL.match(text)
    if m:
        text = re.sub(r"[^\n]", " ", m.group(0)) + text[m.end() :]
    if not text.strip():
        raise _xml_error("(domain_definition):1: Document is empty")
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
        raise _xml_error(f"(domain_definition):{e.lineno or 0}: {e.msg}") from None
    # Second line of defence, should the prolog scan ever miss a DOCTYPE spelling.
    # (getattr: lxml-stubs lack these DocInfo attributes)
    docinfo = root.getroottree().docinfo
    if getattr(docinfo, "doctype", "") or any(
        getattr(docinfo, a, None) is not None for a in ("internalDTD", "externalDTD")
    ):
        raise _xml_error(_DOCTYPE_REFUSED)
    return root


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
            raise _xml_error(f"element <{tag}> may appear only once in <{_qname(el)}>")
        found[tag] = child
    return found


def _leaf(el: etree._Element, where: str | None = None) -> None:
    for child in _elements(el):
        raise unsupported(f"element <{_qname(child)}> in <{where or _qname(el)}> {_NOT_SUPPORTED}")


def _text(el: etree._Element | None) -> str | None:
    """Element text, None when absent or empty (libvirt treats empty strings as unset)."""
    if el is None:
        return None
    _leaf(el)
    return el.text or None


def _int(value: str, what: str, *, max_digits: int = 20) -> int:
    s = value.strip()
    # Bound the digit count so int() never chews on megabytes of digits.
    if not re.fullmatch(rf"[0-9]{{1,{max_digits}}}", s):
        raise _xml_error(f"invalid {what} '{value}': expected a non-negative integer")
    return int(s)


# --------------------------------------------------------------------------- field parsers


def _unit_scale(unit: str | None, where: str) -> int:
    """Bytes per unit, following libvirt's scaled-integer suffixes (case-insensitive)."""
    if unit is None:
        return 1024  # libvirt's default unit for memory is KiB
    u = unit.lower()
    if u in ("b", "bytes"):
        return 1
    powers = "kmgtpe"
    if u and u[0] in powers:
        power = powers.index(u[0]) + 1
        rest = u[1:]
        if rest in ("", "ib"):
            return int(1024**power)
        if rest == "b":
            return int(1000**power)
    raise _invalid_arg(f"invalid unit '{unit}' in <{where}>")


def _memory_kib(el: etree._Element) -> int:
    where = _qname(el)
    _check_attrs(el, ("unit",))
    _leaf(el)
    scale = _unit_scale(el.get("unit"), where)
    value = _int(el.text or "", f"<{where}> value")
    nbytes = value * scale
    if nbytes > _MAX_MEMORY_BYTES:
        raise _xml_error(f"<{where}> value {value} {el.get('unit', 'KiB')} is too large")
    kib = -(-nbytes // 1024)  # libvirt stores KiB, rounding up
    if kib == 0:
        raise _xml_error(f"<{where}> must be greater than 0")
    return kib


def _vcpus(el: etree._Element | None) -> int:
    if el is None:
        return 1
    _check_attrs(el, ("placement", "current"))
    _leaf(el)
    count = _int(el.text or "", "<vcpu> count", max_digits=9)
    if count < 1:
        raise _xml_error(f"<vcpu> count {count} is out of range 1..{MAX_VCPUS}")
    if count > MAX_VCPUS:
        raise unsupported(f"<vcpu> count {count} exceeds the {MAX_VCPUS} vCPUs the mshv driver supports")
    placement = el.get("placement")
    if placement == "auto":
        raise unsupported(f"vcpu placement 'auto' {_NOT_SUPPORTED}; use placement='static'")
    if placement not in (None, "static"):
        raise _xml_error(f"invalid vcpu placement '{placement}'")
    current = el.get("current")
    if current is not None and _int(current, "vcpu current", max_digits=9) != count:
        raise unsupported(f"vcpu current='{current}' differs from the {count} vcpus: vcpu hotplug {_NOT_SUPPORTED}")
    return count


@dataclass(frozen=True)
class _Os:
    arch: str
    machine: str | None
    kernel: str | None
    initrd: str | None
    cmdline: str | None
    boot_hd: bool


def _os(el: etree._Element | None) -> _Os:
    if el is None:
        raise _xml_error("an <os> element with <type>hvm</type> is required")
    _check_attrs(el, ())
    allowed = ("type", "kernel", "initrd", "cmdline", "boot")
    kids = _singletons(el, allowed, f"element <{{tag}}> in <os> {_NOT_SUPPORTED}")
    type_el = kids.get("type")
    if type_el is None:
        raise _xml_error("an <os><type> must be specified")
    _check_attrs(type_el, ("arch", "machine"), "os><type")
    os_type = (_text(type_el) or "").strip()
    if not os_type:
        raise _xml_error("an <os><type> must be specified")
    if os_type != "hvm":
        raise unsupported(f"<os><type> '{os_type}' {_NOT_SUPPORTED}; use 'hvm'")
    arch = type_el.get("arch", "x86_64")
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
        if dev != "hd":
            raise unsupported(f"boot device '{dev}' {_NOT_SUPPORTED}; only <boot dev='hd'/> is accepted")
    return _Os(arch, machine, kernel, initrd, cmdline, boot_el is not None)


def _features(el: etree._Element | None) -> tuple[bool, bool]:
    if el is None:
        return False, False
    _check_attrs(el, ())
    kids = _singletons(el, ("acpi", "apic"), f"feature <{{tag}}> {_NOT_SUPPORTED}")
    for child in kids.values():
        _check_attrs(child, ())
        _leaf(child)
    return "acpi" in kids, "apic" in kids


def _cpu(el: etree._Element | None) -> tuple[tuple[str, str], ...] | None:
    if el is None:
        return None
    _check_attrs(el, ("mode", "check", "migratable"))
    mode = el.get("mode", "custom")
    if mode == "custom":
        return _cpu_custom(el)
    if mode not in ("host-passthrough", "host-model"):
        raise unsupported(f"cpu mode '{mode}' {_NOT_SUPPORTED}; use 'host-passthrough' or 'host-model'")
    attrs = [("mode", mode)]
    for name, allowed in (("check", ("none", "partial", "full")), ("migratable", ("on", "off"))):
        value = el.get(name)
        if value is None:
            continue
        if value not in allowed:
            raise _xml_error(f"invalid cpu {name} '{value}'")
        attrs.append((name, value))
    return tuple(attrs)


# ---- <cpu> children: topology and features (mode and its attributes are _cpu's)

_UINT_MAX = 0xFFFFFFFF
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


def _clock(el: etree._Element | None) -> None:
    if el is None:
        return
    _check_attrs(el, ("offset",))
    _leaf(el)
    offset = el.get("offset", "utc")
    if offset != "utc":
        raise unsupported(f"clock offset '{offset}' {_NOT_SUPPORTED}; use offset='utc'")


def _lifecycle(el: etree._Element | None, default: str) -> str:
    if el is None:
        return default
    _check_attrs(el, ())
    value = (_text(el) or "").strip()
    if value in _LIFECYCLE_OK:
        return value
    if value in _CRASH_ONLY:
        if el.tag == "on_crash":
            return value
        raise _xml_error(f"<{el.tag}> does not support the '{value}' action (on_crash only)")
    if value in _LIFECYCLE_UNSUPPORTED:
        raise unsupported(f"<{el.tag}> action '{value}' {_NOT_SUPPORTED}")
    raise _xml_error(f"invalid <{el.tag}> action '{value}'")


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
        _check_attrs(child, ("enabled",))
        _leaf(child)
        enabled = child.get("enabled")
        if enabled is None:
            continue  # unset: libvirt does not print it either
        if enabled == "yes":
            raise unsupported(f"<pm><{tag} enabled='yes'>: guest suspend {_NOT_SUPPORTED}")
        if enabled != "no":
            raise _xml_error(f"invalid value '{enabled}' for enabled of <{tag}>")
        out.append((tag, enabled))
    return tuple(out)


def _metadata(el: etree._Element | None) -> tuple[str, ...]:
    if el is None:
        return ()
    _check_attrs(el, ())
    chunks: list[str] = []
    for child in _elements(el):
        # Application-owned content: kept verbatim, only re-indented for its depth.
        dup = copy.deepcopy(child)
        dup.tail = None
        etree.indent(dup, space="  ", level=2)
        chunks.append(etree.tostring(dup, encoding="unicode", with_tail=False))
    return tuple(chunks)


def _char_target(parent: etree._Element, kind: str, default_type: str, allow_model: bool) -> tuple[int, str]:
    kids = _singletons(parent, ("target",), f"element <{{tag}}> in <{kind}> {_NOT_SUPPORTED}")
    target = kids.get("target")
    if target is None:
        return 0, default_type
    _check_attrs(target, ("type", "port"), f"{kind}><target")
    ttype = target.get("type", default_type)
    if ttype != default_type:
        raise unsupported(f"{kind} target type '{ttype}' {_NOT_SUPPORTED}; use type='{default_type}'")
    port = _int(target.get("port", "0"), f"{kind} target port", max_digits=6)
    if port != 0:
        raise unsupported(f"{kind} port {port} {_NOT_SUPPORTED}; only port 0 (COM1) exists")
    allowed = ("model",) if allow_model else ()
    tkids = _singletons(target, allowed, f"element <{{tag}}> in <{kind}><target> {_NOT_SUPPORTED}")
    model = tkids.get("model")
    if model is not None:
        _check_attrs(model, ("name",), f"{kind}><target><model")
        _leaf(model)
        name = model.get("name")
        if name != _SERIAL_TARGET:
            raise unsupported(f"{kind} target model '{name}' {_NOT_SUPPORTED}; use name='{_SERIAL_TARGET}'")
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
    _check_attrs(el, ("type", "tty") if kind == "console" else ("type",))
    ctype = el.get("type", "pty")
    if ctype != "pty":
        raise unsupported(f"{kind} type '{ctype}' {_NOT_SUPPORTED}; use type='pty'")
    _drop_runtime_output(el, kind)
    if kind == "serial":
        port, ttype = _char_target(el, kind, _SERIAL_TARGET, allow_model=True)
    else:
        port, ttype = _char_target(el, kind, _CONSOLE_TARGET, allow_model=False)
    return CharDevice(kind, port, ttype)


@dataclass(frozen=True)
class _Devices:
    serials: tuple[CharDevice, ...]
    consoles: tuple[CharDevice, ...]
    usb_none: bool
    memballoon_none: bool


def _devices(el: etree._Element | None) -> _Devices:
    if el is None:
        return _Devices((), (), False, False)
    _check_attrs(el, ())
    serials: list[CharDevice] = []
    consoles: list[CharDevice] = []
    usb_none = memballoon_none = False
    for child in _elements(el):
        tag = _qname(child)
        if tag == "serial":
            serials.append(_chardev(child, "serial"))
        elif tag == "console":
            consoles.append(_chardev(child, "console"))
        elif tag == "memballoon" and child.get("model") == "none":
            # Explicitly disabled: asks for nothing, so accepting it drops nothing.
            _check_attrs(child, ("model",))
            _leaf(child)
            if memballoon_none:
                raise _xml_error("element <memballoon> may appear only once in <devices>")
            memballoon_none = True
        elif tag == "controller" and child.get("type") == "usb" and child.get("model") == "none":
            _check_attrs(child, ("type", "model", "index"))
            _leaf(child)
            if child.get("index", "0") != "0":
                raise unsupported(f"controller index '{child.get('index')}' {_NOT_SUPPORTED}")
            if usb_none:
                raise _xml_error("duplicate <controller type='usb' model='none'> in <devices>")
            usb_none = True
        elif tag == "emulator":
            raise unsupported(f"element <emulator> {_NOT_SUPPORTED} (it runs no emulator binary)")
        elif tag in ("memballoon", "controller"):
            detail = " ".join(f"{k}='{child.get(k)}'" for k in ("type", "model") if child.get(k) is not None)
            raise unsupported(f"device <{tag}{' ' + detail if detail else ''}> {_NOT_SUPPORTED}")
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
    return _Devices(tuple(serials), tuple(consoles), usb_none, memballoon_none)


def _uuid(el: etree._Element | None) -> uuid.UUID:
    if el is None:
        return uuid.uuid4()
    _check_attrs(el, ())
    raw = _text(el) or ""
    # libvirt accepts 32 hex digits with dashes anywhere; no braces or urn: prefix.
    digits = raw.strip().replace("-", "")
    if not re.fullmatch(r"[0-9a-fA-F]{32}", digits):
        raise _xml_error(f"malformed uuid element '{raw}'")
    return uuid.UUID(hex=digits)


def _name(el: etree._Element | None) -> str:
    if el is None:
        raise _xml_error("missing domain <name>")
    _check_attrs(el, ())
    name = _text(el)
    if name is None or not name.strip():
        raise _xml_error("domain <name> must not be empty")
    if "/" in name or "\n" in name:
        raise _xml_error(f"domain name '{name}' must not contain '/' or newlines")
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
    schema = _compile_schema(path)
    with _schema_lock:
        if schema.validate(root):
            return
        err = schema.error_log.last_error
        where = f"{err.line}" if err is not None else "?"
        msg = err.message if err is not None else "document does not validate"
    raise _xml_error(f"(domain_definition):{where}: Relax-NG validity error against {path.name}: {msg}")


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
    os: _Os,
    acpi: bool,
    apic: bool,
    lifecycle: tuple[str, str, str],
    devices: _Devices,
    extras: _Extras,
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
    add(1, _tag_line("vcpu", (("placement", "static"),), str(vcpus)))
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
    add(1, "<clock offset='utc'/>")
    for tag, value in zip(("on_poweroff", "on_reboot", "on_crash"), lifecycle, strict=True):
        add(1, _tag_line(tag, text=value))
    if extras.pm:
        add(1, "<pm>")
        for tag, enabled in extras.pm:
            add(2, _tag_line(tag, (("enabled", enabled),)))
        add(1, "</pm>")
    body: list[tuple[int, str]] = []
    if extras.usb_none:
        body.append((2, "<controller type='usb' index='0' model='none'/>"))
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


def parse_domain_xml(text: str, *, check_libvirt_schema: bool = False) -> DomainConfig:
    """Parse and validate domain XML; raise :class:`VirtError` for anything not supported."""
    root = _parse_safely(text)
    if root.tag != "domain":
        raise _xml_error(f"unexpected root element <{_qname(root)}>, expecting <domain>")
    # 'id' is runtime state: libvirt ignores it on define, and so do we.
    _check_attrs(root, ("type", "id"))
    dtype = root.get("type")
    if not dtype:
        raise _xml_error("missing domain type attribute")
    if dtype != "hyperv":
        raise unsupported(f"emulator '{dtype}' (domain type) {_NOT_SUPPORTED}; use type='hyperv'")

    kids = _singletons(root, _TOP_LEVEL, f"element <{{tag}}> {_NOT_SUPPORTED}")
    name = _name(kids.get("name"))
    uid = _uuid(kids.get("uuid"))
    title = _text(kids["title"]) if "title" in kids else None
    if "title" in kids:
        _check_attrs(kids["title"], ())
    if title is not None and "\n" in title:
        raise _xml_error("domain <title> must not contain newlines")
    description = None
    if "description" in kids:
        _check_attrs(kids["description"], ())
        description = _text(kids["description"])
    metadata = _metadata(kids.get("metadata"))
    if "memory" not in kids:
        raise _xml_error("memory size must be specified via <memory>")
    memory_kib = _memory_kib(kids["memory"])
    current_kib = _memory_kib(kids["currentMemory"]) if "currentMemory" in kids else memory_kib
    if current_kib > memory_kib:
        raise _xml_error(f"<currentMemory> ({current_kib} KiB) must not exceed <memory> ({memory_kib} KiB)")
    vcpus = _vcpus(kids.get("vcpu"))
    os = _os(kids.get("os"))
    acpi, apic = _features(kids.get("features"))
    cpu_attrs = _cpu(kids.get("cpu"))
    guest_cpu, cpu_children = _guest_cpu(kids.get("cpu"), vcpus)
    _clock(kids.get("clock"))
    lifecycle = (
        _lifecycle(kids.get("on_poweroff"), "destroy"),
        _lifecycle(kids.get("on_reboot"), "restart"),
        _lifecycle(kids.get("on_crash"), "destroy"),
    )
    pm = _pm(kids.get("pm"))
    devices = _devices(kids.get("devices"))

    # Explicit checks passed; the schema now catches structural leftovers (stray text etc.).
    _validate(root, _own_schema_path())
    if check_libvirt_schema and LIBVIRT_DOMAIN_SCHEMA.is_file():
        _validate(root, LIBVIRT_DOMAIN_SCHEMA)

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
        os=os,
        acpi=acpi,
        apic=apic,
        lifecycle=lifecycle,
        devices=devices,
        extras=extras,
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
    )


_ROOT_OPEN = "<domain type='hyperv'>"


def format_domain_xml(cfg: DomainConfig, *, domain_id: int | None = None, pty: str | None = None) -> str:
    """``virsh dumpxml`` text: the canonical XML, plus ``id='N'`` while the domain runs and, like libvirt,
    the serial port's allocated pty (``<source path>``, console ``tty``) and its alias."""
    if domain_id is None or domain_id < 0:  # libvirt uses -1 for "not running"
        return cfg.xml
    if not cfg.xml.startswith(_ROOT_OPEN):
        raise VirtError(ErrorCode.INTERNAL_ERROR, "domain XML is not in canonical form")
    text = f"<domain type='hyperv' id='{int(domain_id)}'>" + cfg.xml[len(_ROOT_OPEN) :]
    if pty is not None:
        src = f"      <source path='{_esc_attr(pty)}'/>\n"
        alias = "      <alias name='serial0'/>\n"
        text = text.replace("    <serial type='pty'>\n", "    <serial type='pty'>\n" + src, 1)
        text = text.replace("    </serial>\n", alias + "    </serial>\n", 1)
        text = text.replace("    <console type='pty'>\n", f"    <console type='pty' tty='{_esc_attr(pty)}'>\n" + src, 1)
        text = text.replace("    </console>\n", alias + "    </console>\n", 1)
    return text
