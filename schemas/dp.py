"""Distributed differential privacy: the distributed discrete Gaussian (DDG) and its accounting.

Idea (Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation", ICML 2021, arXiv:2102.06387; TFF's DistributedDpSumFactory):
each device scales its clipped, rotated update to integer units (step ``gamma``), rounds it with
:func:`conditional_round` so that its L2 norm is at most ``Delta_2 =`` :func:`rounded_l2_bound`,
and adds discrete Gaussian noise from its *own* secret randomness (:class:`NoiseSource`,
:func:`discrete_gaussian`). Ciphertexts are summed; only the sum of ``n`` devices is decrypted,
and it carries ``n`` noise shares: :func:`ddg_rho` bounds its zCDP. :class:`PrivacyLedger`
composes rounds with Google's ``dp-accounting`` (RDP), :func:`plan_sigma` picks the per-device
noise for a target epsilon, :func:`noise_tail` / :func:`device_noise_bound` size the lanes.
:func:`dpsgd_epsilon` accounts example-level DP-SGD on a device (a different unit of privacy:
examples, not devices; the two epsilons do not add).

Units: every sensitivity, norm and sigma here is in integer units (after dividing by ``gamma``).
Neighbouring relation of the ledger: replace one device's update by another, so the L2
sensitivity of a sum of updates of norm ``<= Delta_2`` is ``2 Delta_2`` (:func:`sum_sensitivity`).

Every public function validates its arguments and raises ``ValueError`` on bad ones (wrong type,
NaN, inf, out of range); nothing else escapes.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.rdp import RdpAccountant
from randomgen import ChaCha
from scipy import optimize

NeighborRel = dp_accounting.NeighboringRelation

#: Largest per-device sigma the sampler accepts (integer units): draws stay far below 2**53.
MAX_SIGMA = 2.0**40
#: Most values one call of :func:`discrete_gaussian` draws (2**27 int64 = 1 GiB).
MAX_SIZE = 2**27
#: Largest magnitude :func:`conditional_round` accepts (floats are exact integers beyond it).
MAX_ABS_INPUT = 2.0**52
#: Largest count (devices, population, dimension) the accounting functions accept.
MAX_COUNT = 2**53
#: Largest norm or sensitivity (integer units) accepted: far beyond exact doubles, and small
#: enough that squares and sums of them stay finite.
MAX_NORM = 2.0**80
#: Noise multipliers below this are accounted as epsilon = inf (no meaningful privacy; also
#: where dp-accounting's RDP formulas start to divide by zero).
Z_MIN = 0.01
#: Noise multipliers above this are accounted as this one: conservative (epsilon decreases in
#: z) and clear of dp-accounting's convergence trouble at huge z; epsilon there is ~0.01.
Z_MAX = 1000.0
#: Terms of the DDG's tau summed exactly; beyond, a tight upper bound (see :func:`ddg_tau`).
_TAU_EXACT_TERMS = 100_000


# ---------------------------------------------------------------------------- validation


def _int(name: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if not lo <= int(v) <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {v}")
    return int(v)


def _float(name: str, v: Any, lo: float, hi: float, *, lo_open: bool = False,
           hi_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {v!r}")
    try:
        x = float(v)
    except OverflowError as e:                         # a huge Python int
        raise ValueError(f"{name} is too large: {v!r}") from e
    if math.isnan(x) or x < lo or x > hi or (lo_open and x == lo) or (hi_open and x == hi):
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {v!r}")
    return x


def _prob(name: str, v: Any) -> float:
    return _float(name, v, 0.0, 1.0, lo_open=True, hi_open=True)


# ---------------------------------------------------------------------------- randomness


_SECURE_SOURCES: weakref.WeakSet[NoiseSource] = weakref.WeakSet()
_SOURCES_LOCK = threading.Lock()


def _fresh_chacha() -> ChaCha:
    """ChaCha20 keyed with 256 bits from ``os.urandom`` (counter 0: the key is never reused)."""
    return ChaCha(key=int.from_bytes(os.urandom(32), "little"), counter=0, rounds=20)


def _rekey_after_fork() -> None:
    for src in list(_SECURE_SOURCES):
        src._rekey()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_rekey_after_fork)


class NoiseSource:
    """A device's secret randomness: a ChaCha20 CSPRNG (``randomgen``) behind a numpy Generator.

    ``NoiseSource()`` / :meth:`secure` keys it from ``os.urandom`` (256 bits): the noise is
    known to nobody but the device, never derived from a federation seed. A forked child re-keys
    every secure source (``os.register_at_fork``, plus a pid check), so parent and child never
    share a stream, even through a Generator fetched before the fork. Sources cannot be pickled
    or copied (two copies would add the same noise twice).

    :meth:`from_test_seed` is the only way to get a reproducible stream; it is for tests and
    simulations, and :attr:`is_test` lets production code refuse it.
    """

    __slots__ = ("_bitgen", "_gen", "_pid", "_test", "__weakref__")

    def __init__(self) -> None:
        self._test = False
        self._bitgen = _fresh_chacha()
        self._gen = np.random.Generator(self._bitgen)
        self._pid = os.getpid()
        with _SOURCES_LOCK:
            _SECURE_SOURCES.add(self)

    @classmethod
    def secure(cls) -> NoiseSource:
        """A fresh source keyed from ``os.urandom`` (the production path)."""
        return cls()

    @classmethod
    def from_test_seed(cls, seed: int) -> NoiseSource:
        """A reproducible source for TESTS and SIMULATIONS ONLY: the same ``seed`` (an int in
        ``0..2**256-1``) gives the same stream. Raises ValueError on any other seed."""
        s = _int("seed", seed, 0, 2**256 - 1)
        src = cls.__new__(cls)
        src._test = True
        src._bitgen = ChaCha(key=s, counter=0, rounds=20)
        src._gen = np.random.Generator(src._bitgen)
        src._pid = os.getpid()
        return src

    @property
    def is_test(self) -> bool:
        """Whether this source came from :meth:`from_test_seed` (reproducible, not secret)."""
        return self._test

    @property
    def generator(self) -> np.random.Generator:
        """The numpy Generator drawing from this source's stream."""
        if not self._test and self._pid != os.getpid():
            self._rekey()
        return self._gen

    def _rekey(self) -> None:
        self._bitgen.state = _fresh_chacha().state
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"NoiseSource({'test' if self._test else 'secure'})"

    def __reduce__(self) -> Any:
        raise TypeError("a NoiseSource cannot be pickled or copied (its noise would repeat)")


def _generator(gen: Any) -> np.random.Generator:
    if isinstance(gen, NoiseSource):
        return gen.generator
    if not isinstance(gen, np.random.Generator):
        raise ValueError(f"gen must be a numpy Generator or a NoiseSource, got {type(gen)!r}")
    return gen


def _size(size: Any) -> tuple[int, ...]:
    shape = (size,) if isinstance(size, (int, np.integer)) and not isinstance(size, bool) \
        else size
    if not isinstance(shape, tuple):
        raise ValueError(f"size must be an int or a tuple of ints, got {size!r}")
    dims = tuple(_int("size", s, 0, MAX_SIZE) for s in shape)
    if math.prod(dims) > MAX_SIZE:
        raise ValueError(f"size {dims} draws more than {MAX_SIZE} values")
    return dims


# ---------------------------------------------------------------------------- discrete Gaussian


def discrete_gaussian(gen: np.random.Generator | NoiseSource, sigma: float,
                      size: int | tuple[int, ...]) -> np.ndarray:
    """``size`` independent draws of the discrete Gaussian ``N_Z(0, sigma**2)`` (int64):
    ``P[x] ∝ exp(-x**2 / (2 sigma**2))`` on the integers.

    Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020,
    Algorithm 3: propose ``Y`` from the discrete Laplace with scale ``t = floor(sigma) + 1``
    (a difference of two geometric variables), accept with probability
    ``exp(-(|Y| - sigma**2/t)**2 / (2 sigma**2))``; vectorized, looping only over rejected
    entries (about 1.5 proposals per value). Floating point (not the paper's exact rational
    arithmetic) perturbs the pmf by a relative ~1e-15; the noise does not depend on the data, so
    no low-order bits leak it. ``sigma`` is the scale parameter; the variance is slightly below
    ``sigma**2`` for ``sigma < 1`` and equal to it within 1e-15 above.

    Raises:
        ValueError: ``gen`` not a Generator/NoiseSource, ``sigma`` not in ``(0, MAX_SIGMA]``,
            ``size`` not a non-negative int or tuple of them, or more than ``MAX_SIZE`` values.
    """
    rng = _generator(gen)
    s = _float("sigma", sigma, 0.0, MAX_SIGMA, lo_open=True)
    shape = _size(size)
    total = math.prod(shape)
    t = math.floor(s) + 1.0
    p = -math.expm1(-1.0 / t)                 # geometric success probability: P[G=k] ∝ e^(-k/t)
    shift = s * s / t
    out = np.empty(total, np.int64)
    todo = np.arange(total)
    while todo.size:
        m = todo.size
        y = rng.geometric(p, m) - rng.geometric(p, m)
        u = (np.abs(y).astype(np.float64) - shift) / s      # scaled: no 0/0 for tiny sigma
        with np.errstate(over="ignore"):
            keep = rng.random(m) < np.exp(-0.5 * (u * u))
        out[todo[keep]] = y[keep]
        todo = todo[~keep]
    return out.reshape(shape)


def noise_tail(sigma_dev: float, n: int, fail_prob: float) -> int:
    """Bound ``B`` with ``P[|sum of n devices' noise| > B] <= fail_prob`` for ONE coordinate.

    ``N_Z(0, sigma**2)`` is sigma-subgaussian, ``E exp(lambda X) <= exp(lambda**2 sigma**2 / 2)``
    (Canonne, Kamath, Steinke 2020), so a sum of ``n`` independent shares is
    ``sqrt(n) sigma``-subgaussian and ``P[|S| > t] <= 2 exp(-t**2 / (2 n sigma**2))``. The same
    holds for :func:`device_noise` (conditioning on ``|X| <= B`` keeps it sigma-subgaussian). For
    ``d`` coordinates at once, pass ``fail_prob / d`` (union bound).

    Raises:
        ValueError: ``sigma_dev`` not in ``(0, MAX_SIGMA]``, ``n`` not in ``1..MAX_COUNT``,
            ``fail_prob`` not in ``(0, 1)``.
    """
    s = _float("sigma_dev", sigma_dev, 0.0, MAX_SIGMA, lo_open=True)
    k = _int("n", n, 1, MAX_COUNT)
    p = _prob("fail_prob", fail_prob)
    return math.ceil(s * math.sqrt(2.0 * k * (math.log(2.0) - math.log(p))))


def device_noise_bound(sigma_dev: float, d: int, fail_prob: float) -> int:
    """Per-coordinate bound ``B`` for ONE device's ``d`` noise values: the chance that any of the
    ``d`` exceeds ``B`` is ``<= fail_prob`` (subgaussian tail and a union bound:
    ``B = ceil(sigma sqrt(2 ln(2 d / fail_prob)))``). A device whose draw exceeds it redraws the
    whole vector (:func:`device_noise`); add the effect to delta with :func:`redraw_delta`.

    Raises:
        ValueError: ``sigma_dev`` not in ``(0, MAX_SIGMA]``, ``d`` not in ``1..MAX_COUNT``,
            ``fail_prob`` not in ``(0, 1)``.
    """
    s = _float("sigma_dev", sigma_dev, 0.0, MAX_SIGMA, lo_open=True)
    k = _int("d", d, 1, MAX_COUNT)
    p = _prob("fail_prob", fail_prob)
    return math.ceil(s * math.sqrt(2.0 * (math.log(2.0 * k) - math.log(p))))


def device_noise(gen: np.random.Generator | NoiseSource, sigma_dev: float, d: int,
                 fail_prob: float, max_tries: int = 64) -> np.ndarray:
    """One device's noise vector: ``d`` draws of ``N_Z(0, sigma_dev**2)``, the whole vector
    redrawn while any value exceeds :func:`device_noise_bound` (each try fails with probability
    ``<= fail_prob``). Every value is then within ``+-device_noise_bound(...)``.

    Raises:
        ValueError: bad arguments (as :func:`discrete_gaussian` and :func:`device_noise_bound`),
            ``max_tries`` not in ``1..10**6``, or ``max_tries`` draws all exceeded the bound
            (probability ``<= fail_prob**max_tries``).
    """
    rng = _generator(gen)
    bound = device_noise_bound(sigma_dev, d, fail_prob)
    tries = _int("max_tries", max_tries, 1, 10**6)
    for _ in range(tries):
        x = discrete_gaussian(rng, sigma_dev, d)
        if int(np.abs(x).max()) <= bound:
            return x
    raise ValueError(f"{tries} noise draws all exceeded the bound {bound}: fail_prob too large")


def redraw_delta(delta: float, epsilon: float, fail_prob: float, draws: int) -> float:
    """The delta that holds once devices redraw noise vectors that exceed their bound.

    Redrawing conditions the noise of all ``draws`` device vectors (devices times rounds whose
    noise enters a released sum) on the event ``E`` "no draw exceeded", of probability
    ``>= 1 - q`` with ``q = draws * fail_prob``; ``E`` does not depend on the data, so an
    ``(epsilon, delta)`` guarantee for the untruncated mechanism gives
    ``(epsilon, (delta + e**epsilon q) / (1 - q))`` for the truncated one.

    Raises:
        ValueError: ``delta`` not in ``[0, 1)``, ``epsilon`` not finite and ``>= 0``,
            ``fail_prob`` not in ``(0, 1)``, ``draws`` not in ``0..MAX_COUNT``, or
            ``q >= 1`` or a result ``>= 1`` (no guarantee left).
    """
    dl = _float("delta", delta, 0.0, 1.0, hi_open=True)
    eps = _float("epsilon", epsilon, 0.0, 700.0)
    p = _prob("fail_prob", fail_prob)
    k = _int("draws", draws, 0, MAX_COUNT)
    q = k * p
    if q >= 1.0:
        raise ValueError(f"draws * fail_prob = {q} >= 1: no guarantee left")
    out = (dl + math.exp(eps) * q) / (1.0 - q)
    if not out < 1.0:
        raise ValueError(f"delta after redraws is {out} >= 1: lower fail_prob")
    return out


# ---------------------------------------------------------------------------- rounding


def rounded_l2_bound(c_scaled: float, d: int, beta: float) -> float:
    """L2 bound ``Delta_2`` for the randomized rounding of a ``d``-vector of norm ``<= c_scaled``
    (integer units) that fails with probability ``<= beta`` per try (DDG paper, Theorem 1 /
    Proposition 22; ``rounded_l2_norm_bound`` in its reference code)::

        Delta_2 = min(c + sqrt(d),  sqrt(c**2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2)))

    The first term is deterministic (each value moves by < 1) and is the only one for
    ``beta == 0``.

    Raises:
        ValueError: ``c_scaled`` not in ``[0, MAX_NORM]``, ``d`` not in ``1..MAX_COUNT``,
            ``beta`` not in ``[0, 1)``.
    """
    c = _float("c_scaled", c_scaled, 0.0, MAX_NORM)
    k = _int("d", d, 1, MAX_COUNT)
    b = _float("beta", beta, 0.0, 1.0, hi_open=True)
    root_d = math.sqrt(k)
    det = c + root_d
    if b == 0.0:
        return det
    sq = c * c + k / 4.0 + math.sqrt(2.0 * math.log(1.0 / b)) * (c + root_d / 2.0)
    return min(det, math.sqrt(sq))


def conditional_round(x: np.ndarray, l2_bound: float, gen: np.random.Generator | NoiseSource,
                      max_tries: int = 1000) -> np.ndarray:
    """Randomized rounding of ``x`` (already in integer units) to int64, redrawn until
    ``||rounded||_2 <= l2_bound`` (DDG paper, Algorithm 2, conditional randomized rounding).

    Each value rounds to ``floor(x) + Bernoulli(x - floor(x))``: unbiased per draw. Conditioning
    on the norm adds a bias of at most ``sqrt(beta) / (2 (1 - beta))`` in L2 (Cauchy-Schwarz on
    the rejected draws), ``beta`` the chance one draw is rejected; with
    ``l2_bound = rounded_l2_bound(c, d, beta)`` and ``||x||_2 <= c``, ``beta`` is at most the one
    given there. Every returned vector satisfies the bound, whatever the randomness (which is
    why a public rounding seed would not weaken the DDG guarantee).

    Raises:
        ValueError: ``x`` not a 1-D real array with finite values within ``+-MAX_ABS_INPUT``,
            ``l2_bound`` not finite and ``>= 0``, ``||x||_2 > l2_bound`` (the caller's promise is
            broken), ``max_tries`` not in ``1..10**6``, or ``max_tries`` draws all exceeded the
            bound (``l2_bound`` too tight for ``x``: use :func:`rounded_l2_bound`).
    """
    rng = _generator(gen)
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.dtype.kind not in "iuf":
        raise ValueError(f"x must be a 1-D real array, got shape {arr.shape} dtype {arr.dtype}")
    v = arr.astype(np.float64)
    if arr.size > MAX_SIZE:
        raise ValueError(f"x has more than {MAX_SIZE} values")
    if not np.isfinite(v).all() or (v.size and float(np.abs(v).max()) > MAX_ABS_INPUT):
        raise ValueError("x must be finite and within +-2**52")
    bound = _float("l2_bound", l2_bound, 0.0, math.inf, hi_open=True)
    tries = _int("max_tries", max_tries, 1, 10**6)
    norm = float(np.linalg.norm(v))
    if norm > bound:
        raise ValueError(f"||x||_2 = {norm} already exceeds l2_bound = {bound}")
    lo = np.floor(v)
    frac = v - lo
    bound_sq = bound * bound
    for _ in range(tries):
        r = lo + (rng.random(v.shape[0]) < frac)
        if float(np.dot(r, r)) <= bound_sq:
            return r.astype(np.int64)
    raise ValueError(f"{tries} roundings all exceeded l2_bound = {bound}: the bound is too tight "
                     "for this x (use rounded_l2_bound)")


# ---------------------------------------------------------------------------- DDG privacy


def ddg_tau(sigma_dev: float, n: int) -> float:
    """The DDG's ``tau = 10 sum_{k=1}^{n-1} exp(-2 pi**2 sigma**2 k / (k+1))`` (DDG paper,
    Theorem 1): how far a sum of ``n`` discrete Gaussians is from one discrete Gaussian.

    Terms past the first 100,000 are bounded by ``exp(-c) exp(c / (K+1))`` each
    (``c = 2 pi**2 sigma**2``, ``K`` = first bounded index): an upper bound, so conservative.

    Raises:
        ValueError: ``sigma_dev`` not in ``[0.5, MAX_SIGMA]`` (the theorem needs ``>= 1/2``),
            ``n`` not in ``1..MAX_COUNT``.
    """
    s = _float("sigma_dev", sigma_dev, 0.5, MAX_SIGMA)
    k = _int("n", n, 1, MAX_COUNT)
    c = 2.0 * math.pi**2 * s * s
    exact = min(k - 1, _TAU_EXACT_TERMS)
    if exact <= 0:
        return 0.0
    ks = np.arange(1, exact + 1, dtype=np.float64)
    total = float(np.exp(-c * ks / (ks + 1.0)).sum())
    rest = k - 1 - exact
    if rest > 0:
        total += rest * math.exp(-c + c / (exact + 2.0))
    return 10.0 * total


def ddg_rho(l2_sens: float, sigma_dev: float, n: int, d: int) -> float:
    """zCDP ``rho`` of ``A(x) + sum of n devices' N_Z(0, sigma_dev**2)^d`` noise, ``A`` integer
    valued with L2 sensitivity ``l2_sens`` (integer units; ``2 Delta_2`` under replace-one).

    DDG paper (Kairouz, Liu, Steinke 2021), Theorem 1 / Proposition 14: with
    ``a = l2_sens / (sqrt(n) sigma_dev)`` and ``tau`` = :func:`ddg_tau`, the Renyi divergence of
    order ``alpha`` is at most ``min(alpha a**2/2 + tau d, alpha (a + tau sqrt(d))**2 / 2)``. As
    ``alpha > 1``, ``tau d <= alpha tau d``, so ``D_alpha <= alpha rho`` with::

        rho = min(a**2/2 + tau d, (a + tau sqrt(d))**2 / 2)
            = eps**2 / 2,  eps = min(sqrt(a**2 + 2 tau d), a + tau sqrt(d))

    (``tau d`` enters twice, not half, as the RDP bound's additive term must be absorbed for
    every ``alpha > 1``.) As ``sigma_dev`` grows, ``tau -> 0`` and ``rho -> a**2 / 2``: the
    Gaussian's ``1 / (2 z**2)`` with ``z = sqrt(n) sigma_dev / l2_sens``. ``tau`` is negligible
    once ``sigma_dev >= 1.5`` (``tau < 1e-8`` for ``n <= 10**6``) and explodes below 1.

    Raises:
        ValueError: ``l2_sens`` not in ``(0, MAX_NORM]``, ``sigma_dev`` not in
            ``[0.5, MAX_SIGMA]``, ``n`` or ``d`` not in ``1..MAX_COUNT``.
    """
    sens = _float("l2_sens", l2_sens, 0.0, MAX_NORM, lo_open=True)
    s = _float("sigma_dev", sigma_dev, 0.5, MAX_SIGMA)
    k = _int("n", n, 1, MAX_COUNT)
    dim = _int("d", d, 1, MAX_COUNT)
    tau = ddg_tau(s, k)
    a = sens / (math.sqrt(k) * s)
    return min(a * a / 2.0 + tau * dim, (a + tau * math.sqrt(dim)) ** 2 / 2.0)


def effective_noise_multiplier(rho: float) -> float:
    """``z = 1 / sqrt(2 rho)``: the Gaussian mechanism's noise multiplier with the same zCDP.

    ``rho``-zCDP means ``D_alpha <= rho alpha`` for every ``alpha > 1``, which is exactly the RDP
    curve of the Gaussian with multiplier ``z`` (``alpha / (2 z**2)``), so the Gaussian's curve
    dominates the DDG's at every order. RDP composition and the RDP-to-(epsilon, delta)
    conversion use only the curve, so composing ``GaussianDpEvent(z)`` for unsampled rounds is
    sound. Under subsampling, dp-accounting's bound for sampling without replacement (Wang,
    Balle, Kasiviswanathan 2019, Theorem 27) is the generic curve-only bound (their Theorem 9)
    tightened by moments specific to the continuous Gaussian; using it for the DDG is the common
    practice (TFF leaves DDG accounting to Gaussian tools) but rests on the DDG behaving like
    that Gaussian beyond its RDP curve, which the DDG paper does not prove. Hence
    :class:`PrivacyLedger` also reports the unamplified bound (``amplified=False``).

    Raises:
        ValueError: ``rho`` not finite and ``> 0``.
    """
    r = _float("rho", rho, 0.0, math.inf, lo_open=True, hi_open=True)
    return 1.0 / math.sqrt(2.0 * r)


def sum_sensitivity(device_l2_bound: float) -> float:
    """L2 sensitivity of the integer sum under replace-one (the ledger's relation):
    ``2 * device_l2_bound``, ``device_l2_bound`` = :func:`rounded_l2_bound` (integer units).

    Raises:
        ValueError: ``device_l2_bound`` not in ``(0, MAX_NORM]``.
    """
    return 2.0 * _float("device_l2_bound", device_l2_bound, 0.0, MAX_NORM, lo_open=True)


# ---------------------------------------------------------------------------- accounting


@dataclass(frozen=True, order=True)
class RoundRecord:
    """One released round: ``sample`` of ``population`` devices drawn without replacement, the
    decrypted sum accounted as a Gaussian with noise multiplier ``z_eff`` (with respect to the
    replace-one sensitivity). Raises ValueError on bad fields."""

    population: int
    sample: int
    z_eff: float

    def __post_init__(self) -> None:
        pop = _int("population", self.population, 1, MAX_COUNT)
        smp = _int("sample", self.sample, 1, pop)
        z = _float("z_eff", self.z_eff, 0.0, math.inf, lo_open=True, hi_open=True)
        object.__setattr__(self, "population", pop)
        object.__setattr__(self, "sample", smp)
        object.__setattr__(self, "z_eff", z)

    def as_tuple(self) -> tuple[int, int, float]:
        """``(population, sample, z_eff)``."""
        return (self.population, self.sample, self.z_eff)


def round_record(population: int, sample: int, n: int, sigma_dev: float, l2_sens: float,
                 d: int) -> RoundRecord:
    """The :class:`RoundRecord` of a round whose released sums each carry the noise of at least
    ``n`` honest devices: ``z_eff`` from :func:`ddg_rho`. ``l2_sens`` is the sum's replace-one
    sensitivity, ``sum_sensitivity(Delta_2)`` (twice one device's rounded bound).

    Pass ``n = min(honest devices in the smallest released sum, n_min)``: the same record for
    every round that met ``n_min`` keeps the ledger to a few distinct records (each costs ~0.3 s
    to account) and only over-counts.

    Raises:
        ValueError: bad arguments (see :func:`ddg_rho` and :class:`RoundRecord`).
    """
    return RoundRecord(population, sample, effective_noise_multiplier(
        ddg_rho(l2_sens, sigma_dev, n, d)))


def _record(r: Any) -> RoundRecord:
    if isinstance(r, RoundRecord):
        return r
    if not isinstance(r, (tuple, list)) or len(r) != 3:
        raise ValueError(f"a round must be a RoundRecord or (population, sample, z_eff), "
                         f"got {r!r}")
    return RoundRecord(r[0], r[1], r[2])


def _fresh_accountant() -> RdpAccountant:
    return RdpAccountant(neighboring_relation=NeighborRel.REPLACE_ONE)


@lru_cache(maxsize=256)
def _multiset_epsilon(items: tuple[tuple[RoundRecord, int], ...], delta: float,
                      amplified: bool) -> float:
    """Epsilon of the rounds ``items`` (sorted ``(record, count)``), via dp-accounting."""
    if any(r.z_eff < Z_MIN for r, _ in items):
        return math.inf
    plain = _fresh_accountant()
    for r, count in items:
        plain.compose(dp_accounting.GaussianDpEvent(min(r.z_eff, Z_MAX)), count)
    eps = float(plain.get_epsilon(delta))
    if amplified:
        wor = _fresh_accountant()
        for r, count in items:
            wor.compose(dp_accounting.SampledWithoutReplacementDpEvent(
                r.population, r.sample, dp_accounting.GaussianDpEvent(min(r.z_eff, Z_MAX))),
                count)
        eps = min(eps, float(wor.get_epsilon(delta)))
    return max(eps, 0.0)


class PrivacyLedger:
    """Device-level privacy spent so far: one :class:`RoundRecord` per released round.

    Accounted with dp-accounting's ``RdpAccountant`` under the REPLACE_ONE relation (the one it
    requires for ``SampledWithoutReplacementDpEvent``; our sampler draws a fixed number of
    devices without replacement, so Poisson sampling would not describe it). Each round composes
    ``SampledWithoutReplacementDpEvent(population, sample, GaussianDpEvent(z_eff))``; epsilon is
    the smaller of that and the unsampled composition of ``GaussianDpEvent(z_eff)`` (both are
    valid bounds, and dp-accounting's sampling bound can exceed the unsampled one for large
    ``sample / population``). ``amplified=False`` gives the unsampled bound alone: the
    guarantee against anyone who knows who was sampled (the global aggregator; and anyone with
    the sampling seed, since the sampler is deterministic in it), and the one that does not rely
    on the DDG behaving like a Gaussian under subsampling (see
    :func:`effective_noise_multiplier`).

    Epsilon depends only on the multiset of records (composition is commutative), so a ledger
    rebuilt from :meth:`state` gives exactly the same epsilon. Each call costs ~0.3 s per
    DISTINCT record (dp-accounting's sampling bound; results are cached per multiset): record
    rounds that met ``n_min`` with ``n_min`` (:func:`round_record`), not their own count.
    Noise multipliers below ``Z_MIN`` make epsilon infinite; above ``Z_MAX`` they count as
    ``Z_MAX``.
    """

    def __init__(self, rounds: Iterable[RoundRecord | Sequence[Any]] = ()) -> None:
        self._records: list[RoundRecord] = []
        self._counts: Counter[RoundRecord] = Counter()
        if isinstance(rounds, (str, bytes)) or not isinstance(rounds, Iterable):
            raise ValueError(f"rounds must be an iterable of rounds, got {rounds!r}")
        for r in rounds:
            self.record(r)

    def record(self, r: RoundRecord | Sequence[Any]) -> None:
        """Add one released round (a :class:`RoundRecord` or ``(population, sample, z_eff)``).

        Raises:
            ValueError: a malformed round.
        """
        rec = _record(r)
        self._records.append(rec)
        self._counts[rec] += 1

    def add_round(self, population: int, sample: int, z_eff: float) -> None:
        """:meth:`record` of ``RoundRecord(population, sample, z_eff)``. Raises ValueError on
        bad fields."""
        self.record(RoundRecord(population, sample, z_eff))

    @property
    def rounds(self) -> tuple[RoundRecord, ...]:
        """The recorded rounds, in order."""
        return tuple(self._records)

    def state(self) -> list[tuple[int, int, float]]:
        """JSON-ready ``[(population, sample, z_eff), ...]``, in order; rebuild with
        :meth:`from_state`."""
        return [r.as_tuple() for r in self._records]

    @classmethod
    def from_state(cls, state: Iterable[Sequence[Any]]) -> PrivacyLedger:
        """The ledger :meth:`state` describes. Raises ValueError on a malformed state."""
        return cls(state)

    def _items(self, extra: RoundRecord | None = None) -> tuple[tuple[RoundRecord, int], ...]:
        counts = Counter(self._counts)
        if extra is not None:
            counts[extra] += 1
        return tuple(sorted(counts.items()))

    def epsilon(self, delta: float, *, amplified: bool = True) -> float:
        """Epsilon at ``delta`` of all recorded rounds (0 with none; may be ``inf``).

        Raises:
            ValueError: ``delta`` not in ``(0, 1)`` or ``amplified`` not a bool.
        """
        dl = _prob("delta", delta)
        if not isinstance(amplified, bool):
            raise ValueError(f"amplified must be a bool, got {amplified!r}")
        items = self._items()
        return _multiset_epsilon(items, dl, amplified) if items else 0.0

    def epsilon_if(self, next_round: RoundRecord | Sequence[Any], delta: float, *,
                   amplified: bool = True) -> float:
        """Epsilon at ``delta`` after one more round ``next_round``, without recording it: run
        the round only if this stays within budget.

        Raises:
            ValueError: a malformed round, ``delta`` not in ``(0, 1)``, ``amplified`` not a bool.
        """
        rec = _record(next_round)
        dl = _prob("delta", delta)
        if not isinstance(amplified, bool):
            raise ValueError(f"amplified must be a bool, got {amplified!r}")
        return _multiset_epsilon(self._items(rec), dl, amplified)


# ---------------------------------------------------------------------------- planning


def _plan_args(target_epsilon: Any, delta: Any, rounds: Any, population: Any,
               sample_size: Any, amplified: Any) -> tuple[float, float, int, int, int, bool]:
    eps = _float("target_epsilon", target_epsilon, 0.0, math.inf, lo_open=True, hi_open=True)
    dl = _prob("delta", delta)
    k = _int("rounds", rounds, 1, 10**7)
    pop = _int("population", population, 1, MAX_COUNT)
    smp = _int("sample_size", sample_size, 1, pop)
    if not isinstance(amplified, bool):
        raise ValueError(f"amplified must be a bool, got {amplified!r}")
    return eps, dl, k, pop, smp, amplified


@lru_cache(maxsize=128)
def _min_noise_multiplier(target: float, delta: float, rounds: int, population: int,
                          sample: int, amplified: bool) -> float:
    """Smallest ``z`` (to a relative 1e-4, on the safe side) whose ``rounds`` identical rounds
    stay within ``target``; ValueError if even ``Z_MAX`` does not."""
    def gap(log_z: float) -> float:
        rec = RoundRecord(population, sample, math.exp(log_z))
        return _multiset_epsilon(((rec, rounds),), delta, amplified) - target

    lo, hi = math.log(Z_MIN), math.log(Z_MAX)
    if gap(hi) > 0:
        raise ValueError(f"epsilon {target} at delta {delta} is out of reach over {rounds} "
                         f"rounds even with noise multiplier {Z_MAX}")
    if gap(lo) <= 0:
        return Z_MIN
    root = float(optimize.brentq(gap, lo, hi, xtol=1e-5))
    for step in (1e-5, 1e-4, 1e-3, 1e-2):
        if gap(root + step) <= 0:
            return math.exp(root + step)
    return Z_MAX                                       # gap(hi) <= 0 was checked above


def central_sigma(target_epsilon: float, delta: float, rounds: int, population: int,
                  sample_size: int, l2_sens: float, *, amplified: bool = True) -> float:
    """Std of the CENTRAL Gaussian noise that meets ``target_epsilon`` at ``delta`` over
    ``rounds`` rounds of ``sample_size`` of ``population`` (accounted as :class:`PrivacyLedger`
    does): ``z * l2_sens``. For comparison with the DDG's total ``sqrt(n_min) * sigma_dev``.

    Raises:
        ValueError: bad arguments (positive finite epsilon, ``l2_sens`` in ``(0, MAX_NORM]``,
            ``delta`` in ``(0, 1)``, ``rounds`` in ``1..10**7``,
            ``1 <= sample_size <= population <= MAX_COUNT``), or a target out of reach with
            noise multiplier ``Z_MAX``.
    """
    args = _plan_args(target_epsilon, delta, rounds, population, sample_size, amplified)
    sens = _float("l2_sens", l2_sens, 0.0, MAX_NORM, lo_open=True)
    return _min_noise_multiplier(*args) * sens


def plan_sigma(target_epsilon: float, delta: float, rounds: int, population: int,
               sample_size: int, n_min: int, l2_sens: float, d: int, *,
               amplified: bool = True) -> float:
    """Smallest per-device ``sigma_dev`` (integer units, to a relative 1e-4, never below what
    the target needs) such that ``rounds`` rounds, each releasing sums with the noise of at
    least ``n_min`` honest devices, spend at most ``target_epsilon`` at ``delta``.

    Two steps: the smallest Gaussian noise multiplier ``z`` meeting the target (dp-accounting,
    Brent's method), then the smallest ``sigma_dev >= 0.5`` with
    ``ddg_rho(l2_sens, sigma_dev, n_min, d) <= 1 / (2 z**2)`` (bisection). ``l2_sens`` is the
    sum's replace-one sensitivity, :func:`sum_sensitivity` of the rounded bound.

    Raises:
        ValueError: bad arguments (as :func:`central_sigma`; ``1 <= n_min <= sample_size``,
            ``d`` in ``1..MAX_COUNT``), a target out of reach, or a sigma above ``MAX_SIGMA``.
    """
    args = _plan_args(target_epsilon, delta, rounds, population, sample_size, amplified)
    sens = _float("l2_sens", l2_sens, 0.0, MAX_NORM, lo_open=True)
    n = _int("n_min", n_min, 1, args[4])
    dim = _int("d", d, 1, MAX_COUNT)
    z = _min_noise_multiplier(*args)
    rho_max = 1.0 / (2.0 * z * z)

    def ok(s: float) -> bool:
        return ddg_rho(sens, s, n, dim) <= rho_max

    lo = 0.5
    if ok(lo):
        return lo
    hi = min(max(1.0, 2.0 * z * sens / math.sqrt(n)), MAX_SIGMA)
    while not ok(hi):
        if hi >= MAX_SIGMA:
            raise ValueError(f"the target needs sigma_dev above {MAX_SIGMA}")
        lo, hi = hi, min(2.0 * hi, MAX_SIGMA)
    while hi / lo > 1.0 + 1e-6:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


# ---------------------------------------------------------------------------- DP-SGD


def _dpsgd_args(num_examples: Any, batch_size: Any, epochs: Any,
                delta: Any) -> tuple[float, int, float]:
    n = _int("num_examples", num_examples, 1, MAX_COUNT)
    b = _int("batch_size", batch_size, 1, n)
    ep = _float("epochs", epochs, 0.0, 1e6, lo_open=True)
    dl = _prob("delta", delta)
    steps = math.ceil(ep * n / b)
    if steps > 10**9:
        raise ValueError(f"{steps} steps: too many to account")
    return b / n, steps, dl


@lru_cache(maxsize=256)
def _dpsgd_eps(q: float, steps: int, z: float, delta: float) -> float:
    acc = RdpAccountant()                              # add-or-remove-one: Poisson sampling
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    return max(float(acc.get_epsilon(delta)), 0.0)


def dpsgd_epsilon(num_examples: int, batch_size: int, epochs: float, noise_multiplier: float,
                  delta: float) -> float:
    """Example-level epsilon of DP-SGD on one device: ``ceil(epochs * num_examples /
    batch_size)`` steps, each a Poisson-sampled (rate ``batch_size / num_examples``) Gaussian
    with ``noise_multiplier`` (std / per-example clip), composed by dp-accounting's RDP
    accountant (add-or-remove-one). Valid only if training really samples each example
    independently with that rate and clips per example. Multipliers below ``Z_MIN`` give
    ``inf``; above ``Z_MAX`` count as ``Z_MAX``.

    Raises:
        ValueError: ``num_examples`` not in ``1..MAX_COUNT``, ``batch_size`` not in
            ``1..num_examples``, ``epochs`` not in ``(0, 1e6]``, ``noise_multiplier`` not
            finite and ``> 0``, ``delta`` not in ``(0, 1)``, or more than 10**9 steps.
    """
    q, steps, dl = _dpsgd_args(num_examples, batch_size, epochs, delta)
    z = _float("noise_multiplier", noise_multiplier, 0.0, math.inf, lo_open=True, hi_open=True)
    if z < Z_MIN:
        return math.inf
    return _dpsgd_eps(q, steps, min(z, Z_MAX), dl)


def check_dpsgd_run(q: Any, z: Any, steps: Any) -> tuple[float, float, int]:
    """One run of DP-SGD steps, checked: sampling rate ``q`` in ``(0, 1]``, multiplier ``z``
    finite and ``> 0``, ``steps`` an integer in ``1..10**9``.

    Raises:
        ValueError: any of them out of range or of the wrong type.
    """
    return (_float("q", q, 0.0, 1.0, lo_open=True),
            _float("noise_multiplier", z, 0.0, math.inf, lo_open=True, hi_open=True),
            _int("steps", steps, 1, 10**9))


def dpsgd_runs_epsilon(runs: list[tuple[float, float, int]], delta: float) -> float:
    """Example-level epsilon of DP-SGD steps of several sampling rates and multipliers: runs of
    ``(q, z, steps)``, each step a Poisson-sampled (rate ``q``) Gaussian with multiplier ``z``,
    all composed by one dp-accounting RDP accountant (add-or-remove-one); a device's ledger
    across restarts and data sizes. Multipliers as in :func:`dpsgd_epsilon`.

    Raises:
        ValueError: a run that :func:`check_dpsgd_run` refuses, or ``delta`` not in ``(0, 1)``.
    """
    dl = _prob("delta", delta)
    acc = RdpAccountant()
    for run in runs:
        q, z, n = check_dpsgd_run(*run)
        if z < Z_MIN:
            return math.inf
        acc.compose(dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(min(z, Z_MAX))), n)
    return max(float(acc.get_epsilon(dl)), 0.0)


def dpsgd_noise_multiplier(target_eps: float, delta: float, num_examples: int, batch_size: int,
                           epochs: float) -> float:
    """Smallest DP-SGD noise multiplier (to a relative 1e-4, on the safe side) whose
    :func:`dpsgd_epsilon` is at most ``target_eps``.

    Raises:
        ValueError: bad arguments (as :func:`dpsgd_epsilon`; ``target_eps`` finite and
            ``> 0``), or a target out of reach with ``Z_MAX``.
    """
    q, steps, dl = _dpsgd_args(num_examples, batch_size, epochs, delta)
    target = _float("target_eps", target_eps, 0.0, math.inf, lo_open=True, hi_open=True)

    def gap(log_z: float) -> float:
        return _dpsgd_eps(q, steps, math.exp(log_z), dl) - target

    lo, hi = math.log(Z_MIN), math.log(Z_MAX)
    if gap(hi) > 0:
        raise ValueError(f"epsilon {target} is out of reach even with noise multiplier {Z_MAX}")
    if gap(lo) <= 0:
        return Z_MIN
    root = float(optimize.brentq(gap, lo, hi, xtol=1e-5))
    for step in (1e-5, 1e-4, 1e-3, 1e-2):
        if gap(root + step) <= 0:
            return math.exp(root + step)
    return Z_MAX


__all__ = [
    "MAX_ABS_INPUT", "MAX_COUNT", "MAX_NORM", "MAX_SIGMA", "MAX_SIZE", "Z_MAX", "Z_MIN", "NoiseSource",
    "PrivacyLedger", "RoundRecord", "central_sigma", "check_dpsgd_run", "conditional_round",
    "ddg_rho", "ddg_tau", "device_noise", "device_noise_bound", "discrete_gaussian",
    "dpsgd_epsilon", "dpsgd_noise_multiplier", "dpsgd_runs_epsilon", "effective_noise_multiplier",
    "noise_tail", "plan_sigma", "redraw_delta", "round_record", "rounded_l2_bound",
    "sum_sensitivity",
]
