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
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from schemas.pki import TlsFiles

log = logging.getLogger("fedstream.mqtt")

#: Largest MQTT packet, the same number in Mosquitto's ``max_packet_size`` (local stack and
#: docker-compose) and in the services' message limit: the broker refuses what a service would.
#: Update chunks are ~1 MB; retained model versions of 1M+ parameters are several MB.
MAX_PACKET_BYTES = 16 << 20


@dataclass(frozen=True, slots=True)
class AckToken:
    """What acknowledging a message takes, without its payload (kept until a commit)."""

    mid: int
    qos: int
    connection: int


class Received:
    """An inbound message (paho's ``MQTTMessage``: ``topic``, ``payload``, ``qos``, ``mid``,
    ``dup``, ...) and the connection it came on."""

    __slots__ = ("message", "connection")

    def __init__(self, message: mqtt.MQTTMessage, connection: int) -> None:
        self.message, self.connection = message, connection

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)

    @property
    def token(self) -> AckToken:
        return AckToken(self.message.mid, self.message.qos, self.connection)


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
        shared: str = "",
        shared_subscriptions: list[str] | None = None,
        will: tuple[str, bytes, float] | None = None,
        on_taken_over: Callable[[], None] | None = None,
    ) -> None:
        self.inbox: asyncio.Queue[Received] = asyncio.Queue(maxsize=inbox_size)
        self._stopping = False
        self.connected = asyncio.Event()
        self._loop = loop
        # shared subscriptions ($share/<group>/<filter>, MQTT v5): the broker deals each
        # message to one session of the group
        self._subs = [*subscriptions, *(f"$share/{shared}/{t}"
                                        for t in shared_subscriptions or [])]
        self._on_connect_cb = on_connect
        self._on_taken_over = on_taken_over
        self._host, self._port = host, port
        self._v5 = bool(shared)
        self._persistent = persistent
        self.connection = 0  # counts (re)connects: an ack belongs to the connection it came on
        # messages handed to the event loop (paho's thread counts) and put in the inbox (the
        # loop counts): each counter has one writer, so their difference needs no lock
        self._handed = self._put = 0
        if self._v5:
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                      protocol=mqtt.MQTTv5)
        else:
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
        if will is not None:  # published (retained) if this session's connection is lost and
            # no new connection resumes the session within the delay (MQTT v5)
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            will_props = Properties(PacketTypes.WILLMESSAGE)
            will_props.WillDelayInterval = max(0, round(will[2]))
            self.client.will_set(will[0], will[1], qos=1, retain=True, properties=will_props)
        self.client.max_inflight_messages_set(0)  # 0 = no client-side cap on our own QoS 1 sends
        self.client.max_queued_messages_set(0)
        # paho takes float seconds (its annotation says int): reconnect fast after a broker restart
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=3)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    @property
    def stopping(self) -> bool:
        """Whether this link was stopped, or gave its session up to a new connection."""
        return self._stopping

    def start(self) -> None:
        if self._v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0xFFFFFFFF if self._persistent else 0  # never expires
            self.client.connect_async(self._host, self._port, keepalive=15,
                                      clean_start=not self._persistent, properties=props)
        else:
            self.client.connect_async(self._host, self._port, keepalive=15)
        self.client.loop_start()

    def cycle(self) -> None:
        """Drop the connection as a network failure would; paho reconnects and the broker
        redelivers every message not yet acknowledged (on the new connection)."""
        import socket

        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT connect to %s:%d refused: %s", self._host, self._port, reason_code)
            return
        self.connection += 1
        sock = client.socket()
        if sock is not None:  # small messages (acks, receipts) leave at once: no Nagle delay
            import socket

            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for topic in self._subs:
            client.subscribe(topic, qos=1)
        self._loop.call_soon_threadsafe(self.connected.set)
        if self._on_connect_cb:
            self._on_connect_cb()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._loop.call_soon_threadsafe(self.connected.clear)
        if getattr(reason_code, "value", None) == 0x8E and self._on_taken_over is not None:
            # "session taken over": its owner is back; do not take it back
            self._stopping = True
            client.disconnect()
            log.info("MQTT session %s taken over by a new connection", client._client_id)
            self._loop.call_soon_threadsafe(self._on_taken_over)
            return
        log.info("MQTT %s:%d disconnected (%s); paho reconnects", self._host, self._port, reason_code)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        msg = Received(message, self.connection)
        # only this thread puts: while the queue plus what is on its way to it has room, a put
        # cannot block, so it need not wait for the event loop
        in_transit = self._handed - self._put
        if self.inbox.maxsize <= 0 or self.inbox.qsize() + in_transit < self.inbox.maxsize:
            self._handed += 1
            self._loop.call_soon_threadsafe(self._put_now, msg)
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

    def _put_now(self, msg: Received) -> None:  # event loop thread
        self._put += 1
        self.inbox.put_nowait(msg)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """QoS 1 publish (thread-safe); paho resends it until the broker acknowledges it."""
        return self.client.publish(topic, payload, qos=1, retain=retain)

    def ack(self, msg: Received | AckToken) -> None:
        """Acknowledge ``msg``, unless it came on an earlier connection: packet ids are per
        connection, and the broker has redelivered that message on the current one."""
        if msg.qos > 0 and msg.connection == self.connection:
            self.client.ack(msg.mid, msg.qos)
