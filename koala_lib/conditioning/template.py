"""Koala's chat template with preference markers, and tokenization with a loss mask taken from character offsets.

    BEGINNING OF CONVERSATION: USER: {q1} GPT: {a1}<eos>USER: {q2} GPT: {a2}<eos>

An answer is conditioned on its record's marker (`GPT:` for positive or unlabelled records, `An Unhelpful
Answer:` for negative ones, by default). Exactly one space separates a marker from its answer, and an inference
prompt ends with the marker alone, so the answer's first token carries the space as in training: the tokens of
`template.prompt(history, query)` are a prefix of the training tokens of the same conversation.

The loss mask is 1 on every token that overlaps an answer or the EOS closing it, 0 elsewhere (the opening text,
user turns, markers, the separating space when it is a token of its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from koala_lib.config import Config, ConditioningConfig
from koala_lib.data.schema import Record, Turn


@dataclass(frozen=True)
class Rendered:
    text: str
    trained: tuple[tuple[int, int], ...]  # character spans [start, end): each answer and the EOS after it


class Template:
    """Renders records for training and conversations for inference, from one set of markers."""

    def __init__(self, cfg: ConditioningConfig, eos: str):
        self.cfg = cfg
        self.eos = eos

    def _query(self, first: bool, query: str, marker: str) -> str:
        opening = f"{self.cfg.beginning} " if first else ""
        return f"{opening}{self.cfg.user_marker} {query} {marker}"

    def render(self, record: Record) -> Rendered:
        """The training text of a record and the character spans the loss is taken on."""
        marker = self.cfg.marker(record.preference)
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        for i in range(0, len(record.turns), 2):
            query, answer = record.turns[i].text, record.turns[i + 1].text
            head = self._query(i == 0, query, marker) + (" " if answer else "")
            parts.append(head)
            pos += len(head)
            parts.append(answer + self.eos)
            spans.append((pos, pos + len(answer) + len(self.eos)))
            pos = spans[-1][1]
        return Rendered("".join(parts), tuple(spans))

    def prompt(self, history: Sequence[Turn], query: str) -> str:
        """An inference prompt: earlier turns (answers under the positive marker), then the query and the marker."""
        marker = self.cfg.marker("positive")
        text = ""
        for i in range(0, len(history), 2):
            answer = history[i + 1].text
            text += self._query(i == 0, history[i].text, marker) + (" " if answer else "") + answer + self.eos
        return text + self._query(not history, query, marker)


def load_tokenizer(cfg: Config):
    """The profile's tokenizer: `model.tokenizer`, else the base checkpoint's (the embedded SmolLM2 by default)."""
    from transformers import AutoTokenizer

    name = cfg.model.tokenizer or cfg.model.base
    if name == "default":
        from koala_lib.model.gguf_default import default_model_dir

        name = str(default_model_dir())
    return AutoTokenizer.from_pretrained(name)


def template_for(cfg: Config, tokenizer) -> Template:
    """The template with the tokenizer's EOS token between turns (the literal `</s>` when it has none)."""
    return Template(cfg.conditioning, tokenizer.eos_token or "</s>")


@dataclass
class Example:
    id: str
    source: str
    preference: str
    ids: np.ndarray  # int32 [T]
    mask: np.ndarray  # uint8 [T]: 1 where the token is a trained target
    exchanges: int  # exchanges kept (after a cut at a turn boundary)
    total_exchanges: int  # exchanges in the record


def tokenize(tokenizer, rendered: Sequence[Rendered]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids and loss masks for rendered texts, one batched call (BOS as the tokenizer config says)."""
    enc = tokenizer([r.text for r in rendered], return_offsets_mapping=True, add_special_tokens=True)
    out = []
    for r, ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        mask = np.zeros(len(ids), dtype=np.uint8)
        real = offsets[:, 1] > offsets[:, 0]  # special tokens added by the tokenizer have empty offsets
        for start, end in r.trained:
            mask |= (real & (offsets[:, 0] < end) & (offsets[:, 1] > start)).astype(np.uint8)
        out.append((np.asarray(ids, dtype=np.int32), mask))
    return out


def cut_to_length(ids: np.ndarray, mask: np.ndarray, eos_id: int | None, seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Keep the longest run of whole exchanges that fits in `seq_len` tokens; returns ids, mask, exchanges kept.

    An exchange ends at the trained EOS token that closes its answer; 0 exchanges kept means none fits.
    """
    ends = np.flatnonzero((mask == 1) & (ids == eos_id)) + 1 if eos_id is not None else np.array([len(ids)])
    if len(ids) <= seq_len:
        return ids, mask, len(ends)
    fitting = ends[ends <= seq_len]
    if len(fitting) == 0:
        return ids[:0], mask[:0], 0
    cut = int(fitting[-1])
    return ids[:cut], mask[:cut], len(fitting)


def highlight_html(tokenizer, ids: np.ndarray, mask: np.ndarray) -> str:
    """HTML of a tokenized example: trained tokens on green, the rest grey, token boundaries visible."""
    import html

    pieces = []
    for tok, m in zip(ids.tolist(), mask.tolist()):
        text = html.escape(tokenizer.decode([tok]))
        style = "background:#c8ecc8;color:#0b3d0b" if m else "background:#eeeeee;color:#666666"
        pieces.append(f'<span style="{style};border-right:1px solid #fff;white-space:pre-wrap">{text}</span>')
    legend = '<div style="font-size:85%;margin-bottom:4px"><span style="background:#c8ecc8">trained (mask 1)</span> <span style="background:#eeeeee">context (mask 0)</span></div>'
    return legend + '<div style="font-family:monospace;line-height:1.7">' + "".join(pieces) + "</div>"


def marked_text(tokenizer, ids: np.ndarray, mask: np.ndarray) -> str:
    """Plain text of an example with trained spans between ⟦ and ⟧ (for terminals and tests)."""
    out, inside = [], False
    for tok, m in zip(ids.tolist(), mask.tolist()):
        if m and not inside:
            out.append("⟦")
        elif not m and inside:
            out.append("⟧")
        inside = bool(m)
        out.append(tokenizer.decode([tok]))
    return "".join(out) + ("⟧" if inside else "")
