"""Packing several small signed integers into one exactly-summable float ("lanes").

Idea (as in packed/batched secure aggregation, e.g. Bonawitz et al. 2017 and HE batching):
``k`` integers ``q_0..q_{k-1}`` share one value ``V = sum_k q_k * 2**(w*k)``. Adding packed values
adds every lane independently, as long as every lane *sum* stays inside a balanced ``w``-bit digit,
``[-(2**(w-1)), 2**(w-1) - 1]``. Unpacking takes centered remainders lane by lane, so negative
lanes borrow from the lane above and come back exact.

Lane width: a lane holds the sum of at most ``S`` values of magnitude ``<= 2**(b-1) - 1``, so
``|lane| <= M = S * (2**(b-1) - 1)`` and ``w = bit_length(M) + 1`` is the smallest width with
``M <= 2**(w-1) - 1``. This equals ``b + ceil(log2 S)`` for most ``S`` (the sign bit is already
one of the ``b`` bits; 8-bit values, 64 summands -> 14-bit lanes).
"""

from __future__ import annotations

import numpy as np


def lane_max(bits: int, max_summands: int) -> int:
    """Largest magnitude of one lane sum: ``max_summands * (2**(bits-1) - 1)``."""
    return max_summands * ((1 << (bits - 1)) - 1)


def lane_width(m: int) -> int:
    """Smallest balanced-digit width that holds every lane sum within ``+-m``."""
    return m.bit_length() + 1


def lane_bits(bits: int, max_summands: int) -> int:
    """Smallest balanced-digit width that holds every lane sum exactly."""
    return lane_width(lane_max(bits, max_summands))


def packed_max(m: int, lanes: int, width: int) -> int:
    """Largest magnitude of a packed sum whose lanes are within ``+-m``:
    ``m * sum_k 2**(w*k)``."""
    return m * sum(1 << (width * k) for k in range(lanes))


def pack(q: np.ndarray, lanes: int, width: int) -> np.ndarray:
    """Pack int64 ``q`` (padded with zeros to a multiple of ``lanes``) into int64 values.

    Element ``j`` of the result is ``sum_k q[j*lanes + k] * 2**(width*k)``.
    """
    q = np.asarray(q, dtype=np.int64)
    n = -(-q.shape[0] // lanes) * lanes
    if n != q.shape[0]:
        q = np.concatenate([q, np.zeros(n - q.shape[0], np.int64)])
    g = q.reshape(-1, lanes)
    out = g[:, lanes - 1].copy()
    for k in range(lanes - 2, -1, -1):
        out <<= width
        out += g[:, k]
    return out


def unpack(v: np.ndarray, lanes: int, width: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack` for (summed) packed int64 values; returns ``n`` int64 lanes."""
    v = np.asarray(v, dtype=np.int64).copy()
    half = np.int64(1 << (width - 1))
    mask = np.int64((1 << width) - 1)
    out = np.empty((v.shape[0], lanes), np.int64)
    for k in range(lanes):
        lane = ((v + half) & mask) - half   # centered remainder mod 2**width
        out[:, k] = lane
        v -= lane
        v >>= width
    return out.reshape(-1)[:n]
