"""Disks of the tiny guest as the e2e tests drive them: the <disk> element, a domain with it, the guest writing
through its console (key ``j``) and the host reading the bytes back from the image."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.support.daemon import DaemonProcess, PtyProcess, domain_xml, wait_for
from tests.support.guests import TINY_BANNER, TINY_BLK_BYTES, TINY_BLK_SECTOR, TINY_IRQ_FLAG, tiny_blk, tiny_blk_pattern

SECTOR = 512
CMDLINE = f"console=ttyS0 tiny {TINY_IRQ_FLAG}"


def disk_xml(path: Path, fmt: str = "raw", *, kind: str = "file", dev: str = "vda", readonly: bool = False) -> str:
    source = f"<source file='{path}'/>" if kind == "file" else f"<source dev='{path}'/>"
    return (
        f"<disk type='{kind}' device='disk'><driver name='qemu' type='{fmt}'/>{source}"
        f"<target dev='{dev}' bus='virtio'/>{'<readonly/>' if readonly else ''}</disk>"
    )


def qemu_img_info(path: Path) -> dict[str, Any]:
    """``qemu-img info`` of an image, also while a running domain holds its lock (``-U``)."""
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert isinstance(info, dict)
    return info


def document(name: str, kernel: Path, disks: str) -> str:
    return domain_xml(name, kernel, cmdline=CMDLINE).replace("<serial type='pty'/>", f"<serial type='pty'/>{disks}")


def write_through_console(daemon: DaemonProcess, name: str, presses: int) -> dict[str, int]:
    """Press ``j`` in ``virsh console`` until the guest printed ``presses`` more TINY-BLK lines (than its
    serial log held before: a re-attached guest's log goes on); the last one."""
    log = daemon.serial_log(name)
    wait_for(lambda: log.exists() and TINY_BANNER in log.read_text(errors="replace"), 60)
    seen = len(tiny_blk(log.read_text(errors="replace")))
    con = PtyProcess(["virsh", "-c", daemon.uri, "console", name])
    try:
        con.wait_console_ready()
        for press in range(1, presses + 1):
            con.write(b"j")
            wait_for(  # a failed request ends the wait at once (asserted below)
                lambda press=press: (
                    len(tiny_blk(text := log.read_text(errors="replace"))) >= seen + press or "TINY-BLK-FAIL" in text
                ),
                60,
                what=lambda: log.read_text(errors="replace")[-2000:],
            )
        con.write(b"\x1d")
        assert con.wait() == 0
    finally:
        con.kill()
    text = log.read_text(errors="replace")
    assert "TINY-BLK-FAIL" not in text, text[-2000:]
    return tiny_blk(text)[-1]


def assert_image_holds(raw: Path, press: int) -> None:
    with raw.open("rb") as f:
        f.seek(TINY_BLK_SECTOR * SECTOR)
        assert f.read(TINY_BLK_BYTES) == tiny_blk_pattern(press)  # where the guest put it
        f.seek(0)
        assert f.read(TINY_BLK_SECTOR * SECTOR) == bytes(TINY_BLK_SECTOR * SECTOR)  # nothing before it
