"""Update codec: exact sums (CKKS and plain), averaging, planner limits, refusal of bad input."""

import numpy as np
import pytest
import zstandard

from schemas.codec import Codec, CodecParams, coarse_weight, update_seed
from schemas.errors import InvalidMessage
from schemas.he import HEContext, generate_keys

N_BIG = 1_000_000
AGENTS = 64


@pytest.fixture(scope="module")
def keys():
    secret, public = generate_keys()
    return HEContext.from_bytes(secret), HEContext.from_bytes(public)


@pytest.fixture(scope="module")
def other_keys():
    secret, public = generate_keys()
    return HEContext.from_bytes(secret), HEContext.from_bytes(public)


def _fedavg(codec, qs, weights):
    """Independent plain-numpy FedAvg of the quantized-dequantized weighted deltas."""
    p = codec.params
    scale = p.clip_coord / (2 ** (p.bits - 1) - 1)
    # each q_i is (w_i/cap) * delta_i / scale, so delta_i ~= q_i * scale * cap / w_i
    deltas = [q.astype(np.float64) * scale * p.weight_cap / w for q, w in zip(qs, weights)]
    return sum(w * d for w, d in zip(weights, deltas)) / sum(weights)


def _run_round(enc, dec, deltas, samples, use_add):
    """Encode every agent, sum chunk by chunk, decode; also return the quantized references."""
    qsum = np.zeros(enc.num_params, np.int64)
    sums: list[bytes] | None = None
    acc = enc.accumulator()
    for i, (delta, ns) in enumerate(zip(deltas, samples)):
        seed = update_seed(7, 1, f"agent-{i}")
        qsum += enc.quantize_update(delta, ns, seed)
        chunks = enc.encode(delta, ns, seed)
        if use_add:
            sums = chunks if sums is None else [enc.add(a, b) for a, b in zip(sums, chunks)]
        else:
            acc.add_payloads(chunks)
    out, w = dec.decode(sums if use_add else acc.payloads())
    return out, w, qsum


def _random_deltas(n, agents, seed):
    rng = np.random.default_rng(seed)
    for _ in range(agents):
        yield rng.normal(0, 0.02, n).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("encrypted", [True, False])
def test_exact_sum_of_64_random_updates_over_1m_params(keys, encrypted):
    # Prepare
    sk, pk = keys
    params = CodecParams(encrypted=encrypted)
    enc = Codec(params, N_BIG, pk if encrypted else None)
    dec = Codec(params, N_BIG, sk if encrypted else None)
    samples = [int(s) for s in np.random.default_rng(1).integers(1, 3000, AGENTS)]

    # Execute
    out, w, qsum = _run_round(enc, dec, _random_deltas(N_BIG, AGENTS, 2), samples, use_add=False)

    # Assert
    assert out.dtype == np.int64
    assert np.array_equal(out, qsum)
    assert w == sum(coarse_weight(s, params.weight_cap) for s in samples)


@pytest.mark.slow
@pytest.mark.parametrize("encrypted", [True, False])
def test_exact_sum_with_every_value_at_the_clip_bound(keys, encrypted):
    # Prepare: clip_l2 large enough that all 1M coordinates sit at +-clip_coord, weights at the
    # cap: every lane sum reaches 64 * 127 (the planner falls back to 2 lanes for this round)
    sk, pk = keys
    params = CodecParams(encrypted=encrypted, clip_l2=0.05 * np.sqrt(N_BIG), bits=8,
                         rotate=False)
    enc = Codec(params, N_BIG, pk if encrypted else None)
    dec = Codec(params, N_BIG, sk if encrypted else None)
    sign = np.where(np.arange(N_BIG) % 3 == 0, -1.0, 1.0)
    deltas = [sign * 0.05] * (AGENTS // 2) + [-sign * 0.05] * (AGENTS // 4) + [sign * 0.07] * (
        AGENTS // 4)
    samples = [5000] * AGENTS

    # Execute
    out, w, qsum = _run_round(enc, dec, deltas, samples, use_add=True)

    # Assert
    assert np.abs(enc.quantize_update(deltas[0], 5000, 1)).min() == 127
    assert np.array_equal(out, qsum)
    assert w == AGENTS * params.weight_cap


@pytest.mark.slow
@pytest.mark.parametrize("encrypted", [True, False])
def test_exact_sum_at_the_l2_bound_of_the_8bit_plan(keys, encrypted):
    # Prepare: the 8-bit/64 3-lane plan (which needs the L2 bound); each agent puts its whole
    # L2 budget (400 values at +-clip_coord) on the same top lanes of ciphertext 0, weights at
    # the cap
    sk, pk = keys
    params = CodecParams(encrypted=encrypted, bits=8, rotate=False)
    enc = Codec(params, N_BIG, pk if encrypted else None)
    dec = Codec(params, N_BIG, sk if encrypted else None)
    delta = np.zeros(N_BIG)
    delta[np.arange(400) * 3 + 2] = np.where(np.arange(400) % 2, 0.05, -0.05)
    noise = np.random.default_rng(4).normal(0, 1e-4, N_BIG)
    deltas = [delta + noise * (i % 2) for i in range(AGENTS)]

    # Execute
    out, w, qsum = _run_round(enc, dec, deltas, [4096] * AGENTS, use_add=True)

    # Assert
    assert enc.plan.lanes == 3 or not encrypted
    assert np.abs(qsum).max() >= AGENTS * 127 - 4
    assert np.array_equal(out, qsum)
    assert w == AGENTS * params.weight_cap


@pytest.mark.parametrize("encrypted,rotate", [(True, True), (True, False), (False, True)])
def test_average_matches_independent_fedavg(keys, encrypted, rotate):
    # Prepare
    from scipy.linalg import hadamard

    sk, pk = keys
    n, agents = 3_000, 16
    params = CodecParams(encrypted=encrypted, rotate=rotate, rotation_seed=77)
    enc = Codec(params, n, pk if encrypted else None)
    dec = Codec(params, n, sk if encrypted else None)
    rng = np.random.default_rng(9)
    deltas = [rng.normal(0, 0.01, n) for _ in range(agents)]
    samples = [int(s) for s in rng.integers(1, 1024, agents)]
    qs = [enc.quantize_update(d, s, i) for i, (d, s) in enumerate(zip(deltas, samples))]
    acc = enc.accumulator()
    for i, (d, s) in enumerate(zip(deltas, samples)):
        acc.add_payloads(enc.encode(d, s, i))

    # Execute
    qsum, wsum = dec.decode(acc.payloads())
    avg = dec.average(qsum, wsum)

    # Assert: FedAvg in the rotated basis, rotated back with dense Hadamard matrices
    assert avg.dtype == np.float32
    weights = [coarse_weight(s, params.weight_cap) for s in samples]
    expected = _fedavg(enc, qs, weights)
    if rotate:
        b, s0, s1 = 2048, *enc.rotation.signs
        h = hadamard(b) / np.sqrt(b)
        expected[n - b:] = h @ expected[n - b:]
        expected = expected * s1
        expected[:b] = h @ expected[:b]
        expected = expected * s0
    np.testing.assert_allclose(avg, expected, rtol=0, atol=1e-6)


def _plans():
    """Every (bits, summands) of a grid the planner accepts, with its lanes."""
    from schemas.plan import plan_ckks

    sk, _ = generate_keys()
    seal = HEContext.from_bytes(sk).seal
    out = []
    for bits in (2, 3, 4, 5, 6, 7, 8, 10, 12, 16):
        for s in (1, 2, 5, 16, 64):
            params = CodecParams(bits=bits, max_summands=s, rotate=False,
                                 clip_l2=1e6)           # per-coordinate bound only
            try:
                out.append((bits, s, plan_ckks(params, 10, seal.q0, seal.slots).lanes))
            except InvalidMessage:
                pass
    return out


@pytest.mark.slow
def test_every_plan_decodes_exactly_with_every_value_at_its_bound(keys):
    # Prepare: for each accepted plan, S updates of one full ciphertext, every value at +-qmax
    # with the same sign in every update (each lane sum at +-S*qmax), weights at the cap
    sk, pk = keys
    plans = _plans()
    assert len(plans) >= 40 and max(lanes for *_, lanes in plans) >= 8
    for bits, s, lanes in plans:
        params = CodecParams(bits=bits, max_summands=s, rotate=False, clip_l2=1e6)
        enc, dec = Codec(params, 4096 * lanes - lanes, pk), Codec(params, 4096 * lanes - lanes, sk)
        assert (enc.plan.lanes, enc.num_chunks) == (lanes, 1)
        qmax = 2 ** (bits - 1) - 1
        sign = np.where(np.arange(enc.num_params) % 7 < 3, -1, 1)
        acc = enc.accumulator()
        for i in range(s):
            q = sign * qmax if i % 4 else sign * (qmax - (np.arange(enc.num_params) % 2))
            acc.add_payloads(enc.encode_quantized(q, params.weight_cap))

        # Execute
        out, w = dec.decode(acc.payloads())

        # Assert
        expected = sign * qmax * s - sign * (np.arange(enc.num_params) % 2) * len(range(0, s, 4))
        assert np.array_equal(out, expected), (bits, s, lanes)
        assert w == s * params.weight_cap


def test_planner_packs_as_many_lanes_as_exact_decoding_allows(keys):
    # Execute
    plan = {(b, s): Codec(CodecParams(bits=b, max_summands=s), N_BIG, keys[1]).plan
            for b, s in [(4, 16), (5, 32), (3, 16), (2, 16)]}

    # Assert: five 8-bit lanes where four 10-bit lanes fit, no fixed cap
    assert (plan[4, 16].lanes, plan[4, 16].lane_bits) == (5, 8)
    assert (plan[5, 32].lanes, plan[5, 32].lane_bits) == (4, 10)
    assert plan[3, 16].lanes == 6 and plan[2, 16].lanes == 7


def test_planner_refuses_just_past_the_ceiling(keys):
    # Prepare: the largest summand count the planner accepts for 16-bit values
    from schemas.plan import (
        MAX_NOISE_STD,
        NOISE_AT_UNIT_SCALE,
        OVERFLOW_MARGIN,
        coefficient_bound,
        plan_ckks,
    )

    seal = keys[1].seal
    lo, hi = 1, 2**31 - 1

    def ok(s: int) -> bool:
        try:
            plan_ckks(CodecParams(bits=16, max_summands=s), 100, seal.q0, seal.slots)
            return True
        except InvalidMessage as e:
            assert e.reason == "unsummable_plan"
            return False
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)

    # Execute
    params = CodecParams(bits=16, max_summands=lo)
    plan = plan_ckks(params, 100, seal.q0, seal.slots)

    # Assert: accepted at the ceiling, inside both bounds; refused one past it
    assert ok(lo) and not ok(lo + 1)
    assert NOISE_AT_UNIT_SCALE * np.sqrt(lo) / plan.he_scale <= MAX_NOISE_STD
    bound = coefficient_bound(params, plan.lanes, plan.lane_bits, plan.reals_per_ct)
    assert bound * plan.he_scale <= seal.q0 / (2 * OVERFLOW_MARGIN)


def test_planner_refuses_a_plan_over_the_limit(keys):
    # Prepare
    _, pk = keys
    params = CodecParams(bits=16, max_summands=2**20)

    # Execute / Assert
    with pytest.raises(InvalidMessage) as e:
        Codec(params, 1000, pk)
    assert e.value.reason == "unsummable_plan"


def test_default_plan_packs_four_lanes_in_both_halves(keys):
    # Execute
    plan = Codec(CodecParams(), N_BIG, keys[1]).plan

    # Assert: 3-bit values, 64 summands: 9-bit lanes, 4 per real, 2 reals per slot; ciphertexts
    # of 4096 coefficients x 2 parts x 60 bits, as many per 1 MiB chunk as fit with their lengths
    assert (plan.lanes, plan.lane_bits, plan.values_per_ct) == (4, 9, 16384)
    assert plan.ct_bytes == 2 * 4096 * 60 // 8
    assert plan.cts_per_chunk == (2**20 - 1024) // (4 + plan.ct_bytes) == 17
    assert plan.num_chunks == -(-(1 + N_BIG // 4) // (17 * 4096)) == 4


def test_payload_size_is_under_six_bytes_per_param(keys):
    # Prepare
    codec = Codec(CodecParams(), 200_000, keys[1])

    # Execute
    chunks = codec.encode(np.zeros(200_000), 10, 1)

    # Assert
    assert sum(map(len, chunks)) / 200_000 <= 6.0
    assert all(len(c) <= codec.params.chunk_bytes for c in chunks)


def test_public_context_cannot_decrypt(keys):
    # Prepare
    _, pk = keys
    codec = Codec(CodecParams(), 1000, pk)
    chunks = codec.encode(np.zeros(1000), 10, 1)

    # Execute / Assert
    with pytest.raises(InvalidMessage) as e:
        codec.decode(chunks)
    assert e.value.reason == "no_secret_key"


@pytest.fixture(scope="module")
def small(keys):
    """A 3-chunk encrypted codec over 30,000 params and one encoded update."""
    sk, pk = keys
    params = CodecParams(chunk_bytes=70_000, bits=8)  # one ciphertext (61,444 B framed) a chunk
    enc, dec = Codec(params, 30_000, pk), Codec(params, 30_000, sk)
    chunks = enc.encode(np.random.default_rng(0).normal(0, 0.01, 30_000), 50, 3)
    return enc, dec, chunks


def _reframe(payload, edit):
    raw = bytearray(zstandard.ZstdDecompressor().decompress(payload))
    edit(raw)
    return zstandard.ZstdCompressor(write_checksum=True).compress(bytes(raw))


def _reason(fn, *args):
    with pytest.raises(InvalidMessage) as e:
        fn(*args)
    return e.value.reason


def test_small_codec_round_trips(small):
    # Prepare
    enc, dec, chunks = small

    # Execute
    out, w = dec.decode(chunks)

    # Assert
    assert enc.num_chunks == 3 == len(chunks)
    assert [enc.chunk_index(c) for c in chunks] == [0, 1, 2]
    assert np.array_equal(out, enc.quantize_update(
        np.random.default_rng(0).normal(0, 0.01, 30_000), 50, 3)) and w == 48  # 50 -> 3 bits


def test_truncated_payload_is_refused(small):
    enc, dec, chunks = small
    cut = chunks[1][: len(chunks[1]) // 2]
    assert _reason(dec.decode, [chunks[0], cut, chunks[2]]) == "truncated"
    assert _reason(enc.add, chunks[1], cut) == "truncated"
    assert _reason(enc.chunk_index, b"\x28\xb5") in {"truncated", "corrupt"}


def test_tampered_byte_is_refused(small):
    enc, dec, chunks = small
    bad = bytearray(chunks[1])
    bad[len(bad) // 2] ^= 0x01
    assert _reason(dec.decode, [chunks[0], bytes(bad), chunks[2]]) == "corrupt"


def test_payload_from_another_keypair_is_refused(small, other_keys):
    enc, dec, chunks = small
    foreign = Codec(enc.params, 30_000, other_keys[1]).encode(np.zeros(30_000), 5, 1)
    assert _reason(dec.decode, [foreign[0], chunks[1], chunks[2]]) == "wrong_fingerprint"
    assert _reason(enc.add, chunks[0], foreign[0]) == "wrong_fingerprint"


def test_wrong_layout_version_is_refused(small):
    enc, dec, chunks = small

    def set_version(raw):
        raw[4] = 99

    bad = _reframe(chunks[0], set_version)
    assert _reason(dec.decode, [bad, chunks[1], chunks[2]]) == "wrong_version"
    assert _reason(enc.chunk_index, bad) == "wrong_version"


def test_wrong_magic_and_mode_are_refused(small):
    enc, dec, chunks = small

    def magic(raw):
        raw[0:4] = b"XXXX"

    def mode(raw):
        raw[5] = 2

    assert _reason(enc.add, _reframe(chunks[0], magic), chunks[0]) == "bad_magic"
    assert _reason(enc.add, _reframe(chunks[0], mode), chunks[0]) == "wrong_mode"


def test_oversized_payloads_are_refused(small):
    enc, dec, chunks = small
    too_long = chunks[0] + bytes(enc.max_payload_bytes())
    bomb = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(50 << 20))
    assert _reason(dec.decode, [too_long, chunks[1], chunks[2]]) == "oversized"
    assert _reason(enc.add, bomb, chunks[0]) == "oversized"


def test_mismatched_chunk_index_in_add_is_refused(small):
    enc, _, chunks = small
    assert _reason(enc.add, chunks[0], chunks[1]) == "chunk_mismatch"


def test_missing_or_repeated_chunks_are_refused(small):
    _, dec, chunks = small
    assert _reason(dec.decode, chunks[:2]) == "chunk_mismatch"
    assert _reason(dec.decode, [chunks[0], chunks[0], chunks[2]]) == "chunk_mismatch"


def test_other_param_count_and_plan_are_refused(keys, small):
    enc, _, chunks = small
    other_n = Codec(enc.params, 30_001, keys[1])
    other_bits = Codec(CodecParams(bits=7, chunk_bytes=enc.params.chunk_bytes), 30_000, keys[1])
    assert _reason(other_n.add, chunks[0], chunks[0]) == "wrong_num_params"
    assert _reason(other_bits.add, chunks[0], chunks[0]) == "plan_mismatch"


def test_too_many_summands_is_refused(keys):
    # Prepare
    codec = Codec(CodecParams(max_summands=2), 100, keys[1])
    a = codec.encode(np.zeros(100), 1, 1)[0]

    # Execute / Assert
    two = codec.add(a, a)
    assert _reason(codec.add, two, a) == "too_many_summands"


@pytest.mark.parametrize("encrypted", [True, False])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_delta_is_refused(keys, encrypted, bad):
    codec = Codec(CodecParams(encrypted=encrypted), 10, keys[1] if encrypted else None)
    delta = np.zeros(10)
    delta[3] = bad
    assert _reason(codec.encode, delta, 10, 1) == "nan_or_inf"


def test_out_of_range_quantized_values_are_refused(keys):
    codec = Codec(CodecParams(), 10, keys[1])
    big = Codec(CodecParams(), 20_000, keys[1])
    assert _reason(codec.encode_quantized, np.full(10, 128), 5) == "out_of_range"
    assert _reason(big.encode_quantized, np.full(20_000, 127), 5) == "out_of_range"
    assert _reason(codec.encode_quantized, np.zeros(10, np.int64), 0) == "bad_weight"


@pytest.mark.parametrize("kwargs", [dict(bits=1), dict(bits=17), dict(clip_l2=0.0),
                                    dict(clip_coord=float("nan")), dict(max_summands=0),
                                    dict(weight_cap=0), dict(chunk_bytes=10)])
def test_bad_params_are_refused(kwargs):
    assert _reason(lambda: CodecParams(**kwargs)) == "bad_params"


@pytest.mark.parametrize("junk", [b"", b"\x00" * 100, b"hello world" * 10])
def test_garbage_never_crashes(small, junk):
    enc, dec, chunks = small
    assert _reason(enc.add, junk, chunks[0]) in {"truncated", "corrupt"}
    assert _reason(enc.chunk_index, junk) in {"truncated", "corrupt"}


def test_update_seed_is_deterministic():
    assert update_seed(1, 2, "a") == update_seed(1, 2, "a") != update_seed(1, 2, "b")
    assert 0 <= update_seed(1, 2, "a") < 2**64


def test_coarse_weight_keeps_three_significant_bits():
    # worked by hand: 300 = 0b100101100 -> 0b100000000 = 256; 7 stays; 1500 is capped at 1024
    assert [coarse_weight(n, 1024) for n in (1, 7, 13, 300, 1023, 1500)] == [1, 7, 12, 256, 896,
                                                                           1024]
    for n in range(1, 3000):
        w = coarse_weight(n, 1024)
        assert w <= min(n, 1024) < w * 1.25 + 1 and coarse_weight(w, 1024) == w
