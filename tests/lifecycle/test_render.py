from __future__ import annotations

from pathlib import Path

from mshv_libvirt.lifecycle.render import render
from mshv_libvirt.lifecycle.states import STATES, Input

DOC = Path(__file__).resolve().parents[2] / "docs" / "lifecycle.md"


def test_docs_table_is_generated_from_the_code() -> None:
    text = render()
    assert DOC.read_text() == text, "regenerate: python -m mshv_libvirt.lifecycle.render > docs/lifecycle.md"
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| input")]
    assert len(rows) == len(STATES) * len(Input)  # every pair is documented
    assert "| guest_poweroff_destroy | shutoff (shutdown) | shutdown/guest, stopped/shutdown | cleanup |" in text
