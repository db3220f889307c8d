"""Data of the digits project: per-device ``.npz`` files and the server's held-out set.

``python -m digits_fl.data --out data`` (from examples/digits) writes one ``<device_id>.npz`` per
device of the project's simulated fleet, each a Dirichlet(alpha) label-skewed shard of the digits
training split with 20 % kept back as the device's local test set. The held-out split (seed 0)
is never written to a device: :func:`server_eval` returns it to the global aggregator.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from global_aggregator.datasets import agent_dataset, server_test_set

SPLIT_SEED = 0


def make_data(ids: list[str], out: Path, seed: int = 0, alpha: float = 0.5) -> list[Path]:
    """Write ``out/<id>.npz`` for every id (sorted ids get shards in order); return the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, device in enumerate(sorted(ids)):
        xtr, ytr, xte, yte = agent_dataset("digits", i, len(ids), "dirichlet", alpha, seed,
                                           split_seed=SPLIT_SEED)
        path = out / f"{device}.npz"
        np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
        paths.append(path)
    return paths


def server_eval() -> tuple[np.ndarray, np.ndarray]:
    """The held-out test set the global aggregator scores every model version on."""
    return server_test_set("digits", SPLIT_SEED)


def main(argv: list[str] | None = None) -> None:
    from schemas.project import load_project

    ap = argparse.ArgumentParser(prog="python -m digits_fl.data",
                                 description="Write one .npz per device of the project's fleet.")
    ap.add_argument("--project", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--out", type=Path, default=None, help="default: PROJECT/data")
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew alpha")
    ap.add_argument("--seed", type=int, default=0, help="partition seed")
    a = ap.parse_args(argv)
    project = load_project(a.project)
    ids = [d for ds in project.table.simulation.fleet().values() for d in ds]
    paths = make_data(ids, a.out or project.root / "data", a.seed, a.alpha)
    print(f"wrote {len(paths)} device files to {paths[0].parent}")


if __name__ == "__main__":
    main()
