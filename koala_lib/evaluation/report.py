"""The stage 5 report: every comparison with its intervals and length-controlled win rate, judges' agreement
and position bias, Bradley-Terry ratings, and the blog's figure next to this run's. Every judged table and
figure carries the judge's line: which judge, how it read its verdicts, how often it agrees with human labels
(`koala judge calibrate`), and its card's verdict (`koala judge card`): an unfit judge's bars are stamped.

    report = build_report(cfg)     # runs/<P>/eval/summary.json, figures, runs/<P>/eval/metrics.json
    report.table(); report.ratings_table(); report.figure_ours; report.figure_blog
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from koala_lib.config import Config, ConfigError
from koala_lib.evaluation.answer_health import answer_health, health_line, turn_markers
from koala_lib.evaluation.calibration import read_calibration
from koala_lib.evaluation.judge import WEAK_JUDGE_NOTE
from koala_lib.evaluation.exports import alpaca_eval_folder
from koala_lib.evaluation.judge_card import read_card
from koala_lib.evaluation.judgments import read_judgments
from koala_lib.evaluation.length_control import NAME as LC_NAME
from koala_lib.evaluation.length_control import lc_interval, lc_win_rate
from koala_lib.evaluation.pairwise import agreement, bradley_terry, compare, position_bias, soft
from koala_lib.evaluation.published import BLOG
from koala_lib.evaluation.stage import all_judgments, comparisons, eval_dir, load_answers
from koala_lib.files import atomic_text
from koala_lib.manifest import stale_inputs, warn_stale, write_manifest

SOURCE_TITLES = {"llm": "LLM judge", "rater": "raters (koala rate)", "mturk": "MTurk workers"}


def blog_panels() -> dict[str, list[dict]]:
    """The published bars in the plotting layout."""
    return {t: [{"label": f"vs {o}", "better": b, "tie": tie, "worse": w} for o, (b, tie, w) in bars.items()]
            for t, bars in BLOG.panels.items()}


def model_label(name: str, models: dict[str, dict], sep: str = " ") -> str:
    """A model's name as tables and figures show it; a stand-in says what stands in."""
    info = models.get(name, {})
    return f"{name}{sep}({info['what']})" if info.get("stand_in") else name


def ours_panels(rows: list[dict], models: dict[str, dict] | None = None) -> dict[str, list[dict]]:
    panels: dict[str, list[dict]] = {}
    for r in rows:
        if r["test_set"] == "all":
            continue
        panels.setdefault(r["test_set"], []).append({
            "label": f"vs {model_label(r['model_b'], models or {}, chr(10))}", "better": r["better"], "tie": r["tie"], "worse": r["worse"],
            "better_ci": r["better_ci"], "worse_ci": r["worse_ci"], "n": r["n"]})
    return panels


@dataclass
class EvalReport:
    cfg: Config
    judge: dict  # eval/judge.json, or {} when no LLM judge ran
    leakage: dict
    calibration: dict | None = None  # eval/calibration.json, or None before `koala judge calibrate`
    card: dict | None = None  # eval/judge_card.json, or None before `koala judge card`
    health: dict = field(default_factory=dict)  # model -> empty / cut / degenerate answer counts (answer_health)
    models: dict = field(default_factory=dict)  # generations/models.json: what each model is
    comparisons: list[dict] = field(default_factory=list)  # one row per source x pair x test set (and "all")
    agreement: dict = field(default_factory=dict)  # source -> Agreement fields
    position_bias: dict = field(default_factory=dict)  # source -> PositionBias fields
    ratings: list[dict] = field(default_factory=list)  # Bradley-Terry, one fit per source
    figures: dict[str, Path] = field(default_factory=dict)
    figure_blog: object = None
    figure_ours: object = None

    def table(self):
        """Comparisons as a DataFrame: hard-verdict shares (better / tie / worse %), the hard, soft and LC win rates,
        each with its 95 % interval, the sign-test p, and the AlpacaEval annotations file of each LLM row."""
        import pandas as pd

        span = lambda c: f"{c[0]:.1f}-{c[1]:.1f}" if c and c[0] is not None else ""  # None: not measured
        rows = [{"source": r["source"], "test set": r["test_set"], "model": r["model_a"], "vs": model_label(r["model_b"], self.models),
                 "n": r["n"], "better %": round(r["better"], 1), "better CI": span(r["better_ci"]), "tie %": round(r["tie"], 1),
                 "worse %": round(r["worse"], 1), "worse CI": span(r["worse_ci"]),
                 "hard win rate %": round(r["win_rate"], 1), "hard CI": span(r["win_rate_ci"]),
                 "soft win rate %": round(r["soft_win_rate"], 1), "soft CI": span(r["soft_win_rate_ci"]),
                 "LC win rate, length term only %": None if r.get("lc_win_rate") is None else round(r["lc_win_rate"], 1),
                 "LC CI": span(r.get("lc_ci")), "sign p": round(r["sign_p"], 4), "AlpacaEval file": r.get("alpaca_eval_file", "")}
                for r in self.comparisons]
        frame = pd.DataFrame(rows)
        frame.attrs["judge"] = self.judge_line()  # the line every judged table carries (shown under it in notebooks)
        frame.attrs["notes"] = self.table_notes()
        return frame

    def health_table(self):
        """Per model: its answers (prompts the leakage filter kept) that are empty, cut at the token limit, or
        degenerate (a template turn marker in the answer, or repetition)."""
        import pandas as pd

        return pd.DataFrame([{"model": m, **h} for m, h in self.health.items()])

    def table_notes(self) -> str:
        margin = self.cfg.eval.judge.tie_margin
        ruled = int(self.judge.get("by_rule", 0))
        rule = (f"; {ruled} pairs holding an empty answer were judged by rule (the non-empty answer wins, two empty "
                f"answers tie), not by the judge" if ruled else "")
        return (f"better / tie / worse and the hard win rate count hard verdicts (a soft preference within {margin:g} of 0.5 "
                f"is a tie; AlpacaEval's discrete_win_rate has no such margin); the soft win rate is the mean preference, "
                f"AlpacaEval's win_rate on the row's file; {LC_NAME}: AlpacaEval's GLM fit with its model and "
                f"tanh(standardised length difference) terms only (no instruction difficulty), predicted at equal length{rule}")

    def judge_line(self) -> str:
        """Which judge, how it read its verdicts, and how often it agrees with human labels."""
        if not self.judge:
            return "no LLM judge ran"
        panel = self.panel_line()
        return self._agreement_line() + ("\n" + panel if panel else "") + "\n" + self.card_line()

    def card_line(self) -> str:
        """The judge card's verdict: `judge fit`, `judge unfit: <reasons>`, or that no card was measured."""
        if not self.card:
            return "judge card not measured (koala judge card): fitness unknown"
        return "judge fit" if self.card["fit"] else "judge unfit: " + "; ".join(self.card["reasons"])

    def panel_line(self) -> str:
        """A panel's judges and how often each two agree (Cohen's kappa over better / tie / worse)."""
        panel = self.judge.get("panel")
        if not panel:
            return ""
        kappa = lambda k: "-" if k is None else f"{k:.2f}"
        pairs = "; ".join(f"{r['a']} and {r['b']}: kappa {kappa(r['kappa'])} on {r['pairs']} pairs" for r in panel["agreement"])
        dropped = [m["judge"] for m in panel["members"] if not m["kept"]]
        return (f"panel verdict: {panel['verdict']} of {sum(m['kept'] for m in panel['members'])} judges"
                + (f" ({', '.join(dropped)} left out: unfit)" if dropped else "") + (f"; {pairs}" if pairs else ""))

    def _agreement_line(self) -> str:
        weak = ", a weak judge" if self.judge.get("weak") else ""
        head = f"judge {self.judge.get('judge', '?')}{weak}, verdicts read from {self.judge.get('mode', 'text')}"
        if not self.calibration:
            return head + "; agreement with human labels not measured (koala judge calibrate)"
        c = self.calibration
        if not c.get("pairs"):
            return head + "; " + c.get("line", "not calibrated")
        if not c.get("judged"):
            return head + f"; no verdict on any of {c.get('pairs', 0)} human-labelled pairs"
        low, high = c["agreement_ci"]
        return head + f"; agrees with human labels {c['agreement']:.1f} % [{low:.1f}-{high:.1f}] on {c['judged']} held-out pairs (chance 50 %)"

    def blog_table(self):
        import pandas as pd

        return pd.DataFrame(BLOG.rows())

    def ratings_table(self):
        import pandas as pd

        return pd.DataFrame(self.ratings).round(1)

    def summary(self) -> dict:
        return {
            "profile": self.cfg.profile,
            "judge": {**self.judge, **({"note": WEAK_JUDGE_NOTE} if self.judge.get("weak") else {}), "line": self.judge_line()},
            "calibration": self.calibration, "judge_card": self.card, "models": self.models,
            "leakage": {k: self.leakage.get(k) for k in ("threshold",)} | {
                "removed": [r["id"] for r in self.leakage.get("removed", [])], "kept": len(self.leakage.get("kept", []))},
            "answer_health": self.health, "comparisons": self.comparisons, "agreement": self.agreement, "position_bias": self.position_bias,
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
        if self.calibration and self.calibration.get("judged"):
            out["judge_human_agreement"] = round(self.calibration["agreement"], 3)
            out["judge_calibration_pairs"] = self.calibration["judged"]
        for model, h in self.health.items():
            for kind in ("empty", "cut", "degenerate"):
                out[f"answer_health/{model}/{kind}"] = h[kind]
        if self.judge:
            for row in self.judge.get("panel", {}).get("agreement", []):
                out.setdefault("judge_panel_kappa", {})[f"{row['a']} | {row['b']}"] = row["kappa"]
            out["judged_by_rule"] = int(self.judge.get("by_rule", 0))
            c = self.card or {}
            out["judge_card"] = {"fit": bool(c.get("fit")), "reasons": c.get("reasons", ["judge card not measured"]),
                                 **{k: c.get(k) for k in ("position_consistency", "canary_accuracy", "length_coef", "human_agreement")}}
            if not c.get("fit"):
                out["judge_unfit"] = self.card_line().removeprefix("judge unfit: ")
            calls = [self.judge, self.calibration or {}, c]
            out["judge_calls"] = sum(int(x.get("calls", 0)) for x in calls)
            out["judge_cache_hits"] = sum(int(x.get("cache_hits", 0)) for x in calls)
        return out


def _orientation(cfg: Config, pair: frozenset, judgments: list) -> tuple[str, str]:
    """(model_a, model_b) for a pair: as in `eval.comparisons`, else the first variant first, else as first stored."""
    from koala_lib.config import variant_name

    for entry in cfg.eval.comparisons:
        a, _, b = (x.strip() for x in entry.partition(":"))
        if {a, b} == pair:
            return a, b
    first = variant_name(cfg.variants[0])
    if first in pair:
        return first, next(iter(pair - {first}))
    return next((j.model_a, j.model_b) for j in judgments if {j.model_a, j.model_b} == pair)


def length_controlled(judgments: list, a: str, b: str, test_set: str | None, lengths: dict, n_boot: int, seed: int) -> dict:
    """The LC win rate, length term only, of `a` over `b` (soft preferences where the judge gave them), with a
    prompt-bootstrap interval; {"lc_missing": n} when the answers' lengths are unknown."""
    every = [j.oriented(a, b) for j in judgments if {j.model_a, j.model_b} == {a, b} and test_set in (None, j.test_set)]
    known = lambda j: (a, j.test_set, j.prompt_id) in lengths and (b, j.test_set, j.prompt_id) in lengths
    # sorted as the exported files are (by test set and prompt id): the fit's CV folds follow the row order
    chosen = sorted((j for j in every if known(j)), key=lambda j: (j.test_set, j.prompt_id))  # no lengths: counted below
    keys = [((a, j.test_set, j.prompt_id), (b, j.test_set, j.prompt_id)) for j in chosen]
    if not chosen:
        return {"lc_missing": len(every)}
    pref = [soft(j) for j in chosen]
    len_a, len_b = [lengths[ka] for ka, _ in keys], [lengths[kb] for _, kb in keys]
    groups = [f"{j.test_set}/{j.prompt_id}" for j in chosen]
    lc = lc_win_rate(pref, len_a, len_b)
    nan = lambda v: None if v != v else v  # summary.json is plain JSON
    low, high = lc_interval(pref, len_a, len_b, C=lc.C if lc.C == lc.C else None, replicates=n_boot, seed=seed, groups=groups)
    return {"lc_win_rate": nan(lc.lc_win_rate), "lc_ci": (nan(low), nan(high)), "length_coef": nan(lc.length_coef),
            "lc_C": nan(lc.C), **({"lc_note": lc.note} if lc.note else {}), "lc_missing": len(every) - len(chosen)}


def build_report(cfg: Config, save: bool = True) -> EvalReport:
    """Summarise every judgment of the profile; with `save`, write `eval/summary.json` and the two figures
    (the caller writes `report.metrics()` with koala_lib.metrics, as every stage does)."""
    from koala_lib import plots

    folder = eval_dir(cfg)
    judge_file, leak_file = folder / "judge.json", folder / "leakage.json"
    judge = json.loads(judge_file.read_text(encoding="utf-8")) if judge_file.is_file() else {}
    leakage = json.loads(leak_file.read_text(encoding="utf-8")) if leak_file.is_file() else {}
    judgments = all_judgments(cfg)
    from koala_lib.inference.answers import read_models

    report = EvalReport(cfg, judge, leakage, calibration=read_calibration(cfg), card=read_card(cfg), models=read_models(cfg))
    removed = {r["id"] for r in leakage.get("removed", [])}
    try:
        answers = load_answers(cfg)
    except FileNotFoundError:  # judgments imported without stage 4's answers: no length control, no health
        answers = {}
    lengths = {(m, r["test_set"], r["id"]): len(r["output"]) for m, rows in answers.items() for r in rows}
    try:  # the models of the comparisons, whether or not the judge gave verdicts
        judged_models = {m for pair in comparisons(cfg, list(answers)) for m in pair} if answers else set()
    except ConfigError:  # answers of other models than the profile names (imported judgments)
        judged_models = set(answers)
    judged_models |= {m for j in judgments for m in (j.model_a, j.model_b)}
    report.health = answer_health({m: rows for m, rows in answers.items() if m in judged_models}, turn_markers(cfg),
                                  keep=lambda r: f"{r['test_set']}/{r['id']}" not in removed)
    seed, n_boot = cfg.seed, cfg.eval.bootstrap
    for source in sorted({j.source for j in judgments}):
        mine = [j for j in judgments if j.source == source]
        pairs = list(dict.fromkeys(frozenset((j.model_a, j.model_b)) for j in mine))
        for pair in pairs:
            a, b = _orientation(cfg, pair, mine)
            for test_set in [*sorted({j.test_set for j in mine if {j.model_a, j.model_b} == pair}), None]:
                row = compare(mine, a, b, test_set, n_boot=n_boot, seed=seed).row()
                lc = length_controlled(mine, a, b, test_set, lengths, min(n_boot, 200), seed)
                exported = alpaca_eval_folder(folder, test_set or "all", a, b) / "annotations.json"
                where = {"alpaca_eval_file": str(exported.relative_to(cfg.run_dir))} if source == "llm" and exported.is_file() else {}
                report.comparisons.append({"source": source, **row, **lc, **where})
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
    first = next((r["model_a"] for r in report.comparisons if r["source"] == source), "")
    title = f"This run, {first or 'no judgments'}, {SOURCE_TITLES[source]}"  # the judge's own line goes under the panels
    outcomes = judge.get("outcomes", {}) if source == "llm" else {}
    note = report.judge_line() if source == "llm" else ""
    if outcomes:
        note += f"\n{sum(outcomes.values())} pairs judged in both orders: {outcomes.get('no_verdict', 0)} without a verdict (left out)"
        if judge.get("by_rule"):
            note += f"; {judge['by_rule']} holding an empty answer judged by rule"
    if report.health:
        note += "\n" + health_line(report.health)
    ours = {t: [] for t in BLOG.panels} | ours_panels([r for r in report.comparisons if r["source"] == source], report.models)
    stamp = ""
    if source == "llm" and judge and not (report.card or {}).get("fit"):
        stamp = "JUDGE UNFIT" if report.card else "JUDGE NOT CHECKED"
    report.figure_ours = plots.blog_comparison(blog_panels(), ours, published_title, title, note, stamp=stamp)
    if save:
        figures = cfg.figures_path
        report.figures["blog_figure"] = plots.save(report.figure_blog, figures / "blog_figure.png")
        report.figures["win_tie_lose"] = plots.save(report.figure_ours, figures / "win_tie_lose.png")
        folder.mkdir(parents=True, exist_ok=True)
        atomic_text(folder / "summary.json", json.dumps(report.summary(), indent=2, ensure_ascii=False) + "\n")
        write_eval_manifest(cfg, folder, leak_file, judge)
    return report


def write_eval_manifest(cfg: Config, folder: Path, leak_file: Path, judge: dict) -> None:
    """Stage 5's manifest, once the report has written the last of eval/: its start is the leakage filter's."""
    stale = stale_inputs(cfg, "generate", ["generations"]) + stale_inputs(cfg, "data", ["data/curated"])
    warn_stale("stage 5", "stages 1 and 4", stale)
    started = leak_file.stat().st_mtime if leak_file.is_file() else time.time()
    reads = [cfg.run_dir / "generations", cfg.run_dir / "data" / "curated", cfg.run_dir / "conditioned" / "examples" / "eval"]
    write_manifest(cfg, "eval", folder, inputs=reads, outputs=[folder], started=started, stale=stale,
                   extra={"judge": {k: judge.get(k) for k in ("judge", "identity", "mode")}})
