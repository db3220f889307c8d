"""A region that scales out: two regional aggregator replicas per region share its updates
through an MQTT v5 shared subscription, each committing its own batches under its own
transactional id. Killing one (-9) mid-round loses nothing and changes nothing: restarted, it
gets back what it had not acked; not restarted, a sibling stands in for it (its session and its
transactional id). Either way the final model is bit-identical to the in-process simulation."""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.helpers import make_federation, simulate_federation, with_metrics
from tests.faults.test_crash_anywhere import run_with_fault, wait_next_accepted

pytestmark = [pytest.mark.network, pytest.mark.slow]

ROUNDS = 3
REGIONS = ("region-0", "region-1")


def _run(stack_factory, tmp_path, fault):
    stack = stack_factory(regions=REGIONS, mqtt_autosave_seconds=1)
    # 4 devices per region: the broker deals them 2 + 2 to the replicas, each >= k = 2
    fed = make_federation(stack.mqtt, stack.kafka_bootstrap, tmp_path, "replicas", agents=8)
    fed.replicas = {r: ["a", "b"] for r in REGIONS}
    reference = simulate_federation(fed, rounds=ROUNDS)
    port = with_metrics(fed, "region-0@a")

    async def inject(v):
        await wait_next_accepted(port, "regional", "update_chunk")  # >= 1 update summed
        fault(fed)

    versions = run_with_fault(stack, fed, inject)
    assert [v.version for v in versions] == list(range(ROUNDS + 1))
    for v, h in zip(versions[1:], reference.history, strict=True):
        assert sum(map(len, v.participants.values())) == h["participants"] == 8
    assert versions[-1].params.tobytes() == \
        np.asarray(reference.final_params, np.float32).tobytes()
    for name in fed.aggregators:  # every replica took part: the load was shared
        assert "batch " in fed.log(name, 400), f"{name} committed no batch:\n{fed.log(name)}"
    return fed


def test_replica_killed_and_restarted_changes_nothing(stack_factory, tmp_path):
    # its batch is gone; its session keeps the unacked updates for its next incarnation
    _run(stack_factory, tmp_path, lambda fed: fed.restart("region-0@a"))


def test_replica_killed_for_good_a_sibling_stands_in(stack_factory, tmp_path):
    fed = _run(stack_factory, tmp_path, lambda fed: fed.kill("region-0@a"))
    assert not fed.alive("region-0@a")
    log = fed.log("region-0@b", 400)
    assert "replica a is down: standing in for it" in log, log
    # the stand-in (logging into b's file) committed batches under a's name after the kill
    assert "batch a/" in log, log
