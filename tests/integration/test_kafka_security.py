"""The locked-down Kafka of ``LocalStack(secure=True)`` (mutual TLS, CN = principal, the KRaft
standard authorizer, deny by default) with a federation's ACLs (compose/kafka_security.py), on
the real broker: every refusal below comes from the broker, as the aiokafka error asserted.

One stack and one namespace for the whole module (the JVM's start is most of its time).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
from aiokafka.helpers import create_ssl_context

from compose.kafka_security import (
    apply_acls,
    describe_acls,
    federation_acls,
    global_group_id,
    global_transactional_id,
    regional_transactional_id,
)
from compose.localstack import LocalStack, StackError, kafka_properties
from schemas.kafka import KafkaConn, ensure_topics
from schemas.pki import KAFKA_CA, Pki, TlsFiles
from schemas.topics import Topics
from tests.conftest import _require_brokers

REGIONS = ["region-0", "region-1"]
IDENTITIES = {"global": "global", "region-0": "region", "region-1": "region",
              "operator": "operator", "consumer": "consumer"}
TIMEOUT_MS = 5000


@dataclass
class Federation:
    stack: LocalStack
    ns: str
    t: Topics
    ids: dict[str, KafkaConn]
    id_dir: Path

    def foreign(self, pki: Pki, ca: str, cn: str, role: str) -> KafkaConn:
        """``cn``'s client certificate from CA ``ca`` of ``pki``, presented to a client that
        trusts the Kafka CA (so any refusal is the broker's)."""
        tls = pki.issue_files(ca, cn, role, self.id_dir / f"{ca}-{cn}.key",
                              self.id_dir / f"{ca}-{cn}.crt")
        return KafkaConn(self.stack.kafka_bootstrap,
                         TlsFiles(self.stack.admin_tls.ca, tls.cert, tls.key))


@pytest.fixture(scope="module")
def locked_kafka():
    _require_brokers()
    s = LocalStack([], secure=True, kafka_timeout=60)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def fed(locked_kafka, tmp_path_factory) -> Federation:
    ns = f"sec-{uuid.uuid4().hex[:8]}"
    d = tmp_path_factory.mktemp("kafka-identities")
    pki = locked_kafka.pki
    assert pki is not None
    ids = {cn: KafkaConn(locked_kafka.kafka_bootstrap,
                         pki.issue_files(KAFKA_CA, cn, role, d / f"{cn}.key", d / f"{cn}.crt"))
           for cn, role in IDENTITIES.items()}
    apply_acls(locked_kafka.kafka_conn, federation_acls(ns, REGIONS))
    # the operator creates the namespace's four topics (literal CREATE), as fedstream-fleet does
    asyncio.run(ensure_topics(ids["operator"], Topics(ns)))
    return Federation(locked_kafka, ns, Topics(ns), ids, d)


@asynccontextmanager
async def started(client):
    try:
        await client.start()
        yield client
    finally:
        await client.stop()


def producer(conn: KafkaConn, **kw) -> AIOKafkaProducer:
    return AIOKafkaProducer(**conn.kwargs(), acks="all", request_timeout_ms=TIMEOUT_MS, **kw)


def consumer(conn: KafkaConn, *topics: str, **kw) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(*topics, **conn.kwargs(), enable_auto_commit=False,
                            isolation_level="read_committed", auto_offset_reset="earliest",
                            request_timeout_ms=TIMEOUT_MS, **kw)


async def transact(conn: KafkaConn, tid: str, topic: str, value: bytes) -> None:
    async with started(producer(conn, transactional_id=tid)) as p, p.transaction():
        await p.send(topic, value, key=b"k")


async def read_all(conn: KafkaConn, topic: str, **kw) -> list[bytes]:
    async with started(consumer(conn, **kw)) as c:
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        await c.seek_to_beginning(tp)
        end = (await c.end_offsets([tp]))[tp]
        out: list[bytes] = []
        while await c.position(tp) < end:
            out += [r.value for r in (await c.getmany(tp, timeout_ms=1000)).get(tp, [])]
        return out


async def subscribe(conn: KafkaConn, topic: str, group: str | None = None, *,
                    until: bytes = b"") -> list[bytes]:
    """Subscribe to ``topic`` (in ``group``, or without a group) and read until ``until``."""
    async with started(consumer(conn, topic, group_id=group)) as sub:
        out: list[bytes] = []
        for _ in range(20):
            batch = await sub.getmany(timeout_ms=500)
            out += [r.value for recs in batch.values() for r in recs]
            if until in out:
                break
        return out


def tls_refusal(bootstrap: str, ca: Path, tls: TlsFiles | None) -> str:
    """The TLS alert the broker answers a handshake with (``tls``'s certificate, or none)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if tls is not None:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    host, port = bootstrap.rsplit(":", 1)
    with socket.create_connection((host, int(port)), 5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=host) as s:
                s.sendall(b"\0\0\0\0")  # TLS 1.3: the client's certificate is judged now
                s.recv(16)
        except ssl.SSLError as exc:
            return exc.reason or str(exc)
    return "accepted"


# ----------------------------------------------------------------------------------------------
# configuration (no broker)


def test_plaintext_properties_unchanged_and_secure_refuses_proxy(tmp_path):
    plain = kafka_properties(1, 9092, 9093, tmp_path, (9094, 9095))
    assert "ssl." not in plain and "authorizer" not in plain
    assert "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT," in plain
    secure = kafka_properties(1, 9092, 9093, tmp_path, None, (tmp_path / "ca", tmp_path / "ks"))
    assert "listener.security.protocol.map=SSL:SSL,CONTROLLER:SSL\n" in secure
    assert "PLAINTEXT" not in secure
    for line in ("ssl.client.auth=required", "ssl.truststore.type=PEM",
                 "allow.everyone.if.no.acl.found=false",
                 "super.users=User:kafka-broker;User:admin",
                 "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer"):
        assert f"\n{line}\n" in secure
    with pytest.raises(StackError, match="plaintext mode"):
        kafka_properties(1, 9092, 9093, tmp_path, (9094, 9095), (tmp_path / "ca", tmp_path / "ks"))


def test_acl_table_shape():
    acls = federation_acls("fs", REGIONS)
    who = {a.principal for a in acls}
    assert who == {"User:region-0", "User:region-1", "User:global", "User:operator",
                   "User:consumer"}
    assert all(a.permission == "allow" for a in acls)
    writers = {(a.principal, a.resource_name) for a in acls if a.operation == "write"}
    assert writers == {("User:region-0", "fs.partials"), ("User:region-1", "fs.partials"),
                       ("User:region-0", "fs-regional-region-0"),
                       ("User:region-1", "fs-regional-region-1"),
                       ("User:region-0", "fs-regional-region-0-"),  # its replicas (prefixed)
                       ("User:region-1", "fs-regional-region-1-"),
                       ("User:global", "fs.models"), ("User:global", "fs-global"),
                       ("User:global", "fs.history"),  # the model history, same transaction
                       ("User:operator", "fs.control"), ("User:operator", "fs.fleet")}
    prefixed = {a.resource_name for a in acls if a.pattern == "prefixed"}
    # a replica's id is <region's id>-<name>: "fs-regional-region-1-" cannot match region-10's
    assert prefixed == {"fs-consumer", "fs-regional-region-0-", "fs-regional-region-1-"}
    readers_partials = {a.principal for a in acls
                        if a.resource_name == "fs.partials" and a.operation == "read"}
    # the global, and the regions reading back their replicas' batches (never a consumer)
    assert readers_partials == {"User:global", "User:region-0", "User:region-1"}
    assert len(acls) == len(set(acls))


# ----------------------------------------------------------------------------------------------
# who cannot connect at all


@pytest.mark.network
def test_plaintext_client_cannot_use_the_tls_listener(locked_kafka):
    async def go():
        async with started(producer(KafkaConn(locked_kafka.kafka_bootstrap))):
            pass

    with pytest.raises(KafkaConnectionError):
        asyncio.run(go())


@pytest.mark.network
@pytest.mark.parametrize("who", ["no-certificate", "other-ca", "device"])
def test_client_without_a_kafka_ca_certificate_fails_the_handshake(fed, who, tmp_path):
    ca = fed.stack.admin_tls.ca
    bootstrap = fed.stack.kafka_bootstrap
    tls: TlsFiles | None = None
    if who == "no-certificate":
        kw = {"security_protocol": "SSL", "ssl_context": create_ssl_context(cafile=str(ca))}
        expected = ("BAD_CERTIFICATE", "CERTIFICATE_REQUIRED")
    else:
        if who == "other-ca":  # a second PKI: its own "kafka" CA, a certificate named global
            conn = fed.foreign(Pki(tmp_path / "ca", tmp_path / "pub"), KAFKA_CA, "global",
                               "global")
        else:  # a device certificate, from its region's CA
            assert fed.stack.pki is not None
            conn = fed.foreign(fed.stack.pki, "region-0", "dev-0", "agent")
        tls = conn.tls
        kw = {k: v for k, v in conn.kwargs().items() if k != "bootstrap_servers"}
        expected = ("CERTIFICATE_UNKNOWN", "UNKNOWN_CA")

    async def go():
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=TIMEOUT_MS, **kw)
        async with started(p):
            pass

    with pytest.raises(KafkaConnectionError):
        asyncio.run(go())
    reason = tls_refusal(bootstrap, ca, tls)  # e.g. SSLV3_ALERT_BAD_CERTIFICATE
    assert any(e in reason for e in expected), reason


# ----------------------------------------------------------------------------------------------
# what each identity may do once the federation's ACLs are in


@pytest.mark.network
def test_broker_holds_exactly_the_federation_acls(fed):
    assert describe_acls(fed.stack.kafka_conn) == sorted(federation_acls(fed.ns, REGIONS))
    assert describe_acls(fed.stack.kafka_conn, principal="User:dev-0") == []


@pytest.mark.network
def test_region_and_global_transactions(fed):
    """region-0 commits a partial under its own transactional id; the global reads it (read
    committed, position in its group) and commits a model version with its offsets."""
    from aiokafka.structs import OffsetAndMetadata

    t, ns = fed.t, fed.ns

    async def go():
        await transact(fed.ids["region-0"], regional_transactional_id(ns, "region-0"),
                       t.partials, b"partial-r0")
        g = fed.ids["global"]
        async with started(producer(g, transactional_id=global_transactional_id(ns))) as p, \
                started(consumer(g, group_id=global_group_id(ns))) as c:
            tp = TopicPartition(t.partials, 0)
            c.assign([tp])
            got = []
            for _ in range(20):
                got += (await c.getmany(tp, timeout_ms=500)).get(tp, [])
                if got:
                    break
            assert [r.value for r in got] == [b"partial-r0"]
            async with p.transaction():
                await p.send(t.models, b"model-v1", key=b"m")
                await p.send_offsets_to_transaction(
                    {tp: OffsetAndMetadata(got[-1].offset + 1, "")}, global_group_id(ns))
            # the offsets become visible once the commit markers are written (asynchronously)
            for _ in range(50):
                if await c.committed(tp) == got[-1].offset + 1:
                    break
                await asyncio.sleep(0.1)
            assert await c.committed(tp) == got[-1].offset + 1
        return await read_all(fed.ids["region-1"], t.models)

    assert b"model-v1" in asyncio.run(go())


@pytest.mark.network
def test_region_cannot_write_the_models_topic(fed):
    t, ns = fed.t, fed.ns
    r0 = fed.ids["region-0"]

    async def in_transaction():
        await transact(r0, regional_transactional_id(ns, "region-0"), t.models, b"forged")

    async def idempotent():
        async with started(producer(r0, enable_idempotence=True)) as p:
            await p.send_and_wait(t.models, b"forged", key=b"m")

    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(in_transaction())
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(idempotent())
    assert b"forged" not in asyncio.run(read_all(fed.ids["global"], t.models))


@pytest.mark.network
def test_region_cannot_use_another_identitys_transactional_id(fed):
    t, ns = fed.t, fed.ns
    r0 = fed.ids["region-0"]
    for tid in (global_transactional_id(ns), regional_transactional_id(ns, "region-1")):
        with pytest.raises(TransactionalIdAuthorizationFailed):
            asyncio.run(transact(r0, tid, t.partials, b"fencing attempt"))
    # nothing was fenced: the global's producer starts and commits afterwards
    asyncio.run(transact(fed.ids["global"], global_transactional_id(ns), t.models, b"model-v2"))
    assert b"model-v2" in asyncio.run(read_all(fed.ids["consumer"], t.models))


@pytest.mark.network
def test_model_history_written_with_the_version_read_by_operator_and_consumers(fed):
    """The global writes a version to models and history in one transaction (as its _publish
    does); the operator and streaming consumers read the history, a region neither reads nor
    writes it."""
    t, ns = fed.t, fed.ns

    async def publish():
        async with started(producer(fed.ids["global"],
                                    transactional_id=global_transactional_id(ns))) as p:
            async with p.transaction():
                await p.send(t.models, b"model-h1", key=b"m")
                await p.send(t.history, b"model-h1", key=b"m/1")

    asyncio.run(publish())
    for who in ("operator", "consumer", "global"):
        assert b"model-h1" in asyncio.run(read_all(fed.ids[who], t.history)), who
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(subscribe(fed.ids["region-0"], t.history))
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(transact(fed.ids["region-0"], regional_transactional_id(ns, "region-0"),
                             t.history, b"forged"))


@pytest.mark.network
def test_streaming_consumer_reads_models_not_partials(fed):
    t, ns = fed.t, fed.ns
    c = fed.ids["consumer"]
    asyncio.run(transact(fed.ids["global"], global_transactional_id(ns), t.models, b"model-v3"))
    assert b"model-v3" in asyncio.run(read_all(c, t.models))
    # its own group prefix: allowed, on the models topic
    group = f"{ns}-consumer-dashboard"
    assert b"model-v3" in asyncio.run(subscribe(c, t.models, group, until=b"model-v3"))
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(subscribe(c, t.partials, group))
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(subscribe(c, t.partials))
    with pytest.raises(GroupAuthorizationFailedError):
        asyncio.run(read_all(c, t.models, group_id=global_group_id(ns)))


@pytest.mark.network
def test_operator_creates_topics_and_commands_reach_the_global_only(fed):
    t = fed.t

    async def listed() -> list[str]:
        admin = AIOKafkaAdminClient(**fed.stack.kafka_conn.kwargs())
        await admin.start()
        try:
            return await admin.list_topics()
        finally:
            await admin.close()

    # the fixture's ensure_topics, as the operator (a refusal there would be silent)
    assert {t.partials, t.models, t.history, t.control, t.fleet} <= set(asyncio.run(listed()))

    async def go():
        async with started(producer(fed.ids["operator"], enable_idempotence=True)) as p:
            await p.send_and_wait(t.control, b"lift", key=b"op")
            await p.send_and_wait(t.fleet, b"enrol", key=b"dev-0")
        return (await read_all(fed.ids["global"], t.control),
                await read_all(fed.ids["region-0"], t.fleet))

    control, fleet = asyncio.run(go())
    assert control == [b"lift"] and fleet == [b"enrol"]
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(subscribe(fed.ids["region-0"], t.control))
