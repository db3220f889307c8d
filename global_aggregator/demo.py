"""``make demo``: a whole encrypted federation on real local brokers, with a live display.

Starts one Mosquitto per region and a single-node KRaft Kafka on loopback, generates keys, runs
3 regional aggregators, the global aggregator and 3 x 4 edge agents as separate processes
(digits, Dirichlet non-IID, CKKS-encrypted 8-bit updates), follows the model topic as a streaming
consumer would, shows one line per round, writes ``runs/demo/demo.png`` and stops everything it
started.
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
from global_aggregator.consumer import model_versions
from global_aggregator.keygen import fleet, write_keys
from global_aggregator.plots import plot_rounds
from schemas.signing import TrustStore

# Settings that reach >= 90% on digits with 12 non-IID agents (see bench/simulate.py).
DEMO_TRAIN = ["--local-lr", "0.1", "--local-epochs", "2", "--batch-size", "16"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="fedstream-demo",
        description="Run an encrypted federation (regions x agents as separate processes) on a "
        "local Mosquitto + Kafka, show each round live, plot the result, stop everything.",
    )
    ap.add_argument("--regions", type=int, default=3)
    ap.add_argument("--agents-per-region", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew alpha")
    ap.add_argument("--strategy", default="fedavg")
    ap.add_argument("--plaintext", action="store_true", help="no HE (trusted deployments)")
    ap.add_argument("--out", type=Path, default=Path("runs/demo"), help="logs, keys and plot")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    console = Console()
    num_agents = a.regions * a.agents_per_region
    a.out.mkdir(parents=True, exist_ok=True)
    regions = [f"region-{r}" for r in range(a.regions)]

    console.print(f"[bold]fedstream demo[/]: {a.regions} regions x {a.agents_per_region} agents, "
                  f"{a.rounds} rounds, digits Dirichlet({a.alpha}), "
                  f"{'plaintext' if a.plaintext else 'CKKS-encrypted'} 8-bit updates")
    with console.status(f"starting Mosquitto x{a.regions} and Kafka (KRaft) on loopback"):
        stack = LocalStack(regions, workdir=a.out / "stack", mqtt_autosave_seconds=1)
        info = stack.start()
    fed = None
    try:
        keys = a.out / f"keys-{uuid.uuid4().hex[:6]}"
        summary = write_keys(keys, num_agents, a.regions)
        console.print(f"keys in {keys} (HE fingerprint {summary['he_fingerprint'][:16]}...)")
        assert info.kafka_bootstrap is not None  # the demo's stack always runs Kafka
        fed = Federation(
            mqtt=info.mqtt, kafka=info.kafka_bootstrap, keys_dir=keys,
            fleet=fleet(num_agents, a.regions), workdir=a.out / "logs",
            namespace=f"demo-{uuid.uuid4().hex[:6]}",
            global_args=["--rounds", str(a.rounds), "--strategy", a.strategy,
                         "--seed", str(a.seed), "--deadline-s", "120",
                         "--min-participants", "1", *DEMO_TRAIN,
                         *(["--plaintext"] if a.plaintext else [])],
            edge_args=["--alpha", str(a.alpha), "--data-seed", str(a.seed)],
        )
        fed.start_all()
        history = asyncio.run(_follow(fed, TrustStore.load(keys / "trust.json"), a.rounds, console))
    finally:
        with console.status("stopping every process the demo started"):
            if fed is not None:
                fed.stop_all()
            stack.stop()
    (a.out / "history.json").write_text(json.dumps(history, indent=2))
    png = plot_rounds(history, a.out / "demo.png",
                      title=f"fedstream demo: {num_agents} agents in {a.regions} regions")
    table = Table("round", "version", "participants", "excluded", "server acc", "uplink MB",
                  "model KB", title="rounds")
    for h in history:
        table.add_row(str(h["round"]), str(h["version"]), str(int(h["participants"])),
                      str(int(h.get("excluded_agents", 0))), f"{h['server_accuracy']:.3f}",
                      f"{h['update_bytes'] / 1e6:.2f}", f"{h['model_bytes'] / 1e3:.0f}")
    console.print(table)
    console.print(f"plot: {png}   history: {a.out / 'history.json'}   logs: {a.out / 'logs'}")


async def _follow(fed: Federation, trust: TrustStore, rounds: int, console: Console) -> list[dict]:
    history: list[dict] = []
    columns = [TextColumn("[bold]round"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}")]
    t0 = time.time()
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("waiting for model v0", total=rounds)
        async for v in model_versions(fed.kafka, trust, namespace=fed.namespace,
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
                description=f"acc {m['server_accuracy']:.3f}  participants "
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
