"""FedBuff under faults: the global aggregator killed -9 after it consumed a partial but before
its step committed, or a regional aggregator killed -9 mid-run, then restarted. The run must still
equal the replay of its own provenance bit for bit, with no update counted twice
(``tests/e2e/test_fedbuff.py`` has the reference and the fault-free run)."""

from __future__ import annotations

import pytest

from tests.e2e.test_fedbuff import check_against_replay, run
from tests.faults.test_crash_anywhere import wait_next_accepted

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.mark.parametrize("victim", ["global", "region-0"])
def test_fedbuff_survives_a_kill(stack_factory, tmp_path, victim):
    stack = stack_factory(regions=("region-0", "region-1"), mqtt_autosave_seconds=1)

    async def inject(fed, port):
        if victim == "global":
            await wait_next_accepted(port, "global", "partial_chunk")  # consumed, uncommitted
        fed.restart(victim)

    fed, versions = run(stack, tmp_path, f"fedbuff-{victim}", inject)
    check_against_replay(fed, versions)
