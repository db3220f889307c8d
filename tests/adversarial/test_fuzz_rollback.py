"""The rollback request parser under generated input (Hypothesis, no broker).

``global_aggregator.rollback.parse_rollback`` is the one new input path of the global
aggregator's control topic: whatever bytes arrive there, it returns a rollback request only when
an operator validly signed a well-formed one for this topic, and otherwise raises
``InvalidMessage`` with a named reason (never another exception). ``open_command`` still opens
quarantine lifts.
"""

from __future__ import annotations

import re

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from global_aggregator.rollback import (
    MAX_REASON,
    ROLLBACK,
    open_command,
    parse_rollback,
    rollback_command,
)
from schemas import fedstream_pb2 as pb
from schemas.errors import InvalidMessage, Reason
from schemas.signing import Identity, TrustStore, header, seal
from schemas.topics import Topics

TOPIC = Topics("fuzz").control
ROLES = {"operator": "operator", "global": "global", "region-0": "region",
         "agent-000": "agent"}
KEYS = {name: Ed25519PrivateKey.generate() for name in ROLES}
TRUST = TrustStore({name: Identity(name, role, "region-0" if role == "agent" else "",
                                   KEYS[name].public_key()) for name, role in ROLES.items()})
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def sealed(cmd: pb.Control, signer: str = "operator", key=None, topic: str = TOPIC) -> bytes:
    return seal(pb.CONTROL, cmd, signer, key or KEYS[signer], topic=topic)


def valid(to_version: int = 3, request_id: str = "req-1", reason: str = "bad v4") -> bytes:
    return sealed(rollback_command(to_version, identity="operator", request_id=request_id,
                                   reason=reason))


def test_a_valid_request_round_trips_and_lifts_still_open():
    # Prepare
    raw = valid(7, "change-42", "accuracy fell 30 points")
    lift = sealed(pb.Control(header=header("operator", 0, 0, ""), action="lift",
                             agents=["agent-000"]))
    # Execute
    cmd = parse_rollback(raw, TRUST, topic=TOPIC)
    # Assert
    assert (cmd.action, cmd.to_version, cmd.request_id, cmd.reason) == (
        ROLLBACK, 7, "change-42", "accuracy fell 30 points")
    assert open_command(raw, TRUST, topic=TOPIC) == cmd
    assert list(open_command(lift, TRUST, topic=TOPIC).agents) == ["agent-000"]
    with pytest.raises(InvalidMessage) as e:
        parse_rollback(lift, TRUST, topic=TOPIC)
    assert e.value.reason == Reason.BAD_COMMAND


@pytest.mark.parametrize(("forge", "reason"), [
    ("region", Reason.UNAUTHORIZED), ("agent", Reason.UNAUTHORIZED),
    ("global", Reason.UNAUTHORIZED), ("stranger key", Reason.BAD_SIGNATURE),
    ("unsigned", Reason.UNSIGNED), ("unknown signer", Reason.UNKNOWN_SIGNER),
    ("other topic", Reason.BAD_SIGNATURE), ("unknown version field", None),
])
def test_forged_and_misdirected_requests_are_refused_by_reason(forge, reason):
    cmd = rollback_command(2, identity="operator", request_id="r")
    if forge in ("region", "agent", "global"):
        signer = {"region": "region-0", "agent": "agent-000", "global": "global"}[forge]
        cmd.header.sender = signer
        raw = sealed(cmd, signer)
    elif forge == "stranger key":
        raw = sealed(cmd, "operator", Ed25519PrivateKey.generate())
    elif forge == "unsigned":
        env = pb.Envelope.FromString(valid())
        env.signature = b""
        raw = env.SerializeToString()
    elif forge == "unknown signer":
        cmd.header.sender = "mallory"
        raw = sealed(cmd, "mallory", Ed25519PrivateKey.generate())
    elif forge == "other topic":
        raw = sealed(cmd, topic=Topics("other").control)
    else:  # a later schema's envelope field (15, varint) is ignored, as protobuf does
        raw = sealed(cmd) + b"\x78\x01"
    if reason is None:
        assert parse_rollback(raw, TRUST, topic=TOPIC).to_version == 2
        return
    with pytest.raises(InvalidMessage) as e:
        parse_rollback(raw, TRUST, topic=TOPIC)
    assert e.value.reason == reason


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_are_refused_with_a_reason(data):
    with pytest.raises(InvalidMessage) as e:
        parse_rollback(data, TRUST, topic=TOPIC)
    assert isinstance(e.value.reason, Reason)


@FUZZ
@given(st.data())
def test_mutated_valid_requests_are_refused_or_unchanged(data):
    """Flip, cut, insert or append bytes of a valid signed request: the parser refuses it with
    a reason, or (the mutation hit nothing the signature covers, e.g. an appended unknown
    field of the envelope) returns exactly the original request."""
    raw = bytearray(valid(5, "mut", "r"))
    original = parse_rollback(bytes(raw), TRUST, topic=TOPIC)
    op = data.draw(st.sampled_from(["flip", "cut", "insert", "append", "overwrite"]))
    i = data.draw(st.integers(0, len(raw) - 1))
    if op == "flip":
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "cut":
        raw = raw[:i]
    elif op == "insert":
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    elif op == "append":
        raw += data.draw(st.binary(min_size=1, max_size=64))
    else:
        chunk = data.draw(st.binary(min_size=1, max_size=32))
        raw[i:i + len(chunk)] = chunk
    try:
        got = parse_rollback(bytes(raw), TRUST, topic=TOPIC)
    except InvalidMessage as exc:
        assert isinstance(exc.reason, Reason)
        return
    assert got == original


@FUZZ
@given(signer=st.sampled_from(sorted(ROLES)),
       action=st.sampled_from([ROLLBACK, "lift", "", "ROLLBACK", "rollback "]),
       to_version=st.integers(0, 2**64 - 1),
       request_id=st.one_of(st.from_regex(REQUEST_ID, fullmatch=True), st.text(max_size=80)),
       reason=st.text(max_size=MAX_REASON + 20),
       agents=st.lists(st.text(max_size=10), max_size=3))
def test_signed_requests_are_accepted_exactly_when_well_formed_and_from_an_operator(
        signer, action, to_version, request_id, reason, agents):
    """Validly signed commands with any field values: accepted iff an operator signed a
    rollback with a good request id, no agents and a reason of at most MAX_REASON characters;
    otherwise refused as unauthorized or bad_command, nothing else."""
    cmd = pb.Control(header=header(signer, 0, 0, ""), action=action, to_version=to_version,
                     request_id=request_id, reason=reason, agents=agents)
    ok = (signer == "operator" and action == ROLLBACK and bool(REQUEST_ID.fullmatch(request_id))
          and not agents and len(reason) <= MAX_REASON)
    try:
        got = parse_rollback(sealed(cmd, signer), TRUST, topic=TOPIC)
    except InvalidMessage as exc:
        assert not ok, exc
        expected = Reason.UNAUTHORIZED if signer != "operator" else Reason.BAD_COMMAND
        assert exc.reason == expected, exc
        return
    assert ok
    assert (got.to_version, got.request_id, got.reason) == (to_version, request_id, reason)


@FUZZ
@given(st.binary(max_size=512))
def test_open_command_never_raises_anything_but_invalid_message(data):
    with pytest.raises(InvalidMessage):
        open_command(data, TRUST, topic=TOPIC)


def test_the_operators_tool_refuses_nonsense_before_sending():
    for bad in ({"to_version": -1}, {"request_id": "has space"}, {"request_id": ""},
                {"reason": "x" * (MAX_REASON + 1)}):
        kw = {"to_version": 1, "request_id": "ok", "reason": "", **bad}
        with pytest.raises(InvalidMessage) as e:
            rollback_command(kw.pop("to_version"), identity="operator", **kw)
        assert e.value.reason == Reason.BAD_COMMAND
