"""A fleet's own project on real brokers: its own model and data, devices that differ.

One federation of a copy of ``examples/iot-anomaly`` (its own 1-D conv model, per-device CSV
sensor logs), outside the package, with serial-number device ids, under a Mosquitto capped at
128 KB messages, where in each region:

* region-0: two healthy devices and one whose log file is missing (``data_error`` each round);
* region-1: one healthy device, one running the next version of the project (same model: it
  takes part, and the region counts devices per version), and one whose installed project has
  another model (``task_mismatch``: it refuses every task).

The two that cannot take part tell their region so (a signed decline), and every round closes
long before its deadline.

The final model equals the simulation of the same project in which the two faulty devices never
count, bit for bit; the round task the global publishes is the one the simulation derives from
the same project.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from compose.federation import Federation
from edge_agent.models import model_hash, project_spec
from global_aggregator.keygen import write_keys
from global_aggregator.sampling import select_agents
from global_aggregator.simulation import project_config, project_setup, simulate
from schemas.codec import Codec
from schemas.he import HEContext
from schemas.project import load_project, task_hash
from schemas.task import codec_spec
from tests.conftest import MANAGED_BROKER_LIMIT
from tests.e2e.helpers import rejected, scrape, watch, with_metrics

pytestmark = [pytest.mark.network, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "iot-anomaly"
ROUNDS = 2
DEADLINE_S = 90
FLEET = {"region-0": ["PUMP-0007", "PUMP-001A", "PUMP-00FF.missing-log"],
         "region-1": ["FAN.b-12", "FAN.b-13.v2", "FAN.b-99.other-model"]}
NO_DATA, NEXT_VERSION, OTHER_MODEL = "PUMP-00FF.missing-log", "FAN.b-13.v2", "FAN.b-99.other-model"


def _copy_project(src: Path, dst: Path, **edits: str) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("data", "__pycache__"))
    toml = dst / "pyproject.toml"
    text = toml.read_text()
    for old, new in edits.items():
        assert old in text, old
        text = text.replace(old, new)
    toml.write_text(text)
    return dst


def test_own_project_trains_end_to_end_and_refuses_what_does_not_fit(stack, tmp_path,
                                                                      topic_prefix):
    # Prepare: the project outside the package, its data, two altered installs of it
    project_dir = _copy_project(EXAMPLE, tmp_path / "iot")
    project = load_project(project_dir)
    from iot_anomaly.data import generate  # the project's own package

    generate(sorted(d for ids in FLEET.values() for d in ids), project_dir / "data", 0)
    (project_dir / "data" / f"{NO_DATA}.csv").unlink()  # this device's log is missing
    v2 = _copy_project(project_dir, tmp_path / "iot-v2",
                       **{'version = "0.1.0"': 'version = "0.2.0"'})
    other = _copy_project(project_dir, tmp_path / "iot-other",
                          **{"model_options = { num_classes = 4 }":
                             "model_options = { num_classes = 4, channels = 8 }"})
    keys = tmp_path / "keys"
    write_keys(keys, devices=FLEET)
    fed = Federation(
        mqtt=stack.mqtt, kafka=stack.kafka_bootstrap, keys_dir=keys, fleet=FLEET,
        project=project_dir, workdir=tmp_path / "logs", namespace=topic_prefix,
        global_args=["--rounds", str(ROUNDS), "--deadline-s", str(DEADLINE_S), "--grace-s", "2"],
        regional_args=["--max-message-bytes", str(MANAGED_BROKER_LIMIT)],
    )
    data_dir = project_dir / "data"
    for name in fed.fleet_ids:  # each device names its own log, like a real deployment
        fed.per_process_args[name] = ["--data", f"path={data_dir / name}.csv"]
    fed.per_process_args[NEXT_VERSION] += ["--project", str(v2)]
    fed.per_process_args[OTHER_MODEL] += ["--project", str(other)]
    ports = {n: with_metrics(fed, n) for n in (NO_DATA, OTHER_MODEL, "region-0", "region-1")}
    metrics: dict[str, dict] = {}
    expected = {NO_DATA: "data_error", OTHER_MODEL: "task_mismatch"}

    def on_version(v):
        if v.version == 0:  # round 1 is open: both devices refuse it at once (and stay up)
            deadline = time.time() + 30
            for name, reason in expected.items():
                while True:
                    metrics[name] = scrape(ports[name])
                    if rejected(metrics[name], "edge", reason) >= 1 or time.time() > deadline:
                        break
                    time.sleep(0.2)

    # Execute
    try:
        fed.start_all()
        versions = asyncio.run(watch(fed, timeout_s=400, on_version=on_version))
        time.sleep(1)  # the regions are still up: their last round's counts
        metrics.update({r: scrape(ports[r]) for r in ("region-0", "region-1")})
    finally:
        fed.stop_all()

    # Assert: the two faulty devices sat every round out, counted and said why, once a round
    faulty = {NO_DATA, OTHER_MODEL}
    for v in versions[1:]:
        counted = {a for agents in v.participants.values() for a in agents}
        assert counted == set(fed.fleet_ids) - faulty, v.round
    assert rejected(metrics[NO_DATA], "edge", "data_error") >= 1  # counted (round 1) ...
    assert rejected(metrics[OTHER_MODEL], "edge", "task_mismatch") >= 1
    # ... and said once a round (the same call logs and counts)
    no_data_lines = [ln for ln in fed.log(NO_DATA, 500).splitlines() if "data_error" in ln]
    assert len(no_data_lines) == ROUNDS and all("does not exist" in ln or "missing" in ln
                                                for ln in no_data_lines), no_data_lines
    mismatch_lines = [ln for ln in fed.log(OTHER_MODEL, 500).splitlines()
                      if "task_mismatch" in ln]
    assert len(mismatch_lines) == ROUNDS
    assert "install the federation's project" in mismatch_lines[0]
    # ... and told their regions, which closed each round without waiting for the deadline
    for region in ("region-0", "region-1"):
        key = ("fedstream_accepted_total", (("kind", "decline"), ("service", "regional")))
        assert metrics[region].get(key) == ROUNDS, region
    created = [v.message.provenance.created_unix for v in versions]
    assert all(b - a < DEADLINE_S / 2 for a, b in zip(created, created[1:])), created
    # version skew: region-1 counted one device per project version in the last round
    by_version = {dict(labels)["version"]: value for (name, labels), value
                  in metrics["region-1"].items() if name == "fedstream_devices_by_project_version"}
    assert by_version == {"0.1.0": 1.0, "0.2.0": 1.0}

    # ... the global's round task is the simulation's, from the same project
    cfg = replace(project_config(project, FLEET), rounds=ROUNDS, federated_eval=False)
    task = versions[0].message.next_task
    he = HEContext.from_bytes((keys / "he" / "public.ctx").read_bytes())
    round_params = cfg.codec_params().for_round(cfg.seed, task.round)
    codec = Codec(round_params, project_spec(project).num_params, he)
    assert task.codec == codec_spec(round_params)
    assert (task.train.optimizer, task.train.lr, task.train.epochs, task.train.batch_size) == (
        cfg.local.optimizer, cfg.local.lr, cfg.local.epochs, cfg.local.batch_size)
    assert task.seed == cfg.seed and task.task_name == "iot-anomaly"
    assert task.project_hash == task_hash(project.name, model_hash(project_spec(project)),
                                          codec.framer.digest)
    assert list(task.selected_agents) in ([], select_agents(fed.fleet_ids, cfg.clients_per_round,
                                                            cfg.seed, 1))
    # ... and the final model is that simulation's, without the two faulty devices, bit for bit
    excluded = {r: frozenset(faulty) for r in range(1, ROUNDS + 1)}
    sim = simulate(replace(cfg, excluded=excluded), setup=project_setup(project, FLEET))
    assert versions[-1].params.tobytes() == np.asarray(sim.final_params, np.float32).tobytes()
    assert re.fullmatch(r"[0-9a-f]{32}", task.project_hash)
