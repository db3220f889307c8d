"""Rotating the global's signing key and the HE context at a round boundary: the documented
procedure (docs/security.md), end to end on the real brokers.

Stop every service right after model v2; ``fedstream-keygen --rotate KEYS --effective-round 3``;
start everything again. The global resumes from v2, reissues round 3's task under the new HE
context (v3: the same model), runs rounds 3 and 4 with the new keys, and the final model equals
the simulation of four uninterrupted rounds bit for bit. Every version stays verifiable with the
new ``trust.json`` (the old global key for rounds before 3); the old ``trust.json`` verifies
only the versions signed before the rotation.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from global_aggregator.consumer import model_versions
from schemas.he import HEContext
from schemas.signing import TrustStore
from tests.e2e.helpers import make_federation, simulate_federation, watch

pytestmark = [pytest.mark.network, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_rotate_the_global_key_and_he_context_at_a_round_boundary(stack, tmp_path,
                                                                   topic_prefix):
    # Prepare: four rounds; devices a little slow, so that the stop after v2 beats round 3
    fed = make_federation(stack.mqtt, stack.kafka_bootstrap, tmp_path, topic_prefix, agents=4,
                          regions=2, rounds=4, deadline_s=60)
    fed.edge_args = ["--straggle-s", "5"]
    keys = fed.keys_dir
    old_trust = TrustStore.load(keys / "trust.json")
    old_he = HEContext.from_bytes((keys / "he" / "public.ctx").read_bytes()).fingerprint

    async def until_v2() -> None:
        async for v in model_versions(fed.consumer, old_trust, namespace=fed.namespace):
            if v.version == 2:
                return

    # Execute: run to v2, stop everything, rotate, start everything
    try:
        fed.start_all()
        asyncio.run(asyncio.wait_for(until_v2(), 300))
        fed.stop_all()
        rotated = subprocess.run(
            [sys.executable, "-m", "global_aggregator.keygen", "--rotate", str(keys),
             "--effective-round", "3"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert rotated.returncode == 0, rotated.stderr
        fed.edge_args = []
        fed.start_all()
        versions = asyncio.run(watch(fed, timeout_s=300))  # the NEW trust.json
    finally:
        fed.stop_all()
    with_old_trust = asyncio.run(_all_versions(fed, old_trust))

    # Assert: v3 reissued round 3's task under the new context, with the same model
    new_he = HEContext.from_bytes((keys / "he" / "public.ctx").read_bytes()).fingerprint
    assert new_he != old_he
    assert [v.version for v in versions] == [0, 1, 2, 3, 4, 5]
    v2, v3 = versions[2], versions[3]
    assert v3.params.tobytes() == v2.params.tobytes()
    assert v3.metrics.get("reissued_task") == 1.0
    assert v2.message.next_task.he_fingerprint == old_he
    assert v3.message.next_task.he_fingerprint == new_he
    assert v3.message.next_task.round == 3 == v2.message.next_task.round
    assert "HE context rotated: round 3's task reissued" in fed.log("global", 400)
    # ... every version verifies with the new trust store (above: none skipped), only the
    # versions before the rotation with the old one
    assert [v.version for v in with_old_trust] == [0, 1, 2]
    assert (keys / "identities" / "global.pem.prev").exists()
    # ... and the model is that of four uninterrupted rounds
    sim = simulate_federation(fed, rounds=4)
    assert versions[-1].params.tobytes() == np.asarray(sim.final_params, np.float32).tobytes()


async def _all_versions(fed, trust: TrustStore) -> list:
    return [v async for v in model_versions(fed.consumer, trust, namespace=fed.namespace,
                                            follow=False)]
