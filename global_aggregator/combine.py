"""Combining the regions' encrypted group sums into the round's average delta (pure).

Each region sends its partial as disjoint groups of at least k agents (the privacy floor), each
group as ``codec.num_chunks`` payloads (one Kafka message per chunk) tagged with its agents and
their clear, range-checked weights. :class:`GlobalRound` verifies every chunk whole before it
counts (:func:`schemas.verify.verify_chunk` with ``summands`` = the group's size), drops
duplicates by ``(region, group, chunk)`` and folds a group once all its chunks are there.

:meth:`GlobalRound.finish` decrypts the total of all groups once and checks it against what
honest devices can produce (:func:`schemas.verify.check_sum`: the decrypted weight sum equals the
clear weights; the L2 norm is within the clipping bound). Only if that fails does it narrow the
failure down, never decrypting a sum of fewer than k agents: each region's total, then each
group of a failing region. Failing groups are left out, the round closes with the others, and
the result says who was excluded and why. No input makes it raise: a round always ends.

Example:
    >>> gr = GlobalRound(codec, round_id=3, min_group=2)
    >>> for g, group in enumerate(regional_sum.groups()):
    ...     for i, payload in enumerate(group.payloads):
    ...         gr.add_partial("region-0", g, n_groups, i, payload, group.agents, group.weights)
    >>> result = gr.finish()
    >>> params, opt_state = next_model(opt, params, opt_state, result.avg_delta)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from global_aggregator.strategies import OptState, server_step
from schemas.accumulator import Accumulator
from schemas.errors import BoundsExceeded, InvalidMessage, Reason
from schemas.framing import Chunk
from schemas.plan import is_coarse_weight
from schemas.verify import check_sum, verify_chunk, whole


@dataclass(frozen=True)
class Excluded:
    """A group left out of the round: where, who, and the check it failed."""

    region: str
    agents: list[str]
    reason: Reason
    detail: str


@dataclass
class RoundResult:
    """What a round produced: the average delta (``None``: nothing usable, model unchanged)."""

    avg_delta: np.ndarray | None
    weight_sum: int
    participants: dict[str, list[str]]
    excluded: list[Excluded] = field(default_factory=list)
    #: FedBuff: region -> (agent, base round, multiplicity) of every update that counted
    updates: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)
    #: devices in each sum that was decrypted, in order (the privacy accounting's releases)
    releases: list[int] = field(default_factory=list)

    @property
    def num_participants(self) -> int:
        return sum(len(a) for a in self.participants.values())


@dataclass
class _Group:
    agents: list[str]
    weights: list[int]
    multiplicities: list[int]
    base_rounds: list[int]
    chunks: dict[int, Chunk] = field(default_factory=dict)
    acc: Accumulator | None = None

    @property
    def weight(self) -> int:
        return sum(w * m for w, m in zip(self.weights, self.multiplicities))

    @property
    def summands(self) -> int:
        return sum(self.multiplicities)

    @property
    def keys(self) -> list[tuple[str, int]]:
        return list(zip(self.agents, self.base_rounds))


class GlobalRound:
    """The global tier's state for one round: group sums in, checked average out."""

    def __init__(self, codec: Any, round_id: int, min_group: int = 1,
                 counted: Sequence[tuple[str, int]] = ()) -> None:
        """``counted``: (agent, base round) already counted by earlier FedBuff steps, refused
        here as they would be in the step that counted them."""
        if min_group < 1:
            raise ValueError("min_group must be at least 1")
        self.codec = codec
        self.round_id = round_id
        self.min_group = min_group
        self._num_chunks: int = codec.num_chunks
        self._groups: dict[str, dict[tuple[str, int], _Group]] = {}
        self._group_count: dict[tuple[str, str], int] = {}  # (region, batch) -> its groups
        # agent (FedBuff: agent and base round) -> (region, batch, group) that counted it
        self._owner: dict[tuple[str, int], tuple[str, str, int]] = {
            (a, int(b)): ("an earlier step", "", -1) for a, b in counted}
        self.summands = 0  # of every group admitted so far (FedBuff steps watch the budget)
        self.releases: list[int] = []  # devices in every sum decrypted so far

    def add_partial(self, region: str, group: int, group_count: int, chunk_index: int,
                    payload: bytes, agents: Sequence[str], weights: Sequence[int],
                    batch: str = "", multiplicities: Sequence[int] = (),
                    base_rounds: Sequence[int] = ()) -> bool:
        """Verify and accept one chunk of one group of ``region``'s partial (of its ``batch``,
        for a region served by several replicas: each batch is a separate set of groups).
        FedBuff groups give each agent's ``base_rounds`` (an agent may count once per base
        round) and ``multiplicities`` (the group then holds ``sum(multiplicities)`` summands).

        Returns:
            ``True`` if new, ``False`` for a duplicate ``(region, batch, group, chunk)``
            (ignored).

        Raises:
            InvalidMessage: ``bad_group``, ``too_few_agents`` (below the privacy floor),
                ``bad_weight``, ``agents_mismatch`` (chunks of one group naming different
                agents), ``agent_in_two_regions`` (or in two groups), or any reason of
                :func:`schemas.verify.verify_chunk`. A refused chunk changes no state.
        """
        known_count = self._group_count.get((region, batch))
        if not 1 <= group_count <= 1024 or not 0 <= group < group_count \
                or (known_count is not None and known_count != group_count) \
                or len(batch) > 64:
            raise InvalidMessage(Reason.BAD_GROUP, f"{region} sent group {group} of "
                                 f"{group_count} (known count: {known_count}) of batch "
                                 f"{batch[:64]!r}")
        g = self._groups.get(region, {}).get((batch, group))
        if g is not None and (g.acc is not None or chunk_index in g.chunks):
            return False
        agents = list(agents)
        weights = [int(w) for w in weights]
        mult = [int(m) for m in multiplicities] or [1] * len(agents)
        bases = [int(b) for b in base_rounds] or [0] * len(agents)
        keys = list(zip(agents, bases))
        if len(set(agents)) < self.min_group or len(set(keys)) != len(keys):
            raise InvalidMessage(Reason.TOO_FEW_AGENTS,
                                 f"{region} group {group} covers {len(set(agents))} distinct "
                                 f"agents, the privacy floor is {self.min_group}")
        cap = self.codec.params.weight_cap
        if len(weights) != len(agents) or not all(is_coarse_weight(w, cap) for w in weights):
            raise InvalidMessage(Reason.BAD_WEIGHT,
                                 f"{region} group {group}: weights {weights[:8]} do not match "
                                 f"its {len(agents)} agents or are not coarse weights <= {cap}")
        if len(mult) != len(agents) or len(bases) != len(agents) \
                or not all(1 <= m <= 64 for m in mult):
            raise InvalidMessage(Reason.BAD_GROUP,
                                 f"{region} group {group}: multiplicities {mult[:8]} or base "
                                 f"rounds {bases[:8]} do not match its {len(agents)} agents")
        order = sorted(range(len(agents)), key=keys.__getitem__)
        agents, weights = [agents[i] for i in order], [weights[i] for i in order]
        mult, bases = [mult[i] for i in order], [bases[i] for i in order]
        if g is not None and (g.agents != agents or g.weights != weights
                              or g.multiplicities != mult or g.base_rounds != bases):
            raise InvalidMessage(Reason.AGENTS_MISMATCH,
                                 f"{region} group {group}'s chunks name different agents")
        if g is None:
            for key in zip(agents, bases):
                if key in self._owner:  # the first group to name an agent wins
                    raise InvalidMessage(Reason.AGENT_IN_TWO_REGIONS,
                                         f"{key[0]} in {self._owner[key]} and in ({region}, "
                                         f"{batch!r}, {group})")
        chunk = verify_chunk(self.codec, payload, index=chunk_index, summands=sum(mult),
                             weight=sum(w * m for w, m in zip(weights, mult)))
        if g is None:
            g = self._groups.setdefault(region, {}).setdefault(
                (batch, group), _Group(agents, weights, mult, bases))
            self._group_count[(region, batch)] = group_count
            self.summands += g.summands
            for key in zip(agents, bases):
                self._owner[key] = (region, batch, group)
        g.chunks[chunk_index] = chunk
        if len(g.chunks) == self._num_chunks:
            g.acc = Accumulator(self.codec)
            g.acc.add(whole(self.codec, g.chunks))
            g.chunks = {}
        return True

    def _complete_groups(self, region: str) -> list[_Group]:
        return [g for _, g in sorted(self._groups.get(region, {}).items()) if g.acc is not None]

    def batches_complete(self, region: str) -> bool:
        """Whether every group of every batch seen from ``region`` is in."""
        done = self._complete_groups(region)
        return len(done) == sum(n for (r, _), n in self._group_count.items() if r == region)

    @property
    def complete_regions(self) -> list[str]:
        """Sorted regions whose every group (of every batch seen) is in."""
        return sorted(r for r in {r for r, _ in self._group_count} if self.batches_complete(r))

    @property
    def participants(self) -> dict[str, list[str]]:
        """Regions -> sorted agents of their complete groups (a group is all or nothing)."""
        out = {}
        for r in sorted(self._groups):
            agents = sorted(a for g in self._complete_groups(r) for a in g.agents)
            if agents:
                out[r] = agents
        return out

    @property
    def num_participants(self) -> int:
        return sum(len(a) for a in self.participants.values())

    def has(self, region: str) -> bool:
        return region in self.complete_regions

    # ------------------------------------------------------------------ decrypt and check

    def _test(self, groups: list[_Group]) -> tuple[np.ndarray, int] | BoundsExceeded:
        """Decrypt the sum of ``groups`` (>= k agents by construction) and check its bounds."""
        accs = [g.acc for g in groups if g.acc is not None]
        total = Accumulator.total(self.codec, accs)
        n, clear = total.summands, sum(g.weight for g in groups)
        self.releases.append(sum(len(g.agents) for g in groups))
        try:
            qsum, weight = total.decode()
            check_sum(self.codec, qsum, weight, summands=n, clear_weight=clear)
        except BoundsExceeded as exc:
            return exc
        return qsum, weight

    def finish(self) -> RoundResult:
        """Decrypt the total once; if it fails its bounds, isolate and leave out the failing
        groups (regions first, then groups inside a failing region). Never raises for input."""
        regions = {r: self._complete_groups(r) for r in sorted(self._groups)}
        regions = {r: gs for r, gs in regions.items() if gs}
        every = [g for gs in regions.values() for g in gs]
        if not every:
            return RoundResult(None, 0, {}, releases=self.releases)
        first = self._test(every)
        if not isinstance(first, BoundsExceeded):
            qsum, weight = first
            return self._result(qsum, weight, regions, [])
        # Narrow down: a region's total, then its groups; sums of passing parts add up exactly.
        qsum = np.zeros(self.codec.num_params, np.int64)
        weight = 0
        kept: dict[str, list[_Group]] = {}
        excluded: list[Excluded] = []
        for r, gs in regions.items():
            outcome = self._test(gs)
            if not isinstance(outcome, BoundsExceeded):
                qsum += outcome[0]
                weight += outcome[1]
                kept[r] = gs
                continue
            for g in gs:
                one = self._test([g]) if len(gs) > 1 else outcome
                if isinstance(one, BoundsExceeded):
                    excluded.append(Excluded(r, g.agents, one.reason, one.detail))
                else:
                    qsum += one[0]
                    weight += one[1]
                    kept.setdefault(r, []).append(g)
        if not kept:
            return RoundResult(None, 0, {}, excluded, releases=self.releases)
        return self._result(qsum, weight, kept, excluded)

    def _result(self, qsum: np.ndarray, weight: int, kept: dict[str, list[_Group]],
                excluded: list[Excluded]) -> RoundResult:
        avg = np.asarray(self.codec.average(qsum, weight), dtype=np.float32)
        participants = {r: sorted(a for g in gs for a in g.agents) for r, gs in kept.items()}
        updates = {r: sorted((a, b, m) for g in gs
                             for a, b, m in zip(g.agents, g.base_rounds, g.multiplicities))
                   for r, gs in kept.items()}
        return RoundResult(avg, int(weight), participants, excluded, updates, self.releases)


def next_model(
    opt: Any, params: np.ndarray, opt_state: OptState, avg_delta: np.ndarray
) -> tuple[np.ndarray, OptState]:
    """The next model version: one server optimizer step (see :func:`server_step`)."""
    return server_step(opt, params, opt_state, avg_delta)
