"""The global aggregator: Kafka partials in, one decryption per round, model versions out.

Exactly-once: partials are consumed (``read_committed``, no auto-commit) and the next model version
is produced in ONE Kafka transaction together with the consumer offsets of the partials it used
(aiokafka transactional producer, ``send_offsets_to_transaction``). A crash anywhere before the
commit leaves neither the model version nor the offsets: the restarted process re-reads the same
partials and computes the same version. Duplicate partials by (round, region, group, chunk) are
dropped.
The server optimizer state travels inside every model version, so a restart resumes from the
topics alone. Only this tier holds the secret HE key. It decrypts the total of all partials of a
round (``GlobalRound.finish``) and checks it against the bounds honest devices respect; only when
the total fails does it decrypt region totals and then groups of a failing region, never a sum of
fewer than ``min_group`` (k) agents. Failing groups are left out of the round (recorded in the
version's provenance and counted), devices that fail ``quarantine_after`` rounds in a row are
quarantined (refused by their region) until an operator lifts it with a signed command on the
control topic, which is consumed inside the same transaction as the partials. A round always
ends by its deadline plus grace; with fewer than ``min_participants`` usable agents the model is
republished unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced
from pydantic import Field

from edge_agent.models import init_flat, model_hash, project_spec, resolve
from edge_agent.train import LocalTrainConfig, evaluate
from global_aggregator.canary import Canaries
from global_aggregator.combine import GlobalRound, RoundResult
from global_aggregator.history import history_key
from global_aggregator.rollback import Rollbacks, open_command
from global_aggregator.sampling import select_agents
from global_aggregator.strategies import (
    init_state,
    make_server_optimizer,
    server_step,
    state_from_bytes,
    state_to_bytes,
)
from schemas import fedstream_pb2 as pb
from schemas.cli import KafkaClient, ServiceSettings
from schemas.codec import Codec
from schemas.errors import InvalidMessage, Reason
from schemas.fedbuff import FedBuff, check_budget
from schemas.fleet import FleetFollower
from schemas.kafka import (
    CLIENT_SIZES,
    CONSUMER_SIZES,
    MAX_MESSAGE_BYTES,
    ensure_topics,
    read_latest_model,
)
from schemas.keyring import GLOBAL_ID, Keyring
from schemas.project import load_project, task_hash
from schemas.settings import FederationSettings
from schemas.signing import header, open_envelope, seal
from schemas.task import codec_params, codec_spec
from schemas.telemetry import (
    ACCEPTED,
    ANOMALIES,
    ANOMALOUS_ROUNDS,
    BYTES,
    DUPLICATES,
    KAFKA_RETRIES,
    PRIVACY_BUDGET,
    PRIVACY_DELTA,
    PRIVACY_EPSILON,
    QUARANTINED,
    ROUND,
    ROUND_SECONDS,
    observe_lag,
    published,
    record_round,
    reject,
    serve,
)
from schemas.topics import Topics

if TYPE_CHECKING:
    from global_aggregator.privacy import PrivacyPlan

log = logging.getLogger("fedstream.global")
SERVICE = "global"


class GlobalSettings(ServiceSettings, KafkaClient, FederationSettings):
    """fedstream-global-aggregator: the round coordinator, the only holder of the secret key.
    Publishes signed model versions with their round task to the compacted Kafka model topic,
    consumes the regions' encrypted partial sums, decrypts only their total, applies the server
    optimizer and publishes the next version in the same Kafka transaction as the consumer
    offsets; resumes from the topics on restart. The federation's settings come from the
    project's [tool.fedstream.federation] table; flags and FEDSTREAM_<FLAG> environment
    variables (nested: FEDSTREAM_CODEC__BITS) override it."""

    model_config = ServiceSettings.model_config | {"cli_prog_name": "fedstream-global-aggregator"}

    keys: Path = Field(description="key directory with the SECRET HE context and the global key")
    project: Path = Field(description="the federation's project directory")
    secret_context: Path | None = Field(
        None, description="secret HE context file (default: KEYS/he/secret.ctx)")
    linger_s: float = Field(
        0.0, ge=0, description="after the final version, keep serving /metrics this many "
        "seconds (or until SIGTERM) so the last round's numbers can be scraped")
    kafka_retry_s: float = Field(2.0, gt=0, description="pause before resuming after a Kafka "
                                 "error")
    canary_fraction: float = Field(
        0.0, ge=0, le=1, description="canary rounds (sync mode, no DP; devices need --report-eval): "
        "each round's new version goes first to this fraction of the regions only, whose "
        "devices evaluate it; it is then promoted to every region, or rolled back (0: off)")
    canary_max_drop: float = Field(
        0.05, ge=0, le=1, description="roll a canary candidate back when its federated "
        "accuracy on the canary regions is more than this below the stable version's")
    accuracy_target: float | None = Field(
        None, gt=0, le=1, description="M10: count the rounds until the global model's accuracy "
        "first reaches this (fedstream_rounds_to_target)")

    @property
    def transactional_id(self) -> str:
        return f"{self.namespace}-global"

    @property
    def group_id(self) -> str:
        return f"{self.namespace}-global"


def train_spec(cfg: LocalTrainConfig, dp_delta: float = 0.0) -> pb.TrainSpec:
    return pb.TrainSpec(optimizer=cfg.optimizer, lr=cfg.lr, epochs=cfg.epochs,
                        batch_size=cfg.batch_size, prox_mu=cfg.prox_mu, dp_clip=cfg.dp_clip,
                        dp_noise_multiplier=cfg.dp_noise_multiplier,
                        dp_delta=dp_delta if cfg.dp else 0.0)


class GlobalAggregator:
    def __init__(self, settings: GlobalSettings) -> None:
        self.s = settings
        self.t = Topics(settings.namespace)
        self.keys = Keyring.load(settings.keys, GLOBAL_ID, secret=True,
                                 secret_path=settings.secret_context)
        if not self.keys.he.is_private:
            raise ValueError("the global aggregator needs the secret HE context")
        self.kafka = settings.kafka_conn(GLOBAL_ID, "global")
        self.regions = self.keys.trust.names(role="region")
        self.fleet: FleetFollower | None = None
        self.project = load_project(settings.project)
        self.spec = project_spec(self.project)
        self.model_hash = model_hash(self.spec)
        self.codec_params = settings.codec.params()
        self.privacy = self._privacy_plan(settings)
        codec = self._round_codec(0)  # refuses an unsummable plan before anything starts
        self.fedbuff = settings.fedbuff()
        if self.fedbuff is not None:
            check_budget(self.fedbuff, self.codec_params.max_summands, codec.num_chunks)
        self.train = LocalTrainConfig(**settings.train.model_dump())
        if settings.privacy.mode == "example":  # DP-SGD on every device; each accounts its own
            assert settings.privacy.noise_multiplier is not None
            self.train = replace(self.train, dp_clip=settings.privacy.example_clip,
                                 dp_noise_multiplier=settings.privacy.noise_multiplier)
        self.opt = make_server_optimizer(settings.strategy, lr=settings.server_lr,
                                         momentum=settings.server_momentum, b1=settings.b1,
                                         b2=settings.b2, tau=settings.tau)
        self.test_set = None
        if self.project.table.server_eval:
            x, y = resolve(self.project.table.server_eval, "server_eval")()
            self.test_set = (np.asarray(x, np.float32), np.asarray(y))
        if settings.min_group < 2 and settings.codec.encrypted:
            raise ValueError("privacy floor k = 1 with encrypted updates would let this "
                             "aggregator decrypt single devices' updates: set --min-group 2 or "
                             "more (k = 1 is for trusted, unencrypted deployments)")
        log.info("project %s %s: model %s (%d parameters, hash %s), %d rounds, privacy floor "
                 "k = %d", self.project.name, self.project.version, self.spec.factory,
                 self.spec.num_params, self.model_hash[:12], settings.rounds, settings.min_group)
        self.done = asyncio.Event()
        self._stop = asyncio.Event()
        self.history: list[dict] = []
        self.rollbacks = Rollbacks(self)  # operators' rollback requests of the open round
        self.canaries = Canaries(self)  # --canary-fraction: candidates, canary rounds

    @property
    def agents(self) -> list[str]:
        """The fleet now: the trust store, changed live by fleet records (enrolled devices are
        selected from the next round on, revoked ones no longer)."""
        return self.keys.trust.names(role="agent")

    # -- pure-ish helpers ------------------------------------------------------------------

    def _round_codec(self, round_id: int) -> Codec:
        """The codec of a round: the federation's parameters with the round's rotation seed
        (FedBuff: one rotation for the whole run, since a step sums updates of several rounds).
        The round task's project hash names the model definition and this codec's plan."""
        seed_round = 0 if self.s.mode == "fedbuff" else round_id
        return Codec(self.codec_params.for_round(self.s.seed, seed_round), self.spec.num_params,
                     self.keys.he if self.codec_params.encrypted else None)

    def _task(self, round_id: int, version: int, quarantined: list[str],
              suspects: list[str]) -> pb.RoundTask:
        agents = self.agents  # the fleet at this round's start
        selected = select_agents(agents, self.s.clients_per_round, self.s.seed, round_id)
        codec = self._round_codec(round_id)
        return pb.RoundTask(
            round=round_id, model_version=version, codec=codec_spec(codec.params),
            train=train_spec(self.train, self.s.privacy.delta), deadline_unix=time.time() + self.s.deadline_s,
            min_participants=self.s.min_participants, he_fingerprint=self.keys.he.fingerprint,
            seed=self.s.seed, selected_agents=selected if len(selected) < len(agents) else [],
            model_name=self.spec.factory, task_name=self.project.name,
            project_hash=task_hash(self.project.name, self.model_hash, codec.framer.digest),
            project_version=self.project.version,
            quarantined_agents=sorted(quarantined), min_group=self.s.min_group,
            suspected_agents=sorted(suspects),
            fedbuff=self.fedbuff.spec() if self.fedbuff is not None else None,
        )

    def _privacy_plan(self, settings: GlobalSettings) -> PrivacyPlan | None:
        """Distributed DP: the noise every device adds (in the codec of every round task)."""
        if settings.privacy.mode != "off" and settings.canary_fraction > 0:
            raise ValueError("canary rounds with differential privacy are not supported: a "
                             "canary is judged on federated evaluation, which devices withhold "
                             "in DP federations (it would travel in clear, outside the noise)")
        if settings.privacy.mode != "distributed":
            return None
        if settings.mode == "fedbuff":
            raise ValueError("distributed DP with --mode fedbuff is not supported yet: a step's "
                             "sum mixes rounds, which the accounting does not model")
        from global_aggregator.privacy import PrivacyPlan  # dp-accounting only when DP is on

        agents = self.agents
        sample = len(select_agents(agents, settings.clients_per_round, settings.seed, 1))
        plan = PrivacyPlan.make(settings.privacy, self.codec_params, self.spec.num_params,
                                rounds=settings.rounds, population=len(agents), sample=sample)
        self.codec_params = plan.codec_params(self.codec_params)
        PRIVACY_BUDGET.set(plan.budget or 0.0)
        PRIVACY_DELTA.set(plan.delta)
        log.info("distributed DP: each device adds discrete Gaussian noise of std %.1f "
                 "quantization steps (bound %d); %d devices' noise makes a round's total, "
                 "sensitivity %.1f; budget epsilon %s at delta %g", plan.sigma_device,
                 plan.noise_bound, plan.n_min, plan.sensitivity, plan.budget, plan.delta)
        return plan

    def _account(self, mv: pb.ModelVersion, result: RoundResult) -> pb.Privacy | None:
        """The privacy spent once this round's sums are released (None: DP off)."""
        if self.privacy is None:
            return None
        task = mv.next_task
        population = len(self.agents)
        sample = len(task.selected_agents) or population
        prev = mv.provenance.privacy if mv.provenance.HasField("privacy") else None
        spent = self.privacy.account(prev, population, sample, result.releases)
        spent.budget_reached = not self.privacy.may_run_another(spent, population, sample)
        PRIVACY_EPSILON.set(spent.epsilon)
        if spent.budget_reached and task.round < self.s.rounds:
            log.warning("privacy budget: epsilon %.3f spent, one more round would exceed %.3f: "
                        "round %d's version is the final one", spent.epsilon,
                        spent.budget, task.round)
        return spent

    def _version(self, version: int, round_id: int, params: np.ndarray, opt_state_raw: bytes,
                 provenance: pb.Provenance,
                 quarantine: pb.Quarantine | None = None) -> pb.ModelVersion:
        quarantine = quarantine if quarantine is not None else pb.Quarantine()
        final = round_id >= self.s.rounds or provenance.privacy.budget_reached
        mv = pb.ModelVersion(
            header=header(GLOBAL_ID, round_id, version, self.keys.he.fingerprint),
            model_name=self.project.name, num_params=int(params.size),
            params=np.asarray(params, "<f4").tobytes(), optimizer_state=opt_state_raw,
            provenance=provenance, final=final, quarantine=quarantine,
        )
        if not final:
            mv.next_task.CopyFrom(self._task(
                round_id + 1, version, list(quarantine.agents),
                [a for a in quarantine.strikes if a not in quarantine.agents]))
        return mv

    def _check_partial(self, raw: bytes, round_id: int, oldest: int | None = None
                       ) -> pb.PartialChunk:
        part = open_envelope(raw, pb.PARTIAL_CHUNK, self.keys.trust,
                             max_bytes=MAX_MESSAGE_BYTES, topic=self.t.partials).body
        who = self.keys.trust.get(part.header.sender)
        if who is None or who.role != "region" or part.region != part.header.sender:
            raise InvalidMessage("unauthorized", f"{part.header.sender!r} is not a region")
        lo = round_id if oldest is None else oldest  # FedBuff: regions may lag a few versions
        if not lo <= part.header.round <= round_id:
            raise InvalidMessage("late" if part.header.round < lo else "wrong_round",
                                 f"partial for round {part.header.round}, global is on {round_id}")
        if part.header.he_fingerprint != self.keys.he.fingerprint:
            raise InvalidMessage("wrong_fingerprint", "partial made with another HE context")
        for agent in part.agents:
            # revoked ones included: the region verified the update before the revocation
            # reached it (a revocation refuses a device's next update, not one already summed)
            a = self.keys.trust.state(agent)
            if a is None or a.role != "agent" or a.region != part.region:
                raise InvalidMessage("unauthorized", f"{agent!r} is not an agent of {part.region}")
        return part

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Run rounds until the final version; after a Kafka failure, resume from the topics."""
        serve(self.s.metrics_port, SERVICE, self.s.metrics_host)
        stop = asyncio.create_task(self._stop.wait(), name="stop")
        try:
            while not self.done.is_set():
                session = asyncio.create_task(self._session(), name="session")
                await asyncio.wait({session, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not session.done():
                    session.cancel()
                    await asyncio.gather(session, return_exceptions=True)
                    return
                try:
                    session.result()
                except ProducerFenced:
                    log.error("another global aggregator took over this transactional id")
                    raise
                except KafkaError as exc:
                    KAFKA_RETRIES.labels(SERVICE).inc()
                    log.warning("Kafka failed (%s: %s); resuming from the topics", type(exc).__name__,
                                exc)
                    await asyncio.sleep(self.s.kafka_retry_s)
            if self.s.linger_s > 0:  # keep /metrics up for a last scrape, until SIGTERM
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stop), self.s.linger_s)
        finally:
            stop.cancel()
            if self.fleet is not None:
                await self.fleet.stop()

    async def _session(self) -> None:
        """One incarnation of the Kafka clients. The transactional producer's start fences (and
        aborts the open transaction of) any older incarnation; the partials are read from the
        offsets committed with the last model version, by manual assignment (no group rebalance
        to wait for after a crash)."""
        await ensure_topics(self.kafka, self.t)
        if self.fleet is None:  # the fleet as it is now, before any round: then followed live
            self.fleet = FleetFollower(self.kafka, self.t, self.keys.trust)
            await self.fleet.caught_up()
        producer = AIOKafkaProducer(
            **self.kafka.kwargs(), transactional_id=self.s.transactional_id,
            enable_idempotence=True, acks="all", **CLIENT_SIZES,
        )
        consumer = AIOKafkaConsumer(
            **self.kafka.kwargs(), group_id=self.s.group_id,
            isolation_level="read_committed", enable_auto_commit=False,
            auto_offset_reset="earliest", **CONSUMER_SIZES,
        )
        try:
            await producer.start()
            await consumer.start()
            consumer.assign([TopicPartition(self.t.partials, 0),
                             TopicPartition(self.t.control, 0)])
            await self._rounds(producer, consumer)
        finally:
            for client in (consumer, producer):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.stop(), 5)

    async def _publish(self, producer: AIOKafkaProducer, mv: pb.ModelVersion,
                       consumer: AIOKafkaConsumer | None,
                       offsets: dict[TopicPartition, int] | None = None) -> bytes:
        raw = seal(pb.MODEL_VERSION, mv, GLOBAL_ID, self.keys.private_key, topic=self.t.models)
        async with producer.transaction():
            await producer.send(self.t.models, raw, key=mv.model_name.encode())
            await producer.send(self.t.history, raw, key=history_key(mv))  # kept forever
            if consumer is not None and consumer.assignment():
                at = {tp: await consumer.position(tp) for tp in consumer.assignment()}
                at.update(offsets or {})
                await producer.send_offsets_to_transaction(at, self.s.group_id)
        BYTES.labels(SERVICE, "kafka_out").inc(len(raw))
        published(SERVICE, mv.header.model_version, mv.final)
        return raw

    async def _rounds(self, producer: AIOKafkaProducer, consumer: AIOKafkaConsumer) -> None:
        mv, _ = await read_latest_model(self.kafka, self.t.models, self.keys.trust,
                                       self.project.name)
        if mv is None:
            params = init_flat(self.spec, self.s.seed)
            state = init_state(self.opt, params)
            mv = self._version(0, 0, params, state_to_bytes(state),
                               pb.Provenance(strategy=self.s.strategy, created_unix=time.time()))
            await self._publish(producer, mv, None)
            log.info("published initial model v0 (%d params)", params.size)
        else:
            log.info("resuming from model v%d (round %d)", mv.header.model_version,
                     mv.provenance.round)
            if not mv.final and mv.next_task.he_fingerprint != self.keys.he.fingerprint:
                mv = await self._reissue(producer, mv)
        while not mv.final:
            if mv.next_task.HasField("fedbuff"):
                mv = await self._one_step(producer, consumer, mv)
            else:
                mv = await self._one_round(producer, consumer, mv)
        log.info("final model v%d published", mv.header.model_version)
        self.done.set()

    async def _reissue(self, producer: AIOKafkaProducer, mv: pb.ModelVersion) -> pb.ModelVersion:
        """The HE context was rotated at this round boundary (``fedstream-keygen --rotate``):
        publish the same model again as a new version whose task for the open round names the
        new context. It carries that round in its header (the round the new keys start at)."""
        r = mv.next_task.round
        new = pb.ModelVersion()
        new.CopyFrom(mv)
        new.header.CopyFrom(header(GLOBAL_ID, r, mv.header.model_version + 1,
                                   self.keys.he.fingerprint))
        new.next_task.CopyFrom(self._task(r, new.header.model_version,
                                          list(mv.quarantine.agents),
                                          list(mv.next_task.suspected_agents)))
        new.provenance.metrics["reissued_task"] = 1.0
        await self._publish(producer, new, None)
        log.warning("HE context rotated: round %d's task reissued as model v%d under context %s",
                    r, new.header.model_version, self.keys.he.fingerprint[:16])
        return new

    async def _one_round(self, producer, consumer, mv: pb.ModelVersion) -> pb.ModelVersion:
        task = mv.next_task
        r = task.round
        ROUND.labels(SERVICE).set(r)
        t0 = time.time()
        codec = Codec(codec_params(task.codec), mv.num_params,
                      self.keys.he if task.codec.encrypted else None)
        gr = GlobalRound(codec, r, min_group=max(self.s.min_group, task.min_group))
        eval_sums = pb.EvalSums()
        seen_eval: set[tuple[str, str]] = set()
        empty: set[tuple[str, str]] = set()  # (region, batch) of partials without agents
        marked: set[str] = set()  # regions whose round-closing batch arrived
        lifts: set[str] = set()  # agents an operator released from quarantine
        update_bytes = 0
        expected = self.canaries.start_round(mv, set(self.regions))  # canary: its regions
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            await observe_lag(consumer, SERVICE)
            for tp, recs in batch.items():
                for rec in recs:
                    BYTES.labels(SERVICE, "kafka_in").inc(len(rec.value))
                    if tp.topic == self.t.control:
                        self._on_control(rec, lifts)
                        continue
                    try:
                        part = self._check_partial(rec.value, r)
                        if not part.agents and not part.payload:  # too few agents, or only
                            fresh = (part.region, part.batch) not in empty  # closes the round
                            empty.add((part.region, part.batch))
                        else:
                            fresh = gr.add_partial(part.region, part.group, part.group_count,
                                                   part.header.chunk_index, part.payload,
                                                   list(part.agents), list(part.weights),
                                                   batch=part.batch)
                    except InvalidMessage as exc:
                        reject(SERVICE, exc, f"partial at offset {rec.offset}")
                        continue
                    if part.region_complete:
                        marked.add(part.region)
                    if not fresh:  # a redelivered chunk of a group already held
                        DUPLICATES.labels(SERVICE).inc()
                    else:
                        ACCEPTED.labels(SERVICE, "partial_chunk").inc()
                        self._add_eval(part, seen_eval, eval_sums)
                        self.canaries.observe(part)
                        update_bytes += part.update_bytes
            complete = {region for region in marked if gr.batches_complete(region)}
            if complete >= expected:
                break
            if await self.rollbacks.due(mv.header.model_version):  # ends the round at once
                break
            if time.time() > task.deadline_unix + self.s.grace_s:  # a round always ends
                log.warning("round %d: deadline passed, closing with regions %s", r,
                            sorted(complete))
                break
        return await self._conclude(producer, consumer, mv, gr, eval_sums, lifts, update_bytes,
                                    t0)

    @staticmethod
    def _add_eval(part: pb.PartialChunk, seen: set[tuple[str, str]], sums: pb.EvalSums) -> None:
        """Add a batch's federated-evaluation sums once (they ride on its first chunk; a region
        of several replicas, or in FedBuff, sends one per batch)."""
        if part.HasField("eval") and (part.region, part.batch) not in seen:
            seen.add((part.region, part.batch))
            sums.loss_sum += part.eval.loss_sum
            sums.accuracy_sum += part.eval.accuracy_sum
            sums.count += part.eval.count

    def _on_control(self, rec, lifts: set[str]) -> None:
        """An operator's command (read in the same transaction as the partials)."""
        try:
            cmd = open_command(rec.value, self.keys.trust, topic=self.t.control)
        except InvalidMessage as exc:
            reject(SERVICE, exc, f"control record at offset {rec.offset}")
            return
        if cmd.action == "rollback":  # global_aggregator/rollback.py
            self.rollbacks.request(cmd)
        else:
            lifts.update(cmd.agents)

    async def _one_step(self, producer, consumer, mv: pb.ModelVersion) -> pb.ModelVersion:
        """One FedBuff server step: read partials in topic order until ``buffer_size`` updates
        (or a group that would overflow the codec's summand budget, or the deadline), then step
        and publish, committing the partials position at the cut, so that a restart replays
        exactly this step. Groups of any round in the staleness window count; an (agent, base
        round) counted by an earlier step (``fedbuff_state``) is refused."""
        task = mv.next_task
        fb = FedBuff.from_task(task)
        assert fb is not None
        r = task.round
        ROUND.labels(SERVICE).set(r)
        t0 = time.time()
        codec = Codec(codec_params(task.codec), mv.num_params,
                      self.keys.he if task.codec.encrypted else None)
        window = list(zip(mv.fedbuff_state.agents, mv.fedbuff_state.base_rounds))
        gr = GlobalRound(codec, r, min_group=max(self.s.min_group, task.min_group),
                         counted=window)
        eval_sums, seen_eval = pb.EvalSums(), set[tuple[str, str]]()
        lifts: set[str] = set()
        update_bytes = updates = 0
        ptp = TopicPartition(self.t.partials, 0)
        cut: int | None = None
        while cut is None:
            batch = await consumer.getmany(timeout_ms=200)
            await observe_lag(consumer, SERVICE)
            for tp, recs in batch.items():
                for rec in recs:
                    if tp.topic == self.t.control:
                        self._on_control(rec, lifts)
                        continue
                    if cut is not None:  # after the cut: the next step reads it again
                        continue
                    BYTES.labels(SERVICE, "kafka_in").inc(len(rec.value))
                    try:
                        part = self._check_partial(rec.value, r, oldest=r - fb.max_staleness)
                        if not part.agents:  # declines only: nothing to add
                            continue
                        m = sum(part.multiplicities) or len(part.agents)
                        if gr.summands and gr.summands + m > codec.params.max_summands:
                            cut = rec.offset  # no room: this group opens the next step
                            continue
                        fresh = gr.add_partial(
                            part.region, part.group, part.group_count, part.header.chunk_index,
                            part.payload, list(part.agents), list(part.weights),
                            batch=part.batch, multiplicities=list(part.multiplicities),
                            base_rounds=list(part.base_rounds))
                    except InvalidMessage as exc:
                        reject(SERVICE, exc, f"partial at offset {rec.offset}")
                        continue
                    if not fresh:
                        DUPLICATES.labels(SERVICE).inc()
                        continue
                    ACCEPTED.labels(SERVICE, "partial_chunk").inc()
                    updates += len(part.agents)
                    update_bytes += part.update_bytes
                    self._add_eval(part, seen_eval, eval_sums)
                    if updates >= fb.buffer_size:
                        cut = rec.offset + 1
            if cut is None and time.time() > task.deadline_unix:  # a step always ends
                log.info("FedBuff step %d: deadline with %d of %d updates", r, updates,
                         fb.buffer_size)
                break
        at = cut if cut is not None else await consumer.position(ptp)
        result = gr.finish()
        counted = [(a, b) for u in result.updates.values() for a, b, _ in u]
        keep = r + 1 - 2 * fb.max_staleness  # older base rounds can no longer arrive
        state = pb.FedBuffState(partials_offset=at)
        for a, b in sorted({*window, *counted}):
            if b >= keep:
                state.agents.append(a)
                state.base_rounds.append(b)
        new = await self._conclude(producer, consumer, mv, gr, eval_sums, lifts, update_bytes,
                                   t0, {ptp: at}, result=result, fedbuff_state=state)
        consumer.seek(ptp, at)
        return new

    async def _conclude(self, producer, consumer, mv: pb.ModelVersion, gr: GlobalRound,
                        eval_sums: pb.EvalSums, lifts: set[str], update_bytes: int, t0: float,
                        offsets: dict[TopicPartition, int] | None = None,
                        result: RoundResult | None = None,
                        fedbuff_state: pb.FedBuffState | None = None) -> pb.ModelVersion:
        """Decrypt the round's (or FedBuff step's) total, step the server optimizer and publish
        the next version with the consumer offsets (``offsets``: explicit, else positions)."""
        if await self.rollbacks.due(mv.header.model_version):  # replaces this round's result
            return await self.rollbacks.publish(producer, consumer, mv, lifts, offsets,
                                                fedbuff_state)
        if mv.HasField("canary"):  # a canary round ends: promote its candidate or roll back
            return await self.canaries.decide(producer, consumer, mv, lifts, offsets)
        task = mv.next_task
        r, version = task.round, mv.header.model_version
        params = np.frombuffer(mv.params, "<f4").copy()
        state = state_from_bytes(self.opt, params, mv.optimizer_state)
        result = result if result is not None else gr.finish()
        n = result.num_participants
        metrics: dict[str, float] = {"participants": float(n), "update_bytes": float(update_bytes),
                                     "excluded_agents": float(sum(len(e.agents)
                                                                  for e in result.excluded))}
        if result.avg_delta is not None and n >= self.s.min_participants:
            params, state = server_step(self.opt, params, state, result.avg_delta)
            metrics["weight_sum"] = float(result.weight_sum)
        else:
            log.warning("round %d: %d usable participants (need %d); model unchanged", r, n,
                        self.s.min_participants)
        quarantine = self._quarantine(mv.quarantine, result, lifts)
        if self.test_set is not None:
            ev = evaluate(self.spec, params, *self.test_set)
            metrics.update({f"server_{k}": v for k, v in ev.items()})
        if eval_sums.count:
            metrics["federated_accuracy"] = eval_sums.accuracy_sum / eval_sums.count
            metrics["federated_loss"] = eval_sums.loss_sum / eval_sums.count
        prov = pb.Provenance(
            parent_version=version, round=r, codec=task.codec, strategy=self.s.strategy,
            created_unix=time.time(), metrics=metrics,
            participants=[pb.RegionParticipants(region=k, agents=v)
                          for k, v in sorted(result.participants.items())]
            if self.fedbuff is None else
            [pb.RegionParticipants(region=k, agents=[a for a, _, _ in u],
                                   base_rounds=[b for _, b, _ in u],
                                   multiplicities=[m for _, _, m in u])
             for k, u in sorted(result.updates.items())],
            excluded=[pb.ExcludedGroup(region=e.region, agents=e.agents, reason=str(e.reason),
                                       detail=e.detail) for e in result.excluded],
            privacy=self._account(mv, result),
        )
        new = self._version(version + 1, r, np.asarray(params, np.float32),
                            state_to_bytes(state), prov, quarantine)
        self.canaries.propose(new, mv)  # --canary-fraction: a candidate for some regions first
        if fedbuff_state is not None:
            new.fedbuff_state.CopyFrom(fedbuff_state)
        raw = await self._publish(producer, new, consumer, offsets)
        ROUND_SECONDS.observe(time.time() - t0)
        record_round(metrics, r, None if task.HasField("fedbuff") else len(
            set(task.selected_agents or self.agents) - set(task.quarantined_agents)),
            self.s.accuracy_target)
        self.history.append({"round": r, "version": version + 1, "bytes": len(raw), **metrics})
        log.info("round %d -> model v%d: %d participants%s", r, version + 1, n,
                 f", server accuracy {metrics['server_accuracy']:.3f}"
                 if "server_accuracy" in metrics else "")
        return new

    def _quarantine(self, old: pb.Quarantine, result: RoundResult,
                    lifts: set[str]) -> pb.Quarantine:
        """Next quarantine state: a strike per excluded agent, reset for every agent whose update
        counted; ``quarantine_after`` strikes in a row quarantine a device; lifts clear both.
        Counted here (a restart that recomputes a round publishes the same state)."""
        strikes = dict(old.strikes)
        quarantined = set(old.agents)
        if result.excluded:
            ANOMALOUS_ROUNDS.inc()
        for e in result.excluded:
            ANOMALIES.labels(str(e.reason)).inc(len(e.agents))
            log.warning("round excluded %s group %s: %s", e.region, e.agents, e.detail)
            for a in e.agents:
                reject(SERVICE, InvalidMessage(Reason.EXCLUDED_GROUP,
                                               f"{a} ({e.region}) left out: {e.reason}"))
                strikes[a] = strikes.get(a, 0) + 1
                if strikes[a] >= self.s.quarantine_after and a not in quarantined:
                    quarantined.add(a)
                    log.warning("%s quarantined after %d failed rounds in a row", a, strikes[a])
        for agents in result.participants.values():
            for a in agents:
                strikes.pop(a, None)
        for a in lifts:
            if a in quarantined or a in strikes:
                log.info("operator lifted the quarantine of %s", a)
            quarantined.discard(a)
            strikes.pop(a, None)
        QUARANTINED.set(len(quarantined))
        return pb.Quarantine(strikes=strikes, agents=sorted(quarantined))

    def stop(self) -> None:
        self._stop.set()
