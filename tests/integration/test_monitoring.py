"""A real Prometheus and Alertmanager (Debian's packages, run on loopback by compose.monitoring)
watching a real federation on the local brokers: every dashboard query resolves against the
services' live /metrics, and alerts fire and resolve for real, read back from Alertmanager's
API and its webhook: half the devices of two regions stop (participation), forged and garbage
updates arrive (rejection spike), the global dies (a tier down).

The rules are the committed ones with short windows (AlertSettings), scraped and evaluated
every second, so the whole module takes about two minutes."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from compose.monitoring import (
    PROMETHEUS_SERIES,
    AlertSettings,
    Monitoring,
    as_run,
    dashboard_queries,
    metric_names,
    missing_binaries,
    monitor_ports,
)
from schemas import fedstream_pb2 as pb
from schemas.signing import header, seal
from schemas.topics import Topics
from tests.e2e.helpers import make_federation, scrape

pytestmark = [pytest.mark.network, pytest.mark.slow]

#: the committed rules, with windows a test can wait for
FAST = AlertSettings(participation_for="0s", rejection_window="20s", rejections=3,
                     down_for="2s", pending_for="30s")
FORGED = 10  # forged updates and garbage messages, each


class Webhook:
    """Alertmanager's receiver: a loopback HTTP server that keeps every notification."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.posts.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def notified(self, alertname: str, status: str) -> bool:
        return any(a["labels"]["alertname"] == alertname and a["status"] == status
                   for p in self.posts for a in p["alerts"])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def watched(stack, tmp_path_factory) -> Iterator[tuple[Any, Monitoring, Webhook, dict]]:
    """A federation (2 regions x 3 devices, rounds until the test ends, 6 s deadline) whose
    global and regional aggregators Prometheus scrapes every second."""
    lost = missing_binaries()
    if lost:
        pytest.fail(lost)
    tmp = tmp_path_factory.mktemp("monitoring")
    fed = make_federation(stack.mqtt, stack.kafka_bootstrap, tmp,
                          f"t-monitoring-{uuid.uuid4().hex[:8]}", agents=6, regions=2,
                          rounds=1000, deadline_s=6, extra_global=["--accuracy-target", "0.5"])
    targets = monitor_ports(fed, edges=False)
    ports = {t.process: int(t.address.rsplit(":", 1)[1]) for t in targets}
    hook = Webhook()
    mon = Monitoring(targets, tmp / "prom", alert_settings=FAST, scrape_interval="1s",
                     webhook_url=hook.url)
    try:
        mon.start()
        fed.start_all()
        yield fed, mon, hook, ports
    finally:
        fed.stop_all()
        mon.stop()
        hook.close()


def _wait(what: str, check: Callable[[], Any], timeout: float, fed=None, mon=None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except OSError:  # a process not listening yet
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            logs = "" if fed is None else "\n".join(f"== {n}\n{fed.log(n, 15)}" for n in
                                                     ("global", *fed.fleet))
            state = "" if mon is None else f"\nPrometheus alerts: {mon.rule_alerts()}\n" \
                f"Alertmanager: {mon.alerts()}\ntargets: {mon.scrape_health()}"
            pytest.fail(f"timed out after {timeout}s waiting for {what}{state}\n{logs}")
        time.sleep(0.5)


def _version(ports: dict) -> int:
    key = ("fedstream_model_version", (("service", "global"),))
    return int(scrape(ports["global"]).get(key, -1))


def _firing(mon: Monitoring, name: str, **labels: str) -> list[dict]:
    return [a for a in mon.alerts() if a["labels"]["alertname"] == name
            and a["status"]["state"] == "active"
            and all(a["labels"].get(k) == v for k, v in labels.items())]


def _forge(fed, region: str, n: int) -> None:
    """``n`` updates signed with a key that is not the device's, and ``n`` garbage messages,
    on a real device's topic (the open local stack lets anyone publish)."""
    victim = fed.fleet[region][0]
    topic = Topics(fed.namespace).update(region, victim)
    thief = Ed25519PrivateKey.generate()
    forged = [seal(pb.UPDATE_CHUNK, pb.UpdateChunk(
        header=header(victim, 1, 0, "f" * 64), agent_id=victim, region=region,
        payload=b"\x00" * 64, weight=10), victim, thief, topic=topic) for _ in range(n)]
    host, port = fed.mqtt[region]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"forger-{uuid.uuid4().hex}")
    client.connect(host, port)
    client.loop_start()
    try:
        for raw in [*forged, *[b"\xffnot an envelope" * 8] * n]:
            client.publish(topic, raw, qos=1).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()


# ----------------------------------------------------------------------------------------------


def test_every_dashboard_query_resolves_against_the_live_services(watched):
    fed, mon, _, ports = watched
    # a few rounds, so that every per-round series has been set
    _wait("model version 3", lambda: _version(ports) >= 3, 180, fed)
    queries = dashboard_queries()
    wanted = set().union(*(metric_names(q) for _, q in queries)) - PROMETHEUS_SERIES
    # Execute: the services' own /metrics, a few times (a region's per-round series are reset
    # when a round starts), and every query through Prometheus
    exported: set[str] = set()

    def exported_all() -> bool:
        for port in ports.values():
            exported.update(name for name, _ in scrape(port))
        return wanted <= exported

    _wait(f"every dashboard metric in a live /metrics; missing {wanted - exported}",
          exported_all, 30)
    in_prometheus: set[str] = set()

    def stored_all() -> bool:
        regex = "|".join(sorted(wanted | {"up"}))
        got = mon.query(f'count by (__name__) ({{__name__=~"{regex}"}})')
        in_prometheus.update(r["metric"]["__name__"] for r in got)
        return wanted | {"up"} <= in_prometheus

    _wait("every dashboard metric scraped by Prometheus", stored_all, 30)
    # Assert: Prometheus accepts every query (variables replaced as Grafana would), and those
    # without a filter that may empty them (e.g. "> 0") return series. A region's per-round
    # series are absent from a round's start until its first accepted update, so a query that
    # is empty at one instant is asked again, for up to 30 s
    empty = {(t, e) for t, e in queries if ">" not in e and "ALERTS" not in e}
    deadline = time.monotonic() + 30
    while True:
        for title, expr in queries:
            if mon.query(as_run(expr)):  # raises if Prometheus refuses the expression
                empty.discard((title, expr))
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not empty, f"queries with no data within 30 s: {sorted(empty)}"
    assert set(mon.scrape_health().values()) == {"up"}, mon.scrape_health()


def test_alerts_fire_and_resolve_for_real(watched):
    fed, mon, hook, ports = watched
    _wait("a first round", lambda: _version(ports) >= 1, 180, fed)
    assert not _firing(mon, "FedstreamParticipationLow")
    assert not _firing(mon, "FedstreamRejectionSpike")
    # Execute 1: one of the three devices of each region stops (4 of 6 participate) and forged
    # updates arrive at region-0
    stopped = [fed.fleet[r][0] for r in fed.fleet]
    for name in stopped:
        fed.kill(name)
    _forge(fed, "region-0", FORGED)
    # Assert 1: both alerts reach Alertmanager (and its receiver) with their labels
    low = _wait("FedstreamParticipationLow in Alertmanager",
                lambda: _firing(mon, "FedstreamParticipationLow"), 90, fed, mon)
    assert low[0]["labels"]["job"] == "global" and low[0]["labels"]["severity"] == "warning"
    assert low[0]["annotations"]["runbook"] == "docs/operations.md#fedstreamparticipationlow"
    assert "66.67%" in low[0]["annotations"]["summary"], low[0]["annotations"]  # 4 of 6
    spikes = _wait("FedstreamRejectionSpike in Alertmanager",
                   lambda: {a["labels"]["reason"] for a in
                            _firing(mon, "FedstreamRejectionSpike", process="region-0")}
                   >= {"bad_signature", "malformed"}, 60, fed, mon)
    assert spikes
    _wait("the webhook's firing notifications",
          lambda: hook.notified("FedstreamParticipationLow", "firing")
          and hook.notified("FedstreamRejectionSpike", "firing"), 30, fed, mon)
    # Execute 2: the devices come back; no more forgeries
    for name in stopped:
        fed.start(name)
    # Assert 2: both resolve (a full round; the 20 s window passes) and drop out of the API
    _wait("FedstreamParticipationLow resolved",
          lambda: not _firing(mon, "FedstreamParticipationLow"), 120, fed, mon)
    _wait("FedstreamRejectionSpike resolved",
          lambda: not _firing(mon, "FedstreamRejectionSpike"), 60, fed, mon)
    _wait("the webhook's resolved notifications",
          lambda: hook.notified("FedstreamParticipationLow", "resolved")
          and hook.notified("FedstreamRejectionSpike", "resolved"), 30, fed, mon)
    ratio = mon.query('fedstream_participation_ratio{job="global"}')
    assert float(ratio[0]["value"][1]) == 1.0
    # Execute 3 + Assert 3: the global dies: its tier is down
    fed.kill("global")
    down = _wait("FedstreamTierDown for the global",
                 lambda: _firing(mon, "FedstreamTierDown", job="global"), 60, fed, mon)
    assert down[0]["labels"]["severity"] == "critical"
    assert not _firing(mon, "FedstreamTierDown", job="regional")
