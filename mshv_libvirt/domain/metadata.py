"""Custom ``<metadata>`` elements (VIR_DOMAIN_METADATA_ELEMENT), kept as libvirt keeps them.

An application owns one namespace URI inside ``<metadata>``: setting puts the element it gives under
that namespace (prefix ``key``), replacing whatever that namespace had; getting returns the element
without the namespace; removing (no element) drops it. Following libvirt's virDomainDefSetMetadata and
virXMLExtractNamespaceXML (src/conf/domain_conf.c, src/util/virxml.c): every element of the given XML
that has no namespace is put into the application's, attributes are left alone, and the first child
in a namespace is the one a get returns.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from lxml import etree

from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError

# A name usable as a namespace prefix (an XML NCName: a Name without colons).
_NCNAME_START = r"A-Z_a-z\u00C0-\u00D6\u00D8-\u00F6\u00F8-\u02FF\u0370-\u037D\u037F-\u1FFF\u200C-\u200D"
_NCNAME_START += r"\u2070-\u218F\u2C00-\u2FEF\u3001-\uD7FF\uF900-\uFDCF\uFDF0-\uFFFD\U00010000-\U000EFFFF"
_NCNAME_REST = _NCNAME_START + r"\-.0-9\u00B7\u0300-\u036F\u203F-\u2040"


def _valid_prefix(key: str) -> bool:
    return re.fullmatch(f"[{_NCNAME_START}][{_NCNAME_REST}]*", key) is not None


def _parse(text: str) -> etree._Element:
    """The application's element, parsed with no DTD, entity or network access."""
    # Comments and PIs go, as the domain parser drops them anyway (what is stored is what reads back).
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
        remove_blank_text=True,
        remove_comments=True,
        remove_pis=True,
    )
    try:
        root = etree.fromstring(text.encode(), parser)
    except etree.XMLSyntaxError as err:
        entry = getattr(err.error_log, "last_error", None)  # (lxml-stubs lack last_error)
        message = (entry.message if entry is not None else str(err)).rstrip("\n")
        line = entry.line if entry is not None else err.lineno or 0
        lines = text.splitlines()
        context = lines[line - 1] if 0 < line <= len(lines) else ""
        column = max(0, min(len(context), (entry.column if entry is not None else 1) - 1))
        # libvirt's report: file:line: message, then the line and a pointer under the error's column.
        detail = f"(metadata_xml):{line}: {message}\n{context}\n{'-' * column}^"
        raise VirtError(ErrorCode.XML_DETAIL, detail, ErrorDomain.DOMAIN) from None
    if getattr(root.getroottree().docinfo, "doctype", ""):
        raise VirtError(ErrorCode.XML_DETAIL, "(metadata_xml): DOCTYPE is not allowed in metadata", ErrorDomain.DOMAIN)
    return root


def _namespaced(text: str, key: str, uri: str) -> etree._Element:
    parsed = _parse(text)
    if not _valid_prefix(key):
        raise VirtError(ErrorCode.INTERNAL_ERROR, "failed to validate prefix for a new XML namespace", ErrorDomain.XML)
    if key in parsed.nsmap:  # xmlNewNs refuses a prefix the element already declares
        raise VirtError(ErrorCode.INTERNAL_ERROR, "failed to create a new XML namespace", ErrorDomain.XML)
    # A new root declaring prefix -> uri first, so the renamed elements below take that prefix.
    # (a default namespace has the key None, which lxml-stubs do not allow for in nsmap)
    nsmap: dict[Any, str] = {prefix: ns for prefix, ns in parsed.nsmap.items()}
    nsmap[key] = uri
    root = etree.Element(_with_ns(parsed.tag, uri), nsmap=nsmap)
    for name, value in parsed.attrib.items():
        root.set(name, value)
    root.text = parsed.text
    root.extend(list(parsed))
    for el in root.iter():
        if isinstance(el.tag, str):
            el.tag = _with_ns(el.tag, uri)
    return root


def _with_ns(tag: str, uri: str) -> str:
    return tag if tag.startswith("{") else f"{{{uri}}}{tag}"


def indent(el: etree._Element, level: int = 0) -> None:
    """Indent like libxml2's formatted output (what libvirt prints): two spaces per level, and no
    whitespace added inside an element holding text, so mixed content is never changed."""
    children = [child for child in el if isinstance(child.tag, str)]
    if not children or len(children) != len(el):
        return
    if (el.text or "").strip() or any((child.tail or "").strip() for child in children):
        return
    el.text = "\n" + "  " * (level + 1)
    for child in children:
        indent(child, level + 1)
        child.tail = "\n" + "  " * (level + 1)
    children[-1].tail = "\n" + "  " * level


def sanitize(container: etree._Element) -> list[etree._Element]:
    """The children of a parsed ``<metadata>`` libvirt keeps (virXMLNodeSanitizeNamespaces): elements in
    a namespace, the first one of each namespace."""
    seen: set[str] = set()
    kept: list[etree._Element] = []
    for child in container:
        if not isinstance(child.tag, str):
            continue
        uri = etree.QName(child).namespace
        if uri is None or uri in seen:
            continue
        seen.add(uri)
        kept.append(child)
    return kept


def _in_namespace(el: etree._Element, uri: str) -> bool:
    return isinstance(el.tag, str) and etree.QName(el).namespace == uri


def set_element(domain: etree._Element, metadata: str | None, key: str | None, uri: str) -> None:
    """Edit a domain XML tree: ``uri``'s element becomes ``metadata`` (under prefix ``key``), or goes."""
    new = _namespaced(metadata, key or "", uri) if metadata is not None else None
    container = domain.find("metadata")
    if container is None:
        if new is None:
            return
        container = etree.SubElement(domain, "metadata")
    for old in [child for child in container if _in_namespace(child, uri)]:
        container.remove(old)
    if new is not None:
        container.append(new)


def get_element(domain: etree._Element, uri: str) -> str | None:
    """``uri``'s element from a domain XML tree, without its namespace; None if there is none."""
    container = domain.find("metadata")
    found = next((child for child in container if _in_namespace(child, uri)), None) if container is not None else None
    if found is None:
        return None
    el = copy.deepcopy(found)
    el.tail = None
    for node in el.iter():
        if _in_namespace(node, uri):
            node.tag = etree.QName(node).localname
    etree.cleanup_namespaces(el)
    strip_layout(el)
    indent(el)
    return etree.tostring(el, encoding="unicode")


def strip_layout(el: etree._Element) -> None:
    """Drop the indentation of an earlier formatting (whitespace between elements), as libvirt's parser does."""
    for node in el.iter():
        kids = [child for child in node if isinstance(child.tag, str)]
        if kids and not (node.text or "").strip() and all(not (k.tail or "").strip() for k in kids):
            node.text = None
            for k in kids:
                k.tail = None
