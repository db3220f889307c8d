"""Balanced-digit lane packing sums exactly up to its bound."""

import numpy as np
import pytest

from schemas.packing import lane_bits, lane_max, pack, packed_max, unpack


@pytest.mark.parametrize("bits,summands,width", [(8, 64, 14), (8, 65, 15), (2, 1, 2), (16, 2**20, 36)])
def test_lane_bits_is_minimal(bits, summands, width):
    # Execute
    w = lane_bits(bits, summands)

    # Assert
    assert w == width
    assert lane_max(bits, summands) <= 2 ** (w - 1) - 1 < 2 * lane_max(bits, summands) + 1


@pytest.mark.parametrize("fill", ["random", "max", "min"])
def test_sums_of_packed_values_unpack_exactly(fill):
    # Prepare
    rng = np.random.default_rng(5)
    n, s, lanes, w = 10_001, 64, 3, lane_bits(8, 64)
    qs = {"random": rng.integers(-127, 128, (s, n)), "max": np.full((s, n), 127),
          "min": np.full((s, n), -127)}[fill]

    # Execute
    total = sum(pack(q, lanes, w) for q in qs)

    # Assert
    assert np.array_equal(unpack(total, lanes, w, n), qs.sum(axis=0))
    assert np.abs(total).max() <= packed_max(lane_max(8, s), lanes, w)
