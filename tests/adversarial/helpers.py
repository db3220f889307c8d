"""A stolen device on a live federation, and the checks every adversarial test makes.

:class:`StolenDevice` holds exactly what a thief of ``agent-005`` holds: its Ed25519 key and the
public HE context (no other key, no secret context). It runs in the test process in place of the
real edge agent, follows the region's retained model topic like a device, and on every round
calls the test's ``on_round(device, model_version)``, which sends whatever the attack needs,
validly signed. ``device.honest(mv)`` builds the update the real edge would have sent (the same
code), so a test can mix honest and hostile traffic.

Each test then checks the same things (:func:`run_attack`): every service alive during the run
and exiting 0 at the end, every round completed, the attack counted by reason, and the final
model equal **bit for bit** to the simulation in which the agents that did not count in a round
(the excluded group, the refused attacker) did not take part in it.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import paho.mqtt.client as mqtt

from compose.federation import Federation
from edge_agent.service import EdgeAgent, EdgeSettings
from global_aggregator.consumer import VerifiedModel
from schemas import fedstream_pb2 as pb
from schemas.codec import Codec
from schemas.kafka import MAX_MESSAGE_BYTES
from schemas.signing import header, open_model_version, seal
from schemas.task import codec_params
from schemas.topics import Topics
from tests.e2e.helpers import (
    make_federation,
    rejected,
    scrape,
    simulate_federation,
    total_rejected,
    watch,
    with_metrics,
)

AGENTS, REGIONS = 8, 2
THIEF = "agent-005"          # region-1: agent-004 .. agent-007
THIEF_REGION = "region-1"
#: The attacks are written against the 8-bit / 64-summand plan (14-bit lanes, two 70 kB chunks).
CODEC = {"bits": 8, "max_summands": 64}


class StolenDevice:
    """``agent-005``'s key and the public HE context, driven by the test (see module doc)."""

    def __init__(self, fed: Federation, on_round: Callable[[StolenDevice, pb.ModelVersion], None],
                 agent: str = THIEF, region: str = THIEF_REGION) -> None:
        host, port = fed.mqtt[region]
        self.fed, self.agent, self.region, self.on_round = fed, agent, region, on_round
        self.topics = Topics(fed.namespace)
        self.edge = EdgeAgent(EdgeSettings(
            device_id=agent, mqtt=f"{host}:{port}", keys=fed.keys_dir, project=fed.project,
            data=fed.data, namespace=fed.namespace))
        self.key = self.edge.keys.private_key
        self.he = self.edge.keys.he
        assert not self.he.is_private, "a device never holds the secret context"
        self.rounds: list[int] = []
        self.errors: list[BaseException] = []
        self._seen: set[int] = set()
        self._work: list[threading.Thread] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"thief-{fed.namespace}", protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(0)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = lambda c, *a: c.subscribe(self.topics.model(region), qos=1)
        self.client.on_message = self._on_message
        self._host, self._port = host, port

    # -- what the device can make ------------------------------------------------------------

    def codec(self, mv: pb.ModelVersion) -> Codec:
        return Codec(codec_params(mv.next_task.codec), mv.num_params, self.he)

    def honest(self, mv: pb.ModelVersion) -> list[bytes]:
        """The envelopes the real edge agent would send this round (same code, same seeds)."""
        return self.edge.build_update(mv)

    def envelope(self, mv: pb.ModelVersion, index: int, count: int, payload: bytes, weight: int,
                 *, round_id: int | None = None, topic: str | None = None) -> bytes:
        """An update chunk signed with the stolen key, for ``topic`` (default its own)."""
        task = mv.next_task
        up = pb.UpdateChunk(
            header=header(self.agent, task.round if round_id is None else round_id,
                          mv.header.model_version, task.he_fingerprint, index, count),
            agent_id=self.agent, region=self.region, payload=payload,
            weight=weight if index == 0 else 0)
        return seal(pb.UPDATE_CHUNK, up, self.agent, self.key,
                    topic=topic or self.topics.update(self.region, self.agent))

    def envelopes(self, mv: pb.ModelVersion, payloads: list[bytes], weight: int) -> list[bytes]:
        return [self.envelope(mv, i, len(payloads), p, weight) for i, p in enumerate(payloads)]

    def publish(self, raw: bytes, topic: str | None = None) -> None:
        self.client.publish(topic or self.topics.update(self.region, self.agent), raw,
                            qos=1).wait_for_publish(30)

    # -- lifecycle ---------------------------------------------------------------------------

    def _on_message(self, client, userdata, msg) -> None:
        try:
            mv = open_model_version(msg.payload, self.edge.keys.trust,
                                    max_bytes=MAX_MESSAGE_BYTES, topic=self.topics.models)
        except Exception as exc:  # noqa: BLE001 - recorded, the test fails on it
            self.errors.append(exc)
            return
        if mv.final or mv.next_task.round in self._seen:
            return
        self._seen.add(mv.next_task.round)
        self.rounds.append(mv.next_task.round)

        def work() -> None:
            try:
                self.on_round(self, mv)
            except Exception as exc:  # noqa: BLE001 - recorded, the test fails on it
                self.errors.append(exc)

        t = threading.Thread(target=work, daemon=True)
        self._work.append(t)
        t.start()

    def start(self) -> None:
        self.client.connect(self._host, self._port, keepalive=30)
        self.client.loop_start()

    def stop(self) -> None:
        for t in self._work:
            t.join(timeout=120)
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Outcome:
    versions: list[VerifiedModel]
    metrics: dict[str, dict]
    exits: dict[str, int]
    device: StolenDevice
    fed: Federation
    extra: dict = field(default_factory=dict)

    def rejected(self, process: str, reason: str) -> float:
        """``fedstream_rejected_total{reason}`` of ``process`` ("region-1", "global", ...)."""
        return rejected(self.metrics[process], self.service(process), reason)

    def total_rejected(self, process: str) -> float:
        """Every input ``process`` refused, whatever the reason."""
        return total_rejected(self.metrics[process], self.service(process))

    def service(self, process: str) -> str:
        """The ``service`` label of a process's metrics."""
        return "regional" if process in self.fed.fleet else process

    def assert_everyone_counted(self) -> None:
        """Every agent's update counted in every round."""
        for v in self.versions[1:]:
            assert sum(map(len, v.participants.values())) == AGENTS, v.participants

    def counter(self, process: str, name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return self.metrics[process].get(key, 0.0)

    def excluded(self) -> list[tuple[int, pb.ExcludedGroup]]:
        return [(v.round, e) for v in self.versions[1:] for e in v.message.provenance.excluded]


def run_attack(stack, tmp_path, namespace: str, on_round, *, rounds: int = 2,
               deadline_s: float = 120.0, extra_global=(), extra_regional=(),
               during=None, timeout_s: float = 400) -> Outcome:
    """Run the 2 x 4 federation with ``agent-005`` replaced by a :class:`StolenDevice`.

    ``during(outcome_so_far, version)`` is awaited on every model version (extra faults).
    Scrapes the metrics of both regions and the global before stopping them.
    """
    fed = make_federation(stack.mqtt, stack.kafka_bootstrap, tmp_path, namespace,
                          agents=AGENTS, regions=REGIONS, rounds=rounds, deadline_s=deadline_s,
                          extra_global=["--linger-s", "120", "--codec.bits", str(CODEC["bits"]),
                                        "--codec.max-summands", str(CODEC["max_summands"]),
                                        *extra_global],
                          extra_regional=list(extra_regional))
    ports = {name: with_metrics(fed, name) for name in ("region-0", "region-1", "global")}
    device = StolenDevice(fed, on_round)
    outcome = Outcome([], {}, {}, device, fed)
    try:
        fed.start_all(skip=(THIEF,))
        device.start()

        async def on_version(v):
            for name, proc in fed.procs.items():  # edges leave (0) once the final version is out
                assert proc.poll() in (None, 0), f"{name} died:\n{fed.log(name)}"
            if during is not None:
                r = during(outcome, v)
                if asyncio.iscoroutine(r):
                    await r

        outcome.versions = asyncio.run(watch(fed, timeout_s=timeout_s, on_version=on_version))
        # edges leave on the final version; the global lingers and the regions run until told
        outcome.exits = {n: fed.wait(n, 60) for n in fed.procs if n not in (*fed.fleet, "global")}
        time.sleep(1)  # the regions relay the final version
        for name in ("global", *fed.fleet):
            if fed.alive(name):
                outcome.metrics[name] = scrape(ports[name])
                fed.procs[name].send_signal(signal.SIGTERM)
            outcome.exits[name] = fed.wait(name, 30)
    finally:
        device.stop()
        fed.stop_all()
    assert not device.errors, device.errors
    assert outcome.exits == dict.fromkeys(fed.procs, 0), \
        {n: fed.log(n, 30) for n, c in outcome.exits.items() if c}
    assert [v.version for v in outcome.versions] == list(range(rounds + 1))
    assert outcome.versions[-1].final
    return outcome


def assert_matches_simulation(outcome: Outcome, rounds: int) -> None:
    """The final model equals the simulation in which every agent that did not count in a round
    (as the versions' provenance says) did not take part in it, bit for bit."""
    every = {f"agent-{i:03d}" for i in range(AGENTS)}
    excluded = {}
    for v in outcome.versions[1:]:
        counted = {a for agents in v.participants.values() for a in agents}
        excluded[v.round] = frozenset(every - counted)
    sim = simulate_federation(outcome.fed, rounds, excluded=excluded, **CODEC)
    for v, h in zip(outcome.versions[1:], sim.history, strict=True):
        assert sum(len(a) for a in v.participants.values()) == h["participants"]
    assert outcome.versions[-1].params.tobytes() == \
        np.asarray(sim.final_params, np.float32).tobytes()
