"""A whole federation locked down, on the real brokers: mutual TLS on Mosquitto and Kafka, the
brokers' ACLs, every process with a key directory holding only its own secrets.

The final model equals the simulation's bit for bit (security changes nothing in the numbers);
each process's key directory holds no other identity's secret; a service given another
identity's files refuses to start with a clear message.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from global_aggregator.keygen import write_keys
from schemas.keyring import kafka_tls, tls_files
from tests.e2e.helpers import (
    make_federation,
    scrape,
    simulate_federation,
    total_rejected,
    watch,
    with_metrics,
)

pytestmark = [pytest.mark.network]

ROOT = Path(__file__).resolve().parents[2]
FLEET = {"region-0": ["dev-a", "dev-b", "dev-c"], "region-1": ["dev-d", "dev-e"]}


@pytest.mark.slow
def test_locked_down_federation_equals_the_simulation(secure_stack, tmp_path, topic_prefix):
    # Prepare: a federation whose certificates come from the locked-down stack's CAs
    fed = make_federation(secure_stack.mqtt, secure_stack.kafka_bootstrap, tmp_path,
                          topic_prefix, devices=FLEET, rounds=2, deadline_s=90,
                          stack=secure_stack)
    ports = {r: with_metrics(fed, r) for r in ("region-0", "region-1")}

    # Execute
    try:
        fed.start_all()
        versions = asyncio.run(watch(fed, timeout_s=300))
        metrics = {r: scrape(p) for r, p in ports.items()}
    finally:
        fed.stop_all()

    # Assert: every device counted every round, nothing refused, numbers as in the simulation
    assert [v.version for v in versions] == [0, 1, 2]
    for v in versions[1:]:
        assert sorted(a for ids in v.participants.values() for a in ids) == fed.fleet_ids
    assert all(total_rejected(m, "regional") == 0 for m in metrics.values()), metrics
    sim = simulate_federation(fed, rounds=2)
    assert versions[-1].params.tobytes() == np.asarray(sim.final_params, np.float32).tobytes()
    # ... over TLS with client certificates (the services say so at start-up)
    assert "mutual TLS" in fed.log("region-0", 400)
    # ... and every process ran with only its own secrets
    secrets = {p.relative_to(fed.workdir / "keys") for p in (fed.workdir / "keys").rglob("*")
               if p.suffix in (".pem", ".key") or p.name == "secret.ctx"}
    for name in ("global", *fed.fleet, *fed.fleet_ids):
        own = {s for s in secrets if s.parts[0] == name}
        assert {s.name for s in own} <= {f"{name}.pem", f"{name}.key", "secret.ctx"}, own
        assert any(s.name == f"{name}.pem" for s in own)
        assert (any(s.name == "secret.ctx" for s in own)) == (name == "global")


def _run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_a_service_with_another_identitys_files_refuses_to_start(tmp_path):
    keys = tmp_path / "keys"
    write_keys(keys, devices={"region-0": ["dev-a", "dev-b"]})
    other = tls_files(keys, "dev-b", "mqtt", "region-0")
    edge = _run_cli("edge_agent.cli", "--device-id", "dev-a", "--mqtt", "127.0.0.1:1",
                    "--keys", str(keys), "--project", str(ROOT / "examples" / "digits"),
                    "--mqtt-ca-file", str(other.ca), "--mqtt-cert-file", str(other.cert),
                    "--mqtt-key-file", str(other.key))
    assert edge.returncode == 2, edge.stderr
    assert "is 'dev-b''s certificate (agent), not 'dev-a''s" in edge.stderr
    region, mine = kafka_tls(keys, "region-0"), kafka_tls(keys, "global")

    def start_global(ca: Path, cert: Path, key: Path) -> subprocess.CompletedProcess:
        return _run_cli("global_aggregator.cli", "--kafka", "127.0.0.1:1", "--keys", str(keys),
                        "--project", str(ROOT / "examples" / "digits"), "--kafka-ca-file",
                        str(ca), "--kafka-cert-file", str(cert), "--kafka-key-file", str(key))

    # the region's Kafka certificate given to the global
    glob = start_global(region.ca, region.cert, region.key)
    assert glob.returncode == 2, glob.stderr
    assert "is 'region-0''s certificate (region), not 'global''s" in glob.stderr
    # its own certificate, but the key of another identity
    glob = start_global(mine.ca, mine.cert, region.key)
    assert glob.returncode == 2 and "is not the key of" in glob.stderr, glob.stderr
    # half the TLS flags: a configuration error, not a silent plaintext connection
    half = _run_cli("regional_aggregator.cli", "--region", "region-0", "--mqtt", "127.0.0.1:1",
                    "--kafka", "127.0.0.1:1", "--keys", str(keys),
                    "--kafka-cert-file", str(region.cert))
    assert half.returncode == 2 and "go together" in half.stderr, half.stderr


def test_the_global_refuses_a_privacy_floor_of_one_with_encryption(tmp_path):
    keys = tmp_path / "keys"
    write_keys(keys, devices={"region-0": ["dev-a", "dev-b"]})
    glob = _run_cli("global_aggregator.cli", "--kafka", "127.0.0.1:1", "--keys", str(keys),
                    "--project", str(ROOT / "examples" / "digits"), "--min-group", "1")
    assert glob.returncode == 2 and "privacy floor k = 1" in glob.stderr, glob.stderr
