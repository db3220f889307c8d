"""RegionalSum and GlobalRound against numpy sums of the codec's quantized updates."""

from __future__ import annotations

import numpy as np
import pytest

from global_aggregator.combine import GlobalRound
from regional_aggregator.summing import RegionalSum
from schemas.codec import Codec, CodecParams
from schemas.errors import InvalidMessage
from schemas.he import HEContext, generate_keys

NUM_PARAMS = 30_000


@pytest.fixture(scope="module")
def keys():
    return generate_keys()


@pytest.fixture(scope="module", params=["plain", "ckks"])
def codecs(request, keys):
    """(edge/regional codec, global codec): public and secret context in CKKS mode."""
    if request.param == "plain":
        params = CodecParams(bits=8, clip_l2=1.0, clip_coord=0.05, encrypted=False, chunk_bytes=1 << 16)
        codec = Codec(params, NUM_PARAMS, None)
        return codec, codec
    params = CodecParams(bits=8, clip_l2=1.0, clip_coord=0.05, encrypted=True, chunk_bytes=4096)
    secret, public = keys
    return (
        Codec(params, NUM_PARAMS, HEContext.from_bytes(public)),
        Codec(params, NUM_PARAMS, HEContext.from_bytes(secret)),
    )


def _updates(k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        (f"agent-{i:03d}", rng.normal(scale=0.01, size=NUM_PARAMS).astype(np.float32), 10 + 7 * i, 1000 + i)
        for i in range(k)
    ]


def test_codec_splits_into_several_chunks(codecs):
    edge, _ = codecs
    assert edge.num_chunks >= 2  # so that chunk-wise buffering is exercised


def test_partial_equals_numpy_sum_of_quantized_updates_and_duplicates_are_ignored(codecs):
    edge, glob = codecs
    rs = RegionalSum(edge, round_id=1)
    updates = _updates(3)
    encoded = {a: edge.encode(d, n, s) for a, d, n, s in updates}

    # interleave chunks across agents, deliver everything twice (QoS 1 redelivery)
    results = []
    for _ in range(2):
        for ci in range(edge.num_chunks):
            for a, chunks in encoded.items():
                results.append(rs.add_chunk(a, ci, edge.num_chunks, chunks[ci]))

    n_chunks = 3 * edge.num_chunks
    assert results == [True] * n_chunks + [False] * n_chunks
    assert rs.agents == [u[0] for u in updates] and rs.num_agents == 3 and rs.has("agent-001")
    qsum, weight = glob.decode(rs.partial())
    expected = sum(edge.quantize_update(d, n, s) for _, d, n, s in updates)
    assert np.array_equal(qsum, expected)
    assert weight == sum(n for _, _, n, _ in updates)


def test_agent_counts_only_when_all_its_chunks_arrived(codecs):
    edge, _ = codecs
    rs = RegionalSum(edge, round_id=1)
    (a, d, n, s), (b, d2, n2, s2) = _updates(2)
    ca, cb = edge.encode(d, n, s), edge.encode(d2, n2, s2)

    for ci in range(edge.num_chunks):
        rs.add_chunk(a, ci, edge.num_chunks, ca[ci])
    rs.add_chunk(b, 0, edge.num_chunks, cb[0])

    assert rs.agents == [a] and rs.in_flight == [b] and not rs.has(b)
    assert len(rs.partial()) == edge.num_chunks


def test_bad_chunk_labels_are_refused(codecs):
    edge, _ = codecs
    rs = RegionalSum(edge, round_id=1)
    a, d, n, s = _updates(1)[0]
    chunks = edge.encode(d, n, s)
    with pytest.raises(InvalidMessage) as e:
        rs.add_chunk(a, 0, edge.num_chunks + 1, chunks[0])
    assert e.value.reason == "wrong_chunk_count"
    with pytest.raises(InvalidMessage) as e:
        rs.add_chunk(a, edge.num_chunks, edge.num_chunks, chunks[0])
    assert e.value.reason == "chunk_index_out_of_range"
    with pytest.raises(InvalidMessage) as e:
        rs.add_chunk(a, 1, edge.num_chunks, chunks[0])
    assert e.value.reason == "chunk_index_mismatch"
    with pytest.raises(ValueError):
        rs.partial()


class _CountingCodec:
    def __init__(self, codec):
        self._codec, self.decodes = codec, 0

    def __getattr__(self, name):
        return getattr(self._codec, name)

    def decode(self, chunks):
        self.decodes += 1
        return self._codec.decode(chunks)


def test_global_round_decrypts_only_the_total_once(codecs):
    edge, glob = codecs
    updates = _updates(5, seed=1)
    regions = {"region-0": updates[:2], "region-1": updates[2:]}
    counting = _CountingCodec(glob)
    gr = GlobalRound(counting, round_id=4)

    for region, ups in regions.items():
        rs = RegionalSum(edge, round_id=4)
        for a, d, n, s in ups:
            for ci, payload in enumerate(edge.encode(d, n, s)):
                rs.add_chunk(a, ci, edge.num_chunks, payload)
        for ci, payload in enumerate(rs.partial()):
            assert gr.add_partial(region, ci, payload, rs.agents)
            assert not gr.add_partial(region, ci, payload, rs.agents)  # redelivered partial
    avg, weight_sum, n = gr.finish()

    assert counting.decodes == 1
    qsum = sum(edge.quantize_update(d, nn, s) for _, d, nn, s in updates)
    total_w = sum(nn for _, _, nn, _ in updates)
    assert weight_sum == total_w and n == 5
    assert np.array_equal(avg, glob.average(qsum, total_w))
    assert gr.complete_regions == ["region-0", "region-1"]
    assert gr.participants == {"region-0": ["agent-000", "agent-001"],
                               "region-1": ["agent-002", "agent-003", "agent-004"]}


def test_global_round_refuses_overlapping_or_inconsistent_partials(codecs):
    edge, _ = codecs
    a, d, n, s = _updates(1)[0]
    chunks = edge.encode(d, n, s)
    gr = GlobalRound(edge, round_id=1, min_agents_per_partial=1)
    gr.add_partial("region-0", 0, chunks[0], [a])
    with pytest.raises(InvalidMessage) as e:
        gr.add_partial("region-0", 1, chunks[1], [a, "agent-009"])
    assert e.value.reason == "agents_mismatch"
    with pytest.raises(InvalidMessage) as e:
        gr.add_partial("region-1", 0, chunks[0], [a])
    assert e.value.reason == "agent_in_two_regions"
    strict = GlobalRound(edge, round_id=1, min_agents_per_partial=2)
    with pytest.raises(InvalidMessage) as e:
        strict.add_partial("region-0", 0, chunks[0], [a])
    assert e.value.reason == "too_few_agents"
    with pytest.raises(ValueError):
        gr.finish()  # region-0 is incomplete
