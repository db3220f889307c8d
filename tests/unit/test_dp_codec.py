"""Distributed DP in the codec and at the global: noisy updates still sum exactly, the noise is
the device's own, and the epsilon the global reports is dp-accounting's for the same rounds."""

from __future__ import annotations

import math
from dataclasses import replace

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from global_aggregator.privacy import PrivacyPlan
from schemas import dp
from schemas import fedstream_pb2 as pb
from schemas.codec import Codec, CodecParams, update_seed
from schemas.errors import InvalidMessage
from schemas.he import HEContext, generate_keys
from schemas.plan import dp_l2_bound, dp_noise_bound
from schemas.settings import PrivacySettings

D = 8_000


@pytest.fixture(scope="module")
def keys():
    secret, public = generate_keys()
    return HEContext.from_bytes(secret), HEContext.from_bytes(public)


def noisy(bits: int = 3, summands: int = 16, sigma: float = 20.0, d: int = D,
          **kw) -> CodecParams:
    return CodecParams(bits=bits, max_summands=summands, dp_sigma=sigma,
                       dp_bound=dp_noise_bound(sigma, d), weight_cap=1, **kw)


@pytest.mark.parametrize("bits,summands,sigma", [(3, 16, 20.0), (4, 16, 60.0), (8, 64, 300.0),
                                                 (3, 64, 5.0)])
def test_noisy_sums_decode_exactly_with_every_lane_at_its_bound(keys, bits, summands, sigma):
    # Prepare: every value at +-qmax in every update, and noise that brings each lane sum to
    # exactly the planner's bound (signal and noise with the same sign): the largest sum an
    # honest round can make
    sk, pk = keys
    params = noisy(bits, summands, sigma, clip_l2=1e6, rotate=False)
    enc = Codec(params, 4096 * 2 - 2, pk)
    dec = Codec(params, enc.num_params, sk)
    qmax, tail = 2 ** (bits - 1) - 1, params.noise_tail(summands)
    assert 0 < tail <= summands * params.dp_bound
    sign = np.where(np.arange(enc.num_params) % 5 < 2, -1, 1)
    share = [tail // summands + (1 if i < tail % summands else 0) for i in range(summands)]
    assert sum(share) == tail and max(share) <= params.dp_bound
    acc, expected = enc.accumulator(), np.zeros(enc.num_params, np.int64)
    for i in range(summands):
        q = sign * (qmax + share[i])
        expected += q
        acc.add_payloads(enc.encode_quantized(q, 1))

    # Execute
    out, w = dec.decode(acc.payloads())

    # Assert
    assert np.array_equal(out, expected)
    assert int(np.abs(out).max()) == params.lane_max(summands) == summands * qmax + tail
    assert w == summands


def test_noisy_updates_of_a_planned_round_sum_bit_for_bit(keys):
    # Prepare: a round planned for epsilon 8 (100 of 1,000 devices, 30 rounds), 12 devices
    sk, pk = keys
    plan = PrivacyPlan.make(PrivacySettings(mode="distributed", epsilon=8.0),
                            CodecParams(max_summands=16), D, rounds=30, population=1000,
                            sample=100)
    params = plan.codec_params(CodecParams(max_summands=16))
    enc, dec = Codec(params, D, pk), Codec(params, D, sk)
    rng = np.random.default_rng(3)
    acc, qsum = enc.accumulator(), np.zeros(D, np.int64)
    noises = []
    for i in range(12):
        delta = rng.normal(0, 0.02, D)
        seed = update_seed(1, 1, f"agent-{i}")
        q = enc.quantize_update(delta, 100, seed, dp.NoiseSource.from_test_seed(i))
        plain = replace(params, dp_sigma=0.0, dp_bound=0, encrypted=False)
        clean = Codec(plain, D).quantize_update(delta, 100, seed)
        noises.append(q - clean)
        qsum += q
        acc.add_payloads(enc.encode_quantized(q, 1))

    # Execute
    out, w = dec.decode(acc.payloads())

    # Assert: exact, and the noise is the planned discrete Gaussian, within its bound
    assert np.array_equal(out, qsum) and w == 12
    z = np.concatenate(noises)
    assert np.abs(z).max() <= params.dp_bound
    assert abs(z.std() / params.dp_sigma - 1) < 0.02 and abs(z.mean()) < 0.05 * params.dp_sigma


def test_rounding_is_conditioned_on_the_sensitivity_bound():
    # Prepare: a delta at the L2 clip (all of it on the clipped sphere)
    params = noisy(bits=3, sigma=10.0, encrypted=False)
    codec = Codec(params, D)
    delta = np.full(D, 1.0 / math.sqrt(D))
    bound = dp_l2_bound(params, D)
    clean = Codec(replace(params, dp_sigma=0.0, dp_bound=0), D)

    # Execute / Assert: the conditioned rounding stays within the bound the accountant uses
    for seed in range(20):
        q_noisy = codec.quantize_update(delta, 1, seed, dp.NoiseSource.from_test_seed(seed))
        z = dp.device_noise(dp.NoiseSource.from_test_seed(seed), params.dp_sigma, D, 1e-12)
        assert float(np.linalg.norm(q_noisy - z)) <= bound
    assert float(np.linalg.norm(clean.quantize_update(delta, 1, 0))) < bound


def test_a_noisy_round_refuses_an_update_without_the_devices_own_noise():
    codec = Codec(noisy(encrypted=False), D)
    with pytest.raises(InvalidMessage) as e:
        codec.quantize_update(np.zeros(D), 1, 0)
    assert e.value.reason == "bad_params"
    # and the secure sources of two devices never add the same noise
    a = codec.quantize_update(np.zeros(D), 1, 0, dp.NoiseSource.secure())
    b = codec.quantize_update(np.zeros(D), 1, 0, dp.NoiseSource.secure())
    assert not np.array_equal(a, b)


def test_a_round_task_with_a_noise_bound_below_the_noise_is_refused():
    params = replace(noisy(sigma=50.0, encrypted=False), dp_bound=10)
    with pytest.raises(InvalidMessage) as e:
        Codec(params, D).quantize_update(np.zeros(D), 1, 0, dp.NoiseSource.from_test_seed(1))
    assert e.value.reason == "bad_params"


@pytest.mark.parametrize("kw", [{"dp_sigma": 1.0}, {"dp_bound": 5}, {"dp_sigma": -1.0,
                                "dp_bound": 5}, {"dp_sigma": float("nan"), "dp_bound": 5},
                                {"dp_sigma": 1.0, "dp_bound": 2**25}])
def test_bad_noise_params_are_refused(kw):
    with pytest.raises(InvalidMessage):
        CodecParams(**kw)


def _direct_epsilon(rounds: list[pb.PrivacyRound], delta: float,
                    amplified: bool = False) -> float:
    """dp-accounting alone. Unamplified: every round a Gaussian. Amplified: also sampling without
    replacement, the smaller of the two (both are valid bounds)."""
    rel = dp_accounting.NeighboringRelation.REPLACE_ONE
    wor, plain = RdpAccountant(neighboring_relation=rel), RdpAccountant(neighboring_relation=rel)
    for r in rounds:
        g = dp_accounting.GaussianDpEvent(r.noise_multiplier)
        wor.compose(dp_accounting.SampledWithoutReplacementDpEvent(r.population, r.sample, g))
        plain.compose(g)
    return min(wor.get_epsilon(delta), plain.get_epsilon(delta)) if amplified \
        else plain.get_epsilon(delta)


def test_the_plan_meets_its_target_and_the_ledger_is_dp_accountings():
    # Prepare: epsilon 4 over 5 rounds of 50 of 500 devices
    settings = PrivacySettings(mode="distributed", epsilon=4.0, delta=1e-5)
    plan = PrivacyPlan.make(settings, CodecParams(), 2_000, rounds=5, population=500,
                            sample=50)

    # Execute: five rounds at n_min, then one with 10 devices short
    spent = None
    for _ in range(5):
        spent = plan.account(spent, 500, 50, [50])
    assert spent is not None
    short = plan.account(spent, 500, 50, [40])

    # Assert
    assert spent.epsilon == pytest.approx(_direct_epsilon(list(spent.rounds), 1e-5), rel=1e-9)
    assert 3.9 < spent.epsilon <= 4.0
    assert spent.epsilon_amplified == pytest.approx(
        _direct_epsilon(list(spent.rounds), 1e-5, amplified=True), rel=1e-9)
    assert spent.epsilon_amplified < spent.epsilon  # 50 of 500: sampling would help
    assert not plan.may_run_another(spent, 500, 50)  # a sixth round would exceed 4
    assert plan.may_run_another(plan.account(None, 500, 50, [50]), 500, 50)
    # fewer devices than n_min: less noise, a larger epsilon reported for that round
    assert short.rounds[-1].contributors == 40
    assert short.rounds[-1].noise_multiplier < spent.rounds[-1].noise_multiplier
    assert short.epsilon == pytest.approx(_direct_epsilon(list(short.rounds), 1e-5), rel=1e-9)
    # a round whose total failed its bounds: the smallest decrypted part binds
    narrowed = plan.account(None, 500, 50, [50, 30, 20, 10])
    assert [r.contributors for r in narrowed.rounds] == [10]
    assert narrowed.delta_with_redraws >= 1e-5


def test_a_noise_multiplier_setting_reports_epsilon_without_a_budget():
    settings = PrivacySettings(mode="distributed", noise_multiplier=1.0)
    plan = PrivacyPlan.make(settings, CodecParams(), 2_000, rounds=5, population=500,
                            sample=50)
    assert plan.budget is None
    assert plan.sigma_device == pytest.approx(plan.sensitivity / math.sqrt(50))
    spent = plan.account(None, 500, 50, [50])
    assert plan.may_run_another(spent, 500, 50)
    assert spent.epsilon == pytest.approx(_direct_epsilon(list(spent.rounds), 1e-5), rel=1e-9)
    # ~ the Gaussian's own: the DDG's correction is negligible at this sigma
    assert spent.rounds[0].noise_multiplier == pytest.approx(1.0, rel=1e-3)
