"""Hypothesis fuzzers of the same entry points without brokers: whatever bytes or fields arrive,
the checks raise only ``InvalidMessage`` (counted by reason by the services) and leave the sums
exactly as they were."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from global_aggregator.combine import GlobalRound
from regional_aggregator.summing import RegionalSum
from schemas import fedstream_pb2 as pb
from schemas.codec import Codec, CodecParams
from schemas.errors import InvalidMessage, Reason
from schemas.he import HEContext, generate_keys
from schemas.signing import Identity, TrustStore, header, open_control, open_envelope, seal

N_PARAMS = 15_000  # two ciphertexts: two chunks of 70 kB
FUZZ = settings(max_examples=1500, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOPIC = "fz/region-0/updates/agent-000"


@pytest.fixture(scope="module")
def world():
    secret, public = generate_keys()
    params = CodecParams(encrypted=True, chunk_bytes=70_000, bits=8)
    edge = Codec(params, N_PARAMS, HEContext.from_bytes(public))
    glob = Codec(params, N_PARAMS, HEContext.from_bytes(secret))
    key = Ed25519PrivateKey.generate()
    trust = TrustStore({"agent-000": Identity("agent-000", "agent", "region-0", key.public_key())})
    delta = np.random.default_rng(0).normal(0, 0.01, N_PARAMS)
    payloads = edge.encode(delta, 100, 1)
    assert len(payloads) == 2
    return edge, glob, key, trust, payloads


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for pos, val in flips:
        out[pos % len(out)] ^= val or 1
    return bytes(out[:cut] if cut is not None else out)


mutation = st.tuples(st.lists(st.tuples(st.integers(0, 10**7), st.integers(1, 255)), min_size=1,
                              max_size=6),
                     st.one_of(st.none(), st.integers(0, 200_000)))


@FUZZ
@given(data=st.one_of(st.binary(max_size=5000), mutation), which=st.integers(0, 1))
def test_region_chunk_check_refuses_anything_but_a_valid_chunk(world, data, which):
    edge, glob, _, _, payloads = world
    rs = RegionalSum(edge, 1, expected=["agent-000"])
    raw = data if isinstance(data, bytes) else _mutate(payloads[which], *data)
    if raw == payloads[which]:
        return
    with pytest.raises(InvalidMessage) as e:
        rs.add_chunk("agent-000", which, edge.num_chunks, raw, weight=96)
    assert isinstance(e.value.reason, Reason)
    assert rs.agents == [] and rs.in_flight == []


@FUZZ
@given(data=st.one_of(st.binary(max_size=3000), mutation),
       fields=st.tuples(st.integers(0, 9), st.integers(0, 9), st.integers(0, 2**32 - 1)))
def test_envelope_and_update_fields_are_refused_or_named(world, data, fields):
    edge, _, key, trust, payloads = world
    index, count, weight = fields
    good = seal(pb.UPDATE_CHUNK, pb.UpdateChunk(
        header=header("agent-000", 1, 0, "f" * 64, index, count), agent_id="agent-000",
        payload=payloads[0], weight=weight), "agent-000", key, topic=TOPIC)
    raw = data if isinstance(data, bytes) else _mutate(good, *data)
    try:
        up = open_envelope(raw, pb.UPDATE_CHUNK, trust, max_bytes=1 << 20, topic=TOPIC).body
    except InvalidMessage as exc:
        assert isinstance(exc.reason, Reason)
        return
    rs = RegionalSum(edge, 1, expected=["agent-000"])
    try:
        rs.add_chunk("agent-000", up.header.chunk_index, up.header.chunk_count, up.payload,
                     up.weight)
    except InvalidMessage:
        assert rs.agents == []
        return
    # accepted: then it was the real chunk 0 with honest fields
    assert up.payload == payloads[0] and up.header.chunk_index == 0


@FUZZ
@given(region=st.sampled_from(["region-0", "region-1"]), group=st.integers(-1, 4),
       count=st.integers(-1, 4), index=st.integers(-1, 3),
       agents=st.lists(st.sampled_from([f"agent-{i}" for i in range(6)]), max_size=5),
       weights=st.lists(st.integers(-5, 2000), max_size=6),
       data=st.one_of(st.binary(max_size=3000), mutation))
def test_global_partial_check_refuses_anything_inconsistent(world, region, group, count, index,
                                                            agents, weights, data):
    edge, glob, _, _, payloads = world
    gr = GlobalRound(glob, 1, min_group=2)
    raw = data if isinstance(data, bytes) else _mutate(payloads[0], *data)
    with pytest.raises(InvalidMessage):
        gr.add_partial(region, group, count, index, raw, agents, weights)
    assert gr.finish().avg_delta is None and gr.complete_regions == []


coefficient_edits = st.lists(st.tuples(  # q0 = 2^60 - 16383: half the values near the top are >= q0
    st.integers(0, 2 * 4096 - 1), st.one_of(st.integers(0, 2**60 - 1),
                                            st.integers(2**60 - 2**15, 2**60 - 1))), max_size=4)


@FUZZ
@given(edits=coefficient_edits,
       flips=st.lists(st.tuples(st.integers(0, 61_439), st.integers(1, 255)), max_size=4),
       resize=st.sampled_from([0, 0, 0, -1, 1, -61_440, -30_000, 7]))
def test_packed_ciphertext_loads_exactly_when_every_coefficient_is_below_q0(world, edits, flips,
                                                                            resize):
    # A stolen device controls a ciphertext's coefficients and nothing else: whatever they are,
    # the region's check loads it iff the length is the ring's and every coefficient is < q0
    # (a reference decision on Python integers), and refuses it with a named reason otherwise
    edge, _, _, _, payloads = world
    seal, w = edge.context.seal, 60
    cts = edge.framer.parse(payloads[0]).ciphertexts()
    big = int.from_bytes(cts[0], "little")
    for i, v in edits:
        big = (big & ~(((1 << w) - 1) << (i * w))) | (v << (i * w))
    data = bytearray(big.to_bytes(len(cts[0]), "little"))
    for pos, x in flips:
        data[pos] ^= x
    data = bytes(data[:len(data) + resize]) if resize <= 0 else bytes(data) + bytes(resize)
    pairs = [int.from_bytes(data[k:k + 15], "little") for k in range(0, len(data) - 14, 15)]
    coeffs = [c for p in pairs for c in (p & ((1 << w) - 1), p >> w)]   # 2 x 60 bits in 15 bytes
    loads = len(data) == seal.ct_bytes and max(coeffs) < seal.q0

    event("loads" if loads else "refused")
    try:
        ct = seal.load(data, edge.plan.he_scale)
    except InvalidMessage as e:
        assert not loads and e.reason == Reason.CORRUPT
    else:
        assert loads and [ct.dyn_array().at(i) for i in range(0, 8192, 97)] == coeffs[::97]

    rs = RegionalSum(edge, 1, expected=["agent-000"])
    payload = edge.framer.frame_cts(0, 1, [data, *cts[1:]])
    try:
        rs.add_chunk("agent-000", 0, edge.num_chunks, payload, weight=96)
    except InvalidMessage as e:
        assert not loads and e.reason in (Reason.CORRUPT, Reason.OVERSIZED, Reason.TRUNCATED)
        assert rs.in_flight == []
    else:
        assert loads


def test_control_commands_only_from_an_operator():
    # Prepare: an operator, a stolen agent key, the control topic
    op, thief = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    trust = TrustStore({"operator": Identity("operator", "operator", "", op.public_key()),
                        "agent-000": Identity("agent-000", "agent", "r", thief.public_key())})
    topic = "fz.control"

    def cmd(signer, key, action="lift", agents=("agent-000",)):
        return seal(pb.CONTROL, pb.Control(header=header(signer, 0, 0, ""), action=action,
                                           agents=list(agents)), signer, key, topic=topic)

    def reason(raw):
        with pytest.raises(InvalidMessage) as e:
            open_control(raw, trust, topic=topic)
        return e.value.reason

    # Execute / Assert: a device cannot lift its own quarantine
    assert open_control(cmd("operator", op), trust, topic=topic).agents == ["agent-000"]
    assert reason(cmd("agent-000", thief)) == "unauthorized"
    assert reason(cmd("operator", op, action="delete")) == "bad_command"
    assert reason(cmd("operator", op, agents=())) == "bad_command"
    assert reason(seal(pb.CONTROL, pb.Control(header=header("operator", 0, 0, ""), action="lift",
                                              agents=["a"]), "operator", op,
                       topic="other.control")) == "bad_signature"


@FUZZ
@given(data=st.binary(max_size=2000))
def test_control_fuzz(data):
    trust = TrustStore({})
    with pytest.raises(InvalidMessage):
        open_control(data, trust, topic="fz.control")


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                    allow_infinity=False) | st.text(max_size=70),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.sampled_from(["role", "region", "public_key", "keys",
                                                       "from", "until", "revoked", "x"]),
                                      inner, max_size=5),
                    max_leaves=12)
ENTRY = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["agent", "region", "global", ""]) | JSON,
    "region": st.sampled_from(["region-0", "region-1", ""]) | JSON,
    "public_key": st.just("11" * 32) | JSON,
    "keys": st.lists(st.fixed_dictionaries({"public_key": st.just("22" * 32) | JSON},
                                           optional={"from": JSON, "until": JSON}), max_size=2),
    "revoked": JSON,
}) | JSON


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12), ENTRY, max_size=4),
       st.sampled_from(["all", "region-0", "only"]), st.binary(max_size=8))
def test_trust_file_fuzz(tmp_path_factory, entries, scope, tail):
    """Whatever an operator's trust.json holds, loading it either works or raises one
    ValueError naming the problem: never another exception, never half a store."""
    import json

    from schemas.signing import ALL_AGENTS, AgentScope

    path = tmp_path_factory.mktemp("trust") / "trust.json"
    path.write_bytes(json.dumps({"identities": entries}).encode() + tail)
    scopes = {"all": ALL_AGENTS, "region-0": AgentScope.of_region("region-0"),
              "only": AgentScope.only("x")}
    try:
        store = TrustStore.load(path, scope=scopes[scope])
    except ValueError as exc:
        assert str(path) in str(exc)
        return
    for name in store.names():
        assert name in entries and store.get(name) is not None
