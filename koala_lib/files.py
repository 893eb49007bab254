"""Writing outputs so that a crash never leaves a half-written file or folder."""

from __future__ import annotations

import shutil
from pathlib import Path


def swap_in(new: Path, final: Path) -> None:
    """Replace folder `final` by `new`: the old one is renamed aside first, so a crash never leaves neither."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.replace(old)
    new.replace(final)
    shutil.rmtree(old, ignore_errors=True)


def atomic_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
