"""One stolen device cannot stop, stall or steer the federation (real brokers, real services).

Each test replaces ``agent-005`` (region-1) of a 2 regions x 4 agents encrypted federation by a
process holding only that device's key and the public HE context, runs one attack from the
compromised-device issue, and checks: every service alive and exiting 0, every round completed,
the attack counted by reason, and the final model bit-identical to the simulation in which the
agents that did not count in a round (as each version's provenance says) did not take part.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from global_aggregator.quarantine_cli import lift
from schemas import fedstream_pb2 as pb
from schemas.kafka import CLIENT_SIZES
from schemas.signing import load_private_key, seal
from schemas.topics import Topics
from tests.adversarial.helpers import (
    AGENTS,
    THIEF,
    THIEF_REGION,
    assert_matches_simulation,
    run_attack,
)
from tests.e2e.helpers import make_federation, scrape, total_rejected, watch

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _noise(codec) -> np.ndarray:
    """An in-range quantized update (what a device that trains nothing might send)."""
    return np.random.default_rng(5).integers(-3, 4, codec.num_params)


def _counted(v, agent: str) -> bool:
    return any(agent in agents for agents in v.participants.values())


def _assert_thief_group_excluded(out, rounds, reasons):
    groups = out.excluded()
    assert [r for r, _ in groups] == list(range(1, rounds + 1)), groups
    for _, g in groups:
        assert g.region == THIEF_REGION and THIEF in g.agents and g.reason in reasons
        assert len(g.agents) >= 2  # never narrowed below the privacy floor
    for v in out.versions[1:]:
        out_group = {a for r, g in groups if r == v.round for a in g.agents}
        every = {f"agent-{i:03d}" for i in range(AGENTS)}
        assert {a for agents in v.participants.values() for a in agents} == every - out_group
    assert out.counter("global", "fedstream_anomalous_updates_total",
                       reason=groups[0][1].reason) >= 2
    assert out.rejected("global", "excluded_group") >= 2 * rounds


def test_negative_encrypted_weight_ends_in_an_excluded_group(stack, tmp_path, topic_prefix):
    def attack(dev, mv):
        codec = dev.codec(mv)
        for e in dev.envelopes(mv, codec.encode_raw(codec.pack(_noise(codec), -700)), 256):
            dev.publish(e)

    out = run_attack(stack, tmp_path, topic_prefix, attack)

    _assert_thief_group_excluded(out, 2, {"lane_bound", "weight_mismatch"})
    assert_matches_simulation(out, 2)


def test_weight_pulling_the_total_down_to_the_agent_count_is_excluded(stack, tmp_path,
                                                                       topic_prefix):
    # the thief knows every other device's weight (worst case) and makes the total weight 8
    def attack(dev, mv):
        codec = dev.codec(mv)
        path = dev.fed.data["path"]
        others = sum(codec.weight(len(np.load(path.replace("{device_id}", a))["y_train"]))
                     for a in dev.fed.fleet_ids if a != THIEF)
        fake = AGENTS - others
        for e in dev.envelopes(mv, codec.encode_raw(codec.pack(_noise(codec), fake)), 256):
            dev.publish(e)

    out = run_attack(stack, tmp_path, topic_prefix, attack)

    _assert_thief_group_excluded(out, 2, {"lane_bound", "weight_mismatch"})
    assert_matches_simulation(out, 2)


@pytest.mark.parametrize("lane", [-600, 200], ids=["every-lane-at-minus-600", "beyond-8-bits"])
def test_lanes_out_of_range_end_in_an_excluded_group(stack, tmp_path, topic_prefix, lane):
    def attack(dev, mv):
        codec = dev.codec(mv)
        q = np.full(codec.num_params, lane, np.int64)
        for e in dev.envelopes(mv, codec.encode_raw(codec.pack(q, 256)), 256):
            dev.publish(e)

    out = run_attack(stack, tmp_path, topic_prefix, attack)

    _assert_thief_group_excluded(out, 2, {"lane_bound", "l2_bound", "inexact_sum"})
    assert_matches_simulation(out, 2)


def test_bad_last_chunk_of_a_multi_chunk_update_changes_nothing(stack, tmp_path, topic_prefix):
    # round 1: good chunks, then a damaged last chunk, then silence; round 2: the same, then the
    # real last chunk: nothing of the bad one may have stuck, so the update now counts whole
    def attack(dev, mv):
        envs = dev.honest(mv)
        assert len(envs) >= 2, "the round must use several chunks"
        up = pb.UpdateChunk.FromString(pb.Envelope.FromString(envs[-1]).body)
        bad = bytearray(up.payload)
        bad[len(bad) // 2] ^= 0xFF
        for e in envs[:-1]:
            dev.publish(e)
        dev.publish(dev.envelope(mv, up.header.chunk_index, up.header.chunk_count, bytes(bad), 0))
        if mv.next_task.round == 2:
            dev.publish(envs[-1])

    out = run_attack(stack, tmp_path, topic_prefix, attack, deadline_s=30,
                     extra_global=["--codec.chunk-bytes", "70000"])

    assert out.rejected("region-1", "corrupt") + out.rejected("region-1", "truncated") == 2
    assert out.rejected("region-1", "incomplete") == 1
    assert out.excluded() == []
    assert not _counted(out.versions[1], THIEF) and _counted(out.versions[2], THIEF)
    assert sum(map(len, out.versions[1].participants.values())) == 7
    assert_matches_simulation(out, 2)


def test_a_claimed_summand_count_of_64_shuts_nobody_else_out(stack, tmp_path, topic_prefix):
    def attack(dev, mv):
        codec = dev.codec(mv)
        env = pb.Envelope.FromString(dev.honest(mv)[0])
        chunk = codec.framer.parse(pb.UpdateChunk.FromString(env.body).payload)
        forged = codec.framer.frame_cts(0, 64, chunk.ciphertexts())
        dev.publish(dev.envelope(mv, 0, codec.num_chunks, forged, 256))
        if mv.next_task.round == 2:  # the forgery left no trace: its real update still counts
            for e in dev.honest(mv):
                dev.publish(e)

    out = run_attack(stack, tmp_path, topic_prefix, attack, deadline_s=30)

    assert out.rejected("region-1", "bad_summands") == 2
    assert out.rejected("region-1", "too_many_summands") == 0
    # the honest agents of region-1 always count (before, the forgery shut them out)
    assert out.versions[1].participants["region-1"] == ["agent-004", "agent-006", "agent-007"]
    assert out.versions[2].participants["region-1"] == [f"agent-00{i}" for i in range(4, 8)]
    assert_matches_simulation(out, 2)


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _answered(port: int) -> float:
    """Messages region-1 refused (any reason) or answered as duplicates so far."""
    m = scrape(port)
    return total_rejected(m, "regional") + m.get(
        ("fedstream_duplicates_total", (("service", "regional"),)), 0.0)


def test_replay_and_junk_floods_keep_region_memory_flat(stack, tmp_path, topic_prefix):
    measured: dict[str, float] = {}

    def attack(dev, mv):
        envs = dev.honest(mv)
        if mv.next_task.round != 1:
            for e in envs:
                dev.publish(e)
            return
        # round 1 stays open while the thief floods: its last chunk comes after the flood
        assert len(envs) >= 2
        pid = dev.fed.procs[THIEF_REGION].pid
        args = dev.fed.per_process_args[THIEF_REGION]
        port = int(args[args.index("--metrics-port") + 1])
        dev.publish(envs[0])
        time.sleep(2)
        measured["before"] = _rss_mib(pid)
        base = _answered(port)
        topic = dev.topics.update(dev.region, dev.agent)
        infos = [dev.client.publish(topic, envs[0], qos=1) for _ in range(10_000)]
        infos[-1].wait_for_publish(300)
        deadline = time.time() + 300
        while _answered(port) < base + 10_000 and time.time() < deadline:
            time.sleep(0.5)
        measured["after_replays"] = _rss_mib(pid)
        junk = os.urandom(3_900_000)
        codec = dev.codec(mv)
        for i in range(300):
            dev.publish(dev.envelope(mv, 1, codec.num_chunks, junk[i:] + junk[:i], 256))
        deadline = time.time() + 300
        while _answered(port) < base + 10_300 and time.time() < deadline:
            time.sleep(0.5)
        measured["answered"] = _answered(port) - base
        measured["after"] = _rss_mib(pid)
        for e in envs[1:]:
            dev.publish(e)

    out = run_attack(stack, tmp_path, topic_prefix, attack, deadline_s=600,
                     extra_global=["--codec.chunk-bytes", "70000"])

    # every copy answered, none stored: duplicates (acked at once) or refused by reason
    assert measured["answered"] >= 10_300, measured
    assert out.counter("region-1", "fedstream_duplicates_total", service="regional") > 0
    assert out.rejected("region-1", "rate_limited") > 0
    assert measured["after_replays"] <= measured["before"] * 1.10, measured
    assert measured["after"] <= measured["before"] * 1.10, measured
    out.assert_everyone_counted()
    assert_matches_simulation(out, 2)


def test_topic_and_federation_binding(stack, tmp_path, topic_prefix):
    seen_eval: list[bool] = []

    def attack(dev, mv):
        codec = dev.codec(mv)
        envs = dev.honest(mv)
        up = pb.UpdateChunk.FromString(pb.Envelope.FromString(envs[0]).body)
        victim_topic = dev.topics.update(dev.region, "agent-004")
        other_fed = Topics(dev.fed.namespace + "-other").update(dev.region, dev.agent)
        # signed for another federation, replayed here
        dev.publish(seal(pb.UPDATE_CHUNK, up, dev.agent, dev.key, topic=other_fed))
        # its own valid update replayed on another agent's topic
        dev.publish(envs[0], topic=victim_topic)
        # freshly signed by the thief for another agent's topic
        dev.publish(dev.envelope(mv, 0, codec.num_chunks, up.payload, up.weight,
                                 topic=victim_topic), topic=victim_topic)
        for e in envs:
            dev.publish(e)
        seen_eval.append(up.HasField("eval"))

    out = run_attack(stack, tmp_path, topic_prefix, attack)

    assert out.rejected("region-1", "bad_signature") == 4
    assert out.rejected("region-1", "wrong_topic") == 2
    assert seen_eval == [False, False]  # only ciphertext (and a coarse weight) leaves a device
    out.assert_everyone_counted()
    assert all("federated_accuracy" not in v.metrics for v in out.versions[1:])
    assert_matches_simulation(out, 2)


def test_an_appended_old_version_rolls_nothing_back(stack, tmp_path, topic_prefix):
    state: dict = {}
    restarted = threading.Event()

    def honest(dev, mv):
        if mv.next_task.round == 2:  # round 2 stays open until the global has restarted
            assert restarted.wait(180)
        for e in dev.honest(mv):
            dev.publish(e)

    async def during(out, v):
        fed = out.device.fed
        if v.version == 0:
            state["v0"] = v
        if v.version == 1 and not restarted.is_set():
            # anyone able to write the model topic appends the old, validly signed v0 ...
            raw = seal(pb.MODEL_VERSION, state["v0"].message, "global",
                       load_private_key(fed.keys_dir / "identities" / "global.pem"),
                       topic=Topics(fed.namespace).models)
            p = AIOKafkaProducer(bootstrap_servers=fed.kafka, **CLIENT_SIZES)
            await p.start()
            try:
                await p.send_and_wait(Topics(fed.namespace).models, raw, key=b"x")
            finally:
                await p.stop()
            # ... and the global restarts: it must resume from v1, the highest, not from v0
            fed.restart("global")
            deadline = time.time() + 120
            while "resuming from model v1" not in fed.log("global", 400):
                assert time.time() < deadline and fed.alive("global"), fed.log("global")
                await asyncio.sleep(0.2)
            restarted.set()

    out = run_attack(stack, tmp_path, topic_prefix, honest, rounds=3, during=during)

    assert restarted.is_set()
    assert "resuming from model v0" not in out.fed.log("global", 400)
    assert out.rejected("region-1", "stale_version") >= 1
    assert out.rejected("region-0", "stale_version") >= 1
    out.assert_everyone_counted()
    assert_matches_simulation(out, 3)


def test_repeat_offender_is_quarantined_and_an_operator_lifts_it(stack, tmp_path, topic_prefix):
    lifted: list[int] = []

    def attack(dev, mv):
        codec = dev.codec(mv)
        q = np.full(codec.num_params, -600, np.int64)
        for e in dev.envelopes(mv, codec.encode_raw(codec.pack(q, 256)), 256):
            dev.publish(e)

    async def during(out, v):
        if v.version == 3 and not lifted:  # consumed in round 4 or 5, applied to that version
            lifted.append(v.version)
            await lift(out.device.fed.kafka, out.device.fed.keys_dir, out.device.fed.namespace,
                       [THIEF])

    out = run_attack(stack, tmp_path, topic_prefix, attack, rounds=5, deadline_s=40,
                     extra_global=["--quarantine-after", "2"], during=during)

    v = out.versions
    assert list(v[1].message.quarantine.agents) == []
    assert list(v[2].message.quarantine.agents) == [THIEF]
    assert list(v[2].message.next_task.quarantined_agents) == [THIEF]
    assert not _counted(v[3], THIEF) and not v[3].message.provenance.excluded
    assert out.rejected("region-1", "quarantined") >= 1
    assert list(v[5].message.quarantine.agents) == []  # the operator's lift
    assert_matches_simulation(out, 5)


def test_a_round_always_ends_even_below_min_participants(stack, tmp_path, topic_prefix):
    # Prepare: region-1's aggregator is down for the whole run; region-0 alone has 4 agents,
    # under --min-participants 6: before, such a round never closed
    fed = make_federation(stack.mqtt, stack.kafka_bootstrap, tmp_path, topic_prefix,
                          agents=AGENTS, regions=2, rounds=2, deadline_s=10,
                          extra_global=["--min-participants", "6"])
    t0 = time.time()
    try:
        fed.start_all(skip=("region-1",))
        versions = asyncio.run(watch(fed, timeout_s=240))
        exits = {n: fed.wait(n, 60) for n in fed.procs if n.startswith("agent-")
                 and n in fed.fleet["region-0"]}
        exits["global"] = fed.wait("global", 60)
        for name in [*fed.fleet["region-1"], "region-0"]:
            if name in fed.procs:
                fed.procs[name].send_signal(signal.SIGTERM)
                exits[name] = fed.wait(name, 30)
    finally:
        fed.stop_all()

    # Assert: each round closed at deadline + grace, the model republished unchanged
    assert [v.version for v in versions] == [0, 1, 2] and versions[-1].final
    assert time.time() - t0 < 200
    for v in versions[1:]:
        assert v.participants == {"region-0": fed.fleet["region-0"]}
        assert v.params.tobytes() == versions[0].params.tobytes()
    assert set(exits.values()) == {0}, {n: fed.log(n, 20) for n, c in exits.items() if c}
