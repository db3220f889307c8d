"""RegionalSum and GlobalRound against numpy sums of the codec's quantized updates, including
stolen-device payloads: validly made, hostile ciphertexts that only the decode bounds can catch."""

from __future__ import annotations

import numpy as np
import pytest

from global_aggregator.combine import GlobalRound
from regional_aggregator.summing import RegionalSum, deal_groups
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
        params = CodecParams(bits=8, clip_l2=1.0, clip_coord=0.05, encrypted=False,
                             chunk_bytes=1 << 16)
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
    return [(f"agent-{i:03d}", rng.normal(scale=0.01, size=NUM_PARAMS).astype(np.float32),
             10 + 7 * i, 1000 + i) for i in range(k)]


def _feed(rs, edge, agent, delta, n, seed):
    for ci, payload in enumerate(edge.encode(delta, n, seed)):
        rs.add_chunk(agent, ci, edge.num_chunks, payload, weight=edge.weight(n))


def _send(gr, region, rs):
    groups = rs.groups()
    for g, group in enumerate(groups):
        for ci, payload in enumerate(group.payloads):
            gr.add_partial(region, g, len(groups), ci, payload, group.agents, group.weights)


def test_codec_splits_into_several_chunks(codecs):
    edge, _ = codecs
    assert edge.num_chunks >= 2  # so that chunk-wise buffering is exercised


def test_partial_equals_numpy_sum_of_quantized_updates_and_duplicates_are_ignored(codecs):
    edge, glob = codecs
    updates = _updates(3)
    rs = RegionalSum(edge, round_id=1, expected=[u[0] for u in updates])
    encoded = {a: edge.encode(d, n, s) for a, d, n, s in updates}
    weights = {a: edge.weight(n) for a, _, n, _ in updates}

    # interleave chunks across agents, deliver everything twice (QoS 1 redelivery)
    results = []
    for _ in range(2):
        for ci in range(edge.num_chunks):
            for a, chunks in encoded.items():
                results.append(rs.add_chunk(a, ci, edge.num_chunks, chunks[ci], weights[a]))

    n_chunks = 3 * edge.num_chunks
    assert results == [True] * n_chunks + [False] * n_chunks
    assert rs.agents == [u[0] for u in updates] and rs.num_agents == 3 and rs.has("agent-001")
    qsum, weight = glob.decode(rs.partial())
    expected = sum(edge.quantize_update(d, n, s) for _, d, n, s in updates)
    assert np.array_equal(qsum, expected)
    assert weight == sum(weights.values())


def test_agent_counts_only_when_all_its_chunks_arrived(codecs):
    edge, _ = codecs
    (a, d, n, s), (b, d2, n2, s2) = _updates(2)
    rs = RegionalSum(edge, round_id=1, expected=[a, b])
    cb = edge.encode(d2, n2, s2)

    _feed(rs, edge, a, d, n, s)
    rs.add_chunk(b, 0, edge.num_chunks, cb[0], edge.weight(n2))

    assert rs.agents == [a] and rs.in_flight == [b] and not rs.has(b)
    assert len(rs.partial()) == edge.num_chunks


def test_bad_last_chunk_changes_nothing(codecs):
    # Prepare: a stolen device sends good chunks, then a damaged last chunk
    edge, glob = codecs
    (a, d, n, s), (b, d2, n2, s2) = _updates(2)
    rs = RegionalSum(edge, round_id=1, expected=[a, b])
    _feed(rs, edge, b, d2, n2, s2)
    chunks = edge.encode(d, n, s)
    for ci in range(edge.num_chunks - 1):
        rs.add_chunk(a, ci, edge.num_chunks, chunks[ci], edge.weight(n))
    last = bytearray(chunks[-1])
    last[len(last) // 2] ^= 0xFF

    # Execute
    with pytest.raises(InvalidMessage) as e:
        rs.add_chunk(a, edge.num_chunks - 1, edge.num_chunks, bytes(last), 0)

    # Assert: refused, counted by reason, and the sum is exactly the honest agent's
    assert e.value.reason in {"corrupt", "truncated"}
    assert rs.agents == [b]
    qsum, _ = glob.decode(rs.partial())
    assert np.array_equal(qsum, edge.quantize_update(d2, n2, s2))


def test_bad_chunk_labels_summands_and_weights_are_refused(codecs):
    edge, _ = codecs
    (a, d, n, s), (b, d2, n2, s2) = _updates(2)
    rs = RegionalSum(edge, round_id=1, expected=[a, b])
    chunks = edge.encode(d, n, s)
    w = edge.weight(n)
    two = edge.add(chunks[0], edge.encode(d2, n2, s2)[0])  # a chunk claiming 2 summands

    def reason(*args):
        with pytest.raises(InvalidMessage) as e:
            rs.add_chunk(*args)
        return e.value.reason

    assert reason(a, 0, edge.num_chunks + 1, chunks[0], w) == "wrong_chunk_count"
    assert reason(a, edge.num_chunks, edge.num_chunks, chunks[0], w) == "chunk_index_out_of_range"
    assert reason(a, 1, edge.num_chunks, chunks[0], w) == "chunk_index_mismatch"
    assert reason(a, 0, edge.num_chunks, two, w) == "bad_summands"
    assert reason(a, 0, edge.num_chunks, chunks[0], -5) == "bad_weight"
    assert reason(a, 0, edge.num_chunks, chunks[0], 5000) == "bad_weight"
    assert reason(a, 0, edge.num_chunks, chunks[0], 257) == "bad_weight"  # not a coarse weight
    assert reason("agent-999", 0, edge.num_chunks, chunks[0], w) == "not_selected"
    assert rs.agents == [] and rs.in_flight == []
    with pytest.raises(InvalidMessage):
        rs.partial()


def test_groups_respect_the_privacy_floor():
    # Prepare: 7 agents dealt into floor(7 / 2) = 3 groups of >= 2, seeded per round
    agents = [f"agent-{i:03d}" for i in range(7)]

    # Execute
    deal = deal_groups(agents, 2, 8, seed=1, round_id=3, region="region-0")
    other = deal_groups(agents, 2, 8, seed=1, round_id=4, region="region-0")

    # Assert
    sizes = sorted(np.bincount(list(deal.values())).tolist())
    assert sizes == [2, 2, 3] and set(deal) == set(agents)
    assert deal != other  # group mates change from round to round
    assert deal_groups(agents, 2, 2, 1, 3, "r") and max(deal_groups(agents, 2, 2, 1, 3,
                                                                    "r").values()) == 1


def test_small_groups_merge_and_a_region_under_the_floor_forwards_nothing(codecs):
    edge, glob = codecs
    updates = _updates(4)
    rs = RegionalSum(edge, round_id=2, expected=[u[0] for u in updates], min_group=2)
    for a, d, n, s in updates[:3]:  # the fourth never arrives: one group may end with one agent
        _feed(rs, edge, a, d, n, s)

    groups = rs.groups()

    assert all(len(g.agents) >= 2 for g in groups)
    assert sorted(a for g in groups for a in g.agents) == [u[0] for u in updates[:3]]
    lonely = RegionalSum(edge, round_id=2, expected=[u[0] for u in updates], min_group=2)
    _feed(lonely, edge, *updates[0])
    assert lonely.groups() == []


class _CountingCodec:
    """Counts decryptions (calls of decode_sums) of the wrapped codec."""

    def __init__(self, codec):
        self._codec, self.decodes = codec, 0

    def __getattr__(self, name):
        return getattr(self._codec, name)

    def decode_sums(self, *args):
        self.decodes += 1
        return self._codec.decode_sums(*args)


def test_global_round_decrypts_only_the_total_once(codecs):
    edge, glob = codecs
    updates = _updates(5, seed=1)
    regions = {"region-0": updates[:2], "region-1": updates[2:]}
    counting = _CountingCodec(glob)
    gr = GlobalRound(counting, round_id=4, min_group=1)

    for region, ups in regions.items():
        rs = RegionalSum(edge, round_id=4, expected=[u[0] for u in ups], max_groups=2)
        for a, d, n, s in ups:
            _feed(rs, edge, a, d, n, s)
        groups = rs.groups()
        for g, group in enumerate(groups):
            for ci, payload in enumerate(group.payloads):
                assert gr.add_partial(region, g, len(groups), ci, payload, group.agents,
                                      group.weights)
                assert not gr.add_partial(region, g, len(groups), ci, payload, group.agents,
                                          group.weights)  # redelivered partial
    result = gr.finish()

    assert counting.decodes == 1 and result.excluded == []
    qsum = sum(edge.quantize_update(d, nn, s) for _, d, nn, s in updates)
    total_w = sum(edge.weight(nn) for _, _, nn, _ in updates)
    assert result.weight_sum == total_w and result.num_participants == 5
    assert np.array_equal(result.avg_delta, glob.average(qsum, total_w))
    assert gr.complete_regions == ["region-0", "region-1"]
    assert result.participants == {"region-0": ["agent-000", "agent-001"],
                                   "region-1": ["agent-002", "agent-003", "agent-004"]}


def _poisoned_round(edge, glob, poison):
    """2 regions x 4 agents, k = 2; agent-005 (region-1) sends ``poison(codec, q, w)``'s chunks
    with a valid-looking clear weight. Returns (result, honest agents, the simulation's avg)."""
    updates = _updates(8, seed=3)
    gr = GlobalRound(glob, round_id=5, min_group=2)
    for r, ups in (("region-0", updates[:4]), ("region-1", updates[4:])):
        rs = RegionalSum(edge, round_id=5, expected=[u[0] for u in ups], min_group=2, seed=9,
                         region=r)
        for a, d, n, s in ups:
            if a == "agent-005":
                payloads = poison(edge, edge.quantize_update(d, n, s), edge.weight(n))
                for ci, p in enumerate(payloads):
                    rs.add_chunk(a, ci, edge.num_chunks, p, weight=edge.weight(n))
            else:
                _feed(rs, edge, a, d, n, s)
        _send(gr, r, rs)
    return gr.finish(), updates


def _lanes_at(value):
    return lambda codec, q, w: codec.encode_raw(codec.pack(np.full_like(q, value), w))


def _weight_of(fake):
    return lambda codec, q, w: codec.encode_raw(codec.pack(q, fake))


def test_plain_mode_region_refuses_values_it_can_see():
    # Prepare: a trusted (plaintext) region sees each value and each weight
    codec = Codec(CodecParams(encrypted=False), 1000, None)
    q = np.full(1000, -600, np.int64)
    bad_values = [codec.framer.frame_plain(0, 1, 64, q.astype("<i8"))]
    good = codec.encode(np.zeros(1000), 64, 1)
    rs = RegionalSum(codec, round_id=1, expected=["agent-000"])

    # Execute / Assert
    with pytest.raises(InvalidMessage) as e:
        rs.add_chunk("agent-000", 0, 1, bad_values[0], weight=64)
    assert e.value.reason == "out_of_range"
    with pytest.raises(InvalidMessage) as e:
        rs.add_chunk("agent-000", 0, 1, good[0], weight=32)  # clear weight != framed weight
    assert e.value.reason == "bad_weight"


@pytest.mark.parametrize("name,poison", [
    ("lanes at -600", _lanes_at(-600)),
    ("lanes beyond 8 bits", _lanes_at(400)),
    ("negative weight", _weight_of(-700)),
    ("weight pulling the total down", _weight_of(-2000)),
])
def test_a_poisoned_group_is_excluded_and_the_rest_is_exact(keys, name, poison):
    # Prepare: CKKS, where the region cannot see what the stolen device encrypted
    params = CodecParams(bits=8, clip_l2=1.0, clip_coord=0.05, encrypted=True, chunk_bytes=4096)
    edge = Codec(params, NUM_PARAMS, HEContext.from_bytes(keys[1]))
    glob = Codec(params, NUM_PARAMS, HEContext.from_bytes(keys[0]))

    # Execute
    result, updates = _poisoned_round(edge, glob, poison)

    # Assert: one group of region-1, holding agent-005, is out; the rest sums exactly
    assert len(result.excluded) == 1, name
    bad = result.excluded[0]
    assert bad.region == "region-1" and "agent-005" in bad.agents and len(bad.agents) >= 2
    assert bad.reason in {"l2_bound", "lane_bound", "weight_mismatch", "inexact_sum"}
    kept = [u for u in updates if u[0] not in bad.agents]
    assert sorted(a for v in result.participants.values() for a in v) == [u[0] for u in kept]
    qsum = sum(edge.quantize_update(d, n, s) for _, d, n, s in kept)
    w = sum(edge.weight(n) for _, _, n, _ in kept)
    assert np.array_equal(result.avg_delta, glob.average(qsum, w))


def test_global_round_refuses_overlapping_or_inconsistent_partials(codecs):
    edge, _ = codecs
    (a, d, n, s), (b, d2, n2, s2) = _updates(2)
    chunks = edge.encode(d, n, s)
    w = edge.weight(n)
    gr = GlobalRound(edge, round_id=1, min_group=1)

    def reason(*args, round_=gr):
        with pytest.raises(InvalidMessage) as e:
            round_.add_partial(*args)
        return e.value.reason

    gr.add_partial("region-0", 0, 1, 0, chunks[0], [a], [w])
    assert reason("region-0", 0, 1, 1, chunks[1], [a, "agent-009"], [w, w]) == "agents_mismatch"
    assert reason("region-1", 0, 1, 0, chunks[0], [a], [w]) == "agent_in_two_regions"
    assert reason("region-0", 0, 2, 1, chunks[1], [a], [w]) == "bad_group"
    assert reason("region-2", 3, 2, 0, chunks[0], [b], [w]) == "bad_group"
    assert reason("region-2", 0, 1, 0, chunks[0], [b], [-1]) == "bad_weight"
    assert reason("region-2", 0, 1, 0, chunks[0], [b, "agent-7"], [w, w]) == "bad_summands"
    strict = GlobalRound(edge, round_id=1, min_group=2)
    assert reason("region-0", 0, 1, 0, chunks[0], [a], [w], round_=strict) == "too_few_agents"
    assert gr.finish().avg_delta is None  # region-0's only group is incomplete: nothing to use


def test_suspects_are_dealt_into_different_groups():
    agents = [f"agent-{i:03d}" for i in range(8)]
    for round_id in range(1, 30):
        deal = deal_groups(agents, 2, 8, seed=0, round_id=round_id, region="r",
                           suspects=["agent-001", "agent-005", "agent-006"])
        assert len({deal["agent-001"], deal["agent-005"], deal["agent-006"]}) == 3


def test_plaintext_region_applies_a_robust_rule_that_the_global_averages_back():
    # Prepare: a trusted plaintext region, 5 agents, one sending every value at the clip bound
    from regional_aggregator.robust import make_rule

    codec = Codec(CodecParams(encrypted=False, clip_l2=100.0, clip_coord=0.05, rotate=False,
                              bits=8), 6)
    honest = [np.array([1, 2, 3, 0, -1, 5]), np.array([2, 2, 4, 1, -1, 4]),
              np.array([1, 3, 3, 0, 0, 6]), np.array([3, 1, 2, 1, -2, 5])]
    evil = np.full(6, 127)
    agents = [f"agent-{i}" for i in range(5)]
    rs = RegionalSum(codec, 1, expected=agents, min_group=2, robust=make_rule("median"))
    for a, q in zip(agents, [*honest, evil]):
        rs.add_chunk(a, 0, 1, codec.encode_quantized(q, 64)[0], weight=64)

    # Execute: the region's one group, then the global's average of it
    (group,) = rs.groups()
    gr = GlobalRound(codec, 1, min_group=2)
    gr.add_partial("region-0", 0, 1, 0, group.payloads[0], group.agents, group.weights)
    result = gr.finish()

    # Assert: the median worked out by hand (the evil row is the largest in every coordinate),
    # of the un-weighted deltas q * cap / w = 16 q, in units of the quantization step
    median = np.array([2, 2, 3, 1, -1, 5])
    assert group.agents == agents and result.excluded == []
    np.testing.assert_allclose(result.avg_delta, median * 16 * codec.scale, rtol=1e-6)
    encrypted = Codec(CodecParams(encrypted=True), 6, HEContext.from_bytes(generate_keys()[1]))
    with pytest.raises(ValueError):
        RegionalSum(encrypted, 1, expected=agents, robust=make_rule("median"))


def test_next_batch_carries_agents_in_flight(codecs):
    """A replica's next batch starts empty but keeps the verified chunks of agents whose update
    is not complete yet; the two batches' sums add up to the numpy sum of the quantized
    updates."""
    edge, glob = codecs
    updates = _updates(3)
    rs = RegionalSum(edge, round_id=1, expected=[u[0] for u in updates])
    for a, d, n, s in updates[:2]:
        _feed(rs, edge, a, d, n, s)
    late, d, n, s = updates[2]
    chunks = edge.encode(d, n, s)
    rs.add_chunk(late, 0, edge.num_chunks, chunks[0], weight=edge.weight(n))
    assert rs.agents == ["agent-000", "agent-001"] and rs.in_flight == [late]
    nxt = rs.next_batch()
    assert rs.in_flight == [] and nxt.in_flight == [late] and nxt.agents == []
    assert nxt.is_duplicate(late, 0) and not nxt.is_duplicate(late, 1)
    for ci in range(1, edge.num_chunks):
        nxt.add_chunk(late, ci, edge.num_chunks, chunks[ci])
    assert nxt.agents == [late]
    (q1, w1), (q2, w2) = glob.decode(rs.partial()), glob.decode(nxt.partial())
    expected = sum(edge.quantize_update(d, n, s) for _, d, n, s in updates)
    assert np.array_equal(q1 + q2, expected)
    assert w1 + w2 == sum(edge.weight(n) for _, _, n, _ in updates)


def test_fedbuff_multiplicities_sum_exactly_against_numpy(codecs):
    """FedBuff: the region folds each update m times (its staleness multiplicity), the global
    decodes sum m_i q_i with weight sum m_i w_i: the numpy weighted sum of the quantized
    updates, bit for bit; an (agent, base round) counted by an earlier step is refused."""
    from schemas.fedbuff import FedBuff

    edge, glob = codecs
    fb = FedBuff(buffer_size=3, max_staleness=3, staleness_scale=4)
    updates = _updates(3)
    stale = {"agent-000": 0, "agent-001": 1, "agent-002": 3}
    rs = RegionalSum(edge, round_id=9, expected=None, min_group=2, max_groups=1)
    for a, d, n, s in updates:
        m = fb.multiplicity(stale[a])
        for ci, p in enumerate(edge.encode(d, n, s)):
            rs.add_chunk(f"{a}@{9 - stale[a]}", ci, edge.num_chunks, p, weight=edge.weight(n),
                         times=m)
    [group] = rs.groups()
    assert group.multiplicities == [4, 3, 2] and rs.summands == 9
    gr = GlobalRound(glob, 9, min_group=2, counted=[("agent-000", 8)])
    agents = [k.partition("@")[0] for k in group.agents]
    bases = [int(k.partition("@")[2]) for k in group.agents]
    for ci, p in enumerate(group.payloads):
        gr.add_partial("region-0", 0, 1, ci, p, agents, group.weights, batch="/0",
                       multiplicities=group.multiplicities, base_rounds=bases)
    result = gr.finish()
    expected = sum(fb.multiplicity(stale[a]) * edge.quantize_update(d, n, s)
                   for a, d, n, s in updates)
    wsum = sum(fb.multiplicity(stale[a]) * edge.weight(n) for a, _, n, _ in updates)
    assert result.weight_sum == wsum
    assert np.array_equal(result.avg_delta, np.asarray(glob.average(expected, wsum), np.float32))
    assert result.updates == {"region-0": [("agent-000", 9, 4), ("agent-001", 8, 3),
                                           ("agent-002", 6, 2)]}
    # agent-000's round-8 update was counted by an earlier step: a group naming it is refused
    gr2 = GlobalRound(glob, 10, min_group=2, counted=[("agent-000", 9)])
    with pytest.raises(InvalidMessage, match="agent_in_two_regions|earlier step"):
        gr2.add_partial("region-0", 0, 1, 0, group.payloads[0], agents, group.weights,
                        batch="/1", multiplicities=group.multiplicities, base_rounds=bases)
