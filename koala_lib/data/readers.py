"""Read upstream rows from local files, folders laid out like a hub repository, the kit's demo data, or the hub.

Every row comes out as a `RawRow` that knows where it came from (`file:line` for JSON lines, `file[index]`
for a JSON array, `file#row` for parquet), so a bad row is reported by place, never dropped silently.

Formats: `.jsonl`, `.json` (a JSON array, or JSON lines as in summarize_from_feedback), either of them
`.gz`-compressed, and `.parquet`.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from koala_lib.config import SourceConfig, resolve_path

from .schema import Reject

SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")


class SourceFormatError(ValueError):
    """A file that is not in the expected format at all, or a source that cannot be read."""


@dataclass
class RawRow:
    file: str  # the file, relative to the source's root (or the hub id)
    place: str  # "7" (line), "[12]" (array index) or "#3" (parquet row)
    value: Any = None  # the decoded row, when it decoded
    error: Reject | None = None  # why it did not decode

    @property
    def location(self) -> str:
        sep = ":" if self.place[:1].isdigit() else ""
        return f"{self.file}{sep}{self.place}"


def demo_root(name: str) -> Path:
    """The kit's demo files for a source (package data)."""
    return Path(str(resources.files("koala_lib.data.demo") / name))


def describe_origin(name: str, src: SourceConfig) -> str:
    if src.path:
        return str(resolve_path(src.path))
    if src.origin == "demo":
        return f"demo:{name}"
    return f"hub:{src.hub_id}" + (f"/{src.hub_config}" if src.hub_config else "")


def iter_rows(name: str, src: SourceConfig, max_bytes: int) -> Iterator[RawRow]:
    """Rows of one source, wherever the config says they are."""
    if src.path:
        yield from _iter_local(resolve_path(src.path), src.files, max_bytes)
    elif src.origin == "demo":
        yield from _iter_local(demo_root(name), (), max_bytes)
    else:
        yield from _iter_hub(name, src)


def source_files(root: Path, patterns: tuple[str, ...]) -> list[tuple[Path, str]]:
    """(path, name relative to root) of the files to read: `root` itself, or the matches of `patterns` under it."""
    if root.is_file():
        return [(root, root.name)]
    if not root.is_dir():
        raise SourceFormatError(f"{root}: no such file or folder")
    if patterns:
        found = sorted({p for pat in patterns for p in root.glob(pat) if p.is_file()})
        if not found:
            raise SourceFormatError(f"{root}: no file matches {', '.join(patterns)}")
    else:
        found = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
        if not found:
            raise SourceFormatError(f"{root}: no {', '.join(SUFFIXES)} file in this folder")
    return [(p, p.relative_to(root).as_posix()) for p in found]


def _iter_local(root: Path, patterns: tuple[str, ...], max_bytes: int) -> Iterator[RawRow]:
    for path, rel in source_files(root, patterns):
        if not path.name.endswith(SUFFIXES):
            raise SourceFormatError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
        if path.name.endswith(".parquet"):
            yield from _iter_parquet(path, rel)
            continue
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rb") as fh:
                data = fh.read()
        except (OSError, EOFError) as exc:
            raise SourceFormatError(f"{path}: cannot read ({exc})") from None
        data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
        if data.lstrip()[:1] == b"[":
            yield from _iter_json_array(data, rel, max_bytes)
        else:
            yield from _iter_json_lines(data, rel, max_bytes)


def _iter_json_lines(data: bytes, rel: str, max_bytes: int) -> Iterator[RawRow]:
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        if len(line) > max_bytes:
            yield RawRow(rel, str(number), error=Reject("oversized", f"{len(line):,} bytes"))
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield RawRow(rel, str(number), error=Reject("malformed", f"invalid UTF-8 at byte {exc.start}"))
            continue
        try:
            yield RawRow(rel, str(number), value=json.loads(text))
        except json.JSONDecodeError as exc:
            yield RawRow(rel, str(number), error=Reject("malformed", f"invalid JSON: {exc.msg} at column {exc.colno}"))


def _iter_json_array(data: bytes, rel: str, max_bytes: int) -> Iterator[RawRow]:
    """Elements of a top-level JSON array, decoded one at a time so that a bad element is located."""
    try:
        text, lossy = data.decode("utf-8"), False
    except UnicodeDecodeError:
        text, lossy = data.decode("utf-8", errors="surrogateescape"), True
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    index = 0
    while True:
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == "]":
            return
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # Past a syntax error no later element can be located, so no row could be counted: stop here.
            raise SourceFormatError(
                f"{rel}: invalid JSON in array element [{index}] at line {exc.lineno}, column {exc.colno} ({exc.msg}); "
                f"{index} elements before it were read, the rest of the file cannot be located"
            ) from None
        if end - pos > max_bytes:
            yield RawRow(rel, f"[{index}]", error=Reject("oversized", f"{end - pos:,} characters"))
        elif lossy and _has_bad_utf8(text, pos, end):
            yield RawRow(rel, f"[{index}]", error=Reject("malformed", "invalid UTF-8"))
        else:
            yield RawRow(rel, f"[{index}]", value=value)
        index += 1
        pos = _skip_space(text, end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] == "]":
            if _skip_space(text, pos + 1) < len(text):
                line = text.count("\n", 0, pos + 1) + 1
                raise SourceFormatError(f"{rel}: content after the closing ] of the array (line {line}); expected one JSON array")
            return
        else:
            raise SourceFormatError(f"{rel}: the array is cut short or misses a comma after element [{index - 1}]")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _has_bad_utf8(text: str, start: int, end: int) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text[start:end])


def _iter_parquet(path: Path, rel: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise SourceFormatError(f"{path}: not a readable parquet file ({exc})") from None
    index = 0
    for batch in table.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield RawRow(rel, f"#{index}", value=row)
            index += 1


def _iter_hub(name: str, src: SourceConfig) -> Iterator[RawRow]:
    import datasets

    try:
        ds = datasets.load_dataset(
            src.hub_id,
            name=src.hub_config,
            revision=src.revision,
            data_files=list(src.files) or None,
            split=src.split,
        )
    except Exception as exc:  # network, auth, missing files: all end the same way for the user
        raise SourceFormatError(
            f"cannot load {src.hub_id!r} from the hub ({type(exc).__name__}: {exc}). Download a snapshot and pass "
            f"--set data.sources.{name}.path=DIR, or use the demo data (origin: demo)."
        ) from None
    for index, row in enumerate(ds):
        yield RawRow(src.hub_id, f"#{index}", value=row)
