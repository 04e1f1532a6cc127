"""The MMIO MOV decoder, checked against encodings produced by GNU as."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mshv_libvirt.vmm import mmio


def test_linux_readl_writel_forms() -> None:
    load = mmio.decode(bytes.fromhex("8b4710"))  # mov 0x10(%rdi),%eax
    assert (load.length, load.size, load.is_write, load.reg, load.dest_size) == (3, 4, False, 0, 4)
    store = mmio.decode(bytes.fromhex("8937"))  # mov %esi,(%rdi)
    assert (store.length, store.size, store.is_write, store.reg) == (2, 4, True, 6)
    assert store.store_value(0xFFFF_FFFF_1234_5678) == 0x1234_5678


def test_rex_extensions_and_64bit() -> None:
    insn = mmio.decode(bytes.fromhex("4c8b4008"))  # mov 0x8(%rax),%r8
    assert (insn.reg, insn.size, insn.length) == (8, 8, 4)
    insn = mmio.decode(bytes.fromhex("44894500"))  # mov %r8d,0x0(%rbp)
    assert (insn.reg, insn.size, insn.is_write, insn.length) == (8, 4, True, 4)


def test_sib_disp32_rip_relative_and_prefixes() -> None:
    assert mmio.decode(bytes.fromhex("8b0425 0000c0fe".replace(" ", ""))).length == 7  # SIB, no base
    assert mmio.decode(bytes.fromhex("8b05 10000000".replace(" ", ""))).length == 6  # rip-relative
    assert mmio.decode(bytes.fromhex("8b8488 00010000".replace(" ", ""))).length == 7  # SIB + disp32
    insn = mmio.decode(bytes.fromhex("66894708"))  # mov %ax,0x8(%rdi)
    assert (insn.size, insn.length) == (2, 4)
    assert mmio.decode(bytes.fromhex("3e8b07")).length == 3  # segment prefix


def test_byte_forms_and_high_byte_registers() -> None:
    insn = mmio.decode(bytes.fromhex("8a27"))  # mov (%rdi),%ah
    assert (insn.reg, insn.high_byte, insn.size) == (0, True, 1)
    assert insn.load_result(0x1111_2233, 0x7F) == 0x1111_7F33
    insn = mmio.decode(bytes.fromhex("408a37"))  # mov (%rdi),%sil (REX: 6 is SIL)
    assert (insn.reg, insn.high_byte) == (6, False)
    assert insn.load_result(0xAAAA, 0x55) == 0xAA55
    insn = mmio.decode(bytes.fromhex("883f"))  # mov %bh,(%rdi)
    assert (insn.reg, insn.high_byte, insn.is_write) == (3, True, True)
    assert insn.store_value(0xBEEF) == 0xBE


def test_immediates_and_movzx() -> None:
    insn = mmio.decode(bytes.fromhex("c7470400000080"))  # movl $0x80000000,0x4(%rdi)
    assert (insn.is_write, insn.size, insn.immediate, insn.length) == (True, 4, 0x8000_0000, 7)
    insn = mmio.decode(bytes.fromhex("48c707ffffffff"))  # movq $-1,(%rdi)
    assert (insn.size, insn.immediate) == (8, 0xFFFF_FFFF_FFFF_FFFF)
    insn = mmio.decode(bytes.fromhex("c60742"))  # movb $0x42,(%rdi)
    assert (insn.size, insn.immediate, insn.length) == (1, 0x42, 3)
    insn = mmio.decode(bytes.fromhex("66c7071234"))  # movw $0x3412,(%rdi)
    assert (insn.size, insn.immediate, insn.length) == (2, 0x3412, 5)
    insn = mmio.decode(bytes.fromhex("0fb607"))  # movzbl (%rdi),%eax
    assert (insn.size, insn.dest_size, insn.load_result(0xFFFF_FFFF_FFFF_FFFF, 0x80)) == (1, 4, 0x80)
    insn = mmio.decode(bytes.fromhex("480fb70f"))  # movzwq (%rdi),%rcx
    assert (insn.reg, insn.size, insn.dest_size) == (1, 2, 8)


def test_32bit_destination_zero_extends_16bit_merges() -> None:
    assert mmio.decode(bytes.fromhex("8b07")).load_result(0xFFFF_FFFF_0000_0000, 5) == 5
    assert mmio.decode(bytes.fromhex("668b07")).load_result(0xFFFF_FFFF_FFFF_0000, 5) == 0xFFFF_FFFF_FFFF_0005


@pytest.mark.parametrize(
    "code",
    ["", "8b", "8bc0", "0105", "f7 07".replace(" ", ""), "c70f", "0fb8", "c707aabb", "8b04"],
)
def test_unsupported_or_truncated(code: str) -> None:
    with pytest.raises(mmio.DecodeError):
        mmio.decode(bytes.fromhex(code))


ASM_CASES = [
    ("movl (%rdi), %eax", 4, False, 0),
    ("movl %ecx, 0x10(%rbx)", 4, True, 1),
    ("movq 0x7f(%rsp), %r15", 8, False, 15),
    ("movl %r9d, 0x12345678(%rax,%rcx,4)", 4, True, 9),
    ("movb (%r10), %dl", 1, False, 2),
    ("movw %si, -8(%rbp)", 2, True, 6),
    ("movzbl 3(%rdi), %r11d", 1, False, 11),
    ("movzwl %fs:(%rax), %edx", 2, False, 2),
    ("movl 0x100(%rip), %esi", 4, False, 6),
]


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("objcopy") is None, reason="GNU as not installed")
def test_lengths_match_gnu_as(tmp_path: Path) -> None:
    src = "\n".join(f"{asm}\n" for asm, *_ in ASM_CASES)
    (tmp_path / "t.s").write_text(".text\n" + src)
    subprocess.run(["as", "--64", "-o", "t.o", "t.s"], cwd=tmp_path, check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", "t.o", "t.bin"], cwd=tmp_path, check=True)
    code = (tmp_path / "t.bin").read_bytes()
    pos = 0
    for asm, size, is_write, reg in ASM_CASES:
        insn = mmio.decode(code[pos : pos + 15])
        assert (insn.size, insn.is_write, insn.reg) == (size, is_write, reg), asm
        pos += insn.length
    assert pos == len(code)
