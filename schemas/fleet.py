"""The fleet's lifecycle without restarts: operator-signed enrol / revoke / rotate records on the
compacted Kafka topic ``<ns>.fleet`` (key: the identity), applied live to every service's
:class:`~schemas.signing.TrustStore`.

Records (``FleetRecord``, kind ``FLEET_RECORD``, signed for the fleet topic like every envelope):

- ``enrol``: a new agent of a known region with its Ed25519 key, valid from ``effective_round``
  (the operator's tool uses 0: at once). The same agent, key and region again changes nothing;
  a name that is taken (another key, another region, a region / global / operator identity) or
  revoked is refused.
- ``revoke``: the agent is refused from now on, for good (``open_envelope`` raises ``revoked``);
  its name can never be enrolled again. A revoke of a name never seen bans the name.
- ``rotate``: ``public_key`` is valid for rounds >= ``effective_round``, the key it replaces
  (``previous_key``) for the rounds before only (``rotated_key`` otherwise). The record names
  the replaced key so that it still makes sense alone, after compaction has removed the enrol
  record under the same identity.

Only the operator's signature counts (``unauthorized`` otherwise); anything malformed or
contradicting the store is refused as ``bad_record`` and never changes the store.
:class:`FleetFollower` is what a service runs::

    follower = FleetFollower(kafka_conn, Topics(ns), keyring.trust)
    follower.start()
    await follower.caught_up()   # every record written before start is applied
    ...
    await follower.stop()

A device's side: ``fedstream-device init`` (edge_agent/device_cli.py) writes an
:class:`EnrolRequest`; the operator's ``fedstream-fleet`` (global_aggregator/fleet_cli.py) checks
it (:func:`check_request`), signs its certificate request and publishes the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from prometheus_client import Counter

from schemas import fedstream_pb2 as pb
from schemas.errors import InvalidMessage, Reason
from schemas.kafka import CONSUMER_SIZES, KafkaConn, as_conn
from schemas.pki import PkiError, identity_of_name
from schemas.project import check_device_id
from schemas.signing import TrustStore, header, open_envelope, seal
from schemas.topics import Topics

log = logging.getLogger("fedstream.fleet")

ENROL, REVOKE, ROTATE = "enrol", "revoke", "rotate"
ACTIONS = (ENROL, REVOKE, ROTATE)
#: Roles that change live; a region's or the global's key is rotated by a restart procedure.
LIVE_ROLES = ("agent",)
MAX_RECORD_BYTES = 64 << 10
REQUEST_FORMAT = "fedstream-enrol/1"

FLEET_RECORDS = Counter(
    "fedstream_fleet_records_total",
    "Fleet records read from the fleet topic, by result: applied, unchanged (already applied), "
    "or the reason it was refused (unauthorized, bad_record, bad_signature, malformed, ...)",
    ["result"],
)


def key_fingerprint(raw: bytes) -> str:
    """A short, comparable name of a raw Ed25519 public key (first 16 hex digits of its
    SHA-256): what the device prints and ``fedstream-fleet list`` shows."""
    return hashlib.sha256(raw).hexdigest()[:16]


def raw_public_key(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# -- records -----------------------------------------------------------------------------------


def make_record(action: str, identity: str, *, signer: str, region: str = "",
                public_key: bytes = b"", effective_round: int = 0, certificate: bytes = b"",
                previous_key: bytes = b"", role: str = "agent") -> pb.FleetRecord:
    """A fleet record (checked by :func:`check_record` before it is returned)."""
    rec = pb.FleetRecord(header=header(signer, 0, 0, ""), action=action, identity=identity,
                         role=role, region=region, public_key=public_key,
                         effective_round=effective_round, certificate=certificate,
                         previous_key=previous_key)
    check_record(rec)
    return rec


def seal_record(record: pb.FleetRecord, signer: str, key: Ed25519PrivateKey, *,
                topic: str) -> bytes:
    """The signed envelope of ``record`` for the fleet topic ``topic`` (``Topics(ns).fleet``)."""
    return seal(pb.FLEET_RECORD, record, signer, key, topic=topic)


def _key(raw: bytes, what: str) -> Ed25519PublicKey:
    if len(raw) != 32:
        raise InvalidMessage(Reason.BAD_RECORD, f"{what} is {len(raw)} bytes, not a raw "
                             "32-byte Ed25519 public key")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise InvalidMessage(Reason.BAD_RECORD, f"{what} is not an Ed25519 key ({exc})") from None


def check_record(rec: pb.FleetRecord) -> None:
    """The record's shape, whatever the store holds.

    Raises:
        InvalidMessage: ``bad_record`` saying what is wrong.
    """
    if rec.action not in ACTIONS:
        raise InvalidMessage(Reason.BAD_RECORD, f"unknown action {rec.action!r} (known: "
                             f"{', '.join(ACTIONS)})")
    try:
        check_device_id(rec.identity)
        if rec.region:
            check_device_id(rec.region)
    except ValueError as exc:
        raise InvalidMessage(Reason.BAD_RECORD, str(exc)) from None
    if rec.role not in LIVE_ROLES:
        raise InvalidMessage(Reason.BAD_RECORD, f"role {rec.role!r} does not change live (only "
                             f"{', '.join(LIVE_ROLES)}): rotate a region's or the global's key "
                             "with the restart procedure")
    if rec.action in (ENROL, ROTATE):
        if not rec.region:
            raise InvalidMessage(Reason.BAD_RECORD, f"{rec.action} of {rec.identity!r} names "
                                 "no region")
        _key(rec.public_key, "public_key")
    if rec.previous_key:
        if rec.action != ROTATE:
            raise InvalidMessage(Reason.BAD_RECORD, "previous_key belongs to a rotate record")
        _key(rec.previous_key, "previous_key")
        if rec.previous_key == rec.public_key:
            raise InvalidMessage(Reason.BAD_RECORD, "rotation to the key it replaces")


def open_record(data: bytes, trust: TrustStore, topic: str) -> pb.FleetRecord:
    """Open a fleet record read from ``topic``: valid only if the operator signed it (for this
    topic, i.e. this federation) and it is well formed. Nothing is applied here.

    Raises:
        InvalidMessage: any reason of :func:`~schemas.signing.open_envelope`, ``unauthorized``
            (signed by anyone but an operator) or ``bad_record``.
    """
    opened = open_envelope(data, pb.FLEET_RECORD, trust, max_bytes=MAX_RECORD_BYTES, topic=topic)
    if opened.signer.role != "operator":
        raise InvalidMessage(Reason.UNAUTHORIZED, f"fleet record signed by "
                             f"{opened.signer.name!r} ({opened.signer.role}), not by an operator")
    rec: pb.FleetRecord = opened.body
    check_record(rec)
    return rec


def apply_record(trust: TrustStore, rec: pb.FleetRecord) -> bool:
    """Apply one opened record to ``trust``; True if it changed the store, False if it was
    applied already or names a device out of the store's scope (:class:`AgentScope`).

    Raises:
        InvalidMessage: ``bad_record`` when the record contradicts the store (see the module
            documentation); the store is then unchanged.
    """
    check_record(rec)
    if rec.region and not trust.scope.keeps("agent", rec.identity, rec.region):
        return False  # another region's device: this store does not keep it
    if rec.action == ENROL:
        return trust.enrol(rec.identity, rec.region, _key(rec.public_key, "public_key"),
                           effective_round=rec.effective_round)
    if rec.action == REVOKE:
        return trust.revoke(rec.identity, region=rec.region)
    previous = _key(rec.previous_key, "previous_key") if rec.previous_key else None
    return trust.rotate(rec.identity, _key(rec.public_key, "public_key"), rec.effective_round,
                        previous=previous, region=rec.region)


def describe(rec: pb.FleetRecord) -> str:
    what = f"{rec.action} {rec.identity}"
    if rec.region:
        what += f" ({rec.region})"
    if rec.public_key:
        what += f" key {key_fingerprint(rec.public_key)}"
    if rec.action == ROTATE:
        what += f" from round {rec.effective_round}"
    return what


# -- the follower ------------------------------------------------------------------------------


class FleetFollower:
    """Reads the fleet topic from its beginning and keeps following it, applying every valid
    record to ``trust`` in offset order (partition 0, ``read_committed``, no consumer group).

    Every record is counted in ``fedstream_fleet_records_total{result}``; a refused one is
    logged with its reason and changes nothing; nothing a record holds stops the follower.
    Kafka errors are retried every ``retry_s`` from the last applied offset (with
    ``retry=False``, e.g. a one-shot command-line read, they end the task and
    :meth:`caught_up` raises them). ``on_change(record)`` is called after each record that
    changed the store (the store's ``generation`` also counts changes).
    """

    def __init__(self, conn: KafkaConn | str, topics: Topics, trust: TrustStore, *,
                 on_change: Callable[[pb.FleetRecord], Any] | None = None,
                 retry: bool = True, retry_s: float = 2.0, poll_ms: int = 500) -> None:
        self.conn = as_conn(conn)
        self.topic = topics.fleet
        self.trust = trust
        self.on_change = on_change
        self.retry, self.retry_s, self.poll_ms = retry, retry_s, poll_ms
        self.applied = self.unchanged = self.refused = 0
        self.records: list[tuple[int, str, pb.FleetRecord | None]] = []  # (offset, result, rec)
        self.keep_records = False
        self._next: int | None = None  # next offset to read
        self._caught_up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        """Start following on the running loop (once); returns the task."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"fleet-follower {self.topic}")
        return self._task

    @property
    def is_caught_up(self) -> bool:
        return self._caught_up.is_set()

    async def caught_up(self) -> None:
        """Resolves once every record up to the topic's end offset seen at start is applied
        (at once if the topic does not exist yet). Raises what ended the follower, if it ended
        before that."""
        task = self.start()
        if self._caught_up.is_set():
            return
        waiter = asyncio.ensure_future(self._caught_up.wait())
        try:
            await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not self._caught_up.is_set():
            if not task.cancelled():
                task.result()  # raises the follower's error
            raise RuntimeError("fleet follower stopped before catching up")

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def run(self) -> None:
        while True:
            try:
                await self._follow()
                return
            except asyncio.CancelledError:
                raise
            except (KafkaError, OSError) as exc:
                if not self.retry:
                    raise
                log.warning("fleet topic %s: %s: retrying in %.0f s", self.topic,
                            exc or type(exc).__name__, self.retry_s)
                await asyncio.sleep(self.retry_s)
            except Exception:
                if not self.retry:
                    raise
                log.exception("fleet topic %s: following failed: retrying in %.0f s",
                              self.topic, self.retry_s)
                await asyncio.sleep(self.retry_s)

    async def _follow(self) -> None:
        consumer = AIOKafkaConsumer(**self.conn.kwargs(), group_id=None,
                                    enable_auto_commit=False, isolation_level="read_committed",
                                    **CONSUMER_SIZES)
        try:
            await consumer.start()
            while self.topic not in await consumer.topics():
                if not self._caught_up.is_set():
                    log.info("fleet topic %s does not exist (or may not be read) yet: no fleet "
                             "records to apply", self.topic)
                    self._caught_up.set()
                if not self.retry:
                    return
                await asyncio.sleep(self.retry_s)
            tp = TopicPartition(self.topic, 0)
            consumer.assign([tp])
            if self._next is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, self._next)
            end = None if self._caught_up.is_set() else (await consumer.end_offsets([tp]))[tp]
            while True:
                if end is not None and await consumer.position(tp) >= end:
                    end = None
                    log.info("fleet: caught up with %s (%d applied, %d unchanged, %d refused)",
                             self.topic, self.applied, self.unchanged, self.refused)
                    self._caught_up.set()
                    if not self.retry:
                        return
                batch = await consumer.getmany(tp, timeout_ms=self.poll_ms)
                for rec in batch.get(tp, []):
                    self.handle(rec.offset, rec.key, rec.value)
                    self._next = rec.offset + 1
        finally:
            await consumer.stop()

    def handle(self, offset: int, key: bytes | None, value: bytes | None) -> str:
        """Open, check and apply one record of the topic; returns the result it was counted
        under. Never raises."""
        rec: pb.FleetRecord | None = None
        try:
            if value is None:
                raise InvalidMessage(Reason.MALFORMED, "a record without a value (tombstone)")
            rec = open_record(value, self.trust, self.topic)
            if key != rec.identity.encode():
                raise InvalidMessage(Reason.BAD_RECORD, f"filed under key {key!r}, not under "
                                     f"its identity {rec.identity!r}")
            changed = apply_record(self.trust, rec)
        except InvalidMessage as exc:
            result = str(exc.reason)
            self.refused += 1
            log.warning("fleet record at offset %d refused: %s", offset, exc)
        except Exception:  # never let a record stop the follower
            result = "error"
            self.refused += 1
            log.exception("fleet record at offset %d could not be applied", offset)
        else:
            if changed:
                result = "applied"
                self.applied += 1
                log.info("fleet: %s (offset %d)", describe(rec), offset)
                if self.on_change is not None:
                    try:
                        self.on_change(rec)
                    except Exception:
                        log.exception("fleet on_change callback failed")
            else:
                result = "unchanged"
                self.unchanged += 1
        FLEET_RECORDS.labels(result).inc()
        if self.keep_records:
            self.records.append((offset, result, rec))
        return result


async def read_fleet(conn: KafkaConn | str, topics: Topics, trust: TrustStore, *,
                     timeout: float = 30.0) -> FleetFollower:
    """Apply every record of the fleet topic to ``trust`` once (the operator's tool) and return
    the finished follower (its counts and ``records``). Kafka errors are raised, not retried."""
    follower = FleetFollower(conn, topics, trust, retry=False)
    follower.keep_records = True
    follower.start()
    try:
        await asyncio.wait_for(follower.caught_up(), timeout)
    finally:
        await follower.stop()
    return follower


# -- enrolment requests (device side -> operator) ----------------------------------------------


@dataclass(frozen=True)
class EnrolRequest:
    """What a device sends the operator: only public material (``enrol-<id>.json``)."""

    device_id: str
    region: str
    public_key: str  # hex of the raw Ed25519 public key
    csr: str  # PEM certificate signing request for the device's TLS key

    def to_json(self) -> dict[str, str]:
        return {"format": REQUEST_FORMAT, "device_id": self.device_id, "region": self.region,
                "public_key": self.public_key,
                "key_fingerprint": key_fingerprint(bytes.fromhex(self.public_key)),
                "csr": self.csr}

    @classmethod
    def from_json(cls, raw: Any) -> EnrolRequest:
        """Parse a request; ``ValueError`` says what is wrong."""
        if not isinstance(raw, dict):
            raise ValueError("an enrolment request is a JSON object")
        if "PRIVATE KEY" in json.dumps(raw):
            raise ValueError("the request holds a PRIVATE KEY: treat that device's keys as "
                             "compromised and make new ones on the device")
        if raw.get("format") != REQUEST_FORMAT:
            raise ValueError(f"not a {REQUEST_FORMAT} request (format {raw.get('format')!r}): "
                             "make it with `fedstream-device init`")
        fields = {}
        for name in ("device_id", "region", "public_key", "csr"):
            v = raw.get(name)
            if not isinstance(v, str) or not v:
                raise ValueError(f"the request has no {name!r}")
            fields[name] = v
        return cls(**fields)


@dataclass(frozen=True)
class CheckedRequest:
    device_id: str
    region: str
    public_key: Ed25519PublicKey
    raw_key: bytes
    csr: x509.CertificateSigningRequest


def check_request(req: EnrolRequest, trust: TrustStore) -> CheckedRequest:
    """Everything about a request that does not need the CA: the device id's syntax, its region
    in ``trust``, the Ed25519 key, and the certificate request (its signature, a subject naming
    exactly the device as an agent, an ECDSA P-256 key).

    Raises:
        ValueError: (``PkiError`` for the certificate request) saying what is wrong.
    """
    check_device_id(req.device_id)
    reg = trust.get(req.region)
    if reg is None or reg.role != "region":
        known = ", ".join(trust.names(role="region")) or "none"
        raise ValueError(f"region {req.region!r} does not exist in the trust store "
                         f"(regions: {known})")
    try:
        raw = bytes.fromhex(req.public_key)
        key = Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ValueError("public_key is not the hex of a raw 32-byte Ed25519 public key") from None
    try:
        csr = x509.load_pem_x509_csr(req.csr.encode())
    except ValueError as exc:
        raise PkiError(f"csr is not a PEM certificate signing request ({exc})") from None
    if not csr.is_signature_valid:
        raise PkiError("the certificate request's signature does not verify (it was not signed "
                       "by the key it carries)")
    cn, role = identity_of_name(csr.subject)
    if (cn, role) != (req.device_id, "agent"):
        raise PkiError(f"the certificate request is for {cn!r} as {role!r}, not for "
                       f"{req.device_id!r} as 'agent'")
    pub = csr.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
        raise PkiError("the certificate request's key is not ECDSA P-256")
    return CheckedRequest(req.device_id, req.region, key, raw, csr)
