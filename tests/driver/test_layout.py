"""The on-disk naming (driver/layout.py) is injective: no two domains, no two kinds of file and no temporary
can ever share a path, whatever the names (issue 19 items 1, 2 and 10). The limits are stated in
tests/support/limits.py (Linux's NAME_MAX and sun_path, docs/DAEMON.md's name and run-directory bounds)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mshv_libvirt.atomicfile import TMP_MARK, temporary_writer, tmp_sibling
from mshv_libvirt.driver import layout
from mshv_libvirt.driver.vmm_client import VmmFiles
from mshv_libvirt.errors import ErrorCode, VirtError
from tests.support.limits import MAX_DOMAIN_ID, MAX_ESCAPED_NAME_BYTES, MAX_RUN_DIR_BYTES, NAME_MAX, SUN_PATH_MAX

RUN, LOG, CONF = Path("/r/run"), Path("/r/run"), Path("/r/etc")  # logs in the run dir: the tests' default

# The collisions the issue found in the old layout, and names shaped like every fixed file name.
ISSUE_NAMES = [
    ".tmp-victim",
    ".tmp-a.b.1.2.3",
    "x",
    "x.vmm",
    "x.serial",
    "y.vmm",
    "a%41",
    "a%25",
    "a%",
    "%2Etmp",
    ".tmp",
    ".",
    "..",
    "autostart",
    "serial",
    "dump",
    "1",
    "virtmshvd",
    "virtmshvd.pid",
    "record",
    "ctl",
    "x.log",
    "x.serial.log",
    "tab\there",
    "cr\rhere",
    "ünïcødé",
]

# Names define accepts: no '/' or newline (libvirt's and our schema's rule), not blank, XML characters.
xml_chars = st.characters(exclude_categories=["Cs"], exclude_characters="/\n\x00").filter(
    lambda c: c in "\t\r" or ord(c) >= 0x20
)
names = st.text(xml_chars, min_size=1, max_size=80).filter(lambda n: n.strip())


def domain_paths(name: str, dom_id: int) -> dict[str, Path]:
    files = VmmFiles.for_domain(RUN, LOG, dom_id, name)
    return {
        "config": layout.config_file(CONF, name),
        "autostart": layout.autostart_link(CONF, name),
        "vmm log": files.stderr_log,
        "serial log": files.serial_log,
        "runtime dir": files.dir,
        "record": files.record,
        "vmm config": files.config,
        "control": files.control,
        "pidfile": files.pidfile,
        "exit": files.exit_file,
    }


def daemon_paths() -> set[Path]:
    return {
        RUN / layout.DAEMON_PIDFILE,
        LOG / layout.LOG_LAYOUT_MARK,
        LOG / layout.SERIAL,
        LOG / "dump",
        CONF / layout.AUTOSTART,
    }


def assert_all_distinct(domains: list[tuple[str, int]]) -> None:
    seen: dict[Path, str] = {p: "daemon" for p in daemon_paths()}
    for name, dom_id in domains:
        for kind, path in domain_paths(name, dom_id).items():
            owner = f"{kind} of {name!r}"
            assert path not in seen, f"{path} is both {seen[path]} and {owner}"
            seen[path] = owner
            # Nothing named after a domain can be taken for a temporary, or be one.
            assert not path.name.startswith("."), owner
            assert temporary_writer(path.name) is None, owner
            assert len(path.name.encode()) <= NAME_MAX


def test_issue_collisions_are_gone() -> None:
    assert_all_distinct([(name, i + 1) for i, name in enumerate(ISSUE_NAMES)])
    # the issue's concrete cases, spelled out
    assert layout.config_file(CONF, ".tmp-victim").name == "%2Etmp-victim.xml"
    assert VmmFiles.for_domain(RUN, LOG, 1, "x").config != VmmFiles.for_domain(RUN, LOG, 2, "x.vmm").record
    assert layout.serial_log(LOG, "x") != layout.vmm_log(LOG, "x.serial")


@settings(max_examples=500, deadline=None)
@given(st.lists(names, min_size=2, max_size=6, unique=True))
def test_no_two_domains_share_a_path(batch: list[str]) -> None:
    assert_all_distinct([(name, i + 1) for i, name in enumerate(batch)])


@settings(max_examples=1000, deadline=None)
@given(names, names)
def test_escaping_is_injective_and_invertible(a: str, b: str) -> None:
    ea, eb = layout.escape_name(a), layout.escape_name(b)
    assert layout.unescape_name(ea) == a
    assert (ea == eb) == (a == b)
    assert not ea.startswith(".") and "/" not in ea and all(ord(c) >= 0x20 and c != "\x7f" for c in ea)


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from("%.aA0F2E5x"), max_size=12))
def test_unescape_accepts_only_escaped_forms(stem: str) -> None:
    name = layout.unescape_name(stem)
    assert name is None or layout.escape_name(name) == stem


def test_unescape_refuses_what_no_name_produces() -> None:
    for stem in ("%41", "a%2", "%2e", ".x", "a%", "%ZZ", "a/b"):
        assert layout.unescape_name(stem) is None, stem
    assert layout.unescape_name("%2E") == "."
    assert layout.unescape_name("%2Ex.y%25") == ".x.y%"


def test_ordinary_names_are_file_names_as_in_libvirt() -> None:
    for name in ("vm1", "web.example.com", "a b", "A_B-c", "ünï"):
        assert layout.config_file(CONF, name).name == f"{name}.xml"


def test_temporaries_carry_no_name_and_are_recognised() -> None:
    tmp = tmp_sibling(CONF / ("a" * 250 + ".xml"))
    assert tmp.name.startswith(TMP_MARK) and len(tmp.name) < 40
    assert temporary_writer(tmp.name) is not None
    # the formats of earlier versions are still swept; configs that look like them are not
    assert temporary_writer(".tmp-x.xml.123.4.5") == 123
    assert temporary_writer(".tmp-x.xml.99") == 99
    assert temporary_writer(".tmp-victim.xml") is None
    assert temporary_writer(".tmp-a.b.1.2.3.xml") is None


def _refused(name: str) -> VirtError:
    with pytest.raises(VirtError) as err:
        layout.check_name(name)
    return err.value


@pytest.mark.parametrize(
    ("char", "size"),
    [("a", 1), ("é", 2), ("€", 3), ("😀", 4), ("%", 3), ("\t", 3)],
    ids=["ascii", "2-byte", "3-byte", "4-byte", "percent", "control"],
)
def test_name_limit(char: str, size: int) -> None:
    longest = char * (MAX_ESCAPED_NAME_BYTES // size)
    layout.check_name(longest)
    for path in domain_paths(longest, MAX_DOMAIN_ID).values():
        assert len(path.name.encode()) <= NAME_MAX
    err = _refused(longest + char)
    assert err.code == ErrorCode.CONFIG_UNSUPPORTED
    assert "too long" in err.message and str(MAX_ESCAPED_NAME_BYTES) in err.message
    layout.check_name("." + "a" * (MAX_ESCAPED_NAME_BYTES - 3))  # a leading dot counts 3
    _refused("." + "a" * (MAX_ESCAPED_NAME_BYTES - 2))


def test_run_dir_length_bound() -> None:
    room = MAX_RUN_DIR_BYTES
    layout.check_run_dir(Path("/" + "r" * (room - 1)))
    with pytest.raises(ValueError, match="too long"):
        layout.check_run_dir(Path("/" + "r" * room))
    assert layout.longest_socket_path(Path("/run/libvirt/mshv")) < SUN_PATH_MAX
