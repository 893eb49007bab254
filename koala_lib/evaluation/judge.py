"""An LLM judge over any OpenAI-compatible endpoint, with the official `openai` client.

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    result = judge_pairs(items, client, model="koala-base")
    result.judgments        # one Judgment per item the judge gave verdicts on (source "llm")
    result.fastchat_rows    # the same in FastChat's pairwise judgment JSONL layout

Every pair is judged twice, once in each order (game 1: model_a's answer as "Assistant A"; game 2: swapped),
at temperature 0. The judge ends its reply with `[[A]]`, `[[B]]` or `[[C]]` (tie). The two games are combined
as in FastChat's MT-bench: the same verdict in both orders is that verdict; two verdicts that disagree (opposite
winners, or a tie in one order) make a tie. A pair where either game has no verdict (no `[[X]]` in the reply, or
a failed request) gives no judgment at all, as FastChat drops its "error" games: it is counted in
`result.outcomes` (`no_verdict`) and kept in the FastChat rows, so a judge that rarely answers in the format is
visible instead of turning into ties.

Offline profiles judge with the kit's own server running the profile's base model (`local_judge`): a model of
135M parameters is a weak judge, and the report says so.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from koala_lib.evaluation.judgments import Judgment, PairItem, now, swap

PROMPT_NAME = "koala-kit-pair-v1"
SYSTEM = (
    "You compare two AI assistants' answers to the same user question and decide which one serves the user "
    "better. Weigh helpfulness, correctness, relevance, depth and clarity. The order in which the answers are "
    "shown must not influence you, nor their length, nor the assistants' names. Explain briefly, then give "
    "your verdict on the last line in exactly this form: [[A]] if assistant A is better, [[B]] if assistant B "
    "is better, [[C]] for a tie."
)
USER = (
    "[User question]\n{question}\n\n"
    "[The start of assistant A's answer]\n{answer_a}\n[The end of assistant A's answer]\n\n"
    "[The start of assistant B's answer]\n{answer_b}\n[The end of assistant B's answer]"
)
_VERDICT = re.compile(r"\[\[([ABC])\]\]")
WEAK_JUDGE_NOTE = "weak judge: the profile's small base model served by the kit itself, not a strong LLM; read its verdicts as a check of the machinery"


def parse_verdict(text: str) -> str | None:
    """`A`, `B` or `tie` from a judge's reply; None when it holds no verdict or contradicting ones."""
    found = set(_VERDICT.findall(text or ""))
    if len(found) != 1:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[found.pop()]


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
class JudgeResult:
    judge: str
    judgments: list[Judgment] = field(default_factory=list)  # one per pair with verdicts in both orders
    games: list[Judgment] = field(default_factory=list)  # one per game with a verdict: for position bias
    fastchat_rows: list[dict] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)  # consistent | inconsistent | no_verdict
    errors: Counter = field(default_factory=Counter)  # failed requests, by exception type
    seconds: float = 0.0


def _messages(question: str, first: str, second: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": USER.format(question=question, answer_a=first, answer_b=second)}]


def _ask(client, model: str, messages: list[dict], max_tokens: int) -> tuple[str, str | None]:
    """(reply text, error type or None); a failed request is an error, never a crash of the whole run."""
    import openai

    try:
        reply = client.chat.completions.create(model=model, messages=messages, temperature=0.0, max_tokens=max_tokens)
        return reply.choices[0].message.content or "", None
    except (openai.OpenAIError, IndexError, AttributeError, ValueError) as exc:  # a failed request or a malformed reply
        return f"$ERROR$ {exc}", type(exc).__name__


_FASTCHAT_WINNER = {"A": "model_1", "B": "model_2", "tie": "tie", None: "error"}


def judge_pairs(items: Sequence[PairItem], client, model: str, max_tokens: int = 512, concurrency: int = 8,
                progress: bool = True, judge_name: str | None = None) -> JudgeResult:
    """Judge every item in both orders through `client` (an `openai.OpenAI`); requests run `concurrency` at a time."""
    from tqdm.auto import tqdm

    name = judge_name or model
    result = JudgeResult(judge=name)
    start = time.perf_counter()
    games = [(item, order) for item in items for order in (1, 2)]

    def play(game: tuple[PairItem, int]) -> tuple[str, str | None]:
        item, order = game
        first, second = (item.answer_a, item.answer_b) if order == 1 else (item.answer_b, item.answer_a)
        return _ask(client, model, _messages(item.prompt, first, second), max_tokens)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        replies = list(tqdm(pool.map(play, games), total=len(games), desc=f"judge {name}", unit="game", disable=not progress))
    for i, item in enumerate(items):
        (text1, err1), (text2, err2) = replies[2 * i], replies[2 * i + 1]
        for err in (err1, err2):
            if err:
                result.errors[err] += 1
        g1 = None if err1 else parse_verdict(text1)
        g2 = None if err2 else parse_verdict(text2)
        verdict, outcome = combine(g1, g2)
        result.outcomes[outcome] += 1
        stamp = now()
        for game, swapped in ((g1, False), (g2, True)):
            if game is not None:
                in_model_terms = swap(game) if swapped else game
                result.games.append(Judgment(item.prompt_id, item.test_set, item.model_a, item.model_b,
                                             in_model_terms, name, swapped, stamp, "llm"))  # type: ignore[arg-type]
        if outcome != "no_verdict":  # one judgment per pair; `swapped` False: both orders went into it, game 1 first
            result.judgments.append(Judgment(item.prompt_id, item.test_set, item.model_a, item.model_b, verdict,  # type: ignore[arg-type]
                                             name, False, stamp, "llm"))
        result.fastchat_rows.append({
            "question_id": f"{item.test_set}/{item.prompt_id}", "model_1": item.model_a, "model_2": item.model_b,
            "g1_winner": _FASTCHAT_WINNER[g1],
            "g2_winner": {"A": "model_2", "B": "model_1", "tie": "tie", None: "error"}[g2],
            "judge": [name, PROMPT_NAME],
            "g1_user_prompt": USER.format(question=item.prompt, answer_a=item.answer_a, answer_b=item.answer_b),
            "g1_judgment": text1,
            "g2_user_prompt": USER.format(question=item.prompt, answer_a=item.answer_b, answer_b=item.answer_a),
            "g2_judgment": text2, "turn": 1, "tstamp": time.time(),
        })
    result.seconds = time.perf_counter() - start
    return result


@contextmanager
def local_judge(cfg) -> Iterator[tuple[object, str]]:
    """The kit's own server on a free loopback port running the profile's base model: yields (openai client,
    served model name). Used when `eval.judge.base_url` is empty (offline profiles)."""
    import openai

    from koala_lib.serve import app_for_profile, serving

    app = app_for_profile(cfg, "base")
    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        served = client.models.list().data[0].id
        yield client, served
