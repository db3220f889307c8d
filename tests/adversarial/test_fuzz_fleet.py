"""Hypothesis fuzzers of the fleet records (schemas/fleet.py), without a broker: whatever bytes
arrive on the fleet topic, only ``InvalidMessage`` comes out and the trust store changes only
for a valid operator record; whatever valid records arrive, in whatever order, a revoked
identity never verifies again and at most one key of an identity is valid for any round."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import fedstream_pb2 as pb
from schemas.errors import InvalidMessage, Reason
from schemas.fleet import (
    ACTIONS,
    ROTATE,
    FleetFollower,
    apply_record,
    open_record,
    raw_public_key,
    seal_record,
)
from schemas.signing import Identity, TrustStore, header, open_envelope, seal
from schemas.topics import Topics

FUZZ = settings(max_examples=1500, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
SEQ = settings(max_examples=400, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
T = Topics("fz")
NAMES = ("dev-a", "dev-b", "agent-000", "region-0")
REGIONS = ("region-0", "region-1", "region-9")
N_KEYS = 5
ROUNDS = range(0, 14)

OPERATOR = Ed25519PrivateKey.generate()
AGENT = Ed25519PrivateKey.generate()
REGION = Ed25519PrivateKey.generate()
REGION_1 = Ed25519PrivateKey.generate()
POOL = [Ed25519PrivateKey.generate() for _ in range(N_KEYS)]


def store() -> TrustStore:
    return TrustStore({
        "operator": Identity("operator", "operator", "", OPERATOR.public_key()),
        "region-0": Identity("region-0", "region", "region-0", REGION.public_key()),
        "region-1": Identity("region-1", "region", "region-1", REGION_1.public_key()),
        "agent-000": Identity("agent-000", "agent", "region-0", AGENT.public_key()),
    })


def valid_record() -> bytes:
    rec = pb.FleetRecord(header=header("operator", 0, 0, ""), action="rotate",
                         identity="agent-000", role="agent", region="region-0",
                         public_key=raw_public_key(POOL[0]), effective_round=7,
                         certificate=b"-----BEGIN CERTIFICATE-----\n...",
                         previous_key=raw_public_key(AGENT))
    return seal_record(rec, "operator", OPERATOR, topic=T.fleet)


VALID = valid_record()
ORIGINAL = open_record(VALID, store(), T.fleet)


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None, tail: bytes) -> bytes:
    out = bytearray(data)
    for pos, val in flips:
        out[pos % len(out)] ^= val or 1
    out = out[:cut] if cut is not None else out
    return bytes(out) + tail


mutation = st.tuples(
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=6),
    st.one_of(st.none(), st.integers(0, len(VALID))),
    st.one_of(st.just(b""), st.binary(max_size=40)),
)


@FUZZ
@given(data=st.binary(max_size=3000))
def test_open_record_refuses_arbitrary_bytes(data):
    trust = store()
    with pytest.raises(InvalidMessage) as e:
        open_record(data, trust, T.fleet)
    assert isinstance(e.value.reason, Reason)
    f = FleetFollower("127.0.0.1:1", T, trust)
    assert f.handle(0, b"agent-000", data) not in ("applied", "unchanged")
    assert trust.generation == 0


@FUZZ
@given(m=mutation)
def test_a_mutated_record_is_never_applied(m):
    raw = _mutate(VALID, *m)
    trust = store()
    try:
        rec = open_record(raw, trust, T.fleet)
    except InvalidMessage as exc:
        assert isinstance(exc.reason, Reason)
        result = FleetFollower("127.0.0.1:1", T, trust).handle(0, b"agent-000", raw)
        assert result not in ("applied", "unchanged") and trust.generation == 0
        assert verify_ok(trust, "agent-000", AGENT, 7)  # the rotation did not happen
        return
    # bytes that still open are the very same signed record (e.g. an unknown field appended)
    assert rec == ORIGINAL


def verify_ok(trust: TrustStore, name: str, k: Ed25519PrivateKey, round_id: int) -> bool:
    try:
        open_envelope(signed_update(name, k, round_id), pb.UPDATE_CHUNK, trust,
                      max_bytes=1 << 20, topic=T.update("region-0", name))
    except InvalidMessage:
        return False
    return True


def signed_update(name: str, k: Ed25519PrivateKey, round_id: int) -> bytes:
    return seal(pb.UPDATE_CHUNK, pb.UpdateChunk(header=header(name, round_id, 0, "")), name, k,
                topic=T.update("region-0", name))


def refusal(trust: TrustStore, name: str, k: Ed25519PrivateKey, round_id: int) -> str | None:
    try:
        open_envelope(signed_update(name, k, round_id), pb.UPDATE_CHUNK, trust,
                      max_bytes=1 << 20, topic=T.update("region-0", name))
    except InvalidMessage as exc:
        return str(exc.reason)
    return None


op = st.tuples(st.sampled_from(ACTIONS), st.sampled_from(NAMES), st.integers(0, N_KEYS - 1),
               st.sampled_from(REGIONS), st.integers(0, 12),
               st.one_of(st.none(), st.integers(0, N_KEYS - 1)))


def build(action: str, name: str, k: int, region: str, rnd: int, prev: int | None) -> bytes:
    rec = pb.FleetRecord(header=header("operator", 0, 0, ""), action=action, identity=name,
                         role="agent", region=region, effective_round=rnd)
    if action != "revoke":
        rec.public_key = raw_public_key(POOL[k])
    if action == ROTATE and prev is not None:
        rec.previous_key = raw_public_key(POOL[prev] if prev else AGENT)
    return seal_record(rec, "operator", OPERATOR, topic=T.fleet)


@SEQ
@given(ops=st.lists(op, min_size=1, max_size=14))
def test_random_record_sequences_keep_the_store_consistent(ops):
    trust = store()
    f = FleetFollower("127.0.0.1:1", T, trust)
    ever_revoked: set[str] = set()
    all_keys = [AGENT, REGION, *POOL]
    for i, o in enumerate(ops):
        raw = build(*o)
        before = trust.dump()
        result = f.handle(i, o[1].encode(), raw)
        # a refused record changes nothing
        if result not in ("applied",):
            assert trust.dump() == before, (o, result)
        for name in NAMES:
            state = trust.state(name)
            if state is not None and state.revoked:
                ever_revoked.add(name)
            if name in ever_revoked:
                # revoked for good: never verifies again, never listed, never current
                assert state is not None and state.revoked
                assert trust.get(name) is None and name not in trust
                assert name not in trust.names()
                for k in all_keys:
                    assert refusal(trust, name, k, 3) == "revoked"
                continue
            if state is None:
                continue
            for rnd in ROUNDS:
                valid = [s for s in state.keys if s.covers(rnd)]
                assert len(valid) <= 1, (name, rnd, state.keys)
                verifying = [k for k in all_keys if verify_ok(trust, name, k, rnd)] \
                    if rnd in (0, 5, 13) else None
                if verifying is not None:
                    assert len(verifying) <= 1
                    assert [raw_public_key(k) for k in verifying] == [s.raw for s in valid]
        # the region stays a region, whatever the records say
        assert trust.get("region-0") is not None and trust.get("region-0").role == "region"
        assert verify_ok(trust, "operator", OPERATOR, 0)
    # the same records once more, in the same order, on a fresh store: the same store
    again = store()
    g = FleetFollower("127.0.0.1:1", T, again)
    for i, o in enumerate(ops):
        g.handle(i, o[1].encode(), build(*o))
    assert again.dump() == trust.dump()


@FUZZ
@given(rec=st.builds(
    pb.FleetRecord, action=st.one_of(st.sampled_from(ACTIONS), st.text(max_size=8)),
    identity=st.one_of(st.sampled_from(NAMES), st.text(max_size=70)),
    role=st.one_of(st.just("agent"), st.text(max_size=8)),
    region=st.one_of(st.sampled_from(REGIONS), st.text(max_size=8)),
    public_key=st.one_of(st.just(raw_public_key(POOL[1])), st.binary(max_size=40)),
    effective_round=st.integers(0, 2**64 - 1),
    previous_key=st.one_of(st.just(b""), st.just(raw_public_key(AGENT)), st.binary(max_size=40)),
))
def test_any_signed_record_either_applies_cleanly_or_is_refused(rec):
    trust = store()
    rec.header.CopyFrom(header("operator", 0, 0, ""))
    raw = seal_record(rec, "operator", OPERATOR, topic=T.fleet)
    before = trust.dump()
    try:
        opened = open_record(raw, trust, T.fleet)
        apply_record(trust, opened)
    except InvalidMessage as exc:
        assert exc.reason in (Reason.BAD_RECORD,)
        assert trust.dump() == before
