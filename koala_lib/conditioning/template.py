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
from pathlib import Path
from typing import Sequence

import numpy as np

from koala_lib.config import Config, ConditioningConfig
from koala_lib.data.schema import Record, Turn


@dataclass(frozen=True)
class Rendered:
    text: str
    trained: tuple[tuple[int, int], ...]  # character spans [start, end): " " + each answer + the EOS after it


WORD_JOINER = "\u2060"  # invisible; breaks a special-token string so that it stays text


class Template:
    """Renders records for training and conversations for inference, from one set of markers.

    `specials` are the tokenizer's special-token strings: one that occurs inside a turn (an answer quoting
    `</s>`, a user typing `<|im_start|>`) gets a word joiner after its first character, so it is tokenized as
    text and can never end an answer or inject a control token.
    """

    def __init__(self, cfg: ConditioningConfig, eos: str, specials: Sequence[str] = ()):
        self.cfg = cfg
        self.eos = eos
        self.specials = tuple(sorted({s for s in (*specials, eos) if s}, key=len, reverse=True))

    def escape(self, text: str) -> str:
        for special in self.specials:
            if special in text:
                text = text.replace(special, special[0] + WORD_JOINER + special[1:])
        return text

    def _query(self, first: bool, query: str, marker: str) -> str:
        opening = f"{self.cfg.beginning} " if first else ""
        return f"{opening}{self.cfg.user_marker} {self.escape(query)} {marker}"

    def render(self, record: Record) -> Rendered:
        """The training text of a record and the character spans the loss is taken on."""
        marker = self.cfg.marker(record.preference)
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        for i in range(0, len(record.turns), 2):
            query, answer = record.turns[i].text, self.escape(record.turns[i + 1].text)
            head = self._query(i == 0, query, marker)
            parts.append(head)
            pos += len(head)
            # The span starts at the joining space: where that space is a token of its own (before a digit,
            # say), it is the first thing the model must produce after the marker.
            body = (" " + answer if answer else "") + self.eos
            parts.append(body)
            spans.append((pos, pos + len(body)))
            pos = spans[-1][1]
        return Rendered("".join(parts), tuple(spans))

    def prompt(self, history: Sequence[Turn], query: str) -> str:
        """An inference prompt: earlier turns (answers under the positive marker), then the query and the marker."""
        marker = self.cfg.marker("positive")
        text = ""
        for i in range(0, len(history), 2):
            answer = self.escape(history[i + 1].text)
            text += self._query(i == 0, history[i].text, marker) + (" " + answer if answer else "") + self.eos
        return text + self._query(not history, query, marker)


def load_tokenizer(cfg: Config):
    """The profile's tokenizer: `model.tokenizer`, else the base checkpoint's (the embedded SmolLM2 by default)."""
    from transformers import AutoTokenizer

    name = cfg.model.tokenizer or cfg.model.base
    if name == "default":
        from koala_lib.model.gguf_default import default_model_dir

        name = str(default_model_dir())
    return AutoTokenizer.from_pretrained(name)


def tokenizer_files(tokenizer) -> list[Path]:
    """The files a tokenizer was loaded from (its folder's tokenizer files), for a stage's manifest."""
    from koala_lib.model.checkpoints import TOKENIZER_FILES

    folder = Path(getattr(tokenizer, "name_or_path", "") or ".")
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()] if folder.is_dir() else []


def template_for(cfg: Config, tokenizer) -> Template:
    """The template with the tokenizer's EOS token between turns (the literal `</s>` when it has none)."""
    return Template(cfg.conditioning, tokenizer.eos_token or "</s>", tokenizer.all_special_tokens)


@dataclass
class Example:
    id: str
    source: str
    preference: str
    ids: np.ndarray  # int32 [T]
    mask: np.ndarray  # uint8 [T]: 1 where the token is a trained target
    exchanges: int  # exchanges kept (after a cut at a turn boundary)
    total_exchanges: int  # exchanges in the record


def tokenize(tokenizer, rendered: Sequence[Rendered]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids, loss mask, exchange ends) per rendered text, in one batched call (BOS as the tokenizer config says).

    `ends[k]` is the token index just past exchange k (its answer and EOS), so a cut there keeps whole exchanges.
    """
    enc = tokenizer([r.text for r in rendered], return_offsets_mapping=True, add_special_tokens=True)
    out = []
    for r, ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        mask = np.zeros(len(ids), dtype=np.uint8)
        real = offsets[:, 1] > offsets[:, 0]  # special tokens added by the tokenizer have empty offsets
        for start, end in r.trained:
            mask |= (real & (offsets[:, 0] < end) & (offsets[:, 1] > start)).astype(np.uint8)
        ends = np.array([int(np.searchsorted(offsets[:, 0] * real + (~real) * -1, end, side="left")) for _, end in r.trained], dtype=np.int64)
        out.append((np.asarray(ids, dtype=np.int32), mask, ends))
    return out


def cut_to_length(ids: np.ndarray, mask: np.ndarray, ends: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Keep the longest run of whole exchanges that fits in `seq_len` tokens; returns ids, mask, exchanges kept.

    0 exchanges kept means not even the first one fits.
    """
    if len(ids) <= seq_len:
        return ids, mask, len(ends)
    fitting = ends[ends <= seq_len]
    if len(fitting) == 0:
        return ids[:0], mask[:0], 0
    cut = int(fitting[-1])
    return ids[:cut], mask[:cut], len(fitting)


def _pieces(tokenizer, ids: np.ndarray, mask: np.ndarray) -> list[tuple[str, int]]:
    """(text, mask) per token, a token merged with the next while it decodes to part of a character."""
    pieces: list[tuple[str, int]] = []
    pending: list[int] = []
    for tok, m in zip(ids.tolist(), mask.tolist()):
        pending.append(tok)
        text = tokenizer.decode(pending)
        if "\ufffd" in text and len(pending) < 4:
            continue
        pieces.append((text, m))
        pending = []
    if pending:
        pieces.append((tokenizer.decode(pending), int(mask[-1])))
    return pieces


def highlight_html(tokenizer, ids: np.ndarray, mask: np.ndarray) -> str:
    """HTML of a tokenized example: trained tokens on green, the rest grey, token boundaries visible."""
    import html

    pieces = []
    for raw, m in _pieces(tokenizer, ids, mask):
        text = html.escape(raw)
        style = "background:#c8ecc8;color:#0b3d0b" if m else "background:#eeeeee;color:#666666"
        pieces.append(f'<span style="{style};border-right:1px solid #fff;white-space:pre-wrap">{text}</span>')
    legend = '<div style="font-size:85%;margin-bottom:4px"><span style="background:#c8ecc8">trained (mask 1)</span> <span style="background:#eeeeee">context (mask 0)</span></div>'
    return legend + '<div style="font-family:monospace;line-height:1.7">' + "".join(pieces) + "</div>"


def marked_text(tokenizer, ids: np.ndarray, mask: np.ndarray) -> str:
    """Plain text of an example with trained spans between ⟦ and ⟧ (for terminals and tests)."""
    out, inside = [], False
    for text, m in _pieces(tokenizer, ids, mask):
        if m and not inside:
            out.append("⟦")
        elif not m and inside:
            out.append("⟧")
        inside = bool(m)
        out.append(text)
    return "".join(out) + ("⟧" if inside else "")
