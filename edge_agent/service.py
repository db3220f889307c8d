"""The edge agent: retained model in, local training, encrypted update chunks out (MQTT QoS 1).

The agent keeps its update until a receipt from its regional aggregator names it for that round,
and republishes it after every reconnect; the regional aggregator drops the duplicates. Its data
never leaves the process: only the clipped, quantized, CKKS-encrypted delta does, made with the
public HE context (this process cannot decrypt anything, not even its own update). Its local
evaluation numbers stay on the device unless the operator opts in (``--report-eval``); the only
other thing that leaves in clear is its coarse weight (capped sample count, 3 significant bits),
which the region range-checks. It refuses any model version older than the newest it has seen.

What it trains is the federation's project (``--project``, docs/projects.md), installed on the
device: the project's model on the data its loader returns for this device (``--data``), read
again every round. A round task for another project, model definition or codec plan is refused
(``task_mismatch``); unusable local data sits the round out (``data_error``); both are one log
line and a counter, a signed decline to the region (so the round need not wait for this device's
deadline), and the device carries on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from pathlib import Path

import numpy as np
from pydantic import Field, field_validator

from edge_agent.dp_ledger import DpLedger
from edge_agent.loaders import DeviceContext, device_options, load_device_data, resolve_loader
from edge_agent.models import model_hash, project_spec
from edge_agent.train import (
    LocalTrainConfig,
    evaluate,
    local_seed,
    new_dp_seed,
    train_local,
    use_compile_cache,
)
from schemas import fedstream_pb2 as pb
from schemas.cli import MqttClient, ServiceSettings, tune_malloc
from schemas.codec import Codec, update_seed
from schemas.errors import InvalidMessage, Reason
from schemas.keyring import Keyring
from schemas.mqtt import MAX_PACKET_BYTES as MAX_MESSAGE_BYTES
from schemas.mqtt import MqttLink
from schemas.project import check_device_id, load_project, task_hash
from schemas.signing import AgentScope, header, open_envelope, open_model_version, seal
from schemas.task import codec_params
from schemas.telemetry import ACCEPTED, BYTES, PRIVACY_DELTA, PRIVACY_EPSILON, ROUND, reject, serve
from schemas.topics import Topics

log = logging.getLogger("fedstream.edge")
SERVICE = "edge"


def pareto_delay(scale: float, alpha: float, seed: int, round_id: int, device: str) -> float:
    """A Pareto (Lomax) delay in seconds, ``scale * (U ** (-1 / alpha) - 1)``, from a
    generator keyed by (seed, round, device): heavy-tailed, reproducible."""
    h = hashlib.sha256(f"fedstream/delay/v1|{seed}|{round_id}|{device}".encode()).digest()
    u = np.random.default_rng(int.from_bytes(h[:8], "big")).random()
    return float(scale * ((1.0 - u) ** (-1.0 / max(alpha, 1e-3)) - 1.0))


class EdgeSettings(ServiceSettings, MqttClient):
    """fedstream-edge-agent: one device of the fleet. Trains the project's model on this
    device's own data when a round task arrives (the region's retained MQTT model topic),
    publishes the clipped, quantized, CKKS-encrypted update with QoS 1 and keeps it until the
    regional receipt names this device. Refuses a round task for another project, model or codec
    plan (task_mismatch). Exits after the final model. Every flag is also an environment
    variable: FEDSTREAM_<FLAG> (e.g. FEDSTREAM_DEVICE_ID)."""

    model_config = ServiceSettings.model_config | {"cli_prog_name": "fedstream-edge-agent"}

    device_id: str = Field(description="this device's id in the trust store (the fleet's own: "
                           "serial numbers etc., [A-Za-z0-9._-]{1,64})")
    keys: Path = Field(description="key directory (public HE context + this device's key)")
    project: Path = Field(description="the federation's project directory (its pyproject.toml "
                          "names model, loss and data loader)")
    region: str | None = Field(None, description="region (default: the trust store's; a "
                               "device enrolled after its trust.json was made gives it here)")
    data: dict[str, str] = Field(
        default_factory=dict, description="this device's own loader settings, KEY=VALUE "
        "(repeatable), over the project's loader_options; e.g. --data path=/var/log/x.csv")
    report_eval: bool = Field(
        False, description="opt in: send this device's local test loss and accuracy IN CLEAR "
        "beside its encrypted update (off: only ciphertext and a coarse weight leave; "
        "withheld in federations with differential privacy)")
    straggle_s: float = Field(0.0, ge=0, description="testing: wait this long before "
                              "publishing each update (a slow device)")
    delay: str = Field(
        "", pattern=r"^$|^pareto:[0-9.]+:[0-9.]+$", description="benchmarks: before publishing "
        "each update, also wait a heavy-tailed time, pareto:SCALE:ALPHA (seconds; drawn per "
        "device and round from the federation seed, so runs compare like for like)")
    dp_ledger: Path | None = Field(
        None, description="the DP-SGD privacy ledger: every noisy local step this device took, "
        "kept across restarts so that its epsilon covers them all (default "
        "<keys>/<device-id>.dp-ledger.json)")
    compile_cache: str = Field(
        str(Path.home() / ".cache" / "fedstream" / "xla"),
        description="keep the compiled training step here, so that every start after the first "
        "loads it instead of compiling (less peak memory, faster first update); '' disables")

    @field_validator("device_id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_device_id(v)

    @property
    def agent_id(self) -> str:
        return self.device_id


class EdgeAgent:
    def __init__(self, settings: EdgeSettings) -> None:
        self.s = settings
        tune_malloc(arena_max=1)  # before XLA starts its threads: a small device's memory
        if settings.compile_cache:
            use_compile_cache(Path(settings.compile_cache))
        self.t = Topics(settings.namespace)
        self.keys = Keyring.load(settings.keys, settings.device_id,  # no other device's key
                                 scope=AgentScope.only(settings.device_id))
        me = self.keys.trust.get(settings.device_id)
        if me is None:  # enrolled after this trust.json was made (fedstream-fleet enrol)
            if settings.region is None:
                raise ValueError(f"{settings.device_id} is not in this trust store: a device "
                                 "enrolled later gives its --region")
            self.region = settings.region
        elif me.role != "agent":
            raise ValueError(f"{settings.device_id} is not a device of the trust store")
        elif settings.region not in (None, me.region):
            raise ValueError(f"{settings.device_id} belongs to {me.region}, not {settings.region}")
        else:
            self.region = me.region
        self.mqtt_tls = settings.mqtt_tls(settings.device_id, "agent")
        self.project = load_project(settings.project)
        self.spec = project_spec(self.project)
        self.model_hash = model_hash(self.spec)
        self.loader = resolve_loader(self.project.table.loader)
        self.data_ctx = DeviceContext(
            settings.device_id, self.region, self.project.root,
            device_options(self.project.table.loader_options, settings.data,
                           device_id=settings.device_id, region=self.region))
        log.info("%s (%s) runs project %s %s, model %s (%d parameters, hash %s)",
                 settings.device_id, self.region, self.project.name, self.project.version,
                 self.spec.factory, self.spec.num_params, self.model_hash[:12])
        self.pending: dict[int, list[bytes]] = {}  # round -> update chunk envelopes
        self.done_round = 0
        self.finished = asyncio.Event()
        self._stop = asyncio.Event()
        self._busy = False
        self._newest_version = -1
        # DP-SGD: every noisy local step this device took, across restarts (a bad ledger stops
        # the start: a fresh one would under-report epsilon)
        self.dp_ledger = DpLedger(settings.dp_ledger or settings.keys
                                  / f"{settings.device_id}.dp-ledger.json", settings.device_id)
        self._eval_withheld = False  # --report-eval in a DP federation (logged once)

    def _republish(self) -> None:
        """Called in paho's thread after each (re)connect: resend every unreceipted update."""
        for round_id, chunks in list(self.pending.items()):
            log.info("%s: republishing round %d update after reconnect", self.s.agent_id, round_id)
            for raw in chunks:
                self.mqtt.publish(self.t.update(self.region, self.s.agent_id), raw)

    def _account_examples(self, n: int, cfg: LocalTrainConfig, steps: int,
                          delta: float) -> None:
        """Example-level DP-SGD: record this round's noisy steps in the device's ledger (before
        the update leaves) and report epsilon over every step it ever took (its data, its
        examples; exported as fedstream_privacy_epsilon).

        Raises:
            InvalidMessage("data_error"): the ledger cannot be written: no update leaves whose
                privacy cost is not recorded.
        """
        batch = min(cfg.batch_size or n, n)
        try:
            self.dp_ledger.record(batch / n, cfg.dp_noise_multiplier, steps)
        except OSError as exc:
            raise InvalidMessage(Reason.DATA_ERROR, f"cannot record DP-SGD steps in "
                                 f"{self.dp_ledger.path}: {exc}") from None
        if not 0 < delta < 1:
            log.warning("%s: the round task gives no delta for DP-SGD: epsilon not accounted",
                        self.s.agent_id)
            return
        eps = self.dp_ledger.epsilon(delta)
        PRIVACY_EPSILON.set(eps)
        PRIVACY_DELTA.set(delta)
        log.info("%s: DP-SGD over %d steps of %d examples (batch %d): epsilon %.4f at delta %g",
                 self.s.agent_id, self.dp_ledger.steps, n, batch, eps, delta)

    def _reports_eval(self, codec: Codec, cfg: LocalTrainConfig) -> bool:
        """``--report-eval``, except in a DP round: evaluation sums travel in clear, outside the
        noise and the accounting, so a device that is promised an epsilon keeps them."""
        if not self.s.report_eval:
            return False
        if codec.params.noisy or cfg.dp:
            if not self._eval_withheld:
                log.warning("--report-eval: evaluation withheld, this federation runs with "
                            "differential privacy and the sums would travel in clear")
                self._eval_withheld = True
            return False
        return True

    def build_update(self, mv: pb.ModelVersion) -> list[bytes]:
        """Train on the local data from ``mv`` and return the signed update chunk envelopes
        (blocking: call it off the event loop)."""
        task = mv.next_task
        spec = self.spec
        cfg = LocalTrainConfig(optimizer=task.train.optimizer, lr=task.train.lr,
                               epochs=task.train.epochs, batch_size=task.train.batch_size,
                               prox_mu=task.train.prox_mu, dp_clip=task.train.dp_clip,
                               dp_noise_multiplier=task.train.dp_noise_multiplier)
        codec = Codec(codec_params(task.codec), mv.num_params,
                      self.keys.he if task.codec.encrypted else None)
        params = np.frombuffer(mv.params, "<f4").copy()
        data = load_device_data(self.loader, self.data_ctx, spec.input_shape)  # data_error
        x, y, xt, yt = data.x_train, data.y_train, data.x_test, data.y_test
        ev = evaluate(spec, params, xt, yt) if self._reports_eval(codec, cfg) else {}
        delta, n, stats = train_local(spec, params, x, y, cfg,
                                      local_seed(task.seed, task.round, self.s.agent_id),
                                      dp_seed=new_dp_seed() if cfg.dp else None)
        if cfg.dp:
            self._account_examples(n, cfg, int(stats["dp_steps"]), task.train.dp_delta)
        # distributed DP: the noise comes from this device's own secret randomness, never from
        # the federation seed the global knows
        noise = None
        if codec.params.noisy:
            from schemas.dp import NoiseSource  # dp-accounting and scipy only when DP is on

            noise = NoiseSource.secure()
        payloads = codec.encode(delta, n, update_seed(task.seed, task.round, self.s.agent_id),
                                noise)
        weight = codec.weight(n)
        topic = self.t.update(self.region, self.s.agent_id)
        chunks = []
        for i, payload in enumerate(payloads):
            up = pb.UpdateChunk(
                header=header(self.s.agent_id, task.round, mv.header.model_version,
                              task.he_fingerprint, i, len(payloads)),
                agent_id=self.s.agent_id, region=self.region, payload=payload,
                weight=weight if i == 0 else 0,
                project_version=self.project.version if i == 0 else "",
                eval=pb.EvalSums(loss_sum=ev["loss"] * len(yt),
                                 accuracy_sum=ev.get("accuracy", 0.0) * len(yt), count=len(yt))
                if i == 0 and ev else None,
            )
            chunks.append(seal(pb.UPDATE_CHUNK, up, self.s.agent_id, self.keys.private_key,
                               topic=topic))
        return chunks

    async def _train_and_publish(self, mv: pb.ModelVersion) -> None:
        task = mv.next_task
        try:
            chunks = await asyncio.to_thread(self.build_update, mv)
        except InvalidMessage as exc:  # data_error: sit this round out, say so once
            reject(SERVICE, exc, f"round {task.round} on {self.s.agent_id}")
            self._decline(mv, exc.reason)
            return
        except ValueError as exc:
            log.error("%s: round %d failed locally: %s", self.s.agent_id, task.round, exc)
            return
        if self.s.straggle_s:
            await asyncio.sleep(self.s.straggle_s)
        if self.s.delay:
            _, scale, alpha = self.s.delay.split(":")
            await asyncio.sleep(pareto_delay(float(scale), float(alpha), task.seed, task.round,
                                             self.s.agent_id))
        self.pending[task.round] = chunks
        for raw in chunks:
            self.mqtt.publish(self.t.update(self.region, self.s.agent_id), raw)
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
        self._check_task(mv)
        if task.selected_agents and self.s.agent_id not in task.selected_agents:
            self.done_round = task.round
            return None
        return mv

    def _check_task(self, mv: pb.ModelVersion) -> None:
        """Refuse a round task for another project, model definition or codec plan: no code
        crosses the wire, so the device must already run what the task names."""
        task = mv.next_task
        try:
            codec = Codec(codec_params(task.codec), mv.num_params,
                          self.keys.he if task.codec.encrypted else None)
            mine = task_hash(self.project.name, self.model_hash, codec.framer.digest)
        except InvalidMessage as exc:
            raise InvalidMessage(Reason.TASK_MISMATCH, f"round {task.round}: {exc}") from exc
        if task.task_name != self.project.name or task.project_hash != mine:
            self.done_round = task.round  # one refusal (and one log line) per round
            self._decline(mv, Reason.TASK_MISMATCH)
            raise InvalidMessage(Reason.TASK_MISMATCH, (
                f"round {task.round} is for project {task.task_name!r} {task.project_version} "
                f"(task hash {task.project_hash[:12]}, {mv.num_params} parameters); this device "
                f"runs {self.project.name!r} {self.project.version} (task hash {mine[:12]}, "
                f"{self.spec.num_params} parameters): install the federation's project"))

    def _decline(self, mv: pb.ModelVersion, reason: str) -> None:
        """Tell the region this device sits the round out (if it was asked), so that the round
        need not wait for its deadline. Best effort: if it is lost, the deadline still ends it."""
        task = mv.next_task
        if task.selected_agents and self.s.agent_id not in task.selected_agents:
            return
        topic = self.t.update(self.region, self.s.agent_id)
        up = pb.UpdateChunk(header=header(self.s.agent_id, task.round, mv.header.model_version,
                                          task.he_fingerprint, 0, 0),
                            agent_id=self.s.agent_id, region=self.region, declined=str(reason))
        self.mqtt.publish(topic, seal(pb.UPDATE_CHUNK, up, self.s.agent_id,
                                      self.keys.private_key, topic=topic))

    def _on_receipt(self, raw: bytes) -> None:
        rc = open_envelope(raw, pb.RECEIPT, self.keys.trust, max_bytes=1 << 20,
                           topic=self.t.receipts(self.region)).body
        if rc.region != self.region or rc.header.sender != self.region:
            raise InvalidMessage("unauthorized", f"receipt from {rc.header.sender!r}")
        if self.s.agent_id in rc.agents and self.pending.pop(rc.header.round, None) is not None:
            ACCEPTED.labels(SERVICE, "receipt").inc()
            log.info("%s: round %d receipted", self.s.agent_id, rc.header.round)

    async def run(self) -> None:
        serve(self.s.metrics_port, SERVICE, self.s.metrics_host)
        loop = asyncio.get_running_loop()
        self.mqtt = MqttLink(
            host=self.s.mqtt_host, port=self.s.mqtt_port,
            client_id=f"{self.s.namespace}-edge-{self.s.agent_id}",
            subscriptions=[self.t.model(self.region), self.t.receipts(self.region)],
            loop=loop, persistent=False, on_connect=self._republish,
            username=self.s.mqtt_username, password=self.s.mqtt_password,
            ca_file=self.s.mqtt_ca_file, tls=self.mqtt_tls,
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
                    if msg.topic == self.t.receipts(self.region):
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
