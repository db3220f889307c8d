"""The local broker stack against real brokers on loopback (Mosquitto 2, Kafka 4.1.1 KRaft).

These pin down the broker behaviour the delivery design relies on (docs: /work/shared/ARCHITECTURE.md):
- a persistent MQTT session with manual ack gets every unacked QoS1 message again, with the dup
  flag, after a reconnect -- and after a kill -9 + restart of Mosquitto;
- Kafka transactions: offsets committed with the output, aborted output invisible to
  read_committed, compaction keeps the latest value per key, committed data survives kill -9.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

paho = pytest.importorskip("paho.mqtt.client")
mqtt = paho

N_MSGS = 50
PAYLOAD = 300 * 1024


# ----------------------------------------------------------------------------------------------
# MQTT helpers


class Sub:
    """A paho v3.1.1 subscriber with manual ack; collects (payload-prefix, dup, mid) and never acks
    unless told to."""

    def __init__(self, host: str, port: int, client_id: str, *, clean: bool = False, ack: bool = False):
        self.host, self.port, self.ack = host, port, ack
        self.msgs: list[mqtt.MQTTMessage] = []
        self.connected = threading.Event()
        self.session_present: bool | None = None
        self.lock = threading.Lock()
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
            protocol=mqtt.MQTTv311,
        )
        self.c.manual_ack_set(True)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, rc, props=None):
        self.session_present = flags.session_present
        self.connected.set()

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.msgs.append(msg)
        if self.ack:
            client.ack(msg.mid, msg.qos)

    def connect(self, subscribe: str | None = None) -> Sub:
        self.connected.clear()
        self.c.connect(self.host, self.port, keepalive=30)
        self.c.loop_start()
        assert self.connected.wait(10), "no CONNACK"
        if subscribe:
            r, mid = self.c.subscribe(subscribe, qos=1)
            assert r == mqtt.MQTT_ERR_SUCCESS
        return self

    def wait_for(self, n: int, timeout: float = 20.0) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.msgs) >= n:
                    return list(self.msgs)
            time.sleep(0.02)
        with self.lock:
            return list(self.msgs)

    def settle(self, quiet: float = 0.5) -> list:
        """Wait until no new message arrived for `quiet` seconds."""
        last = -1
        while True:
            with self.lock:
                n = len(self.msgs)
            if n == last:
                return list(self.msgs)
            last = n
            time.sleep(quiet)

    def barrier(self, timeout: float = 10.0) -> None:
        """Round trip through the broker: a SUBACK means every packet we sent before (our PUBACKs
        from ack()) has been processed. ack() only queues the PUBACK; disconnecting right after it
        can lose acks (observed: 20 of 50 acks lost, the messages came back in the next session)."""
        done = threading.Event()
        self.c.on_subscribe = lambda *a, **k: done.set()
        r, _ = self.c.subscribe(f"$barrier/{uuid.uuid4().hex}", qos=0)
        assert r == mqtt.MQTT_ERR_SUCCESS
        assert done.wait(timeout), "no SUBACK for the barrier"

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def publish_all(host: str, port: int, topic: str, n: int, size: int = PAYLOAD, start: int = 0) -> list[bytes]:
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}",
                      protocol=mqtt.MQTTv311)
    pub.max_inflight_messages_set(100)
    pub.max_queued_messages_set(0)
    pub.connect(host, port, keepalive=30)
    pub.loop_start()
    try:
        payloads, infos = [], []
        for i in range(start, start + n):
            p = i.to_bytes(4, "big") + os.urandom(16) + bytes(size - 20)
            payloads.append(p)
            infos.append(pub.publish(topic, p, qos=1))
        for info in infos:
            info.wait_for_publish(30)  # PUBACK received: the broker owns the message now
            assert info.is_published()
        return payloads
    finally:
        pub.disconnect()
        pub.loop_stop()


def seqs(msgs) -> list[int]:
    return sorted(int.from_bytes(m.payload[:4], "big") for m in msgs)


# ----------------------------------------------------------------------------------------------
# MQTT


@pytest.mark.network
@pytest.mark.parametrize("region", ["region-0", "region-1"])
def test_mqtt_qos1_round_trip_each_region(stack, topic_prefix, region):
    host, port = stack.mqtt[region]
    topic = f"fedstream/{region}/updates/{topic_prefix}"
    sub = Sub(host, port, f"rt-{topic_prefix}", clean=True, ack=True).connect(subscribe=topic)
    try:
        time.sleep(0.1)
        sent = publish_all(host, port, topic, 3, size=1024)
        got = sub.wait_for(3, 10)
        assert [m.payload for m in sorted(got, key=lambda m: m.payload[:4])] == sent
        assert all(m.qos == 1 and not m.dup for m in got)
    finally:
        sub.close()


@pytest.mark.network
def test_mqtt_large_packet_allowed(stack_factory, topic_prefix):
    """Update chunks are ~1 MB and a retained 1M-parameter model version is ~4 MB (8 MB with
    Adam's state): the listener accepts 8 MB payloads (a stack without a managed broker's cap)."""
    own = stack_factory(regions=("region-0",), kafka=False)
    host, port = own.mqtt["region-0"]
    topic = f"fedstream/region-0/updates/{topic_prefix}"
    sub = Sub(host, port, f"big-{topic_prefix}", clean=True, ack=True).connect(subscribe=topic)
    try:
        time.sleep(0.1)
        sent = publish_all(host, port, topic, 1, size=8 * 1024 * 1024)
        got = sub.wait_for(1, 10)
        assert len(got) == 1 and got[0].payload == sent[0]
    finally:
        sub.close()


@pytest.mark.network
def test_managed_broker_cap_drops_larger_messages(stack, topic_prefix):
    """The shared stack runs capped like AWS IoT Core (128 KB): a larger message never reaches
    a subscriber, a smaller one does (why chunk_bytes is a federation setting)."""
    from tests.conftest import MANAGED_BROKER_LIMIT

    host, port = stack.mqtt["region-0"]
    topic = f"fedstream/region-0/updates/{topic_prefix}"
    sub = Sub(host, port, f"cap-{topic_prefix}", clean=True, ack=True).connect(subscribe=topic)
    try:
        time.sleep(0.1)
        publish_all(host, port, topic, 1, size=MANAGED_BROKER_LIMIT + 1024)
        small = publish_all(host, port, topic, 1, size=MANAGED_BROKER_LIMIT - 4096)
        got = sub.wait_for(1, 10)
        time.sleep(0.5)
        assert [m.payload for m in sub.msgs] == small
        assert len(got) == 1
    finally:
        sub.close()


@pytest.mark.network
def test_mqtt_manual_ack_redelivered_after_reconnect(stack_factory, topic_prefix):
    """Unacked QoS1 messages of a persistent session come back, all of them, with dup=1."""
    own = stack_factory(regions=("region-1",), kafka=False)  # 300 KB messages: no cap
    host, port = own.mqtt["region-1"]
    topic = f"fedstream/region-1/updates/{topic_prefix}"
    cid = f"regional-{topic_prefix}"

    sub = Sub(host, port, cid, clean=False).connect(subscribe=topic)
    time.sleep(0.1)
    publish_all(host, port, topic, N_MSGS)
    first = sub.wait_for(N_MSGS)
    sub.close()  # never acked
    assert seqs(first) == list(range(N_MSGS)), "max_inflight_messages 0 should deliver all at once"
    assert not any(m.dup for m in first)

    again = Sub(host, port, cid, clean=False, ack=True).connect()  # no re-subscribe: session keeps it
    assert again.session_present is True
    got = again.wait_for(N_MSGS)
    got = again.settle(0.3)
    again.barrier()
    again.close()
    assert seqs(got) == list(range(N_MSGS))
    assert all(m.dup for m in got), "redelivered in-flight messages carry the dup flag"
    assert all(len(m.payload) == PAYLOAD for m in got)

    # acked now: a third session sees nothing
    third = Sub(host, port, cid, clean=False).connect()
    time.sleep(0.5)
    third.close()
    assert third.msgs == []
    # clean up the session on the shared broker
    Sub(host, port, cid, clean=True).connect().close()


@pytest.mark.network
def test_mqtt_persistence_survives_kill9(stack_factory, topic_prefix):
    """kill -9 of Mosquitto: in-flight (unacked) and queued (offline) QoS1 messages of a persistent
    session survive a restart, given autosave_on_changes/autosave_interval 1 (see compose/README.md)."""
    s = stack_factory(["region-k"], kafka=False)
    host, port = s.mqtt["region-k"]
    topic = f"fedstream/region-k/updates/{topic_prefix}"
    cid = f"regional-{topic_prefix}"
    half = N_MSGS // 2

    # 1) online, manual ack, never acks: first half in flight
    sub = Sub(host, port, cid, clean=False).connect(subscribe=topic)
    time.sleep(0.1)
    publish_all(host, port, topic, half)
    assert len(sub.wait_for(half)) == half
    sub.close()
    # 2) offline: second half queued for the session
    pub_payloads = publish_all(host, port, topic, N_MSGS - half, start=half)
    assert len(pub_payloads) == N_MSGS - half
    # the db is written by the broker's main loop right after the change that triggered it;
    # give it a moment (PUBACK goes out before the save)
    time.sleep(0.5)

    s.kill_mosquitto("region-k", signal.SIGKILL)
    s.restart_mosquitto("region-k")
    assert s.mqtt["region-k"] == (host, port)

    again = Sub(host, port, cid, clean=False, ack=True).connect()
    assert again.session_present is True, "session lost across kill -9"
    again.wait_for(N_MSGS)
    got = again.settle(0.3)
    again.close()
    assert seqs(got) == list(range(N_MSGS)), f"lost across kill -9: {sorted(set(range(N_MSGS)) - set(seqs(got)))}"
    dup = {int.from_bytes(m.payload[:4], "big"): m.dup for m in got}
    print("dup after kill -9:", [k for k, v in dup.items() if v][:5], "...", sum(dup.values()), "of", len(dup))
    assert all(dup[i] for i in range(half)), "in-flight (sent, unacked) messages come back with dup=1"


# ----------------------------------------------------------------------------------------------
# Kafka


def _run(coro):
    return asyncio.run(coro)


@pytest.mark.network
def test_kafka_create_default_topics(stack):
    stack.create_topics()
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    async def go():
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
        await admin.start()
        try:
            topics = await admin.list_topics()
            cfg = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, "fedstream.models")])
            return topics, cfg
        finally:
            await admin.close()

    topics, cfg = _run(go())
    assert {"fedstream.partials", "fedstream.models"} <= set(topics)
    # DescribeConfigsResponse: resources = [(error_code, error_message, type, name, [entry...])],
    # entry = (name, value, ...)
    entries = {e[0]: e[1] for e in cfg[0].resources[0][4]}
    assert entries["cleanup.policy"] == "compact"
    assert int(entries["max.message.bytes"]) >= 8 * 1024 * 1024


async def _consume_all(bootstrap, topic, *, isolation="read_committed", expect=None, timeout=10.0):
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, isolation_level=isolation, auto_offset_reset="earliest",
        enable_auto_commit=False, group_id=None,
    )
    await c.start()
    out = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = await c.getmany(timeout_ms=300)
            for recs in batch.values():
                out.extend(recs)
            if expect is not None and len(out) >= expect:
                # one more short poll to catch anything unexpected
                for recs in (await c.getmany(timeout_ms=300)).values():
                    out.extend(recs)
                break
            if expect is None and not batch and out:
                break
    finally:
        await c.stop()
    return out


@pytest.mark.network
def test_kafka_transaction_offsets_and_abort(stack, topic_prefix):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.structs import OffsetAndMetadata

    src, dst, group = f"{topic_prefix}.in", f"{topic_prefix}.out", f"{topic_prefix}.g"
    stack.create_topics([{"name": src}, {"name": dst}])
    bs = stack.kafka_bootstrap

    async def go():
        p = AIOKafkaProducer(bootstrap_servers=bs, acks="all", enable_idempotence=True)
        await p.start()
        try:
            for i in range(3):
                await p.send_and_wait(src, f"in-{i}".encode(), key=b"k")
        finally:
            await p.stop()

        c = AIOKafkaConsumer(src, bootstrap_servers=bs, group_id=group, enable_auto_commit=False,
                             auto_offset_reset="earliest", isolation_level="read_committed")
        await c.start()
        tx = AIOKafkaProducer(bootstrap_servers=bs, transactional_id=f"{topic_prefix}.tx")
        await tx.start()
        try:
            got = []
            while len(got) < 3:
                for recs in (await c.getmany(timeout_ms=1000)).values():
                    got.extend(recs)
            tp = TopicPartition(src, 0)
            async with tx.transaction():
                await tx.send(dst, b"sum-of-3", key=b"r1")
                await tx.send_offsets_to_transaction({tp: OffsetAndMetadata(got[-1].offset + 1, "")}, group)
            # an aborted transaction: output and offsets must both vanish
            await tx.begin_transaction()
            await tx.send(dst, b"ABORTED", key=b"r2")
            await tx.send_offsets_to_transaction({tp: OffsetAndMetadata(1, "")}, group)
            await tx.abort_transaction()
            async with tx.transaction():
                await tx.send(dst, b"after-abort", key=b"r3")
        finally:
            await tx.stop()
            await c.stop()

        c2 = AIOKafkaConsumer(bootstrap_servers=bs, group_id=group, enable_auto_commit=False)
        await c2.start()
        try:
            committed = await c2.committed(TopicPartition(src, 0))
        finally:
            await c2.stop()
        rc = await _consume_all(bs, dst, isolation="read_committed", expect=2)
        ru = await _consume_all(bs, dst, isolation="read_uncommitted", expect=3)
        return committed, [r.value for r in rc], [r.value for r in ru]

    committed, rc, ru = _run(go())
    assert committed == 3
    assert rc == [b"sum-of-3", b"after-abort"]
    assert b"ABORTED" in ru  # it was written, only hidden by the abort marker


@pytest.mark.network
def test_kafka_compacted_topic_keeps_latest(stack, topic_prefix):
    from aiokafka import AIOKafkaProducer

    topic = f"{topic_prefix}.models"
    stack.create_topics([{
        "name": topic,
        "config": {
            "cleanup.policy": "compact", "max.message.bytes": str(8 * 1024 * 1024),
            # make the cleaner act within seconds (test only)
            "segment.ms": "100", "min.cleanable.dirty.ratio": "0.001", "min.compaction.lag.ms": "0",
            "delete.retention.ms": "100",
        },
    }])
    bs = stack.kafka_bootstrap

    async def produce(items):
        p = AIOKafkaProducer(bootstrap_servers=bs, acks="all", max_request_size=4 * 1024 * 1024)
        await p.start()
        try:
            for k, v in items:
                await p.send_and_wait(topic, v, key=k)
        finally:
            await p.stop()

    _run(produce([(b"model", b"v1"), (b"other", b"o1"), (b"model", b"v2"), (b"model", b"v3"),
                  (b"big", bytes(3 * 1024 * 1024))]))
    # latest per key is what a consumer ends up with, compaction or not
    recs = _run(_consume_all(bs, topic, expect=5))
    latest = {r.key: r.value for r in recs}
    assert latest[b"model"] == b"v3" and latest[b"other"] == b"o1"

    # force segment rolls with later appends, then wait for the cleaner to drop v1/v2
    deadline = time.monotonic() + 30
    while True:
        time.sleep(0.3)
        _run(produce([(b"tick", b"x")]))
        recs = _run(_consume_all(bs, topic))
        models = [r.value for r in recs if r.key == b"model"]
        if models == [b"v3"]:
            break
        assert time.monotonic() < deadline, f"not compacted within 30 s: {models}"
    assert {r.key: r.value for r in recs}[b"other"] == b"o1"


@pytest.mark.network
@pytest.mark.slow
def test_kafka_kill9_restart_keeps_committed(stack_factory, topic_prefix):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.structs import OffsetAndMetadata

    s = stack_factory([], kafka=True)
    bs = s.kafka_bootstrap
    src, dst, group, txid = f"{topic_prefix}.in", f"{topic_prefix}.out", f"{topic_prefix}.g", f"{topic_prefix}.tx"
    s.create_topics([{"name": src}, {"name": dst}])

    async def before():
        tx = AIOKafkaProducer(bootstrap_servers=bs, transactional_id=txid)
        await tx.start()
        async with tx.transaction():
            for i in range(5):
                await tx.send(dst, f"committed-{i}".encode(), key=b"k")
            await tx.send_offsets_to_transaction({TopicPartition(src, 0): OffsetAndMetadata(7, "m")}, group)
        # leave a transaction open: the crash must not make it visible
        await tx.begin_transaction()
        await tx.send_and_wait(dst, b"OPEN-AT-CRASH", key=b"k")
        # no commit, no stop: the broker is killed under it
        return tx

    async def crash_then_check():
        tx = await before()
        s.kill_kafka(signal.SIGKILL)
        try:
            await asyncio.wait_for(tx.stop(), 5)
        except Exception:
            pass
        await asyncio.to_thread(s.restart_kafka)
        # the restarted owner of the transactional id fences and aborts the open transaction
        tx2 = AIOKafkaProducer(bootstrap_servers=bs, transactional_id=txid)
        await tx2.start()
        async with tx2.transaction():
            await tx2.send(dst, b"after-restart", key=b"k")
        await tx2.stop()
        c = AIOKafkaConsumer(bootstrap_servers=bs, group_id=group, enable_auto_commit=False)
        await c.start()
        try:
            committed = await c.committed(TopicPartition(src, 0))
        finally:
            await c.stop()
        recs = await _consume_all(bs, dst, expect=6, timeout=20)
        return committed, [r.value for r in recs]

    t0 = time.monotonic()
    committed, values = _run(crash_then_check())
    assert committed == 7
    assert values == [f"committed-{i}".encode() for i in range(5)] + [b"after-restart"]
    assert s.timings["kafka_restart"] < 60, s.timings
    print(f"kafka timings: {s.timings}; kill->verified {time.monotonic() - t0:.1f}s")


# ----------------------------------------------------------------------------------------------
# stack plumbing


@pytest.mark.network
def test_stack_stop_ends_only_its_processes(stack_factory):
    s = stack_factory(["region-x"], kafka=False)
    pid = s.pids["mosquitto:region-x"]
    workdir = s.info.workdir
    assert Path(f"/proc/{pid}").exists()
    s.stop()
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]
    assert not workdir.exists()

