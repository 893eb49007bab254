"""Length-controlled win rate (AlpacaEval 2.0): the win rate a judge would give if both answers were equally long.

    p = [SCORE[j.verdict] for j in chosen]            # soft preference for model A per pair, in [0, 1]
    lc = lc_win_rate(p, len_a, len_b)                 # answer lengths in characters, one per pair
    lc.win_rate, lc.lc_win_rate                       # percent: raw mean preference, and at equal length
    lc.length_coef                                    # > 0: the judge favours the longer answer
    lc_interval(p, len_a, len_b, seed=0)              # 95 % bootstrap interval of lc_win_rate, in percent

The model is AlpacaEval's GLM: for pair k, with d_k = len_a[k] - len_b[k] and sd(d) its sample std (ddof = 1),

    logit P(A preferred on k) = theta + beta * tanh(d_k / sd(d)) [+ u_instruction(k)]

fitted by maximum likelihood against the soft targets (cross-entropy, Newton's method) with an L2 penalty
(l2 / 2) * ||(theta, beta, u)||^2 added to the summed loss. The default l2 = 0.1 is a N(0, 10) prior in logit units:
it keeps separable data (every longer answer wins, or A always wins) finite and barely moves any other fit.
The LC win rate is the prediction with d = 0, averaged over instructions: 100 * mean_i sigmoid(theta [+ u_i]).

Unlike AlpacaEval (L1 with cross-validated strength, pulled toward "gamed" baselines, and an instruction difficulty
estimated beforehand from many models) the instruction term here is an optional per-instruction offset u_i. Within
one A:B comparison it is identified only when some instruction has pairs with different length differences (e.g.
several sampled answers per prompt); with one answer per model per prompt, u_i and the length effect of that prompt
are the same number, so the term is dropped. `LengthControlled.instruction_term` says whether it was used.

Degenerate input: n = 0 gives NaN in every float field. When sd(d) is 0 or undefined (n = 1, all lengths equal,
or every difference equal) length cannot be told from the model term: nothing is fitted, length_coef = 0 and
lc_win_rate = win_rate exactly. A preference that is NaN or outside [0, 1], or a length that is NaN or negative,
is a ValueError naming its index. Bootstrap replicates use `numpy.random.default_rng(seed)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

L2 = 0.1  # default penalty on the summed cross-entropy, see above


@dataclass(frozen=True)
class LengthControlled:
    n: int  # judged pairs
    win_rate: float  # % mean preference for model A (ties as 0.5)
    lc_win_rate: float  # % predicted preference at equal length, averaged over instructions
    length_coef: float  # beta: logit change per unit of tanh(d / sd(d)); > 0 favours the longer answer
    model_coef: float  # theta: A's logit at equal length (before instruction offsets); NaN when not fitted
    length_sd: float  # sd(d) in characters (ddof = 1); NaN when n < 2
    instruction_term: bool  # whether per-instruction offsets were fitted
    l2: float

    def row(self) -> dict:
        return asdict(self)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def _check(preference, len_a, len_b, instruction=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated float arrays [n] of preferences and lengths; every argument must have the same length."""
    p = np.asarray(preference, dtype=np.float64).reshape(-1)
    a = np.asarray(len_a, dtype=np.float64).reshape(-1)
    b = np.asarray(len_b, dtype=np.float64).reshape(-1)
    sizes = {"preference": len(p), "len_a": len(a), "len_b": len(b)}
    if instruction is not None:
        sizes["instruction"] = len(instruction)
    if len(set(sizes.values())) > 1:
        raise ValueError(f"arguments differ in length: {sizes}")
    bad = np.flatnonzero(~((p >= 0) & (p <= 1)))  # NaN fails both comparisons
    if bad.size:
        raise ValueError(f"preference[{bad[0]}] = {p[bad[0]]!r} is not a number in [0, 1]")
    for name, x in (("len_a", a), ("len_b", b)):
        bad = np.flatnonzero(~(x >= 0))
        if bad.size:
            raise ValueError(f"{name}[{bad[0]}] = {x[bad[0]]!r} is not a length (a number >= 0)")
    return p, a, b


def _fit(x: np.ndarray, p: np.ndarray, l2: float, iterations: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Weights [m] minimising sum_k CE(p_k, sigmoid(x_k . w)) + l2/2 ||w||^2; x: [n, m], p: [n].

    Newton's method with step halving; the penalised loss is strictly convex for l2 > 0, so it converges."""

    def loss(w: np.ndarray) -> float:
        z = x @ w
        return float(np.sum(np.logaddexp(0.0, z) - p * z) + 0.5 * l2 * w @ w)  # soft-target cross-entropy

    w = np.zeros(x.shape[1])
    current = loss(w)
    for _ in range(iterations):
        q = _sigmoid(x @ w)  # [n]
        grad = x.T @ (q - p) + l2 * w  # [m]
        hess = (x.T * (q * (1 - q))) @ x + l2 * np.eye(len(w))  # [m, m]
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while (value := loss(w - t * step)) > current and t > 1e-10:
            t /= 2
        w, current = w - t * step, value
        if np.max(np.abs(t * step)) < tol:
            break
    return w


def lc_win_rate(preference: Sequence[float], len_a: Sequence[float], len_b: Sequence[float],
                instruction: Sequence | None = None, l2: float = L2) -> LengthControlled:
    """Raw and length-controlled win rate of model A over model B from per-pair preferences and answer lengths.

    `instruction` (optional, one id per pair) adds per-instruction offsets when they are identified (module doc)."""
    p, a, b = _check(preference, len_a, len_b, instruction)
    n = len(p)
    if n == 0:
        nan = float("nan")
        return LengthControlled(0, nan, nan, nan, nan, nan, False, l2)
    raw = 100 * float(p.mean())
    d = a - b  # [n] characters
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    if not sd > 0:  # length is confounded with the model term: nothing to control for
        return LengthControlled(n, raw, raw, 0.0, float("nan"), sd, False, l2)
    columns = [np.ones(n), np.tanh(d / sd)]  # theta, beta
    offsets = False
    if instruction is not None:
        ids, inverse = np.unique(np.asarray(instruction), return_inverse=True)
        inverse = inverse.reshape(-1)
        # identified iff some instruction has two pairs with different length differences
        offsets = np.unique(np.stack([inverse, d]), axis=1).shape[1] > len(ids)
        if offsets:
            columns += list(np.eye(len(ids))[inverse].T)  # one-hot u_i, [n] each
    w = _fit(np.stack(columns, axis=1), p, l2)
    theta, beta = float(w[0]), float(w[1])
    at_equal_length = _sigmoid(theta + w[2:]) if offsets else _sigmoid(np.array([theta]))  # [instructions]
    return LengthControlled(n, raw, 100 * float(at_equal_length.mean()), beta, theta, sd, bool(offsets), l2)


def lc_interval(preference: Sequence[float], len_a: Sequence[float], len_b: Sequence[float],
                instruction: Sequence | None = None, replicates: int = 1000, seed: int = 0,
                groups: Sequence | None = None, level: float = 0.95, l2: float = L2) -> tuple[float, float]:
    """Percentile bootstrap interval (low, high) of lc_win_rate, in percent.

    Resamples `groups` (one id per pair, e.g. the prompt) with replacement, taking all pairs of a group together;
    without `groups` it resamples by `instruction` when given, else by pair. sd(d) is recomputed in each replicate,
    as it is part of the estimate. (NaN, NaN) when there are no pairs."""
    p, a, b = _check(preference, len_a, len_b, instruction)
    if replicates < 1:
        raise ValueError(f"replicates must be at least 1, got {replicates}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = len(p)
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups has {len(groups)} ids for {n} pairs")
    if n == 0:
        return float("nan"), float("nan")
    ids = None if instruction is None else np.asarray(instruction)
    units = groups if groups is not None else (ids if ids is not None else np.arange(n))
    _, inverse = np.unique(np.asarray(units), return_inverse=True)
    members = [np.flatnonzero(inverse.reshape(-1) == g) for g in range(inverse.max() + 1)]  # pair indices per group
    rng = np.random.default_rng(seed)
    values = np.empty(replicates)
    for r in range(replicates):
        take = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])  # [~n]
        values[r] = lc_win_rate(p[take], a[take], b[take], None if ids is None else ids[take], l2).lc_win_rate
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)
