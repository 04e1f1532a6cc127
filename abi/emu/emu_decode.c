/* mshv-libvirt emulated /dev/mshv: just enough x86 decoding to locate an instruction.
 *
 * The hypervisor reports an intercepted I/O or MMIO instruction with its start address,
 * length and bytes, and leaves the VP at that instruction. KVM may already have moved RIP
 * past it (writes, on some hosts also OUT), so the emulator must find where the instruction
 * began: it decodes candidate byte ranges that end exactly at RIP and keeps the one that is
 * the right kind of instruction (IN/OUT with the exit's port and size, or a memory write
 * whose operand addresses the faulting GPA). This needs lengths, ModRM/SIB/displacement and
 * immediates for the legacy opcode maps; VEX/EVEX encodings are reported as unknown.
 */
#include <string.h>

#include "emu_int.h"

enum { I_NONE, I_B, I_W, I_Z, I_V, I_WB, I_FAR, I_MOFFS, I_GRP3 };

/* One-byte map: *modrm and immediate kind; -1 if invalid in this mode (or VEX/EVEX). */
static int map1(int op, int mode, int *modrm, int *imm)
{
    *modrm = 0;
    *imm = I_NONE;
    if (op < 0x40 && (op & 7) < 4) {
        *modrm = 1; /* ALU r/m forms */
        return 0;
    }
    if (op < 0x40 && (op & 7) == 4) {
        *imm = I_B;
        return 0;
    }
    if (op < 0x40 && (op & 7) == 5) {
        *imm = I_Z;
        return 0;
    }
    switch (op) {
    case 0x06: case 0x07: case 0x0E: case 0x16: case 0x17: case 0x1E: case 0x1F:
    case 0x27: case 0x2F: case 0x37: case 0x3F: case 0x60: case 0x61: case 0xCE:
        return mode == 64 ? -1 : 0;
    case 0x62: /* BOUND, EVEX in 64-bit mode */
    case 0xC4: /* LES, VEX3 in 64-bit mode */
    case 0xC5: /* LDS, VEX2 in 64-bit mode */
        if (mode == 64)
            return -1;
        *modrm = 1;
        return 0;
    case 0x63: case 0x69: case 0x6B:
    case 0x84: case 0x85: case 0x86: case 0x87: case 0x88: case 0x89: case 0x8A: case 0x8B:
    case 0x8C: case 0x8D: case 0x8E: case 0x8F:
    case 0xD0: case 0xD1: case 0xD2: case 0xD3:
    case 0xD8: case 0xD9: case 0xDA: case 0xDB: case 0xDC: case 0xDD: case 0xDE: case 0xDF:
    case 0xFE: case 0xFF:
        *modrm = 1;
        if (op == 0x69)
            *imm = I_Z;
        if (op == 0x6B)
            *imm = I_B;
        return 0;
    case 0x68:
        *imm = I_Z;
        return 0;
    case 0x6A: case 0xA8: case 0xCD: case 0xEB:
    case 0xE0: case 0xE1: case 0xE2: case 0xE3: case 0xE4: case 0xE5: case 0xE6: case 0xE7:
        *imm = I_B;
        return 0;
    case 0xD4: case 0xD5:
        if (mode == 64)
            return -1;
        *imm = I_B;
        return 0;
    case 0x80: case 0x83: case 0xC0: case 0xC1: case 0xC6:
        *modrm = 1;
        *imm = I_B;
        return 0;
    case 0x82:
        if (mode == 64)
            return -1;
        *modrm = 1;
        *imm = I_B;
        return 0;
    case 0x81: case 0xC7:
        *modrm = 1;
        *imm = I_Z;
        return 0;
    case 0xF6: case 0xF7:
        *modrm = 1;
        *imm = I_GRP3;
        return 0;
    case 0x9A: case 0xEA:
        if (mode == 64)
            return -1;
        *imm = I_FAR;
        return 0;
    case 0xA0: case 0xA1: case 0xA2: case 0xA3:
        *imm = I_MOFFS;
        return 0;
    case 0xA9: case 0xE8: case 0xE9:
        *imm = I_Z;
        return 0;
    case 0xC2: case 0xCA:
        *imm = I_W;
        return 0;
    case 0xC8:
        *imm = I_WB;
        return 0;
    case 0xD6: case 0xF1:
        return mode == 64 && op == 0xD6 ? -1 : 0;
    default:
        if (op >= 0x70 && op <= 0x7F) {
            *imm = I_B;
            return 0;
        }
        if (op >= 0xB0 && op <= 0xB7) {
            *imm = I_B;
            return 0;
        }
        if (op >= 0xB8 && op <= 0xBF) {
            *imm = I_V;
            return 0;
        }
        return 0; /* 40-5F, 90-99, 9B-9F, A4-A7, AA-AF, C3, C9, CB, CC, CF, D7, EC-EF, F4-FD */
    }
}

/* Two-byte (0F xx) map. */
static int map2(int op, int *modrm, int *imm)
{
    *modrm = 1;
    *imm = I_NONE;
    switch (op) {
    case 0x04: case 0x0A: case 0x0C: case 0x36: case 0x39: case 0x3B: case 0x3C: case 0x3D: case 0x3E:
    case 0x3F: case 0xA6: case 0xA7:
        return -1;
    case 0x05: case 0x06: case 0x07: case 0x08: case 0x09: case 0x0B: case 0x0E:
    case 0x30: case 0x31: case 0x32: case 0x33: case 0x34: case 0x35: case 0x37:
    case 0x77: case 0xA0: case 0xA1: case 0xA2: case 0xA8: case 0xA9: case 0xAA:
        *modrm = 0;
        return 0;
    case 0x0F: case 0x70: case 0x71: case 0x72: case 0x73: case 0xA4: case 0xAC: case 0xBA:
    case 0xC2: case 0xC4: case 0xC5: case 0xC6:
        *imm = I_B;
        return 0;
    default:
        if (op >= 0x80 && op <= 0x8F) {
            *modrm = 0;
            *imm = I_Z;
        } else if (op >= 0xC8 && op <= 0xCF) {
            *modrm = 0;
        }
        return 0;
    }
}

static int64_t sread(const uint8_t *b, int size)
{
    switch (size) {
    case 1:
        return (int8_t)b[0];
    case 2: {
        int16_t v;
        memcpy(&v, b, 2);
        return v;
    }
    case 4: {
        int32_t v;
        memcpy(&v, b, 4);
        return v;
    }
    default: {
        int64_t v;
        memcpy(&v, b, 8);
        return v;
    }
    }
}

int emu_decode(const uint8_t *b, int n, int mode, struct emu_insn *in)
{
    int i = 0, opsz = 0, adsz = 0, modrm = 0, imm = I_NONE;
    memset(in, 0, sizeof(*in));
    in->mode = mode;
    in->seg = -1;
    if (n > 15)
        n = 15;
    for (;; i++) { /* legacy prefixes, any order */
        if (i >= n)
            return -1;
        switch (b[i]) {
        case 0x66: opsz = 1; continue;
        case 0x67: adsz = 1; continue;
        case 0xF0: continue;
        case 0xF2: case 0xF3: in->rep = b[i]; continue;
        case 0x26: in->seg = 0; continue;
        case 0x2E: in->seg = 1; continue;
        case 0x36: in->seg = 2; continue;
        case 0x3E: in->seg = 3; continue;
        case 0x64: in->seg = 4; continue;
        case 0x65: in->seg = 5; continue;
        }
        break;
    }
    if (mode == 64 && (b[i] & 0xF0) == 0x40) { /* REX must come last */
        in->rex = b[i++];
        if (i >= n)
            return -1;
    }
    if (mode == 64) {
        in->opsize = (in->rex & 8) ? 8 : (opsz ? 2 : 4);
        in->adsize = adsz ? 4 : 8;
    } else if (mode == 32) {
        in->opsize = opsz ? 2 : 4;
        in->adsize = adsz ? 2 : 4;
    } else {
        in->opsize = opsz ? 4 : 2;
        in->adsize = adsz ? 4 : 2;
    }
    in->map = 1;
    in->opcode = b[i++];
    if (in->opcode == 0x0F) {
        if (i >= n)
            return -1;
        in->opcode = b[i++];
        in->map = 2;
        if (in->opcode == 0x38 || in->opcode == 0x3A) {
            in->map = in->opcode == 0x38 ? 3 : 4;
            if (i >= n)
                return -1;
            in->opcode = b[i++];
            modrm = 1;
            imm = in->map == 4 ? I_B : I_NONE;
        } else if (map2(in->opcode, &modrm, &imm) < 0) {
            return -1;
        }
    } else if (map1(in->opcode, mode, &modrm, &imm) < 0) {
        return -1;
    }
    if (modrm) {
        if (i >= n)
            return -1;
        in->has_modrm = 1;
        in->modrm = b[i++];
        int mod = in->modrm >> 6, rm = in->modrm & 7, dsz = 0;
        if (mod != 3) {
            in->memop = 1;
            if (in->adsize == 2) {
                dsz = mod == 1 ? 1 : (mod == 2 || (mod == 0 && rm == 6)) ? 2 : 0;
            } else {
                if (rm == 4) {
                    if (i >= n)
                        return -1;
                    in->has_sib = 1;
                    in->sib = b[i++];
                    if (mod == 0 && (in->sib & 7) == 5)
                        dsz = 4;
                }
                if (mod == 0 && rm == 5)
                    dsz = 4; /* disp32, RIP-relative in 64-bit mode */
                if (mod == 1)
                    dsz = 1;
                if (mod == 2)
                    dsz = 4;
            }
            if (i + dsz > n)
                return -1;
            if (dsz)
                in->disp = sread(b + i, dsz);
            i += dsz;
        }
    }
    int isz = 0;
    switch (imm) {
    case I_B: isz = 1; break;
    case I_W: isz = 2; break;
    case I_Z: isz = in->opsize == 2 ? 2 : 4; break;
    case I_V: isz = in->opsize; break;
    case I_WB: isz = 3; break;
    case I_FAR: isz = (in->opsize == 2 ? 2 : 4) + 2; break;
    case I_MOFFS: isz = in->adsize; in->memop = 2; break;
    case I_GRP3: /* TEST r/m, imm only for /0 and /1 */
        if (((in->modrm >> 3) & 7) < 2)
            isz = in->opcode == 0xF6 ? 1 : (in->opsize == 2 ? 2 : 4);
        break;
    }
    if (i + isz > n)
        return -1;
    if (isz) {
        uint64_t v = 0;
        memcpy(&v, b + i, isz > 8 ? 8 : (size_t)isz);
        if (imm == I_MOFFS)
            in->moffs = v;
        else
            in->imm = v;
    }
    i += isz;
    if (in->map == 1) {
        switch (in->opcode) {
        case 0xAC: case 0xAD: case 0xA6: case 0xA7: case 0x6E: case 0x6F:
            in->memop = 3; /* LODS, CMPS, OUTS read DS:rSI */
            break;
        case 0xAA: case 0xAB: case 0xAE: case 0xAF: case 0x6C: case 0x6D:
            in->memop = 4; /* STOS, SCAS, INS use ES:rDI */
            break;
        case 0xA4: case 0xA5:
            in->memop = 5; /* MOVS */
            break;
        }
    }
    in->len = i;
    return i;
}

int emu_insn_is_io(const struct emu_insn *in, int is_in, uint16_t port, int size, uint64_t rdx)
{
    if (in->map != 1)
        return 0;
    int op = in->opcode, dir, sz, imm_port = 0;
    int wide = in->opsize == 2 ? 2 : 4; /* REX.W does not make port I/O 64-bit */
    switch (op) {
    case 0xE4: dir = 1, sz = 1, imm_port = 1; break;
    case 0xE5: dir = 1, sz = wide, imm_port = 1; break;
    case 0xE6: dir = 0, sz = 1, imm_port = 1; break;
    case 0xE7: dir = 0, sz = wide, imm_port = 1; break;
    case 0xEC: case 0x6C: dir = 1, sz = 1; break;
    case 0xED: case 0x6D: dir = 1, sz = wide; break;
    case 0xEE: case 0x6E: dir = 0, sz = 1; break;
    case 0xEF: case 0x6F: dir = 0, sz = wide; break;
    default:
        return 0;
    }
    if (dir != !!is_in || sz != size)
        return 0;
    return imm_port ? (in->imm & 0xFF) == port : (rdx & 0xFFFF) == port;
}

int emu_insn_writes_mem(const struct emu_insn *in)
{
    int op = in->opcode, reg = (in->modrm >> 3) & 7;
    if (!in->memop)
        return 0;
    if (in->map == 1) {
        if (op < 0x40 && (op & 7) < 2)
            return (op & 0x38) != 0x38; /* ALU r/m, r (CMP only reads) */
        switch (op) {
        case 0x80: case 0x81: case 0x82: case 0x83:
            return reg != 7;
        case 0x86: case 0x87: case 0x88: case 0x89: case 0x8C: case 0x8F:
        case 0xC0: case 0xC1: case 0xD0: case 0xD1: case 0xD2: case 0xD3:
        case 0xC6: case 0xC7: case 0xA2: case 0xA3: case 0xA4: case 0xA5: case 0xAA: case 0xAB:
        case 0x6C: case 0x6D:
            return 1;
        case 0xF6: case 0xF7:
            return reg == 2 || reg == 3;
        case 0xFE: case 0xFF:
            return reg == 0 || reg == 1;
        }
        return 0;
    }
    if (in->map == 2) {
        switch (op) {
        case 0x11: case 0x13: case 0x17: case 0x29: case 0x2B: case 0x7E: case 0x7F:
        case 0xA3: case 0xAB: case 0xB3: case 0xBB: case 0xA4: case 0xA5: case 0xAC: case 0xAD:
        case 0xB0: case 0xB1: case 0xC0: case 0xC1: case 0xC3: case 0xD6: case 0xE7: case 0xC7:
            return 1;
        case 0xBA:
            return reg >= 5; /* BTS/BTR/BTC */
        }
        return op >= 0x90 && op <= 0x9F; /* SETcc */
    }
    return 0;
}

int emu_insn_linear(const struct emu_insn *in, const uint64_t gpr[16], const struct kvm_sregs *s,
                    uint64_t next_rip, uint64_t *lin)
{
    uint64_t ea = 0;
    int seg = 3; /* DS */
    int rex_b = (in->rex & 1) << 3, rex_x = (in->rex & 2) << 2;
    switch (in->memop) {
    case 1: {
        int mod = in->modrm >> 6, rm = in->modrm & 7;
        if (in->adsize == 2) {
            static const int base16[8][2] = {{3, 6}, {3, 7}, {5, 6}, {5, 7}, {6, -1}, {7, -1}, {5, -1}, {3, -1}};
            if (mod == 0 && rm == 6) {
                ea = (uint64_t)in->disp;
            } else {
                ea = gpr[base16[rm][0]] + (base16[rm][1] >= 0 ? gpr[base16[rm][1]] : 0) + (uint64_t)in->disp;
                if (rm == 2 || rm == 3 || rm == 6)
                    seg = 2; /* BP-based: SS */
            }
            ea &= 0xFFFF;
        } else {
            if (in->has_sib) {
                int scale = in->sib >> 6, index = ((in->sib >> 3) & 7) | rex_x, base = (in->sib & 7) | rex_b;
                if (index != 4)
                    ea += gpr[index] << scale;
                if (mod == 0 && (in->sib & 7) == 5) {
                    /* no base */
                } else {
                    ea += gpr[base];
                    if ((base & 7) == 4 || (base & 7) == 5)
                        seg = 2;
                }
                ea += (uint64_t)in->disp;
            } else if (mod == 0 && rm == 5) {
                ea = (uint64_t)in->disp + (in->mode == 64 ? next_rip : 0);
            } else {
                ea = gpr[rm | rex_b] + (uint64_t)in->disp;
                if (rm == 5)
                    seg = 2;
            }
            if (in->adsize == 4)
                ea &= 0xFFFFFFFFull;
        }
        break;
    }
    case 2:
        ea = in->moffs;
        break;
    case 3:
        ea = gpr[6];
        break;
    case 4:
    case 5:
        ea = gpr[7];
        seg = 0; /* ES, no override */
        break;
    default:
        return 0;
    }
    if (in->memop != 1 && in->adsize != 8)
        ea &= in->adsize == 4 ? 0xFFFFFFFFull : 0xFFFF;
    if (in->seg >= 0 && in->memop < 4)
        seg = in->seg;
    const struct kvm_segment *sr[6] = {&s->es, &s->cs, &s->ss, &s->ds, &s->fs, &s->gs};
    uint64_t base = sr[seg]->base;
    if (in->mode == 64 && seg < 4)
        base = 0; /* only FS and GS have a base in 64-bit mode */
    *lin = base + ea;
    if (in->mode != 64)
        *lin &= 0xFFFFFFFFull;
    return 1;
}

/* Size in bytes of the memory operand, 0 if unknown (only what a candidate check needs). */
int emu_insn_mem_size(const struct emu_insn *in)
{
    int op = in->opcode, os = in->opsize;
    if (in->map == 1) {
        if (op < 0x40 && (op & 7) < 4)
            return (op & 1) ? os : 1;
        switch (op) {
        case 0x80: case 0x82: case 0x84: case 0x86: case 0x88: case 0x8A: case 0xC0: case 0xC6:
        case 0xD0: case 0xD2: case 0xF6: case 0xFE: case 0xA0: case 0xA2: case 0xA4: case 0xA6:
        case 0xAA: case 0xAC: case 0xAE: case 0x6C: case 0x6E:
            return 1;
        case 0x81: case 0x83: case 0x85: case 0x87: case 0x89: case 0x8B: case 0xC1: case 0xC7:
        case 0xD1: case 0xD3: case 0xF7: case 0xA1: case 0xA3: case 0xA5: case 0xA7: case 0xAB:
        case 0xAD: case 0xAF: case 0x69: case 0x6B:
            return os;
        case 0x6D: case 0x6F:
            return os == 2 ? 2 : 4;
        case 0x8C: case 0x8E:
            return 2;
        case 0x63:
            return 4;
        case 0xFF:
            return ((in->modrm >> 3) & 7) < 2 ? os : 0;
        }
        return 0;
    }
    if (in->map == 2) {
        switch (op) {
        case 0xB6: case 0xBE: case 0xB0: case 0xC0:
            return 1;
        case 0xB7: case 0xBF:
            return 2;
        case 0xB1: case 0xC1: case 0xA3: case 0xAB: case 0xB3: case 0xBB: case 0xBA: case 0xA4:
        case 0xA5: case 0xAC: case 0xAD: case 0xC3:
            return os;
        case 0x13: case 0x17: case 0xD6:
            return 8;
        case 0x6E: case 0x7E:
            return (in->rex & 8) ? 8 : 4;
        case 0x10: case 0x11: case 0x28: case 0x29: case 0x2B: case 0x6F: case 0x7F: case 0xE7:
            return 16;
        }
        if (op >= 0x90 && op <= 0x9F)
            return 1;
    }
    return 0;
}

/* Value a plain MOV store writes, from the registers as they are (a store changes none of
 * them but RIP); 0 if the instruction is not one whose value we can tell. */
int emu_insn_store_value(const struct emu_insn *in, const uint64_t gpr[16], uint64_t *value)
{
    int reg = ((in->modrm >> 3) & 7) | ((in->rex & 4) << 1), os = in->opsize;
    uint64_t v;
    if (in->map != 1)
        return 0;
    switch (in->opcode) {
    case 0x88:
        if (!in->rex && reg >= 4 && reg < 8)
            v = gpr[reg - 4] >> 8; /* AH CH DH BH */
        else
            v = gpr[reg];
        *value = v & 0xFF;
        return 1;
    case 0x89:
        v = gpr[reg];
        break;
    case 0xA2:
        *value = gpr[0] & 0xFF;
        return 1;
    case 0xA3:
        v = gpr[0];
        break;
    case 0xC6:
        *value = in->imm & 0xFF;
        return 1;
    case 0xC7:
        v = os == 2 ? (in->imm & 0xFFFF) : (uint64_t)(int64_t)(int32_t)(uint32_t)in->imm;
        break;
    default:
        return 0;
    }
    *value = os == 8 ? v : v & ((1ull << (8 * os)) - 1);
    return 1;
}
