"""The judge card: a judge's measured fitness, taken before its verdicts are believed.

    card = measure_card(cfg)        # canaries and markdown probes judged, plus what stage 5 already holds
    card.fit, card.reasons          # `fit` or `unfit`, and why, from `eval.card`'s thresholds
    card.lines()                    # the card as text, one line per measure (`koala judge card`)

What the card measures, each judged in both orders as every comparison is:

- **Canaries** (`probes.py`: `judge_data/canaries.jsonl`, 48 pairs written for the kit): a question with a better answer not in
  doubt (a correct against a wrong arithmetic result, an answer against a refusal of a harmless request, an answer
  against itself cut mid-sentence, an on-topic answer against one for another question). The better answer is the
  shorter one in exactly half, so neither "pick the longer" nor "pick the first" passes. A canary is right only
  when both orders pick the better answer.
- **Position consistency**: the share of pairs whose verdict survives the swap (game 1 and game 2 agree in model
  terms), over the canaries, the markdown probes and stage 5's comparisons; and the share of decisive single
  games won by the answer shown first.
- **Length preference**: over the comparisons' and the canaries' judged pairs, the LC model's length coefficient
  (`length_control`: > 0 favours the longer answer) with its bootstrap interval, and the mean preference for the
  longer answer of a pair.
- **Markdown preference** (`judge_data/markdown.jsonl`): the same words with and without markdown; the mean
  preference for the markdown version (50 % = indifferent).
- **Self-preference**, where the judge also answered (the kit's server judges with the base model, which may
  answer too, or as a stand-in): its mean preference for its own model's answers in the comparisons.
- **Agreement with human labels**: `koala judge calibrate`'s figure with its interval, when it was measured.

`fit` needs every threshold of `eval.card` met; a judge that is unfit still has its comparisons computed and
exported, but every table, figure and metrics file says `judge unfit: <reasons>`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from koala_lib.evaluation.judgments import Judgment, PairItem, read_judgments
from koala_lib.evaluation.pairwise import position_bias, soft
from koala_lib.evaluation.probes import CANARY, MARKDOWN, canary_kinds, probe_items

@dataclass
class JudgeCard:
    judge: str
    mode: str
    canaries: int = 0
    canaries_right: int = 0
    canary_accuracy: float | None = None  # % right in both orders
    canaries_by_kind: dict = field(default_factory=dict)  # kind -> [right, of]
    canary_verdicts: dict = field(default_factory=dict)  # id -> [game 1, game 2] verdicts in model terms (drift)
    consistency_pairs: int = 0
    position_consistency: float | None = None  # % of pairs with a verdict in both orders whose verdict survives the swap
    first_slot: float | None = None  # % of decisive single games won by the answer shown first
    first_slot_games: int = 0
    length_pairs: int = 0
    length_coef: float | None = None
    length_coef_ci: tuple | None = None
    longer_preference: float | None = None  # % mean preference for the longer answer
    markdown_pairs: int = 0
    markdown_preference: float | None = None  # % mean preference for the markdown version
    markdown_ci: tuple | None = None
    self_models: list = field(default_factory=list)
    self_pairs: int = 0
    self_preference: float | None = None  # % mean preference for the judge's own model's answers
    human_agreement: float | None = None
    human_agreement_ci: tuple | None = None
    human_pairs: int = 0
    human_note: str = ""  # why the agreement is missing, when it is
    fit: bool = False
    reasons: list = field(default_factory=list)
    thresholds: dict = field(default_factory=dict)
    calls: int = 0  # requests sent to the judge for the probes
    members: list = field(default_factory=list)  # a panel's judges: index, judge, fit, reasons, kept
    cache_hits: int = 0  # probe games answered from the call cache
    drift_checked: int = 0  # canary pairs asked again although cached (an endpoint judge)
    drift: list = field(default_factory=list)  # games among them whose verdict differs from the cached one

    def to_json(self) -> dict:
        return asdict(self)

    def verdict_line(self) -> str:
        return "judge fit" if self.fit else "judge unfit: " + "; ".join(self.reasons)

    def lines(self) -> list[str]:
        pct = lambda v: "-" if v is None else f"{v:.1f} %"
        ci = lambda c: "" if not c or c[0] is None else f" [{c[0]:.1f}-{c[1]:.1f}]"
        kinds = ", ".join(f"{k} {r}/{n}" for k, (r, n) in sorted(self.canaries_by_kind.items()))
        out = [f"judge card: {self.judge} ({self.mode} verdicts): {'FIT' if self.fit else 'UNFIT'}",
               f"  canaries right in both orders   {pct(self.canary_accuracy)} ({self.canaries_right} of {self.canaries}; {kinds})",
               f"  position consistency           {pct(self.position_consistency)} of {self.consistency_pairs} pairs",
               f"  first-shown answer wins        {pct(self.first_slot)} of {self.first_slot_games} decisive games",
               f"  length coefficient             {'-' if self.length_coef is None else f'{self.length_coef:+.2f}'}"
               f"{'' if not self.length_coef_ci else f' [{self.length_coef_ci[0]:+.2f} to {self.length_coef_ci[1]:+.2f}]'}"
               f"; longer answer preferred {pct(self.longer_preference)} ({self.length_pairs} pairs)",
               f"  markdown preferred             {pct(self.markdown_preference)}{ci(self.markdown_ci)} ({self.markdown_pairs} pairs)",
               f"  own model's answers preferred  {pct(self.self_preference)} ({self.self_pairs} pairs"
               f"{': ' + ', '.join(self.self_models) if self.self_models else ', the judge did not answer'})",
               f"  agreement with human labels    {pct(self.human_agreement)}{ci(self.human_agreement_ci)} ({self.human_pairs} pairs)"]
        if self.drift_checked:
            out.append(f"  drift                          {self.drift_line()}")
        for m in self.members:
            verdict = "fit" if m["fit"] else "unfit: " + "; ".join(m["reasons"])
            out.append(f"  panel judge {m['index']} {m['judge']}: {verdict}{'' if m['kept'] else ' (left out of the verdict)'}")
        if not self.fit:
            out.append("  unfit: " + "; ".join(self.reasons))
        return out

    def drift_line(self) -> str:
        if not self.drift:
            return f"none: {self.drift_checked} canary pairs asked again gave the cached verdicts"
        changed = sorted({d["item"].split("/")[1] for d in self.drift})
        return (f"{len(self.drift)} games of {len(changed)} of {self.drift_checked} canary pairs asked again changed verdict "
                f"against the cache from an earlier run ({', '.join(changed)}): the model behind this name has changed")


def _canaries(card: JudgeCard, games: Sequence[Judgment], kinds: dict[str, str]) -> None:
    by_id: dict[str, dict[bool, str]] = {pid: {} for pid in kinds}
    for g in games:
        if g.test_set == CANARY:
            by_id[g.prompt_id][g.swapped] = g.verdict
    right_by_kind: dict[str, list[int]] = {}
    for pid, kind in kinds.items():
        verdicts = [by_id[pid].get(False), by_id[pid].get(True)]
        card.canary_verdicts[pid] = verdicts
        right = verdicts == ["A", "A"]
        tally = right_by_kind.setdefault(kind, [0, 0])
        tally[0] += right
        tally[1] += 1
    card.canaries = len(kinds)
    card.canaries_right = sum(r for r, _ in right_by_kind.values())
    card.canaries_by_kind = right_by_kind
    card.canary_accuracy = 100.0 * card.canaries_right / card.canaries if card.canaries else None


def _mean_ci(values: list[float], replicates: int, seed: int) -> tuple[float | None, tuple | None]:
    from koala_lib.evaluation.calibration import bootstrap_mean

    if not values:
        return None, None
    return 100.0 * float(np.mean(values)), bootstrap_mean(np.asarray(values, dtype=float), replicates, seed)


def build_card(judge: str, mode: str, probes: Sequence[PairItem], probe_result, comparison_games: Sequence[Judgment] = (),
               comparison_judgments: Sequence[Judgment] = (), comparison_outcomes: dict | None = None,
               lengths: dict | None = None, self_models: Sequence[str] = (), calibration: dict | None = None,
               thresholds=None, replicates: int = 200, seed: int = 0) -> JudgeCard:
    """The card from the probes' JudgeResult and what stage 5 holds (its single games, judgments, outcome counts,
    answer lengths keyed (model, test_set, prompt_id), and `eval/calibration.json`); `thresholds` is `eval.card`."""
    from koala_lib.evaluation.length_control import lc_interval, lc_win_rate

    card = JudgeCard(judge, mode, calls=probe_result.calls, cache_hits=probe_result.cache_hits, drift=list(probe_result.drift))
    _canaries(card, probe_result.games, canary_kinds())
    # position: pairs whose two orders both gave a verdict, and single games
    outcomes = {k: probe_result.outcomes.get(k, 0) + (comparison_outcomes or {}).get(k, 0) for k in ("consistent", "inconsistent")}
    card.consistency_pairs = outcomes["consistent"] + outcomes["inconsistent"]
    if card.consistency_pairs:
        card.position_consistency = 100.0 * outcomes["consistent"] / card.consistency_pairs
    bias = position_bias([*probe_result.games, *comparison_games])
    card.first_slot, card.first_slot_games = bias.share_first, bias.decisive
    # length: comparisons and canaries pooled, one row per judged pair
    text = {(it.model_a, it.test_set, it.prompt_id): it.answer_a for it in probes} | {
        (it.model_b, it.test_set, it.prompt_id): it.answer_b for it in probes}
    sizes = {k: len(v) for k, v in text.items()} | (lengths or {})
    rows = [(soft(j), sizes[(j.model_a, j.test_set, j.prompt_id)], sizes[(j.model_b, j.test_set, j.prompt_id)])
            for j in [*comparison_judgments, *(j for j in probe_result.judgments if j.test_set == CANARY)]
            if (j.model_a, j.test_set, j.prompt_id) in sizes and (j.model_b, j.test_set, j.prompt_id) in sizes]
    card.length_pairs = len(rows)
    if rows:
        p, la, lb = (np.array(c, dtype=float) for c in zip(*rows))
        fit = lc_win_rate(p, la, lb)
        if np.isfinite(fit.length_coef):
            card.length_coef = fit.length_coef
            card.length_coef_ci = lc_interval(p, la, lb, C=fit.C, replicates=replicates, seed=seed, stat="length_coef")
        differ = la != lb
        if differ.any():
            card.longer_preference = 100.0 * float(np.where(la > lb, p, 1 - p)[differ].mean())
    # markdown
    styled = [soft(j) for j in probe_result.judgments if j.test_set == MARKDOWN]
    card.markdown_pairs = len(styled)
    card.markdown_preference, card.markdown_ci = _mean_ci(styled, replicates, seed)
    # self-preference
    own = [soft(j) if j.model_a in self_models else 1 - soft(j)
           for j in comparison_judgments if (j.model_a in self_models) != (j.model_b in self_models)]
    card.self_models, card.self_pairs = sorted(self_models), len(own)
    if own:
        card.self_preference = 100.0 * float(np.mean(own))
    if calibration and not calibration.get("judged"):
        card.human_note = (f"not measured: no verdict on any of {calibration['pairs']} held-out pairs" if calibration.get("pairs")
                           else "not measured: no held-out human-labelled pairs")
    if calibration and calibration.get("judged"):
        card.human_agreement = calibration["agreement"]
        card.human_agreement_ci = tuple(calibration["agreement_ci"])
        card.human_pairs = calibration["judged"]
    _verdict(card, thresholds)
    return card


def _verdict(card: JudgeCard, thresholds) -> None:
    from koala_lib.config import CardConfig

    t = thresholds or CardConfig()
    card.thresholds = {"min_canary_accuracy": t.min_canary_accuracy, "min_position_consistency": t.min_position_consistency,
                       "require_human_agreement": t.require_human_agreement}
    reasons = []
    if card.canary_accuracy is None or card.canary_accuracy < t.min_canary_accuracy:
        reasons.append(f"canaries {0.0 if card.canary_accuracy is None else card.canary_accuracy:.1f} % right in both orders "
                       f"(needs {t.min_canary_accuracy:g} %)")
    if card.position_consistency is None or card.position_consistency < t.min_position_consistency:
        shown = "no pair with a verdict in both orders" if card.position_consistency is None else f"{card.position_consistency:.1f} %"
        reasons.append(f"position consistency {shown} (needs {t.min_position_consistency:g} %)")
    if t.require_human_agreement:
        if card.human_agreement_ci is None:
            reasons.append(f"agreement with human labels {card.human_note or 'not measured (koala judge calibrate)'}")
        elif not card.human_agreement_ci[0] > 50.0:
            reasons.append(f"agreement with human labels {card.human_agreement:.1f} % "
                           f"[{card.human_agreement_ci[0]:.1f}-{card.human_agreement_ci[1]:.1f}] does not exclude chance (50 %)")
    if card.drift:
        reasons.append(f"drift: {len(card.drift)} canary games answered differently than the cached verdicts of an earlier run "
                       "under the same name (clear call_cache or name the model's dated version)")
    card.reasons, card.fit = reasons, not reasons


def card_path(cfg) -> Path:
    return cfg.run_dir / "eval" / "judge_card.json"


def read_card(cfg) -> dict | None:
    path = card_path(cfg)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _self_models(cfg, models: dict[str, dict]) -> list[str]:
    """Answerers that are the judge's own model: the base (or a stand-in for it) when the kit's server judges, or an
    `openai:MODEL` answerer of the judge's model at the judge's endpoint."""
    j = cfg.eval.judge
    if not j.base_url:
        return [m for m, info in models.items() if info.get("kind") == "base"]
    same_place = cfg.generate.endpoint.base_url.rstrip("/") == j.base_url.rstrip("/")
    return [m for m, info in models.items() if info.get("kind") == "openai" and same_place and info.get("what", "").startswith(f"openai:{j.model} ")]


def _stage5(cfg) -> tuple[list, list, dict, dict]:
    """(single games, judgments by the judge, outcome counts, answer lengths) of stage 5's comparisons, if judged."""
    from koala_lib.evaluation.answer_health import RULE_JUDGE
    from koala_lib.evaluation.stage import eval_dir, judgments_dir, load_answers, removed_queries

    folder = eval_dir(cfg)
    if not (folder / "judge.json").is_file():
        return [], [], {}, {}
    removed = removed_queries(cfg)
    kept = lambda rows: [g for g in rows if f"{g.test_set}/{g.prompt_id}" not in removed and g.judge != RULE_JUDGE]
    games = kept(read_judgments(folder / "llm_games.jsonl")) if (folder / "llm_games.jsonl").is_file() else []
    judgments = kept(read_judgments(judgments_dir(cfg) / "llm.jsonl")) if (judgments_dir(cfg) / "llm.jsonl").is_file() else []
    outcomes = json.loads((folder / "judge.json").read_text(encoding="utf-8")).get("outcomes", {})
    lengths = {(m, r["test_set"], r["id"]): len(r["output"]) for m, rows in load_answers(cfg).items() for r in rows}
    return games, judgments, outcomes, lengths


def _card(cfg, probes, result, stage5, calibration, drift_checked: int) -> JudgeCard:
    from koala_lib.inference.answers import read_models

    games, judgments, outcomes, lengths = stage5
    card = build_card(result.judge, result.mode, probes, result, games, judgments, outcomes, lengths,
                      _self_models(cfg, read_models(cfg)), calibration, cfg.eval.card, min(cfg.eval.bootstrap, 200), cfg.seed)
    card.drift_checked = drift_checked
    _verdict(card, cfg.eval.card)
    return card


def _reform_panel(cfg) -> None:
    """A panel's comparisons and calibration combined again from its kept members' saved results (no call)."""
    from koala_lib.evaluation.answer_health import split_by_rule
    from koala_lib.evaluation.calibration import calibration_path, labelled_pairs, write_calibration
    from koala_lib.evaluation.panel import combined
    from koala_lib.evaluation.stage import eval_dir, items_to_judge, write_comparisons

    if (eval_dir(cfg) / "judge.json").is_file():
        items = items_to_judge(cfg)
        to_judge, ruled = split_by_rule(items)
        write_comparisons(cfg, items, to_judge, ruled, combined(cfg, to_judge, "comparisons"))
    if calibration_path(cfg).is_file():
        items, skipped = labelled_pairs(cfg)
        if items:
            write_calibration(cfg, items, skipped, combined(cfg, items, "calibration"))


def measure_card(cfg, progress: bool = True) -> JudgeCard:
    """Judge the probes with the profile's judge and build its card from them and from what stage 5 holds;
    writes `eval/judge_card.json` and the probes' single games to `eval/card/games.jsonl`. A panel: each member's
    card first (`eval/panel/<i>/judge_card.json`), then, with `panel_drop_unfit`, the comparisons and calibration
    formed again from the fit members, and the card of the panel's combined verdicts."""
    from koala_lib.evaluation.calibration import read_calibration
    from koala_lib.evaluation.judge import judge_endpoint, judge_with
    from koala_lib.evaluation.judgments import write_judgments
    from koala_lib.evaluation.panel import combined, kept_members, load_member, member_configs, panel_dir, save_member
    from koala_lib.evaluation.stage import eval_dir
    from koala_lib.files import atomic_text

    probes = probe_items()
    canaries = [it.key for it in probes if it.test_set == CANARY][:cfg.eval.card.drift_canaries]
    # an endpoint's model can change under the same name: some canaries are asked again, and compared with the cache
    fresh = lambda weak: [] if weak else canaries
    if not cfg.eval.judge.panel:
        with judge_endpoint(cfg) as endpoint:
            result = judge_with(endpoint, probes, cfg, progress, fresh=fresh(endpoint.weak))
        card = _card(cfg, probes, result, _stage5(cfg), read_calibration(cfg), len(fresh(result.weak)))
    else:
        members = []
        _, _, _, lengths = _stage5(cfg)
        for i, member in enumerate(member_configs(cfg)):
            with judge_endpoint(member) as endpoint:
                own = judge_with(endpoint, probes, member, progress, fresh=fresh(endpoint.weak))
            save_member(cfg, i, "card", own)
            compared = load_member(cfg, i, "comparisons")
            stage5 = ([], [], {}, lengths) if compared is None else (compared.games, compared.judgments, compared.outcomes, lengths)
            summary = panel_dir(cfg) / str(i) / "calibration_summary.json"
            calibration = json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else None
            members.append(_card(member, probes, own, stage5, calibration, len(fresh(own.weak))))
            atomic_text(panel_dir(cfg) / str(i) / "judge_card.json", json.dumps(members[-1].to_json(), indent=2) + "\n")
        _reform_panel(cfg)
        kept = kept_members(cfg)
        result = combined(cfg, probes, "card")
        card = _card(cfg, probes, result, _stage5(cfg), read_calibration(cfg), 0)
        card.members = [{"index": i, "judge": m.judge, "fit": m.fit, "reasons": m.reasons, "kept": i in kept}
                        for i, m in enumerate(members)]
    folder = eval_dir(cfg)
    write_judgments(folder / "card" / "games.jsonl", result.games)
    atomic_text(card_path(cfg), json.dumps(card.to_json(), indent=2) + "\n")
    print("\n".join(card.lines()))
    return card
