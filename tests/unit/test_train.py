"""Local training, FedProx, and FedAvg's equivalence with centralized gradient descent."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from edge_agent.models import apply, init_params
from edge_agent.train import LocalTrainConfig, evaluate, local_seed, train_local
from global_aggregator.datasets import agent_dataset
from global_aggregator.simulation import SimConfig, initial_model, simulate


@pytest.fixture(scope="module")
def telemetry():
    flat, spec = init_params("mlp", 12, 4, seed=0)
    x, y, xt, yt = agent_dataset("telemetry", 0, 4, "iid", 1.0, seed=0)
    return spec, flat, x, y, xt, yt


def test_train_local_is_deterministic_per_seed(telemetry):
    spec, flat, x, y, _, _ = telemetry
    cfg = LocalTrainConfig(lr=0.1, epochs=2, batch_size=16)

    a, n, _ = train_local(spec, flat, x, y, cfg, seed=5)
    b, _, _ = train_local(spec, flat, x, y, cfg, seed=5)
    c, _, _ = train_local(spec, flat, x, y, cfg, seed=6)

    assert a.dtype == np.float32 and n == len(y)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_local_training_improves_the_model(telemetry):
    spec, flat, x, y, xt, yt = telemetry
    cfg = LocalTrainConfig(optimizer="momentum", lr=0.05, epochs=5, batch_size=16)

    delta, _, metrics = train_local(spec, flat, x, y, cfg, seed=0)

    before, after = evaluate(spec, flat, xt, yt), evaluate(spec, flat + delta, xt, yt)
    assert after["loss"] < before["loss"] and after["accuracy"] > before["accuracy"]
    assert metrics["steps"] == 5 * -(-len(y) // 16)


def test_full_batch_step_is_one_gradient_step(telemetry):
    spec, flat, x, y, _, _ = telemetry
    cfg = LocalTrainConfig(optimizer="sgd", lr=0.3, epochs=1, batch_size=0)

    delta, _, _ = train_local(spec, flat, x, y, cfg, seed=0)

    def loss(w):
        return optax.softmax_cross_entropy_with_integer_labels(apply(spec, w, x), y).mean()

    expected = -0.3 * np.asarray(jax.grad(loss)(jnp.asarray(flat)))
    np.testing.assert_allclose(delta, expected, atol=1e-6)


def test_local_seed_is_stable_and_distinct():
    assert local_seed(0, 1, "agent-000") == local_seed(0, 1, "agent-000")
    seeds = {local_seed(s, r, f"agent-{a:03d}") for s in (0, 1) for r in (1, 2) for a in range(5)}
    assert len(seeds) == 20 and all(0 <= s < 2**63 for s in seeds)


def test_fedprox_with_mu_zero_equals_fedavg_and_mu_pulls_towards_global(telemetry):
    spec, flat, x, y, _, _ = telemetry
    base = LocalTrainConfig(lr=0.1, epochs=3, batch_size=16)

    plain, _, _ = train_local(spec, flat, x, y, base, seed=1)
    mu0, _, _ = train_local(spec, flat, x, y, dataclasses.replace(base, prox_mu=0.0), seed=1)
    tiny, _, _ = train_local(spec, flat, x, y, dataclasses.replace(base, prox_mu=1e-7), seed=1)
    strong, _, _ = train_local(spec, flat, x, y, dataclasses.replace(base, prox_mu=5.0), seed=1)

    assert np.array_equal(plain, mu0)
    np.testing.assert_allclose(tiny, plain, atol=1e-5)
    assert np.linalg.norm(strong) < 0.8 * np.linalg.norm(plain)


def test_fedprox_first_step_has_zero_proximal_gradient(telemetry):
    # At w = w_global the proximal gradient mu * (w - w_global) vanishes: one step equals FedAvg's.
    spec, flat, x, y, _, _ = telemetry
    base = LocalTrainConfig(lr=0.1, epochs=1, batch_size=0)
    plain, _, _ = train_local(spec, flat, x, y, base, seed=1)
    prox, _, _ = train_local(spec, flat, x, y, dataclasses.replace(base, prox_mu=3.0), seed=1)
    np.testing.assert_allclose(prox, plain, atol=1e-7)


def test_fedavg_one_full_batch_step_equals_centralized_gradient_descent():
    # Float mode weights deltas by raw sample counts, so the FedAvg step is exactly the gradient
    # step on the union: sum_i n_i * grad_i / N = grad of the mean loss over all samples.
    cfg = SimConfig(
        task="telemetry", num_agents=6, num_regions=2, rounds=1, partition="quantity", alpha=0.5,
        seed=3, float_mode=True, federated_eval=False, strategy="fedavg",
        local=LocalTrainConfig(optimizer="sgd", lr=0.5, epochs=1, batch_size=0),
    )
    shards = [agent_dataset("telemetry", i, 6, "quantity", 0.5, seed=3) for i in range(6)]
    x = np.concatenate([s[0] for s in shards])
    y = np.concatenate([s[1] for s in shards])
    assert len({len(s[1]) for s in shards}) > 1  # unequal weights matter
    flat, spec = initial_model(cfg)

    result = simulate(cfg)

    def loss(w):
        return optax.softmax_cross_entropy_with_integer_labels(apply(spec, w, x), y).mean()

    expected = np.asarray(jnp.asarray(flat) - 0.5 * jax.grad(loss)(jnp.asarray(flat)))
    np.testing.assert_allclose(result.final_params, expected, atol=1e-6, rtol=0)
    assert not np.allclose(result.final_params, flat, atol=1e-3)


def test_nonsense_settings_are_refused():
    with pytest.raises(ValueError):
        LocalTrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError):
        LocalTrainConfig(lr=0.0)
    with pytest.raises(ValueError):
        SimConfig(clients_per_round=0.0)
