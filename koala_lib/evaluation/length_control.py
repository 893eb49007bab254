"""Length-controlled win rate, length term only: the win rate a judge would give if both answers were equally long.

    p = [j.preference for j in chosen]                # soft preference for model A per pair, in [0, 1]
    lc = lc_win_rate(p, len_a, len_b)                 # answer lengths in characters, one per pair
    lc.win_rate, lc.lc_win_rate                       # percent: raw mean preference, and at equal length
    lc.length_coef                                    # > 0: the judge favours the longer answer
    lc_interval(p, len_a, len_b, C=lc.C, seed=0)      # 95 % bootstrap interval of lc_win_rate, in percent

The model is the part of AlpacaEval 2.0's GLM (`alpaca_eval/metrics/glm_winrate.py`) that one comparison can
identify. In AlpacaEval's orientation model A is the evaluated model (`generator_2`) and model B the baseline
(`generator_1`); for pair k, with d_k = len_b[k] - len_a[k] (`len(output_1) - len(output_2)`) and sd(d) its sample
std (ddof = 1),

    logit P(A preferred on k) = w_model + w_len * tanh(d_k / sd(d))

fitted as AlpacaEval's `fit_LogisticRegressionCV` fits it: scikit-learn's liblinear logistic regression with an
L1 penalty on both weights and no separate intercept, the soft target p_k entered as two rows (label 1 with
weight p_k, label 0 with weight 1 - p_k), and the penalty strength C chosen among 10 values from 1e-4 to 1e4 by
5-fold cross-validation with the two rows of a pair in the same fold, scored by the soft-target log loss. The LC
win rate is 100 * sigmoid(w_model), the prediction at d = 0. The test suite checks it against AlpacaEval's own
routine to 0.1 points.

What AlpacaEval 2.0's leaderboard LC adds, and this leaves out: an instruction-difficulty term looked up by the
prompt's position in AlpacaEval's 805 instructions, and rows of "gamed" baselines downloaded from the hub. Neither
exists for other prompts, and both need the network; so this number is named "LC win rate, length term only".

Degenerate input: n = 0 gives NaN in every float field. When sd(d) is 0 or undefined (n = 1, all lengths equal,
or every difference equal) length cannot be told from the model term: nothing is fitted, length_coef = 0 and
lc_win_rate = win_rate exactly. Fewer than 5 pairs cannot be split into 5 folds: lc_win_rate is NaN and `note`
says why. A preference that is NaN or outside [0, 1], or a length that is NaN or negative, is a ValueError naming
its index. Bootstrap replicates use `numpy.random.default_rng(seed)`.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

FOLDS = 5  # AlpacaEval's n_splits
CS = 10  # AlpacaEval keeps scikit-learn's default grid: 10 values of C, log-spaced over [1e-4, 1e4]
SEED = 123  # AlpacaEval's random_state (liblinear shuffles its coordinates)
NAME = "LC win rate, length term only"


@dataclass(frozen=True)
class LengthControlled:
    n: int  # judged pairs
    win_rate: float  # % mean preference for model A (ties as 0.5)
    lc_win_rate: float  # % predicted preference at equal length; NaN when it cannot be fitted (note)
    length_coef: float  # logit change per unit of tanh((len_a - len_b) / sd); > 0 favours the longer answer
    model_coef: float  # w_model: A's logit at equal length; NaN when not fitted
    length_sd: float  # sd(d) in characters (ddof = 1); NaN when n < 2
    C: float  # the penalty strength cross-validation chose; NaN when not fitted
    note: str = ""  # why nothing was fitted, when nothing was

    def row(self) -> dict:
        return asdict(self)


def _sigmoid(z):
    return np.exp(-np.logaddexp(0.0, -z))


def _check(preference, len_a, len_b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated float arrays [n] of preferences and lengths; every argument must have the same length."""
    p = np.asarray(preference, dtype=np.float64).reshape(-1)
    a = np.asarray(len_a, dtype=np.float64).reshape(-1)
    b = np.asarray(len_b, dtype=np.float64).reshape(-1)
    if not len(p) == len(a) == len(b):
        raise ValueError(f"preference, len_a and len_b differ in size: {len(p)}, {len(a)}, {len(b)}")
    bad = np.flatnonzero(~((p >= 0) & (p <= 1)))
    if len(bad):
        raise ValueError(f"preference[{bad[0]}] = {p[bad[0]]!r} is not in [0, 1]")
    for name, x in (("len_a", a), ("len_b", b)):
        bad = np.flatnonzero(~(x >= 0))
        if len(bad):
            raise ValueError(f"{name}[{bad[0]}] = {x[bad[0]]!r} is not a length (a number >= 0)")
    return p, a, b


def _soft_log_loss(y, y_prob, true_prob):
    """AlpacaEval's CV score: the log loss of the soft target (the row's weight read back as a probability)."""
    target = np.where(y == 1, true_prob, 1 - true_prob)
    q = np.clip(y_prob, 1e-15, 1 - 1e-15)
    return -np.mean(target * np.log(q) + (1 - target) * np.log(1 - q))


def _design(p: np.ndarray, a: np.ndarray, b: np.ndarray, sd: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows doubled for soft targets: (X [2n, 2] = (tanh(d / sd), 1), y [2n], weight [2n], group [2n])."""
    n = len(p)
    x = np.stack([np.tanh((b - a) / sd), np.ones(n)], axis=1)
    return (np.concatenate([x, x]), np.concatenate([np.ones(n), np.zeros(n)]), np.concatenate([p, 1 - p]),
            np.concatenate([np.arange(n), np.arange(n)]))


def _fit_cv(x, y, w, groups):
    """(weights [2], C) from liblinear L1 logistic regression with C chosen by grouped 5-fold CV."""
    import sklearn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GroupKFold

    with sklearn.config_context(enable_metadata_routing=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.8 renames `penalty`; the fit is the same
        warnings.simplefilter("ignore", ConvergenceWarning)  # liblinear's 100 iterations, as AlpacaEval runs it
        scorer = make_scorer(_soft_log_loss, response_method="predict_proba", greater_is_better=False)
        scorer = scorer.set_score_request(true_prob=True)
        model = LogisticRegressionCV(Cs=CS, cv=GroupKFold(n_splits=FOLDS), scoring=scorer, penalty="l1", solver="liblinear",
                                     fit_intercept=False, random_state=SEED)
        model.set_fit_request(sample_weight=True)
        model.fit(x, y, sample_weight=w, groups=groups, true_prob=w)
    return model.coef_[0], float(np.ravel(model.C_)[0])


def _fit_fixed(x, y, w, C: float) -> np.ndarray:
    """Weights [2] at a given C (the bootstrap's refits)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # `penalty` is being renamed; both spellings ask for L1
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegression(C=C, penalty="l1", l1_ratio=1.0, solver="liblinear", fit_intercept=False, random_state=SEED)
        model.fit(x, y, sample_weight=w)
    return model.coef_[0]


def lc_win_rate(preference: Sequence[float], len_a: Sequence[float], len_b: Sequence[float],
                C: float | None = None) -> LengthControlled:
    """Raw and length-controlled win rate of model A over model B from per-pair preferences and answer lengths.
    `C` fixes the penalty strength instead of cross-validating it (the bootstrap does)."""
    p, a, b = _check(preference, len_a, len_b)
    n = len(p)
    nan = float("nan")
    if n == 0:
        return LengthControlled(0, nan, nan, nan, nan, nan, nan, "no pairs")
    raw = 100 * float(p.mean())
    d = b - a  # [n] characters, AlpacaEval's len(output_1) - len(output_2)
    sd = float(d.std(ddof=1)) if n > 1 else nan
    if not sd > 0:  # length is confounded with the model term: nothing to control for
        return LengthControlled(n, raw, raw, 0.0, nan, sd, nan, "answer lengths do not vary: nothing to control")
    if n < FOLDS and C is None:
        return LengthControlled(n, raw, nan, nan, nan, sd, nan, f"{n} pairs: the fit's {FOLDS}-fold cross-validation needs {FOLDS}")
    x, y, w, groups = _design(p, a, b, sd)
    if C is None:
        coef, C = _fit_cv(x, y, w, groups)
    else:
        coef = _fit_fixed(x, y, w, C)
    w_len, w_model = float(coef[0]), float(coef[1])
    return LengthControlled(n, raw, 100 * float(_sigmoid(w_model)), -w_len, w_model, sd, C)


def lc_interval(preference: Sequence[float], len_a: Sequence[float], len_b: Sequence[float], C: float | None = None,
                replicates: int = 1000, seed: int = 0, groups: Sequence | None = None,
                level: float = 0.95, stat: str = "lc_win_rate") -> tuple[float, float]:
    """Percentile bootstrap interval (low, high) of lc_win_rate, in percent (or of `stat`="length_coef").

    Resamples `groups` (one id per pair, e.g. the prompt) with replacement, taking all pairs of a group together,
    else pairs. sd(d) is recomputed in each replicate, as it is part of the estimate; the penalty strength is the
    one cross-validation chose on all pairs (`C`, chosen here when not given), so that a replicate costs one fit,
    not 51. (NaN, NaN) when the point estimate itself cannot be fitted."""
    p, a, b = _check(preference, len_a, len_b)
    if replicates < 1:
        raise ValueError(f"replicates must be at least 1, got {replicates}")
    if stat not in ("lc_win_rate", "length_coef"):
        raise ValueError(f"stat {stat!r}: allowed lc_win_rate, length_coef")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = len(p)
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups has {len(groups)} ids for {n} pairs")
    if C is None:
        point = lc_win_rate(p, a, b)
        if not np.isfinite(point.lc_win_rate):
            return float("nan"), float("nan")
        C = point.C
    if not np.isfinite(C):  # nothing fitted on all pairs (lengths do not vary): each replicate is its raw rate
        C = None
    _, inverse = np.unique(np.asarray(groups if groups is not None else np.arange(n)), return_inverse=True)
    members = [np.flatnonzero(inverse.reshape(-1) == g) for g in range(inverse.max() + 1)]  # pair indices per group
    rng = np.random.default_rng(seed)
    values = np.empty(replicates)
    for r in range(replicates):
        take = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])  # [~n]
        fit = lc_win_rate(p[take], a[take], b[take], C=C) if C is not None else None
        if stat == "length_coef":
            values[r] = fit.length_coef if fit is not None else 0.0
        else:
            values[r] = fit.lc_win_rate if fit is not None else 100 * float(p[take].mean())
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)
