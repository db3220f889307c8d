"""The regional running sum of encrypted update chunks (pure: no I/O, no clock).

An agent's update arrives as ``codec.num_chunks`` independently addable payloads, possibly
interleaved with other agents' chunks and possibly redelivered (MQTT QoS 1 is at-least-once).
:class:`RegionalSum` buffers an agent's chunks until all of them are there and only then folds
them into the per-chunk running sums, so a partial always covers whole agents, and memory is about
one model (the sums) plus the agents still in flight. Duplicates by ``(agent, chunk)`` are
ignored, which is what makes the aggregation exactly-once on top of at-least-once transport.

Addition happens on ciphertexts (or int64 plaintext frames) through ``codec.add``; the region never
holds a secret key. Because the codec's sums are exact integers, the order in which agents fold
does not change the decrypted total.

Example:
    >>> rs = RegionalSum(codec, round_id=3)
    >>> for i, payload in enumerate(codec.encode(delta, num_samples, seed)):
    ...     rs.add_chunk("agent-000", i, codec.num_chunks, payload)
    True
    >>> rs.agents, len(rs.partial()) == codec.num_chunks
    (['agent-000'], True)
"""

from __future__ import annotations

from typing import Any

from schemas.errors import InvalidMessage


class RegionalSum:
    """Per-chunk homomorphic running sum of one round in one region."""

    def __init__(self, codec: Any, round_id: int) -> None:
        self.codec = codec
        self.round_id = round_id
        self._num_chunks: int = codec.num_chunks
        # The codec's accumulator keeps the running sums deserialized (one deserialize and one
        # add per ciphertext per update); codecs without one fall back to ``codec.add``.
        make_acc = getattr(codec, "accumulator", None)
        self._acc = make_acc() if make_acc is not None else None
        self._sums: list[bytes | None] = [None] * self._num_chunks
        self._folded: set[str] = set()
        self._pending: dict[str, dict[int, bytes]] = {}

    def add_chunk(self, agent_id: str, chunk_index: int, chunk_count: int, payload: bytes) -> bool:
        """Accept one chunk of ``agent_id``'s update.

        Returns:
            ``True`` if the chunk was new, ``False`` for a duplicate ``(agent, chunk)`` (ignored).

        Raises:
            InvalidMessage: ``wrong_chunk_count`` if ``chunk_count`` differs from the codec's,
                ``chunk_index_out_of_range``, or ``chunk_index_mismatch`` if the payload's own
                header names another chunk.
        """
        if chunk_count != self._num_chunks:
            raise InvalidMessage(
                "wrong_chunk_count",
                f"{agent_id} sent chunk_count {chunk_count}, round uses {self._num_chunks}",
            )
        if not 0 <= chunk_index < self._num_chunks:
            raise InvalidMessage(
                "chunk_index_out_of_range",
                f"{agent_id} sent chunk {chunk_index} of {self._num_chunks}",
            )
        if agent_id in self._folded or chunk_index in self._pending.get(agent_id, {}):
            return False
        header_index = self.codec.chunk_index(payload)
        if header_index != chunk_index:
            raise InvalidMessage(
                "chunk_index_mismatch",
                f"{agent_id} labelled chunk {header_index} as chunk {chunk_index}",
            )
        buffered = self._pending.setdefault(agent_id, {})
        buffered[chunk_index] = payload
        if len(buffered) == self._num_chunks:
            self._fold(agent_id, self._pending.pop(agent_id))
        return True

    def _fold(self, agent_id: str, chunks: dict[int, bytes]) -> None:
        for i in range(self._num_chunks):
            if self._acc is not None:
                self._acc.add(chunks[i])
                continue
            acc = self._sums[i]
            self._sums[i] = chunks[i] if acc is None else self.codec.add(acc, chunks[i])
        self._folded.add(agent_id)

    @property
    def agents(self) -> list[str]:
        """Sorted ids of the agents whose whole update is in the sums."""
        return sorted(self._folded)

    @property
    def num_agents(self) -> int:
        return len(self._folded)

    @property
    def in_flight(self) -> list[str]:
        """Sorted ids of agents with some, but not all, chunks received."""
        return sorted(self._pending)

    def has(self, agent_id: str) -> bool:
        """Whether ``agent_id``'s whole update is folded into the sums."""
        return agent_id in self._folded

    def partial(self) -> list[bytes]:
        """One summed payload per chunk index, covering exactly :attr:`agents`.

        Raises:
            ValueError: if no agent has been folded yet.
        """
        if not self._folded:
            raise ValueError(f"round {self.round_id}: no complete agent update to sum yet")
        if self._acc is not None:
            return [self._acc.payload(i) for i in range(self._num_chunks)]
        return [s for s in self._sums if s is not None]
