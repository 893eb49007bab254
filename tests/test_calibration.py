"""The judge's agreement with human labels: pairs from stage 2's eval split only, the agreement arithmetic, and
an end-to-end run of the embedded judge on real Anthropic HH pairs."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from koala_lib.evaluation.calibration import CHOSEN, REJECTED, agreement_scores, calibrate, held_out_groups, labelled_pairs, summarise
from koala_lib.evaluation.judge import JudgeResult
from koala_lib.evaluation.judgments import Judgment, PairItem

T = "2026-01-01T00:00:00+00:00"


def _stages_1_2(cfg):
    from koala_lib.conditioning.stage import condition
    from koala_lib.data.curate import curate

    curate(cfg, progress=False)
    condition(cfg, progress=False)


def test_labelled_pairs_come_only_from_the_eval_split(make_cfg):
    cfg = make_cfg("smoke", "data.cap_per_source=null", "conditioning.eval_fraction=0.3", "eval.calibration.pairs=10")
    _stages_1_2(cfg)
    items, skipped = labelled_pairs(cfg)
    assert len(items) == 10 and skipped["beyond_limit"] > 0
    trained = {json.loads(line)["id"].rsplit(":", 1)[0]
               for line in (cfg.run_dir / "conditioned/examples/train/index.jsonl").read_text().splitlines()}
    held = held_out_groups(cfg)
    for item in items:
        assert item.prompt_id in held and item.prompt_id not in trained  # no training pair is used
        assert (item.model_a, item.model_b) == (CHOSEN, REJECTED) and item.test_set.split(":")[1] in ("hh", "webgpt", "summarize")
    from koala_lib.data.curate import load_curated

    records = {r.id: r for r in load_curated(cfg)}
    first = items[0]
    pos = next(r for r in records.values() if r.id.startswith(first.prompt_id + ":pos"))
    assert first.answer_a == pos.turns[-1].text  # the human's choice is model_a
    assert labelled_pairs(cfg)[0] == items  # seeded: the same sample again


def test_agreement_counts_ties_half_and_leaves_no_verdict_out():
    assert agreement_scores(["A", "B", "tie"]).tolist() == [1.0, 0.0, 0.5]
    items = [PairItem(f"p{i}", "calibration:hh", "q", CHOSEN, "good", REJECTED, "bad") for i in range(5)]
    result = JudgeResult(judge="j", mode="logprobs")
    result.judgments = [Judgment(f"p{i}", "calibration:hh", CHOSEN, REJECTED, v, "j", False, T, "llm") for i, v in enumerate("AAB")]
    result.judgments.append(Judgment("p3", "calibration:hh", CHOSEN, REJECTED, "tie", "j", False, T, "llm"))
    result.games = [Judgment("p0", "calibration:hh", CHOSEN, REJECTED, "A", "j", s, T, "llm") for s in (False, True)]
    result.outcomes = Counter({"consistent": 4, "no_verdict": 1})
    cal = summarise(result, items, Counter(), replicates=200, seed=0)
    assert (cal.pairs, cal.judged, cal.agree, cal.disagree, cal.ties, cal.no_verdict) == (5, 4, 2, 1, 1, 1)
    assert cal.agreement == pytest.approx(62.5)  # (1 + 1 + 0 + 0.5) / 4
    assert cal.first_shown_wins == 50.0
    low, high = cal.agreement_ci
    assert low <= 62.5 <= high and cal.by_source["hh"] == {"pairs": 5, "judged": 4, "agreement": 62.5}
    assert cal.line() == f"judge j (logprobs verdicts) agrees with human labels 62.5 % [{low:.1f}-{high:.1f}] on 4 held-out pairs (chance 50 %)"


def test_no_held_out_pairs_is_said_not_raised(make_cfg):
    cfg = make_cfg("smoke", "data.mixture=sharegpt,hc3", "train.variants=[sharegpt]")
    _stages_1_2(cfg)
    cal = calibrate(cfg, progress=False)
    assert cal.pairs == 0 and cal.line().startswith("judge not calibrated: no held-out human-labelled pairs")
    assert json.loads((cfg.run_dir / "eval" / "calibration.json").read_text())["pairs"] == 0


@pytest.mark.slow
def test_the_embedded_judge_on_real_anthropic_hh_pairs(make_cfg, shared_data):
    hh = shared_data / "sources/hh_rlhf/harmless-base_test.jsonl.gz"
    if not hh.is_file():
        pytest.skip(f"{hh} is not there")
    cfg = make_cfg("demo", "data.mixture=hh", "train.variants=[hh]", f"data.sources.hh.path={hh}", "data.cap_per_source=null",
                   "conditioning.eval_fraction=0.06", "eval.calibration.sources=[hh]", "eval.calibration.pairs=120",
                   "eval.judge.max_answer_chars=1200")
    _stages_1_2(cfg)
    cal = calibrate(cfg, progress=False)
    print(cal.line(), cal.to_json())
    assert cal.pairs == 120 and cal.judge == "SmolLM2-135M-Instruct (kit server)" and cal.mean_preference is not None
    assert cal.mode == "logprobs" and not cal.errors
    assert cal.judged + cal.no_verdict == 120 and cal.judged >= 100
    assert cal.agree + cal.disagree + cal.ties == cal.judged
    low, high = cal.agreement_ci
    assert low <= cal.agreement <= high and high - low < 30
    saved = json.loads((cfg.run_dir / "eval" / "calibration.json").read_text())
    assert saved["line"] == cal.line() and saved["by_source"]["hh"]["pairs"] == 120
