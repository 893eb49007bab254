"""A panel of judges (`eval.judge.panel`): several endpoints or local models judge the same pairs, each gets its own
card, and the panel's verdict combines theirs.

    result = judge_items(cfg, items, "comparisons")    # one judge, or every panel member and their combination
    combine(results, items, "mean", 0.05, name)         # a JudgeResult whose games and pairs are the members' combined
    agreement_table({name: judgments, ...})             # Cohen's kappa between every two members

Combining, per single game (so that a panel has position consistency and canaries of its own, measured like any
judge's) and per pair: `mean` averages the members' soft preferences for model A (a hard verdict counts 1 / 0.5 / 0)
and reads the verdict with `eval.judge.tie_margin`; `majority` takes the verdict more than half of the members gave
(else a tie), with the preference 1 / 0.5 / 0 of that verdict. A member without a verdict on a game is left out of
that game. Each member's own results are kept under `eval/panel/<i>/<part>.json`, so that the panel can be formed
again without a call: with `eval.judge.panel_drop_unfit`, `koala judge card` re-forms the comparisons and the
calibration from the members whose card is fit.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from koala_lib.evaluation.judgments import Judgment, PairItem
from koala_lib.evaluation.pairwise import SCORE, soft

PARTS = ("comparisons", "calibration", "card")


def member_configs(cfg) -> list:
    """One Config per panel member: `eval.judge` pointed at that member, every other setting shared."""
    j = cfg.eval.judge
    return [replace(cfg, eval=replace(cfg.eval, judge=replace(j, base_url=m.base_url, model=m.model, api_key_env=m.api_key_env, panel=())))
            for m in j.panel]


def panel_dir(cfg) -> Path:
    return cfg.run_dir / "eval" / "panel"


def member_path(cfg, index: int, part: str) -> Path:
    return panel_dir(cfg) / str(index) / f"{part}.json"


def save_member(cfg, index: int, part: str, result) -> None:
    from koala_lib.files import atomic_text

    path = member_path(cfg, index, part)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(path, json.dumps(result.to_json(), ensure_ascii=False) + "\n")


def load_member(cfg, index: int, part: str):
    from koala_lib.evaluation.judge import JudgeResult

    path = member_path(cfg, index, part)
    return JudgeResult.from_json(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def kept_members(cfg) -> list[int]:
    """The members whose verdicts form the panel's: all, or with `panel_drop_unfit` those whose card says fit
    (all, when no card was measured yet or none is fit)."""
    every = list(range(len(cfg.eval.judge.panel)))
    if not cfg.eval.judge.panel_drop_unfit:
        return every
    fit = []
    for i in every:
        path = panel_dir(cfg) / str(i) / "judge_card.json"
        if not path.is_file():
            return every
        if json.loads(path.read_text(encoding="utf-8"))["fit"]:
            fit.append(i)
    return fit or every


def panel_name(results: Sequence) -> str:
    return f"panel of {len(results)}: " + " + ".join(r.judge for r in results)


def _merge(rows: Sequence[Judgment], how: str, tie_margin: float) -> tuple[str, float]:
    from koala_lib.evaluation.judge import soft_verdict

    if how == "majority":
        verdict, count = Counter(r.verdict for r in rows).most_common(1)[0]
        verdict = verdict if count * 2 > len(rows) else "tie"
        return verdict, SCORE[verdict]
    pref = sum(soft(r) for r in rows) / len(rows)
    return soft_verdict(pref, tie_margin), pref


def combine(results: Sequence, items: Sequence[PairItem], how: str, tie_margin: float, name: str | None = None):
    """The panel's JudgeResult over `items` from its members' results (see the module doc)."""
    from koala_lib.evaluation.judge import JudgeResult

    name = name or panel_name(results)
    out = JudgeResult(judge=name, mode=f"panel, {how} of {len(results)}: " + ", ".join(sorted({r.mode for r in results})),
                      weak=all(r.weak for r in results), identity=" + ".join(r.identity for r in results))
    key = lambda j: (j.test_set, j.prompt_id, j.model_a, j.model_b)
    pairs, games = defaultdict(list), defaultdict(list)
    for r in results:
        for j in r.judgments:
            pairs[key(j)].append(j)
        for g in r.games:
            games[(key(g), g.swapped)].append(g)
        out.fastchat_rows.extend(r.fastchat_rows)
        out.errors.update(r.errors)
        out.calls, out.cache_hits, out.seconds = out.calls + r.calls, out.cache_hits + r.cache_hits, out.seconds + r.seconds
        out.drift.extend(r.drift)
    for item in items:
        k = (item.test_set, item.prompt_id, item.model_a, item.model_b)
        if pairs[k]:
            verdict, pref = _merge(pairs[k], how, tie_margin)
            out.judgments.append(Judgment(item.prompt_id, item.test_set, item.model_a, item.model_b, verdict, name, False,  # type: ignore[arg-type]
                                          pairs[k][0].time, "llm", pref))
        played = []
        for swapped in (False, True):
            if games[(k, swapped)]:
                verdict, pref = _merge(games[(k, swapped)], how, tie_margin)
                played.append(verdict)
                out.games.append(Judgment(item.prompt_id, item.test_set, item.model_a, item.model_b, verdict, name, swapped,  # type: ignore[arg-type]
                                          games[(k, swapped)][0].time, "llm", pref))
        out.outcomes["no_verdict" if len(played) < 2 else "consistent" if played[0] == played[1] else "inconsistent"] += 1
    return out


def cohen_kappa(x: Sequence[str], y: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters' verdicts on the same items; None when chance agreement is 1 (no variation)."""
    n = len(x)
    if n == 0:
        return None
    observed = sum(a == b for a, b in zip(x, y)) / n
    cx, cy = Counter(x), Counter(y)
    expected = sum(cx[c] * cy[c] for c in set(cx) | set(cy)) / (n * n)
    return None if expected >= 1.0 else (observed - expected) / (1 - expected)


def agreement_table(judgments: dict[str, Sequence[Judgment]]) -> list[dict]:
    """Every two members: the pairs both judged, their raw agreement (%) and Cohen's kappa over A / tie / B."""
    names = list(judgments)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            mine = {(j.test_set, j.prompt_id, j.model_a, j.model_b): j.verdict for j in judgments[a]}
            both = [(v, w.verdict) for w in judgments[b] if (v := mine.get((w.test_set, w.prompt_id, w.model_a, w.model_b)))]
            x, y = [p for p, _ in both], [q for _, q in both]
            out.append({"a": a, "b": b, "pairs": len(both),
                        "agreement": 100.0 * sum(p == q for p, q in both) / len(both) if both else None,
                        "kappa": cohen_kappa(x, y)})
    return out


def judge_items(cfg, items: Sequence[PairItem], part: str, progress: bool = True, fresh=lambda weak: ()):
    """Judge `items` with the profile's judge; with a panel, with every member (each result kept, see the module
    doc) and return the combination of the kept members. `fresh(weak)` names the items asked again though cached."""
    from koala_lib.evaluation.judge import judge_endpoint, judge_with

    if not cfg.eval.judge.panel:
        with judge_endpoint(cfg) as endpoint:
            return judge_with(endpoint, items, cfg, progress, fresh=fresh(endpoint.weak))
    for i, member in enumerate(member_configs(cfg)):
        with judge_endpoint(member) as endpoint:
            save_member(cfg, i, part, judge_with(endpoint, items, member, progress, fresh=fresh(endpoint.weak)))
    return combined(cfg, items, part)


def combined(cfg, items: Sequence[PairItem], part: str):
    """The kept members' saved results for `part`, combined again (no call)."""
    j = cfg.eval.judge
    results = [load_member(cfg, i, part) for i in kept_members(cfg)]
    return combine([r for r in results if r is not None], items, j.panel_verdict, j.tie_margin)
