"""``make demo``: a whole encrypted federation of a project on real local brokers, live.

Runs a project (default ``examples/digits``: 3 regions x 4 devices, Dirichlet non-IID digits,
CKKS-encrypted 8-bit updates in 100 kB chunks): writes the demo data of its simulated fleet
(``[tool.fedstream.simulation] data``), starts one Mosquitto per region and a single-node KRaft
Kafka on loopback, generates keys for the fleet, runs the regional aggregators, the global
aggregator and the devices as separate processes, follows the model topic as a streaming
consumer would, shows one line per round, writes ``runs/demo/demo.png`` and stops everything it
started. A project without a server-side evaluation set is judged by its devices' own test sets
(the demo turns on ``--report-eval``).

Locked down by default (``--insecure`` turns it off): the brokers speak only mutual TLS with
certificates from the deployment's CAs, Mosquitto and Kafka enforce their ACLs, and every
process runs with a key directory holding only its own secrets (docs/security.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from compose.federation import Federation
from compose.localstack import LocalStack
from compose.monitoring import monitor_federation
from edge_agent.models import resolve
from global_aggregator.consumer import model_versions
from global_aggregator.keygen import write_keys
from global_aggregator.plots import plot_rounds
from schemas.pki import Pki
from schemas.project import load_project
from schemas.signing import TrustStore

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="fedstream-demo",
        description="Run an encrypted federation (regions x agents as separate processes) on a "
        "local Mosquitto + Kafka, show each round live, plot the result, stop everything.",
    )
    ap.add_argument("--project", type=Path, default=EXAMPLES / "digits",
                    help="the project to federate (default: examples/digits)")
    ap.add_argument("--rounds", type=int, default=None, help="default: the project's")
    ap.add_argument("--plaintext", action="store_true", help="no HE (trusted deployments)")
    ap.add_argument("--insecure", action="store_true",
                    help="open brokers: no TLS, no client certificates, no ACLs (default: "
                    "locked down)")
    ap.add_argument("--out", type=Path, default=Path("runs/demo"), help="logs, keys and plot")
    ap.add_argument("--seed", type=int, default=0, help="demo data seed")
    a = ap.parse_args(argv)
    console = Console()
    try:
        project = load_project(a.project)
        devices = project.table.simulation.fleet()
    except ValueError as exc:
        ap.error(str(exc))
    rounds = a.rounds or project.federation.rounds
    num_agents = sum(map(len, devices.values()))
    a.out.mkdir(parents=True, exist_ok=True)
    regions = list(devices)
    codec = project.federation.codec
    console.print(f"[bold]fedstream demo[/]: project {project.name} {project.version}, "
                  f"{len(regions)} regions, {num_agents} devices, {rounds} rounds, "
                  f"{'plaintext' if a.plaintext else 'CKKS-encrypted'} {codec.bits}-bit updates "
                  f"in {codec.chunk_bytes // 1000} kB chunks")
    if project.table.simulation.data:
        resolve(project.table.simulation.data, "demo data")(
            [d for ids in devices.values() for d in ids], project.root / "data", a.seed)
    keys = a.out / f"keys-{uuid.uuid4().hex[:6]}"
    summary = write_keys(keys, devices=devices)
    console.print(f"keys in {keys} (HE fingerprint {summary['he_fingerprint'][:16]}...)")
    namespace = f"demo-{uuid.uuid4().hex[:6]}"
    secure = not a.insecure
    mode = "locked down: mutual TLS + ACLs" if secure else "OPEN: no TLS, no ACLs"
    with console.status(f"starting Mosquitto x{len(regions)} and Kafka (KRaft) on loopback, "
                        f"{mode}"):
        # the brokers' certificates come from the deployment's own CAs (keys/ca)
        stack = LocalStack(regions, workdir=a.out / "stack", mqtt_autosave_seconds=1,
                           secure=secure, pki=Pki(keys / "ca", keys / "tls"),
                           namespaces=[namespace])
        info = stack.start()
    console.print(f"brokers up, {mode}")
    fed = monitoring = None
    try:
        assert info.kafka_bootstrap is not None  # the demo's stack always runs Kafka
        fed = Federation(
            mqtt=info.mqtt, kafka=info.kafka_bootstrap, keys_dir=keys,
            fleet=devices, workdir=a.out / "logs", project=project.root,
            namespace=namespace, secure=secure,
            admin=stack.kafka_conn,
            global_args=["--rounds", str(rounds), "--min-participants", "1",
                         *(["--no-codec.encrypted"] if a.plaintext else [])],
            edge_args=[] if project.table.server_eval else ["--report-eval"],
        )
        # Prometheus + Alertmanager scrape every process (compose/monitoring.py)
        monitoring = monitor_federation(fed, a.out / "monitoring", console.print)
        fed.start_all()
        history = asyncio.run(_follow(fed, TrustStore.load(keys / "trust.json"), rounds,
                                      console))
    finally:
        with console.status("stopping every process the demo started"):
            if fed is not None:
                fed.stop_all()
            stack.stop()
            if monitoring is not None:
                monitoring.stop()
    (a.out / "history.json").write_text(json.dumps(history, indent=2))
    png = plot_rounds(history, a.out / "demo.png",
                      title=f"fedstream demo: {project.name}, {num_agents} devices in "
                      f"{len(regions)} regions")
    table = Table("round", "version", "participants", "excluded", "accuracy", "uplink MB",
                  "model KB", title="rounds")
    for h in history:
        table.add_row(str(h["round"]), str(h["version"]), str(int(h["participants"])),
                      str(int(h.get("excluded_agents", 0))), f"{accuracy(h):.3f}",
                      f"{h['update_bytes'] / 1e6:.2f}", f"{h['model_bytes'] / 1e3:.0f}")
    console.print(table)
    console.print(f"plot: {png}   history: {a.out / 'history.json'}   logs: {a.out / 'logs'}")


def accuracy(metrics: dict) -> float:
    """The server's accuracy, else the devices' federated accuracy (NaN if neither)."""
    return float(metrics.get("server_accuracy", metrics.get("federated_accuracy", float("nan"))))


async def _follow(fed: Federation, trust: TrustStore, rounds: int,
                  console: Console) -> list[dict]:
    history: list[dict] = []
    columns = [TextColumn("[bold]round"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}")]
    t0 = time.time()
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("waiting for model v0", total=rounds)
        async for v in model_versions(fed.consumer, trust, namespace=fed.namespace,
                                      idle_timeout_s=600):
            if v.version == 0:
                progress.update(bar, description="v0 published; agents training round 1")
                continue
            m = v.metrics
            row = {"round": v.round, "version": v.version, "seconds": time.time() - t0,
                   "model_bytes": len(v.message.params), **m}
            history.append(row)
            progress.update(
                bar, completed=v.round,
                description=f"acc {accuracy(m):.3f}  participants "
                f"{int(m['participants'])}/{fed.num_agents}  uplink "
                f"{m['update_bytes'] / 1e6:.2f} MB",
            )
            if v.final:
                break
            dead = [n for n in fed.procs if n in ("global", *fed.fleet) and not fed.alive(n)]
            if dead:
                raise RuntimeError(f"{dead} exited early; see {fed.workdir}:\n" + fed.log(dead[0]))
    return history


if __name__ == "__main__":
    main()
