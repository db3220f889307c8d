"""Buffered asynchronous aggregation (FedBuff) end to end on real brokers, and under faults.

Devices train on every version they are selected for; regions forward batches; the global steps
after every ``buffer_size`` updates, down-weighting stale ones by integer multiplicities. A run
is timing-dependent (which update lands in which step), so the reference is the run's own
account: every version's provenance lists the updates its step counted (device, base round,
multiplicity), and recomputing those steps in process (:func:`replay_fedbuff`: training on the
base version, quantizing, integer sums) must give every published version bit for bit, with no
(device, base round) counted twice. A global or regional aggregator killed -9 mid-run and
restarted must keep both true (``tests/faults/test_fedbuff_faults.py``).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from global_aggregator.simulation import project_config, project_setup, replay_fedbuff
from schemas.project import load_project
from tests.e2e.helpers import SEED, make_federation, watch, with_metrics

pytestmark = [pytest.mark.network, pytest.mark.slow]

STEPS = 6
FEDBUFF = ["--mode", "fedbuff", "--buffer-size", "3", "--max-staleness", "4",
           "--staleness-scale", "4"]  # (3 + 1) * 4 = 16 summands: the digits codec's budget


def run(stack, tmp_path, namespace, inject=None):
    fed = make_federation(stack.mqtt, stack.kafka_bootstrap, tmp_path, namespace, agents=8,
                          rounds=STEPS, deadline_s=30, extra_global=FEDBUFF)
    port = with_metrics(fed, "global")
    fired = []

    async def on_version(v):
        if inject is not None and v.version == 2 and not fired:
            fired.append(True)
            await inject(fed, port)

    try:
        fed.start_all()
        versions = asyncio.run(watch(fed, timeout_s=300, on_version=on_version))
    finally:
        fed.stop_all()
    assert inject is None or fired, "the fault was never injected"
    return fed, versions


def check_against_replay(fed, versions):
    assert [v.version for v in versions] == list(range(STEPS + 1)) and versions[-1].final
    steps, seen = [], set()
    for v in versions[1:]:
        updates = [(a, b, m) for p in v.message.provenance.participants
                   for a, b, m in zip(p.agents, p.base_rounds, p.multiplicities, strict=True)]
        for a, b, m in updates:
            assert (a, b) not in seen, f"{a}'s round-{b} update counted twice"
            assert 1 <= b <= v.round and 1 <= m <= 4
            seen.add((a, b))
        steps.append(updates)
    assert sum(map(len, steps)) >= STEPS * 3 - 3  # nearly every step was a full buffer
    project = load_project(fed.project)
    cfg = replace(project_config(project, fed.fleet), seed=SEED)
    replayed = replay_fedbuff(cfg, project_setup(project, fed.fleet, fed.data), steps)
    for v, params in zip(versions, replayed, strict=True):
        assert v.params.tobytes() == params.tobytes(), f"version {v.version} differs"
    return steps


def test_fedbuff_steps_equal_their_replay(stack_factory, tmp_path):
    stack = stack_factory(regions=("region-0", "region-1"), mqtt_autosave_seconds=1)
    fed, versions = run(stack, tmp_path, "fedbuff")
    steps = check_against_replay(fed, versions)
    assert any(b < v.round for v, u in zip(versions[1:], steps) for _, b, _ in u), \
        "no step took a stale update: the run was not asynchronous"
