"""End-to-end simulation through the real codec, RegionalSum, GlobalRound and server step."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edge_agent.train import LocalTrainConfig
from global_aggregator.simulation import (
    BENCH_DIGITS,
    SimConfig,
    rounds_to_reach,
    sample_round,
    simulate,
)

SMALL = SimConfig(
    task="telemetry", num_agents=8, num_regions=2, rounds=3, partition="dirichlet", alpha=0.5,
    seed=11, encrypted=True, federated_eval=False, strategy="fedadam", server_lr=0.05,
    local=LocalTrainConfig(optimizer="sgd", lr=0.1, epochs=1, batch_size=16),
    clip_l2=2.0, clip_coord=0.1,
)


def test_same_seeds_give_bit_identical_models_run_after_run():
    # Two encrypted runs use fresh HE keys: ciphertexts differ, the decrypted sums cannot.
    a = simulate(SMALL)
    b = simulate(SMALL)

    assert a.final_params.dtype == np.float32
    assert np.array_equal(a.final_params, b.final_params)
    assert [e["accuracy"] for e in a.history] == [e["accuracy"] for e in b.history]


def test_encrypted_and_plaintext_codec_runs_are_bit_identical():
    # Exact integer sums: CKKS changes what crosses the wire, not what the model learns.
    enc = simulate(dataclasses.replace(SMALL, rounds=2))
    plain = simulate(dataclasses.replace(SMALL, rounds=2, encrypted=False))
    assert np.array_equal(enc.final_params, plain.final_params)
    assert enc.history[0]["bytes_up"] > plain.history[0]["bytes_up"]


def test_history_records_rounds_participants_bytes_and_timings():
    cfg = dataclasses.replace(SMALL, rounds=2, encrypted=False, clients_per_round=0.75,
                              dropout=0.3, federated_eval=True)
    seen = []

    result = simulate(cfg, progress=seen.append)

    assert seen == result.history and [e["round"] for e in seen] == [1, 2]
    for e in result.history:
        sampled, delivering = sample_round(cfg, e["round"])
        assert e["sampled"] == len(sampled) == 6 and e["participants"] == len(delivering)
        assert 0 <= e["accuracy"] <= 1 and 0 <= e["fed_accuracy"] <= 1
        assert set(e["timings"]) == {"train", "encode", "regional_sum", "global_decode", "server_step"}
        assert (e["bytes_up"] > 0) == (e["participants"] > 0)


def test_client_sampling_and_dropout_are_seeded():
    cfg = dataclasses.replace(SMALL, clients_per_round=0.5, dropout=0.5)
    draws = [sample_round(cfg, r) for r in range(1, 30)]
    assert draws == [sample_round(cfg, r) for r in range(1, 30)]
    assert all(len(s) == 4 and set(d) <= set(s) for s, d in draws)
    assert any(len(d) < len(s) for s, d in draws) and len({tuple(s) for s, _ in draws}) > 1


@pytest.mark.slow
def test_encrypted_8bit_matches_plaintext_float32_on_non_iid_digits():
    # Digits, Dirichlet(0.5) label skew, 20 agents in 4 regions: the bench's configuration.
    cfg = SimConfig(**BENCH_DIGITS, seed=0, federated_eval=False)
    reference = simulate(dataclasses.replace(cfg, float_mode=True, encrypted=False))
    encrypted = simulate(dataclasses.replace(cfg, encrypted=True, bits=8))

    ref_acc = reference.history[-1]["accuracy"]
    enc_acc = encrypted.history[-1]["accuracy"]
    assert ref_acc >= 0.90 and enc_acc >= 0.90
    assert abs(enc_acc - ref_acc) <= 0.01
    assert rounds_to_reach(encrypted.history, 0.9) is not None


def test_service_selects_the_agents_the_simulation_samples():
    from global_aggregator.sampling import select_agents
    from global_aggregator.simulation import agent_id

    cfg = SimConfig(num_agents=12, clients_per_round=0.5, dropout=0.3)
    fleet = [agent_id(i) for i in range(12)]
    for r in range(1, 6):
        sampled, _ = sample_round(cfg, r)
        assert select_agents(fleet[::-1], 0.5, cfg.seed, r) == [agent_id(i) for i in sampled]
