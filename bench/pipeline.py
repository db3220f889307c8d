"""Benchmark: the real pipeline over real Mosquitto and Kafka, encrypted vs plaintext.

One run, three parts, all traffic on 127.0.0.1:

1. End to end: a LocalStack (3 Mosquitto + 1 KRaft Kafka) and a real Federation (1 global, 3
   regional, 30 edge-agent processes, 10 per region) for a few rounds, once with CKKS and once in
   plaintext mode. Seconds per round come from the model versions' ``created_unix`` (round 1
   includes the agents' process start-up and JIT, so it is reported apart from the steady rounds).
   The end-to-end rounds run ``mlp_wide`` (MLP 64 -> 280 -> 280 -> 10 on digits, ~100k parameters).
2. Stages, measured from outside the services on the same brokers with the same code the services
   run: ``train_local`` and ``codec.encode`` (+ envelope signing) per agent, MQTT QoS 1 transfer
   of each update (publish -> subscriber), ``RegionalSum`` over 10 updates (with signature checks),
   Kafka transfer of a partial (idempotent ``acks=all`` produce -> ``read_committed`` consume) and
   ``GlobalRound.finish`` (decrypt + decode) of 3 partials, on the same ~100k-parameter model;
   the deltas are real local-training deltas of the 30 agents' shards.
3. ``regional_updates_per_s``: one ``regional_aggregator.cli`` process, fed 1M-parameter encrypted
   updates of N agents pre-encoded and signed in a separate publisher process; the clock runs from
   the first publish to the arrival of the region's partial on ``<ns>.partials``. Three rounds
   (fake signed model versions v0..v2 open them), the median is reported.

Usage:
    python bench/pipeline.py --json bench/results/pipeline.json [--rounds 4] [--throughput-agents 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import warnings
from pathlib import Path

import numpy as np

# Federation / LocalStack fork+exec their children after JAX is loaded here; exec makes it safe
warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

NUM_REGIONS = 3
AGENTS_PER_REGION = 10
NUM_AGENTS = NUM_REGIONS * AGENTS_PER_REGION
STAGE_MODEL = "mlp_wide"  # edge_agent.models: MLP 64 -> 280 -> 280 -> 10, ~100k parameters
STAGE_HIDDEN = 280
STAGES = ("train", "encode", "mqtt_transfer", "regional_sum", "kafka_transfer", "global_decode")
MODES = ("encrypted", "plaintext")
SEED = 0


# ------------------------------------------------------------------------------------------------
# helpers


def _median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def _mean(xs):
    return float(statistics.fmean(xs)) if xs else float("nan")


def _codec_params(encrypted: bool):
    from schemas.codec import CodecParams

    # what the global aggregator's CLI puts in the round task by default (bits 8, max_summands 64)
    return CodecParams(bits=8, max_summands=64, encrypted=encrypted)


class _MqttPair:
    """A publisher and a subscriber (QoS 1, paho threads) on one broker; counts arrivals by topic."""

    def __init__(self, host: str, port: int, sub_filter: str) -> None:
        import paho.mqtt.client as mqtt

        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.arrived: dict[str, int] = {}
        self.arrival_time: dict[str, float] = {}
        tag = uuid.uuid4().hex[:8]
        self.pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{tag}",
                               clean_session=True, protocol=mqtt.MQTTv311)
        self.sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{tag}",
                               clean_session=True, protocol=mqtt.MQTTv311)
        for c in (self.pub, self.sub):
            c.max_inflight_messages_set(0)
            c.max_queued_messages_set(0)
        subscribed = threading.Event()
        self.sub.on_subscribe = lambda *a: subscribed.set()
        self.sub.on_connect = lambda c, *a: c.subscribe(sub_filter, qos=1)
        self.sub.on_message = self._on_message
        self.sub.connect(host, port, keepalive=60)
        self.sub.loop_start()
        self.pub.connect(host, port, keepalive=60)
        self.pub.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError(f"MQTT subscribe on {host}:{port} timed out")

    def _on_message(self, client, userdata, msg) -> None:
        now = time.perf_counter()
        with self.cond:
            self.arrived[msg.topic] = self.arrived.get(msg.topic, 0) + 1
            self.arrival_time[msg.topic] = now
            self.cond.notify_all()

    def wait(self, want: dict[str, int], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while any(self.arrived.get(t, 0) < n for t, n in want.items()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"MQTT: only {self.arrived} of {want} arrived")
                self.cond.wait(left)

    def close(self) -> None:
        for c in (self.pub, self.sub):
            try:
                c.disconnect()
                c.loop_stop()
            except Exception:
                pass


# ------------------------------------------------------------------------------------------------
# part 2: stages


def measure_stages(stack, keys_dir: Path, progress, task) -> dict:
    """Per-stage seconds on the ~100k MLP, both modes, against the running brokers."""
    from edge_agent.models import make_spec
    from edge_agent.train import LocalTrainConfig, local_seed, train_local
    from global_aggregator.combine import GlobalRound
    from global_aggregator.datasets import TASKS, agent_dataset
    from global_aggregator.keygen import fleet
    from regional_aggregator.summing import RegionalSum
    from schemas import fedstream_pb2 as pb
    from schemas.codec import Codec, update_seed
    from schemas.keyring import Keyring
    from schemas.signing import TrustStore, header, load_private_key, open_envelope, seal
    from schemas.topics import Topics

    info = TASKS["digits"]
    cfg = LocalTrainConfig()  # the global CLI's defaults: sgd, lr 0.1, 1 epoch, batch 32
    regions = fleet(NUM_AGENTS, NUM_REGIONS)
    agents = [(r, a) for r, ags in regions.items() for a in ags]
    trust = TrustStore.load(keys_dir / "trust.json")
    keys = {a: load_private_key(keys_dir / "identities" / f"{a}.pem") for _, a in agents}
    region_keys = {r: load_private_key(keys_dir / "identities" / f"{r}.pem") for r in regions}
    pub_he = Keyring.load(keys_dir, "global", secret=False).he
    sec_he = Keyring.load(keys_dir, "global", secret=True).he
    out: dict = {"model": {}, "per_mode": {}}

    # -- train: every agent's shard, on the stage model and on the end-to-end model -------------
    train = {}
    deltas, sizes = [], []
    for model_name in (STAGE_MODEL, info.default_model):
        spec = make_spec(model_name, info.input_shape, info.num_classes)
        from edge_agent.models import init_params

        flat, _ = init_params(model_name, info.input_shape, info.num_classes, SEED)
        x, y, _, _ = agent_dataset("digits", 0, NUM_AGENTS, "dirichlet", 0.5, SEED)
        t0 = time.perf_counter()
        train_local(spec, flat, x, y, cfg, 0)  # JIT warm-up
        cold = time.perf_counter() - t0
        times = []
        for i, (_, a) in enumerate(agents):
            x, y, _, _ = agent_dataset("digits", i, NUM_AGENTS, "dirichlet", 0.5, SEED)
            t0 = time.perf_counter()
            delta, n, _ = train_local(spec, flat, x, y, cfg, local_seed(SEED, 1, a))
            times.append(time.perf_counter() - t0)
            if model_name == STAGE_MODEL:
                deltas.append(delta)
                sizes.append(n)
        train[model_name] = {"num_params": int(flat.size), "mean_s": _mean(times),
                             "median_s": _median(times), "first_call_with_jit_s": cold,
                             "samples_per_agent_mean": None}
        progress.advance(task)
    train[STAGE_MODEL]["samples_per_agent_mean"] = _mean(sizes)
    num_params = int(deltas[0].size)
    out["model"] = {"name": STAGE_MODEL, "kind": f"MLP(64 -> {STAGE_HIDDEN} -> {STAGE_HIDDEN} -> 10) "
                    "on digits (edge_agent.models), the same model the end-to-end rounds run",
                    "num_params": num_params, "deltas": "real train_local deltas of the 30 agents' "
                    "digits shards (Dirichlet 0.5, data seed 0)"}
    out["train_by_model"] = train

    ns = f"bench-stages-{uuid.uuid4().hex[:8]}"
    topics = Topics(ns)
    pairs = {r: _MqttPair(*stack.mqtt[r], f"{ns}/{r}/updates/+") for r in regions}
    try:
        for mode in MODES:
            enc = mode == "encrypted"
            params = _codec_params(enc)
            codec = Codec(params, num_params, pub_he if enc else None)
            gcodec = Codec(params, num_params, sec_he if enc else None)
            fp = pub_he.fingerprint
            res: dict = {"num_chunks": codec.num_chunks}

            # -- encode (+ sign the UpdateChunk envelopes, as the edge does) -------------------
            envs: dict[str, list[bytes]] = {}
            t_enc, t_sign = [], []
            for i, (r, a) in enumerate(agents):
                t0 = time.perf_counter()
                payloads = codec.encode(deltas[i], sizes[i], update_seed(SEED, 1, a))
                t1 = time.perf_counter()
                envs[a] = [seal(pb.UPDATE_CHUNK, pb.UpdateChunk(
                    header=header(a, 1, 0, fp, c, len(payloads)), agent_id=a, region=r,
                    payload=p, weight=codec.weight(sizes[i]) if c == 0 else 0), a, keys[a],
                    topic=f"{ns}/{r}/updates/{a}") for c, p in enumerate(payloads)]
                t_sign.append(time.perf_counter() - t1)
                t_enc.append(t1 - t0)
            res["encode"] = {"codec_encode_mean_s": _mean(t_enc), "sign_mean_s": _mean(t_sign),
                             "per_agent_s": _mean(t_enc) + _mean(t_sign)}
            res["update_bytes"] = int(_mean([sum(map(len, e)) for e in envs.values()]))
            progress.advance(task)

            # -- MQTT: each update alone (publish -> subscriber has every chunk) ----------------
            lat = []
            for _i, (r, a) in enumerate(agents):
                pair, topic = pairs[r], f"{ns}/{r}/updates/{a}"
                base = pair.arrived.get(topic, 0)
                t0 = time.perf_counter()
                for e in envs[a]:
                    pair.pub.publish(topic, e, qos=1)
                pair.wait({topic: base + len(envs[a])})
                lat.append(pair.arrival_time[topic] - t0)
            # ... and all 30 at once (10 per regional broker, the three brokers in parallel)
            want = {r: {f"{ns}/{r}/updates/{a}": pairs[r].arrived.get(f"{ns}/{r}/updates/{a}", 0)
                        + len(envs[a]) for a in regions[r]} for r in regions}
            t0 = time.perf_counter()
            for r, a in agents:
                for e in envs[a]:
                    pairs[r].pub.publish(f"{ns}/{r}/updates/{a}", e, qos=1)
            for r in regions:
                pairs[r].wait(want[r])
            burst = time.perf_counter() - t0
            res["mqtt"] = {"per_update_mean_s": _mean(lat), "per_update_median_s": _median(lat),
                           "updates": len(lat), "burst_30_updates_s": burst}
            progress.advance(task)

            # -- regional: verify 10 envelopes, RegionalSum of 10 updates, partial, sign --------
            partials: dict[str, list[bytes]] = {}
            reg = []
            for r, ags in regions.items():
                t0 = time.perf_counter()
                ups = [open_envelope(e, pb.UPDATE_CHUNK, trust, max_bytes=4 << 20,
                                     topic=f"{ns}/{r}/updates/{a}").body
                       for a in ags for e in envs[a]]
                t1 = time.perf_counter()
                rs = RegionalSum(codec, 1, expected=ags, min_group=2, region=r)
                for up in ups:
                    rs.add_chunk(up.agent_id, up.header.chunk_index, up.header.chunk_count,
                                 up.payload, weight=up.weight)
                t2 = time.perf_counter()
                groups = rs.groups()
                t3 = time.perf_counter()
                partials[r] = [seal(pb.PARTIAL_CHUNK, pb.PartialChunk(
                    header=header(r, 1, 0, fp, i, len(g.payloads)), region=r, agents=g.agents,
                    weights=g.weights, group=gi, group_count=len(groups), payload=p), r,
                    region_keys[r], topic=topics.partials)
                    for gi, g in enumerate(groups) for i, p in enumerate(g.payloads)]
                t4 = time.perf_counter()
                reg.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3))
            res["regional"] = {"verify_s": _mean([x[0] for x in reg]),
                               "add_s": _mean([x[1] for x in reg]),
                               "partial_serialize_s": _mean([x[2] for x in reg]),
                               "sign_s": _mean([x[3] for x in reg]),
                               "per_region_s": _mean([sum(x) for x in reg]),
                               "updates_per_region": AGENTS_PER_REGION}
            res["partial_bytes"] = int(_mean([sum(map(len, p)) for p in partials.values()]))
            progress.advance(task)

            # -- Kafka: each partial, produce (idempotent, acks=all) -> read_committed consume --
            res["kafka"] = asyncio.run(_kafka_transfer(stack.kafka_bootstrap, topics, partials))
            progress.advance(task)

            # -- global: add the 3 partials, then finish() = decrypt (CKKS) + decode + average --
            gr = GlobalRound(gcodec, 1, min_group=2)
            t0 = time.perf_counter()
            for r, chunks in partials.items():
                for raw in chunks:
                    part = open_envelope(raw, pb.PARTIAL_CHUNK, trust, max_bytes=16 << 20,
                                         topic=topics.partials).body
                    gr.add_partial(r, part.group, part.group_count, part.header.chunk_index,
                                   part.payload, list(part.agents), list(part.weights))
            t1 = time.perf_counter()
            result = gr.finish()
            avg, n = result.avg_delta, result.num_participants
            t2 = time.perf_counter()
            assert n == NUM_AGENTS and avg.shape == (num_params,)
            res["global"] = {"add_partials_s": t1 - t0, "finish_s": t2 - t1, "participants": n}
            progress.advance(task)

            res["stages_s"] = {
                "train": train[STAGE_MODEL]["mean_s"],
                "encode": res["encode"]["per_agent_s"],
                "mqtt_transfer": res["mqtt"]["per_update_mean_s"],
                "regional_sum": res["regional"]["per_region_s"],
                "kafka_transfer": res["kafka"]["per_partial_mean_s"],
                "global_decode": res["global"]["finish_s"],
            }
            res["per_round_work_s"] = {
                "train": NUM_AGENTS * res["stages_s"]["train"],
                "encode": NUM_AGENTS * res["stages_s"]["encode"],
                "mqtt_transfer": res["mqtt"]["burst_30_updates_s"],
                "regional_sum": NUM_REGIONS * res["stages_s"]["regional_sum"],
                "kafka_transfer": NUM_REGIONS * res["stages_s"]["kafka_transfer"],
                "global_decode": res["global"]["add_partials_s"] + res["global"]["finish_s"],
            }
            res["critical_path_s"] = (res["stages_s"]["train"] + res["stages_s"]["encode"]
                                      + res["mqtt"]["burst_30_updates_s"]
                                      + res["stages_s"]["regional_sum"]
                                      + res["stages_s"]["kafka_transfer"]
                                      + res["global"]["add_partials_s"] + res["global"]["finish_s"])
            out["per_mode"][mode] = res
    finally:
        for p in pairs.values():
            p.close()
    return out


async def _kafka_transfer(bootstrap: str, topics, partials: dict[str, list[bytes]],
                          repeats: int = 3) -> dict:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from schemas.kafka import CLIENT_SIZES, CONSUMER_SIZES, ensure_topics

    await ensure_topics(bootstrap, topics)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all",
                                **CLIENT_SIZES)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                isolation_level="read_committed", fetch_max_wait_ms=100,
                                **CONSUMER_SIZES)
    await producer.start()
    await consumer.start()
    tp = TopicPartition(topics.partials, 0)
    consumer.assign([tp])
    await consumer.seek_to_end(tp)
    await consumer.position(tp)
    times, produce = [], []
    try:
        # one warm-up send so connection set-up is not billed to the first partial
        await producer.send_and_wait(topics.partials, b"warm-up", key=b"warm-up")
        while not (await consumer.getmany(tp, timeout_ms=1000)).get(tp):
            pass
        for _ in range(repeats):
            for r, chunks in partials.items():
                t0 = time.perf_counter()
                for i, raw in enumerate(chunks):
                    await producer.send_and_wait(topics.partials, raw, key=f"1/{r}/{i}".encode())
                produce.append(time.perf_counter() - t0)
                got = 0
                while got < len(chunks):
                    batch = await consumer.getmany(tp, timeout_ms=1000)
                    got += len(batch.get(tp, []))
                times.append(time.perf_counter() - t0)
    finally:
        await consumer.stop()
        await producer.stop()
    return {"per_partial_mean_s": _mean(times), "per_partial_median_s": _median(times),
            "produce_acked_mean_s": _mean(produce), "samples": len(times)}


# ------------------------------------------------------------------------------------------------
# part 1: end to end


def bench_project(workdir: Path) -> tuple[Path, dict[str, str]]:
    """The digits example project with the stage model (~100k parameters) and 1 MiB chunks, as a
    project directory of its own, and the device data option that points at its data."""
    root = Path(__file__).resolve().parents[1] / "examples" / "digits"
    project = workdir / "project"
    project.mkdir(parents=True, exist_ok=True)
    if not (project / "digits_fl").exists():
        (project / "digits_fl").symlink_to(root / "digits_fl")
    (project / "fedstream.toml").write_text(
        f'name = "digits-bench"\nmodel = "edge_agent.models:{STAGE_MODEL}"\n'
        'input_shape = [8, 8, 1]\nmodel_options = { input_shape = [8, 8, 1], num_classes = 10 }\n'
        'loader = "npz"\nserver_eval = "digits_fl.data:server_eval"\n'
        '[federation.train]\noptimizer = "sgd"\nlr = 0.1\nepochs = 1\nbatch_size = 32\n'
        "[federation.codec]\nchunk_bytes = 1048576\n")
    from global_aggregator.keygen import fleet
    from schemas.project import load_project

    load_project(project)
    from digits_fl.data import make_data

    ids = [a for agents in fleet(NUM_AGENTS, NUM_REGIONS).values() for a in agents]
    make_data(ids, project / "data", seed=SEED)
    return project, {"path": str(project / "data" / "{device_id}.npz")}


def run_federation(stack, keys_dir: Path, workdir: Path, mode: str, rounds: int, progress,
                   task, timeout_s: float) -> dict:
    from compose.federation import Federation
    from global_aggregator.consumer import model_versions
    from global_aggregator.keygen import fleet
    from schemas.signing import TrustStore

    ns = f"bench-{mode}-{uuid.uuid4().hex[:8]}"
    project, data = bench_project(workdir)
    fed = Federation(
        mqtt=stack.mqtt, kafka=stack.kafka_bootstrap, keys_dir=keys_dir,
        fleet=fleet(NUM_AGENTS, NUM_REGIONS), workdir=workdir / f"logs-{mode}", namespace=ns,
        project=project, data=data,
        global_args=["--rounds", str(rounds), "--deadline-s", str(int(timeout_s)), "--grace-s", "2",
                     "--seed", str(SEED),
                     *(["--no-codec.encrypted"] if mode == "plaintext" else [])],
    )
    trust = TrustStore.load(keys_dir / "trust.json")
    versions = []

    async def watch():
        async for v in model_versions(stack.kafka_bootstrap, trust, namespace=ns):
            versions.append(v)
            progress.update(task, completed=len(versions) - 1,
                            description=f"end to end, {mode}: model v{v.version}")
            if v.final:
                return

    t_start = time.time()
    try:
        fed.start_all()
        try:
            asyncio.run(asyncio.wait_for(watch(), timeout_s))
        except TimeoutError:
            logs = "\n".join(f"== {n}\n{fed.log(n, 15)}" for n in list(fed.procs)[:5])
            raise RuntimeError(f"{mode} federation did not finish in {timeout_s}s "
                               f"({len(versions)} versions)\n{logs}") from None
    finally:
        fed.stop_all()
    created = [v.message.provenance.created_unix for v in versions]
    per_round = [b - a for a, b in zip(created, created[1:])]
    steady = per_round[1:]
    return {
        "namespace": ns,
        "model": versions[0].model_name,
        "num_params": int(versions[0].params.size),
        "rounds": len(per_round),
        "seconds_per_round": per_round,
        "first_round_s": per_round[0],
        "steady_rounds_mean_s": _mean(steady),
        "steady_rounds_median_s": _median(steady),
        "start_to_v0_s": created[0] - t_start,
        "wall_s": time.time() - t_start,
        "participants_per_round": [int(v.metrics.get("participants", 0)) for v in versions[1:]],
        "update_bytes_per_round": [int(v.metrics.get("update_bytes", 0)) for v in versions[1:]],
        "final_server_accuracy": versions[-1].metrics.get("server_accuracy"),
    }


# ------------------------------------------------------------------------------------------------
# part 3: one regional aggregator's ingest rate


def _publisher(conn, keys_dir: str, region: str, agents: list[str], host: str, port: int,
               ns: str, num_params: int, fp: str, rounds: int) -> None:
    """Separate process: pre-encode one update per agent and sign its chunk envelopes for every
    round, then publish one round's envelopes on each "go" (QoS 1) and report the timings."""
    import paho.mqtt.client as mqtt

    from schemas import fedstream_pb2 as pb
    from schemas.codec import Codec, update_seed
    from schemas.he import HEContext
    from schemas.signing import header, load_private_key, seal
    from schemas.topics import Topics

    kd = Path(keys_dir)
    he = HEContext.from_bytes((kd / "he" / "public.ctx").read_bytes())
    codec = Codec(_codec_params(True), num_params, he)
    rng = np.random.default_rng(SEED)
    t0 = time.perf_counter()
    per_round: list[list[tuple[str, bytes]]] = [[] for _ in range(rounds)]
    for a in agents:
        key = load_private_key(kd / "identities" / f"{a}.pem")
        delta = rng.normal(0.0, 0.01, num_params).astype(np.float32)
        payloads = codec.encode(delta, 100, update_seed(SEED, 1, a))
        topic = Topics(ns).update(region, a)
        for r in range(rounds):  # the payload carries no round id; the signed header does
            for c, p in enumerate(payloads):
                up = pb.UpdateChunk(header=header(a, r + 1, r, fp, c, len(payloads)),
                                    agent_id=a, region=region, payload=p,
                                    weight=codec.weight(100) if c == 0 else 0)
                per_round[r].append((topic, seal(pb.UPDATE_CHUNK, up, a, key, topic=topic)))
    encode_s = time.perf_counter() - t0
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-feeder-{os.getpid()}",
                         clean_session=True, protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)
    client.connect(host, port, keepalive=120)
    client.loop_start()
    conn.send({"ready": True, "encode_and_sign_s": encode_s, "messages": len(per_round[0]),
               "chunks_per_update": codec.num_chunks,
               "bytes": sum(len(m) for _, m in per_round[0])})
    try:
        for msgs in per_round:
            if conn.recv() != "go":
                break
            t_first = time.time()
            infos = [client.publish(t, m, qos=1) for t, m in msgs]
            for i in infos:
                i.wait_for_publish(300)
            conn.send({"t_first_publish": t_first, "t_all_acked": time.time()})
    except EOFError:
        pass
    finally:
        client.disconnect()
        client.loop_stop()
        conn.close()


def _count_saves(log: Path) -> int:
    try:
        return log.read_text(errors="replace").count("Saving in-memory database")
    except OSError:
        return -1


def measure_regional_throughput(workdir: Path, n_agents: int, num_params: int, mv_params: str,
                                progress, task, rounds: int = 3,
                                timeout_s: float = 240.0, autosave_seconds: int = 0) -> dict:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from compose.federation import Federation
    from compose.localstack import LocalStack, free_port
    from global_aggregator.keygen import fleet, write_keys
    from schemas import fedstream_pb2 as pb
    from schemas.kafka import CLIENT_SIZES, CONSUMER_SIZES, ensure_topics
    from schemas.keyring import GLOBAL_ID, Keyring
    from schemas.signing import TrustStore, header, open_envelope, seal
    from schemas.task import codec_spec
    from schemas.topics import Topics

    region = "region-0"
    model = "synthetic_1m"
    ns = f"bench-regional-{uuid.uuid4().hex[:8]}"
    topics = Topics(ns)
    keys_dir = workdir / "keys-regional"
    write_keys(keys_dir, n_agents, 1)
    trust = TrustStore.load(keys_dir / "trust.json")
    agents = trust.names(role="agent", region=region)
    glob = Keyring.load(keys_dir, GLOBAL_ID)
    fp = glob.he.fingerprint
    stack = LocalStack([region], workdir / f"stack-regional-{autosave_seconds}",
                       mqtt_autosave_seconds=autosave_seconds)
    fed = None
    proc = None
    parent = None
    metrics_port = free_port()

    def model_version(round_id: int) -> bytes:
        """A signed ModelVersion v(round-1) whose task opens ``round_id`` for every agent."""
        task_pb = pb.RoundTask(
            round=round_id, model_version=round_id - 1, codec=codec_spec(_codec_params(True)),
            train=pb.TrainSpec(optimizer="sgd", lr=0.1, epochs=1, batch_size=32),
            deadline_unix=time.time() + 3600, min_participants=1, he_fingerprint=fp, seed=SEED,
            selected_agents=[], model_name=model, task_name="digits")
        params = np.zeros(num_params, "<f4").tobytes() if mv_params == "zeros" else b""
        mv = pb.ModelVersion(header=header(GLOBAL_ID, round_id - 1, round_id - 1, fp),
                             model_name=model, num_params=num_params, params=params,
                             provenance=pb.Provenance(round=round_id - 1, strategy="fedavg",
                                                      created_unix=time.time()),
                             final=False)
        mv.next_task.CopyFrom(task_pb)
        return seal(pb.MODEL_VERSION, mv, GLOBAL_ID, glob.private_key, topic=topics.models)

    async def publish_model(raw: bytes) -> None:
        await ensure_topics(stack.kafka_bootstrap, topics)
        p = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, acks="all", **CLIENT_SIZES)
        await p.start()
        try:
            await p.send_and_wait(topics.models, raw, key=model.encode())
        finally:
            await p.stop()

    def wait_round_open(round_id: int) -> None:
        deadline = time.monotonic() + 120
        want = f"round {round_id} on model v{round_id - 1}"
        while want not in fed.log(region, 400) or "regional aggregator up" not in fed.log(region, 400):
            if not fed.alive(region) or time.monotonic() > deadline:
                raise RuntimeError(f"regional aggregator did not open round {round_id}:\n"
                                   f"{fed.log(region)}")
            time.sleep(0.1)

    async def one_round(round_id: int):
        consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap,
                                    enable_auto_commit=False, isolation_level="read_committed",
                                    fetch_max_wait_ms=100, **CONSUMER_SIZES)
        await consumer.start()
        tp = TopicPartition(topics.partials, 0)
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        await consumer.position(tp)
        try:
            parent.send("go")
            seen, want, t_partial, ts_ms, covered = set(), None, None, None, []
            end = time.monotonic() + timeout_s
            while want is None or len(seen) < want:
                if time.monotonic() > end:
                    raise TimeoutError(f"round {round_id}: no complete partial after {timeout_s}s "
                                       f"({len(seen)} chunks); regional log:\n{fed.log(region, 20)}")
                batch = await consumer.getmany(tp, timeout_ms=500)
                for rec in batch.get(tp, []):
                    part = open_envelope(rec.value, pb.PARTIAL_CHUNK, trust,
                                         max_bytes=16 << 20, topic=topics.partials).body
                    if part.header.round != round_id:
                        continue
                    if (part.group, part.header.chunk_index) not in seen:
                        covered += list(part.agents) if part.header.chunk_index == 0 else []
                    seen.add((part.group, part.header.chunk_index))
                    want = part.header.chunk_count * max(1, part.group_count)
                    t_partial, ts_ms = time.time(), rec.timestamp
            return t_partial, ts_ms, want, covered
        finally:
            await consumer.stop()

    try:
        stack.start()
        progress.update(task, description="regional ingest: brokers up, pre-encoding")
        # the publisher pre-encodes while the regional aggregator starts
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_publisher, args=(child, str(keys_dir), region, agents,
                                                    *stack.mqtt[region], ns, num_params, fp,
                                                    rounds), daemon=True)
        proc.start()
        asyncio.run(publish_model(model_version(1)))
        fed = Federation(mqtt=stack.mqtt, kafka=stack.kafka_bootstrap, keys_dir=keys_dir,
                         fleet=fleet(n_agents, 1), workdir=workdir / "logs-regional",
                         namespace=ns, regional_args=["--model", model, "--metrics-port",
                                                      str(metrics_port)])
        fed.start(region)
        wait_round_open(1)
        if not parent.poll(300):
            raise RuntimeError("publisher did not finish pre-encoding")
        ready = parent.recv()
        samples = []
        for r in range(1, rounds + 1):
            if r > 1:
                asyncio.run(publish_model(model_version(r)))
                wait_round_open(r)
            time.sleep(1.0)  # let the regional's subscription / round settle
            progress.update(task, description=f"regional ingest: round {r}/{rounds}, {n_agents} x "
                            f"{num_params:,}-param updates in flight")
            t_partial, ts_ms, chunks, covered = asyncio.run(one_round(r))
            pub = parent.recv() if parent.poll(60) else {}
            t0 = pub["t_first_publish"]
            secs = t_partial - t0
            samples.append({
                "round": r, "seconds_first_publish_to_partial": secs,
                "seconds_first_publish_to_all_pubacks": pub["t_all_acked"] - t0,
                "seconds_partial_kafka_timestamp_minus_first_publish": ts_ms / 1000.0 - t0,
                "seconds_last_puback_to_partial": t_partial - pub["t_all_acked"],
                "partial_chunks": chunks, "partial_agents": len(covered),
                "updates_per_s": n_agents / secs,
            })
            if len(covered) != n_agents:
                raise RuntimeError(f"round {r}: partial covers {len(covered)} agents, "
                                   f"expected {n_agents}")
            progress.update(task, completed=r)
        metrics = {}
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                          timeout=5).read().decode()
            for line in text.splitlines():
                if line.startswith(("fedstream_rejected_total", "fedstream_accepted_total",
                                    "fedstream_bytes_total", "fedstream_kafka_retries_total")):
                    k, v = line.rsplit(" ", 1)
                    metrics[k] = float(v)
        except OSError:
            pass
        ups = [s["updates_per_s"] for s in samples]
        secs = [s["seconds_first_publish_to_partial"] for s in samples]
        acks = [s["seconds_first_publish_to_all_pubacks"] for s in samples]
        return {
            "agents": n_agents, "num_params": num_params, "codec": "CKKS, 8-bit, max_summands 64",
            "chunks_per_update": ready["chunks_per_update"],
            "update_bytes": ready["bytes"] // n_agents,
            "total_bytes_per_round": ready["bytes"],
            "pre_encode_and_sign_s_excluded": ready["encode_and_sign_s"],
            "rounds": samples,
            "updates_per_s": _median(ups),
            "updates_per_s_min_max": [min(ups), max(ups)],
            "seconds_first_publish_to_partial_median": _median(secs),
            "seconds_first_publish_to_all_pubacks_median": _median(acks),
            "updates_per_s_round1_fresh_broker": ups[0],
            "model_version_params": mv_params,
            "mosquitto_db_saves": _count_saves(stack.workdir / "mosquitto" / region / "mosquitto.log"),
            "regional_metrics": metrics,
        }
    finally:
        if parent is not None:
            parent.close()
        if proc is not None:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        if fed is not None:
            fed.stop_all()
        stack.stop()


# ------------------------------------------------------------------------------------------------
# report


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = result["stages"]["per_mode"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    x = np.arange(len(STAGES))
    w = 0.38
    for ax, key, title in ((axes[0], "stages_s", "per unit (agent / update / region / partial / round)"),
                           (axes[1], "per_round_work_s", "per round, whole federation (30 agents, 3 regions)")):
        for k, mode in enumerate(MODES):
            vals = [st[mode][key][s] for s in STAGES]
            bars = ax.bar(x + (k - 0.5) * w, vals, w, label=mode,
                          color=("#c0392b", "#2980b9")[k])
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v * 1e3:.0f}" if v < 1 else f"{v:.1f}s",
                        ha="center", va="bottom", fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(x, [s.replace("_", "\n") for s in STAGES], fontsize=8)
        ax.set_ylabel("seconds (log; labels in ms below 1 s)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    m = result["stages"]["model"]
    rr = result["rounds"]
    fig.suptitle(f"fedstream stages on a {m['num_params']:,}-param MLP; end-to-end steady round "
                 f"({rr['encrypted']['model']}, {rr['encrypted']['num_params']:,} params): "
                 f"{rr['encrypted']['steady_rounds_mean_s']:.2f} s encrypted, "
                 f"{rr['plaintext']['steady_rounds_mean_s']:.2f} s plaintext", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_tables(console: Console, result: dict) -> None:
    rr = result["rounds"]
    t = Table(title=f"end to end: {NUM_REGIONS} regions x {AGENTS_PER_REGION} agents, "
              f"{rr['encrypted']['model']} ({rr['encrypted']['num_params']:,} params), "
              "separate processes, real brokers")
    t.add_column("seconds / round", no_wrap=True)
    for c in ("encrypted", "plaintext", "enc / plain"):
        t.add_column(c, justify="right")
    for key, label in (("steady_rounds_mean_s", "steady rounds (mean)"),
                       ("steady_rounds_median_s", "steady rounds (median)"),
                       ("first_round_s", "round 1 (incl. agent start-up)"),
                       ("start_to_v0_s", "start -> model v0"),
                       ("wall_s", "wall, whole run")):
        e, p = rr["encrypted"][key], rr["plaintext"][key]
        t.add_row(label, f"{e:.3f}", f"{p:.3f}", f"{e / p:.2f}")
    e, p = rr["encrypted"]["update_bytes_per_round"][-1], rr["plaintext"]["update_bytes_per_round"][-1]
    t.add_row("update MB / round (MQTT in)", f"{e / 1e6:.2f}", f"{p / 1e6:.2f}", f"{e / p:.2f}")
    console.print(t)

    st = result["stages"]["per_mode"]
    m = result["stages"]["model"]
    t = Table(title=f"stages on a {m['num_params']:,}-param MLP (measured outside the services, "
              "same code, same brokers)")
    t.add_column("stage", no_wrap=True)
    t.add_column("unit", no_wrap=True)
    for c in ("enc s/unit", "plain s/unit", "ratio", "enc s/round", "plain s/round"):
        t.add_column(c, justify="right")
    units = {"train": "per agent", "encode": "per agent (+sign)", "mqtt_transfer": "per update",
             "regional_sum": "per region (10, +verify)", "kafka_transfer": "per partial",
             "global_decode": "per round (finish)"}
    for s in STAGES:
        e, p = st["encrypted"]["stages_s"][s], st["plaintext"]["stages_s"][s]
        er, pr = st["encrypted"]["per_round_work_s"][s], st["plaintext"]["per_round_work_s"][s]
        t.add_row(s, units[s], f"{e:.4f}", f"{p:.4f}", f"{e / p:.1f}", f"{er:.3f}", f"{pr:.3f}")
    e, p = st["encrypted"]["critical_path_s"], st["plaintext"]["critical_path_s"]
    t.add_row("critical path", "1 agent -> round", f"{e:.3f}", f"{p:.3f}", f"{e / p:.1f}", "", "")
    e, p = st["encrypted"]["update_bytes"], st["plaintext"]["update_bytes"]
    t.add_row("update size", "bytes", f"{e:,}", f"{p:,}", f"{e / p:.1f}", "", "")
    console.print(t)

    rt = result["regional_throughput"]
    t = Table(title="one regional aggregator process, 1M-param CKKS updates from another process")
    t.add_column("metric", no_wrap=True)
    t.add_column("value", justify="right")
    t.add_row("updates", f"{rt['agents']} x {rt['num_params']:,} params "
              f"({rt['chunks_per_update']} chunks, {rt['update_bytes'] / 1e6:.2f} MB each)")
    t.add_row("rounds measured", str(len(rt["rounds"])))
    t.add_row("first publish -> all PUBACKs (s, median)",
              f"{rt['seconds_first_publish_to_all_pubacks_median']:.2f}")
    t.add_row("first publish -> partial on Kafka (s, per round)",
              ", ".join(f"{s['seconds_first_publish_to_partial']:.2f}" for s in rt["rounds"]))
    t.add_row("last PUBACK -> partial (s, per round)",
              ", ".join(f"{s['seconds_last_puback_to_partial']:.2f}" for s in rt["rounds"]))
    t.add_row("Mosquitto db saves during the test", str(rt["mosquitto_db_saves"]))
    t.add_row("regional_updates_per_s (median, Mosquitto autosave 1 s)",
              f"{result['regional_updates_per_s']:.2f}")
    other = result["regional_updates_per_s_by_mosquitto_autosave"]["autosave_every_change"]
    t.add_row("  same, Mosquitto saving after every change", f"{other:.2f}")
    t.add_row("  ratio 1 s / every change",
              f"{result['regional_updates_per_s_ratio_1s_vs_every_change']:.1f}")
    t.add_row("  min / max", "{:.2f} / {:.2f}".format(*rt["updates_per_s_min_max"]))
    t.add_row("MB/s ingested (median)", f"{rt['total_bytes_per_round'] / 1e6 / rt['seconds_first_publish_to_partial_median']:.1f}")
    t.add_row("pre-encode + sign, all rounds (excluded, s)", f"{rt['pre_encode_and_sign_s_excluded']:.1f}")
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True, help="where to write the results")
    ap.add_argument("--rounds", type=int, default=4, help="end-to-end rounds per mode (>= 2)")
    ap.add_argument("--throughput-agents", type=int, default=32)
    ap.add_argument("--throughput-params", type=int, default=1_000_000)
    ap.add_argument("--throughput-rounds", type=int, default=3,
                    help="rounds of N updates fed to the regional aggregator (median reported)")
    ap.add_argument("--mv-params", choices=("zeros", "empty"), default="zeros",
                    help="params field of the fake 1M-param model version (zeros: a real 4 MB "
                    "model version relayed to MQTT; empty: only num_params is set)")
    ap.add_argument("--round-timeout", type=float, default=300.0)
    ap.add_argument("--skip-e2e", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rounds < 2:
        ap.error("--rounds must be at least 2 (round 1 includes start-up)")

    from compose.localstack import LocalStack
    from global_aggregator.keygen import write_keys

    console = Console(width=max(Console().width, 130))
    workdir = Path(tempfile.mkdtemp(prefix="fedstream-bench-pipeline-"))
    t_all = time.time()
    result: dict = {
        "benchmark": "pipeline",
        "config": {
            "regions": NUM_REGIONS, "agents_per_region": AGENTS_PER_REGION,
            "e2e_rounds_per_mode": args.rounds, "codec_bits": 8, "max_summands": 64,
            "local_training": "sgd lr 0.1, 1 epoch, batch 32 (the bench project's)",
            "partition": "dirichlet alpha 0.5, data seed 0", "seed": SEED,
            "throughput_agents": args.throughput_agents,
            "throughput_params": args.throughput_params,
            "machine": {"python": platform.python_version(), "processor": platform.machine(),
                        "cpus": os.cpu_count()},
        },
    }
    stack = LocalStack([f"region-{r}" for r in range(NUM_REGIONS)], workdir / "stack")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=console) as progress:
        try:
            t = progress.add_task("starting 3 Mosquitto + KRaft Kafka", total=1)
            stack.start()
            keys_dir = workdir / "keys"
            write_keys(keys_dir, NUM_AGENTS, NUM_REGIONS)
            progress.update(t, completed=1)

            t = progress.add_task("stages (train, encode, MQTT, regional, Kafka, global)",
                                  total=2 + 5 * len(MODES))
            result["stages"] = measure_stages(stack, keys_dir, progress, t)

            result["rounds"] = {}
            if not args.skip_e2e:
                for mode in MODES:
                    t = progress.add_task(f"end to end, {mode}", total=args.rounds)
                    result["rounds"][mode] = run_federation(
                        stack, keys_dir, workdir, mode, args.rounds, progress, t,
                        timeout_s=args.round_timeout * args.rounds)
                e, p = result["rounds"]["encrypted"], result["rounds"]["plaintext"]
                result["rounds"]["ratio"] = {
                    k: e[k] / p[k] for k in ("steady_rounds_mean_s", "steady_rounds_median_s",
                                             "first_round_s")
                }
                result["rounds"]["ratio"]["update_bytes"] = (
                    e["update_bytes_per_round"][-1] / p["update_bytes_per_round"][-1])
        finally:
            stack.stop()
        ingest = {}
        for label, seconds in (("autosave_1s", 1), ("autosave_every_change", 0)):
            t = progress.add_task(f"regional ingest, Mosquitto {label}",
                                  total=args.throughput_rounds)
            ingest[label] = measure_regional_throughput(
                workdir, args.throughput_agents, args.throughput_params, args.mv_params, progress,
                t, rounds=args.throughput_rounds, autosave_seconds=seconds)
        rt = ingest["autosave_1s"]
    st = result["stages"]["per_mode"]
    result["stages"]["ratio"] = {s: st["encrypted"]["stages_s"][s] / st["plaintext"]["stages_s"][s]
                                 for s in STAGES}
    result["regional_throughput"] = rt
    result["regional_throughput_autosave_every_change"] = ingest["autosave_every_change"]
    result["regional_updates_per_s"] = rt["updates_per_s"]
    result["regional_updates_per_s_by_mosquitto_autosave"] = {
        k: v["updates_per_s"] for k, v in ingest.items()}
    result["regional_updates_per_s_ratio_1s_vs_every_change"] = (
        rt["updates_per_s"] / ingest["autosave_every_change"]["updates_per_s"])
    result["notes"] = [
        f"The end-to-end rounds and the stages both run {STAGE_MODEL} "
        f"({result['stages']['model']['num_params']} parameters).",
        "Stage 'train' is the same measurement in both modes (training does not depend on the codec).",
        "Stage 'encode' includes Ed25519 signing of the UpdateChunk envelopes; 'regional_sum' "
        "includes verifying the 10 envelopes, RegionalSum.add_chunk, partial() and signing; "
        "'global_decode' is GlobalRound.finish() (decrypt + decode + average); adding the 3 "
        "partials is stages.per_mode.*.global.add_partials_s.",
        "'mqtt_transfer' per unit = one update published QoS 1 and fully received by a subscriber, "
        "alone; per round = all 30 updates at once to the 3 brokers.",
        "per_round_work_s is the work one round puts on the federation (30 agents' train+encode etc.); "
        "on this 2-core host the 30 agent processes share the cores, so it is comparable with the "
        "end-to-end seconds per round, while critical_path_s assumes every agent has its own device.",
        f"regional ingest: the fake model version's params field is '{args.mv_params}' "
        f"(num_params = {args.throughput_params:,} either way).",
        "regional_updates_per_s is the median over regional_throughput.rounds (clock: first publish "
        "-> partial on Kafka). seconds_first_publish_to_all_pubacks shows how long Mosquitto took "
        "to accept the updates; seconds_last_puback_to_partial is what the regional aggregator "
        "needed after that. Headline: Mosquitto saving its db at most once a second "
        "(autosave_interval 1, the setting fedstream recommends: edges keep updates until "
        "receipted and regions republish retained state, so a broker crash loses nothing). "
        "Beside it, saving after every change, which rewrites the whole db each time "
        "(mosquitto_db_saves).",
    ]
    result["wall_s"] = time.time() - t_all
    print_tables(console, result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    png = args.json.with_suffix(".png")
    plot(result, png)
    console.print(f"wrote {args.json} and {png} in {result['wall_s']:.0f} s")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
