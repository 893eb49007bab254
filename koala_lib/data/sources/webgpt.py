"""WebGPT comparisons (`openai/webgpt_comparisons`): a question, two answers with their quotes, and scores.

`score_0 + score_1 == 0`; the higher-scored answer is positive, the other negative; a tie (both 0) is
rejected as `tie`, as in the released code. Quotes, when present, are rendered into the user turn.
"""

from __future__ import annotations

from ..schema import Record, Reject, Turn, require

SCHEMA = (
    '{"question": {"full_text": str, ...}, "quotes_0": {"title": [str], "extract": [str]}, "answer_0": str, '
    '"score_0": float, "quotes_1": ..., "answer_1": str, "score_1": float} per row'
)

QUOTES_HEADER = "Use the following sources in your answer:"


def render_prompt(question: str, titles: list, extracts: list) -> str:
    """The question, then the numbered quotes the answer may cite as [1], [2], ..."""
    if not titles:
        return question
    lines = [f"[{i}] {t.strip()}: {e.strip()}" for i, (t, e) in enumerate(zip(titles, extracts), start=1)]
    return f"{question}\n\n{QUOTES_HEADER}\n" + "\n".join(lines)


def _side(row, i: int, question: str) -> tuple[str, str]:
    answer = require(row, f"answer_{i}", str).strip()
    quotes = row.get(f"quotes_{i}") or {"title": [], "extract": []}
    titles = require(quotes, "title", list, f"quotes_{i}")
    extracts = require(quotes, "extract", list, f"quotes_{i}")
    if len(titles) != len(extracts) or not all(isinstance(x, str) for x in titles + extracts):
        raise Reject("malformed", f"quotes_{i}: titles and extracts must be strings of equal count")
    if not answer:
        raise Reject("empty", f"answer_{i} is empty")
    return render_prompt(question, titles, extracts), answer


def parse(row, key: str, src, data) -> list[Record]:
    question = require(require(row, "question", dict), "full_text", str, "question").strip()
    scores = [require(row, f"score_{i}", (int, float)) for i in (0, 1)]
    sides = [_side(row, i, question) for i in (0, 1)]
    if not question:
        raise Reject("empty", "empty question")
    if scores[0] == scores[1]:
        raise Reject("tie", f"scores {scores[0]} and {scores[1]}")
    best = 0 if scores[0] > scores[1] else 1
    qid = row["question"].get("id") if isinstance(row["question"].get("id"), str) else key
    meta = {"question_id": qid, "dataset": row["question"].get("dataset")}
    out = []
    for idx, pref in ((best, "positive"), (1 - best, "negative")):
        if pref == "negative" and data.pairs != "positive_negative":
            continue
        prompt, answer = sides[idx]
        out.append(Record(f"webgpt:{key}:{pref[:3]}", "webgpt", (Turn("user", prompt), Turn("assistant", answer)), pref, {**meta, "score": scores[idx]}))
    return out
