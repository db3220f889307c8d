"""Flax NNX models whose parameters travel as ONE flat float32 vector.

Every tier of fedstream sees a model as a flat ``float32`` vector: the codec clips, quantizes and
encrypts it, the aggregators add it, the server optimizer steps it. This module is the only place
that knows the vector is really a Flax NNX module.

A :class:`ModelSpec` is a small, hashable description: the import path of a factory that
returns a Flax NNX module (a project's own, or a built-in of :data:`MODELS`), its keyword options
and the input shape. It is all another process needs to rebuild the module structure
(``nnx.split`` of a freshly built module gives the graph definition, ``ravel_pytree`` of its state
gives the unravel function). No code crosses the wire: every process imports the same installed
project, and :func:`model_hash` proves that it did. :func:`apply` is pure: ``flat -> outputs``.

Example:
    >>> flat, spec = init_params("digits_cnn", (8, 8, 1), 10, seed=0)
    >>> logits = apply(spec, flat, np.zeros((4, 8, 8, 1), np.float32))
    >>> logits.shape
    (4, 10)
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

if TYPE_CHECKING:
    from schemas.project import Project


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


def mlp(*, rngs: nnx.Rngs, input_shape: tuple[int, ...], num_classes: int,
        hidden: int = 64) -> nnx.Module:
    """Built-in factory: :class:`MLP` on the flattened input."""
    return MLP(int(np.prod(input_shape)), num_classes, hidden=hidden, rngs=rngs)


def mlp_wide(*, rngs: nnx.Rngs, input_shape: tuple[int, ...], num_classes: int) -> nnx.Module:
    """Built-in factory: ~100k parameters on digits (64 -> 280 -> 280 -> 10), the pipeline
    benchmark's model size."""
    return MLP(int(np.prod(input_shape)), num_classes, hidden=280, rngs=rngs)


def digits_cnn(*, rngs: nnx.Rngs, input_shape: tuple[int, ...], num_classes: int) -> nnx.Module:
    """Built-in factory: :class:`DigitsCNN`."""
    if len(input_shape) != 3:
        raise ValueError(f"digits_cnn needs an (H, W, C) input shape, got {input_shape}")
    return DigitsCNN(tuple(input_shape), num_classes, rngs=rngs)


#: Built-in model factories by name (the simulation's research tasks use them).
MODELS: dict[str, Callable[..., nnx.Module]] = {
    "mlp": mlp,
    "mlp_wide": mlp_wide,
    "digits_cnn": digits_cnn,
}


def resolve(path: str, what: str = "object") -> Any:
    """Import ``"package.module:attribute"``; a configuration error raises ``ValueError``."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"{what} {path!r} is not of the form 'package.module:attribute'")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import {what} {path!r}: {exc}") from exc
    return obj


def _hashable(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return v


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model and train it: the factory's import path and keyword
    options, one example's input shape, and the loss and metric names. Hashable; no weights."""

    factory: str
    input_shape: tuple[int, ...]
    options: tuple[tuple[str, Any], ...] = ()
    loss: str = "softmax_cross_entropy"
    metrics: tuple[str, ...] = ("accuracy",)

    @property
    def num_params(self) -> int:
        return _structure(self)[2]

    @property
    def model_name(self) -> str:
        return self.factory.rpartition(":")[2]


def model_spec(factory: str, input_shape: int | tuple[int, ...] | list[int],
               options: dict[str, Any] | None = None, loss: str = "softmax_cross_entropy",
               metrics: tuple[str, ...] | list[str] = ("accuracy",)) -> ModelSpec:
    """A spec for any factory ``"package.module:function"`` called as
    ``factory(rngs=nnx.Rngs(seed), **options)``; builds the model once to check it."""
    shape = (int(input_shape),) if isinstance(input_shape, int | np.integer) else tuple(
        int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be positive sizes, got {input_shape!r}")
    resolve(factory, "model factory")
    spec = ModelSpec(factory, shape, _hashable(dict(options or {})), loss, tuple(metrics))
    _structure(spec)  # builds it abstractly: a bad factory fails here, at start-up
    return spec


def make_spec(model_name: str, input_shape: int | tuple[int, ...], num_classes: int) -> ModelSpec:
    """The spec of a built-in model (:data:`MODELS`) for the research tasks."""
    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; known: {sorted(MODELS)}")
    shape = (int(input_shape),) if isinstance(input_shape, int | np.integer) else tuple(
        int(s) for s in input_shape)
    return model_spec(f"edge_agent.models:{model_name}", shape,
                      {"input_shape": shape, "num_classes": int(num_classes)})


def _build(spec: ModelSpec, seed: int) -> nnx.Module:
    module = resolve(spec.factory, "model factory")(rngs=nnx.Rngs(seed), **dict(spec.options))
    if not isinstance(module, nnx.Module):
        raise ValueError(f"{spec.factory} returned {type(module).__name__}, not a flax.nnx.Module")
    return module


@functools.lru_cache(maxsize=64)
def _abstract(spec: ModelSpec) -> tuple[Any, Any]:
    """(graphdef, state of ShapeDtypeStructs): the module traced abstractly, so no parameter is
    initialised and no XLA program compiled (an edge device never needs initial weights)."""
    return nnx.split(nnx.eval_shape(lambda: _build(spec, 0)))


@functools.lru_cache(maxsize=64)
def _structure(spec: ModelSpec) -> tuple[Any, Callable[[jax.Array], Any], int]:
    """(graphdef, unravel, num_params) of a spec; cached, identical in every process. The flat
    order is ``ravel_pytree``'s (leaves in tree order, each raveled C-style)."""
    graphdef, state = _abstract(spec)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    for leaf in leaves:
        if leaf.dtype != jnp.float32:
            raise ValueError(f"{spec.factory}: every parameter must be float32, got {leaf.dtype}")
    shapes = [tuple(leaf.shape) for leaf in leaves]
    sizes = [int(np.prod(sh)) for sh in shapes]
    offsets = np.cumsum([0, *sizes]).tolist()

    def unravel(flat: jax.Array) -> Any:
        return jax.tree_util.tree_unflatten(treedef, [
            flat[offsets[i]:offsets[i + 1]].reshape(sh) for i, sh in enumerate(shapes)])

    return graphdef, unravel, int(offsets[-1])


def _source(path: str) -> str:
    """Source text of a project-supplied function (built-in names hash as themselves)."""
    if ":" not in path:
        return path
    try:
        return inspect.getsource(resolve(path))
    except (OSError, TypeError):
        return path


@functools.lru_cache(maxsize=64)
def model_hash(spec: ModelSpec) -> str:
    """SHA-256 of the model definition: the factory, its options and input shape, every
    parameter's path, shape and dtype, the forward pass as a jaxpr (the computation itself, so a
    changed activation changes the hash and an edited comment does not), and the loss and
    metrics (their source when the project supplies them)."""
    graphdef, unravel, n = _structure(spec)
    _, state = _abstract(spec)
    leaves = [(jax.tree_util.keystr(p), tuple(v.shape), str(v.dtype))
              for p, v in jax.tree_util.tree_flatten_with_path(state)[0]]
    x = jnp.zeros((2, *spec.input_shape), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda f, x: apply(spec, f, x))(jnp.zeros(n, jnp.float32), x)
    h = hashlib.sha256()
    for part in (spec.factory, repr(spec.options), repr(spec.input_shape), repr(leaves),
                 str(jaxpr), _source(spec.loss), *map(_source, spec.metrics)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def init_params(
    model_name: str, input_shape: int | tuple[int, ...], num_classes: int, seed: int
) -> tuple[np.ndarray, ModelSpec]:
    """Initialise a built-in model and return ``(flat float32 parameters, spec)``."""
    spec = make_spec(model_name, input_shape, num_classes)
    return init_flat(spec, seed), spec


def init_flat(spec: ModelSpec, seed: int) -> np.ndarray:
    """The flat float32 initial parameters of ``spec`` for ``seed``."""
    _, state = nnx.split(_build(spec, seed))
    flat = np.asarray(ravel_pytree(state)[0], dtype=np.float32)
    if flat.size != spec.num_params:  # the abstract layout and the real one must agree
        raise ValueError(f"{spec.factory}: {flat.size} parameters built, {spec.num_params} traced")
    return flat


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


def project_spec(project: Project) -> ModelSpec:
    """The model of a project (:mod:`schemas.project`): its factory, options, input shape, loss
    and metrics."""
    t = project.table
    return model_spec(t.model, t.input_shape, t.model_options, t.loss, tuple(t.metrics))
