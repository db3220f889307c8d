"""The fleet's lifecycle without a broker: the trust store's history (enrol, revoke, rotate),
the fleet records' signature and shape checks, the device's ``init`` and the operator's request
checks (schemas/fleet.py, edge_agent/device_cli.py, global_aggregator/fleet_cli.py)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import REGISTRY

from edge_agent import device_cli
from global_aggregator import fleet_cli
from schemas import fedstream_pb2 as pb
from schemas.errors import InvalidMessage
from schemas.fleet import (
    ENROL,
    REVOKE,
    ROTATE,
    FleetFollower,
    apply_record,
    make_record,
    open_record,
    raw_public_key,
    seal_record,
)
from schemas.pki import Pki, make_csr, new_key
from schemas.signing import (
    AgentScope,
    Identity,
    TrustStore,
    header,
    open_envelope,
    save_private_key,
    seal,
)
from schemas.topics import Topics

T = Topics("unit")
UPDATE_TOPIC = T.update("region-0", "dev-a")


def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def world():
    """A federation's trust store: global, operator, two regions, one agent from keygen."""
    keys = {n: key() for n in ("global", "operator", "region-0", "region-1", "agent-000")}
    roles = {"global": ("global", ""), "operator": ("operator", ""),
             "region-0": ("region", "region-0"), "region-1": ("region", "region-1"),
             "agent-000": ("agent", "region-0")}
    trust = TrustStore({n: Identity(n, *roles[n], keys[n].public_key()) for n in keys})
    return trust, keys


def update(name: str, k: Ed25519PrivateKey, round_id: int, topic: str = UPDATE_TOPIC) -> bytes:
    body = pb.UpdateChunk(header=header(name, round_id, 1, "fp"), agent_id=name,
                          region="region-0")
    return seal(pb.UPDATE_CHUNK, body, name, k, topic=topic)


def verify(trust: TrustStore, name: str, k: Ed25519PrivateKey, round_id: int):
    return open_envelope(update(name, k, round_id), pb.UPDATE_CHUNK, trust, max_bytes=1 << 20,
                         topic=UPDATE_TOPIC)


def reason(fn, *args, **kw) -> str:
    with pytest.raises(InvalidMessage) as e:
        fn(*args, **kw)
    return str(e.value.reason)


def record(action: str, name: str, k: Ed25519PrivateKey | None = None, **kw) -> pb.FleetRecord:
    return make_record(action, name, signer="operator",
                       public_key=raw_public_key(k) if k is not None else b"", **kw)


# -- the trust store -----------------------------------------------------------------------------


def test_enrol_adds_an_agent_that_then_verifies(world):
    # Prepare
    trust, _ = world
    dev = key()
    assert reason(verify, trust, "dev-a", dev, 0) == "unknown_signer"
    # Execute
    assert apply_record(trust, record(ENROL, "dev-a", dev, region="region-0")) is True
    # Assert
    assert verify(trust, "dev-a", dev, 0).signer.name == "dev-a"
    assert verify(trust, "dev-a", dev, 10**6).signer.public_key == dev.public_key()
    assert "dev-a" in trust and trust.get("dev-a").region == "region-0"
    assert trust.names(role="agent", region="region-0") == ["agent-000", "dev-a"]
    # the same record again (a replay, a restarted follower) changes nothing
    gen = trust.generation
    assert apply_record(trust, record(ENROL, "dev-a", dev, region="region-0")) is False
    assert trust.generation == gen


def test_enrol_refuses_taken_names_unknown_regions_and_shared_keys(world):
    trust, keys = world
    dev = key()
    apply_record(trust, record(ENROL, "dev-a", dev, region="region-0"))
    before = trust.dump()

    def refused(rec):
        return reason(apply_record, trust, rec)

    # another key for an enrolled name: that is a rotation
    assert refused(record(ENROL, "dev-a", key(), region="region-0")) == "bad_record"
    # another region for an enrolled name
    assert refused(record(ENROL, "dev-a", dev, region="region-1")) == "bad_record"
    # names of service identities
    for name in ("region-0", "global", "operator"):
        assert refused(record(ENROL, name, key(), region="region-0")) == "bad_record"
    # a region that does not exist (or is not a region)
    assert refused(record(ENROL, "dev-b", key(), region="region-9")) == "bad_record"
    assert refused(record(ENROL, "dev-b", key(), region="agent-000")) == "bad_record"
    # a key that is already another identity's
    assert refused(record(ENROL, "dev-b", keys["agent-000"], region="region-0")) == "bad_record"
    assert trust.dump() == before


def test_revoke_is_immediate_and_for_good(world):
    # Prepare
    trust, keys = world
    assert verify(trust, "agent-000", keys["agent-000"], 3)
    # Execute
    assert apply_record(trust, record(REVOKE, "agent-000", region="region-0")) is True
    # Assert: refused with its reason, gone from every listing, never back
    assert reason(verify, trust, "agent-000", keys["agent-000"], 3) == "revoked"
    assert reason(verify, trust, "agent-000", keys["agent-000"], 0) == "revoked"
    assert "agent-000" not in trust and trust.get("agent-000") is None
    assert trust.names(role="agent") == [] and trust.state("agent-000").revoked
    assert apply_record(trust, record(REVOKE, "agent-000")) is False
    assert reason(apply_record, trust, record(ENROL, "agent-000", keys["agent-000"],
                                              region="region-0")) == "bad_record"
    assert reason(apply_record, trust, record(ROTATE, "agent-000", key(), region="region-0",
                                              effective_round=9)) == "bad_record"
    # a name never seen can be banned; service identities cannot be revoked live
    assert apply_record(trust, record(REVOKE, "dev-z")) is True
    assert reason(apply_record, trust, record(ENROL, "dev-z", key(),
                                              region="region-0")) == "bad_record"
    assert reason(apply_record, trust, record(REVOKE, "region-0")) == "bad_record"
    assert trust.get("region-0") is not None


def test_rotate_splits_the_rounds_between_the_old_and_the_new_key(world):
    # Prepare
    trust, keys = world
    old, new, n = keys["agent-000"], key(), 5
    # Execute
    assert apply_record(trust, record(ROTATE, "agent-000", new, region="region-0",
                                      effective_round=n,
                                      previous_key=raw_public_key(old))) is True
    # Assert: the old key for rounds < N only, the new key from N on only
    assert verify(trust, "agent-000", old, n - 1)
    assert verify(trust, "agent-000", old, 0)
    assert reason(verify, trust, "agent-000", old, n) == "rotated_key"
    assert reason(verify, trust, "agent-000", old, n + 100) == "rotated_key"
    assert reason(verify, trust, "agent-000", new, n - 1) == "rotated_key"
    assert verify(trust, "agent-000", new, n) and verify(trust, "agent-000", new, n + 100)
    assert trust.get("agent-000").public_key == new.public_key()  # the current key
    assert trust.names(role="agent") == ["agent-000"]
    # a key nobody has is still a bad signature
    assert reason(verify, trust, "agent-000", key(), n) == "bad_signature"
    # the same rotation again changes nothing; a stale one (replacing the old key) is refused
    assert apply_record(trust, record(ROTATE, "agent-000", new, region="region-0",
                                      effective_round=n)) is False
    assert reason(apply_record, trust, record(
        ROTATE, "agent-000", key(), region="region-0", effective_round=8,
        previous_key=raw_public_key(old))) == "bad_record"
    # back to a key it had, or to a round before the current key's own: refused
    assert reason(apply_record, trust, record(ROTATE, "agent-000", old, region="region-0",
                                              effective_round=9)) == "bad_record"
    assert reason(apply_record, trust, record(ROTATE, "agent-000", key(), region="region-0",
                                              effective_round=n - 1)) == "bad_record"
    # a second rotation: three keys, three disjoint ranges of rounds
    third = key()
    apply_record(trust, record(ROTATE, "agent-000", third, region="region-0", effective_round=9))
    assert verify(trust, "agent-000", old, 4) and verify(trust, "agent-000", new, 8)
    assert verify(trust, "agent-000", third, 9)
    assert reason(verify, trust, "agent-000", new, 9) == "rotated_key"


def test_a_rotate_record_alone_stands_for_the_compacted_enrol(world):
    trust, _ = world
    old, new = key(), key()
    rec = record(ROTATE, "dev-c", new, region="region-1", effective_round=4,
                 previous_key=raw_public_key(old))
    # without the key it replaces, a rotation of an unknown name means nothing
    assert reason(apply_record, trust, record(ROTATE, "dev-c", new, region="region-1",
                                              effective_round=4)) == "bad_record"
    assert apply_record(trust, rec) is True
    assert verify(trust, "dev-c", old, 3) and verify(trust, "dev-c", new, 4)
    assert reason(verify, trust, "dev-c", old, 4) == "rotated_key"


def test_trust_json_keeps_history_and_revocations(world, tmp_path):
    # Prepare: a plain store dumps exactly the format keygen always wrote
    trust, keys = world
    plain = trust.dump()["identities"]["agent-000"]
    assert set(plain) == {"role", "region", "public_key"}
    new = key()
    apply_record(trust, record(ROTATE, "agent-000", new, region="region-0", effective_round=3))
    dev = key()
    apply_record(trust, record(ENROL, "dev-a", dev, region="region-1"))
    apply_record(trust, record(REVOKE, "dev-a"))
    # Execute
    f = tmp_path / "trust.json"
    f.write_text(json.dumps(trust.dump()))
    back = TrustStore.load(f)
    # Assert
    assert back.dump() == trust.dump()
    assert verify(back, "agent-000", keys["agent-000"], 2) and verify(back, "agent-000", new, 3)
    assert reason(verify, back, "dev-a", dev, 0) == "revoked"


# -- fleet records -------------------------------------------------------------------------------


def test_only_the_operators_records_for_this_topic_count(world):
    # Prepare
    trust, keys = world
    dev = key()
    rec = record(ENROL, "dev-a", dev, region="region-0")
    good = seal_record(rec, "operator", keys["operator"], topic=T.fleet)
    # Execute / Assert
    assert open_record(good, trust, T.fleet) == rec
    for signer in ("agent-000", "region-0", "global"):
        forged = pb.FleetRecord()
        forged.CopyFrom(rec)
        forged.header.sender = signer
        raw = seal_record(forged, signer, keys[signer], topic=T.fleet)
        assert reason(open_record, raw, trust, T.fleet) == "unauthorized"
    # a record of another federation, or a control command's signature replayed as a record
    assert reason(open_record, good, trust, Topics("other").fleet) == "bad_signature"
    assert reason(open_record, good, trust, T.control) == "bad_signature"
    ctl = seal(pb.CONTROL, pb.Control(header=header("operator", 0, 0, ""), action="lift",
                                      agents=["x"]), "operator", keys["operator"], topic=T.fleet)
    assert reason(open_record, ctl, trust, T.fleet) == "wrong_kind"
    # truncated, empty, not bytes
    for cut in (1, 10, len(good) // 2, len(good) - 1):
        assert reason(open_record, good[:cut], trust, T.fleet) in {
            "malformed", "bad_signature", "unsigned", "wrong_version", "unknown_signer"}
    assert reason(open_record, b"", trust, T.fleet) == "wrong_version"
    assert reason(open_record, None, trust, T.fleet) == "malformed"


@pytest.mark.parametrize(("field", "value"), [
    ("action", "delete"), ("action", ""), ("role", "region"), ("role", "global"),
    ("identity", "bad/id"), ("identity", ""), ("region", ""), ("public_key", b"\x01" * 31),
    ("public_key", b""),
])
def test_malformed_records_are_refused_even_when_signed(world, field, value):
    trust, keys = world
    rec = pb.FleetRecord(header=header("operator", 0, 0, ""), action=ENROL, identity="dev-a",
                         role="agent", region="region-0", public_key=raw_public_key(key()))
    setattr(rec, field, value)
    raw = seal_record(rec, "operator", keys["operator"], topic=T.fleet)
    assert reason(open_record, raw, trust, T.fleet) == "bad_record"
    assert reason(make_record, rec.action, rec.identity, signer="operator", role=rec.role,
                  region=rec.region, public_key=rec.public_key) == "bad_record"


def _count(result: str) -> float:
    return REGISTRY.get_sample_value("fedstream_fleet_records_total", {"result": result}) or 0.0


def test_the_follower_applies_valid_records_and_counts_the_others(world):
    # Prepare: the follower's record handling, without Kafka
    trust, keys = world
    f = FleetFollower("127.0.0.1:1", T, trust)
    dev = key()
    good = seal_record(record(ENROL, "dev-a", dev, region="region-0"), "operator",
                       keys["operator"], topic=T.fleet)
    changes = []
    f.on_change = changes.append
    before = {r: _count(r) for r in ("applied", "unchanged", "bad_record", "malformed",
                                     "unauthorized")}
    thief = seal_record(make_record(ENROL, "dev-t", signer="agent-000", region="region-0",
                                    public_key=raw_public_key(key())),
                        "agent-000", keys["agent-000"], topic=T.fleet)
    # Execute / Assert
    assert f.handle(0, b"dev-a", good) == "applied"
    assert f.handle(1, b"dev-a", good) == "unchanged"
    assert f.handle(2, b"someone-else", good) == "bad_record"  # filed under another key
    assert f.handle(3, b"dev-a", None) == "malformed"  # a tombstone
    assert f.handle(4, b"dev-t", thief) == "unauthorized"
    assert f.handle(5, b"x", b"\xff" * 40) == "malformed"
    assert (f.applied, f.unchanged, f.refused) == (1, 1, 4)
    assert [c.identity for c in changes] == ["dev-a"]
    assert "dev-t" not in trust and verify(trust, "dev-a", dev, 0)
    assert _count("applied") == before["applied"] + 1
    assert _count("bad_record") == before["bad_record"] + 1
    assert _count("malformed") == before["malformed"] + 2
    assert _count("unauthorized") == before["unauthorized"] + 1


# -- the device's init ---------------------------------------------------------------------------


def test_device_init_writes_private_keys_0600_and_only_public_material(tmp_path, capsys):
    # Execute
    device_cli.main(["init", "--keys", str(tmp_path), "--device-id", "SN-0042",
                     "--region", "region-0"])
    # Assert
    ident = tmp_path / "identities" / "SN-0042.pem"
    tls = tmp_path / "tls" / "SN-0042.key"
    for p in (ident, tls):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    req_file = tmp_path / "enrol-SN-0042.json"
    text = req_file.read_text()
    req = json.loads(text)
    assert set(req) == {"format", "device_id", "region", "public_key", "key_fingerprint", "csr"}
    assert "PRIVATE" not in text
    signing = serialization.load_pem_private_key(ident.read_bytes(), None)
    tls_key = serialization.load_pem_private_key(tls.read_bytes(), None)
    priv_raw = signing.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
    assert priv_raw.hex() not in text and ident.read_text() not in text
    assert tls.read_text() not in text
    assert str(tls_key.private_numbers().private_value) not in text
    assert format(tls_key.private_numbers().private_value, "x") not in text
    assert req["public_key"] == raw_public_key(signing).hex()
    csr = x509.load_pem_x509_csr(req["csr"].encode())
    assert csr.is_signature_valid and csr.public_key() == tls_key.public_key()
    assert "enrol-SN-0042.json" in capsys.readouterr().out
    # a second init refuses to overwrite; --force rotates and keeps the old keys aside
    with pytest.raises(SystemExit) as e:
        device_cli.main(["init", "--keys", str(tmp_path), "--device-id", "SN-0042",
                         "--region", "region-0"])
    assert e.value.code == 2 and "--force" in capsys.readouterr().err
    old = ident.read_bytes()
    device_cli.main(["init", "--keys", str(tmp_path), "--device-id", "SN-0042",
                     "--region", "region-0", "--force"])
    assert ident.read_bytes() != old
    prev = ident.with_name("SN-0042.pem.prev")
    assert prev.read_bytes() == old and stat.S_IMODE(prev.stat().st_mode) == 0o600
    assert json.loads(req_file.read_text())["public_key"] != req["public_key"]


@pytest.mark.parametrize("args", [["--device-id", "bad/id", "--region", "region-0"],
                                  ["--device-id", "ok", "--region", "r e g"]])
def test_device_init_refuses_bad_names(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as e:
        device_cli.main(["init", "--keys", str(tmp_path), *args])
    assert e.value.code == 2 and "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "identities").exists()


# -- the operator's checks (all before Kafka is contacted) ---------------------------------------


@pytest.fixture
def operator_dir(tmp_path):
    """An operator's key directory: trust.json (operator, region-0), the operator's signing key
    and region-0's CA."""
    d = tmp_path / "operator"
    (d / "identities").mkdir(parents=True)
    op, reg = key(), key()
    save_private_key(op, d / "identities" / "operator.pem")
    trust = TrustStore({"operator": Identity("operator", "operator", "", op.public_key()),
                        "region-0": Identity("region-0", "region", "region-0",
                                             reg.public_key())})
    (d / "trust.json").write_text(json.dumps(trust.dump()))
    Pki(d / "ca", d / "tls").ca("region-0")
    return d


def enrol_cli(operator_dir: Path, request: Path, *extra: str) -> list[str]:
    # an address where nothing listens: every check below happens before Kafka is contacted
    return ["enrol", "--request", str(request), "--keys", str(operator_dir),
            "--kafka", "127.0.0.1:9", "--kafka-plaintext", "--timeout", "2", *extra]


def fails(capsys, argv, status: int = 2) -> str:
    with pytest.raises(SystemExit) as e:
        fleet_cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == status, err
    assert "Traceback" not in err and err.startswith("fedstream-fleet: error: ")
    assert len(err.strip().splitlines()) == 1
    return err


def _request(tmp_path: Path, device: str = "dev-a", region: str = "region-0", **change) -> Path:
    d = tmp_path / f"device-{device}-{len(list(tmp_path.iterdir()))}"
    req = device_cli.init_device(d, device, region)
    raw = json.loads(req.read_text())
    raw.update(change)
    req.write_text(json.dumps(raw))
    return req


def _swap_csr_key(csr_pem: str) -> str:
    """The CSR with another key of the same size spliced in: it carries key B, signed by A."""
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    other = make_csr("dev-a", "agent", new_key())
    spki = csr.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    spki_b = other.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    der = csr.public_bytes(serialization.Encoding.DER)
    assert der.count(spki) == 1 and len(spki) == len(spki_b)
    spliced = x509.load_der_x509_csr(der.replace(spki, spki_b))
    assert not spliced.is_signature_valid
    return spliced.public_bytes(serialization.Encoding.PEM).decode()


def test_enrol_refuses_requests_it_must_not_sign(tmp_path, operator_dir, capsys):
    # a certificate request for another name
    other_csr = make_csr("dev-b", "agent", new_key()).public_bytes(
        serialization.Encoding.PEM).decode()
    err = fails(capsys, enrol_cli(operator_dir, _request(tmp_path, csr=other_csr)))
    assert "'dev-b'" in err
    # for the right name in another role (a server, a region)
    region_csr = make_csr("dev-a", "region", new_key()).public_bytes(
        serialization.Encoding.PEM).decode()
    assert "'region'" in fails(capsys, enrol_cli(operator_dir,
                                                 _request(tmp_path, csr=region_csr)))
    # signed by a different key than the one it carries
    req = _request(tmp_path)
    raw = json.loads(req.read_text())
    raw["csr"] = _swap_csr_key(raw["csr"])
    req.write_text(json.dumps(raw))
    assert "signature" in fails(capsys, enrol_cli(operator_dir, req))
    # a region that does not exist
    err = fails(capsys, enrol_cli(operator_dir, _request(tmp_path, region="region-7")))
    assert "region-7" in err and "region-0" in err
    # a name of a service identity, a bad id, a broken key, private material, not a request
    assert "service identity" in fails(capsys, enrol_cli(operator_dir,
                                                         _request(tmp_path, "operator")))
    assert "device id" in fails(capsys, enrol_cli(operator_dir,
                                                  _request(tmp_path, device_id="a/b")))
    assert "public_key" in fails(capsys, enrol_cli(operator_dir,
                                                   _request(tmp_path, public_key="abcd")))
    leaked = _request(tmp_path, extra="-----BEGIN PRIVATE KEY-----")
    assert "compromised" in fails(capsys, enrol_cli(operator_dir, leaked))
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    assert "JSON" in fails(capsys, enrol_cli(operator_dir, junk))
    assert "does not exist" in fails(capsys, enrol_cli(operator_dir, tmp_path / "none.json"))
    # nothing was signed
    assert not list(tmp_path.rglob("*.mqtt.crt"))


def test_operator_cli_usage_errors_are_one_line(tmp_path, operator_dir, capsys):
    base = ["--keys", str(operator_dir), "--kafka", "127.0.0.1:9", "--kafka-plaintext"]
    assert "must match" in fails(capsys, ["revoke", "--device", "a/b", *base])
    fails(capsys, ["list", "--keys", str(tmp_path / "nowhere"), "--kafka", "127.0.0.1:9"])
    fails(capsys, ["list", *base, "--namespace", "bad/ns"])
    fails(capsys, ["list", *base, "--kafka-ca-file", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        fleet_cli.main(["rotate", "--request", "x.json", "--effective-round", "-1", *base])
    assert e.value.code == 2 and "round number" in capsys.readouterr().err
    # Kafka out of reach: status 1, one line
    fails(capsys, ["list", *base, "--timeout", "2"], status=1)


def test_operator_cli_help_speaks_to_an_operator(capsys):
    for argv, words in ((["--help"], ["enrol", "revoke", "rotate", "list", "fedstream-device"]),
                        (["enrol", "--help"], ["--request", "--cert-out", "--kafka", "--keys",
                                               "--namespace", "--kafka-ca-file"]),
                        (["rotate", "--help"], ["--effective-round", "--force"]),
                        (["revoke", "--help"], ["--device", "revoked"])):
        with pytest.raises(SystemExit) as e:
            fleet_cli.main(argv)
        out = capsys.readouterr().out
        assert e.value.code == 0
        assert all(w in out for w in words), (argv, out)


# -- scoped trust stores: a region keeps only its own devices --------------------------------


def _fleet_file(tmp_path: Path, world) -> tuple[Path, dict[str, Ed25519PrivateKey]]:
    trust, keys = world
    for r in ("region-0", "region-1"):
        for i in range(3):
            name = f"{r}-dev-{i}"
            keys[name] = key()
            assert trust.enrol(name, r, keys[name].public_key())
    path = tmp_path / "trust.json"
    path.write_text(json.dumps(trust.dump()))
    return path, keys


def test_a_region_scoped_store_keeps_its_devices_and_every_service(tmp_path, world):
    path, keys = _fleet_file(tmp_path, world)
    full = TrustStore.load(path)
    scoped = TrustStore.load(path, scope=AgentScope.of_region("region-0"))
    assert full.names(role="agent", region="region-0") == \
        scoped.names(role="agent") == ["agent-000"] + [f"region-0-dev-{i}" for i in range(3)]
    for service in ("global", "operator", "region-0", "region-1"):
        assert scoped.get(service) == full.get(service)
    assert len(full) - len(scoped) == 3
    # a device of another region is unknown here: refused before any other check
    name = "region-1-dev-0"
    assert full.get(name) is not None and scoped.get(name) is None
    topic = T.update("region-0", name)
    raw = update(name, keys[name], 1, topic)
    open_envelope(raw, pb.UPDATE_CHUNK, full, max_bytes=1 << 20, topic=topic)
    assert reason(open_envelope, raw, pb.UPDATE_CHUNK, scoped, max_bytes=1 << 20,
                  topic=topic) == "unknown_signer"
    device = TrustStore.load(path, scope=AgentScope.only("region-1-dev-2"))
    assert device.names(role="agent") == ["region-1-dev-2"]
    assert device.names(role="region") == ["region-0", "region-1"]
    with pytest.raises(ValueError, match="scoped"):
        scoped.dump()


def test_fleet_records_of_another_region_leave_a_scoped_store_alone(world):
    trust, keys = world
    scoped = TrustStore({}, scope=AgentScope.of_region("region-0"))
    for st in trust.states():
        ident = st.identity
        assert ident is not None
        scoped = TrustStore({**{s.name: s.identity for s in scoped.states()},
                             st.name: ident}, scope=scoped.scope)
    dev_b, dev_c = key(), key()
    other = make_record(ENROL, "dev-b", signer="operator", region="region-1",
                        public_key=raw_public_key(dev_b))
    mine = make_record(ENROL, "dev-c", signer="operator", region="region-0",
                       public_key=raw_public_key(dev_c))
    assert apply_record(trust, other) and apply_record(trust, mine)
    assert not apply_record(scoped, other)  # "unchanged": not this region's device
    assert apply_record(scoped, mine)
    assert "dev-b" not in scoped and "dev-c" in scoped and "dev-b" in trust
    # a revocation without a region reaches every store
    bare = make_record(REVOKE, "dev-c", signer="operator")
    assert apply_record(scoped, bare) and "dev-c" not in scoped


@pytest.mark.parametrize("entry,match", [
    ({"role": "agent", "region": "region-0", "public_key": "zz"}, "bad key"),
    ({"role": "agent", "region": "region-0", "public_key": "00" * 31}, "bad key"),
    ({"role": "agent", "region": "region-0"}, "bad key"),
    ({"region": "region-0", "public_key": "00" * 32}, "no role"),
    ({"role": "agent", "region": "region-0", "public_key": "00" * 32,
      "keys": [{"public_key": "00" * 32, "from": "soon"}]}, "bad key"),
    ("agent", "not an object"),
])
def test_a_bad_trust_file_says_which_identity(tmp_path, entry, match):
    path = tmp_path / "trust.json"
    path.write_text(json.dumps({"identities": {"dev-x": entry}}))
    with pytest.raises(ValueError, match=match):
        TrustStore.load(path)
    path.write_text('{"identities": {"dev-x": {"role": ')
    with pytest.raises(ValueError, match="not a trust store"):
        TrustStore.load(path)
