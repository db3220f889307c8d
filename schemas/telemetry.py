"""Prometheus metrics shared by the three services (names are part of the operator contract).

Each service calls :func:`serve` with ``--metrics-port`` to expose ``/metrics``; every rejected
input bumps ``fedstream_rejected_total{service, reason}`` with the reason of its
:class:`~schemas.errors.InvalidMessage`.

The service level indicators an operator watches (docs/operations.md has the table, the alert
rules in compose/monitoring/rules.yml and the dashboard compose/monitoring/grafana/fedstream.json
read them):

====  ===================================  =================================================
M1    participation                        ``fedstream_participation_ratio`` (+ participants,
                                           selected devices)
M2    aggregation latency                  ``fedstream_round_seconds``,
                                           ``fedstream_partial_commit_seconds``
M3    global validation loss / accuracy    ``fedstream_global_loss``, ``fedstream_global_accuracy``
M4    update bytes                         ``fedstream_round_update_bytes``, ``fedstream_bytes_total``
M5    failed updates by reason             ``fedstream_rejected_total``
M6    staleness, version skew (F8)         ``fedstream_update_staleness_versions``,
                                           ``fedstream_model_version``,
                                           ``fedstream_devices_by_project_version``
M7    privacy budget spent                 ``fedstream_privacy_epsilon`` (of
                                           ``fedstream_privacy_epsilon_budget``)
M8    anomalous updates                    ``fedstream_anomalous_updates_total``,
                                           ``fedstream_quarantined_agents``
M9    CPU, memory, inbox depth (F4)        ``process_cpu_seconds_total``,
                                           ``process_resident_memory_bytes`` (prometheus_client's
                                           process collector), ``fedstream_inbox_depth``
M10   rounds to target                     ``fedstream_rounds_to_target``,
                                           ``fedstream_accuracy_target_reached``
F7    retries                              ``fedstream_kafka_retries_total``
Kafka consumer lag                         ``fedstream_kafka_consumer_lag``
====  ===================================  =================================================

Counters with a ``reason`` label are created at zero for every known reason when a service
starts (:func:`serve` with its name): Prometheus' ``increase()`` cannot see the first jump of a
series that appears with its first increment, and a rejection spike must alert.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from schemas.errors import InvalidMessage, Reason

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

# -- service level indicators (docs/operations.md) -----------------------------------------------

# M1: participation, set by the global when it closes a round
PARTICIPANTS = Gauge(
    "fedstream_round_participants",
    "M1: devices whose update counted in the last round the global closed")
SELECTED = Gauge(
    "fedstream_round_selected_devices",
    "M1: devices asked to train in the last round the global closed (sampled, not quarantined)")
PARTICIPATION = Gauge(
    "fedstream_participation_ratio",
    "M1: participants / selected devices of the last round the global closed (1: every "
    "selected device's update counted; below 1: devices offline, late, refused or left out)")
ROUNDS = Counter(
    "fedstream_rounds_total",
    "Rounds the global closed, by outcome: stepped (the model changed) or unchanged (fewer "
    "usable participants than --min-participants: the model was republished as it was)",
    ["outcome"])
# M2: latency (the global's round: ROUND_SECONDS above)
PARTIAL_COMMIT_SECONDS = Histogram(
    "fedstream_partial_commit_seconds",
    "M2: seconds a regional aggregator took to write one partial sum to Kafka (one "
    "transaction, retries included); its updates are acked only after it",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
# M3: the published model's quality
ACCURACY = Gauge(
    "fedstream_global_accuracy",
    "M3: accuracy of the newest global model version: source=server on the project's "
    "held-out evaluation set; source=federated averaged over the devices' own test splits, "
    "as devices with --report-eval measured the version they trained from", ["source"])
LOSS = Gauge(
    "fedstream_global_loss",
    "M3: validation loss of the newest global model version (source as for "
    "fedstream_global_accuracy)", ["source"])
# M4: traffic
ROUND_UPDATE_BYTES = Gauge(
    "fedstream_round_update_bytes",
    "M4: bytes of device updates (encrypted chunks as sent over MQTT) summed into the last "
    "round the global closed; divide by fedstream_round_participants for bytes per device")
# M6 / F8: staleness and version skew
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16)
MODEL_VERSION = Gauge(
    "fedstream_model_version",
    "M6: newest model version this service published (global) or relayed to its devices "
    "(regional); a region behind the global is not receiving the model topic", ["service"])
MODEL_PUBLISHED = Gauge(
    "fedstream_model_published_timestamp_seconds",
    "Unix time the global published its newest model version: time() minus this is how long "
    "the federation has not moved")
MODEL_FINAL = Gauge(
    "fedstream_model_final",
    "1 once the global published the final model version (no more rounds are expected)")
STALENESS = Histogram(
    "fedstream_update_staleness_versions",
    "M6: per accepted device update, model versions between the one the device trained on "
    "and the newest the region relays (0: up to date; FedBuff accepts up to --max-staleness "
    "rounds behind)", buckets=STALENESS_BUCKETS)
# M7: differential privacy (set by the accountant at the global)
PRIVACY_EPSILON = Gauge(
    "fedstream_privacy_epsilon",
    "M7: privacy budget spent so far: epsilon of the (epsilon, delta)-differential privacy "
    "guarantee the federation's noise gives every device over all rounds to date (0 without "
    "DP)")
PRIVACY_BUDGET = Gauge(
    "fedstream_privacy_epsilon_budget",
    "M7: the epsilon the federation may spend in total (0: no budget configured); the "
    "federation must stop or change its DP settings before fedstream_privacy_epsilon reaches it")
PRIVACY_DELTA = Gauge(
    "fedstream_privacy_delta", "M7: delta of the (epsilon, delta) guarantee")
# M10: rounds to target
ACCURACY_TARGET = Gauge(
    "fedstream_accuracy_target",
    "M10: the accuracy the federation counts rounds to (--accuracy-target; 0: none)")
ROUNDS_TO_TARGET = Gauge(
    "fedstream_rounds_to_target",
    "M10: the round in which the global model's accuracy (server, else federated) first "
    "reached --accuracy-target; until then the rounds run so far")
TARGET_REACHED = Gauge(
    "fedstream_accuracy_target_reached",
    "M10: 1 once the global model reached --accuracy-target, else 0")
# Kafka (no Kafka exporter in the stack: the consumer reports its own lag)
KAFKA_LAG = Gauge(
    "fedstream_kafka_consumer_lag",
    "Committed Kafka records this service has not read yet (last stable offset minus its "
    "position), per topic, sampled after each poll", ["service", "topic"])

#: reasons a decrypted sum fails the bounds (the ``reason`` of fedstream_anomalous_updates_total)
BOUNDS_REASONS = (Reason.LANE_BOUND, Reason.INEXACT_SUM, Reason.WEIGHT_MISMATCH, Reason.L2_BOUND)


def reject(service: str, exc: InvalidMessage, where: str = "") -> None:
    """Count and log one rejected input; the caller carries on."""
    REJECTED.labels(service, str(exc.reason)).inc()
    log.warning("%s rejected %s: %s", service, where or "input", exc)


def serve(port: int | None, service: str | None = None, host: str = "127.0.0.1") -> None:
    """Expose ``/metrics`` on ``host:port`` (nothing without a port). With ``service``, create
    that service's labelled series at zero first, so that a dashboard or an alert sees a
    counter's first increase and the process' series exist from the start."""
    if not port:
        return
    if service is not None:
        for reason in Reason:
            REJECTED.labels(service, str(reason))
        ROUND.labels(service)
        if service in ("global", "regional"):  # the Kafka tiers
            for metric in (KAFKA_RETRIES, DUPLICATES, MODEL_VERSION):
                metric.labels(service)
        if service == "regional":
            INBOX_DEPTH.labels(service)
        if service == "global":
            for r in BOUNDS_REASONS:
                ANOMALIES.labels(str(r))
            for outcome in ("stepped", "unchanged"):
                ROUNDS.labels(outcome)
    start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port)


def published(service: str, version: int, final: bool) -> None:
    """A model version left this service (global: published; regional: relayed)."""
    MODEL_VERSION.labels(service).set(version)
    if service == "global":
        MODEL_PUBLISHED.set(time.time())
        MODEL_FINAL.set(1 if final else 0)


class _Target:
    """M10 state: whether the accuracy target was reached (first round kept)."""

    reached_in: int | None = None


def record_round(metrics: Mapping[str, float], round_id: int, selected: int | None,
                 accuracy_target: float | None = None) -> None:
    """Set the per-round indicators from a closed round's provenance metrics (the global's
    ``participants``, ``update_bytes``, ``server_*``/``federated_*``; ``weight_sum`` only when
    the model stepped). ``selected``: devices asked to train (None in FedBuff, where a step
    takes whichever devices report)."""
    n = float(metrics.get("participants", 0.0))
    PARTICIPANTS.set(n)
    if selected:
        SELECTED.set(selected)
        PARTICIPATION.set(n / selected)
    ROUND_UPDATE_BYTES.set(float(metrics.get("update_bytes", 0.0)))
    ROUNDS.labels("stepped" if "weight_sum" in metrics else "unchanged").inc()
    for source in ("server", "federated"):
        for name, gauge in (("accuracy", ACCURACY), ("loss", LOSS)):
            value = metrics.get(f"{source}_{name}")
            if value is not None and value == value:  # not NaN (an empty evaluation set)
                gauge.labels(source).set(value)
    if accuracy_target:
        ACCURACY_TARGET.set(accuracy_target)
        acc = metrics.get("server_accuracy", metrics.get("federated_accuracy"))
        if _Target.reached_in is None:
            ROUNDS_TO_TARGET.set(round_id)
            if acc is not None and acc >= accuracy_target:
                _Target.reached_in = round_id
                TARGET_REACHED.set(1)
                log.info("accuracy target %.3f reached in round %d", accuracy_target, round_id)


async def observe_lag(consumer: Any, service: str) -> None:
    """``fedstream_kafka_consumer_lag`` of every partition an aiokafka consumer holds: read
    after a poll, and only where a fetch has told the consumer the partition's end."""
    for tp in consumer.assignment():
        end = consumer.last_stable_offset(tp)
        if end is None or end < 0:  # read_uncommitted consumers know only the high watermark
            end = consumer.highwater(tp)
        if end is None:
            continue
        KAFKA_LAG.labels(service, tp.topic.rpartition(".")[2]).set(
            max(0, end - await consumer.position(tp)))


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
