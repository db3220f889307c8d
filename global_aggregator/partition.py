"""Seeded, pure partitioners that split a labelled data set across federated agents.

* ``iid``: a random permutation cut into equal parts.
* ``dirichlet``: label skew — for every class, the share of each agent is drawn from
  Dirichlet(alpha) (Hsu, Qi & Brown, 2019, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification"). Small alpha means few classes per agent.
* ``quantity``: quantity skew — agents' dataset sizes are proportional to a Dirichlet(alpha)
  draw, labels are IID.

Every function takes an explicit ``seed`` and returns the same split for the same arguments, so an
agent process can recompute its own shard without anyone sending it.

Example:
    >>> parts = partition_indices(np.array([0, 1] * 50), 4, "dirichlet", alpha=0.5, seed=0)
    >>> sorted(np.concatenate(parts).tolist()) == list(range(100))
    True
"""

from __future__ import annotations

import numpy as np

PARTITIONS = ("iid", "dirichlet", "quantity")


def iid_partition(num_samples: int, num_agents: int, seed: int) -> list[np.ndarray]:
    """Equal-sized random shards (sizes differ by at most one)."""
    perm = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(p) for p in np.array_split(perm, num_agents)]


def dirichlet_partition(
    labels: np.ndarray, num_agents: int, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Label-skewed shards; redraws (deterministically) until every shard has ``min_size``."""
    labels = np.asarray(labels)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    min_size = min(min_size, len(labels) // num_agents)
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        shards: list[list[int]] = [[] for _ in range(num_agents)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_agents, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for a, part in enumerate(np.split(idx, cuts)):
                shards[a].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
    raise ValueError(f"could not draw a Dirichlet({alpha}) split with {min_size} samples per agent")


def quantity_partition(
    num_samples: int, num_agents: int, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """IID labels, sizes proportional to Dirichlet(alpha), each shard at least ``min_size``."""
    min_size = min(min_size, num_samples // num_agents)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num_samples)
    rest = num_samples - min_size * num_agents
    extra = np.floor(rng.dirichlet(np.full(num_agents, alpha)) * rest).astype(int)
    extra[: rest - extra.sum()] += 1  # hand out the rounding remainder
    sizes = min_size + extra
    return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def partition_indices(
    labels: np.ndarray, num_agents: int, partition: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into ``num_agents`` disjoint, sorted index arrays."""
    n = len(labels)
    if num_agents < 1 or num_agents > n:
        raise ValueError(f"need 1 <= num_agents <= {n}, got {num_agents}")
    if partition == "iid":
        return iid_partition(n, num_agents, seed)
    if partition == "dirichlet":
        return dirichlet_partition(labels, num_agents, alpha, seed)
    if partition == "quantity":
        return quantity_partition(n, num_agents, alpha, seed)
    raise ValueError(f"unknown partition {partition!r}; known: {PARTITIONS}")


def assign_regions(num_agents: int, num_regions: int) -> list[int]:
    """Region index of each agent: contiguous, balanced blocks (agent i -> i * R // N)."""
    if num_regions < 1 or num_regions > num_agents:
        raise ValueError(f"need 1 <= num_regions <= num_agents, got {num_regions}/{num_agents}")
    return [i * num_regions // num_agents for i in range(num_agents)]
