"""``fedstream-quarantine``: see and lift the quarantine of devices that kept failing the bounds.

The quarantine lives in every model version (``ModelVersion.quarantine``), so ``list`` reads the
newest verified version; ``lift`` appends one operator-signed ``Control`` command to the
``<ns>.control`` Kafka topic, which the global aggregator consumes in the same transaction as the
round's partials and applies to the next version (exactly once, also across restarts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from aiokafka import AIOKafkaProducer

from schemas import fedstream_pb2 as pb
from schemas.kafka import (
    CLIENT_SIZES,
    KafkaConn,
    add_kafka_args,
    as_conn,
    ensure_topics,
    kafka_conn_from_args,
    read_latest_model,
)
from schemas.keyring import OPERATOR_ID
from schemas.signing import TrustStore, header, load_private_key, seal
from schemas.topics import Topics


async def quarantine_state(kafka: str | KafkaConn, trust: TrustStore, namespace: str) -> dict:
    t = Topics(namespace)
    mv, _ = await read_latest_model(kafka, t.models, trust, "")
    if mv is None:
        return {"version": None, "quarantined": [], "strikes": {}}
    return {"version": mv.header.model_version, "quarantined": list(mv.quarantine.agents),
            "strikes": dict(mv.quarantine.strikes)}


async def send_control(kafka: str | KafkaConn, keys_dir: Path, namespace: str,
                       cmd: pb.Control, identity: str = OPERATOR_ID) -> None:
    """Sign ``cmd`` as ``identity`` (its key in ``keys_dir``) and append it to the control
    topic (an operator's command to the global aggregator: a lift, a rollback)."""
    t = Topics(namespace)
    key = load_private_key(Path(keys_dir) / "identities" / f"{identity}.pem")
    await ensure_topics(kafka, t)
    producer = AIOKafkaProducer(**as_conn(kafka).kwargs(), enable_idempotence=True, acks="all",
                                **CLIENT_SIZES)
    await producer.start()
    try:
        await producer.send_and_wait(t.control, seal(pb.CONTROL, cmd, identity, key,
                                                     topic=t.control))
    finally:
        await producer.stop()


async def lift(kafka: str | KafkaConn, keys_dir: Path, namespace: str, agents: list[str],
               identity: str = OPERATOR_ID) -> None:
    """Append one signed ``lift`` command for ``agents`` to the control topic."""
    cmd = pb.Control(header=header(identity, 0, 0, ""), action="lift", agents=agents)
    await send_control(kafka, keys_dir, namespace, cmd, identity)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="fedstream-quarantine",
        description="List quarantined devices (from the newest model version) or lift their "
        "quarantine with an operator-signed command to the global aggregator.",
    )
    add_kafka_args(ap)
    ap.add_argument("--keys", type=Path, required=True,
                    help="key directory (trust.json; for lift also identities/operator.pem)")
    ap.add_argument("--namespace", default="fedstream", help="topic namespace")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the quarantined agents and their strikes as JSON")
    lp = sub.add_parser("lift", help="release agents from quarantine (applied next round)")
    lp.add_argument("agents", nargs="+", help="agent ids")
    a = ap.parse_args(argv)
    trust_file = a.keys / "trust.json"
    if not trust_file.exists():
        ap.error(f"no trust.json in {a.keys}")
    trust = TrustStore.load(trust_file)
    try:
        conn = kafka_conn_from_args(a, a.keys, OPERATOR_ID, "operator")
    except ValueError as exc:
        ap.error(str(exc))
    if a.command == "list":
        print(json.dumps(asyncio.run(quarantine_state(conn, trust, a.namespace))))
        return
    unknown = [x for x in a.agents if x not in trust.names(role="agent")]
    if unknown:
        ap.error(f"not agents of this federation: {unknown}")
    asyncio.run(lift(conn, a.keys, a.namespace, a.agents))
    print(json.dumps({"lifted": a.agents}))


if __name__ == "__main__":
    main()
