"""Flax NNX models whose parameters travel as ONE flat float32 vector.

Every tier of fedstream sees a model as a flat ``float32`` vector: the codec clips, quantizes and
encrypts it, the aggregators add it, the server optimizer steps it. This module is the only place
that knows the vector is really a Flax NNX module.

A :class:`ModelSpec` is a small, hashable description ``(model_name, input_shape, num_classes)``.
It is all another process needs to rebuild the module structure (``nnx.split`` of a freshly built
module gives the graph definition, ``ravel_pytree`` of its state gives the unravel function), so a
spec can cross a wire as three plain fields. :func:`apply` is pure: ``flat -> logits``.

Example:
    >>> flat, spec = init_params("digits_cnn", (8, 8, 1), 10, seed=0)
    >>> logits = apply(spec, flat, np.zeros((4, 8, 8, 1), np.float32))
    >>> logits.shape
    (4, 10)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree


class MLP(nnx.Module):
    """Two hidden ReLU layers for tabular / sensor feature vectors (input is flattened)."""

    def __init__(self, num_features: int, num_classes: int, *, hidden: int = 64, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(num_features, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        x = nnx.relu(self.fc1(x))
        x = nnx.relu(self.fc2(x))
        return self.out(x)


class DigitsCNN(nnx.Module):
    """A small CNN for 8x8 grey images (about 21.5k parameters).

    conv3x3(16) -> relu -> conv3x3(32) -> relu -> avgpool 2x2 -> dense(32) -> relu -> dense(classes).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, rngs: nnx.Rngs):
        h, w, c = input_shape
        self.conv1 = nnx.Conv(c, 16, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
        self.fc = nnx.Linear((h // 2) * (w // 2) * 32, 32, rngs=rngs)
        self.out = nnx.Linear(32, num_classes, rngs=rngs)
        self.input_shape = tuple(input_shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], *self.input_shape))
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nnx.relu(self.fc(x))
        return self.out(x)


def _build_mlp(input_shape: tuple[int, ...], num_classes: int, rngs: nnx.Rngs) -> nnx.Module:
    return MLP(int(np.prod(input_shape)), num_classes, rngs=rngs)


def _build_wide_mlp(input_shape: tuple[int, ...], num_classes: int, rngs: nnx.Rngs) -> nnx.Module:
    # ~100k parameters on digits (64 -> 280 -> 280 -> 10): the pipeline benchmark's model size
    return MLP(int(np.prod(input_shape)), num_classes, hidden=280, rngs=rngs)


def _build_cnn(input_shape: tuple[int, ...], num_classes: int, rngs: nnx.Rngs) -> nnx.Module:
    if len(input_shape) != 3:
        raise ValueError(f"digits_cnn needs an (H, W, C) input shape, got {input_shape}")
    return DigitsCNN(input_shape, num_classes, rngs=rngs)


#: Model constructors by name: ``(input_shape, num_classes, rngs) -> nnx.Module``.
MODELS: dict[str, Callable[[tuple[int, ...], int, nnx.Rngs], nnx.Module]] = {
    "mlp": _build_mlp,
    "mlp_wide": _build_wide_mlp,
    "digits_cnn": _build_cnn,
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model's structure: name and shapes, nothing else."""

    model_name: str
    input_shape: tuple[int, ...]
    num_classes: int

    @property
    def num_params(self) -> int:
        return _structure(self)[2]


def make_spec(model_name: str, input_shape: int | tuple[int, ...], num_classes: int) -> ModelSpec:
    """Normalise shapes (an int means a feature vector) and check the model name."""
    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; known: {sorted(MODELS)}")
    shape = (int(input_shape),) if isinstance(input_shape, int | np.integer) else tuple(
        int(s) for s in input_shape
    )
    return ModelSpec(model_name, shape, int(num_classes))


def _build(spec: ModelSpec, seed: int) -> nnx.Module:
    return MODELS[spec.model_name](spec.input_shape, spec.num_classes, nnx.Rngs(seed))


@functools.lru_cache(maxsize=64)
def _structure(spec: ModelSpec) -> tuple[Any, Callable[[jax.Array], Any], int]:
    """(graphdef, unravel, num_params) of a spec; cached, identical in every process."""
    graphdef, state = nnx.split(_build(spec, 0))
    flat, unravel = ravel_pytree(state)
    return graphdef, unravel, int(flat.size)


def init_params(
    model_name: str, input_shape: int | tuple[int, ...], num_classes: int, seed: int
) -> tuple[np.ndarray, ModelSpec]:
    """Initialise a model and return ``(flat float32 parameters, spec)``."""
    spec = make_spec(model_name, input_shape, num_classes)
    _, state = nnx.split(_build(spec, seed))
    flat, _ = ravel_pytree(state)
    return np.asarray(flat, dtype=np.float32), spec


def unflatten(spec: ModelSpec, flat: jax.Array | np.ndarray) -> nnx.Module:
    """Rebuild the NNX module holding ``flat`` as its parameters."""
    graphdef, unravel, n = _structure(spec)
    if flat.shape != (n,):
        raise ValueError(f"{spec.model_name} has {n} parameters, got a vector of shape {flat.shape}")
    return nnx.merge(graphdef, unravel(jnp.asarray(flat, jnp.float32)))


def apply(spec: ModelSpec, flat: jax.Array | np.ndarray, x: jax.Array | np.ndarray) -> jax.Array:
    """Pure forward pass: logits of the model with parameters ``flat`` on the batch ``x``.

    Traceable under ``jax.jit``/``jax.grad`` (``spec`` is hashable, pass it as a static argument).
    """
    return unflatten(spec, flat)(jnp.asarray(x, jnp.float32))
