"""Benchmark: encrypted 8-bit aggregation against plaintext float32 on non-IID digits.

Digits, Dirichlet(0.5) label skew, 20 agents in 4 regions, the default SimConfig's local training
and FedAvg. Runs the float32 reference (no codec) and the CKKS-encrypted 8-bit pipeline (real
codec, RegionalSum per region, GlobalRound, server step) with the same seeds; prints a rich table
and writes JSON with final accuracy, rounds to 90 %, uplink bytes and mean seconds per round split
into local training, encode, regional sum, global decode and server step.

Usage:
    python bench/simulate.py --json bench-simulate.json [--rounds 25] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from global_aggregator.simulation import BENCH_DIGITS, SimConfig, rounds_to_reach, simulate

PHASES = ("train", "encode", "regional_sum", "global_decode", "server_step")


def run(cfg: SimConfig) -> dict:
    t0 = time.perf_counter()
    result = simulate(cfg)
    wall = time.perf_counter() - t0
    h = result.history
    return {
        "final_accuracy": h[-1]["accuracy"],
        "final_loss": h[-1]["loss"],
        "final_fed_accuracy": h[-1].get("fed_accuracy"),
        "rounds_to_90": rounds_to_reach(h, 0.90),
        "mean_bytes_up_per_round": float(np.mean([e["bytes_up"] for e in h])),
        "mean_seconds_per_round": {p: float(np.mean([e["timings"][p] for e in h])) for p in PHASES},
        "wall_seconds": wall,
        "num_params": result.spec.num_params,
        "accuracy_per_round": [e["accuracy"] for e in h],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True, help="where to write the results")
    p.add_argument("--rounds", type=int, default=BENCH_DIGITS["rounds"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    base = SimConfig(**{**BENCH_DIGITS, "rounds": args.rounds}, seed=args.seed)
    runs = {
        "plaintext_float32": dataclasses.replace(base, float_mode=True, encrypted=False),
        "encrypted_8bit": dataclasses.replace(base, encrypted=True, bits=8),
    }
    console = Console(width=max(Console().width, 130))
    results = {}
    for name, cfg in runs.items():
        with console.status(f"running {name} ({cfg.rounds} rounds)"):
            results[name] = run(cfg)

    table = Table(title=f"digits, Dirichlet(0.5), 20 agents / 4 regions, {args.rounds} rounds, "
                  f"{results['encrypted_8bit']['num_params']} params")
    table.add_column("run", no_wrap=True, min_width=17)
    for col in ("final acc", "rounds→90%", "MB up/round", *(f"{p} s" for p in PHASES)):
        table.add_column(col, justify="right")
    for name, r in results.items():
        t = r["mean_seconds_per_round"]
        table.add_row(
            name, f"{r['final_accuracy']:.4f}", str(r["rounds_to_90"]),
            f"{r['mean_bytes_up_per_round'] / 1e6:.2f}", *(f"{t[p]:.4f}" for p in PHASES),
        )
    console.print(table)
    out = {
        "benchmark": "simulate",
        "config": base.to_dict(),
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
        "accuracy_gap": results["plaintext_float32"]["final_accuracy"]
        - results["encrypted_8bit"]["final_accuracy"],
        **results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
