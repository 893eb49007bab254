"""Length-controlled win rate on synthetic judges whose length bias is known."""

import math

import numpy as np
import pytest

from koala_lib.evaluation.length_control import lc_interval, lc_win_rate


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def lengths(n=400, a_mean=1400.0, b_mean=800.0, seed=0):
    """Answer lengths in characters; A's answers are systematically longer by default."""
    rng = np.random.default_rng(seed)
    len_a = np.maximum(rng.normal(a_mean, 300, n), 1).round()
    len_b = np.maximum(rng.normal(b_mean, 300, n), 1).round()
    return len_a, len_b


def biased_judge(len_a, len_b, theta=0.0, beta=2.0):
    """AlpacaEval's own model: A is as good as B at equal length, but the judge strongly favours the longer answer."""
    d = len_a - len_b
    return sigmoid(theta + beta * np.tanh(d / d.std(ddof=1)))


def test_length_biased_judge_inflates_raw_but_not_lc():
    len_a, len_b = lengths()
    p = biased_judge(len_a, len_b)
    lc = lc_win_rate(p, len_a, len_b)
    assert lc.n == 400
    assert lc.win_rate > 60  # the longer model looks much better to the judge
    assert abs(lc.lc_win_rate - 50) < 5  # ... but not once length is held equal
    assert lc.length_coef == pytest.approx(2.0, abs=0.2)


def test_length_biased_hard_verdicts():
    """Same judge, but each pair gets a hard verdict (A / B) drawn from that preference: noisier (LC is 54 here; over
    seeds it spreads about +-4 points around 50), so the tolerance is wider and the pairs more."""
    len_a, len_b = lengths(n=800, seed=1)
    verdicts = (np.random.default_rng(2).random(800) < biased_judge(len_a, len_b)).astype(float)
    lc = lc_win_rate(verdicts, len_a, len_b)
    assert lc.win_rate > 60
    assert abs(lc.lc_win_rate - 50) < 7
    assert lc.length_coef > 1


def test_unbiased_judge_lc_matches_raw():
    len_a, len_b = lengths(a_mean=1000, b_mean=1000, seed=3)
    p = np.full(400, 0.7) + np.random.default_rng(4).uniform(-0.2, 0.2, 400)  # no length in it; mean 0.7
    lc = lc_win_rate(p, len_a, len_b)
    assert lc.win_rate == pytest.approx(70, abs=3)
    assert lc.lc_win_rate == pytest.approx(70, abs=3)
    assert lc.lc_win_rate == pytest.approx(lc.win_rate, abs=1)
    assert abs(lc.length_coef) < 0.2


def test_equal_lengths_give_raw_exactly():
    p = [1.0, 0.5, 0.0, 1.0, 1.0]
    lc = lc_win_rate(p, [300] * 5, [300] * 5)
    assert lc.lc_win_rate == lc.win_rate == 70.0
    assert lc.length_coef == 0.0
    # every difference equal (A always 50 characters longer): also no length variation to learn from
    same_gap = lc_win_rate(p, [350, 400, 450, 500, 550], [300, 350, 400, 450, 500])
    assert same_gap.lc_win_rate == same_gap.win_rate == 70.0


def test_swapping_sides_mirrors():
    len_a, len_b = lengths(n=200, seed=5)
    p = biased_judge(len_a, len_b, theta=0.4)
    ab = lc_win_rate(p, len_a, len_b)
    ba = lc_win_rate(1 - p, len_b, len_a)
    assert ba.win_rate == pytest.approx(100 - ab.win_rate)
    assert ba.lc_win_rate == pytest.approx(100 - ab.lc_win_rate, abs=1e-8)
    assert ba.length_coef == pytest.approx(ab.length_coef, abs=1e-8)  # still "favours the longer answer"


@pytest.mark.parametrize("bad", [1.2, -0.1, float("nan")])
def test_bad_preference_names_its_index(bad):
    with pytest.raises(ValueError, match=r"preference\[2\]"):
        lc_win_rate([0.5, 1.0, bad, 0.0], [1, 2, 3, 4], [4, 3, 2, 1])


def test_bad_length_and_mismatched_sizes():
    with pytest.raises(ValueError, match=r"len_b\[1\]"):
        lc_win_rate([0.5, 1.0], [10, 20], [10, -5])
    with pytest.raises(ValueError, match="differ in size"):
        lc_win_rate([0.5, 1.0], [10, 20, 30], [10, 5])


def test_no_pairs_and_one_pair():
    empty = lc_win_rate([], [], [])
    assert empty.n == 0 and math.isnan(empty.win_rate) and math.isnan(empty.lc_win_rate)
    assert all(math.isnan(x) for x in lc_interval([], [], [], replicates=10))
    one = lc_win_rate([1.0], [500], [100])
    assert one.lc_win_rate == one.win_rate == 100.0


def test_separable_data_stays_finite():
    len_a, len_b = lengths(n=100, a_mean=1000, b_mean=1000, seed=6)
    p = (len_a > len_b).astype(float)  # the longer answer always wins
    lc = lc_win_rate(p, len_a, len_b)
    assert math.isfinite(lc.length_coef) and lc.length_coef > 3
    assert 0 < lc.lc_win_rate < 100
    all_a = lc_win_rate(np.ones(100), len_a, len_b)
    assert 99 < all_a.lc_win_rate < 100


def test_fewer_pairs_than_folds_say_so():
    lc = lc_win_rate([1.0, 0.5, 0.0, 1.0], [300, 200, 100, 50], [100, 200, 300, 400])
    assert math.isnan(lc.lc_win_rate) and "5-fold" in lc.note
    assert lc.win_rate == 62.5
    assert all(math.isnan(x) for x in lc_interval([1.0, 0.5, 0.0, 1.0], [300, 200, 100, 50], [100, 200, 300, 400], replicates=5))


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    """Hard verdicts, so the interval has real width. It is wide (about 20 points at n = 300) because A's answers are
    nearly all longer: tanh(d / sd) is close to 1 for most pairs and hard to tell from the model term."""
    len_a, len_b = lengths(n=300, seed=8)
    p = (np.random.default_rng(9).random(300) < biased_judge(len_a, len_b, theta=0.3)).astype(float)
    point = lc_win_rate(p, len_a, len_b)
    low, high = lc_interval(p, len_a, len_b, C=point.C, replicates=200, seed=0)
    point = point.lc_win_rate
    assert low < point < high
    assert 5 < high - low < 30
    assert lc_interval(p, len_a, len_b, replicates=200, seed=0) == (low, high)  # C chosen inside: the same
    assert lc_interval(p, len_a, len_b, replicates=200, seed=1) != (low, high)
    # resampling prompts (three pairs each) instead of pairs
    groups = np.arange(300) // 3
    g_low, g_high = lc_interval(p, len_a, len_b, replicates=200, seed=0, groups=groups)
    assert g_low < point < g_high
    with pytest.raises(ValueError, match="groups"):
        lc_interval(p, len_a, len_b, replicates=10, groups=groups[:10])


@pytest.mark.parametrize("n, soft, seed", [(12, True, 0), (40, True, 1), (60, False, 2), (300, True, 3)])
def test_equals_alpaca_evals_own_fit_on_the_length_only_design(n, soft, seed):
    """AlpacaEval 0.6.6's `fit_LogisticRegressionCV`, called as `get_length_controlled_winrate` calls it, on the
    design `np.tanh(std_delta_len) + not_gamed_baseline - 1` built from the same pairs (model A as generator_2)."""
    pd = pytest.importorskip("pandas")
    glm = pytest.importorskip("alpaca_eval.metrics.glm_winrate")
    len_a, len_b = lengths(n=n, a_mean=900, b_mean=700, seed=seed)
    p = biased_judge(len_a, len_b, theta=0.3, beta=1.0)
    if not soft:
        p = (np.random.default_rng(seed).random(n) < p).astype(float)
    delta = len_b - len_a  # len(output_1) - len(output_2)
    frame = pd.DataFrame({"np.tanh(std_delta_len)": np.tanh(delta / delta.std(ddof=1)),
                          "not_gamed_baseline.astype(float)": 1.0, "preference": p})
    model = glm.fit_LogisticRegressionCV(frame, "preference", is_ytrue_proba=True, n_splits=5)
    at_zero = frame.drop(columns=["preference"]).assign(**{"np.tanh(std_delta_len)": 0.0})
    theirs = 100 * model.predict_proba(at_zero)[:, 1].mean()
    ours = lc_win_rate(p, len_a, len_b)
    assert ours.lc_win_rate == pytest.approx(theirs, abs=0.1)
    assert ours.C == float(np.ravel(model.C_)[0])
    assert ours.length_coef == pytest.approx(-model.coef_[0][0], abs=1e-3)
