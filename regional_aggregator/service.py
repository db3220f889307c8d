"""The regional aggregator: MQTT in (manual ack), homomorphic running sum, Kafka out.

Delivery: the MQTT session is persistent and every update is acknowledged only after the partial
sum containing it has been committed to Kafka (one transaction per partial, so a multi-chunk
partial is written whole or not at all; the transactional id fences a zombie incarnation of the
same region). If this process dies first, Mosquitto redelivers every unacknowledged update to the next incarnation, which rebuilds
the same sum; duplicates by (round, agent, chunk) are dropped, and the global aggregator drops a
second partial for the same (round, region). Receipts naming the committed agents are published
after the commit, so edge agents can forget their update.

The region never holds a secret key: it only adds ciphertexts it cannot read. It does check all
it can see before anything changes state (signature bound to the update's own topic, membership,
quarantine, the clear weight's range, every chunk's layout and ``summands == 1``; see
:mod:`regional_aggregator.summing`), answers duplicates without storing them, limits each
device's message rate, and bounds its inbox (backpressure to the broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import Field, field_validator

from regional_aggregator.ratelimit import TokenBuckets
from regional_aggregator.robust import make_rule
from regional_aggregator.summing import RegionalSum
from schemas import fedstream_pb2 as pb
from schemas.cli import KafkaClient, MqttClient, ServiceSettings, tune_malloc
from schemas.codec import Codec
from schemas.errors import InvalidMessage, Reason
from schemas.fleet import FleetFollower
from schemas.kafka import CLIENT_SIZES, MAX_MESSAGE_BYTES, catch_up, ensure_topics, model_consumer
from schemas.keyring import Keyring
from schemas.mqtt import MAX_PACKET_BYTES, MqttLink
from schemas.signing import header, open_envelope, open_model_version, seal
from schemas.task import codec_params
from schemas.telemetry import (
    ACCEPTED,
    BYTES,
    DUPLICATES,
    INBOX_DEPTH,
    KAFKA_RETRIES,
    PROJECT_VERSIONS,
    ROUND,
    reject,
    serve,
)
from schemas.topics import Topics

VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,31}")
log = logging.getLogger("fedstream.regional")
SERVICE = "regional"


class RegionalSettings(ServiceSettings, MqttClient, KafkaClient):
    """fedstream-regional-aggregator: the summing service of one region. Takes the region's
    encrypted updates from MQTT (persistent session, manual ack), adds them without decrypting,
    writes the partial sums to Kafka, then acks and publishes receipts; relays each new model
    version from Kafka to the region's retained MQTT topic. Every flag is also an environment
    variable: FEDSTREAM_<FLAG> (e.g. FEDSTREAM_REGION)."""

    model_config = ServiceSettings.model_config | {
        "cli_prog_name": "fedstream-regional-aggregator"}

    region: str = Field(description="region id, e.g. region-0")
    keys: Path = Field(description="key directory (public HE context + the region's key)")
    model: str = Field("", description="project whose models to relay (default: whichever "
                       "the namespace carries)")
    min_agents_per_partial: int = Field(
        2, ge=1, description="privacy floor k: never forward a sum (a group) of fewer devices; "
        "the round task's floor applies if higher")
    max_groups: int = Field(
        8, ge=1, description="sum the region's devices in at most this many disjoint groups of "
        ">= k, so a poisoned total can be narrowed down to one group")
    max_message_bytes: int = Field(
        MAX_PACKET_BYTES, ge=1024, description="reject larger MQTT messages (the local stack's "
        "Mosquitto refuses them too)")
    inbox_size: int = Field(16, ge=1, description="MQTT messages held for verification before "
                            "backpressure")
    rate_per_s: float = Field(20.0, gt=0, description="sustained messages per second one "
                              "device may send")
    rate_burst: float = Field(200.0, ge=1, description="messages one device may send at once "
                              "(a whole republished update)")
    robust: str = Field(
        "", description="plaintext rounds only (a trusted region that sees updates): aggregate "
        "with a robust rule: median, trimmed:BETA, krum:F, multikrum:F:M, norm:C or mean "
        "(default: the plain sum)")
    kafka_retry_s: float = Field(1.0, gt=0, description="pause before retrying Kafka")
    kafka_timeout_s: float = Field(10.0, gt=0, description="one Kafka request's timeout")
    kafka_budget_s: float = Field(
        15.0, gt=0, description="seconds one attempt to commit a partial may take before it is "
        "retried with a new producer")

    @property
    def transactional_id(self) -> str:
        return f"{self.namespace}-regional-{self.region}"

    @field_validator("robust")
    @classmethod
    def _rule(cls, v: str) -> str:
        if v:
            make_rule(v)  # refuse nonsense at start-up
        return v

    @property
    def model_name(self) -> str:
        return self.model


@dataclass
class _Round:
    """What the region knows about the round in progress."""

    model: pb.ModelVersion
    task: pb.RoundTask
    codec: Codec
    expected: set[str]
    summer: RegionalSum
    quarantined: set[str] = field(default_factory=set)
    pending: list = field(default_factory=list)  # MQTT messages to ack after the commit
    eval: pb.EvalSums = field(default_factory=pb.EvalSums)
    flushing: bool = False  # the partial is being committed: its agent set is fixed
    flushed: bool = False
    update_bytes: int = 0
    committed_agents: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)  # agent -> its project version


class RegionalAggregator:
    def __init__(self, settings: RegionalSettings) -> None:
        self.s = settings
        self.t = Topics(settings.namespace)
        self.keys = Keyring.load(settings.keys, settings.region)
        me = self.keys.trust.get(settings.region)
        if me is None or me.role != "region":
            raise ValueError(f"{settings.region!r} is not a region of the trust store")
        self.kafka = settings.kafka_conn(settings.region, "region")
        self.mqtt_tls = settings.mqtt_tls(settings.region, "region")
        if not self.keys.trust.names(role="agent", region=settings.region):
            log.warning("%s: no devices yet; they join through the fleet topic (fedstream-fleet "
                        "enrol)", settings.region)
        self.round: _Round | None = None
        self.closed_round = 0  # every round up to this one is over for this region
        self._model_raw: bytes | None = None
        self._newest_version: int | None = None
        self._receipt_raw: bytes | None = None
        self._producer: AIOKafkaProducer | None = None
        self._round_changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._rate = TokenBuckets(settings.rate_per_s, settings.rate_burst)

    @property
    def agents(self) -> set[str]:
        """This region's devices now: the trust store, changed live by fleet records."""
        return set(self.keys.trust.names(role="agent", region=self.s.region))

    def _on_fleet_change(self, rec: pb.FleetRecord) -> None:
        """A device revoked mid-round: stop waiting for it (its updates are refused as
        ``revoked``; what it sent before stays summed, like any device's)."""
        r = self.round
        if rec.action != "revoke" or r is None or r.flushing or r.flushed:
            return
        if rec.identity in r.expected and rec.identity not in r.summer.agents:
            r.expected.discard(rec.identity)
            log.info("%s: %s revoked: round %d no longer waits for it", self.s.region,
                     rec.identity, r.task.round)
            if set(r.summer.agents) >= r.expected:
                self._round_changed.set()

    # -- model versions: Kafka -> retained MQTT ------------------------------------------------

    def _adopt(self, mv: pb.ModelVersion, raw: bytes) -> None:
        """Start the round carried by a newer model version and relay it to the edge."""
        newest = self._newest_version
        if newest is not None and mv.header.model_version <= newest:
            if mv.header.model_version < newest:
                raise InvalidMessage(Reason.STALE_VERSION, f"model v{mv.header.model_version} "
                                     f"is older than v{newest}, already relayed")
            return
        self._newest_version = mv.header.model_version
        self._model_raw = raw
        self.mqtt.publish(self.t.model(self.s.region), raw, retain=True)
        BYTES.labels(SERVICE, "mqtt_out").inc(len(raw))
        old = self.round
        self.closed_round = max(self.closed_round, mv.provenance.round)
        if old and not old.flushing and old.pending:
            # the round closed without our partial (global deadline): its updates are obsolete
            for agent in {*old.summer.agents, *old.summer.in_flight}:
                reject(SERVICE, InvalidMessage(
                    "round_closed", f"round {old.task.round} closed before {agent}'s update "
                    "was forwarded"), self.s.region)
            for msg in old.pending:
                self.mqtt.ack(msg)
        if mv.final or not mv.HasField("next_task"):
            self.round = None
            log.info("%s: final model version %d relayed", self.s.region, mv.header.model_version)
            self._round_changed.set()
            return
        task = mv.next_task
        if task.he_fingerprint != self.keys.he.fingerprint:
            raise InvalidMessage("wrong_fingerprint", "round task names another HE context")
        codec = Codec(codec_params(task.codec), mv.num_params,
                      self.keys.he if task.codec.encrypted else None)
        quarantined = set(task.quarantined_agents)
        expected = (set(task.selected_agents) or self.agents) & self.agents - quarantined
        k = max(self.s.min_agents_per_partial, task.min_group)
        summer = RegionalSum(codec, task.round, expected=sorted(expected), min_group=k,
                             max_groups=self.s.max_groups, seed=task.seed, region=self.s.region,
                             suspects=list(task.suspected_agents),
                             robust=make_rule(self.s.robust)
                             if self.s.robust and not task.codec.encrypted else None)
        self.round = _Round(mv, task, codec, expected, summer, quarantined)
        ROUND.labels(SERVICE).set(task.round)
        log.info("%s: round %d on model v%d, expecting %s", self.s.region, task.round,
                 mv.header.model_version, sorted(self.round.expected))
        self._round_changed.set()

    async def _follow_models(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                async for rec in consumer:
                    try:
                        mv = open_model_version(rec.value, self.keys.trust,
                                                max_bytes=MAX_MESSAGE_BYTES, topic=self.t.models)
                        if not self.s.model_name or mv.model_name == self.s.model_name:
                            self._adopt(mv, rec.value)
                    except InvalidMessage as exc:
                        reject(SERVICE, exc, f"model record {rec.offset}")
            except KafkaError as exc:  # the consumer reconnects by itself; keep following
                KAFKA_RETRIES.labels(SERVICE).inc()
                log.warning("%s: model topic read failed (%s); retrying", self.s.region, exc)
                await asyncio.sleep(self.s.kafka_retry_s)

    def _on_reconnect(self) -> None:
        """Paho thread, after each MQTT (re)connect: make sure the broker has our retained state
        (a broker killed before it saved loses the last retained messages)."""
        if self._model_raw is not None:
            self.mqtt.publish(self.t.model(self.s.region), self._model_raw, retain=True)
        if self._receipt_raw is not None:
            self.mqtt.publish(self.t.receipts(self.s.region), self._receipt_raw, retain=True)

    # -- updates: MQTT -> running sum ----------------------------------------------------------

    def _check_update(self, raw: bytes, topic: str) -> pb.UpdateChunk:
        """Everything about an update chunk's envelope, before its payload is looked at."""
        r = self.round
        limit = self.s.max_message_bytes if r is None else \
            min(self.s.max_message_bytes, r.codec.max_payload_bytes() + 64 * 1024)
        up = open_envelope(raw, pb.UPDATE_CHUNK, self.keys.trust, max_bytes=limit,
                           topic=topic).body
        sender = up.header.sender
        who = self.keys.trust.get(sender)
        if who is None or who.role != "agent" or who.region != self.s.region:
            raise InvalidMessage(Reason.UNAUTHORIZED, f"{sender!r} is not an agent of "
                                 f"{self.s.region}")
        if topic != self.t.update(self.s.region, sender):
            raise InvalidMessage(Reason.WRONG_TOPIC, f"{sender} signed an update for {topic}, "
                                 "another agent's topic")
        if up.agent_id != sender or up.region != self.s.region:
            raise InvalidMessage(Reason.SENDER_MISMATCH, "agent_id or region differs from the "
                                 "signer's")
        if not self._rate.take(sender):
            raise InvalidMessage(Reason.RATE_LIMITED, f"{sender} sends faster than "
                                 f"{self.s.rate_per_s}/s (burst {self.s.rate_burst:.0f})")
        if up.header.round <= self.closed_round:
            raise InvalidMessage(Reason.LATE, f"update for round {up.header.round}, which is "
                                 "closed")
        if r is None:
            raise InvalidMessage(Reason.WRONG_ROUND,
                                 f"round {up.header.round} but no round is open")
        if up.header.round != r.task.round:
            reason = Reason.LATE if up.header.round < r.task.round else Reason.WRONG_ROUND
            raise InvalidMessage(reason, f"update for round {up.header.round}, "
                                 f"region is on round {r.task.round}")
        if up.header.he_fingerprint != r.task.he_fingerprint:
            raise InvalidMessage(Reason.WRONG_FINGERPRINT, "update made with another HE context")
        if sender in r.quarantined:
            raise InvalidMessage(Reason.QUARANTINED, f"{sender} is quarantined after repeated "
                                 "failed updates")
        if (r.flushing or r.flushed) and sender not in r.committed_agents:
            raise InvalidMessage(Reason.LATE, f"{sender} arrived after round {r.task.round}'s "
                                 "partial was closed")
        if sender not in r.expected:
            raise InvalidMessage(Reason.NOT_SELECTED, f"{sender} was not asked for this round")
        return up

    def _on_update(self, msg) -> None:
        BYTES.labels(SERVICE, "mqtt_in").inc(len(msg.payload))
        INBOX_DEPTH.labels(SERVICE).set(self.mqtt.inbox.qsize())
        try:
            up = self._check_update(msg.payload, msg.topic)
        except InvalidMessage as exc:
            reject(SERVICE, exc, f"update on {msg.topic}")
            self.mqtt.ack(msg)  # a refused message is final: never redeliver it
            return
        r = self.round
        assert r is not None
        if up.declined:
            self._on_decline(r, up)
            self.mqtt.ack(msg)
            return
        if r.flushing or r.flushed or r.summer.is_duplicate(up.agent_id, up.header.chunk_index):
            # a duplicate: the original is summed (and acked after the commit, or redelivered
            # after a crash), so this copy is acked at once and never stored
            DUPLICATES.labels(SERVICE).inc()
            self.mqtt.ack(msg)
            if r.flushed:
                self._publish_receipt(r)
            return
        try:
            r.summer.add_chunk(up.agent_id, up.header.chunk_index, up.header.chunk_count,
                               up.payload, weight=up.weight)
        except InvalidMessage as exc:
            reject(SERVICE, exc, f"update from {up.agent_id}")
            self.mqtt.ack(msg)
            return
        r.pending.append(msg)
        ACCEPTED.labels(SERVICE, "update_chunk").inc()
        r.update_bytes += len(msg.payload)
        if up.header.chunk_index == 0:
            self._count_version(r, up)
        if up.header.chunk_index == 0 and up.HasField("eval"):
            r.eval.loss_sum += up.eval.loss_sum
            r.eval.accuracy_sum += up.eval.accuracy_sum
            r.eval.count += up.eval.count
        if set(r.summer.agents) >= r.expected:
            self._round_changed.set()

    def _on_decline(self, r: _Round, up: pb.UpdateChunk) -> None:
        """A device sits the round out (its own data or project): stop waiting for it. Only
        before it sent anything: a device cannot take back chunks already summed."""
        agent = up.agent_id
        if up.payload or up.header.chunk_count != 0:
            reject(SERVICE, InvalidMessage(Reason.MALFORMED, f"{agent}: a decline carries no "
                                           "payload"), f"decline from {agent}")
            return
        if agent in r.summer.agents or agent not in r.expected:
            DUPLICATES.labels(SERVICE).inc()
            return
        r.expected.discard(agent)
        ACCEPTED.labels(SERVICE, "decline").inc()
        log.info("%s: %s sits round %d out (%s)", self.s.region, agent, r.task.round,
                 up.declined[:64])
        if set(r.summer.agents) >= r.expected:
            self._round_changed.set()

    def _count_version(self, r: _Round, up: pb.UpdateChunk) -> None:
        """Version skew: devices per project version this round (a label only for well-formed
        versions, and reset every round, so a device cannot grow the metric without bound)."""
        v = up.project_version
        r.versions[up.agent_id] = v if VERSION.fullmatch(v) else "invalid"
        PROJECT_VERSIONS.clear()
        for version, devices in Counter(r.versions.values()).items():
            PROJECT_VERSIONS.labels(r.task.task_name, version).set(devices)

    # -- flush: Kafka commit, then acks and receipts -------------------------------------------

    async def _flush(self, r: _Round) -> None:
        r.flushing = True  # from here on the partial's agents are fixed; later arrivals are late
        for agent in r.summer.in_flight:  # some chunks arrived, not all: not in this round
            reject(SERVICE, InvalidMessage(
                Reason.INCOMPLETE, f"{agent}'s round {r.task.round} update lacks chunks at the "
                "flush"), self.s.region)
        groups = r.summer.groups()
        if not groups:  # too few to hide any one agent: report an empty partial, drop the rest
            for agent in r.summer.agents:
                reject(SERVICE, InvalidMessage(
                    Reason.TOO_FEW_AGENTS, f"round {r.task.round}: {agent} is one of "
                    f"{r.summer.num_agents} agents, under the privacy floor of "
                    f"{r.summer.min_group}; sending an empty partial"), self.s.region)
        r.committed_agents = sorted(a for g in groups for a in g.agents)
        fp = r.task.he_fingerprint
        mv = r.model.header.model_version
        records = []
        for gi, group in enumerate(groups or [None]):
            payloads = group.payloads if group is not None else [b""]
            for i, payload in enumerate(payloads):
                first = gi == 0 and i == 0 and group is not None
                part = pb.PartialChunk(
                    header=header(self.s.region, r.task.round, mv, fp, i, len(payloads)),
                    region=self.s.region, payload=payload, group=gi,
                    group_count=len(groups),
                    agents=group.agents if group is not None else [],
                    weights=group.weights if group is not None else [],
                    eval=r.eval if first and r.eval.count else None,
                    update_bytes=r.update_bytes if first else 0,
                )
                raw = seal(pb.PARTIAL_CHUNK, part, self.s.region, self.keys.private_key,
                           topic=self.t.partials)
                records.append((f"{r.task.round}/{self.s.region}/{gi}/{i}".encode(), raw))
        await self._commit_partial(records)
        BYTES.labels(SERVICE, "kafka_out").inc(sum(len(raw) for _, raw in records))
        # committed: now (and only now) the broker may forget the updates
        r.flushed = True
        for msg in r.pending:
            self.mqtt.ack(msg)
        r.pending.clear()
        self._publish_receipt(r)
        log.info("%s round %d: partial of %d agents in %d groups committed", self.s.region,
                 r.task.round, len(r.committed_agents), len(groups))

    async def _new_producer(self) -> AIOKafkaProducer:
        """A transactional producer: starting it fences (and aborts the open transaction of) any
        older incarnation of this region, so a partial is written whole or not at all."""
        producer = AIOKafkaProducer(
            **self.kafka.kwargs(), enable_idempotence=True, acks="all",
            transactional_id=self.s.transactional_id,
            request_timeout_ms=int(self.s.kafka_timeout_s * 1000), **CLIENT_SIZES,
        )
        await producer.start()
        return producer

    async def _commit_partial(self, records: list[tuple[bytes, bytes]]) -> None:
        """Write every chunk of a partial in one Kafka transaction. Each attempt has a budget of
        ``kafka_budget_s``; past it (Kafka away or unreachable) the producer is replaced, which
        fences the old one, and the partial is written again. Nothing has been acked to MQTT yet,
        so waiting costs only time."""

        async def attempt() -> None:
            if self._producer is None:
                self._producer = await self._new_producer()
            async with self._producer.transaction():
                for key, raw in records:
                    await self._producer.send(self.t.partials, raw, key=key)

        while True:
            try:
                await asyncio.wait_for(attempt(), self.s.kafka_budget_s)
                return
            except (KafkaError, TimeoutError) as exc:
                KAFKA_RETRIES.labels(SERVICE).inc()
                log.warning("%s: Kafka write failed (%s: %s); retrying with a new producer",
                            self.s.region, type(exc).__name__, exc or "over budget")
                if self._producer is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._producer.stop(), 5)
                    self._producer = None
                await asyncio.sleep(self.s.kafka_retry_s)

    def _publish_receipt(self, r: _Round) -> None:
        rc = pb.Receipt(
            header=header(self.s.region, r.task.round, r.model.header.model_version,
                          r.task.he_fingerprint),
            region=self.s.region, agents=r.committed_agents,
        )
        self._receipt_raw = seal(pb.RECEIPT, rc, self.s.region, self.keys.private_key,
                                 topic=self.t.receipts(self.s.region))
        self.mqtt.publish(self.t.receipts(self.s.region), self._receipt_raw, retain=True)

    async def _rounds(self) -> None:
        while not self._stop.is_set():
            r = self.round
            if r is None or r.flushed:
                self._round_changed.clear()
                await self._round_changed.wait()
                continue
            complete = set(r.summer.agents) >= r.expected
            if complete or time.time() >= r.task.deadline_unix:
                await self._flush(r)
                continue
            self._round_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._round_changed.wait(),
                                       max(0.05, r.task.deadline_unix - time.time()))

    async def _pump_updates(self) -> None:
        while True:
            msg = await self.mqtt.inbox.get()
            self._on_update(msg)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        # glibc raises its mmap threshold after the first large free (up to 32 MiB), after which
        # multi-MB messages come from the heap and a burst of them leaves RSS high for good: a
        # fixed threshold keeps a flood of large junk messages from growing the region
        tune_malloc(mmap_threshold=128 * 1024)
        serve(self.s.metrics_port)
        loop = asyncio.get_running_loop()
        self.mqtt = MqttLink(
            host=self.s.mqtt_host, port=self.s.mqtt_port,
            client_id=f"{self.s.namespace}-regional-{self.s.region}",
            subscriptions=[self.t.updates(self.s.region)], loop=loop,
            persistent=True, manual_ack=True, on_connect=self._on_reconnect,
            username=self.s.mqtt_username, password=self.s.mqtt_password,
            ca_file=self.s.mqtt_ca_file, tls=self.mqtt_tls, inbox_size=self.s.inbox_size,
        )
        await ensure_topics(self.kafka, self.t)
        # the fleet as it is now, before any round: then followed live
        fleet = FleetFollower(self.kafka, self.t, self.keys.trust, on_change=self._on_fleet_change)
        await fleet.caught_up()
        self._producer = await self._new_producer()
        models = model_consumer(self.kafka)
        await models.start()
        tp = TopicPartition(self.t.models, 0)
        models.assign([tp])
        await models.seek_to_beginning(tp)
        # catch up on the model topic BEFORE taking updates, so the open round is known
        mv, raw = await catch_up(models, self.t.models, self.keys.trust, self.s.model_name)
        self.mqtt.start()
        await self.mqtt.connected.wait()
        if mv is not None and raw is not None:
            try:
                self._adopt(mv, raw)
            except InvalidMessage as exc:
                reject(SERVICE, exc, "latest model version")
        tasks = [
            asyncio.create_task(self._follow_models(models), name="models"),
            asyncio.create_task(self._pump_updates(), name="updates"),
            asyncio.create_task(self._rounds(), name="rounds"),
        ]
        log.info("%s: regional aggregator up (MQTT %s:%d%s, Kafka %s%s), privacy floor k = %d",
                 self.s.region, self.s.mqtt_host, self.s.mqtt_port,
                 " mutual TLS" if self.mqtt_tls else "", self.s.kafka_bootstrap,
                 " mutual TLS" if self.kafka.tls else "", self.s.min_agents_per_partial)
        stop = asyncio.create_task(self._stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop:
                    t.result()  # a task died: surface it, so the process exits non-zero
        finally:
            for t in [*tasks, stop]:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await fleet.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(models.stop(), 5)
            if self._producer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._producer.stop(), 5)
            self.mqtt.stop()

    def stop(self) -> None:
        self._stop.set()
