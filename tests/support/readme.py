"""The README's tables of journal values, read back by the tests that must agree with them."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def documented(column: str) -> set[str]:
    """The values in the first column of the README table headed by ``column``."""
    lines = README.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| `{column}` |"))
    values: set[str] = set()
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        values.update(re.findall(r"`([a-z_]+)`", ln.split("|")[1]))
    return values
