"""Bad updates and late agents never disturb a round; each rejection is counted by reason."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas import fedstream_pb2 as pb
from schemas.codec import Codec
from schemas.he import HEContext, generate_keys
from schemas.signing import header, load_private_key, seal
from schemas.task import codec_params
from schemas.topics import Topics
from tests.e2e.helpers import (
    make_federation,
    rejected,
    scrape,
    simulate_federation,
    watch,
    with_metrics,
)

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _attack(fed, v) -> None:
    """Publish forged updates for region-0 while round v.next_task.round is open."""
    task = v.message.next_task
    region = "region-0"
    victim = fed.fleet[region][0]
    key = load_private_key(fed.keys_dir / "identities" / f"{victim}.pem")
    public = HEContext.from_bytes((fed.keys_dir / "he" / "public.ctx").read_bytes())
    params = codec_params(task.codec)  # the round's own codec (chunks fit the broker's cap)
    delta = np.full(v.params.size, 0.05, np.float32)
    good_payloads = Codec(params, v.params.size, public).encode(delta, 50, seed=1)
    _, other_public = generate_keys()
    foreign = Codec(params, v.params.size, HEContext.from_bytes(other_public)).encode(delta, 50, 1)

    topic = Topics(fed.namespace).update(region, victim)

    def update(round_id, fingerprint, payloads, signer_key):
        return [seal(pb.UPDATE_CHUNK, pb.UpdateChunk(
            header=header(victim, round_id, v.version, fingerprint, i, len(payloads)),
            agent_id=victim, region=region, payload=p, weight=48 if i == 0 else 0), victim,
            signer_key, topic=topic)
            for i, p in enumerate(payloads)]

    forged = {
        "wrong key": update(task.round, task.he_fingerprint, good_payloads,
                            Ed25519PrivateKey.generate()),
        "wrong fingerprint": update(task.round, HEContext.from_bytes(other_public).fingerprint,
                                    foreign, key),
        "other round": update(task.round + 5, task.he_fingerprint, good_payloads, key),
        "garbage": [b"\x00not a protobuf envelope\xff" * 10],
    }
    host, port = fed.mqtt[region]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="attacker")
    client.connect(host, port)
    client.loop_start()
    for msgs in forged.values():
        for raw in msgs:
            client.publish(Topics(fed.namespace).update(region, victim), raw, qos=1).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


def test_forged_updates_are_rejected_and_the_round_is_untouched(stack, tmp_path, topic_prefix):
    # Prepare: the real federation, plus a metrics port on region-0's aggregator
    fed = make_federation(stack.mqtt, stack.kafka_bootstrap, tmp_path, topic_prefix, rounds=2)
    port = with_metrics(fed, "region-0")
    sim = simulate_federation(fed, rounds=2)
    attacked = []

    def on_version(v):
        if v.version == 0:
            _attack(fed, v)
            attacked.append(time.time())

    # Execute
    try:
        fed.start_all()
        versions = asyncio.run(watch(fed, timeout_s=400, on_version=on_version))
        metrics = scrape(port)
    finally:
        fed.stop_all()
    # Assert: each forgery was refused for its own reason ...
    assert attacked
    assert rejected(metrics, "regional", "bad_signature") >= 1
    assert rejected(metrics, "regional", "wrong_fingerprint") >= 1
    assert rejected(metrics, "regional", "wrong_round") >= 1
    assert rejected(metrics, "regional", "malformed") >= 1
    # ... and the rounds went on exactly as without the attacker
    assert [v.version for v in versions] == [0, 1, 2]
    assert all(sum(map(len, v.participants.values())) == 6 for v in versions[1:])
    assert versions[-1].params.tobytes() == np.asarray(sim.final_params, np.float32).tobytes()


def test_late_agent_does_not_block_the_round(stack, tmp_path, topic_prefix):
    # Prepare: agent-000 (region-0) is a straggler that always publishes after the deadline
    fed = make_federation(stack.mqtt, stack.kafka_bootstrap, tmp_path, topic_prefix, rounds=2,
                          deadline_s=20)
    straggler = fed.fleet["region-0"][0]
    fed.per_process_args[straggler] = ["--straggle-s", "28"]
    port = with_metrics(fed, "region-0")
    # Execute
    try:
        fed.start_all()
        t0 = time.time()
        versions = asyncio.run(watch(fed, timeout_s=300))
        elapsed = time.time() - t0
        # the straggler's round-1 update lands during round 2: make sure it has been judged
        deadline = time.time() + 40
        while time.time() < deadline and rejected(scrape(port), "regional", "late") < 1:
            time.sleep(1)
        metrics = scrape(port)
    finally:
        fed.stop_all()
    # Assert: both rounds closed at their deadline without the straggler ...
    assert [v.version for v in versions] == [0, 1, 2]
    for v in versions[1:]:
        assert straggler not in v.participants["region-0"]
        assert sum(map(len, v.participants.values())) == 5
    assert elapsed < 2 * 28 + 30, "the rounds waited for the straggler"
    # ... and its late updates were refused and counted, not silently dropped
    assert rejected(metrics, "regional", "late") >= 1
