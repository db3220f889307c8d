"""Fuzzing both entry points with 10,000 inputs each, on the real brokers and services.

MQTT update topic (region-1's aggregator) and Kafka partials topic (the global aggregator): random
bytes, mutated valid envelopes (bit flips, truncations) and validly signed but malicious messages
(signed with the stolen device's key, or with a region's key for partials: every header field,
payload and weight drawn at random or mutated from a real one). Each test asserts: every input
rejected and counted (``fedstream_rejected_total``), every service alive and exiting 0, every
round completed with every honest agent, and the model bit-identical to the simulation.

The corpora come from a seeded generator, so a failure reproduces; the unit-level fuzzers in
``test_fuzz_units.py`` drive the same checks with Hypothesis (shrinking) without brokers.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from schemas import fedstream_pb2 as pb
from schemas.kafka import CLIENT_SIZES
from schemas.signing import header, load_private_key, seal
from schemas.topics import Topics
from tests.adversarial.helpers import assert_matches_simulation, run_attack

pytestmark = [pytest.mark.network, pytest.mark.slow]

N = 10_000


def _flip(rng, data: bytes, max_flips: int = 8) -> bytes:
    out = bytearray(data)
    for pos in rng.choice(len(out), size=min(len(out), int(rng.integers(1, max_flips + 1))),
                          replace=False):
        out[pos] ^= int(rng.integers(1, 256))
    return bytes(out)


def mqtt_corpus(dev, mv, rng):
    """``N`` (topic, bytes) inputs for the update topics of the thief's region."""
    codec = dev.codec(mv)
    honest = dev.honest(mv)
    up0 = pb.UpdateChunk.FromString(pb.Envelope.FromString(honest[0]).body)
    items = codec.framer.parse(up0.payload).ciphertexts()
    own = dev.topics.update(dev.region, dev.agent)
    other = dev.topics.update(dev.region, "agent-004")
    r = mv.next_task.round
    for i in range(N):
        kind = i % 6
        topic = other if rng.random() < 0.1 else own
        if kind == 0:  # random bytes
            yield topic, rng.bytes(int(rng.integers(0, 4096)))
        elif kind == 1:  # a valid envelope, bit-flipped
            yield topic, _flip(rng, honest[0])
        elif kind == 2:  # a valid envelope, cut short (appended bytes may parse as an unknown
            # field and leave the very same, validly signed update: not an attack)
            yield topic, honest[0][:int(rng.integers(0, len(honest[0])))]
        elif kind == 3:  # validly signed, random header, a damaged payload
            env = dev.envelope(mv, int(rng.integers(0, 4)), int(rng.integers(0, 4)),
                               _flip(rng, up0.payload, 4), int(rng.integers(0, 5000)),
                               round_id=int(rng.choice([r - 1, r, r + 1, rng.integers(0, 99)])))
            yield own, env
        elif kind == 4:  # validly signed, right header, random payload
            yield own, dev.envelope(mv, 0, codec.num_chunks,
                                    rng.bytes(int(rng.integers(0, 20_000))), up0.weight)
        else:  # validly signed, well-formed payload, one lie: summands or weight
            if rng.random() < 0.5:
                payload = codec.framer.frame_cts(0, int(rng.integers(2, 65)), items)
                yield own, dev.envelope(mv, 0, codec.num_chunks, payload, up0.weight)
            else:
                bad_w = int(rng.choice([0, 5000, 257, 1025, 2**31]))
                yield own, dev.envelope(mv, 0, codec.num_chunks, up0.payload, bad_w)


def test_fuzz_mqtt_update_topic(stack, tmp_path, topic_prefix):
    sent: list[int] = []

    def attack(dev, mv):
        if mv.next_task.round == 1:
            rng = np.random.default_rng(2026)
            infos = [dev.client.publish(t, raw, qos=1) for t, raw in mqtt_corpus(dev, mv, rng)]
            infos[-1].wait_for_publish(300)
            sent.append(len(infos))
        for e in dev.honest(mv):
            dev.publish(e)

    out = run_attack(stack, tmp_path, topic_prefix, attack, timeout_s=600, deadline_s=600,
                     extra_global=["--codec.chunk-bytes", "70000"],
                     extra_regional=["--rate-per-s", "1e6", "--rate-burst", "1e6"])

    assert sent == [N]
    assert out.total_rejected("region-1") >= N
    out.assert_everyone_counted()
    assert_matches_simulation(out, 2)


def partial_corpus(fed, round_id: int, fingerprint: str, rng):
    """``N`` records for the partials topic: junk, mutated and region-signed malicious ones."""
    topic = Topics(fed.namespace).partials
    keys = {r: load_private_key(fed.keys_dir / "identities" / f"{r}.pem") for r in fed.fleet}
    agents = {r: a for r, a in fed.fleet.items()}
    template = None
    for i in range(N):
        kind = i % 4
        region = str(rng.choice(sorted(fed.fleet)))
        members = sorted(rng.choice(agents[region], size=int(rng.integers(0, 5)), replace=True))
        part = pb.PartialChunk(
            header=header(region, int(rng.choice([round_id, round_id + 1, round_id - 1])), 0,
                          fingerprint if rng.random() < 0.8 else "00" * 32,
                          int(rng.integers(0, 3)), int(rng.integers(1, 3))),
            region=region, agents=members, weights=[int(w) for w in rng.integers(0, 1100,
                                                                                  len(members))],
            group=int(rng.integers(0, 3)), group_count=int(rng.integers(0, 3)),
            payload=rng.bytes(int(rng.integers(1, 70_000))))
        raw = seal(pb.PARTIAL_CHUNK, part, region, keys[region], topic=topic)
        if template is None:
            template = raw
        if kind == 0:
            yield rng.bytes(int(rng.integers(0, 4096)))
        elif kind == 1:
            yield _flip(rng, raw)
        elif kind == 2:
            yield raw[:int(rng.integers(0, len(raw)))]
        else:
            yield raw


def test_fuzz_kafka_partials_topic(stack, tmp_path, topic_prefix):
    produced = threading.Event()

    def honest(dev, mv):  # region-1's round-1 partial comes after every fuzz record
        assert produced.wait(300)
        for e in dev.honest(mv):
            dev.publish(e)

    async def during(out, v):
        if v.version != 0:
            return
        fed = out.device.fed
        rng = np.random.default_rng(7)
        p = AIOKafkaProducer(bootstrap_servers=fed.kafka, linger_ms=20, **CLIENT_SIZES)
        await p.start()
        try:
            futs = [await p.send(Topics(fed.namespace).partials, raw, key=b"fuzz")
                    for raw in partial_corpus(fed, v.message.next_task.round,
                                              v.message.next_task.he_fingerprint, rng)]
            await asyncio.gather(*futs)
        finally:
            await p.stop()
        produced.set()

    out = run_attack(stack, tmp_path, topic_prefix, honest, during=during, timeout_s=600,
                     deadline_s=600)

    # every record refused by reason, or (a chunk of a group already held) counted as a duplicate
    assert out.total_rejected("global") \
        + out.counter("global", "fedstream_duplicates_total", service="global") >= N
    out.assert_everyone_counted()
    assert_matches_simulation(out, 2)
