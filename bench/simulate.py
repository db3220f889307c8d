"""Benchmark: encrypted aggregation against plaintext float32 on non-IID digits, and the
accuracy cost of every quantization width with and without the random rotation.

Digits, Dirichlet(0.5) label skew, 20 agents in 4 regions, the default SimConfig's local training
and FedAvg. Runs the float32 reference (no codec), the CKKS-encrypted pipeline (real codec,
RegionalSum per region, GlobalRound, server step) at 8 bits and at the default width, with the
same seeds; prints a rich table and writes JSON with final accuracy, rounds to 90 %, uplink bytes
and mean seconds per round split into local training, encode, regional sum, global decode and
server step.

The bit-width sweep (``bits_sweep`` in the JSON, a table and a PNG): final accuracy for
bits in {2, 3, 4, 5, 6, 8}, rotated and not, averaged over ``--seeds`` seeds, against float32
FedAvg on the same seeds. It runs the codec in its plaintext integer mode: the encrypted mode
decodes the same integer sums bit for bit (tests/unit/test_codec.py), so the accuracy is the same
and the sweep runs in minutes. ``cost_points`` = 100 x (float32 - quantized) accuracy.

Usage:
    python bench/simulate.py --json bench-simulate.json [--rounds 25] [--seed 0] [--seeds 2]
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
from rich.progress import Progress
from rich.table import Table

from global_aggregator.simulation import BENCH_DIGITS, SimConfig, rounds_to_reach, simulate

PHASES = ("train", "encode", "regional_sum", "global_decode", "server_step")
SWEEP_BITS = (2, 3, 4, 5, 6, 8)
#: The accuracy goal of a bit width: at most this many points below float32 FedAvg.
GOAL_POINTS = 1.0


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
    p.add_argument("--seeds", type=int, default=2, help="seeds of the bit-width sweep")
    args = p.parse_args(argv)

    base = SimConfig(**{**BENCH_DIGITS, "rounds": args.rounds}, seed=args.seed)
    runs = {
        "plaintext_float32": dataclasses.replace(base, float_mode=True, encrypted=False),
        "encrypted_8bit": dataclasses.replace(base, encrypted=True, bits=8),
        f"encrypted_{base.bits}bit_default": dataclasses.replace(base, encrypted=True),
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
    sweep = bits_sweep(base, args.seeds, console)
    out = {
        "benchmark": "simulate",
        "config": base.to_dict(),
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
        "accuracy_gap": results["plaintext_float32"]["final_accuracy"]
        - results["encrypted_8bit"]["final_accuracy"],
        **results,
        "bits_sweep": sweep,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    plot_sweep(sweep, args.json.with_name(args.json.stem + "_bits.png"))
    console.print(f"wrote {args.json}")
    return 0


def bits_sweep(base: SimConfig, seeds: int, console: Console) -> dict:
    """Final accuracy per bit width, rotated and plain, averaged over ``seeds`` seeds."""
    plain = dataclasses.replace(base, encrypted=False)
    grid = {"float32": [dataclasses.replace(plain, float_mode=True, seed=s) for s in range(seeds)]}
    for rot in ("rotated", "plain"):
        for b in SWEEP_BITS:
            grid[f"{rot}/{b}"] = [dataclasses.replace(plain, bits=b, rotate=rot == "rotated",
                                                      seed=s) for s in range(seeds)]
    acc: dict[str, float] = {}
    with Progress(console=console) as bar:
        task = bar.add_task("bit-width sweep", total=sum(map(len, grid.values())))
        for name, cfgs in grid.items():
            finals = []
            for cfg in cfgs:
                finals.append(simulate(cfg).history[-1]["accuracy"])
                bar.advance(task)
            acc[name] = float(np.mean(finals))
    ref = acc["float32"]
    out: dict = {"float32": ref, "seeds": seeds, "goal_points": GOAL_POINTS}
    for rot in ("rotated", "plain"):
        out[rot] = {str(b): acc[f"{rot}/{b}"] for b in SWEEP_BITS}
        out[f"{rot}_cost_points"] = {str(b): 100 * (ref - acc[f"{rot}/{b}"]) for b in SWEEP_BITS}
    within = [b for b in SWEEP_BITS if out["rotated_cost_points"][str(b)] <= GOAL_POINTS]
    out["smallest_bits_within_goal"] = min(within) if within else None
    table = Table(title=f"accuracy per bit width ({seeds} seeds, float32 FedAvg {ref:.4f})")
    table.add_column("bits", justify="right")
    for col in ("rotated", "cost (pts)", "not rotated", "cost (pts)"):
        table.add_column(col, justify="right")
    for b in SWEEP_BITS:
        k = str(b)
        table.add_row(k, f"{out['rotated'][k]:.4f}", f"{out['rotated_cost_points'][k]:+.2f}",
                      f"{out['plain'][k]:.4f}", f"{out['plain_cost_points'][k]:+.2f}")
    console.print(table)
    return out


def plot_sweep(sweep: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for rot, style in (("rotated", "o-"), ("plain", "s--")):
        ax.plot(SWEEP_BITS, [sweep[rot][str(b)] for b in SWEEP_BITS], style, label=rot)
    ax.axhline(sweep["float32"], color="k", lw=1, label="float32 FedAvg")
    ax.axhline(sweep["float32"] - GOAL_POINTS / 100, color="r", lw=1, ls=":",
               label=f"goal: -{GOAL_POINTS:g} point")
    ax.set_xlabel("bits per value")
    ax.set_ylabel("final accuracy (digits)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
