"""Client sampling: which agents train in a round, the same choice in simulation and services."""

from __future__ import annotations

import numpy as np


def sample_indices(
    num_agents: int, fraction: float, seed: int, round_id: int, dropout: float = 0.0
) -> tuple[list[int], list[int]]:
    """``(sampled, delivering)`` agent indices of a round, both sorted.

    ``max(1, round(fraction * num_agents))`` agents are drawn without replacement from a generator
    keyed by (seed, round) only, so every process that knows the fleet makes the same choice;
    ``dropout`` (simulation only) then drops each sampled agent with that probability, drawn
    after the sample so that it never changes who is sampled.
    """
    rng = np.random.default_rng([seed, round_id, 0x5A])
    m = max(1, int(round(fraction * num_agents)))
    sampled = sorted(rng.choice(num_agents, size=m, replace=False).tolist())
    keep = rng.random(len(sampled)) >= dropout
    return sampled, [a for a, k in zip(sampled, keep, strict=True) if k]


def select_agents(agents: list[str], fraction: float, seed: int, round_id: int) -> list[str]:
    """The agents asked to train in ``round_id`` (agent ids sort in index order: agent-000...)."""
    agents = sorted(agents)
    sampled, _ = sample_indices(len(agents), fraction, seed, round_id)
    return [agents[i] for i in sampled]
