"""The stage 5 report: every comparison with its intervals, judges' agreement and position bias, Bradley-Terry
ratings, and the blog's figure next to this run's.

    report = build_report(cfg)     # runs/<P>/eval/summary.json, figures, runs/<P>/eval/metrics.json
    report.table(); report.ratings_table(); report.figure_ours; report.figure_blog
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from koala_lib.config import Config
from koala_lib.evaluation.judge import WEAK_JUDGE_NOTE
from koala_lib.evaluation.judgments import read_judgments
from koala_lib.evaluation.pairwise import agreement, bradley_terry, compare, position_bias
from koala_lib.evaluation.published import BLOG
from koala_lib.evaluation.stage import all_judgments, eval_dir
from koala_lib.files import atomic_text

SOURCE_TITLES = {"llm": "LLM judge", "rater": "raters (koala rate)", "mturk": "MTurk workers"}


def blog_panels() -> dict[str, list[dict]]:
    """The published bars in the plotting layout."""
    return {t: [{"label": f"vs {o}", "better": b, "tie": tie, "worse": w} for o, (b, tie, w) in bars.items()]
            for t, bars in BLOG.panels.items()}


def ours_panels(rows: list[dict]) -> dict[str, list[dict]]:
    panels: dict[str, list[dict]] = {}
    for r in rows:
        if r["test_set"] == "all":
            continue
        panels.setdefault(r["test_set"], []).append({
            "label": f"vs {r['model_b']}", "better": r["better"], "tie": r["tie"], "worse": r["worse"],
            "better_ci": r["better_ci"], "worse_ci": r["worse_ci"], "n": r["n"]})
    return panels


@dataclass
class EvalReport:
    cfg: Config
    judge: dict  # eval/judge.json, or {} when no LLM judge ran
    leakage: dict
    comparisons: list[dict] = field(default_factory=list)  # one row per source x pair x test set (and "all")
    agreement: dict = field(default_factory=dict)  # source -> Agreement fields
    position_bias: dict = field(default_factory=dict)  # source -> PositionBias fields
    ratings: list[dict] = field(default_factory=list)  # Bradley-Terry, one fit per source
    figures: dict[str, Path] = field(default_factory=dict)
    figure_blog: object = None
    figure_ours: object = None

    def table(self):
        """Comparisons as a DataFrame: better / tie / worse %, win rate with its 95 % interval, sign-test p."""
        import pandas as pd

        rows = [{"source": r["source"], "test set": r["test_set"], "model": r["model_a"], "vs": r["model_b"],
                 "n": r["n"], "better %": round(r["better"], 1), "tie %": round(r["tie"], 1), "worse %": round(r["worse"], 1),
                 "win rate %": round(r["win_rate"], 1),
                 "95% CI": f"{r['win_rate_ci'][0]:.1f}-{r['win_rate_ci'][1]:.1f}", "sign p": round(r["sign_p"], 4)}
                for r in self.comparisons]
        return pd.DataFrame(rows)

    def blog_table(self):
        import pandas as pd

        return pd.DataFrame(BLOG.rows())

    def ratings_table(self):
        import pandas as pd

        return pd.DataFrame(self.ratings).round(1)

    def summary(self) -> dict:
        return {
            "profile": self.cfg.profile,
            "judge": {**self.judge, **({"note": WEAK_JUDGE_NOTE} if self.judge.get("weak") else {})},
            "leakage": {k: self.leakage.get(k) for k in ("threshold",)} | {
                "removed": [r["id"] for r in self.leakage.get("removed", [])], "kept": len(self.leakage.get("kept", []))},
            "comparisons": self.comparisons, "agreement": self.agreement, "position_bias": self.position_bias,
            "bradley_terry": self.ratings,
            "published": {"rows": BLOG.rows(), "source": BLOG.source, "url": BLOG.url, "precision": BLOG.precision},
            "figures": {k: str(v) for k, v in self.figures.items()},
        }

    def metrics(self) -> dict:
        out = {"judgments": sum(r["n"] for r in self.comparisons if r["test_set"] == "all"),
               "leaked_queries": len(self.leakage.get("removed", [])), "judge_weak": bool(self.judge.get("weak"))}
        for r in self.comparisons:
            if r["test_set"] == "all":
                out[f"{r['source']}/{r['model_a']}_vs_{r['model_b']}/win_rate"] = round(r["win_rate"], 3)
        return out


def _orientation(cfg: Config, pair: frozenset, judgments: list) -> tuple[str, str]:
    """(model_a, model_b) for a pair: as in `eval.comparisons`, else the first variant first, else as first stored."""
    from koala_lib.train.data import variant_name

    for entry in cfg.eval.comparisons:
        a, _, b = (x.strip() for x in entry.partition(":"))
        if {a, b} == pair:
            return a, b
    first = variant_name(cfg.variants[0])
    if first in pair:
        return first, next(iter(pair - {first}))
    return next((j.model_a, j.model_b) for j in judgments if {j.model_a, j.model_b} == pair)


def build_report(cfg: Config, save: bool = True) -> EvalReport:
    """Summarise every judgment of the profile; with `save`, write `eval/summary.json` and the two figures
    (the caller writes `report.metrics()` with koala_lib.metrics, as every stage does)."""
    from koala_lib import plots

    folder = eval_dir(cfg)
    judge_file, leak_file = folder / "judge.json", folder / "leakage.json"
    judge = json.loads(judge_file.read_text(encoding="utf-8")) if judge_file.is_file() else {}
    leakage = json.loads(leak_file.read_text(encoding="utf-8")) if leak_file.is_file() else {}
    judgments = all_judgments(cfg)
    report = EvalReport(cfg, judge, leakage)
    seed, n_boot = cfg.seed, cfg.eval.bootstrap
    removed = {r["id"] for r in leakage.get("removed", [])}
    for source in sorted({j.source for j in judgments}):
        mine = [j for j in judgments if j.source == source]
        pairs = list(dict.fromkeys(frozenset((j.model_a, j.model_b)) for j in mine))
        for pair in pairs:
            a, b = _orientation(cfg, pair, mine)
            for test_set in [*sorted({j.test_set for j in mine if {j.model_a, j.model_b} == pair}), None]:
                row = compare(mine, a, b, test_set, n_boot=n_boot, seed=seed).row()
                report.comparisons.append({"source": source, **row})
        report.agreement[source] = vars(agreement(mine)) if source != "llm" else None
        games_file = folder / "llm_games.jsonl"
        games = mine
        if source == "llm" and games_file.is_file():  # position bias from single games, leaked prompts left out too
            games = [g for g in read_judgments(games_file) if f"{g.test_set}/{g.prompt_id}" not in removed]
        report.position_bias[source] = vars(position_bias(games))
        if len({m for j in mine for m in (j.model_a, j.model_b)}) >= 2:
            for row in bradley_terry(mine, n_boot=min(n_boot, 200), seed=seed).rows():
                report.ratings.append({"source": source, **row})
    published_title = "Published, Koala-13B (All), human raters"
    report.figure_blog = plots.win_tie_lose(blog_panels(), published_title)
    # this run's figure: human judgments when there are any (as in the blog), else the LLM judge's
    sources = {r["source"] for r in report.comparisons}
    source = next((s for s in ("rater", "mturk", "llm") if s in sources), "llm")
    judge_name = f"judge {judge.get('judge', '')}" if source == "llm" else SOURCE_TITLES[source]
    weak = " (weak)" if source == "llm" and judge.get("weak") else ""
    first = next((r["model_a"] for r in report.comparisons if r["source"] == source), "")
    title = f"This run, {first or 'no judgments'}, {judge_name}{weak}"
    outcomes = judge.get("outcomes", {}) if source == "llm" else {}
    note = (f"LLM judge, {sum(outcomes.values())} pairs judged in both orders: {outcomes.get('consistent', 0)} consistent, "
            f"{outcomes.get('inconsistent', 0)} inconsistent (ties), {outcomes.get('no_verdict', 0)} without a verdict "
            "(left out)") if outcomes else ""
    ours = {t: [] for t in BLOG.panels} | ours_panels([r for r in report.comparisons if r["source"] == source])
    report.figure_ours = plots.blog_comparison(blog_panels(), ours, published_title, title, note)
    if save:
        figures = cfg.figures_path
        report.figures["blog_figure"] = plots.save(report.figure_blog, figures / "blog_figure.png")
        report.figures["win_tie_lose"] = plots.save(report.figure_ours, figures / "win_tie_lose.png")
        folder.mkdir(parents=True, exist_ok=True)
        atomic_text(folder / "summary.json", json.dumps(report.summary(), indent=2, ensure_ascii=False) + "\n")
    return report
