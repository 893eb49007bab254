"""Anthropic HH (`Anthropic/hh-rlhf`): `{"chosen": transcript, "rejected": transcript}` per line, in four data_dirs.

A transcript is `"\n\nHuman: ...\n\nAssistant: ..."`. As in the released preprocessing, the chosen transcript
is a positive record and the rejected one a negative record (every answer in it conditioned on the negative
marker). Rules: consecutive turns of one role are merged (a few upstream transcripts repeat `Assistant:`);
an empty final answer is kept, because labellers sometimes preferred saying nothing. The pair is one row:
if either side cannot be parsed, the row is rejected.
"""

from __future__ import annotations

import re

from ..schema import Record, Reject, Turn, check_turns, merge_roles, require

SCHEMA = '{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."} per line'

_SPEAKER = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def transcript_turns(text: str, side: str) -> tuple[Turn, ...]:
    pieces = _SPEAKER.split(text)
    if len(pieces) < 3 or pieces[0].strip():
        raise Reject("malformed", f"{side} is not a Human/Assistant transcript")
    turns = [Turn("user" if who == "Human" else "assistant", body.strip()) for who, body in zip(pieces[1::2], pieces[2::2])]
    return check_turns(tuple(merge_roles(turns)), allow_empty_last=True)


def parse(row, key: str, src, data) -> list[Record]:
    chosen = transcript_turns(require(row, "chosen", str), "chosen")
    rejected = transcript_turns(require(row, "rejected", str), "rejected")
    meta = {"file": key.split(":")[0]}
    records = [Record(f"hh:{key}:pos", "hh", chosen, "positive", meta)]
    if data.pairs == "positive_negative":
        records.append(Record(f"hh:{key}:neg", "hh", rejected, "negative", meta))
    return records
