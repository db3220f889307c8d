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

Usage::

    key = Ed25519PrivateKey.generate()
    trust = TrustStore({"agent-000": Identity("agent-000", "agent", "region-0", key.public_key())})
    topic = Topics("fed").update("region-0", "agent-000")
    data = seal(pb.UPDATE_CHUNK, chunk, "agent-000", key, topic=topic)
    chunk = open_envelope(data, pb.UPDATE_CHUNK, trust, max_bytes=4 << 20, topic=topic).body
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
}


@dataclass(frozen=True)
class Identity:
    """A signer the federation knows: its name, role ("agent", "region", "global") and key."""

    name: str
    role: str
    region: str
    public_key: Ed25519PublicKey


class TrustStore:
    """Public keys of every identity, loaded from the ``trust.json`` that keygen writes."""

    def __init__(self, identities: dict[str, Identity]) -> None:
        self._ids = dict(identities)

    def __contains__(self, name: str) -> bool:
        return name in self._ids

    def get(self, name: str) -> Identity | None:
        return self._ids.get(name)

    def names(self, role: str | None = None, region: str | None = None) -> list[str]:
        return sorted(
            n
            for n, i in self._ids.items()
            if (role is None or i.role == role) and (region is None or i.region == region)
        )

    @classmethod
    def load(cls, path: Path) -> TrustStore:
        raw = json.loads(Path(path).read_text())
        ids = {}
        for name, entry in raw["identities"].items():
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(entry["public_key"]))
            ids[name] = Identity(name, entry["role"], entry.get("region", ""), key)
        return cls(ids)

    def dump(self) -> dict[str, Any]:
        return {
            "identities": {
                n: {"role": i.role, "region": i.region, "public_key": public_hex(i.public_key)}
                for n, i in sorted(self._ids.items())
            }
        }


def public_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


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
            ``wrong_kind``, ``unsigned``, ``unknown_signer``, ``bad_signature`` (which includes a
            message signed for another topic or federation) or ``sender_mismatch``.
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
    ident = trust.get(env.signer)
    if ident is None:
        raise InvalidMessage("unknown_signer", f"{env.signer!r} is not in the trust store")
    try:
        ident.public_key.verify(env.signature,
                                signed_bytes(env.kind, env.signer, topic, env.body))
    except InvalidSignature:
        raise InvalidMessage(
            "bad_signature", f"signature does not verify with {env.signer!r}'s key for topic "
            f"{topic!r}"
        ) from None
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
