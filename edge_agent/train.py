"""Local training on an edge agent: a few epochs of optax minibatch descent from the global model.

The result is the model *delta* ``local - global`` (float32), which is what the codec clips,
quantizes and encrypts. With ``prox_mu > 0`` the local objective gains the FedProx proximal term
``mu/2 * ||w - w_global||^2`` (Li et al., 2020, "Federated Optimization in Heterogeneous
Networks"), which keeps heterogeneous clients close to the global model.

Determinism: batch order comes from ``numpy.random.default_rng(seed)``; every step runs one jitted
function on a fixed-size (padded, masked) batch, so the same ``(global, data, cfg, seed)`` gives
the same delta bit for bit, and one compilation serves agents of every shard size.

Example:
    >>> cfg = LocalTrainConfig(lr=0.1, epochs=2, batch_size=16)
    >>> delta, n, metrics = train_local(spec, flat, x, y, cfg, seed=local_seed(0, 1, "agent-000"))
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from edge_agent.models import ModelSpec, apply

OPTIMIZERS = ("sgd", "momentum", "adam")
EVAL_BATCH = 512


@dataclass(frozen=True)
class LocalTrainConfig:
    """Settings of an agent's local training.

    Args:
        optimizer: ``"sgd"``, ``"momentum"`` (SGD with momentum 0.9) or ``"adam"``.
        lr: local learning rate.
        epochs: passes over the local shard.
        batch_size: minibatch size; ``0`` means full batch (one step per epoch).
        prox_mu: FedProx proximal coefficient; ``0`` is plain FedAvg local training.
    """

    optimizer: str = "sgd"
    lr: float = 0.1
    epochs: int = 1
    batch_size: int = 32
    prox_mu: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown local optimizer {self.optimizer!r}; known: {OPTIMIZERS}")
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 0 or self.prox_mu < 0:
            raise ValueError(f"nonsense local training settings: {self}")


def local_seed(base_seed: int, round_id: int, agent_id: str) -> int:
    """The local-training seed of ``agent_id`` in round ``round_id``: a 63-bit hash, stable
    across processes and Python versions (unlike ``hash()``)."""
    digest = hashlib.sha256(f"fedstream-train:{base_seed}:{round_id}:{agent_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _make_optimizer(cfg: LocalTrainConfig) -> optax.GradientTransformation:
    if cfg.optimizer == "sgd":
        return optax.sgd(cfg.lr)
    if cfg.optimizer == "momentum":
        return optax.sgd(cfg.lr, momentum=0.9)
    return optax.adam(cfg.lr)


def _masked_ce(spec: ModelSpec, flat: jax.Array, x: jax.Array, y: jax.Array, mask: jax.Array):
    logits = apply(spec, flat, x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    # Divide by the nominal batch size, not by the number of real samples: a short last batch
    # then takes a proportionally short step instead of a full-size step on a few samples.
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return (ce * mask).sum() / mask.shape[0], (correct * mask).sum()


@functools.lru_cache(maxsize=32)
def _train_step(spec: ModelSpec, cfg: LocalTrainConfig):
    opt = _make_optimizer(cfg)

    def loss_fn(flat, global_flat, x, y, mask):
        loss, _ = _masked_ce(spec, flat, x, y, mask)
        if cfg.prox_mu > 0:  # static: mu = 0 traces exactly the FedAvg objective
            loss = loss + 0.5 * cfg.prox_mu * jnp.sum((flat - global_flat) ** 2)
        return loss

    @jax.jit
    def step(flat, opt_state, global_flat, x, y, mask):
        loss, grad = jax.value_and_grad(loss_fn)(flat, global_flat, x, y, mask)
        updates, opt_state = opt.update(grad, opt_state, flat)
        return optax.apply_updates(flat, updates), opt_state, loss

    return opt, step


def _padded_batches(n: int, batch_size: int, rng: np.random.Generator):
    perm = rng.permutation(n)
    for start in range(0, n, batch_size):
        idx = perm[start : start + batch_size]
        mask = np.zeros(batch_size, np.float32)
        mask[: len(idx)] = 1.0
        yield np.pad(idx, (0, batch_size - len(idx))), mask


def train_local(
    spec: ModelSpec,
    global_flat: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    cfg: LocalTrainConfig,
    seed: int,
) -> tuple[np.ndarray, int, dict[str, float]]:
    """Train from ``global_flat`` on ``(x, y)``; return ``(local - global float32, n, metrics)``.

    ``metrics`` holds ``loss`` (mean minibatch loss of the last epoch) and ``steps``.
    """
    n = int(len(y))
    if n == 0:
        raise ValueError("cannot train on an empty shard")
    bs = n if cfg.batch_size == 0 else cfg.batch_size
    opt, step = _train_step(spec, cfg)
    g = jnp.asarray(global_flat, jnp.float32)
    flat, opt_state = g, opt.init(g)
    x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
    rng = np.random.default_rng(seed)
    steps = 0
    last_losses: list[jax.Array] = []
    for _ in range(cfg.epochs):
        last_losses = []
        for idx, mask in _padded_batches(n, bs, rng):
            flat, opt_state, loss = step(flat, opt_state, g, x[idx], y[idx], mask)
            last_losses.append(loss)
            steps += 1
    delta = np.asarray(flat - g, dtype=np.float32)
    return delta, n, {"loss": float(np.mean(last_losses)), "steps": float(steps)}


@functools.lru_cache(maxsize=32)
def _eval_batch(spec: ModelSpec):
    @jax.jit
    def f(flat, x, y, mask):
        logits = apply(spec, flat, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        return (ce * mask).sum(), (correct * mask).sum()

    return f


def evaluate(spec: ModelSpec, flat: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Mean cross-entropy ``loss`` and ``accuracy`` of ``flat`` on ``(x, y)``."""
    n = int(len(y))
    if n == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    f = _eval_batch(spec)
    p = jnp.asarray(flat, jnp.float32)
    x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
    loss_sum, correct = 0.0, 0.0
    for start in range(0, n, EVAL_BATCH):
        xb, yb = x[start : start + EVAL_BATCH], y[start : start + EVAL_BATCH]
        pad = EVAL_BATCH - len(yb)
        mask = np.concatenate([np.ones(len(yb), np.float32), np.zeros(pad, np.float32)])
        xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), np.float32)])
        yb = np.concatenate([yb, np.zeros(pad, np.int32)])
        ls, c = f(p, xb, yb, mask)
        loss_sum += float(ls)
        correct += float(c)
    return {"loss": loss_sum / n, "accuracy": correct / n}
