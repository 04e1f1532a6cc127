"""The daemon's cache of decompressed kernel payloads (mshv_libvirt/driver/kernel_cache.py), through virsh.

The kernel is an xz-compressed bzImage whose payload is a tiny ELF that prints a line on COM1: the VMM
decompresses it on the host, as it does a Linux kernel. Oracles: the guest's own serial line (which code
ran) and the entry's bytes against the test's own decompression.
"""

from __future__ import annotations

import hashlib
import lzma
import os
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, domain_xml, serial_log, virsh
from tests.support.guests import bzimage_with_payload, serial_printer_elf
from tests.support.waits import wait_for

pytestmark = [pytest.mark.kvm, pytest.mark.virsh]

MAGIC = b"mshv-libvirt decompressed kernel payload 1\n"
BOOT = 60.0  # seconds to the guest's one line; it is a few instructions after the VMM's build


def entries(d: DaemonProcess) -> list[Path]:
    return sorted((d.run_dir / "cache" / "kernels").glob("*.payload"))


def boot(d: DaemonProcess, name: str, line: str) -> None:
    """Start ``name``; it writes one more ``line`` to its serial log (appended start after start) and halts
    with interrupts off, which the VMM takes as a power-off."""
    seen = serial_log(d, name).count(line)
    virsh(d.uri, "start", name)
    wait_for(
        lambda: virsh(d.uri, "domstate", name).stdout.strip() == "shut off", BOOT, what=lambda: serial_log(d, name)
    )
    assert serial_log(d, name).count(line) == seen + 1, serial_log(d, name)


def test_a_kernel_is_decompressed_once_and_later_starts_load_the_cached_payload(
    kvm: None, daemon: DaemonProcess, tmp_path: Path
) -> None:
    elf = serial_printer_elf(b"FROM-THE-IMAGE\n")
    compressed = lzma.compress(elf)
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(bzimage_with_payload(compressed))
    xml = tmp_path / "dom.xml"
    xml.write_text(domain_xml("cached", kernel, memory_mib=64))
    virsh(daemon.uri, "define", str(xml))

    assert entries(daemon) == []
    boot(daemon, "cached", "FROM-THE-IMAGE")
    wait_for(lambda: len(entries(daemon)) == 1, 30, what="the cache entry written after the first start")
    (entry,) = entries(daemon)
    assert entry.read_bytes() == MAGIC + hashlib.sha256(compressed).digest() + elf

    # The next start loads the entry, not the image's payload: an entry of this image's digest holding other
    # code (same length) is what runs.
    forged = serial_printer_elf(b"FROM-THE-CACHE\n")
    assert len(forged) == len(elf)
    entry.write_bytes(MAGIC + hashlib.sha256(compressed).digest() + forged)
    boot(daemon, "cached", "FROM-THE-CACHE")

    # An entry whose digest is not the image's payload's is never used (the VMM decompresses instead).
    entry.write_bytes(MAGIC + hashlib.sha256(b"another payload").digest() + forged)
    boot(daemon, "cached", "FROM-THE-IMAGE")

    # A kernel rewritten in place is another file to the cache: its own entry, its own code.
    newer = serial_printer_elf(b"THE-NEW-KERNEL\n")
    kernel.write_bytes(bzimage_with_payload(lzma.compress(newer)))
    os.utime(kernel, ns=(1, 1))  # even with an old modification time: the change time moved
    boot(daemon, "cached", "THE-NEW-KERNEL")
    wait_for(lambda: len(entries(daemon)) == 2, 30, what="a second entry for the rewritten kernel")
    virsh(daemon.uri, "undefine", "cached")
