"""End to end over real Mosquitto and Kafka: separate processes, bit-identical to the simulation."""

from __future__ import annotations

import asyncio
import json
import signal
import struct
import time

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from schemas import fedstream_pb2 as pb
from schemas.topics import Topics
from tests.e2e.helpers import make_federation, simulate_federation, watch

pytestmark = [pytest.mark.network, pytest.mark.slow]

async def independent_read(bootstrap: str, topic: str, trust_json: dict, n: int) -> list[int]:
    """Plain aiokafka + protobuf + Ed25519: what a non-fedstream consumer would write."""
    key = Ed25519PublicKey.from_public_bytes(
        bytes.fromhex(trust_json["identities"]["global"]["public_key"]))
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                isolation_level="read_committed", enable_auto_commit=False,
                                max_partition_fetch_bytes=16 << 20)
    await consumer.start()
    versions = []
    try:
        deadline = time.time() + 30
        while len(versions) < n and time.time() < deadline:
            for recs in (await consumer.getmany(timeout_ms=500)).values():
                for rec in recs:
                    env = pb.Envelope.FromString(rec.value)
                    signed = (b"fedstream/v2\0" + struct.pack(">I", env.kind) + env.signer.encode()
                              + b"\0" + topic.encode() + b"\0" + env.body)
                    key.verify(env.signature, signed)  # raises if it does not verify
                    versions.append(pb.ModelVersion.FromString(env.body).header.model_version)
    finally:
        await consumer.stop()
    return versions


def test_pipeline_matches_simulation_bit_for_bit(stack, tmp_path, topic_prefix):
    # Prepare
    # the fleet's own ids (serial numbers): nothing derives data or behaviour from the spelling
    devices = {"region-0": ["SN-00A7.x", "SN-0B3F.x", "zz-last"], "region-1": ["00-first",
                                                                           "SN-1C22.y", "m_9"]}
    fed = make_federation(stack.mqtt, stack.kafka_bootstrap, tmp_path, topic_prefix,
                          devices=devices)
    sim = simulate_federation(fed, rounds=3)
    # Execute
    try:
        fed.start_all()
        versions = asyncio.run(watch(fed, timeout_s=400))
        # the final version sends every agent and the global home; regions stop on SIGTERM
        exits = {name: fed.wait(name, 60) for name in fed.procs if name not in fed.fleet}
        for region in fed.fleet:
            fed.procs[region].send_signal(signal.SIGTERM)
            exits[region] = fed.wait(region, 30)
    finally:
        fed.stop_all()
    assert exits == dict.fromkeys(fed.procs, 0), "a service did not exit cleanly"
    # Assert: every round happened with every agent, and the final model is the simulation's
    assert [v.version for v in versions] == [0, 1, 2, 3]
    assert versions[-1].final
    for v, h in zip(versions[1:], sim.history, strict=True):
        assert sum(len(a) for a in v.participants.values()) == h["participants"] == 6
    final = versions[-1].params
    assert final.dtype == sim.final_params.dtype
    assert final.tobytes() == np.asarray(sim.final_params, np.float32).tobytes()
    # and a consumer that knows nothing of fedstream's code sees and verifies every version
    trust_json = json.loads((fed.keys_dir / "trust.json").read_text())
    seen = asyncio.run(independent_read(stack.kafka_bootstrap, Topics(topic_prefix).models,
                                        trust_json, 4))
    assert seen == [0, 1, 2, 3]
