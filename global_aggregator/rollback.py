"""Rollback: an operator brings an earlier model version back as the newest one.

``fedstream-models rollback --to V`` appends one operator-signed ``Control`` command
(``action = "rollback"``, ``to_version = V``, a ``request_id``) to ``<ns>.control``. The global
aggregator reads it with the partials (:func:`open_command` opens lifts and rollbacks alike),
looks V up in the model history (:mod:`global_aggregator.history`), ends the open round at once
and, instead of that round's result, publishes a NEW version ``v_now + 1`` whose parameters and
server-optimizer state are V's, with ``provenance.rollback`` naming V, the request and its
reason. Rounds go on from it; edges, regions and streaming consumers follow it like any version
(its number is the newest: versions never go backwards, the model does).

Exactly once, crash-safe: the control record is consumed in the same Kafka transaction as the
version it produces (the global's consumer offsets travel with every version), so a crash before
the commit replays the request, a crash after it never does. A request id is applied at most
once: one already named by a version in the history is dropped as a duplicate (an operator who
re-sends the same request, or a replayed record).

Refused, each counted in ``fedstream_rejected_total{service="global", reason}`` and logged with
its reason, the round going on untouched: a command that is not validly signed (``unsigned``,
``bad_signature``, ``unknown_signer``, ...), one signed by anyone but an operator
(``unauthorized``), a malformed one (``bad_command``: bad request id, agents given, reason too
long, a version that is not older than the current one or belongs to another model), and a
rollback to a version that was never published (``unknown_version``).

The round the rollback ends is discarded (its partials were consumed; regions move on to the
next round, partials of the discarded round that arrive later are refused as ``late``).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import Counter

from global_aggregator.consumer import VerifiedModel
from global_aggregator.history import scan
from schemas import fedstream_pb2 as pb
from schemas.errors import InvalidMessage, Reason
from schemas.signing import TrustStore, header, open_control, open_envelope
from schemas.telemetry import DUPLICATES, reject
from schemas.topics import Topics

if TYPE_CHECKING:
    from global_aggregator.service import GlobalAggregator

log = logging.getLogger("fedstream.rollback")
SERVICE = "global"
ROLLBACK = "rollback"
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # fullmatch: no newline slips in
MAX_REASON = 500
MAX_CONTROL_BYTES = 1 << 20

ROLLBACKS = Counter(
    "fedstream_rollbacks_total",
    "Model versions published as a rollback to an earlier version, by trigger (operator: a "
    "signed fedstream-models rollback request)",
    ["trigger"],
)
for _trigger in ("operator", "canary"):  # exported at 0 from the start: alerts see the rise
    ROLLBACKS.labels(_trigger)


# ----------------------------------------------------------------------------------------------
# the request: made by the operator's tool, parsed by the global


def rollback_command(to_version: int, *, identity: str, request_id: str | None = None,
                     reason: str = "") -> pb.Control:
    """The ``Control`` body of a rollback request (sign it with :func:`schemas.signing.seal`
    for the control topic). ``request_id`` defaults to a fresh random one.

    Raises:
        InvalidMessage: ``bad_command`` for a negative version, a bad id or a reason too long.
    """
    cmd = pb.Control(header=header(identity, 0, 0, ""), action=ROLLBACK,
                     request_id=request_id if request_id is not None else uuid.uuid4().hex,
                     reason=reason)
    if to_version < 0:
        raise InvalidMessage(Reason.BAD_COMMAND, f"version {to_version} is negative")
    cmd.to_version = to_version
    check_rollback_body(cmd)
    return cmd


def check_rollback_body(cmd: pb.Control) -> None:
    """The rollback-specific checks of a decoded, verified ``Control``.

    Raises:
        InvalidMessage: ``bad_command`` with what is wrong.
    """
    if cmd.action != ROLLBACK:
        raise InvalidMessage(Reason.BAD_COMMAND, f"action {cmd.action!r} is not {ROLLBACK!r}")
    if cmd.agents:
        raise InvalidMessage(Reason.BAD_COMMAND, "a rollback names no agents")
    if not REQUEST_ID.fullmatch(cmd.request_id):
        raise InvalidMessage(Reason.BAD_COMMAND, f"request id {cmd.request_id[:80]!r}: use 1-64 "
                             "of [A-Za-z0-9._-]")
    if len(cmd.reason) > MAX_REASON:
        raise InvalidMessage(Reason.BAD_COMMAND, f"reason of {len(cmd.reason)} characters "
                             f"(at most {MAX_REASON})")


def parse_rollback(data: bytes, trust: TrustStore, *, topic: str) -> pb.Control:
    """Open one control-topic record that must be a rollback request: a ``Control`` envelope
    validly signed for ``topic`` by an identity with the ``operator`` role, naming a version,
    a well-formed request id and at most :data:`MAX_REASON` characters of reason.

    Raises:
        InvalidMessage: any reason of :func:`schemas.signing.open_envelope` (``malformed``,
            ``unsigned``, ``bad_signature``, ``unknown_signer``, ``revoked``, ...),
            ``unauthorized`` (not an operator: an agent, a region, even the global) or
            ``bad_command``.
    """
    opened = open_envelope(data, pb.CONTROL, trust, max_bytes=MAX_CONTROL_BYTES, topic=topic)
    if opened.signer.role != "operator":
        raise InvalidMessage(Reason.UNAUTHORIZED, f"rollback requested by {opened.signer.name!r}"
                             f" (a {opened.signer.role}), not by an operator")
    check_rollback_body(opened.body)
    return opened.body


def open_command(data: bytes, trust: TrustStore, *, topic: str) -> pb.Control:
    """Open any operator command of the control topic: a rollback (:func:`parse_rollback`) or
    a quarantine lift (:func:`schemas.signing.open_control`).

    Raises:
        InvalidMessage: as those two do.
    """
    opened = open_envelope(data, pb.CONTROL, trust, max_bytes=MAX_CONTROL_BYTES, topic=topic)
    if opened.body.action == ROLLBACK:
        return parse_rollback(data, trust, topic=topic)
    return open_control(data, trust, topic=topic)


# ----------------------------------------------------------------------------------------------
# the global's side


@dataclass(frozen=True)
class Approved:
    """A rollback request checked against the history: publish ``target``'s model."""

    command: pb.Control
    signer: str
    target: VerifiedModel


class Rollbacks:
    """The rollback requests the global aggregator read in the open round.

    :meth:`request` queues a parsed command (called where control records are read);
    :meth:`due` resolves the queue against the history (refusing what cannot be applied) and
    says whether a rollback must end the round; :meth:`publish` publishes it in place of the
    round's result. Several valid requests in one round: the last one read wins (the others
    are logged as superseded), so the operator's latest word is what the fleet gets.
    """

    def __init__(self, agg: GlobalAggregator) -> None:
        self.agg = agg
        self.pending: list[pb.Control] = []
        self.approved: Approved | None = None

    def request(self, cmd: pb.Control) -> None:
        log.warning("rollback to v%d requested by %s (request %s): %s", cmd.to_version,
                    cmd.header.sender, cmd.request_id, cmd.reason or "no reason given")
        self.pending.append(cmd)

    async def due(self, current: int) -> bool:
        """Resolve the queued requests against the history (a Kafka read, only when some are
        queued); True when an approved rollback waits to be published. ``current``: the
        newest version (the one the open round trains)."""
        if self.pending:
            queued, self.pending = self.pending, []
            await self._resolve(queued, current)
        return self.approved is not None

    async def _resolve(self, queued: list[pb.Control], current: int) -> None:
        agg = self.agg
        wanted = {c.to_version for c in queued}
        found: dict[int, VerifiedModel] = {}
        applied: set[str] = set()
        t = Topics(agg.s.namespace)
        for topic in (t.history, t.models):  # the model topic: versions from before history
            async for v in scan(agg.kafka, agg.keys.trust, topic, namespace=agg.s.namespace,
                                service=SERVICE):
                if v.model_name != agg.project.name:
                    continue
                if v.message.provenance.HasField("rollback"):
                    applied.add(v.message.provenance.rollback.request_id)
                if v.version in wanted:
                    found.setdefault(v.version, v)
        for cmd in queued:
            where = f"rollback request {cmd.request_id} of {cmd.header.sender}"
            if cmd.request_id in applied or (self.approved is not None
                                              and self.approved.command.request_id
                                              == cmd.request_id):
                DUPLICATES.labels(SERVICE).inc()
                log.warning("%s: applied already, dropped", where)
                continue
            target = found.get(cmd.to_version)
            try:
                if target is None:
                    raise InvalidMessage(Reason.UNKNOWN_VERSION, f"no version {cmd.to_version} of "
                                         f"{agg.project.name!r} in the model history (newest is "
                                         f"v{current})")
                if cmd.to_version >= current:
                    raise InvalidMessage(Reason.BAD_COMMAND, f"v{cmd.to_version} is not older "
                                         f"than the current v{current}")
                if target.params.size != agg.spec.num_params:
                    raise InvalidMessage(Reason.BAD_COMMAND, f"v{cmd.to_version} has "
                                         f"{target.params.size} parameters, the model now "
                                         f"{agg.spec.num_params}")
            except InvalidMessage as exc:
                reject(SERVICE, exc, where)
                continue
            if self.approved is not None:
                log.warning("rollback request %s superseded by %s", self.approved.command.request_id,
                            cmd.request_id)
            self.approved = Approved(cmd, cmd.header.sender, target)

    async def publish(self, producer: AIOKafkaProducer, consumer: AIOKafkaConsumer,
                      mv: pb.ModelVersion, lifts: set[str],
                      offsets: dict[TopicPartition, int] | None,
                      fedbuff_state: pb.FedBuffState | None) -> pb.ModelVersion:
        """Publish the approved rollback as the version after ``mv``, closing ``mv``'s round
        (its result discarded), in one transaction with the consumer offsets."""
        # here, not at the top: the operator's tool imports this module, and needs no JAX
        from global_aggregator.combine import RoundResult
        from global_aggregator.strategies import init_state, state_from_bytes, state_to_bytes

        approved, self.approved = self.approved, None
        assert approved is not None, "publish() without an approved rollback (call due())"
        agg, cmd, target = self.agg, approved.command, approved.target
        r, version = mv.next_task.round, mv.header.model_version
        params = np.array(target.params, dtype=np.float32)
        opt_raw = target.message.optimizer_state
        try:
            state_from_bytes(agg.opt, params, opt_raw)
        except InvalidMessage as exc:  # the strategy changed since: start its state afresh
            log.warning("v%d's optimizer state does not fit the server optimizer (%s): fresh "
                        "state", target.version, exc.detail)
            opt_raw = state_to_bytes(init_state(agg.opt, params))
        metrics: dict[str, float] = {"participants": 0.0, "rolled_back_to": float(target.version)}
        if agg.test_set is not None:
            from edge_agent.train import evaluate

            ev = evaluate(agg.spec, params, *agg.test_set)
            metrics.update({f"server_{k}": v for k, v in ev.items()})
        prov = pb.Provenance(
            parent_version=version, round=r, codec=mv.next_task.codec, strategy=agg.s.strategy,
            created_unix=time.time(), metrics=metrics,
            rollback=pb.Rollback(to_version=target.version, request_id=cmd.request_id,
                                 requested_by=approved.signer, reason=cmd.reason,
                                 discarded_round=r),
            # privacy spent never goes back: the discarded round's sums were never decrypted
            privacy=mv.provenance.privacy if mv.provenance.HasField("privacy") else None,
        )
        quarantine = agg._quarantine(mv.quarantine, RoundResult(None, 0, {}), lifts)
        new = agg._version(version + 1, r, params, opt_raw, prov, quarantine)
        if fedbuff_state is not None:
            new.fedbuff_state.CopyFrom(fedbuff_state)
        raw = await agg._publish(producer, new, consumer, offsets)
        ROLLBACKS.labels("operator").inc()
        agg.history.append({"round": r, "version": version + 1, "bytes": len(raw), **metrics})
        log.warning("round %d discarded: model v%d is a rollback to v%d (request %s by %s)", r,
                    version + 1, target.version, cmd.request_id, approved.signer)
        return new
