"""Stage 5's exports read by AlpacaEval 0.6.6 itself: each comparison's annotations file, loaded with AlpacaEval's
loader, gives the report's soft win rate through `get_winrate`, its hard win rate as `discrete_win_rate` (with the
tie margin at 0, AlpacaEval's rule), and its LC win rate through AlpacaEval's own `fit_LogisticRegressionCV`.

The judge is a scripted OpenAI-compatible endpoint on loopback that reads answer quality and length, so every
comparison has soft preferences of its own; stage 5 runs as in the pipeline (`run_judge`, `build_report`)."""

import json
import math

import numpy as np
import pytest
from fake_judge import letter_judge

from koala_lib.evaluation.probes import probe_items
from koala_lib.evaluation.report import build_report
from koala_lib.evaluation.stage import eval_dir, run_judge
from koala_lib.inference.serve import serving

alpaca_eval_utils = pytest.importorskip("alpaca_eval.utils")
metrics = pytest.importorskip("alpaca_eval.metrics")
glm = pytest.importorskip("alpaca_eval.metrics.glm_winrate")

MODELS = {"koala_all": 3, "alpaca": 2, "chatgpt": 4}  # quality level written into each answer
EMPTY = {"koala_all": (0, 1), "chatgpt": (1, 2)}  # alpaca-set answers left empty: 5 pairs hold one (alpaca_1 vs chatgpt: two)
RULED = 5


def _answers(cfg):
    rng = np.random.default_rng(0)
    gen = cfg.run_dir / "generations"
    gen.mkdir(parents=True)
    for model, quality in MODELS.items():
        rows = [{"id": f"{ts}_{i}", "test_set": ts, "instruction": f"Question {ts} {i}?", "generator": model,
                 "output": f"q{quality} " + "word " * int(rng.integers(5, 120))} for ts in ("koala", "alpaca") for i in range(14)]
        for i in EMPTY.get(model, ()):  # answered nothing: these pairs are judged by rule
            rows[14 + i]["output"] = ""
        (gen / f"{model}.json").write_text(json.dumps(rows))
    folder = eval_dir(cfg)
    folder.mkdir(parents=True)
    (folder / "leakage.json").write_text(json.dumps({"threshold": 20.0, "removed": [{"id": "koala/koala_3", "bleu": 40.0, "train_text": "x"}], "kept": []}))


def _judge_app():
    """One letter with probabilities from quality and length: P(first better) = sigmoid(quality gap + length gap)."""

    def policy(a, b):
        quality = lambda t: int(t[1]) if t.startswith("q") and t[1:2].isdigit() else 0
        p_a = 1 / (1 + math.exp(-(0.6 * (quality(a) - quality(b)) + 0.004 * (len(a) - len(b)))))
        return [("A", 0.9 * p_a), ("B", 0.9 * (1 - p_a)), ("C", 0.1)]

    return letter_judge(policy)


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    from koala_lib import config

    tmp = tmp_path_factory.mktemp("parity")
    with serving(_judge_app()) as url:
        cfg = config.load("smoke", [f"runs_dir={tmp / 'runs'}", f"figures_dir={tmp / 'figures'}",
                                    f"eval.judge.base_url={url}/v1", "eval.judge.model=fake", "eval.judge.mode=logprobs",
                                    "eval.judge.tie_margin=0", "eval.comparisons=[koala_all:alpaca,koala_all:chatgpt]"])
        _answers(cfg)
        result = run_judge(cfg, progress=False).result
    return cfg, result, build_report(cfg)


def test_every_llm_row_names_its_file_and_alpaca_eval_reads_the_same_numbers(judged):
    cfg, result, rep = judged
    rows = [r for r in rep.comparisons if r["source"] == "llm"]
    per_set = [r for r in rows if r["test_set"] != "all"]
    assert {(r["test_set"], r["model_b"]) for r in per_set} == {(t, m) for t in ("koala", "alpaca") for m in ("alpaca", "chatgpt")}
    assert all("alpaca_eval_file" not in r for r in rows if r["test_set"] == "all")  # pooled rows have none
    for row in per_set:
        path = cfg.run_dir / row["alpaca_eval_file"]
        assert row["alpaca_eval_file"] == f"eval/alpaca_eval/{row['test_set']}/koala_all_vs_{row['model_b']}/annotations.json"
        frame = alpaca_eval_utils.load_or_convert_to_dataframe(path)
        assert set(frame["generator_2"]) == {"koala_all"} and set(frame["generator_1"]) == {row["model_b"]}
        assert len(frame) == row["n"] == (13 if row["test_set"] == "koala" else 14)  # koala_3 leaked
        theirs = metrics.get_winrate(frame)
        assert theirs["win_rate"] == pytest.approx(row["soft_win_rate"], abs=1e-9)
        assert theirs["discrete_win_rate"] == pytest.approx(row["win_rate"], abs=1e-9)  # tie margin 0: AlpacaEval's rule
        # AlpacaEval's GLM, length term only, built from the file as get_length_controlled_winrate builds it
        delta = frame["output_1"].str.len() - frame["output_2"].str.len()
        design = frame.assign(**{"np.tanh(std_delta_len)": np.tanh(delta / delta.std()), "not_gamed_baseline.astype(float)": 1.0})
        design = design[["np.tanh(std_delta_len)", "not_gamed_baseline.astype(float)"]].assign(preference=frame["preference"] - 1)
        model = glm.fit_LogisticRegressionCV(design, "preference", is_ytrue_proba=True, n_splits=5)
        at_zero = design.drop(columns=["preference"]).assign(**{"np.tanh(std_delta_len)": 0.0})
        assert row["lc_win_rate"] == pytest.approx(100 * model.predict_proba(at_zero)[:, 1].mean(), abs=0.1)
    # the better model wins: chatgpt's answers are written as better, alpaca's as worse
    soft = {(r["test_set"], r["model_b"]): r["soft_win_rate"] for r in per_set}
    assert soft[("koala", "alpaca")] > 50 > soft[("koala", "chatgpt")]


def test_outputs_files_are_what_alpaca_eval_takes_and_fastchat_files_are_split_the_same_way(judged):
    cfg, result, rep = judged
    folder = eval_dir(cfg) / "alpaca_eval" / "alpaca" / "koala_all_vs_chatgpt"
    model = alpaca_eval_utils.load_or_convert_to_dataframe(folder / "model_outputs.json")
    reference = alpaca_eval_utils.load_or_convert_to_dataframe(folder / "reference_outputs.json")
    assert set(model["generator"]) == {"koala_all"} and set(reference["generator"]) == {"chatgpt"}
    assert list(model["instruction"]) == list(reference["instruction"]) and len(model) == 14
    assert {"instruction", "output", "generator", "dataset"} <= set(model.columns)
    fastchat = sorted((eval_dir(cfg) / "fastchat").rglob("*.jsonl"))
    assert [p.relative_to(eval_dir(cfg)).as_posix() for p in fastchat] == [
        f"fastchat/{t}/koala_all_vs_{m}.jsonl" for t in ("alpaca", "koala") for m in ("alpaca", "chatgpt")]
    lines = [json.loads(line) for p in fastchat for line in p.read_text().splitlines()]
    assert len(lines) == sum(result.outcomes.values()) == 4 * 14 - 2 - RULED
    ruled = [a for p in (eval_dir(cfg) / "alpaca_eval").rglob("annotations.json") for a in json.loads(p.read_text()) if "judged_by" in a]
    assert sorted((a["generator_1"], a["id"], a["preference"]) for a in ruled) == [
        ("alpaca", "alpaca_0", 1.0), ("alpaca", "alpaca_1", 1.0), ("chatgpt", "alpaca_0", 1.0), ("chatgpt", "alpaca_1", 1.5),
        ("chatgpt", "alpaca_2", 2.0)]  # the non-empty answer wins; two empty answers tie
    assert {a["annotator"] for a in ruled} == {"fake"} and {a["judged_by"] for a in ruled} == {"rule: empty answer"}
    assert {r["model_1"] for r in lines} == {"koala_all"}


def test_a_dry_run_counts_what_would_be_sent_and_rerunning_sends_nothing(judged):
    from koala_lib.evaluation.stage import plan_calls

    cfg, result, rep = judged
    plan = plan_calls(cfg)
    comparisons = plan["parts"]["comparisons"]
    assert comparisons["games"] == comparisons["cached"] == 2 * (4 * 14 - 2 - RULED) and comparisons["to_send"] == 0
    assert any(n.startswith(f"{RULED} comparison pairs hold an empty answer") for n in plan["notes"])
    card = plan["parts"]["card"]
    assert card["to_send"] == card["games"] == 2 * len(probe_items())
    assert card["prompt_tokens_estimate"] > 100 * card["games"]  # a judge prompt holds two answers and the rules
    assert "calibration" not in plan["parts"] and any("calibration not counted" in n for n in plan["notes"])
    again = run_judge(cfg, progress=False).result  # the cache answers every game: the endpoint, now closed, is not called
    assert (again.calls, again.cache_hits) == (0, 2 * (4 * 14 - 2 - RULED))
