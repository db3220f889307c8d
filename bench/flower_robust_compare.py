"""fedstream's robust aggregation rules against Flower's reference implementations.

Builds ``--sets`` seeded random rounds (``--clients`` devices x ``--params`` parameters, of which
``--outliers`` devices send large updates, sample counts in 10..100), runs every rule of
``regional_aggregator.robust`` and the matching Flower function on the same input, and prints
the max abs difference per rule (and whether Krum/Multi-Krum selected the same devices).
Flower gets each update as two layers, to check that its flattening agrees with ours.

=================  ============================================================================
fedstream rule     Flower (``flwr.server.strategy.aggregate`` unless noted)
=================  ============================================================================
mean               ``aggregate`` (FedAvg)
norm:C             ``flwr.supercore.differential_privacy.clip_inputs_inplace`` per update
                   (``flwr.common.differential_privacy`` in older releases), then ``aggregate``
median             ``aggregate_median``
trimmed:B          ``aggregate_trimmed_avg``
krum:F             ``aggregate_krum(num_malicious=F, to_keep=0)``
multikrum:F:M      ``aggregate_krum(num_malicious=F, to_keep=M)``
=================  ============================================================================

Flower is not a fedstream dependency: run this with a separate environment that has it, e.g.
``python3 -m venv /tmp/flwrenv && /tmp/flwrenv/bin/pip install flwr numpy``, then
``/tmp/flwrenv/bin/python bench/flower_robust_compare.py --json bench/results/flower_robust.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from regional_aggregator.robust import make_rule  # noqa: E402

try:
    import flwr
    from flwr.server.strategy.aggregate import (
        aggregate,
        aggregate_krum,
        aggregate_median,
        aggregate_trimmed_avg,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(
        f"flower_robust_compare: cannot import Flower ({exc}).\n"
        "Install it in a separate venv: python3 -m venv /tmp/flwrenv && "
        "/tmp/flwrenv/bin/pip install flwr numpy, then run this script with /tmp/flwrenv/bin/python"
    )

try:
    from flwr.supercore.differential_privacy import clip_inputs_inplace
except ImportError:  # flwr < 1.2x
    from flwr.common.differential_privacy import clip_inputs_inplace


def make_round(seed: int, clients: int, params: int, outliers: int):
    """Honest updates ~ N(0, 0.01^2) plus ``outliers`` rows ~ N(+-1, 1), shuffled."""
    rng = np.random.default_rng(seed)
    updates = rng.normal(scale=0.01, size=(clients, params))
    bad = rng.choice(clients, size=outliers, replace=False)
    updates[bad] = rng.normal(loc=rng.choice([-1.0, 1.0], size=(outliers, 1)), size=(outliers, params))
    weights = rng.integers(10, 101, size=clients)
    return updates, weights, sorted(bad.tolist())


def to_flower(updates: np.ndarray, weights: np.ndarray) -> list[tuple[list[np.ndarray], int]]:
    """Flower's ``list[(NDArrays, num_examples)]``, each update split into two layers."""
    split = updates.shape[1] * 3 // 5
    return [
        ([u[:split].reshape(-1, 1).copy(), u[split:].copy()], int(w))
        for u, w in zip(updates, weights)
    ]


def from_flower(layers: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in layers])


def flower_rule(spec: str, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    results = to_flower(updates, weights)
    name, *args = spec.split(":")
    if name == "mean":
        return from_flower(aggregate(results))
    if name == "norm":
        for layers, _ in results:
            clip_inputs_inplace(layers, float(args[0]))
        return from_flower(aggregate(results))
    if name == "median":
        return from_flower(aggregate_median(results))
    if name == "trimmed":
        return from_flower(aggregate_trimmed_avg(results, float(args[0])))
    if name == "krum":
        return from_flower(aggregate_krum(results, int(args[0]), 0))
    if name == "multikrum":
        return from_flower(aggregate_krum(results, int(args[0]), int(args[1])))
    raise ValueError(spec)


def selected_rows(delta: np.ndarray, updates: np.ndarray, weights: np.ndarray, m: int) -> list[int]:
    """Which ``m`` rows' weighted mean ``delta`` is (brute force over subsets; n is small)."""
    from itertools import combinations

    best, best_err = [], np.inf
    for rows in combinations(range(len(updates)), m):
        idx = list(rows)
        mean = weights[idx] @ updates[idx] / weights[idx].sum()
        err = float(np.abs(mean - delta).max())
        if err < best_err:
            best, best_err = idx, err
    return best


def _call(fn):
    """Run ``fn`` and describe the outcome as JSON-able text."""
    try:
        out = fn()
    except Exception as exc:  # record whatever Flower does, errors included
        return f"{type(exc).__name__}: {exc}"
    return np.asarray(out, dtype=np.float64).ravel().tolist()


def edge_cases() -> list[dict]:
    """Inputs on which fedstream deliberately differs from Flower (see robust.py's docstring)."""
    cases = []
    u = np.arange(10.0).reshape(5, 2) ** 2
    w = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    cases.append({
        "case": "multikrum f=1, to_keep=7 > n=5",
        "flower": _call(lambda: from_flower(aggregate_krum(to_flower(u, w), 1, 7))),
        "fedstream": _call(lambda: make_rule("multikrum:1:7").aggregate(u, w).delta),
    })
    cases.append({
        "case": "krum f=3 with n=5 (paper needs n > 2f+2 = 8)",
        "flower": _call(lambda: from_flower(aggregate_krum(to_flower(u, w), 3, 0))),
        "fedstream": _call(lambda: make_rule("krum:3").aggregate(u, w).delta),
    })
    ties = np.array([[1.0], [0.0], [5.0]])
    for perm in ([0, 1, 2], [1, 0, 2]):
        cases.append({
            "case": f"krum f=0, rows 1, 0, 5 tie between 1 and 0, arrival order {perm}",
            "flower": _call(lambda p=perm: from_flower(
                aggregate_krum(to_flower(ties[p], np.ones(3)), 0, 0))),
            "fedstream": _call(lambda p=perm: make_rule("krum:0").aggregate(
                ties[p], np.ones(3)).delta),
        })
    zero = np.zeros((2, 3))

    def flower_norm(updates: np.ndarray, c: float) -> np.ndarray:
        results = [([row.copy()], 1) for row in updates]
        for layers, _ in results:
            clip_inputs_inplace(layers, c)
        return from_flower(aggregate(results))

    cases.append({
        "case": "norm:1 with all-zero updates",
        "flower": _call(lambda: flower_norm(zero, 1.0)),
        "fedstream": _call(lambda: make_rule("norm:1").aggregate(zero, np.ones(2)).delta),
    })
    huge = np.array([[1e308, 1e308]])
    with np.errstate(over="ignore"):
        cases.append({
            "case": "norm:2 with update (1e308, 1e308) whose squared norm overflows",
            "flower": _call(lambda: flower_norm(huge, 2.0)),
            "fedstream": _call(lambda: make_rule("norm:2").aggregate(huge, np.ones(1)).delta),
        })
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=7)
    ap.add_argument("--params", type=int, default=50)
    ap.add_argument("--outliers", type=int, default=2)
    ap.add_argument("--sets", type=int, default=5, help="number of seeded random rounds")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    f = args.outliers
    specs = ["mean", "norm:0.1", "median", "trimmed:0.1", "trimmed:0.2", "trimmed:0.3",
             f"krum:{f}", f"multikrum:{f}:3", f"multikrum:{f}:{args.clients - f}"]
    rows = []
    for spec in specs:
        rule = make_rule(spec)
        max_diff, same_sel, ours_kept = 0.0, True, []
        for seed in range(args.sets):
            updates, weights, _ = make_round(seed, args.clients, args.params, args.outliers)
            ours = rule.aggregate(updates, weights.astype(np.float64))
            theirs = flower_rule(spec, updates, weights)
            max_diff = max(max_diff, float(np.abs(ours.delta - theirs).max()))
            if spec.startswith(("krum", "multikrum")):
                m = len(ours.kept)
                same_sel &= selected_rows(theirs, updates, weights, m) == list(ours.kept)
            ours_kept.append(list(ours.kept))
        rows.append({
            "rule": spec,
            "max_abs_diff": max_diff,
            "same_selection": same_sel if spec.startswith(("krum", "multikrum")) else None,
            "kept_per_set": ours_kept,
        })

    outlier_rows = [make_round(s, args.clients, args.params, args.outliers)[2]
                  for s in range(args.sets)]
    print(f"flwr {flwr.__version__}, numpy {np.__version__}; {args.sets} sets of "
          f"{args.clients} clients x {args.params} params, {args.outliers} outliers "
          f"(outlier rows per set: {outlier_rows})")
    print(f"{'rule':<16} {'max |fedstream - flower|':>25} {'same selection':>15}")
    for r in rows:
        sel = "" if r["same_selection"] is None else str(r["same_selection"])
        print(f"{r['rule']:<16} {r['max_abs_diff']:>25.3e} {sel:>15}")

    edges = edge_cases()
    print("\ndeliberate differences (see regional_aggregator/robust.py):")
    for e in edges:
        print(f"  {e['case']}\n    flower:    {e['flower']}\n    fedstream: {e['fedstream']}")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "flwr_version": flwr.__version__,
            "numpy_version": np.__version__,
            "python": platform.python_version(),
            "clients": args.clients,
            "params": args.params,
            "outliers": args.outliers,
            "sets": args.sets,
            "outlier_rows_per_set": outlier_rows,
            "rules": rows,
            "edge_cases": edges,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
