"""The regional running sums of encrypted update chunks (pure: no I/O, no clock).

An agent's update arrives as ``codec.num_chunks`` independently addable payloads, possibly
interleaved with other agents' chunks and possibly redelivered (MQTT QoS 1 is at-least-once).
:class:`RegionalSum` verifies every chunk when it arrives (:func:`schemas.verify.verify_chunk`:
frame, layout, plan, fingerprint, ``summands == 1``, ciphertexts load), holds at most one copy of
each ``(agent, chunk)`` and folds an agent only when all of its chunks are there and verified, so
a sum never holds part of an update and a bad last chunk changes nothing. Duplicates are answered
without being stored (``add_chunk`` returns ``False`` before parsing anything), which is what
makes the aggregation exactly-once on top of at-least-once transport and keeps memory flat under
replay floods: memory is the group sums plus at most one update per agent in flight.

Groups: the region sums its agents in disjoint groups of at least ``min_group`` agents (the
privacy floor k), each group a separate partial, so that a total that fails the global's bounds
can be narrowed down to one group without ever decrypting fewer than k agents. Agents are dealt
into groups by a seeded shuffle per round (a thief's group mates change from round to round);
at the flush, groups that ended with fewer than k agents are merged into others.

Addition happens on ciphertexts (or int64 plaintext frames); the region never holds a secret key.

Robust rules (plaintext mode only, a trusted region): with ``robust=`` a rule of
:mod:`regional_aggregator.robust`, the region keeps each agent's values (memory: one update per
agent, which only a trusted plaintext deployment can afford) and forwards, as one group, the rule's
aggregate ``u`` of the agents' un-weighted deltas ``q_i * cap / w_i`` expressed as a sum the
global already understands: ``rint(u * W / cap)`` with weight ``W = sum w_i``, so the global's
average returns ``u``. ``u`` is first clamped to the round's per-coordinate range and L2 clip, so
the forwarded sum respects the same bounds as an honest plain sum.

Example:
    >>> rs = RegionalSum(codec, round_id=3, expected=["agent-000", "agent-001"], min_group=2)
    >>> for i, payload in enumerate(codec.encode(delta, num_samples, seed)):
    ...     rs.add_chunk("agent-000", i, codec.num_chunks, payload, weight=codec.weight(n))
    True
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from regional_aggregator.robust import RobustRule
from schemas import quantize
from schemas.accumulator import Accumulator
from schemas.errors import InvalidMessage, Reason
from schemas.framing import Chunk
from schemas.plan import is_coarse_weight
from schemas.verify import verify_chunk, whole


@dataclass(frozen=True)
class Group:
    """One group's share of a partial: its agents (sorted), their clear weights, the sums."""

    agents: list[str]
    weights: list[int]
    payloads: list[bytes]
    multiplicities: list[int] = field(default_factory=list)  # FedBuff: each agent's

    @property
    def devices(self) -> int:
        """Distinct devices (a FedBuff key is ``<device>@<round>``)."""
        return len({device_of(a) for a in self.agents})


def device_of(key: str) -> str:
    """The device of a summing key: the device id, or ``<device>@<round>`` in FedBuff."""
    return key.partition("@")[0]


def deal_groups(agents: Sequence[str], min_group: int, max_groups: int, seed: int,
                round_id: int, region: str, suspects: Sequence[str] = ()) -> dict[str, int]:
    """Agent -> group index: agents dealt round-robin into
    ``max(1, min(max_groups, len(agents) // min_group))`` groups in a seeded shuffled order,
    suspects first, so that no two suspects share a group while there are enough groups."""
    ordered = sorted(agents)
    n_groups = max(1, min(max_groups, len(ordered) // max(1, min_group)))
    h = hashlib.sha256(f"fedstream/groups/v1|{seed}|{round_id}|{region}".encode()).digest()
    perm = np.random.default_rng(int.from_bytes(h[:8], "big")).permutation(len(ordered))
    shuffled = [ordered[j] for j in perm]
    flagged = set(suspects)
    order = [a for a in shuffled if a in flagged] + [a for a in shuffled if a not in flagged]
    return {a: pos % n_groups for pos, a in enumerate(order)}


class RegionalSum:
    """Per-group homomorphic running sums of one round in one region.

    Args:
        codec: the round's codec (public context).
        round_id: the round.
        expected: the agents asked for this round (others are refused before reaching here).
        min_group: the privacy floor k (no group of fewer agents is ever forwarded).
        max_groups: at most this many groups (each costs one model-sized sum in memory and one
            partial on Kafka).
        seed, region: seed of the group shuffle.
        suspects: agents whose group failed recently; dealt into different groups.
    """

    def __init__(self, codec: Any, round_id: int, *, expected: Sequence[str] | None,
                 min_group: int = 1, max_groups: int = 8, seed: int = 0,
                 region: str = "", suspects: Sequence[str] = (),
                 robust: RobustRule | None = None) -> None:
        if min_group < 1 or max_groups < 1:
            raise ValueError("min_group and max_groups must be at least 1")
        if robust is not None and codec.params.encrypted:
            raise ValueError("robust rules need plaintext mode: a region cannot see encrypted "
                             "updates")
        self.robust = robust
        self._values: dict[str, np.ndarray] = {}  # robust mode: each agent's int64 values
        self.codec = codec
        self.round_id = round_id
        self.min_group = min_group
        self._num_chunks: int = codec.num_chunks
        # expected=None: open membership (FedBuff: any key the caller vouches for, one group)
        self._open = expected is None
        self._group_of = {} if expected is None else deal_groups(
            expected, min_group, max_groups, seed, round_id, region, suspects)
        n_groups = max(self._group_of.values(), default=0) + 1
        self._accs = [Accumulator(codec) for _ in range(n_groups)]
        self._members: list[list[str]] = [[] for _ in range(n_groups)]
        self._weights: dict[str, int] = {}
        self._times: dict[str, int] = {}
        self._folded: set[str] = set()
        self._pending: dict[str, dict[int, Chunk]] = {}

    def next_batch(self) -> RegionalSum:
        """A new, empty sum for the same round (the next batch of a replica), holding the
        chunks of agents still in flight here (already verified, not yet folded)."""
        nxt = RegionalSum.__new__(RegionalSum)
        nxt.__dict__.update(self.__dict__)
        n_groups = len(self._accs)
        nxt._accs = [Accumulator(self.codec) for _ in range(n_groups)]
        nxt._members = [[] for _ in range(n_groups)]
        nxt._values = {}
        nxt._folded = set()
        nxt._pending = self._pending
        nxt._weights = {a: self._weights[a] for a in self._pending if a in self._weights}
        nxt._times = {a: self._times[a] for a in self._pending if a in self._times}
        self._pending = {}
        return nxt

    def is_duplicate(self, agent_id: str, chunk_index: int) -> bool:
        """Whether ``(agent, chunk)`` is already held (then the chunk needs no parsing)."""
        return agent_id in self._folded or chunk_index in self._pending.get(agent_id, {})

    def add_chunk(self, agent_id: str, chunk_index: int, chunk_count: int, payload: bytes,
                  weight: int = 0, times: int = 1) -> bool:
        """Verify and accept one chunk of ``agent_id``'s update (``weight``: chunk 0's clear
        weight; ``times``: its multiplicity, FedBuff's staleness weight, given with chunk 0).

        Returns:
            ``True`` if the chunk was new, ``False`` for a duplicate ``(agent, chunk)`` (ignored,
            not parsed, not stored).

        Raises:
            InvalidMessage: ``not_selected``, ``wrong_chunk_count``, ``chunk_index_out_of_range``,
                ``bad_weight``, or any reason of :func:`schemas.verify.verify_chunk`. A refused
                chunk leaves every state unchanged.
        """
        if agent_id not in self._group_of and not self._open:
            raise InvalidMessage(Reason.NOT_SELECTED, f"{agent_id} is not expected this round")
        if chunk_count != self._num_chunks:
            raise InvalidMessage(Reason.WRONG_CHUNK_COUNT, f"{agent_id} sent chunk_count "
                                 f"{chunk_count}, round uses {self._num_chunks}")
        if not 0 <= chunk_index < self._num_chunks:
            raise InvalidMessage(Reason.CHUNK_INDEX_OUT_OF_RANGE,
                                 f"{agent_id} sent chunk {chunk_index} of {self._num_chunks}")
        if self.is_duplicate(agent_id, chunk_index):
            return False
        if chunk_index == 0 and not is_coarse_weight(weight, self.codec.params.weight_cap):
            raise InvalidMessage(Reason.BAD_WEIGHT, f"{agent_id} declared weight {weight}: not "
                                 f"a coarse weight in 1..{self.codec.params.weight_cap}")
        chunk = verify_chunk(self.codec, payload, index=chunk_index, summands=1,
                             weight=weight if chunk_index == 0 else None)
        buffered = self._pending.setdefault(agent_id, {})
        buffered[chunk_index] = chunk
        if chunk_index == 0:
            self._weights[agent_id] = weight
            self._times[agent_id] = times
        if len(buffered) == self._num_chunks:
            chunks = whole(self.codec, self._pending.pop(agent_id))
            if self.robust is not None:
                self._values[agent_id] = np.concatenate([c.ints().astype(np.int64)
                                                         for c in chunks])
            g = self._group_of.get(agent_id, 0)
            self._accs[g].add(chunks, self._times[agent_id])
            self._members[g].append(agent_id)
            self._folded.add(agent_id)
        return True

    @property
    def agents(self) -> list[str]:
        """Sorted ids of the agents whose whole update is in the sums."""
        return sorted(self._folded)

    @property
    def num_agents(self) -> int:
        return len(self._folded)

    @property
    def summands(self) -> int:
        """Summands folded (each agent's multiplicity)."""
        return sum(self._times[a] for a in self._folded)

    @property
    def in_flight(self) -> list[str]:
        """Sorted ids of agents with some, but not all, chunks received."""
        return sorted(self._pending)

    def has(self, agent_id: str) -> bool:
        """Whether ``agent_id``'s whole update is folded into the sums."""
        return agent_id in self._folded

    def groups(self) -> list[Group]:
        """The partial: disjoint groups of at least ``min_group`` agents covering every folded
        agent (groups that ended too small are merged), or ``[]`` if fewer than ``min_group``
        agents arrived in all."""
        if self.robust is not None:
            return self._robust_group()
        def size(g: tuple[list[str], Accumulator]) -> tuple[int, list[str]]:
            return len({device_of(a) for a in g[0]}), g[0]  # the floor counts devices

        live = [(sorted(m), acc) for m, acc in zip(self._members, self._accs) if m]
        live.sort(key=size)
        while len(live) > 1 and size(live[0])[0] < self.min_group:
            (a, acc_a), (b, acc_b) = live[0], live[1]
            merged = (sorted(a + b), Accumulator.total(self.codec, [acc_a, acc_b]))
            live = sorted([merged, *live[2:]], key=size)
        if not live or size(live[0])[0] < self.min_group:
            return []
        live.sort(key=lambda g: g[0])
        return [Group(agents, [self._weights[a] for a in agents], acc.payloads(),
                      [self._times[a] for a in agents])
                for agents, acc in live]

    def _robust_group(self) -> list[Group]:
        agents = sorted(self._values)
        if len(agents) < self.min_group:
            return []
        p = self.codec.params
        weights = [self._weights[a] for a in agents]
        u = np.stack([self._values[a] * (p.weight_cap / w) for a, w in zip(agents, weights)])
        assert self.robust is not None
        agg = self.robust.aggregate(u, np.asarray(weights, np.float64)).delta
        qmax = quantize.qmax(p.bits)
        agg = np.clip(agg, -qmax, qmax)
        norm, limit = float(np.linalg.norm(agg)), p.clip_l2 / p.scale
        if norm > limit:
            agg = agg * (limit / norm)
        total_w = sum(weights)
        q = np.rint(agg * (total_w / p.weight_cap)).astype("<i8")
        per = self.codec.plan.params_per_chunk
        payloads = [self.codec.framer.frame_plain(c, len(agents), total_w if c == 0 else 0,
                                                  q[c * per:(c + 1) * per])
                    for c in range(self.codec.num_chunks)]
        return [Group(agents, weights, payloads)]

    def partial(self) -> list[bytes]:
        """The sum over every folded agent as one payload per chunk (tests, benchmarks)."""
        if not self._folded:
            raise InvalidMessage(Reason.INCOMPLETE,
                                 f"round {self.round_id}: no complete agent update to sum yet")
        return Accumulator.total(self.codec, self._accs).payloads()
