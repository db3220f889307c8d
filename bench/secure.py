"""What locking the stack down costs: the same federation open and locked down, side by side.

One run, two conditions, in alternating order over ``--repeat`` runs (this machine is noisy):
the demo project (examples/digits; 2 regions x ``--devices``, CKKS-encrypted) on an open
``LocalStack`` and on a locked-down one (mutual TLS on Mosquitto and Kafka, ACLs, each process
with a key directory of its own). Measured per condition: broker start-up (Kafka format + boot,
Mosquitto; plus, locked down, the certificates), federation set-up (topics, and ACLs when
locked), seconds per round (the time between consecutive model versions as the streaming
consumer sees them, rounds 2.. so that start-up is left out), and whether the final models are
bit-identical (they must be: security changes no number). Prints a table, writes JSON and a PNG.

    python bench/secure.py --json bench/results/secure.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compose.federation import Federation  # noqa: E402
from compose.localstack import LocalStack  # noqa: E402
from global_aggregator.consumer import model_versions  # noqa: E402
from global_aggregator.keygen import fleet, write_keys  # noqa: E402
from schemas.project import load_project  # noqa: E402
from schemas.signing import TrustStore  # noqa: E402

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"


def one_run(secure: bool, devices: int, rounds: int, work: Path) -> dict:
    load_project(DIGITS)
    from digits_fl.data import make_data

    devs = fleet(devices * 2, 2)
    make_data([d for ids in devs.values() for d in ids], work / "data", seed=7, alpha=0.5)
    t0 = time.monotonic()
    stack = LocalStack(list(devs), work / "stack", secure=secure)
    stack.start()
    stack_s = time.monotonic() - t0
    try:
        keys = work / "keys"
        write_keys(keys, devices=devs, pki=stack.pki if secure else None)
        fed = Federation(mqtt=stack.mqtt, kafka=stack.kafka_bootstrap, keys_dir=keys, fleet=devs,
                         workdir=work / "logs", project=DIGITS,
                         data={"path": str(work / "data" / "{device_id}.npz")},
                         namespace=f"bench-{'secure' if secure else 'open'}", secure=secure,
                         admin=stack.kafka_conn,
                         global_args=["--rounds", str(rounds), "--seed", "7"])
        t1 = time.monotonic()
        fed.prepare_kafka()
        setup_s = time.monotonic() - t1
        stamps: list[float] = []
        final = None

        async def follow() -> None:
            nonlocal final
            async for v in model_versions(fed.consumer, TrustStore.load(keys / "trust.json"),
                                          namespace=fed.namespace, idle_timeout_s=300):
                stamps.append(time.monotonic())
                if v.final:
                    final = v.params
                    return

        try:
            fed.start_all()
            asyncio.run(follow())
        finally:
            fed.stop_all()
    finally:
        stack.stop()
    per_round = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # rounds 2.. (no start-up)
    assert final is not None, "no final model"
    return {"stack_start_s": stack_s, "federation_setup_s": setup_s,
            "s_per_round": statistics.median(per_round), "rounds": rounds,
            "final_params": final.tobytes().hex()[:64], "_final": final.tobytes()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--devices", type=int, default=3, help="devices per region (2 regions)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args(argv)
    runs: dict[str, list[dict]] = {"open": [], "locked_down": []}
    for i in range(a.repeat):
        order = (False, True) if i % 2 == 0 else (True, False)
        for secure in order:
            with tempfile.TemporaryDirectory(prefix="fedstream-bench-secure-") as d:
                runs["locked_down" if secure else "open"].append(
                    one_run(secure, a.devices, a.rounds, Path(d)))
    finals = {r.pop("_final") for rs in runs.values() for r in rs}
    summary = {
        name: {k: statistics.median(r[k] for r in rs)
               for k in ("stack_start_s", "federation_setup_s", "s_per_round")}
        for name, rs in runs.items()
    }
    res = {
        "devices": a.devices * 2, "rounds": a.rounds, "repeat": a.repeat, "runs": runs,
        "summary": summary, "identical_final_models": len(finals) == 1,
        "round_time_ratio_locked_over_open": summary["locked_down"]["s_per_round"]
        / summary["open"]["s_per_round"],
    }
    t = Table(title=f"Open vs locked down: digits, {a.devices * 2} devices in 2 regions, "
              f"median of {a.repeat} runs each")
    for col in ("stack", "broker start s", "federation set-up s", "s / round"):
        t.add_column(col)
    for name, s in summary.items():
        t.add_row(name, f"{s['stack_start_s']:.1f}", f"{s['federation_setup_s']:.2f}",
                  f"{s['s_per_round']:.2f}")
    console = Console()
    console.print(t)
    console.print(f"locked down / open, seconds per round: "
                  f"{res['round_time_ratio_locked_over_open']:.2f}; final models identical: "
                  f"{res['identical_final_models']}")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(summary)
    keys = ("stack_start_s", "federation_setup_s", "s_per_round")
    for i, k in enumerate(keys):
        ax.bar([j + i * 0.27 for j in range(len(names))], [summary[n][k] for n in names],
               width=0.27, label=k)
    ax.set_xticks([j + 0.27 for j in range(len(names))], names)
    ax.set_ylabel("seconds")
    ax.set_title("What locking the stack down costs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.json.with_suffix(".png"), dpi=120)
    return 0 if res["identical_final_models"] else 1


if __name__ == "__main__":
    sys.exit(main())
