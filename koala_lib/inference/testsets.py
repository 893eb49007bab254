"""The test sets every model answers in stage 4: the Koala test set and the Alpaca test set.

    cfg = load("demo", ["eval.test_sets.alpaca.path=/data/user_oriented_instructions.jsonl"])
    result = load_test_set(cfg, "alpaca")
    result.prompts[0]   # TestPrompt(id='user_oriented_task_0', test_set='alpaca', instruction='...')
    result.rejected     # Counter({'missing_field': 1}): bad rows, by reason

Formats (JSON lines, as upstream):
  koala   `{"id": "koala_0", "prompt": "..."}`, 180 lines (arnav-gudibande/koala-test-set).
  alpaca  `{"id": "user_oriented_task_0", "motivation_app": "...", "instruction": "...",
          "instances": [{"input": "...", "output": "..."}]}`, 252 lines (self-instruct's human_eval).
          The prompt is `instruction + "\\n\\n" + input` of the first instance, or the instruction alone
          when that input is empty (blank). Texts are kept verbatim, never stripped.

Source: `path` if set (a file, or a folder holding the upstream file name); else `origin: demo` reads the
kit's own prompts (koala_lib/data/demo/eval/); else `origin: public` downloads `url` once into
`$KOALA_CACHE/test_sets/` (default ~/.cache/koala-kit/test_sets/) and reads it from there afterwards.

A bad row is counted in `rejected` under one reason, never dropped silently, and its `file:line` is kept
in `problems`: `not_json` (not JSON, or not UTF-8), `not_object` (JSON, but not an object),
`missing_field` (a field absent or of the wrong type), `empty_prompt` (a blank prompt/instruction),
`duplicate_id` (an id seen on an earlier line; the first one is kept).

Selection, in this order, reproducible by hand:
  1. sort the prompts by id in natural order (`koala_2` before `koala_10`);
  2. if `subset` is set and smaller than the count n: `idx = numpy.random.default_rng(cfg.seed)
     .choice(n, size=subset, replace=False)`, keep the prompts at `sorted(idx)` (still sorted by id);
  3. if `limit` is set, keep the first `limit`.
With the defaults (seed 0, alpaca subset 180) this gives the kit's Alpaca test set of 180 prompts.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from koala_lib.config import Config, ConfigError, TestSetConfig, resolve_path

TEST_SETS = ("koala", "alpaca")
# the upstream file names, which the demo files share
FILE_NAMES = {"koala": "koala_test_set.jsonl", "alpaca": "user_oriented_instructions.jsonl"}
FORMATS = {
    "koala": 'JSON lines {"id", "prompt"}',
    "alpaca": 'JSON lines {"id", "instruction", "instances": [{"input", "output"}]}',
}


@dataclass(frozen=True)
class TestPrompt:
    __test__ = False  # not a pytest test class

    id: str
    test_set: str  # "koala" | "alpaca"
    instruction: str  # the user query the model answers


@dataclass
class TestSetResult:
    __test__ = False

    prompts: list[TestPrompt]  # after selection (subset, limit)
    source: str  # the file read, or the URL downloaded
    rows: int  # non-blank lines read; rows == valid prompts + sum(rejected.values())
    rejected: Counter = field(default_factory=Counter)  # reason -> rows
    problems: list[str] = field(default_factory=list)  # "file:line: reason: detail", one per rejected row


class BadRow(Exception):
    """A test-set row that cannot be used; `reason` is the counted rejection name."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def load_test_set(cfg: Config, name: str, progress: bool = False) -> TestSetResult:
    """Read, validate and select the prompts of test set `name` ("koala" or "alpaca")."""
    if name not in TEST_SETS:
        raise ConfigError(f"unknown test set {name!r} (allowed: {', '.join(TEST_SETS)})")
    ts: TestSetConfig = getattr(cfg.eval.test_sets, name)
    key = f"eval.test_sets.{name}"
    for option in ("subset", "limit"):
        value = getattr(ts, option)
        if value is not None and value < 1:
            raise ConfigError(f"{key}.{option}: must be at least 1 or null, got {value}")
    path, source = _resolve_source(name, ts, key, progress)
    result = _read(path, name)
    result.source = source
    prompts = sorted(result.prompts, key=lambda p: (natural_key(p.id), p.id))
    if ts.subset is not None and ts.subset < len(prompts):
        idx = np.random.default_rng(cfg.seed).choice(len(prompts), size=ts.subset, replace=False)
        prompts = [prompts[i] for i in sorted(idx)]
    if ts.limit is not None:
        prompts = prompts[: ts.limit]
    result.prompts = prompts
    return result


def natural_key(text: str) -> tuple:
    """Sort key that orders digit runs by value: koala_2 < koala_10."""
    return tuple(int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", text)))


# ----------------------------------------------------------------------------- where the file is


def _resolve_source(name: str, ts: TestSetConfig, key: str, progress: bool) -> tuple[Path, str]:
    """(the local file to read, what to report as the source)."""
    if ts.path:
        path = resolve_path(ts.path)
        if path.is_dir():
            path = path / FILE_NAMES[name]
        if not path.is_file():
            raise ConfigError(f"{key}.path: no such file {path}")
        return path, str(path)
    if ts.origin == "demo":
        path = Path(str(resources.files("koala_lib.data.demo") / "eval" / FILE_NAMES[name]))
        return path, str(path)
    return _download(ts.url, key, progress), ts.url


def _download(url: str, key: str, progress: bool) -> Path:
    """The cached copy of `url`, downloaded first if absent (written to a temp file, then renamed)."""
    from koala_lib.model.gguf_default import cache_dir  # lazy: that module imports gguf and tokenizers

    basename = os.path.basename(urlparse(url).path)
    if not basename:
        raise ConfigError(f"{key}.url: {url!r} does not name a file; set {key}.path=FILE instead")
    target = cache_dir() / "test_sets" / basename
    if target.is_file():
        return target
    if progress:
        print(f"downloading {url} -> {target}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors; a malformed URL is a ValueError
        raise ConfigError(
            f"{key}.url: {url} is unreachable ({exc}). Download it yourself and pass --set {key}.path=FILE"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{basename}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


# ----------------------------------------------------------------------------- reading and validating


def _read(path: Path, name: str) -> TestSetResult:
    result = TestSetResult(prompts=[], source=str(path), rows=0)
    seen: set[str] = set()
    with open(path, "rb") as fh:
        data = fh.read().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        result.rows += 1
        try:
            prompt = parse_row(line, name)
            if prompt.id in seen:
                raise BadRow("duplicate_id", f"id {prompt.id!r} is used on an earlier line")
        except BadRow as bad:
            result.rejected[bad.reason] += 1
            result.problems.append(f"{path.name}:{number}: {bad.reason}: {bad}")
            continue
        seen.add(prompt.id)
        result.prompts.append(prompt)
    if not result.prompts:
        first = f"; first problem: {result.problems[0]}" if result.problems else ""
        raise ConfigError(f"{path}: no valid {name} test prompt in {result.rows} rows (expected {FORMATS[name]}){first}")
    return result


def parse_row(line: bytes, name: str) -> TestPrompt:
    """One JSONL line of test set `name` (koala: `{"id","prompt"}`; alpaca: self-instruct's row, instruction and
    first input joined by a blank line) as a TestPrompt; BadRow names what is wrong."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadRow("not_json", f"invalid UTF-8 at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise BadRow("not_json", f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(row, dict):
        raise BadRow("not_object", f"a JSON {type(row).__name__}, expected an object")
    row_id = _text(row, "id", "id")
    if not row_id.strip():
        raise BadRow("missing_field", "empty id")
    if name == "koala":
        prompt = _text(row, "prompt", "prompt")
    else:
        prompt = _text(row, "instruction", "instruction")
        if not prompt.strip():
            raise BadRow("empty_prompt", "the instruction is blank")
        instances = row.get("instances")
        if not isinstance(instances, list) or not instances:
            raise BadRow("missing_field", "instances: absent or not a non-empty list")
        text = _text(instances[0], "input", "instances[0].input") if isinstance(instances[0], dict) else None
        if text is None:
            raise BadRow("missing_field", "instances[0] is not an object")
        if text.strip():
            prompt = f"{prompt}\n\n{text}"
    if not prompt.strip():
        raise BadRow("empty_prompt", "the prompt is blank")
    return TestPrompt(id=row_id, test_set=name, instruction=prompt)


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise BadRow("missing_field", f"{where}: {'absent' if value is None else type(value).__name__ + ', expected a string'}")
    return value
