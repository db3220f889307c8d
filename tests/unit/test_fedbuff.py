"""FedBuff's staleness multiplicities and the summand budget (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.errors import InvalidMessage
from schemas.fedbuff import FedBuff, check_budget


@given(st.integers(1, 64), st.floats(0, 8), st.integers(0, 20))
def test_multiplicity_is_a_small_positive_integer_that_never_grows_with_staleness(
        scale, exponent, max_staleness):
    fb = FedBuff(buffer_size=4, max_staleness=max_staleness, staleness_scale=scale,
                 staleness_exponent=exponent)
    ms = [fb.multiplicity(t) for t in range(max_staleness + 1)]
    assert ms[0] == scale
    assert all(1 <= m <= scale and isinstance(m, int) for m in ms)
    assert all(a >= b for a, b in zip(ms, ms[1:]))
    with pytest.raises(InvalidMessage, match="late"):
        fb.multiplicity(max_staleness + 1)


def test_multiplicity_examples():
    fb = FedBuff(staleness_scale=4, staleness_exponent=0.5, max_staleness=8)
    # round(4 / sqrt(1 + t)): 4, 2.83, 2.31, 2, 1.79, 1.63, 1.51, 1.41, 1.33
    assert [fb.multiplicity(t) for t in range(9)] == [4, 3, 2, 2, 2, 2, 2, 1, 1]


def test_budget_and_chunking_are_checked():
    fb = FedBuff(buffer_size=15, staleness_scale=4)
    check_budget(fb, max_summands=64, num_chunks=1)
    with pytest.raises(ValueError, match="max_summands >= 68"):
        check_budget(FedBuff(buffer_size=16, staleness_scale=4), 64, 1)
    with pytest.raises(ValueError, match="one chunk"):
        check_budget(fb, 64, 2)
    with pytest.raises(InvalidMessage):
        FedBuff(buffer_size=0)


def test_pareto_delays_are_reproducible_and_lomax_distributed():
    from scipy import stats

    from edge_agent.service import pareto_delay

    draws = [pareto_delay(2.0, 1.5, 7, r, f"agent-{i:03d}") for r in range(40) for i in range(50)]
    assert draws[:5] == [pareto_delay(2.0, 1.5, 7, 0, f"agent-{i:03d}") for i in range(5)]
    assert min(draws) >= 0
    # against scipy's Lomax (Pareto II) with the same shape and scale: not rejected
    assert stats.kstest(draws, stats.lomax(c=1.5, scale=2.0).cdf).pvalue > 0.01
