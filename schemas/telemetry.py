"""Prometheus metrics shared by the three services (names are part of the operator contract).

Each service calls :func:`serve` with ``--metrics-port`` to expose ``/metrics``; every rejected
input bumps ``fedstream_rejected_total{service, reason}`` with the reason of its
:class:`~schemas.errors.InvalidMessage`.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from schemas.errors import InvalidMessage

log = logging.getLogger("fedstream")

REJECTED = Counter(
    "fedstream_rejected_total", "Inputs rejected, by service and reason", ["service", "reason"]
)
ACCEPTED = Counter(
    "fedstream_accepted_total", "Messages accepted, by service and kind", ["service", "kind"]
)
ROUND = Gauge("fedstream_round", "Round the service is working on", ["service"])
BYTES = Counter(
    "fedstream_bytes_total", "Payload bytes moved, by service and direction", ["service", "direction"]
)
KAFKA_RETRIES = Counter(
    "fedstream_kafka_retries_total", "Kafka operations retried after an error", ["service"]
)
DUPLICATES = Counter(
    "fedstream_duplicates_total",
    "Redelivered or replayed messages answered (acked, receipt re-sent) without being stored",
    ["service"],
)
INBOX_DEPTH = Gauge(
    "fedstream_inbox_depth", "Messages waiting in the service's bounded MQTT inbox", ["service"]
)
ANOMALIES = Counter(
    "fedstream_anomalous_updates_total",
    "Agents left out of a round because their group's decrypted sum failed the bounds",
    ["reason"],
)
ANOMALOUS_ROUNDS = Counter(
    "fedstream_anomalous_rounds_total", "Rounds whose total failed the bounds and was narrowed down"
)
QUARANTINED = Gauge(
    "fedstream_quarantined_agents", "Agents currently quarantined after repeated failed updates"
)
PROJECT_VERSIONS = Gauge(
    "fedstream_devices_by_project_version",
    "Devices whose update the region accepted in the current round, by the version of the "
    "project they run (version skew during a gradual roll-out)",
    ["project", "version"],
)
ROUND_SECONDS = Histogram(
    "fedstream_round_seconds", "Wall time of one round at the global aggregator",
    buckets=(0.5, 1, 2, 5, 10, 20, 40, 80, 160),
)


def reject(service: str, exc: InvalidMessage, where: str = "") -> None:
    """Count and log one rejected input; the caller carries on."""
    REJECTED.labels(service, str(exc.reason)).inc()
    log.warning("%s rejected %s: %s", service, where or "input", exc)


def serve(port: int | None) -> None:
    if port:
        start_http_server(port, addr="127.0.0.1")
        log.info("metrics on http://127.0.0.1:%d/metrics", port)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` from a service's ``/metrics`` on loopback
    (tests and benchmarks read the services' counters with it)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out
