"""What a region's replicas have committed: the partials topic read back (Kafka is the arbiter).

Several replicas of one regional aggregator share the region's updates through an MQTT shared
subscription. Each forwards its sums as *batches* (one Kafka transaction each, its own
transactional id). The partials topic orders every batch of every replica, and the global
aggregator applies one rule to that order: **the first group to name an agent wins**; a later
group naming it again is void (``agent_in_two_regions``: an encrypted sum cannot lose one
summand). A device that republishes after a reconnect may reach a second replica while the first
still holds its update, so two replicas can commit the same agent; :class:`Ledger` applies the
same rule to the same order, so every replica knows which of its groups counted:

- a replica acks the MQTT messages of an agent only once a group holding it is committed *and*
  valid; the messages of a void group stay unacknowledged, and the replica reconnects, so the
  broker redelivers them; agents already counted elsewhere are then acked as duplicates, the rest
  are summed again;
- a replica counts an agent as *covered* when a valid group or a decline names it, whichever
  replica wrote it: when the covered agents include every expected agent, the region's round is
  complete and the replica that sees it says so (``region_complete``);
- a restarted replica reads its own batches back (the same transactional id fenced its old
  incarnation first), so it never reuses a batch number and acks redelivered updates it had
  already committed.

:class:`Ledger` is pure (tested without Kafka); :class:`LedgerFollower` feeds it from the topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from schemas import fedstream_pb2 as pb
from schemas.errors import InvalidMessage
from schemas.kafka import CONSUMER_SIZES, MAX_MESSAGE_BYTES, KafkaConn
from schemas.signing import TrustStore, open_envelope
from schemas.topics import Topics

log = logging.getLogger("fedstream.ledger")
FEDBUFF_ROUND = 0  # FedBuff batches: one open-ended round (synchronous rounds start at 1)


@dataclass
class _RoundLedger:
    owner: dict[str, tuple[str, int]] = field(default_factory=dict)  # agent -> (batch, group)
    void: set[tuple[str, int]] = field(default_factory=set)
    seen: set[tuple[str, int]] = field(default_factory=set)
    declined: set[str] = field(default_factory=set)
    complete: bool = False
    batches: dict[str, int] = field(default_factory=dict)  # replica -> highest batch number


class Ledger:
    """One region's committed batches per round, in topic order (see the module docstring)."""

    def __init__(self, region: str) -> None:
        self.region = region
        self._rounds: dict[int, _RoundLedger] = {}

    def _round(self, round_id: int) -> _RoundLedger:
        return self._rounds.setdefault(round_id, _RoundLedger())

    def add(self, round_id: int, batch: str, group: int, agents: list[str], *,
            declined: Sequence[str] = (), complete: bool = False) -> bool:
        """Record one partial chunk of this region (chunk order within a group does not matter:
        the first chunk seen of ``(batch, group)`` decides). Returns whether the group counts."""
        rl = self._round(round_id)
        rl.declined.update(declined)
        rl.complete = rl.complete or complete
        replica, _, seq = batch.rpartition("/")
        if seq.isascii() and seq.isdigit():  # "¹".isdigit() is True
            rl.batches[replica] = max(rl.batches.get(replica, -1), int(seq))
        key = (batch, group)
        if not agents or key in rl.seen:
            return key not in rl.void
        rl.seen.add(key)
        if any(a in rl.owner for a in agents):
            rl.void.add(key)
            return False
        for a in agents:
            rl.owner[a] = key
        return True

    def counted(self, round_id: int) -> set[str]:
        """Agents summed in a valid group of ``round_id``, by any replica."""
        return set(self._round(round_id).owner)

    def is_counted(self, round_id: int, agent: str) -> bool:
        return agent in self._round(round_id).owner

    def covered(self, round_id: int) -> set[str]:
        """Agents counted or declined in ``round_id``."""
        rl = self._round(round_id)
        return set(rl.owner) | rl.declined

    def is_void(self, round_id: int, batch: str, group: int) -> bool:
        return (batch, group) in self._round(round_id).void

    def complete(self, round_id: int) -> bool:
        """Whether some replica closed the region's round."""
        return self._round(round_id).complete

    def next_batch(self, round_id: int, replica: str) -> int:
        """The first batch number ``replica`` has not used in ``round_id``."""
        return self._round(round_id).batches.get(replica, -1) + 1

    def forget_keys(self, round_id: int, keep: Callable[[str], bool]) -> None:
        """Drop the counted agents of ``round_id`` that ``keep`` rejects (FedBuff: base
        rounds too old to arrive again)."""
        rl = self._round(round_id)
        rl.owner = {a: g for a, g in rl.owner.items() if keep(a)}

    def forget_before(self, round_id: int) -> None:
        """Drop what is known of rounds before ``round_id`` (memory stays flat)."""
        for r in [r for r in self._rounds if r < round_id]:
            del self._rounds[r]


def well_formed(part: pb.PartialChunk) -> bool:
    """The structural checks the global makes before a group can count (so that a malformed
    partial, which the global refuses, never counts here either)."""
    n = len(part.agents)
    return (0 <= part.group < part.group_count <= 1024 or n == 0) and len(part.batch) <= 64 \
        and len(set(zip(part.agents, part.base_rounds or [0] * n))) == n \
        and len(part.weights) == n and len(part.multiplicities) in (0, n) \
        and len(part.base_rounds) in (0, n)


class LedgerFollower:
    """Feeds a :class:`Ledger` from the partials topic (``read_committed``: aborted batches of a
    fenced incarnation never count), from ``since_ms`` on, and says how far it has read."""

    def __init__(self, kafka: KafkaConn, topics: Topics, trust: TrustStore, ledger: Ledger,
                 *, on_change: Callable[[int], None] | None = None,
                 retry_s: float = 1.0) -> None:
        self.kafka, self.t, self.trust, self.ledger = kafka, topics, trust, ledger
        self.on_change = on_change
        self.retry_s = retry_s
        self.tp = TopicPartition(topics.partials, 0)
        self.consumer: AIOKafkaConsumer | None = None
        self.position = 0
        self._moved = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self, since_ms: int, offset: int | None = None) -> None:
        """Read from the first record written at ``since_ms`` or later (or from ``offset``
        if that is earlier), to the end, then follow."""
        self.consumer = AIOKafkaConsumer(**self.kafka.kwargs(), enable_auto_commit=False,
                                         isolation_level="read_committed", **CONSUMER_SIZES)
        await self.consumer.start()
        self.consumer.assign([self.tp])
        found = (await self.consumer.offsets_for_times({self.tp: max(0, since_ms)}))[self.tp]
        end = (await self.consumer.end_offsets([self.tp]))[self.tp]
        start = min(found.offset if found is not None else end,
                    offset if offset is not None else end)
        self.consumer.seek(self.tp, start)
        self.position = start
        await self.caught_up()
        self._task = asyncio.create_task(self._follow(), name="ledger")

    async def caught_up(self, past: int | None = None) -> None:
        """Read until the partition's end as of now (or past offset ``past``)."""
        assert self.consumer is not None
        if past is None:
            past = (await self.consumer.end_offsets([self.tp]))[self.tp] - 1
        while self.position <= past:
            if self._task is None:
                await self._read_some()
            else:
                self._moved.clear()
                await self._moved.wait()

    async def _read_some(self) -> None:
        assert self.consumer is not None
        batch = await self.consumer.getmany(self.tp, timeout_ms=200)
        changed: set[int] = set()
        for rec in batch.get(self.tp, []):
            try:
                part = open_envelope(rec.value, pb.PARTIAL_CHUNK, self.trust,
                                     max_bytes=MAX_MESSAGE_BYTES, topic=self.t.partials).body
            except InvalidMessage as exc:
                log.warning("partial at offset %d unreadable: %s", rec.offset, exc)
                continue
            if part.region == self.ledger.region and part.header.sender == part.region \
                    and well_formed(part):
                if part.base_rounds:  # FedBuff: keys <agent>@<base round>, one open round
                    keys = [f"{a}@{b}" for a, b in zip(part.agents, part.base_rounds)]
                    self.ledger.add(FEDBUFF_ROUND, part.batch, part.group, keys)
                    changed.add(FEDBUFF_ROUND)
                    continue
                self.ledger.add(part.header.round, part.batch, part.group, list(part.agents),
                                declined=list(part.declined), complete=part.region_complete)
                changed.add(part.header.round)
        # the position passes aborted transactions and markers as well as records
        self.position = await self.consumer.position(self.tp)
        self._moved.set()
        if self.on_change is not None:
            for r in sorted(changed):
                self.on_change(r)

    async def _follow(self) -> None:
        while True:
            try:
                await self._read_some()
            except KafkaError as exc:
                log.warning("partials read-back failed (%s); retrying", exc)
                await asyncio.sleep(self.retry_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.consumer.stop(), 5)
