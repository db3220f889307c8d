"""Local training on an edge agent: a few epochs of optax minibatch descent from the global model.

The result is the model *delta* ``local - global`` (float32), which is what the codec clips,
quantizes and encrypts. With ``prox_mu > 0`` the local objective gains the FedProx proximal term
``mu/2 * ||w - w_global||^2`` (Li et al., 2020, "Federated Optimization in Heterogeneous
Networks"), which keeps heterogeneous clients close to the global model.

Determinism: batch order comes from ``numpy.random.default_rng(seed)``; every step runs one jitted
function on a fixed-size (padded, masked) batch, so the same ``(global, data, cfg, seed)`` gives
the same delta bit for bit, and one compilation serves agents of every shard size.

Example-level differential privacy (optional, ``dp_clip > 0``): DP-SGD (Abadi et al., 2016, "Deep
Learning with Differential Privacy"), as Opacus does it -- Poisson-sampled batches, per-example
gradients clipped to L2 norm ``dp_clip``, Gaussian noise of std ``dp_noise_multiplier * dp_clip``
on their sum, divided by the expected batch size; see :func:`train_local`. Its randomness comes
from the device's own secret ``dp_seed`` (:func:`new_dp_seed`), never from the federation seed.

Example:
    >>> cfg = LocalTrainConfig(lr=0.1, epochs=2, batch_size=16)
    >>> delta, n, metrics = train_local(spec, flat, x, y, cfg, seed=local_seed(0, 1, "agent-000"))
    >>> dp = LocalTrainConfig(lr=0.1, epochs=2, batch_size=16, dp_clip=1.0, dp_noise_multiplier=1.1)
    >>> delta, n, metrics = train_local(spec, flat, x, y, dp, seed=1, dp_seed=new_dp_seed())
"""

from __future__ import annotations

import functools
import hashlib
import math
import numbers
import secrets
from collections.abc import Iterator
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
        dp_clip: DP-SGD per-example gradient L2 clip norm ``C``; ``0`` turns DP-SGD off.
        dp_noise_multiplier: DP-SGD noise std as a multiple of ``dp_clip`` (``sigma``); needs
            ``dp_clip > 0``. ``0`` with ``dp_clip > 0`` clips without noise: no privacy.
    """

    optimizer: str = _T.optimizer
    lr: float = _T.lr
    epochs: int = _T.epochs
    batch_size: int = _T.batch_size
    prox_mu: float = _T.prox_mu
    dp_clip: float = 0.0
    dp_noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown local optimizer {self.optimizer!r}; known: {OPTIMIZERS}")
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 0 or self.prox_mu < 0:
            raise ValueError(f"nonsense local training settings: {self}")
        for name in ("dp_clip", "dp_noise_multiplier"):
            v = getattr(self, name)
            if (isinstance(v, bool) or not isinstance(v, numbers.Real)
                    or not math.isfinite(v) or v < 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.dp_noise_multiplier > 0 and self.dp_clip == 0:
            raise ValueError("dp_noise_multiplier > 0 needs dp_clip > 0: the DP-SGD noise is "
                             "calibrated to the per-example clip norm")

    @property
    def dp(self) -> bool:
        """Whether local training is DP-SGD (``dp_clip > 0``)."""
        return self.dp_clip > 0


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


def new_dp_seed() -> int:
    """A fresh 128-bit DP-SGD seed from the operating system's CSPRNG, for :func:`train_local`'s
    ``dp_seed``. A device draws a new one for every round and keeps it to itself."""
    return secrets.randbits(128)


def _dp_randomness(dp_seed: int, seed: int) -> tuple[np.random.Generator, jax.Array]:
    """(batch-sampling generator, noise key) of one DP-SGD run, both derived from the secret
    ``dp_seed``; ``seed`` is mixed in so that a reused ``dp_seed`` still gives fresh noise in every
    round. The noise key is a 64-bit threefry key (JAX's key size)."""

    def material(purpose: str) -> bytes:
        return hashlib.sha256(f"fedstream-dp-{purpose}:{dp_seed}:{seed}".encode()).digest()

    rng = np.random.default_rng(int.from_bytes(material("sample"), "little"))
    words = jnp.asarray(np.frombuffer(material("noise")[:8], dtype="<u4"), jnp.uint32)
    return rng, jax.random.wrap_key_data(words, impl="threefry2x32")


def _poisson_sample(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of one Poisson-sampled batch: every example independently with probability
    ``rate`` (so the batch size is Binomial(n, rate), possibly 0)."""
    if rate >= 1.0:
        return np.arange(n)
    return np.flatnonzero(rng.random(n) < rate)


def _chunks(idx: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``idx`` cut into fixed-size ``(padded indices, mask)`` chunks (none for an empty batch)."""
    for start in range(0, len(idx), size):
        part = idx[start : start + size]
        mask = np.zeros(size, np.float32)
        mask[: len(part)] = 1.0
        yield np.pad(part, (0, size - len(part))), mask


@functools.lru_cache(maxsize=32)
def _dp_train_step(spec: ModelSpec, cfg: LocalTrainConfig):
    """``(init, accumulate, update)`` of one DP-SGD step.

    ``accumulate`` adds a padded chunk's per-example-clipped gradients (padding rows zeroed
    *before* clipping, so they add exactly nothing) to a running sum; ``update`` then adds the
    Gaussian noise to the sum once, divides by the expected batch size, adds the data-independent
    FedProx gradient and lets the configured optimizer apply the result.
    """
    opt = _make_optimizer(cfg)
    example_loss = loss_fn(spec.loss)
    sigma_c = cfg.dp_noise_multiplier * cfg.dp_clip
    # optax.add_noise with gamma = 0 adds N(0, eta) to every coordinate at every step. Its
    # update() never reads the construction key: the real (secret) key lives in the state that
    # init() below builds, so it is an argument of the compiled step, not a constant in it.
    noise = optax.add_noise(eta=sigma_c**2, gamma=0.0, key=0) if sigma_c > 0 else None

    def one_loss(flat, x, y):
        return example_loss(apply(spec, flat, x[None]), y[None])[0]

    per_example = jax.vmap(jax.value_and_grad(one_loss), in_axes=(None, 0, 0))

    def init(flat: jax.Array, key: jax.Array):
        noise_state = optax.add_noise(sigma_c**2, 0.0, key).init(flat) if noise else None
        return noise_state, opt.init(flat)

    @jax.jit
    def accumulate(flat, grad_sum, loss_sum, clipped, x, y, mask):
        losses, grads = per_example(flat, x, y)
        real = mask > 0
        grads = jnp.where(real[:, None], grads, 0.0)  # a zero gradient is never scaled up
        grad, num_clipped = optax.per_example_global_norm_clip([grads], cfg.dp_clip)
        return (grad_sum + grad[0], loss_sum + jnp.where(real, losses, 0.0).sum(),
                clipped + num_clipped)

    @jax.jit
    def update(flat, state, global_flat, grad_sum, loss_sum, expected_batch):
        noise_state, opt_state = state
        if noise is not None:
            grad_sum, noise_state = noise.update(grad_sum, noise_state)
        grad = grad_sum / expected_batch
        loss = loss_sum / expected_batch
        if cfg.prox_mu > 0:  # data-independent: added after the private aggregation
            grad = grad + cfg.prox_mu * (flat - global_flat)
            loss = loss + 0.5 * cfg.prox_mu * jnp.sum((flat - global_flat) ** 2)
        updates, opt_state = opt.update(grad, opt_state, flat)
        return optax.apply_updates(flat, updates), (noise_state, opt_state), loss

    return init, accumulate, update


def _train_local_dp(spec: ModelSpec, g: jax.Array, x: np.ndarray, y: np.ndarray,
                    cfg: LocalTrainConfig, seed: int, bs: int,
                    dp_seed: int) -> tuple[jax.Array, dict[str, float]]:
    n = len(y)
    rate = min(1.0, bs / n)
    expected_batch = jnp.float32(min(bs, n))  # = rate * n, a public constant
    init, accumulate, update = _dp_train_step(spec, cfg)
    rng, key = _dp_randomness(dp_seed, seed)
    flat, state = g, init(g, key)
    zero_grad, zero = jnp.zeros_like(g), jnp.zeros((), jnp.float32)
    steps, sampled, clipped = 0, 0, jnp.zeros((), jnp.int32)
    last_losses: list[jax.Array] = []
    for _ in range(cfg.epochs):
        last_losses = []
        for _ in range(-(-n // bs)):
            idx = _poisson_sample(n, rate, rng)
            grad_sum, loss_sum = zero_grad, zero
            for cidx, mask in _chunks(idx, bs):
                grad_sum, loss_sum, clipped = accumulate(
                    flat, grad_sum, loss_sum, clipped, x[cidx], y[cidx], mask)
            flat, state, loss = update(flat, state, g, grad_sum, loss_sum, expected_batch)
            last_losses.append(loss)
            steps += 1
            sampled += len(idx)
    return flat, {
        "loss": float(np.mean(last_losses)),
        "steps": float(steps),
        "dp_steps": float(steps),
        "dp_sample_rate": rate,
        "dp_clipped_fraction": int(clipped) / sampled if sampled else 0.0,
    }


def train_local(
    spec: ModelSpec,
    global_flat: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    cfg: LocalTrainConfig,
    seed: int,
    *,
    dp_seed: int | None = None,
) -> tuple[np.ndarray, int, dict[str, float]]:
    """Train from ``global_flat`` on ``(x, y)``; return ``(local - global float32, n, metrics)``.

    ``metrics`` holds ``loss`` (mean minibatch loss of the last epoch) and ``steps``.

    With ``cfg.dp_clip > 0`` the training is DP-SGD and ``dp_seed`` (a non-negative int the
    device draws from its own secret randomness, :func:`new_dp_seed`) is required: the batch
    sampling and the noise come from it (mixed with ``seed``), never from the federation seed
    alone, which the server knows. Missing, it raises ``ValueError``. Without DP, ``dp_seed`` is
    ignored and the training is exactly the non-private one. Each of the ``ceil(n / B)`` steps of
    an epoch (``B`` the batch size, ``n`` for full batch):

    * samples a batch by **Poisson sampling** -- every example independently with probability
      ``q = min(1, B / n)`` -- what the DP-SGD accountants (``schemas.dp``) assume; the
      sampled examples run through the jitted step in fixed-size masked chunks of ``B`` (two or
      more chunks when the draw exceeds ``B``: nothing is truncated);
    * computes per-example gradients (``jax.vmap(jax.grad)``), clips each to L2 norm ``C`` and
      sums them over the sampled examples only (``optax.per_example_global_norm_clip``);
    * adds ``N(0, (sigma*C)^2)`` noise to the sum (``optax.add_noise``), even to an empty batch;
    * divides by the *expected* batch size ``q * n = min(B, n)``, as Opacus does, not by the
      sampled count (that count depends on the data, dividing by it would leak): the update
      moves by at most ``lr * C / min(B, n)`` per example for SGD;
    * adds the FedProx gradient ``mu * (w - w_global)`` (data-independent, not clipped) and
      applies the configured optimizer.

    DP metrics for the caller's accountant: ``dp_steps`` (noisy steps taken) and
    ``dp_sample_rate`` (``q``); ``dp_clipped_fraction`` (of per-example gradients clipped) helps
    to tune ``C``. None of ``metrics`` is itself privatized (``loss`` is not): keep them local.
    The noise key is a 64-bit threefry key and the Gaussian sampler is JAX's floating-point one
    (no Opacus "secure mode" against floating-point attacks).
    """
    n = int(len(y))
    if n == 0:
        raise ValueError("cannot train on an empty shard")
    bs = n if cfg.batch_size == 0 else cfg.batch_size
    if cfg.dp:
        if dp_seed is None:
            raise ValueError("DP-SGD (dp_clip > 0) needs the device's secret dp_seed "
                             "(new_dp_seed()); the federation seed must not drive the noise")
        if isinstance(dp_seed, bool) or not isinstance(dp_seed, numbers.Integral) or dp_seed < 0:
            raise ValueError(f"dp_seed must be a non-negative int, got {dp_seed!r}")
        g = jnp.asarray(global_flat, jnp.float32)
        flat, metrics = _train_local_dp(spec, g, np.asarray(x, np.float32), _labels(y), cfg,
                                        seed, bs, int(dp_seed))
        return np.asarray(flat - g, dtype=np.float32), n, metrics
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
