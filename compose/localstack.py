"""No-Docker local broker stack: one Mosquitto per region and one single-node KRaft Kafka, on loopback.

Library::

    from compose.localstack import LocalStack
    with LocalStack(["region-0", "region-1"]) as info:
        info.mqtt["region-0"]        # ("127.0.0.1", port)
        info.kafka_bootstrap         # "127.0.0.1:port"

CLI::

    python -m compose.localstack up --state PATH [--regions N]   # returns, brokers keep running
    python -m compose.localstack status --state PATH
    python -m compose.localstack down --state PATH

Every process is started by this module and ended by pid (SIGTERM, then SIGKILL after a timeout);
nothing is ever killed by name. Ports are free loopback ports picked at start and kept across
restarts, so clients can reconnect to the same address after a fault-injected kill.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from schemas.cli import die_with_parent, terminate_child
from schemas.kafka import KafkaConn
from schemas.mqtt import MAX_PACKET_BYTES
from schemas.pki import KAFKA_CA, Pki, TlsFiles, tls_paths

HOST = "127.0.0.1"
MOSQUITTO_BIN = os.environ.get("FEDSTREAM_MOSQUITTO", shutil.which("mosquitto") or "/usr/sbin/mosquitto")
KAFKA_VERSION = os.environ.get("KAFKA_VERSION", "4.1.1")
KAFKA_LIBS = Path(
    os.environ.get(
        "FEDSTREAM_KAFKA_LIBS", str(Path.home() / ".cache" / "fedstream" / f"kafka-{KAFKA_VERSION}" / "libs")
    )
)
JAVA_BIN = os.environ.get("FEDSTREAM_JAVA", shutil.which("java") or "java")

# MQTT packets carry update chunks of about 1 MB and retained model versions of several MB.
MQTT_MAX_PACKET_SIZE = MAX_PACKET_BYTES  # the services refuse larger messages too
# Kafka: partials / model versions are chunked to about 1 MB, allow up to 8 MB per record batch.
KAFKA_MAX_MESSAGE_BYTES = 8 * 1024 * 1024

DEFAULT_TOPICS: tuple[dict, ...] = (
    {"name": "fedstream.partials", "partitions": 1},
    {
        "name": "fedstream.models",
        "partitions": 1,
        "config": {"cleanup.policy": "compact", "max.message.bytes": str(KAFKA_MAX_MESSAGE_BYTES)},
    },
    {   # every model version, kept forever (schemas.kafka.HISTORY_CONFIG)
        "name": "fedstream.history",
        "partitions": 1,
        "config": {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1",
                   "max.message.bytes": str(KAFKA_MAX_MESSAGE_BYTES)},
    },
)


class StackError(RuntimeError):
    """A broker did not start / become ready in time; the message carries the log tail."""


# ----------------------------------------------------------------------------------------------
# small helpers


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<no log: {exc}>"
    return "\n".join(lines[-n:])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours still answers kill(0); reap it if it is ours
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":
                return False
    except OSError:
        pass
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def terminate_pid(pid: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL. Only ever called with pids we started."""
    if proc is not None:
        terminate_child(proc, timeout)
        return
    if not _pid_alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.05)


_die_with_parent = die_with_parent


def _spawn(cmd: list[str], log: Path, *, detach: bool, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start a broker with stdout+stderr appended to `log`.

    detach=False (library / pytest): the broker gets PR_SET_PDEATHSIG=SIGKILL so it cannot outlive
    a test process that was itself killed -9. PDEATHSIG fires when the *thread* that forked exits,
    so it is only set when spawning from the main thread.
    detach=True (CLI `up`): own session, survives the CLI.
    """
    preexec = None
    if not detach and threading.current_thread() is threading.main_thread():
        preexec = _die_with_parent
    logf = open(log, "ab")
    try:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
            env=dict(env) if env is not None else None,
            close_fds=True,
        )
    finally:
        logf.close()


# ----------------------------------------------------------------------------------------------
# readiness probes


def mqtt_ready(host: str, port: int, timeout: float = 2.0, tls: TlsFiles | None = None) -> bool:
    """True when the broker answers an MQTT CONNECT with a successful CONNACK (paho, v3.1.1),
    over mutual TLS with ``tls`` when given."""
    import paho.mqtt.client as mqtt

    ok = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties=None):
        if not reason_code.is_failure:
            ok.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}", clean_session=True)
    c.on_connect = on_connect
    if tls is not None:
        c.tls_set(ca_certs=str(tls.ca), certfile=str(tls.cert), keyfile=str(tls.key))
    try:
        c.connect(host, port, keepalive=10)
    except OSError:  # ssl.SSLError is an OSError
        return False
    deadline = time.monotonic() + timeout
    try:
        while not ok.is_set() and time.monotonic() < deadline:
            if c.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                return False
        return ok.is_set()
    finally:
        try:
            c.disconnect()
        except Exception:
            pass


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


async def _kafka_ready_async(bootstrap: str | KafkaConn, timeout: float) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    conn = bootstrap if isinstance(bootstrap, KafkaConn) else KafkaConn(bootstrap)
    admin = AIOKafkaAdminClient(**conn.kwargs(), request_timeout_ms=int(max(timeout, 1) * 1000))
    await asyncio.wait_for(admin.start(), timeout)
    try:
        await asyncio.wait_for(admin.describe_cluster(), timeout)
    finally:
        await admin.close()


def kafka_ready(bootstrap: str | KafkaConn, timeout: float = 3.0) -> bool:
    """True when Kafka answers a DescribeCluster (as ``bootstrap``'s identity when a
    :class:`KafkaConn` with TLS is given: a locked-down broker answers no anonymous client)."""
    address = bootstrap.bootstrap if isinstance(bootstrap, KafkaConn) else bootstrap
    host, port = address.rsplit(":", 1)
    if not _tcp_open(host, int(port)):
        return False
    try:
        _run_async(_kafka_ready_async(bootstrap, timeout))
        return True
    except Exception:
        return False


def _run_async(coro):
    """asyncio.run that also works when called from inside a running loop (runs in a thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict = {}

    def runner():
        try:
            box["v"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001
            box["e"] = exc

    t = threading.Thread(target=runner)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box.get("v")


# ----------------------------------------------------------------------------------------------
# configuration files


def mosquitto_acl(region: str, namespaces: Iterable[str] = ("+",)) -> str:
    """The ACL of ``region``'s broker (Mosquitto takes each client's user name from its
    certificate's CN). A device may publish only to its own update topic and read only its
    region's model and receipts; the regional aggregator reads its region's updates and
    writes its model and receipts; nobody else may do anything (``probe``s included).
    ``namespaces``: the federations the broker serves ("+" = any, for a shared test broker)."""
    lines = [f"# generated by compose/localstack.py: {region}'s broker, deny by default", ""]
    for ns in namespaces:
        lines += [
            f"# every device of {region}'s CA: its own update topic, the region's model and "
            "receipts",
            f"pattern write {ns}/{region}/updates/%u",
            f"pattern read {ns}/{region}/model",
            f"pattern read {ns}/{region}/receipts",
            "",
        ]
    lines.append(f"user {region}")
    for ns in namespaces:
        lines += [f"topic read {ns}/{region}/updates/+",
                  f"topic readwrite {ns}/{region}/model",
                  f"topic readwrite {ns}/{region}/receipts"]
    return "\n".join(lines) + "\n"


def mosquitto_tls_conf(tls: TlsFiles, acl_file: Path) -> str:
    """The locked-down part of a region broker's configuration: TLS only, a client
    certificate from the region's CA required, the certificate's CN as the user name and as
    the client id (no client can take another's session), the ACL file."""
    return f"""
# locked down: TLS 1.2+ only, client certificates from this region's CA, identity = CN
cafile {tls.ca}
certfile {tls.cert}
keyfile {tls.key}
tls_version tlsv1.2
require_certificate true
use_identity_as_username true
# the client id is the certificate's CN whatever the client asks for: no session theft
use_username_as_clientid true
allow_anonymous false
acl_file {acl_file}
"""


def mosquitto_conf(port: int, persistence_dir: Path, autosave_changes: int = 1,
                   autosave_seconds: int = 0, message_size_limit: int = 0,
                   secure: str = "", log_file: Path | None = None) -> str:
    """autosave_changes: rewrite the db after this many changes (1 = after every change; each save
    rewrites the whole db, so the cost grows with the queue: 200 queued 1 MB messages take ~25 s to
    publish here instead of ~3 s). 0 = only on clean shutdown (kill -9 loses everything since start).
    autosave_seconds > 0 instead saves at most every that many seconds (time-based): far cheaper
    under load, and a kill -9 loses at most the last interval, which fedstream's edges (keep until
    receipt) and regional aggregators (republish retained state on reconnect) make up for."""
    user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
    access = secure or "allow_anonymous true\n"
    return f"""# generated by compose/localstack.py -- loopback only, persistent
per_listener_settings false
listener {port} {HOST}
{access}# run as whoever started us (Mosquitto would otherwise switch from root to user 'mosquitto')
user {user}

# Persistence: sessions, subscriptions and queued/in-flight QoS1 messages go to mosquitto.db.
# Mosquitto 2.0 only writes the db on autosave and at clean shutdown; with autosave_on_changes
# and autosave_interval 1 it rewrites the whole db after every change (written to .new + rename,
# so a kill -9 during a save leaves the previous db intact). See compose/README.md (limits).
persistence true
persistence_location {persistence_dir}/
persistence_file mosquitto.db
autosave_on_changes {"false" if autosave_seconds > 0 else "true"}
autosave_interval {autosave_seconds if autosave_seconds > 0 else autosave_changes}
# never expire offline persistent sessions (unset = never)
# persistent_client_expiration <unset>

# Manual-ack subscribers: every unacked QoS1 message stays in flight and is redelivered with the
# dup flag on reconnect. 0 = unlimited in flight / queued.
max_inflight_messages 0
max_inflight_bytes 0
max_queued_messages 0
max_queued_bytes 0
queue_qos0_messages false
retain_available true
# update chunks are ~1 MB; retained model versions of 1M+ parameters are several MB
max_packet_size {MQTT_MAX_PACKET_SIZE}
# a managed broker's payload cap (AWS IoT Core: 128 KB), when set; 0 = none beyond the packet size
message_size_limit {message_size_limit}
set_tcp_nodelay true
max_keepalive 65535

log_dest {f"file {log_file}" if log_file else "stdout"}
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
log_timestamp true
"""


#: The broker's own principal and the stack's admin: Kafka super users (the ACLs do not apply).
KAFKA_SUPER_USERS = ("kafka-broker", "admin")
#: Principal = the client certificate's CN (fedstream certificates: ``CN=<name>,OU=<role>,
#: O=fedstream``); any other subject keeps its whole DN as its name, which no ACL names.
KAFKA_PRINCIPAL_RULES = "RULE:^CN=([^,]+),OU=[^,]+,O=fedstream$/$1/,DEFAULT"


def kafka_tls_properties(truststore: Path, keystore: Path) -> str:
    """The locked-down part of ``server.properties``: every listener (clients, the controller,
    the broker's own connections to it) speaks TLS with client certificates from the Kafka CA
    only; the principal is the certificate's CN; the standard KRaft authorizer denies what no
    ACL allows. ``truststore``: the Kafka CA (PEM); ``keystore``: the broker's unencrypted
    PKCS#8 key followed by its certificate (PEM, one file)."""
    return f"""
# mutual TLS on every listener, trusting the Kafka CA only
ssl.client.auth=required
ssl.keystore.type=PEM
ssl.keystore.location={keystore}
ssl.truststore.type=PEM
ssl.truststore.location={truststore}
ssl.endpoint.identification.algorithm=https
ssl.principal.mapping.rules={KAFKA_PRINCIPAL_RULES}
# deny by default; the federation's ACLs: compose/kafka_security.py
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users={";".join(f"User:{u}" for u in KAFKA_SUPER_USERS)}
"""


def kafka_properties(node_id: int, broker_port: int, controller_port: int, log_dir: Path,
                     proxied: tuple[int, int] | None = None,
                     tls: tuple[Path, Path] | None = None) -> str:
    """``proxied=(advertised_port, listen_port)`` adds a second client listener that advertises a
    port where a test puts a TCP proxy, so one client can be cut off from Kafka and no other.

    ``tls=(truststore, keystore)`` (see :func:`kafka_tls_properties`) locks the broker down: the
    client listener and the controller listener are SSL with required client certificates, and
    the broker reaches its own controller with its certificate (principal ``User:kafka-broker``,
    a super user). Not combined with ``proxied``."""
    mode, inter, security = "plaintext", "PLAINTEXT", ""
    if tls is None:
        listeners = f"PLAINTEXT://{HOST}:{broker_port},CONTROLLER://{HOST}:{controller_port}"
        advertised = f"PLAINTEXT://{HOST}:{broker_port}"
        protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    else:
        if proxied is not None:
            raise StackError("a proxied Kafka listener is only available in plaintext mode "
                             "(LocalStack(secure=True) does not support kafka_proxied=True)")
        listeners = f"SSL://{HOST}:{broker_port},CONTROLLER://{HOST}:{controller_port}"
        advertised = f"SSL://{HOST}:{broker_port}"
        protocols = "SSL:SSL,CONTROLLER:SSL"
        mode, inter, security = "mutual TLS + ACLs", "SSL", kafka_tls_properties(*tls)
    if proxied is not None:
        listeners += f",PROXIED://{HOST}:{proxied[1]}"
        advertised += f",PROXIED://{HOST}:{proxied[0]}"
        protocols += ",PROXIED:PLAINTEXT"
    return f"""# generated by compose/localstack.py -- single-node KRaft, loopback, {mode}
process.roles=broker,controller
node.id={node_id}
controller.quorum.voters={node_id}@{HOST}:{controller_port}
listeners={listeners}
advertised.listeners={advertised}
controller.listener.names=CONTROLLER
inter.broker.listener.name={inter}
listener.security.protocol.map={protocols}
log.dirs={log_dir}
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# after a kill -9 the restarted controller keeps the dead incarnation's registration until its
# session times out (default 9 s), and the new broker waits for that: keep it short on loopback
broker.session.timeout.ms=2000
broker.heartbeat.interval.ms=500
message.max.bytes={KAFKA_MAX_MESSAGE_BYTES}
replica.fetch.max.bytes={KAFKA_MAX_MESSAGE_BYTES}
socket.request.max.bytes=104857600
auto.create.topics.enable=true
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=168
log.cleaner.backoff.ms=1000
log.segment.bytes=67108864
{security}"""


KAFKA_LOG4J2 = """status = error
name = fedstream-local-kafka
appender.out.type = Console
appender.out.name = OUT
appender.out.target = SYSTEM_OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = INFO
logger.broker.name = kafka.server.BrokerServer
logger.broker.level = INFO
"""


def _slf4j2_jar() -> Path | None:
    """An slf4j-api 2.x jar: in the libs dir, else the local Maven repository."""
    found = sorted(KAFKA_LIBS.glob("slf4j-api-2.*.jar"))
    if not found:
        found = sorted((Path.home() / ".m2/repository/org/slf4j/slf4j-api").glob("2.*/slf4j-api-2.*.jar"))
    return found[-1] if found else None


def kafka_classpath() -> str:
    """Kafka's jars. Maven resolves slf4j-api to 1.7.36 (Kafka's own pin) next to log4j-slf4j2-impl,
    which needs slf4j 2: with that pair Kafka logs *nothing* (slf4j NOP logger). When an slf4j-api
    2.x jar is at hand we use it instead of 1.7 so the broker log (and our error tails) say something.
    The lasting fix is an explicit slf4j-api 2.x dependency in compose/kafka/pom.xml."""
    jars = sorted(KAFKA_LIBS.glob("*.jar"))
    slf4j2 = _slf4j2_jar()
    if slf4j2 is not None:
        jars = [j for j in jars if not j.name.startswith("slf4j-api-1.")]
        if slf4j2 not in jars:
            jars.append(slf4j2)
    return os.pathsep.join(str(j) for j in jars)


def random_cluster_id() -> str:
    # Kafka's Uuid.toString: url-safe base64 of 16 bytes, no padding; avoid a leading '-'
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


# ----------------------------------------------------------------------------------------------
# stack


@dataclass
class StackInfo:
    mqtt: dict[str, tuple[str, int]]
    kafka_bootstrap: str | None
    workdir: Path
    pids: dict[str, int] = field(default_factory=dict)  # "mosquitto:<region>" / "kafka" -> pid
    kafka_controller_port: int | None = None
    # (advertised port for a test's proxy, the broker's listening port behind it), if asked for
    kafka_proxied: tuple[int, int] | None = None
    cluster_id: str | None = None

    def mqtt_url(self, region: str) -> str:
        host, port = self.mqtt[region]
        return f"mqtt://{host}:{port}"

    def to_json(self) -> dict:
        d = asdict(self)
        d["workdir"] = str(self.workdir)
        d["mqtt"] = {r: [h, p] for r, (h, p) in self.mqtt.items()}
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> StackInfo:
        return cls(
            mqtt={r: (h, int(p)) for r, (h, p) in d["mqtt"].items()},
            kafka_bootstrap=d.get("kafka_bootstrap"),
            workdir=Path(d["workdir"]),
            pids={k: int(v) for k, v in d.get("pids", {}).items()},
            kafka_controller_port=d.get("kafka_controller_port"),
            kafka_proxied=tuple(d["kafka_proxied"]) if d.get("kafka_proxied") else None,
            cluster_id=d.get("cluster_id"),
        )


class LocalStack:
    """Start/stop the local brokers. Use as a context manager (returns StackInfo) or call start()/stop().

    regions: one Mosquitto per region (may be empty); kafka: start the single-node KRaft Kafka.
    mqtt_message_limit: Mosquitto's ``message_size_limit`` (payload bytes; 0 = none), e.g.
    128 KiB to run as under a managed broker's cap.
    workdir: where configs, logs and data live; a temp dir (removed on stop) when None.
    """

    def __init__(
        self,
        regions: Iterable[str] = ("region-0", "region-1"),
        workdir: Path | str | None = None,
        *,
        kafka: bool = True,
        detach: bool = False,
        mqtt_timeout: float = 10.0,
        kafka_timeout: float = 90.0,
        kafka_heap: str = "512m",
        mqtt_autosave_changes: int = 1,
        mqtt_autosave_seconds: int = 0,
        kafka_proxied: bool = False,
        mqtt_message_limit: int = 0,
        secure: bool = False,
        pki: Pki | None = None,
        namespaces: Iterable[str] = ("+",),
    ) -> None:
        self.regions = list(regions)
        self.with_kafka = kafka
        self.detach = detach
        self.mqtt_timeout = mqtt_timeout
        self.kafka_timeout = kafka_timeout
        self.kafka_heap = kafka_heap
        self.mqtt_autosave_changes = mqtt_autosave_changes
        self.mqtt_autosave_seconds = mqtt_autosave_seconds
        self.kafka_proxied = kafka_proxied
        self.mqtt_message_limit = mqtt_message_limit
        self.secure = secure
        self.pki = pki
        # the namespaces the brokers' ACLs serve ("+": any, for a test stack shared by many)
        self.namespaces = list(namespaces)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self._procs: dict[str, subprocess.Popen] = {}
        self.info: StackInfo | None = None
        self.timings: dict[str, float] = {}

    # -- convenience views on the running stack ------------------------------------------------

    @property
    def mqtt(self) -> dict[str, tuple[str, int]]:
        return self._require().mqtt

    @property
    def kafka_bootstrap(self) -> str:
        b = self._require().kafka_bootstrap
        if b is None:
            raise StackError("this stack was started without Kafka")
        return b

    @property
    def pids(self) -> dict[str, int]:
        return self._require().pids

    # -- the locked-down stack: its CAs and the certificates of the brokers and the admin ------

    def _pki(self) -> Pki:
        if self.pki is None:
            self.pki = Pki(self._wd / "pki" / "ca", self._wd / "pki" / "tls")
        return self.pki

    def _issue(self, ca: str, cn: str, role: str, kind: str, hosts: tuple[str, ...] = (),
               stem: str = "") -> TlsFiles:
        pki = self._pki()
        files = tls_paths(pki.public_dir, stem or cn, kind, ca)
        if files.cert.exists() and files.key.exists():
            return files
        return pki.issue(ca, cn, role, kind, stem=stem, hosts=hosts)

    def broker_tls(self, region: str | None = None) -> TlsFiles:
        """The server certificate of ``region``'s Mosquitto (issued by the region's CA), or of
        Kafka (``region=None``; issued by the Kafka CA)."""
        if region is None:
            return self._issue(KAFKA_CA, "kafka-broker", "broker", "kafka", (HOST, "localhost"))
        return self._issue(region, f"mqtt-broker-{region}", "broker", "mqtt", (HOST, "localhost"))

    @property
    def admin_tls(self) -> TlsFiles:
        """The stack's Kafka super-user (topics, ACLs, readiness probes)."""
        return self._issue(KAFKA_CA, "admin", "admin", "kafka")

    def probe_tls(self, region: str) -> TlsFiles:
        """An MQTT client certificate of ``region``'s CA that the ACL grants nothing (probes)."""
        return self._issue(region, "probe", "admin", "mqtt", stem=f"probe-{region}")

    @property
    def kafka_conn(self) -> KafkaConn:
        """How the stack's own tools reach Kafka: as the admin over mutual TLS when secure."""
        return KafkaConn(self.kafka_bootstrap, self.admin_tls if self.secure else None)

    def _require(self) -> StackInfo:
        if self.info is None:
            raise StackError("stack is not running (call start() or use it as a context manager)")
        return self.info

    @property
    def _wd(self) -> Path:
        if self.workdir is None:
            raise StackError("stack has no workdir yet (call start())")
        return self.workdir

    def _bootstrap(self) -> str:
        bootstrap = self._require().kafka_bootstrap
        if bootstrap is None:
            raise StackError("this stack runs no Kafka")
        return bootstrap

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> StackInfo:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> StackInfo:
        if self.info is not None:
            return self.info
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="fedstream-stack-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.info = StackInfo(mqtt={}, kafka_bootstrap=None, workdir=self.workdir)
        try:
            for region in self.regions:
                self.info.mqtt[region] = (HOST, free_port())
            if self.with_kafka:
                bport, cport = free_port(), free_port()
                while cport == bport:
                    cport = free_port()
                self.info.kafka_bootstrap = f"{HOST}:{bport}"
                self.info.kafka_controller_port = cport
                if self.kafka_proxied:
                    taken = {bport, cport}
                    ports: list[int] = []
                    while len(ports) < 2:
                        p = free_port()
                        if p not in taken:
                            taken.add(p)
                            ports.append(p)
                    self.info.kafka_proxied = (ports[0], ports[1])
                self.info.cluster_id = random_cluster_id()
                self._write_kafka_config()
                t0 = time.monotonic()
                self._format_kafka()
                self.timings["kafka_format"] = time.monotonic() - t0
                self._spawn_kafka()  # start the JVM first; Mosquitto comes up while it boots
            t0 = time.monotonic()
            for region in self.regions:
                self._spawn_mosquitto(region)
            for region in self.regions:
                self._wait_mosquitto(region)
            self.timings["mosquitto_start"] = time.monotonic() - t0
            if self.with_kafka:
                self._wait_kafka()
                self.timings["kafka_start"] = time.monotonic() - self._kafka_t0
        except BaseException:
            self.stop()
            raise
        return self.info

    def stop(self, timeout: float = 15.0) -> None:
        """End exactly the processes this stack started (by pid), then remove a temp workdir."""
        if self.info is None:
            return
        for name in list(self.info.pids):
            self._terminate(name, timeout)
        self.info.pids.clear()
        if self._own_workdir and self.workdir is not None and not self.detach:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.info = None

    # -- mosquitto -----------------------------------------------------------------------------

    def _mosq_paths(self, region: str) -> tuple[Path, Path, Path]:
        d = self._wd / "mosquitto" / region
        return d / "mosquitto.conf", d / "data", d / "mosquitto.log"

    def _spawn_mosquitto(self, region: str) -> None:
        conf, data, log = self._mosq_paths(region)
        data.mkdir(parents=True, exist_ok=True)
        port = self._require().mqtt[region][1]
        secure = ""
        if self.secure:
            acl = conf.parent / "acl"
            acl.write_text(mosquitto_acl(region, self.namespaces))
            secure = mosquitto_tls_conf(self.broker_tls(region), acl)
        conf.write_text(mosquitto_conf(port, data, self.mqtt_autosave_changes,
                                       self.mqtt_autosave_seconds, self.mqtt_message_limit, secure,
                                       log))
        proc = _spawn([MOSQUITTO_BIN, "-c", str(conf)], log, detach=self.detach)
        self._procs[f"mosquitto:{region}"] = proc
        self._require().pids[f"mosquitto:{region}"] = proc.pid

    def _wait_mosquitto(self, region: str) -> None:
        host, port = self._require().mqtt[region]
        name = f"mosquitto:{region}"
        proc = self._procs[name]
        deadline = time.monotonic() + self.mqtt_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _tcp_open(host, port) and mqtt_ready(
                    host, port, tls=self.probe_tls(region) if self.secure else None):
                return
            time.sleep(0.02)
        _, _, log = self._mosq_paths(region)
        state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready after {self.mqtt_timeout}s"
        raise StackError(f"Mosquitto for {region} on {host}:{port} {state}; log tail ({log}):\n{_tail(log)}")

    def kill_mosquitto(self, region: str, sig: int = signal.SIGKILL) -> None:
        name = f"mosquitto:{region}"
        proc = self._procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
                proc.wait(15)

    def restart_mosquitto(self, region: str, sig: int | None = None) -> None:
        """(Optionally kill with `sig` first, then) start again: same port, same persistence db."""
        name = f"mosquitto:{region}"
        if sig is not None:
            self.kill_mosquitto(region, sig)
        if self._procs[name].poll() is None:
            self._terminate(name)
        t0 = time.monotonic()
        self._spawn_mosquitto(region)
        self._wait_mosquitto(region)
        self.timings[f"mosquitto_restart:{region}"] = time.monotonic() - t0

    # -- kafka ---------------------------------------------------------------------------------

    @property
    def _kafka_dir(self) -> Path:
        return self._wd / "kafka"

    def _write_kafka_config(self) -> None:
        d = self._kafka_dir
        (d / "data").mkdir(parents=True, exist_ok=True)
        info = self._require()
        bport = int(self._bootstrap().rsplit(":", 1)[1])
        if info.kafka_controller_port is None:
            raise StackError("no controller port allocated")
        tls: tuple[Path, Path] | None = None
        if self.secure:
            from schemas.pki import write_private

            # Kafka's PEM keystore file: the (unencrypted PKCS#8) key, then the certificate
            broker = self.broker_tls(None)
            keystore = d / "broker-keystore.pem"
            write_private(keystore, broker.key.read_bytes() + broker.cert.read_bytes())
            tls = (broker.ca, keystore)
        (d / "server.properties").write_text(
            kafka_properties(1, bport, info.kafka_controller_port, d / "data", info.kafka_proxied,
                             tls)
        )
        (d / "log4j2.properties").write_text(KAFKA_LOG4J2)

    def _java_cmd(self, main: str, *args: str, heap: str = "512m") -> list[str]:
        if not (KAFKA_LIBS / f"kafka_2.13-{KAFKA_VERSION}.jar").exists():
            raise StackError(f"Kafka jars not found in {KAFKA_LIBS}; run compose/install.sh")
        return [
            JAVA_BIN,
            f"-Xmx{heap}",
            "-Xms64m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self._kafka_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self._kafka_dir / 'logs'}",
            "-cp",
            kafka_classpath(),
            main,
            *args,
        ]

    def _format_kafka(self) -> None:
        log = self._kafka_dir / "format.log"
        cmd = self._java_cmd(
            "kafka.tools.StorageTool",
            "format",
            "--ignore-formatted",
            "-t",
            self._require().cluster_id or "",
            "-c",
            str(self._kafka_dir / "server.properties"),
            heap="256m",
        )
        with open(log, "ab") as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=120)
        if r.returncode != 0:
            raise StackError(f"kafka StorageTool format failed ({r.returncode}); log tail ({log}):\n{_tail(log)}")

    def _spawn_kafka(self) -> None:
        self._kafka_t0 = time.monotonic()
        cmd = self._java_cmd("kafka.Kafka", str(self._kafka_dir / "server.properties"), heap=self.kafka_heap)
        proc = _spawn(cmd, self._kafka_dir / "kafka.log", detach=self.detach)
        self._procs["kafka"] = proc
        self._require().pids["kafka"] = proc.pid

    def _wait_kafka(self) -> None:
        proc = self._procs["kafka"]
        deadline = time.monotonic() + self.kafka_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            probe = self.kafka_conn if self.secure else self._bootstrap()
            if kafka_ready(probe, timeout=min(5.0, max(0.5, deadline - time.monotonic()))):
                return
            time.sleep(0.1)
        log = self._kafka_dir / "kafka.log"
        state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready after {self.kafka_timeout}s"
        raise StackError(f"Kafka on {self._bootstrap()} {state}; log tail ({log}):\n{_tail(log)}")

    def kill_kafka(self, sig: int = signal.SIGKILL) -> None:
        proc = self._procs["kafka"]
        if proc.poll() is None:
            proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
                proc.wait(60)

    def restart_kafka(self, sig: int | None = None) -> None:
        """(Optionally kill with `sig` first, then) start again: same ports, same cluster id and data."""
        if sig is not None:
            self.kill_kafka(sig)
        if self._procs["kafka"].poll() is None:
            self._terminate("kafka", 60)
        self._spawn_kafka()
        self._wait_kafka()
        self.timings["kafka_restart"] = time.monotonic() - self._kafka_t0

    def create_topics(self, specs: Iterable[Mapping] = DEFAULT_TOPICS, timeout: float = 30.0) -> list[str]:
        """Create topics (idempotent). spec: {"name", "partitions"=1, "replication"=1, "config"={}}."""
        if self.info is None or not self.info.kafka_bootstrap:
            raise StackError("Kafka is not running in this stack")
        target = self.kafka_conn if self.secure else self.info.kafka_bootstrap
        return create_topics(target, specs, timeout=timeout)

    # -- internals -----------------------------------------------------------------------------

    def _terminate(self, name: str, timeout: float = 15.0) -> None:
        proc = self._procs.get(name)
        if proc is not None:
            terminate_pid(proc.pid, timeout, proc=proc)
        elif self.info is not None and name in self.info.pids:
            terminate_pid(self.info.pids[name], timeout)


def create_topics(bootstrap: str | KafkaConn, specs: Iterable[Mapping] = DEFAULT_TOPICS,
                  timeout: float = 30.0) -> list[str]:
    """Create topics on `bootstrap` with aiokafka's admin client; existing topics are left alone.
    A :class:`KafkaConn` with TLS connects as its identity (the stack's admin when secure)."""
    specs = list(specs)
    conn = bootstrap if isinstance(bootstrap, KafkaConn) else KafkaConn(bootstrap)

    async def go() -> list[str]:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(**conn.kwargs(), request_timeout_ms=int(timeout * 1000))
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            new = [
                NewTopic(
                    name=s["name"],
                    num_partitions=int(s.get("partitions", 1)),
                    replication_factor=int(s.get("replication", 1)),
                    topic_configs=dict(s.get("config", {})),
                )
                for s in specs
                if s["name"] not in existing
            ]
            if new:
                resp = await admin.create_topics(new, timeout_ms=int(timeout * 1000))
                for name, code, *rest in getattr(resp, "topic_errors", []) or []:
                    if code not in (0, 36):  # 36 = TOPIC_ALREADY_EXISTS
                        raise StackError(f"create topic {name}: error {code} {rest}")
            # wait until metadata shows every topic with a leader
            names = [s["name"] for s in specs]
            deadline = time.monotonic() + timeout
            while True:
                meta = await admin.describe_topics(names)
                if all(t.get("error_code", 0) == 0 and t.get("partitions") and
                       all(p.get("leader", -1) >= 0 for p in t["partitions"]) for t in meta):
                    return [n.name for n in new]
                if time.monotonic() > deadline:
                    raise StackError(f"topics not ready: {meta}")
                await asyncio.sleep(0.1)
        finally:
            await admin.close()

    return _run_async(go())


# ----------------------------------------------------------------------------------------------
# CLI


def _read_state(path: Path) -> StackInfo:
    return StackInfo.from_json(json.loads(path.read_text()))


def _cmd_up(args) -> int:
    state = Path(args.state)
    if state.exists():
        info = _read_state(state)
        if any(_pid_alive(p) for p in info.pids.values()):
            print(f"stack already running (state {state}); run `down` first", file=sys.stderr)
            return 1
    regions = [f"region-{i}" for i in range(args.regions)]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fedstream-stack-"))
    stack = LocalStack(regions, workdir, kafka=not args.no_kafka, detach=True, secure=args.secure)
    info = stack.start()
    if not args.no_topics and info.kafka_bootstrap:
        stack.create_topics()
    data = info.to_json()
    data["secure"] = args.secure
    data["own_workdir"] = not args.workdir
    data["timings"] = stack.timings
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps(data, indent=2))
    print(json.dumps(data, indent=2))
    return 0


def _cmd_down(args) -> int:
    state = Path(args.state)
    if not state.exists():
        print(f"no state file {state}", file=sys.stderr)
        return 1
    data = json.loads(state.read_text())
    info = StackInfo.from_json(data)
    for name, pid in info.pids.items():
        # only end a pid that still runs the binary we started (pids can be reused)
        cmd = _cmdline(pid)
        wanted = str(info.workdir)
        if _pid_alive(pid) and wanted in cmd:
            terminate_pid(pid, timeout=30)
            print(f"stopped {name} (pid {pid})")
        else:
            print(f"{name} (pid {pid}) not running")
    if data.get("own_workdir") and not args.keep_data:
        shutil.rmtree(info.workdir, ignore_errors=True)
    state.unlink()
    return 0


def _cmd_status(args) -> int:
    state = Path(args.state)
    if not state.exists():
        print(f"no state file {state}: stack is down")
        return 3
    info = _read_state(state)
    secure = bool(json.loads(state.read_text()).get("secure"))
    tls_dir = info.workdir / "pki" / "tls"  # the stack's own CAs and probe identities
    ok = True
    for region, (host, port) in info.mqtt.items():
        pid = info.pids.get(f"mosquitto:{region}")
        probe = tls_paths(tls_dir, f"probe-{region}", "mqtt", region) if secure else None
        up = pid is not None and _pid_alive(pid) and mqtt_ready(host, port, tls=probe)
        ok &= up
        print(f"mosquitto {region:<12} {host}:{port:<6} pid {pid:<8} {'up' if up else 'DOWN'}")
    if info.kafka_bootstrap:
        pid = info.pids.get("kafka")
        admin = KafkaConn(info.kafka_bootstrap,
                          tls_paths(tls_dir, "admin", "kafka", KAFKA_CA) if secure else None)
        up = pid is not None and _pid_alive(pid) and kafka_ready(admin)
        ok &= up
        print(f"kafka     {'':<12} {info.kafka_bootstrap:<16} pid {pid:<8} {'up' if up else 'DOWN'}")
    print(f"workdir   {info.workdir}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    default_state = os.environ.get("FEDSTREAM_STACK_STATE", str(Path(tempfile.gettempdir()) / "fedstream-stack.json"))
    p = argparse.ArgumentParser(prog="python -m compose.localstack", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start brokers in the background, write the state file")
    up.add_argument("--state", default=default_state)
    up.add_argument("--regions", type=int, default=3)
    up.add_argument("--workdir", default=None, help="data dir (kept on down); default: a temp dir")
    up.add_argument("--no-kafka", action="store_true")
    up.add_argument("--no-topics", action="store_true", help="don't create fedstream.partials/models")
    up.add_argument("--secure", action="store_true",
                    help="locked down: mutual TLS and ACLs on both brokers, with the stack's own "
                    "CAs in WORKDIR/pki (docs/security.md)")
    down = sub.add_parser("down", help="stop what `up` started (by pid)")
    down.add_argument("--state", default=default_state)
    down.add_argument("--keep-data", action="store_true")
    st = sub.add_parser("status", help="show ports/pids and probe the brokers")
    st.add_argument("--state", default=default_state)
    args = p.parse_args(argv)
    return {"up": _cmd_up, "down": _cmd_down, "status": _cmd_status}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
