"""Clipping is a projection; stochastic rounding is unbiased and seeded."""

import numpy as np
import pytest

from schemas.errors import InvalidMessage
from schemas.quantize import clip, dequantize, qmax, quantize, stochastic_round


def test_clip_is_a_projection():
    # Prepare
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, 10_000)

    # Execute
    once = clip(x, 1.0, 0.05)
    twice = clip(once, 1.0, 0.05)

    # Assert
    assert np.array_equal(once, twice)
    assert np.linalg.norm(once) <= 1.0
    assert np.abs(once).max() <= 0.05


def test_clip_leaves_small_vectors_alone():
    # Prepare
    x = np.array([0.01, -0.02, 0.03])

    # Execute
    y = clip(x, 1.0, 0.05)

    # Assert
    assert np.array_equal(x, y)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_clip_refuses_nan_and_inf(bad):
    # Prepare
    x = np.array([0.0, bad])

    # Execute / Assert
    with pytest.raises(InvalidMessage) as e:
        clip(x, 1.0, 0.05)
    assert e.value.reason == "nan_or_inf"


def test_stochastic_rounding_is_unbiased_over_500_seeds():
    # Prepare
    rng = np.random.default_rng(0)
    y = rng.uniform(-127, 127, 2000)

    # Execute
    mean = np.mean([stochastic_round(y, seed, 127) for seed in range(500)], axis=0)

    # Assert: each draw has variance <= 1/4, so the 500-draw mean is within ~0.022 per entry
    assert np.abs(mean - y).max() < 0.12
    assert abs(float(np.mean(mean - y))) < 0.005


def test_stochastic_rounding_is_seeded_and_bounded():
    # Prepare
    y = np.array([126.9999, -126.99, 0.5, 127.0, -127.0])

    # Execute
    a, b = stochastic_round(y, 42, 127), stochastic_round(y, 42, 127)

    # Assert
    assert np.array_equal(a, b)
    assert np.abs(a).max() <= 127
    assert a[3] == 127 and a[4] == -127


def test_quantize_dequantize_error_is_below_one_step():
    # Prepare
    scale = 0.05 / qmax(8)
    x = np.random.default_rng(1).uniform(-0.05, 0.05, 1000)

    # Execute
    back = dequantize(quantize(x, scale, 8, 7), scale)

    # Assert
    assert np.abs(back - x).max() < scale
