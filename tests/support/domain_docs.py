"""Generated domain documents (hypothesis): valid ones, and ones a little past every limit.

Each document is built element by element from what the driver takes and from the values just inside
and just outside libvirt's and our limits (memory near 2^53 KiB and 2^63 bytes, vCPU counts near the
maximum, texts that grow when escaped, metadata near the element/attribute/depth bounds). Tests use it
for the invariant of issue 19 item 3: whatever define accepts, its stored form and its dumpxml are
accepted again by define and by the next daemon.
"""

from __future__ import annotations

from typing import TypeVar

from hypothesis import strategies as st

from tests.support.limits import MAX_ATTRIBUTES, MAX_DEPTH, MAX_TEXT_CHARS

# Characters XML 1.0 can carry (no surrogates, no C0 controls other than \t \n \r).
xml_chars = st.characters(codec="utf-8", exclude_characters="\x0b\x0c\ufffe\uffff").filter(
    lambda c: c >= " " or c in "\t\n\r"
)


def escape(value: str) -> str:
    # Character references keep \r and \t intact through XML white-space normalisation.
    return (
        value.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("'", "&apos;")
        .replace("\r", "&#13;")
        .replace("\t", "&#9;")
    )


T = TypeVar("T")


def rarely(edge: st.SearchStrategy[T], usual: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """``edge`` about one time in six, else ``usual``: most documents stay valid, each limit is still hit."""
    return st.integers(0, 5).flatmap(lambda i: edge if i == 0 else usual)


short_text = st.text(xml_chars, max_size=30)
# Mostly short; sometimes long runs of characters that grow 5-6x when stored escaped.
long_text = rarely(
    st.builds(
        lambda ch, n: ch * n, st.sampled_from(["'", '"', "&", "<", "x", "é"]), st.integers(1, MAX_TEXT_CHARS + 2)
    ),
    short_text,
)
_EDGE_NUMBERS = [
    0, 1, 2, 1023, 1024, 65536, 2**32 - 1, 2**32, 2**53 - 1, 2**53, 9007199254740991 * 1024, 2**63 - 1, 2**63,
    2**64 - 1, 2**64,
]  # fmt: skip
_UNITS = [None, "b", "bytes", "KiB", "k", "KB", "MiB", "M", "MB", "GiB", "G", "TiB", "T", "PiB", "EiB", "E", "kbit", ""]
UUID = "3047a063-3480-4ddd-b88b-43bc46616dae"
memory_value = rarely(st.sampled_from(_EDGE_NUMBERS), st.integers(16 << 10, 1 << 22))


@st.composite
def scaled(draw: st.DrawFn, tag: str) -> str:
    unit = draw(rarely(st.sampled_from(_UNITS), st.sampled_from([None, "KiB", "k"])))
    value = draw(memory_value)
    raw = draw(rarely(st.sampled_from([" {}", "+{}", "0{}", "{} "]), st.just("{}"))).format(value)
    attr = "" if unit is None else f" unit='{unit}'"
    return f"<{tag}{attr}>{raw}</{tag}>"


@st.composite
def vcpu(draw: st.DrawFn) -> str:
    count = draw(rarely(st.sampled_from([0, 253, 254, 255, 2**32 - 1]), st.integers(1, 8)))
    current = draw(st.one_of(st.none(), rarely(st.sampled_from([0, count + 1]), st.integers(1, max(count, 1)))))
    attrs = "" if current is None else f" current='{current}'"
    placement = draw(rarely(st.just(" placement='auto'"), st.sampled_from(["", " placement='static'"])))
    return f"<vcpu{placement}{attrs}>{count}</vcpu>"


@st.composite
def metadata(draw: st.DrawFn) -> str:
    attrs = draw(rarely(st.sampled_from([MAX_ATTRIBUTES, MAX_ATTRIBUTES + 1]), st.integers(0, 4)))
    depth = draw(rarely(st.sampled_from([MAX_DEPTH - 3, MAX_DEPTH - 2]), st.integers(1, 3)))
    text = escape(draw(short_text))
    attr_value = escape(draw(short_text)).replace('"', "&quot;")
    attr_text = " ".join(f"a{i}='{attr_value}'" for i in range(attrs))
    inner = f"<m:leaf {attr_text}>{text}</m:leaf>"
    for _ in range(depth - 1):
        inner = f"<m:n>{inner}</m:n>"
    siblings = draw(st.integers(1, 3))
    return "<metadata><m:app xmlns:m='urn:example:gen'>" + inner * siblings + "</m:app></metadata>"


@st.composite
def domain_document(draw: st.DrawFn) -> str:
    """A domain document; most are valid, many sit just past one limit."""
    parts: list[str] = []
    name = draw(st.one_of(st.just("gen"), short_text.filter(lambda s: s.strip() != "")))
    parts.append(f"<name>{escape(name)}</name>")
    if draw(st.booleans()):
        parts.append(
            "<uuid>"
            + draw(rarely(st.just("x"), st.sampled_from([UUID, UUID.upper(), UUID.replace("-", "")])))
            + "</uuid>"
        )
    if draw(st.booleans()):
        parts.append(f"<title>{escape(draw(short_text))}</title>")
    if draw(st.booleans()):
        parts.append(f"<description>{escape(draw(long_text))}</description>")
    if draw(st.booleans()):
        parts.append(draw(metadata()))
    parts.append(draw(scaled("memory")))
    if draw(st.booleans()):
        parts.append(draw(scaled("currentMemory")))
    if draw(st.booleans()):
        parts.append(draw(vcpu()))
    os_parts = ["<type arch='x86_64'>hvm</type>" if draw(st.booleans()) else "<type>hvm</type>"]
    if draw(st.booleans()):
        os_parts.append("<kernel>/boot/vmlinuz</kernel>")
        if draw(st.booleans()):
            os_parts.append(f"<cmdline>{escape(draw(long_text))}</cmdline>")
        if draw(st.booleans()):
            os_parts.append("<initrd>/boot/initrd.img</initrd>")
    if draw(st.booleans()):
        os_parts.append("<boot dev='hd'/>")
    parts.append("<os>" + "".join(draw(st.permutations(os_parts))) + "</os>")
    features = draw(st.sets(st.sampled_from(["<acpi/>", "<apic/>"])))
    if features:
        parts.append("<features>" + "".join(sorted(features)) + "</features>")
    cpu = draw(
        rarely(st.just("<cpu/>"), st.sampled_from(["", "<cpu mode='host-passthrough'/>", "<cpu mode='host-model'/>"]))
    )
    parts.append(cpu)
    for tag, actions in (
        ("on_poweroff", ["destroy", "restart", "preserve"]),
        ("on_reboot", ["destroy", "restart", "preserve"]),
        ("on_crash", ["destroy", "restart", "preserve", "coredump-destroy", "coredump-restart"]),
    ):
        if draw(st.booleans()):
            parts.append(f"<{tag}>{draw(st.sampled_from(actions))}</{tag}>")
    devices = draw(
        st.lists(
            st.sampled_from(
                [
                    "<serial type='pty'/>",
                    "<console type='pty'/>",
                    "<memballoon model='none'/>",
                    "<controller type='usb' model='none'/>",
                ]
            ),
            unique=True,
        )
    )
    if devices:
        parts.append("<devices>" + "".join(devices) + "</devices>")
    body = "".join(draw(st.permutations(parts)))
    return f"<domain type='hyperv'>{body}</domain>"
