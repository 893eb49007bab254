"""One record type for every pairwise judgment, whoever made it (a rater, an MTurk worker, an LLM judge).

    items = pair_items(answers, [("koala_all", "base")])     # what gets judged
    write_judgments(path, judgments); read_judgments(path)    # JSONL, one Judgment per line

Conventions (every source converts to these before writing):
- `verdict` is about the models, not the screen: "A" means `model_a` gave the better answer, "B" that `model_b`
  did, "tie" neither. Sides shown on screen are undone before a Judgment is made.
- `swapped` is True when `model_a`'s answer was shown second (on the right, or as "Assistant B"), so position
  bias can be measured: the answer shown first won when (verdict == "A") != swapped.
- `time` is ISO 8601 in UTC.
- `preference` (optional) is a judge's soft preference for `model_a`, in [0, 1] (1: model_a better, 0.5: even),
  kept where a judge reads probabilities (the LLM judge's logprobs mode); None for a hard verdict.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

from koala_lib.files import atomic_text

Verdict = Literal["A", "B", "tie"]
VERDICTS: tuple[str, ...] = ("A", "B", "tie")
SOURCES: tuple[str, ...] = ("rater", "mturk", "llm")


def swap(verdict: str) -> str:
    """The same verdict with the two sides exchanged (A <-> B; a tie stays a tie)."""
    return {"A": "B", "B": "A", "tie": "tie"}[verdict]


class JudgmentError(ValueError):
    """A judgment row is malformed; the message names the file, the line and the field."""


@dataclass(frozen=True)
class Judgment:
    prompt_id: str  # the test prompt's id (e.g. "koala_17" or "user_oriented_task_4")
    test_set: str  # "koala" | "alpaca"
    model_a: str
    model_b: str
    verdict: Verdict  # "A": model_a better, "B": model_b better, "tie"
    judge: str  # rater id, MTurk WorkerId, or the judge model's name
    swapped: bool  # model_a's answer was shown second
    time: str  # ISO 8601, UTC
    source: str = "rater"  # "rater" | "mturk" | "llm"
    preference: float | None = None  # soft preference for model_a in [0, 1], where the judge gave one

    def __post_init__(self) -> None:
        if self.preference is not None and not 0.0 <= self.preference <= 1.0:
            raise JudgmentError(f"preference {self.preference!r} is not in [0, 1]")
        if self.verdict not in VERDICTS:
            raise JudgmentError(f"verdict {self.verdict!r} is not one of {', '.join(VERDICTS)}")
        if self.model_a == self.model_b:
            raise JudgmentError(f"model_a and model_b are both {self.model_a!r}")
        if self.source not in SOURCES:
            raise JudgmentError(f"source {self.source!r} is not one of {', '.join(SOURCES)}")

    @property
    def first_won(self) -> bool | None:
        """Whether the answer shown first won; None for a tie."""
        if self.verdict == "tie":
            return None
        return (self.verdict == "A") != self.swapped

    def oriented(self, model_a: str, model_b: str) -> "Judgment":
        """The same judgment with `model_a` first (verdict and swap flipped if the pair was stored the other way)."""
        if (self.model_a, self.model_b) == (model_a, model_b):
            return self
        if (self.model_a, self.model_b) != (model_b, model_a):
            raise ValueError(f"judgment of {self.model_a} vs {self.model_b} is not about {model_a} vs {model_b}")
        return Judgment(self.prompt_id, self.test_set, model_a, model_b, swap(self.verdict), self.judge, not self.swapped,
                        self.time, self.source, None if self.preference is None else 1.0 - self.preference)  # type: ignore[arg-type]

    def to_row(self) -> dict:
        return asdict(self)

    @classmethod
    def from_row(cls, row: Mapping, where: str = "") -> "Judgment":
        if not isinstance(row, Mapping):
            raise JudgmentError(f"{where}expected a JSON object, got {type(row).__name__}")
        kinds = {"swapped": bool}
        values = {}
        if row.get("preference") is not None:  # optional: older files and hard verdicts have none
            if isinstance(row["preference"], bool) or not isinstance(row["preference"], (int, float)):
                raise JudgmentError(f"{where}field 'preference' should be a number in [0, 1], got {row['preference']!r}")
            values["preference"] = float(row["preference"])
        for f in fields(cls):
            if f.name == "preference":
                continue
            if f.name not in row:
                raise JudgmentError(f"{where}missing field {f.name!r}")
            value = row[f.name]
            if not isinstance(value, kinds.get(f.name, str)):
                raise JudgmentError(f"{where}field {f.name!r} should be {kinds.get(f.name, str).__name__}, got {value!r}")
            values[f.name] = value
        try:
            return cls(**values)
        except JudgmentError as exc:
            raise JudgmentError(f"{where}{exc}") from None


def now() -> str:
    """The current time as stored in judgments."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_judgments(path: Path, judgments: Iterable[Judgment]) -> Path:
    """JSONL, one judgment per line, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(path, "".join(json.dumps(j.to_row(), ensure_ascii=False) + "\n" for j in judgments))
    return path


def read_judgments(path: Path) -> list[Judgment]:
    """Judgments from a JSONL file; a malformed line is an error naming the file and the line."""
    path = Path(path)
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}: "
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JudgmentError(f"{where}not JSON ({exc.msg})") from None
        out.append(Judgment.from_row(row, where))
    return out


# ----------------------------------------------------------------------------- what gets judged


@dataclass(frozen=True)
class PairItem:
    """One prompt with two models' answers: the unit a rater, a worker or a judge sees (without the names)."""

    prompt_id: str
    test_set: str
    prompt: str
    model_a: str
    answer_a: str
    model_b: str
    answer_b: str

    @property
    def key(self) -> str:
        return f"{self.test_set}/{self.prompt_id}/{self.model_a}/{self.model_b}"


def pair_items(answers: Mapping[str, Sequence[Mapping]], pairs: Sequence[tuple[str, str]]) -> list[PairItem]:
    """Items for each (model_a, model_b) pair on every prompt both models answered.

    `answers` maps a model name to its rows in stage 4's format (`id`, `test_set`, `instruction`, `output`).
    Prompts answered by only one of the two are left out of that pair (stage 4 reports them as missing)."""
    for a, b in pairs:
        for name in (a, b):
            if name not in answers:
                raise KeyError(f"no answers for model {name!r} (have: {', '.join(sorted(answers)) or 'none'})")
    index = {name: {(r["test_set"], r["id"]): r for r in rows} for name, rows in answers.items()}
    items = []
    for a, b in pairs:
        for key in sorted(index[a].keys() & index[b].keys()):
            ra, rb = index[a][key], index[b][key]
            items.append(PairItem(ra["id"], ra["test_set"], ra["instruction"], a, ra["output"], b, rb["output"]))
    return items
