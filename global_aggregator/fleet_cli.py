"""``fedstream-fleet``: enrol, revoke and rotate devices without restarting anything.

The operator's tool for the fleet topic ``<ns>.fleet`` (:mod:`schemas.fleet`). Each command reads
the topic first (the fleet as the services see it: ``trust.json`` plus every record), checks
the change against it, then appends one operator-signed ``FleetRecord`` (Kafka key: the
device id). Every regional and global aggregator follows the topic and applies it at once.

- ``enrol --request enrol-<id>.json``: a request from ``fedstream-device init`` on the device.
  Checked (device id, region, the certificate request's signature, subject and key type), its
  certificate request signed with the region's CA (``KEYS/ca/<region>.key``; the certificate is
  written to ``<id>.mqtt.crt`` beside the request), its key published, valid at once.
- ``revoke --device ID``: refused from now on, for good.
- ``rotate --request FILE --effective-round N``: a new request (``fedstream-device init --force``
  on the device); the new key signs rounds >= N, the old one only the rounds before.
- ``list``: every device with its region, state, key fingerprint and effective round.

Bad input exits with status 2 and one line; trouble reaching Kafka with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from global_aggregator.keygen import RESERVED
from schemas.errors import InvalidMessage
from schemas.fleet import (
    ENROL,
    REVOKE,
    ROTATE,
    CheckedRequest,
    EnrolRequest,
    FleetFollower,
    apply_record,
    check_request,
    key_fingerprint,
    make_record,
    read_fleet,
    seal_record,
)
from schemas.kafka import (
    CLIENT_SIZES,
    KafkaConn,
    add_kafka_args,
    ensure_topics,
    kafka_conn_from_args,
)
from schemas.keyring import OPERATOR_ID
from schemas.pki import CertAuthority, PkiError, cert_pem
from schemas.project import check_device_id
from schemas.signing import IdentityState, TrustStore, load_private_key
from schemas.topics import Topics

PROG = "fedstream-fleet"


class UsageError(ValueError):
    """Bad input: one line, exit status 2."""


class KafkaTrouble(RuntimeError):
    """Kafka could not be reached or refused us: one line, exit status 1."""


# -- shared steps ------------------------------------------------------------------------------


def operator_conn(a: argparse.Namespace) -> KafkaConn:
    """Kafka as the operator reaches it (:func:`schemas.kafka.kafka_conn_from_args`)."""
    try:
        return kafka_conn_from_args(a, a.keys, OPERATOR_ID, "operator")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def load_trust(keys: Path) -> TrustStore:
    f = Path(keys) / "trust.json"
    if not f.is_file():
        raise UsageError(f"no trust.json in {keys}: --keys is the operator's key directory")
    try:
        return TrustStore.load(f)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{f} is not a fedstream trust store ({exc})") from None


def load_request(path: Path) -> EnrolRequest:
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"request {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"request {path} is not readable JSON ({exc})") from None
    try:
        return EnrolRequest.from_json(raw)
    except ValueError as exc:
        raise UsageError(f"request {path}: {exc}") from None


def check_enrol_request(req: EnrolRequest, trust: TrustStore) -> CheckedRequest:
    """:func:`schemas.fleet.check_request` plus the names no device may take."""
    try:
        checked = check_request(req, trust)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    st = trust.state(req.device_id)
    if req.device_id in RESERVED or (st is not None and st.role != "agent"):
        raise UsageError(f"{req.device_id!r} is the name of a service identity, not a device")
    return checked


def region_ca(keys: Path, region: str) -> CertAuthority:
    key = Path(keys) / "ca" / f"{region}.key"
    if not key.is_file():
        raise UsageError(f"no CA key for region {region!r} at {key} (enrolling a device needs "
                         "its region's CA: run this where the CA keys are)")
    try:
        return CertAuthority.load(Path(keys) / "ca", Path(keys) / "tls", region)
    except (OSError, ValueError) as exc:
        raise UsageError(f"the CA of region {region!r} does not load ({exc})") from None


def operator_key(keys: Path) -> Any:
    f = Path(keys) / "identities" / f"{OPERATOR_ID}.pem"
    if not f.is_file():
        raise UsageError(f"no operator signing key at {f}")
    try:
        return load_private_key(f)
    except ValueError as exc:
        raise UsageError(f"{f}: {exc}") from None


def dry_run(trust: TrustStore, rec: Any) -> bool:
    """Apply ``rec`` to a copy of the store, exactly as every follower will; True if it
    changes something."""
    try:
        return apply_record(trust.copy(), rec)
    except InvalidMessage as exc:
        raise UsageError(exc.detail) from None


async def _with_kafka(conn: KafkaConn, coro: Any, timeout: float) -> Any:
    try:
        return await asyncio.wait_for(coro, timeout)
    except TimeoutError:
        hint = (" (a TLS client against a plaintext listener? try --kafka-plaintext)"
                if conn.tls is not None else "")
        raise KafkaTrouble(f"no answer from Kafka at {conn.bootstrap} within {timeout:.0f} s"
                           f"{hint}") from None
    except (KafkaError, OSError) as exc:
        raise KafkaTrouble(f"Kafka at {conn.bootstrap}: {exc or type(exc).__name__}") from None


async def read_state(conn: KafkaConn, topics: Topics, trust: TrustStore,
                     timeout: float) -> FleetFollower:
    return await _with_kafka(conn, read_fleet(conn, topics, trust, timeout=timeout), timeout + 5)


async def publish(conn: KafkaConn, topics: Topics, identity: str, data: bytes,
                  timeout: float) -> None:
    async def send() -> None:
        await ensure_topics(conn, topics)
        producer = AIOKafkaProducer(**conn.kwargs(), enable_idempotence=True, acks="all",
                                    **CLIENT_SIZES)
        try:
            await producer.start()
            await producer.send_and_wait(topics.fleet, data, key=identity.encode())
        finally:
            await producer.stop()

    await _with_kafka(conn, send(), timeout)


# -- commands ----------------------------------------------------------------------------------


async def enrol(a: argparse.Namespace, conn: KafkaConn, *, rotate: bool = False) -> dict:
    topics, trust = Topics(a.namespace), load_trust(a.keys)
    req = load_request(a.request)
    checked = check_enrol_request(req, trust)
    ca = region_ca(a.keys, req.region)
    key = operator_key(a.keys)
    await read_state(conn, topics, trust, a.timeout)
    st = trust.state(req.device_id)
    if rotate:
        if st is None:
            raise UsageError(f"{req.device_id!r} is not enrolled: enrol it instead")
        if st.revoked:
            raise UsageError(f"{req.device_id!r} is revoked: enrol the device under a new id")
        if st.region != req.region:
            raise UsageError(f"{req.device_id!r} is enrolled in {st.region}, the request says "
                             f"{req.region}")
        rec = make_record(ROTATE, req.device_id, signer=OPERATOR_ID, region=req.region,
                          public_key=checked.raw_key, effective_round=a.effective_round,
                          previous_key=st.keys[-1].raw)
    else:
        rec = make_record(ENROL, req.device_id, signer=OPERATOR_ID, region=req.region,
                          public_key=checked.raw_key, effective_round=0)
    changed = dry_run(trust, rec)
    try:
        cert = ca.sign_csr(checked.csr, cn=req.device_id, role="agent")
    except PkiError as exc:
        raise UsageError(str(exc)) from None
    pem = cert_pem(cert)
    if changed:
        rec.certificate = pem
        await publish(conn, topics, req.device_id,
                      seal_record(rec, OPERATOR_ID, key, topic=topics.fleet), a.timeout)
    out = Path(a.cert_out) if a.cert_out else Path(a.request).parent / f"{req.device_id}.mqtt.crt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(pem)
    return {"action": rec.action, "device": req.device_id, "region": req.region,
            "key_fingerprint": key_fingerprint(checked.raw_key),
            "effective_round": rec.effective_round, "published": changed,
            "certificate": str(out)}


async def revoke(a: argparse.Namespace, conn: KafkaConn) -> dict:
    topics, trust = Topics(a.namespace), load_trust(a.keys)
    try:
        check_device_id(a.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    key = operator_key(a.keys)
    await read_state(conn, topics, trust, a.timeout)
    st = trust.state(a.device)
    if st is None:
        raise UsageError(f"{a.device!r} is not a device of this federation (neither in "
                         "trust.json nor on the fleet topic)")
    if st.role != "agent":
        raise UsageError(f"{a.device!r} is a {st.role}, not a device: it cannot be revoked live")
    rec = make_record(REVOKE, a.device, signer=OPERATOR_ID, region=st.region,
                      public_key=st.keys[-1].raw if st.keys else b"")
    changed = dry_run(trust, rec)
    if changed:
        await publish(conn, topics, a.device,
                      seal_record(rec, OPERATOR_ID, key, topic=topics.fleet), a.timeout)
    return {"action": REVOKE, "device": a.device, "region": st.region, "published": changed}


def _row(st: IdentityState, base: TrustStore) -> dict:
    cur = st.keys[-1] if st.keys else None
    origin = base.state(st.name)
    return {
        "identity": st.name, "role": st.role, "region": st.region,
        "state": "revoked" if st.revoked else "active",
        "key_fingerprint": key_fingerprint(cur.raw) if cur else "",
        "effective_round": cur.valid_from if cur else None,
        "keys": len(st.keys),
        "source": "trust.json" if origin == st else
                  "trust.json + fleet" if origin is not None else "fleet",
    }


async def list_fleet(a: argparse.Namespace, conn: KafkaConn) -> tuple[list[dict], dict]:
    topics, trust = Topics(a.namespace), load_trust(a.keys)
    base = trust.copy()
    follower = await read_state(conn, topics, trust, a.timeout)
    rows = [_row(st, base) for st in trust.states() if a.all or st.role == "agent"]
    refused = [{"offset": off, "result": res} for off, res, _ in follower.records
               if res not in ("applied", "unchanged")]
    return rows, {"applied": follower.applied, "unchanged": follower.unchanged,
                  "refused": refused}


def print_table(rows: list[dict], summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fleet")
    for col in ("identity", "region", "state", "key", "from round", "keys", "source"):
        table.add_column(col, no_wrap=col in ("identity", "key"))
    for r in rows:
        table.add_row(r["identity"], r["region"],
                      r["state"] if r["state"] == "active" else f"[red]{r['state']}[/red]",
                      r["key_fingerprint"], "" if r["effective_round"] is None
                      else str(r["effective_round"]), str(r["keys"]), r["source"])
    console = Console()
    console.print(table)
    refused = summary["refused"]
    console.print(f"{summary['applied']} fleet records applied, {summary['unchanged']} "
                  f"unchanged, {len(refused)} refused"
                  + ("" if not refused else ": " + ", ".join(
                      f"offset {r['offset']} ({r['result']})" for r in refused)))


# -- the command line --------------------------------------------------------------------------


def _common(env: dict[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("federation and Kafka")
    add_kafka_args(g, "the operator")
    g.add_argument("--namespace", default=env.get("FEDSTREAM_NAMESPACE", "fedstream"),
                   metavar="NS", help="the federation's topic namespace (default %(default)s; "
                   "env FEDSTREAM_NAMESPACE)")
    g.add_argument("--keys", type=Path, default=env.get("FEDSTREAM_KEYS"),
                   required=not env.get("FEDSTREAM_KEYS"), metavar="DIR",
                   help="the operator's key directory: trust.json, identities/operator.pem, "
                   "ca/<region>.key (enrol, rotate), tls/ (env FEDSTREAM_KEYS)")
    g.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="give up on Kafka after this many seconds (default %(default)s)")
    return p


def _round(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a round number") from None
    if not 0 <= n < 2**32:
        raise argparse.ArgumentTypeError(f"{n} is not a round number (0 .. 2^32-1)")
    return n


def parser(env: dict[str, str] | None = None) -> argparse.ArgumentParser:
    common = _common(dict(os.environ) if env is None else env)
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Change the fleet while the federation runs: enrol a device, revoke it, "
        "rotate its key, or list the fleet. Every change is one record signed with the "
        "operator's key on the <namespace>.fleet Kafka topic; every regional and global "
        "aggregator applies it at once, without a restart.",
        epilog="Typical flow: on the device `fedstream-device init --keys DIR --device-id ID "
        "--region R`; it sends you DIR/enrol-ID.json; you run `fedstream-fleet enrol --request "
        "enrol-ID.json --keys OPERATOR_KEYS --kafka HOST:PORT` and send back ID.mqtt.crt.",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ep = sub.add_parser(
        "enrol", aliases=["enroll"], parents=[common],
        help="enrol a new device from its request (signs its MQTT certificate)",
        description="Check a device's enrolment request (device id, region, certificate "
        "request), sign its MQTT certificate with the region's CA and publish its key: the "
        "device may take part from the next round it is selected for.")
    ep.add_argument("--request", type=Path, required=True, metavar="FILE",
                    help="the enrol-<id>.json that `fedstream-device init` wrote on the device")
    ep.add_argument("--cert-out", type=Path, metavar="FILE",
                    help="where to write the device's certificate (default <id>.mqtt.crt "
                    "beside the request)")
    rp = sub.add_parser(
        "revoke", parents=[common], help="revoke a device for good",
        description="Revoke a device: every service refuses its messages from now on "
        "(reason `revoked`). Its id can never be enrolled again.")
    rp.add_argument("--device", required=True, metavar="ID", help="the device id to revoke")
    tp = sub.add_parser(
        "rotate", parents=[common], help="give a device a new key from a given round on",
        description="Rotate a device's keys: its new key (from `fedstream-device init --force` "
        "on the device) signs rounds >= N, the old key only the rounds before N "
        "(reason `rotated_key` otherwise). Signs the new MQTT certificate.")
    tp.add_argument("--request", type=Path, required=True, metavar="FILE",
                    help="the new enrol-<id>.json from `fedstream-device init --force`")
    tp.add_argument("--effective-round", type=_round, required=True, metavar="N",
                    help="the first round signed with the new key")
    tp.add_argument("--cert-out", type=Path, metavar="FILE",
                    help="where to write the new certificate (default <id>.mqtt.crt beside "
                    "the request)")
    lp = sub.add_parser(
        "list", parents=[common], help="show every device, its state and its key",
        description="Read the fleet topic and print every device: region, state (active / "
        "revoked), current key's fingerprint, the round it is valid from, and where it comes "
        "from (trust.json, the fleet topic).")
    lp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lp.add_argument("--all", action="store_true",
                    help="also list the services' identities (regions, global, operator)")
    return ap


def _fail(message: str, status: int = 2) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(status)


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    try:
        try:
            Topics(a.namespace)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        conn = operator_conn(a)
        if a.command in ("enrol", "enroll"):
            print(json.dumps(asyncio.run(enrol(a, conn))))
        elif a.command == "rotate":
            print(json.dumps(asyncio.run(enrol(a, conn, rotate=True))))
        elif a.command == "revoke":
            print(json.dumps(asyncio.run(revoke(a, conn))))
        else:
            rows, summary = asyncio.run(list_fleet(a, conn))
            if a.json:
                print(json.dumps({"fleet": rows, **summary}))
            else:
                print_table(rows, summary)
    except KafkaTrouble as exc:
        _fail(str(exc), 1)
    except (UsageError, PkiError) as exc:
        _fail(str(exc))
    except InvalidMessage as exc:
        _fail(exc.detail)
    except OSError as exc:  # a file the operator named cannot be read or written
        _fail(str(exc))


if __name__ == "__main__":
    main()
