"""A panel of judges through stage 5 (run_judge, measure_card, build_report): two fake OpenAI-compatible endpoints
on loopback, one that picks the better answer and one that always picks the first slot; each gets its card, the
panel's verdict combines theirs, their agreement is Cohen's kappa, and an unfit judge can be left out."""

import json

import numpy as np
import pytest
from fake_judge import letter_judge

from koala_lib.evaluation.judge_card import measure_card
from koala_lib.evaluation.probes import CANARY, probe_items
from koala_lib.evaluation.judgments import read_judgments
from koala_lib.evaluation.panel import cohen_kappa, combine
from koala_lib.evaluation.report import build_report
from koala_lib.evaluation.stage import eval_dir, judgments_dir, run_judge
from koala_lib.inference.serve import serving

BETTER = {it.answer_a for it in probe_items() if it.test_set == CANARY}


def _quality(text):
    return int(text[1]) if text.startswith("q") and text[1:2].isdigit() else None


def _pick(policy, a, b):
    if policy == "first":
        return "A"
    if a in BETTER or b in BETTER:
        return "A" if a in BETTER else "B"
    qa, qb = _quality(a), _quality(b)
    return "C" if qa is None or qb is None or qa == qb else ("A" if qa > qb else "B")


def _answers(cfg):
    rng = np.random.default_rng(1)
    gen = cfg.run_dir / "generations"
    gen.mkdir(parents=True)
    for model, quality in {"koala_all": 3, "alpaca": 2, "chatgpt": 4}.items():
        rows = [{"id": f"koala_{i}", "test_set": "koala", "instruction": f"Question {i}?", "generator": model,
                 "output": f"q{quality} " + "word " * int(rng.integers(5, 60))} for i in range(10)]
        (gen / f"{model}.json").write_text(json.dumps(rows))
    eval_dir(cfg).mkdir(parents=True)
    (eval_dir(cfg) / "leakage.json").write_text(json.dumps({"threshold": 20.0, "removed": [], "kept": []}))


def _stage5(tmp_path, drop):
    from koala_lib import config

    with serving(letter_judge(lambda a, b: _pick("right", a, b))) as right, serving(letter_judge(lambda a, b: _pick("first", a, b))) as first:
        cfg = config.load("smoke", [f"runs_dir={tmp_path / 'runs'}", f"figures_dir={tmp_path / 'figures'}",
                                    f"call_cache={tmp_path / 'cache.sqlite'}", "eval.judge.mode=logprobs",
                                    f"eval.judge.panel=[{{base_url: '{right}/v1', model: right}}, {{base_url: '{first}/v1', model: first}}]",
                                    f"eval.judge.panel_drop_unfit={str(drop).lower()}", "eval.card.require_human_agreement=false",
                                    "eval.comparisons=[koala_all:alpaca,koala_all:chatgpt]"])
        _answers(cfg)
        judged = run_judge(cfg, progress=False)
        card = measure_card(cfg, progress=False)
    return cfg, judged, card, build_report(cfg)


def test_cohen_kappa():
    assert cohen_kappa(list("AAAB"), list("AABB")) == pytest.approx(0.5)  # observed 3/4, chance 1/2
    assert cohen_kappa(list("AB"), list("AB")) == 1.0 and cohen_kappa(list("AA"), list("AA")) is None
    assert cohen_kappa([], []) is None


def test_a_panel_judges_with_every_member_and_averages_their_preferences(tmp_path):
    cfg, judged, card, rep = _stage5(tmp_path, drop=False)
    summary = json.loads((eval_dir(cfg) / "judge.json").read_text())
    members = summary["panel"]["members"]
    assert [m["judge"] for m in members] == ["right", "first"] and all(m["kept"] for m in members)
    assert judged.result.judge == "panel of 2: right + first" and summary["calls"] == 2 * 2 * 20
    # the better judge says koala_all (q3) beats alpaca (q2) at 0.925 in both orders; the first-slot judge gives
    # 0.925 and 0.075, so 0.5; the panel's mean is 0.7125
    llm = read_judgments(judgments_dir(cfg) / "llm.jsonl")
    vs_alpaca = [j for j in llm if j.model_b == "alpaca"]
    assert {round(j.preference, 4) for j in vs_alpaca} == {0.7125} and {j.verdict for j in vs_alpaca} == {"A"}
    # Cohen's kappa: the first-slot judge's pairs are all ties, the other's never: kappa 0, agreement 0 %
    (agreement,) = summary["panel"]["agreement"]
    assert (agreement["pairs"], agreement["agreement"], agreement["kappa"]) == (20, 0.0, 0.0)
    assert rep.metrics()["judge_panel_kappa"] == {"0: right | 1: first": 0.0}
    assert "panel verdict: mean of 2 judges; 0: right and 1: first: kappa 0.00 on 20 pairs" in rep.judge_line()
    # each member's card, and the panel's own: the first-slot judge pulls every canary's second order to a tie
    assert [(m["judge"], m["fit"]) for m in card.members] == [("right", True), ("first", False)]
    assert card.canary_accuracy == 0.0 and not card.fit
    annotations = json.loads((eval_dir(cfg) / "alpaca_eval" / "koala" / "koala_all_vs_alpaca" / "annotations.json").read_text())
    assert {a["annotator"] for a in annotations} == {"panel of 2: right + first"}


def test_an_unfit_judge_can_be_left_out_of_the_panel(tmp_path):
    cfg, judged, card, rep = _stage5(tmp_path, drop=True)
    assert [(m["judge"], m["fit"], m["kept"]) for m in card.members] == [("right", True, True), ("first", False, False)]
    assert card.fit and card.canary_accuracy == 100.0 and card.judge == "panel of 1: right"
    llm = read_judgments(judgments_dir(cfg) / "llm.jsonl")  # formed again from the fit judge alone, without a call
    assert {j.judge for j in llm} == {"panel of 1: right"} and {round(j.preference, 4) for j in llm if j.model_b == "alpaca"} == {0.925}
    summary = json.loads((eval_dir(cfg) / "judge.json").read_text())
    assert [m["kept"] for m in summary["panel"]["members"]] == [True, False]
    assert "(first left out: unfit)" in rep.judge_line() and rep.card_line() == "judge fit"


def test_combining_by_majority_takes_the_verdict_most_members_gave():
    from koala_lib.evaluation.judge import JudgeResult
    from koala_lib.evaluation.judgments import Judgment, PairItem

    item = PairItem("k1", "koala", "q", "x", "a", "y", "b")
    mk = lambda v: JudgeResult("j", judgments=[Judgment("k1", "koala", "x", "y", v, "j", False, "t", "llm")])
    assert combine([mk("A"), mk("A"), mk("B")], [item], "majority", 0.05).judgments[0].verdict == "A"
    assert combine([mk("A"), mk("B"), mk("tie")], [item], "majority", 0.05).judgments[0].verdict == "tie"
    mean = combine([mk("A"), mk("B"), mk("A")], [item], "mean", 0.05).judgments[0]
    assert mean.preference == pytest.approx(2 / 3) and mean.verdict == "A"
