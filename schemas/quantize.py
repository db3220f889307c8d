"""Clipping and unbiased stochastic quantization of model deltas.

Idea: bound each agent's influence (L2 clipping as in DP-FedAvg, McMahan et al. 2018, then a
per-coordinate bound), then map the bounded delta to small integers with stochastic rounding
(QSGD, Alistarh et al. 2017): ``q = floor(y) + Bernoulli(y - floor(y))`` is unbiased,
``E[q] = y``. Every agent of a round uses the same scale, so integer sums are sums of the same
unit and can be added exactly (inside CKKS or in plain int64).

All functions are pure; randomness comes only from an explicit integer seed fed to
``numpy.random.Generator(Philox(seed))``.
"""

from __future__ import annotations

import numpy as np

from schemas.errors import InvalidMessage


def qmax(bits: int) -> int:
    """Largest quantized magnitude of a ``bits``-bit signed integer: ``2**(bits-1) - 1``."""
    return (1 << (bits - 1)) - 1


def check_finite(delta: np.ndarray) -> np.ndarray:
    """Return ``delta`` as a 1-D float64 array; InvalidMessage("nan_or_inf") if not finite."""
    x = np.asarray(delta)
    if x.dtype.kind not in "fiub":
        raise InvalidMessage("bad_delta", f"delta has non-numeric dtype {x.dtype}")
    x = x.astype(np.float64, copy=False).reshape(-1)
    if not np.isfinite(x).all():
        raise InvalidMessage("nan_or_inf", "delta contains NaN or Inf")
    return x


def clip(delta: np.ndarray, clip_l2: float, clip_coord: float) -> np.ndarray:
    """Project ``delta`` onto ``{x : ||x||_2 <= clip_l2, |x_i| <= clip_coord}`` (float64).

    L2 scaling first, then the per-coordinate clamp (which can only shrink the norm). The scaled
    vector is nudged down until its computed norm is within the bound, so the map is exactly
    idempotent: ``clip(clip(x)) == clip(x)`` bit for bit.
    """
    x = check_finite(delta).copy()
    norm = float(np.linalg.norm(x))
    if norm > clip_l2:
        x *= clip_l2 / norm
        shrink = 1.0
        while float(np.linalg.norm(x)) > clip_l2:
            shrink = np.nextafter(shrink, 0.0)
            x *= shrink
    np.clip(x, -clip_coord, clip_coord, out=x)
    return x


#: Conditional rounding gives up after this many draws (each fails with probability <= beta,
#: :func:`schemas.dp.rounded_l2_bound`; 2**-20 by default).
MAX_ROUNDING_DRAWS = 64


def stochastic_round(y: np.ndarray, seed: int, bound: int,
                     l2_max: float | None = None) -> np.ndarray:
    """Unbiased stochastic rounding of ``y`` to int64, clamped to ``[-bound, bound]``.

    Args:
        y: values in units of the quantization step (already within ``+-bound``).
        seed: integer seed; the same seed gives the same integers everywhere.
        bound: magnitude limit (a guard against float round-off at the edge).
        l2_max: conditional rounding (distributed DP, Kairouz et al. 2021): draw again until
            the rounded vector's L2 norm is at most this, so the sensitivity is a hard bound.

    Raises:
        InvalidMessage: ``bad_delta`` if no draw of :data:`MAX_ROUNDING_DRAWS` meets ``l2_max``
            (``y`` itself is too long for it).
    """
    rng = np.random.Generator(np.random.Philox(int(seed) & ((1 << 128) - 1)))
    lo = np.floor(y)
    for _ in range(MAX_ROUNDING_DRAWS):
        q = lo + (rng.random(y.shape[0]) < (y - lo))
        np.clip(q, -bound, bound, out=q)
        if l2_max is None or float(np.linalg.norm(q)) <= l2_max:
            return q.astype(np.int64)
    raise InvalidMessage("bad_delta", f"no rounding of this vector has an L2 norm within "
                         f"{l2_max:.1f} ({MAX_ROUNDING_DRAWS} draws)")


def quantize(x: np.ndarray, scale: float, bits: int, seed: int,
             l2_max: float | None = None) -> np.ndarray:
    """Stochastically quantize a clipped (and weighted) float vector to ``bits``-bit integers
    (conditioned on ``||q||_2 <= l2_max`` if given: :func:`stochastic_round`)."""
    return stochastic_round(np.asarray(x, dtype=np.float64) / scale, seed, qmax(bits), l2_max)


def dequantize(q: np.ndarray, scale: float) -> np.ndarray:
    """Integers back to floats (float64): ``q * scale``."""
    return np.asarray(q, dtype=np.float64) * scale
