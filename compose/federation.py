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
from schemas.kafka import ensure_topics
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

    @property
    def fleet_ids(self) -> list[str]:
        return sorted(d for ids in self.fleet.values() for d in ids)

    @property
    def num_agents(self) -> int:
        return sum(len(a) for a in self.fleet.values())

    def _cmd(self, name: str) -> list[str]:
        py = [sys.executable, "-m"]
        common = ["--namespace", self.namespace, "--keys", str(self.keys_dir)]
        extra = self.per_process_args.get(name, [])
        if name == "global":
            return [*py, "global_aggregator.cli", "--kafka", self.kafka, *common,
                    "--project", str(self.project), *self.global_args, *extra]
        if name in self.fleet:
            host, port = self.mqtt[name]
            return [*py, "regional_aggregator.cli", "--region", name, "--mqtt", f"{host}:{port}",
                    "--kafka", self.kafka, *common, *self.regional_args, *extra]
        region = next(r for r, agents in self.fleet.items() if name in agents)
        host, port = self.mqtt[region]
        data = [a for k, v in self.data.items() for a in ("--data", f"{k}={v}")]
        return [*py, "edge_agent.cli", "--device-id", name, "--mqtt", f"{host}:{port}", *common,
                "--project", str(self.project), *data, *self.edge_args, *extra]

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
        asyncio.run(ensure_topics(self.kafka, Topics(self.namespace)))
        for region in self.fleet:
            if region not in skip:
                self.start(region)
        self.start("global")
        for agents in self.fleet.values():
            for agent in agents:
                if agent not in skip:
                    self.start(agent)

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
