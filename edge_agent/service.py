"""The edge agent: retained model in, local training, encrypted update chunks out (MQTT QoS 1).

The agent keeps its update until a receipt from its regional aggregator names it for that round,
and republishes it after every reconnect; the regional aggregator drops the duplicates. Its data
never leaves the process: only the clipped, quantized, CKKS-encrypted delta does, made with the
public HE context (this process cannot decrypt anything, not even its own update). Its local
evaluation numbers stay on the device unless the operator opts in (``--report-eval``); the only
other thing that leaves in clear is its coarse weight (capped sample count, 3 significant bits),
which the region range-checks. It refuses any model version older than the newest it has seen.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.data import TASKS, agent_dataset
from edge_agent.models import make_spec
from edge_agent.train import LocalTrainConfig, evaluate, local_seed, train_local
from schemas import fedstream_pb2 as pb
from schemas.codec import Codec, update_seed
from schemas.errors import InvalidMessage, Reason
from schemas.kafka import MAX_MESSAGE_BYTES
from schemas.keyring import Keyring
from schemas.mqtt import MqttLink
from schemas.signing import header, open_envelope, open_model_version, seal
from schemas.task import codec_params
from schemas.telemetry import ACCEPTED, BYTES, ROUND, reject, serve
from schemas.topics import Topics

log = logging.getLogger("fedstream.edge")
SERVICE = "edge"


@dataclass(frozen=True)
class EdgeSettings:
    agent_id: str
    region: str
    mqtt_host: str
    mqtt_port: int
    keys_dir: Path
    num_agents: int
    partition: str = "dirichlet"
    alpha: float = 0.5
    data_seed: int = 0
    task_name: str = "digits"
    straggle_s: float = 0.0  # test hook: wait this long before publishing (a slow device)
    metrics_port: int | None = None
    namespace: str = "fedstream"
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    mqtt_ca_file: Path | None = None
    report_eval: bool = False  # send local loss/accuracy in clear beside the update (opt-in)

    @property
    def agent_index(self) -> int:
        try:
            return int(self.agent_id.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            raise ValueError(f"agent id {self.agent_id!r} is not of the form agent-<n>") from None


class EdgeAgent:
    def __init__(self, settings: EdgeSettings) -> None:
        self.s = settings
        self.t = Topics(settings.namespace)
        self.keys = Keyring.load(settings.keys_dir, settings.agent_id)
        me = self.keys.trust.get(settings.agent_id)
        if me is None or me.region != settings.region:
            raise ValueError(f"{settings.agent_id} is not registered in {settings.region}")
        if settings.task_name not in TASKS:
            raise ValueError(f"unknown task {settings.task_name!r}")
        self.data = agent_dataset(settings.task_name, settings.agent_index, settings.num_agents,
                                  settings.partition, settings.alpha, settings.data_seed)
        self.pending: dict[int, list[bytes]] = {}  # round -> update chunk envelopes
        self.done_round = 0
        self.finished = asyncio.Event()
        self._stop = asyncio.Event()
        self._busy = False
        self._newest_version = -1

    def _republish(self) -> None:
        """Called in paho's thread after each (re)connect: resend every unreceipted update."""
        for round_id, chunks in list(self.pending.items()):
            log.info("%s: republishing round %d update after reconnect", self.s.agent_id, round_id)
            for raw in chunks:
                self.mqtt.publish(self.t.update(self.s.region, self.s.agent_id), raw)

    def build_update(self, mv: pb.ModelVersion) -> list[bytes]:
        """Train on the local data from ``mv`` and return the signed update chunk envelopes
        (blocking: call it off the event loop)."""
        task = mv.next_task
        info = TASKS[task.task_name]
        spec = make_spec(task.model_name, info.input_shape, info.num_classes)
        cfg = LocalTrainConfig(optimizer=task.train.optimizer, lr=task.train.lr,
                               epochs=task.train.epochs, batch_size=task.train.batch_size,
                               prox_mu=task.train.prox_mu)
        codec = Codec(codec_params(task.codec), mv.num_params,
                      self.keys.he if task.codec.encrypted else None)
        params = np.frombuffer(mv.params, "<f4").copy()
        x, y, xt, yt = self.data
        ev = evaluate(spec, params, xt, yt) if self.s.report_eval else {}
        delta, n, _ = train_local(spec, params, x, y, cfg,
                                  local_seed(task.seed, task.round, self.s.agent_id))
        payloads = codec.encode(delta, n, update_seed(task.seed, task.round, self.s.agent_id))
        weight = codec.weight(n)
        topic = self.t.update(self.s.region, self.s.agent_id)
        chunks = []
        for i, payload in enumerate(payloads):
            up = pb.UpdateChunk(
                header=header(self.s.agent_id, task.round, mv.header.model_version,
                              task.he_fingerprint, i, len(payloads)),
                agent_id=self.s.agent_id, region=self.s.region, payload=payload,
                weight=weight if i == 0 else 0,
                eval=pb.EvalSums(loss_sum=ev["loss"] * len(yt),
                                 accuracy_sum=ev["accuracy"] * len(yt), count=len(yt))
                if i == 0 and ev else None,
            )
            chunks.append(seal(pb.UPDATE_CHUNK, up, self.s.agent_id, self.keys.private_key,
                               topic=topic))
        return chunks

    async def _train_and_publish(self, mv: pb.ModelVersion) -> None:
        task = mv.next_task
        try:
            chunks = await asyncio.to_thread(self.build_update, mv)
        except (InvalidMessage, ValueError) as exc:
            log.error("%s: round %d failed locally: %s", self.s.agent_id, task.round, exc)
            return
        if self.s.straggle_s:
            await asyncio.sleep(self.s.straggle_s)
        self.pending[task.round] = chunks
        for raw in chunks:
            self.mqtt.publish(self.t.update(self.s.region, self.s.agent_id), raw)
            BYTES.labels(SERVICE, "mqtt_out").inc(len(raw))
        late = time.time() > task.deadline_unix
        log.info("%s: round %d update published (%d chunks, %d bytes%s)", self.s.agent_id,
                 task.round, len(chunks), sum(map(len, chunks)), ", after the deadline" if late else "")

    def _on_model(self, raw: bytes) -> pb.ModelVersion | None:
        mv = open_model_version(raw, self.keys.trust, max_bytes=MAX_MESSAGE_BYTES,
                                topic=self.t.models)
        if mv.header.model_version < self._newest_version:
            raise InvalidMessage(Reason.STALE_VERSION, f"model v{mv.header.model_version} is "
                                 f"older than v{self._newest_version}, already seen")
        self._newest_version = mv.header.model_version
        if mv.final:
            self.pending.clear()
            return mv
        for r in [r for r in self.pending if r < mv.next_task.round]:
            self.pending.pop(r)  # that round is closed: its update is obsolete
        task = mv.next_task
        if task.he_fingerprint != self.keys.he.fingerprint:
            raise InvalidMessage("wrong_fingerprint", "round task names another HE context")
        if task.round <= self.done_round:
            return None
        if task.selected_agents and self.s.agent_id not in task.selected_agents:
            self.done_round = task.round
            return None
        return mv

    def _on_receipt(self, raw: bytes) -> None:
        rc = open_envelope(raw, pb.RECEIPT, self.keys.trust, max_bytes=1 << 20,
                           topic=self.t.receipts(self.s.region)).body
        if rc.region != self.s.region or rc.header.sender != self.s.region:
            raise InvalidMessage("unauthorized", f"receipt from {rc.header.sender!r}")
        if self.s.agent_id in rc.agents and self.pending.pop(rc.header.round, None) is not None:
            ACCEPTED.labels(SERVICE, "receipt").inc()
            log.info("%s: round %d receipted", self.s.agent_id, rc.header.round)

    async def run(self) -> None:
        serve(self.s.metrics_port)
        loop = asyncio.get_running_loop()
        self.mqtt = MqttLink(
            host=self.s.mqtt_host, port=self.s.mqtt_port,
            client_id=f"{self.s.namespace}-edge-{self.s.agent_id}",
            subscriptions=[self.t.model(self.s.region), self.t.receipts(self.s.region)],
            loop=loop, persistent=False, on_connect=self._republish,
            username=self.s.mqtt_username, password=self.s.mqtt_password,
            ca_file=self.s.mqtt_ca_file,
        )
        self.mqtt.start()
        work: asyncio.Task | None = None
        try:
            while not self._stop.is_set():
                get = asyncio.create_task(self.mqtt.inbox.get())
                stop = asyncio.create_task(self._stop.wait())
                await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if not get.done():
                    get.cancel()
                    break
                msg = get.result()
                try:
                    if msg.topic == self.t.receipts(self.s.region):
                        self._on_receipt(bytes(msg.payload))
                        continue
                    mv = self._on_model(bytes(msg.payload))
                except InvalidMessage as exc:
                    reject(SERVICE, exc, msg.topic)
                    continue
                if mv is None:
                    continue
                if mv.final:
                    log.info("%s: final model v%d received", self.s.agent_id,
                             mv.header.model_version)
                    self.finished.set()
                    break
                if work is not None and not work.done():
                    await work  # one round at a time, in order
                ROUND.labels(SERVICE).set(mv.next_task.round)
                self.done_round = mv.next_task.round
                work = asyncio.create_task(self._train_and_publish(mv))
            if work is not None and not work.done():
                work.cancel()
        finally:
            self.mqtt.stop()

    def stop(self) -> None:
        self._stop.set()
