"""``fedstream-simulate``: run an in-process federated simulation from the command line.

Runs :func:`global_aggregator.simulation.simulate` with every :class:`SimConfig` knob as a flag,
shows a rich progress bar with the server accuracy, and writes ``history.json`` and
``history.png`` (accuracy, loss, uplink bytes per round) to ``--out``.

Example:
    fedstream-simulate --task digits --rounds 25 --agents 20 --regions 4 --out runs/digits
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edge_agent.train import OPTIMIZERS, LocalTrainConfig
from global_aggregator.partition import PARTITIONS
from global_aggregator.simulation import (
    PRIVACY_MODES,
    SimConfig,
    SimSetup,
    project_setup,
    rounds_to_reach,
    simulate,
)
from global_aggregator.strategies import STRATEGIES


def build_parser() -> argparse.ArgumentParser:
    d = SimConfig()
    p = argparse.ArgumentParser(
        prog="fedstream-simulate",
        description="Federated simulation through the real codec, regional sums and global round.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("task and fleet")
    g.add_argument("--task", choices=["digits", "telemetry"], default=d.task)
    g.add_argument("--model", default=None, help="model name (default: the task's)")
    g.add_argument("--agents", type=int, default=d.num_agents)
    g.add_argument("--regions", type=int, default=d.num_regions)
    g.add_argument("--rounds", type=int, default=d.rounds)
    g.add_argument("--partition", choices=PARTITIONS, default=d.partition)
    g.add_argument("--alpha", type=float, default=d.alpha, help="Dirichlet concentration")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--clients-per-round", type=float, default=d.clients_per_round)
    g.add_argument("--dropout", type=float, default=d.dropout)
    g.add_argument("--no-federated-eval", action="store_true")
    g = p.add_argument_group("codec")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--plaintext", action="store_true", help="quantize, but do not encrypt")
    mode.add_argument("--float", action="store_true", help="float32 averaging, no codec")
    g.add_argument("--bits", type=int, default=d.bits)
    g.add_argument("--clip-l2", type=float, default=d.clip_l2)
    g.add_argument("--clip-coord", type=float, default=d.clip_coord)
    g.add_argument("--max-summands", type=int, default=d.max_summands)
    g.add_argument("--weight-cap", type=int, default=d.weight_cap)
    g.add_argument("--chunk-bytes", type=int, default=d.chunk_bytes)
    g.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=d.rotate,
                   help="randomized Hadamard rotation before quantization")
    g = p.add_argument_group("differential privacy")
    g.add_argument("--privacy", choices=PRIVACY_MODES, default=None,
                   help="distributed: every device adds discrete Gaussian noise; central: the "
                   "same total noise added once by the server (a comparison); default: off, "
                   "or the project's setting")
    g.add_argument("--epsilon", type=float, default=None,
                   help="target epsilon after --rounds rounds (inf: no noise)")
    g.add_argument("--delta", type=float, default=d.privacy_delta)
    g.add_argument("--n-min", type=int, default=d.privacy_n_min,
                   help="devices whose noise makes a round's total (0: all sampled)")
    g = p.add_argument_group("local training")
    g.add_argument("--local-optimizer", choices=OPTIMIZERS, default=d.local.optimizer)
    g.add_argument("--local-lr", type=float, default=d.local.lr)
    g.add_argument("--local-epochs", type=int, default=d.local.epochs)
    g.add_argument("--batch-size", type=int, default=d.local.batch_size, help="0 = full batch")
    g.add_argument("--prox-mu", type=float, default=d.local.prox_mu, help="FedProx mu")
    g = p.add_argument_group("server optimizer")
    g.add_argument("--strategy", choices=sorted(STRATEGIES), default=d.strategy)
    g.add_argument("--server-lr", type=float, default=d.server_lr)
    g.add_argument("--server-momentum", type=float, default=d.server_momentum)
    g.add_argument("--b1", type=float, default=d.b1)
    g.add_argument("--b2", type=float, default=d.b2)
    g.add_argument("--tau", type=float, default=d.tau)
    p.add_argument("--project", type=Path, default=None,
                   help="simulate this project (its model, loader, settings and simulated "
                   "fleet); the flags above then override only what they name")
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="with --project: loader settings every simulated device gets")
    p.add_argument("--out", type=Path, default=Path("sim-out"), help="output directory")
    p.add_argument("--target", type=float, default=0.9, help="accuracy target to report")
    return p


def config_from_args(a: argparse.Namespace) -> SimConfig:
    return SimConfig(
        task=a.task, model=a.model, num_agents=a.agents, num_regions=a.regions, rounds=a.rounds,
        partition=a.partition, alpha=a.alpha, seed=a.seed, encrypted=not (a.plaintext or a.float),
        float_mode=a.float, bits=a.bits, clip_l2=a.clip_l2, clip_coord=a.clip_coord,
        max_summands=a.max_summands, weight_cap=a.weight_cap, chunk_bytes=a.chunk_bytes,
        rotate=a.rotate, local=LocalTrainConfig(optimizer=a.local_optimizer, lr=a.local_lr, epochs=a.local_epochs,
                               batch_size=a.batch_size, prox_mu=a.prox_mu),
        strategy=a.strategy, server_lr=a.server_lr, server_momentum=a.server_momentum, b1=a.b1,
        b2=a.b2, tau=a.tau, clients_per_round=a.clients_per_round, dropout=a.dropout,
        federated_eval=not a.no_federated_eval, **privacy_args(a),
    )


def privacy_args(a: argparse.Namespace) -> dict[str, Any]:
    """The SimConfig privacy knobs of the flags (none without --privacy)."""
    if a.privacy is None:
        return {}
    return {"privacy": a.privacy, "privacy_epsilon": a.epsilon, "privacy_delta": a.delta,
            "privacy_n_min": a.n_min}


#: flag -> the FederationSettings field it sets (with --project, only given flags override)
FEDERATION_FLAGS = {
    "rounds": ("rounds",), "seed": ("seed",), "strategy": ("strategy",),
    "server_lr": ("server_lr",), "server_momentum": ("server_momentum",), "b1": ("b1",),
    "b2": ("b2",), "tau": ("tau",), "clients_per_round": ("clients_per_round",),
    "bits": ("codec", "bits"), "clip_l2": ("codec", "clip_l2"),
    "clip_coord": ("codec", "clip_coord"), "max_summands": ("codec", "max_summands"),
    "weight_cap": ("codec", "weight_cap"), "chunk_bytes": ("codec", "chunk_bytes"),
    "rotate": ("codec", "rotate"),
    "local_optimizer": ("train", "optimizer"), "local_lr": ("train", "lr"),
    "local_epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"),
    "prox_mu": ("train", "prox_mu"),
}


def project_run(a: argparse.Namespace) -> tuple[SimConfig, SimSetup, str]:
    """``(config, setup, title)`` of ``--project``: the project's settings, overridden by the
    federation flags that were given (their defaults are None in project mode)."""
    from schemas.project import load_project
    from schemas.settings import FederationSettings

    project = load_project(a.project)
    table = json.loads(json.dumps(project.federation_table))
    for flag, path in FEDERATION_FLAGS.items():
        value = getattr(a, flag)
        if value is not None:
            node = table
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
    if a.plaintext or a.float:
        table.setdefault("codec", {})["encrypted"] = False
    fed = FederationSettings.model_validate(table)
    data = dict(item.split("=", 1) for item in a.data)
    fleet = project.table.simulation.fleet()
    cfg = SimConfig.from_settings(fed, num_agents=sum(map(len, fleet.values())),
                                  num_regions=len(fleet), float_mode=a.float, dropout=a.dropout,
                                  federated_eval=not a.no_federated_eval, **privacy_args(a))
    return cfg, project_setup(project, fleet, data), f"{project.name} {project.version}"


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [e["round"] for e in history]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(rounds, [e.get("accuracy", np.nan) for e in history], label="server test")
    if history and "fed_accuracy" in history[0]:
        ax[0].plot(rounds, [e["fed_accuracy"] for e in history], "--", label="federated")
    ax[0].set(title="accuracy", xlabel="round", ylim=(0, 1))
    ax[0].legend()
    ax[1].plot(rounds, [e.get("loss", np.nan) for e in history])
    ax[1].set(title="test loss", xlabel="round")
    ax[2].bar(rounds, [e["bytes_up"] / 1e6 for e in history])
    ax[2].set(title="uplink MB per round", xlabel="round")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    parser = build_parser()
    if "--project" in (argv if argv is not None else sys.argv[1:]):
        for action in parser._actions:  # project mode: a flag overrides only when given
            if action.dest in FEDERATION_FLAGS:
                action.default = None
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    setup: SimSetup | None = None
    try:
        if args.project is not None:
            cfg, setup, title = project_run(args)
        else:
            cfg = config_from_args(args)
            title = f"{cfg.task} / {cfg.model_name}"
    except ValueError as e:
        console.print(f"[red]invalid settings:[/red] {e}")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    mode = "float32" if cfg.float_mode else ("encrypted" if cfg.encrypted else "plaintext")
    if cfg.privacy != "off":
        mode += f" / {cfg.privacy} DP"
    with Progress(
        TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[acc]}"),
        TimeElapsedColumn(), console=console,
    ) as progress:
        task = progress.add_task("rounds", total=cfg.rounds, acc="")

        def on_round(e: dict[str, Any]) -> None:
            progress.update(task, advance=1, acc=f"acc {e.get('accuracy', float('nan')):.3f}  "
                            f"loss {e.get('loss', float('nan')):.3f}")

        result = simulate(cfg, progress=on_round, setup=setup)
    final = result.history[-1]
    summary = {
        "config": cfg.to_dict(),
        "mode": mode,
        "num_params": result.spec.num_params,
        "final_accuracy": final.get("accuracy"),
        "rounds_to_target": rounds_to_reach(result.history, args.target),
        "target": args.target,
        "history": result.history,
    }
    (args.out / "history.json").write_text(json.dumps(summary, indent=2))
    plot_history(result.history, args.out / "history.png", f"{title} / {cfg.strategy} / {mode}")
    console.print(
        f"final accuracy {final.get('accuracy', float('nan')):.4f}"
        + (f" at epsilon {final['epsilon']:.3f}" if "epsilon" in final else "")
        + f"; rounds to {args.target:.0%}: "
        f"{summary['rounds_to_target']}; wrote {args.out}/history.json and history.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
