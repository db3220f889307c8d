"""The locked-down stack as deployment files: docker-compose and the Kubernetes example run what
``LocalStack(secure=True)`` and ``Federation(secure=True)`` run, from the same functions.

CLI (``python -m compose.deploy``)::

    certs       --keys compose/keys --regions 3
        the brokers' server certificates and the admin's client certificate, from the CAs that
        ``fedstream-keygen`` made (tls/mqtt-broker-<region>.*, tls/kafka-broker.*, tls/admin.*)
    render      --namespace fedstream --regions 3 --out compose/generated [--keys compose/keys]
        each region broker's mosquitto.conf and acl, Kafka's server.properties, the Kafka ACL
        list (JSON) and the Kubernetes ConfigMaps holding them; no secrets, checked in
    kafka-setup --kafka kafka:9093 --keys /keys --namespace fedstream --regions 3
        as the Kafka admin: create the federation's topics and grant its ACLs (one-shot)
    k8s-secrets --keys compose/keys --out DIR [--regions 3] [--agents 12]
        one Kubernetes Secret per identity holding exactly its files (do not check these in)
    chown       --keys compose/keys [--regions 3]   (as root)
        give each private file that compose mounts to the user of the one container reading it

Which files each container gets is decided here once (:func:`workloads`): a service gets
exactly :func:`schemas.keyring.identity_files` of its identity under ``/keys`` (the layout the
services read: ``--keys /keys``), a broker its server certificate, key and CA certificate, the
one-shot ``kafka-setup`` the admin's. ``tests/unit/test_deploy_files.py`` checks
docker-compose.yml and compose/k8s/ against it, and the generated files against a fresh render.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from compose.kafka_security import federation_acls
from compose.localstack import (
    kafka_properties,
    kafka_ready,
    mosquitto_acl,
    mosquitto_conf,
    mosquitto_tls_conf,
)
from schemas.keyring import GLOBAL_ID, identity_files
from schemas.pki import KAFKA_CA, Pki, TlsFiles, ca_file_name, write_private

#: Where a service finds its key directory (``--keys`` / ``FEDSTREAM_KEYS``).
SERVICE_KEYS = Path("/keys")
#: Mosquitto's files in its container (eclipse-mosquitto:2).
MOSQUITTO_CONFIG = Path("/mosquitto/config")
MOSQUITTO_CERTS = Path("/mosquitto/certs")
MOSQUITTO_DATA = Path("/mosquitto/data")
MQTT_PORT = 8883
#: Kafka's files in its container (apache/kafka).
KAFKA_SECRETS = Path("/etc/kafka/secrets")
KAFKA_CONFIG = Path("/etc/kafka/fedstream/server.properties")
KAFKA_DATA = Path("/var/lib/kafka/data")
KAFKA_HOST = "kafka"
KAFKA_PORT = 9093  # the SSL client listener
KAFKA_CONTROLLER_PORT = 9094  # the controller listener, on the pod's loopback only
KAFKA_KEYSTORE = "tls/kafka-broker.keystore.pem"  # key then certificate: ssl.keystore.type=PEM
#: The Kubernetes namespace of the example (compose/k8s/); its Services have the compose names.
K8S_NAMESPACE = "fedstream"
#: Users the containers run as: the service image (compose/Dockerfile), apache/kafka's appuser,
#: eclipse-mosquitto's mosquitto.
UID = {"service": 10001, "kafka": 1000, "mosquitto": 1883}


def region_names(n: int) -> list[str]:
    from global_aggregator.keygen import region_name

    return [region_name(r) for r in range(n)]


def mosquitto_host(region: str) -> str:
    """The compose service / Kubernetes Service of ``region``'s broker."""
    return f"mosquitto-{region}"


def mqtt_broker_cn(region: str) -> str:
    return f"mqtt-broker-{region}"  # as LocalStack.broker_tls


def mqtt_broker_hosts(region: str) -> tuple[str, ...]:
    h = mosquitto_host(region)
    return (h, f"{h}.{K8S_NAMESPACE}.svc", f"{h}.{K8S_NAMESPACE}.svc.cluster.local",
            "localhost", "127.0.0.1")


KAFKA_HOSTS = (KAFKA_HOST, f"{KAFKA_HOST}.{K8S_NAMESPACE}.svc",
               f"{KAFKA_HOST}.{K8S_NAMESPACE}.svc.cluster.local", "localhost", "127.0.0.1")


def secret_name(rel: str) -> str:
    """The name of a key-directory file as a compose secret and a Kubernetes Secret key."""
    return rel.replace("/", "_")


def is_private(rel: str) -> bool:
    """A file only its holder may read (keys, the secret HE context)."""
    return rel.endswith((".key", ".pem", "secret.ctx"))


# ----------------------------------------------------------------------------------------------
# who mounts what


@dataclass(frozen=True)
class Workload:
    """One container: its compose service / Kubernetes workload name, the identity whose Secret
    it mounts, the user it runs as and its files (key-directory path -> container path)."""

    name: str
    identity: str
    kind: str  # global | region | agent | mosquitto | kafka | admin
    region: str
    user: str  # a key of UID
    files: dict[str, str]


def identity_mounts(name: str, role: str, region: str) -> dict[str, str]:
    """A service's files: exactly its identity's, at the layout ``--keys /keys`` expects."""
    return {rel: str(SERVICE_KEYS / rel) for rel in identity_files(name, role, region)}


def mosquitto_mounts(region: str) -> dict[str, str]:
    cn = mqtt_broker_cn(region)
    return {f"tls/{ca_file_name(region)}": str(MOSQUITTO_CERTS / ca_file_name(region)),
            f"tls/{cn}.mqtt.crt": str(MOSQUITTO_CERTS / f"{cn}.mqtt.crt"),
            f"tls/{cn}.key": str(MOSQUITTO_CERTS / f"{cn}.key")}


def kafka_mounts() -> dict[str, str]:
    ca = f"tls/{ca_file_name(KAFKA_CA)}"
    return {KAFKA_KEYSTORE: str(KAFKA_SECRETS / Path(KAFKA_KEYSTORE).name),
            ca: str(KAFKA_SECRETS / Path(ca).name)}


def admin_mounts() -> dict[str, str]:
    return {rel: str(SERVICE_KEYS / rel)
            for rel in ("tls/admin.key", "tls/admin.kafka.crt", f"tls/{ca_file_name(KAFKA_CA)}")}


def workloads(fleet: dict[str, list[str]]) -> list[Workload]:
    """Every container of the stack for ``fleet`` (region -> device ids)."""
    out = [Workload(mosquitto_host(r), mqtt_broker_cn(r), "mosquitto", r, "mosquitto",
                    mosquitto_mounts(r)) for r in fleet]
    out.append(Workload("kafka", "kafka-broker", "kafka", "", "kafka", kafka_mounts()))
    out.append(Workload("kafka-setup", "admin", "admin", "", "service", admin_mounts()))
    out.append(Workload("global-aggregator", GLOBAL_ID, "global", "", "service",
                        identity_mounts(GLOBAL_ID, "global", "")))
    for r in fleet:
        out.append(Workload(f"regional-aggregator-{r.rsplit('-', 1)[-1]}", r, "region", r,
                            "service", identity_mounts(r, "region", r)))
    for r, agents in fleet.items():
        for a in agents:
            out.append(Workload(f"edge-{a}", a, "agent", r, "service",
                                identity_mounts(a, "agent", r)))
    return out


def default_fleet(agents: int = 12, regions: int = 3) -> dict[str, list[str]]:
    from global_aggregator.keygen import fleet

    return fleet(agents, regions)


# ----------------------------------------------------------------------------------------------
# certs


def issue_certs(keys: Path, regions: Sequence[str]) -> list[Path]:
    """The brokers' server certificates and the admin's client certificate, from the
    deployment's CAs (``keys/ca``: made by fedstream-keygen; never a new CA here)."""
    keys = Path(keys)
    pki = Pki(keys / "ca", keys / "tls")
    for ca in (KAFKA_CA, *regions):
        if not (keys / "ca" / f"{ca}.key").exists():
            raise ValueError(f"no CA {ca!r} in {keys}/ca: run fedstream-keygen --out {keys} with "
                             "this many regions first")
    written: list[Path] = []
    for r in regions:
        cn = mqtt_broker_cn(r)
        f = pki.issue(r, cn, "broker", "mqtt", hosts=mqtt_broker_hosts(r))
        written += [f.key, f.cert]
    broker = pki.issue(KAFKA_CA, "kafka-broker", "broker", "kafka", hosts=KAFKA_HOSTS)
    write_private(keys / KAFKA_KEYSTORE, broker.key.read_bytes() + broker.cert.read_bytes())
    admin = pki.issue(KAFKA_CA, "admin", "admin", "kafka")
    return [*written, broker.key, broker.cert, keys / KAFKA_KEYSTORE, admin.key, admin.cert]


# ----------------------------------------------------------------------------------------------
# render


def _sub(text: str, pattern: str, new: str, what: str) -> str:
    """Replace the one line matching ``pattern``; refuse if it is not there exactly once (the
    local stack's file changed shape: update this module rather than ship a stale file)."""
    out, n = re.subn(pattern, new, text, flags=re.MULTILINE)
    if n != 1:
        raise RuntimeError(f"render: expected one {what} line in compose/localstack.py's output, "
                           f"found {n}")
    return out


def render_mosquitto_conf(region: str) -> str:
    """``region``'s broker configuration: :func:`~compose.localstack.mosquitto_conf` with
    :func:`~compose.localstack.mosquitto_tls_conf`, as the local stack writes it, with container
    paths; listening on every interface of its container, as user ``mosquitto``."""
    m = mosquitto_mounts(region)
    cn = mqtt_broker_cn(region)
    tls = TlsFiles(Path(m[f"tls/{ca_file_name(region)}"]), Path(m[f"tls/{cn}.mqtt.crt"]),
                   Path(m[f"tls/{cn}.key"]))
    secure = mosquitto_tls_conf(tls, MOSQUITTO_CONFIG / "acl")
    # save at most once a second (the demo's and the fault suite's setting, compose/README.md)
    text = mosquitto_conf(MQTT_PORT, MOSQUITTO_DATA, autosave_seconds=1, secure=secure)
    text = _sub(text, r"^# generated by compose/localstack\.py.*$",
                f"# generated by `python -m compose.deploy render` from compose/localstack.py: "
                f"{region}'s broker, do not edit", "header")
    text = _sub(text, rf"^listener {MQTT_PORT} \S+$", f"listener {MQTT_PORT}", "listener")
    return _sub(text, r"^# run as whoever started us.*\nuser \S+$",
                "# eclipse-mosquitto starts as root and drops to this user\nuser mosquitto", "user")


def render_kafka_properties() -> str:
    """Kafka's ``server.properties``: :func:`~compose.localstack.kafka_properties` in secure
    mode, as the local stack writes it, with container paths; the client listener on every
    interface, advertised as ``kafka:9093`` (the controller stays on the container's loopback)."""
    m = kafka_mounts()
    text = kafka_properties(1, KAFKA_PORT, KAFKA_CONTROLLER_PORT, KAFKA_DATA,
                            tls=(Path(m[f"tls/{ca_file_name(KAFKA_CA)}"]),
                                 Path(m[KAFKA_KEYSTORE])))
    text = _sub(text, r"^# generated by compose/localstack\.py.*$",
                "# generated by `python -m compose.deploy render` from compose/localstack.py: "
                "single-node KRaft, mutual TLS + ACLs, do not edit", "header")
    text = _sub(text, rf"^listeners=SSL://[^:]+:{KAFKA_PORT},",
                f"listeners=SSL://0.0.0.0:{KAFKA_PORT},", "listeners")
    return _sub(text, rf"^advertised\.listeners=SSL://[^:]+:{KAFKA_PORT}$",
                f"advertised.listeners=SSL://{KAFKA_HOST}:{KAFKA_PORT}", "advertised.listeners")


def render_acls(namespace: str, regions: Sequence[str]) -> str:
    return json.dumps([asdict(a) for a in federation_acls(namespace, list(regions))],
                      indent=2) + "\n"


def _yaml_block(text: str, indent: int) -> str:
    pad = " " * indent
    return "\n".join(pad + line if line else "" for line in text.splitlines())


def render_k8s_config(files: dict[str, str], regions: Sequence[str]) -> str:
    """The ConfigMaps of the Kubernetes example (one per broker) holding the rendered files."""
    docs = []
    for name, entries in [(f"{mosquitto_host(r)}-config",
                           {"mosquitto.conf": files[f"mosquitto/{r}/mosquitto.conf"],
                            "acl": files[f"mosquitto/{r}/acl"]}) for r in regions] + \
            [("kafka-config", {"server.properties": files["kafka/server.properties"]})]:
        body = "\n".join(f"  {key}: |\n{_yaml_block(value, 4)}" for key, value in entries.items())
        docs.append(f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n"
                    f"  namespace: {K8S_NAMESPACE}\ndata:\n{body}\n")
    return ("# generated by `python -m compose.deploy render`: the brokers' configuration, "
            "do not edit\n---\n" + "---\n".join(docs))


def render(namespace: str, regions: Sequence[str]) -> dict[str, str]:
    """Every generated file (path relative to the output directory -> text)."""
    files: dict[str, str] = {}
    for r in regions:
        files[f"mosquitto/{r}/mosquitto.conf"] = render_mosquitto_conf(r)
        files[f"mosquitto/{r}/acl"] = mosquitto_acl(r, [namespace])
    files["kafka/server.properties"] = render_kafka_properties()
    files["kafka-acls.json"] = render_acls(namespace, regions)
    files["k8s-config.yaml"] = render_k8s_config(files, regions)
    return files


def write_render(out: Path, namespace: str, regions: Sequence[str]) -> list[Path]:
    paths = []
    for rel, text in render(namespace, regions).items():
        p = Path(out) / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------------------------
# kafka-setup


def kafka_setup(bootstrap: str, keys: Path, namespace: str, regions: Sequence[str],
                wait_s: float = 120.0) -> None:
    """As the Kafka admin (a super user): wait for the broker, create the federation's topics
    (:func:`schemas.kafka.ensure_topics`), grant its ACLs (:func:`federation_acls`)."""
    from compose.kafka_security import apply_acls
    from schemas.kafka import KafkaConn, ensure_topics
    from schemas.keyring import kafka_tls
    from schemas.topics import Topics

    tls = kafka_tls(Path(keys), "admin")
    tls.check("admin", "admin")
    conn = KafkaConn(bootstrap, tls)
    deadline = time.monotonic() + wait_s
    while not kafka_ready(conn, timeout=5.0):
        if time.monotonic() > deadline:
            raise TimeoutError(f"Kafka at {bootstrap} did not answer the admin in {wait_s:.0f} s")
        time.sleep(2.0)
    asyncio.run(ensure_topics(conn, Topics(namespace)))
    acls = federation_acls(namespace, list(regions))
    apply_acls(conn, acls)
    print(f"kafka-setup: topics of {namespace!r} exist, {len(acls)} ACLs granted")


# ----------------------------------------------------------------------------------------------
# Kubernetes Secrets


def k8s_secret(w: Workload, keys: Path) -> str:
    """``w``'s Secret: exactly its files, keyed by :func:`secret_name`."""
    data = "\n".join(f"  {secret_name(rel)}: "
                     f"{base64.b64encode((Path(keys) / rel).read_bytes()).decode()}"
                     for rel in sorted(w.files))
    return (f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: fedstream-{w.identity}\n"
            f"  namespace: {K8S_NAMESPACE}\ntype: Opaque\ndata:\n{data}\n")


def write_k8s_secrets(keys: Path, out: Path, fleet: dict[str, list[str]]) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    paths = []
    for w in workloads(fleet):
        p = out / f"secret-{w.identity}.yaml"
        write_private(p, k8s_secret(w, keys).encode())
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------------------------
# chown


def chown_plan(fleet: dict[str, list[str]]) -> dict[str, int]:
    """Private file -> the uid of the one container that reads it. docker compose bind-mounts
    file secrets with their owner and mode on the host (``uid``/``gid``/``mode`` apply in Swarm
    only), and the keys are 0600."""
    plan: dict[str, int] = {}
    for w in workloads(fleet):
        for rel in w.files:
            if is_private(rel):
                if plan.setdefault(rel, UID[w.user]) != UID[w.user]:
                    raise RuntimeError(f"{rel} is mounted by two kinds of container")
    return plan


def chown_keys(keys: Path, fleet: dict[str, list[str]]) -> list[str]:
    done = []
    for rel, uid in sorted(chown_plan(fleet).items()):
        p = Path(keys) / rel
        os.chown(p, uid, uid)
        p.chmod(0o400)
        done.append(f"{rel} -> uid {uid}")
    return done


# ----------------------------------------------------------------------------------------------
# CLI


def _fleet_from(keys: Path | None, regions: int, agents: int) -> dict[str, list[str]]:
    """The fleet: from the key directory's trust store when there is one, else the default."""
    if keys is not None and (Path(keys) / "trust.json").exists():
        from schemas.signing import TrustStore

        trust = TrustStore.load(Path(keys) / "trust.json")
        fleet: dict[str, list[str]] = {r: [] for r in sorted(trust.names(role="region"))}
        for name in sorted(trust.names(role="agent")):
            ident = trust.get(name)
            if ident is not None:
                fleet.setdefault(ident.region, []).append(name)
        if len(fleet) != regions:
            raise ValueError(f"{keys}/trust.json has {len(fleet)} regions, not {regions}")
        return fleet
    return default_fleet(agents, regions)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compose.deploy",
                                 description=(__doc__ or "").split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("certs", help="broker and admin certificates from the deployment's CAs")
    c.add_argument("--keys", type=Path, required=True)
    c.add_argument("--regions", type=int, default=3)
    r = sub.add_parser("render", help="mosquitto.conf/acl, server.properties, ACLs, ConfigMaps")
    r.add_argument("--keys", type=Path, default=None, help="check --regions against its fleet")
    r.add_argument("--namespace", default="fedstream")
    r.add_argument("--regions", type=int, default=3)
    r.add_argument("--out", type=Path, required=True)
    k = sub.add_parser("kafka-setup", help="topics and ACLs, as the Kafka admin")
    k.add_argument("--kafka", required=True)
    k.add_argument("--keys", type=Path, required=True, help="holds the admin's TLS files")
    k.add_argument("--namespace", default="fedstream")
    k.add_argument("--regions", type=int, default=3)
    k.add_argument("--wait", type=float, default=120.0, help="seconds to wait for Kafka")
    s = sub.add_parser("k8s-secrets", help="one Kubernetes Secret per identity")
    s.add_argument("--keys", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--regions", type=int, default=3)
    s.add_argument("--agents", type=int, default=12)
    o = sub.add_parser("chown", help="(root) private files to the uid of their one container")
    o.add_argument("--keys", type=Path, required=True)
    o.add_argument("--regions", type=int, default=3)
    o.add_argument("--agents", type=int, default=12)
    o.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "certs":
            for p in issue_certs(a.keys, region_names(a.regions)):
                print(p)
        elif a.cmd == "render":
            _fleet_from(a.keys, a.regions, 0)
            for p in write_render(a.out, a.namespace, region_names(a.regions)):
                print(p)
        elif a.cmd == "kafka-setup":
            kafka_setup(a.kafka, a.keys, a.namespace, region_names(a.regions), a.wait)
        elif a.cmd == "k8s-secrets":
            for p in write_k8s_secrets(a.keys, a.out, _fleet_from(a.keys, a.regions, a.agents)):
                print(p)
        else:
            fleet = _fleet_from(a.keys, a.regions, a.agents)
            lines = ([f"{rel} -> uid {uid}" for rel, uid in sorted(chown_plan(fleet).items())]
                     if a.dry_run else chown_keys(a.keys, fleet))
            print("\n".join(lines))
    except (ValueError, OSError, TimeoutError, RuntimeError) as exc:
        print(f"python -m compose.deploy {a.cmd}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
