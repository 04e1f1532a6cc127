"""Keycodes to scancodes (what send-key delivers), the keyboard's buffer bound, and the pvpanic port."""

from __future__ import annotations

import pytest

from mshv_libvirt.vmm.devices import keymap
from mshv_libvirt.vmm.devices.i8042 import DATA, I8042, KEY_BUFFER, STATUS_COMMAND, STATUS_OBF
from mshv_libvirt.vmm.devices.pvpanic import PvPanic

libvirt = pytest.importorskip("libvirt")

# The codeset numbers clients send are libvirt's.
CODESETS = {
    "linux": libvirt.VIR_KEYCODE_SET_LINUX,
    "xt": libvirt.VIR_KEYCODE_SET_XT,
    "atset1": libvirt.VIR_KEYCODE_SET_ATSET1,
    "atset2": libvirt.VIR_KEYCODE_SET_ATSET2,
    "atset3": libvirt.VIR_KEYCODE_SET_ATSET3,
    "os_x": libvirt.VIR_KEYCODE_SET_OSX,
    "xt_kbd": libvirt.VIR_KEYCODE_SET_XT_KBD,
    "usb": libvirt.VIR_KEYCODE_SET_USB,
    "win32": libvirt.VIR_KEYCODE_SET_WIN32,
    "qnum": libvirt.VIR_KEYCODE_SET_QNUM,
}


def test_codeset_numbers_are_libvirts() -> None:
    assert {name: i for i, name in enumerate(keymap.CODESET_NAMES)} == CODESETS


# (linux keycode, set 1 make code as the PC keyboard sends it): independent of the table, from the PC/AT
# keyboard's documented scancodes (IBM PS/2 technical reference, set 1).
KNOWN = [
    (1, b"\x01"),  # Esc
    (28, b"\x1c"),  # Enter
    (30, b"\x1e"),  # A
    (57, b"\x39"),  # Space
    (59, b"\x3b"),  # F1
    (87, b"\x57"),  # F11
    (88, b"\x58"),  # F12
    (96, b"\xe0\x1c"),  # keypad Enter
    (97, b"\xe0\x1d"),  # right Ctrl
    (100, b"\xe0\x38"),  # right Alt
    (103, b"\xe0\x48"),  # Up
    (111, b"\xe0\x53"),  # Delete
    (125, b"\xe0\x5b"),  # left Windows
]


@pytest.mark.parametrize(("linux", "make"), KNOWN)
def test_linux_and_set1_codesets(linux: int, make: bytes) -> None:
    qnum = keymap.to_qnum(keymap.LINUX, linux)
    assert qnum is not None
    assert keymap.press(qnum) == make
    assert keymap.release(qnum) == make[:-1] + bytes([make[-1] | 0x80])
    set1 = make[-1] | (0xE000 if len(make) == 2 else 0)
    assert keymap.to_qnum(keymap.XT, set1) == keymap.to_qnum(keymap.ATSET1, set1) == qnum
    xt_kbd = make[-1] | (0x100 if len(make) == 2 else 0)
    assert keymap.to_qnum(keymap.XT_KBD, xt_kbd) == qnum
    assert keymap.to_qnum(keymap.QNUM, qnum) == qnum


def test_pause_and_print_screen_are_the_pc_sequences() -> None:
    pause = keymap.to_qnum(keymap.LINUX, 119)
    assert pause is not None and keymap.press(pause) == bytes.fromhex("e11d45e19dc5") and keymap.release(pause) == b""
    sysrq = keymap.to_qnum(keymap.LINUX, 99)
    assert sysrq is not None
    assert keymap.press(sysrq) == bytes.fromhex("e02ae037") and keymap.release(sysrq) == bytes.fromhex("e0b7e0aa")


@pytest.mark.parametrize(
    ("codeset", "keycode"),
    [
        (keymap.LINUX, 0),
        (keymap.LINUX, 248),
        (keymap.LINUX, 1 << 20),
        (keymap.XT, 0xE0FF),
        (keymap.XT, 0x80),
        (keymap.XT_KBD, 0x1FF),
        (keymap.QNUM, 0),
        (keymap.QNUM, 0x100),
    ],
)
def test_keys_that_do_not_exist(codeset: int, keycode: int) -> None:
    assert keymap.to_qnum(codeset, keycode) is None


def test_every_key_has_distinct_make_and_break() -> None:
    for linux in keymap.LINUX_TO_SET1:
        qnum = keymap.to_qnum(keymap.LINUX, linux)
        assert qnum is not None and keymap.press(qnum) and keymap.press(qnum) != keymap.release(qnum)


def test_i8042_key_buffer_is_bounded_and_read_through_port_0x60() -> None:
    kbd = I8042(lambda: None)
    assert kbd.inject_keys(b"\x1e\x9e") == 2
    assert kbd.read(STATUS_COMMAND, 1) & STATUS_OBF
    assert [kbd.read(DATA, 1), kbd.read(DATA, 1)] == [0x1E, 0x9E]
    assert not kbd.read(STATUS_COMMAND, 1) & STATUS_OBF
    assert kbd.inject_keys(bytes(KEY_BUFFER + 5)) == KEY_BUFFER
    assert kbd.inject_keys(b"\x01") == 0  # full: dropped, as a real keyboard's buffer overruns


def test_pvpanic_offers_panicked_and_reports_it() -> None:
    panics: list[int] = []
    dev = PvPanic(lambda: panics.append(1))
    assert dev.read(0, 1) == 1  # PVPANIC_PANICKED is the only event offered
    dev.write(0, 1, 0x02)  # CRASH_LOADED: not offered, nothing happens
    assert panics == []
    dev.write(0, 1, 0x01)
    assert panics == [1]
