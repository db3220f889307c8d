"""Run a whole federation as separate OS processes on the local stack (demo, e2e, faults, bench).

Each service is its own ``python -m <package>.cli`` process with its log in the work directory,
exactly as a deployment would run it; this module only starts, kills (by pid) and restarts them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from compose.localstack import terminate_pid
from schemas.kafka import KafkaConn, ensure_topics
from schemas.keyring import GLOBAL_ID, export_identity, kafka_tls, tls_files
from schemas.topics import Topics


@dataclass
class Federation:
    """The processes of one federation.

    Args:
        mqtt: region -> (host, port) of its broker.
        kafka: Kafka bootstrap servers.
        keys_dir: output of fedstream-keygen.
        fleet: region -> device ids.
        workdir: where logs go.
        project: the federation's project directory (global and devices read it).
        data: loader settings every device passes with ``--data`` ("{device_id}" expands).
        namespace: topic namespace (unique per test).
        global_args / regional_args / edge_args: extra CLI flags for each kind of service.
        admin: how to reach Kafka as its administrator (topics, ACLs); plaintext if None.
        own_keys: processes that bring their own key directory (a device enrolled with
            ``fedstream-device init`` and ``fedstream-fleet enrol``).
        replicas: region -> replica names: that region is served by several regional
            aggregators (``--replica``), processes ``<region>@<replica>``.
        secure: run locked down (brokers with mutual TLS and ACLs, e.g. ``LocalStack(secure=
            True)``): every service gets a key directory of its own holding only its own
            secrets (:func:`schemas.keyring.export_identity`) and its TLS flags, and
            :meth:`start_all` grants the federation's Kafka ACLs.
    """

    mqtt: dict[str, tuple[str, int]]
    kafka: str
    keys_dir: Path
    fleet: dict[str, list[str]]
    workdir: Path
    project: Path = Path(__file__).resolve().parents[1] / "examples" / "digits"
    data: dict[str, str] = field(default_factory=dict)
    namespace: str = "fedstream"
    global_args: list[str] = field(default_factory=list)
    regional_args: list[str] = field(default_factory=list)
    edge_args: list[str] = field(default_factory=list)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    per_process_args: dict[str, list[str]] = field(default_factory=dict)
    admin: KafkaConn | None = None
    secure: bool = False
    own_keys: dict[str, Path] = field(default_factory=dict)
    replicas: dict[str, list[str]] = field(default_factory=dict)

    @property
    def aggregators(self) -> list[str]:
        """The regional aggregators' process names: a region, or its replicas."""
        return [f"{r}@{x}" for r in self.fleet for x in self.replicas[r]] if self.replicas \
            else list(self.fleet)

    def _identity(self, name: str) -> str:
        """The identity a process runs as (a replica runs as its region)."""
        return name.partition("@")[0]

    @property
    def fleet_ids(self) -> list[str]:
        return sorted(d for ids in self.fleet.values() for d in ids)

    @property
    def num_agents(self) -> int:
        return sum(len(a) for a in self.fleet.values())

    @property
    def consumer(self) -> KafkaConn:
        """How a streaming consumer of this federation's models reaches Kafka (in secure mode
        as the ``consumer`` identity, which may read the model topic and nothing else)."""
        return KafkaConn(self.kafka, kafka_tls(self.keys_dir, "consumer") if self.secure else None)

    def keys_of(self, name: str) -> Path:
        """The key directory ``name`` runs with: in secure mode its own (only its secrets)."""
        name = self._identity(name)
        if name in self.own_keys:
            return self.own_keys[name]
        if not self.secure:
            return self.keys_dir
        own = self.workdir / "keys" / name
        if not own.exists():
            export_identity(self.keys_dir, name, own)
        return own

    def _tls_args(self, name: str, region: str | None) -> list[str]:
        """``name``'s TLS flags in secure mode: Kafka for the global and the regions, MQTT
        (its region's CA) for the regions and the devices."""
        if not self.secure:
            return []
        keys, args = self.keys_of(name), []
        if region is None or name == region:
            k = kafka_tls(keys, name)
            args += ["--kafka-ca-file", str(k.ca), "--kafka-cert-file", str(k.cert),
                     "--kafka-key-file", str(k.key)]
        if region is not None:
            m = tls_files(keys, name, "mqtt", region)
            args += ["--mqtt-ca-file", str(m.ca), "--mqtt-cert-file", str(m.cert),
                     "--mqtt-key-file", str(m.key)]
        return args

    def _cmd(self, name: str) -> list[str]:
        py = [sys.executable, "-m"]
        common = ["--namespace", self.namespace, "--keys", str(self.keys_of(name))]
        extra = self.per_process_args.get(name, [])
        if name == GLOBAL_ID:
            return [*py, "global_aggregator.cli", "--kafka", self.kafka, *common,
                    *self._tls_args(name, None), "--project", str(self.project),
                    *self.global_args, *extra]
        region, _, replica = name.partition("@")
        if region in self.fleet:
            host, port = self.mqtt[region]
            return [*py, "regional_aggregator.cli", "--region", region, "--mqtt",
                    f"{host}:{port}", "--kafka", self.kafka, *common,
                    *self._tls_args(region, region), *self.regional_args,
                    *(["--replica", replica] if replica else []), *extra]
        region = next(r for r, agents in self.fleet.items() if name in agents)
        host, port = self.mqtt[region]
        data = [a for k, v in self.data.items() for a in ("--data", f"{k}={v}")]
        return [*py, "edge_agent.cli", "--device-id", name, "--mqtt", f"{host}:{port}", *common,
                *self._tls_args(name, region), "--project", str(self.project), *data,
                *self.edge_args, *extra]

    def start(self, name: str) -> subprocess.Popen:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / f"{name}.log", "ab")
        # same JAX/XLA settings as the test process, so numbers match the simulation bit for bit
        env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
        proc = subprocess.Popen(self._cmd(name), stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=Path(__file__).resolve().parents[1], start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def start_all(self, skip: tuple[str, ...] = ()) -> None:
        """Topics, then regional aggregators, then the global, then the edge agents (all but
        ``skip``: a test may run a process of its own in their place)."""
        self.prepare_kafka()
        for name in self.aggregators:
            if name not in skip:
                self.start(name)
        self.start("global")
        for agents in self.fleet.values():
            for agent in agents:
                if agent not in skip:
                    self.start(agent)

    def prepare_kafka(self) -> None:
        """As Kafka's administrator: the federation's topics and, in secure mode, its ACLs."""
        admin = self.admin or KafkaConn(self.kafka)
        asyncio.run(ensure_topics(admin, Topics(self.namespace)))
        if self.secure:
            from compose.kafka_security import apply_acls, federation_acls

            apply_acls(admin, federation_acls(self.namespace, list(self.fleet)))

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.kill(proc.pid, sig)
            proc.wait(timeout=30)

    def restart(self, name: str) -> subprocess.Popen:
        self.kill(name)
        return self.start(name)

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def wait(self, name: str, timeout: float) -> int:
        return self.procs[name].wait(timeout=timeout)

    def log(self, name: str, tail: int = 60) -> str:
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-tail:])

    def stop_all(self) -> None:
        for _name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                terminate_pid(proc.pid, timeout=10, proc=proc)
