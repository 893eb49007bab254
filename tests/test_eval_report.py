"""Stage 5's report over judgments from several sources, and the choice of pairs to judge."""

import json

import pytest

from koala_lib.config import ConfigError
from koala_lib.evaluation.judgments import Judgment, write_judgments
from koala_lib.evaluation.published import BLOG
from koala_lib.evaluation.report import blog_panels, build_report
from koala_lib.evaluation.stage import comparisons, items_to_judge, judgments_dir

T = "2026-01-01T00:00:00+00:00"


def _setup(cfg, removed=("koala/k3",)):
    folder = cfg.run_dir / "eval"
    folder.mkdir(parents=True)
    (folder / "leakage.json").write_text(json.dumps({"threshold": 20.0, "removed": [{"id": i, "bleu": 55.0, "train_text": "x"} for i in removed],
                                                     "kept": ["koala/k0", "koala/k1", "koala/k2"]}))
    raters = [Judgment(f"k{i}", "koala", "koala_all", "base", v, r, i % 2 == 0, T)
              for i, pair in enumerate([("A", "A"), ("A", "tie"), ("B", "A"), ("B", "B")]) for r, v in zip(("r1", "r2"), pair)]
    llm = [Judgment(f"k{i}", "koala", "koala_all", "base", v, "judge", False, T, "llm") for i, v in enumerate("AABA")]
    write_judgments(judgments_dir(cfg) / "raters.jsonl", raters)
    write_judgments(judgments_dir(cfg) / "llm.jsonl", llm)
    (folder / "judge.json").write_text(json.dumps({"judge": "tiny (kit server)", "weak": True, "outcomes": {}}))
    return raters, llm


def test_report_summarises_each_source_without_leaked_prompts(make_cfg):
    cfg = make_cfg("smoke")
    _setup(cfg)
    rep = build_report(cfg)
    rows = {(r["source"], r["test_set"]): r for r in rep.comparisons}
    assert set(rows) == {("rater", "koala"), ("rater", "all"), ("llm", "koala"), ("llm", "all")}
    # k3 leaked: raters' k0..k2 verdicts A A | A tie | B A -> 4 A, 1 tie, 1 B of 6
    r = rows[("rater", "all")]
    assert (r["n"], r["prompts"]) == (6, 3)
    assert (r["better"], r["tie"], r["worse"]) == pytest.approx((400 / 6, 100 / 6, 100 / 6))
    assert rows[("llm", "all")]["n"] == 3  # "AABA" less k3
    assert rep.agreement["rater"]["items"] == 3 and rep.agreement["llm"] is None
    assert {(row["source"], row["model"]) for row in rep.ratings} == {(s, m) for s in ("llm", "rater") for m in ("koala_all", "base")}
    llm_rating = {row["model"]: row["rating"] for row in rep.ratings if row["source"] == "llm"}
    assert llm_rating["koala_all"] > llm_rating["base"]
    summary = json.loads((cfg.run_dir / "eval" / "summary.json").read_text())
    assert summary["judge"]["weak"] is True and "weak judge" in summary["judge"]["note"]
    assert summary["leakage"]["removed"] == ["koala/k3"]
    assert summary["published"]["url"] == BLOG.url
    assert (cfg.figures_path / "blog_figure.png").stat().st_size > 10_000
    assert (cfg.figures_path / "win_tie_lose.png").stat().st_size > 10_000
    assert rep.metrics()["llm/koala_all_vs_base/win_rate"] == pytest.approx(100 * 2 / 3, abs=1e-3)


def test_the_blog_numbers_are_the_published_ones():
    panels = blog_panels()
    assert [(r["label"], r["better"], r["tie"], r["worse"]) for r in panels["koala"]] == [
        ("vs Alpaca", 48, 22, 30), ("vs Koala-Distill", 34, 26, 40), ("vs ChatGPT", 30, 26, 44)]
    assert [(r["better"], r["tie"], r["worse"]) for r in panels["alpaca"]] == [(32, 38, 30), (26, 28, 46), (31, 29, 40)]
    assert all(sum(bar) == 100 for bars in BLOG.panels.values() for bar in bars.values())


def test_comparisons_default_and_from_config(make_cfg):
    cfg = make_cfg("smoke")
    # the blog's opponents among those that answered; the base model is not one of them
    assert comparisons(cfg, ["base", "koala_all", "koala_distill"]) == [("koala_all", "koala_distill")]
    assert comparisons(cfg, ["alpaca", "base", "chatgpt", "koala_all"]) == [("koala_all", "alpaca"), ("koala_all", "chatgpt")]
    assert comparisons(cfg, ["base", "koala_all", "mine"]) == [("koala_all", "base"), ("koala_all", "mine")]  # none of them
    cfg = make_cfg("smoke", "eval.comparisons=[koala_distill:base]")
    assert comparisons(cfg, ["base", "koala_all", "koala_distill"]) == [("koala_distill", "base")]
    with pytest.raises(ConfigError, match="no answers from 'gpt4'"):
        comparisons(make_cfg("smoke", "eval.comparisons=[koala_all:gpt4]"), ["base", "koala_all"])
    with pytest.raises(ConfigError, match="is not A:B"):
        comparisons(make_cfg("smoke", "eval.comparisons=[koala_all]"), ["base", "koala_all"])


def test_items_leave_out_leaked_prompts(make_cfg):
    cfg = make_cfg("smoke")
    gen = cfg.run_dir / "generations"
    gen.mkdir(parents=True)
    for name in ("base", "koala_all"):
        rows = [{"id": f"k{i}", "test_set": "koala", "instruction": f"q{i}", "output": f"{name} {i}", "generator": name,
                 "dataset": "koala"} for i in range(4)]
        (gen / f"{name}.json").write_text(json.dumps(rows))
    with pytest.raises(FileNotFoundError, match="run the leakage filter first"):
        items_to_judge(cfg)
    _setup(cfg)
    items = items_to_judge(cfg)
    assert [(i.prompt_id, i.model_a, i.answer_a, i.model_b, i.answer_b) for i in items] == [
        (f"k{i}", "koala_all", f"koala_all {i}", "base", f"base {i}") for i in range(3)]


def test_position_bias_of_the_llm_judge_comes_from_its_games_without_leaked_prompts(make_cfg):
    cfg = make_cfg("smoke")
    _setup(cfg)
    # games: the first-shown answer won on k0, k1 (kept) and on k3 (leaked); the second-shown won on k2
    games = [Judgment("k0", "koala", "koala_all", "base", "A", "judge", False, T, "llm"),
             Judgment("k1", "koala", "koala_all", "base", "B", "judge", True, T, "llm"),
             Judgment("k2", "koala", "koala_all", "base", "B", "judge", False, T, "llm"),
             Judgment("k3", "koala", "koala_all", "base", "A", "judge", False, T, "llm")]
    write_judgments(cfg.run_dir / "eval" / "llm_games.jsonl", games)
    rep = build_report(cfg, save=False)
    assert (rep.position_bias["llm"]["decisive"], rep.position_bias["llm"]["first_won"]) == (3, 2)
    # raters: r1 saw koala_all first on even prompts; decisive kept k0 (A, A), k1 (A), k2 (B, A)
    assert rep.position_bias["rater"]["decisive"] == 5


def test_a_pair_stored_in_both_orders_is_one_comparison(make_cfg):
    cfg = make_cfg("smoke")
    _setup(cfg)
    flipped = [Judgment("k0", "koala", "base", "koala_all", "B", "r3", False, T)]
    write_judgments(judgments_dir(cfg) / "more.jsonl", flipped)
    rep = build_report(cfg, save=False)
    rater = [r for r in rep.comparisons if r["source"] == "rater"]
    assert [(r["model_a"], r["model_b"], r["test_set"], r["n"]) for r in rater] == [
        ("koala_all", "base", "koala", 7), ("koala_all", "base", "all", 7)]


def test_a_judge_without_verdicts_gives_an_empty_panel_not_a_crash(make_cfg):
    cfg = make_cfg("smoke")
    folder = cfg.run_dir / "eval"
    folder.mkdir(parents=True)
    (folder / "leakage.json").write_text(json.dumps({"threshold": 20.0, "removed": [], "kept": ["koala/k0"]}))
    (folder / "judge.json").write_text(json.dumps({"judge": "tiny", "weak": True, "pairs": 2, "judgments": 0,
                                                   "outcomes": {"no_verdict": 2}}))
    write_judgments(judgments_dir(cfg) / "llm.jsonl", [])
    rep = build_report(cfg)
    assert rep.comparisons == [] and rep.ratings == [] and rep.metrics()["judgments"] == 0
    texts = [t.get_text() for sub in rep.figure_ours.subfigs for ax in sub.axes for t in ax.texts]
    assert texts.count("no judgments") == 2
    assert "2 without a verdict (left out)" in rep.figure_ours.subfigs[1]._supxlabel.get_text()
    assert (cfg.figures_path / "win_tie_lose.png").stat().st_size > 10_000


def test_soft_preferences_length_control_stand_ins_and_the_judge_line(make_cfg):
    cfg = make_cfg("smoke")
    folder = cfg.run_dir / "eval"
    folder.mkdir(parents=True)
    ids = [f"k{i}" for i in range(12)]
    (folder / "leakage.json").write_text(json.dumps({"threshold": 20.0, "removed": [], "kept": [f"koala/{i}" for i in ids]}))
    (folder / "judge.json").write_text(json.dumps({"judge": "big (endpoint)", "weak": False, "mode": "logprobs",
                                                   "outcomes": {"consistent": 12}}))
    (folder / "calibration.json").write_text(json.dumps({"pairs": 100, "judged": 96, "agreement": 61.5, "agreement_ci": [52.1, 70.8],
                                                         "line": "x"}))
    gen = cfg.run_dir / "generations"
    gen.mkdir(parents=True)
    # koala_all's answers are long on half the prompts; the judge prefers exactly those (a pure length bias)
    long = {i: i % 2 == 0 for i in range(12)}
    for model, size in (("koala_all", lambda i: 900 if long[i] else 100), ("chatgpt", lambda i: 300 + 10 * i)):
        (gen / f"{model}.json").write_text(json.dumps([{"id": f"k{i}", "test_set": "koala", "instruction": f"q{i}",
                                                        "output": "x" * size(i)} for i in range(12)]))
    (gen / "models.json").write_text(json.dumps({"chatgpt": {"name": "chatgpt", "kind": "base", "stand_in": True,
                                                             "what": "stand-in: SmolLM2-135M-Instruct"}}))
    llm = [Judgment(f"k{i}", "koala", "koala_all", "chatgpt", "A" if long[i] else "B", "big", False, T, "llm",
                    0.9 if long[i] else 0.1) for i in range(12)]
    write_judgments(judgments_dir(cfg) / "llm.jsonl", llm)
    rep = build_report(cfg)
    row = next(r for r in rep.comparisons if r["test_set"] == "all")
    assert row["win_rate"] == pytest.approx(50.0) and row["soft_win_rate"] == pytest.approx(50.0)
    assert row["length_coef"] > 1.0  # the judge favours the longer answer
    assert row["lc_ci"][0] <= row["lc_win_rate"] <= row["lc_ci"][1] and row["lc_missing"] == 0
    from koala_lib.evaluation.length_control import lc_win_rate

    sizes = {"koala_all": [900 if long[i] else 100 for i in range(12)], "chatgpt": [300 + 10 * i for i in range(12)]}
    direct = lc_win_rate([0.9 if long[i] else 0.1 for i in range(12)], sizes["koala_all"], sizes["chatgpt"])
    assert row["lc_win_rate"] == pytest.approx(direct.lc_win_rate) and row["length_coef"] == pytest.approx(direct.length_coef)
    line = rep.judge_line()
    assert line == ("judge big (endpoint), verdicts read from logprobs; agrees with human labels 61.5 % [52.1-70.8] "
                    "on 96 held-out pairs (chance 50 %)\njudge card not measured (koala judge card): fitness unknown")
    assert rep.table().attrs["judge"] == line
    assert set(rep.table()["vs"]) == {"chatgpt (stand-in: SmolLM2-135M-Instruct)"}
    labels = [t.get_text() for ax in rep.figure_ours.subfigs[1].axes for t in ax.get_yticklabels()]
    assert "vs chatgpt\n(stand-in: SmolLM2-135M-Instruct)" in labels
    assert line in rep.figure_ours.subfigs[1]._supxlabel.get_text()
    assert rep.metrics()["judge_human_agreement"] == 61.5
    assert rep.metrics()["judge_card"]["fit"] is False and rep.metrics()["judge_unfit"] == "judge card not measured (koala judge card): fitness unknown"
    stamps = [t.get_text() for ax in rep.figure_ours.subfigs[1].axes for t in ax.texts]
    assert "JUDGE NOT CHECKED" in stamps
    assert json.loads((folder / "summary.json").read_text())["judge"]["line"] == line
    # the same judgments stored the other way round (model_a = chatgpt) give the same row for koala_all
    write_judgments(judgments_dir(cfg) / "llm.jsonl", [j.oriented("chatgpt", "koala_all") for j in llm])
    flipped = next(r for r in build_report(cfg, save=False).comparisons if r["test_set"] == "all")
    assert (flipped["model_a"], flipped["model_b"]) == ("koala_all", "chatgpt")
    assert flipped["lc_win_rate"] == pytest.approx(row["lc_win_rate"]) and flipped["soft_win_rate"] == pytest.approx(50.0)
