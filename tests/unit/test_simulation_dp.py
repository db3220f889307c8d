"""Distributed and central differential privacy in the in-process simulation."""

from __future__ import annotations

import dataclasses
import math

import dp_accounting
import numpy as np
import pytest

from edge_agent.models import init_flat
from edge_agent.train import LocalTrainConfig, local_seed, train_local
from global_aggregator.simulation import (
    SimConfig,
    _dp_encode,
    builtin_setup,
    central_noise_std,
    noise_seed,
    privacy_plan,
    sample_round,
    simulate,
)
from schemas import dp
from schemas.codec import Codec, update_seed
from schemas.plan import NOISE_REDRAW_PROB
from schemas.settings import FederationSettings

TINY = SimConfig(
    task="telemetry", num_agents=8, num_regions=2, rounds=3, seed=5, encrypted=False,
    federated_eval=False, strategy="fedavg", server_lr=1.0, bits=6, clip_l2=1.0,
    clip_coord=0.1, local=LocalTrainConfig(optimizer="sgd", lr=0.1, epochs=1, batch_size=16),
)
DIST = dataclasses.replace(TINY, privacy="distributed", privacy_epsilon=8.0)
CENTRAL = dataclasses.replace(DIST, privacy="central")


def _releases(cfg: SimConfig) -> tuple[list, dict[int, tuple[np.ndarray, np.ndarray]]]:
    seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    result = simulate(cfg, on_release=lambda r, dec, rel: seen.__setitem__(r, (dec, rel)))
    return result.history, seen


def _device_updates(cfg: SimConfig, round_id: int, params: np.ndarray, *, noise: bool
                    ) -> list[np.ndarray]:
    """Every device's quantized update of a round, recomputed from scratch: local training with
    the simulation's seed, the round's noisy codec with the device's test noise seed; without
    ``noise``, the same update minus the device's regenerated noise."""
    setup = builtin_setup(cfg)
    plan = privacy_plan(cfg, setup.spec.num_params)
    assert plan is not None
    codec = Codec(plan.codec_params(cfg.codec_params().for_round(cfg.seed, round_id)),
                  setup.spec.num_params)
    out = []
    for i in sample_round(cfg, round_id)[1]:
        aid, shard = setup.devices[i], setup.data[i]
        assert shard is not None
        x, y, _, _ = shard
        delta, n, _ = train_local(setup.spec, params, x, y, cfg.local,
                                  local_seed(cfg.seed, round_id, aid))
        seed = noise_seed(cfg.seed, round_id, aid)
        q = codec.quantize_update(delta, n, update_seed(cfg.seed, round_id, aid),
                                  dp.NoiseSource.from_test_seed(seed))
        if not noise:
            q = q - dp.device_noise(dp.NoiseSource.from_test_seed(seed), plan.sigma_device,
                                    q.shape[0], NOISE_REDRAW_PROB)
        out.append(q)
    return out


def test_distributed_sums_are_the_sums_of_the_devices_noisy_updates():
    cfg = dataclasses.replace(DIST, rounds=2, privacy_epsilon=None, privacy_noise_multiplier=1.0)
    _, seen = _releases(cfg)
    first = simulate(dataclasses.replace(cfg, rounds=1))  # its plan does not depend on rounds
    setup = builtin_setup(cfg)
    plan = privacy_plan(cfg, setup.spec.num_params)
    assert plan is not None and plan.sigma_device > 1
    for r, params in ((1, init_flat(setup.spec, cfg.seed)), (2, first.final_params)):
        decoded, released = seen[r]
        noisy = _device_updates(cfg, r, params, noise=True)
        clean = _device_updates(cfg, r, params, noise=False)
        assert len(noisy) == 8
        assert np.array_equal(decoded, np.sum(noisy, axis=0))
        assert np.array_equal(released, decoded)          # nobody adds anything after decryption
        # the devices' noise is really in there: 8 shares of sigma_device each
        total = (decoded - np.sum(clean, axis=0)).astype(np.float64)
        assert abs(total.std() / (math.sqrt(8) * plan.sigma_device) - 1) < 0.05
        assert all(float(np.linalg.norm(q)) <= plan.device_l2 for q in clean)


def test_encrypted_distributed_run_equals_the_plaintext_one_bit_for_bit():
    plain = simulate(dataclasses.replace(DIST, rounds=2))
    enc = simulate(dataclasses.replace(DIST, rounds=2, encrypted=True))
    assert np.array_equal(plain.final_params, enc.final_params)


def test_central_adds_the_planned_noise_once_to_the_clean_sum():
    history, seen = _releases(CENTRAL)
    setup = builtin_setup(CENTRAL)
    plan = privacy_plan(CENTRAL, setup.spec.num_params)
    assert plan is not None and plan.n_min == 8
    # the devices send their conditionally rounded updates without noise ...
    params = init_flat(setup.spec, CENTRAL.seed)
    assert np.array_equal(seen[1][0], np.sum(_device_updates(CENTRAL, 1, params, noise=False),
                                             axis=0))
    # ... and the server adds N_Z(0, n_min sigma_device**2) once per round
    noise = np.concatenate([rel - dec for dec, rel in seen.values()]).astype(np.float64)
    assert len(seen) == len(history) == 3
    std = central_noise_std(plan)
    assert std == pytest.approx(math.sqrt(8) * plan.sigma_device)
    assert abs(noise.std() / std - 1) < 0.03          # ~16,000 draws: 3 % is > 5 sigma
    assert abs(noise.mean()) < 5 * std / math.sqrt(noise.size)
    assert not np.array_equal(seen[1][1] - seen[1][0], seen[2][1] - seen[2][0])
    # distributed and central account the same epsilons: only who adds the noise differs
    dist, _ = _releases(DIST)
    assert [e["epsilon"] for e in history] == [e["epsilon"] for e in dist]


def test_central_rounds_exactly_like_the_noisy_codec():
    # central's payload holds the noisy codec's update minus exactly the device's noise: both
    # modes round with the same Codec.round_update (at two clips)
    setup = builtin_setup(CENTRAL)
    d = setup.spec.num_params
    plan = privacy_plan(CENTRAL, d)
    assert plan is not None
    noisy = plan.codec_params(CENTRAL.codec_params().for_round(CENTRAL.seed, 1))
    codec = Codec(dataclasses.replace(noisy, dp_sigma=0.0, dp_bound=0), d)
    assert setup.data[0] is not None
    x, y, _, _ = setup.data[0]
    delta, n, _ = train_local(setup.spec, init_flat(setup.spec, CENTRAL.seed), x, y,
                              CENTRAL.local, 1)
    useed, nseed = update_seed(CENTRAL.seed, 1, "agent-000"), noise_seed(CENTRAL.seed, 1,
                                                                          "agent-000")
    for params in (noisy, dataclasses.replace(noisy, clip_l2=noisy.clip_l2 * 4)):
        with_noise = Codec(params, d).quantize_update(delta, n, useed,
                                                      dp.NoiseSource.from_test_seed(nseed))
        noise = dp.device_noise(dp.NoiseSource.from_test_seed(nseed), params.dp_sigma, d,
                                NOISE_REDRAW_PROB)
        rounded = Codec(params, d).round_update(delta, n, useed)
        assert np.array_equal(rounded, with_noise - noise)
    # ... and that is what a central-mode device sends
    payload = _dp_encode(CENTRAL, codec, Codec(noisy, d), delta, n, 1, "agent-000")
    assert payload == codec.encode_quantized(Codec(noisy, d).round_update(delta, n, useed),
                                             codec.weight(n))


def _dp_accounting_epsilon(z: float, rounds: int, delta: float) -> float:
    acc = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.GaussianDpEvent(z), rounds)
    return float(acc.get_epsilon(delta))


def test_epsilon_in_the_history_is_what_dp_accounting_computes():
    history, _ = _releases(DIST)
    d = builtin_setup(DIST).spec.num_params
    plan = privacy_plan(DIST, d)
    assert plan is not None
    z = dp.round_record(8, 8, 8, plan.sigma_device, plan.sensitivity, d).z_eff
    eps = [e["epsilon"] for e in history]
    for r, e in enumerate(eps, start=1):
        assert e == pytest.approx(_dp_accounting_epsilon(z, r, 1e-5), rel=1e-9)
        ledger = dp.PrivacyLedger([(8, 8, z)] * r)
        assert e == pytest.approx(ledger.epsilon(1e-5, amplified=False), rel=1e-12)
    assert eps == sorted(eps) and 7.9 < eps[-1] <= 8.0


def test_fewer_devices_than_n_min_report_their_larger_epsilon_and_the_run_stops():
    cfg = dataclasses.replace(DIST, rounds=6, dropout=0.4)
    history = simulate(cfg).history
    d = builtin_setup(cfg).spec.num_params
    plan = privacy_plan(cfg, d)
    assert plan is not None
    z = [dp.round_record(8, 8, max(1, e["participants"]), plan.sigma_device, plan.sensitivity,
                         d).z_eff for e in history if e["participants"]]
    assert any(e["participants"] < 8 for e in history)
    assert history[-1]["epsilon"] == pytest.approx(
        dp.PrivacyLedger([(8, 8, x) for x in z]).epsilon(1e-5, amplified=False), rel=1e-12)
    # as the global: a round starts only if one more at n_min devices stays within the budget;
    # this one had fewer, its epsilon is reported as it is, and the run stops after it
    assert len(history) < cfg.rounds
    assert all(e["epsilon"] <= 8.0 for e in history[:-1])
    spent = None
    for e in history:
        spent = plan.account(spent, 8, 8, [e["participants"]] if e["participants"] else [])
        assert spent.epsilon == e["epsilon"]
        assert plan.may_run_another(spent, 8, 8) == (e is not history[-1])


def test_epsilon_inf_and_privacy_off_leave_the_run_unchanged():
    ref = simulate(TINY)
    for cfg in (dataclasses.replace(TINY, privacy="off", privacy_epsilon=8.0),
                dataclasses.replace(DIST, privacy_epsilon=math.inf),
                dataclasses.replace(CENTRAL, privacy_epsilon=math.inf)):
        run = simulate(cfg)
        assert np.array_equal(run.final_params, ref.final_params)
        assert [e["accuracy"] for e in run.history] == [e["accuracy"] for e in ref.history]
        assert all(e.get("epsilon", math.inf) == math.inf for e in run.history)
    assert "epsilon" not in ref.history[0]


def test_privacy_settings_are_validated_and_taken_from_a_federation():
    with pytest.raises(ValueError, match="privacy must be"):
        dataclasses.replace(TINY, privacy="example")
    with pytest.raises(ValueError, match="float_mode"):
        dataclasses.replace(DIST, float_mode=True)
    with pytest.raises(ValueError):  # neither epsilon nor a noise multiplier
        dataclasses.replace(TINY, privacy="distributed")
    fed = FederationSettings.model_validate(
        {"privacy": {"mode": "distributed", "epsilon": 4.0, "delta": 1e-6, "n_min": 5}})
    cfg = SimConfig.from_settings(fed, num_agents=8)
    assert (cfg.privacy, cfg.privacy_epsilon, cfg.privacy_delta, cfg.privacy_n_min) == \
        ("distributed", 4.0, 1e-6, 5)
    assert SimConfig.from_settings(FederationSettings(), num_agents=8).privacy == "off"
