"""aiokafka settings and helpers shared by the services and streaming consumers.

Partials and model versions can be several MB (chunks of ~1 MB plus the model), so every client
raises its size limits together with the topics' ``max.message.bytes``.
"""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from schemas import fedstream_pb2 as pb
from schemas.errors import InvalidMessage
from schemas.signing import TrustStore, open_model_version
from schemas.topics import Topics

log = logging.getLogger("fedstream.kafka")

MAX_MESSAGE_BYTES = 16 << 20
CLIENT_SIZES = {"max_request_size": MAX_MESSAGE_BYTES}
CONSUMER_SIZES = {"max_partition_fetch_bytes": MAX_MESSAGE_BYTES, "fetch_max_bytes": 4 * MAX_MESSAGE_BYTES}


async def ensure_topics(bootstrap: str, topics: Topics) -> None:
    """Create the partials and (compacted) models topics if they do not exist yet."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        size = {"max.message.bytes": str(MAX_MESSAGE_BYTES)}
        new = [
            NewTopic(topics.partials, num_partitions=1, replication_factor=1, topic_configs=size),
            NewTopic(topics.models, num_partitions=1, replication_factor=1,
                     topic_configs={**size, "cleanup.policy": "compact"}),
            NewTopic(topics.control, num_partitions=1, replication_factor=1, topic_configs=size),
        ]
        for topic in new:
            try:
                await admin.create_topics([topic])
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()


async def catch_up(
    consumer: AIOKafkaConsumer, topic: str, trust: TrustStore, model_name: str
) -> tuple[pb.ModelVersion | None, bytes | None]:
    """Read the assigned model-topic partition from its position to its current end.

    Returns the verified version of ``model_name`` (any model if empty) with the HIGHEST version
    number (and its envelope bytes), not the last record: anyone able to append an old signed
    version must not roll the federation back. Leaves the consumer positioned at the end, ready
    to follow new versions.
    """
    tp = TopicPartition(topic, 0)
    end = (await consumer.end_offsets([tp]))[tp]
    latest: tuple[pb.ModelVersion | None, bytes | None] = (None, None)
    while await consumer.position(tp) < end:
        batch = await consumer.getmany(tp, timeout_ms=500)
        for rec in batch.get(tp, []):
            try:
                mv = open_model_version(rec.value, trust, max_bytes=MAX_MESSAGE_BYTES, topic=topic)
            except InvalidMessage as exc:
                log.warning("skipping model record at offset %d: %s", rec.offset, exc)
                continue
            if model_name and mv.model_name != model_name:
                continue
            best = latest[0]
            if best is None or mv.header.model_version > best.header.model_version:
                latest = (mv, rec.value)
            elif mv.header.model_version < best.header.model_version:
                log.warning("stale model v%d at offset %d after v%d: ignored",
                            mv.header.model_version, rec.offset, best.header.model_version)
    return latest


def model_consumer(bootstrap: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed",
        **CONSUMER_SIZES,
    )


async def read_latest_model(
    bootstrap: str, topic: str, trust: TrustStore, model_name: str
) -> tuple[pb.ModelVersion | None, bytes | None]:
    """Latest committed, verified model version of ``model_name`` (and its envelope bytes)."""
    consumer = model_consumer(bootstrap)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        return await catch_up(consumer, topic, trust, model_name)
    finally:
        await consumer.stop()
