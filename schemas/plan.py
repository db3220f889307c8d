"""The codec plan: per-round parameters, lane layout and the bounds every honest sum respects.

A round's :class:`CodecParams` travel in its round task; :func:`plan_ckks` / :func:`plan_plain`
derive how values are laid out (lanes per real, CKKS scale, chunks). The same parameters also
bound what an honest sum can decode to, which is how the global tier tells a poisoned total from
an honest one (:func:`l2_bound`, :func:`rounding_l2_bound`, :func:`coarse_weight`); see
``docs/guarantees.md`` for what a stolen device can still do inside these bounds.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, replace

import numpy as np

from schemas import packing, quantize
from schemas.errors import InvalidMessage, Reason
from schemas.he import packed_ct_bytes

_LEN = struct.Struct("<I")
_SLACK = 1024                    # header + zstd framing allowance per chunk

#: Worst-slot std of the decoding error of ONE fresh public-key ciphertext, times the CKKS scale.
#: Measured (3 keys, 40 x 64-ciphertext sums): average slot 0.0036 * 8, worst slot 0.152 / 8 at
#: scale 2**17, i.e. 2,490 at unit scale. The noise is ``r0 + r1 * s`` (rounding after the special
#: prime division), so slots where the secret key's embedding ``|s(zeta_j)|`` is large are ~4x
#: noisier than average. Rounded up. Sums of S ciphertexts have sqrt(S) times this.
NOISE_AT_UNIT_SCALE = 2600.0
#: A sum is only accepted if its worst-slot noise std is <= 1/16: rounding margin 0.5 = 8 sigma.
MAX_NOISE_STD = 1.0 / 16.0
#: Measured: decoding breaks once a plaintext coefficient ``scale * (...)`` reaches q0/2 (~2**59).
#: The planner keeps a bound on every coefficient below q0 / (2 * 1.1).
OVERFLOW_MARGIN = 1.1
MAX_HE_SCALE = 2.0**30
#: Largest packed magnitude: decoded reals are doubles, exact integers only below 2**53.
MAX_PACKED = 2**52
#: With DP noise, a lane sum stays within its bound except with probability 2**-this per value
#: (the noise is unbounded; a sum beyond the bound fails the decode checks, it never decodes
#: to a wrong value unnoticed).
EXACT_FAIL_LOG2 = 40


@dataclass(frozen=True)
class CodecParams:
    """Per-round codec parameters (they travel in the round task)."""

    bits: int = 3                # the smallest width within 1 accuracy point (bench/simulate.py)
    clip_l2: float = 1.0
    clip_coord: float = 0.05
    max_summands: int = 64
    weight_cap: int = 1024
    encrypted: bool = True
    chunk_bytes: int = 1 << 20
    rotate: bool = True
    rotation_seed: int = 0
    #: distributed DP: std of the discrete Gaussian noise each device adds to every quantized
    #: value (in quantization steps; 0: no noise), and the bound of one device's noise (a device
    #: redraws a noise vector with a value beyond it): see :mod:`schemas.dp`
    dp_sigma: float = 0.0
    dp_bound: int = 0

    def __post_init__(self) -> None:
        def bad(detail: str) -> InvalidMessage:
            return InvalidMessage("bad_params", detail)

        for name in ("bits", "max_summands", "weight_cap", "chunk_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise bad(f"{name} must be an integer, got {v!r}")
        if not 2 <= self.bits <= 16:
            raise bad(f"bits must be in 2..16, got {self.bits}")
        for name in ("clip_l2", "clip_coord"):
            v = getattr(self, name)
            if not isinstance(v, (int, float, np.floating)) or not math.isfinite(v) or v <= 0:
                raise bad(f"{name} must be a positive finite number, got {v!r}")
        if not 1 <= self.max_summands <= 2**31 - 1:
            raise bad(f"max_summands must be in 1..2**31-1, got {self.max_summands}")
        if not 1 <= self.weight_cap <= 2**31 - 1:
            raise bad(f"weight_cap must be in 1..2**31-1, got {self.weight_cap}")
        if not 4096 <= self.chunk_bytes <= 1 << 30:
            raise bad(f"chunk_bytes must be in 4096..2**30, got {self.chunk_bytes}")
        if not isinstance(self.encrypted, bool):
            raise bad(f"encrypted must be a bool, got {self.encrypted!r}")
        if not isinstance(self.rotate, bool):
            raise bad(f"rotate must be a bool, got {self.rotate!r}")
        if not isinstance(self.dp_sigma, (int, float, np.floating)) \
                or not math.isfinite(self.dp_sigma) or not 0 <= self.dp_sigma <= 2**20:
            raise bad(f"dp_sigma must be in [0, 2**20], got {self.dp_sigma!r}")
        if isinstance(self.dp_bound, bool) or not isinstance(self.dp_bound, (int, np.integer)) \
                or not 0 <= self.dp_bound <= 2**24:
            raise bad(f"dp_bound must be an integer in 0..2**24, got {self.dp_bound!r}")
        if (self.dp_sigma > 0) != (self.dp_bound > 0):
            raise bad("dp_sigma and dp_bound are both zero (no noise) or both positive")
        if isinstance(self.rotation_seed, bool) \
                or not isinstance(self.rotation_seed, (int, np.integer)) \
                or not 0 <= self.rotation_seed < 2**64:
            raise bad(f"rotation_seed must be in 0..2**64-1, got {self.rotation_seed!r}")

    @property
    def scale(self) -> float:
        """Quantization step: ``clip_coord / (2**(bits-1) - 1)``."""
        return self.clip_coord / quantize.qmax(self.bits)

    @property
    def noisy(self) -> bool:
        """Devices add distributed-DP noise (:mod:`schemas.dp`)."""
        return self.dp_sigma > 0

    @property
    def value_bound(self) -> int:
        """Largest ``|value|`` one honest update carries: ``qmax + dp_bound``."""
        return quantize.qmax(self.bits) + self.dp_bound

    def noise_tail(self, summands: int) -> int:
        """Bound on ``|sum of the noise of summands devices|`` in one coordinate: the smaller of
        the hard ``summands * dp_bound`` and the sub-Gaussian tail at probability
        2**-:data:`EXACT_FAIL_LOG2` (:func:`schemas.dp.noise_tail`)."""
        if not self.noisy:
            return 0
        from schemas import dp  # numpy and dp-accounting only when noise is on

        return min(summands * self.dp_bound,
                   dp.noise_tail(self.dp_sigma, summands, 2.0 ** -EXACT_FAIL_LOG2))

    def lane_max(self, summands: int) -> int:
        """Largest ``|lane|`` of a sum of ``summands`` honest updates, noise included."""
        return packing.lane_max(self.bits, summands) + self.noise_tail(summands)

    def for_round(self, base_seed: int, round_id: int) -> CodecParams:
        """These parameters with the round's rotation seed (a fresh rotation every round, so
        quantization errors do not pile up on the same directions round after round)."""
        h = hashlib.sha256(f"fedstream/rotation-seed/v1|{int(base_seed)}|{int(round_id)}"
                           .encode()).digest()
        return replace(self, rotation_seed=int.from_bytes(h[:8], "big"))


@dataclass(frozen=True)
class Plan:
    """How a round's updates are laid out (derived from CodecParams, num_params and the ring).

    In plain mode ``lanes = 1``, ``lane_bits = 64``, ``values_per_ct = cts_per_chunk = 0``.
    ``params_per_chunk`` is nominal: CKKS chunk 0 holds ``lanes`` fewer (the weight real).
    """

    lanes: int
    lane_bits: int
    values_per_ct: int
    cts_per_chunk: int
    params_per_chunk: int
    num_chunks: int
    he_scale: float = 0.0        # CKKS encoding scale (0 in plain mode)
    reals_per_ct: int = 0        # 2 * slots (0 in plain mode)
    num_reals: int = 0           # R = 1 + ceil(num_params / lanes) (0 in plain mode)
    ct_bytes: int = 0            # one packed ciphertext (schemas.he; 0 in plain mode)


def update_seed(base_seed: int, round_id: int, agent_id: str) -> int:
    """Deterministic 64-bit seed of one agent's quantization noise in one round (SHA-256)."""
    h = hashlib.sha256(f"fedstream/update-seed/v1|{int(base_seed)}|{int(round_id)}|{agent_id}"
                       .encode()).digest()
    return int.from_bytes(h[:8], "big")


def plan_ckks(params: CodecParams, num_params: int, q0: int, slots: int) -> Plan:
    """Choose the most lanes (and a CKKS scale) with which any sum of ``max_summands``
    updates still decodes exactly.

    No fixed cap: the lane count is the largest ``L`` (from ``MAX_PACKED``'s ``53 // width``
    down) whose plan meets both bounds, the overflow bound
    ``coefficient_bound * scale <= q0 / (2 * OVERFLOW_MARGIN)`` and the noise bound
    ``NOISE_AT_UNIT_SCALE * sqrt(S) / scale <= MAX_NOISE_STD``.

    Raises:
        InvalidMessage("unsummable_plan"): not even one lane per real meets both.
    """
    s = params.max_summands
    m = params.lane_max(s)
    width = packing.lane_width(m)
    reals_per_ct = 2 * slots
    min_scale = NOISE_AT_UNIT_SCALE * math.sqrt(s) / MAX_NOISE_STD
    for lanes in range(MAX_PACKED.bit_length() // width + 1, 0, -1):
        vmax = max(packing.packed_max(m, lanes, width), s * params.weight_cap)
        if vmax >= MAX_PACKED:
            continue
        bound = coefficient_bound(params, lanes, width, reals_per_ct)
        # SEAL's encoder also refuses ONE plaintext with a coefficient of 2**(bits(q0)-2) or
        # more ("encoded values are too large"): binding only for a single summand
        one = coefficient_bound(replace(params, max_summands=1), lanes, width, reals_per_ct)
        max_scale = min(q0 / (2 * OVERFLOW_MARGIN * bound), 2.0 ** (q0.bit_length() - 2) / one,
                        MAX_HE_SCALE)
        if max_scale < 1:
            continue
        he_scale = 2.0 ** (math.floor(4 * math.log2(max_scale)) / 4)   # quarter-bit grid
        if he_scale >= min_scale:
            break
    else:
        raise InvalidMessage(
            "unsummable_plan",
            f"{params.bits}-bit values{' with noise' if params.noisy else ''}, {s} summands: "
            f"a {width}-bit lane needs a CKKS scale "
            f">= {min_scale:.3g} for exact rounding but the 60-bit modulus allows less")
    ct_bytes = packed_ct_bytes(reals_per_ct)
    cts_per_chunk = max(1, (params.chunk_bytes - _SLACK) // (_LEN.size + ct_bytes))
    num_reals = 1 + -(-num_params // lanes)
    reals_per_chunk = cts_per_chunk * reals_per_ct
    return Plan(lanes=lanes, lane_bits=width, values_per_ct=reals_per_ct * lanes,
                cts_per_chunk=cts_per_chunk, params_per_chunk=reals_per_chunk * lanes,
                num_chunks=-(-num_reals // reals_per_chunk), he_scale=he_scale,
                reals_per_ct=reals_per_ct, num_reals=num_reals, ct_bytes=ct_bytes)


def ct_l2_bound(params: CodecParams, values_per_ct: int) -> float:
    """Bound on ``||q||_2`` over the values of one ciphertext of one update.

    ``||y||_2 <= clip_l2 / scale`` after clipping and weighting, and stochastic rounding moves
    each value by less than 1, so ``||q_ct||_2 <= clip_l2 / scale + sqrt(values_per_ct)``.
    """
    noise = params.dp_bound * math.sqrt(values_per_ct)  # every noise value is within dp_bound
    return params.clip_l2 / params.scale * (1 + 1e-9) + math.sqrt(values_per_ct) + noise


def coefficient_bound(params: CodecParams, lanes: int, width: int, reals_per_ct: int) -> float:
    """Bound on ``|m_i| / scale`` for every coefficient of a summed plaintext.

    With slots ``z_j`` (N/2 of them), ``m_i = (2 scale / N) Re sum_j z_j zeta_j^-i``, so
    ``|m_i| / scale <= min(sqrt(2) max|z_j|, sqrt(2/N) ||reals||_2)`` (Cauchy-Schwarz). The first
    uses the per-coordinate bound (every lane sum ``<= M``), the second the L2 clip: a lane of a
    sum has ``||.||_2 <= min(S * ct_l2_bound, M sqrt(reals))``.
    """
    s = params.max_summands
    m = params.lane_max(s)
    vmax = max(packing.packed_max(m, lanes, width), s * params.weight_cap)
    lane_l2 = min(s * ct_l2_bound(params, reals_per_ct * lanes), m * math.sqrt(reals_per_ct))
    reals_l2 = s * params.weight_cap + lane_l2 * sum(2.0 ** (width * k) for k in range(lanes))
    n = float(reals_per_ct)            # poly degree N: N/2 complex slots = N reals
    return min(math.sqrt(2) * vmax, math.sqrt(2 / n) * reals_l2)


def plan_plain(params: CodecParams, num_params: int) -> Plan:
    """Plain mode: ``params_per_chunk`` int64 sums fit in ``chunk_bytes``."""
    per = (params.chunk_bytes - _SLACK) // 8
    return Plan(lanes=1, lane_bits=64, values_per_ct=0, cts_per_chunk=0,
                params_per_chunk=per, num_chunks=-(-num_params // per))


def coarse_weight(num_samples: int, cap: int) -> int:
    """The weight a device declares: its sample count, capped, kept to 3 significant bits.

    The weight travels in clear (so the region can range-check it) and in the encrypted weight
    slot (so the global can check the clear weights against the decrypted sum). Keeping only the
    top three bits reveals the sample count to within 25 % and no finer; the device scales its
    delta by this same coarse weight, so the average stays consistent.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) \
            or num_samples < 1:
        raise InvalidMessage(Reason.BAD_WEIGHT, f"num_samples must be an int >= 1: "
                             f"{num_samples!r}")
    w = min(int(num_samples), int(cap))
    drop = max(0, w.bit_length() - 3)
    return (w >> drop) << drop


def is_coarse_weight(weight: int, cap: int) -> bool:
    """Whether ``weight`` is a value :func:`coarse_weight` can produce under ``cap``."""
    return 1 <= weight <= cap and coarse_weight(weight, cap) == weight


#: Probability that an honest sum breaks :func:`rounding_l2_bound` (a false alarm): 2**-40.
FALSE_ALARM_LOG = 40 * math.log(2)


def rounding_l2_bound(summands: int, num_params: int) -> float:
    """High-probability bound on ``||sum of the stochastic rounding errors||_2``.

    Each honest device rounds ``d`` values stochastically: errors ``e_ij`` in ``(-1, 1)``, zero
    mean, variance ``<= 1/4``, independent. With ``S_j = sum_i e_ij``: ``E S_j**2 <= n/4`` and
    ``Var S_j**2 <= E S_j**4 <= n/4 + 3 n**2/16``; Bernstein's inequality on the ``d``
    independent terms ``S_j**2 - E S_j**2`` (each ``<= n**2``) gives ``||S||**2 <= d n/4 + t``
    except with probability ``exp(-L)``, ``t = n**2 L/3 + sqrt((n**2 L/3)**2 + 2 d v L)``. The
    deterministic ``n sqrt(d)`` is used when smaller (few summands).
    """
    n, d = float(summands), float(num_params)
    v = n / 4 + 3 * n * n / 16
    a = n * n * FALSE_ALARM_LOG / 3
    t = a + math.sqrt(a * a + 2 * d * v * FALSE_ALARM_LOG)
    return min(n * math.sqrt(d), math.sqrt(d * n / 4 + t))


def l2_bound(params: CodecParams, weight_sum: int, summands: int, num_params: int) -> float:
    """Largest ``||sum of q_i||_2`` that ``summands`` honest devices of total weight
    ``weight_sum`` can produce.

    Device ``i`` clips its delta to ``clip_l2``, scales it by ``w_i / cap`` and quantizes with
    step ``scale``: ``||y_i||_2 <= (w_i / cap) clip_l2 / scale``, so the sum of the ``y_i`` is
    within ``(W / cap) clip_l2 / scale`` and the rounding adds :func:`rounding_l2_bound`. A sum
    inside this bound averages (``sum * scale * cap / W``) to a delta of norm at most
    ``clip_l2 + rounding``, whatever the weights: one device cannot push the model further than a
    single clipped update could, however it picks its weight.
    """
    signal = weight_sum / params.weight_cap * params.clip_l2 / params.scale
    return signal * (1 + 1e-9) + rounding_l2_bound(summands, num_params) \
        + noise_l2_bound(params, summands, num_params)


#: Conditional rounding: one draw exceeds :func:`dp_l2_bound` with at most this probability.
ROUNDING_BETA = 2.0 ** -20
#: A device's noise vector has a value beyond ``dp_bound`` with at most this probability; it
#: then draws again (:func:`schemas.dp.device_noise`; the delta reported includes it).
NOISE_REDRAW_PROB = 1e-20


def dp_noise_bound(sigma: float, num_params: int) -> int:
    """``dp_bound`` for per-device noise std ``sigma`` (:func:`schemas.dp.device_noise_bound`
    at :data:`NOISE_REDRAW_PROB`)."""
    from schemas import dp

    return dp.device_noise_bound(sigma, int(num_params), NOISE_REDRAW_PROB)


def dp_l2_bound(params: CodecParams, num_params: int) -> float:
    """The L2 sensitivity of one device's update in quantization steps, with distributed DP:
    the bound its conditionally rounded update stays within (Kairouz, Liu, Steinke 2021,
    :func:`schemas.dp.rounded_l2_bound` of ``clip_l2 / scale`` in ``num_params`` dimensions)."""
    from schemas import dp

    return dp.rounded_l2_bound(params.clip_l2 / params.scale, int(num_params), ROUNDING_BETA)


def noise_l2_bound(params: CodecParams, summands: int, num_params: int) -> float:
    """High-probability bound on ``||sum of summands devices' DP noise||_2`` (0 without noise).

    Each coordinate of the sum is ``sqrt(summands) * dp_sigma``-sub-Gaussian (a discrete
    Gaussian is sigma-sub-Gaussian, Canonne, Kamath, Steinke 2020; a device's redraw beyond
    ``dp_bound`` only thins the tails), so by Hsu, Kakade, Zhang (2012)
    ``||z||**2 <= v (d + 2 sqrt(d L) + 2 L)`` except with probability ``exp(-L)``.
    """
    if not params.noisy:
        return 0.0
    v, d, lg = summands * params.dp_sigma ** 2, float(num_params), FALSE_ALARM_LOG
    return math.sqrt(v * (d + 2 * math.sqrt(d * lg) + 2 * lg))
