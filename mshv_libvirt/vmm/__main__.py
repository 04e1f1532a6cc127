"""``python -m mshv_libvirt.vmm --config CONFIG.json``: run one domain until it ends."""

from __future__ import annotations

# The first stamp is taken before anything else is imported: what follows is the import phase.
from . import phases

phases.mark("main")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from mshv_libvirt.atomicfile import write_atomic  # noqa: E402

from .config import ConfigError, VmmConfig, read_raw  # noqa: E402
from .runtime import Vmm, write_exit_fd  # noqa: E402

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 128 << 10  # glibc's default, kept fixed


def fix_mmap_threshold() -> None:
    """Blocks of 128 KiB and more always come from mmap and go back to the system when freed.

    glibc raises its threshold once such a block is freed (the kernel load frees many: the compressed
    image, the decompressor's buffers, the ELF) and from then on keeps big blocks on its heaps, a
    thread's included, where freed memory stays: ~9 MiB for the VM's life after a Linux kernel's load.
    Setting it explicitly turns the dynamic threshold off; nothing on the exit path allocates this much.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its own policy stands
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mshv-vmm", description="Run one mshv-libvirt domain.")
    parser.add_argument("--config", required=True, help="domain configuration written by the driver")
    parser.add_argument(
        "--config-fd", type=int, help="read the configuration from this inherited descriptor (--config names it)"
    )
    parser.add_argument("--log-level", default=os.environ.get("MSHV_LIBVIRT_VMM_LOG", "INFO"))
    phases.mark("imports")
    fix_mmap_threshold()
    args = parser.parse_args(argv)
    logging.raiseExceptions = False  # stderr may be a pipe to a daemon that has gone away
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s vmm[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = VmmConfig.load(args.config, args.config_fd)
    except ConfigError as err:
        logging.getLogger("mshv_libvirt.vmm").error("%s", err)
        _report_config_error(args.config, args.config_fd, str(err))
        return 2
    finally:
        if args.config_fd is not None:
            with contextlib.suppress(OSError):
                os.close(args.config_fd)
    phases.mark("config")
    return Vmm(config).run()


def _report_config_error(path: str, fd: int | None, detail: str) -> None:
    """Still honour the exit-file contract if the config names one (a handed exit file or a path)."""
    data = json.dumps({"reason": "error", "detail": detail}).encode()
    try:
        raw = read_raw(path, fd)
    except ConfigError:
        return
    handed = raw.get("fds")
    exit_fd = handed.get("exit") if isinstance(handed, dict) else None
    if isinstance(exit_fd, int) and not isinstance(exit_fd, bool):
        write_exit_fd(exit_fd, data)
        return
    exit_file = raw.get("exit_file")
    if isinstance(exit_file, str):
        with contextlib.suppress(OSError):
            write_atomic(Path(exit_file), data, mode=0o644)


if __name__ == "__main__":
    sys.exit(main())
