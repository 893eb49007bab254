"""Writing outputs so that a crash never leaves a half-written file or folder."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


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


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """An empty sibling folder `<final>.tmp` to write into: it replaces `final` when the block ends, and is removed
    when the block raises, so a failure leaves `final` as it was and nothing beside it."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, final)


@contextmanager
def atomic_open(path: Path) -> Iterator[IO[str]]:
    """A text file to write that appears at `path` only whole: written as `<path>.tmp`, renamed when the block ends,
    removed when it raises."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            yield fh
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
