"""The judge card on judges whose bias is known: fake OpenAI-compatible endpoints on loopback (the official client,
logprobs verdicts) that always pick the first slot, always pick the longer answer, or always pick the better one."""

import json
from collections import Counter

import openai
import pytest
from fake_judge import letter_judge

from koala_lib.config import CardConfig
from koala_lib.evaluation.calibration import CHOSEN, REJECTED, summarise
from koala_lib.evaluation.judge import judge_pairs
from koala_lib.evaluation.judge_card import build_card
from koala_lib.evaluation.probes import CANARY, canary_kinds, probe_items
from koala_lib.evaluation.judgments import PairItem
from koala_lib.inference.serve import serving

PROBES = probe_items()
BETTER = {it.answer_a for it in PROBES if it.test_set == CANARY}
HUMAN = [PairItem(f"h{i}", "calibration:hh", f"Question {i}?", CHOSEN, *((f"Yes: {i}.", REJECTED, f"a long, rambling and wrong reply {i}")
         if i % 2 else (f"a careful, complete answer {i}", REJECTED, f"No: {i}."))) for i in range(30)]  # chosen shorter in half
GOOD = BETTER | {it.answer_a for it in HUMAN}


POLICIES = {
    "first": lambda a, b: "A",
    "longer": lambda a, b: "A" if len(a) > len(b) else "B" if len(b) > len(a) else "C",
    "right": lambda a, b: "A" if a in GOOD else "B" if b in GOOD else "C",
}


def _judge(policy, items):
    app = letter_judge(policy)

    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        return judge_pairs(items, client, "fake-judge", concurrency=4, progress=False, mode="logprobs", max_chars=None)


@pytest.fixture(scope="module")
def cards():
    out = {}
    for name, policy in POLICIES.items():
        probes = _judge(policy, PROBES)
        human = summarise(_judge(policy, HUMAN), HUMAN, Counter(), replicates=200, seed=0).to_json()
        out[name] = build_card("fake-judge", probes.mode, PROBES, probes, calibration=human, thresholds=CardConfig())
    return out


def test_the_canaries_are_balanced_so_no_shortcut_passes():
    canaries = [it for it in PROBES if it.test_set == CANARY]
    assert len(canaries) >= 40 and len({it.prompt_id for it in canaries}) == len(canaries)
    shorter = sum(len(it.answer_a) < len(it.answer_b) for it in canaries)
    assert shorter * 2 == len(canaries) and all(len(it.answer_a) != len(it.answer_b) for it in canaries)
    assert set(Counter(canary_kinds().values())) == {"arithmetic", "refusal", "truncated", "off_topic"}
    truncated = [it for it in canaries if canary_kinds()[it.prompt_id] == "truncated"]
    assert all(it.answer_a.startswith(it.answer_b) and it.answer_a != it.answer_b for it in truncated)


def test_a_judge_that_always_picks_the_first_slot(cards):
    card = cards["first"]
    assert card.canaries_right == 0 and card.canary_accuracy == 0.0  # each canary loses one of its two orders
    assert card.position_consistency == 0.0 and card.first_slot == 100.0
    assert card.markdown_preference == pytest.approx(50.0)  # 0.925 and 0.075 average out
    assert card.human_agreement == pytest.approx(50.0)
    assert not card.fit
    assert [r.split(" ")[0] for r in card.reasons] == ["canaries", "position", "agreement"]
    assert "judge unfit: canaries 0.0 % right in both orders (needs 90 %)" in card.verdict_line()


def test_a_judge_that_always_picks_the_longer_answer_is_caught_by_the_balanced_canaries(cards):
    card = cards["longer"]
    assert card.canaries_right == 24 and card.canary_accuracy == 50.0  # right exactly where the better one is longer
    assert card.canaries_by_kind["truncated"] == [12, 12]
    assert card.position_consistency == 100.0 and card.first_slot == pytest.approx(50.0)
    assert card.longer_preference == pytest.approx(92.5)  # 0.9 + 0.05 / 2 for the longer answer, every pair
    assert card.length_coef > 2 and card.length_coef_ci[0] > 0
    assert card.markdown_preference == pytest.approx(92.5)  # the markdown version is the longer one
    assert not card.fit and card.reasons[0].startswith("canaries 50.0 %") and len(card.reasons) == 2  # + agreement


def test_a_judge_that_is_always_right_is_fit(cards):
    card = cards["right"]
    assert card.canary_accuracy == 100.0 and card.position_consistency == 100.0
    assert card.first_slot == pytest.approx(50.0)
    assert card.longer_preference == pytest.approx(50.0)  # balanced: the longer answer is the better one half the time
    assert card.length_coef_ci[0] <= 0 <= card.length_coef_ci[1]
    assert card.markdown_preference == pytest.approx(50.0)  # same words: a tie in both orders
    assert card.human_agreement == 100.0 and card.human_agreement_ci[0] > 50
    assert card.fit and card.reasons == [] and card.verdict_line() == "judge fit"
    assert json.loads(json.dumps(card.to_json()))["canary_accuracy"] == 100.0
    assert "FIT" in card.lines()[0]


def test_thresholds_come_from_the_config(cards):
    card = cards["longer"]
    from koala_lib.evaluation.judge_card import _verdict

    _verdict(card, CardConfig(min_canary_accuracy=40.0, require_human_agreement=False))
    assert card.fit and card.thresholds["min_canary_accuracy"] == 40.0


def test_self_preference_counts_the_judges_own_answers():
    probes = _judge(POLICIES["first"], PROBES[:2])
    from koala_lib.evaluation.judgments import Judgment

    rows = [Judgment("k1", "koala", "koala_all", "chatgpt", "B", "j", False, "t", "llm", 0.2),
            Judgment("k2", "koala", "chatgpt", "alpaca", "A", "j", False, "t", "llm", 0.6),
            Judgment("k3", "koala", "koala_all", "alpaca", "A", "j", False, "t", "llm", 0.9)]  # no own answer: left out
    card = build_card("j", "logprobs", PROBES[:2], probes, comparison_judgments=rows, self_models=["chatgpt"])
    assert card.self_pairs == 2 and card.self_preference == pytest.approx(70.0)  # (0.8 + 0.6) / 2
