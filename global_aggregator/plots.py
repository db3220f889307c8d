"""PNG plots of a federation's rounds (accuracy, participants, bytes)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_rounds(history: list[dict], path: Path, *, title: str) -> Path:
    """Three panels per round: accuracy (server and federated), participants, uplink MB."""
    rounds = [h["round"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    if all("server_accuracy" in h for h in history):
        ax.plot(rounds, [h["server_accuracy"] for h in history], "o-", label="server test set")
    if all("federated_accuracy" in h for h in history):
        ax.plot(rounds, [h["federated_accuracy"] for h in history], "s--",
                label="federated (agents' test sets, parent model)")
    ax.set(xlabel="round", ylabel="accuracy", ylim=(0, 1), title="accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    axes[1].bar(rounds, [h["participants"] for h in history], color="tab:green")
    axes[1].set(xlabel="round", ylabel="agents", title="participants")
    axes[2].bar(rounds, [h["update_bytes"] / 1e6 for h in history], color="tab:purple")
    axes[2].set(xlabel="round", ylabel="MB", title="encrypted uplink per round")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
