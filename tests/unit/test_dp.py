"""The distributed discrete Gaussian: the sampler matches its pmf, rounding respects its bound,
the ledger agrees with dp-accounting computed here directly, planning meets (and is tight to)
its target, and no public function lets anything but ValueError escape on garbage."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from schemas import dp

D = 21_546                     # the demo model's size
DELTA = 1e-5
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


def exact_pmf(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Support and pmf of N_Z(0, sigma**2), summed far into the tails."""
    k_max = math.ceil(40 * sigma) + 5
    ks = np.arange(-k_max, k_max + 1)
    logw = -(ks.astype(np.float64) ** 2) / (2 * sigma * sigma)
    w = np.exp(logw - logw.max())
    return ks, w / w.sum()


def reference_epsilon(rounds: list[tuple[int, int, float]], delta: float) -> float:
    """Independent reference: dp-accounting directly, one event per round, in order."""
    wor = RdpAccountant(neighboring_relation=REPLACE_ONE)
    plain = RdpAccountant(neighboring_relation=REPLACE_ONE)
    for pop, sample, z in rounds:
        wor.compose(dp_accounting.SampledWithoutReplacementDpEvent(
            pop, sample, dp_accounting.GaussianDpEvent(z)))
        plain.compose(dp_accounting.GaussianDpEvent(z))
    return min(wor.get_epsilon(delta), plain.get_epsilon(delta))


# ---------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("sigma", [0.5, 2.0, 10.0])
def test_discrete_gaussian_matches_its_distribution(sigma):
    # Prepare
    ks, pmf = exact_pmf(sigma)
    var = float((ks.astype(np.float64) ** 2 * pmf).sum())
    m4 = float((ks.astype(np.float64) ** 4 * pmf).sum())
    n = 200_000

    # Execute
    x = dp.discrete_gaussian(dp.NoiseSource.from_test_seed(7), sigma, n)

    # Assert: dtype, mean, variance (5 standard errors), chi-square goodness of fit
    assert x.dtype == np.int64 and x.shape == (n,)
    assert abs(x.mean()) < 5 * math.sqrt(var / n)
    assert abs(x.astype(np.float64).var() - var) < 5 * math.sqrt((m4 - var * var) / n)
    expected = pmf * n
    inner = expected >= 5
    lo, hi = ks[inner][0], ks[inner][-1]
    obs = np.array([np.sum(x < lo)] + [np.sum(x == k) for k in ks[inner]] + [np.sum(x > hi)])
    exp = np.concatenate([[expected[ks < lo].sum()], expected[inner], [expected[ks > hi].sum()]])
    keep = exp > 0
    exp = exp[keep] * (obs[keep].sum() / exp[keep].sum())
    assert stats.chisquare(obs[keep], exp).pvalue > 1e-3


def test_sum_of_devices_has_n_times_the_variance():
    # Prepare
    n_dev, sigma, d = 16, 2.0, 50_000
    ks, pmf = exact_pmf(sigma)
    var = float((ks.astype(np.float64) ** 2 * pmf).sum())
    src = dp.NoiseSource.from_test_seed(11)

    # Execute
    total = sum(dp.discrete_gaussian(src, sigma, d) for _ in range(n_dev))

    # Assert: the sum is near Gaussian, so its sample variance has std ~ var * sqrt(2 / d)
    assert abs(total.astype(np.float64).var() - n_dev * var) < 5 * n_dev * var * math.sqrt(2 / d)
    assert abs(total.mean()) < 5 * math.sqrt(n_dev * var / d)


def test_discrete_gaussian_shapes_and_extremes():
    # Prepare
    src = dp.NoiseSource.from_test_seed(3)

    # Execute / Assert
    assert dp.discrete_gaussian(src, 1.0, (3, 4)).shape == (3, 4)
    assert dp.discrete_gaussian(src, 1.0, 0).shape == (0,)
    assert not dp.discrete_gaussian(src, 1e-300, 1000).any()          # point mass at 0
    assert not dp.discrete_gaussian(src, 0.05, 100_000).any()         # P[x != 0] ~ 1e-87
    big = dp.discrete_gaussian(src, 2.0**40, 10_000).astype(np.float64)
    assert 0.9 < big.std() / 2.0**40 < 1.1
    assert dp.discrete_gaussian(np.random.default_rng(0), 3.0, 5).dtype == np.int64


# ---------------------------------------------------------------------------- NoiseSource


def test_secure_sources_differ_and_test_seeds_repeat():
    # Execute
    a, b = dp.NoiseSource.secure(), dp.NoiseSource()
    s1, s2, s3 = (dp.NoiseSource.from_test_seed(s) for s in (5, 5, 6))

    # Assert
    draw = [src.generator.integers(0, 2**63, 8) for src in (a, b, s1, s2, s3)]
    assert not np.array_equal(draw[0], draw[1])
    assert np.array_equal(draw[2], draw[3]) and not np.array_equal(draw[2], draw[4])
    assert not a.is_test and not b.is_test and s1.is_test
    assert "secure" in repr(a) and "test" in repr(s1)


def test_noise_source_has_no_seeded_production_path():
    # Execute / Assert: the constructor takes no seed; sources cannot be copied
    with pytest.raises(TypeError):
        dp.NoiseSource(42)  # type: ignore[call-arg]
    for src in (dp.NoiseSource(), dp.NoiseSource.from_test_seed(1)):
        with pytest.raises(TypeError):
            pickle.dumps(src)
        with pytest.raises(TypeError):
            copy.deepcopy(src)
    for bad in (-1, 2**256, 1.5, "1", None, True):
        with pytest.raises(ValueError):
            dp.NoiseSource.from_test_seed(bad)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_gets_a_fresh_stream():
    # Prepare: a Generator fetched BEFORE the fork
    src = dp.NoiseSource.secure()
    gen = src.generator
    r, w = os.pipe()

    # Execute
    pid = os.fork()
    if pid == 0:                                     # child
        try:
            os.write(w, gen.integers(0, 2**63, 4).tobytes() + src.generator.integers(
                0, 2**63, 4).tobytes())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while len(data) < 64:
        chunk = os.read(r, 64 - len(data))
        if not chunk:
            break
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    mine = np.concatenate([gen.integers(0, 2**63, 4), src.generator.integers(0, 2**63, 4)])

    # Assert
    assert len(data) == 64
    assert not np.array_equal(np.frombuffer(data, np.int64), mine)


# ---------------------------------------------------------------------------- rounding


def test_conditional_rounding_is_unbiased_and_within_bound():
    # Prepare: beta = 1e-6 makes the conditioning's bias <= 5e-4 in L2
    rng = np.random.default_rng(1)
    d, c = 64, 20.0
    x = rng.uniform(-5, 5, d)
    x *= c / np.linalg.norm(x)
    bound = dp.rounded_l2_bound(c, d, 1e-6)
    src = dp.NoiseSource.from_test_seed(2)

    # Execute
    rounds = np.array([dp.conditional_round(x, bound, src) for _ in range(4000)])

    # Assert: each value has variance <= 1/4: the 4000-draw mean is within 5 * 0.0079
    assert rounds.dtype == np.int64
    assert np.all(np.sqrt((rounds.astype(np.float64) ** 2).sum(axis=1)) <= bound)
    assert np.all(np.abs(rounds - x) < 1)
    assert np.abs(rounds.mean(axis=0) - x).max() < 5 * 0.5 / math.sqrt(4000) + 5e-4


def test_conditioning_bias_stays_within_the_documented_bound():
    # Prepare: x = 0.5 everywhere, bound sqrt(d/2): about half the draws are rejected
    d = 400
    x = np.full(d, 0.5)
    bound = math.sqrt(d / 2) + 1e-9
    src = dp.NoiseSource.from_test_seed(4)
    beta = stats.binom.sf(d // 2, d, 0.5)           # P[more than d/2 ones] = P[reject]

    # Execute
    mean = np.mean([dp.conditional_round(x, bound, src) for _ in range(8000)], axis=0)

    # Assert: ||bias|| <= sqrt(beta) / (2 (1 - beta)), plus the sampling error (~0.11)
    assert np.linalg.norm(mean - x) < math.sqrt(beta) / (2 * (1 - beta)) + 0.2


def test_rounded_l2_bound_fails_at_most_beta_per_try():
    # Prepare
    rng = np.random.default_rng(5)
    d, c, beta = 256, 10.0, 0.1
    x = rng.normal(0, 1, d)
    x *= c / np.linalg.norm(x)
    bound = dp.rounded_l2_bound(c, d, beta)
    src = dp.NoiseSource.from_test_seed(6)

    # Execute: one try each; a failure raises
    fails = 0
    for _ in range(3000):
        try:
            dp.conditional_round(x, bound, src, max_tries=1)
        except ValueError:
            fails += 1

    # Assert
    assert fails / 3000 <= beta
    assert dp.rounded_l2_bound(c, d, 0.0) == c + 16.0
    assert c < bound < c + 16.0


@given(st.integers(1, 300), st.floats(0.0, 1e4), st.floats(1e-9, 0.9), st.integers(0, 2**32))
@settings(max_examples=60, deadline=None, derandomize=True)
def test_conditional_rounding_never_exceeds_the_bound(d, c, beta, seed):
    # Prepare
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, d)
    norm = float(np.linalg.norm(x))
    x = x * (c / norm) if norm > 0 else x
    bound = dp.rounded_l2_bound(float(np.linalg.norm(x)), d, beta)

    # Execute
    r = dp.conditional_round(x, bound, dp.NoiseSource.from_test_seed(seed))

    # Assert
    assert float(np.linalg.norm(r.astype(np.float64))) <= bound
    assert np.all(np.abs(r - x) < 1)


def test_conditional_rounding_refuses_broken_promises():
    # Prepare
    src = dp.NoiseSource.from_test_seed(0)

    # Execute / Assert
    assert np.array_equal(dp.conditional_round(np.array([3.0, -4.0]), 5.0, src), [3, -4])
    with pytest.raises(ValueError, match="exceeds"):
        dp.conditional_round(np.array([3.0, 4.0]), 4.9, src)
    with pytest.raises(ValueError):
        dp.conditional_round(np.array([np.nan, 1.0]), 5.0, src)
    with pytest.raises(ValueError, match="too tight"):
        dp.conditional_round(np.full(100, 0.5), 5.0, src, max_tries=5)


# ---------------------------------------------------------------------------- DDG bound


def test_ddg_rho_tends_to_the_gaussians_as_sigma_grows():
    # Prepare
    sens, n = 600.0, 32

    # Execute / Assert: tau vanishes, rho -> sens**2 / (2 n sigma**2)
    for sigma in (2.0, 5.0, 50.0):
        gauss = sens**2 / (2 * n * sigma**2)
        assert dp.ddg_rho(sens, sigma, n, D) == pytest.approx(gauss, rel=1e-9)
        z = dp.effective_noise_multiplier(dp.ddg_rho(sens, sigma, n, D))
        assert z == pytest.approx(math.sqrt(n) * sigma / sens, rel=1e-9)
    # small sigma: tau * d takes over
    assert dp.ddg_rho(sens, 0.8, n, D) > 1.05 * sens**2 / (2 * n * 0.8**2)
    assert dp.ddg_rho(sens, 0.5, n, D) > 5 * sens**2 / (2 * n * 0.5**2)
    assert dp.ddg_tau(3.0, 1) == 0.0 and dp.ddg_tau(1.0, 10) > dp.ddg_tau(2.0, 10) > 0


def test_ddg_rho_is_monotone():
    # Execute / Assert: more noise or more devices -> less rho; more sensitivity -> more
    sigmas = np.geomspace(0.5, 100, 40)
    rhos = [dp.ddg_rho(100.0, s, 20, 1000) for s in sigmas]
    assert all(a > b for a, b in zip(rhos, rhos[1:]))
    ns = [dp.ddg_rho(100.0, 1.0, n, 1000) for n in (1, 2, 10, 100, 10**7)]
    assert all(a > b for a, b in zip(ns, ns[1:]))
    assert dp.ddg_rho(200.0, 3.0, 20, 1000) > dp.ddg_rho(100.0, 3.0, 20, 1000)


def test_tau_tail_bound_is_an_upper_bound_near_the_exact_sum():
    # Prepare: n beyond the exactly summed terms
    sigma, n = 0.6, 300_000
    c = 2 * math.pi**2 * sigma**2
    k = np.arange(1, n, dtype=np.float64)
    exact = 10 * float(np.exp(-c * k / (k + 1)).sum())

    # Execute
    tau = dp.ddg_tau(sigma, n)

    # Assert
    assert exact <= tau <= exact * (1 + 1e-4)


# ---------------------------------------------------------------------------- ledger


ROUNDS = [(1000, 50, 0.8), (1000, 50, 0.8), (1000, 50, 1.5), (1000, 50, 0.8), (500, 20, 2.0)]


def test_ledger_epsilon_equals_dp_accounting_directly():
    # Prepare
    led = dp.PrivacyLedger()
    for i, r in enumerate(ROUNDS):
        if i % 2:
            led.record(r)
        else:
            led.add_round(*r)

    # Execute
    eps = led.epsilon(DELTA)

    # Assert
    assert eps == pytest.approx(reference_epsilon(ROUNDS, DELTA), abs=1e-9)
    plain = RdpAccountant(neighboring_relation=REPLACE_ONE)
    for _, _, z in ROUNDS:
        plain.compose(dp_accounting.GaussianDpEvent(z))
    assert led.epsilon(DELTA, amplified=False) == pytest.approx(plain.get_epsilon(DELTA),
                                                                abs=1e-9)
    assert eps < led.epsilon(DELTA, amplified=False)          # sampling 5 % amplifies
    assert dp.PrivacyLedger().epsilon(DELTA) == 0.0


def test_epsilon_if_equals_adding_the_round_and_state_round_trips():
    # Prepare
    led = dp.PrivacyLedger(ROUNDS)
    nxt = dp.RoundRecord(1000, 50, 1.5)

    # Execute
    before = led.epsilon(DELTA)
    predicted = led.epsilon_if(nxt, DELTA)
    led.record(nxt)
    rebuilt = dp.PrivacyLedger.from_state(json.loads(json.dumps(led.state())))

    # Assert
    assert predicted == led.epsilon(DELTA) > before
    assert led.epsilon_if((1000, 50, 1.5), DELTA, amplified=False) \
        == dp.PrivacyLedger(ROUNDS + [nxt.as_tuple()] * 2).epsilon(DELTA, amplified=False)
    assert rebuilt.epsilon(DELTA) == led.epsilon(DELTA)
    assert rebuilt.rounds == led.rounds and len(led.state()) == len(ROUNDS) + 1


def test_epsilon_grows_when_fewer_than_n_min_devices_report():
    # Prepare
    pop, sample, n_min, sigma = 1000, 50, 32, 3.0
    sens = dp.sum_sensitivity(dp.rounded_l2_bound(300.0, D, math.exp(-0.5)))
    full = dp.round_record(pop, sample, n_min, sigma, sens, D)
    short = dp.round_record(pop, sample, n_min // 4, sigma, sens, D)

    # Execute
    met = dp.PrivacyLedger([full] * 5)
    missed = dp.PrivacyLedger([full] * 4 + [short])

    # Assert
    assert short.z_eff < full.z_eff
    assert missed.epsilon(DELTA) > met.epsilon(DELTA)
    assert missed.epsilon(DELTA, amplified=False) > met.epsilon(DELTA, amplified=False)


def test_ledger_extremes():
    # Execute / Assert: tiny z -> no guarantee; huge z counts as Z_MAX
    assert dp.PrivacyLedger([(10, 5, dp.Z_MIN / 2)]).epsilon(DELTA) == math.inf
    huge = dp.PrivacyLedger([(10, 5, 1e12)]).epsilon(DELTA)
    assert huge == dp.PrivacyLedger([(10, 5, dp.Z_MAX)]).epsilon(DELTA) < 0.1
    with pytest.raises(ValueError):
        dp.PrivacyLedger([(10, 11, 1.0)])
    with pytest.raises(ValueError):
        dp.PrivacyLedger.from_state([[10, 5]])


# ---------------------------------------------------------------------------- planning


def test_plan_sigma_meets_its_target_and_is_tight():
    # Prepare
    target, rounds, pop, sample, n_min = 4.0, 50, 2000, 100, 40
    sens = dp.sum_sensitivity(dp.rounded_l2_bound(300.0, D, math.exp(-0.5)))

    def spent(sigma: float) -> float:
        rec = dp.round_record(pop, sample, n_min, sigma, sens, D)
        return dp.PrivacyLedger([rec] * rounds).epsilon(DELTA)

    # Execute
    sigma = dp.plan_sigma(target, DELTA, rounds, pop, sample, n_min, sens, D)
    central = dp.central_sigma(target, DELTA, rounds, pop, sample, sens)

    # Assert
    assert spent(sigma) <= target
    assert spent(0.9 * sigma) > target
    assert sigma > 2                                  # tau negligible: the DDG's sum of n_min
    assert math.sqrt(n_min) * sigma == pytest.approx(central, rel=1e-4)  # shares = central


def test_plan_sigma_edges():
    # Execute / Assert: a huge budget needs only the theorem's minimum; an absurd one is refused
    assert dp.plan_sigma(1e6, DELTA, 1, 10, 10, 10, 1.0, 10, amplified=False) == 0.5
    with pytest.raises(ValueError, match="out of reach"):
        dp.plan_sigma(1e-6, DELTA, 10**6, 10, 10, 10, 1.0, 10, amplified=False)
    with pytest.raises(ValueError):
        dp.plan_sigma(1.0, DELTA, 10, 10, 10, 11, 1.0, 10)        # n_min > sample


# ---------------------------------------------------------------------------- lane room


def test_noise_tail_holds_empirically():
    # Prepare
    sigma, n, p = 2.0, 10, 0.05
    src = dp.NoiseSource.from_test_seed(8)

    # Execute
    b = dp.noise_tail(sigma, n, p)
    sums = dp.discrete_gaussian(src, sigma, (n, 40_000)).sum(axis=0)

    # Assert: the tail bound holds (it is loose: Gaussian tails at ~3.4 std)
    assert np.mean(np.abs(sums) > b) <= p
    assert b == math.ceil(sigma * math.sqrt(2 * n * math.log(2 / p)))


def test_device_noise_stays_within_its_bound_and_redraws():
    # Prepare
    src = dp.NoiseSource.from_test_seed(9)
    bound = dp.device_noise_bound(3.0, 1000, 0.5)

    # Execute: fail_prob 0.5 makes redraws common
    draws = [dp.device_noise(src, 3.0, 1000, 0.5) for _ in range(50)]

    # Assert
    assert all(x.shape == (1000,) and int(np.abs(x).max()) <= bound for x in draws)
    assert bound == math.ceil(3.0 * math.sqrt(2 * math.log(2 * 1000 / 0.5)))
    assert dp.redraw_delta(1e-6, 2.0, 1e-12, 10**4) \
        == pytest.approx((1e-6 + math.exp(2.0) * 1e-8) / (1 - 1e-8))
    with pytest.raises(ValueError):
        dp.redraw_delta(1e-6, 2.0, 0.1, 10)                      # q = 1


# ---------------------------------------------------------------------------- DP-SGD


def test_dpsgd_epsilon_matches_dp_accounting_and_the_search_is_tight():
    # Prepare
    n, b, epochs, delta = 60_000, 256, 3, 1e-5
    steps = math.ceil(epochs * n / b)
    acc = RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(b / n, dp_accounting.GaussianDpEvent(1.1)),
                steps)

    # Execute
    eps = dp.dpsgd_epsilon(n, b, epochs, 1.1, delta)
    z = dp.dpsgd_noise_multiplier(2.0, delta, n, b, epochs)

    # Assert
    assert eps == pytest.approx(acc.get_epsilon(delta), abs=1e-9)
    assert dp.dpsgd_epsilon(n, b, epochs, z, delta) <= 2.0
    assert dp.dpsgd_epsilon(n, b, epochs, 0.99 * z, delta) > 2.0


# ---------------------------------------------------------------------------- fuzzing


GARBAGE = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -1, -1.5, 0, 0.0, -0.0, 1e308, 2**64,
                     10**30, 5e-324, True, None, "1", [1], (), b"x", np.float64(np.nan)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0.5, 1, 2, 3, 10, 64, 1e-3, 0.1, 1e-5]),
)


def _sane_float(v: object, allow_inf: bool = False) -> None:
    assert isinstance(v, float) and not math.isnan(v) and v >= 0
    assert allow_inf or math.isfinite(v)


def _sane_epsilon(v: object) -> None:
    _sane_float(v, allow_inf=True)


def _sane_count(v: object) -> None:
    assert isinstance(v, int) and v >= 0


def _sane_prob(v: object) -> None:
    _sane_float(v)
    assert isinstance(v, float) and v < 1


def _sane_record(r: object) -> None:
    assert isinstance(r, dp.RoundRecord) and r.z_eff > 0 and 1 <= r.sample <= r.population


def _fuzz(fn, *args, check=None):
    try:
        out = fn(*args)
    except ValueError:
        return
    if check is not None:
        check(out)


FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
SLOW_FUZZ = settings(max_examples=12, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow])


@given(GARBAGE, GARBAGE, GARBAGE, GARBAGE)
@FUZZ
def test_fuzz_cheap_functions(a, b, c, e):
    src = dp.NoiseSource.from_test_seed(0)
    _fuzz(dp.discrete_gaussian, src, a, 3)
    _fuzz(dp.discrete_gaussian, src, 1.0, a)
    _fuzz(dp.discrete_gaussian, a, 1.0, 3)
    _fuzz(dp.noise_tail, a, b, c, check=_sane_count)
    _fuzz(dp.device_noise_bound, a, b, c, check=_sane_count)
    _fuzz(dp.rounded_l2_bound, a, b, c, check=_sane_float)
    _fuzz(dp.ddg_tau, a, b, check=_sane_float)
    _fuzz(dp.ddg_rho, a, b, c, e, check=_sane_float)
    _fuzz(dp.effective_noise_multiplier, a, check=_sane_float)
    _fuzz(dp.sum_sensitivity, a, check=_sane_float)
    _fuzz(dp.redraw_delta, a, b, c, e, check=_sane_prob)
    _fuzz(dp.RoundRecord, a, b, c, check=_sane_record)
    _fuzz(dp.NoiseSource.from_test_seed, a)
    _fuzz(dp.conditional_round, np.array([0.5, 1.5]), a, src)
    _fuzz(dp.conditional_round, a, 10.0, src)
    _fuzz(dp.conditional_round, np.array([a, 0.5], dtype=object), 10.0, src)
    _fuzz(dp.device_noise, src, a, 3, c)
    _fuzz(dp.plan_sigma, a, b, c, 10, 10, 10, 1.0, 10, check=_sane_float)
    _fuzz(dp.plan_sigma, 1.0, DELTA, 10, 10, 10, a, b, c, check=_sane_float)
    _fuzz(dp.central_sigma, a, b, c, 10, 10, e, check=_sane_float)
    _fuzz(dp.dpsgd_epsilon, a, b, c, e, DELTA, check=_sane_epsilon)
    _fuzz(dp.dpsgd_epsilon, 1000, 10, 1, a, b, check=_sane_epsilon)
    led = dp.PrivacyLedger([(10, 10, 1.0)])
    _fuzz(led.epsilon, a, check=_sane_epsilon)
    _fuzz(led.epsilon_if, (10, 10, a), b, check=_sane_epsilon)
    _fuzz(led.epsilon_if, a, DELTA)
    _fuzz(dp.PrivacyLedger, a)
    _fuzz(dp.PrivacyLedger.from_state, [a, b])


@given(GARBAGE, GARBAGE, GARBAGE, GARBAGE, GARBAGE)
@SLOW_FUZZ
def test_fuzz_sampled_accounting(a, b, c, e, f):
    # sampled rounds (~0.3 s each) and DP-SGD searches are slow to account: fewer examples
    _fuzz(lambda *r: dp.PrivacyLedger([r]).epsilon(DELTA), a, b, c, check=_sane_epsilon)
    _fuzz(dp.round_record, a, b, c, e, f, 100, check=_sane_record)
    _fuzz(dp.dpsgd_noise_multiplier, a, b, 1000, 10, c, check=_sane_float)


@given(st.integers(1, 2**53), st.floats(0.0, 1.0), st.floats(1e-3, 1e15),
       st.floats(1e-300, 0.999))
@SLOW_FUZZ
def test_fuzz_valid_but_extreme_sampled_rounds(population, fraction, z, delta):
    # dp-accounting's sampling bound at odd sizes, multipliers and deltas: a number, never a crash
    sample = max(1, min(population, int(fraction * population)))
    _sane_epsilon(dp.PrivacyLedger([(population, sample, z)] * 3).epsilon(delta))
