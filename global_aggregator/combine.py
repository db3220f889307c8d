"""Combining the regions' encrypted partial sums into the round's average delta (pure).

Each region sends its partial as ``codec.num_chunks`` payloads (one Kafka message per chunk), each
tagged with the agents it covers. :class:`GlobalRound` drops duplicates by ``(region, chunk)``,
folds a region into the running total once all its chunks are there, and :meth:`GlobalRound.finish`
decrypts ONLY the total — one ``codec.decode`` per round — and turns it into the weighted mean
delta with ``codec.average``. No single region's partial, let alone an agent's update, is ever
decrypted.

Example:
    >>> gr = GlobalRound(codec, round_id=3)
    >>> for i, payload in enumerate(regional_sum.partial()):
    ...     gr.add_partial("region-0", i, payload, regional_sum.agents)
    >>> avg_delta, weight_sum, n = gr.finish()
    >>> params, opt_state = next_model(opt, params, opt_state, avg_delta)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from global_aggregator.strategies import OptState, server_step
from schemas.errors import InvalidMessage


class GlobalRound:
    """The global tier's state for one round: partial chunks in, one decryption out."""

    def __init__(self, codec: Any, round_id: int, min_agents_per_partial: int = 1) -> None:
        self.codec = codec
        self.round_id = round_id
        self.min_agents_per_partial = min_agents_per_partial
        self._num_chunks: int = codec.num_chunks
        self._total: list[bytes | None] = [None] * self._num_chunks
        self._pending: dict[str, dict[int, bytes]] = {}
        self._agents: dict[str, list[str]] = {}
        self._complete: set[str] = set()

    def add_partial(self, region: str, chunk_index: int, payload: bytes, agents: list[str]) -> bool:
        """Accept one chunk of ``region``'s partial sum.

        Returns:
            ``True`` if new, ``False`` for a duplicate ``(region, chunk_index)`` (ignored).

        Raises:
            InvalidMessage: ``chunk_index_out_of_range``, ``chunk_index_mismatch``,
                ``too_few_agents`` (below ``min_agents_per_partial``), ``agents_mismatch`` (chunks
                of one region naming different agents), ``agent_in_two_regions``.
        """
        if not 0 <= chunk_index < self._num_chunks:
            raise InvalidMessage(
                "chunk_index_out_of_range", f"{region} sent chunk {chunk_index}/{self._num_chunks}"
            )
        if region in self._complete or chunk_index in self._pending.get(region, {}):
            return False
        agents = sorted(agents)
        if len(agents) < self.min_agents_per_partial or len(set(agents)) != len(agents):
            raise InvalidMessage(
                "too_few_agents",
                f"{region}'s partial covers {len(set(agents))} distinct agents, "
                f"need {self.min_agents_per_partial}",
            )
        known = self._agents.get(region)
        if known is not None and known != agents:
            raise InvalidMessage("agents_mismatch", f"{region}'s chunks name different agents")
        if known is None:
            for other, theirs in self._agents.items():
                if set(theirs) & set(agents):
                    raise InvalidMessage(
                        "agent_in_two_regions",
                        f"{sorted(set(theirs) & set(agents))} in both {other} and {region}",
                    )
        header_index = self.codec.chunk_index(payload)
        if header_index != chunk_index:
            raise InvalidMessage(
                "chunk_index_mismatch", f"{region} labelled chunk {header_index} as {chunk_index}"
            )
        self._agents[region] = agents
        buffered = self._pending.setdefault(region, {})
        buffered[chunk_index] = payload
        if len(buffered) == self._num_chunks:
            chunks = self._pending.pop(region)
            for i in range(self._num_chunks):
                acc = self._total[i]
                self._total[i] = chunks[i] if acc is None else self.codec.add(acc, chunks[i])
            self._complete.add(region)
        return True

    @property
    def complete_regions(self) -> list[str]:
        """Sorted regions whose whole partial is in the total."""
        return sorted(self._complete)

    @property
    def participants(self) -> dict[str, list[str]]:
        """Complete regions -> sorted agents their partial covers."""
        return {r: self._agents[r] for r in sorted(self._complete)}

    @property
    def num_participants(self) -> int:
        return sum(len(self._agents[r]) for r in self._complete)

    def has(self, region: str) -> bool:
        return region in self._complete

    def finish(self) -> tuple[np.ndarray, int, int]:
        """Decrypt the total once and average it.

        Returns:
            ``(avg_delta float32, weight_sum, num_participants)``; ``weight_sum`` is the codec's
            integer sum of the participants' (capped, quantized) sample-count weights.

        Raises:
            ValueError: if no region is complete.
        """
        if not self._complete:
            raise ValueError(f"round {self.round_id}: no complete partial to decrypt")
        qsum, weight_sum = self.codec.decode([t for t in self._total if t is not None])
        avg = np.asarray(self.codec.average(qsum, weight_sum), dtype=np.float32)
        return avg, int(weight_sum), self.num_participants


def next_model(
    opt: Any, params: np.ndarray, opt_state: OptState, avg_delta: np.ndarray
) -> tuple[np.ndarray, OptState]:
    """The next model version: one server optimizer step (see :func:`server_step`)."""
    return server_step(opt, params, opt_state, avg_delta)
