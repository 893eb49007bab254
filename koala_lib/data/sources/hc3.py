"""HC3 (`Hello-SimpleAI/HC3`, config `all`): `{"id", "question", "human_answers": [..], "chatgpt_answers": [..], "source"}`.

One record per answer. `answers: both` (the blog) keeps human and ChatGPT answers; `human` keeps only the
human ones, which is what the released preprocessing read.
"""

from __future__ import annotations

from ..schema import Record, Reject, Turn, require

SCHEMA = '{"id": str, "question": str, "human_answers": [str], "chatgpt_answers": [str], "source": str} per line'


def parse(row, key: str, src, data) -> list[Record]:
    question = require(row, "question", str).strip()
    kinds = [("human", require(row, "human_answers", list))]
    chatgpt = require(row, "chatgpt_answers", list)
    if src.answers == "both":
        kinds.append(("chatgpt", chatgpt))
    if not question:
        raise Reject("empty", "empty question")
    upstream_id = row.get("id")
    base = f"hc3:{upstream_id if isinstance(upstream_id, (str, int)) else key}"
    records = []
    for kind, answers in kinds:
        for i, answer in enumerate(answers):
            if not isinstance(answer, str):
                raise Reject("malformed", f"{kind}_answers[{i}] is {type(answer).__name__}, expected str")
            if answer.strip():
                meta = {"answer_by": kind, "category": row.get("source")}
                turns = (Turn("user", question), Turn("assistant", answer.strip()))
                records.append(Record(f"{base}:{kind}{i}", "hc3", turns, "none", meta))
    if not records:
        raise Reject("empty", "no non-empty answer")
    return records
