"""Benchmark: what one stolen device can still do to a round inside the decode bounds.

Digits, Dirichlet(0.5), 8 agents in 2 regions (4 each), privacy floor k = 2, FedAvg, clip 2.0 /
0.1, 8 bits: the adversarial test suite's federation. One device (agent-005) is hostile and, as
the worst case, knows every honest update of the round. Scenarios, side by side in one run:

* ``honest``: nobody attacks (the reference);
* ``inbound``: the thief sends ``-beta * h`` (h = the honest sum of the round) with the largest
  ``beta`` for which its group AND the total still pass :func:`schemas.verify.check_sum` (binary
  search on the real bound), with its true weight: the strongest pull backwards the bounds allow;
* ``unbounded``: every lane at -600 (the measured poison of the issue), as the aggregation was
  before the bounds (no L2 check, lane check on the total only): what the bounds prevent;
* ``bounded-600``: the same poison against today's aggregation: its group is excluded.

The integer sums are the codec's (plaintext mode: CKKS decodes to the same integers bit for bit,
see tests/unit/test_codec.py), so the numbers are exact. Prints a table, writes JSON and a PNG.

Usage:
    python bench/poison.py --json bench/results/poison.json [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from edge_agent.train import LocalTrainConfig, evaluate, local_seed, train_local
from global_aggregator.datasets import agent_dataset, server_test_set
from global_aggregator.simulation import SimConfig, initial_model
from global_aggregator.strategies import init_state, make_server_optimizer, server_step
from regional_aggregator.summing import deal_groups
from schemas.codec import Codec, CodecParams, update_seed
from schemas.errors import BoundsExceeded
from schemas.verify import check_sum

AGENTS, REGIONS, K, THIEF = 8, 2, 2, 5
SCENARIOS = ("honest", "inbound", "unbounded", "bounded-600")


def _passes(codec: Codec, q: np.ndarray, weight: int, n: int) -> bool:
    try:
        check_sum(codec, q, weight, summands=n, clear_weight=weight)
    except BoundsExceeded:
        return False
    return int(np.abs(q).max()) <= n * 127


def _inbound(codec, honest_q, weights, group_mates, all_ids) -> np.ndarray:
    """The largest ``-beta * h`` (int64) the thief can send without any check failing."""
    h = sum(honest_q[i] for i in all_ids if i != THIEF)
    g = sum((honest_q[i] for i in group_mates), np.zeros_like(h))
    w_all = sum(weights[i] for i in all_ids)
    w_g = sum(weights[i] for i in group_mates) + weights[THIEF]

    def ok(beta: float) -> bool:
        qa = np.rint(-beta * h).astype(np.int64)
        if int(np.abs(qa).max()) > 127:
            return False
        return _passes(codec, g + qa, w_g, len(group_mates) + 1) and \
            _passes(codec, h + qa, w_all, len(all_ids))

    lo, hi = 0.0, 1.0
    while ok(hi) and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return np.rint(-lo * h).astype(np.int64)


def run(rounds: int, seed: int) -> dict:
    # the adversarial suite's federation (tests/e2e/helpers.py: sim_config)
    local = LocalTrainConfig(optimizer="momentum", lr=0.05, epochs=1, batch_size=16)
    cfg = SimConfig(num_agents=AGENTS, num_regions=REGIONS, rounds=rounds, seed=seed, alpha=0.5,
                    encrypted=False, clip_l2=2.0, clip_coord=0.1, local=local)
    params0, spec = initial_model(cfg)
    codec = Codec(CodecParams(bits=8, clip_l2=cfg.clip_l2, clip_coord=cfg.clip_coord,
                              encrypted=False), spec.num_params)
    shards = [agent_dataset(cfg.task, i, AGENTS, cfg.partition, cfg.alpha, cfg.seed)
              for i in range(AGENTS)]
    x_test, y_test = server_test_set(cfg.task, cfg.seed)
    region_of = [i * REGIONS // AGENTS for i in range(AGENTS)]
    opt = make_server_optimizer(cfg.strategy)
    out: dict = {}
    for scenario in SCENARIOS:
        params, state = params0.copy(), init_state(opt, params0)
        acc, dev, excluded = [], [], 0
        for r in range(1, rounds + 1):
            q, w = {}, {}
            for i in range(AGENTS):
                aid = f"agent-{i:03d}"
                x, y, _, _ = shards[i]
                delta, n, _ = train_local(spec, params, x, y, local, local_seed(cfg.seed, r, aid))
                q[i] = codec.quantize_update(delta, n, update_seed(cfg.seed, r, aid))
                w[i] = codec.weight(n)
            ids = list(range(AGENTS))
            honest_avg = codec.average(sum(q[i] for i in ids), sum(w.values()))
            region = [i for i in ids if region_of[i] == region_of[THIEF]]
            deal = deal_groups([f"agent-{i:03d}" for i in region], K, 8, cfg.seed, r,
                               f"region-{region_of[THIEF]}")
            mates = [i for i in region if i != THIEF
                     and deal[f"agent-{i:03d}"] == deal[f"agent-{THIEF:03d}"]]
            kept = ids
            if scenario == "inbound":
                q[THIEF] = _inbound(codec, q, w, mates, ids)
            elif scenario in ("unbounded", "bounded-600"):
                q[THIEF] = np.full(spec.num_params, -600, np.int64)
            if scenario == "bounded-600":
                group = [*mates, THIEF]
                if not _passes(codec, sum(q[i] for i in group), sum(w[i] for i in group),
                               len(group)):
                    kept = [i for i in ids if i not in group]
                    excluded += len(group)
            avg = codec.average(sum(q[i] for i in kept), sum(w[i] for i in kept))
            if scenario == "inbound":  # the bound holds for the total the thief got through
                assert _passes(codec, sum(q[i] for i in kept), sum(w[i] for i in kept), len(kept))
            dev.append(float(np.linalg.norm(avg.astype(np.float64) - honest_avg) / cfg.clip_l2))
            params, state = server_step(opt, params, state, avg)
            acc.append(evaluate(spec, params, x_test, y_test)["accuracy"])
        out[scenario] = {"accuracy_per_round": acc, "final_accuracy": acc[-1],
                         "max_deviation_over_clip": max(dev),
                         "mean_deviation_over_clip": float(np.mean(dev)),
                         "excluded_agent_rounds": excluded}
    return {"config": {"agents": AGENTS, "regions": REGIONS, "k": K, "rounds": rounds,
                       "clip_l2": cfg.clip_l2, "clip_coord": cfg.clip_coord, "bits": 8,
                       "seed": seed, "num_params": spec.num_params,
                       "machine": platform.machine()}, "scenarios": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)
    res = run(a.rounds, a.seed)
    t = Table(title="One stolen device per round (8 agents, k = 2, clip_l2 = 2.0)")
    for col in ("scenario", "final accuracy", "max ||avg - honest avg|| / clip_l2",
                "mean", "agent-rounds excluded"):
        t.add_column(col)
    for name, s in res["scenarios"].items():
        t.add_row(name, f"{s['final_accuracy']:.4f}", f"{s['max_deviation_over_clip']:.3f}",
                  f"{s['mean_deviation_over_clip']:.3f}", str(s["excluded_agent_rounds"]))
    Console().print(t)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, s in res["scenarios"].items():
        ax.plot(range(1, len(s["accuracy_per_round"]) + 1), s["accuracy_per_round"], label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("server test accuracy")
    ax.set_title("A stolen device inside the bounds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.json.with_suffix(".png"), dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
