"""Data sets for fedstream's simulations and demo agents, all offline and seeded.

Tasks:

* ``digits`` — scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), pixels
  scaled to [0, 1], shape ``(N, 8, 8, 1)``; a fixed stratified train/test split by seed.
* ``telemetry`` — synthetic IoT sensor windows. Each device has its own baseline and a slow drift;
  each sample summarises a window of 6 sensors (temperature, vibration, current, pressure,
  humidity, rpm) as mean and standard deviation (12 features), labelled with one of four fault
  classes: ``normal``, ``overheating``, ``vibration``, ``sensor_drift``. Features are standardised
  with statistics of the training pool.

The server's held-out test set (:func:`server_test_set`) is the task's test split. The training
pool is partitioned across agents (:mod:`global_aggregator.partition`); every agent holds back 20 % of its
shard as its local test set for federated evaluation. :func:`agent_dataset` recomputes a single
agent's shard deterministically, so an agent process loads only its own data.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from global_aggregator.partition import partition_indices

TELEMETRY_CLASSES = ("normal", "overheating", "vibration", "sensor_drift")
TELEMETRY_SENSORS = ("temperature", "vibration", "current", "pressure", "humidity", "rpm")
LOCAL_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class TaskInfo:
    """Shapes of a task and the model that fits it by default."""

    input_shape: tuple[int, ...]
    num_classes: int
    default_model: str


TASKS: dict[str, TaskInfo] = {
    "digits": TaskInfo((8, 8, 1), 10, "digits_cnn"),
    "telemetry": TaskInfo((2 * len(TELEMETRY_SENSORS),), len(TELEMETRY_CLASSES), "mlp"),
}


def _task(name: str) -> TaskInfo:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


def load_digits_split(
    seed: int, test_size: float = 0.25
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as ``(x_train, y_train, x_test, y_test)``; x float32 in [0, 1], y int32."""
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    return xtr, ytr, xte, yte


def generate_telemetry(
    num_devices: int = 40, samples_per_device: int = 100, seed: int = 0, window: int = 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic sensor windows: ``(features float32 (N, 12), labels int32, device ids int32)``.

    Per device: a baseline for every sensor, a slow linear drift over the device's timeline, and
    per-window noise. Faults change the window: overheating raises temperature and current,
    vibration raises vibration level and rpm jitter, sensor drift adds a ramp on one random
    sensor within the window (visible mostly in its standard deviation).
    """
    rng = np.random.default_rng(seed)
    nominal = np.array([60.0, 0.5, 10.0, 3.0, 40.0, 1500.0])
    spread = np.array([3.0, 0.08, 0.8, 0.2, 5.0, 40.0])
    noise = np.array([0.8, 0.05, 0.3, 0.05, 1.5, 15.0])
    feats, labels, devices = [], [], []
    for dev in range(num_devices):
        base = nominal + rng.normal(0, 1, 6) * spread
        drift = rng.normal(0, 0.02, 6) * spread  # per time step, device specific
        fault_p = rng.dirichlet(np.full(4, 2.0)) * 0.5 + np.array([0.5, 0, 0, 0])
        for t in range(samples_per_device):
            label = int(rng.choice(4, p=fault_p))
            level = base + drift * t
            w = level + rng.normal(0, 1, (window, 6)) * noise
            if label == 1:  # overheating
                w[:, 0] += rng.uniform(4, 10) + np.linspace(0, rng.uniform(1, 4), window)
                w[:, 2] += rng.uniform(0.5, 1.5)
            elif label == 2:  # vibration
                w[:, 1] += np.abs(rng.normal(0.2, 0.08, window))
                w[:, 5] += rng.normal(0, 60, window)
            elif label == 3:  # sensor drift: a ramp on one sensor
                s = int(rng.integers(6))
                w[:, s] += np.linspace(0, rng.uniform(4, 8) * noise[s] * rng.choice([-1, 1]), window)
            feats.append(np.concatenate([w.mean(0), w.std(0)]))
            labels.append(label)
            devices.append(dev)
    return (
        np.asarray(feats, np.float32),
        np.asarray(labels, np.int32),
        np.asarray(devices, np.int32),
    )


def load_telemetry_split(
    seed: int, test_size: float = 0.25
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Telemetry as ``(x_train, y_train, x_test, y_test)``, standardised by training statistics."""
    x, y, _ = generate_telemetry(seed=seed)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    return ((xtr - mu) / sd).astype(np.float32), ytr, ((xte - mu) / sd).astype(np.float32), yte


@functools.lru_cache(maxsize=8)
def _split(task_name: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    _task(task_name)
    if task_name == "digits":
        return load_digits_split(seed)
    return load_telemetry_split(seed)


def server_test_set(task_name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The held-out test set the global aggregator evaluates each model version on."""
    _, _, x, y = _split(task_name, seed)
    return x.copy(), y.copy()


@functools.lru_cache(maxsize=8)
def _shards(
    task_name: str, num_agents: int, partition: str, alpha: float, seed: int, split_seed: int
) -> tuple[np.ndarray, ...]:
    _, y, _, _ = _split(task_name, split_seed)
    return tuple(partition_indices(y, num_agents, partition, alpha, seed))


def agent_dataset(
    task_name: str, agent_index: int, num_agents: int, partition: str, alpha: float, seed: int,
    split_seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One agent's shard as ``(x_train, y_train, x_test, y_test)``; deterministic in the args.
    ``split_seed`` (default ``seed``) picks the server's held-out split, ``seed`` the rest."""
    if not 0 <= agent_index < num_agents:
        raise ValueError(f"agent_index {agent_index} out of range for {num_agents} agents")
    split_seed = seed if split_seed is None else split_seed
    x, y, _, _ = _split(task_name, split_seed)
    idx = _shards(task_name, num_agents, partition, float(alpha), seed, split_seed)[agent_index]
    perm = np.random.default_rng([seed, agent_index]).permutation(idx)
    n_test = max(1, int(round(LOCAL_TEST_FRACTION * len(perm))))
    te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return x[tr].copy(), y[tr].copy(), x[te].copy(), y[te].copy()
