"""A regional aggregator cut off from Kafka for longer than its retry budget, then reconnected."""

from __future__ import annotations

import asyncio
import time

import pytest

from compose.localstack import HOST
from tests.e2e.helpers import make_federation, scrape, with_metrics
from tests.faults.proxy import BlockingProxy
from tests.faults.test_crash_anywhere import (
    REGIONS,
    assert_same_as_reference,
    reference,  # noqa: F401  (the module-scoped fixture)
    run_with_fault,
    wait_next_accepted,
)

pytestmark = [pytest.mark.network, pytest.mark.slow]

CUT_S = 25.0  # longer than the regional's 15 s budget per attempt to commit a partial


def test_regional_cut_off_from_kafka_then_reconnected(stack_factory, tmp_path, reference):  # noqa: F811
    # Prepare: Kafka advertises a second listener behind a proxy that only region-0 uses
    stack = stack_factory(regions=REGIONS, kafka_proxied=True, mqtt_autosave_seconds=1)
    advertised, listening = stack.info.kafka_proxied
    proxy = BlockingProxy(advertised, listening).start()
    fed = make_federation(stack.mqtt, stack.kafka_bootstrap, tmp_path, "partition")
    fed.per_process_args["region-0"] = ["--kafka", f"{HOST}:{advertised}"]
    port = with_metrics(fed, "region-0")
    cut_at = []

    async def inject(v):
        await wait_next_accepted(port, "regional", "update_chunk")
        proxy.cut()
        cut_at.append(time.time())
        await asyncio.sleep(CUT_S)
        retries = scrape(port).get(("fedstream_kafka_retries_total", (("service", "regional"),)), 0)
        cut_at.append(retries)
        proxy.heal()

    # Execute
    try:
        versions = run_with_fault(stack, fed, inject)
    finally:
        proxy.stop()
    # Assert: the cut really hurt (Kafka operations failed and were retried) ...
    assert cut_at[1] >= 1, "the regional never noticed the partition"
    # ... and nothing was lost or doubled: same participants, bit-identical model
    assert_same_as_reference(versions, reference)
