"""``fedstream-loadgen``: a fleet of virtual devices in one process, for load tests and benchmarks.

Every virtual device is a real member of the fleet: it has its own Ed25519 identity in the trust
store and signs each of its update chunks with its own key, on its own topic
(``Topics(ns).update(region, device)``), exactly as :meth:`edge_agent.service.EdgeAgent.build_update`
does; the chunks are real, validly encrypted payloads of the round's codec. So every check a
regional aggregator makes passes (signature bound to the topic, membership, rate, weight, plan,
round, HE fingerprint) and the global decrypts and checks a real sum. What is simulated is the
training: each round a small pool of random deltas (``--pool``) is encoded once with the round's
codec and the devices reuse those ciphertexts; every message is still signed by its device.

Devices follow the round tasks on their region's retained model topic, answer only if selected
(``task.selected_agents``; empty = everybody), after a seeded, possibly heavy-tailed delay
(``--arrival lognormal|pareto|uniform|none``), drop out of a round with ``--dropout``, and
"reconnect" (republish their unreceipted update once, as a real device does after a reconnect,
which the region must drop as a duplicate) with ``--reconnect``; ``--churn-s`` also really drops
and re-opens the shared MQTT connections, after which every unreceipted update on them is
republished. A device forgets its update when the region's receipt names it.

Connections: a small pool of MQTT connections per region (``--connections``, default 4) carries
the messages of all of that region's virtual devices. That works only in open (non-TLS) mode,
where the broker does not tie a connection to an identity: there one connection may publish for
many devices, and the region's checks still bind each message to its signer. A real device has
its own TLS identity (certificate CN = device id, and the locked-down broker's ACL lets it write
only its own topic), and its own connection.

Trust store of a large fleet: ``fedstream-keygen`` writes a PEM file and a TLS certificate per
identity, far too slow for 100,000 devices. ``fedstream-loadgen keys`` instead makes the
deployment's keys without devices (:func:`global_aggregator.keygen.write_keys`) and then adds N
agents to ``trust.json`` whose keys are derived from a seed and the device name
(:func:`device_key`), so this process rebuilds every private key without any file.

Usage::

    fedstream-loadgen keys --out /tmp/keys --devices 100000 --regions 4 --seed bench
    fedstream-loadgen run --keys /tmp/keys --seed bench --namespace fed \\
        --mqtt region-0=127.0.0.1:1883 --mqtt region-1=127.0.0.1:1884 \\
        --arrival lognormal --arrival-scale-s 2 --dropout 0.05 --json stats.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import signal
import socket
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas import fedstream_pb2 as pb
from schemas.codec import Codec, update_seed
from schemas.errors import InvalidMessage
from schemas.he import HEContext
from schemas.project import DEVICE_ID, contiguous_fleet
from schemas.signing import TrustStore, header, open_envelope, open_model_version, seal
from schemas.task import codec_params
from schemas.topics import Topics

log = logging.getLogger("fedstream.loadgen")

KEY_DOMAIN = b"fedstream/loadgen-key/v1"
#: Largest retained model version the loadgen accepts (the services' MQTT packet limit).
MAX_MODEL_BYTES = 16 << 20
ARRIVALS = ("none", "uniform", "lognormal", "pareto")


# -- deterministic identities ------------------------------------------------------------------


def device_key(seed: str, name: str) -> Ed25519PrivateKey:
    """The private key of virtual device ``name``: ``sha256(KEY_DOMAIN | seed | name)`` as an
    Ed25519 seed (RFC 8032: any 32 bytes are a private key). Anyone who knows ``seed`` can sign
    as every virtual device: for load tests only, never for a real fleet."""
    digest = hashlib.sha256(KEY_DOMAIN + b"|" + seed.encode() + b"|" + name.encode()).digest()
    return Ed25519PrivateKey.from_private_bytes(digest)


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw).hex()


def device_names(n: int, prefix: str = "dev-") -> list[str]:
    """``n`` device ids ``<prefix>000000``... (at least 6 digits, so they sort in index order)."""
    if n < 0:
        raise ValueError("the number of devices must be >= 0")
    width = max(6, len(str(max(n - 1, 0))))
    names = [f"{prefix}{i:0{width}d}" for i in range(n)]
    if names and not (DEVICE_ID.fullmatch(names[0]) and DEVICE_ID.fullmatch(names[-1])):
        raise ValueError(f"prefix {prefix!r} makes invalid device ids: use [A-Za-z0-9._-], "
                         "at most 64 characters in all")
    return names


def enrol_devices(keys_dir: Path, devices: dict[str, list[str]], seed: str, *,
                  progress: Callable[[int], None] | None = None) -> int:
    """Add ``devices`` (region -> ids) to ``keys_dir/trust.json`` as agents whose keys are
    :func:`device_key` (``seed``, id); returns how many were added. The file is rewritten
    atomically.

    Raises:
        ValueError: a region is not a region of the trust store, an id is invalid or taken.
        FileNotFoundError: no ``trust.json`` in ``keys_dir``.
    """
    path = Path(keys_dir) / "trust.json"
    if not path.exists():
        raise FileNotFoundError(f"no trust store at {path} (make the deployment's keys first)")
    raw = json.loads(path.read_text())
    ids: dict[str, Any] = raw["identities"]
    for region in devices:
        entry = ids.get(region)
        if entry is None or entry.get("role") != "region":
            raise ValueError(f"{region!r} is not a region of {path}")
    added = 0
    for region, names in devices.items():
        for name in names:
            if not DEVICE_ID.fullmatch(name):
                raise ValueError(f"device id {name!r} must match [A-Za-z0-9._-]{{1,64}}")
            if name in ids:
                raise ValueError(f"{name!r} is already in {path}")
            ids[name] = {"role": "agent", "region": region,
                         "public_key": public_hex(device_key(seed, name))}
            added += 1
            if progress is not None and added % 1000 == 0:
                progress(1000)
    if progress is not None:
        progress(added % 1000)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(raw, separators=(",", ":")))
    tmp.replace(path)
    return added


def make_fleet_keys(out: Path, devices: dict[str, list[str]], seed: str, *,
                    progress: Callable[[int], None] | None = None) -> dict[str, str]:
    """The keys of a deployment with regions ``devices`` (region -> ids) and those devices as
    seed-derived virtual devices: global, operator and regions from ``fedstream-keygen``'s
    :func:`~global_aggregator.keygen.write_keys` (PEM files, TLS certificates, HE contexts),
    the devices only in ``trust.json`` (no files)."""
    from global_aggregator.keygen import write_keys

    summary = write_keys(Path(out), devices={r: [] for r in devices})
    n = enrol_devices(Path(out), devices, seed, progress=progress)
    return {**summary, "identities": str(int(summary["identities"]) + n), "devices": str(n)}


# -- arrival schedule (pure) ---------------------------------------------------------------------


def unit_draw(seed: str, round_id: int, name: str, stream: str) -> float:
    """A uniform number in [0, 1) from (seed, round, device, stream) alone: the same for a
    device whatever the other devices are, in any process."""
    h = hashlib.sha256(f"fedstream/loadgen/{stream}|{seed}|{round_id}|{name}".encode()).digest()
    return (int.from_bytes(h[:8], "big") >> 11) / float(1 << 53)


@dataclass(frozen=True)
class Arrival:
    """When a selected device answers, counted from its receipt of the round task.

    ``kind``: ``none`` (at once), ``uniform`` (0..scale), ``lognormal`` (median ``scale``,
    log-std ``shape``) or ``pareto`` (minimum ``scale``, tail index ``shape``: the smaller,
    the heavier the tail of stragglers); every delay is capped at ``cap_s``."""

    kind: str = "none"
    scale_s: float = 1.0
    shape: float = 1.0
    cap_s: float = 60.0

    def __post_init__(self) -> None:
        if self.kind not in ARRIVALS:
            raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}, got {self.kind!r}")
        for name in ("scale_s", "shape", "cap_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.kind in ("lognormal", "pareto") and self.shape <= 0:
            raise ValueError(f"{self.kind} needs a shape > 0")

    def delay(self, u: float) -> float:
        """The delay of a device whose draw is ``u`` in [0, 1) (monotone in ``u``)."""
        if self.kind == "none":
            return 0.0
        if self.kind == "uniform":
            d = u * self.scale_s
        elif self.kind == "lognormal":
            z = NormalDist().inv_cdf(min(max(u, 1e-12), 1 - 1e-12))
            d = self.scale_s * math.exp(self.shape * z)
        else:  # pareto: scale * (1 - u)^(-1/alpha)
            d = self.scale_s * math.exp(-math.log1p(-min(u, 1 - 1e-12)) / self.shape)
        return min(self.cap_s, max(0.0, d))


def arrival_delay(arrival: Arrival, seed: str, round_id: int, name: str) -> float:
    """Seconds device ``name`` waits before it answers round ``round_id``."""
    return arrival.delay(unit_draw(seed, round_id, name, "arrival"))


def chance(seed: str, round_id: int, name: str, stream: str, p: float) -> bool:
    """Whether an event of probability ``p`` (dropout, reconnect) happens to ``name`` in the
    round (deterministic per seed, round, device and stream)."""
    return p > 0 and unit_draw(seed, round_id, name, stream) < p


def schedule(arrival: Arrival, seed: str, round_id: int, names: Iterable[str],
             dropout: float = 0.0) -> list[tuple[float, str]]:
    """``(delay, device)`` of the devices that answer round ``round_id``, earliest first
    (ties by name); the ones that drop out are left out."""
    out = [(arrival_delay(arrival, seed, round_id, n), n) for n in names
           if not chance(seed, round_id, n, "dropout", dropout)]
    out.sort()
    return out


def shard_of(name: str, shards: int) -> int:
    """Which of ``shards`` loadgen processes plays device ``name`` (crc32, stable)."""
    return zlib.crc32(name.encode()) % shards


# -- MQTT ------------------------------------------------------------------------------------------


class Connection:
    """One paho connection (open mode, clean session) with a cap on unacknowledged QoS 1
    publishes, so a slow broker slows the sender instead of filling its memory."""

    def __init__(self, host: str, port: int, client_id: str, loop: asyncio.AbstractEventLoop,
                 *, max_inflight: int = 256, subscriptions: Sequence[str] = (),
                 on_message: Callable[[str, bytes], None] | None = None,
                 on_connect: Callable[[], None] | None = None) -> None:
        self.host, self.port, self.client_id = host, port, client_id
        self.loop = loop
        self.slots = asyncio.Semaphore(max_inflight)
        self.connected = asyncio.Event()
        self.subscriptions = list(subscriptions)
        self._on_message = on_message
        self._on_connect_cb = on_connect
        self._outstanding: set[int] = set()
        self.client = self._make()

    def _make(self) -> mqtt.Client:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                        clean_session=True, protocol=mqtt.MQTTv311)
        c.max_inflight_messages_set(0)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(min_delay=0.2, max_delay=3)  # type: ignore[arg-type]
        c.on_connect = self._connected
        c.on_disconnect = self._disconnected
        c.on_publish = self._published
        c.on_message = self._message
        return c

    def start(self) -> None:
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def churn(self) -> None:
        """Drop the connection and open a new one (paho thread stops, a new one starts)."""
        self.stop()
        self.loop.call_soon_threadsafe(self.connected.clear)
        old, self.client = self.client, self._make()
        del old
        # publishes the old client never got acknowledged give their slots back
        for _ in range(len(self._outstanding)):
            self.loop.call_soon_threadsafe(self.slots.release)
        self._outstanding.clear()
        self.start()

    def _connected(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT %s:%d refused %s: %s", self.host, self.port, self.client_id,
                        reason_code)
            return
        sock = client.socket()
        if isinstance(sock, socket.socket):  # paho leaves Nagle on: 66 kB updates would stall
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        self.loop.call_soon_threadsafe(self.connected.set)
        if self._on_connect_cb is not None:
            self.loop.call_soon_threadsafe(self._on_connect_cb)

    def _disconnected(self, client, userdata, flags, reason_code, properties) -> None:
        self.loop.call_soon_threadsafe(self.connected.clear)

    def _published(self, client, userdata, mid, reason_code, properties) -> None:
        if mid in self._outstanding:
            self._outstanding.discard(mid)
            self.loop.call_soon_threadsafe(self.slots.release)

    def _message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        if self._on_message is not None:
            self.loop.call_soon_threadsafe(self._on_message, msg.topic, bytes(msg.payload))

    async def publish(self, topic: str, payload: bytes) -> None:
        await self.slots.acquire()
        info = self.client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
            self.slots.release()
            raise ConnectionError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        self._outstanding.add(info.mid)


# -- the virtual fleet ------------------------------------------------------------------------------


@dataclass
class RoundStats:
    """What the virtual devices of one region did in one round."""

    round: int
    region: str
    selected: int = 0          # virtual devices of this process asked for the round
    dropped: int = 0
    sent: int = 0              # updates published (chunks: sent * num_chunks)
    republished: int = 0
    accepted: int = 0          # named by the region's receipt
    foreign: int = 0           # selected devices whose key this seed does not derive
    bytes: int = 0
    t_task: float = 0.0
    t_first_send: float = 0.0
    t_last_send: float = 0.0
    t_receipt: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LoadgenConfig:
    """Settings of a :class:`Loadgen` (the CLI's flags)."""

    keys: Path
    mqtt: dict[str, tuple[str, int]]
    seed: str
    namespace: str = "fedstream"
    arrival: Arrival = field(default_factory=Arrival)
    dropout: float = 0.0
    reconnect: float = 0.0
    reconnect_delay_s: float = 2.0
    churn_s: float = 0.0
    connections: int = 4
    pool: int = 4
    max_inflight: int = 256
    rounds: int = 0            # answer this many rounds, then stop (0: until the final model)
    timeout_s: float = 0.0     # give up after this long (0: never)
    presign: bool = False      # sign every update of a round before publishing any
    prefix: str = ""           # only agents whose id starts with this
    shard: tuple[int, int] = (0, 1)
    project_version: str = "loadgen"
    client_id: str = ""

    def __post_init__(self) -> None:
        for name in ("dropout", "reconnect"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"--{name} must be a probability in [0, 1], got {v}")
        if self.connections < 1 or self.pool < 1 or self.max_inflight < 1:
            raise ValueError("--connections, --pool and --max-inflight must be >= 1")
        if not self.mqtt:
            raise ValueError("give at least one --mqtt REGION=HOST:PORT")
        i, n = self.shard
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"--shard I/N needs 0 <= I < N, got {i}/{n}")
        if self.rounds < 0 or self.timeout_s < 0 or self.churn_s < 0 \
                or self.reconnect_delay_s < 0:
            raise ValueError("--rounds, --timeout-s, --churn-s and --reconnect-delay-s "
                             "must be >= 0")


@dataclass
class _Pool:
    """The round's pre-encoded updates: (payload chunks, weight) each."""

    updates: list[tuple[list[bytes], int]]


@dataclass
class _Pending:
    round: int
    version: int
    fingerprint: str
    slot: int


class _Region:
    """The virtual devices of one region: their connections and their rounds."""

    def __init__(self, gen: Loadgen, region: str, devices: list[str]) -> None:
        self.gen, self.region, self.devices = gen, region, devices
        self.device_set = set(devices)
        host, port = gen.cfg.mqtt[region]
        t = gen.topics
        tag = gen.cfg.client_id or f"loadgen-{os.getpid()}-{gen.cfg.shard[0]}"
        loop = gen.loop
        self.sub = Connection(host, port, f"{tag}-{region}-sub", loop,
                              subscriptions=[t.model(region), t.receipts(region)],
                              on_message=self._on_message)
        self.conns = [Connection(host, port, f"{tag}-{region}-{i}", loop,
                                 max_inflight=gen.cfg.max_inflight,
                                 on_connect=functools.partial(self._on_reconnect, i))
                      for i in range(gen.cfg.connections)]
        self._connected_once = [False] * len(self.conns)
        self.newest_version = -1
        self.done_round = 0
        self.final = asyncio.Event()
        self.pending: dict[str, _Pending] = {}
        self.stats: dict[int, RoundStats] = {}
        self.tasks: set[asyncio.Task] = set()
        self._mv: dict[int, pb.ModelVersion] = {}

    def conn_of(self, device: str) -> Connection:
        return self.conns[zlib.crc32(device.encode()) % len(self.conns)]

    def start(self) -> None:
        for c in (*self.conns, self.sub):
            c.start()

    def stop(self) -> None:
        for c in (self.sub, *self.conns):
            with contextlib.suppress(Exception):
                c.stop()

    def _spawn(self, coro) -> None:
        task = self.gen.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.gen.fail(task.exception())

    # -- inbound ---------------------------------------------------------------------------

    def _on_message(self, topic: str, raw: bytes) -> None:
        t = self.gen.topics
        try:
            if topic == t.receipts(self.region):
                self._on_receipt(raw)
            elif topic == t.model(self.region):
                self._on_model(raw)
        except InvalidMessage as exc:
            self.gen.rejected[str(exc.reason)] = self.gen.rejected.get(str(exc.reason), 0) + 1
            log.warning("%s: refused a message on %s: %s", self.region, topic, exc)

    def _on_model(self, raw: bytes) -> None:
        gen = self.gen
        mv = open_model_version(raw, gen.trust, max_bytes=MAX_MODEL_BYTES, topic=gen.topics.models)
        version = mv.header.model_version
        if version <= self.newest_version:
            return
        self.newest_version = version
        # a newer version closes every earlier round: forget their updates
        for dev in [d for d, p in self.pending.items() if p.version < version]:
            self.pending.pop(dev)
        gen.check_done()
        if mv.final or not mv.HasField("next_task"):
            self.final.set()
            gen.check_done()
            return
        task = mv.next_task
        if task.round <= self.done_round:
            return
        if task.he_fingerprint != gen.he.fingerprint:
            raise InvalidMessage("wrong_fingerprint", "round task names another HE context")
        if gen.cfg.rounds and gen.rounds_started(self.region) >= gen.cfg.rounds:
            return
        self.done_round = task.round
        self._spawn(self._answer(mv))

    def _on_receipt(self, raw: bytes) -> None:
        gen = self.gen
        rc = open_envelope(raw, pb.RECEIPT, gen.trust, max_bytes=MAX_MODEL_BYTES,
                           topic=gen.topics.receipts(self.region)).body
        if rc.region != self.region or rc.header.sender != self.region:
            raise InvalidMessage("unauthorized", f"receipt from {rc.header.sender!r}")
        st = self.stats.get(rc.header.round)
        n = 0
        for agent in rc.agents:
            p = self.pending.get(agent)
            if p is not None and p.round == rc.header.round:
                del self.pending[agent]
                n += 1
        if st is not None and n:
            st.accepted += n
            st.t_receipt = time.time()
            gen.on_progress()
        gen.check_done()

    def _on_reconnect(self, i: int) -> None:
        """A pool connection is (re)connected: after a drop, republish every unreceipted update
        of the devices on it (what each real device does after its own reconnect)."""
        if not self._connected_once[i]:
            self._connected_once[i] = True
            return
        conn = self.conns[i]
        devices = [d for d in self.pending if self.conn_of(d) is conn]
        if devices:
            self._spawn(self._republish(devices, 0.0))

    # -- outbound --------------------------------------------------------------------------

    def _sealed(self, device: str, mv: pb.ModelVersion, pool: _Pool, slot: int) -> list[bytes]:
        """``device``'s signed update chunks, as EdgeAgent.build_update makes them."""
        task = mv.next_task
        payloads, weight = pool.updates[slot]
        topic = self.gen.topics.update(self.region, device)
        key = self.gen.key(device)
        out = []
        for i, payload in enumerate(payloads):
            up = pb.UpdateChunk(
                header=header(device, task.round, mv.header.model_version, task.he_fingerprint,
                              i, len(payloads)),
                agent_id=device, region=self.region, payload=payload,
                weight=weight if i == 0 else 0,
                project_version=self.gen.cfg.project_version if i == 0 else "")
            out.append(seal(pb.UPDATE_CHUNK, up, device, key, topic=topic))
        return out

    async def _answer(self, mv: pb.ModelVersion) -> None:
        gen, cfg = self.gen, self.gen.cfg
        task = mv.next_task
        st = self.stats.setdefault(task.round, RoundStats(task.round, self.region))
        st.t_task = time.time()
        self._mv[task.round] = mv
        selected = set(task.selected_agents)
        mine = [d for d in self.devices if not selected or d in selected]
        st.selected = len(mine)
        plan = schedule(cfg.arrival, cfg.seed, task.round, mine, cfg.dropout)
        st.dropped = len(mine) - len(plan)
        pool = await gen.pool(mv)
        topic_of = gen.topics.update
        slots = {d: zlib.crc32(d.encode()) % len(pool.updates) for _, d in plan}
        t0 = time.monotonic()
        if cfg.presign:  # every message of the round first, then as fast as the broker takes
            signed = []
            for k, (_, d) in enumerate(plan):
                try:
                    signed.append((d, self._sealed(d, mv, pool, slots[d])))
                except KeyError:
                    st.foreign += 1
                if k % 64 == 63:
                    await asyncio.sleep(0)
            t0 = time.monotonic()
            plan_iter: list[tuple[float, str, list[bytes] | None]] = \
                [(0.0, d, chunks) for d, chunks in signed]
        else:
            plan_iter = [(delay, d, None) for delay, d in plan]
        for k, (delay, d, chunks) in enumerate(plan_iter):
            wait = t0 + delay - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            elif k % 32 == 31:
                await asyncio.sleep(0)  # let receipts and the other regions in
            if self.newest_version > mv.header.model_version:
                break  # the round closed without us: stop answering it
            if chunks is None:
                try:
                    chunks = self._sealed(d, mv, pool, slots[d])
                except KeyError:
                    st.foreign += 1
                    continue
            self.pending[d] = _Pending(task.round, mv.header.model_version,
                                       task.he_fingerprint, slots[d])
            conn = self.conn_of(d)
            for raw in chunks:
                await conn.publish(topic_of(self.region, d), raw)
                st.bytes += len(raw)
            st.sent += 1
            st.t_last_send = time.time()
            if st.sent == 1:
                st.t_first_send = st.t_last_send
            if chance(cfg.seed, task.round, d, "reconnect", cfg.reconnect):
                self._spawn(self._republish([d], cfg.reconnect_delay_s))
            if st.sent % 256 == 0:
                gen.on_progress()
        gen.on_progress()

    async def _republish(self, devices: list[str], delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        for d in devices:
            p = self.pending.get(d)
            mv = self._mv.get(p.round) if p is not None else None
            if p is None or mv is None:
                continue  # receipted meanwhile: nothing to do
            pool = await self.gen.pool(mv)
            for raw in self._sealed(d, mv, pool, p.slot):
                await self.conn_of(d).publish(self.gen.topics.update(self.region, d), raw)
            self.stats[p.round].republished += 1

    async def churn_forever(self, every_s: float) -> None:
        i = 0
        while True:
            await asyncio.sleep(every_s)
            conn = self.conns[i % len(self.conns)]
            i += 1
            log.info("%s: dropping connection %s", self.region, conn.client_id)
            await asyncio.to_thread(conn.churn)


class Loadgen:
    """Many virtual devices in one asyncio process (see the module docstring)."""

    def __init__(self, cfg: LoadgenConfig,
                 on_progress: Callable[[Loadgen], None] | None = None) -> None:
        self.cfg = cfg
        keys = Path(cfg.keys)
        for f in ("trust.json", "he/public.ctx"):
            if not (keys / f).exists():
                raise FileNotFoundError(f"{keys / f} is missing: --keys must be a key directory "
                                        "(fedstream-loadgen keys --out DIR)")
        self.trust = TrustStore.load(keys / "trust.json")
        self.he = HEContext.from_bytes((keys / "he" / "public.ctx").read_bytes())
        self.topics = Topics(cfg.namespace)
        self.devices: dict[str, list[str]] = {}
        shard, shards = cfg.shard
        for region in cfg.mqtt:
            ident = self.trust.get(region)
            if ident is None or ident.role != "region":
                raise ValueError(f"{region!r} is not a region of {keys / 'trust.json'}")
            names = [n for n in self.trust.names(role="agent", region=region)
                     if n.startswith(cfg.prefix) and (shards == 1 or shard_of(n, shards) == shard)]
            self.devices[region] = names
        if not any(self.devices.values()):
            raise ValueError(f"no agents{' named ' + cfg.prefix + '*' if cfg.prefix else ''} in "
                             f"regions {', '.join(cfg.mqtt)} of {keys / 'trust.json'}")
        for names in self.devices.values():  # the seed must be the trust store's
            for name in names[:3]:
                if self._derive(name) is None:
                    raise ValueError(f"{name}'s key in trust.json is not derived from --seed "
                                     f"{cfg.seed!r}: give the seed the trust store was made with")
        self.key = functools.lru_cache(maxsize=1 << 16)(self._key)
        self._pools: dict[tuple[int, int], asyncio.Future[_Pool]] = {}
        self._on_progress = on_progress
        self.rejected: dict[str, int] = {}
        self._error: BaseException | None = None
        self._done = asyncio.Event()
        self.regions: dict[str, _Region] = {}

    @property
    def num_devices(self) -> int:
        return sum(len(v) for v in self.devices.values())

    def _derive(self, name: str) -> Ed25519PrivateKey | None:
        st = self.trust.state(name)
        key = device_key(self.cfg.seed, name)
        if st is None or not st.keys or st.keys[-1].raw.hex() != public_hex(key):
            return None
        return key

    def _key(self, name: str) -> Ed25519PrivateKey:
        key = self._derive(name)
        if key is None:
            raise KeyError(name)
        return key

    def rounds_started(self, region: str) -> int:
        return len(self.regions[region].stats)

    async def pool(self, mv: pb.ModelVersion) -> _Pool:
        """The round's pool of encoded updates (made once per round, in a thread)."""
        ident = (mv.next_task.round, mv.header.model_version)
        fut = self._pools.get(ident)
        if fut is None:
            fut = self.loop.create_future()
            self._pools[ident] = fut
            for old in [k for k in self._pools if k[0] < ident[0] - 2]:
                del self._pools[old]
            try:
                fut.set_result(await asyncio.to_thread(self._encode_pool, mv))
            except BaseException as exc:
                fut.set_exception(exc)
                raise
        return await fut

    def _encode_pool(self, mv: pb.ModelVersion) -> _Pool:
        task = mv.next_task
        codec = Codec(codec_params(task.codec), mv.num_params,
                      self.he if task.codec.encrypted else None)
        rng = np.random.default_rng([task.round, zlib.crc32(self.cfg.seed.encode())])
        out = []
        for slot in range(self.cfg.pool):
            delta = rng.normal(0.0, 0.02, mv.num_params).astype(np.float32)
            n = int(rng.integers(16, 1024))
            payloads = codec.encode(delta, n, update_seed(task.seed, task.round, f"pool-{slot}"))
            out.append((payloads, codec.weight(n)))
        return _Pool(out)

    def fail(self, exc: BaseException | None) -> None:
        if self._error is None and exc is not None:
            self._error = exc
            self._done.set()

    def on_progress(self) -> None:
        if self._on_progress is not None:
            self._on_progress(self)

    def check_done(self) -> None:
        regions = self.regions.values()
        if all(r.final.is_set() for r in regions):
            self._done.set()
        elif self.cfg.rounds and all(
                len(r.stats) >= self.cfg.rounds and not r.tasks
                and not any(p.round in r.stats for p in r.pending.values())
                for r in regions):
            self._done.set()

    def stats(self) -> list[RoundStats]:
        return sorted((s for r in self.regions.values() for s in r.stats.values()),
                      key=lambda s: (s.round, s.region))

    def summary(self) -> dict[str, Any]:
        rounds: dict[int, dict[str, Any]] = {}
        for s in self.stats():
            agg = rounds.setdefault(s.round, {"round": s.round, "selected": 0, "dropped": 0,
                                              "sent": 0, "republished": 0, "accepted": 0,
                                              "foreign": 0, "bytes": 0})
            for k in ("selected", "dropped", "sent", "republished", "accepted", "foreign",
                      "bytes"):
                agg[k] += getattr(s, k)
        return {"devices": self.num_devices, "regions": list(self.devices),
                "rounds": list(rounds.values()), "per_region": [s.to_json() for s in self.stats()],
                "rejected": dict(self.rejected), "peak_rss_mib": peak_rss_mib(os.getpid())}

    async def run(self) -> dict[str, Any]:
        self.loop = asyncio.get_running_loop()
        self.regions = {r: _Region(self, r, names) for r, names in self.devices.items()}
        for r in self.regions.values():
            r.start()
        with contextlib.suppress(NotImplementedError, RuntimeError):  # SIGTERM: stop cleanly
            self.loop.add_signal_handler(signal.SIGTERM, self._done.set)
        churn = [asyncio.create_task(r.churn_forever(self.cfg.churn_s))
                 for r in self.regions.values()] if self.cfg.churn_s > 0 else []
        try:
            if self.cfg.timeout_s:
                try:
                    await asyncio.wait_for(self._done.wait(), self.cfg.timeout_s)
                except TimeoutError:
                    log.warning("timed out after %.0f s", self.cfg.timeout_s)
            else:
                await self._done.wait()
            if self._error is not None:
                raise self._error
        finally:
            for t in churn:
                t.cancel()
            for r in self.regions.values():
                for t in list(r.tasks):
                    t.cancel()
                await asyncio.gather(*r.tasks, return_exceptions=True)
                r.stop()
        return self.summary()


def peak_rss_mib(pid: int) -> float | None:
    """``VmHWM`` of process ``pid`` in MiB (None if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# -- CLI ------------------------------------------------------------------------------------------


def _broker(spec: str) -> tuple[str, tuple[str, int]]:
    region, sep, addr = spec.partition("=")
    host, sep2, port = addr.rpartition(":")
    if not sep or not sep2 or not region or not host or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected REGION=HOST:PORT, e.g. "
                                         "region-0=127.0.0.1:1883")
    return region, (host, int(port))


def _shard(spec: str) -> tuple[int, int]:
    i, sep, n = spec.partition("/")
    if not sep or not i.isdigit() or not n.isdigit() or not 0 <= int(i) < int(n):
        raise argparse.ArgumentTypeError(f"{spec!r}: expected I/N with 0 <= I < N, e.g. 0/2")
    return int(i), int(n)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fedstream-loadgen",
        description="A fleet of virtual devices for load tests: many enrolled identities per "
        "process, each signing real encrypted update chunks on its own topic through its "
        "region's Mosquitto. Open (non-TLS) brokers only: a few shared connections publish for "
        "many devices.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser(
        "keys", help="make a deployment's keys with N seed-derived virtual devices",
        description="Make the deployment's keys (global, operator, regions, HE contexts, as "
        "fedstream-keygen does) and add N virtual devices to trust.json, their keys derived "
        "from --seed and their ids (no per-device files). With --add, add the devices to an "
        "existing key directory instead.")
    k.add_argument("--out", type=Path, required=True, help="key directory to write")
    k.add_argument("--devices", type=int, required=True, help="number of virtual devices")
    k.add_argument("--regions", type=int, default=4, help="regions region-0..; devices are "
                   "split into contiguous blocks (default 4)")
    k.add_argument("--seed", default="loadgen", help="secret from which every device key is "
                   "derived: the run command needs the same (default 'loadgen')")
    k.add_argument("--prefix", default="dev-", help="device id prefix (default 'dev-': "
                   "dev-000000...)")
    k.add_argument("--add", action="store_true", help="add to the existing key directory OUT "
                   "(its regions must exist) instead of making a new deployment")
    r = sub.add_parser(
        "run", help="play the virtual devices of a trust store",
        description="Play every virtual device (agent) of the given regions: follow the round "
        "tasks on each region's retained model topic, answer when selected, after a seeded "
        "delay, with a real, signed, encrypted update; stop after the final model (or "
        "--rounds). Prints one line per round; --json writes the per-round statistics.")
    r.add_argument("--keys", type=Path, required=True, help="key directory (trust.json and "
                   "he/public.ctx; made by 'fedstream-loadgen keys')")
    r.add_argument("--mqtt", type=_broker, action="append", required=True,
                   metavar="REGION=HOST:PORT", help="a region to play and its broker "
                   "(repeatable, one per region)")
    r.add_argument("--seed", default="loadgen", help="the seed the device keys were derived "
                   "from (the same as 'keys --seed'); also seeds delays and dropouts")
    r.add_argument("--namespace", default="fedstream", help="topic namespace of the federation")
    r.add_argument("--arrival", choices=ARRIVALS, default="none",
                   help="delay of each selected device before it answers: none (at once), "
                   "uniform (0..scale), lognormal (median scale, log-std shape) or pareto "
                   "(minimum scale, tail index shape; heavy-tailed stragglers)")
    r.add_argument("--arrival-scale-s", type=float, default=1.0, help="the delay's scale in "
                   "seconds (see --arrival)")
    r.add_argument("--arrival-shape", type=float, default=1.0, help="lognormal sigma or "
                   "Pareto tail index (see --arrival)")
    r.add_argument("--max-delay-s", type=float, default=60.0, help="cap of every delay")
    r.add_argument("--dropout", type=float, default=0.0, help="probability that a selected "
                   "device does not answer a round (silent: the round waits for its deadline)")
    r.add_argument("--reconnect", type=float, default=0.0, help="probability that a device "
                   "'reconnects' after sending and republishes its unreceipted update once "
                   "(the region must drop the duplicate)")
    r.add_argument("--reconnect-delay-s", type=float, default=2.0, help="when that republish "
                   "happens, after the first send")
    r.add_argument("--churn-s", type=float, default=0.0, help="every this many seconds drop and "
                   "reopen one shared MQTT connection per region; its devices republish what "
                   "is not receipted (0: never)")
    r.add_argument("--connections", type=int, default=4, help="MQTT connections per region "
                   "that publish for its devices (default 4)")
    r.add_argument("--pool", type=int, default=4, help="distinct encoded updates per round "
                   "that the devices share (each message is still signed by its device)")
    r.add_argument("--max-inflight", type=int, default=256, help="unacknowledged QoS 1 "
                   "publishes per connection before the sender waits")
    r.add_argument("--rounds", type=int, default=0, help="answer this many rounds, wait for "
                   "their receipts, then stop (0: until the final model version)")
    r.add_argument("--timeout-s", type=float, default=0.0, help="stop after this long anyway "
                   "(0: never)")
    r.add_argument("--presign", action="store_true", help="sign all of a round's updates "
                   "before publishing the first (ingest benchmarks: the broker, not signing, "
                   "paces the sends); ignores --arrival")
    r.add_argument("--prefix", default="", help="play only agents whose id starts with this")
    r.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="play only the devices with crc32(id) %% N == I (run N processes)")
    r.add_argument("--client-id", default="", help="MQTT client id prefix (default "
                   "loadgen-<pid>-<shard>)")
    r.add_argument("--json", type=Path, default=None, help="write the statistics here")
    r.add_argument("--quiet", action="store_true", help="no progress display")
    r.add_argument("--log-level", default="warning", help="python logging level")
    return ap


def _keys_cmd(args: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    if args.devices < 1 or args.regions < 1:
        ap.error("--devices and --regions must be at least 1")
    try:
        names = device_names(args.devices, args.prefix)
    except ValueError as exc:
        ap.error(str(exc))
    devices = contiguous_fleet(names, args.regions)
    if args.add:
        try:
            existing = json.loads((args.out / "trust.json").read_text())["identities"]
        except (OSError, ValueError, KeyError) as exc:
            ap.error(f"--add needs an existing key directory: {exc}")
        missing = [r for r in devices if existing.get(r, {}).get("role") != "region"]
        if missing:
            ap.error(f"regions {missing} are not in {args.out}/trust.json")
    elif (args.out / "trust.json").exists():
        ap.error(f"{args.out} already holds keys: use --add to add devices to it")
    t0 = time.time()
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True) as prog:
        task = prog.add_task("deriving device keys", total=args.devices)

        def advance(n: int) -> None:
            prog.advance(task, n)

        try:
            if args.add:
                n = enrol_devices(args.out, devices, args.seed, progress=advance)
                summary = {"dir": str(args.out), "devices": str(n)}
            else:
                summary = make_fleet_keys(args.out, devices, args.seed, progress=advance)
        except (ValueError, OSError) as exc:
            ap.error(str(exc))
    summary["seconds"] = f"{time.time() - t0:.1f}"
    print(json.dumps(summary, indent=2))


def _run_cmd(args: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    from rich.console import Console

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    mqtt_map = dict(args.mqtt)
    if len(mqtt_map) != len(args.mqtt):
        ap.error("a region is given twice in --mqtt")
    try:
        cfg = LoadgenConfig(
            keys=args.keys, mqtt=mqtt_map, seed=args.seed, namespace=args.namespace,
            arrival=Arrival(args.arrival, args.arrival_scale_s, args.arrival_shape,
                            args.max_delay_s),
            dropout=args.dropout, reconnect=args.reconnect,
            reconnect_delay_s=args.reconnect_delay_s, churn_s=args.churn_s,
            connections=args.connections, pool=args.pool, max_inflight=args.max_inflight,
            rounds=args.rounds, timeout_s=args.timeout_s, presign=args.presign,
            prefix=args.prefix, shard=args.shard, client_id=args.client_id)
        Topics(args.namespace)
    except ValueError as exc:
        ap.error(str(exc))
    console = Console(stderr=True)
    shown: dict[int, tuple[int, int]] = {}

    def progress(gen: Loadgen) -> None:
        if args.quiet:
            return
        for s in _by_round(gen):
            now = (s["sent"], s["accepted"])
            if shown.get(s["round"]) != now and (s["accepted"] == s["selected"] - s["dropped"]
                                                 or s["sent"] == s["selected"] - s["dropped"]):
                shown[s["round"]] = now
                console.print(f"round {s['round']}: {s['selected']} selected, {s['dropped']} "
                              f"dropped out, {s['sent']} sent, {s['accepted']} receipted, "
                              f"{s['republished']} republished")

    try:
        gen = Loadgen(cfg, on_progress=progress)
    except (ValueError, FileNotFoundError) as exc:
        ap.error(str(exc))
    if not args.quiet:
        console.print(f"{gen.num_devices} virtual devices in {len(cfg.mqtt)} regions "
                      f"({', '.join(f'{r}: {len(d)}' for r, d in gen.devices.items())})")
    try:
        summary = asyncio.run(gen.run())
    except KeyboardInterrupt:
        summary = gen.summary()
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))


def _by_round(gen: Loadgen) -> list[dict[str, int]]:
    out: dict[int, dict[str, int]] = {}
    for s in gen.stats():
        agg = out.setdefault(s.round, {"round": s.round, "selected": 0, "dropped": 0, "sent": 0,
                                       "accepted": 0, "republished": 0})
        for k in ("selected", "dropped", "sent", "accepted", "republished"):
            agg[k] += getattr(s, k)
    return list(out.values())


def main(argv: list[str] | None = None) -> None:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.cmd == "keys":
        _keys_cmd(args, ap)
    else:
        _run_cmd(args, ap)


if __name__ == "__main__":
    main(sys.argv[1:])


__all__ = ["Arrival", "Connection", "Loadgen", "LoadgenConfig", "RoundStats", "arrival_delay",
           "chance", "device_key", "device_names", "enrol_devices", "make_fleet_keys",
           "peak_rss_mib", "public_hex", "schedule", "shard_of", "unit_draw"]
