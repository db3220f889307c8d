"""Shared pieces of the end-to-end tests: a small federation and ways to watch it."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from compose.federation import Federation
from compose.localstack import free_port
from global_aggregator.consumer import VerifiedModel, model_versions
from global_aggregator.keygen import fleet, write_keys
from global_aggregator.simulation import SimResult, project_config, project_setup, simulate
from schemas.project import load_project
from schemas.signing import TrustStore
from schemas.telemetry import scrape  # noqa: F401 - the tests' name for it
from tests.conftest import MANAGED_BROKER_LIMIT

SEED = 7
DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"


def make_federation(mqtt, kafka, tmp_path, namespace, *, agents=6, regions=2, rounds=3,
                    deadline_s=120.0, extra_global=(), extra_regional=(),
                    devices: dict[str, list[str]] | None = None,
                    project: Path = DIGITS, stack=None) -> Federation:
    """A federation of the digits example project: per-device .npz files written to
    ``tmp_path/data`` (each device is told its own file with ``--data path=...``), keys for
    ``devices`` (region -> ids; default agent-000...), the project's own settings but for
    rounds, deadline and seed. With a locked-down ``stack`` (``LocalStack(secure=True)``) the
    certificates come from its CAs and the federation runs secure (own key directory per
    process, TLS flags, Kafka ACLs)."""
    devices = devices if devices is not None else fleet(agents, regions)
    p = load_project(project)
    from digits_fl.data import make_data  # the project's package, importable once loaded

    data_dir = tmp_path / "data"
    make_data([d for ids in devices.values() for d in ids], data_dir, seed=SEED, alpha=0.5)
    keys = tmp_path / "keys"
    secure = stack is not None and stack.secure
    write_keys(keys, devices=devices, pki=stack.pki if secure else None)
    return Federation(
        secure=secure, admin=stack.kafka_conn if stack is not None else None,
        mqtt=mqtt, kafka=kafka, keys_dir=keys, fleet=devices, project=p.root,
        data={"path": str(data_dir / "{device_id}.npz")},
        workdir=tmp_path / "logs", namespace=namespace,
        global_args=["--rounds", str(rounds), "--deadline-s", str(deadline_s), "--grace-s", "2",
                     "--seed", str(SEED), *extra_global],
        regional_args=["--max-message-bytes", str(MANAGED_BROKER_LIMIT), *extra_regional],
    )


def simulate_federation(fed: Federation, rounds: int, **changes) -> SimResult:
    """The in-process simulation of ``fed``: the same project, fleet, device data and settings
    (the project's, with the rounds and seed the federation's global was given)."""
    project = load_project(fed.project)
    cfg = replace(project_config(project, fed.fleet), rounds=rounds, seed=SEED,
                  federated_eval=False, **changes)
    return simulate(cfg, setup=project_setup(project, fed.fleet, fed.data))


def with_metrics(fed: Federation, name: str) -> int:
    """Give process ``name`` a Prometheus port; returns it."""
    port = free_port()
    fed.per_process_args.setdefault(name, []).extend(["--metrics-port", str(port)])
    return port


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
        async for v in model_versions(fed.consumer, trust, namespace=fed.namespace):
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
