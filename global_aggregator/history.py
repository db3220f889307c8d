"""Model history: every version the global aggregator ever published, with its provenance.

The model topic (``<ns>.models``) is compacted by model name, so once the log cleaner has run it
holds only the latest version of each model: right for edges and streaming consumers that want
the current model, useless for an operator who asks what version 7 was, or wants it back. So the
global aggregator writes every version a second time, to ``<ns>.history``, **in the same Kafka
transaction** as the model version and its consumer offsets (``GlobalAggregator._publish``): a
version is in both topics or in neither, exactly once, also across crashes.

The history record is the model-topic envelope byte for byte (signed by the global for the
topic ``<ns>.models``, so it verifies the same way wherever it is read), keyed
``"<model name>/<version>"``; the topic is never compacted and never expires
(:data:`schemas.kafka.HISTORY_CONFIG`). Readers verify every record against ``trust.json``
(the global's key) and skip, count and log what does not verify, like every other consumer.

Usage::

    trust = TrustStore.load(Path("keys/trust.json"))
    versions = await read_history("127.0.0.1:9092", trust, namespace="fedstream")
    v7 = versions[7]                       # a VerifiedModel: params, metrics, provenance
    print(v7.message.provenance.parent_version, v7.metrics.get("server_accuracy"))

From a shell: ``fedstream-models list | show V | diff V1 V2 | export V`` (models_cli.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from aiokafka import TopicPartition

from global_aggregator.consumer import VerifiedModel, verify_model
from schemas import fedstream_pb2 as pb
from schemas.errors import InvalidMessage
from schemas.kafka import KafkaConn, model_consumer
from schemas.signing import TrustStore
from schemas.telemetry import REJECTED
from schemas.topics import Topics

log = logging.getLogger("fedstream.history")


def history_key(mv: pb.ModelVersion) -> bytes:
    """The history record's key: ``"<model name>/<version>"`` (unique per version)."""
    return f"{mv.model_name}/{mv.header.model_version}".encode()


async def scan(kafka: str | KafkaConn, trust: TrustStore, topic: str, *,
               namespace: str = "fedstream", service: str = "history"
               ) -> AsyncIterator[VerifiedModel]:
    """Every verified model version in ``topic`` (the history or the model topic), in topic
    order, committed transactions only, up to the topic's end when the scan started. A topic
    that does not exist yields nothing (and is not created: an old deployment without a
    history topic reads as an empty history). Records that do not verify are counted in
    ``fedstream_rejected_total{service}`` and skipped."""
    consumer = model_consumer(kafka)
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            log.info("no topic %s: nothing to read", topic)
            return
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=500)
            for rec in batch.get(tp, []):
                try:
                    yield verify_model(rec.value, trust, rec.offset, namespace=namespace)
                except InvalidMessage as exc:
                    REJECTED.labels(service, str(exc.reason)).inc()
                    log.warning("%s: record at offset %d skipped: %s", topic, rec.offset, exc)
    finally:
        await consumer.stop()


async def read_history(kafka: str | KafkaConn, trust: TrustStore, *,
                       namespace: str = "fedstream", model_name: str | None = None,
                       keep: Callable[[int], bool] | None = None,
                       service: str = "history") -> dict[int, VerifiedModel]:
    """Every version of ``model_name`` (any model if None: then all must be one model) by
    version number, oldest first: the history topic, completed by the model topic (versions
    published before the history topic existed, or its latest one if a reader races the
    cleaner).

    ``keep(version)``: keep only the versions it accepts (the others are verified and dropped,
    so looking one version up holds one model in memory).

    Raises:
        ValueError: the namespace holds several models and ``model_name`` is None.
    """
    t = Topics(namespace)
    out: dict[int, VerifiedModel] = {}
    names: set[str] = set()
    for topic in (t.history, t.models):
        async for v in scan(kafka, trust, topic, namespace=namespace, service=service):
            if model_name is not None and v.model_name != model_name:
                continue
            names.add(v.model_name)
            if v.version in out or (keep is not None and not keep(v.version)):
                continue
            out[v.version] = v
    if len(names) > 1:
        raise ValueError(f"namespace {namespace!r} holds several models ({', '.join(sorted(names))})"
                         ": name one with --model")
    return dict(sorted(out.items()))


async def find_version(kafka: str | KafkaConn, trust: TrustStore, *, namespace: str,
                       model_name: str, version: int, service: str = "history"
                       ) -> VerifiedModel | None:
    """Version ``version`` of ``model_name`` from the history (or the model topic), or None."""
    found = await read_history(kafka, trust, namespace=namespace, model_name=model_name,
                               keep=version.__eq__, service=service)
    return found.get(version)


def kind_of(mv: pb.ModelVersion) -> str:
    """What made a version: ``initial``, ``round``, ``candidate`` (a canary candidate, relayed
    by its canary regions only), ``promotion`` (a candidate its canary round promoted),
    ``rollback`` (an operator's, or a canary round's) or ``reissue`` (the same model
    republished under a rotated HE context)."""
    if mv.provenance.HasField("rollback"):
        return "rollback"
    if mv.provenance.HasField("canary") and mv.provenance.canary.decision == "promoted":
        return "promotion"
    if mv.HasField("canary"):
        return "candidate"
    if mv.provenance.metrics.get("reissued_task"):
        return "reissue"
    if mv.header.model_version == 0:
        return "initial"
    return "round"
