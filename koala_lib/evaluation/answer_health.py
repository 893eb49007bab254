"""Answer health before judging: empty answers, answers cut at the token limit, and degenerate ones, per model.

    health = answer_health(answers, turn_markers(cfg))     # model -> counts over its answers
    judged, by_rule = split_by_rule(items)                 # pairs with an empty answer are not sent to a judge

An answer is
- `empty` when it holds nothing but white space;
- `cut` when generation stopped at the token limit (`finish_reason` "length");
- `degenerate` when it holds a turn marker of the Koala template (`USER:`, `GPT:`, the beginning line, the negative
  marker: the model is writing the next turns of the conversation, e.g. "Priya GPT: Thank you...") or repeats
  itself (at least 12 words and under half of its word 4-grams distinct).

A pair with an empty answer is judged by rule: the non-empty answer wins, two empty answers tie. Such judgments
carry `judge` = RULE_JUDGE and a preference of 1, 0 or 0.5, so that they count in every comparison exactly as a
judge's would, and the report says how many there were.
"""

from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

from koala_lib.evaluation.judgments import Judgment, PairItem, now

RULE_JUDGE = "rule: empty answer"
KINDS = ("answers", "empty", "cut", "degenerate", "turn_marker", "repetition")


def turn_markers(cfg) -> tuple[str, ...]:
    """The Koala template's markers, which no answer should contain."""
    c = cfg.conditioning
    return tuple(dict.fromkeys(m for m in (c.beginning, c.user_marker, c.marker("positive"), c.marker("negative")) if m))


def repeats_itself(text: str, n: int = 4, min_words: int = 12) -> bool:
    words = text.split()
    if len(words) < min_words:
        return False
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) < len(grams) / 2


def problems(row: Mapping, markers: Sequence[str]) -> set[str]:
    """The health problems of one stage-4 answer row (`output`, optional `finish_reason`)."""
    text = row.get("output") or ""
    out = set()
    if not text.strip():
        return {"empty"} | ({"cut"} if row.get("finish_reason") == "length" else set())
    if row.get("finish_reason") == "length":
        out.add("cut")
    if any(m in text for m in markers):
        out |= {"turn_marker", "degenerate"}
    if repeats_itself(text):
        out |= {"repetition", "degenerate"}
    return out


def answer_health(answers: Mapping[str, Sequence[Mapping]], markers: Sequence[str], keep=lambda row: True) -> dict[str, dict]:
    """Per model, the counts of KINDS over the answers `keep` accepts (e.g. prompts the leakage filter kept)."""
    out = {}
    for model, rows in sorted(answers.items()):
        counts = Counter({k: 0 for k in KINDS})
        for row in rows:
            if keep(row):
                counts["answers"] += 1
                counts.update(problems(row, markers))
        out[model] = dict(counts)
    return out


def split_by_rule(items: Sequence[PairItem]) -> tuple[list[PairItem], list[Judgment]]:
    """(items for the judge, judgments by rule of the pairs holding an empty answer)."""
    judged, ruled = [], []
    stamp = now()
    for item in items:
        empty_a, empty_b = not item.answer_a.strip(), not item.answer_b.strip()
        if not (empty_a or empty_b):
            judged.append(item)
            continue
        verdict, pref = ("tie", 0.5) if empty_a and empty_b else (("B", 0.0) if empty_a else ("A", 1.0))
        ruled.append(Judgment(item.prompt_id, item.test_set, item.model_a, item.model_b, verdict, RULE_JUDGE, False,  # type: ignore[arg-type]
                              stamp, "llm", pref))
    return judged, ruled


def health_line(health: Mapping[str, Mapping], models: Sequence[str] | None = None) -> str:
    """One line for tables and figures: empty / cut / degenerate answers per model."""
    names = [m for m in (models or sorted(health)) if m in health]
    parts = [f"{m} {h['empty']}/{h['cut']}/{h['degenerate']} of {h['answers']}" for m in names for h in [health[m]]]
    return "answers empty / cut at the token limit / degenerate: " + ", ".join(parts)
