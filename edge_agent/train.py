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
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from edge_agent.models import ModelSpec, apply, resolve
from schemas.settings import TrainSettings

OPTIMIZERS = ("sgd", "momentum", "adam")
EVAL_BATCH = 512
_T = TrainSettings()  # the defaults live on the settings model


def _cross_entropy(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(outputs, labels.astype(jnp.int32))


def _mse(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    diff = (outputs - labels.reshape(outputs.shape)).reshape((outputs.shape[0], -1))
    return jnp.mean(diff**2, axis=-1)


def _accuracy(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    return (jnp.argmax(outputs, -1) == labels.astype(jnp.int32)).astype(jnp.float32)


#: Built-in per-example losses ``(outputs, labels) -> (B,)``.
LOSSES = {"softmax_cross_entropy": _cross_entropy, "mse": _mse}
#: Built-in per-example metrics ``(outputs, labels) -> (B,)``.
METRICS = {"accuracy": _accuracy, "mse": _mse}


def loss_fn(name: str):
    """A built-in loss by name, or a project's ``"package.module:function"``."""
    return LOSSES[name] if name in LOSSES else resolve(name, "loss")


def metric_fns(names: tuple[str, ...]) -> dict[str, object]:
    """``{metric name: function}``; ``"name=package.module:function"`` names a project's own."""
    out = {}
    for item in names:
        name, _, path = item.partition("=")
        out[name] = resolve(path, "metric") if path else METRICS.get(name) or resolve(name, "metric")
    return out


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

    optimizer: str = _T.optimizer
    lr: float = _T.lr
    epochs: int = _T.epochs
    batch_size: int = _T.batch_size
    prox_mu: float = _T.prox_mu

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown local optimizer {self.optimizer!r}; known: {OPTIMIZERS}")
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 0 or self.prox_mu < 0:
            raise ValueError(f"nonsense local training settings: {self}")


def use_compile_cache(path: Path) -> None:
    """Keep XLA's compiled programs (a few tens of kB) in ``path`` across restarts: compiling the
    training step is the largest transient memory cost of a device, and a cached program gives
    bit-identical results."""
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


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


def _masked_loss(spec: ModelSpec, flat: jax.Array, x: jax.Array, y: jax.Array, mask: jax.Array):
    per_example = loss_fn(spec.loss)(apply(spec, flat, x), y)
    # Divide by the nominal batch size, not by the number of real samples: a short last batch
    # then takes a proportionally short step instead of a full-size step on a few samples.
    return (per_example * mask).sum() / mask.shape[0]


@functools.lru_cache(maxsize=32)
def _train_step(spec: ModelSpec, cfg: LocalTrainConfig):
    opt = _make_optimizer(cfg)

    def loss_fn(flat, global_flat, x, y, mask):
        loss = _masked_loss(spec, flat, x, y, mask)
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
    x, y = np.asarray(x, np.float32), _labels(y)
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


def _labels(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    return y.astype(np.int32) if np.issubdtype(y.dtype, np.integer) else y.astype(np.float32)


@functools.lru_cache(maxsize=32)
def _eval_batch(spec: ModelSpec):
    loss = loss_fn(spec.loss)
    metrics = metric_fns(spec.metrics)

    @jax.jit
    def f(flat, x, y, mask):
        out = apply(spec, flat, x)
        sums = {"loss": (loss(out, y) * mask).sum()}
        for name, m in metrics.items():
            sums[name] = (m(out, y) * mask).sum()
        return sums

    return f


def evaluate(spec: ModelSpec, flat: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Mean ``loss`` and every metric of the spec (``accuracy`` by default) of ``flat`` on
    ``(x, y)``; NaN for an empty set."""
    n = int(len(y))
    names = ["loss", *metric_fns(spec.metrics)]
    if n == 0:
        return dict.fromkeys(names, float("nan"))
    f = _eval_batch(spec)
    p = jnp.asarray(flat, jnp.float32)
    x, y = np.asarray(x, np.float32), _labels(y)
    totals = dict.fromkeys(names, 0.0)
    for start in range(0, n, EVAL_BATCH):
        xb, yb = x[start : start + EVAL_BATCH], y[start : start + EVAL_BATCH]
        pad = EVAL_BATCH - len(yb)
        mask = np.concatenate([np.ones(len(yb), np.float32), np.zeros(pad, np.float32)])
        xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), np.float32)])
        yb = np.concatenate([yb, np.zeros((pad, *yb.shape[1:]), yb.dtype)])
        for k, v in f(p, xb, yb, mask).items():
            totals[k] += float(v)
    return {k: v / n for k, v in totals.items()}
