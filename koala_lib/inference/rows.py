"""One answer as the host sees it while it is generated: its text, stop strings, what has been streamed.

    row = Row(prompt_len=12, limit=64, stops=("USER:",), top=None)
    event = row.push(token, entry, decode, eos_ids)    # a TokenEvent to report, or None; row.finish once it ends
    row.completion()

The tokens are decoded as a whole after each new one (a token may complete a character or a word only with the
next). Text that could be the start of a stop string, or a partial UTF-8 character, is held back until the next
token decides it; a stop string is looked for only in the text that is new since the last token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model's raw logits, and the most likely alternatives.

    `start`/`end`: the characters of the answer's text (as generated, before a stop string is cut) that the token
    makes; a token holding part of a multi-byte character spans that whole character."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability), most likely first; `Sampling.logprobs` of them
    start: int = 0
    end: int = 0


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length" | "abort" (on_token returned True)
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per generated token, EOS included; None unless asked for


@dataclass
class TokenEvent:
    row: int  # index of the prompt in the call
    delta: str  # text not reported before (held back while it could be the start of a stop string)
    finish_reason: str | None = None  # set on the row's last event
    tokens: int = 0  # tokens the row has generated so far
    logprobs: list[TokenLogprob] = field(default_factory=list)  # tokens new since the row's last event (if asked)


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` to hold back: a possible start of a stop string, or a partial
    UTF-8 character (the tokenizer decodes half a character as U+FFFD)."""
    whole = text.rstrip("\ufffd")
    partial = len(text) - len(whole)  # a character still being completed: the stop may continue after it
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(whole)), 0, -1):
            if whole.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return hold + partial


@dataclass
class Row:
    prompt_len: int
    limit: int  # new tokens allowed
    stops: tuple[str, ...]
    top: int | None = None  # alternatives wanted (Sampling.logprobs)
    index: int = 0  # reported as TokenEvent.row
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    reported: int = 0  # entries of `logprobs` passed on
    text: str = ""
    sent: int = 0  # characters passed on
    finish: str | None = None

    def push(self, token: int, entry: TokenLogprob | None, decode: Callable[[list[int]], str], eos_ids: set[int]) -> TokenEvent | None:
        """Take the next generated token; returns the event to report (new text, or the row's end), or None."""
        done = len(self.text.rstrip("\ufffd"))  # characters complete before this token
        if entry is not None:
            entry.start = entry.end = done
            self.logprobs.append(entry)
        if token in eos_ids:
            return self._end("stop")
        before = len(self.text)
        self.tokens.append(token)
        self.text = decode(self.tokens)
        if entry is not None:  # a trailing partial character counts as one
            whole = self.text.rstrip("\ufffd")
            entry.end = max(done, len(whole) + (len(whole) < len(self.text)))
        for stop in self.stops:
            cut = self.text.find(stop, max(0, min(before, done) - len(stop) + 1))
            if cut >= 0:
                self.text = self.text[:cut]
                return self._end("stop")
        if len(self.tokens) >= self.limit:
            return self._end("length")
        ready = len(self.text) - held_back(self.text, self.stops)
        if ready <= self.sent:
            return None
        event = TokenEvent(self.index, self.text[self.sent:ready], None, len(self.tokens), self._unreported())
        self.sent = ready
        return event

    def end(self, reason: str) -> TokenEvent:
        """End the row now with `reason` (a client left: "abort"); returns its last event."""
        return self._end(reason)

    def abort(self) -> None:
        """The consumer refused the text just reported: the answer ends with what was passed on before it."""
        self.text = self.text[: self.sent]
        self.finish = "abort"

    def _end(self, reason: str) -> TokenEvent:
        self.text = self.text.rstrip("\ufffd")
        if reason == "abort":
            self.text = self.text[: self.sent]
        self.finish = reason
        event = TokenEvent(self.index, self.text[self.sent:], reason, len(self.tokens), self._unreported())
        self.sent = len(self.text)
        return event

    def completion(self) -> Completion:
        return Completion(self.text, self.tokens, self.finish or "length", self.prompt_len, None if self.top is None else self.logprobs)

    def _unreported(self) -> list[TokenLogprob]:
        entries, self.reported = self.logprobs[self.reported:], len(self.logprobs)
        return entries
