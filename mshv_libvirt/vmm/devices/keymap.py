"""Keycodes as ``virDomainSendKey`` takes them, turned into the scancodes a PC keyboard sends.

A key is first mapped to its *qnum* (QEMU's key number, which libvirt's QEMU driver translates every
codeset to): the AT set 1 scancode, with the 0xE0 prefix of extended keys folded into bit 7. The i8042
then delivers translated set 1, as a PC keyboard behind a controller with translation on:

* press: ``[0xE0] code``, release: ``[0xE0] code | 0x80``;
* Pause sends ``E1 1D 45 E1 9D C5`` on press and nothing on release, Print Screen ``E0 2A E0 37`` /
  ``E0 B7 E0 AA`` (the sequences a PC keyboard sends without modifiers held).

Codesets (``virKeycodeSet``) understood here: ``linux`` (input-event-codes.h), ``xt`` and ``atset1``
(the same in libvirt: set 1 with extended keys as 0xE0xx), ``xt_kbd`` (Linux's xtkbd numbering, 0x1xx
for extended keys) and ``qnum`` (passed through, as libvirt does). The table covers every key of a
105-key PC keyboard, the Japanese/Korean keys and the usual multimedia keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

# virKeycodeSet
CODESET_NAMES = ("linux", "xt", "atset1", "atset2", "atset3", "os_x", "xt_kbd", "usb", "win32", "qnum")
LINUX, XT, ATSET1, ATSET2, ATSET3, OSX, XT_KBD, USB, WIN32, QNUM = range(len(CODESET_NAMES))
SUPPORTED_CODESETS = (LINUX, XT, ATSET1, XT_KBD, QNUM)

_E0 = 0xE000


def _linux_to_set1() -> dict[int, int]:
    table = {code: code for code in range(1, 85)}  # Esc .. keypad '.': Linux numbered them after set 1
    table.update({86: 0x56, 87: 0x57, 88: 0x58})  # 102nd key, F11, F12
    table.update(
        {
            85: 0x76,  # ZENKAKUHANKAKU
            89: 0x73,  # RO
            90: 0x78,  # KATAKANA
            91: 0x77,  # HIRAGANA
            92: 0x79,  # HENKAN
            93: 0x70,  # KATAKANAHIRAGANA
            94: 0x7B,  # MUHENKAN
            95: 0x5C,  # KPJPCOMMA
            96: _E0 | 0x1C,  # KPENTER
            97: _E0 | 0x1D,  # RIGHTCTRL
            98: _E0 | 0x35,  # KPSLASH
            99: 0x54,  # SYSRQ (Print Screen)
            100: _E0 | 0x38,  # RIGHTALT
            101: 0x5B,  # LINEFEED
            102: _E0 | 0x47,  # HOME
            103: _E0 | 0x48,  # UP
            104: _E0 | 0x49,  # PAGEUP
            105: _E0 | 0x4B,  # LEFT
            106: _E0 | 0x4D,  # RIGHT
            107: _E0 | 0x4F,  # END
            108: _E0 | 0x50,  # DOWN
            109: _E0 | 0x51,  # PAGEDOWN
            110: _E0 | 0x52,  # INSERT
            111: _E0 | 0x53,  # DELETE
            112: _E0 | 0x6F,  # MACRO
            113: _E0 | 0x20,  # MUTE
            114: _E0 | 0x2E,  # VOLUMEDOWN
            115: _E0 | 0x30,  # VOLUMEUP
            116: _E0 | 0x5E,  # POWER
            117: 0x59,  # KPEQUAL
            118: _E0 | 0x4E,  # KPPLUSMINUS
            119: _E0 | 0x46,  # PAUSE
            120: _E0 | 0x0B,  # SCALE
            121: 0x7E,  # KPCOMMA
            122: 0x72,  # HANGEUL
            123: 0x71,  # HANJA
            124: 0x7D,  # YEN
            125: _E0 | 0x5B,  # LEFTMETA
            126: _E0 | 0x5C,  # RIGHTMETA
            127: _E0 | 0x5D,  # COMPOSE
            140: _E0 | 0x21,  # CALC
            142: _E0 | 0x5F,  # SLEEP
            143: _E0 | 0x63,  # WAKEUP
            155: _E0 | 0x6C,  # MAIL
            156: _E0 | 0x66,  # BOOKMARKS
            157: _E0 | 0x6B,  # COMPUTER
            158: _E0 | 0x6A,  # BACK
            159: _E0 | 0x69,  # FORWARD
            163: _E0 | 0x19,  # NEXTSONG
            164: _E0 | 0x22,  # PLAYPAUSE
            165: _E0 | 0x10,  # PREVIOUSSONG
            166: _E0 | 0x24,  # STOPCD
            172: _E0 | 0x32,  # HOMEPAGE
            173: _E0 | 0x67,  # REFRESH
            183: 0x5D,  # F13
            184: 0x5E,  # F14
            185: 0x5F,  # F15
            186: 0x55,  # F16
            187: _E0 | 0x03,  # F17
            188: _E0 | 0x77,  # F18
            189: _E0 | 0x04,  # F19
            190: 0x5A,  # F20
            191: 0x74,  # F21
            192: _E0 | 0x79,  # F22
            193: 0x6D,  # F23
            194: 0x6F,  # F24
            217: _E0 | 0x65,  # SEARCH
        }
    )
    return table


LINUX_TO_SET1: Mapping[int, int] = MappingProxyType(_linux_to_set1())


def _qnum(set1: int) -> int:
    return 0x80 | (set1 & 0x7F) if set1 & _E0 else set1


def _xt_kbd(set1: int) -> int:
    return 0x100 | (set1 & 0x7F) if set1 & _E0 else set1


def _reverse(encode: Callable[[int], int]) -> dict[int, int]:
    """codeset value -> Linux keycode (the lowest, where two Linux codes share a scancode)."""
    out: dict[int, int] = {}
    for linux, set1 in sorted(LINUX_TO_SET1.items()):
        out.setdefault(encode(set1), linux)
    return out


_FROM: dict[int, dict[int, int]] = {
    LINUX: {code: code for code in LINUX_TO_SET1},
    XT: _reverse(lambda v: v),
    ATSET1: _reverse(lambda v: v),
    XT_KBD: _reverse(_xt_kbd),
}


def to_qnum(codeset: int, keycode: int) -> int | None:
    """The qnum of ``keycode`` in ``codeset`` (one of SUPPORTED_CODESETS), or None if no such key exists."""
    if codeset == QNUM:
        return keycode if 0 < keycode <= 0xFF else None
    linux = _FROM[codeset].get(keycode)
    return None if linux is None else _qnum(LINUX_TO_SET1[linux])


_PAUSE, _PRINT = 0xC6, 0x54


def press(qnum: int) -> bytes:
    if qnum == _PAUSE:
        return bytes((0xE1, 0x1D, 0x45, 0xE1, 0x9D, 0xC5))
    if qnum == _PRINT:
        return bytes((0xE0, 0x2A, 0xE0, 0x37))
    code = qnum & 0x7F
    return bytes((0xE0, code)) if qnum & 0x80 else bytes((code,))


def release(qnum: int) -> bytes:
    if qnum == _PAUSE:
        return b""
    if qnum == _PRINT:
        return bytes((0xE0, 0xB7, 0xE0, 0xAA))
    code = (qnum & 0x7F) | 0x80
    return bytes((0xE0, code)) if qnum & 0x80 else bytes((code,))
