"""docker-compose.yml, the Kubernetes example (compose/k8s/) and the generated broker files
(compose/generated/) follow the locked-down local stack: the same broker settings as
``LocalStack(secure=True)``, the same ACLs, the same TLS flags as ``Federation(secure=True)``, and
every container holds exactly its own identity's files. No broker, no Docker: the files are parsed
and compared with what compose/localstack.py, compose/kafka_security.py and schemas/keyring.py
say today, so an edit on either side fails here with what to fix."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from compose.deploy import (
    K8S_NAMESPACE,
    KAFKA_CONFIG,
    KAFKA_HOST,
    KAFKA_PORT,
    MOSQUITTO_CONFIG,
    MQTT_PORT,
    default_fleet,
    is_private,
    issue_certs,
    mosquitto_host,
    render,
    secret_name,
    workloads,
    write_k8s_secrets,
)
from compose.federation import Federation
from compose.kafka_security import federation_acls
from compose.localstack import kafka_properties, mosquitto_conf, mosquitto_tls_conf
from schemas.keyring import identity_files
from schemas.pki import TlsFiles
from schemas.topics import Topics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
GENERATED = COMPOSE / "generated"
NS = "fedstream"
FLEET = default_fleet(12, 3)
REGIONS = list(FLEET)
WORKLOADS = {w.name: w for w in workloads(FLEET)}
ROLES = {"global": "global", "region": "region", "agent": "agent"}
RENDER = (f"python -m compose.deploy render --namespace {NS} --regions {len(REGIONS)} "
          "--out compose/generated")
#: compose/monitoring/ (tests/unit/test_alert_rules.py checks the files themselves)
MONITORING_SERVICES = {"prometheus", "alertmanager", "grafana"}


# ----------------------------------------------------------------------------------------------
# reading the files


def _resolve(value: object) -> str:
    """A compose value as the container sees it: ``${VAR:-default}`` -> default, ``$$`` -> ``$``."""
    text = str(value)
    text = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)
    return text.replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def k8s() -> list[dict]:
    docs = []
    for path in sorted((COMPOSE / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _config_maps() -> list[dict]:
    """The brokers' ConfigMaps, rendered into compose/generated/k8s-config.yaml."""
    return [d for d in yaml.safe_load_all((GENERATED / "k8s-config.yaml").read_text()) if d]


def _pod_specs(docs: list[dict]) -> dict[str, dict]:
    """Workload name -> its pod spec (Deployments, StatefulSets, Jobs)."""
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs
            if d["kind"] in ("Deployment", "StatefulSet", "Job")}


def _compose_files(compose: dict, name: str) -> set[tuple[str, str]]:
    """(key-directory path, container path) of every secret the compose service mounts."""
    top = compose["secrets"]
    out = set()
    for s in compose["services"][name].get("secrets", []):
        assert isinstance(s, dict) and "target" in s, \
            f"{name}: secret {s!r} needs the long syntax with an absolute target"
        src = top[s["source"]]["file"]
        assert src.startswith("./keys/"), f"secret {s['source']} is not from compose/keys: {src}"
        out.add((src.removeprefix("./keys/"), s["target"]))
    return out


def _k8s_files(spec: dict, name: str, identity: str) -> set[tuple[str, str]]:
    """(Secret key, container path) of every Secret file the pod mounts."""
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    out = set()
    for c in spec["containers"]:
        for m in c.get("volumeMounts", []):
            secret = vols.get(m["name"], {}).get("secret")  # (a claim template's: no secret)
            if secret is None:
                continue
            assert secret["secretName"] == f"fedstream-{identity}", \
                f"{name} mounts Secret {secret['secretName']}, not its identity's"
            assert "items" in secret, f"{name}: list the Secret's items (the layout under /keys)"
            out |= {(i["key"], f"{m['mountPath']}/{i['path']}") for i in secret["items"]}
    return out


def _env(compose: dict, name: str) -> dict[str, str]:
    return {k: _resolve(v) for k, v in (compose["services"][name].get("environment") or {}).items()}


def _k8s_env(spec: dict) -> dict[str, str]:
    (c,) = spec["containers"]
    return {e["name"]: str(e["value"]) for e in c.get("env", [])}


def _props(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def _conf(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition(" ")
            out.append((k, v))
    return out


# ----------------------------------------------------------------------------------------------
# generated files


def test_generated_files_equal_a_fresh_render():
    fresh = render(NS, REGIONS)
    on_disk = {str(p.relative_to(GENERATED)) for p in GENERATED.rglob("*") if p.is_file()}
    assert on_disk == set(fresh), f"compose/generated/ differs in its files: run {RENDER}"
    for rel, text in fresh.items():
        assert (GENERATED / rel).read_text() == text, \
            f"compose/generated/{rel} is stale or edited by hand: run {RENDER}"


@pytest.mark.parametrize("region", REGIONS)
def test_mosquitto_conf_is_the_local_stacks_but_for_container_paths(region, compose, k8s, tmp_path):
    local_tls = TlsFiles(tmp_path / "ca.crt", tmp_path / "broker.crt", tmp_path / "broker.key")
    local = _conf(mosquitto_conf(1883, tmp_path / "data", autosave_seconds=1,
                                 secure=mosquitto_tls_conf(local_tls, tmp_path / "acl")))
    mounted = (GENERATED / "mosquitto" / region / "mosquitto.conf").read_text()
    got = _conf(mounted)
    assert [k for k, _ in got] == [k for k, _ in local], \
        f"{region}'s mosquitto.conf has other settings than LocalStack(secure=True)'s: run {RENDER}"
    paths = {"listener", "cafile", "certfile", "keyfile", "acl_file", "persistence_location", "user"}
    differ = {k for (k, v), (_, lv) in zip(got, local) if v != lv}
    assert differ <= paths, f"{region}: settings differ from the local stack's: {differ - paths}"
    conf = dict(got)
    for key, value in {"require_certificate": "true", "use_identity_as_username": "true",
                       "use_username_as_clientid": "true", "allow_anonymous": "false",
                       "tls_version": "tlsv1.2", "listener": str(MQTT_PORT)}.items():
        assert conf[key] == value, (region, key)
    # it trusts its own region's CA only, serves its own certificate, uses the mounted ACL
    broker = WORKLOADS[mosquitto_host(region)]
    files = {Path(rel).name: dst for rel, dst in broker.files.items()}
    assert conf["cafile"] == files[f"ca-{region}.crt"]
    assert conf["certfile"] == files[f"mqtt-broker-{region}.mqtt.crt"]
    assert conf["keyfile"] == files[f"mqtt-broker-{region}.key"]
    assert conf["acl_file"] == str(MOSQUITTO_CONFIG / "acl")
    # compose mounts exactly these two files there; the Kubernetes ConfigMap holds the same text
    vols = compose["services"][mosquitto_host(region)]["volumes"]
    assert f"./generated/mosquitto/{region}/mosquitto.conf:{MOSQUITTO_CONFIG}/mosquitto.conf:ro" in vols
    assert f"./generated/mosquitto/{region}/acl:{MOSQUITTO_CONFIG}/acl:ro" in vols
    (cm,) = [d for d in _config_maps() if d["metadata"]["name"] == f"{mosquitto_host(region)}-config"]
    assert cm["data"]["mosquitto.conf"] == mounted
    assert cm["data"]["acl"] == (GENERATED / "mosquitto" / region / "acl").read_text()
    spec = _pod_specs(k8s)[mosquitto_host(region)]
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    config = next(v for v in spec["volumes"] if v.get("configMap"))
    assert config["configMap"]["name"] == cm["metadata"]["name"]
    assert mounts[config["name"]] == str(MOSQUITTO_CONFIG)


def test_kafka_properties_are_the_local_stacks_secure_ones(compose, k8s, tmp_path):
    local = _props(kafka_properties(1, 19093, 19094, tmp_path / "data",
                                    tls=(tmp_path / "ca.crt", tmp_path / "keystore.pem")))
    text = (GENERATED / "kafka" / "server.properties").read_text()
    got = _props(text)
    assert set(got) == set(local), f"server.properties keys differ: {set(got) ^ set(local)}"
    # what makes the broker locked down is the same, key for key
    for key in ("ssl.client.auth", "ssl.keystore.type", "ssl.truststore.type",
                "ssl.principal.mapping.rules", "authorizer.class.name",
                "allow.everyone.if.no.acl.found", "super.users",
                "ssl.endpoint.identification.algorithm", "listener.security.protocol.map",
                "inter.broker.listener.name", "controller.listener.names"):
        assert got[key] == local[key], f"{key}: {got[key]!r} in the deployment, {local[key]!r} " \
                                       "in the local stack"
    assert got["ssl.client.auth"] == "required" and got["allow.everyone.if.no.acl.found"] == "false"
    protocols = dict(p.split(":") for p in got["listener.security.protocol.map"].split(","))
    for listener in got["listeners"].split(",") + got["advertised.listeners"].split(","):
        name = listener.split("://")[0]
        assert protocols[name] == "SSL", f"listener {listener} is not mutual TLS"
    only_paths = {"listeners", "advertised.listeners", "controller.quorum.voters", "log.dirs",
                  "ssl.keystore.location", "ssl.truststore.location"}
    differ = {k for k in got if got[k] != local[k]}
    assert differ <= only_paths, f"settings differ from the local stack's: {differ - only_paths}"
    assert got["advertised.listeners"] == f"SSL://{KAFKA_HOST}:{KAFKA_PORT}"
    # the keystore and truststore are the broker's own mounted secrets
    broker = WORKLOADS["kafka"]
    assert {got["ssl.keystore.location"], got["ssl.truststore.location"]} == \
        set(broker.files.values())
    # compose: this file, and no KAFKA_* property from the environment
    svc = compose["services"]["kafka"]
    assert f"./generated/kafka/server.properties:{KAFKA_CONFIG}:ro" in svc["volumes"]
    command = _resolve(" ".join(svc["command"]))
    assert command.count(str(KAFKA_CONFIG)) == 2, "format and start with the rendered file"
    extra = {k for k in svc.get("environment", {}) if k.startswith("KAFKA_")} - {"KAFKA_HEAP_OPTS"}
    assert not extra, f"kafka is configured by server.properties only, not by {extra}"
    # Kubernetes: the same file in its ConfigMap, the same command
    (cm,) = [d for d in _config_maps() if d["metadata"]["name"] == "kafka-config"]
    assert cm["data"]["server.properties"] == text
    spec = _pod_specs(k8s)["kafka"]
    (c,) = spec["containers"]
    assert " ".join(c["args"]) == command
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    config = next(v for v in spec["volumes"] if v.get("configMap"))
    assert config["configMap"]["name"] == "kafka-config"
    assert f"{mounts[config['name']]}/server.properties" == str(KAFKA_CONFIG)
    assert {k: _resolve(v) for k, v in svc["environment"].items()} == _k8s_env(spec)


def test_kafka_acls_and_setup_are_the_federations(compose, k8s):
    acls = json.loads((GENERATED / "kafka-acls.json").read_text())
    assert acls == [asdict(a) for a in federation_acls(NS, REGIONS)], \
        f"compose/generated/kafka-acls.json is not federation_acls({NS!r}, regions): run {RENDER}"
    want = ["python", "-m", "compose.deploy", "kafka-setup", "--kafka", f"{KAFKA_HOST}:{KAFKA_PORT}",
            "--keys", "/keys", "--namespace", NS, "--regions", str(len(REGIONS))]
    assert compose["services"]["kafka-setup"]["command"] == want
    (c,) = _pod_specs(k8s)["kafka-setup"]["containers"]
    assert [str(a) for a in c["command"]] == want


# ----------------------------------------------------------------------------------------------
# one identity, one secret


def test_compose_services_are_the_stacks_workloads(compose):
    services = set(compose["services"]) - MONITORING_SERVICES
    assert services == set(WORKLOADS), \
        f"services differ from compose.deploy.workloads: {services ^ set(WORKLOADS)}"
    edges = sorted(n for n in compose["services"] if n.startswith("edge-"))
    assert edges == [f"edge-agent-{i:03d}" for i in range(12)]


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_every_compose_service_mounts_exactly_its_own_files(name, compose):
    w = WORKLOADS[name]
    got = _compose_files(compose, name)
    want = set(w.files.items())
    if w.kind in ROLES:  # a service: exactly schemas.keyring.identity_files of its identity
        assert {rel for rel, _ in want} == set(identity_files(w.identity, ROLES[w.kind], w.region))
    foreign = {rel for rel, _ in got - want if is_private(rel)}
    assert not foreign, f"{name} mounts private files that are not {w.identity}'s: {foreign}"
    assert got - want == set(), f"{name} mounts files it must not have: {got - want}"
    assert want - got == set(), f"{name} lacks its files: {want - got}"
    # no shared keys volume, no key file by another way
    for vol in compose["services"][name].get("volumes", []):
        src = str(vol).split(":")[0]
        assert "keys" not in src, f"{name} mounts {vol}: keys are given as secrets, one by one"


def test_only_the_global_holds_the_secret_he_context_and_no_ca_key_is_mounted(compose):
    holders = sorted(n for n in compose["services"]
                     if any(rel == "he/secret.ctx" for rel, _ in _compose_files(compose, n)))
    assert holders == ["global-aggregator"]
    used = {s["source"] for svc in compose["services"].values() for s in svc.get("secrets", [])}
    assert set(compose["secrets"]) == used, \
        f"unused secrets in docker-compose.yml: {set(compose['secrets']) - used}"
    for name, s in compose["secrets"].items():
        rel = s["file"].removeprefix("./keys/")
        assert name == secret_name(rel)
        assert not rel.startswith("ca/"), f"a CA key ({rel}) is the operator's, never a service's"
        assert not re.search(r"\b(operator|consumer)\b", rel), f"{rel}: not a compose service's"


@pytest.mark.parametrize("name", sorted(n for n, w in WORKLOADS.items() if w.kind in ROLES))
def test_service_env_names_its_own_tls_files_with_the_local_stacks_flags(name, compose, tmp_path):
    w = WORKLOADS[name]
    env = _env(compose, name)
    targets = {dst for _, dst in _compose_files(compose, name)}
    for key, value in env.items():
        if key.endswith("_FILE"):
            assert value in targets, f"{name}: {key}={value} is not one of its own secrets"
    # the TLS flags Federation(secure=True) gives this identity, with its key directory at /keys
    fed = Federation(mqtt={r: ("h", 1) for r in REGIONS}, kafka="k", keys_dir=tmp_path,
                     fleet=FLEET, workdir=tmp_path, secure=True)
    fed.keys_of = lambda _name: Path("/keys")  # type: ignore[method-assign]
    flags = fed._tls_args(w.identity, None if w.kind == "global" else w.region)
    want = {"FEDSTREAM_" + f.removeprefix("--").upper().replace("-", "_"): v
            for f, v in zip(flags[::2], flags[1::2])}
    got = {k: v for k, v in env.items() if re.match(r"FEDSTREAM_(MQTT|KAFKA)_.*_FILE$", k)}
    assert got == want, f"{name}: TLS env differs from Federation(secure=True)'s flags"
    assert env["FEDSTREAM_KEYS"] == "/keys" and env["FEDSTREAM_NAMESPACE"] == NS
    if w.kind != "global":
        assert env["FEDSTREAM_MQTT"] == f"{mosquitto_host(w.region)}:{MQTT_PORT}"
        assert env["FEDSTREAM_REGION"] == w.region
    if w.kind != "agent":
        assert env["FEDSTREAM_KAFKA"] == f"{KAFKA_HOST}:{KAFKA_PORT}"
    if w.kind == "agent":
        assert env["FEDSTREAM_DEVICE_ID"] == w.identity


def test_service_env_is_what_the_services_read(compose, monkeypatch):
    """Every FEDSTREAM_* variable is a setting of that service, and the settings parse."""
    from edge_agent.service import EdgeSettings
    from global_aggregator.service import GlobalSettings
    from regional_aggregator.service import RegionalSettings
    from schemas.cli import parse_settings

    classes = {"agent": EdgeSettings, "region": RegionalSettings, "global": GlobalSettings}
    for name, w in WORKLOADS.items():
        if w.kind not in classes:
            continue
        cls = classes[w.kind]
        env = _env(compose, name)
        unknown = {k for k in env if k.removeprefix("FEDSTREAM_").lower() not in cls.model_fields}
        assert not unknown, f"{name}: {unknown} are not settings of {cls.__name__}"
        with monkeypatch.context() as m:
            for k in list(__import__("os").environ):
                if k.startswith("FEDSTREAM_"):
                    m.delenv(k)
            for k, v in env.items():
                m.setenv(k, str(ROOT / "examples" / "digits") if k == "FEDSTREAM_PROJECT" else v)
            s = parse_settings(cls, [])
        if w.kind == "agent":
            assert s.device_id == w.identity and s.data == {"path": f"/data/{w.identity}.npz"}


# ----------------------------------------------------------------------------------------------
# Kubernetes


def test_k8s_workloads_mount_exactly_their_identitys_secret(compose, k8s):
    specs = _pod_specs(k8s)
    assert set(specs) <= set(WORKLOADS), f"unknown workloads: {set(specs) - set(WORKLOADS)}"
    non_edge = {n for n, w in WORKLOADS.items() if w.kind != "agent"}
    assert non_edge <= set(specs), f"missing in compose/k8s/: {non_edge - set(specs)}"
    assert {WORKLOADS[n].region for n in specs if WORKLOADS[n].kind == "agent"} == set(REGIONS)
    assert all(d["metadata"].get("namespace", K8S_NAMESPACE) == K8S_NAMESPACE for d in k8s
               if d["kind"] != "Namespace")
    for name, spec in specs.items():
        w = WORKLOADS[name]
        got = _k8s_files(spec, name, w.identity)
        want = {(secret_name(rel), dst) for rel, dst in w.files.items()}
        assert got == want, f"{name}: Secret items differ: extra {got - want}, missing {want - got}"
        # same command and environment as its compose service
        (c,) = spec["containers"]
        svc = compose["services"][name]
        if w.kind in ROLES:
            assert c["command"] == svc["command"], name
            assert _k8s_env(spec) == _env(compose, name), f"{name}: env differs from compose"
        ctx = spec.get("securityContext", {})
        assert ctx.get("runAsNonRoot") is True and ctx.get("fsGroup") == ctx.get("runAsUser"), name


def test_k8s_secrets_hold_exactly_each_identitys_files(tmp_path, k8s):
    from global_aggregator.keygen import write_keys

    keys = tmp_path / "keys"
    write_keys(keys, 12, 3)
    issue_certs(keys, REGIONS)
    paths = write_k8s_secrets(keys, tmp_path / "secrets", FLEET)
    secrets = {}
    for p in paths:
        assert p.stat().st_mode & 0o077 == 0, f"{p} must be private"
        doc = yaml.safe_load(p.read_text())
        secrets[doc["metadata"]["name"]] = doc
    for w in WORKLOADS.values():
        doc = secrets[f"fedstream-{w.identity}"]
        assert doc["metadata"]["namespace"] == K8S_NAMESPACE
        assert set(doc["data"]) == {secret_name(rel) for rel in w.files}, w.identity
        for rel in w.files:
            assert base64.b64decode(doc["data"][secret_name(rel)]) == (keys / rel).read_bytes()
    referenced = {v["secret"]["secretName"] for spec in _pod_specs(k8s).values()
                  for v in spec["volumes"] if v.get("secret")}
    assert referenced <= set(secrets), f"Secrets no command writes: {referenced - set(secrets)}"


def test_broker_certificates_name_the_hosts_clients_dial(tmp_path, compose):
    from cryptography import x509

    from global_aggregator.keygen import write_keys
    from schemas.pki import load_cert

    keys = tmp_path / "keys"
    write_keys(keys, 3, 3)
    issue_certs(keys, REGIONS)

    def names(rel: str) -> set[str]:
        san = load_cert(keys / rel).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        return {*san.get_values_for_type(x509.DNSName),
                *(str(i) for i in san.get_values_for_type(x509.IPAddress))}

    kafka = names("tls/kafka-broker.kafka.crt")
    assert {KAFKA_HOST, "127.0.0.1"} <= kafka  # clients; the broker's own controller connection
    for r in REGIONS:
        host = _env(compose, f"regional-aggregator-{r[-1]}")["FEDSTREAM_MQTT"].split(":")[0]
        assert host in names(f"tls/mqtt-broker-{r}.mqtt.crt")
        TlsFiles(keys / f"tls/ca-{r}.crt", keys / f"tls/mqtt-broker-{r}.mqtt.crt",
                 keys / f"tls/mqtt-broker-{r}.key").check(f"mqtt-broker-{r}", "broker")
    TlsFiles(keys / "tls/ca-kafka.crt", keys / "tls/admin.kafka.crt",
             keys / "tls/admin.key").check("admin", "admin")
    assert (keys / "tls/kafka-broker.keystore.pem").read_bytes() == \
        (keys / "tls/kafka-broker.key").read_bytes() + (keys / "tls/kafka-broker.kafka.crt").read_bytes()


# ----------------------------------------------------------------------------------------------
# topic names


def test_every_topic_name_is_the_namespaces(compose, k8s):
    t = Topics(NS)
    kafka_topics = {t.partials, t.models, t.history, t.control, t.fleet}
    mqtt = {r: {t.model(r), t.receipts(r), t.updates(r), t.update(r, "%u")} for r in REGIONS}
    # the MQTT ACLs name exactly their region's topics
    for r in REGIONS:
        acl = (GENERATED / "mosquitto" / r / "acl").read_text()
        named = {line.split()[-1] for line in acl.splitlines()
                 if line.startswith(("topic ", "pattern "))}
        assert named == mqtt[r], f"{r}'s ACL names {named ^ mqtt[r]} beyond Topics({NS!r})"
    # the Kafka ACLs name exactly the namespace's five topics
    named = {a["resource_name"] for a in json.loads((GENERATED / "kafka-acls.json").read_text())
             if a["resource_type"] == "topic"}
    assert named == kafka_topics
    # and nothing anywhere in the deployment files spells another one
    texts = [p.read_text() for p in (*GENERATED.rglob("*"), COMPOSE / "docker-compose.yml",
                                     *(COMPOSE / "k8s").glob("*.yaml")) if p.is_file()]
    every_mqtt = set().union(*mqtt.values())
    for text in texts:
        for found in re.findall(rf"\b{re.escape(NS)}\.[a-z_]+\b", text):
            assert found in kafka_topics, f"Kafka topic {found!r} is not Topics({NS!r})'s"
        for found in re.findall(rf"\b{re.escape(NS)}/region-[^\s'\"]+", text):
            assert found in every_mqtt, f"MQTT topic {found!r} is not Topics({NS!r})'s"
    namespaces = {_env(compose, n).get("FEDSTREAM_NAMESPACE") for n, w in WORKLOADS.items()
                  if w.kind in ROLES}
    assert namespaces == {NS}


# ----------------------------------------------------------------------------------------------
# monitoring: Prometheus scrapes every aggregator, Alertmanager and Grafana are wired to it


def _mounts(compose: dict, name: str) -> dict[str, str]:
    """container path -> host path (relative to compose/) of a service's bind mounts."""
    out = {}
    for vol in compose["services"][name].get("volumes", []):
        src, dst = str(vol).split(":")[:2]
        out[dst] = src
    return out


def test_prometheus_scrapes_every_aggregator_of_the_compose_stack(compose, k8s):
    from compose.monitoring import COMPOSE_METRICS_PORT, render_compose

    # the committed configuration is the render for these regions, mounted where it is read
    mounts = _mounts(compose, "prometheus")
    assert mounts["/etc/prometheus/prometheus.yml"] == "./monitoring/prometheus.yml"
    assert mounts["/etc/prometheus/rules.yml"] == "./monitoring/rules.yml"  # beside it
    assert "--config.file=/etc/prometheus/prometheus.yml" in compose["services"]["prometheus"][
        "command"]
    text = (COMPOSE / "monitoring" / "prometheus.yml").read_text()
    assert text == render_compose(REGIONS)["prometheus.yml"], \
        "compose/monitoring/prometheus.yml is stale: python -m compose.monitoring render"
    cfg = yaml.safe_load(text)
    assert cfg["rule_files"] == ["rules.yml"]
    scraped = {}
    for job in cfg["scrape_configs"]:
        for sc in job["static_configs"]:
            for target in sc["targets"]:
                host, port = target.split(":")
                scraped[host] = (job["job_name"], int(port), sc.get("labels", {}))
    # every global and regional aggregator serves /metrics on that port, on every interface
    services = [n for n, w in WORKLOADS.items() if w.kind in ("global", "region")]
    for name in services:
        job, port, labels = scraped[name]
        w = WORKLOADS[name]
        assert job == ("global" if w.kind == "global" else "regional")
        assert port == COMPOSE_METRICS_PORT
        env = _env(compose, name)
        assert env["FEDSTREAM_METRICS_PORT"] == str(port), name
        assert env["FEDSTREAM_METRICS_HOST"] == "0.0.0.0", \
            f"{name}: /metrics on loopback cannot be scraped from the prometheus container"
        if w.kind == "region":
            assert labels == {"process": w.region, "region": w.region}
    # the rest it scrapes is itself and Alertmanager; alerts go to the alertmanager service
    assert set(scraped) - set(services) == {"localhost", "alertmanager"}
    (am,) = cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    host, port = am.split(":")
    assert host in compose["services"] and int(port) == 9093
    assert _mounts(compose, "alertmanager")["/etc/alertmanager/alertmanager.yml"] == \
        "./monitoring/alertmanager.yml"
    # the monitoring holds no key of anyone's
    for name in MONITORING_SERVICES:
        assert not compose["services"][name].get("secrets"), name
        for src in _mounts(compose, name).values():
            assert "keys" not in src, f"{name} mounts {src}"
    # Kubernetes: the same /metrics settings (the env equality above), and scrape annotations
    for name, spec in _pod_specs(k8s).items():
        if WORKLOADS[name].kind in ("global", "region"):
            assert _k8s_env(spec)["FEDSTREAM_METRICS_PORT"] == str(COMPOSE_METRICS_PORT)
    for d in k8s:
        name = d["metadata"]["name"]
        if d["kind"] == "Deployment" and name in services:
            ann = d["spec"]["template"]["metadata"].get("annotations", {})
            assert ann.get("prometheus.io/port") == str(COMPOSE_METRICS_PORT), name


def test_grafana_is_provisioned_with_the_dashboard_and_prometheus(compose):
    mounts = _mounts(compose, "grafana")
    prov = COMPOSE / mounts["/etc/grafana/provisioning"]
    assert prov == COMPOSE / "monitoring" / "grafana" / "provisioning"
    sources = yaml.safe_load((prov / "datasources" / "datasources.yml").read_text())["datasources"]
    by_type = {d["type"]: d for d in sources}
    assert by_type["prometheus"]["url"] == "http://prometheus:9090" and "prometheus" in \
        compose["services"]
    assert by_type["prometheus"]["isDefault"] is True
    assert by_type["alertmanager"]["url"] == "http://alertmanager:9093"
    (provider,) = yaml.safe_load((prov / "dashboards" / "dashboards.yml").read_text())["providers"]
    path = provider["options"]["path"]
    assert (COMPOSE / mounts[path] / "fedstream.json").is_file(), \
        f"the dashboards provider reads {path}, which holds no fedstream dashboard"
    dash = json.loads((COMPOSE / mounts[path] / "fedstream.json").read_text())
    assert dash["uid"] == "fedstream" and dash["panels"]
    # every panel asks the $datasource variable, which picks a Prometheus source
    (var,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == "prometheus"
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            assert t["datasource"] == {"type": "prometheus", "uid": f"${{{var['name']}}}"}, \
                panel["title"]

