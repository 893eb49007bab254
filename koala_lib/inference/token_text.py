"""Generated tokens as OpenAI's logprobs report them: each token's own text and raw bytes, in the chat layout
and the legacy completions layout.

    names = TokenText(tokenizer)
    names(id)                                    # (text, raw bytes) of one token
    chat_logprobs(entries, names)                # [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]
    legacy_logprobs(entries, names, offset)      # {"tokens", "token_logprobs", "top_logprobs", "text_offset"}

A token's bytes come from its vocabulary piece. Byte-level BPE (GPT-2, SmolLM2: `Ġ` is a space): every character
of the piece stands for one byte of GPT-2's byte alphabet, so a token holding part of a multi-byte character gets
that part's true bytes. SentencePiece (`▁` is a space, `<0xNN>` the byte NN): the piece with `▁` as a space, or
the one byte. Which of the two a tokenizer uses is found by encoding a probe text and mapping its pieces back.
Special and added tokens (`<|im_end|>`) are their own text; anything else falls back to the tokenizer's decoding of
the token alone. The text is the bytes decoded as UTF-8, U+FFFD standing for an incomplete character.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Iterable

from koala_lib.inference.generate import TokenLogprob

_PROBE = "Hi é 日本 🐨"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: the printable Latin-1 bytes stand for themselves, the other
    68 bytes (controls, space, 0x7F-0xA0, 0xAD) for the characters from U+0100 on, in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    alphabet, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(0x100 + extra)] = byte
            extra += 1
    return alphabet


def byte_level_bytes(piece: str) -> bytes:
    """Raw bytes of a byte-level BPE piece; KeyError for a character outside the alphabet."""
    alphabet = byte_alphabet()
    return bytes(alphabet[c] for c in piece)


def sentencepiece_bytes(piece: str) -> bytes:
    """Raw bytes of a SentencePiece piece: `<0xNN>` is one byte, `▁` a space."""
    byte = _BYTE_PIECE.fullmatch(piece)
    return bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode()


def piece_scheme(tokenizer) -> Callable[[str], bytes] | None:
    """How the tokenizer's pieces map to bytes (`byte_level_bytes`, `sentencepiece_bytes`), or None when
    neither reproduces a probe text."""
    ids = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    for to_bytes in (byte_level_bytes, sentencepiece_bytes):
        try:
            joined = b"".join(to_bytes(p) for p in pieces)
        except (KeyError, TypeError):
            continue
        if joined.lstrip(b" ") == _PROBE.encode():  # SentencePiece may add a leading space
            return to_bytes
    return None


class TokenText:
    """Token id -> (text, raw bytes), computed once per id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.to_bytes = piece_scheme(tokenizer)
        added = getattr(tokenizer, "get_added_vocab", dict)()
        self.special = set(getattr(tokenizer, "all_special_ids", [])) | set(added.values())
        self._known: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token: int) -> tuple[str, bytes]:
        if token not in self._known:
            self._known[token] = self._text(token)
        return self._known[token]

    def _text(self, token: int) -> tuple[str, bytes]:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        raw = None
        if isinstance(piece, str) and token in self.special:
            raw = piece.encode()
        elif isinstance(piece, str) and self.to_bytes is not None:
            try:
                raw = self.to_bytes(piece)
            except KeyError:  # a piece outside the byte alphabet
                raw = None
        if raw is None:
            raw = self.tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False).encode()
        return raw.decode("utf-8", errors="replace"), raw


# ----------------------------------------------------------------------------- OpenAI's two layouts


def chat_logprobs(entries: Iterable[TokenLogprob], names: TokenText) -> list[dict]:
    """`choices[].logprobs.content` of a chat completion (or of one streamed chunk)."""

    def one(token: int, logprob: float) -> dict:
        text, raw = names(token)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]


def legacy_logprobs(entries: Iterable[TokenLogprob], names: TokenText, offset: int) -> dict:
    """`choices[].logprobs` of a legacy completion (or of one streamed chunk). `text_offset` counts characters from
    the start of the prompt, as OpenAI's does: `offset` is the prompt's length. Each `top_logprobs` map holds the
    alternatives asked for plus the chosen token (the legacy API always reports it), keyed by token text."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        text = names(e.token)[0]
        top: dict[str, float] = {}
        for t, lp in [*e.top, (e.token, e.logprob)]:
            top.setdefault(names(t)[0], lp)  # two tokens with one text: the likelier one's
        for key, value in zip(out, (text, e.logprob, top, offset + e.start)):
            out[key].append(value)
    return out
