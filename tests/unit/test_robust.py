"""Robust aggregation rules against hand-worked numbers, plus Hypothesis properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from regional_aggregator.robust import (
    CoordinateMedian,
    Krum,
    MultiKrum,
    NormBound,
    RobustResult,
    TrimmedMean,
    WeightedMean,
    make_rule,
)

# Five devices, three parameters; row 4 is the outlier.
#   row 0 = ( 1,   0,  3)   weight 1
#   row 1 = ( 2,   1,  0)   weight 1
#   row 2 = ( 0,   3,  1)   weight 2
#   row 3 = ( 4,   1,  2)   weight 2
#   row 4 = (50, -40, 30)   weight 4
U5 = np.array([[1, 0, 3], [2, 1, 0], [0, 3, 1], [4, 1, 2], [50, -40, 30]], dtype=np.float64)
W5 = np.array([1, 1, 2, 2, 4], dtype=np.float64)

ALL_SPECS = ["mean", "norm:1.0", "median", "trimmed:0.2", "krum:1", "multikrum:1:3"]


# --------------------------------------------------------------------------- hand-worked values


def test_weighted_mean_is_fedavg():
    # Prepare: sum(w) = 10
    #   col 0: 1*1 + 1*2 + 2*0 + 2*4 + 4*50    =  211 -> 21.1
    #   col 1: 1*0 + 1*1 + 2*3 + 2*1 + 4*(-40) = -151 -> -15.1
    #   col 2: 1*3 + 1*0 + 2*1 + 2*2 + 4*30    =  129 -> 12.9
    rule = WeightedMean()

    # Execute
    res = rule.aggregate(U5, W5)

    # Assert
    np.testing.assert_allclose(res.delta, [21.1, -15.1, 12.9], rtol=1e-14)
    assert res.kept == (0, 1, 2, 3, 4)
    assert res.delta.dtype == np.float64 and res.delta.shape == (3,)


def test_median_of_three_rows_with_outlier():
    # Prepare: col 0 sorted [1, 3, 100] -> 3; col 1 sorted [-100, 2, 4] -> 2
    updates = np.array([[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]])

    # Execute
    res = CoordinateMedian().aggregate(updates, np.array([1.0, 1.0, 1.0]))

    # Assert
    assert res.delta.tolist() == [3.0, 2.0]
    assert res.kept == (0, 1, 2)


def test_median_of_five_rows_ignores_weights():
    # Prepare: col 0 sorted [0, 1, 2, 4, 50] -> 2
    #          col 1 sorted [-40, 0, 1, 1, 3] -> 1
    #          col 2 sorted [0, 1, 2, 3, 30] -> 2
    # (a huge weight on the outlier must not matter)
    heavy_outlier = np.array([1.0, 1.0, 1.0, 1.0, 1e9])

    # Execute
    res = CoordinateMedian().aggregate(U5, heavy_outlier)

    # Assert
    assert res.delta.tolist() == [2.0, 1.0, 2.0]


def test_median_of_even_count_averages_the_two_middle_values():
    # Prepare: sorted [1, 2, 10, 20] -> (2 + 10) / 2 = 6
    updates = np.array([[10.0], [1.0], [20.0], [2.0]])

    # Execute
    res = CoordinateMedian().aggregate(updates, np.ones(4))

    # Assert
    assert res.delta.tolist() == [6.0]


def test_trimmed_mean_beta_0_2_on_five_rows_cuts_one_each_side():
    # Prepare: int(0.2 * 5) = 1 value cut at each end of each column
    #   col 0 sorted [0, 1, 2, 4, 50] -> mean(1, 2, 4) = 7/3
    #   col 1 sorted [-40, 0, 1, 1, 3] -> mean(0, 1, 1) = 2/3
    #   col 2 sorted [0, 1, 2, 3, 30] -> mean(1, 2, 3) = 2
    rule = TrimmedMean(0.2)

    # Execute
    res = rule.aggregate(U5, W5)

    # Assert
    np.testing.assert_allclose(res.delta, [7 / 3, 2 / 3, 2.0], rtol=1e-15)
    assert res.kept == (0, 1, 2, 3, 4)


def test_trimmed_mean_small_beta_is_unweighted_mean():
    # Prepare: int(0.1 * 5) = 0, nothing cut; weights ignored
    #   col 0: (1 + 2 + 0 + 4 + 50) / 5 = 57/5 = 11.4
    #   col 1: (0 + 1 + 3 + 1 - 40) / 5 = -35/5 = -7
    #   col 2: (3 + 0 + 1 + 2 + 30) / 5 = 36/5 = 7.2
    rule = TrimmedMean(0.1)

    # Execute
    res = rule.aggregate(U5, W5)

    # Assert
    np.testing.assert_allclose(res.delta, [11.4, -7.0, 7.2], rtol=1e-15)


def test_trimmed_mean_cut_count_is_int_of_float_product_like_flower():
    # Prepare: 0.29 * 100 == 28.999999999999996 in float64, so Flower (and scipy) cut 28 values
    # per side, not 29. Column values 0, 1, 4, ..., 99**2; keeping ranks 28..71 gives
    # sum(k**2, k=28..71) / 44 = (sum_{0..71} - sum_{0..27}) / 44
    #                          = (71*72*143/6 - 27*28*55/6) / 44 = (121836 - 6930) / 44 = 2611.5
    assert 0.29 * 100 < 29
    updates = (np.arange(100.0) ** 2)[::-1].reshape(100, 1)

    # Execute
    res = TrimmedMean(0.29).aggregate(updates, np.ones(100))

    # Assert
    assert res.delta.tolist() == [2611.5]


def test_krum_picks_the_row_closest_to_its_neighbours():
    # Prepare: f = 1, n = 5 -> each score sums the n - f - 2 = 2 smallest squared distances.
    #   d01 = |(1, 1,-3)|^2 = 1+1+9 = 11     d12 = |(-2, 2, 1)|^2 = 4+4+1 = 9
    #   d02 = |(-1,3,-2)|^2 = 1+9+4 = 14     d13 = |( 2, 0, 2)|^2 = 4+0+4 = 8
    #   d03 = |(3, 1,-1)|^2 = 9+1+1 = 11     d23 = |( 4,-2, 1)|^2 = 16+4+1 = 21
    #   d04 = |(49,-40,27)|^2 = 2401+1600+729 = 4730
    #   d14 = |(48,-41,30)|^2 = 2304+1681+900 = 4885
    #   d24 = |(50,-43,29)|^2 = 2500+1849+841 = 5190
    #   d34 = |(46,-41,28)|^2 = 2116+1681+784 = 4581
    # scores: row 0: 11+11 = 22, row 1: 8+9 = 17, row 2: 9+14 = 23, row 3: 8+11 = 19,
    #         row 4: 4581+4730 = 9311  -> Krum picks row 1.
    rule = Krum(num_malicious=1)

    # Execute
    res = rule.aggregate(U5, W5)

    # Assert
    assert res.kept == (1,)
    assert res.delta.tolist() == [2.0, 1.0, 0.0]


def test_multikrum_weighted_mean_of_the_best_rows():
    # Prepare: scores from the Krum test: row 1 = 17, row 3 = 19, row 0 = 22 are the best three.
    # Weighted by sample counts (as Flower): w0 = 1, w1 = 1, w3 = 2, sum 4
    #   col 0: (1*1 + 1*2 + 2*4) / 4 = 11/4 = 2.75
    #   col 1: (1*0 + 1*1 + 2*1) / 4 =  3/4 = 0.75
    #   col 2: (1*3 + 1*0 + 2*2) / 4 =  7/4 = 1.75
    # (the unweighted mean would be (7/3, 2/3, 5/3))
    rule = MultiKrum(num_malicious=1, num_selected=3)

    # Execute
    res = rule.aggregate(U5, W5)

    # Assert
    assert res.kept == (0, 1, 3)
    np.testing.assert_allclose(res.delta, [2.75, 0.75, 1.75], rtol=1e-15)


def test_multikrum_with_all_rows_is_the_weighted_mean():
    # Prepare
    rule = MultiKrum(num_malicious=1, num_selected=5)

    # Execute
    res = rule.aggregate(U5, W5)

    # Assert: same as the WeightedMean test
    assert res.kept == (0, 1, 2, 3, 4)
    np.testing.assert_allclose(res.delta, [21.1, -15.1, 12.9], rtol=1e-14)


def test_norm_bound_clips_long_rows_then_averages():
    # Prepare: max_norm 5
    #   row 0 = (3, 4):    norm 5, at the bound, unchanged
    #   row 1 = (0, 1):    norm 1, unchanged
    #   row 2 = (30, -40): norm 50, scaled by 5/50 -> (3, -4)
    # weights 1, 1, 2 (sum 4): ((3 + 0 + 2*3) / 4, (4 + 1 - 2*4) / 4) = (9/4, -3/4)
    updates = np.array([[3.0, 4.0], [0.0, 1.0], [30.0, -40.0]])
    weights = np.array([1.0, 1.0, 2.0])

    # Execute
    res = NormBound(5.0).aggregate(updates, weights)

    # Assert
    np.testing.assert_allclose(res.delta, [2.25, -0.75], rtol=1e-15)
    assert res.kept == (0, 1, 2)


def test_norm_bound_handles_zero_rows_and_norms_that_overflow():
    # Prepare: row 1 = (1e308, 1e308) has a norm of ~1.41e308 whose square overflows;
    # clipped to norm 2 it is (sqrt 2, sqrt 2). Row 0 = 0 stays 0. Mean: (sqrt(2)/2, sqrt(2)/2)
    updates = np.array([[0.0, 0.0], [1e308, 1e308]])

    # Execute
    res = NormBound(2.0).aggregate(updates, np.ones(2))

    # Assert
    np.testing.assert_allclose(res.delta, [np.sqrt(2) / 2, np.sqrt(2) / 2], rtol=1e-14)


def test_result_is_read_only_and_does_not_alias_the_input():
    # Prepare
    updates = U5.copy()

    # Execute
    res = Krum(1).aggregate(updates, W5)
    updates[1] = 99.0

    # Assert
    assert res.delta.tolist() == [2.0, 1.0, 0.0]
    assert not res.delta.flags.writeable
    assert isinstance(res, RobustResult)


# --------------------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    ("updates", "weights", "match"),
    [
        (np.ones(3), np.ones(3), "2-D"),
        (np.ones((2, 2, 2)), np.ones(2), "2-D"),
        (np.ones((0, 3)), np.ones(0), "empty"),
        (np.ones((3, 2)), np.ones(2), "shape"),
        (np.ones((3, 2)), np.ones((3, 1)), "shape"),
        (np.array([[1.0, np.nan], [0.0, 0.0]]), np.ones(2), "NaN or infinite"),
        (np.array([[1.0, np.inf], [0.0, 0.0]]), np.ones(2), "NaN or infinite"),
        (np.ones((2, 2)), np.array([1.0, 0.0]), "weights"),
        (np.ones((2, 2)), np.array([1.0, -3.0]), "weights"),
        (np.ones((2, 2)), np.array([1.0, np.nan]), "weights"),
    ],
)
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_aggregate_rejects_malformed_input(spec, updates, weights, match):
    # Prepare
    rule = make_rule(spec)

    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        rule.aggregate(updates, weights)


@pytest.mark.parametrize(
    ("rule", "n", "match"),
    [
        (Krum(1), 4, r"n > 2\*f \+ 2 = 4"),
        (Krum(0), 2, r"n > 2\*f \+ 2 = 2"),
        (MultiKrum(2, 3), 6, r"n > 2\*f \+ 2 = 6"),
        (MultiKrum(1, 6), 5, "exceeds n=5"),
    ],
)
def test_krum_refuses_too_few_updates(rule, n, match):
    # Prepare
    updates = np.arange(n * 2, dtype=np.float64).reshape(n, 2)

    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        rule.aggregate(updates, np.ones(n))


def test_krum_smallest_valid_n():
    # Prepare: f = 0 needs n >= 3; n - f - 2 = 1 neighbour. Rows 0, 1, 2 hold 1, 0, 5:
    # score(0) = (1-0)^2 = 1, score(1) = (0-1)^2 = 1, score(2) = (5-1)^2 = 16.
    # Rows 0 and 1 tie; the tie is broken by value, not position, so row 1 (0.0 < 1.0) wins
    # whatever order the rows arrive in (Flower's argmin would take row 0).
    updates = np.array([[1.0], [0.0], [5.0]])

    # Execute
    res = Krum(0).aggregate(updates, np.ones(3))

    # Assert
    assert res.kept == (1,)
    assert res.delta.tolist() == [0.0]


# --------------------------------------------------------------------------- make_rule


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("mean", WeightedMean()),
        ("median", CoordinateMedian()),
        ("norm:0.5", NormBound(0.5)),
        ("trimmed:0.2", TrimmedMean(0.2)),
        ("trimmed:0", TrimmedMean(0.0)),
        ("krum:1", Krum(1)),
        ("krum:0", Krum(0)),
        ("multikrum:1:3", MultiKrum(1, 3)),
        ("  Trimmed:0.2 ", TrimmedMean(0.2)),
        ("MEAN", WeightedMean()),
    ],
)
def test_make_rule_parses(spec, expected):
    assert make_rule(spec) == expected


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "unknown robust rule"),
        ("avg", "unknown robust rule"),
        ("fedavg:1", "unknown robust rule"),
        ("mean:1", "takes 0 argument"),
        ("median:0.2", "takes 0 argument"),
        ("norm", "takes 1 argument"),
        ("norm:", "not a number"),
        ("norm:abc", "not a number"),
        ("norm:0", "max_norm must be finite and > 0"),
        ("norm:-1", "max_norm must be finite and > 0"),
        ("norm:inf", "must be finite"),
        ("norm:nan", "must be finite"),
        ("trimmed", "takes 1 argument"),
        ("trimmed:0.5", r"beta must be in \[0, 0.5\)"),
        ("trimmed:-0.1", r"beta must be in \[0, 0.5\)"),
        ("trimmed:1", r"beta must be in \[0, 0.5\)"),
        ("trimmed:0.2:1", "takes 1 argument"),
        ("krum", "takes 1 argument"),
        ("krum:-1", "num_malicious must be >= 0"),
        ("krum:1.5", "not an integer"),
        ("krum:one", "not an integer"),
        ("krum:1:2", "takes 1 argument"),
        ("multikrum:1", "takes 2 argument"),
        ("multikrum:1:0", "num_selected must be >= 1"),
        ("multikrum:-1:3", "num_malicious must be >= 0"),
        ("multikrum:a:b", "not an integer"),
    ],
)
def test_make_rule_refuses(spec, match):
    with pytest.raises(ValueError, match=match):
        make_rule(spec)


@pytest.mark.parametrize(
    "build",
    [
        lambda: NormBound(0.0),
        lambda: NormBound(float("nan")),
        lambda: TrimmedMean(0.5),
        lambda: Krum(-1),
        lambda: Krum(True),
        lambda: Krum(1.0),  # type: ignore[arg-type]
        lambda: MultiKrum(1, 0),
    ],
)
def test_constructors_validate(build):
    with pytest.raises(ValueError):
        build()


@given(st.floats(allow_nan=True).filter(lambda b: not 0.0 <= b < 0.5))
def test_make_rule_refuses_any_beta_outside_range(beta):
    with pytest.raises(ValueError):
        make_rule(f"trimmed:{beta!r}")


@given(st.integers(max_value=-1))
def test_make_rule_refuses_any_negative_f(f):
    with pytest.raises(ValueError, match="num_malicious must be >= 0"):
        make_rule(f"krum:{f}")


@given(st.text(max_size=30))
def test_make_rule_never_raises_anything_but_value_error(spec):
    # Execute
    try:
        rule = make_rule(spec)
    except ValueError:
        return

    # Assert: whatever parsed is a usable rule
    assert hasattr(rule, "aggregate")


# --------------------------------------------------------------------------- properties


@st.composite
def rounds(draw, min_n=5, max_n=8, max_d=4, bound=1e3):
    """(updates, weights, permutation) for one round."""
    n = draw(st.integers(min_n, max_n))
    d = draw(st.integers(1, max_d))
    updates = draw(
        hnp.arrays(np.float64, (n, d), elements=st.floats(-bound, bound, allow_subnormal=False))
    )
    weights = draw(hnp.arrays(np.float64, (n,), elements=st.integers(1, 100)))
    perm = np.array(draw(st.permutations(range(n))))
    return updates, weights, perm


def _contributors(updates, weights, rows):
    """The multiset of (row, weight) that contributed: robust to duplicate rows."""
    return sorted((tuple(updates[i].tolist()), float(weights[i])) for i in rows)


@settings(deadline=None)
@given(data=rounds(), spec=st.sampled_from(ALL_SPECS))
def test_every_rule_is_invariant_to_the_order_of_the_devices(data, spec):
    # Prepare
    updates, weights, perm = data
    rule = make_rule(spec)

    # Execute
    res = rule.aggregate(updates, weights)
    res_perm = rule.aggregate(updates[perm], weights[perm])

    # Assert: the same contributors, and the same aggregate (up to summation order for means)
    assert _contributors(updates, weights, res.kept) == _contributors(
        updates[perm], weights[perm], res_perm.kept
    )
    if spec in ("median", "trimmed:0.2", "krum:1", "multikrum:1:3"):
        np.testing.assert_array_equal(res_perm.delta, res.delta)  # sorted / canonical order
    else:
        atol = 1e-12 * (1.0 + np.abs(updates).max())
        np.testing.assert_allclose(res_perm.delta, res.delta, rtol=1e-12, atol=atol)


@settings(deadline=None)
@given(
    data=rounds(min_n=1, max_n=9, bound=1e300),
    spec=st.sampled_from(["median", "trimmed:0", "trimmed:0.2", "trimmed:0.49"]),
)
def test_median_and_trimmed_mean_stay_within_each_coordinate_range(data, spec):
    # Prepare
    updates, weights, _ = data
    lo, hi = updates.min(axis=0), updates.max(axis=0)
    # a mean of k values may round by a few ulps past the extremes
    slack = 8 * np.finfo(np.float64).eps * np.maximum(np.abs(lo), np.abs(hi))

    # Execute
    res = make_rule(spec).aggregate(updates, weights)

    # Assert
    assert np.all(res.delta >= lo - slack) and np.all(res.delta <= hi + slack)


@st.composite
def rounds_with_one_outlier(draw):
    """Four honest rows in [-1, 1] and one outlier of any finite magnitude at any position."""
    d = draw(st.integers(1, 4))
    honest = draw(hnp.arrays(np.float64, (4, d), elements=st.floats(-1, 1)))
    outlier = draw(hnp.arrays(np.float64, (1, d), elements=st.floats(allow_nan=False,
                                                                      allow_infinity=False)))
    at = draw(st.integers(0, 4))
    weights = draw(hnp.arrays(np.float64, (5,), elements=st.integers(1, 100)))
    return honest, np.insert(honest, at, outlier[0], axis=0), weights, at


@given(rounds_with_one_outlier(), st.sampled_from(["median", "trimmed:0.2"]))
def test_one_outlier_of_any_size_cannot_push_median_or_trimmed_mean_outside_honest_range(
    data, spec
):
    # Prepare
    honest, updates, weights, _ = data
    lo, hi = honest.min(axis=0), honest.max(axis=0)
    slack = 4 * np.finfo(np.float64).eps  # the trimmed mean of 3 honest values may round

    # Execute
    res = make_rule(spec).aggregate(updates, weights)

    # Assert
    assert np.all(res.delta >= lo - slack) and np.all(res.delta <= hi + slack)
    if spec == "median":  # 5 rows: the median is one of the values, exactly within range
        assert np.all(res.delta >= lo) and np.all(res.delta <= hi)


@given(rounds_with_one_outlier(), st.sampled_from(["krum:1", "multikrum:1:1", "multikrum:1:4"]))
def test_krum_never_selects_a_far_outlier(data, spec):
    # Prepare: an outlier at least 10 away in some coordinate has a score >= 2 * (10 - 1)^2 = 162,
    # while an honest row's 2 nearest honest neighbours are within 4 * d <= 16 each (<= 32).
    honest, updates, weights, at = data
    updates[at, 0] = 10.0 + abs(updates[at, 0]) if updates[at, 0] >= 0 else updates[at, 0] - 10.0

    # Execute
    res = make_rule(spec).aggregate(updates, weights)

    # Assert
    assert at not in res.kept


@given(rounds(min_n=1, max_n=8, bound=1e308), st.floats(1e-3, 1e3))
def test_norm_bound_aggregate_never_exceeds_the_bound(data, max_norm):
    # Prepare
    updates, weights, _ = data

    # Execute
    res = NormBound(max_norm).aggregate(updates, weights)

    # Assert: a weighted mean of vectors in the ball stays in the ball
    assert np.linalg.norm(res.delta) <= max_norm * (1 + 1e-12)
