"""Edge agent footprint: peak memory and model-to-update latency of a real device, beside Flower.

What is measured, per example project (every ``examples/*`` with a ``[tool.fedstream]`` table;
a project that fails makes the whole bench fail, none is skipped):

* ``import_rss_mib``: the peak RSS of a child process that only runs ``python -c "import
  edge_agent.service"``: what the agent costs before it trains anything (median of ``--repeat``
  runs; ``python -c pass`` is given as the interpreter's own floor). The child reads its own
  ``VmHWM`` (``/proc/self/status``) as its last statement: the high-water RSS of its address
  space since exec, which is what its ``ru_maxrss`` would be if Linux did not count the parent's
  high-water RSS into a child's ``ru_maxrss`` (``subprocess`` uses vfork, and exec keeps the
  larger mark: a child of a 500 MiB parent reports >= 500 MiB, whatever it uses).
* Two conditions per project, side by side in one run, on the same brokers, data and keys, and
  both reported (per project under ``cold`` and ``warm``):

  - ``cold``: a device's FIRST START EVER. Each device process gets ``--compile-cache`` pointing
    at its own fresh, empty temporary directory (checked empty), so it compiles its jitted
    training step (and the rest of its programs) with XLA: the largest transient memory cost
    of a device.
  - ``warm``: a device's EVERY LATER START. A second federation (its own namespace, a new
    :class:`Federation`, new processes) whose devices get, each, the SAME cache directory
    that its cold run filled, so they load the compiled programs instead of compiling them.
    This is a deployed device's steady state: it compiles once in its life (or again only
    after an update that changes the program: another model, shapes or jax/jaxlib version),
    then restarts many times (agent updates, reboots, crashes, power cuts) and each of those
    starts is warm; within one process the in-memory jit cache already serves every round.
    ``compile_cache`` records, per device, the cache entries after each run; a warm run that
    had to compile anything shows it in ``new_entries`` (``warm_compiled_nothing`` is false).

  The top-level ``edge_peak_rss_mib`` and ``model_to_first_update_s`` are the WARM numbers (max
  over devices and projects); ``edge_peak_rss_mib_cold`` and ``model_to_first_update_s_cold``
  the cold ones. The agent sets glibc ``M_ARENA_MAX=1`` and builds its model abstractly (no
  parameter init) in both conditions.
* ``edge_peak_rss_mib`` (per condition): the peak RSS of each real ``python -m edge_agent.cli``
  process through a whole ``--rounds`` federation on real local brokers (one Mosquitto, one
  KRaft Kafka: :class:`compose.localstack.LocalStack`; the regional and global aggregators as
  their own processes: :class:`compose.federation.Federation`). ``--devices`` (default 2, the
  privacy floor k = 2) devices in ``region-0``, each with its own data from the project's data
  writer (written, with the keys, by a child process, so that this process stays small). The peak is
  the device's ``ru_maxrss`` (``wait4``) when that is above this process's own high-water RSS at
  the spawn (then it cannot be the parent's share: exact), else the last ``VmHWM`` sample of
  ``/proc/<pid>/status``, polled every 20 ms (``peak_source`` says which; both are kept).
  ``rss_at_ready_mib`` is its RSS when it logs its start-up line (keys, project and model
  built), ``idle_rss_mib`` its RSS while it waits for its first round (the last sample before
  the model arrives), ``rss_timeline`` the samples every 0.25 s (plotted).
* ``model_to_first_update_s``: seconds from the round-1 model version (the retained
  ``<ns>/region-0/model`` message) arriving at the region's broker to the device's first update
  chunk arriving there on ``<ns>/region-0/updates/<device>``, both seen by one MQTT subscriber of
  the bench on the same loopback broker (one clock; it gets each message within a millisecond of
  the device). The devices are started first and the global aggregator only once every device
  has logged its start-up line and holds a TCP connection to the broker (plus 1 s for the MQTT
  subscribe), so the model reaches a device that is up and waiting, as in a deployment: the
  number is the device's reaction time (check the model's signature, load its data, train with
  JAX, including the first jit compilation when cold or its load from the cache when warm,
  clip, quantize, CKKS-encrypt, sign), not its start-up (``startup_s``: process start to its
  "runs project" log line). The log-based
  cross-check ``log_model_to_update_s`` is the edge's "round 1 update published" log line minus
  the global aggregator's "published initial model v0" line (it adds the Kafka -> regional ->
  MQTT relay). Top-level numbers are the max over devices and projects.

Side by side on the same machine, Flower clients (Flower is not a fedstream dependency: it runs
from a separate venv, ``--flower-python``, created at /tmp/flwrenv with ``pip install
"flwr>=1.20" numpy`` when not given and not already there):

* ``flower_import_rss_mib``: peak RSS of ``python -c "import flwr.client"`` (as above);
* ``flower_mode = "round"``: two real Flower clients (legacy ``flwr.client.start_client`` with a
  ``NumPyClient``, one process each) connected to a ``flwr.server.start_server`` FedAvg server
  on loopback, through one round on the digits devices' own ``.npz`` files. "Flower client,
  numpy model": the client trains a numpy softmax regression, so this number carries no ML
  framework and is a lower bound for a real Flower client. ``flower_client_peak_rss_mib`` is the
  larger client's peak RSS, measured as the edge's (``edge_vs_flower_rss`` = warm edge / it).
  If that run fails, ``flower_mode = "import"`` and the import RSS is used instead (the error is
  kept in ``flower_round_error``).
* "Flower client, same Flax model" (the fair comparison): the same round, but each client
  trains the edge's own model on the same digits shard: the digits CNN of
  ``edge_agent.models`` (conv3x3(16)-relu-conv3x3(32)-relu-avgpool2-dense(32)-relu-dense(10),
  21,546 parameters, written inline in the client script since Flower's venv has no
  fedstream) with optax sgd lr 0.1, 2 epochs, padded batches of 16, one jitted step on CPU.
  JAX, Flax and optax are installed into Flower's venv (the versions of this venv) if missing;
  if that fails (no network), ``flower_flax_error`` says why and the bench goes on.
  ``flower_flax_client_peak_rss_mib`` is the larger client's peak RSS, ``edge_vs_flower_flax_rss``
  = warm edge / it (and ``edge_cold_vs_flower_flax_rss`` = cold edge / it). The Flower client
  is plain Flower: no persistent compilation cache (it compiles at every start, like a cold
  edge) and glibc's default malloc arenas.
  The issue's reference, a Flower 1.41 client deployed as SuperNode + SuperExec (two processes),
  peaks at about 265 MiB (``flower_reference_mib``); the legacy client here is one process.

Also reported: the top 10 cumulative imports of ``python -X importtime -c "import
edge_agent.service"`` and the RSS each top-level package adds when the same modules are
imported one by one in the same order (``import_rss_by_package_mib``).

Usage:
    python bench/edge.py --json bench/results/edge.json   # also writes bench/results/edge.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXAMPLES = ROOT / "examples"
FLOWER_VENV = Path("/tmp/flwrenv")
FLOWER_REFERENCE_MIB = 265.0  # the Flower 1.41 client (SuperNode + SuperExec)
MIB = 1024.0  # ru_maxrss and /proc/*/status are in KiB
CHILD_ENV = {"PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}  # as compose.federation sets them
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\S+) (\w+) (.*)$")


class BenchError(RuntimeError):
    """A measurement could not be made; the message says which and where its logs are."""


# ----------------------------------------------------------------------------------------------
# child processes: exact peak RSS


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, **CHILD_ENV, **extra}


def reap(proc: subprocess.Popen) -> tuple[int, float]:
    """Wait for ``proc`` with ``wait4``: (exit code, its ``ru_maxrss`` in MiB). Sets
    ``returncode`` so that Popen never waits for it again. Beware: Linux counts the parent's
    high-water RSS into a child's ``ru_maxrss`` (vfork shares the parent's memory until exec,
    and exec keeps the larger high-water mark), so it is only exact above the parent's own."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / MIB


def self_rss_kib() -> int:
    """This process's high-water RSS (KiB): the floor under any child's ``ru_maxrss``."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


_HWM_TAIL = ("\nimport re as _r\nprint('VmHWM', _r.search(r'VmHWM:\\s+(\\d+)', "
             "open('/proc/self/status').read()).group(1))")


def child_peak_rss(python: str, stmt: str, timeout: float = 300.0) -> float:
    """Peak RSS (MiB) of ``python -c stmt``: the child's own VmHWM, read as its last statement
    (exact: the high-water mark of its address space since exec, what ``ru_maxrss`` would say
    without the parent's share)."""
    r = subprocess.run([python, "-c", stmt + _HWM_TAIL], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=timeout)
    m = re.search(r"^VmHWM (\d+)$", r.stdout, re.M)
    if r.returncode != 0 or not m:
        raise BenchError(f"{python} -c {stmt!r} exited with {r.returncode}:\n{r.stderr[-3000:]}")
    return int(m.group(1)) / MIB


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return out


@dataclass
class Watched:
    """One process followed until it exits: ``/proc/<pid>/status`` every 20 ms (VmRSS, VmHWM)
    and its ``ru_maxrss`` at exit (``wait4``). ``peak_mib``: the ``ru_maxrss`` when it is above
    this process's own high-water RSS at the spawn (then it is the child's alone, exact), else
    the last VmHWM sample (exact up to the last 20 ms of the child's life)."""

    proc: subprocess.Popen
    samples: list[tuple[float, int]] = field(default_factory=list)
    vmhwm_kib: int = 0
    ru_maxrss_mib: float | None = None
    parent_hwm_kib: int = 0
    exit_code: int | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def start(self, interval: float = 0.02) -> Watched:
        self.parent_hwm_kib = self_rss_kib()

        def poll() -> None:
            while not self.done.is_set():
                st = _status_kib(self.proc.pid)
                if "VmRSS" in st:  # a zombie has no memory lines
                    self.samples.append((time.time(), st["VmRSS"]))
                    self.vmhwm_kib = max(self.vmhwm_kib, st["VmHWM"])
                self.done.wait(interval)

        def wait() -> None:
            try:
                self.exit_code, self.ru_maxrss_mib = reap(self.proc)
            except ChildProcessError:  # reaped by someone else (stop_all): no rusage
                self.exit_code = self.proc.returncode
            self.done.set()

        threading.Thread(target=poll, daemon=True).start()
        threading.Thread(target=wait, daemon=True).start()
        return self

    @property
    def peak_source(self) -> str:
        if self.ru_maxrss_mib is not None and self.ru_maxrss_mib * MIB > self.parent_hwm_kib:
            return "ru_maxrss"
        return "vmhwm_poll"

    @property
    def peak_mib(self) -> float | None:
        if self.peak_source == "ru_maxrss":
            return max(self.ru_maxrss_mib, self.vmhwm_kib / MIB)
        return self.vmhwm_kib / MIB if self.vmhwm_kib else None

    def rss_before(self, t: float) -> float | None:
        before = [kib for ts, kib in self.samples if ts < t]
        return before[-1] / MIB if before else None


# ----------------------------------------------------------------------------------------------
# imports of the edge agent


def import_rss(python: str, stmt: str, repeat: int) -> list[float]:
    return [child_peak_rss(python, stmt) for _ in range(repeat)]


def importtime(python: str, stmt: str) -> list[tuple[str, int, int]]:
    """(module, self us, cumulative us) in import order (``-X importtime``)."""
    r = subprocess.run([python, "-X", "importtime", "-c", stmt], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise BenchError(f"python -X importtime -c {stmt!r} failed:\n{r.stderr[-3000:]}")
    rows = []
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m:
            rows.append((m.group(4), int(m.group(1)), int(m.group(2))))
    return rows


_BREAKDOWN = r"""
import importlib, json, sys
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
mods = json.loads(sys.argv[1]); out = {}; last = rss(); base = last
for m in mods:
    try:
        importlib.import_module(m)
    except Exception:
        continue
    now = rss(); top = m.split(".")[0]
    out[top] = out.get(top, 0) + now - last; last = now
print(json.dumps({"base": base, "total": last, "by_package": out}))
"""


def import_breakdown(python: str, modules: list[str]) -> dict:
    """Import ``modules`` one by one (the order ``-X importtime`` saw them finish) and charge
    each one's RSS growth to its top-level package: which packages the agent's RSS is made of."""
    r = subprocess.run([python, "-c", _BREAKDOWN, json.dumps(modules)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise BenchError(f"import breakdown failed:\n{r.stderr[-3000:]}")
    d = json.loads(r.stdout.strip().splitlines()[-1])
    by = sorted(d["by_package"].items(), key=lambda kv: -kv[1])
    return {"interpreter_mib": d["base"] / MIB, "after_all_imports_mib": d["total"] / MIB,
            "by_package_mib": {k: round(v / MIB, 1) for k, v in by if v >= 1024}}


# ----------------------------------------------------------------------------------------------
# example projects on real brokers


def example_projects() -> list[Path]:
    out = []
    for d in sorted(p for p in EXAMPLES.iterdir() if p.is_dir()):
        py, ft = d / "pyproject.toml", d / "fedstream.toml"
        if ft.is_file() or (py.is_file() and "[tool.fedstream]" in py.read_text()):
            out.append(d)
    return out


def write_project_data(project, ids: list[str], out: Path, seed: int = 0) -> None:
    """The project's own data writer for ``ids`` into ``out`` (one file per device)."""
    if project.name == "digits":
        from digits_fl.data import make_data
        make_data(ids, out, seed=seed)
    elif (project.root / "generate.py").is_file():  # examples/iot-anomaly
        import importlib.util
        spec = importlib.util.spec_from_file_location(f"_gen_{project.name.replace('-', '_')}",
                                                      project.root / "generate.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.generate(ids, out, seed)
    elif project.table.simulation.data:
        from edge_agent.models import resolve
        resolve(project.table.simulation.data, "demo data")(ids, out, seed)
    else:
        raise BenchError(f"project {project.name} ({project.root}): no data writer known to "
                         "bench/edge.py and no [tool.fedstream.simulation] data = ...")
    missing = [d for d in ids if not any(out.glob(f"{d}.*"))]
    if missing:
        raise BenchError(f"project {project.name}: the data writer wrote nothing for {missing}")


class BrokerTap:
    """One MQTT subscriber on the region's broker: when the model and each first update land."""

    def __init__(self, host: str, port: int, model_topic: str, update_prefix: str) -> None:
        import paho.mqtt.client as mqtt
        self.model_topic, self.prefix = model_topic, update_prefix
        self.model_t: float | None = None
        self.first_update: dict[str, float] = {}
        self.ready = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                             client_id=f"edgebench-{uuid.uuid4().hex[:8]}")
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = lambda *a, **k: self.ready.set()
        self.c.on_message = self._on_message
        self.c.connect(host, port, keepalive=60)
        self.c.loop_start()
        if not self.ready.wait(15):
            raise BenchError(f"bench's MQTT subscriber got no SUBACK from {host}:{port}")

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        client.subscribe([(self.model_topic, 0), (self.prefix + "+", 0)])

    def _on_message(self, client, userdata, msg) -> None:
        now = time.time()
        if msg.topic == self.model_topic:
            if self.model_t is None:
                self.model_t = now
        elif msg.topic.startswith(self.prefix):
            self.first_update.setdefault(msg.topic[len(self.prefix):], now)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _log_time(path: Path, needle: str) -> float | None:
    """Wall time of the first log line containing ``needle`` (logging's asctime, local time)."""
    if not path.exists():
        return None
    for line in path.read_text(errors="replace").splitlines():
        m = _LOG_LINE.match(line)
        if m and needle in m.group(4):
            return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def _wait(cond, timeout: float, what: str, fed=None, names: tuple[str, ...] = (),
          watched: dict | None = None) -> None:
    watched = watched or {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        for n in names:
            # the edges are reaped by their Watched thread (wait4): never poll() them here
            code = (fed.procs[n].returncode if n in watched else fed.procs[n].poll()) \
                if fed is not None else None
            if code is not None:
                raise BenchError(f"{n} exited ({fed.procs[n].returncode}) while waiting for "
                                 f"{what}; log {fed.workdir / (n + '.log')}:\n{fed.log(n, 40)}")
        time.sleep(0.05)
    tails = "\n".join(f"--- {n} ---\n{fed.log(n, 25)}" for n in names) if fed else ""
    raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


def _connected(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds an established TCP connection to 127.0.0.1:``port``."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
                  if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
        rows = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for row in rows:
        f = row.split()
        if f[3] == "01" and int(f[2].split(":")[1], 16) == port and f[9] in inodes:
            return True
    return False


def _timeline(samples: list[tuple[float, int]], t0: float, step: float = 0.25) -> list:
    out, last = [], -1e9
    for t, kib in samples:
        if t - last >= step:
            out.append([round(t - t0, 2), round(kib / MIB, 1)])
            last = t
    if samples:
        out.append([round(samples[-1][0] - t0, 2), round(samples[-1][1] / MIB, 1)])
    return out


def prepare(spec: dict) -> None:
    """``--prepare``: write the devices' data and the deployment's keys (run in a child)."""
    from global_aggregator.keygen import write_keys
    from schemas.project import load_project
    project = load_project(spec["project"])
    write_project_data(project, spec["ids"], Path(spec["data"]))
    write_keys(Path(spec["keys"]), devices={"region-0": spec["ids"]})


def cache_entries(path: Path) -> dict[str, int]:
    """The compiled programs in a ``--compile-cache`` directory: file -> bytes (JAX keeps one
    ``*-cache`` file per program and an ``*-atime`` file for its LRU, left out here)."""
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*"))
            if f.is_file() and not f.name.endswith("-atime")}


def run_project(path: Path, info, workdir: Path, devices: int, rounds: int,
                progress: Progress, task) -> dict:
    """Both conditions of one project on the same brokers, data and keys: ``cold`` (each device
    with a fresh empty ``--compile-cache``), then ``warm`` (a new federation whose devices get
    the directories the cold run filled)."""
    from schemas.project import load_project

    project = load_project(path)
    fleet_ids = [d for ds in project.table.simulation.fleet().values() for d in ds]
    ids = sorted(fleet_ids)[:devices]
    if len(ids) < devices:
        ids += [f"bench-{i:03d}" for i in range(devices - len(ids))]
    pattern = str(project.table.loader_options.get("path", ""))
    if "{device_id}" not in pattern:
        raise BenchError(f"project {project.name}: loader_options.path {pattern!r} does not "
                         "name one file per device ({device_id})")
    progress.update(task, description=f"{path.name}: writing data and keys")
    data_dir, keys = workdir / "data", workdir / "keys"
    # in a child process: this one stays small (see Watched: its high-water RSS is the floor
    # under every child's ru_maxrss), and the data writers' imports (scikit-learn, JAX) and the
    # HE key generation never count against it
    r = subprocess.run([sys.executable, __file__, "--prepare", json.dumps(
        {"project": str(project.root), "ids": ids, "data": str(data_dir), "keys": str(keys)})],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise BenchError(f"writing {project.name}'s data and keys failed:\n{r.stderr[-3000:]}")
    # one cache directory per device (each device has its own disk), fresh and empty
    cache_root = workdir / "compile-cache"
    cache_root.mkdir(parents=True, exist_ok=True)
    caches = {d: Path(tempfile.mkdtemp(prefix=f"{d}-", dir=cache_root)) for d in ids}
    if any(cache_entries(c) for c in caches.values()):
        raise BenchError(f"{project.name}: a fresh compile cache is not empty: {caches}")
    runs, cache = {}, {}
    for cond in ("cold", "warm"):
        before = {d: cache_entries(c) for d, c in caches.items()}
        runs[cond] = run_federation(project, ids, info, workdir / cond, data_dir, keys, pattern,
                                    caches, rounds, cond,
                                    lambda text, c=cond: progress.update(
                                        task, description=f"{path.name} ({c}): {text}"))
        after = {d: cache_entries(c) for d, c in caches.items()}
        cache[cond] = {d: {"entries_before": len(before[d]), "entries_after": len(after[d]),
                           "new_entries": sorted(set(after[d]) - set(before[d])),
                           "bytes_after": sum(after[d].values())} for d in ids}
        progress.advance(task)
    # the warm run must have loaded, not compiled: the cold run filled the cache, the warm run
    # added nothing to it (a new entry is a program it had to compile)
    for d in ids:
        if not cache["cold"][d]["entries_after"]:
            raise BenchError(f"{project.name}: {d}'s cold run wrote nothing to its compile cache "
                             f"{caches[d]}; log {workdir / 'cold' / 'logs' / (d + '.log')}")
    warm, cold = runs["warm"], runs["cold"]
    return {
        "project": project.name, "version": project.version, "model": project.table.model,
        "num_params": warm["num_params"] or cold["num_params"], "loader": project.table.loader,
        "devices": ids, "rounds": rounds,
        "edge_peak_rss_mib": warm["edge_peak_rss_mib"],
        "edge_peak_rss_mib_cold": cold["edge_peak_rss_mib"],
        "model_to_first_update_s": warm["model_to_first_update_s"],
        "model_to_first_update_s_cold": cold["model_to_first_update_s"],
        "compile_cache": {d: {"dir": str(caches[d]), "cold": cache["cold"][d],
                              "warm": cache["warm"][d],
                              "warm_compiled_nothing": not cache["warm"][d]["new_entries"]}
                          for d in ids},
        "cold": cold, "warm": warm,
        "_data_files": {d: str(next(data_dir.glob(f"{d}.*"))) for d in ids},
    }


def run_federation(project, ids: list[str], info, workdir: Path, data_dir: Path, keys: Path,
                   pattern: str, caches: dict[str, Path], rounds: int, cond: str,
                   step) -> dict:
    """One federation (its own namespace) of ``ids`` on region-0, each device with
    ``--compile-cache caches[device]``: the devices' footprint and reaction time."""
    from compose.federation import Federation
    from schemas.kafka import ensure_topics
    from schemas.topics import Topics

    ns = f"edgebench-{project.name}-{cond}-{uuid.uuid4().hex[:6]}"
    t = Topics(ns)
    fed = Federation(
        mqtt=info.mqtt, kafka=info.kafka_bootstrap, keys_dir=keys, fleet={"region-0": ids},
        workdir=workdir / "logs", project=project.root, namespace=ns,
        data={"path": str(data_dir / Path(pattern).name)},
        global_args=["--rounds", str(rounds), "--deadline-s", "120", "--grace-s", "2"],
        per_process_args={d: ["--compile-cache", str(caches[d])] for d in ids},
    )
    host, port = info.mqtt["region-0"]
    tap = BrokerTap(host, port, t.model("region-0"), t.update("region-0", ""))
    watched: dict[str, Watched] = {}
    try:
        step("topics, regional aggregator, devices")
        asyncio.run(ensure_topics(fed.kafka, t))
        fed.start("region-0")
        started = {}
        for d in ids:
            started[d] = time.time()
            watched[d] = Watched(fed.start(d)).start()

        def connected() -> bool:  # holds a TCP link to the broker (it connects after init)
            return all(_connected(fed.procs[d].pid, port) for d in ids)

        step("waiting for the devices to connect")
        _wait(connected, 300, "every device connected to region-0's broker", fed, tuple(ids),
              watched)
        time.sleep(1.0)  # CONNECT -> CONNACK -> SUBSCRIBE -> SUBACK: milliseconds on loopback
        idle_t = time.time()
        step(f"global aggregator up, {rounds} round(s)")
        fed.start("global")
        _wait(lambda: tap.model_t is not None, 180, "the round-1 model on region-0's broker",
              fed, ("global", "region-0", *ids), watched)
        step("devices training")
        deadline = time.monotonic() + 120 + 60 * rounds + 60
        for d in ids:
            if not watched[d].done.wait(max(1.0, deadline - time.monotonic())):
                raise BenchError(f"{d} still running after the last round; logs in "
                                 f"{fed.workdir}:\n{fed.log(d, 30)}\n--- global ---\n"
                                 f"{fed.log('global', 20)}")
        bad = {d: w.exit_code for d, w in watched.items() if w.exit_code != 0}
        missing = [d for d in ids if d not in tap.first_update]
        if bad or missing:
            d = next(iter(bad), missing[0] if missing else ids[0])
            raise BenchError(f"{project.name} ({cond}): devices exited with {bad}, no update "
                             f"from {missing}; {d}'s log ({fed.workdir}):\n{fed.log(d, 40)}")
        step("stopping")
        try:
            fed.procs["global"].wait(60)
        except subprocess.TimeoutExpired:
            pass
    finally:
        tap.close()
        fed.stop_all()
        for w in watched.values():
            w.done.wait(15)
    g0 = _log_time(fed.workdir / "global.log", "published initial model v0")
    per_device = {}
    for d in ids:
        w = watched[d]
        log = fed.workdir / f"{d}.log"
        up = _log_time(log, f"{d}: round 1 update published")
        ready = _log_time(log, f"{d} (region-0) runs project")
        per_device[d] = {
            "compile_cache": str(caches[d]),
            "peak_rss_mib": round(w.peak_mib, 1) if w.peak_mib else None,
            "peak_source": w.peak_source,
            "ru_maxrss_mib": round(w.ru_maxrss_mib, 1) if w.ru_maxrss_mib else None,
            "vmhwm_mib": round(w.vmhwm_kib / MIB, 1),
            "bench_hwm_at_spawn_mib": round(w.parent_hwm_kib / MIB, 1),
            "rss_at_ready_mib": round(w.rss_before(ready) or 0.0, 1) if ready else None,
            "idle_rss_mib": round(w.rss_before(tap.model_t or idle_t) or 0.0, 1),
            "model_to_first_update_s": round(tap.first_update[d] - tap.model_t, 3),
            "log_model_to_update_s": round(up - g0, 3) if up and g0 else None,
            "startup_s": round(ready - started[d], 3) if ready else None,
            "rss_samples": len(w.samples),
            # (seconds since the model arrived at the broker, RSS MiB), every 0.25 s
            "rss_timeline": _timeline(w.samples, tap.model_t or idle_t),
        }
    if any(v["peak_rss_mib"] is None for v in per_device.values()):
        raise BenchError(f"{project.name} ({cond}): no peak RSS for a device (no /proc samples)")
    m = re.search(r"\((\d+) parameters", fed.log(ids[0], 200))
    return {
        "condition": cond, "namespace": ns,
        "num_params": int(m.group(1)) if m else None,
        "edge_peak_rss_mib": max(v["peak_rss_mib"] for v in per_device.values()),
        "edge_idle_rss_mib": max(v["idle_rss_mib"] for v in per_device.values()),
        "edge_ready_rss_mib": max((v["rss_at_ready_mib"] or 0) for v in per_device.values()),
        "startup_s": max((v["startup_s"] or 0) for v in per_device.values()),
        "model_to_first_update_s": max(v["model_to_first_update_s"]
                                       for v in per_device.values()),
        "per_device": per_device,
    }


# ----------------------------------------------------------------------------------------------
# Flower


_FLOWER_SERVER = r"""
import sys
from flwr.server import ServerConfig, start_server
from flwr.server.strategy import FedAvg
n = int(sys.argv[2])
start_server(server_address=sys.argv[1], config=ServerConfig(num_rounds=1),
             strategy=FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n,
                             min_available_clients=n, min_evaluate_clients=0))
"""

_FLOWER_CLIENT = r"""
import sys, time
import numpy as np
from flwr.client import NumPyClient, start_client

d = np.load(sys.argv[2])
x = d["x_train"].reshape(len(d["x_train"]), -1).astype(np.float32)
y = d["y_train"].astype(np.int64)
classes = 10

class Client(NumPyClient):
    # softmax regression, SGD: the digits project's train settings (lr 0.1, 2 epochs, batch 16)
    def get_parameters(self, config):
        return [np.zeros((x.shape[1], classes), np.float32), np.zeros(classes, np.float32)]

    def fit(self, parameters, config):
        t0 = time.perf_counter()
        w, b = (p.copy() for p in parameters)
        rng = np.random.default_rng(0)
        for _ in range(2):
            idx = rng.permutation(len(x))
            for i in range(0, len(x), 16):
                j = idx[i:i + 16]
                z = x[j] @ w + b
                p = np.exp(z - z.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
                p[np.arange(len(j)), y[j]] -= 1
                w -= 0.1 * x[j].T @ p / len(j); b -= 0.1 * p.mean(0)
        print(f"FIT_S {time.perf_counter() - t0:.4f}", flush=True)
        return [w, b], len(x), {}

    def evaluate(self, parameters, config):
        return 0.0, len(x), {}

start_client(server_address=sys.argv[1], client=Client().to_client(), insecure=True)
"""

# the same model as the edge (edge_agent.models.DigitsCNN, written out: Flower's venv has no
# fedstream), the same training (optax sgd lr 0.1, 2 epochs, padded batches of 16, loss divided
# by the nominal batch size, one jitted step), on the same device's digits shard
_FLOWER_FLAX_CLIENT = r"""
import sys, time
import numpy as np
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flwr.client import NumPyClient, start_client


class DigitsCNN(nnx.Module):
    # edge_agent.models.DigitsCNN, written out: conv3x3(16) -> relu -> conv3x3(32) -> relu ->
    # avgpool 2x2 -> dense(32) -> relu -> dense(10), on 8x8x1 images (21,546 parameters)
    def __init__(self, num_classes, *, rngs):
        self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
        self.fc = nnx.Linear(4 * 4 * 32, 32, rngs=rngs)
        self.out = nnx.Linear(32, num_classes, rngs=rngs)

    def __call__(self, x):
        x = x.reshape((x.shape[0], 8, 8, 1))
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nnx.relu(self.fc(x))
        return self.out(x)


d = np.load(sys.argv[2])
x = d["x_train"].astype(np.float32)
y = d["y_train"].astype(np.int32)
graphdef, state = nnx.split(DigitsCNN(10, rngs=nnx.Rngs(0)))
treedef = jax.tree.structure(state)
opt = optax.sgd(0.1)  # the digits project's train settings: sgd, lr 0.1, 2 epochs, batch 16
BATCH, EPOCHS = 16, 2


@jax.jit
def step(params, opt_state, xb, yb, mask):
    def loss(p):
        logits = nnx.merge(graphdef, p)(xb)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        return (ce * mask).sum() / mask.shape[0]
    value, grad = jax.value_and_grad(loss)(params)
    updates, opt_state = opt.update(grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


class Client(NumPyClient):
    def get_parameters(self, config):
        return [np.asarray(a) for a in jax.tree.leaves(state)]

    def fit(self, parameters, config):
        t0 = time.perf_counter()
        params = jax.tree.unflatten(treedef, [jnp.asarray(a) for a in parameters])
        opt_state = opt.init(params)
        rng = np.random.default_rng(0)
        for _ in range(EPOCHS):
            idx = rng.permutation(len(x))
            for i in range(0, len(x), BATCH):  # fixed-size padded batches: one compilation
                j = idx[i:i + BATCH]
                mask = np.zeros(BATCH, np.float32)
                mask[:len(j)] = 1.0
                j = np.pad(j, (0, BATCH - len(j)))
                params, opt_state, _ = step(params, opt_state, x[j], y[j], mask)
        out = [np.asarray(a) for a in jax.tree.leaves(params)]
        print(f"FIT_S {time.perf_counter() - t0:.4f}", flush=True)
        return out, len(x), {}

    def evaluate(self, parameters, config):
        return 0.0, len(x), {}


start_client(server_address=sys.argv[1], client=Client().to_client(), insecure=True)
"""


def flower_python(given: str | None, console: Console) -> tuple[str, str]:
    """(python with Flower, flwr version): ``given``, else /tmp/flwrenv (created if needed)."""
    def version(py: str) -> str | None:
        r = subprocess.run([py, "-c", "import flwr; print(flwr.__version__)"],
                           capture_output=True, text=True, timeout=120)
        return r.stdout.strip() if r.returncode == 0 else None

    if given:
        v = version(given)
        if v is None:
            raise BenchError(f"--flower-python {given}: cannot import flwr")
        return given, v
    py = str(FLOWER_VENV / "bin" / "python")
    if Path(py).exists() and (v := version(py)):
        return py, v
    with console.status(f"installing Flower into {FLOWER_VENV} (pip install 'flwr>=1.20' numpy)"):
        subprocess.run([shutil.which("python3") or "python3", "-m", "venv", str(FLOWER_VENV)],
                       check=True, timeout=300)
        subprocess.run([py, "-m", "pip", "install", "-q", "flwr>=1.20", "numpy"], check=True,
                       timeout=1800)
    v = version(py)
    if v is None:
        raise BenchError(f"Flower installed into {FLOWER_VENV} but does not import")
    return py, v


FLOWER_JAX_PACKAGES = ("jax", "jaxlib", "flax", "optax")


def flower_jax(py: str, console: Console) -> dict:
    """Make JAX, Flax and optax importable in Flower's venv (CPU only; the versions of this
    venv, so that both sides run the same XLA). Returns their versions, or ``{"error": ...}``
    when they are missing and cannot be installed (no network): the bench goes on without the
    Flax Flower client."""
    from importlib.metadata import PackageNotFoundError, version
    probe = ("import json, jax, flax, optax, jaxlib; print(json.dumps({'jax': jax.__version__, "
             "'flax': flax.__version__, 'optax': optax.__version__}))")

    def have() -> dict | None:
        r = subprocess.run([py, "-c", probe], capture_output=True, text=True, timeout=300,
                           env=_env())
        return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None

    if v := have():
        return v
    pins = []
    for p in FLOWER_JAX_PACKAGES:
        try:
            pins.append(f"{p}=={version(p)}")
        except PackageNotFoundError:
            pins.append(p)
    with console.status(f"installing {' '.join(pins)} into Flower's venv ({py})"):
        try:
            r = subprocess.run([py, "-m", "pip", "install", "-q", *pins], capture_output=True,
                               text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            return {"error": f"pip install {' '.join(pins)} into {py}: timed out"}
    if r.returncode != 0:
        return {"error": f"pip install {' '.join(pins)} into {py} failed (network?): "
                         f"{(r.stderr or r.stdout).strip()[-500:]}"}
    return have() or {"error": f"installed {' '.join(pins)} into {py} but they do not import"}


def flower_round(py: str, data_files: list[str], workdir: Path, client: str = _FLOWER_CLIENT,
                 model: str = "numpy softmax regression, 650 parameters",
                 timeout: float = 300.0) -> dict:
    """One FedAvg round: a Flower server and one ``client`` process per data file, on loopback."""
    from compose.localstack import free_port, terminate_pid
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "server.py").write_text(_FLOWER_SERVER)
    (workdir / "client.py").write_text(client)
    addr = f"127.0.0.1:{free_port()}"
    env = _env(GRPC_VERBOSITY="ERROR")
    procs: list[subprocess.Popen] = []

    def start(args: list[str], log: str) -> subprocess.Popen:
        with open(workdir / log, "wb") as f:
            p = subprocess.Popen([py, *args], cwd=workdir, env=env, stdout=f,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    try:
        server = start(["server.py", addr, str(len(data_files))], "server.log")
        clients = [Watched(start(["client.py", addr, f], f"client-{i}.log")).start()
                   for i, f in enumerate(data_files)]
        for i, c in enumerate(clients):
            if not c.done.wait(timeout):
                raise BenchError(f"Flower client {i} still running after {timeout:.0f}s; "
                                 f"logs in {workdir}")
            if c.exit_code != 0 or c.peak_mib is None:
                log = (workdir / f"client-{i}.log").read_text(errors="replace")[-2000:]
                raise BenchError(f"Flower client {i} exited with {c.exit_code}:\n{log}")
        server.wait(60)
    finally:
        for p in procs:
            if p.returncode is None and p.poll() is None:
                terminate_pid(p.pid, timeout=10, proc=p)
    fits = []
    for i in range(len(data_files)):
        m = re.search(r"FIT_S ([\d.]+)", (workdir / f"client-{i}.log").read_text(errors="replace"))
        fits.append(float(m.group(1)) if m else None)
    return {"clients": len(clients), "peak_rss_mib": [round(c.peak_mib, 1) for c in clients],
            "peak_source": [c.peak_source for c in clients],
            "ru_maxrss_mib": [round(c.ru_maxrss_mib or 0, 1) for c in clients],
            "vmhwm_mib": [round(c.vmhwm_kib / MIB, 1) for c in clients],
            "fit_s": fits, "transport": "legacy gRPC (start_server / start_client)",
            "model": model}


# ----------------------------------------------------------------------------------------------


def machine() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                    .splitlines() if ln.startswith("model name")), "")
    except OSError:
        pass
    mem = 0
    try:
        mem = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                       if ln.startswith("MemTotal")))
    except (OSError, StopIteration):
        pass
    pkgs = {}
    for p in ("jax", "jaxlib", "flax", "numpy", "tenseal", "paho-mqtt", "pydantic",
              "cryptography", "zstandard"):
        try:
            pkgs[p] = version(p)
        except PackageNotFoundError:
            pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    return {"cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "cpu": cpu, "mem_total_gib": round(mem / MIB / MIB, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "packages": pkgs, "fedstream_commit": commit}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="See the module docstring for what exactly is measured.")
    ap.add_argument("--projects", nargs="*", type=Path, default=None,
                    help="project directories (default: every examples/* with [tool.fedstream])")
    ap.add_argument("--devices", type=int, default=2, help="devices per project (default 2: "
                    "the privacy floor k = 2 needs two per region)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds per federation (default 1)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each import measurement")
    ap.add_argument("--flower-python", default=None, help="a python with flwr installed "
                    f"(default: {FLOWER_VENV}/bin/python, created if missing)")
    ap.add_argument("--flower-mode", choices=("round", "import"), default="round",
                    help="round: real Flower clients through one round (default); import: "
                    "only `import flwr.client`")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="logs, keys, data and broker state (default: a temp dir, removed "
                    "after a successful run)")
    ap.add_argument("--json", type=Path, default=None, help="write results here (and a .png)")
    args = ap.parse_args(argv)
    if args.devices < 2:
        ap.error("--devices must be at least 2 (privacy floor k = 2)")
    console = Console(width=150)
    projects = [p.resolve() for p in args.projects] if args.projects else example_projects()
    if not projects:
        ap.error(f"no project with a [tool.fedstream] table under {EXAMPLES}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fedstream-bench-edge-"))
    workdir.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    stmt = "import edge_agent.service"
    result: dict = {"machine": machine(), "config": {
        "devices_per_project": args.devices, "rounds": args.rounds, "repeat": args.repeat,
        "projects": [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)
                     for p in projects]}}
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn()]
    try:
        with Progress(*columns, console=console) as progress:
            steps = 3 + 2 * len(projects) + 3
            task = progress.add_task("imports", total=steps)
            progress.update(task, description=f"import RSS x{args.repeat}: {stmt}")
            runs = import_rss(py, stmt, args.repeat)
            floor = import_rss(py, "pass", args.repeat)
            result["import_rss_mib"] = round(statistics.median(runs), 1)
            result["import_rss_runs_mib"] = [round(r, 1) for r in runs]
            result["interpreter_rss_mib"] = round(statistics.median(floor), 1)
            progress.advance(task)
            progress.update(task, description="python -X importtime")
            it = importtime(py, stmt)
            top = sorted(it, key=lambda r: -r[2])[:10]
            result["importtime_top10"] = [{"module": m, "cumulative_ms": round(c / 1000, 1),
                                           "self_ms": round(s / 1000, 1)} for m, s, c in top]
            progress.advance(task)
            progress.update(task, description="RSS by imported package")
            result["import_rss_by_package_mib"] = import_breakdown(py, [m for m, _, _ in it])
            progress.advance(task)

            from compose.localstack import LocalStack
            progress.update(task, description="starting Mosquitto + Kafka on loopback")
            stack_dir = workdir / "stack"
            stack = LocalStack(["region-0"], workdir=stack_dir, mqtt_autosave_seconds=1)
            info = stack.start()
            per_project = {}
            try:
                for p in projects:
                    try:
                        per_project[p.name] = run_project(p, info, workdir / p.name,
                                                          args.devices, args.rounds, progress,
                                                          task)
                    except Exception as exc:
                        raise BenchError(f"project {p.name} failed: {exc}") from exc
                    r = per_project[p.name]
                    progress.console.log(
                        f"{p.name}: edge peak cold {r['edge_peak_rss_mib_cold']:.0f} / warm "
                        f"{r['edge_peak_rss_mib']:.0f} MiB, model -> first update cold "
                        f"{r['model_to_first_update_s_cold']:.2f} / warm "
                        f"{r['model_to_first_update_s']:.2f} s")
            finally:
                progress.update(task, description="stopping the brokers")
                stack.stop()

            progress.update(task, description="Flower: environment")
            fpy, fver = flower_python(args.flower_python, console)
            progress.update(task, description=f"Flower {fver}: import RSS")
            fimp = import_rss(fpy, "import flwr.client", args.repeat)
            progress.advance(task)
            flower: dict = {"flwr_version": fver, "python": fpy,
                            "import_rss_mib": round(statistics.median(fimp), 1)}
            mode = "import"
            digits = per_project.get("digits")
            files = (list(digits["_data_files"].values()) if digits else [])
            if args.flower_mode == "round":
                progress.update(task, description=f"Flower {fver}: server + "
                                f"{len(files)} numpy clients, one round")
                try:
                    if not files:
                        raise BenchError("no digits device files (digits project not run)")
                    flower["round"] = flower_round(fpy, files, workdir / "flower")
                    mode = "round"
                except Exception as exc:  # keep the bench going with the import number
                    flower["round_error"] = str(exc)
                    progress.console.log(f"[red]Flower round failed, using import RSS: {exc}")
            progress.advance(task)
            progress.update(task, description=f"Flower {fver}: JAX, Flax, optax")
            flower["flax_packages"] = flower_jax(fpy, console)
            if "error" in flower["flax_packages"]:
                flower["flax_error"] = flower["flax_packages"]["error"]
                progress.console.log(f"[red]no Flax Flower client: {flower['flax_error']}")
            elif not files:
                flower["flax_error"] = "no digits device files (digits project not run)"
            else:
                progress.update(task, description=f"Flower {fver}: server + {len(files)} "
                                "Flax clients, one round")
                try:
                    flower["flax_round"] = flower_round(
                        fpy, files, workdir / "flower-flax", _FLOWER_FLAX_CLIENT,
                        "the digits CNN in Flax (edge_agent.models.DigitsCNN), optax sgd",
                        timeout=600)
                except Exception as exc:
                    flower["flax_error"] = str(exc)
                    progress.console.log(f"[red]Flax Flower round failed: {exc}")
            progress.advance(task)
    except BaseException:
        console.print(f"[red]logs kept in {workdir}")
        raise

    for r in per_project.values():
        r.pop("_data_files")
    flower_peak = (max(flower["round"]["peak_rss_mib"]) if mode == "round"
                   else flower["import_rss_mib"])
    flax_peak = (max(flower["flax_round"]["peak_rss_mib"]) if "flax_round" in flower
                 else None)

    def top(key: str) -> float:
        return max(r[key] for r in per_project.values())

    edge_peak, edge_peak_cold = top("edge_peak_rss_mib"), top("edge_peak_rss_mib_cold")
    result = {
        "edge_peak_rss_mib": edge_peak,  # warm: the device's steady state
        "edge_peak_rss_mib_cold": edge_peak_cold,  # a device's first start ever
        "model_to_first_update_s": top("model_to_first_update_s"),
        "model_to_first_update_s_cold": top("model_to_first_update_s_cold"),
        "warm_compiled_nothing": all(c["warm_compiled_nothing"] for r in per_project.values()
                                     for c in r["compile_cache"].values()),
        "import_rss_mib": result.pop("import_rss_mib"),
        "flower_client_peak_rss_mib": flower_peak,  # numpy model
        "flower_mode": mode,
        "edge_vs_flower_rss": round(edge_peak / flower_peak, 2),
        "flower_flax_client_peak_rss_mib": flax_peak,  # the same Flax model as the edge
        "edge_vs_flower_flax_rss": round(edge_peak / flax_peak, 2) if flax_peak else None,
        "edge_cold_vs_flower_flax_rss": (round(edge_peak_cold / flax_peak, 2) if flax_peak
                                         else None),
        **({"flower_flax_error": flower["flax_error"]} if "flax_error" in flower else {}),
        "flower_reference_mib": FLOWER_REFERENCE_MIB,
        "edge_vs_flower_reference": round(edge_peak / FLOWER_REFERENCE_MIB, 2),
        "flower_import_rss_mib": flower["import_rss_mib"],
        **({"flower_round_error": flower["round_error"]} if "round_error" in flower else {}),
        "projects": per_project,
        "flower": flower,
        "bench_process_hwm_mib": round(self_rss_kib() / MIB, 1),
        **result,
    }
    _print(result, console)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        _plot(result, args.json.with_suffix(".png"))
        console.print(f"wrote {args.json} and {args.json.with_suffix('.png')}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _print(result: dict, console: Console) -> None:
    m = result["machine"]
    t = Table(title=f"edge agent footprint ({m['cores']} cores, Python {m['python']}, "
                    f"{result['config']['devices_per_project']} devices, "
                    f"{result['config']['rounds']} round(s) on real brokers; MiB, seconds)")
    cols = ("process", "peak RSS", "init RSS", "idle RSS", "start-up s", "model -> update s",
            "notes")
    for col in cols:
        t.add_column(col, justify="left" if col in ("process", "notes") else "right",
                     no_wrap=col != "notes")

    def row(name: str, peak: str, *rest: str) -> None:
        t.add_row(name, peak, *rest, *[""] * (len(cols) - 2 - len(rest)))

    row("python -c pass", f"{result['interpreter_rss_mib']:.0f}", "", "", "", "", "interpreter")
    row("import edge_agent.service", f"{result['import_rss_mib']:.0f}", "", "", "", "",
        f"median of {result['config']['repeat']}")
    for name, r in result["projects"].items():
        caches = r["compile_cache"].values()
        wrote = max(c["cold"]["entries_after"] for c in caches)
        kib = max(c["cold"]["bytes_after"] for c in caches) / 1024
        new = max(len(c["warm"]["new_entries"]) for c in caches)
        notes = {"cold": f"empty cache: compiled {wrote} programs, {kib:.0f} KiB",
                 "warm": f"cold's cache: {new} programs compiled anew"}
        for cond in ("cold", "warm"):
            c = r[cond]
            bold = "[bold]" if cond == "warm" else ""
            row(f"{bold}edge agent: {name}, {cond}", f"{bold}{c['edge_peak_rss_mib']:.0f}",
                f"{c['edge_ready_rss_mib']:.0f}", f"{c['edge_idle_rss_mib']:.0f}",
                f"{c['startup_s']:.1f}", f"{c['model_to_first_update_s']:.2f}",
                notes[cond] if cond == "cold" else
                f"{notes[cond]}\n({r['model'].split(':')[-1]}, {r['num_params'] or 0:,} params)")
    f = result["flower"]
    row(f"import flwr.client ({f['flwr_version']})", f"{f['import_rss_mib']:.0f}", "", "", "",
        "", "separate venv")
    if "round" in f:
        fr = f["round"]
        fits = [x for x in fr["fit_s"] if x is not None]
        row("Flower client, numpy model", f"{max(fr['peak_rss_mib']):.0f}", "", "", "",
            f"{max(fits):.2f}*" if fits else "",
            "numpy softmax regression, 650 params")
    if "flax_round" in f:
        fr = f["flax_round"]
        fits = [x for x in fr["fit_s"] if x is not None]
        pk = f["flax_packages"]
        row("[bold]Flower client, same Flax model", f"[bold]{max(fr['peak_rss_mib']):.0f}", "",
            "", "", f"{max(fits):.2f}*" if fits else "",
            f"same CNN + optax sgd, jax {pk.get('jax')}\nno compile cache (compiles every start)")
    else:
        row("Flower client, same Flax model", "n/a", "", "", "", "",
            f"[red]not measured: {str(f.get('flax_error', ''))[:200]}")
    row("Flower 1.41 SuperNode + SuperExec", f"~{result['flower_reference_mib']:.0f}", "", "",
        "", "", "the issue's reference")
    row("[bold]edge (warm) / Flower, numpy model", f"[bold]{result['edge_vs_flower_rss']:.2f}x",
        "", "", "", "", f"{result['flower_mode']}; vs the reference "
        f"{result['edge_vs_flower_reference']:.2f}x")
    if result["edge_vs_flower_flax_rss"] is not None:
        row("[bold]edge (warm) / Flower, same Flax model",
            f"[bold]{result['edge_vs_flower_flax_rss']:.2f}x", "", "", "", "",
            f"cold edge / it: {result['edge_cold_vs_flower_flax_rss']:.2f}x")
    console.print(t)
    console.print("Edge rows: max over the devices. cold = each device's first start ever (a fresh empty --compile-cache: it "
                  "compiles its training step); warm = a second federation whose devices get "
                  "the cache the cold run filled (every later start: the steady state).")
    if "round" in f or "flax_round" in f:
        console.print("* Flower: its fit() only (the Flax client's includes its jit "
                      "compilation), not the edge's column (broker -> broker, with HE)")
    bd = result["import_rss_by_package_mib"]["by_package_mib"]
    console.print("RSS added by package on `import edge_agent.service`: " +
                  ", ".join(f"{k} {v:.0f}" for k, v in list(bd.items())[:8]) + " MiB")
    console.print("importtime, top 10 cumulative: " + ", ".join(
        f"{r['module']} {r['cumulative_ms']:.0f} ms" for r in result["importtime_top10"]))


def _plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names, vals, colors = [], [], []
    names.append("import\nedge_agent")
    vals.append(result["import_rss_mib"])
    colors.append("#9ab")
    for n, r in result["projects"].items():
        for cond, color in (("cold", "#9bd"), ("warm", "#36c")):
            names.append(f"edge agent\n{n}, {cond}")
            vals.append(r[cond]["edge_peak_rss_mib"])
            colors.append(color)
    f = result["flower"]
    names.append("import\nflwr.client")
    vals.append(f["import_rss_mib"])
    colors.append("#eb9")
    if "round" in f:
        names.append("Flower client\nnumpy model")
        vals.append(max(f["round"]["peak_rss_mib"]))
        colors.append("#d83")
    if "flax_round" in f:
        names.append("Flower client\nsame Flax model")
        vals.append(max(f["flax_round"]["peak_rss_mib"]))
        colors.append("#a52")
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(21, 5.2),
                                     gridspec_kw={"width_ratios": [3, 1, 1.6]})
    bars = a1.bar(names, vals, color=colors)
    a1.bar_label(bars, fmt="%.0f")
    a1.tick_params(axis="x", labelsize=8)
    a1.axhline(result["flower_reference_mib"], ls="--", color="#a33")
    a1.text(-0.45, result["flower_reference_mib"], "Flower 1.41 SuperNode+SuperExec (issue)",
            ha="left", va="bottom", color="#a33", fontsize=8)
    a1.set_ylabel("peak RSS (MiB)")
    a1.set_title("peak RSS per process (cold: first start, warm: every later start)")
    projs = list(result["projects"])
    xs = range(len(projs))
    for off, cond, color in ((-0.2, "cold", "#9bd"), (0.2, "warm", "#36c")):
        lat = [result["projects"][p][cond]["model_to_first_update_s"] for p in projs]
        b2 = a2.bar([x + off for x in xs], lat, width=0.4, color=color, label=cond)
        a2.bar_label(b2, fmt="%.2f", fontsize=8)
    a2.set_xticks(list(xs), projs)
    a2.legend(fontsize=8)
    a2.set_ylabel("seconds")
    a2.set_title("model arrives -> first update chunk")
    for p, color in zip(projs, ("#36c", "#3a7", "#c63", "#96c")):
        for cond, ls in (("warm", "-"), ("cold", ":")):
            dev, d = next(iter(result["projects"][p][cond]["per_device"].items()))
            tl = d["rss_timeline"]
            a3.plot([x for x, _ in tl], [y for _, y in tl], color=color, ls=ls,
                    label=f"{p} ({dev}), {cond}")
    a3.axvline(0, color="#888", ls=":")
    a3.text(0, a3.get_ylim()[1], " model arrives", color="#666", fontsize=8, va="top")
    a3.axhline(result["import_rss_mib"], color="#9ab", ls="--")
    a3.text(a3.get_xlim()[0], result["import_rss_mib"], " import only", color="#678",
            fontsize=8, va="bottom")
    a3.set_xlabel("seconds since the round-1 model reached the broker")
    a3.set_ylabel("RSS (MiB)")
    a3.set_title("edge agent RSS over its life")
    a3.legend(fontsize=7, loc="lower right")
    m = result["machine"]
    fig.suptitle(f"fedstream edge agent footprint ({m['cores']} cores, Python {m['python']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--prepare"]:  # internal: run_project's child
        prepare(json.loads(sys.argv[2]))
        sys.exit(0)
    try:
        main()
    except BenchError as exc:
        sys.exit(f"bench/edge.py: {exc}")
