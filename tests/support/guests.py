"""Test guests, built at test time.

``build_tiny_guest``: a few hundred bytes of our own x86-64 assembly, assembled with GNU as/ld and
wrapped in a real bzImage (setup header "HdrS", protocol 2.15, XLF_KERNEL_64, 64-bit entry at +0x200
of the protected-mode part), so it boots through exactly the loader Linux uses. A loader that starts it in
real mode (QEMU's ``-kernel``) runs its setup code (``SETUP_ASM``) and its 32-bit entry, which masks the
8259s and enters long mode for the same 64-bit code (benchmarks/startup.py compares against QEMU so).
Behaviour:

* prints ``TINY-GUEST-UP cmdline=<the command line from boot_params>`` on COM1;
* starts the other vCPUs with INIT-SIPI through the LAPIC (a real-mode trampoline at 0x3000 takes
  them to long mode); each prints ``TINY-AP-UP <apic id>`` and idles in ``sti; hlt``;
* loops: echo bytes typed on COM1; ``q`` ACPI S5 poweroff, ``r`` i8042 0xFE reset, ``c`` reports a
  panic through pvpanic (port 0x505), ``f`` triple fault (empty IDT + ud2), ``b`` 20000 ``out`` to port
  0x80 then ``BENCH-DONE``, ``i`` prints
  ``TINY-IOAPIC-VERSION <hex>`` read from the IOAPIC by MMIO (a store, then a load); polls PM1_STS for
  the power button (prints ``TINY-GUEST-POWERBUTTON`` and powers off); between polls it sleeps on
  the LAPIC timer (one-shot, vector 0x40) with ``sti; hlt``; ``n`` prints its counters line
  (``TINY-IRQ-COUNTS mode=... tx= rx= serial= sci= kbd= timer= polls=``, see ``tiny_counts``);
  ``d`` scans PCI bus 0 (devices) (``TINY_PCI_ASM``); ``v`` drives the virtio-rng device
  (``TINY_VIRTIO_ASM``): ``TINY-VIRTIO bytes= irqs= sum= kicks=`` (see ``tiny_virtio``); ``g`` reads
  the CMOS RTC (get the time, ``TINY_RTC_ASM``); ``j`` writes a
  pattern to a virtio-blk disk, flushes and reads it back (``TINY_BLK_ASM``, see ``tiny_blk``); ``u``
  sends frames on a virtio-net device and counts what comes back (``TINY_NET_ASM``, see ``tiny_net``), ``m``
  the same on queue pair 2 of a multiqueue one after VQ_PAIRS_SET 2 on its control queue;
* counts NMIs (vector 2) and prints ``TINY-NMI <count, 8 hex digits>`` when the count changed, and prints
  ``TINY-KEY <hex byte>`` for every byte the i8042 has for it on port 0x60 (``TINY_EVENTS_ASM``, polled mode);
* with ``tiny.irq`` on its command line, the same commands interrupt-driven (``TINY_IRQ_ASM``): no
  polling and no timer, only IOAPIC interrupts (COM1 receive/transmit-empty, the SCI, the i8042);
  it also prints the counters before it powers off on the power button.

``cached_tiny_guest`` keeps one build under ``~/.cache/mshv-libvirt/tiny-<hash of its inputs>`` (for
scripts/first-vm.sh; the tests build their own, in a fraction of a second).

``build_linux_guest``: Debian's linux-image-amd64 bzImage (downloaded once, cached under
``~/.cache/mshv-libvirt/linux-<hash of package, version, .deb hash, modules>``) plus a busybox-static
initramfs made here.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.support.waits import wait_for

TINY_BANNER = "TINY-GUEST-UP"
TINY_AP_BANNER = "TINY-AP-UP"
TINY_POWERBUTTON = "TINY-GUEST-POWERBUTTON"
TINY_BENCH_DONE = "BENCH-DONE"
TINY_BENCH_EXITS = 20000
TINY_NMI = "TINY-NMI"
TINY_KEY = "TINY-KEY"
TINY_IRQ_FLAG = "tiny.irq"  # on the command line: the interrupt-driven mode (TINY_IRQ_ASM)
TINY_COUNTS = "TINY-IRQ-COUNTS"
TINY_PCI_ECAM = 0xE000_0000  # the VMM's layout.PCI_ECAM_ADDR (the guest reads no MCFG)
TINY_VIRTIO = "TINY-VIRTIO"
TINY_VIRTIO_ROUNDS = 2048  # requests per 'v' press: one buffer each, kicked, completed by an MSI-X interrupt
TINY_VIRTIO_BUFFER = 64
TINY_BLK = "TINY-BLK"
TINY_BLK_SECTOR = 0x30  # where each 'j' press writes its pattern
TINY_BLK_BYTES = 4096  # eight sectors: one data descriptor per request
TINY_BLK_TIMED_READS = 64  # reads of those sectors each 'j' press times on the ACPI PM timer after its check
TINY_BLK_READS_PER_PRESS = 1 + TINY_BLK_TIMED_READS  # its check's read, then the timed ones
TINY_PM_TIMER_HZ = 3_579_545
TINY_NET = "TINY-NET"
TINY_NET_FRAMES = 8  # frames each 'u' press sends (and as many more received it waits for)
TINY_NET_FRAME_LEN = 60  # the minimum Ethernet frame without its FCS
TINY_NET_ETHERTYPE = 0x88B5  # IEEE 802 local experimental ethertype 1: nobody else's protocol
TINY_NET_WAIT_TICKS = 5 * 3_579_545  # how long a press waits for replies: 5 s of the ACPI PM timer
LINUX_MARKER = "MSHV-GUEST-READY"
LINUX_POWERBUTTON = "MSHV-GUEST-POWERBUTTON"
# Measured on kvm-pvm hosts (no VMX): the host emulates the guest's CPL0 code instruction by
# instruction and its emulator lacks these instructions (see tests/vmm/test_linux_guest.py), so the
# kernel is told not to use them. Harmless elsewhere: it only hides CPU features from the kernel.
KVM_PVM_UNEMULATED = (
    "cx16 xsave smap popcnt movbe bmi1 bmi2 abm ssse3 sse4_2 sse4_1 aes pclmulqdq sha_ni avx avx2 fma f16c"
)
KVM_PVM_CLEARCPUID = "clearcpuid=" + KVM_PVM_UNEMULATED.replace(" ", ",")
# The Linux guest's command line (the README quotes it). cryptomgr.notests: the crypto self-tests
# alone take many minutes at emulated speed.
LINUX_CMDLINE = (
    "console=ttyS0 earlyprintk=ttyS0 panic=-1 nowatchdog mitigations=off cryptomgr.notests " + KVM_PVM_CLEARCPUID
)

TINY_ASM = r"""
    .set COM1, 0x3f8
    .set PM1_STS, 0x600
    .set PM1_CNT, 0x604
    .set SLP_S5, (5 << 10) | (1 << 13)
    .set LAPIC, 0xfee00000
    .set TRAMP, 0x3000
    .set TIMER_VECTOR, 0x40
    .set BENCH_EXITS, {bench_exits}

    .text
    .code32
start32:                        /* boot protocol 32-bit entry (code32_start; QEMU reaches it through
                                   SETUP_ASM): flat segments __BOOT_CS/__BOOT_DS, no paging, ESI = boot_params.
                                   Identity-map 4 GiB with 2 MiB pages, enter long mode, go on at start64. */
    cli
    mov $0x18, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %esi, %ebp
    mov $0xff, %al              /* mask both 8259s: the firmware's PIT tick (vector 8) has no gate here */
    out %al, $0x21
    out %al, $0xa1
    mov $boot_pml4, %edi        /* PML4, PDPT and 4 PDs: 6 pages, zeroed (they are .bss) */
    xor %eax, %eax
    mov $6 * 1024, %ecx
    rep stosl
    mov $boot_pd, %edi
    mov $0x83, %eax             /* present, writable, 2 MiB */
    mov $2048, %ecx
1:  mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 1b
    mov $boot_pdpt, %edi
    mov $boot_pd + 3, %eax
    mov $4, %ecx
2:  mov %eax, (%edi)
    add $4096, %eax
    add $8, %edi
    loop 2b
    movl $boot_pdpt + 3, boot_pml4
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax              /* PAE */
    mov %eax, %cr4
    mov $0xc0000080, %ecx       /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax        /* PG | PE */
    mov %eax, %cr0
    lgdt boot_gdtr
    ljmp $0x10, $3f
    .code64
3:  mov $0x18, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %ebp, %esi              /* zero-extended: boot_params */
    jmp start64
    .p2align 3
boot_gdt:   .quad 0, 0, 0x00af9a000000ffff, 0x00cf92000000ffff  /* 0x10: 64-bit code, 0x18: data */
boot_gdtr:  .word 4 * 8 - 1
            .long boot_gdt
    .org 0x200
start64:                        /* boot protocol 64-bit entry: RSI = boot_params */
    cli
    lea stack_top(%rip), %rsp
    mov %rsi, %r15
    call setup_idt
    call events_init            /* NMI handler (TINY_EVENTS_ASM) */
    call lapic_enable
    call irq_mode_init          /* "tiny.irq" on the command line: interrupt-driven from here on */
    lea banner(%rip), %rsi
    call puts
    mov 0x228(%r15), %esi       /* boot_params.hdr.cmd_line_ptr */
    call puts
    mov $'\n', %al
    call putc
    call start_aps

main_loop:
    cmpb $0, irq_mode(%rip)
    jne irq_main_loop
    lock incl polls(%rip)
    mov $COM1+5, %dx
    in %dx, %al
    test $1, %al
    jz 2f
    mov $COM1, %dx
    in %dx, %al
dispatch:                       /* al = a byte typed on COM1 */
    cmp $'q', %al
    je poweroff
    cmp $'r', %al
    je reboot
    cmp $'c', %al
    je panic
    cmp $'f', %al
    je triple_fault
    cmp $'b', %al
    je bench
    cmp $'i', %al
    je ioapic_version
    cmp $'n', %al
    je counts_command
    cmp $'d', %al
    je pci_scan
    cmp $'v', %al
    je virtio_rng
    cmp $'g', %al
    je rtc_read
    cmp $'j', %al
    je virtio_blk
    cmp $'u', %al
    je virtio_net
    cmp $'m', %al
    je virtio_net_mq
    call lock_print
    call putc
    movb $0, print_lock(%rip)
    jmp main_loop
2:  lock incl polls(%rip)
    call events_poll            /* NMIs seen, keys from the i8042 (TINY_EVENTS_ASM) */
    mov $PM1_STS, %dx
    in %dx, %ax
    test $0x100, %ax
    jnz powerbutton
    call sleep_tick
    jmp main_loop

powerbutton:
    lea pwrbtn_msg(%rip), %rsi
    call puts
poweroff:
    call tx_drain               /* interrupt mode: what is still queued goes out first */
1:  mov $PM1_CNT, %dx
    mov $SLP_S5, %ax
    out %ax, %dx
    jmp 1b                      /* not reached once the VMM acts */

reboot:
    mov $0xfe, %al
    out %al, $0x64
    jmp reboot

triple_fault:                   /* empty IDT: #UD -> #GP -> #DF -> triple fault */
    lidt null_idtr(%rip)
    ud2

bench:
    mov $BENCH_EXITS, %ecx
1:  out %al, $0x80
    dec %ecx
    jnz 1b
    lea bench_msg(%rip), %rsi
    call puts
    jmp main_loop

ioapic_version:                 /* MMIO through the VMM's IOAPIC: select VER, read the window */
    call lock_print
    lea ioapic_msg(%rip), %rsi
    call puts
    mov $0xfec00000, %eax
    movl $1, (%rax)
    mov 0x10(%rax), %ebx
    call puthex32
    mov $'\n', %al
    call putc
    movb $0, print_lock(%rip)
    jmp main_loop

/* one LAPIC timer period, then back (one-shot, divide by 1) */
sleep_tick:
    mov $LAPIC, %eax
    movl $TIMER_VECTOR, 0x320(%rax)
    movl $0xb, 0x3e0(%rax)
    movl $2000000, 0x380(%rax)
    sti
    hlt
    cli
    ret

lapic_enable:
    mov $LAPIC, %eax
    movl $0x1ff, 0xf0(%rax)     /* software enable, spurious vector 0xff */
    movl $0, 0x80(%rax)         /* TPR 0 */
    ret

/* INIT + SIPI to all but self; APs arrive at ap_main */
start_aps:
    lea tramp_start(%rip), %rsi
    mov $TRAMP, %edi
    mov $(tramp_end - tramp_start), %ecx
    rep movsb
    mov $LAPIC, %eax
    movl $0, 0x310(%rax)
    movl $0x000c4500, 0x300(%rax)       /* INIT, assert, all excluding self */
    movl $0x000c4600 | (TRAMP >> 12), 0x300(%rax) /* SIPI vector 0x03 */
    ret

ap_main:
    mov $LAPIC, %eax
    mov 0x20(%rax), %ebx
    shr $24, %ebx                        /* APIC id */
    mov %ebx, %eax
    shl $12, %eax
    lea ap_stacks(%rip), %rsp
    add %rax, %rsp
    add $4096, %rsp
    lidt idtr(%rip)
    call lapic_enable
    call lock_print
    lea ap_msg(%rip), %rsi
    call puts
    mov %bl, %al
    add $'0', %al
    call putc
    mov $'\n', %al
    call putc
    movb $0, print_lock(%rip)
2:  sti
    hlt
    jmp 2b

lock_print:                     /* spin on print_lock; preserves al */
    push %rax
1:  mov $1, %al
    xchg %al, print_lock(%rip)
    test %al, %al
    jnz 1b
    pop %rax
    ret

putc:                           /* al -> COM1 */
    cmpb $0, irq_mode(%rip)
    jne putc_irq
    push %rax
    mov $COM1+5, %dx
1:  lock incl polls(%rip)
    in %dx, %al
    test $0x20, %al
    jz 1b
    pop %rax
    mov $COM1, %dx
    out %al, %dx
    ret

puthex32:                       /* ebx as 8 hex digits */
    mov $8, %ecx
1:  rol $4, %ebx
    mov %bl, %al
    and $0xf, %al
    add $'0', %al
    cmp $'9', %al
    jbe 2f
    add $('a' - '9' - 1), %al
2:  push %rcx
    call putc
    pop %rcx
    dec %ecx
    jnz 1b
    ret

puts:                           /* NUL-terminated string at rsi */
1:  lodsb
    test %al, %al
    jz 2f
    call putc
    jmp 1b
2:  ret

setup_idt:
    lea idt(%rip), %rdi
    lea timer_isr(%rip), %rax
    mov $TIMER_VECTOR, %ecx
    call set_gate
    lea spurious_isr(%rip), %rax
    mov $0xff, %ecx
    call set_gate
    lea idt(%rip), %rax
    mov %rax, idtr+2(%rip)
    lidt idtr(%rip)
    ret

set_gate:                       /* vector ecx -> handler rax (64-bit interrupt gate) */
    shl $4, %ecx
    mov %ax, (%rdi,%rcx)
    movw $0x10, 2(%rdi,%rcx)
    movw $0x8e00, 4(%rdi,%rcx)
    shr $16, %rax
    mov %ax, 6(%rdi,%rcx)
    shr $16, %rax
    mov %eax, 8(%rdi,%rcx)
    movl $0, 12(%rdi,%rcx)
    ret

timer_isr:
    lock incl timer_irqs(%rip)
    push %rax
    mov $LAPIC, %eax
    movl $0, 0xb0(%rax)         /* EOI */
    pop %rax
    iretq
spurious_isr:
    iretq

/* AP trampoline, copied to TRAMP: real mode -> protected mode -> long mode */
    .code16
tramp_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl tramp_gdt_desc - tramp_start
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $TRAMP + (tramp32 - tramp_start)
    .code32
tramp32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %cr4, %eax
    or $0x20, %eax              /* PAE */
    mov %eax, %cr4
    mov $0x9000, %eax           /* the VMM's identity map */
    mov %eax, %cr3
    mov $0xc0000080, %ecx
    rdmsr
    or $0x100, %eax             /* EFER.LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax
    mov %eax, %cr0
    ljmpl $0x18, $TRAMP + (tramp64 - tramp_start)
    .code64
tramp64:
    movabs $ap_main, %rax
    jmp *%rax
    .p2align 3
tramp_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    /* 0x08 32-bit code */
    .quad 0x00cf92000000ffff    /* 0x10 data */
    .quad 0x00af9a000000ffff    /* 0x18 64-bit code */
tramp_gdt_desc:
    .word tramp_gdt_desc - tramp_gdt - 1
    .long TRAMP + (tramp_gdt - tramp_start)
tramp_end:

    .data
banner:     .asciz "TINY-GUEST-UP cmdline="
ap_msg:     .asciz "TINY-AP-UP "
ioapic_msg: .asciz "TINY-IOAPIC-VERSION "
pwrbtn_msg: .asciz "TINY-GUEST-POWERBUTTON\n"
bench_msg:  .asciz "BENCH-DONE\n"
    .p2align 4
idtr:       .word 256 * 16 - 1
            .quad 0
null_idtr:  .word 0
            .quad 0
print_lock: .byte 0

    .bss
    .p2align 12
idt:        .skip 4096
boot_pml4:  .skip 4096          /* start32's page tables */
boot_pdpt:  .skip 4096
boot_pd:    .skip 4 * 4096
ap_stacks:  .skip 4096 * 8
            .skip 8192
stack_top:
"""

# NMIs, keys and the panic report (appended to TINY_ASM; it hooks into it through events_init, events_poll
# and the 'c' command). The NMI handler only counts; the main loop prints, so output never interleaves.
TINY_EVENTS_ASM = r"""
    .set PVPANIC, 0x505
    .set PVPANIC_PANICKED, 1

    .text
    .code64
events_init:                    /* vector 2 -> nmi_isr (the IDT is already loaded) */
    lea idt(%rip), %rdi
    lea nmi_isr(%rip), %rax
    mov $2, %ecx
    call set_gate
    ret

nmi_isr:
    lock incl nmi_count(%rip)
    iretq

events_poll:
    mov nmi_count(%rip), %ebx
    cmp nmi_reported(%rip), %ebx
    je 1f
    mov %ebx, nmi_reported(%rip)
    call lock_print
    lea nmi_msg(%rip), %rsi
    call puts
    call puthex32
    mov $'\n', %al
    call putc
    movb $0, print_lock(%rip)
1:  in $0x64, %al               /* i8042 status: output buffer full? */
    test $1, %al
    jz 2f
    in $0x60, %al
    mov %al, %bl
    call lock_print
    lea key_msg(%rip), %rsi
    call puts
    mov %bl, %al
    shr $4, %al
    call puthexdigit
    mov %bl, %al
    call puthexdigit
    mov $'\n', %al
    call putc
    movb $0, print_lock(%rip)
    jmp 1b
2:  ret

puthexdigit:                    /* low nibble of al */
    and $0xf, %al
    add $'0', %al
    cmp $'9', %al
    jbe 1f
    add $('a' - '9' - 1), %al
1:  jmp putc

panic:                          /* what a kernel's pvpanic driver does, then it stops */
    mov $PVPANIC, %dx
    mov $PVPANIC_PANICKED, %al
    out %al, %dx
1:  cli
    hlt
    jmp 1b

    .data
nmi_msg:    .asciz "TINY-NMI "
key_msg:    .asciz "TINY-KEY "
    .p2align 2
nmi_count:  .long 0
nmi_reported: .long 0
"""

# Interrupt-driven mode, selected by "tiny.irq" on the command line (appended to TINY_ASM; it only
# hooks into it through irq_mode_init, main_loop/dispatch, putc, tx_drain and counts_command).
# Every device event arrives as an IOAPIC interrupt that the VMM fires through its IrqfdSink
# (an eventfd bound to the pin's GSI with MSHV_IRQFD): COM1 pin 4 -> vector 0x30 (receive data and
# transmitter-empty, the only way bytes come in and go out), the SCI pin 9 -> 0x31 (PWRBTN_STS enabled
# in PM1_EN), i8042 pin 1 -> 0x32 (a self-test at boot: "write keyboard output buffer" raises IRQ 1).
# The LAPIC timer is never armed and the idle loop is `sti; hlt`, so the guest only moves when an
# interrupt arrives. It never reads LSR or PM1_STS outside a handler; the polled paths count their
# reads in `polls`, which this mode's counters line therefore reports as 0.
TINY_IRQ_ASM = r"""
    .set IOAPIC, 0xfec00000
    .set PM1_EN, 0x602
    .set IER_RDA, 0x01
    .set IER_THRE, 0x02
    .set SERIAL_VECTOR, 0x30
    .set SCI_VECTOR, 0x31
    .set KBD_VECTOR, 0x32

    .text
    .code64
irq_mode_init:                  /* called by start64 with interrupts off */
    mov 0x228(%r15), %esi       /* the command line: is "tiny.irq" in it? */
1:  lea irq_flag(%rip), %rdi
    mov %rsi, %rdx
2:  mov (%rdi), %al
    test %al, %al
    jz 4f
    cmp (%rdx), %al
    jne 3f
    inc %rdi
    inc %rdx
    jmp 2b
3:  cmpb $0, (%rsi)
    je 9f
    inc %rsi
    jmp 1b
4:  lea idt(%rip), %rdi
    lea serial_isr(%rip), %rax
    mov $SERIAL_VECTOR, %ecx
    call set_gate
    lea sci_isr(%rip), %rax
    mov $SCI_VECTOR, %ecx
    call set_gate
    lea kbd_isr(%rip), %rax
    mov $KBD_VECTOR, %ecx
    call set_gate
    mov $4, %ecx
    mov $SERIAL_VECTOR, %eax
    call ioapic_route
    mov $9, %ecx
    mov $SCI_VECTOR, %eax
    call ioapic_route
    mov $1, %ecx
    mov $KBD_VECTOR, %eax
    call ioapic_route
    mov $COM1+4, %dx            /* MCR: DTR, RTS, OUT2 (OUT2 gates the UART's IRQ line) */
    mov $0x0b, %al
    out %al, %dx
    mov $IER_RDA, %al           /* IER: receive data; transmit-empty is on while bytes are queued */
    xor %ah, %ah
    call ier_update
    mov $PM1_EN, %dx            /* the power button raises the SCI */
    mov $0x100, %ax
    out %ax, %dx
    movb $1, irq_mode(%rip)
    mov $0xd2, %al              /* i8042 "write keyboard output buffer": IRQ 1 once the byte is there */
    out %al, $0x64
    mov $0x5a, %al
    out %al, $0x60
5:  cli                         /* wait for it: nothing but that interrupt can end this loop */
    cmpl $0, kbd_irqs(%rip)
    jne 6f
    sti
    hlt
    jmp 5b
6:  sti
9:  ret

ioapic_route:                   /* pin ecx -> vector eax: fixed, edge, active high, physical APIC 0 */
    push %rbx
    push %rdx
    mov $IOAPIC, %ebx
    lea 0x11(,%rcx,2), %edx     /* redirection entry, high half: destination */
    mov %edx, (%rbx)
    movl $0, 0x10(%rbx)
    dec %edx                    /* low half: vector, unmasked */
    mov %edx, (%rbx)
    mov %eax, 0x10(%rbx)
    pop %rdx
    pop %rbx
    ret

irq_main_loop:                  /* sleep until a handler queued a byte or saw the power button */
    cli
    movzbl rx_tail(%rip), %ebx
    cmp rx_head(%rip), %bl
    jne 1f
    cmpb $0, pwrbtn_seen(%rip)
    jne 2f
    sti
    hlt                         /* sti's shadow: no interrupt is lost between the checks and hlt */
    jmp irq_main_loop
1:  lea rx_ring(%rip), %rsi
    mov (%rsi,%rbx), %al
    inc %bl
    mov %bl, rx_tail(%rip)
    cmpb $0, rx_stalled(%rip)   /* the handler stopped taking bytes while the ring was full */
    je 3f
    movb $0, rx_stalled(%rip)
    push %rax
    mov $IER_RDA, %al           /* there is room again: the UART's FIFO kept the rest */
    xor %ah, %ah
    call ier_update
    pop %rax
3:  sti
    jmp dispatch
2:  sti
    call print_counts
    jmp powerbutton

/* IER = (IER | al) & ~ah, under ier_lock with interrupts off: the BSP's handler, the BSP's main loop
   and the APs' putc_irq all change it, and none may undo another's bit. */
ier_update:
    push %rax
    push %rcx
    push %rdx
    pushfq
    cli
    mov %eax, %ecx
1:  mov $1, %al
    xchg %al, ier_lock(%rip)
    test %al, %al
    jnz 1b
    mov ier_shadow(%rip), %al
    or %cl, %al
    not %ch
    and %ch, %al
    mov %al, ier_shadow(%rip)
    mov $COM1+1, %dx
    out %al, %dx
    movb $0, ier_lock(%rip)
    popfq
    pop %rdx
    pop %rcx
    pop %rax
    ret

putc_irq:                       /* al -> the transmit ring; the THRE handler sends it */
    push %rax
    push %rbx
    push %rdx
    push %rsi
    movzbl tx_head(%rip), %ebx
1:  lea 1(%rbx), %edx
    cmp tx_tail(%rip), %dl
    je 1b                       /* full: the handler (on the BSP, interrupts on) drains it */
    lea tx_ring(%rip), %rsi
    mov %al, (%rsi,%rbx)
    mov %dl, tx_head(%rip)      /* publish, then make sure THRE is on (ier_update's xchg orders them) */
    mov $IER_THRE, %al
    xor %ah, %ah
    call ier_update             /* THRE off -> on raises the interrupt; already on: the handler is due */
    pop %rsi
    pop %rdx
    pop %rbx
    pop %rax
    ret

tx_drain:                       /* interrupt mode: wait until the handler sent every queued byte */
    cmpb $0, irq_mode(%rip)
    je 3f
    push %rax
1:  cli
    movzbl tx_tail(%rip), %eax
    cmp tx_head(%rip), %al
    je 2f
    sti
    hlt
    jmp 1b
2:  sti
    pop %rax
3:  ret

serial_isr:
    push %rax
    push %rbx
    push %rdx
    push %rsi
    incl serial_irqs(%rip)
1:  mov $COM1+2, %dx            /* IIR: what does the UART want? */
    in %dx, %al
    test $1, %al
    jnz 9f                      /* nothing (more) pending */
    and $0x0e, %al
    cmp $0x04, %al
    je 2f
    cmp $0x02, %al
    je 3f
    jmp 9f
2:  movzbl rx_head(%rip), %ebx  /* received data: take it if the ring has room */
    lea 1(%rbx), %eax
    cmp rx_tail(%rip), %al
    jne 5f
    movb $1, rx_stalled(%rip)   /* full: stop receive interrupts; the FIFO holds the rest */
    xor %eax, %eax
    mov $IER_RDA, %ah
    call ier_update
    jmp 1b
5:  mov $COM1, %dx
    in %dx, %al
    incl rx_bytes(%rip)
    lea rx_ring(%rip), %rsi
    mov %al, (%rsi,%rbx)
    inc %bl
    mov %bl, rx_head(%rip)
    jmp 1b
3:  movzbl tx_tail(%rip), %ebx  /* transmitter empty: send the next queued byte */
    cmp tx_head(%rip), %bl
    je 4f
    lea tx_ring(%rip), %rsi
    mov (%rsi,%rbx), %al
    inc %bl
    mov %bl, tx_tail(%rip)
    mov $COM1, %dx
    out %al, %dx
    incl tx_bytes(%rip)
    jmp 1b
4:  call tx_idle                /* nothing queued: THRE off, unless a producer just queued a byte: */
    jnz 3b                      /* then send it now (the IIR read above consumed THRE's edge) */
    jmp 1b
9:  mov $LAPIC, %eax
    movl $0, 0xb0(%rax)         /* EOI */
    pop %rsi
    pop %rdx
    pop %rbx
    pop %rax
    iretq

tx_idle:                        /* under ier_lock: the ring still empty -> THRE off, ZF=1; else ZF=0 */
    push %rax
    push %rdx
1:  mov $1, %al
    xchg %al, ier_lock(%rip)
    test %al, %al
    jnz 1b
    movzbl tx_tail(%rip), %eax
    cmp tx_head(%rip), %al
    jne 2f                      /* a byte was queued since the handler looked */
    mov ier_shadow(%rip), %al
    and $~IER_THRE, %al
    mov %al, ier_shadow(%rip)
    mov $COM1+1, %dx
    out %al, %dx
    xor %eax, %eax              /* ZF=1 (mov and pop below keep the flags) */
2:  movb $0, ier_lock(%rip)
    pop %rdx
    pop %rax
    ret

sci_isr:
    push %rax
    push %rdx
    incl sci_irqs(%rip)
    mov $PM1_STS, %dx
    in %dx, %ax
    test $0x100, %ax
    jz 1f
    mov $0x100, %ax             /* write 1 to clear PWRBTN_STS: the SCI drops */
    out %ax, %dx
    movb $1, pwrbtn_seen(%rip)
1:  mov $LAPIC, %eax
    movl $0, 0xb0(%rax)
    pop %rdx
    pop %rax
    iretq

kbd_isr:
    push %rax
    incl kbd_irqs(%rip)
    in $0x60, %al               /* reading the output buffer drops IRQ 1 */
    mov $LAPIC, %eax
    movl $0, 0xb0(%rax)
    pop %rax
    iretq

counts_command:
    call print_counts
    jmp main_loop

/* "TINY-IRQ-COUNTS mode=irq|polled tx=N rx=N serial=N sci=N kbd=N timer=N polls=N": a snapshot taken
   once every byte printed before it has been sent, so tx is the number of bytes before this line. */
print_counts:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    call lock_print
    call tx_drain
    pushfq
    cli
    lea counters(%rip), %rsi
    lea snapshot(%rip), %rdi
    mov $NCOUNTERS, %ecx
    rep movsl
    popfq
    lea counts_msg(%rip), %rsi
    call puts
    lea mode_polled(%rip), %rsi
    cmpb $0, irq_mode(%rip)
    je 1f
    lea mode_irq(%rip), %rsi
1:  call puts
    lea counter_names(%rip), %rsi
    lea snapshot(%rip), %rdi
    mov $NCOUNTERS, %ecx
2:  call puts                   /* " name=" (puts leaves rsi after its NUL: the next name) */
    mov (%rdi), %ebx
    push %rsi
    push %rcx
    call putdec
    pop %rcx
    pop %rsi
    add $4, %rdi
    dec %ecx
    jnz 2b
    mov $'\n', %al
    call putc
    movb $0, print_lock(%rip)
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    ret

putdec:                         /* ebx in decimal */
    mov %ebx, %eax
    lea decimal_end(%rip), %rsi
    mov $10, %ecx
1:  xor %edx, %edx
    div %ecx
    add $'0', %dl
    dec %rsi
    mov %dl, (%rsi)
    test %eax, %eax
    jnz 1b
    jmp puts

    .data
irq_flag:       .asciz "tiny.irq"
counts_msg:     .asciz "TINY-IRQ-COUNTS mode="
mode_irq:       .asciz "irq"
mode_polled:    .asciz "polled"
counter_names:  .asciz " tx="
                .asciz " rx="
                .asciz " serial="
                .asciz " sci="
                .asciz " kbd="
                .asciz " timer="
                .asciz " polls="
    .set NCOUNTERS, 7
    .p2align 2
counters:                       /* in .data, not .bss: a guest reset reloads them with the image */
tx_bytes:       .long 0         /* sent by the THRE handler */
rx_bytes:       .long 0         /* received by the receive-data handler */
serial_irqs:    .long 0
sci_irqs:       .long 0
kbd_irqs:       .long 0
timer_irqs:     .long 0
polls:          .long 0         /* LSR / PM1_STS reads outside a handler (the polled mode's loops) */
snapshot:       .skip 4 * NCOUNTERS
decimal:        .skip 10
decimal_end:    .byte 0
irq_mode:       .byte 0
pwrbtn_seen:    .byte 0
ier_shadow:     .byte 0         /* what IER holds; changed only by ier_update / tx_idle */
ier_lock:       .byte 0
rx_stalled:     .byte 0
tx_head:        .byte 0
tx_tail:        .byte 0
rx_head:        .byte 0
rx_tail:        .byte 0

    .bss
    .p2align 8
tx_ring:        .skip 256
rx_ring:        .skip 256
"""

# PCI enumeration ('d'): every slot of bus 0 through configuration mechanism #1 (0xCF8/0xCFC), and the
# same id through ECAM (MMIO at the MCFG base), as ``TINY-PCI <slot> <id> ecam <id> class <class/rev>``,
# then ``TINY-PCI-DONE <count>`` (ids are dwords: device << 16 | vendor). Also the configuration-space
# accessors the virtio drivers share (``vpci_read32``, ``vpci_write16``).
TINY_PCI_ASM = r"""
    .set PCI_ADDR, 0xcf8
    .set PCI_DATA, 0xcfc
    .set ECAM, {ecam}

    .text
    .code64
pci_scan:
    call lock_print
    xor %r12d, %r12d            /* slot */
    xor %r13d, %r13d            /* functions found */
1:  mov %r12d, %eax
    shl $11, %eax
    or $0x80000000, %eax
    mov $PCI_ADDR, %dx
    out %eax, %dx
    mov $PCI_DATA, %dx
    in %dx, %eax
    cmp $0xffffffff, %eax
    je 2f
    mov %eax, %r14d
    inc %r13d
    lea pci_msg(%rip), %rsi
    call puts
    mov %r12d, %ebx
    call puthex32
    lea pci_id_msg(%rip), %rsi
    call puts
    mov %r14d, %ebx
    call puthex32
    lea pci_ecam_msg(%rip), %rsi
    call puts
    mov %r12d, %eax
    shl $15, %eax
    mov $ECAM, %esi             /* zero-extended: an imm32 add would sign-extend it */
    add %rsi, %rax
    mov (%rax), %ebx
    call puthex32
    lea pci_class_msg(%rip), %rsi
    call puts
    mov %r12d, %eax
    shl $11, %eax
    or $0x80000008, %eax
    mov $PCI_ADDR, %dx
    out %eax, %dx
    mov $PCI_DATA, %dx
    in %dx, %eax
    mov %eax, %ebx
    call puthex32
    mov $'\n', %al
    call putc
2:  inc %r12d
    cmp $32, %r12d
    jb 1b
    lea pci_done_msg(%rip), %rsi
    call puts
    mov %r13d, %ebx
    call puthex32
    mov $'\n', %al
    call putc
    movb $0, print_lock(%rip)
    jmp main_loop

/* configuration mechanism #1 for the virtio drivers below */
vpci_read32:                    /* eax = the function's 0xCF8 address, ecx = register -> eax */
    or %ecx, %eax
    mov $0xcf8, %dx
    out %eax, %dx
    mov $0xcfc, %dx
    in %dx, %eax
    ret

vpci_write16:                   /* eax = the function's 0xCF8 address, ecx = register (2-byte aligned), r9w = value */
    mov %ecx, %edx
    and $~3, %edx
    or %edx, %eax
    mov $0xcf8, %dx
    out %eax, %dx
    mov $0xcfc, %edx
    and $3, %ecx
    add %ecx, %edx
    mov %r9d, %eax
    out %ax, %dx
    ret

    .data
pci_msg:       .asciz "TINY-PCI "
pci_id_msg:    .asciz " "
pci_ecam_msg:  .asciz " ecam "
pci_class_msg: .asciz " class "
pci_done_msg:  .asciz "TINY-PCI-DONE "
"""

# virtio-rng ('v'): a minimal modern virtio-pci driver. The first press finds 1af4:1044 on bus 0 through
# 0xCF8/0xCFC, reads BAR 0 (64-bit, above RAM: it maps that 2 MiB page itself, uncached), walks the
# capability list for the common and notify configuration and the MSI-X table, negotiates VERSION_1,
# routes MSI-X vector 0 to APIC 0 vector 0x33, enables MSI-X and bus mastering, and sets up queue 0
# (8 entries, vector 0). Every press then makes TINY_VIRTIO_ROUNDS requests: one writable 64-byte
# buffer made available, the doorbell written (a 16-bit store of the queue index), then `sti; hlt`
# until the MSI-X handler counted the interrupt; the used element's length is added to the byte count
# and the buffer's dwords to the checksum. It prints the totals since boot:
# ``TINY-VIRTIO bytes=<hex> irqs=<hex> sum=<hex> kicks=<hex>``, or ``TINY-VIRTIO-FAIL <code>``
# (1 no device, 2 FEATURES_OK refused, 3 vector refused, 4 used ring behind).
TINY_VIRTIO_ASM = r"""
    .set VIRTIO_VECTOR, 0x33
    .set VQ_SIZE, 8
    .set VIRTIO_ROUNDS, {rounds}
    .set VIRTIO_BUF, {buffer}

    .text
    .code64
virtio_rng:
    pushfq                      /* polled mode runs with interrupts off, interrupt mode with them on */
    call lock_print
    cmpb $0, vio_ready(%rip)
    jne 5f
    call virtio_setup
    test %eax, %eax
    jnz 8f
5:  xor %r12d, %r12d
6:  call virtio_round
    test %eax, %eax
    jnz 8f
    inc %r12d
    cmp $VIRTIO_ROUNDS, %r12d
    jb 6b
    lea vio_msg(%rip), %rsi
    call puts
    mov vio_bytes(%rip), %ebx
    call puthex32
    lea vio_irqs_msg(%rip), %rsi
    call puts
    mov vio_irqs(%rip), %ebx
    call puthex32
    lea vio_sum_msg(%rip), %rsi
    call puts
    mov vio_sum(%rip), %ebx
    call puthex32
    lea vio_kicks_msg(%rip), %rsi
    call puts
    mov vio_kicks(%rip), %ebx
    call puthex32
    jmp 9f
8:  mov %eax, %ebx
    lea vio_fail_msg(%rip), %rsi
    call puts
    call puthex32
9:  mov $'\n', %al
    call putc
    movb $0, print_lock(%rip)
    popfq
    jmp main_loop

vio_cfg_read32:                 /* ecx = register of the device's config space -> eax */
    mov vio_cfg(%rip), %eax
    jmp vpci_read32

vio_cfg_write16:                /* ecx = register (2-byte aligned), r9w = value */
    mov vio_cfg(%rip), %eax
    jmp vpci_write16

virtio_setup:
    mov $1, %r12d
1:  mov %r12d, %eax
    shl $11, %eax
    or $0x80000000, %eax
    mov %eax, vio_cfg(%rip)
    xor %ecx, %ecx
    call vio_cfg_read32
    cmp $0x10441af4, %eax
    je 2f
    inc %r12d
    cmp $32, %r12d
    jb 1b
    mov $1, %eax
    ret
2:  mov $0x10, %ecx             /* BAR 0, 64-bit */
    call vio_cfg_read32
    and $0xfffffff0, %eax
    mov %eax, %ebx
    mov $0x14, %ecx
    call vio_cfg_read32
    shl $32, %rax
    or %rbx, %rax
    mov %rax, vio_bar(%rip)
    call vio_map
    mov $0x34, %ecx             /* the capability list */
    call vio_cfg_read32
    movzbl %al, %r13d
3:  test %r13d, %r13d
    jz 4f
    mov %r13d, %ecx
    call vio_cfg_read32         /* id, next, then (vendor capability) cap_len, cfg_type */
    mov %eax, %r14d
    cmp $0x11, %al
    jne 31f
    mov %r13d, vio_msix_cap(%rip)
    lea 4(%r13), %ecx
    call vio_cfg_read32
    and $~7, %eax               /* table offset; BIR 0 */
    mov %eax, vio_msix_table(%rip)
    jmp 39f
31: cmp $0x09, %al
    jne 39f
    mov %r14d, %r8d
    shr $24, %r8d               /* cfg_type */
    lea 8(%r13), %ecx
    call vio_cfg_read32
    cmp $1, %r8d
    jne 32f
    mov %eax, vio_common(%rip)
    jmp 39f
32: cmp $2, %r8d
    jne 39f
    mov %eax, vio_notify(%rip)
    lea 16(%r13), %ecx
    call vio_cfg_read32
    mov %eax, vio_notify_mult(%rip)
39: mov %r14d, %eax
    shr $8, %eax
    movzbl %al, %r13d
    jmp 3b
4:  lea idt(%rip), %rdi
    lea virtio_isr(%rip), %rax
    mov $VIRTIO_VECTOR, %ecx
    call set_gate
    mov vio_bar(%rip), %rbx
    mov vio_common(%rip), %eax
    add %rax, %rbx              /* rbx = common configuration */
    movb $0, 20(%rbx)           /* device_status: reset, ACKNOWLEDGE, DRIVER */
    movb $1, 20(%rbx)
    movb $3, 20(%rbx)
    movl $1, 8(%rbx)            /* driver_feature_select 1: VIRTIO_F_VERSION_1 (bit 32) */
    movl $1, 12(%rbx)
    movl $0, 8(%rbx)
    movl $0, 12(%rbx)
    movb $0xb, 20(%rbx)         /* FEATURES_OK, read back */
    movzbl 20(%rbx), %eax
    test $8, %al
    jnz 5f
    mov $2, %eax
    ret
5:  mov vio_bar(%rip), %rdi     /* MSI-X table entry 0: APIC 0, vector 0x33, unmasked */
    mov vio_msix_table(%rip), %eax
    add %rax, %rdi
    movl $0xfee00000, (%rdi)
    movl $0, 4(%rdi)
    movl $VIRTIO_VECTOR, 8(%rdi)
    movl $0, 12(%rdi)
    mov vio_msix_cap(%rip), %ecx
    add $2, %ecx
    mov $0x8000, %r9d           /* MSI-X enable */
    call vio_cfg_write16
    mov $4, %ecx
    mov $6, %r9d                /* COMMAND: memory space, bus master */
    call vio_cfg_write16
    lea vq_buf(%rip), %rax      /* descriptor 0: the one buffer, device-writable */
    mov %rax, vq_desc(%rip)
    movl $VIRTIO_BUF, vq_desc+8(%rip)
    movw $2, vq_desc+12(%rip)
    movw $0, 22(%rbx)           /* queue_select 0 */
    movw $VQ_SIZE, 24(%rbx)
    movw $0, 26(%rbx)           /* queue_msix_vector 0, read back */
    movzwl 26(%rbx), %eax
    test %eax, %eax
    jz 6f
    mov $3, %eax
    ret
6:  lea vq_desc(%rip), %rax
    mov %rax, 32(%rbx)
    lea vq_avail(%rip), %rax
    mov %rax, 40(%rbx)
    lea vq_used(%rip), %rax
    mov %rax, 48(%rbx)
    movw $1, 28(%rbx)           /* queue_enable */
    movzwl 30(%rbx), %eax       /* queue_notify_off * multiplier + the notify offset */
    imul vio_notify_mult(%rip), %eax
    add vio_notify(%rip), %eax
    add vio_bar(%rip), %rax
    mov %rax, vio_doorbell(%rip)
    movb $0xf, 20(%rbx)         /* DRIVER_OK */
    movb $1, vio_ready(%rip)
    xor %eax, %eax
    ret

vio_map:                        /* rax = BAR: map its 2 MiB page (uncached) when above the VMM's 4 GiB map */
    mov %rax, %rcx
    shr $30, %rcx               /* PDPT index */
    cmp $4, %rcx
    jb 1f
    mov %rax, %rdx
    shr $21, %rdx
    and $511, %edx
    and $~0x1fffff, %rax
    or $0x9b, %rax              /* present, writable, PWT, PCD, 2 MiB */
    lea vio_pd(%rip), %rdi
    mov %rax, (%rdi,%rdx,8)
    or $3, %rdi
    mov %rdi, 0xa000(,%rcx,8)
    mov %cr3, %rax
    mov %rax, %cr3
1:  ret

virtio_round:                   /* one request: make the buffer available, kick, sleep until the MSI-X */
    movzwl vq_avail+2(%rip), %eax
    mov %eax, %ecx
    and $(VQ_SIZE - 1), %ecx
    lea vq_avail+4(%rip), %rdi
    movw $0, (%rdi,%rcx,2)
    mov vio_irqs(%rip), %r13d
    inc %eax
    mov %ax, vq_avail+2(%rip)
    mov vio_doorbell(%rip), %rdi
    movw $0, (%rdi)             /* the doorbell: an MSHV_IOEVENTFD, no exit */
    incl vio_kicks(%rip)
1:  cli
    cmp vio_irqs(%rip), %r13d
    jne 2f
    sti
    hlt
    jmp 1b
2:  sti
    movzwl vq_used+2(%rip), %eax
    cmp vq_avail+2(%rip), %ax
    je 3f
    mov $4, %eax
    ret
3:  dec %eax
    and $(VQ_SIZE - 1), %eax
    lea vq_used+4(%rip), %rdi
    mov 4(%rdi,%rax,8), %eax    /* the used element's length */
    add %eax, vio_bytes(%rip)
    lea vq_buf(%rip), %rsi
    mov $(VIRTIO_BUF / 4), %ecx
4:  lodsl
    add %eax, vio_sum(%rip)
    dec %ecx
    jnz 4b
    xor %eax, %eax
    ret

virtio_isr:
    lock incl vio_irqs(%rip)
    push %rax
    mov $LAPIC, %eax
    movl $0, 0xb0(%rax)         /* EOI */
    pop %rax
    iretq

    .data
vio_msg:       .asciz "TINY-VIRTIO bytes="
vio_irqs_msg:  .asciz " irqs="
vio_sum_msg:   .asciz " sum="
vio_kicks_msg: .asciz " kicks="
vio_fail_msg:  .asciz "TINY-VIRTIO-FAIL "
    .p2align 3
vio_bar:       .quad 0
vio_doorbell:  .quad 0
vio_cfg:       .long 0
vio_common:    .long 0
vio_notify:    .long 0
vio_notify_mult: .long 0
vio_msix_cap:  .long 0
vio_msix_table: .long 0
vio_irqs:      .long 0
vio_bytes:     .long 0
vio_sum:       .long 0
vio_kicks:     .long 0
vio_ready:     .byte 0

    .bss
    .p2align 12
vio_pd:        .skip 4096
vq_desc:       .skip 16 * VQ_SIZE
    .p2align 2
vq_avail:      .skip 4 + 2 * VQ_SIZE + 2
    .p2align 2
vq_used:       .skip 4 + 8 * VQ_SIZE + 2
    .p2align 4
vq_buf:        .skip VIRTIO_BUF
"""

# CMOS RTC ('g'): as Linux's mc146818_get_time does, wait for UIP to clear, read the fields, and read
# again if the seconds changed meanwhile; print them raw (in the format register B says, BCD by
# default, so the hex digits are the decimal ones) as
# ``TINY-RTC <century><year>-<month>-<day> <hours>:<minutes>:<seconds> b=<register B>``. In tiny.irq mode
# it then routes IOAPIC pin 8 to a handler, enables the update-ended interrupt (UIE), sleeps until two
# have arrived, disables it and prints ``TINY-RTC-UIE <count, 8 hex digits>``.
TINY_RTC_ASM = r"""
    .set CMOS_INDEX, 0x70
    .set CMOS_DATA, 0x71
    .set RTC_VECTOR, 0x34              /* 0x30-0x33: serial, SCI, i8042, virtio-rng */

    .text
    .code64
rtc_read:
    call lock_print
1:  mov $0x0a, %al
    call cmos_get
    test $0x80, %al             /* update in progress: the fields may be mid-change */
    jnz 1b
    xor %ecx, %ecx
    lea rtc_regs(%rip), %rsi
    lea rtc_vals(%rip), %rdi
2:  mov (%rsi,%rcx), %al
    call cmos_get
    mov %al, (%rdi,%rcx)
    inc %ecx
    cmp $8, %ecx
    jb 2b
    mov rtc_vals(%rip), %al
    cmp rtc_vals+7(%rip), %al   /* the seconds changed: a second boundary passed, read it all again */
    jne 1b
    lea rtc_msg(%rip), %rsi
    call puts
    mov $1, %r12d
3:  lea rtc_vals(%rip), %rdi
    movzbl (%rdi,%r12), %ebx
    call puthex8
    lea rtc_seps(%rip), %rsi
    mov (%rsi,%r12), %al
    test %al, %al
    jz 4f
    call putc
4:  inc %r12d
    cmp $8, %r12d
    jb 3b
    lea rtc_b_msg(%rip), %rsi
    call puts
    mov $0x0b, %al
    call cmos_get
    movzbl %al, %ebx
    call puthex8
    mov $'\n', %al
    call putc
    cmpb $0, irq_mode(%rip)
    je 9f
    /* tiny.irq: take two update-ended interrupts through IOAPIC pin 8, then report them */
    lea idt(%rip), %rdi
    lea rtc_isr(%rip), %rax
    mov $RTC_VECTOR, %ecx
    call set_gate
    mov $8, %ecx
    mov $RTC_VECTOR, %eax
    call ioapic_route
    movb $0, print_lock(%rip)
    cli                         /* the handler selects register C: no CMOS access may interleave */
    movl $0, rtc_irqs(%rip)
    mov $0x0c, %al              /* drop flags set before now */
    call cmos_get
    mov $0x0b, %al
    mov $0x12, %ah              /* UIE, 24 hour, BCD */
    call cmos_put
5:  cmpl $2, rtc_irqs(%rip)
    jae 6f
    sti
    hlt
    cli
    jmp 5b
6:  mov $0x0b, %al
    mov $0x02, %ah
    call cmos_put
    sti
    call lock_print
    lea rtc_irq_msg(%rip), %rsi
    call puts
    mov rtc_irqs(%rip), %ebx
    call puthex32
    mov $'\n', %al
    call putc
9:  movb $0, print_lock(%rip)
    jmp main_loop

rtc_isr:
    push %rax
    push %rdx
    lock incl rtc_irqs(%rip)
    mov $0x0c, %al              /* reading register C clears IRQF: IRQ 8 drops until the next update */
    call cmos_get
    mov $LAPIC, %eax
    movl $0, 0xb0(%rax)
    pop %rdx
    pop %rax
    iretq

cmos_put:                       /* register al = ah */
    mov $CMOS_INDEX, %dx
    out %al, %dx
    mov %ah, %al
    mov $CMOS_DATA, %dx
    out %al, %dx
    ret

cmos_get:                       /* al = register -> al = its value; NMIs stay enabled (bit 7 clear) */
    mov $CMOS_INDEX, %dx
    out %al, %dx
    mov $CMOS_DATA, %dx
    in %dx, %al
    ret

puthex8:                        /* bl as 2 hex digits */
    push %rcx
    shl $24, %ebx
    mov $2, %ecx
1:  rol $4, %ebx
    mov %bl, %al
    and $0xf, %al
    add $'0', %al
    cmp $'9', %al
    jbe 2f
    add $('a' - '9' - 1), %al
2:  push %rcx
    call putc
    pop %rcx
    dec %ecx
    jnz 1b
    pop %rcx
    ret

    .data
/* the seconds, then century, year, month, day, hours, minutes and the seconds again (compared) */
rtc_regs:  .byte 0x00, 0x32, 0x09, 0x08, 0x07, 0x04, 0x02, 0x00
rtc_seps:  .byte 0, 0, '-', '-', ' ', ':', ':', 0
rtc_msg:   .asciz "TINY-RTC "
rtc_b_msg: .asciz " b="
rtc_irq_msg: .asciz "TINY-RTC-UIE "
    .bss
rtc_vals:  .skip 8
    .p2align 2
rtc_irqs:  .skip 4
"""

# virtio-blk ('j'): the same minimal modern virtio-pci driver for 1af4:1042 (vector 0 -> 0x35, queue 0 of
# 8 entries, VERSION_1 and FLUSH negotiated). Press p (from 1) fills a TINY_BLK_BYTES buffer with dwords
# seed + (k + 1) * 0x9e3779b9 (seed = p * 0x01000193), writes it at sector TINY_BLK_SECTOR, flushes, reads
# the sectors back into a zeroed buffer and sums its dwords; then reads them TINY_BLK_TIMED_READS more times,
# one at a time, timed on the ACPI PM timer (its only clock: ``tiny_blk_rate``). Each request is a chain
# (header, data, status; a flush has no data) made available, kicked on the doorbell and waited for in
# `sti; hlt` until the used ring caught up (the interrupt comes from the backend's call eventfd, an irqfd).
# It prints ``TINY-BLK press=<hex> capacity=<hex> sum=<hex> irqs=<hex> reads=<hex> ticks=<hex>`` or
# ``TINY-BLK-FAIL <code>``
# (1 no device, 2 FEATURES_OK refused, 3 vector refused, 4 used ring ahead, 0x10 + status: request failed).
TINY_BLK_ASM = r"""
    .set BLK_VECTOR, 0x35              /* 0x30-0x34: serial, SCI, i8042, virtio-rng, RTC */
    .set BQ_SIZE, 8
    .set BLK_SECTOR, {sector}
    .set BLK_BYTES, {nbytes}
    .set BLK_TIMED_READS, {timed_reads}
    .set PM_TMR, 0x608

    .text
    .code64
virtio_blk:
    pushfq
    call lock_print
    cmpb $0, blk_ready(%rip)
    jne 5f
    call blk_setup
    test %eax, %eax
    jnz 8f
5:  call blk_fill
    mov blk_bar(%rip), %rbx     /* capacity read again at each press: a resize (blockresize) shows */
    mov blk_devcfg(%rip), %eax
    mov (%rbx,%rax), %eax
    mov %eax, blk_capacity(%rip)
    mov $1, %edi                /* VIRTIO_BLK_T_OUT: the data descriptor is device-readable */
    lea blk_wbuf(%rip), %rsi
    xor %edx, %edx
    call blk_request
    test %eax, %eax
    jnz 8f
    mov $4, %edi                /* VIRTIO_BLK_T_FLUSH: no data */
    xor %esi, %esi
    call blk_request
    test %eax, %eax
    jnz 8f
    xor %edi, %edi              /* VIRTIO_BLK_T_IN: device-writable */
    lea blk_rbuf(%rip), %rsi
    mov $2, %edx
    call blk_request
    test %eax, %eax
    jnz 8f
    lea blk_rbuf(%rip), %rsi
    mov $(BLK_BYTES / 4), %ecx
    xor %ebx, %ebx
4:  lodsl
    add %eax, %ebx
    dec %ecx
    jnz 4b
    mov %ebx, blk_sum(%rip)
    mov $PM_TMR, %dx            /* then BLK_TIMED_READS more reads of the same sectors, timed */
    in %dx, %eax
    mov %eax, %r13d
    xor %r12d, %r12d
6:  xor %edi, %edi
    lea blk_rbuf(%rip), %rsi
    mov $2, %edx
    call blk_request
    test %eax, %eax
    jnz 8f
    inc %r12d
    cmp $BLK_TIMED_READS, %r12d
    jb 6b
    mov $PM_TMR, %dx
    in %dx, %eax
    sub %r13d, %eax             /* 32-bit counter: the difference is right across a wrap */
    mov %eax, blk_ticks(%rip)
    lea blk_msg(%rip), %rsi
    call puts
    mov blk_presses(%rip), %ebx
    call puthex32
    lea blk_cap_msg(%rip), %rsi
    call puts
    mov blk_capacity(%rip), %ebx
    call puthex32
    lea blk_sum_msg(%rip), %rsi
    call puts
    mov blk_sum(%rip), %ebx
    call puthex32
    lea blk_irqs_msg(%rip), %rsi
    call puts
    mov blk_irqs(%rip), %ebx
    call puthex32
    lea blk_reads_msg(%rip), %rsi
    call puts
    mov $BLK_TIMED_READS, %ebx
    call puthex32
    lea blk_ticks_msg(%rip), %rsi
    call puts
    mov blk_ticks(%rip), %ebx
    call puthex32
    jmp 9f
8:  mov %eax, %ebx
    lea blk_fail_msg(%rip), %rsi
    call puts
    call puthex32
9:  mov $'\n', %al
    call putc
    movb $0, print_lock(%rip)
    popfq
    jmp main_loop

blk_cfg_read32:                 /* ecx = register of the device's config space -> eax */
    mov blk_cfg(%rip), %eax
    jmp vpci_read32

blk_cfg_write16:                /* ecx = register (2-byte aligned), r9w = value */
    mov blk_cfg(%rip), %eax
    jmp vpci_write16

blk_setup:
    mov $1, %r12d
1:  mov %r12d, %eax
    shl $11, %eax
    or $0x80000000, %eax
    mov %eax, blk_cfg(%rip)
    xor %ecx, %ecx
    call blk_cfg_read32
    cmp $0x10421af4, %eax
    je 2f
    inc %r12d
    cmp $32, %r12d
    jb 1b
    mov $1, %eax
    ret
2:  mov $0x10, %ecx             /* BAR 0, 64-bit */
    call blk_cfg_read32
    and $0xfffffff0, %eax
    mov %eax, %ebx
    mov $0x14, %ecx
    call blk_cfg_read32
    shl $32, %rax
    or %rbx, %rax
    mov %rax, blk_bar(%rip)
    call vio_map
    mov $0x34, %ecx
    call blk_cfg_read32
    movzbl %al, %r13d
3:  test %r13d, %r13d
    jz 4f
    mov %r13d, %ecx
    call blk_cfg_read32
    mov %eax, %r14d
    cmp $0x11, %al
    jne 31f
    mov %r13d, blk_msix_cap(%rip)
    lea 4(%r13), %ecx
    call blk_cfg_read32
    and $~7, %eax
    mov %eax, blk_msix_table(%rip)
    jmp 39f
31: cmp $0x09, %al
    jne 39f
    mov %r14d, %r8d
    shr $24, %r8d               /* cfg_type */
    lea 8(%r13), %ecx
    call blk_cfg_read32
    cmp $1, %r8d
    jne 32f
    mov %eax, blk_common(%rip)
    jmp 39f
32: cmp $4, %r8d
    jne 33f
    mov %eax, blk_devcfg(%rip)
    jmp 39f
33: cmp $2, %r8d
    jne 39f
    mov %eax, blk_notify(%rip)
    lea 16(%r13), %ecx
    call blk_cfg_read32
    mov %eax, blk_notify_mult(%rip)
39: mov %r14d, %eax
    shr $8, %eax
    movzbl %al, %r13d
    jmp 3b
4:  lea idt(%rip), %rdi
    lea blk_isr(%rip), %rax
    mov $BLK_VECTOR, %ecx
    call set_gate
    mov blk_bar(%rip), %rbx
    mov blk_devcfg(%rip), %eax
    mov (%rbx,%rax), %eax       /* capacity (low 32 bits), from the backend's configuration */
    mov %eax, blk_capacity(%rip)
    mov blk_common(%rip), %eax
    add %rax, %rbx
    movb $0, 20(%rbx)           /* reset, ACKNOWLEDGE, DRIVER */
    movb $1, 20(%rbx)
    movb $3, 20(%rbx)
    movl $1, 8(%rbx)            /* VIRTIO_F_VERSION_1 (bit 32) */
    movl $1, 12(%rbx)
    movl $0, 8(%rbx)
    movl $0x200, 12(%rbx)       /* VIRTIO_BLK_F_FLUSH (bit 9) */
    movb $0xb, 20(%rbx)
    movzbl 20(%rbx), %eax
    test $8, %al
    jnz 5f
    mov $2, %eax
    ret
5:  mov blk_bar(%rip), %rdi     /* MSI-X table entry 0: APIC 0, BLK_VECTOR, unmasked */
    mov blk_msix_table(%rip), %eax
    add %rax, %rdi
    movl $0xfee00000, (%rdi)
    movl $0, 4(%rdi)
    movl $BLK_VECTOR, 8(%rdi)
    movl $0, 12(%rdi)
    mov blk_msix_cap(%rip), %ecx
    add $2, %ecx
    mov $0x8000, %r9d
    call blk_cfg_write16
    mov $4, %ecx
    mov $6, %r9d                /* memory space, bus master */
    call blk_cfg_write16
    movw $0, 22(%rbx)
    movw $BQ_SIZE, 24(%rbx)
    movw $0, 26(%rbx)
    movzwl 26(%rbx), %eax
    test %eax, %eax
    jz 6f
    mov $3, %eax
    ret
6:  lea bq_desc(%rip), %rax
    mov %rax, 32(%rbx)
    lea bq_avail(%rip), %rax
    mov %rax, 40(%rbx)
    lea bq_used(%rip), %rax
    mov %rax, 48(%rbx)
    movw $1, 28(%rbx)
    movzwl 30(%rbx), %eax
    imul blk_notify_mult(%rip), %eax
    add blk_notify(%rip), %eax
    add blk_bar(%rip), %rax
    mov %rax, blk_doorbell(%rip)
    movb $0xf, 20(%rbx)         /* DRIVER_OK: the VMM hands the ring to the backend now */
    movb $1, blk_ready(%rip)
    xor %eax, %eax
    ret

blk_fill:                       /* the press's pattern into blk_wbuf; blk_rbuf zeroed */
    incl blk_presses(%rip)
    mov blk_presses(%rip), %eax
    imul $0x01000193, %eax
    lea blk_wbuf(%rip), %rdi
    mov $(BLK_BYTES / 4), %ecx
1:  add $0x9e3779b9, %eax
    stosl
    dec %ecx
    jnz 1b
    lea blk_rbuf(%rip), %rdi
    mov $(BLK_BYTES / 4), %ecx
    xor %eax, %eax
    rep stosl
    ret

blk_request:                    /* edi = type, rsi = data buffer or 0, edx = its flags -> eax = 0 or failure */
    movl %edi, blk_hdr(%rip)
    movl $0, blk_hdr+4(%rip)
    movq $BLK_SECTOR, blk_hdr+8(%rip)
    movb $0xff, blk_status(%rip)
    lea blk_hdr(%rip), %rax
    mov %rax, bq_desc(%rip)     /* descriptor 0: the header */
    movl $16, bq_desc+8(%rip)
    movw $1, bq_desc+12(%rip)   /* NEXT */
    movw $2, bq_desc+14(%rip)
    test %rsi, %rsi
    jz 1f
    movw $1, bq_desc+14(%rip)
    mov %rsi, bq_desc+16(%rip)  /* descriptor 1: the data */
    movl $BLK_BYTES, bq_desc+24(%rip)
    or $1, %edx
    mov %dx, bq_desc+28(%rip)
    movw $2, bq_desc+30(%rip)
1:  lea blk_status(%rip), %rax
    mov %rax, bq_desc+32(%rip)  /* descriptor 2: the status byte */
    movl $1, bq_desc+40(%rip)
    movw $2, bq_desc+44(%rip)   /* WRITE */
    movw $0, bq_desc+46(%rip)
    movzwl bq_avail+2(%rip), %eax
    mov %eax, %ecx
    and $(BQ_SIZE - 1), %ecx
    lea bq_avail+4(%rip), %rdi
    movw $0, (%rdi,%rcx,2)
    inc %eax
    mov %ax, bq_avail+2(%rip)
    mov blk_doorbell(%rip), %rdi
    movw $0, (%rdi)             /* the doorbell: MSHV_IOEVENTFD straight to the backend's kick */
2:  cli
    movzwl bq_used+2(%rip), %eax
    cmp bq_avail+2(%rip), %ax
    je 3f
    sti
    hlt                         /* woken by the backend's completion (its call eventfd is an irqfd) */
    jmp 2b
3:  sti
    movzbl blk_status(%rip), %eax
    test %eax, %eax
    jz 4f
    add $0x10, %eax
4:  ret

blk_isr:
    lock incl blk_irqs(%rip)
    push %rax
    mov $LAPIC, %eax
    movl $0, 0xb0(%rax)
    pop %rax
    iretq

    .data
blk_msg:       .asciz "TINY-BLK press="
blk_cap_msg:   .asciz " capacity="
blk_sum_msg:   .asciz " sum="
blk_irqs_msg:  .asciz " irqs="
blk_reads_msg: .asciz " reads="
blk_ticks_msg: .asciz " ticks="
blk_fail_msg:  .asciz "TINY-BLK-FAIL "
    .p2align 3
blk_bar:       .quad 0
blk_doorbell:  .quad 0
blk_cfg:       .long 0
blk_common:    .long 0
blk_devcfg:    .long 0
blk_notify:    .long 0
blk_notify_mult: .long 0
blk_msix_cap:  .long 0
blk_msix_table: .long 0
blk_irqs:      .long 0
blk_ticks:     .long 0
blk_sum:       .long 0
blk_presses:   .long 0
blk_capacity:  .long 0
blk_ready:     .byte 0

    .bss
    .p2align 4
bq_desc:       .skip 16 * BQ_SIZE
    .p2align 2
bq_avail:      .skip 4 + 2 * BQ_SIZE + 2
    .p2align 2
bq_used:       .skip 4 + 8 * BQ_SIZE + 2
    .p2align 4
blk_hdr:       .skip 16
blk_status:    .skip 16
    .p2align 12
blk_wbuf:      .skip BLK_BYTES
blk_rbuf:      .skip BLK_BYTES
"""

# virtio-net ('u'): the same minimal modern virtio-pci driver for 1af4:1041 (MSI-X vector 0 -> 0x36 for both
# queues, 8 entries each, VERSION_1 and MAC negotiated: no offloads, so the 12-byte header is all zero).
# Setup posts eight 2 KiB receive buffers. Press p (from 1) first counts what was received meanwhile, then
# sends TINY_NET_FRAMES frames of TINY_NET_FRAME_LEN bytes (``tiny_net_frame``: broadcast from the
# device's MAC, ethertype TINY_NET_ETHERTYPE, "TINY-NET", p and the frame's number, zeros), each kicked on
# the tx doorbell and waited for in `sti; hlt` until the used ring caught up; then it counts received frames
# (each buffer given back at once) until as many more arrived as it sent or TINY_NET_WAIT_TICKS of the ACPI
# PM timer passed. Received frames are hashed byte by byte (h = h * 31 + byte, ``tiny_net_hash``). It
# prints the totals since boot:
# ``TINY-NET press=<hex> tx=<hex> rx=<hex> rxbytes=<hex> sum=<hex> irqs=<hex>`` or ``TINY-NET-FAIL <code>``
# (1 no device, 2 FEATURES_OK refused, 3 vector refused, 4 used ring ahead, 5 'm' after 'u', 6 VQ_PAIRS_SET
# refused). Key m, pressed first, sets the device up for multiqueue instead: CTRL_VQ and MQ negotiated,
# max_virtqueue_pairs read, pair 1 gets rings and eight receive buffers of its own, the rings above become
# pair 2's (queues 2 and 3), the control queue is queue 2N; it sends VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 2 (header,
# data and ack in three descriptors, as Linux) and waits for the ack, then every press (m or u) is the one
# above on pair 2; its line adds `` pairs=<max_virtqueue_pairs> ack=<the ack byte> rx1=<frames pair 1 got>``.
TINY_NET_ASM = r"""
    .set NET_VECTOR, 0x36              /* 0x30-0x35: serial, SCI, i8042, virtio-rng, RTC, virtio-blk */
    .set NQ_SIZE, 8
    .set NET_FRAMES, {frames}
    .set NET_FRAME_LEN, {frame_len}
    .set NET_HDR, 12                   /* virtio_net_hdr with num_buffers (VERSION_1) */
    .set NET_RXBUF, 2048
    .set NET_TXBUF, 128
    .set NET_WAIT, {wait_ticks}
    .set NET_TYPE, {ethertype}
    .set PM_TMR, 0x608

    .text
    .code64
virtio_net_mq:                  /* 'm': the same press on queue pair 2 of a multiqueue device */
    pushfq
    call lock_print
    cmpb $0, net_ready(%rip)
    jne 1f
    movb $1, net_mq(%rip)
    call net_setup
    test %eax, %eax
    jnz net_failed
    call net_pairs_set
    test %eax, %eax
    jnz net_failed
    jmp net_pressed
1:  cmpb $0, net_mq(%rip)
    jne net_pressed
    mov $5, %eax                /* 'u' set the device up with one pair */
    jmp net_failed

virtio_net:
    pushfq
    call lock_print
    cmpb $0, net_ready(%rip)
    jne net_pressed
    call net_setup
    test %eax, %eax
    jnz net_failed
net_pressed:
    incl net_presses(%rip)
    call net_harvest            /* what arrived since the last press */
    mov net_rx(%rip), %eax
    add $NET_FRAMES, %eax
    mov %eax, net_rx_target(%rip)
    xor %r12d, %r12d
6:  mov %r12d, %edi
    call net_send
    test %eax, %eax
    jnz net_failed
    inc %r12d
    cmp $NET_FRAMES, %r12d
    jb 6b
    mov $PM_TMR, %dx
    in %dx, %eax
    mov %eax, %r13d             /* the last PM timer reading */
    xor %r14d, %r14d            /* ticks waited */
7:  call net_harvest
    mov net_rx(%rip), %eax
    cmp net_rx_target(%rip), %eax
    jae 71f
    cmp $NET_WAIT, %r14d
    jae 71f
    call sleep_tick             /* woken by the next receive interrupt or the LAPIC timer */
    mov $PM_TMR, %dx
    in %dx, %eax
    mov %eax, %ecx
    sub %r13d, %ecx             /* 32-bit counter: the difference is right across a wrap */
    add %ecx, %r14d
    mov %eax, %r13d
    jmp 7b
71: sti
    lea net_msg(%rip), %rsi
    call puts
    mov net_presses(%rip), %ebx
    call puthex32
    lea net_tx_msg(%rip), %rsi
    call puts
    mov net_tx(%rip), %ebx
    call puthex32
    lea net_rx_msg(%rip), %rsi
    call puts
    mov net_rx(%rip), %ebx
    call puthex32
    lea net_bytes_msg(%rip), %rsi
    call puts
    mov net_rx_bytes(%rip), %ebx
    call puthex32
    lea net_sum_msg(%rip), %rsi
    call puts
    mov net_rx_sum(%rip), %ebx
    call puthex32
    lea net_irqs_msg(%rip), %rsi
    call puts
    mov net_irqs(%rip), %ebx
    call puthex32
    cmpb $0, net_mq(%rip)
    je 9f
    lea net_pairs_msg(%rip), %rsi
    call puts
    movzwl net_max_pairs(%rip), %ebx
    call puthex32
    lea net_ack_msg(%rip), %rsi
    call puts
    movzbl nq_ctl_cmd+8(%rip), %ebx
    call puthex32
    lea net_rx1_msg(%rip), %rsi
    call puts
    movzwl nq1_rx_used+2(%rip), %ebx   /* what pair 1 received (never given back: 8 at most) */
    call puthex32
    jmp 9f
net_failed:
    mov %eax, %ebx
    lea net_fail_msg(%rip), %rsi
    call puts
    call puthex32
9:  mov $'\n', %al
    call putc
    movb $0, print_lock(%rip)
    popfq
    jmp main_loop

net_setup:
    mov $1, %r12d
1:  mov %r12d, %eax
    shl $11, %eax
    or $0x80000000, %eax
    mov %eax, net_cfg(%rip)
    xor %ecx, %ecx
    call vpci_read32
    cmp $0x10411af4, %eax
    je 2f
    inc %r12d
    cmp $32, %r12d
    jb 1b
    mov $1, %eax
    ret
2:  mov net_cfg(%rip), %eax     /* BAR 0, 64-bit */
    mov $0x10, %ecx
    call vpci_read32
    and $0xfffffff0, %eax
    mov %eax, %ebx
    mov net_cfg(%rip), %eax
    mov $0x14, %ecx
    call vpci_read32
    shl $32, %rax
    or %rbx, %rax
    mov %rax, net_bar(%rip)
    call vio_map
    mov net_cfg(%rip), %eax
    mov $0x34, %ecx
    call vpci_read32
    movzbl %al, %r13d
3:  test %r13d, %r13d
    jz 4f
    mov net_cfg(%rip), %eax
    mov %r13d, %ecx
    call vpci_read32
    mov %eax, %r14d
    cmp $0x11, %al
    jne 31f
    mov %r13d, net_msix_cap(%rip)
    mov net_cfg(%rip), %eax
    lea 4(%r13), %ecx
    call vpci_read32
    and $~7, %eax
    mov %eax, net_msix_table(%rip)
    jmp 39f
31: cmp $0x09, %al
    jne 39f
    mov %r14d, %r8d
    shr $24, %r8d               /* cfg_type */
    mov net_cfg(%rip), %eax
    lea 8(%r13), %ecx
    call vpci_read32
    cmp $1, %r8d
    jne 32f
    mov %eax, net_common(%rip)
    jmp 39f
32: cmp $4, %r8d
    jne 33f
    mov %eax, net_devcfg(%rip)
    jmp 39f
33: cmp $2, %r8d
    jne 39f
    mov %eax, net_notify(%rip)
    mov net_cfg(%rip), %eax
    lea 16(%r13), %ecx
    call vpci_read32
    mov %eax, net_notify_mult(%rip)
39: mov %r14d, %eax
    shr $8, %eax
    movzbl %al, %r13d
    jmp 3b
4:  lea idt(%rip), %rdi
    lea net_isr(%rip), %rax
    mov $NET_VECTOR, %ecx
    call set_gate
    mov net_bar(%rip), %rbx
    mov net_devcfg(%rip), %eax
    mov (%rbx,%rax), %ecx       /* mac[0..3], then mac[4..5] */
    mov %ecx, net_mac(%rip)
    movzwl 4(%rbx,%rax), %ecx
    mov %cx, net_mac+4(%rip)
    movzwl 8(%rbx,%rax), %ecx   /* max_virtqueue_pairs */
    mov %cx, net_max_pairs(%rip)
    mov net_common(%rip), %eax
    add %rax, %rbx              /* rbx = common configuration */
    movb $0, 20(%rbx)           /* reset, ACKNOWLEDGE, DRIVER */
    movb $1, 20(%rbx)
    movb $3, 20(%rbx)
    movl $1, 8(%rbx)            /* VIRTIO_F_VERSION_1 (bit 32) */
    movl $1, 12(%rbx)
    movl $0, 8(%rbx)
    mov $0x20, %eax             /* VIRTIO_NET_F_MAC (bit 5) */
    cmpb $0, net_mq(%rip)
    je 41f
    or $0x420000, %eax          /* and CTRL_VQ (bit 17), MQ (bit 22) */
41: mov %eax, 12(%rbx)
    movb $0xb, 20(%rbx)
    movzbl 20(%rbx), %eax
    test $8, %al
    jnz 5f
    mov $2, %eax
    ret
5:  mov net_bar(%rip), %rdi     /* MSI-X table entry 0: APIC 0, NET_VECTOR, unmasked */
    mov net_msix_table(%rip), %eax
    add %rax, %rdi
    movl $0xfee00000, (%rdi)
    movl $0, 4(%rdi)
    movl $NET_VECTOR, 8(%rdi)
    movl $0, 12(%rdi)
    mov net_cfg(%rip), %eax
    mov net_msix_cap(%rip), %ecx
    add $2, %ecx
    mov $0x8000, %r9d
    call vpci_write16
    mov net_cfg(%rip), %eax
    mov $4, %ecx
    mov $6, %r9d                /* memory space, bus master */
    call vpci_write16
    xor %ecx, %ecx              /* receive buffers: descriptor i is rx buffer i, device-writable, all available */
    lea net_rxbufs(%rip), %rax
    lea nq_rx_desc(%rip), %rdi
    lea nq_rx_avail+4(%rip), %rsi
1:  mov %rax, (%rdi)
    movl $NET_RXBUF, 8(%rdi)
    movw $2, 12(%rdi)
    movw $0, 14(%rdi)
    mov %cx, (%rsi,%rcx,2)
    add $NET_RXBUF, %rax
    add $16, %rdi
    inc %ecx
    cmp $NQ_SIZE, %ecx
    jb 1b
    movw $NQ_SIZE, nq_rx_avail+2(%rip)
    movl $0, net_qbase(%rip)    /* the pair 'u' and 'm' use: queues qbase, qbase + 1 */
    cmpb $0, net_mq(%rip)
    je 2f
    xor %ecx, %ecx              /* pair 1's receive buffers, the same way */
    lea net_rxbufs1(%rip), %rax
    lea nq1_rx_desc(%rip), %rdi
    lea nq1_rx_avail+4(%rip), %rsi
1:  mov %rax, (%rdi)
    movl $NET_RXBUF, 8(%rdi)
    movw $2, 12(%rdi)
    movw $0, 14(%rdi)
    mov %cx, (%rsi,%rcx,2)
    add $NET_RXBUF, %rax
    add $16, %rdi
    inc %ecx
    cmp $NQ_SIZE, %ecx
    jb 1b
    movw $NQ_SIZE, nq1_rx_avail+2(%rip)
    xor %ecx, %ecx              /* queue 0: receiveq1 */
    lea nq1_rx_desc(%rip), %rdi
    lea nq1_rx_avail(%rip), %rsi
    lea nq1_rx_used(%rip), %rdx
    call net_queue
    test %rax, %rax
    jz 7f
    mov %rax, net_rx1_doorbell(%rip)
    mov $1, %ecx                /* queue 1: transmitq1 (unused) */
    lea nq1_tx_desc(%rip), %rdi
    lea nq1_tx_avail(%rip), %rsi
    lea nq1_tx_used(%rip), %rdx
    call net_queue
    test %rax, %rax
    jz 7f
    movzwl net_max_pairs(%rip), %ecx  /* the control queue: 2N with MQ */
    add %ecx, %ecx
    lea nq_ctl_desc(%rip), %rdi
    lea nq_ctl_avail(%rip), %rsi
    lea nq_ctl_used(%rip), %rdx
    call net_queue
    test %rax, %rax
    jz 7f
    mov %rax, net_ctl_doorbell(%rip)
    movl $2, net_qbase(%rip)
2:  mov net_qbase(%rip), %ecx   /* receiveq1, or receiveq2 with MQ */
    lea nq_rx_desc(%rip), %rdi
    lea nq_rx_avail(%rip), %rsi
    lea nq_rx_used(%rip), %rdx
    call net_queue
    test %rax, %rax
    jz 7f
    mov %rax, net_rx_doorbell(%rip)
    mov net_qbase(%rip), %ecx   /* transmitq1, or transmitq2 with MQ */
    inc %ecx
    lea nq_tx_desc(%rip), %rdi
    lea nq_tx_avail(%rip), %rsi
    lea nq_tx_used(%rip), %rdx
    call net_queue
    test %rax, %rax
    jz 7f
    mov %rax, net_tx_doorbell(%rip)
    movb $0xf, 20(%rbx)         /* DRIVER_OK: the VMM's I/O thread takes both rings */
    movb $1, net_ready(%rip)
    mov net_rx_doorbell(%rip), %rdi
    movw $0, (%rdi)             /* the receive buffers are there */
    cmpb $0, net_mq(%rip)
    je 8f
    mov net_rx1_doorbell(%rip), %rdi
    movw $0, (%rdi)
8:  xor %eax, %eax
    ret
7:  mov $3, %eax
    ret

net_pairs_set:                  /* VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 2 on the control queue -> eax = 0 or 6 */
    lea nq_ctl_cmd(%rip), %rax
    movw $0x0004, (%rax)        /* class VIRTIO_NET_CTRL_MQ, command VQ_PAIRS_SET */
    movw $2, 2(%rax)            /* virtqueue_pairs */
    movb $0xff, 8(%rax)         /* the ack the device overwrites */
    lea nq_ctl_desc(%rip), %rdi /* three descriptors, as Linux's virtnet_send_command: header, data, ack */
    mov %rax, (%rdi)
    movl $2, 8(%rdi)
    movw $1, 12(%rdi)           /* NEXT */
    movw $1, 14(%rdi)
    lea 2(%rax), %rdx
    mov %rdx, 16(%rdi)
    movl $2, 24(%rdi)
    movw $1, 28(%rdi)
    movw $2, 30(%rdi)
    lea 8(%rax), %rdx
    mov %rdx, 32(%rdi)
    movl $1, 40(%rdi)
    movw $2, 44(%rdi)           /* WRITE */
    movw $0, 46(%rdi)
    movw $0, nq_ctl_avail+4(%rip)
    movw $1, nq_ctl_avail+2(%rip)
    mov net_ctl_doorbell(%rip), %rdi
    movw $0, (%rdi)
1:  cli
    cmpw $1, nq_ctl_used+2(%rip)
    je 2f
    sti
    hlt                         /* woken by the completion's interrupt */
    jmp 1b
2:  sti
    cmpb $0, nq_ctl_cmd+8(%rip) /* VIRTIO_NET_OK */
    jne 3f
    xor %eax, %eax
    ret
3:  mov $6, %eax
    ret

net_queue:                      /* rbx = common cfg, ecx = queue, rdi/rsi/rdx = its rings -> rax = doorbell or 0 */
    mov %cx, 22(%rbx)
    movw $NQ_SIZE, 24(%rbx)
    movw $0, 26(%rbx)           /* queue_msix_vector 0, read back */
    movzwl 26(%rbx), %eax
    test %eax, %eax
    jz 1f
    xor %eax, %eax
    ret
1:  mov %rdi, 32(%rbx)
    mov %rsi, 40(%rbx)
    mov %rdx, 48(%rbx)
    movw $1, 28(%rbx)
    movzwl 30(%rbx), %eax
    imul net_notify_mult(%rip), %eax
    add net_notify(%rip), %eax
    add net_bar(%rip), %rax
    ret

net_send:                       /* edi = the frame's number in this press -> eax = 0 or failure */
    mov %edi, %r8d
    and $(NQ_SIZE - 1), %r8d    /* one descriptor (and buffer) per tx slot */
    mov %r8d, %eax
    shl $7, %eax                /* NET_TXBUF */
    lea net_txbufs(%rip), %r9
    add %rax, %r9
    push %rdi
    mov %r9, %rdi
    xor %eax, %eax
    mov $((NET_HDR + NET_FRAME_LEN) / 4), %ecx
    rep stosl                   /* header (no offload: all zero) and frame zeroed */
    pop %rdi
    movl $-1, NET_HDR(%r9)      /* destination: broadcast */
    movw $-1, NET_HDR+4(%r9)
    mov net_mac(%rip), %eax     /* source: the device's MAC */
    mov %eax, NET_HDR+6(%r9)
    movzwl net_mac+4(%rip), %eax
    mov %ax, NET_HDR+10(%r9)
    movw $((NET_TYPE & 0xff) << 8 | NET_TYPE >> 8), NET_HDR+12(%r9)  /* big-endian */
    mov net_magic(%rip), %rax
    mov %rax, NET_HDR+14(%r9)
    mov net_presses(%rip), %eax
    mov %eax, NET_HDR+22(%r9)
    mov %edi, NET_HDR+26(%r9)
    mov %r8d, %eax
    shl $4, %eax
    lea nq_tx_desc(%rip), %rsi
    add %rax, %rsi
    mov %r9, (%rsi)
    movl $(NET_HDR + NET_FRAME_LEN), 8(%rsi)
    movl $0, 12(%rsi)           /* flags 0 (device-readable), next 0 */
    movzwl nq_tx_avail+2(%rip), %eax
    mov %eax, %ecx
    and $(NQ_SIZE - 1), %ecx
    lea nq_tx_avail+4(%rip), %rdi
    mov %r8w, (%rdi,%rcx,2)
    inc %eax
    mov %ax, nq_tx_avail+2(%rip)
    mov net_tx_doorbell(%rip), %rdi
    movw $1, (%rdi)             /* the doorbell (MSHV_IOEVENTFD) of queue 1 */
2:  cli
    movzwl nq_tx_used+2(%rip), %eax
    cmp nq_tx_avail+2(%rip), %ax
    je 3f
    sti
    hlt                         /* woken by the I/O thread's completion (an irqfd) */
    jmp 2b
3:  sti
    incl net_tx(%rip)
    xor %eax, %eax
    ret

net_harvest:                    /* count and hash what the device used of the rx ring, give the buffers back */
    xor %r10d, %r10d
1:  movzwl nq_rx_used+2(%rip), %eax
    cmp net_rx_seen(%rip), %ax
    je 5f
    movzwl net_rx_seen(%rip), %ecx
    and $(NQ_SIZE - 1), %ecx
    lea nq_rx_used+4(%rip), %rsi
    mov (%rsi,%rcx,8), %r8d     /* id: the descriptor, and so the buffer */
    and $(NQ_SIZE - 1), %r8d
    mov 4(%rsi,%rcx,8), %r9d    /* length written, header included */
    sub $NET_HDR, %r9d
    cmp $(NET_RXBUF - NET_HDR), %r9d
    jbe 11f
    xor %r9d, %r9d              /* shorter than a header or longer than the buffer: counted, not hashed */
11: incl net_rx(%rip)
    add %r9d, net_rx_bytes(%rip)
    mov %r8d, %eax
    shl $11, %eax               /* NET_RXBUF */
    lea net_rxbufs+NET_HDR(%rip), %rsi
    add %rax, %rsi
    mov net_rx_sum(%rip), %ebx
2:  test %r9d, %r9d
    jz 3f
    movzbl (%rsi), %eax
    imul $31, %ebx
    add %eax, %ebx
    inc %rsi
    dec %r9d
    jmp 2b
3:  mov %ebx, net_rx_sum(%rip)
    movzwl nq_rx_avail+2(%rip), %eax
    mov %eax, %ecx
    and $(NQ_SIZE - 1), %ecx
    lea nq_rx_avail+4(%rip), %rdi
    mov %r8w, (%rdi,%rcx,2)
    inc %eax
    mov %ax, nq_rx_avail+2(%rip)
    incw net_rx_seen(%rip)
    inc %r10d
    jmp 1b
5:  test %r10d, %r10d
    jz 6f
    mov net_rx_doorbell(%rip), %rdi
    movw $0, (%rdi)             /* buffers given back: the I/O thread reads the tap again */
6:  ret

net_isr:
    lock incl net_irqs(%rip)
    push %rax
    mov $LAPIC, %eax
    movl $0, 0xb0(%rax)
    pop %rax
    iretq

    .data
net_msg:       .asciz "TINY-NET press="
net_tx_msg:    .asciz " tx="
net_rx_msg:    .asciz " rx="
net_bytes_msg: .asciz " rxbytes="
net_sum_msg:   .asciz " sum="
net_irqs_msg:  .asciz " irqs="
net_pairs_msg: .asciz " pairs="
net_ack_msg:   .asciz " ack="
net_rx1_msg:   .asciz " rx1="
net_fail_msg:  .asciz "TINY-NET-FAIL "
net_magic:     .ascii "TINY-NET"
    .p2align 3
net_bar:       .quad 0
net_rx_doorbell: .quad 0
net_rx1_doorbell: .quad 0
net_ctl_doorbell: .quad 0
net_tx_doorbell: .quad 0
net_cfg:       .long 0
net_common:    .long 0
net_devcfg:    .long 0
net_notify:    .long 0
net_notify_mult: .long 0
net_msix_cap:  .long 0
net_msix_table: .long 0
net_irqs:      .long 0
net_qbase:     .long 0
net_presses:   .long 0
net_tx:        .long 0
net_rx:        .long 0
net_rx_target: .long 0
net_rx_bytes:  .long 0
net_rx_sum:    .long 0
net_mac:       .skip 8
net_rx_seen:   .word 0
net_max_pairs: .word 0
net_ready:     .byte 0
net_mq:        .byte 0

    .bss
    .p2align 4
nq_rx_desc:    .skip 16 * NQ_SIZE
    .p2align 2
nq_rx_avail:   .skip 4 + 2 * NQ_SIZE + 2
    .p2align 2
nq_rx_used:    .skip 4 + 8 * NQ_SIZE + 2
    .p2align 4
nq_tx_desc:    .skip 16 * NQ_SIZE
    .p2align 2
nq_tx_avail:   .skip 4 + 2 * NQ_SIZE + 2
    .p2align 2
nq_tx_used:    .skip 4 + 8 * NQ_SIZE + 2
    .p2align 4
nq1_rx_desc:   .skip 16 * NQ_SIZE
    .p2align 2
nq1_rx_avail:  .skip 4 + 2 * NQ_SIZE + 2
    .p2align 2
nq1_rx_used:   .skip 4 + 8 * NQ_SIZE + 2
    .p2align 4
nq1_tx_desc:   .skip 16 * NQ_SIZE
    .p2align 2
nq1_tx_avail:  .skip 4 + 2 * NQ_SIZE + 2
    .p2align 2
nq1_tx_used:   .skip 4 + 8 * NQ_SIZE + 2
    .p2align 4
nq_ctl_desc:   .skip 16 * NQ_SIZE
    .p2align 2
nq_ctl_avail:  .skip 4 + 2 * NQ_SIZE + 2
    .p2align 2
nq_ctl_used:   .skip 4 + 8 * NQ_SIZE + 2
    .p2align 4
nq_ctl_cmd:    .skip 16
    .p2align 7
net_txbufs:    .skip NET_TXBUF * NQ_SIZE
    .p2align 12
net_rxbufs:    .skip NET_RXBUF * NQ_SIZE
net_rxbufs1:   .skip NET_RXBUF * NQ_SIZE
"""

LINKER_SCRIPT = """
ENTRY(start64)
SECTIONS {
  . = 0x100000;
  .text : { *(.text) }
  .data : { *(.data) *(.rodata*) }
  .bss : { *(.bss) *(COMMON) }
  _end = .;
  /DISCARD/ : { *(.note*) *(.comment) *(.eh_frame) }
}
"""

SETUP_SECTS = 1

# The real-mode setup code a loader that starts a bzImage in real mode (QEMU's -kernel, through SeaBIOS and
# its linuxboot ROM) jumps to at setup offset 0x200, whose jmp leads here (0x268): DS = the real-mode base,
# where boot_params lies. Enter protected mode with the boot protocol's flat __BOOT_CS (0x10) and __BOOT_DS
# (0x18) and jump to code32_start (start32 above) with ESI = boot_params. benchmarks/startup.py boots the tiny
# guest so under qemu -accel tcg; our loader enters at start64 and never runs this.
SETUP_ASM = r"""
    .code16
    .text
setup16:
    cli
    xor %esi, %esi
    mov %ds, %si
    shl $4, %esi                /* boot_params, linear */
    lea (setup_gdt - setup16 + 0x268)(%esi), %eax
    mov %eax, %ds:(setup_gdtr - setup16 + 0x268 + 2)
    lgdtl %ds:(setup_gdtr - setup16 + 0x268)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x10, $0x100000
    .p2align 3
setup_gdt:  .quad 0, 0, 0x00cf9a000000ffff, 0x00cf92000000ffff  /* 0x10: 32-bit code, 0x18: data */
setup_gdtr: .word 4 * 8 - 1
            .long 0
"""
SETUP_CODE_OFFSET = 0x268


class GuestUnavailable(RuntimeError):
    """A test guest cannot be built on this host (the message says why)."""


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise GuestUnavailable(f"{cmd[0]} is not installed") from err
    except subprocess.CalledProcessError as err:
        raise GuestUnavailable(f"{' '.join(cmd)} failed: {err.stderr.strip()}") from err


def wrap_bzimage(protected_mode: bytes, *, init_size: int, setup_code: bytes = b"") -> bytes:
    """A bzImage: boot sector + one setup sector holding the header (and ``setup_code``, the real-mode entry
    its jmp leads to), then the 64-bit code."""
    setup = bytearray(512 * (SETUP_SECTS + 1))
    if SETUP_CODE_OFFSET + len(setup_code) > len(setup):
        raise GuestUnavailable(f"real-mode setup code of {len(setup_code)} bytes does not fit the setup sector")
    setup[SETUP_CODE_OFFSET : SETUP_CODE_OFFSET + len(setup_code)] = setup_code
    syssize = (len(protected_mode) + 15) // 16
    setup[0x1F1] = SETUP_SECTS
    struct.pack_into("<I", setup, 0x1F4, syssize)
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200:0x202] = b"\xeb\x66"  # jmp over the header; also says where the header ends (0x268)
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)  # protocol 2.15
    setup[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", setup, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<I", setup, 0x230, 0x200000)  # kernel_alignment
    struct.pack_into("<H", setup, 0x236, 0x0001)  # xloadflags: XLF_KERNEL_64
    struct.pack_into("<I", setup, 0x238, 2047)  # cmdline_size
    struct.pack_into("<Q", setup, 0x258, 0x100000)  # pref_address
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + protected_mode


def fake_elf(entry: int, segments: list[tuple[int, bytes, int]]) -> bytes:
    """A minimal ELF64 x86-64 executable with PT_LOAD (paddr, data, memsz) segments."""
    phoff = 64
    data_off = phoff + 56 * len(segments)
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<HHIQQQIHHHHHH", header, 16, 2, 62, 1, entry, phoff, 0, 0, 64, 56, len(segments), 0, 0, 0)
    phdrs = b""
    blobs = b""
    for paddr, data, memsz in segments:
        phdrs += struct.pack(
            "<IIQQQQQQ", 1, 5, data_off + len(blobs), paddr | (0xFFFF << 48), paddr, len(data), memsz, 0x1000
        )
        blobs += data
    return bytes(header) + phdrs + blobs


def bzimage_with_payload(payload: bytes) -> bytes:
    """A bzImage whose payload (payload_offset/payload_length) is ``payload``, e.g. a compressed :func:`fake_elf`."""
    image = bytearray(wrap_bzimage(b"\x90" * 0x200 + b"\xf4" + payload, init_size=0x10000))
    struct.pack_into("<II", image, 0x248, 0x201, len(payload))
    return bytes(image)


def serial_printer_elf(text: bytes, *, at: int = 0x1000000) -> bytes:
    """An ELF "kernel" for the host-decompression path: in long mode at ``at`` it writes ``text`` to COM1's
    data port (0x3F8), then halts with interrupts off (the VMM's power-off)."""
    code = b"\x66\xba\xf8\x03"  # mov dx, 0x3f8
    for byte in text:
        code += b"\xb0" + bytes([byte]) + b"\xee"  # mov al, byte; out dx, al
    code += b"\xfa\xf4\xeb\xfd"  # cli; hlt; jmp back to the hlt
    return fake_elf(at, [(at, code, len(code))])


def tiny_counts(serial: str) -> list[tuple[int, dict[str, str]]]:
    """Every counters line the tiny guest printed (key ``n``): (offset of the line in the log, fields)."""
    found = []
    for m in re.finditer(re.escape(TINY_COUNTS) + r" (.*)\n", serial):
        found.append((m.start(), dict(field.split("=", 1) for field in m.group(1).split())))
    return found


def wait_tiny_counts(read: Callable[[], str], *, nth: int = 1, timeout: float) -> tuple[int, dict[str, str]]:
    """Wait (bounded) until the serial log read by ``read`` holds ``nth`` complete counters lines."""
    found = wait_for(
        lambda: (lines := tiny_counts(read()))[nth - 1 :] and lines,
        timeout,
        what=lambda: f"counters line {nth} printed: {read()[-2000:]!r}",
    )
    return found[nth - 1]


def tiny_keys(serial: str) -> list[str]:
    """The scancodes the tiny guest reported (key lines), complete lines only."""
    return re.findall(rf"^{TINY_KEY} ([0-9a-f]{{2}})\n", serial, re.M)


def tiny_virtio(serial: str) -> list[dict[str, int]]:
    """Every virtio-rng totals line the tiny guest printed (key ``v``), fields as numbers."""
    return [
        {k: int(v, 16) for k, v in (f.split("=", 1) for f in m.group(1).split())}
        for m in re.finditer(re.escape(TINY_VIRTIO) + r" (bytes=.*)\n", serial)
    ]


def tiny_blk(serial: str) -> list[dict[str, int]]:
    """Every virtio-blk line the tiny guest printed (key ``j``), fields as numbers."""
    return [
        {k: int(v, 16) for k, v in (f.split("=") for f in m.group(1).split())}
        for m in re.finditer(re.escape(TINY_BLK) + r" (press=.*)\n", serial)
    ]


def tiny_blk_rate(line: dict[str, int]) -> tuple[float, float]:
    """A TINY-BLK line's timed reads as the guest measured them: (bytes per second, seconds per read)."""
    seconds = line["ticks"] / TINY_PM_TIMER_HZ
    return line["reads"] * TINY_BLK_BYTES / seconds, seconds / line["reads"]


def tiny_blk_pattern(press: int) -> bytes:
    """What press ``press`` writes at TINY_BLK_SECTOR (the guest's formula)."""
    value = (press * 0x01000193) & 0xFFFFFFFF
    words = []
    for _ in range(TINY_BLK_BYTES // 4):
        value = (value + 0x9E3779B9) & 0xFFFFFFFF
        words.append(value)
    return struct.pack(f"<{len(words)}I", *words)


def tiny_net(serial: str) -> list[dict[str, int]]:
    """Every virtio-net line the tiny guest printed (key ``u``), fields as numbers."""
    return [
        {k: int(v, 16) for k, v in (f.split("=") for f in m.group(1).split())}
        for m in re.finditer(re.escape(TINY_NET) + r" (press=.*)\n", serial)
    ]


def tiny_net_frame(mac: bytes, press: int, number: int) -> bytes:
    """Frame ``number`` (from 0) of press ``press`` as the guest builds it (its device's MAC as source)."""
    head = b"\xff" * 6 + mac + struct.pack(">H", TINY_NET_ETHERTYPE) + b"TINY-NET" + struct.pack("<II", press, number)
    return head.ljust(TINY_NET_FRAME_LEN, b"\0")


def tiny_net_hash(frames: list[bytes], start: int = 0) -> int:
    """The guest's hash of received frames in arrival order: h = h * 31 + byte (32 bits)."""
    h = start
    for frame in frames:
        for byte in frame:
            h = (h * 31 + byte) & 0xFFFFFFFF
    return h


def tiny_source() -> str:
    """The tiny guest's whole assembly source (also what its cache key is made of)."""
    return (
        TINY_ASM.replace("{bench_exits}", str(TINY_BENCH_EXITS))
        + TINY_EVENTS_ASM
        + TINY_IRQ_ASM
        + TINY_PCI_ASM.replace("{ecam}", hex(TINY_PCI_ECAM))
        + TINY_VIRTIO_ASM.replace("{rounds}", str(TINY_VIRTIO_ROUNDS)).replace("{buffer}", str(TINY_VIRTIO_BUFFER))
        + TINY_RTC_ASM
        + TINY_BLK_ASM.replace("{sector}", hex(TINY_BLK_SECTOR))
        .replace("{nbytes}", str(TINY_BLK_BYTES))
        .replace("{timed_reads}", str(TINY_BLK_TIMED_READS))
        + TINY_NET_ASM.replace("{frames}", str(TINY_NET_FRAMES))
        .replace("{frame_len}", str(TINY_NET_FRAME_LEN))
        .replace("{wait_ticks}", str(TINY_NET_WAIT_TICKS))
        .replace("{ethertype}", hex(TINY_NET_ETHERTYPE))
    )


def build_tiny_guest(tmp_path: Path) -> Path:
    """Assemble the tiny guest and return the path of its bzImage."""
    work = Path(tmp_path) / "tiny-guest"
    work.mkdir(parents=True, exist_ok=True)
    (work / "tiny.S").write_text(tiny_source())
    (work / "tiny.ld").write_text(LINKER_SCRIPT)
    _run(["as", "--64", "-o", "tiny.o", "tiny.S"], work)
    _run(["ld", "-m", "elf_x86_64", "-nostdlib", "-T", "tiny.ld", "-o", "tiny.elf", "tiny.o"], work)
    _run(["objcopy", "-O", "binary", "-j", ".text", "-j", ".data", "tiny.elf", "tiny.bin"], work)
    (work / "setup.S").write_text(SETUP_ASM)
    _run(["as", "--32", "-o", "setup.o", "setup.S"], work)
    _run(["objcopy", "-O", "binary", "-j", ".text", "setup.o", "setup.bin"], work)
    end = _symbol(work / "tiny.elf", "_end")
    body = (work / "tiny.bin").read_bytes()
    setup = (work / "setup.bin").read_bytes()
    image = wrap_bzimage(body, init_size=(end - 0x100000 + 0xFFF) & ~0xFFF, setup_code=setup)
    out = work / "bzImage"
    out.write_bytes(image)
    return out


def cached_tiny_guest() -> Path:
    """The tiny guest's bzImage under ``~/.cache/mshv-libvirt/tiny-<hash>/``, built on first use; the
    hash covers its source, the linker script and the assembler/linker versions."""
    versions = [_tool_version(tool) for tool in ("as", "ld")]
    cache = cache_path("tiny", tiny_source(), LINKER_SCRIPT, str(SETUP_SECTS), SETUP_ASM, *versions)
    image = cache / "tiny-guest" / "bzImage"
    if not image.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=CACHE_DIR))
        try:
            build_tiny_guest(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide it from a daemon running as another user
            try:
                os.rename(tmp, cache)  # atomic: a reader sees no directory or a complete one
            except OSError:
                if not image.exists():  # not a concurrent builder that got there first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return image


def _tool_version(tool: str) -> str:
    try:
        return subprocess.run([tool, "--version"], check=True, capture_output=True, text=True).stdout.split("\n")[0]
    except FileNotFoundError as err:
        raise GuestUnavailable(f"{tool} is not installed (Debian package binutils)") from err


def _symbol(elf: Path, name: str) -> int:
    out = subprocess.run(["nm", str(elf)], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == name:
            return int(parts[0], 16)
    raise GuestUnavailable(f"symbol {name} missing from {elf}")


# ---------------------------------------------------------------------------------------------
# Linux guest

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mshv-libvirt"

INIT_SCRIPT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in /lib/modules/*.ko; do [ -e "$m" ] && insmod "$m"; done
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\\necho {powerbutton} > /dev/ttyS0\\npoweroff -f\\n' > /etc/acpi/PWRF/00000080
chmod +x /etc/acpi/PWRF/00000080
acpid -c /etc/acpi
echo {marker}
{then}
"""
INIT_SHELL = "exec setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'"
INIT_POWEROFF = "poweroff -f"


def _find_kernel_package() -> str:
    """The versioned linux-image package linux-image-amd64 depends on."""
    try:
        out = subprocess.run(
            ["apt-cache", "depends", "linux-image-amd64"], check=True, capture_output=True, text=True
        ).stdout
    except (FileNotFoundError, subprocess.CalledProcessError) as err:
        raise GuestUnavailable(f"apt-cache cannot resolve linux-image-amd64: {err}") from err
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split()[-1]
    raise GuestUnavailable("linux-image-amd64 names no kernel package")


@dataclass(frozen=True)
class DebianKernel:
    vmlinuz: Path
    modules: tuple[Path, ...]  # the power-button path: button.ko and evdev.ko (modules in Debian)


GUEST_MODULES = ("kernel/drivers/acpi/button.ko", "kernel/drivers/input/evdev.ko")


def _package_identity(package: str) -> str:
    """Package, version and .deb SHA256 of apt's candidate: what the unpacked kernel is made from."""
    try:
        out = subprocess.run(
            ["apt-cache", "show", "--no-all-versions", package], check=True, capture_output=True, text=True
        ).stdout
    except (FileNotFoundError, subprocess.CalledProcessError) as err:
        raise GuestUnavailable(f"apt-cache cannot show {package}: {err}") from err
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line and not line.startswith(" "))
    if "Version" not in fields:
        raise GuestUnavailable(f"apt-cache show {package} gives no version")
    return f"package={package} version={fields['Version']} sha256={fields.get('SHA256', '?')}"


def cache_path(kind: str, *inputs: str | bytes) -> Path:
    """``~/.cache/mshv-libvirt/<kind>-<hash of the inputs>``: a new input is a new directory."""
    digest = hashlib.sha256()
    for item in inputs:
        data = item.encode() if isinstance(item, str) else item
        digest.update(len(data).to_bytes(8, "little") + data)
    return CACHE_DIR / f"{kind}-{digest.hexdigest()[:16]}"


def debian_kernel() -> DebianKernel:
    """Debian's vmlinuz (+ the modules the guest needs), fetched once into the cache with
    ``apt-get download`` + ``dpkg-deb -x``, keyed by the package's version and hash and the module
    list. ``MSHV_LIBVIRT_TEST_KERNEL`` overrides (no modules)."""
    override = os.environ.get("MSHV_LIBVIRT_TEST_KERNEL")
    if override:
        path = Path(override)
        if not path.is_file():
            raise GuestUnavailable(f"MSHV_LIBVIRT_TEST_KERNEL={override} does not exist")
        return DebianKernel(path, ())
    package = _find_kernel_package()
    cache = cache_path("linux", _package_identity(package), *GUEST_MODULES)
    vmlinuz = cache / "vmlinuz"
    if not vmlinuz.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            _run(["apt-get", "download", package], Path(tmp))
            debs = list(Path(tmp).glob("*.deb"))
            if not debs:
                raise GuestUnavailable(f"apt-get download {package} produced no .deb")
            root = Path(tmp) / "root"
            _run(["dpkg-deb", "-x", str(debs[0]), str(root)], Path(tmp))
            kernels = sorted((root / "boot").glob("vmlinuz-*"))
            if not kernels:
                raise GuestUnavailable(f"{package} contains no /boot/vmlinuz-*")
            for rel in GUEST_MODULES:
                found = list((root / "lib" / "modules").glob(f"*/{rel}*"))
                if found:
                    data = found[0].read_bytes()
                    if found[0].suffix == ".xz":
                        data = lzma.decompress(data)
                    (cache / Path(rel).name).write_bytes(data)
            shutil.copyfile(kernels[-1], cache / "vmlinuz.tmp")
            os.replace(cache / "vmlinuz.tmp", vmlinuz)  # last: its presence means the cache is complete
    modules = tuple(cache / Path(rel).name for rel in GUEST_MODULES if (cache / Path(rel).name).exists())
    return DebianKernel(vmlinuz, modules)


def _cpio_newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A newc cpio archive of (name, mode, data, rdev); rdev = major << 8 | minor for device nodes."""
    out = io.BytesIO()
    ino = 1
    for name, mode, data, rdev in [*entries, ("TRAILER!!!", 0, b"", 0)]:
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF, len(encoded), 0]
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        out.write(b"\0" * (-(110 + len(encoded)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
        ino += 1
    return out.getvalue()


def _is_static_elf(data: bytes) -> bool:
    """An x86-64 ELF executable without a PT_INTERP program header."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))


def build_initramfs(
    dest: Path, *, marker: str = LINUX_MARKER, poweroff: bool = False, modules: tuple[Path, ...] = ()
) -> Path:
    """gzip'd newc initramfs: static busybox and an /init that prints ``marker``, then runs a shell on
    ttyS0 (busybox acpid powers off on the ACPI power button) -- or powers off at once (``poweroff``)."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise GuestUnavailable("busybox (static) is not installed")
    data = Path(busybox).read_bytes()
    if not _is_static_elf(data):
        raise GuestUnavailable(f"{busybox} is dynamically linked; install busybox-static")
    d = stat.S_IFDIR | 0o755
    entries = [
        ("bin", d, b"", 0),
        ("dev", d, b"", 0),
        ("etc", d, b"", 0),
        ("proc", d, b"", 0),
        ("sys", d, b"", 0),
        ("bin/busybox", stat.S_IFREG | 0o755, data, 0),
        ("init", stat.S_IFREG | 0o755, _init_script(marker, poweroff), 0),
        ("dev/console", stat.S_IFCHR | 0o600, b"", (5 << 8) | 1),
        ("dev/ttyS0", stat.S_IFCHR | 0o600, b"", (4 << 8) | 64),
        ("lib", d, b"", 0),
        ("lib/modules", d, b"", 0),
        *((f"lib/modules/{m.name}", stat.S_IFREG | 0o644, m.read_bytes(), 0) for m in modules),
    ]
    archive = _cpio_newc(entries)
    dest.write_bytes(gzip.compress(archive, compresslevel=6, mtime=0))
    return dest


def _init_script(marker: str, poweroff: bool) -> bytes:
    then = INIT_POWEROFF if poweroff else INIT_SHELL
    script = INIT_SCRIPT.replace("{marker}", marker).replace("{then}", then)
    return script.replace("{powerbutton}", LINUX_POWERBUTTON).encode()


def build_linux_guest(tmp_path: Path, *, poweroff: bool = False) -> tuple[Path, Path]:
    """(kernel, initrd): Debian's kernel and a busybox initramfs built now."""
    kernel = debian_kernel()
    initrd = build_initramfs(Path(tmp_path) / "initrd.gz", poweroff=poweroff, modules=kernel.modules)
    return kernel.vmlinuz, initrd


def main(argv: list[str] | None = None) -> int:
    """``python3 -m tests.support.guests tiny``: print the cached tiny guest's path (building it)."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["tiny"]:
        print("usage: python3 -m tests.support.guests tiny", file=sys.stderr)
        return 2
    try:
        print(cached_tiny_guest())
    except GuestUnavailable as err:
        print(f"cannot build the tiny guest: {err}", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "KVM_PVM_CLEARCPUID",
    "LINUX_CMDLINE",
    "LINUX_MARKER",
    "LINUX_POWERBUTTON",
    "TINY_AP_BANNER",
    "TINY_BANNER",
    "TINY_BENCH_DONE",
    "TINY_BENCH_EXITS",
    "TINY_COUNTS",
    "TINY_IRQ_FLAG",
    "TINY_KEY",
    "TINY_NMI",
    "TINY_PCI_ECAM",
    "TINY_POWERBUTTON",
    "TINY_VIRTIO",
    "TINY_VIRTIO_BUFFER",
    "TINY_VIRTIO_ROUNDS",
    "DebianKernel",
    "GuestUnavailable",
    "build_initramfs",
    "build_linux_guest",
    "build_tiny_guest",
    "cache_path",
    "cached_tiny_guest",
    "debian_kernel",
    "tiny_counts",
    "tiny_source",
    "tiny_virtio",
    "wait_tiny_counts",
    "wrap_bzimage",
]

if __name__ == "__main__":
    sys.exit(main())
