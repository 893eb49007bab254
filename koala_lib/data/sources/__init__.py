"""One module per upstream dataset. Each exposes `SCHEMA` (the expected row shape, for error messages) and
`parse(row, key, src, data) -> list[Record]`, which raises `Reject` for a row it cannot use.

`key` is the row's place in its file (e.g. `all.jsonl:7`); records take it as their id when the row has none.
"""

from __future__ import annotations

from types import ModuleType

from . import alpaca, hc3, hh, oig, sharegpt, summarize, webgpt

SOURCES: dict[str, ModuleType] = {
    "sharegpt": sharegpt,
    "hc3": hc3,
    "oig": oig,
    "alpaca": alpaca,
    "hh": hh,
    "webgpt": webgpt,
    "summarize": summarize,
}
