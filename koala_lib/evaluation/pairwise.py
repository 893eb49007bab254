"""Statistics of pairwise judgments: what the Koala blog reported, and what it left out.

    s = compare(judgments, "koala_all", "koala_distill", seed=0)   # one comparison
    s.better, s.tie, s.worse          # percent of judgments, from model_a's side
    s.win_rate, s.win_rate_ci         # hard verdicts, ties count half; 95 % interval from a prompt bootstrap
    s.soft_win_rate                   # the mean soft preference (AlpacaEval's `win_rate`), hard verdicts as 1/0.5/0
    s.sign_p                          # two-sided sign test on the decisive verdicts
    agreement(judgments)              # Fleiss' kappa and pairwise agreement between judges of the same item
    position_bias(judgments)          # how often the answer shown first wins
    bradley_terry(judgments, seed=0)  # one rating per model, with bootstrap intervals

The unit of resampling is the prompt: every judgment of a prompt (all raters, both orders of an LLM judge) is
drawn together, because judgments of one prompt are not independent. Replicates use `numpy.random.default_rng(seed)`,
so the intervals are the same for the same seed.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from koala_lib.evaluation.judgments import Judgment

SCORE = {"A": 1.0, "tie": 0.5, "B": 0.0}  # model_a's score for a verdict


@dataclass(frozen=True)
class Comparison:
    model_a: str
    model_b: str
    test_set: str  # a test set name, or "all"
    n: int  # judgments
    prompts: int
    better: float  # % of judgments where model_a was better
    tie: float
    worse: float
    win_rate: float  # % of hard verdicts with ties as half
    win_rate_ci: tuple[float, float]
    soft_win_rate: float  # % mean soft preference for model_a (a hard verdict counts 1 / 0.5 / 0)
    soft_win_rate_ci: tuple[float, float]
    better_ci: tuple[float, float]
    worse_ci: tuple[float, float]
    wins: int
    losses: int
    sign_p: float  # two-sided sign test on wins vs losses (ties left out)

    def row(self) -> dict:
        return asdict(self)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial test of wins vs losses against 1/2 (the sign test); 1.0 with no decisive verdicts.

    It treats judgments as independent: with several judges per prompt the p-value is optimistic, and the prompt
    bootstrap interval is the figure to trust."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def soft(j: Judgment) -> float:
    """A judgment's preference for model_a: the judge's soft one where it gave one, else 1 / 0.5 / 0."""
    return j.preference if j.preference is not None else SCORE[j.verdict]


def _by_prompt(judgments: Sequence[Judgment]) -> list[list[Judgment]]:
    groups: dict[tuple[str, str], list[Judgment]] = defaultdict(list)
    for j in judgments:
        groups[(j.test_set, j.prompt_id)].append(j)
    return [groups[k] for k in sorted(groups)]


def compare(judgments: Sequence[Judgment], model_a: str, model_b: str, test_set: str | None = None,
            n_boot: int = 1000, seed: int = 0) -> Comparison:
    """Summary of the judgments of `model_a` vs `model_b` (either stored order), on one test set or all."""
    pair = {model_a, model_b}
    chosen = [j.oriented(model_a, model_b) for j in judgments
              if {j.model_a, j.model_b} == pair and (test_set is None or j.test_set == test_set)]
    if not chosen:
        raise ValueError(f"no judgments of {model_a} vs {model_b}" + (f" on {test_set}" if test_set else ""))
    counts = Counter(j.verdict for j in chosen)
    n = len(chosen)
    groups = _by_prompt(chosen)
    # per prompt: [#A, #tie, #B]; a replicate is a weighted sum of these rows
    table = np.array([[sum(j.verdict == v for j in g) for v in ("A", "tie", "B")] + [sum(map(soft, g))] for g in groups],
                     dtype=np.float64)  # [prompts, 4]: #A, #tie, #B, summed soft preference
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(groups), size=(n_boot, len(groups)))
    weights = np.stack([np.bincount(p, minlength=len(groups)) for p in picks]).astype(np.float64)
    sums = weights @ table  # [n_boot, 4]
    totals = sums[:, :3].sum(axis=1)
    better = 100 * sums[:, 0] / totals
    worse = 100 * sums[:, 2] / totals
    win = 100 * (sums[:, 0] + 0.5 * sums[:, 1]) / totals
    soft_win = 100 * sums[:, 3] / totals

    def ci(values: np.ndarray) -> tuple[float, float]:
        lo, hi = np.percentile(values, [2.5, 97.5])
        return float(lo), float(hi)

    return Comparison(
        model_a, model_b, test_set or "all", n, len(groups),
        better=100 * counts["A"] / n, tie=100 * counts["tie"] / n, worse=100 * counts["B"] / n,
        win_rate=100 * (counts["A"] + 0.5 * counts["tie"]) / n, win_rate_ci=ci(win),
        soft_win_rate=100 * float(table[:, 3].sum()) / n, soft_win_rate_ci=ci(soft_win),
        better_ci=ci(better), worse_ci=ci(worse),
        wins=counts["A"], losses=counts["B"], sign_p=sign_test(counts["A"], counts["B"]),
    )


# ----------------------------------------------------------------------------- judges


@dataclass(frozen=True)
class Agreement:
    items: int  # items judged by at least two judges
    judgments: int
    fleiss_kappa: float | None  # None when fewer than two such items or no variation at all
    pairwise: float | None  # share of judge pairs on the same item that gave the same verdict


def agreement(judgments: Sequence[Judgment]) -> Agreement:
    """Agreement between judges of the same item (prompt and model pair), with verdicts in model terms.

    Fleiss' kappa in its form for a varying number of judges per item: P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1)),
    P-bar the mean of P_i, p_j the share of all verdicts in category j, kappa = (P-bar - P_e) / (1 - P_e) with
    P_e = sum_j p_j^2. Only items with at least two judges count; a judge's repeated judgment of an item counts once."""
    latest: dict[tuple, str] = {}  # (item, judge) -> verdict: a judge who judged an item twice counts once, last
    for j in judgments:
        a, b = sorted((j.model_a, j.model_b))
        latest[(j.test_set, j.prompt_id, a, b, j.judge)] = j.oriented(a, b).verdict
    items: dict[tuple, Counter] = defaultdict(Counter)
    for (*item, _judge), verdict in latest.items():
        items[tuple(item)][verdict] += 1
    multi = [c for c in items.values() if sum(c.values()) >= 2]
    if not multi:
        return Agreement(0, 0, None, None)
    n_total = sum(sum(c.values()) for c in multi)
    p_i = [(sum(v * v for v in c.values()) - sum(c.values())) / (sum(c.values()) * (sum(c.values()) - 1)) for c in multi]
    pairs_agree = sum(sum(v * (v - 1) / 2 for v in c.values()) for c in multi)
    pairs_all = sum(sum(c.values()) * (sum(c.values()) - 1) / 2 for c in multi)
    shares = Counter()
    for c in multi:
        shares.update(c)
    p_e = sum((v / n_total) ** 2 for v in shares.values())
    p_bar = sum(p_i) / len(p_i)
    kappa = None if len(multi) < 2 or p_e >= 1.0 else (p_bar - p_e) / (1 - p_e)
    return Agreement(len(multi), n_total, kappa, pairs_agree / pairs_all)


@dataclass(frozen=True)
class PositionBias:
    decisive: int
    first_won: int
    share_first: float | None  # % of decisive judgments won by the answer shown first
    p: float  # sign test of first vs second


def position_bias(judgments: Sequence[Judgment]) -> PositionBias:
    """How often the answer shown first wins among decisive judgments (50 % means no position bias)."""
    outcomes = [j.first_won for j in judgments if j.first_won is not None]
    first = sum(outcomes)
    share = 100 * first / len(outcomes) if outcomes else None
    return PositionBias(len(outcomes), first, share, sign_test(first, len(outcomes) - first))


# ----------------------------------------------------------------------------- Bradley-Terry


def _bt_fit(wins: np.ndarray, prior: float, iterations: int = 500, tol: float = 1e-10) -> np.ndarray:
    """Strengths from a win matrix (wins[i, j]: times i beat j, ties as half a win each) by the MM algorithm
    (Hunter 2004). `prior` adds that many virtual ties between every two models so that a model that never
    lost still has a finite rating. Returns log-strengths centred on zero."""
    m = wins.shape[0]
    w = wins + prior * (1 - np.eye(m)) / 2
    games = w + w.T
    p = np.ones(m)
    for _ in range(iterations):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1)
        new = w.sum(axis=1) / denom
        new /= np.exp(np.log(new).mean())
        if np.max(np.abs(new - p)) < tol:
            p = new
            break
        p = new
    return np.log(p)


@dataclass(frozen=True)
class Ratings:
    models: tuple[str, ...]
    rating: tuple[float, ...]  # Elo-like scale: 400 * log10 strength, mean 1000
    ci: tuple[tuple[float, float], ...]
    games: int

    def rows(self) -> list[dict]:
        order = np.argsort(self.rating)[::-1]
        return [{"model": self.models[i], "rating": self.rating[i], "ci_low": self.ci[i][0], "ci_high": self.ci[i][1]}
                for i in order]


def _win_matrix(groups: list[list[Judgment]], index: dict[str, int], weights: np.ndarray | None = None) -> np.ndarray:
    wins = np.zeros((len(index), len(index)))
    for g, group in enumerate(groups):
        weight = 1.0 if weights is None else weights[g]
        if weight == 0:
            continue
        for j in group:
            a, b = index[j.model_a], index[j.model_b]
            wins[a, b] += weight * SCORE[j.verdict]
            wins[b, a] += weight * (1 - SCORE[j.verdict])
    return wins


def bradley_terry(judgments: Sequence[Judgment], n_boot: int = 200, seed: int = 0, prior: float = 1.0) -> Ratings:
    """Bradley-Terry ratings of every model in the judgments, ties as half a win, with 95 % intervals from a
    bootstrap over prompts. Scale: 400 * log10(strength) + 1000, so a 400-point gap means 10:1 odds."""
    models = tuple(sorted({j.model_a for j in judgments} | {j.model_b for j in judgments}))
    if len(models) < 2:
        raise ValueError("Bradley-Terry needs judgments between at least two models")
    index = {m: i for i, m in enumerate(models)}
    groups = _by_prompt(judgments)
    scale = 400 / math.log(10)
    point = _bt_fit(_win_matrix(groups, index), prior) * scale + 1000
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        weights = np.bincount(rng.integers(0, len(groups), len(groups)), minlength=len(groups))
        boots.append(_bt_fit(_win_matrix(groups, index, weights), prior) * scale + 1000)
    lo, hi = np.percentile(np.array(boots), [2.5, 97.5], axis=0) if boots else (point, point)
    return Ratings(models, tuple(float(x) for x in point), tuple((float(a), float(b)) for a, b in zip(lo, hi)),
                   len(judgments))
