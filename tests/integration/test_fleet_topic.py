"""The fleet topic on the real Kafka of the local stack (plain mode): the operator's
``fedstream-fleet`` enrols, rotates and revokes a device made by ``fedstream-device init``, and a
running :class:`~schemas.fleet.FleetFollower` applies each change to its trust store without a
restart; a forged record is counted and changes nothing; a follower started afterwards replays
the topic into the very same store."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent import device_cli
from global_aggregator import fleet_cli
from schemas import fedstream_pb2 as pb
from schemas.errors import InvalidMessage
from schemas.fleet import FleetFollower, make_record, raw_public_key, seal_record
from schemas.pki import Pki, TlsFiles
from schemas.signing import (
    Identity,
    TrustStore,
    header,
    load_private_key,
    open_envelope,
    save_private_key,
    seal,
)
from schemas.topics import Topics

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]


def operator_dir(root: Path) -> Path:
    d = root / "operator"
    (d / "identities").mkdir(parents=True)
    keys = {n: Ed25519PrivateKey.generate() for n in ("operator", "region-0", "region-1")}
    for n, k in keys.items():
        save_private_key(k, d / "identities" / f"{n}.pem")
    ids = {"operator": Identity("operator", "operator", "", keys["operator"].public_key())}
    for r in ("region-0", "region-1"):
        ids[r] = Identity(r, "region", r, keys[r].public_key())
    (d / "trust.json").write_text(json.dumps(TrustStore(ids).dump()))
    Pki(d / "ca", d / "tls").ca("region-0")
    return d


def refusal(trust: TrustStore, name: str, key: Ed25519PrivateKey, round_id: int) -> str | None:
    topic = Topics("x").update("region-0", name)
    raw = seal(pb.UPDATE_CHUNK, pb.UpdateChunk(header=header(name, round_id, 0, "")), name, key,
               topic=topic)
    try:
        open_envelope(raw, pb.UPDATE_CHUNK, trust, max_bytes=1 << 20, topic=topic)
    except InvalidMessage as exc:
        return str(exc.reason)
    return None


async def until(cond, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for the follower")
        await asyncio.sleep(0.1)


def test_fleet_changes_reach_a_running_follower(stack, tmp_path, topic_prefix, capsys):
    ns = topic_prefix
    t = Topics(ns)
    opdir = operator_dir(tmp_path)
    dev_dir = tmp_path / "device"
    base = ["--keys", str(opdir), "--kafka", stack.kafka_bootstrap, "--kafka-plaintext",
            "--namespace", ns]

    async def cli(*argv: str) -> dict:
        capsys.readouterr()
        await asyncio.to_thread(fleet_cli.main, [*argv, *base])
        return json.loads(capsys.readouterr().out)

    async def scenario() -> None:
        # Prepare: a service's trust store, following a topic that does not exist yet
        trust = TrustStore.load(opdir / "trust.json")
        follower = FleetFollower(stack.kafka_bootstrap, t, trust, retry_s=0.3)
        follower.start()
        await asyncio.wait_for(follower.caught_up(), 20)
        req = device_cli.init_device(dev_dir, "dev-a", "region-0")
        old = load_private_key(dev_dir / "identities" / "dev-a.pem")
        assert refusal(trust, "dev-a", old, 0) == "unknown_signer"

        # enrol: the running follower learns the device; its certificate is the region's
        out = await cli("enrol", "--request", str(req))
        assert out["published"] and out["action"] == "enrol"
        await until(lambda: "dev-a" in trust)
        assert refusal(trust, "dev-a", old, 0) is None
        assert trust.names(role="agent", region="region-0") == ["dev-a"]
        cert = Path(out["certificate"])
        TlsFiles(opdir / "tls" / "ca-region-0.crt", cert,
                 dev_dir / "tls" / "dev-a.key").check("dev-a", "agent")
        # enrolling again publishes nothing (and re-issues the certificate)
        assert not (await cli("enrol", "--request", str(req)))["published"]

        # rotate from round 3: the old key signs rounds < 3 only, the new key rounds >= 3
        device_cli.init_device(dev_dir, "dev-a", "region-0", force=True)
        new = load_private_key(dev_dir / "identities" / "dev-a.pem")
        out = await cli("rotate", "--request", str(req), "--effective-round", "3")
        assert out["published"] and out["effective_round"] == 3
        await until(lambda: trust.get("dev-a").public_key == new.public_key())
        assert refusal(trust, "dev-a", old, 2) is None
        assert refusal(trust, "dev-a", old, 3) == "rotated_key"
        assert refusal(trust, "dev-a", new, 2) == "rotated_key"
        assert refusal(trust, "dev-a", new, 3) is None

        # a forged record (a region's key) on the topic: counted, nothing changes
        region = load_private_key(opdir / "identities" / "region-0.pem")
        forged = make_record("revoke", "dev-a", signer="region-0")
        producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(t.fleet, seal_record(forged, "region-0", region,
                                                              topic=t.fleet), key=b"dev-a")
            # and a genuine operator record filed under another identity's key
            op = load_private_key(opdir / "identities" / "operator.pem")
            misfiled = make_record("enrol", "dev-m", signer="operator", region="region-0",
                                   public_key=raw_public_key(Ed25519PrivateKey.generate()))
            await producer.send_and_wait(t.fleet, seal_record(misfiled, "operator", op,
                                                              topic=t.fleet), key=b"dev-a")
        finally:
            await producer.stop()
        await until(lambda: follower.refused >= 2)
        assert "dev-a" in trust and "dev-m" not in trust

        # revoke: refused at once, with its reason
        assert (await cli("revoke", "--device", "dev-a"))["published"]
        await until(lambda: "dev-a" not in trust)
        assert refusal(trust, "dev-a", new, 5) == "revoked"
        assert trust.names(role="agent") == []

        # list: what the operator sees
        listing = await cli("list", "--json")
        row = {r["identity"]: r for r in listing["fleet"]}["dev-a"]
        assert row["state"] == "revoked" and row["keys"] == 2 and row["effective_round"] == 3
        assert sorted(r["result"] for r in listing["refused"]) == ["bad_record", "unauthorized"]

        # a follower started now replays the topic into the same store
        fresh = TrustStore.load(opdir / "trust.json")
        late = FleetFollower(stack.kafka_bootstrap, t, fresh)
        late.start()
        await asyncio.wait_for(late.caught_up(), 20)
        assert fresh.dump() == trust.dump()
        assert (late.applied, late.refused) == (3, 2)
        await late.stop()
        await follower.stop()

    started = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - started < 30
