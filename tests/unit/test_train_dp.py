"""DP-SGD local training (``LocalTrainConfig.dp_clip > 0``), checked against an independent
per-example reference: one ``jax.grad`` per example in a Python loop, clipped with numpy."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent import train
from edge_agent.models import apply, init_flat, model_spec
from edge_agent.train import LocalTrainConfig, evaluate, new_dp_seed, train_local

FEATURES, CLASSES = 4, 2


@pytest.fixture(scope="module")
def spec():
    # A small MLP (130 parameters) keeps every compile and reference loop fast.
    return model_spec("edge_agent.models:mlp", FEATURES,
                      {"input_shape": (FEATURES,), "num_classes": CLASSES, "hidden": 8})


@pytest.fixture(scope="module")
def flat(spec):
    return init_flat(spec, seed=0)


def blobs(n: int, seed: int = 0, sep: float = 2.0):
    """Two linearly separable Gaussian blobs."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, FEATURES)).astype(np.float32) * 0.5
    x[:, 0] += np.where(y == 1, sep, -sep)
    return x, y.astype(np.int32)


@functools.lru_cache
def _example_grad(spec):
    def loss(p, xi, yi):
        return optax.softmax_cross_entropy_with_integer_labels(apply(spec, p, xi[None]), yi[None])[0]

    return jax.jit(jax.grad(loss))


def example_grads(spec, w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example gradients, one plain ``jax.grad`` call per example (no vmap)."""
    grad = _example_grad(spec)
    return np.stack([np.asarray(grad(jnp.asarray(w), x[i], y[i]), np.float64)
                     for i in range(len(y))])


def clip(g: np.ndarray, c: float) -> np.ndarray:
    norms = np.linalg.norm(g, axis=1, keepdims=True)
    return g * np.minimum(1.0, c / np.maximum(norms, 1e-30))


def dp(**kw: Any) -> LocalTrainConfig:
    base: dict[str, Any] = {"optimizer": "sgd", "lr": 0.5, "epochs": 1, "batch_size": 16, "dp_clip": 1.0}
    return LocalTrainConfig(**(base | kw))


def test_noise_free_steps_are_the_mean_of_clipped_per_example_gradients(spec, flat):
    # n = 10 < batch 16: every step takes all 10 examples (q = 1) in a chunk padded with 6 rows
    # (copies of example 0). The mean is over the 10 real ones: the padding adds nothing.
    x, y = blobs(10)
    c, lr = 2.0, 0.5
    delta, n, metrics = train_local(spec, flat, x, y, dp(lr=lr, dp_clip=c, epochs=3), seed=1,
                                    dp_seed=7)

    w = flat.astype(np.float64)
    norms = []
    for _ in range(3):
        g = example_grads(spec, w.astype(np.float32), x, y)
        norms.append(np.linalg.norm(g, axis=1))
        w = w - lr * clip(g, c).mean(axis=0)
    np.testing.assert_allclose(delta, w - flat, atol=2e-6, rtol=0)
    assert n == 10 and metrics["dp_steps"] == 3 and metrics["dp_sample_rate"] == 1.0
    all_norms = np.concatenate(norms)
    assert (all_norms > c).any() and (all_norms < c).any()  # the clip is active, not everywhere
    assert metrics["dp_clipped_fraction"] == pytest.approx(np.mean(all_norms > c))


def test_poisson_batches_over_several_chunks_and_fedprox_match_the_reference(
        spec, flat, monkeypatch):
    # q = 2/24: the sampled batches vary in size, some overflow the 2-row chunk (accumulated over
    # two or three chunks, nothing truncated), some are empty (noise-only steps). The FedProx
    # gradient is added after the aggregation, unclipped.
    x, y = blobs(24, seed=1)
    c, lr, mu, bs = 1.0, 0.4, 0.5, 2
    drawn: list[np.ndarray] = []
    real = train._poisson_sample

    def spy(n, rate, rng):
        idx = real(n, rate, rng)
        drawn.append(idx)
        return idx

    monkeypatch.setattr(train, "_poisson_sample", spy)
    cfg = dp(lr=lr, dp_clip=c, batch_size=bs, epochs=2, prox_mu=mu)
    delta, _, metrics = train_local(spec, flat, x, y, cfg, seed=2, dp_seed=11)

    sizes = [len(i) for i in drawn]
    assert len(drawn) == metrics["dp_steps"] == 2 * 12
    assert metrics["dp_sample_rate"] == pytest.approx(2 / 24)
    assert max(sizes) > bs and min(sizes) == 0, sizes  # multi-chunk and empty steps both occur
    w = flat.astype(np.float64)
    for idx in drawn:
        g = example_grads(spec, w.astype(np.float32), x[idx], y[idx]) if len(idx) else np.zeros(
            (0, w.size))
        w = w - lr * (clip(g, c).sum(axis=0) / bs + mu * (w - flat))
    np.testing.assert_allclose(delta, w - flat, atol=2e-6, rtol=0)


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_the_configured_optimizer_applies_the_privatized_gradient(spec, flat, optimizer):
    x, y = blobs(8, seed=2)
    c, lr = 0.5, 0.05
    delta, _, _ = train_local(spec, flat, x, y, dp(optimizer=optimizer, lr=lr, dp_clip=c, epochs=3,
                                                   batch_size=8), seed=0, dp_seed=1)
    opt = optax.sgd(lr, momentum=0.9) if optimizer == "momentum" else optax.adam(lr)
    w = jnp.asarray(flat)
    state = opt.init(w)
    for _ in range(3):
        grad = clip(example_grads(spec, np.asarray(w), x, y), c).mean(axis=0)
        updates, state = opt.update(jnp.asarray(grad, jnp.float32), state, w)
        w = optax.apply_updates(w, updates)
    np.testing.assert_allclose(delta, np.asarray(w) - flat, atol=1e-5, rtol=0)


def test_the_clip_bounds_one_examples_influence(spec, flat):
    x, y = blobs(8, seed=3)
    outlier = x.copy()
    outlier[5] *= 1e3  # a huge loss and gradient
    y_out = y.copy()
    y_out[5] = 1 - y[5]
    c, lr, bs = 1.0, 0.3, 8

    # Noise off: the outlier's part of the step is exactly lr * C / B, however huge its gradient.
    d_out, _, _ = train_local(spec, flat, outlier, y_out, dp(lr=lr, dp_clip=c, batch_size=bs),
                              seed=0, dp_seed=3)
    others = np.delete(np.arange(8), 5)
    g = example_grads(spec, flat, outlier, y_out)
    assert np.linalg.norm(g[5]) > 100 * c
    rest = -lr * clip(g[others], c).sum(axis=0) / bs
    assert np.linalg.norm(d_out - rest) == pytest.approx(lr * c / bs, rel=1e-4)

    # Noise on (same noise seed): replacing the outlier by a normal example moves the step by at
    # most 2 * lr * C / B; without DP the outlier drags the model far away.
    noisy = dp(lr=lr, dp_clip=c, batch_size=bs, dp_noise_multiplier=1.0)
    a, _, _ = train_local(spec, flat, outlier, y_out, noisy, seed=0, dp_seed=3)
    b, _, _ = train_local(spec, flat, x, y, noisy, seed=0, dp_seed=3)
    assert np.linalg.norm(a - b) <= 2 * lr * c / bs + 1e-6
    plain = dataclasses.replace(noisy, dp_clip=0.0, dp_noise_multiplier=0.0)
    pa, _, _ = train_local(spec, flat, outlier, y_out, plain, seed=0)
    pb, _, _ = train_local(spec, flat, x, y, plain, seed=0)
    assert np.linalg.norm(pa - pb) > 20 * 2 * lr * c / bs


def test_noise_std_is_noise_multiplier_times_clip_over_batch(spec, flat):
    # One full step (q = 1, so no sampling randomness): delta(seed) - delta(no noise) is exactly
    # -lr * N(0, (sigma C)^2) / B on every coordinate.
    x, y = blobs(8, seed=4)
    c, sigma, lr, bs = 0.5, 1.3, 1.0, 8
    base, _, _ = train_local(spec, flat, x, y, dp(lr=lr, dp_clip=c, batch_size=bs), seed=0,
                             dp_seed=0)
    noisy = dp(lr=lr, dp_clip=c, batch_size=bs, dp_noise_multiplier=sigma)
    samples = np.stack([
        (train_local(spec, flat, x, y, noisy, seed=0, dp_seed=s)[0] - base) / -lr
        for s in range(40)])  # 40 x 130 draws
    expected = sigma * c / bs
    assert samples.std() == pytest.approx(expected, rel=0.05)
    assert abs(samples.mean()) < 4 * expected / math.sqrt(samples.size)
    corr = np.corrcoef(samples)[np.triu_indices(len(samples), 1)]
    assert np.abs(corr).max() < 0.45  # independent draws per seed (|r| ~ 1/sqrt(130))


def test_noise_is_reproducible_per_dp_seed_and_not_from_the_federation_seed(spec, flat):
    x, y = blobs(32, seed=5)
    cfg = dp(batch_size=8, epochs=2, dp_noise_multiplier=1.0)
    a, _, _ = train_local(spec, flat, x, y, cfg, seed=9, dp_seed=123)
    b, _, _ = train_local(spec, flat, x, y, cfg, seed=9, dp_seed=123)
    c, _, _ = train_local(spec, flat, x, y, cfg, seed=9, dp_seed=124)
    d, _, _ = train_local(spec, flat, x, y, cfg, seed=9, dp_seed=new_dp_seed())
    assert np.array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, d)
    assert new_dp_seed() != new_dp_seed()

    with pytest.raises(ValueError, match="dp_seed"):
        train_local(spec, flat, x, y, cfg, seed=9)
    for bad in (-1, True, 1.5, "7"):
        with pytest.raises(ValueError, match="dp_seed"):
            train_local(spec, flat, x, y, cfg, seed=9, dp_seed=bad)  # type: ignore[arg-type]


def test_without_dp_the_dp_seed_changes_nothing(spec, flat):
    x, y = blobs(20, seed=6)
    cfg = LocalTrainConfig(optimizer="momentum", lr=0.1, epochs=2, batch_size=8)
    a, _, ma = train_local(spec, flat, x, y, cfg, seed=4)
    b, _, mb = train_local(spec, flat, x, y, cfg, seed=4, dp_seed=99)
    assert np.array_equal(a, b) and ma == mb and "dp_steps" not in ma


def test_poisson_sampling_rate():
    rng = np.random.default_rng(0)
    draws = [train._poisson_sample(50, 0.2, rng) for _ in range(2000)]
    sizes = np.array([len(d) for d in draws])
    hits = np.bincount(np.concatenate(draws), minlength=50) / len(draws)
    assert sizes.mean() == pytest.approx(10, abs=0.2) and sizes.var() == pytest.approx(8, rel=0.15)
    assert np.abs(hits - 0.2).max() < 0.05
    assert np.array_equal(train._poisson_sample(7, 1.0, rng), np.arange(7))


def test_dp_training_still_learns(spec, flat):
    x, y = blobs(128, seed=7, sep=1.5)
    xt, yt = blobs(200, seed=8, sep=1.5)
    cfg = dp(optimizer="momentum", lr=0.1, batch_size=32, epochs=8, dp_clip=1.0,
             dp_noise_multiplier=1.0)
    delta, _, metrics = train_local(spec, flat, x, y, cfg, seed=0, dp_seed=2024)
    before, after = evaluate(spec, flat, xt, yt), evaluate(spec, flat + delta, xt, yt)
    assert after["loss"] < 0.25 * before["loss"] and after["accuracy"] >= 0.95, (before, after)
    assert metrics["dp_steps"] == 8 * 4 and metrics["dp_sample_rate"] == 0.25


finite = st.floats(min_value=0, max_value=1e6, allow_nan=False)
anything = st.one_of(finite, st.floats(), st.sampled_from([0.0, -0.0, math.inf, -1.0, math.nan]))


@settings(max_examples=80, deadline=None)
@given(clip_=anything, noise=anything)
def test_dp_settings_are_validated(clip_, noise):
    valid = (math.isfinite(clip_) and clip_ >= 0 and math.isfinite(noise) and noise >= 0
             and (noise == 0 or clip_ > 0))
    if valid:
        cfg = LocalTrainConfig(dp_clip=clip_, dp_noise_multiplier=noise)
        assert cfg.dp == (clip_ > 0)
    else:
        with pytest.raises(ValueError, match="dp_"):
            LocalTrainConfig(dp_clip=clip_, dp_noise_multiplier=noise)


def test_dp_settings_of_the_wrong_type_are_refused():
    for kw in ({"dp_clip": True}, {"dp_clip": "1"}, {"dp_noise_multiplier": None}):
        with pytest.raises(ValueError, match="dp_"):
            LocalTrainConfig(**kw)  # type: ignore[arg-type]
    assert not LocalTrainConfig().dp
