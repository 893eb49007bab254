"""Pairwise statistics on a judgment set small enough to compute by hand."""

import math

import pytest

from koala_lib.evaluation.judgments import Judgment
from koala_lib.evaluation.pairwise import agreement, bradley_terry, compare, position_bias, sign_test

T = "2026-01-01T00:00:00+00:00"

# Five Koala prompts, two raters each; verdicts in model terms (X = model_a, Y = model_b).
#   p1: A A   p2: A A   p3: A tie   p4: B B   p5: tie B        -> A 5, tie 2, B 3
VERDICTS = {"p1": ("A", "A"), "p2": ("A", "A"), "p3": ("A", "tie"), "p4": ("B", "B"), "p5": ("tie", "B")}
# sides: rater r1 saw X first everywhere, rater r2 saw X second everywhere
HAND = [Judgment(p, "koala", "X", "Y", v, r, r == "r2", T)
        for p, pair in VERDICTS.items() for r, v in zip(("r1", "r2"), pair)]


def test_percentages_win_rate_and_sign_test_by_hand():
    s = compare(HAND, "X", "Y")
    assert (s.n, s.prompts) == (10, 5)
    assert (s.better, s.tie, s.worse) == pytest.approx((50.0, 20.0, 30.0))
    assert s.win_rate == pytest.approx(60.0)  # (5 + 2/2) / 10
    assert (s.wins, s.losses) == (5, 3)
    # P(K <= 3 | n=8, 1/2) = (1 + 8 + 28 + 56) / 256, doubled
    assert s.sign_p == pytest.approx(186 / 256)
    assert s.win_rate_ci[0] <= s.win_rate <= s.win_rate_ci[1]


def test_compare_from_the_other_side_mirrors():
    s = compare(HAND, "Y", "X")
    assert (s.better, s.tie, s.worse) == pytest.approx((30.0, 20.0, 50.0))
    assert s.win_rate == pytest.approx(40.0)


def test_sign_test_values():
    assert sign_test(0, 0) == 1.0
    assert sign_test(4, 4) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
    assert sign_test(7, 2) == pytest.approx(2 * (1 + 9 + 36) / 512)


def test_fleiss_kappa_and_pairwise_agreement_by_hand():
    a = agreement(HAND)
    # P_i = 1, 1, 0, 1, 0 -> P-bar 0.6; p = (0.5, 0.2, 0.3) -> P_e = 0.38; kappa = 0.22 / 0.62
    assert (a.items, a.judgments) == (5, 10)
    assert a.fleiss_kappa == pytest.approx(0.22 / 0.62)
    assert a.pairwise == pytest.approx(0.6)


def test_agreement_reads_verdicts_in_model_terms():
    # the same opinion stored in opposite model orders is agreement, not disagreement
    js = [Judgment("p1", "koala", "X", "Y", "A", "r1", False, T), Judgment("p1", "koala", "Y", "X", "B", "r2", True, T),
          Judgment("p2", "koala", "X", "Y", "B", "r1", False, T), Judgment("p2", "koala", "Y", "X", "A", "r2", False, T)]
    a = agreement(js)
    assert a.pairwise == 1.0 and a.fleiss_kappa == pytest.approx(1.0)


def test_position_bias_counts_the_side_shown_first():
    # r1 saw X first: X won p1 p2 p3 (first won 3), lost p4 (first lost 1); r2 saw X second:
    # X won p1 p2 (first lost 2), lost p4 p5 (first won 2)
    b = position_bias(HAND)
    assert (b.decisive, b.first_won) == (8, 5)
    assert b.share_first == pytest.approx(62.5)
    assert b.p == pytest.approx(sign_test(5, 3))


def test_bootstrap_resamples_prompts_whole_and_is_seeded():
    # every prompt holds one win and one loss: any resample of whole prompts gives exactly 50 %
    split = [Judgment(f"p{i}", "koala", "X", "Y", v, r, False, T) for i in range(20) for r, v in (("r1", "A"), ("r2", "B"))]
    s = compare(split, "X", "Y", n_boot=300, seed=3)
    assert s.win_rate_ci == (50.0, 50.0)
    mixed = [Judgment(f"p{i}", "koala", "X", "Y", "AB"[(i * i) % 7 < 3], "r1", False, T) for i in range(40)]
    first = compare(mixed, "X", "Y", n_boot=300, seed=7)
    assert compare(mixed, "X", "Y", n_boot=300, seed=7) == first
    assert compare(mixed, "X", "Y", n_boot=300, seed=8).win_rate_ci != first.win_rate_ci
    assert first.win_rate_ci[0] < first.win_rate < first.win_rate_ci[1]


def test_compare_by_test_set_and_missing_pair():
    js = HAND + [Judgment("q1", "alpaca", "X", "Y", "B", "r1", False, T)]
    assert compare(js, "X", "Y", "alpaca").worse == 100.0
    assert compare(js, "X", "Y", "koala").n == 10
    with pytest.raises(ValueError, match="no judgments of X vs Z"):
        compare(js, "X", "Z")


def test_bradley_terry_two_models_recovers_the_odds():
    # X beats Y three times out of four: strength ratio 3 without a prior
    js = [Judgment(f"p{i}", "koala", "X", "Y", v, "j", False, T) for i, v in enumerate("AAAB")]
    r = bradley_terry(js, n_boot=0, prior=0.0)
    rating = dict(zip(r.models, r.rating))
    assert rating["X"] - rating["Y"] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert (rating["X"] + rating["Y"]) / 2 == pytest.approx(1000)


def test_bradley_terry_orders_three_models_and_stays_finite_for_an_unbeaten_model():
    js = []
    for i in range(6):
        js += [Judgment(f"p{i}", "koala", "top", "mid", "A", "j", False, T),
               Judgment(f"p{i}", "koala", "mid", "low", "A" if i < 4 else "B", "j", True, T),
               Judgment(f"p{i}", "koala", "low", "top", "B", "j", False, T)]
    r = bradley_terry(js, n_boot=100, seed=1)
    assert [row["model"] for row in r.rows()] == ["top", "mid", "low"]
    assert all(math.isfinite(x) for x in r.rating)
    for (lo, hi), x in zip(r.ci, r.rating):
        assert lo <= x + 1e-9 and x - 1e-9 <= hi
    assert bradley_terry(js, n_boot=100, seed=1) == r


def test_a_judge_who_judged_an_item_twice_counts_once_in_agreement():
    js = [Judgment("p1", "koala", "X", "Y", "A", "w1", False, T), Judgment("p1", "koala", "X", "Y", "B", "w1", False, T),
          Judgment("p1", "koala", "X", "Y", "B", "w2", False, T)]
    a = agreement(js)
    assert (a.items, a.judgments, a.pairwise) == (1, 2, 1.0)  # w1's later verdict (B) agrees with w2


def test_bootstrap_needs_a_replicate():
    with pytest.raises(ValueError, match="n_boot must be at least 1"):
        compare(HAND, "X", "Y", n_boot=0)
