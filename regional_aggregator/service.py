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
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced
from pydantic import Field, field_validator

from regional_aggregator.ledger import FEDBUFF_ROUND, Ledger, LedgerFollower
from regional_aggregator.ratelimit import TokenBuckets
from regional_aggregator.robust import make_rule
from regional_aggregator.summing import RegionalSum, device_of
from schemas import fedstream_pb2 as pb
from schemas.canary import relayed_by
from schemas.cli import (
    KafkaClient,
    MqttClient,
    ServiceSettings,
    die_with_parent,
    terminate_child,
    tune_malloc,
)
from schemas.codec import Codec
from schemas.errors import InvalidMessage, Reason
from schemas.fedbuff import FedBuff
from schemas.fleet import FleetFollower
from schemas.kafka import CLIENT_SIZES, MAX_MESSAGE_BYTES, catch_up, ensure_topics, model_consumer
from schemas.keyring import Keyring
from schemas.mqtt import MAX_PACKET_BYTES, AckToken, MqttLink
from schemas.signing import AgentScope, header, open_envelope, open_model_version, seal
from schemas.task import codec_params
from schemas.telemetry import (
    ACCEPTED,
    BYTES,
    DUPLICATES,
    INBOX_DEPTH,
    KAFKA_RETRIES,
    PARTIAL_COMMIT_SECONDS,
    PROJECT_VERSIONS,
    ROUND,
    STALENESS,
    published,
    reject,
    serve,
)
from schemas.topics import Topics

VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,31}")
log = logging.getLogger("fedstream.regional")
SERVICE = "regional"
UP, DOWN = b"up", b"down"  # a replica's retained status (a stand-in's is b"adopted:<by>")


REPLICA = re.compile(r"[A-Za-z0-9_-]{1,32}")


def parse_status(replica: str, payload: bytes) -> str | None:
    """A replica's status from its topic's last level and payload: ``up``, ``down`` or
    ``adopted:<by>``; ``None`` for anything else."""
    text = payload.decode("ascii", errors="replace")
    if not REPLICA.fullmatch(replica):
        return None
    if text in ("up", "down") or (text.startswith("adopted:")
                                  and REPLICA.fullmatch(text[len("adopted:"):])):
        return text
    return None


def adopter_of(status: Mapping[str, str], replica: str) -> str | None:
    """The replica that stands in for ``replica`` when it is down: the next one that is up
    after it in name order (wrapping around), so that every replica picks the same one."""
    up = sorted(r for r, st in status.items() if st == "up" and r != replica)
    return next((r for r in up if r > replica), up[0] if up else None)


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
    replica: str = Field(
        "", pattern=r"^[A-Za-z0-9_-]{0,32}$", description="scale out: this aggregator is replica "
        "REPLICA of the region; the region's replicas share its updates through an MQTT shared "
        "subscription, each forwards its sums in batches under its own transactional id, and "
        "reads the others' back from Kafka (default: the region's only aggregator)")
    flush_every: int = Field(256, ge=1, description="replicas and FedBuff: forward a batch "
                             "after this many devices' updates")
    flush_idle_s: float = Field(0.5, gt=0, description="replicas and FedBuff: forward a batch "
                                "of at least k devices once no update came for this long")
    adopt_after_s: float = Field(
        2.0, ge=0, description="replicas: a replica whose connection is lost for this long is "
        "down (its retained status says so), and the next replica that is up takes over its "
        "MQTT session and transactional id (a stand-in process) until it is back")
    adopted_by: str = Field(
        "", pattern=r"^[A-Za-z0-9_-]{0,32}$", description="set by a replica for the stand-in it "
        "starts: this process serves replica REPLICA's session for ADOPTED_BY, and exits when "
        "the replica takes its session back")

    @property
    def transactional_id(self) -> str:
        """One per MQTT session: a restarted replica fences its old incarnation."""
        return f"{self.namespace}-regional-{self.region}" + \
            (f"-{self.replica}" if self.replica else "")

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
    # agent -> what acks its MQTT messages, once a valid group holding it is committed
    pending: dict[str, list[AckToken]] = field(default_factory=dict)
    eval: pb.EvalSums = field(default_factory=pb.EvalSums)
    flushing: bool = False  # a batch is being committed: its agent set is fixed
    flushed: bool = False  # the region's round is closed here
    update_bytes: int = 0
    committed: set[str] = field(default_factory=set)  # agents this process committed
    committed_agents: list[str] = field(default_factory=list)  # ... in its last batch (receipt)
    declined: set[str] = field(default_factory=set)  # sat out through this process
    unsent_declines: list[str] = field(default_factory=list)  # ... not yet in a batch
    versions: dict[str, str] = field(default_factory=dict)  # agent -> its project version
    version_counts: Counter = field(default_factory=Counter)  # project version -> devices
    seq: int = 0  # this replica's next batch number
    last_update: float = 0.0  # monotonic time of the last accepted update (idle flush)
    fedbuff: FedBuff | None = None  # buffered asynchronous mode: the round never closes
    selected: dict[int, set[str] | None] = field(default_factory=dict)  # FedBuff: per round

    @property
    def ledger_round(self) -> int:
        """Where the ledger files this round's batches (FedBuff: one open-ended round 0)."""
        return FEDBUFF_ROUND if self.fedbuff is not None else self.task.round

    def all_in(self) -> bool:
        """Every expected agent summed here (a region of one aggregator): folded agents are
        always expected ones, so counting suffices."""
        return self.summer.num_agents >= len(self.expected)


class RegionalAggregator:
    def __init__(self, settings: RegionalSettings) -> None:
        self.s = settings
        self.t = Topics(settings.namespace)
        # only this region's devices: a region's memory does not grow with the rest of the fleet
        self.keys = Keyring.load(settings.keys, settings.region,
                                 scope=AgentScope.of_region(settings.region))
        me = self.keys.trust.get(settings.region)
        if me is None or me.role != "region":
            raise ValueError(f"{settings.region!r} is not a region of the trust store")
        self.kafka = settings.kafka_conn(settings.region, "region")
        self.mqtt_tls = settings.mqtt_tls(settings.region, "region")
        if settings.replica and self.mqtt_tls is not None:
            raise ValueError("--replica with MQTT TLS: a locked-down broker makes the "
                             "certificate's CN the client id, so the region's replicas would "
                             "share one MQTT session; replicas need one certificate each, which "
                             "the local stack does not issue yet (run replicas on an open broker)")
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
        self.ledger = Ledger(settings.region)  # what the region committed (read back)
        self._ledger_follower: LedgerFollower | None = None
        self._batching = asyncio.Lock()  # replicas: no update is taken while a batch commits
        self._checked = 0.0  # replicas: when the round's coverage was last checked
        self._status: dict[str, str] = {}  # replica -> its retained status
        self._stand_ins: dict[str, subprocess.Popen] = {}
        self._status_prefix = self.t.replica(settings.region, "")

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
        if r.fedbuff is None and rec.identity in r.expected and not r.summer.has(rec.identity) \
                and not self._counted(r, rec.identity):
            r.expected.discard(rec.identity)
            log.info("%s: %s revoked: round %d no longer waits for it", self.s.region,
                     rec.identity, r.task.round)
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
        if not relayed_by(mv, self.s.region):  # a canary for other regions: keep the stable one
            log.info("%s: v%d is a canary candidate for %s; our devices keep v%d",
                     self.s.region, mv.header.model_version, list(mv.canary.regions),
                     mv.canary.stable_version)
            return
        published(SERVICE, mv.header.model_version, mv.final)
        self._model_raw = raw
        self.mqtt.publish(self.t.model(self.s.region), raw, retain=True)
        BYTES.labels(SERVICE, "mqtt_out").inc(len(raw))
        old = self.round
        if old is not None and self._continue_fedbuff(old, mv):
            return
        self.closed_round = max(self.closed_round, mv.provenance.round)
        if old and not old.flushing and old.pending:
            # the round closed without our partial (global deadline): its updates are obsolete
            for agent in {*old.summer.agents, *old.summer.in_flight}:
                reject(SERVICE, InvalidMessage(
                    "round_closed", f"round {old.task.round} closed before {agent}'s update "
                    "was forwarded"), self.s.region)
            for msgs in old.pending.values():
                for msg in msgs:
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
        fb = FedBuff.from_task(task)
        summer = RegionalSum(codec, task.round, expected=sorted(expected) if fb is None else None,
                             min_group=k, max_groups=self.s.max_groups if fb is None else 1,
                             seed=task.seed, region=self.s.region,
                             suspects=list(task.suspected_agents),
                             robust=make_rule(self.s.robust)
                             if self.s.robust and not task.codec.encrypted else None)
        self.round = _Round(mv, task, codec, expected, summer, quarantined, fedbuff=fb)
        PROJECT_VERSIONS.clear()
        if fb is None:
            self.ledger.forget_before(task.round - 1)
        else:
            self.round.selected[task.round] = set(task.selected_agents) or None
        self.round.seq = self.ledger.next_batch(self.round.ledger_round, self.s.replica)
        ROUND.labels(SERVICE).set(task.round)
        exp = sorted(self.round.expected)
        log.info("%s: round %d on model v%d, expecting %d devices: %s", self.s.region,
                 task.round, mv.header.model_version, len(exp),
                 exp if len(exp) <= 12 else f"{exp[:12]} ...")
        self._round_changed.set()

    def _continue_fedbuff(self, r: _Round, mv: pb.ModelVersion) -> bool:
        """FedBuff: a new version moves the region's current round on; the batch in progress
        and everything received for earlier rounds of the staleness window stay. ``False`` when
        the new version is not a continuation (another mode, codec or HE context)."""
        if r.fedbuff is None or mv.final or not mv.HasField("next_task"):
            return False
        task = mv.next_task
        if FedBuff.from_task(task) != r.fedbuff or task.codec != r.task.codec \
                or task.he_fingerprint != r.task.he_fingerprint:
            return False
        r.model, r.task = mv, task
        r.quarantined = set(task.quarantined_agents)
        r.selected[task.round] = set(task.selected_agents) or None
        oldest = task.round - r.fedbuff.max_staleness
        for old in [b for b in r.selected if b < oldest]:
            del r.selected[old]
        keep = task.round - 2 * r.fedbuff.max_staleness  # as the global keeps them
        self.ledger.forget_keys(FEDBUFF_ROUND,
                                lambda key: int(key.rpartition("@")[2]) >= keep)
        ROUND.labels(SERVICE).set(task.round)
        log.info("%s: FedBuff round %d on model v%d (batch of %d open)", self.s.region,
                 task.round, mv.header.model_version, r.summer.num_agents)
        self._round_changed.set()
        return True

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
        if self.s.replica:
            self.mqtt.publish(self.t.replica(self.s.region, self.s.replica),
                              b"adopted:" + self.s.adopted_by.encode() if self.s.adopted_by
                              else UP, retain=True)
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
        if r is not None and r.fedbuff is not None:
            return self._check_fedbuff(up, r)
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
        if (r.flushing or r.flushed) and not self._counted(r, sender):
            raise InvalidMessage(Reason.LATE, f"{sender} arrived after round {r.task.round}'s "
                                 "partial was closed")
        if sender not in r.expected:
            raise InvalidMessage(Reason.NOT_SELECTED, f"{sender} was not asked for this round")
        return up

    @staticmethod
    def _round_of(raw: bytes) -> int | None:
        """The round an update envelope claims (unverified: only to decide to wait)."""
        try:
            return pb.UpdateChunk.FromString(pb.Envelope.FromString(raw).body).header.round
        except Exception:  # protobuf's DecodeError, or a payload that is no envelope
            return None

    def _check_fedbuff(self, up: pb.UpdateChunk, r: _Round) -> pb.UpdateChunk:
        """FedBuff: an update may be for any round of the staleness window, by a device that
        round selected (a round this process never saw: any device of the region)."""
        assert r.fedbuff is not None
        sender, base = up.header.sender, up.header.round
        oldest = r.task.round - r.fedbuff.max_staleness
        if base < oldest:
            raise InvalidMessage(Reason.LATE, f"update for round {base}, older than the "
                                 f"staleness window {oldest}..{r.task.round}")
        if base > r.task.round:
            raise InvalidMessage(Reason.WRONG_ROUND, f"update for round {base}, region is on "
                                 f"round {r.task.round}")
        if up.header.he_fingerprint != r.task.he_fingerprint:
            raise InvalidMessage(Reason.WRONG_FINGERPRINT, "update made with another HE context")
        if sender in r.quarantined:
            raise InvalidMessage(Reason.QUARANTINED, f"{sender} is quarantined after repeated "
                                 "failed updates")
        selected = r.selected.get(base)
        if selected is not None and sender not in selected:
            raise InvalidMessage(Reason.NOT_SELECTED, f"{sender} was not asked for round {base}")
        return up

    def _on_update(self, msg, wait_for_round: bool = False) -> int | None:
        """Take one update chunk. Returns the round to wait for when the chunk is for the
        round after the open one and ``wait_for_round``: another replica relayed that round's
        model first, and this one will adopt it in a moment (the chunk is neither refused nor
        acked yet)."""
        BYTES.labels(SERVICE, "mqtt_in").inc(len(msg.payload))
        INBOX_DEPTH.labels(SERVICE).set(self.mqtt.inbox.qsize())
        try:
            up = self._check_update(msg.payload, msg.topic)
        except InvalidMessage as exc:
            if wait_for_round and exc.reason == Reason.WRONG_ROUND and self.round is not None \
                    and self.round.fedbuff is None and self.s.replica:
                ahead = self._round_of(msg.payload)
                if ahead == self.round.task.round + 1:
                    return ahead
            reject(SERVICE, exc, f"update on {msg.topic}")
            self.mqtt.ack(msg)  # a refused message is final: never redeliver it
            return None
        r = self.round
        assert r is not None
        if up.declined:
            self._on_decline(r, up)
            self.mqtt.ack(msg)
            return None
        key = up.agent_id if r.fedbuff is None else f"{up.agent_id}@{up.header.round}"
        if self._counted(r, key):
            # a duplicate of an update in a committed partial: acked at once, never stored
            DUPLICATES.labels(SERVICE).inc()
            self.mqtt.ack(msg)
            if r.flushed:
                self._publish_receipt(r)
            return None
        if r.summer.is_duplicate(key, up.header.chunk_index):
            # a copy of an update held here, not yet committed: never stored. The broker's
            # redelivery of the original itself (after a reconnect: DUP set, and the original's
            # packet id is stale) is acked with the batch; a device's republished copy at once
            DUPLICATES.labels(SERVICE).inc()
            if msg.dup:
                r.pending.setdefault(key, []).append(msg.token)
            else:
                self.mqtt.ack(msg)
            return None
        times = 1 if r.fedbuff is None else r.fedbuff.multiplicity(r.task.round - up.header.round)
        try:
            r.summer.add_chunk(key, up.header.chunk_index, up.header.chunk_count,
                               up.payload, weight=up.weight, times=times)
        except InvalidMessage as exc:
            reject(SERVICE, exc, f"update from {up.agent_id}")
            self.mqtt.ack(msg)
            return None
        r.pending.setdefault(key, []).append(msg.token)
        r.last_update = time.monotonic()
        ACCEPTED.labels(SERVICE, "update_chunk").inc()
        r.update_bytes += len(msg.payload)
        if up.header.chunk_index == 0:
            self._count_version(r, up)
            STALENESS.observe(max(0, r.model.header.model_version - up.header.model_version))
        if up.header.chunk_index == 0 and up.HasField("eval"):
            r.eval.loss_sum += up.eval.loss_sum
            r.eval.accuracy_sum += up.eval.accuracy_sum
            r.eval.count += up.eval.count
        if self._batched(r) or r.all_in():
            self._round_changed.set()
        return None

    def _on_decline(self, r: _Round, up: pb.UpdateChunk) -> None:
        """A device sits the round out (its own data or project): stop waiting for it. Only
        before it sent anything: a device cannot take back chunks already summed."""
        agent = up.agent_id
        if up.payload or up.header.chunk_count != 0:
            reject(SERVICE, InvalidMessage(Reason.MALFORMED, f"{agent}: a decline carries no "
                                           "payload"), f"decline from {agent}")
            return
        if r.fedbuff is not None:  # nothing waits for a device in FedBuff
            ACCEPTED.labels(SERVICE, "decline").inc()
            return
        if r.summer.has(agent) or self._counted(r, agent) or agent not in r.expected:
            DUPLICATES.labels(SERVICE).inc()
            return
        if self.s.replica:  # the other replicas learn it from the next batch
            if agent not in r.declined:
                r.declined.add(agent)
                r.unsent_declines.append(agent)
        else:
            r.expected.discard(agent)
        ACCEPTED.labels(SERVICE, "decline").inc()
        log.info("%s: %s sits round %d out (%s)", self.s.region, agent, r.task.round,
                 up.declined[:64])
        self._round_changed.set()

    def _count_version(self, r: _Round, up: pb.UpdateChunk) -> None:
        """Version skew: devices per project version this round (a label only for well-formed
        versions, and reset every round, so a device cannot grow the metric without bound)."""
        v = up.project_version if VERSION.fullmatch(up.project_version) else "invalid"
        old = r.versions.get(up.agent_id)
        if old == v:
            return
        r.versions[up.agent_id] = v
        for version, step in ((old, -1), (v, 1)):
            if version is None:
                continue
            r.version_counts[version] += step
            if r.version_counts[version]:
                PROJECT_VERSIONS.labels(r.task.task_name, version).set(
                    r.version_counts[version])
            else:  # no device left on it: no series either
                del r.version_counts[version]
                with contextlib.suppress(KeyError):
                    PROJECT_VERSIONS.remove(r.task.task_name, version)

    # -- flush: Kafka commit, then acks and receipts -------------------------------------------

    def _batched(self, r: _Round) -> bool:
        """Whether the region forwards ``r`` in several batches (replicas, FedBuff), each named,
        numbered and read back; else one partial per round."""
        return bool(self.s.replica) or r.fedbuff is not None

    def _counted(self, r: _Round, agent: str) -> bool:
        """Whether ``agent``'s update of round ``r`` is in a committed, valid group (of any
        replica of the region)."""
        if agent in r.committed:
            return True
        # the read-back matters only where several batches may name an agent; a region of one
        # sending one partial per round trusts its own account
        return self._batched(r) and self.ledger.is_counted(r.ledger_round, agent)

    def _covered(self, r: _Round) -> bool:
        """Replicas: every expected agent counted, declined or summed here."""
        done = self.ledger.covered(r.task.round) | r.declined
        return all(a in done or r.summer.has(a) for a in r.expected)

    async def _flush(self, r: _Round, final: bool = True) -> None:
        """Commit what this process holds as one batch (one Kafka transaction), then ack the
        updates of its valid groups and publish a receipt. ``final``: the region's round closes
        here (agents still in flight are left out, the batch carries ``region_complete``)."""
        async with self._batching:  # no update is taken while the batch and read-back settle
            await self._flush_batch(r, final)

    async def _flush_batch(self, r: _Round, final: bool) -> None:
        r.flushing = True  # from here on the batch's agents are fixed; later arrivals are late
        if final:
            for agent in r.summer.in_flight:  # some chunks arrived, not all: not in this round
                reject(SERVICE, InvalidMessage(
                    Reason.INCOMPLETE, f"{agent}'s round {r.task.round} update lacks chunks at "
                    "the flush"), self.s.region)
        groups = r.summer.groups()
        if not groups and r.summer.num_agents:  # too few to hide any one agent
            for agent in r.summer.agents:
                reject(SERVICE, InvalidMessage(
                    Reason.TOO_FEW_AGENTS, f"round {r.task.round}: {agent} is one of "
                    f"{r.summer.num_agents} agents, under the privacy floor of "
                    f"{r.summer.min_group}; sending an empty partial"), self.s.region)
        batch = f"{self.s.replica}/{r.seq}" if self._batched(r) else ""
        fp = r.task.he_fingerprint
        mv = r.model.header.model_version
        records = []
        for gi, group in enumerate(groups or [None]):
            payloads = group.payloads if group is not None else [b""]
            for i, payload in enumerate(payloads):
                first = gi == 0 and i == 0
                keys = group.agents if group is not None else []
                part = pb.PartialChunk(
                    header=header(self.s.region, r.task.round, mv, fp, i, len(payloads)),
                    region=self.s.region, payload=payload, group=gi,
                    group_count=len(groups),
                    agents=[device_of(k) for k in keys],
                    weights=group.weights if group is not None else [],
                    base_rounds=[int(k.rpartition("@")[2]) for k in keys]
                    if r.fedbuff is not None else [],
                    multiplicities=group.multiplicities
                    if r.fedbuff is not None and group is not None else [],
                    eval=r.eval if first and group is not None and r.eval.count else None,
                    update_bytes=r.update_bytes if first and group is not None else 0,
                    batch=batch, region_complete=final,
                    declined=r.unsent_declines if first else [],
                )
                raw = seal(pb.PARTIAL_CHUNK, part, self.s.region, self.keys.private_key,
                           topic=self.t.partials)
                where = f"{batch}/{gi}" if batch else str(gi)
                records.append((f"{r.task.round}/{self.s.region}/{where}/{i}".encode(), raw))
        with PARTIAL_COMMIT_SECONDS.time():
            last_offset = await self._commit_partial(records)
        BYTES.labels(SERVICE, "kafka_out").inc(sum(len(raw) for _, raw in records))
        valid, void = list(range(len(groups))), []
        if batch and self._ledger_follower is not None:
            await self._ledger_follower.caught_up(past=last_offset)
            void = [gi for gi in valid if self.ledger.is_void(r.ledger_round, batch, gi)]
            valid = [gi for gi in valid if gi not in void]
        # committed: now (and only now) the broker may forget the updates of valid groups
        r.committed_agents = sorted(a for gi in valid for a in groups[gi].agents)
        r.committed.update(r.committed_agents)
        for agent in r.committed_agents:
            for msg in r.pending.pop(agent, []):
                self.mqtt.ack(msg)
        for gi in void:  # another replica counted one of these first: rebuild from redelivery
            log.warning("%s round %d: batch %s group %d void (an agent was counted first by "
                        "another replica); its updates are redelivered", self.s.region,
                        r.task.round, batch, gi)
            for agent in groups[gi].agents:
                r.pending.pop(agent, None)
        if final:  # the rest is out of this round: never redeliver it
            r.flushed = True
            for msgs in r.pending.values():
                for msg in msgs:
                    self.mqtt.ack(msg)
            r.pending.clear()
        else:
            r.summer = r.summer.next_batch()
            r.seq += 1
            r.unsent_declines = []
            r.eval = pb.EvalSums()
            r.update_bytes = 0
            r.flushing = False
        self._publish_receipt(r)
        if void:
            self.mqtt.cycle()
        log.info("%s round %d: %spartial of %d agents in %d groups committed%s", self.s.region,
                 r.task.round, f"batch {batch}: " if batch else "", len(r.committed_agents),
                 len(valid), " (round closed)" if final and batch else "")

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

    async def _commit_partial(self, records: list[tuple[bytes, bytes]]) -> int:
        """Write every chunk of a partial in one Kafka transaction and return the offset of its
        last record. Each attempt has a budget of ``kafka_budget_s``; past it (Kafka away or
        unreachable) the producer is replaced, which fences the old one, and the partial is
        written again. Nothing has been acked to MQTT yet, so waiting costs only time."""

        async def attempt() -> int:
            if self._producer is None:
                self._producer = await self._new_producer()
            async with self._producer.transaction():
                sent = [await self._producer.send(self.t.partials, raw, key=key)
                        for key, raw in records]
            return max([(await fut).offset for fut in sent])

        while True:
            try:
                return await asyncio.wait_for(attempt(), self.s.kafka_budget_s)
            except (KafkaError, TimeoutError) as exc:
                if isinstance(exc, ProducerFenced) and self.s.replica:
                    # the replica's session has a newer owner (it came back, or stands in)
                    log.warning("%s: replica %s fenced by a newer incarnation; leaving",
                                self.s.region, self.s.replica)
                    raise
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
            region=self.s.region, agents=sorted({device_of(a) for a in r.committed_agents}),
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
            wait = max(0.05, r.task.deadline_unix - time.time())
            if self._batched(r):
                # woken by every update: look at most 20 times a second (coverage is O(n))
                await asyncio.sleep(max(0.0, self._checked + 0.05 - time.monotonic()))
                self._checked = time.monotonic()
                if r is not self.round or r.flushed:
                    continue
            idle = time.monotonic() - r.last_update
            held = r.summer.num_agents
            if r.fedbuff is not None:  # batches, for as long as the federation runs
                if self._batch_due(r, idle):
                    await self._flush(r, final=False)
                    continue
                wait = max(0.05, self.s.flush_idle_s - idle) if held else 1.0
            elif time.time() >= r.task.deadline_unix:
                await self._flush(r)
                continue
            elif not self.s.replica:
                if r.all_in():
                    await self._flush(r)
                    continue
            else:  # a replica: batches, and the round closes when the region's is covered
                if self._covered(r):
                    if held or r.summer.in_flight or r.unsent_declines \
                            or not self.ledger.complete(r.task.round):
                        await self._flush(r, final=True)
                    else:
                        r.flushed = True  # another replica closed it
                    continue
                if self._batch_due(r, idle) or (r.unsent_declines and not held
                                                and idle >= self.s.flush_idle_s):
                    await self._flush(r, final=False)
                    continue
                wait = min(wait, max(0.05, self.s.flush_idle_s - idle)
                           if held or r.unsent_declines else wait)
            self._round_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._round_changed.wait(), wait)

    def _batch_due(self, r: _Round, idle: float) -> bool:
        """A batch goes when it holds ``flush_every`` devices, or at least k that have been
        quiet for ``flush_idle_s``."""
        held, k = r.summer.num_agents, r.summer.min_group
        return held >= max(k, self.s.flush_every) or (held >= k and idle >= self.s.flush_idle_s)

    async def _pump_updates(self) -> None:
        while True:
            msg = await self.mqtt.inbox.get()
            if self.s.replica and msg.topic.startswith(self._status_prefix):
                self._on_status(msg.topic[len(self._status_prefix):], bytes(msg.payload))
                continue
            r = self.round
            if r is not None and r.fedbuff is not None and r.summer.num_agents >= \
                    r.summer.min_group and r.summer.summands + r.fedbuff.staleness_scale > \
                    r.codec.params.max_summands:
                await self._flush(r, final=False)  # the batch is full: the next might not fit
            async with self._batching:
                ahead = self._on_update(msg, wait_for_round=True)
            if ahead is not None:  # a replica behind its sibling: adopt the round, then take it
                deadline = time.monotonic() + 5.0
                while (self.round is None or self.round.task.round < ahead) \
                        and time.monotonic() < deadline:
                    self._round_changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._round_changed.wait(), 0.1)
                async with self._batching:
                    self._on_update(msg)

    # -- replicas: the watchdog ----------------------------------------------------------------

    def _on_status(self, replica: str, payload: bytes) -> None:
        """A replica's retained status (unsigned: a forged one can at most start a stand-in,
        which yields the session back to its live owner at once)."""
        status = parse_status(replica, payload)
        if status is None:
            reject(SERVICE, InvalidMessage(Reason.MALFORMED, f"replica status {replica[:40]!r}: "
                                           f"{payload[:40]!r}"), "replicas topic")
            return
        self._status[replica] = status

    async def _watch_replicas(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for replica, st in sorted(self._status.items()):
                child = self._stand_ins.get(replica)
                if child is not None and child.poll() is not None:
                    del self._stand_ins[replica]
                    child = None
                if st == DOWN.decode() and child is None and replica != self.s.replica \
                        and adopter_of(self._status, replica) == self.s.replica:
                    self._stand_ins[replica] = self._start_stand_in(replica)

    def _start_stand_in(self, replica: str) -> subprocess.Popen:
        """A process of this service, as ``replica``: it takes over that replica's MQTT
        session (the broker redelivers what it had not acked and deals it new updates) and
        transactional id (fencing a zombie), and exits when the replica takes them back."""
        argv = list(sys.argv[1:])
        for flag in ("--replica", "--adopted-by", "--metrics-port"):
            while flag in argv:
                i = argv.index(flag)
                del argv[i:i + 2]
            argv = [a for a in argv if not a.startswith(flag + "=")]
        cmd = [sys.executable, "-m", "regional_aggregator.cli", *argv, "--replica", replica,
               "--adopted-by", self.s.replica]
        log.warning("%s: replica %s is down: standing in for it (%s)", self.s.region, replica,
                    " ".join(cmd[2:5]))
        return subprocess.Popen(cmd, preexec_fn=die_with_parent)  # noqa: PLW1509

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        # glibc raises its mmap threshold after the first large free (up to 32 MiB), after which
        # multi-MB messages come from the heap and a burst of them leaves RSS high for good: a
        # fixed threshold keeps a flood of large junk messages from growing the region
        tune_malloc(mmap_threshold=128 * 1024)
        serve(self.s.metrics_port, SERVICE, self.s.metrics_host)
        loop = asyncio.get_running_loop()
        self.mqtt = MqttLink(
            host=self.s.mqtt_host, port=self.s.mqtt_port,
            client_id=self.s.transactional_id,  # one session, one transactional id
            subscriptions=[self.t.replicas(self.s.region)] if self.s.replica
            else [self.t.updates(self.s.region)], loop=loop,
            persistent=True, manual_ack=True, on_connect=self._on_reconnect,
            username=self.s.mqtt_username, password=self.s.mqtt_password,
            ca_file=self.s.mqtt_ca_file, tls=self.mqtt_tls, inbox_size=self.s.inbox_size,
            shared=f"{self.s.namespace}-regional-{self.s.region}" if self.s.replica else "",
            shared_subscriptions=[self.t.updates(self.s.region)] if self.s.replica else None,
            will=(self.t.replica(self.s.region, self.s.replica), DOWN, self.s.adopt_after_s)
            if self.s.replica else None,
            on_taken_over=self.stop if self.s.adopted_by else None,
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
        # what the region (its replicas, and this one's earlier incarnations, fenced by the
        # producer above) committed since the open round began, before taking any update;
        # FedBuff: since the global's last cut, on top of what its earlier steps counted
        self._ledger_follower = LedgerFollower(
            self.kafka, self.t, self.keys.trust, self.ledger,
            on_change=lambda _round: self._round_changed.set())
        since = mv.provenance.created_unix if mv is not None else 0.0
        state = mv.fedbuff_state if mv is not None and mv.HasField("fedbuff_state") else None
        if state is not None:
            self.ledger.add(FEDBUFF_ROUND, "~global", 0, [
                f"{a}@{b}" for a, b in zip(state.agents, state.base_rounds)])
        await self._ledger_follower.start(
            since_ms=int(since * 1000) - 60_000,
            offset=state.partials_offset if state is not None else None)
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
        if self.s.replica and not self.s.adopted_by:
            tasks.append(asyncio.create_task(self._watch_replicas(), name="replicas"))
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
            if self._ledger_follower is not None:
                await self._ledger_follower.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(models.stop(), 5)
            if self._producer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._producer.stop(), 5)
            if self.s.replica and not self.mqtt.stopping:  # leaving: a sibling takes over
                with contextlib.suppress(Exception):
                    self.mqtt.publish(self.t.replica(self.s.region, self.s.replica), DOWN,
                                      retain=True).wait_for_publish(2)
            for child in self._stand_ins.values():
                terminate_child(child)
            self.mqtt.stop()

    def stop(self) -> None:
        self._stop.set()
