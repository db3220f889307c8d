"""Crash anywhere, lose nothing: kill -9 one process or broker mid-round, restart it, and the
federation ends with the same participants and a bit-identical model.

The reference is the in-process simulation with the same seeds; tests/e2e/test_pipeline.py shows
the fault-free distributed run equals it bit for bit, so equality with it is equality with the
fault-free run.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from tests.e2e.helpers import make_federation, scrape, simulate_federation, watch, with_metrics

pytestmark = [pytest.mark.network, pytest.mark.slow]

ROUNDS = 3
REGIONS = ("region-0", "region-1")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    # the data and keys depend only on the fleet and the seed: any copy simulates every test's
    fed = make_federation({}, "", tmp_path_factory.mktemp("reference"), "reference")
    return simulate_federation(fed, rounds=ROUNDS)


def accepted(port: int, service: str, kind: str) -> float:
    try:
        m = scrape(port)
    except OSError:  # the process is between lives
        return -1.0
    return m.get(("fedstream_accepted_total", (("kind", kind), ("service", service))), 0.0)


async def wait_next_accepted(port: int, service: str, kind: str, timeout_s: float = 60) -> None:
    """Wait until ``service`` accepts one more message of ``kind`` than it had so far."""
    floor = accepted(port, service, kind)
    deadline = time.time() + timeout_s
    while accepted(port, service, kind) <= floor:
        if time.time() > deadline:
            pytest.fail(f"{service} never accepted a {kind} past {floor}")
        await asyncio.sleep(0.02)


def run_with_fault(stack, fed, inject) -> list:
    """Run the federation; ``inject(v)`` is awaited once, when model v1 (round 2's task) appears."""
    fired = []

    async def on_version(v):
        if v.version == 1 and not fired:
            fired.append(time.time())
            await inject(v)

    try:
        fed.start_all()
        versions = asyncio.run(watch(fed, timeout_s=240, on_version=on_version))
    finally:
        fed.stop_all()
    assert fired, "the fault was never injected"
    return versions


def assert_same_as_reference(versions, reference) -> None:
    assert [v.version for v in versions] == list(range(ROUNDS + 1))
    for v, h in zip(versions[1:], reference.history, strict=True):
        assert sum(map(len, v.participants.values())) == h["participants"] == 6
    assert versions[-1].params.tobytes() == np.asarray(reference.final_params, np.float32).tobytes()


def _federation(stack_factory, tmp_path):
    stack = stack_factory(regions=REGIONS, mqtt_autosave_seconds=1)
    fed = make_federation(stack.mqtt, stack.kafka_bootstrap, tmp_path, "faults")
    return stack, fed


def test_edge_agent_killed_mid_round(stack_factory, tmp_path, reference):
    stack, fed = _federation(stack_factory, tmp_path)
    victim = fed.fleet["region-0"][0]

    async def inject(v):
        await asyncio.sleep(0.3)  # it is training round 2 now
        fed.restart(victim)  # SIGKILL, then start again

    assert_same_as_reference(run_with_fault(stack, fed, inject), reference)


def test_regional_aggregator_killed_with_unacked_updates(stack_factory, tmp_path, reference):
    stack, fed = _federation(stack_factory, tmp_path)
    port = with_metrics(fed, "region-0")

    async def inject(v):
        await wait_next_accepted(port, "regional", "update_chunk")  # >= 1 update summed
        fed.restart("region-0")  # its sum is gone; the broker still holds the unacked updates

    assert_same_as_reference(run_with_fault(stack, fed, inject), reference)


def test_global_aggregator_killed_mid_round(stack_factory, tmp_path, reference):
    stack, fed = _federation(stack_factory, tmp_path)
    port = with_metrics(fed, "global")

    async def inject(v):
        await wait_next_accepted(port, "global", "partial_chunk")  # a partial consumed
        fed.restart("global")  # uncommitted: the next incarnation re-reads it

    assert_same_as_reference(run_with_fault(stack, fed, inject), reference)


def test_mosquitto_killed_mid_round(stack_factory, tmp_path, reference):
    stack, fed = _federation(stack_factory, tmp_path)
    port = with_metrics(fed, "region-0")

    async def inject(v):
        await wait_next_accepted(port, "regional", "update_chunk")
        stack.restart_mosquitto("region-0", sig=9)

    assert_same_as_reference(run_with_fault(stack, fed, inject), reference)


def test_kafka_killed_mid_round(stack_factory, tmp_path, reference):
    stack, fed = _federation(stack_factory, tmp_path)
    port = with_metrics(fed, "global")

    async def inject(v):
        await wait_next_accepted(port, "global", "partial_chunk")
        stack.restart_kafka(sig=9)

    assert_same_as_reference(run_with_fault(stack, fed, inject), reference)
