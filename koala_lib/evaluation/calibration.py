"""How far to trust the judge: its agreement with human preference labels on pairs no model trained on.

    pairs, skipped = labelled_pairs(cfg)           # chosen/rejected pairs of stage 2's eval split
    cal = calibrate(cfg)                           # judges them in both orders -> eval/calibration.json
    cal.line()                                     # "agrees with human labels 61.0 % [54.2-67.5] on 100 pairs ..."

Stage 1 reads three sources of human preferences: Anthropic HH (chosen / rejected transcripts), WebGPT
comparisons (scores) and summarize_from_feedback (the labeller's choice). Each gives a positive and a negative
record of one upstream row. Stage 2 holds out whole upstream rows for its eval split, so a pair whose row is in
that split was never trained on. Each such pair becomes an item with the human's choice as `chosen`
(model_a) and the other answer as `rejected` (model_b), shown to the judge with the conversation before the
answer as the question, and judged exactly as stage 5's comparisons are (both orders, the same settings).

Agreement: a pair scores 1 when the judge's verdict is the human's, 0 when it is the other answer, and 1/2 for
a tie, so chance is 50 %; the interval is a seeded bootstrap over pairs. Position bias is the share of decisive
single games won by the answer shown first; `no_verdict` pairs are left out of agreement and counted.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from koala_lib.config import Config
from koala_lib.evaluation.judgments import PairItem, write_judgments
from koala_lib.files import atomic_text

CHOSEN, REJECTED = "chosen", "rejected"


def _context(turns) -> str:
    """The conversation before the judged answer, as the judge's question."""
    if len(turns) == 1:
        return turns[0].text
    return "\n\n".join(f"{'User' if t.role == 'user' else 'Assistant'}: {t.text}" for t in turns)


def held_out_groups(cfg: Config) -> set[str]:
    """Upstream rows (group keys) in stage 2's eval split and nowhere in its train split."""
    from koala_lib.conditioning.stage import group_key_of_id

    folder = cfg.run_dir / "conditioned" / "examples"
    if not (folder / "eval" / "index.jsonl").is_file():
        raise FileNotFoundError(f"{folder}: no eval split; run stage 2 first (`koala condition --profile {cfg.profile}`)")

    def keys(split: str) -> set[str]:
        rows = [json.loads(line) for line in (folder / split / "index.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
        return {group_key_of_id(r["id"], r["source"]) for r in rows}

    return keys("eval") - keys("train")


def labelled_pairs(cfg: Config) -> tuple[list[PairItem], Counter]:
    """(items, skipped by reason): the held-out human-labelled pairs of `eval.calibration.sources`, a seeded
    sample of at most `eval.calibration.pairs`, sorted by id."""
    from koala_lib.conditioning.stage import group_key
    from koala_lib.data.curate import load_curated

    wanted = set(cfg.eval.calibration.sources)
    held = held_out_groups(cfg)
    groups: dict[str, dict[str, list]] = {}
    for record in load_curated(cfg):
        if record.source in wanted and group_key(record) in held:
            groups.setdefault(group_key(record), {}).setdefault(record.preference, []).append(record)
    items, skipped = [], Counter()
    for key in sorted(groups):
        pos, neg = groups[key].get("positive", []), groups[key].get("negative", [])
        if len(pos) != 1 or len(neg) != 1:  # one side filtered out in stage 1, or a conversation split in parts
            skipped["not_one_pair"] += 1
            continue
        good, bad = pos[0].turns, neg[0].turns
        if good[:-1] != bad[:-1]:  # the two transcripts differ before the final answer
            skipped["context_differs"] += 1
            continue
        items.append(PairItem(key, f"calibration:{pos[0].source}", _context(good[:-1]), CHOSEN, good[-1].text, REJECTED, bad[-1].text))
    limit = cfg.eval.calibration.pairs
    if len(items) > limit:
        keep = set(random.Random(f"{cfg.seed}:calibration").sample(range(len(items)), limit))
        skipped["beyond_limit"] += len(items) - limit
        items = [it for i, it in enumerate(items) if i in keep]
    return items, skipped


@dataclass
class Calibration:
    judge: str
    mode: str  # how the judge's verdicts were read
    pairs: int  # labelled pairs judged
    judged: int  # pairs with a verdict in both orders
    agreement: float  # % (ties half)
    agreement_ci: tuple[float, float]
    agree: int  # verdicts equal to the human's
    disagree: int
    ties: int
    no_verdict: int
    first_shown_wins: float | None  # % of decisive single games won by the answer shown first
    mean_preference: float | None = None  # logprobs mode: mean soft preference for the human's choice, %
    by_source: dict = field(default_factory=dict)  # source -> {"pairs", "agreement"}
    skipped: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    calls: int = 0  # requests sent to the judge
    cache_hits: int = 0  # games answered from the call cache
    seconds: float = 0.0

    def line(self) -> str:
        """One line every judged table and figure carries."""
        if not self.pairs:
            return (f"judge not calibrated: no held-out human-labelled pairs in stage 2's eval split "
                    f"(raise conditioning.eval_fraction; skipped: {self.skipped or 'none'})")
        if not self.judged:
            return f"judge {self.judge} ({self.mode}): no verdict on any of {self.pairs} human-labelled pairs"
        low, high = self.agreement_ci
        soft = "" if self.mean_preference is None else f"; mean preference for the human's choice {self.mean_preference:.1f} %"
        return (f"judge {self.judge} ({self.mode} verdicts) agrees with human labels {self.agreement:.1f} % "
                f"[{low:.1f}-{high:.1f}] on {self.judged} held-out pairs (chance 50 %){soft}")

    def to_json(self) -> dict:
        """Plain JSON: NaN (nothing judged) becomes null."""
        nan = lambda v: None if isinstance(v, float) and v != v else v
        row = {k: nan(v) for k, v in asdict(self).items()}
        row["agreement_ci"] = [nan(v) for v in self.agreement_ci]
        return {**row, "line": self.line()}


def agreement_scores(verdicts: list[str]) -> np.ndarray:
    """1 / 0 / 0.5 per pair for a verdict about (chosen, rejected): A / B / tie."""
    return np.array([{"A": 1.0, "B": 0.0, "tie": 0.5}[v] for v in verdicts], dtype=float)


def bootstrap_mean(values: np.ndarray, replicates: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of the mean, in %, resampling the values."""
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(replicates, len(values)))].mean(axis=1)
    return (float(np.percentile(means, 2.5) * 100), float(np.percentile(means, 97.5) * 100))


def summarise(result, items: list[PairItem], skipped: Counter, replicates: int, seed: int) -> Calibration:
    """A Calibration from a JudgeResult over the labelled items."""
    scores = agreement_scores([j.verdict for j in result.judgments])
    verdicts = Counter(j.verdict for j in result.judgments)
    decisive = [g for g in result.games if g.verdict != "tie"]
    first = 100.0 * sum(bool(g.first_won) for g in decisive) / len(decisive) if decisive else None
    soft = [j.preference for j in result.judgments if j.preference is not None]
    by_source = {}
    for source in sorted({it.test_set for it in items}):
        mine = [j for j in result.judgments if j.test_set == source]
        by_source[source.split(":", 1)[1]] = {"pairs": sum(it.test_set == source for it in items), "judged": len(mine),
                                              "agreement": round(float(agreement_scores([j.verdict for j in mine]).mean() * 100), 1) if mine else None}
    return Calibration(
        judge=result.judge, mode=result.mode, pairs=len(items), judged=len(result.judgments),
        agreement=float(scores.mean() * 100) if len(scores) else float("nan"),
        agreement_ci=bootstrap_mean(scores, replicates, seed), agree=verdicts["A"], disagree=verdicts["B"],
        ties=verdicts["tie"], no_verdict=result.outcomes.get("no_verdict", 0), first_shown_wins=first,
        mean_preference=100.0 * float(np.mean(soft)) if soft else None,
        by_source=by_source, skipped=dict(skipped), errors=dict(result.errors), calls=result.calls, cache_hits=result.cache_hits, seconds=round(result.seconds, 2))


def calibration_path(cfg: Config) -> Path:
    return cfg.run_dir / "eval" / "calibration.json"


def calibrate(cfg: Config, progress: bool = True) -> Calibration:
    """Judge the held-out labelled pairs with the profile's judge (or panel); writes `eval/calibration.json` and the
    single judgments to `eval/calibration/judgments.jsonl` (not with stage 5's judgments, which compare models).
    A panel's members get their own figure too (`eval/panel/<i>/calibration_summary.json`), which their cards read."""
    from koala_lib.evaluation.judge import JudgeResult
    from koala_lib.evaluation.panel import judge_items

    items, skipped = labelled_pairs(cfg)
    if items:
        result = judge_items(cfg, items, "calibration", progress)
    else:  # nothing to judge: said in the line, not an error (a small profile may hold no labelled pair out)
        result = JudgeResult(judge="-", mode="-")
    cal = write_calibration(cfg, items, skipped, result)
    print(cal.line())
    return cal


def write_calibration(cfg: Config, items: list[PairItem], skipped: Counter, result) -> Calibration:
    """`eval/calibration.json` (and each panel member's) from a JudgeResult over the labelled items."""
    from koala_lib.evaluation.panel import load_member, panel_dir

    cal = summarise(result, items, skipped, cfg.eval.bootstrap, cfg.seed)
    folder = cfg.run_dir / "eval"
    write_judgments(folder / "calibration" / "judgments.jsonl", result.judgments)
    atomic_text(calibration_path(cfg), json.dumps(cal.to_json(), indent=2) + "\n")
    for i in range(len(cfg.eval.judge.panel)):
        member = load_member(cfg, i, "calibration")
        if member is not None:
            own = summarise(member, items, skipped, cfg.eval.bootstrap, cfg.seed)
            atomic_text(panel_dir(cfg) / str(i) / "calibration_summary.json", json.dumps(own.to_json(), indent=2) + "\n")
    return cal


def read_calibration(cfg: Config) -> dict | None:
    path = calibration_path(cfg)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
