"""Ed25519 identities, the trust store, and signed envelopes.

Every message is signed by its sender: updates by their agent, partials by their region, model
versions by the global aggregator (RFC 8032 Ed25519 via ``cryptography``). The signed bytes bind
the message kind, the signer's name and the topic it is meant for to the body, so a signature
cannot be replayed as another kind of message, under another identity, on another agent's topic
or in another federation (every topic name starts with the federation's namespace)::

    b"fedstream/v2\\0" || kind (uint32, big endian) || signer (utf-8) || b"\\0"
                      || topic (utf-8) || b"\\0" || body

The topic of a model version is the Kafka model topic (``<ns>.models``) also where a regional
aggregator relays it to MQTT unchanged.

The trust store changes live: the operator's fleet records (:mod:`schemas.fleet`) enrol, revoke
and rotate agents. An identity keeps every key it had, each valid for a range of rounds, so a
message verifies only with the key valid for the round in its header.

Usage::

    key = Ed25519PrivateKey.generate()
    trust = TrustStore({"agent-000": Identity("agent-000", "agent", "region-0", key.public_key())})
    topic = Topics("fed").update("region-0", "agent-000")
    data = seal(pb.UPDATE_CHUNK, chunk, "agent-000", key, topic=topic)
    chunk = open_envelope(data, pb.UPDATE_CHUNK, trust, max_bytes=4 << 20, topic=topic).body
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ijson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError, Message

from schemas import fedstream_pb2 as pb
from schemas.errors import InvalidMessage

SCHEMA_VERSION = 1
_DOMAIN = b"fedstream/v2\0"

BODY_TYPES: dict[int, type[Message]] = {
    pb.MODEL_VERSION: pb.ModelVersion,
    pb.UPDATE_CHUNK: pb.UpdateChunk,
    pb.PARTIAL_CHUNK: pb.PartialChunk,
    pb.RECEIPT: pb.Receipt,
    pb.CONTROL: pb.Control,
    pb.FLEET_RECORD: pb.FleetRecord,
}


@dataclass(frozen=True, slots=True)  # a fleet holds 10^5+ of these
class Identity:
    """A signer the federation knows: its name, role ("agent", "region", "global") and its
    current key."""

    name: str
    role: str
    region: str
    public_key: Ed25519PublicKey


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _key(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


@dataclass(frozen=True, slots=True)  # a fleet holds 10^5+ of these
class KeySpan:
    """One key of an identity (its raw 32 bytes) and the rounds it signs for: ``valid_from``
    <= round < ``valid_until`` (``None``: no end).

    Only the raw bytes are kept: a key object costs about ten times as much memory and takes
    1 us to build, against 120 us for the verification it serves (``public_key``)."""

    raw: bytes
    valid_from: int = 0
    valid_until: int | None = None

    @property
    def public_key(self) -> Ed25519PublicKey:
        return _key(self.raw)

    def covers(self, round_id: int) -> bool:
        return self.valid_from <= round_id and (self.valid_until is None
                                                or round_id < self.valid_until)


@dataclass(frozen=True, slots=True)  # a fleet holds 10^5+ of these
class IdentityState:
    """Everything the trust store knows of one identity: every key it ever had (oldest first,
    the last one current) and whether it is revoked (for good)."""

    name: str
    role: str
    region: str
    keys: tuple[KeySpan, ...]
    revoked: bool = False

    @property
    def identity(self) -> Identity | None:
        """The identity with its current key (None: revoked, or known only as revoked)."""
        if self.revoked or not self.keys:
            return None
        return Identity(self.name, self.role, self.region, self.keys[-1].public_key)

    @property
    def current(self) -> bool:
        """Not revoked, and with a key."""
        return not self.revoked and bool(self.keys)

    def key_for(self, round_id: int) -> KeySpan | None:
        """The key valid for ``round_id`` (at most one is)."""
        for span in self.keys:
            if span.covers(round_id):
                return span
        return None


def _refuse(detail: str) -> InvalidMessage:
    return InvalidMessage("bad_record", detail)


@dataclass(frozen=True, slots=True)
class AgentScope:
    """The agents a trust store keeps (every other identity it always keeps).

    A service needs only the agents it serves, and its memory should not grow with the rest
    of the fleet: the global keeps every agent (it samples the whole fleet), a region only its
    own region's (:meth:`region`), a device none but itself (:meth:`only`). An agent out of
    scope is unknown to the store: its messages are refused as ``unknown_signer``.
    """

    region: str | None = None  # None: every region's agents (with only_names: none)
    names: frozenset[str] = frozenset()
    only_names: bool = False

    @classmethod
    def of_region(cls, region: str) -> AgentScope:
        return cls(region=region)

    @classmethod
    def only(cls, *names: str) -> AgentScope:
        return cls(names=frozenset(names), only_names=True)

    @property
    def everything(self) -> bool:
        return self.region is None and not self.only_names

    def keeps(self, role: str, name: str, region: str) -> bool:
        if role != "agent" or self.everything or name in self.names:
            return True
        return not self.only_names and region in (self.region, "")  # "": a bare revocation


ALL_AGENTS = AgentScope()


class TrustStore:
    """Public keys of every identity in scope (:class:`AgentScope`): loaded from the
    ``trust.json`` that keygen writes, then changed live by the operator's fleet records
    (:mod:`schemas.fleet`: :meth:`enrol`, :meth:`revoke`, :meth:`rotate`).

    An identity keeps the history of its keys: after a rotation its old key still verifies
    messages of the rounds before the rotation's effective round, the new key those from it on
    (:func:`open_envelope` checks the round). A revoked identity is gone for good: :meth:`get`,
    ``in`` and :meth:`names` no longer see it, :meth:`state` does.

    Every change replaces one immutable :class:`IdentityState` in one step, so readers on the
    same event loop (or another thread) always see a whole state; :attr:`generation` counts the
    changes (a service can recompute what depends on the fleet when it moves).

    Memory: about 400 bytes per identity kept (raw keys; a key object is built per
    verification). A change to an agent out of scope is accepted and dropped, so a store
    scoped to a region cannot see a key taken by another region's agent: the global's
    unscoped store and ``fedstream-fleet`` check that.
    """

    def __init__(self, identities: dict[str, Identity], *,
                 scope: AgentScope = ALL_AGENTS) -> None:
        self.scope = scope
        self._states: dict[str, IdentityState] = {}
        self._owners: dict[bytes, str] = {}
        self.generation = 0
        for n, i in identities.items():
            self._set(IdentityState(n, i.role, i.region, (KeySpan(_raw(i.public_key)),)))
        self.generation = 0

    def __contains__(self, name: str) -> bool:
        st = self._states.get(name)
        return st is not None and st.current

    def __len__(self) -> int:
        return len(self._states)

    def get(self, name: str) -> Identity | None:
        """The identity with its current key; None if unknown or revoked."""
        st = self._states.get(name)
        return None if st is None else st.identity

    def state(self, name: str) -> IdentityState | None:
        """The identity's whole history, revoked or not."""
        return self._states.get(name)

    def states(self) -> list[IdentityState]:
        """Every identity's state, revoked ones included, sorted by name."""
        return sorted(list(self._states.values()), key=lambda st: st.name)

    def names(self, role: str | None = None, region: str | None = None) -> list[str]:
        """Names of the identities in ``role`` / ``region`` that are not revoked."""
        return sorted(
            st.name
            for st in list(self._states.values())
            if st.current and (role is None or st.role == role)
            and (region is None or st.region == region)
        )

    def copy(self) -> TrustStore:
        out = TrustStore({}, scope=self.scope)
        out._states, out._owners = dict(self._states), dict(self._owners)
        out.generation = self.generation
        return out

    # -- changes (the fleet records of schemas/fleet.py) ---------------------------------------

    def _set(self, st: IdentityState) -> None:
        if not self.scope.keeps(st.role, st.name, st.region):
            return
        for span in st.keys:
            self._owners[span.raw] = st.name
        self._states[st.name] = st
        self.generation += 1

    def _agent(self, name: str, any_role: bool = False) -> IdentityState | None:
        st = self._states.get(name)
        if st is not None and st.role != "agent" and not any_role:
            raise _refuse(f"{name!r} is a {st.role}, not an agent: only agents change live "
                          "(a region's or the global's key is rotated by a restart)")
        if st is not None and st.revoked:
            raise _refuse(f"{name!r} is revoked: enrol the device under a new id")
        return st

    def _check_region(self, region: str) -> None:
        reg = self._states.get(region)
        if reg is None or reg.role != "region" or not reg.current:
            raise _refuse(f"region {region!r} is not a region of the trust store")

    def _check_new_key(self, key: Ed25519PublicKey, owner: str) -> None:
        other = self._owners.get(_raw(key))
        if other is not None and other != owner:
            raise _refuse(f"this key already belongs to {other!r}")

    def enrol(self, name: str, region: str, key: Ed25519PublicKey, *,
              effective_round: int = 0) -> bool:
        """Add the agent ``name`` of ``region`` with ``key``, valid from ``effective_round``.

        Returns False (nothing changed) if it is already enrolled with this key in this region.

        Raises:
            InvalidMessage: ``bad_record``: the name is taken (another key: that is a rotate;
                another region; a non-agent identity), revoked, or the region is unknown.
        """
        st = self._agent(name)
        if st is not None:
            if st.region == region and st.keys and st.keys[-1].raw == _raw(key):
                return False
            if st.region != region:
                raise _refuse(f"{name!r} is already enrolled in {st.region}, not {region}")
            raise _refuse(f"{name!r} is already enrolled with another key (use rotate)")
        self._check_region(region)
        self._check_new_key(key, name)
        self._set(IdentityState(name, "agent", region, (KeySpan(_raw(key), effective_round),)))
        return True

    def revoke(self, name: str, *, region: str = "") -> bool:
        """Revoke ``name`` from now on, for good (also a name never seen: it can then never be
        enrolled). Returns False if it was revoked already.

        Raises:
            InvalidMessage: ``bad_record`` for a non-agent identity.
        """
        st = self._states.get(name)
        if st is not None and st.role != "agent":
            raise _refuse(f"{name!r} is a {st.role}, not an agent: it cannot be revoked live")
        if st is not None and st.revoked:
            return False
        if st is None:
            st = IdentityState(name, "agent", region, ())
        self._set(replace(st, revoked=True))
        return True

    def rotate(self, name: str, key: Ed25519PublicKey, effective_round: int, *,
               previous: Ed25519PublicKey | None = None, region: str = "",
               any_role: bool = False) -> bool:
        """Give ``name`` the new ``key`` for rounds >= ``effective_round``; its current key
        stays valid only for the rounds before. ``previous`` (if given) must be that current
        key; for a name not known yet (its enrol record compacted away) it is the key valid
        before ``effective_round``. Returns False if this very rotation is already applied.

        Raises:
            InvalidMessage: ``bad_record``: unknown name without ``previous``, a revoked or
                non-agent identity, ``previous`` not the current key, a key it had before, or
                an effective round before the current key's own.

        ``any_role``: also a service identity (the global's key, rotated by
        ``fedstream-keygen --rotate`` at a round boundary, with a restart; fleet records never
        set it).
        """
        st = self._agent(name, any_role)
        raw = _raw(key)
        if st is None:
            if previous is None:
                raise _refuse(f"{name!r} is not enrolled: nothing to rotate")
            self._check_region(region)
            self._check_new_key(key, name)
            self._check_new_key(previous, name)
            if _raw(previous) == raw:
                raise _refuse("the new key is the old key")
            self._set(IdentityState(name, "agent", region, (
                KeySpan(_raw(previous), 0, effective_round), KeySpan(raw, effective_round))))
            return True
        if region and region != st.region:
            raise _refuse(f"{name!r} is enrolled in {st.region}, not {region}")
        cur = st.keys[-1] if st.keys else None
        if cur is not None and cur.raw == raw and cur.valid_from == effective_round:
            return False  # applied already (a replayed record)
        if cur is None or (previous is not None and _raw(previous) != cur.raw):
            raise _refuse(f"rotation of {name!r} replaces a key that is not its current one")
        if any(span.raw == raw for span in st.keys):
            raise _refuse(f"{name!r} had this key before: a rotation needs a new key")
        self._check_new_key(key, name)
        if effective_round < cur.valid_from:
            raise _refuse(f"effective round {effective_round} is before round "
                          f"{cur.valid_from}, from which the current key is valid")
        keys = (*st.keys[:-1], replace(cur, valid_until=effective_round),
                KeySpan(raw, effective_round))
        self._set(replace(st, keys=keys))
        return True

    # -- trust.json ----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path, *, scope: AgentScope = ALL_AGENTS) -> TrustStore:
        """Read a ``trust.json``: ``{"identities": {name: {role, region, public_key}}}``, each
        entry optionally with its key history (``keys``: ``[{public_key, from, until}]``) and
        ``revoked`` (what :meth:`dump` writes after fleet changes).

        The file is streamed (``ijson``), one identity at a time, and only those in ``scope``
        are kept: a region's memory does not hold the rest of a 10^5-device fleet, not even
        while it loads.

        Raises:
            ValueError: an entry without a role, or a key that is not 32 bytes of hex.
        """
        out = cls({}, scope=scope)
        with open(path, "rb") as f:
            try:
                for name, entry in ijson.kvitems(f, "identities", use_float=True):
                    out._load_entry(path, name, entry)
            except ijson.JSONError as exc:
                raise ValueError(f"{path}: not a trust store ({exc})") from None
        out.generation = 0
        return out

    def _load_entry(self, path: Path, name: str, entry: Any) -> None:
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: identity {name!r} is not an object")
        role = sys.intern(str(entry.get("role", "")))
        region = sys.intern(str(entry.get("region", "")))
        if not self.scope.keeps(role, name, region):
            return
        try:
            spans = tuple(
                KeySpan(_checked_raw(k["public_key"]), int(k.get("from", 0)),
                        None if k.get("until") is None else int(k["until"]))
                for k in entry.get("keys", ())
            ) or (KeySpan(_checked_raw(entry["public_key"])),)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise ValueError(f"{path}: identity {name!r}: bad key ({exc!r})") from None
        if not role:
            raise ValueError(f"{path}: identity {name!r} has no role")
        self._set(IdentityState(name, role, region, spans, bool(entry.get("revoked", False))))

    def dump(self) -> dict[str, Any]:
        """The ``trust.json`` form (identities known only as revoked, without a key, are left
        out: the fleet topic still has them).

        Raises:
            ValueError: the store is scoped (it would write a fleet without the agents out of
                its scope)."""
        if not self.scope.everything:
            raise ValueError("a trust store scoped to some agents cannot be written as the "
                             "fleet's trust.json")
        out: dict[str, Any] = {}
        for st in self.states():
            if not st.keys:
                continue
            entry: dict[str, Any] = {"role": st.role, "region": st.region,
                                     "public_key": st.keys[-1].raw.hex()}
            if len(st.keys) > 1 or st.keys[0].valid_from:
                entry["keys"] = [{"public_key": k.raw.hex(), "from": k.valid_from,
                                  "until": k.valid_until} for k in st.keys]
            if st.revoked:
                entry["revoked"] = True
            out[st.name] = entry
        return {"identities": out}


def _checked_raw(hex_key: str) -> bytes:
    raw = bytes.fromhex(hex_key)
    _key(raw)  # a point that is not a key fails here, at load, not at its first message
    return raw


def public_hex(key: Ed25519PublicKey) -> str:
    return _raw(key).hex()


def save_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = Path(path)
    path.write_bytes(pem)
    path.chmod(0o600)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def signed_bytes(kind: int, signer: str, topic: str, body: bytes) -> bytes:
    return (_DOMAIN + struct.pack(">I", kind) + signer.encode() + b"\0" + topic.encode() + b"\0"
            + body)


def seal(kind: pb.Kind, body: Message, signer: str, key: Ed25519PrivateKey, *,
         topic: str) -> bytes:
    """Serialize ``body`` into an Envelope signed for ``topic``."""
    raw = body.SerializeToString()
    env = pb.Envelope(
        schema_version=SCHEMA_VERSION,
        kind=kind,
        signer=signer,
        body=raw,
        signature=key.sign(signed_bytes(kind, signer, topic, raw)),
    )
    return env.SerializeToString()


@dataclass(frozen=True)
class Opened:
    signer: Identity
    body: Any


def open_envelope(data: bytes, kind: pb.Kind, trust: TrustStore, *, max_bytes: int,
                  topic: str) -> Opened:
    """Parse, check and verify one envelope received on (or read for) ``topic``.

    Raises:
        InvalidMessage: with reason ``oversized``, ``malformed``, ``wrong_version``,
            ``wrong_kind``, ``unsigned``, ``unknown_signer``, ``revoked`` (the operator revoked
            the signer), ``bad_signature`` (which includes a message signed for another topic
            or federation), ``sender_mismatch`` or ``rotated_key`` (signed with a key of the
            signer's that is not valid for the body's ``header.round``: the old key from a
            rotation's effective round on, or the new key before it).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidMessage("malformed", f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise InvalidMessage("oversized", f"{len(data)} bytes is over the {max_bytes}-byte limit")
    env = pb.Envelope()
    try:
        env.ParseFromString(data)
    except DecodeError as exc:
        raise InvalidMessage("malformed", f"not a fedstream envelope ({exc})") from None
    if env.schema_version != SCHEMA_VERSION:
        raise InvalidMessage(
            "wrong_version", f"schema version {env.schema_version}, expected {SCHEMA_VERSION}"
        )
    if env.kind != kind:
        raise InvalidMessage(
            "wrong_kind", f"got {pb.Kind.Name(env.kind) if env.kind in pb.Kind.values() else env.kind}"
            f", expected {pb.Kind.Name(kind)}"
        )
    if not env.signature:
        raise InvalidMessage("unsigned", f"message from {env.signer!r} carries no signature")
    state = trust.state(env.signer)
    if state is None:
        raise InvalidMessage("unknown_signer", f"{env.signer!r} is not in the trust store")
    ident = state.identity
    if ident is None:
        raise InvalidMessage("revoked", f"{env.signer!r} was revoked by the operator")
    signed = signed_bytes(env.kind, env.signer, topic, env.body)
    span = None
    for candidate in reversed(state.keys):  # the current key first
        try:
            candidate.public_key.verify(env.signature, signed)
        except InvalidSignature:
            continue
        span = candidate
        break
    if span is None:
        raise InvalidMessage(
            "bad_signature", f"signature does not verify with {env.signer!r}'s key for topic "
            f"{topic!r}"
        )
    body = BODY_TYPES[kind]()
    try:
        body.ParseFromString(env.body)
    except DecodeError as exc:
        raise InvalidMessage("malformed", f"signed body does not decode ({exc})") from None
    if body.header.sender != env.signer:
        raise InvalidMessage(
            "sender_mismatch", f"header says {body.header.sender!r}, signed by {env.signer!r}"
        )
    if body.header.schema_version != SCHEMA_VERSION:
        raise InvalidMessage(
            "wrong_version", f"body schema version {body.header.schema_version}"
        )
    if not span.covers(body.header.round):
        until = "" if span.valid_until is None else f" to {span.valid_until - 1}"
        raise InvalidMessage(
            "rotated_key", f"{env.signer!r} signed round {body.header.round} with its key of "
            f"rounds {span.valid_from}{until or ' on'}: not valid for that round"
        )
    return Opened(ident, body)


def open_model_version(data: bytes, trust: TrustStore, *, max_bytes: int,
                       topic: str) -> pb.ModelVersion:
    """Open a model-version envelope: valid only if the global aggregator signed it.

    Raises:
        InvalidMessage: any reason of :func:`open_envelope`, or ``unauthorized`` when another
            identity (a region, an agent) signed it.
    """
    opened = open_envelope(data, pb.MODEL_VERSION, trust, max_bytes=max_bytes, topic=topic)
    if opened.signer.role != "global":
        raise InvalidMessage("unauthorized", f"model version signed by {opened.signer.name!r}, "
                             "not by the global aggregator")
    return opened.body


def header(sender: str, round_id: int, model_version: int, fingerprint: str,
           chunk_index: int = 0, chunk_count: int = 1) -> pb.Header:
    return pb.Header(
        schema_version=SCHEMA_VERSION,
        sender=sender,
        round=round_id,
        model_version=model_version,
        he_fingerprint=fingerprint,
        chunk_index=chunk_index,
        chunk_count=chunk_count,
    )


def open_control(data: bytes, trust: TrustStore, *, topic: str) -> pb.Control:
    """Open an operator command: valid only if an operator (or the global) signed it and it
    names a known action with at least one agent.

    Raises:
        InvalidMessage: any reason of :func:`open_envelope`, ``unauthorized`` (signed by an
            agent or a region) or ``bad_command``.
    """
    opened = open_envelope(data, pb.CONTROL, trust, max_bytes=1 << 20, topic=topic)
    if opened.signer.role not in ("operator", "global"):
        raise InvalidMessage("unauthorized", f"control command signed by "
                             f"{opened.signer.name!r}, not by an operator")
    cmd = opened.body
    if cmd.action != "lift" or not cmd.agents:
        raise InvalidMessage("bad_command", f"unknown command {cmd.action!r} or no agents "
                             "(known: lift AGENT...)")
    return cmd
