"""aiokafka settings and helpers shared by the services and streaming consumers.

Partials and model versions can be several MB (chunks of ~1 MB plus the model), so every client
raises its size limits together with the topics' ``max.message.bytes``.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
)

from schemas import fedstream_pb2 as pb
from schemas.errors import InvalidMessage
from schemas.pki import KAFKA_CA, TlsFiles, tls_paths
from schemas.signing import TrustStore, open_model_version
from schemas.topics import Topics

log = logging.getLogger("fedstream.kafka")

MAX_MESSAGE_BYTES = 16 << 20
CLIENT_SIZES = {"max_request_size": MAX_MESSAGE_BYTES}
#: The history topic keeps every model version: deleted by nothing (no compaction, no time or
#: size limit). A deployment that must bound it sets ``retention.ms`` on the topic itself.
HISTORY_CONFIG = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}
CONSUMER_SIZES = {"max_partition_fetch_bytes": MAX_MESSAGE_BYTES, "fetch_max_bytes": 4 * MAX_MESSAGE_BYTES}


@dataclass(frozen=True)
class KafkaConn:
    """Where Kafka is and how to authenticate: plaintext, or TLS with a client certificate
    (mutual TLS; the broker maps the certificate's CN to the principal its ACLs name).

    Every aiokafka client of fedstream is built with ``**conn.kwargs()``.
    """

    bootstrap: str
    tls: TlsFiles | None = None

    def kwargs(self) -> dict[str, Any]:
        if self.tls is None:
            return {"bootstrap_servers": self.bootstrap}
        from aiokafka.helpers import create_ssl_context

        ctx = create_ssl_context(cafile=str(self.tls.ca), certfile=str(self.tls.cert),
                                 keyfile=str(self.tls.key))
        return {"bootstrap_servers": self.bootstrap, "security_protocol": "SSL",
                "ssl_context": ctx}


def as_conn(kafka: str | KafkaConn) -> KafkaConn:
    return kafka if isinstance(kafka, KafkaConn) else KafkaConn(kafka)


def add_kafka_args(ap: argparse.ArgumentParser | argparse._ArgumentGroup,
                   who: str = "this identity") -> None:
    """The Kafka flags of the operator tools (argparse): the same names and ``FEDSTREAM_*``
    variables as the services' settings. TLS is the default whenever the identity's three
    files are in the key directory; ``--kafka-plaintext`` forces an open connection."""
    env = os.environ.get
    ap.add_argument("--kafka", default=env("FEDSTREAM_KAFKA"), required=not env("FEDSTREAM_KAFKA"),
                    metavar="HOST:PORT", help="Kafka bootstrap servers (env FEDSTREAM_KAFKA)")
    for kind, what, default in (("ca", "CA certificate of the Kafka brokers", "ca-kafka.crt"),
                                ("cert", f"{who}'s Kafka client certificate", "<id>.kafka.crt"),
                                ("key", "the TLS key of --kafka-cert-file", "<id>.key")):
        ap.add_argument(f"--kafka-{kind}-file", type=Path, metavar="FILE",
                        default=env(f"FEDSTREAM_KAFKA_{kind.upper()}_FILE"),
                        help=f"{what} (default KEYS/tls/{default} when the three exist; env "
                        f"FEDSTREAM_KAFKA_{kind.upper()}_FILE)")
    ap.add_argument("--kafka-plaintext", action="store_true",
                    help="connect without TLS even if the key directory holds the Kafka files "
                    "(an open, local broker)")


def kafka_conn_from_args(a: argparse.Namespace, keys_dir: Path, identity: str,
                         role: str | None = None) -> KafkaConn:
    """The connection :func:`add_kafka_args`'s flags describe for ``identity``: the explicit
    files, else its files in ``keys_dir`` when all three exist, else plaintext. Files that are
    not ``identity``'s own (in ``role``) are refused (:class:`~schemas.pki.PkiError`, a
    ValueError), so are half the flags."""
    files = (a.kafka_ca_file, a.kafka_cert_file, a.kafka_key_file)
    if a.kafka_plaintext:
        if any(files):
            raise ValueError("--kafka-plaintext and the --kafka-*-file flags exclude each other")
        return KafkaConn(a.kafka)
    if not any(files):
        own = tls_paths(Path(keys_dir) / "tls", identity, "kafka", KAFKA_CA)
        derived = (own.ca, own.cert, own.key)
        if not all(p.exists() for p in derived):
            return KafkaConn(a.kafka)
        files = derived
    if not all(files):
        raise ValueError("--kafka-ca-file, --kafka-cert-file and --kafka-key-file go together")
    tls_files = TlsFiles(*files)
    tls_files.check(identity, role)
    return KafkaConn(a.kafka, tls_files)


async def ensure_topics(kafka: str | KafkaConn, topics: Topics) -> None:
    """Create the partials, (compacted) models, history (kept forever), control and
    (compacted) fleet topics if they do not exist yet (needs the right to create topics: an
    operator's or an admin's identity)."""
    admin = AIOKafkaAdminClient(**as_conn(kafka).kwargs())
    await admin.start()
    try:
        size = {"max.message.bytes": str(MAX_MESSAGE_BYTES)}
        new = [
            NewTopic(topics.partials, num_partitions=1, replication_factor=1, topic_configs=size),
            NewTopic(topics.models, num_partitions=1, replication_factor=1,
                     topic_configs={**size, "cleanup.policy": "compact"}),
            NewTopic(topics.history, num_partitions=1, replication_factor=1,
                     topic_configs={**size, **HISTORY_CONFIG}),
            NewTopic(topics.control, num_partitions=1, replication_factor=1, topic_configs=size),
            NewTopic(topics.fleet, num_partitions=1, replication_factor=1,
                     topic_configs={**size, "cleanup.policy": "compact"}),
        ]
        for topic in new:
            try:
                await admin.create_topics([topic])
            except TopicAlreadyExistsError:
                pass
            except (TopicAuthorizationFailedError, ClusterAuthorizationFailedError):
                # a locked-down cluster: the operator creates the topics, services may not
                log.debug("not allowed to create %s: leaving it to the operator", topic.name)
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


def model_consumer(kafka: str | KafkaConn) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        **as_conn(kafka).kwargs(), enable_auto_commit=False, isolation_level="read_committed",
        **CONSUMER_SIZES,
    )


async def read_latest_model(
    kafka: str | KafkaConn, topic: str, trust: TrustStore, model_name: str
) -> tuple[pb.ModelVersion | None, bytes | None]:
    """Latest committed, verified model version of ``model_name`` (and its envelope bytes)."""
    consumer = model_consumer(kafka)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        return await catch_up(consumer, topic, trust, model_name)
    finally:
        await consumer.stop()
