"""A seeded random rotation (randomized Hadamard transform) that spreads a vector before
quantization, undone by the server after decoding the sum.

Idea (Suresh et al., "Distributed Mean Estimation with Limited Communication", ICML 2017; the
same rotation as the distributed discrete Gaussian / Skellam mechanisms of Kairouz et al. 2021
and Agarwal et al. 2021): multiply by random signs, then by a normalized Walsh-Hadamard matrix.
The result is orthogonal (norms and sums are preserved, so a sum of rotated updates is the
rotation of their sum) and spreads any vector so that every coordinate is close to
``N(0, ||x||**2 / d)``: a few large coordinates no longer sit at the clip bound, and a small
per-coordinate range (fewer bits) loses little.

Any length, no padding: with ``B`` the largest power of two ``<= d``, the rotation is
``H_tail D_2 H_head D_1``, where ``D_k`` flips signs and ``H_head`` / ``H_tail`` apply
``H_B / sqrt(B)`` to the first and the last ``B`` coordinates (the blocks overlap unless
``d == B``). Both are orthogonal and their own inverses, so the inverse applies them in reverse
order. An update of the demo model (21,546 values) thus stays 21,546 values, where padding to
``2**15`` would send 52 % more.

All of it is deterministic in the seed, which every device of a round and the global share
(it travels in the round task): the rotation hides nothing, it only shapes the quantization
error. Cost: ``O(d log d)``, about 40 ms per million values on one core.
"""

from __future__ import annotations

import numpy as np

from schemas.errors import InvalidMessage


def _fwht(a: np.ndarray) -> None:
    """In-place normalized Walsh-Hadamard transform of a contiguous float64 block of length
    ``2**k`` (``H / sqrt(len)``: orthogonal and its own inverse)."""
    n = a.shape[0]
    h = 1
    while h < n:
        v = a.reshape(-1, 2, h)
        s = v[:, 0] + v[:, 1]
        v[:, 1] = v[:, 0] - v[:, 1]
        v[:, 0] = s
        h *= 2
    a *= 1.0 / np.sqrt(n)


class Rotation:
    """The rotation of ``d``-vectors for one seed: :meth:`forward` and its inverse
    :meth:`inverse` (float64 in, float64 out)."""

    def __init__(self, d: int, seed: int) -> None:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
            raise InvalidMessage("bad_params", f"rotation length must be >= 1, got {d!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
                or not 0 <= seed < 2**64:
            raise InvalidMessage("bad_params", f"rotation seed must be in 0..2**64-1, got {seed!r}")
        self.d = int(d)
        self.block = 1 << (self.d.bit_length() - 1)
        rng = np.random.Generator(np.random.Philox(key=int(seed)))
        self.signs = [np.where(rng.random(self.d) < 0.5, -1.0, 1.0) for _ in range(2)]

    def _check(self, x: np.ndarray) -> np.ndarray:
        y = np.array(x, dtype=np.float64, copy=True).reshape(-1)
        if y.shape[0] != self.d:
            raise InvalidMessage("wrong_num_params",
                                 f"vector has {y.shape[0]} values, rotation has {self.d}")
        return y

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``H_tail D_2 H_head D_1 x``."""
        y = self._check(x)
        y *= self.signs[0]
        _fwht(y[:self.block])
        y *= self.signs[1]
        _fwht(y[self.d - self.block:])
        return y

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """``D_1 H_head D_2 H_tail y`` (each factor is its own inverse)."""
        x = self._check(y)
        _fwht(x[self.d - self.block:])
        x *= self.signs[1]
        _fwht(x[:self.block])
        x *= self.signs[0]
        return x
