"""Server optimizers: the averaged client delta is a pseudo-gradient for an optax optimizer.

Reddi et al., 2021, "Adaptive Federated Optimization" (ICLR): with ``avg_delta`` the weighted mean
of ``local - global`` over the round's clients, the server treats ``g = -avg_delta`` as a gradient
and applies any first-order optimizer to the global parameters. FedAvg is SGD with rate 1
(``w + avg_delta``); FedAvgM adds server momentum; FedAdam, FedYogi and FedAdagrad use the
adaptive optimizers, with ``tau`` (the paper's degree of adaptivity) as the epsilon of the
denominator. We use optax's implementations as they are (Adam and Yogi with bias correction;
Adagrad as ``g / sqrt(sum g^2 + tau^2)`` starting from a zero accumulator), so a new rule is one
factory in :data:`STRATEGIES`, not a new service.

The optimizer state travels with the model version (:func:`state_to_bytes`), so a restarted
global aggregator resumes from the model topic alone.

Example:
    >>> opt = make_server_optimizer("fedadam", lr=0.01)
    >>> state = opt.init(jnp.asarray(params))
    >>> params, state = server_step(opt, params, state, avg_delta)
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from schemas.errors import InvalidMessage

OptState = Any


def _fedavg(lr: float | None, **_: float) -> optax.GradientTransformation:
    return optax.sgd(1.0 if lr is None else lr)


def _fedavgm(lr: float | None, momentum: float, **_: float) -> optax.GradientTransformation:
    return optax.sgd(1.0 if lr is None else lr, momentum=momentum)


def _fedadam(
    lr: float | None, b1: float, b2: float, tau: float, **_: float
) -> optax.GradientTransformation:
    return optax.adam(0.01 if lr is None else lr, b1=b1, b2=b2, eps=tau)


def _fedyogi(
    lr: float | None, b1: float, b2: float, tau: float, **_: float
) -> optax.GradientTransformation:
    return optax.yogi(0.01 if lr is None else lr, b1=b1, b2=b2, eps=tau)


def _fedadagrad(lr: float | None, tau: float, **_: float) -> optax.GradientTransformation:
    return optax.adagrad(0.1 if lr is None else lr, initial_accumulator_value=0.0, eps=tau**2)


#: Server optimizer factories by strategy name.
STRATEGIES: dict[str, Callable[..., optax.GradientTransformation]] = {
    "fedavg": _fedavg,
    "fedavgm": _fedavgm,
    "fedadam": _fedadam,
    "fedyogi": _fedyogi,
    "fedadagrad": _fedadagrad,
}


def make_server_optimizer(
    name: str,
    lr: float | None = None,
    momentum: float = 0.9,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
) -> optax.GradientTransformation:
    """The optax transformation of strategy ``name``.

    Args:
        name: one of :data:`STRATEGIES`.
        lr: server learning rate; ``None`` picks the strategy's default (1.0 for fedavg and
            fedavgm, 0.01 for fedadam and fedyogi, 0.1 for fedadagrad).
        momentum: server momentum of fedavgm.
        b1, b2: moment decay rates of fedadam and fedyogi.
        tau: adaptivity (denominator epsilon) of fedadam, fedyogi, fedadagrad.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
    if lr is not None and lr <= 0:
        raise ValueError(f"server learning rate must be > 0, got {lr}")
    return STRATEGIES[name](lr=lr, momentum=momentum, b1=b1, b2=b2, tau=tau)


def init_state(opt: optax.GradientTransformation, params_flat: np.ndarray) -> OptState:
    """Fresh optimizer state for a flat parameter vector."""
    return opt.init(jnp.asarray(params_flat, jnp.float32))


def server_step(
    opt: optax.GradientTransformation,
    params_flat: np.ndarray,
    opt_state: OptState,
    avg_delta: np.ndarray,
) -> tuple[np.ndarray, OptState]:
    """One server update with pseudo-gradient ``-avg_delta``; returns float32 params, new state."""
    params = jnp.asarray(params_flat, jnp.float32)
    grad = -jnp.asarray(avg_delta, jnp.float32)
    if grad.shape != params.shape:
        raise ValueError(f"delta shape {grad.shape} != params shape {params.shape}")
    updates, new_state = opt.update(grad, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    return np.asarray(new_params, dtype=np.float32), new_state


# Byte layout of a serialized optimizer state (little-endian):
#   b"FSOS" | u8 version (=1) | u8 len(dtype) | dtype str (numpy, e.g. "<f4") | u64 count | data
# where data is ravel_pytree(state) (leaves promoted to one dtype; integer step counters are
# exact in float32 up to 2^24 rounds), restored against opt.init(params)'s structure.
_MAGIC = b"FSOS"
_VERSION = 1


def state_to_bytes(state: OptState) -> bytes:
    """Serialize an optimizer state (any pytree of arrays) to bytes."""
    flat, _ = ravel_pytree(state)
    arr = np.asarray(flat)
    dtype = arr.dtype.newbyteorder("<").str.encode()
    header = _MAGIC + struct.pack("<BB", _VERSION, len(dtype)) + dtype + struct.pack("<Q", arr.size)
    return header + arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def state_from_bytes(
    opt: optax.GradientTransformation, params_flat: np.ndarray, data: bytes
) -> OptState:
    """Inverse of :func:`state_to_bytes`, given the optimizer and parameters it belongs to.

    Raises:
        InvalidMessage: ``bad_optimizer_state`` if the bytes do not fit this optimizer.
    """
    if len(data) < 6 or data[:4] != _MAGIC:
        raise InvalidMessage("bad_optimizer_state", "missing FSOS magic")
    version, dlen = struct.unpack_from("<BB", data, 4)
    if version != _VERSION:
        raise InvalidMessage("bad_optimizer_state", f"unknown state version {version}")
    try:
        dtype = np.dtype(data[6 : 6 + dlen].decode())
        (count,) = struct.unpack_from("<Q", data, 6 + dlen)
    except (struct.error, TypeError, UnicodeDecodeError) as e:
        raise InvalidMessage("bad_optimizer_state", f"unreadable header: {e}") from e
    body = data[6 + dlen + 8 :]
    if len(body) != count * dtype.itemsize:
        raise InvalidMessage("bad_optimizer_state", f"{len(body)} bytes for {count} {dtype}")
    template, unravel = ravel_pytree(init_state(opt, params_flat))
    if template.size != count or np.dtype(template.dtype) != dtype.newbyteorder("="):
        raise InvalidMessage(
            "bad_optimizer_state",
            f"state holds {count} {dtype}, optimizer expects {template.size} {template.dtype}",
        )
    return unravel(jnp.asarray(np.frombuffer(body, dtype=dtype).astype(template.dtype)))
