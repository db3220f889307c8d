"""A paho-mqtt client wired for fedstream's delivery semantics, handing messages to asyncio.

paho runs its network loop in its own thread; this shell forwards each inbound message into an
``asyncio.Queue`` and offers thread-safe publish and (manual) ack. Persistent sessions
(``clean_session=False``) plus manual ack are what let the regional aggregator acknowledge an update
only after the partial sum holding it is committed to Kafka: anything unacknowledged when a process
dies is redelivered by the broker to its successor.

Backpressure: the inbox is bounded. When it is full, paho's network thread waits for room instead
of reading more from the socket, so a flood stays in TCP buffers and in the broker's queue for
this client, not in this process's memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt

from schemas.pki import TlsFiles

log = logging.getLogger("fedstream.mqtt")

#: Largest MQTT packet, the same number in Mosquitto's ``max_packet_size`` (local stack and
#: docker-compose) and in the services' message limit: the broker refuses what a service would.
#: Update chunks are ~1 MB; retained model versions of 1M+ parameters are several MB.
MAX_PACKET_BYTES = 16 << 20


class MqttLink:
    """One MQTT connection; inbound messages land in :attr:`inbox`.

    Args:
        client_id: stable id; with ``persistent=True`` the broker keeps the session (subscriptions
            and unacknowledged QoS 1 messages) across disconnects and restarts.
        subscriptions: topic filters subscribed (QoS 1) on every (re)connect.
        manual_ack: acknowledge QoS 1 messages only when :meth:`ack` is called.
        on_connect: called (in paho's thread) after every successful (re)connect.
        inbox_size: most messages waiting for the asyncio side (0: unbounded).
        tls: this identity's certificate, key and the broker's CA (mutual TLS).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        subscriptions: list[str],
        loop: asyncio.AbstractEventLoop,
        persistent: bool = True,
        manual_ack: bool = False,
        on_connect: Callable[[], None] | None = None,
        username: str | None = None,
        password: str | None = None,
        ca_file: Path | None = None,
        tls: TlsFiles | None = None,
        inbox_size: int = 0,
    ) -> None:
        self.inbox: asyncio.Queue[mqtt.MQTTMessage] = asyncio.Queue(maxsize=inbox_size)
        self._stopping = False
        self.connected = asyncio.Event()
        self._loop = loop
        self._subs = subscriptions
        self._on_connect_cb = on_connect
        self._host, self._port = host, port
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=not persistent,
            protocol=mqtt.MQTTv311,
        )
        if username:
            self.client.username_pw_set(username, password)
        if tls is not None:  # mutual TLS: the broker takes our identity from the certificate
            self.client.tls_set(ca_certs=str(tls.ca), certfile=str(tls.cert), keyfile=str(tls.key))
        elif ca_file:
            self.client.tls_set(ca_certs=str(ca_file))
        self.client.manual_ack_set(manual_ack)
        self.client.max_inflight_messages_set(0)  # 0 = no client-side cap on our own QoS 1 sends
        self.client.max_queued_messages_set(0)
        # paho takes float seconds (its annotation says int): reconnect fast after a broker restart
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=3)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def start(self) -> None:
        self.client.connect_async(self._host, self._port, keepalive=15)
        self.client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT connect to %s:%d refused: %s", self._host, self._port, reason_code)
            return
        for topic in self._subs:
            client.subscribe(topic, qos=1)
        self._loop.call_soon_threadsafe(self.connected.set)
        if self._on_connect_cb:
            self._on_connect_cb()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._loop.call_soon_threadsafe(self.connected.clear)
        log.info("MQTT %s:%d disconnected (%s); paho reconnects", self._host, self._port, reason_code)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        if self.inbox.maxsize <= 0:
            self._loop.call_soon_threadsafe(self.inbox.put_nowait, msg)
            return
        # bounded: block paho's thread until there is room (TCP backpressure to the broker)
        fut = asyncio.run_coroutine_threadsafe(self.inbox.put(msg), self._loop)
        while True:
            try:
                fut.result(timeout=1.0)
                return
            except concurrent.futures.TimeoutError:
                if self._stopping or self._loop.is_closed():
                    fut.cancel()  # unacked: the broker redelivers it to the next session
                    return

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """QoS 1 publish (thread-safe); paho resends it until the broker acknowledges it."""
        return self.client.publish(topic, payload, qos=1, retain=retain)

    def ack(self, msg: mqtt.MQTTMessage) -> None:
        if msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)
