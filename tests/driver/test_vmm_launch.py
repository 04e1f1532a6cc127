"""mshv.conf and the VMM options the daemon starts VMMs with (user/group as qemu.conf, log cap as virtlogd.conf)."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from mshv_libvirt.driver.vmm_launch import (
    SYSTEM_USER,
    LaunchError,
    VmmOptions,
    options_from_conf,
    read_conf,
    settle_crash_dump,
)

SHIPPED = Path(__file__).resolve().parents[2] / "mshv_libvirt" / "data" / "mshv.conf"


def test_shipped_conf_is_all_defaults() -> None:
    assert read_conf(SHIPPED) == {}
    system = options_from_conf({}, system=True)
    assert system == VmmOptions(user=SYSTEM_USER, serial_log_max_size=2 << 20, serial_log_max_backups=3)
    assert options_from_conf({}, system=False).user is None  # session mode: no user switch


def test_conf_syntax(tmp_path: Path) -> None:
    conf = tmp_path / "mshv.conf"
    conf.write_text('# comment\nuser = "nobody"  # trailing\ngroup = "nogroup"\n\nserial_log_max_size = 8192\n')
    opts = options_from_conf(read_conf(conf), system=True)
    assert (opts.user, opts.group, opts.serial_log_max_size) == ("nobody", "nogroup", 8192)
    nobody = pwd.getpwnam("nobody")
    if os.geteuid() == 0:
        assert opts.credentials() == {"user": nobody.pw_uid, "group": 65534, "extra_groups": []}
    conf.write_text("user nobody\n")
    with pytest.raises(LaunchError, match=r"mshv\.conf:1: expected key = value"):
        read_conf(conf)
    conf.write_text("user = nobody\n")
    with pytest.raises(LaunchError, match="must be a quoted string or a number"):
        read_conf(conf)
    with pytest.raises(LaunchError, match="serial_log_max_backups must be a number between 0 and 16"):
        options_from_conf({"serial_log_max_backups": 99}, system=True)
    assert read_conf(tmp_path / "absent.conf") == {}


def test_missing_user_is_named() -> None:
    with pytest.raises(LaunchError, match="the VMM user 'no-such-user' does not exist"):
        VmmOptions(user="no-such-user").credentials()
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert VmmOptions(user=me).credentials() == {}  # already that user: nothing to switch


def test_crash_dump_settles(tmp_path: Path) -> None:
    config = tmp_path / "x.vmm.json"
    final = tmp_path / "dump" / "x.core"
    config.write_text(f'{{"crash_dump": "{final}"}}')
    part = final.with_name(".x.core.part")
    part.parent.mkdir()
    part.write_bytes(b"ELF")
    settle_crash_dump(config, crashed=True)
    assert final.read_bytes() == b"ELF" and not part.exists()
    part.write_bytes(b"")
    settle_crash_dump(config, crashed=False)
    assert not part.exists()
