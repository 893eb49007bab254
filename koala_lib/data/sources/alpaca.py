"""Stanford Alpaca: `{"instruction", "input", "output"}` (a JSON array, or parquet rows with an extra `text`).

The user turn is the instruction, followed by the input after a blank line when there is one.
"""

from __future__ import annotations

from ..schema import Record, Reject, Turn, require

SCHEMA = '[{"instruction": str, "input": str, "output": str}, ...]'


def parse(row, key: str, src, data) -> list[Record]:
    instruction = require(row, "instruction", str).strip()
    extra = row.get("input", "")
    if extra is None:
        extra = ""
    if not isinstance(extra, str):
        raise Reject("malformed", f"field input is {type(extra).__name__}, expected str")
    output = require(row, "output", str).strip()
    if not instruction or not output:
        raise Reject("empty", "empty instruction" if not instruction else "empty output")
    prompt = f"{instruction}\n\n{extra.strip()}" if extra.strip() else instruction
    return [Record(f"alpaca:{key}", "alpaca", (Turn("user", prompt), Turn("assistant", output)), "none", {})]
