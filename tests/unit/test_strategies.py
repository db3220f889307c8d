"""Server optimizers against steps worked out by hand in numpy (optax's conventions)."""

from __future__ import annotations

import numpy as np
import pytest

from global_aggregator.strategies import (
    STRATEGIES,
    init_state,
    make_server_optimizer,
    server_step,
    state_from_bytes,
    state_to_bytes,
)
from schemas.errors import InvalidMessage

RNG = np.random.default_rng(0)
PARAMS = RNG.normal(size=50).astype(np.float32)
DELTAS = [RNG.normal(scale=0.1, size=50).astype(np.float32) for _ in range(3)]


def _run(name: str, **hp: float) -> np.ndarray:
    opt = make_server_optimizer(name, **hp)
    params, state = PARAMS, init_state(opt, PARAMS)
    for d in DELTAS:
        params, state = server_step(opt, params, state, d)
    return params


def _by_hand(name: str, lr: float, momentum=0.9, b1=0.9, b2=0.99, tau=1e-3) -> np.ndarray:
    x = PARAMS.astype(np.float64)
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    if name == "fedyogi":
        m[:], v[:] = 1e-6, 1e-6  # optax's yogi starts both moments at 1e-6
    for t, d in enumerate(DELTAS, start=1):
        g = -d.astype(np.float64)  # pseudo-gradient
        if name == "fedavg":
            x = x - lr * g
        elif name == "fedavgm":
            m = momentum * m + g
            x = x - lr * m
        elif name in ("fedadam", "fedyogi"):
            m = b1 * m + (1 - b1) * g
            if name == "fedadam":
                v = b2 * v + (1 - b2) * g**2
            else:
                v = v - (1 - b2) * np.sign(v - g**2) * g**2
            mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
            x = x - lr * mhat / (np.sqrt(vhat) + tau)
        elif name == "fedadagrad":
            v = v + g**2
            x = x - lr * g / np.sqrt(v + tau**2)
    return x


@pytest.mark.parametrize(
    ("name", "hp"),
    [
        ("fedavg", {}),
        ("fedavg", {"lr": 0.7}),
        ("fedavgm", {"lr": 1.0, "momentum": 0.9}),
        ("fedadam", {"lr": 0.01, "b1": 0.9, "b2": 0.99, "tau": 1e-3}),
        ("fedyogi", {"lr": 0.01, "b1": 0.9, "b2": 0.99, "tau": 1e-3}),
        ("fedadagrad", {"lr": 0.1, "tau": 1e-3}),
    ],
)
def test_server_step_matches_hand_computation(name, hp):
    lr = hp.get("lr", 1.0)
    expected = _by_hand(name, lr=lr, **{k: v for k, v in hp.items() if k != "lr"})
    got = _run(name, **hp)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_fedavg_default_is_plain_delta_addition():
    opt = make_server_optimizer("fedavg")
    new, _ = server_step(opt, PARAMS, init_state(opt, PARAMS), DELTAS[0])
    np.testing.assert_allclose(new, PARAMS + DELTAS[0], atol=1e-7)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_state_round_trips_through_bytes(name):
    # A restarted aggregator that restores the state continues bit-identically.
    opt = make_server_optimizer(name)
    params, state = server_step(opt, PARAMS, init_state(opt, PARAMS), DELTAS[0])

    restored = state_from_bytes(opt, params, state_to_bytes(state))

    a, _ = server_step(opt, params, state, DELTAS[1])
    b, _ = server_step(opt, params, restored, DELTAS[1])
    assert np.array_equal(a, b)


def test_state_bytes_for_another_optimizer_are_refused():
    adam, sgd = make_server_optimizer("fedadam"), make_server_optimizer("fedavgm")
    data = state_to_bytes(init_state(adam, PARAMS))
    with pytest.raises(InvalidMessage) as e:
        state_from_bytes(sgd, PARAMS, data)
    assert e.value.reason == "bad_optimizer_state"
    with pytest.raises(InvalidMessage):
        state_from_bytes(adam, PARAMS, data[:-3])
    with pytest.raises(InvalidMessage):
        state_from_bytes(adam, PARAMS, b"junk")


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError):
        make_server_optimizer("fedmagic")
