"""OIG (`laion/OIG`): `{"text": "<human>: ...\n<bot>: ...", "metadata": {...}}` per line.

Koala used three files: grade-school math instructions, poetry to songs, plot/screenplay/books dialogue.
Text before the first tag, or no tag at all, is `malformed`; consecutive turns of one role are merged and a
final unanswered question dropped.
"""

from __future__ import annotations

import re

from ..schema import Record, Reject, Turn, check_turns, merge_roles, require

SCHEMA = '{"text": "<human>: ...\\n<bot>: ...", "metadata": {...}} per line'

_TAG = re.compile(r"^<(human|bot)>:[ \t]?", re.M)


def parse(row, key: str, src, data) -> list[Record]:
    text = require(row, "text", str)
    pieces = _TAG.split(text)
    if len(pieces) < 3:
        raise Reject("malformed", "no <human>: / <bot>: tag")
    if pieces[0].strip():
        raise Reject("malformed", "text before the first <human>: tag")
    turns = [Turn("user" if tag == "human" else "assistant", body.strip()) for tag, body in zip(pieces[1::2], pieces[2::2])]
    turns = merge_roles(turns)
    if turns and turns[-1].role == "user":
        turns.pop()
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    return [Record(f"oig:{key}", "oig", check_turns(tuple(turns)), "none", {"file": key.split(":")[0], **meta})]
