"""The locked-down Mosquitto of the local stack, on the real broker: TLS only, client
certificates from the region's CA, identity from the certificate, client id bound to it, and the
ACL (a device publishes only to its own update topic, reads only its region's model and
receipts; the regional aggregator only its own region).

MQTT 3.1.1 gives a publisher no error for a publish the ACL denies (the broker acknowledges and
drops it), so each refusal is asserted where it matters: the subscriber that would have received
the message gets nothing, while the same client's allowed message arrives (a positive control in
the same test), and the broker logs the denial.
"""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from compose.localstack import LocalStack, mqtt_ready
from global_aggregator.keygen import write_keys
from schemas.keyring import tls_files
from schemas.mqtt import MqttLink
from schemas.pki import Pki, TlsFiles
from schemas.topics import Topics

pytestmark = pytest.mark.network

REGIONS = ("region-0", "region-1")
FLEET = {"region-0": ["dev-a", "dev-b"], "region-1": ["dev-c"]}


@pytest.fixture(scope="module")
def secure_mqtt(tmp_path_factory):
    from tests.conftest import _require_brokers

    _require_brokers()
    s = LocalStack(list(REGIONS), kafka=False, secure=True)
    s.start()
    keys = tmp_path_factory.mktemp("keys")
    assert s.pki is not None
    write_keys(keys, devices=FLEET, pki=s.pki)
    try:
        yield s, keys
    finally:
        s.stop()


class Client:
    """A paho client that records what it receives and whether it is connected."""

    def __init__(self, host: str, port: int, tls: TlsFiles | None, client_id: str = "") -> None:
        self.got: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.refused: list[str] = []
        self.disconnects = 0
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                             client_id=client_id or f"c-{uuid.uuid4().hex[:8]}",
                             protocol=mqtt.MQTTv311)
        if tls is not None:
            self.c.tls_set(ca_certs=str(tls.ca), certfile=str(tls.cert), keyfile=str(tls.key))
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = lambda *a: setattr(self, "disconnects", self.disconnects + 1)
        self.c.on_message = lambda c, u, m: self.got.append((m.topic, m.payload))
        self.c.connect(host, port, keepalive=10)
        self.c.loop_start()

    def _on_connect(self, client, userdata, flags, rc, props=None) -> None:
        if rc.is_failure:
            self.refused.append(str(rc))
        else:
            self.connected.set()

    def sub(self, topic: str) -> list:
        done = threading.Event()
        granted: list = []

        def on_subscribe(client, userdata, mid, reason_codes, props=None):
            granted.extend(reason_codes)
            done.set()

        self.c.on_subscribe = on_subscribe
        self.c.subscribe(topic, qos=1)
        assert done.wait(5), f"no SUBACK for {topic}"
        return granted

    def pub(self, topic: str, payload: bytes) -> None:
        """An allowed publish: acknowledged by the broker."""
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def pub_denied(self, topic: str, payload: bytes) -> None:
        """A publish the ACL denies: Mosquitto 2.0 drops it and disconnects the client (paho
        then reconnects); wait for both so the next publish goes out on a live connection."""
        before = self.disconnects
        self.c.publish(topic, payload, qos=1)
        assert _wait_for(lambda: self.disconnects > before, 5), f"{topic}: not refused"
        assert _wait_for(self.c.is_connected, 10), "no reconnect after a refused publish"

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _tls(keys: Path, name: str, region: str) -> TlsFiles:
    return tls_files(keys, name, "mqtt", region)


def with_ca(tls: TlsFiles, ca: Path) -> TlsFiles:
    """``tls``'s certificate and key, trusting the server CA ``ca`` (to reach another broker)."""
    return TlsFiles(ca, tls.cert, tls.key)


def _connect(stack: LocalStack, region: str, tls: TlsFiles, client_id: str = "") -> Client:
    host, port = stack.mqtt[region]
    c = Client(host, port, tls, client_id)
    assert c.connected.wait(5), f"{tls.cert.name} could not connect: {c.refused}"
    return c


def _log(stack: LocalStack, region: str) -> str:
    assert stack.workdir is not None
    return (stack.workdir / "mosquitto" / region / "mosquitto.log").read_text(errors="replace")


def _wait_for(pred, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def test_no_certificate_or_wrong_ca_is_refused_by_the_handshake(secure_mqtt, tmp_path):
    stack, keys = secure_mqtt
    host, port = stack.mqtt["region-0"]
    # plaintext MQTT on the TLS listener: no CONNACK
    assert not mqtt_ready(host, port)
    # TLS without a client certificate: the broker requires one
    plain_tls = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="nocert")
    plain_tls.tls_set(ca_certs=str(_tls(keys, "dev-a", "region-0").ca))
    with pytest.raises((ssl.SSLError, OSError)):
        plain_tls.connect(host, port, keepalive=5)
        for _ in range(40):  # TLS 1.3 reports a refused client certificate on the first read
            if plain_tls.loop(0.05) != mqtt.MQTT_ERR_SUCCESS:
                raise OSError("connection closed by the broker")
    # a device of region-1 (region-1's CA) at region-0's broker
    assert not mqtt_ready(host, port, tls=with_ca(_tls(keys, "dev-c", "region-1"),
        _tls(keys, "dev-a", "region-0").ca))
    # a certificate from a CA nobody trusts, even with the right name
    foreign = Pki(tmp_path / "ca", tmp_path / "tls")
    forged = foreign.issue_files("region-0", "dev-a", "agent", tmp_path / "k.key",
                                 tmp_path / "k.crt")
    assert not mqtt_ready(host, port, tls=TlsFiles(_tls(keys, "dev-a", "region-0").ca,
                                                   forged.cert, forged.key))
    # the genuine device connects (positive control)
    assert mqtt_ready(host, port, tls=_tls(keys, "dev-a", "region-0"))
    assert "certificate verify failed" in _log(stack, "region-0")


def test_a_device_publishes_only_to_its_own_topic_and_reads_only_its_regions_model(secure_mqtt):
    stack, keys = secure_mqtt
    t = Topics(f"ns{uuid.uuid4().hex[:6]}")
    region = _connect(stack, "region-0", _tls(keys, "region-0", "region-0"))
    a = _connect(stack, "region-0", _tls(keys, "dev-a", "region-0"))
    b = _connect(stack, "region-0", _tls(keys, "dev-b", "region-0"))
    try:
        assert not any(rc.is_failure for rc in region.sub(t.updates("region-0")))
        # the region listens; A forges B's update, the model and a receipt: each refused
        a.pub_denied(t.update("region-0", "dev-b"), b"forged as B")
        a.pub_denied(t.model("region-0"), b"forged model")
        a.pub_denied(t.receipts("region-0"), b"forged receipt")
        # A reads B's updates: Mosquitto 2.0 grants the subscription but delivers nothing
        a.sub(t.update("region-0", "dev-b"))
        a.sub(t.model("region-0"))
        a.sub(t.receipts("region-0"))
        a.pub(t.update("region-0", "dev-a"), b"A's own update")  # allowed
        b.pub(t.update("region-0", "dev-b"), b"B's own update")  # allowed
        region.pub(t.model("region-0"), b"the region's model")  # allowed
        assert _wait_for(lambda: len(region.got) >= 2 and len(a.got) >= 1)
        time.sleep(0.5)  # anything denied would have arrived by now
        assert sorted(region.got) == [(t.update("region-0", "dev-a"), b"A's own update"),
                                      (t.update("region-0", "dev-b"), b"B's own update")]
        assert a.got == [(t.model("region-0"), b"the region's model")]  # not B's update
        assert "Bad socket read/write on client dev-a" in _log(stack, "region-0")
    finally:
        for c in (region, a, b):
            c.close()


def test_the_region_is_confined_to_its_own_region(secure_mqtt):
    stack, keys = secure_mqtt
    t = Topics(f"ns{uuid.uuid4().hex[:6]}")
    # region-0's MQTT certificate comes from region-0's CA: region-1's broker refuses it
    host, port = stack.mqtt["region-1"]
    r0 = _tls(keys, "region-0", "region-0")
    assert not mqtt_ready(host, port, tls=with_ca(r0, _tls(keys, "dev-c", "region-1").ca))
    # and on its own broker it may not write another region's topics
    region = _connect(stack, "region-0", r0)
    try:
        region.pub_denied(t.model("region-1"), b"not my region")
    finally:
        region.close()


def test_no_client_can_take_the_regional_aggregators_session(secure_mqtt):
    """The broker replaces every client id with the certificate's CN, so a device asking for
    the region's client id gets its own: the region's connection is not knocked off."""
    import asyncio

    stack, keys = secure_mqtt
    t = Topics(f"ns{uuid.uuid4().hex[:6]}")
    host, port = stack.mqtt["region-0"]

    async def go() -> tuple[int, list]:
        link = MqttLink(host=host, port=port, client_id=f"{t.namespace}-regional-region-0",
                        subscriptions=[t.updates("region-0")], loop=asyncio.get_running_loop(),
                        persistent=True, manual_ack=True,
                        tls=_tls(keys, "region-0", "region-0"))
        drops = 0
        orig = link._on_disconnect

        def counting(*a):
            nonlocal drops
            drops += 1
            orig(*a)

        link.client.on_disconnect = counting
        link.start()
        await asyncio.wait_for(link.connected.wait(), 5)
        thieves = [_connect(stack, "region-0", _tls(keys, dev, "region-0"), client_id=cid)
                   for dev, cid in (("dev-a", f"{t.namespace}-regional-region-0"),
                                    ("dev-b", "region-0"))]
        await asyncio.sleep(1.0)
        thieves[0].pub(t.update("region-0", "dev-a"), b"still delivered to the region")
        got = []
        msg = await asyncio.wait_for(link.inbox.get(), 5)
        got.append((msg.topic, msg.payload))
        link.ack(msg)
        dropped = drops  # before our own disconnect below
        for c in thieves:
            c.close()
        link.stop()
        return dropped, got

    drops, got = asyncio.run(go())
    assert drops == 0, "the region's session was taken over"
    assert got == [(t.update("region-0", "dev-a"), b"still delivered to the region")]
    log = _log(stack, "region-0")
    # the broker saw the thieves as themselves (CN), whatever client id they asked for
    assert "as dev-a (p2" in log and "as dev-b (p2" in log
