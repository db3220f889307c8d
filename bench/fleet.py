"""Fleet scale: ingest rate, synchronous rounds at 1k / 10k / 100k enrolled devices, stage costs.

Real brokers (``LocalStack``: one Mosquitto per region, a KRaft Kafka), the real regional
aggregators and the real global aggregator as processes (``compose.federation.Federation`` with
no edge-agent processes); the fleet is ``fedstream-loadgen`` (``edge_agent/loadgen.py``): every
device an enrolled identity with its own seed-derived Ed25519 key, publishing real, signed,
CKKS-encrypted update chunks. The model is the iot-anomaly example's 1-D conv net with 37 channels
(8,181 parameters: the largest that still fits one CKKS ciphertext per update at 10,000 summands);
the codec is the default one (3 bits, rotation, encrypted) with ``max_summands`` = the most
updates a round sums.

Parts (all by default; pick with ``--parts``):

- ``stages``: micro-benchmarks of each stage on real payloads (encode, seal, open_envelope,
  verify_chunk, Accumulator add, global decode, the regional completeness check, trust-store
  load, Mosquitto fan-in, Kafka produce),
- ``ingest``: accepted updates per second through ONE regional aggregator (every update signed
  before the first is published, so the region, not the sender, sets the pace; read from the
  region's ``fedstream_accepted_total``), and through ``--replicas N`` replicas of the region
  (``--replica r0`` ...: an MQTT v5 shared subscription deals the updates),
- ``sync``: synchronous rounds with 4 regions and 10 % of the fleet sampled per round: seconds per
  round (between consecutive model versions, rounds 2.., so start-up is left out), the regions'
  and the global's peak RSS (``VmHWM``), CPU seconds per process,
- ``tta``: synchronous rounds against FedBuff on the real services with 12 digits edge agents
  whose updates wait a heavy-tailed, seeded time (``--delay pareto:SCALE:ALPHA``): wall seconds
  to a target server accuracy, same devices, data, seed and delays.

Goals it reports against: 100,000 devices in 4 regions, 10,000 updates per round, each round
<= 15 s; a region's peak RSS at 100,000 devices within 20 % of its RSS at 1,000.

    python bench/fleet.py --json bench/results/fleet.json           # everything (~30 min)
    python bench/fleet.py --quick --json /tmp/fleet.json            # a few minutes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compose.federation import Federation  # noqa: E402
from compose.localstack import LocalStack, free_port  # noqa: E402
from edge_agent.loadgen import (  # noqa: E402
    Connection,
    device_key,
    device_names,
    make_fleet_keys,
    peak_rss_mib,
)
from global_aggregator.consumer import model_versions  # noqa: E402
from schemas.cli import terminate_child  # noqa: E402
from schemas.project import contiguous_fleet  # noqa: E402
from schemas.signing import TrustStore  # noqa: E402
from schemas.telemetry import scrape  # noqa: E402

console = Console()
CHANNELS = 37
REGIONS = 4
SEED = "fleet-bench"
GOAL_S_PER_ROUND = 15.0
GOAL_RSS_RATIO = 1.2


# -- set-up ------------------------------------------------------------------------------------


def write_project(out: Path, channels: int, max_summands: int) -> Path:
    """A copy of examples/iot-anomaly with a wider model and the fleet's codec."""
    src = ROOT / "examples" / "iot-anomaly"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "iot_anomaly", out / "iot_anomaly", dirs_exist_ok=True)
    (out / "pyproject.toml").write_text(f"""\
[project]
name = "fleet-bench"
version = "0.1.0"
requires-python = ">=3.11"

[tool.fedstream]
model = "iot_anomaly.model:make_model"
input_shape = [32, 6]
model_options = {{ num_classes = 4, channels = {channels} }}
loss = "softmax_cross_entropy"
metrics = ["accuracy"]
loader = "csv"

[tool.fedstream.loader_options]
path = "data/{{device_id}}.csv"
label = "fault"
window = 32
stride = 16
test_fraction = 0.2

[tool.fedstream.federation]
rounds = 4

[tool.fedstream.federation.codec]
max_summands = {max_summands}
""")
    return out


def num_params(channels: int, sensors: int = 6, classes: int = 4, kernel: int = 5) -> int:
    """Parameters of iot_anomaly's ConvClassifier (conv, conv, linear, with biases)."""
    return (kernel * sensors * channels + channels + kernel * channels * channels + channels
            + channels * classes + classes)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far (None if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def accepted_updates(metrics: dict) -> float:
    return metrics.get(("fedstream_accepted_total", (("kind", "update_chunk"),
                                                     ("service", "regional"))), 0.0)


def loadgen_cmd(keys: Path, mqtt: dict[str, tuple[str, int]], namespace: str, out: Path,
                *extra: str) -> list[str]:
    brokers = [a for r, (h, p) in mqtt.items() for a in ("--mqtt", f"{r}={h}:{p}")]
    return [sys.executable, "-m", "edge_agent.loadgen", "run", "--keys", str(keys), "--seed",
            SEED, "--namespace", namespace, *brokers, "--json", str(out), "--quiet", *extra]


def spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu"),
                                start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    terminate_child(proc, timeout)


# -- stages --------------------------------------------------------------------------------------


def _timeit(fn, n: int) -> float:
    """Seconds per call of ``fn(i)`` over ``n`` calls."""
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) / n


def _trust_load_probe(path: Path, region: str | None = None) -> dict[str, float]:
    """Time and peak-RSS growth of a trust-store load in a fresh process: the whole fleet (the
    global's) or one region's devices (``region``: what a regional aggregator keeps)."""
    scope = "ALL_AGENTS" if region is None else f"AgentScope.of_region({region!r})"
    code = (
        "import time,json,sys\n"
        "from pathlib import Path\n"
        "def rss(k='VmHWM'):\n"
        "    return int([l for l in open('/proc/self/status') if l.startswith(k)][0]"
        ".split()[1]) / 1024\n"
        "from schemas.signing import ALL_AGENTS, AgentScope, TrustStore\n"
        "r0 = rss(); t0 = time.perf_counter()\n"
        f"ts = TrustStore.load(Path({str(path)!r}), scope={scope})\n"
        "t1 = time.perf_counter(); names = ts.names(role='agent', region='region-0')\n"
        "t2 = time.perf_counter()\n"
        "print(json.dumps({'identities': len(ts.names()), 'load_s': t1 - t0,"
        " 'names_s': t2 - t1, 'rss_mib': rss() - r0}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def stages(stack: LocalStack, wd: Path, params: int, max_summands: int, quick: bool,
           trust_files: dict[int, Path]) -> dict[str, Any]:
    """Per-stage costs on real payloads (see the module docstring)."""
    import numpy as np

    from schemas import fedstream_pb2 as pb
    from schemas.accumulator import Accumulator
    from schemas.codec import Codec, CodecParams
    from schemas.he import HEContext, generate_keys
    from schemas.kafka import KafkaConn, ensure_topics
    from schemas.signing import Identity, header, open_envelope, seal
    from schemas.topics import Topics
    from schemas.verify import verify_chunk

    n = 40 if quick else 200
    secret_raw, public_raw = generate_keys()
    pub, sec = HEContext.from_bytes(public_raw), HEContext.from_bytes(secret_raw)
    cp = CodecParams(max_summands=max_summands).for_round(0, 1)
    codec, dcodec = Codec(cp, params, pub), Codec(cp, params, sec)
    rng = np.random.default_rng(0)
    deltas = [rng.normal(0, 0.02, params).astype(np.float32) for _ in range(4)]
    t0 = time.perf_counter()
    payloads = [codec.encode(deltas[i % 4], 100, i) for i in range(8)]
    encode_s = (time.perf_counter() - t0) / 8
    names = device_names(n)
    keys = {d: device_key(SEED, d) for d in names}
    trust = TrustStore({d: Identity(d, "agent", "region-0", k.public_key())
                        for d, k in keys.items()})
    ns = "stage"
    t = Topics(ns)

    def sealed(i: int) -> bytes:
        d = names[i % n]
        up = pb.UpdateChunk(header=header(d, 1, 0, pub.fingerprint, 0, 1), agent_id=d,
                            region="region-0", payload=payloads[i % 8][0], weight=96)
        return seal(pb.UPDATE_CHUNK, up, d, keys[d], topic=t.update("region-0", d))

    seal_s = _timeit(sealed, n)
    msgs = [sealed(i) for i in range(n)]
    open_s = _timeit(lambda i: open_envelope(msgs[i], pb.UPDATE_CHUNK, trust, max_bytes=4 << 20,
                                             topic=t.update("region-0", names[i])), n)
    verify_s = _timeit(lambda i: verify_chunk(codec, payloads[i % 8][0], index=0, summands=1), n)
    acc = Accumulator(codec)

    def verify_add(i: int) -> None:
        acc.add([verify_chunk(codec, payloads[i % 8][0], index=0, summands=1)])

    verify_add_s = _timeit(verify_add, n)
    total = Accumulator(dcodec)
    for i in range(16):
        total.add([verify_chunk(dcodec, payloads[i % 8][0], index=0, summands=1)])
    decode_s = _timeit(lambda i: total.decode(), 5)

    # the regional completeness check AS IT WAS before this benchmark found it, once per accepted
    # update (``set(r.summer.agents) >= r.expected``, ``agents`` = ``sorted(folded)``); the
    # service now compares two counts (``_Round.all_in``), O(1): kept to show what it cost
    def completeness_round(m: int) -> float:
        expected = {f"dev-{i:06d}" for i in range(m)}
        folded: set[str] = set()
        t0 = time.perf_counter()
        for d in sorted(expected):
            folded.add(d)
            _ = set(sorted(folded)) >= expected
        return time.perf_counter() - t0

    check = {str(m): completeness_round(m) for m in ((250, 1000) if quick else (250, 2500, 5000))}

    # Mosquitto fan-in: 4 publishing connections, 1 QoS 1 subscriber, update-sized messages
    host, port = stack.mqtt["region-0"]
    m = 500 if quick else 3000
    payload = msgs[0]

    async def fan_in() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        got = asyncio.Event()
        count = [0, 0.0]

        def on_msg(topic: str, raw: bytes) -> None:
            count[0] += 1
            if count[0] == m:
                count[1] = time.perf_counter()
                got.set()

        sub = Connection(host, port, f"bench-sub-{uuid.uuid4().hex[:6]}", loop,
                         subscriptions=["benchfanin/#"], on_message=on_msg)
        pubs = [Connection(host, port, f"bench-pub-{i}-{uuid.uuid4().hex[:6]}", loop)
                for i in range(4)]
        for c in (sub, *pubs):
            c.start()
        for c in (sub, *pubs):
            await asyncio.wait_for(c.connected.wait(), 10)
        await asyncio.sleep(0.3)
        t0 = time.perf_counter()
        for i in range(m):
            await pubs[i % 4].publish(f"benchfanin/{i % 997}", payload)
        await asyncio.wait_for(got.wait(), 300)
        for c in (sub, *pubs):
            c.stop()
        dt = count[1] - t0
        return {"messages_per_s": m / dt, "mb_per_s": m * len(payload) / dt / 1e6}

    mqtt_rates = asyncio.run(fan_in())

    # Kafka: partial-sized records, acks=all, idempotent producer
    async def kafka_rate() -> dict[str, float]:
        from aiokafka import AIOKafkaProducer

        conn = KafkaConn(stack.kafka_bootstrap)
        topics = Topics(f"stage-{uuid.uuid4().hex[:6]}")
        await ensure_topics(conn, topics)
        prod = AIOKafkaProducer(**conn.kwargs(), acks="all", enable_idempotence=True,
                                max_request_size=8 << 20)
        await prod.start()
        k = 200 if quick else 1000
        t0 = time.perf_counter()
        futs = [await prod.send(topics.partials, payload) for _ in range(k)]
        await asyncio.gather(*futs)
        dt = time.perf_counter() - t0
        await prod.stop()
        return {"records_per_s": k / dt, "mb_per_s": k * len(payload) / dt / 1e6}

    kafka_rates = asyncio.run(kafka_rate())
    trust_load = {str(size): _trust_load_probe(path) for size, path in trust_files.items()}
    trust_load_region = {str(size): _trust_load_probe(path, "region-0")
                         for size, path in trust_files.items()}
    region_update_s = open_s + verify_add_s
    return {
        "num_params": params,
        "update_bytes": len(msgs[0]),
        "payload_bytes": len(payloads[0][0]),
        "chunks_per_update": len(payloads[0]),
        "encode_s": encode_s,
        "seal_s": seal_s,
        "open_envelope_s": open_s,
        "verify_chunk_s": verify_s,
        "verify_and_add_s": verify_add_s,
        "add_s": max(0.0, verify_add_s - verify_s),
        "region_update_s": region_update_s,
        "region_updates_per_core_s": 1.0 / region_update_s,
        "global_decode_s": decode_s,
        "completeness_check_round_s_before_fix": check,
        "mqtt_fan_in": mqtt_rates,
        "kafka_produce": kafka_rates,
        "trust_load": trust_load,
        "trust_load_region": trust_load_region,
    }


# -- a federation without edge processes -------------------------------------------------------


def federation(stack: LocalStack, keys: Path, regions: list[str], project: Path, wd: Path,
               namespace: str, *, rounds: int, fraction: float, deadline_s: float,
               extra_regional: tuple[str, ...] = ()) -> Federation:
    return Federation(
        mqtt={r: stack.mqtt[r] for r in regions}, kafka=stack.kafka_bootstrap, keys_dir=keys,
        fleet={r: [] for r in regions}, workdir=wd, project=project, namespace=namespace,
        global_args=["--rounds", str(rounds), "--clients-per-round", str(fraction),
                     "--deadline-s", str(deadline_s), "--grace-s", "5", "--seed", "1"],
        regional_args=list(extra_regional))


async def follow(fed: Federation, keys: Path, timeout_s: float,
                 on_version=None) -> list[dict[str, Any]]:
    """Every model version until the final one: version, round, created and seen times."""
    trust = TrustStore.load(keys / "trust.json")
    out: list[dict[str, Any]] = []

    async def run() -> None:
        async for v in model_versions(fed.consumer, trust, namespace=fed.namespace):
            out.append({"version": v.version, "round": v.round, "seen": time.time(),
                        "created": v.message.provenance.created_unix,
                        "participants": sum(len(a) for a in v.participants.values()),
                        "server_accuracy": v.metrics.get("server_accuracy", 0.0)})
            if on_version is not None:
                on_version(out[-1])
            if v.final:
                return

    try:
        await asyncio.wait_for(run(), timeout_s)
    except TimeoutError:
        console.print(f"[red]timed out after {timeout_s:.0f} s with {len(out)} versions")
    return out


# -- ingest ---------------------------------------------------------------------------------


def ingest(stack: LocalStack, wd: Path, project: Path, devices: int,
           replicas: int) -> dict[str, Any]:
    """Accepted updates per second through region-0 (all of its devices in one round)."""
    wd.mkdir(parents=True, exist_ok=True)
    keys = wd / "keys"
    make_fleet_keys(keys, {"region-0": device_names(devices)}, SEED)
    ns = f"ingest-{replicas}-{uuid.uuid4().hex[:6]}"
    fed = federation(stack, keys, ["region-0"], project, wd / "logs", ns, rounds=2,
                     fraction=1.0, deadline_s=300)
    ports = [free_port() for _ in range(replicas)]
    if replicas > 1:  # replicas r0, r1, ... share region-0's updates (MQTT shared subscription)
        fed.replicas = {"region-0": [f"r{i}" for i in range(replicas)]}
    for name, port in zip(fed.aggregators, ports, strict=True):
        fed.per_process_args[name] = ["--metrics-port", str(port)]
    fed.prepare_kafka()
    for name in fed.aggregators:
        fed.start(name)
    fed.start("global")
    lg = spawn(loadgen_cmd(keys, {"region-0": stack.mqtt["region-0"]}, ns,
                           wd / "loadgen.json", "--presign", "--rounds", "1",
                           "--timeout-s", "600", "--connections", "4"), wd / "loadgen.log")
    samples: list[tuple[float, float]] = []
    t_end = time.time() + 600
    try:
        while time.time() < t_end:
            time.sleep(0.2)
            total = 0.0
            try:
                for p in ports:
                    total += accepted_updates(scrape(p))
            except OSError:
                continue
            samples.append((time.time(), total))
            if total >= devices or lg.poll() is not None:
                break
    finally:
        rss = {n: peak_rss_mib(proc.pid) for n, proc in fed.procs.items()}
        stop(lg)
        fed.stop_all()
    moving = [(t, c) for t, c in samples if c > 0]
    if len(moving) < 2:
        return {"replicas": replicas, "updates_per_s": None, "note": "no updates accepted"}
    (t0, c0), (t1, c1) = moving[0], moving[-1]
    lg_stats = json.loads((wd / "loadgen.json").read_text()) \
        if (wd / "loadgen.json").exists() else {}
    return {"replicas": replicas, "devices": devices, "accepted": c1,
            "updates_per_s": (c1 - c0) / (t1 - t0) if t1 > t0 else None,
            "window_s": t1 - t0, "peak_rss_mib": rss,
            "loadgen_peak_rss_mib": lg_stats.get("peak_rss_mib")}


# -- synchronous rounds ---------------------------------------------------------------------------


def sync_rounds(stack: LocalStack, wd: Path, project: Path, devices: int, rounds: int,
                fraction: float, deadline_s: float) -> dict[str, Any]:
    wd.mkdir(parents=True, exist_ok=True)
    regions = [f"region-{r}" for r in range(REGIONS)]
    keys = wd / "keys"
    t0 = time.time()
    make_fleet_keys(keys, contiguous_fleet(device_names(devices), REGIONS), SEED)
    keys_s = time.time() - t0
    ns = f"sync-{devices}-{uuid.uuid4().hex[:6]}"
    fed = federation(stack, keys, regions, project, wd / "logs", ns, rounds=rounds,
                     fraction=fraction, deadline_s=deadline_s)
    fed.start_all()
    lg = spawn(loadgen_cmd(keys, {r: stack.mqtt[r] for r in regions}, ns, wd / "loadgen.json",
                           "--timeout-s", str(rounds * (deadline_s + 30) + 120)),
               wd / "loadgen.log")
    pids = {**{n: p.pid for n, p in fed.procs.items()}, "loadgen": lg.pid,
            **{f"broker:{n}": pid for n, pid in stack.pids.items()}}
    cpu0: dict[str, float | None] = {}

    def on_version(v: dict[str, Any]) -> None:
        console.print(f"  {devices} devices: model v{v['version']} (round {v['round']}, "
                      f"{v['participants']} participants)")
        if v["version"] == 1:
            cpu0.update({n: cpu_seconds(p) for n, p in pids.items()})

    try:
        versions = asyncio.run(follow(fed, keys, rounds * (deadline_s + 30) + 300, on_version))
        cpu1 = {n: cpu_seconds(p) for n, p in pids.items()}
        rss = {n: peak_rss_mib(p.pid) for n, p in fed.procs.items()}
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            lg.wait(30)  # it stops by itself after the final version
        stop(lg)
        fed.stop_all()
    created = [v["created"] for v in versions]
    per_round = [b - a for a, b in zip(created, created[1:])]
    measured = per_round[1:] if len(per_round) > 1 else per_round
    region_rss = [x for x in (rss.get(r) for r in regions) if x is not None]
    wall = created[-1] - created[1] if len(created) > 2 else None
    cpu = {n: b - a for n in pids
           if (a := cpu0.get(n)) is not None and (b := cpu1.get(n)) is not None}
    lg_stats = json.loads((wd / "loadgen.json").read_text()) \
        if (wd / "loadgen.json").exists() else {}
    shutil.rmtree(keys / "tls", ignore_errors=True)
    return {
        "devices": devices,
        "updates_per_round": [v["participants"] for v in versions[1:]],
        "s_per_round": statistics.mean(measured) if measured else None,
        "s_per_round_all": per_round,
        "region_peak_rss_mib": max(region_rss) if region_rss else None,
        "region_peak_rss_each_mib": {r: rss.get(r) for r in regions},
        "global_peak_rss_mib": rss.get("global"),
        "loadgen_peak_rss_mib": lg_stats.get("peak_rss_mib"),
        "keys_s": keys_s,
        "cpu_s_rounds_2_on": {n: round(v, 2) for n, v in sorted(cpu.items())},
        "cpu_wall_s_rounds_2_on": wall,
        "complete": bool(versions) and versions[-1]["round"] == rounds,
    }


# -- report ----------------------------------------------------------------------------------------


# -- sync against FedBuff: time to a target accuracy -----------------------------------------


TTA_DEVICES = 12  # digits devices, 2 regions (real edge agents: each trains with JAX)
TTA_FRACTION = 0.5  # 6 devices selected per round (sync) or per version (FedBuff)
TTA_BUFFER = 3  # FedBuff steps after half of a round's devices


def time_to_target(stack: LocalStack, wd: Path, target: float, delay: str,
                   quick: bool) -> dict[str, Any]:
    """The same 12 digits devices, data, seed and per-(device, round) Pareto delays, run
    synchronously and with FedBuff on the real services: wall seconds from the first model
    version to the first whose server accuracy reaches ``target``."""
    from global_aggregator.keygen import fleet as make_fleet
    from global_aggregator.keygen import write_keys
    from schemas.project import load_project

    project = load_project(ROOT / "examples" / "digits")
    from digits_fl.data import make_data  # the project's package, importable once loaded

    devices = make_fleet(TTA_DEVICES, 2)
    make_data([d for ds in devices.values() for d in ds], wd / "data", seed=7, alpha=0.5)
    keys = wd / "keys"
    write_keys(keys, devices=devices)
    rounds = 12 if quick else 30
    out: dict[str, Any] = {"config": {"devices": TTA_DEVICES, "fraction": TTA_FRACTION,
                                      "delay": delay, "target": target, "max_rounds": rounds,
                                      "fedbuff_buffer": TTA_BUFFER}}
    for mode in ("sync", "fedbuff"):
        extra = ["--mode", "fedbuff", "--buffer-size", str(TTA_BUFFER), "--max-staleness", "4",
                 "--staleness-scale", "4"] if mode == "fedbuff" else []
        ns = f"tta-{mode}-{uuid.uuid4().hex[:6]}"
        fed = Federation(
            mqtt=stack.mqtt, kafka=stack.kafka_bootstrap, keys_dir=keys, fleet=devices,
            workdir=wd / mode, project=project.root, namespace=ns,
            data={"path": str(wd / "data" / "{device_id}.npz")},
            global_args=["--rounds", str(rounds), "--clients-per-round", str(TTA_FRACTION),
                         "--deadline-s", "30", "--grace-s", "2", "--seed", "1", *extra],
            edge_args=["--delay", delay])
        console.print(f"tta: {mode}, {TTA_DEVICES} devices, delays {delay}, target {target}")
        t0 = time.time()
        try:
            fed.start_all()
            history, reached = _race(fed, keys, target)
        finally:
            fed.stop_all()
        start = history[0]["seen"] if history else t0
        out[mode] = {"time_to_target_s": reached[0] - start if reached else None,
                     "versions": len(history),
                     "accuracy": [(round(v["seen"] - start, 2), v.get("server_accuracy"))
                                  for v in history]}
        console.print(f"  {mode}: {out[mode]['time_to_target_s']} s, {len(history)} versions")
    s, f = out["sync"]["time_to_target_s"], out["fedbuff"]["time_to_target_s"]
    out["speedup"] = s / f if s and f else None
    return out


def _race(fed: Federation, keys: Path, target: float) -> tuple[list[dict[str, Any]],
                                                                list[float]]:
    """Follow ``fed``'s versions until one reaches ``target`` (or the final one)."""
    history: list[dict[str, Any]] = []
    reached: list[float] = []

    def on_version(v: dict[str, Any]) -> None:
        history.append(v)
        if v.get("server_accuracy", 0.0) >= target:
            reached.append(v["seen"])
            raise _Reached

    with contextlib.suppress(_Reached):
        asyncio.run(follow(fed, keys, timeout_s=900, on_version=on_version))
    return history, reached


class _Reached(Exception):
    """The target accuracy was reached: stop following."""


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.8))
    sync = result.get("sync_rounds") or {}
    sizes = sorted(int(k) for k, v in sync.items() if v.get("s_per_round") is not None)
    ax = axes[0]
    if sizes:
        ax.plot(sizes, [sync[str(s)]["s_per_round"] for s in sizes], "o-", label="measured")
    ax.axhline(GOAL_S_PER_ROUND, color="red", ls="--", label="goal: 15 s")
    ax.set_xscale("log")
    ax.set_xlabel("enrolled devices (4 regions, 10% per round)")
    ax.set_ylabel("seconds per round")
    ax.set_title("synchronous rounds")
    ax.legend()
    ax = axes[1]
    if sizes:
        ax.plot(sizes, [sync[str(s)]["region_peak_rss_mib"] for s in sizes], "o-",
                label="region (max of 4)")
        ax.plot(sizes, [sync[str(s)]["global_peak_rss_mib"] for s in sizes], "s-",
                label="global")
        base = sync[str(sizes[0])]["region_peak_rss_mib"]
        if base:
            ax.axhline(base * GOAL_RSS_RATIO, color="red", ls="--",
                       label=f"goal: region <= 1.2 x at {sizes[0]}")
    ax.set_xscale("log")
    ax.set_xlabel("enrolled devices")
    ax.set_ylabel("peak RSS (MiB)")
    ax.set_title("memory")
    ax.legend()
    ax = axes[2]
    st = result.get("stages") or {}
    if st:
        labels = ["encode (edge)", "seal (edge)", "open_envelope", "verify_chunk",
                  "verify + add", "region total", "global decode"]
        keys = ["encode_s", "seal_s", "open_envelope_s", "verify_chunk_s", "verify_and_add_s",
                "region_update_s", "global_decode_s"]
        rates = [1.0 / st[k] if st.get(k) else 0.0 for k in keys]
        labels += ["MQTT fan-in", "Kafka produce"]
        rates += [st["mqtt_fan_in"]["messages_per_s"], st["kafka_produce"]["records_per_s"]]
        ax.barh(labels, rates)
        ax.set_xscale("log")
        ax.set_xlabel("operations per second (one core)")
        ax.set_title(f"stage rates ({st['num_params']} params, {st['update_bytes']} B/update)")
    ax = axes[3]
    tta = result.get("time_to_target") or {}
    for mode in ("sync", "fedbuff"):
        if tta.get(mode):
            pts = [(t, a) for t, a in tta[mode]["accuracy"] if a is not None]
            ax.plot([t for t, _ in pts], [a for _, a in pts], "o-", ms=3,
                    label=f"{mode}: {tta[mode]['time_to_target_s'] or float('nan'):.0f} s")
    if tta:
        ax.axhline(tta["config"]["target"], color="red", ls="--", label="target")
        ax.set_xlabel("wall seconds")
        ax.set_ylabel("server accuracy (digits)")
        ax.set_title(f"sync vs FedBuff, delays {tta['config']['delay']}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(result: dict[str, Any]) -> None:
    st = result.get("stages")
    if st:
        t = Table(title=f"stage costs ({st['num_params']} parameters, "
                  f"{st['update_bytes']:,} bytes per update envelope)")
        t.add_column("stage")
        t.add_column("per op", justify="right")
        t.add_column("per second", justify="right")
        for label, key in (("encode an update (CKKS, edge)", "encode_s"),
                           ("seal = protobuf + Ed25519 sign (edge)", "seal_s"),
                           ("open_envelope = parse + verify (region)", "open_envelope_s"),
                           ("verify_chunk = load ciphertext (region)", "verify_chunk_s"),
                           ("verify_chunk + Accumulator add (region)", "verify_and_add_s"),
                           ("region per update (open + verify + add)", "region_update_s"),
                           ("global decode of a total", "global_decode_s")):
            t.add_row(label, f"{st[key] * 1e3:.3f} ms", f"{1 / st[key]:,.0f}")
        t.add_row("Mosquitto fan-in (4 pub, 1 sub, QoS 1)", "",
                  f"{st['mqtt_fan_in']['messages_per_s']:,.0f} msg "
                  f"({st['mqtt_fan_in']['mb_per_s']:.0f} MB/s)")
        t.add_row("Kafka produce (acks=all)", "",
                  f"{st['kafka_produce']['records_per_s']:,.0f} rec "
                  f"({st['kafka_produce']['mb_per_s']:.0f} MB/s)")
        for m, s in st["completeness_check_round_s_before_fix"].items():
            t.add_row(f"old completeness check (now a count), a round of {m}", f"{s:.3f} s",
                      "")
        for n, probe in st["trust_load"].items():
            t.add_row(f"TrustStore.load, {int(n):,} devices (the global: all)",
                      f"{probe['load_s']:.2f} s", f"+{probe['rss_mib']:.1f} MiB")
        for n, probe in st.get("trust_load_region", {}).items():
            t.add_row(f"TrustStore.load, {int(n):,} devices (a region: its own)",
                      f"{probe['load_s']:.2f} s", f"+{probe['rss_mib']:.1f} MiB")
        console.print(t)
    t = Table(title="fleet benchmark (real brokers, real aggregators, fedstream-loadgen)")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("goal", justify="right")
    for k, v in (result.get("ingest_updates_per_s") or {}).items():
        t.add_row(f"ingest, 1 region, {k} replica(s)",
                  "n/a" if v is None else f"{v:,.0f} updates/s", "")
    sync = result.get("sync_rounds") or {}
    base = None
    for size in sorted(sync, key=int):
        s = sync[size]
        upr = s.get("updates_per_round") or [0]
        spr = s.get("s_per_round")
        t.add_row(f"{int(size):,} devices: s/round ({max(upr):,} updates)",
                  "n/a" if spr is None else f"{spr:.2f}",
                  "<= 15" if int(size) >= 100_000 else "")
        rr = s.get("region_peak_rss_mib")
        if base is None:
            base = rr
        ratio = f" ({rr / base:.2f} x)" if rr and base else ""
        t.add_row(f"{int(size):,} devices: region peak RSS",
                  "n/a" if rr is None else f"{rr:.0f} MiB{ratio}",
                  "<= 1.2 x" if int(size) >= 100_000 else "")
        g = s.get("global_peak_rss_mib")
        t.add_row(f"{int(size):,} devices: global peak RSS",
                  "n/a" if g is None else f"{g:.0f} MiB", "")
    tta = result.get("time_to_target") or {}
    for mode in ("sync", "fedbuff"):
        if tta.get(mode):
            v = tta[mode]["time_to_target_s"]
            t.add_row(f"time to {tta['config']['target']:.2f} accuracy, {mode}",
                      "not reached" if v is None else f"{v:.0f} s", "")
    if tta.get("speedup"):
        t.add_row("FedBuff speed-up to target", f"{tta['speedup']:.2f} x", ">= 2 x")
    console.print(t)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "fleet.json",
                    help="write the results here (and a PNG beside it)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes: a few minutes")
    ap.add_argument("--parts", default="stages,ingest,sync,tta",
                    help="comma-separated: stages, ingest, sync, tta (sync against FedBuff: "
                    "time to a target accuracy with heavy-tailed device delays)")
    ap.add_argument("--sizes", default="", help="enrolled devices of the synchronous runs "
                    "(default 1000,10000,100000; quick 400,2000)")
    ap.add_argument("--rounds", type=int, default=0, help="rounds per size (the first is not "
                    "measured; default 4, quick 3)")
    ap.add_argument("--fraction", type=float, default=0.1, help="clients per round")
    ap.add_argument("--ingest-devices", type=int, default=0, help="devices of the ingest run "
                    "(default 4000, quick 800)")
    ap.add_argument("--replicas", type=int, default=2, help="also measure ingest with this "
                    "many replicas of the region (regional aggregators with --replica)")
    ap.add_argument("--target", type=float, default=0.85, help="tta: the server accuracy "
                    "both modes race to (digits)")
    ap.add_argument("--delay", default="pareto:2:1.2", help="tta: each device's heavy-tailed "
                    "wait before it publishes an update, pareto:SCALE_S:ALPHA")
    ap.add_argument("--channels", type=int, default=CHANNELS, help="model width (37: 8,181 "
                    "parameters, one ciphertext per update)")
    ap.add_argument("--deadline-s", type=float, default=120.0, help="round deadline")
    ap.add_argument("--mqtt-autosave-s", type=int, default=30,
                    help="Mosquitto saves its db every this many seconds (0: after every "
                    "change, the local stack's default, which rewrites the whole db per "
                    "message)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep logs and keys here")
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    known = {"stages", "ingest", "sync", "tta"}
    if not parts <= known:
        ap.error(f"unknown --parts {sorted(parts - known)}")
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s] or \
            ([400, 2000] if args.quick else [1000, 10_000, 100_000])
    except ValueError:
        ap.error("--sizes takes comma-separated integers")
    if min(sizes) < REGIONS * 2 or not 0 < args.fraction <= 1 or args.replicas < 1:
        ap.error("sizes must be >= 8, --fraction in (0, 1], --replicas >= 1")
    rounds = args.rounds or (3 if args.quick else 4)
    if rounds < 2:
        ap.error("--rounds must be >= 2 (the first round is not measured)")
    ingest_n = args.ingest_devices or (800 if args.quick else 4000)
    max_summands = max(64, ingest_n, max(int(round(s * args.fraction)) for s in sizes))
    wd = args.workdir or Path(tempfile.mkdtemp(prefix="fedstream-fleet-"))
    wd.mkdir(parents=True, exist_ok=True)
    project = write_project(wd / "project", args.channels, max_summands)
    params = num_params(args.channels)
    console.print(f"fleet benchmark in {wd}: model {params:,} parameters, codec max_summands "
                  f"{max_summands:,}, sizes {sizes}, {rounds} rounds each")
    result: dict[str, Any] = {
        "config": {"num_params": params, "channels": args.channels, "regions": REGIONS,
                   "fraction": args.fraction, "rounds": rounds, "max_summands": max_summands,
                   "codec": "default (3 bits, rotate, encrypted CKKS)",
                   "mqtt_autosave_s": args.mqtt_autosave_s, "quick": args.quick,
                   "cores": os.cpu_count(), "arrival": "none (devices answer at once)"},
        "goals": {"s_per_round_at_100000": GOAL_S_PER_ROUND,
                  "region_rss_ratio_100000_vs_1000": GOAL_RSS_RATIO},
    }
    stack = LocalStack([f"region-{r}" for r in range(REGIONS)], workdir=wd / "stack",
                       mqtt_autosave_seconds=args.mqtt_autosave_s,
                       mqtt_autosave_changes=1)
    stack.start()
    try:
        if "ingest" in parts:
            res: dict[str, Any] = {}
            for reps in sorted({1, args.replicas}):
                console.print(f"ingest: {ingest_n} devices, 1 region, {reps} replica(s)")
                res[str(reps)] = ingest(stack, wd / f"ingest-{reps}", project, ingest_n, reps)
                console.print(f"  {res[str(reps)]}")
            result["ingest"] = res
            result["ingest_updates_per_s"] = {k: v.get("updates_per_s") for k, v in res.items()}
            if "2" not in result["ingest_updates_per_s"]:
                result["ingest_updates_per_s"]["2"] = None
        if "sync" in parts:
            result["sync_rounds"] = {}
            for size in sizes:
                console.print(f"sync: {size:,} devices, {REGIONS} regions, "
                              f"{args.fraction:.0%} per round")
                res_s = sync_rounds(stack, wd / f"sync-{size}", project, size, rounds,
                                    args.fraction, args.deadline_s)
                result["sync_rounds"][str(size)] = res_s
                console.print(f"  {json.dumps(res_s)}")
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(result, indent=2))
        if "tta" in parts:
            result["time_to_target"] = time_to_target(stack, wd / "tta", args.target,
                                                      args.delay, args.quick)
            result["time_to_target_s"] = {m: r["time_to_target_s"]
                                          for m, r in result["time_to_target"].items()
                                          if m in ("sync", "fedbuff")}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2))
        if "stages" in parts:
            trust_files = {size: wd / f"sync-{size}" / "keys" / "trust.json" for size in sizes
                           if (wd / f"sync-{size}" / "keys" / "trust.json").exists()}
            if not trust_files:
                keys = wd / "stage-keys"
                make_fleet_keys(keys, contiguous_fleet(device_names(max(sizes)), REGIONS), SEED)
                trust_files = {max(sizes): keys / "trust.json"}
            console.print("stages: micro-benchmarks on real payloads")
            result["stages"] = stages(stack, wd, params, max_summands, args.quick, trust_files)
    finally:
        stack.stop()
    sync = result.get("sync_rounds") or {}
    if sync:
        big, small = str(max(sizes)), str(min(sizes))
        spr = sync[big].get("s_per_round")
        r_big, r_small = sync[big].get("region_peak_rss_mib"), \
            sync[small].get("region_peak_rss_mib")
        result["goals"]["met_s_per_round"] = spr is not None and spr <= GOAL_S_PER_ROUND \
            and int(big) >= 100_000
        result["goals"]["region_rss_ratio"] = r_big / r_small if r_big and r_small else None
        result["goals"]["met_region_rss"] = bool(r_big and r_small
                                                 and r_big / r_small <= GOAL_RSS_RATIO)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    plot(result, args.json.with_suffix(".png"))
    report(result)
    console.print(f"wrote {args.json} and {args.json.with_suffix('.png')}")


if __name__ == "__main__":
    main()
