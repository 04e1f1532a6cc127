"""Hypervisor register names and the typed values they carry."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Reg(IntEnum):
    """``hv_register_name`` values for x86_64 (TLFS numbering)."""

    EXPLICIT_SUSPEND = 0x00000000
    INTERCEPT_SUSPEND = 0x00000001
    PENDING_INTERRUPTION = 0x00010002
    INTERRUPT_STATE = 0x00010003
    GUEST_OS_ID = 0x00090002
    VP_INDEX = 0x00090003
    RAX = 0x00020000
    RCX = 0x00020001
    RDX = 0x00020002
    RBX = 0x00020003
    RSP = 0x00020004
    RBP = 0x00020005
    RSI = 0x00020006
    RDI = 0x00020007
    R8 = 0x00020008
    R9 = 0x00020009
    R10 = 0x0002000A
    R11 = 0x0002000B
    R12 = 0x0002000C
    R13 = 0x0002000D
    R14 = 0x0002000E
    R15 = 0x0002000F
    RIP = 0x00020010
    RFLAGS = 0x00020011
    CR0 = 0x00040000
    CR2 = 0x00040001
    CR3 = 0x00040002
    CR4 = 0x00040003
    CR8 = 0x00040004
    XFEM = 0x00040005
    DR0 = 0x00050000
    DR1 = 0x00050001
    DR2 = 0x00050002
    DR3 = 0x00050003
    DR6 = 0x00050004
    DR7 = 0x00050005
    ES = 0x00060000
    CS = 0x00060001
    SS = 0x00060002
    DS = 0x00060003
    FS = 0x00060004
    GS = 0x00060005
    LDTR = 0x00060006
    TR = 0x00060007
    IDTR = 0x00070000
    GDTR = 0x00070001
    TSC = 0x00080000
    EFER = 0x00080001
    KERNEL_GS_BASE = 0x00080002
    APIC_BASE = 0x00080003
    PAT = 0x00080004
    SYSENTER_CS = 0x00080005
    SYSENTER_EIP = 0x00080006
    SYSENTER_ESP = 0x00080007
    STAR = 0x00080008
    LSTAR = 0x00080009
    CSTAR = 0x0008000A
    SFMASK = 0x0008000B


SEGMENT_REGS = frozenset({Reg.ES, Reg.CS, Reg.SS, Reg.DS, Reg.FS, Reg.GS, Reg.LDTR, Reg.TR})
TABLE_REGS = frozenset({Reg.IDTR, Reg.GDTR})


@dataclass(frozen=True)
class Segment:
    """``hv_x64_segment_register``; attributes are the x86 descriptor access bits
    (type[3:0] S[4] DPL[6:5] P[7] AVL[12] L[13] D/B[14] G[15])."""

    base: int
    limit: int
    selector: int
    attributes: int


@dataclass(frozen=True)
class TableRegister:
    """``hv_x64_table_register`` (GDTR/IDTR)."""

    base: int
    limit: int


RegisterValue = int | Segment | TableRegister
