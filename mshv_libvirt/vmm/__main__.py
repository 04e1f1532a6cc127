"""``python -m mshv_libvirt.vmm --config CONFIG.json``: run one domain until it ends."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from mshv_libvirt.atomicfile import write_atomic

from .config import ConfigError, VmmConfig
from .runtime import Vmm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mshv-vmm", description="Run one mshv-libvirt domain.")
    parser.add_argument("--config", required=True, help="domain configuration written by the driver")
    parser.add_argument("--log-level", default=os.environ.get("MSHV_LIBVIRT_VMM_LOG", "INFO"))
    args = parser.parse_args(argv)
    logging.raiseExceptions = False  # stderr may be a pipe to a daemon that has gone away
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s vmm[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = VmmConfig.load(args.config)
    except ConfigError as err:
        logging.getLogger("mshv_libvirt.vmm").error("%s", err)
        # Still honour the exit-file contract if the file names one.
        try:
            with open(args.config) as f:
                exit_file = json.load(f).get("exit_file")
            if isinstance(exit_file, str):
                write_atomic(Path(exit_file), json.dumps({"reason": "error", "detail": str(err)}).encode(), mode=0o644)
        except (OSError, ValueError, AttributeError):
            pass
        return 2
    return Vmm(config).run()


if __name__ == "__main__":
    sys.exit(main())
