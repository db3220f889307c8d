"""Client sampling: which agents train in a round (the same choice in simulation and services)."""

from __future__ import annotations

import hashlib

import numpy as np


def select_agents(agents: list[str], fraction: float, seed: int, round_id: int) -> list[str]:
    """A seeded sample of ``max(1, round(fraction * len(agents)))`` agents, sorted.

    ``fraction >= 1`` selects everyone. The generator is keyed by (seed, round) only, so every
    process that knows the fleet makes the same choice.
    """
    agents = sorted(agents)
    if fraction >= 1.0:
        return agents
    k = max(1, int(round(fraction * len(agents))))
    key = int.from_bytes(hashlib.sha256(f"fedstream-sample:{seed}:{round_id}".encode()).digest()[:8],
                         "little")
    pick = np.random.default_rng(key).choice(len(agents), size=k, replace=False)
    return sorted(agents[i] for i in pick)
