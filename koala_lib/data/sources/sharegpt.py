"""ShareGPT: `{"id", "conversations": [{"from": "human"|"gpt"|"system"|..., "value"}]}` in a JSON array.

Raw dumps hold answers as ChatGPT's HTML; the `_cleaned_split` files hold markdown. Both become markdown.
Repairs, each counted in the report: `system` turns dropped; an empty turn dropped with the turn it pairs
with (an empty answer takes its question along, an empty question its answer), so no exchange is invented;
consecutive turns of one role merged; leading answers (a conversation that starts with `gpt`) dropped; a
final unanswered question dropped. An unknown role makes the row `malformed`.
"""

from __future__ import annotations

from ..clean import answer_to_markdown
from ..schema import Record, Reject, Turn, check_turns, merge_roles, require

SCHEMA = '[{"id": str, "conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}, ...]'

ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant", "bard": "assistant", "bing": "assistant",
    "system": "system",
}


def parse(row, key: str, src, data) -> list[Record]:
    conversation = require(row, "conversations", list)
    upstream_id = row.get("id") if isinstance(row.get("id"), str) else None
    turns: list[Turn] = []
    repairs: list[str] = []
    orphaned = False  # answers after an empty question are dropped with it
    for i, turn in enumerate(conversation):
        where = f"conversations[{i}]"
        speaker = require(turn, "from", str, where)
        value = require(turn, "value", str, where)
        role = ROLES.get(speaker.lower())
        if role is None:
            raise Reject("malformed", f"{where}: unknown role {speaker!r}")
        if role == "system":
            repairs.append("system_turn_dropped")
            continue
        text = answer_to_markdown(value) if role == "assistant" else value.strip()
        if role == "user":
            orphaned = not text
            if orphaned:
                repairs.append("empty_question_dropped_with_answer")
                continue
        elif orphaned:
            continue
        elif not text:
            repairs.append("empty_answer_dropped_with_question")
            if turns and turns[-1].role == "user":
                turns.pop()
            continue
        turns.append(Turn(role, text))
    merged = merge_roles(turns)
    if len(merged) < len(turns):
        repairs.append("same_role_turns_merged")
    while merged and merged[0].role == "assistant":
        merged.pop(0)
        repairs.append("leading_answer_dropped")
    if merged and merged[-1].role == "user":
        merged.pop()
        repairs.append("unanswered_question_dropped")
    if not merged:
        raise Reject("empty", "no question with an answer")
    meta = {"upstream_id": upstream_id, "repairs": repairs}
    if isinstance(row.get("model"), str):
        meta["model"] = row["model"]
    return [Record(f"sharegpt:{upstream_id or key}", "sharegpt", check_turns(tuple(merged)), "none", meta)]
