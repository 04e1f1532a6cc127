"""What the README tells a newcomer to type matches what the tests use."""

from __future__ import annotations

from pathlib import Path

from tests.support.guests import LINUX_CMDLINE

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_quotes_the_linux_command_line_the_tests_boot_with() -> None:
    assert f"\n{LINUX_CMDLINE}\n" in README


def test_readme_points_at_the_kernel_paths_debian_installs() -> None:
    assert "apt-get install linux-image-amd64" in README
    assert "kernel=/vmlinuz,initrd=/initrd.img" in README and "kernel=/boot/vmlinuz," not in README


def test_readme_first_vm_lines_name_the_script_and_its_defaults() -> None:
    script = (ROOT / "scripts" / "first-vm.sh").read_text()
    assert "scripts/first-vm.sh" in README and "console first-vm" in README
    assert "name=first-vm" in script and "mshv:///system" in script
