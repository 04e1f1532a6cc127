"""The serial log is capped and rotated like virtlogd's (max_size, max_backups), through descriptors only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mshv_libvirt.vmm.config import ConfigError, VmmConfig
from mshv_libvirt.vmm.console import Console, RotatingLog, open_log_files

MAX = 4096


def files(path: Path, backups: int) -> list[bytes]:
    """Oldest first: .N .. .1, then the log."""
    names = [f"{path}.{i}" for i in range(backups, 0, -1)] + [str(path)]
    return [Path(n).read_bytes() if Path(n).exists() else b"" for n in names]


def pattern(n: int, start: int = 0) -> bytes:
    return b"".join(b"%07d\n" % i for i in range(start, start + n // 8 + 1))[:n]


@pytest.mark.parametrize("chunk", [1, 100, 4095, 4096, 4097, 20000])
def test_rotation_keeps_the_newest_output_within_the_cap(tmp_path: Path, chunk: int) -> None:
    log = tmp_path / "guest.serial.log"
    backups = 3
    rl = RotatingLog(open_log_files(str(log), backups), MAX)
    everything = b""
    for i in range(0, 50_000, chunk):
        piece = pattern(chunk, i)
        rl.write(piece)
        everything += piece
    rl.close()
    parts = files(log, backups)
    assert [len(p) for p in parts[:-1]] == [MAX] * backups  # every backup is full
    assert 0 < len(parts[-1]) <= MAX
    kept = b"".join(parts)
    assert everything.endswith(kept)  # nothing newer is missing, nothing is out of order
    assert len(kept) == backups * MAX + len(parts[-1])
    assert sum(os.path.getsize(p) for p in tmp_path.iterdir()) <= (backups + 1) * MAX
    assert rl.rotations == (len(everything) - 1) // MAX


def test_zero_backups_truncates_in_place(tmp_path: Path) -> None:
    log = tmp_path / "l"
    rl = RotatingLog(open_log_files(str(log), 0), MAX)
    rl.write(pattern(3 * MAX + 10))
    rl.close()
    assert log.read_bytes() == pattern(3 * MAX + 10)[-10:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l"]


def test_existing_log_is_appended_and_counted(tmp_path: Path) -> None:
    log = tmp_path / "l"
    log.write_bytes(b"x" * (MAX - 10))  # an earlier boot of the domain
    rl = RotatingLog(open_log_files(str(log), 1), MAX)
    rl.write(b"y" * 20)
    rl.close()
    assert Path(f"{log}.1").read_bytes() == b"x" * (MAX - 10) + b"y" * 10
    assert log.read_bytes() == b"y" * 10


def test_console_writes_through_handed_descriptors(tmp_path: Path) -> None:
    # What the daemon hands a sandboxed VMM: the pty and the log files, opened by it.
    log = tmp_path / "h.serial.log"
    fds = open_log_files(str(log), 2)
    master, slave = os.openpty()
    console = Console(log_fds=fds, max_size=MAX, max_backups=2, pty_fds=(master, slave))
    total = 0
    try:
        assert console.pty_path == os.ttyname(slave)
        while total < 3 * MAX + 100:
            console.write(pattern(512, total))
            total += 512
        assert console.log is not None and console.log.rotations == (total - 1) // MAX == 3
    finally:
        console.close()
    assert [len(p) for p in files(log, 2)] == [MAX, MAX, total - 3 * MAX]


def test_config_bounds() -> None:
    base = {"name": "x", "memory_bytes": 64 << 20, "kernel": "/k"}
    assert VmmConfig.from_dict(base).serial_log_max_size == 2 << 20
    assert VmmConfig.from_dict(base).serial_log_max_backups == 3
    with pytest.raises(ConfigError, match="serial_log_max_size"):
        VmmConfig.from_dict({**base, "serial_log_max_size": 10})
    with pytest.raises(ConfigError, match="serial_log_max_backups"):
        VmmConfig.from_dict({**base, "serial_log_max_backups": 17})
    with pytest.raises(ConfigError, match=r"fds\.serial_log"):
        VmmConfig.from_dict({**base, "fds": {"serial_log": [3, 4]}})
