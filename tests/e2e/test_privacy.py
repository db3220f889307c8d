"""Distributed DP end to end on the real brokers: every device adds its own noise under the
encryption, the global accounts every round with dp-accounting, puts epsilon into each
version's provenance and ``/metrics``, and stops before the budget would be exceeded.

Six devices are far too few for DP to leave a useful model (bench/privacy.py measures accuracy
on 1,000); here the noise itself is checked: the model is the noiseless simulation's plus noise
of exactly the planned size."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from edge_agent.dp_ledger import DpLedger
from edge_agent.models import project_spec
from global_aggregator.keygen import write_keys
from global_aggregator.privacy import PrivacyPlan
from schemas.project import load_project
from schemas.settings import FederationSettings, PrivacySettings
from tests.e2e.helpers import make_federation, scrape, simulate_federation, watch, with_metrics

pytestmark = [pytest.mark.network, pytest.mark.slow]

EPSILON, ROUNDS, DEVICES = 20.0, 4, 6
ROOT = Path(__file__).resolve().parents[2]


def _budget_for_two_rounds(fed) -> float:
    """A budget between the epsilon of two and of three rounds of the run's plan."""
    project = load_project(fed.project)
    fs = FederationSettings(**project.federation_table)
    plan = PrivacyPlan.make(PrivacySettings(mode="distributed", epsilon=EPSILON),
                            fs.codec.params(), project_spec(project).num_params,
                            rounds=ROUNDS, population=DEVICES, sample=DEVICES)
    spent = [plan.account(None, DEVICES, DEVICES, [DEVICES])]
    for _ in range(2):
        spent.append(plan.account(spent[-1], DEVICES, DEVICES, [DEVICES]))
    return (spent[1].epsilon + spent[2].epsilon) / 2


def _direct(rounds, delta: float) -> float:
    acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for r in rounds:
        acc.compose(dp_accounting.GaussianDpEvent(r.noise_multiplier))
    return acc.get_epsilon(delta)


def test_epsilon_in_provenance_and_metrics_and_the_budget_stops_the_run(stack, tmp_path,
                                                                        topic_prefix):
    # Prepare: epsilon 20 planned over 4 rounds, a budget that allows two
    fed = make_federation(stack.mqtt, stack.kafka_bootstrap, tmp_path, topic_prefix,
                          agents=DEVICES, regions=2, rounds=ROUNDS)
    budget = _budget_for_two_rounds(fed)
    fed.global_args += ["--privacy.mode", "distributed", "--privacy.epsilon", str(EPSILON),
                        "--privacy.budget", str(budget), "--linger-s", "60"]
    fed.edge_args = ["--report-eval"]  # asked for, and withheld: it would travel in clear
    port = with_metrics(fed, "global")

    # Execute
    fed.start_all()
    try:
        versions = asyncio.run(watch(fed, timeout_s=400))
        metrics = scrape(port)
    finally:
        fed.stop_all()

    # Assert: two rounds, every device in each, and the second version is final
    assert [v.version for v in versions] == [0, 1, 2]
    assert versions[-1].final
    for v in versions[1:]:
        assert sum(len(a) for a in v.participants.values()) == DEVICES
    priv = [v.message.provenance.privacy for v in versions[1:]]
    # ... epsilon grows, stays within the budget, and is dp-accounting's for the recorded rounds
    assert [len(p.rounds) for p in priv] == [1, 2]
    assert 0 < priv[0].epsilon < priv[1].epsilon <= budget
    for p in priv:
        assert p.epsilon == pytest.approx(_direct(p.rounds, p.delta), rel=1e-9)
        assert p.rounds[-1].contributors == DEVICES and p.sigma_device > 0.5
    assert priv[1].budget_reached and not priv[0].budget_reached
    # ... the devices really added noise: the task's codec carries it
    codec = versions[0].message.next_task.codec
    assert codec.dp_sigma == pytest.approx(priv[0].sigma_device) and codec.dp_bound > 0
    assert codec.weight_cap == 1
    # ... the same numbers on /metrics, and the global says why it stopped
    assert metrics[("fedstream_privacy_epsilon", ())] == pytest.approx(priv[1].epsilon)
    assert metrics[("fedstream_privacy_epsilon_budget", ())] == pytest.approx(budget)
    assert "privacy budget" in fed.log("global", 400)
    # ... no device sent its evaluation in clear, though asked to (--report-eval)
    for v in versions[1:]:
        assert "federated_accuracy" not in v.message.provenance.metrics
    assert "evaluation withheld" in fed.log("agent-000", 400)
    # ... and round 1 is the noiseless round (the simulation with weights 1) plus the devices'
    # noise, averaged: per coordinate sqrt(6) sigma steps over 6 (the rotation keeps it)
    sim = simulate_federation(fed, rounds=1, weight_cap=1)
    diff = versions[1].params.astype(np.float64) - np.asarray(sim.final_params, np.float64)
    scale = codec.clip_coord / (2 ** (codec.bits - 1) - 1)
    expected = np.sqrt(DEVICES) * priv[0].sigma_device * scale / DEVICES
    assert abs(diff.mean()) < 0.05 * expected
    assert diff.std() / expected == pytest.approx(1.0, abs=0.05)


def test_example_level_dp_sgd_on_every_device_reports_its_own_epsilon(stack, tmp_path,
                                                                      topic_prefix):
    # Prepare: DP-SGD (noise multiplier 1.1, clip 1.0) in every device's training, 2 rounds
    fed = make_federation(stack.mqtt, stack.kafka_bootstrap, tmp_path, topic_prefix,
                          agents=4, regions=2, rounds=2)
    fed.global_args += ["--privacy.mode", "example", "--privacy.noise-multiplier", "1.1",
                        "--privacy.example-clip", "1.0"]

    # Execute
    fed.start_all()
    try:
        versions = asyncio.run(watch(fed, timeout_s=300))
    finally:
        fed.stop_all()

    # Assert: the task asks for DP-SGD, every device trained with it and counted
    train = versions[0].message.next_task.train
    assert (train.dp_clip, train.dp_noise_multiplier, train.dp_delta) == (1.0, 1.1, 1e-5)
    assert [v.version for v in versions] == [0, 1, 2]
    for v in versions[1:]:
        assert sum(len(a) for a in v.participants.values()) == 4
    # ... and agent-000's epsilon is dp-accounting's for the steps it took on its examples
    # (logged and on its /metrics while it runs; a device exits after the final version)
    line = [ln for ln in fed.log("agent-000", 400).splitlines() if "DP-SGD over" in ln][-1]
    words = line.split("DP-SGD over ")[1].split()
    steps, n, batch = int(words[0]), int(words[3]), int(words[6].rstrip("):"))
    logged = float(words[8])
    acc = RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(
        batch / n, dp_accounting.GaussianDpEvent(1.1)), steps)
    eps = acc.get_epsilon(1e-5)
    assert logged == pytest.approx(eps, abs=1e-4)
    assert steps == 2 * 2 * -(-n // batch)  # 2 rounds x 2 epochs x ceil(n / batch) steps
    # ... every step is in the device's ledger, which a restart would continue from
    ledger = DpLedger(fed.keys_of("agent-000") / "agent-000.dp-ledger.json", "agent-000")
    assert ledger.steps == steps and ledger.epsilon(1e-5) == pytest.approx(logged, abs=1e-4)


@pytest.mark.parametrize("extra, says", [
    (["--canary-fraction", "0.5"], "canary rounds with differential privacy"),
    (["--mode", "fedbuff"], "--mode fedbuff is not supported"),
])
def test_the_global_refuses_what_dp_does_not_cover(tmp_path, extra, says):
    # A canary needs federated evaluation (withheld under DP); FedBuff mixes rounds in a step
    keys = tmp_path / "keys"
    write_keys(keys, devices={"region-0": ["dev-a", "dev-b"]})
    glob = subprocess.run(
        [sys.executable, "-m", "global_aggregator.cli", "--kafka", "127.0.0.1:1", "--keys",
         str(keys), "--project", str(ROOT / "examples" / "digits"), "--privacy.mode",
         "distributed", "--privacy.epsilon", "8", *extra],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert glob.returncode == 2 and says in glob.stderr, glob.stderr
