"""Streaming consumers: verified model versions from the Kafka model topic.

A consumer needs only the Kafka address and ``trust.json`` (public keys); every version is checked
against the global aggregator's Ed25519 key before it is yielded, and records that fail are
skipped and counted, never yielded.

Usage::

    trust = TrustStore.load(Path("keys/trust.json"))
    async for version in model_versions("127.0.0.1:9092", trust):
        print(version.version, version.round, version.metrics["server_accuracy"])
        weights = version.params            # float32 numpy vector (ravel_pytree order)

or from a shell: ``fedstream-models --kafka 127.0.0.1:9092 --trust keys/trust.json --follow``
(``fedstream-models list | show | diff | export | rollback``: the model history, see
:mod:`global_aggregator.history` and :mod:`global_aggregator.models_cli`).
Non-Python consumers decode ``schemas/fedstream.proto`` (Envelope -> ModelVersion) and verify the
signature over the bytes documented in :mod:`schemas.signing`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from aiokafka import TopicPartition

from schemas import fedstream_pb2 as pb
from schemas.errors import InvalidMessage
from schemas.kafka import (
    MAX_MESSAGE_BYTES,
    KafkaConn,
    model_consumer,
)
from schemas.signing import TrustStore, open_model_version
from schemas.telemetry import REJECTED
from schemas.topics import Topics


@dataclass(frozen=True)
class VerifiedModel:
    """One model version whose signature checked out."""

    model_name: str
    version: int
    round: int
    final: bool
    params: np.ndarray
    metrics: dict[str, float]
    participants: dict[str, list[str]]
    message: pb.ModelVersion
    offset: int


def verify_model(raw: bytes, trust: TrustStore, offset: int = -1, *,
                 namespace: str = "fedstream") -> VerifiedModel:
    """Verify one model-topic record; raises InvalidMessage if it is not the global's."""
    mv = open_model_version(raw, trust, max_bytes=MAX_MESSAGE_BYTES,
                            topic=Topics(namespace).models)
    params = np.frombuffer(mv.params, "<f4")
    if params.size != mv.num_params:
        raise InvalidMessage("truncated", f"{params.size} parameters, header says {mv.num_params}")
    return VerifiedModel(
        model_name=mv.model_name, version=mv.header.model_version, round=mv.provenance.round,
        final=mv.final, params=params, metrics=dict(mv.provenance.metrics),
        participants={p.region: list(p.agents) for p in mv.provenance.participants},
        message=mv, offset=offset,
    )


async def model_versions(
    kafka: str | KafkaConn,
    trust: TrustStore,
    *,
    namespace: str = "fedstream",
    model_name: str | None = None,
    from_beginning: bool = True,
    follow: bool = True,
    idle_timeout_s: float | None = None,
) -> AsyncIterator[VerifiedModel]:
    """Yield verified model versions in topic order (committed transactions only); a version
    older than one already yielded (an appended old version) is refused as ``stale_version``.

    Args:
        from_beginning: start at the oldest retained version (the topic is compacted, so this is
            at least the latest version of every model), else only new ones.
        follow: keep waiting for new versions; with False, stop at the current end.
        idle_timeout_s: with ``follow``, stop after this long without a new record.
    """
    topic = Topics(namespace).models
    consumer = model_consumer(kafka)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        if from_beginning:
            await consumer.seek_to_beginning(tp)
        else:
            await consumer.seek_to_end(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        idle = 0.0
        newest: dict[str, int] = {}
        while True:
            if not follow and await consumer.position(tp) >= end:
                return
            batch = await consumer.getmany(tp, timeout_ms=500)
            recs = batch.get(tp, [])
            idle = 0.0 if recs else idle + 0.5
            if idle_timeout_s is not None and idle >= idle_timeout_s:
                return
            for rec in recs:
                try:
                    v = verify_model(rec.value, trust, rec.offset, namespace=namespace)
                except InvalidMessage as exc:
                    REJECTED.labels("consumer", str(exc.reason)).inc()
                    continue
                if v.version < newest.get(v.model_name, -1):
                    REJECTED.labels("consumer", "stale_version").inc()
                    continue
                newest[v.model_name] = v.version
                if model_name is None or v.model_name == model_name:
                    yield v
    finally:
        await consumer.stop()


def main(argv: list[str] | None = None) -> None:
    """``fedstream-models``: this streaming consumer as a command (one JSON line per version),
    and the model history's list, show, diff, export and rollback (models_cli.py)."""
    from global_aggregator.models_cli import main as cli

    cli(argv)


if __name__ == "__main__":
    main()
