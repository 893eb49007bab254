"""An LLM judge over any OpenAI-compatible endpoint, with the official `openai` client.

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    result = judge_pairs(items, client, model="koala-base", mode="auto")
    result.mode             # "logprobs" or "text": how the verdicts were read
    result.judgments        # one Judgment per item the judge gave verdicts on (source "llm")
    result.fastchat_rows    # the same in FastChat's pairwise judgment JSONL layout

Every pair is judged twice, once in each order (game 1: model_a's answer as "Assistant A"; game 2: swapped),
at temperature 0. Two ways to read a game's verdict:

- `logprobs`: the judge answers with one token, A, B or C (a tie), and the verdict is the probability of each
  letter at that token, as AlpacaEval's weighted annotators read it: every surface form of a letter among the
  `top_logprobs` alternatives counts (with or without a leading space, bracket or quote), and the three masses
  are normalised to sum to 1. A game's preference for the answer shown as A is P(A) + P(C) / 2. The pair's soft
  preference for model_a is the mean of game 1's and game 2's (swapped back), so a judge that only ever favours
  one position lands at 0.5. Verdict: `A` above 0.5 + `tie_margin`, `B` below 0.5 - `tie_margin`, else `tie`.
- `text`: the judge reasons, then ends with `[[A]]`, `[[B]]` or `[[C]]`. The two games combine as in FastChat's
  MT-bench: the same verdict in both orders is that verdict; verdicts that disagree make a tie.
- `auto`: logprobs when the endpoint returns them (checked on the first answered game), else text.

A game without a verdict (no verdict letter among the top tokens, no `[[X]]` in the reply, or a failed
request) is never turned into a tie: the pair gives no judgment, as FastChat drops its "error" games, and it is
counted in `result.outcomes` (`no_verdict`), so a judge that rarely answers in the format stays visible.

Offline profiles judge with the kit's own server running the profile's base model (`local_judge`): a model of
135M parameters is a weak judge, and the report says so.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from koala_lib.evaluation.judgments import Judgment, PairItem, now, swap

PROMPT_NAMES = {"text": "koala-kit-pair-v1", "logprobs": "koala-kit-pair-letter-v1"}
_RULES = ("You compare two AI assistants' answers to the same user question and decide which one serves the user "
          "better. Weigh helpfulness, correctness, relevance, depth and clarity. The order in which the answers are "
          "shown must not influence you, nor their length, nor the assistants' names. ")
SYSTEM = _RULES + ("Explain briefly, then give your verdict on the last line in exactly this form: [[A]] if assistant A "
                   "is better, [[B]] if assistant B is better, [[C]] for a tie.")
SYSTEM_LETTER = _RULES + ("Reply with one letter and nothing else: A if assistant A's answer is better, B if assistant "
                          "B's answer is better, C if they are equally good.")
USER = (
    "[User question]\n{question}\n\n"
    "[The start of assistant A's answer]\n{answer_a}\n[The end of assistant A's answer]\n\n"
    "[The start of assistant B's answer]\n{answer_b}\n[The end of assistant B's answer]"
)
USER_LETTER_CUE = "\n\nWhich answer is better? Reply with one letter: A, B or C (a tie)."
_VERDICT = re.compile(r"\[\[([ABC])\]\]")
_SURFACE = " \t\n[]()*\"'`.:"  # stripped from a token before it is read as a verdict letter
WEAK_JUDGE_NOTE = "weak judge: the profile's small base model served by the kit itself, not a strong LLM; read its verdicts as a check of the machinery"
MODES = ("auto", "logprobs", "text")
PROBES = 3  # games played one by one to learn whether the endpoint returns logprobs, before the rest run concurrently


class JudgeError(RuntimeError):
    """The judge cannot work as configured (e.g. `logprobs` mode against an endpoint that returns none)."""


def parse_verdict(text: str) -> str | None:
    """`A`, `B` or `tie` from a judge's reply; None when it holds no verdict or contradicting ones."""
    found = set(_VERDICT.findall(text or ""))
    if len(found) != 1:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[found.pop()]


def verdict_probs(top: Sequence[tuple[str, float]]) -> dict[str, float] | None:
    """{"A", "B", "C"} -> probability, from (token, logprob) alternatives at the verdict token: the mass of every
    surface form of a letter (`A`, ` A`, `[A`, `(A`, ...), normalised over the three; None when none is there."""
    mass = {"A": 0.0, "B": 0.0, "C": 0.0}
    for token, logprob in top:
        letter = (token or "").strip(_SURFACE)
        if letter in mass and logprob is not None and math.isfinite(logprob):
            mass[letter] += math.exp(logprob)
    total = sum(mass.values())
    return {k: v / total for k, v in mass.items()} if total > 0 else None


def first_preference(probs: dict[str, float]) -> float:
    """The preference in one game for the answer shown as A: P(A) + P(C) / 2."""
    return probs["A"] + probs["C"] / 2


def soft_verdict(preference: float, tie_margin: float) -> str:
    """`A`, `B` or `tie` from a soft preference for model_a, with ties within `tie_margin` of 0.5."""
    if preference > 0.5 + tie_margin:
        return "A"
    if preference < 0.5 - tie_margin:
        return "B"
    return "tie"


def combine(game1: str | None, game2: str | None) -> tuple[str, str]:
    """The verdict in model terms from game 1 (model_a shown as A) and game 2 (model_a shown as B), with the
    outcome counted: `consistent`, `inconsistent` or `no_verdict`."""
    if game1 is None or game2 is None:
        return "tie", "no_verdict"
    undone = swap(game2)
    if game1 == undone:
        return game1, "consistent"
    return "tie", "inconsistent"


@dataclass
class Game:
    """One judge request: the reply text, and the verdict read from it in screen terms (None: no verdict)."""

    text: str
    verdict: str | None = None  # "A" | "B" | "tie" about the answers as shown
    preference: float | None = None  # logprobs mode: preference for the answer shown as A
    error: str | None = None  # the exception type of a failed request
    has_logprobs: bool = False


@dataclass
class JudgeResult:
    judge: str
    mode: str = "text"  # how the verdicts were read: "logprobs" | "text"
    mode_note: str = ""  # why, when `auto` chose
    judgments: list[Judgment] = field(default_factory=list)  # one per pair with verdicts in both orders
    games: list[Judgment] = field(default_factory=list)  # one per game with a verdict: for position bias
    fastchat_rows: list[dict] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)  # consistent | inconsistent | no_verdict
    errors: Counter = field(default_factory=Counter)  # failed requests, by exception type
    calls: int = 0  # requests sent to the endpoint
    cache_hits: int = 0  # games answered from the cache, not sent
    drift: list = field(default_factory=list)  # games asked again that changed verdict against the cache
    seconds: float = 0.0
    identity: str = ""  # the judge's identity in the call cache (set by judge_with)
    weak: bool = False  # the kit's own small base model judged

    def to_json(self) -> dict:
        """Plain JSON (a panel member's result is kept this way, to combine again without calls)."""
        return {**{k: v for k, v in vars(self).items() if k not in ("judgments", "games")},
                "judgments": [j.to_row() for j in self.judgments], "games": [g.to_row() for g in self.games]}

    @classmethod
    def from_json(cls, row: dict) -> "JudgeResult":
        rest = {k: v for k, v in row.items() if k not in ("judgments", "games", "outcomes", "errors")}
        return cls(**rest, judgments=[Judgment.from_row(j) for j in row["judgments"]], games=[Judgment.from_row(g) for g in row["games"]],
                   outcomes=Counter(row["outcomes"]), errors=Counter(row["errors"]))


def cut(text: str, limit: int | None) -> str:
    """`text` cut to `limit` characters, marked as cut."""
    if limit is None or len(text) <= limit:
        return text
    return text[:limit].rstrip() + " [...cut]"


def _messages(mode: str, question: str, first: str, second: str) -> list[dict]:
    user = USER.format(question=question, answer_a=first, answer_b=second)
    if mode == "logprobs":
        return [{"role": "system", "content": SYSTEM_LETTER}, {"role": "user", "content": user + USER_LETTER_CUE}]
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def _request(model: str, mode: str, messages: list[dict], max_tokens: int, top_logprobs: int) -> dict:
    """The chat completion request of one game, as sent (and as the cache keys it)."""
    if mode == "logprobs":
        return {"model": model, "messages": messages, "temperature": 0.0, "max_tokens": 1, "logprobs": True,
                "top_logprobs": top_logprobs}
    return {"model": model, "messages": messages, "temperature": 0.0, "max_tokens": max_tokens}


def _ask(client, mode: str, request: dict) -> Game:
    """One game; a failed request is a Game with an error, never a crash of the whole run."""
    import openai

    try:
        reply = client.chat.completions.create(**request)
        choice = reply.choices[0]
        text = choice.message.content or ""
    except (openai.OpenAIError, IndexError, AttributeError, ValueError) as exc:  # a failed request or a malformed reply
        return Game(f"$ERROR$ {exc}", error=type(exc).__name__)
    if mode == "text":
        return Game(text, parse_verdict(text))
    content = getattr(choice.logprobs, "content", None) or []
    if not content:
        return Game(text)  # no logprobs returned: `auto` falls back to text, `logprobs` stops
    first = content[0]
    alternatives = [(t.token, t.logprob) for t in (first.top_logprobs or [])] or [(first.token, first.logprob)]
    probs = verdict_probs(alternatives)
    shown = f"{text!r} P(A)={probs['A']:.3f} P(B)={probs['B']:.3f} P(C)={probs['C']:.3f}" if probs else f"{text!r} (no verdict letter among the top tokens)"
    if probs is None:
        return Game(shown, has_logprobs=True)
    pref = first_preference(probs)
    return Game(shown, max(("A", "B", "tie"), key=lambda v: probs["C" if v == "tie" else v]), pref, has_logprobs=True)


@dataclass
class Caller:
    """Who answers and how: the client and model, the judge's identity for the cache (None: no cache), and the
    item keys asked again even when cached (drift checks)."""

    client: object
    model: str
    cache: object = None  # koala_lib.call_cache.CallCache
    identity: str = ""
    fresh: frozenset = frozenset()
    sent: list = field(default_factory=list)  # one entry per request sent (list.append is atomic across threads)
    hits: list = field(default_factory=list)
    drift: list = field(default_factory=list)  # {"item", "order", "before", "now"} where a fresh game changed verdict

    def play(self, item, order: int, mode: str, messages: list[dict], max_tokens: int, top_logprobs: int) -> Game:
        from koala_lib.call_cache import call_key

        request = _request(self.model, mode, messages, max_tokens, top_logprobs)
        key = call_key("judge", self.identity, request) if self.cache is not None else None
        before = None
        if key is not None:
            if item.key in self.fresh:
                before = self.cache.peek(key)
            elif (cached := self.cache.get(key)) is not None:
                self.hits.append(1)
                return Game(**cached)
        self.sent.append(1)
        game = _ask(self.client, mode, request)
        if key is not None and game.error is None:
            if before is not None and before.get("verdict") != game.verdict:
                self.drift.append({"item": item.key, "order": order, "before": before.get("verdict"), "now": game.verdict})
            self.cache.put(key, "judge", self.identity, vars(game))
        return game


_FASTCHAT_WINNER = {"A": "model_1", "B": "model_2", "tie": "tie", None: "error"}


def _play_all(games, caller: Caller, mode, max_tokens, top_logprobs, concurrency, progress, desc) -> tuple[str, str, list[Game]]:
    """(mode used, note, one Game per game); `auto` decides on the first answered game."""
    from koala_lib.progress import bar

    def play(game, how):
        item, order, question, a, b = game
        first, second = (a, b) if order == 1 else (b, a)
        return caller.play(item, order, how, _messages(how, question, first, second), max_tokens, top_logprobs)

    note, done = "", []
    if mode in ("auto", "logprobs"):
        for game in games[:PROBES]:  # probe: does the endpoint return logprobs?
            probe = play(game, "logprobs")
            done.append(probe)
            if probe.error is None:
                break
        answered = [g for g in done if g.error is None]
        if not answered:  # nothing came back: the rest is played as asked (auto: logprobs), and fails alike or not
            mode, note = "logprobs", f"no answer to the first {len(done)} games, so whether the endpoint returns logprobs is unknown"
        elif not answered[0].has_logprobs:
            if mode == "logprobs":
                raise JudgeError("eval.judge.mode=logprobs: the endpoint returned no logprobs for the verdict token; "
                                 "set eval.judge.mode to auto or text, or use an endpoint that returns logprobs (vLLM, OpenAI)")
            mode, note, done = "text", "auto: the endpoint returned no logprobs, so verdicts were read from the text", []
        else:
            mode, note = "logprobs", ("auto: the endpoint returned logprobs" if mode == "auto" else "")
    # sent longest first, so that requests a server batches together are of similar length (less padding)
    rest = sorted(range(len(done), len(games)), key=lambda i: -sum(len(t) for t in games[i][2:]))
    played: dict[int, Game] = dict(enumerate(done))
    with bar(total=len(games), initial=len(done), desc=desc, unit="game", disable=not progress) as shown:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            for i, result in zip(rest, pool.map(lambda i: play(games[i], mode), rest)):
                played[i] = result
                shown.update(1)
    return mode, note, [played[i] for i in range(len(games))]


def judge_pairs(items: Sequence[PairItem], client, model: str, max_tokens: int = 512, concurrency: int = 8,
                progress: bool = True, judge_name: str | None = None, *, mode: str = "text", top_logprobs: int = 20,
                tie_margin: float = 0.05, max_chars: int | None = None, cache=None, identity: str = "",
                fresh: Sequence[str] = ()) -> JudgeResult:
    """Judge every item in both orders through `client` (an `openai.OpenAI`); requests run `concurrency` at a time.
    `max_chars` cuts each question and answer shown to the judge. With a `cache` (koala_lib.call_cache.CallCache)
    and the judge's `identity`, a game already cached is not sent again, except for the items whose key is in
    `fresh`, which are asked again and compared with the cache (`result.drift`)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: allowed {', '.join(MODES)}")
    name = judge_name or model
    start = time.perf_counter()
    games = [(item, order, cut(item.prompt, max_chars), cut(item.answer_a, max_chars), cut(item.answer_b, max_chars))
             for item in items for order in (1, 2)]
    caller = Caller(client, model, cache, identity or f"{model}", frozenset(fresh))
    used, note, replies = _play_all(games, caller, mode, max_tokens, top_logprobs, concurrency, progress, f"judge {name}")
    result = JudgeResult(judge=name, mode=used, mode_note=note, calls=len(caller.sent), cache_hits=len(caller.hits),
                         drift=caller.drift)
    for i, item in enumerate(items):
        g1, g2 = replies[2 * i], replies[2 * i + 1]
        for g in (g1, g2):
            if g.error:
                result.errors[g.error] += 1
        verdict, outcome = combine(g1.verdict, g2.verdict)
        preference = None
        if used == "logprobs" and outcome != "no_verdict":
            preference = (g1.preference + (1.0 - g2.preference)) / 2
            verdict = soft_verdict(preference, tie_margin)
        result.outcomes[outcome] += 1
        stamp = now()
        for game, swapped in ((g1, False), (g2, True)):
            if game.verdict is not None:
                in_model_terms = swap(game.verdict) if swapped else game.verdict
                pref = None if game.preference is None else (1.0 - game.preference if swapped else game.preference)
                result.games.append(Judgment(item.prompt_id, item.test_set, item.model_a, item.model_b,
                                             in_model_terms, name, swapped, stamp, "llm", pref))  # type: ignore[arg-type]
        if outcome != "no_verdict":  # one judgment per pair; `swapped` False: both orders went into it, game 1 first
            result.judgments.append(Judgment(item.prompt_id, item.test_set, item.model_a, item.model_b, verdict,  # type: ignore[arg-type]
                                             name, False, stamp, "llm", preference))
        q, a, b = games[2 * i][2:]
        shown = lambda first, second: _messages(used, q, first, second)[-1]["content"]  # the user message as sent
        result.fastchat_rows.append({
            "question_id": f"{item.test_set}/{item.prompt_id}", "model_1": item.model_a, "model_2": item.model_b,
            "g1_winner": _FASTCHAT_WINNER[g1.verdict],
            "g2_winner": {"A": "model_2", "B": "model_1", "tie": "tie", None: "error"}[g2.verdict],
            "judge": [name, PROMPT_NAMES[used]],
            "g1_user_prompt": shown(a, b), "g1_judgment": g1.text,
            "g2_user_prompt": shown(b, a), "g2_judgment": g2.text,
            "turn": 1, "tstamp": time.time(),
        })
    result.seconds = time.perf_counter() - start
    return result


@contextmanager
def local_judge(cfg) -> Iterator[tuple[object, str]]:
    """The kit's own server on a free loopback port running the profile's base model: yields (openai client,
    served model name). Used when `eval.judge.base_url` is empty (offline profiles)."""
    import openai

    from koala_lib.inference.serve import app_for_profile, serving

    app = app_for_profile(cfg, "base")
    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        served = client.models.list().data[0].id
        yield client, served


@dataclass
class JudgeEndpoint:
    client: object
    model: str
    name: str  # how reports name the judge
    weak: bool  # the kit's own small base model
    identity: str = ""  # what the cache keys its verdicts by: the endpoint and model, or the served weights' hash
    cache: object = None  # koala_lib.call_cache.CallCache, open while the endpoint is


@contextmanager
def judge_endpoint(cfg) -> Iterator[JudgeEndpoint]:
    """The profile's judge: `eval.judge.base_url` through the official client, or (empty) the kit's own server."""
    import os

    from koala_lib.call_cache import CallCache

    j = cfg.eval.judge
    with CallCache(cfg.call_cache_path) as cache:
        if j.base_url:
            import openai

            key = os.environ.get(j.api_key_env, "")
            client = openai.OpenAI(base_url=j.base_url, api_key=key or "unused", timeout=600, max_retries=j.max_retries)
            model = j.model or client.models.list().data[0].id
            yield JudgeEndpoint(client, model, model, False, f"endpoint {j.base_url.rstrip('/')} model {model}", cache)
            return
        from koala_lib.inference.answers import base_label

        with local_judge(cfg) as (client, served):
            yield JudgeEndpoint(client, j.model or served, f"{base_label(cfg)} (kit server)", True, local_identity(cfg, cache), cache)


def local_identity(cfg, cache) -> str:
    """The kit-served judge's identity: a hash of every file of its base model's folder (weights, tokenizer, chat
    template) and the settings it runs in; a random-init model is its preset and seed."""
    import hashlib

    from koala_lib.inference.answers import base_folder

    m = cfg.model
    settings = f"dtype {m.dtype} param_dtype {m.param_dtype} attention {m.attention}"
    if m.init == "random":
        return f"kit server: random {m.preset} seed {cfg.seed} tokenizer {m.tokenizer} {settings}"
    folder = base_folder(cfg)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha256("".join(f"{p.relative_to(folder)}:{cache.file_digest(p)}\n" for p in files).encode()).hexdigest()
    return f"kit server: files sha256 {digest} {settings}"


def judge_with(endpoint: JudgeEndpoint, items: Sequence[PairItem], cfg, progress: bool = True,
               fresh: Sequence[str] = ()) -> JudgeResult:
    """`judge_pairs` with the profile's `eval.judge` settings."""
    j = cfg.eval.judge
    result = judge_pairs(items, endpoint.client, endpoint.model, j.max_tokens, j.concurrency, progress, endpoint.name,
                         mode=j.mode, top_logprobs=j.top_logprobs, tie_margin=j.tie_margin, max_chars=j.max_answer_chars,
                         cache=endpoint.cache, identity=endpoint.identity, fresh=fresh)
    result.identity, result.weak = endpoint.identity, endpoint.weak
    return result
