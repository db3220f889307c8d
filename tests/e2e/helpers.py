"""Shared pieces of the end-to-end tests: a small federation and ways to watch it."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from compose.federation import Federation
from compose.localstack import free_port
from edge_agent.train import LocalTrainConfig
from global_aggregator.consumer import VerifiedModel, model_versions
from global_aggregator.keygen import fleet, write_keys
from global_aggregator.simulation import SimConfig
from schemas.signing import TrustStore

SEED = 7
LOCAL = LocalTrainConfig(optimizer="momentum", lr=0.05, epochs=1, batch_size=16)
TRAIN_ARGS = ["--local-optimizer", LOCAL.optimizer, "--local-lr", str(LOCAL.lr),
              "--local-epochs", str(LOCAL.epochs), "--batch-size", str(LOCAL.batch_size),
              "--clip-l2", "2.0", "--clip-coord", "0.1", "--seed", str(SEED)]


def sim_config(agents: int = 6, regions: int = 2, rounds: int = 3) -> SimConfig:
    """The in-process simulation that a federation made by :func:`make_federation` must match."""
    return SimConfig(num_agents=agents, num_regions=regions, rounds=rounds, seed=SEED, alpha=0.5,
                     encrypted=True, clip_l2=2.0, clip_coord=0.1, local=LOCAL,
                     federated_eval=False)


def make_federation(mqtt, kafka, tmp_path, namespace, *, agents=6, regions=2, rounds=3,
                    deadline_s=120.0, extra_global=(), extra_regional=()) -> Federation:
    keys = tmp_path / "keys"
    write_keys(keys, agents, regions)
    return Federation(
        mqtt=mqtt, kafka=kafka, keys_dir=keys, fleet=fleet(agents, regions),
        workdir=tmp_path / "logs", namespace=namespace,
        global_args=["--rounds", str(rounds), "--deadline-s", str(deadline_s), "--grace-s", "2",
                     *TRAIN_ARGS, *extra_global],
        regional_args=list(extra_regional),
        edge_args=["--alpha", "0.5", "--data-seed", str(SEED)],
    )


def with_metrics(fed: Federation, name: str) -> int:
    """Give process ``name`` a Prometheus port; returns it."""
    port = free_port()
    fed.per_process_args.setdefault(name, []).extend(["--metrics-port", str(port)])
    return port


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` from a service's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def rejected(metrics: dict, service: str, reason: str) -> float:
    key = ("fedstream_rejected_total", (("reason", reason), ("service", service)))
    return metrics.get(key, 0.0)


def total_rejected(metrics: dict, service: str) -> float:
    """``fedstream_rejected_total`` of ``service`` summed over every reason."""
    return sum(v for (name, labels), v in metrics.items()
               if name == "fedstream_rejected_total" and ("service", service) in labels)


async def watch(fed: Federation, timeout_s: float, on_version=None) -> list[VerifiedModel]:
    """Every model version until the final one; ``on_version(v)`` may inject faults."""
    trust = TrustStore.load(fed.keys_dir / "trust.json")
    out: list[VerifiedModel] = []

    async def run():
        async for v in model_versions(fed.kafka, trust, namespace=fed.namespace):
            out.append(v)
            if on_version is not None:
                r = on_version(v)
                if asyncio.iscoroutine(r):
                    await r
            if v.final:
                return

    try:
        await asyncio.wait_for(run(), timeout_s)
    except TimeoutError:
        logs = "\n\n".join(f"== {n}\n{fed.log(n, 25)}" for n in fed.procs)
        pytest.fail(f"federation did not finish in {timeout_s}s; got {len(out)} versions\n{logs}")
    return out
