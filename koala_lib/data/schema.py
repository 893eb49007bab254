"""The one record every source is turned into, and the named reasons a row can be rejected for.

    Record(id="hh:harmless-base/train.jsonl.gz:12:neg", source="hh",
           turns=(Turn("user", "How do I ..."), Turn("assistant", "...")),
           preference="negative", meta={"file": "harmless-base/train.jsonl.gz"})

`preference` qualifies every assistant turn of the record: Koala's released preprocessing labelled a
whole rejected transcript negative. A record always starts with a user turn, alternates, and ends with
an assistant turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["user", "assistant"]
Preference = Literal["positive", "negative", "none"]

# Why a row did not become a record; every rejected row is counted under exactly one of these.
REJECTION_REASONS = {
    "malformed": "not valid JSON or UTF-8, a missing field, a wrong type, an unknown role",
    "oversized": "the raw row is larger than data.max_record_bytes",
    "empty": "an empty turn, or no user turn followed by an answer",
    "tie": "a comparison whose two answers scored the same (WebGPT)",
    "keyword": "mentions a filtered keyword (data.sources.sharegpt.keywords)",
    "non_english": "the language identifier did not say the configured language",
    "duplicate": "the dedup key was already seen",
    "too_long": "a single exchange is longer than data.max_chars, so no split can keep it whole",
    "cap": "beyond the source's cap (a seeded sample is kept)",
}


class Reject(Exception):
    """Raised by a parser or filter: the row is counted under `reason`; `detail` goes to the log."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REJECTION_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str


@dataclass(frozen=True)
class Record:
    id: str
    source: str
    turns: tuple[Turn, ...]
    preference: Preference = "none"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def chars(self) -> int:
        return sum(len(t.text) for t in self.turns)

    def user_turns(self) -> list[str]:
        return [t.text for t in self.turns if t.role == "user"]

    def to_row(self) -> dict[str, Any]:
        """A flat row for Arrow / JSONL: `meta` is a JSON string so that every source shares one schema."""
        return {
            "id": self.id,
            "source": self.source,
            "preference": self.preference,
            "turns": [{"role": t.role, "text": t.text} for t in self.turns],
            "meta": json.dumps(self.meta, ensure_ascii=False, sort_keys=True),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Record":
        return cls(
            id=row["id"],
            source=row["source"],
            turns=tuple(Turn(t["role"], t["text"]) for t in row["turns"]),
            preference=row["preference"],
            meta=json.loads(row["meta"]) if isinstance(row["meta"], str) else dict(row["meta"]),
        )


def dialogue(pairs: list[tuple[str, str]]) -> tuple[Turn, ...]:
    """Turns from (user, assistant) pairs."""
    return tuple(t for q, a in pairs for t in (Turn("user", q), Turn("assistant", a)))


def check_turns(turns: tuple[Turn, ...], allow_empty_last: bool = False) -> tuple[Turn, ...]:
    """Validate the record shape: user/assistant alternating, starting with user, ending with an answer.

    An empty turn is `empty`, except the final answer when `allow_empty_last` (Anthropic HH, where labellers
    sometimes preferred an empty reply).
    """
    if not turns:
        raise Reject("empty", "no turns")
    for i, t in enumerate(turns):
        if t.role != ("user" if i % 2 == 0 else "assistant"):
            raise Reject("malformed", f"turn {i} is {t.role}, turns must alternate starting with user")
        if not t.text.strip() and not (allow_empty_last and i == len(turns) - 1):
            raise Reject("empty", f"turn {i} ({t.role}) is empty")
    if turns[-1].role != "assistant":
        raise Reject("empty", "no answer after the last user turn")
    return turns


def merge_roles(turns: list[Turn]) -> list[Turn]:
    """Join consecutive turns of the same role with a blank line (non-alternating transcripts)."""
    out: list[Turn] = []
    for t in turns:
        if out and out[-1].role == t.role:
            out[-1] = Turn(t.role, f"{out[-1].text}\n\n{t.text}".strip())
        else:
            out.append(t)
    return out


def require(row: Any, key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    """row[key] with a type check; a missing key or a wrong type is `malformed`, naming the field."""
    if not isinstance(row, dict):
        raise Reject("malformed", f"{where or 'row'} is a {type(row).__name__}, expected an object")
    if key not in row:
        raise Reject("malformed", f"missing field {where + '.' if where else ''}{key}")
    value = row[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        names = "/".join(k.__name__ for k in _as_tuple(kind))
        raise Reject("malformed", f"field {where + '.' if where else ''}{key} is {type(value).__name__}, expected {names}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
