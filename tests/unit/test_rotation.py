"""The randomized Hadamard rotation: what it computes (against dense Hadamard matrices), that it
is orthogonal and undone exactly, and that it lowers quantization error (measured)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import hadamard

from schemas.codec import Codec, CodecParams
from schemas.errors import InvalidMessage
from schemas.rotation import Rotation


def _dense(rot: Rotation) -> np.ndarray:
    """The rotation as a dense matrix, built from scipy's Hadamard matrix and the signs."""
    d, b = rot.d, rot.block
    h = hadamard(b) / np.sqrt(b)
    head, tail = np.eye(d), np.eye(d)
    head[:b, :b] = h
    tail[d - b:, d - b:] = h
    return tail @ np.diag(rot.signs[1]) @ head @ np.diag(rot.signs[0])


@pytest.mark.parametrize("d", [1, 2, 3, 8, 300, 1000])
def test_rotation_is_the_dense_orthogonal_matrix(d):
    # Prepare
    rot = Rotation(d, 42)
    x = np.random.default_rng(d).normal(size=d)

    # Execute
    m = _dense(rot)

    # Assert
    np.testing.assert_allclose(rot.forward(x), m @ x, atol=1e-12)
    np.testing.assert_allclose(rot.inverse(x), m.T @ x, atol=1e-12)
    np.testing.assert_allclose(m.T @ m, np.eye(d), atol=1e-12)


def test_seeds_give_different_rotations_and_the_same_seed_the_same():
    # Prepare
    x = np.random.default_rng(0).normal(size=5000)

    # Execute
    a, b, c = Rotation(5000, 1).forward(x), Rotation(5000, 1).forward(x), \
        Rotation(5000, 2).forward(x)

    # Assert
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 0.1


@pytest.mark.parametrize("d", [1, 21_546, 1_000_000])
def test_inverse_is_exact_to_float32_rounding(d):
    # Prepare: a float32 model delta, heavy-tailed
    rng = np.random.default_rng(3)
    x = (rng.standard_t(1.5, d) * 0.01).astype(np.float32)
    rot = Rotation(d, 7)

    # Execute
    back = rot.inverse(rot.forward(x)).astype(np.float32)

    # Assert: every value is within one float32 ulp of the original
    ulps = np.abs(back.view(np.int32).astype(np.int64) - x.view(np.int32).astype(np.int64))
    assert int(ulps.max()) <= 1
    x64 = x.astype(np.float64)
    assert np.linalg.norm(rot.forward(x)) == pytest.approx(np.linalg.norm(x64), rel=1e-12)


def _quantization_error(x: np.ndarray, rotate: bool, bits: int) -> float:
    """Relative error of the codec's round trip (one device, weight at the cap) with the best
    per-coordinate clip of a grid, so neither mode is handicapped by a badly chosen range."""
    best = np.inf
    norm = float(np.linalg.norm(x))
    for k in (1, 2, 3, 4, 6, 8, 16, 64, 256):
        params = CodecParams(bits=bits, clip_l2=norm * 1.01, encrypted=False, rotate=rotate,
                             rotation_seed=11, clip_coord=k * norm / np.sqrt(x.size))
        codec = Codec(params, x.size)
        q = codec.quantize_update(x, params.weight_cap, 5)
        back = codec.average(q, params.weight_cap)
        best = min(best, float(np.linalg.norm(back - x)) / norm)
    return best


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_rotation_lowers_quantization_error_on_heavy_tailed_vectors(bits):
    # Prepare: Student-t(1.5) deltas, whose few large values set the range without rotation
    x = np.random.default_rng(bits).standard_t(1.5, 20_000) * 0.01

    # Execute
    rotated, plain = _quantization_error(x, True, bits), _quantization_error(x, False, bits)

    # Assert: measured, with margin
    assert rotated < 0.7 * plain, (rotated, plain)


def test_bad_lengths_and_seeds_are_refused():
    # Execute / Assert
    for d, seed in [(0, 1), (-3, 1), (True, 1), (5, -1), (5, 2**64), (5, 1.5)]:
        with pytest.raises(InvalidMessage) as e:
            Rotation(d, seed)  # type: ignore[arg-type]
        assert e.value.reason == "bad_params"
    with pytest.raises(InvalidMessage) as e:
        Rotation(5, 1).forward(np.zeros(6))
    assert e.value.reason == "wrong_num_params"


@settings(max_examples=300, deadline=None)
@given(d=st.integers(1, 5000), seed=st.integers(0, 2**64 - 1),
       scale=st.floats(1e-6, 1e6), data_seed=st.integers(0, 2**32 - 1))
def test_fuzz_rotation_keeps_norms_and_inverts(d, seed, scale, data_seed):
    # Prepare
    x = np.random.default_rng(data_seed).normal(size=d) * scale
    rot = Rotation(d, seed)

    # Execute
    y = rot.forward(x)

    # Assert
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    np.testing.assert_allclose(rot.inverse(y), x, rtol=0, atol=1e-12 * scale * np.sqrt(d))
