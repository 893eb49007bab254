"""The judge card's fixed pairs, shipped with the kit (`judge_data/`, see its README): canaries whose better answer
is not in doubt, and markdown probes (the same words with and without markdown).

    items = probe_items()      # PairItems: canaries (better as model_a), then markdown probes (markdown as model_a)
    canary_kinds()             # canary id -> arithmetic | refusal | truncated | off_topic
"""

from __future__ import annotations

import json
from importlib import resources

from koala_lib.evaluation.judgments import PairItem

CANARY, MARKDOWN = "card:canary", "card:markdown"  # the test_set of the card's own items
BETTER, WORSE, STYLED, PLAIN = "better", "worse", "markdown", "plain"


def _rows(name: str) -> list[dict]:
    text = resources.files("koala_lib.evaluation").joinpath("judge_data", name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def probe_items() -> list[PairItem]:
    """The canaries (better as model_a) and the markdown probes (markdown as model_a), in file order."""
    canaries = [PairItem(r["id"], CANARY, r["question"], BETTER, r["better"], WORSE, r["worse"]) for r in _rows("canaries.jsonl")]
    styled = [PairItem(r["id"], MARKDOWN, r["question"], STYLED, r["markdown"], PLAIN, r["plain"]) for r in _rows("markdown.jsonl")]
    return canaries + styled


def canary_kinds() -> dict[str, str]:
    return {r["id"]: r["kind"] for r in _rows("canaries.jsonl")}
