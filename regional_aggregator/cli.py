"""``fedstream-regional-aggregator``: the summing service of one region."""

from __future__ import annotations

from pathlib import Path

from regional_aggregator.service import RegionalAggregator, RegionalSettings
from schemas.cli import (
    EnvDefaults,
    add_mqtt_auth,
    add_service_flags,
    host_port,
    mqtt_auth,
    run_service,
    setup_logging,
)
from schemas.errors import InvalidMessage


def main(argv: list[str] | None = None) -> None:
    ap = EnvDefaults(
        prog="fedstream-regional-aggregator",
        description="Take the region's encrypted updates from MQTT (persistent session, manual "
        "ack), add them without decrypting, write the partial sum to Kafka, then ack and publish "
        "receipts. Relays each new model version from Kafka to the region's retained MQTT topic.",
    )
    ap.add_argument("--region", env="REGION", required=True, help="region id, e.g. region-0")
    ap.add_argument("--mqtt", env="MQTT_ADDR", type=host_port, required=True,
                    help="regional broker HOST:PORT")
    ap.add_argument("--kafka", env="KAFKA_BOOTSTRAP", required=True, help="Kafka bootstrap servers")
    ap.add_argument("--keys", env="KEYS_DIR", type=Path, required=True,
                    help="key directory (public HE context + the region's key)")
    ap.add_argument("--model", env="MODEL_NAME", default="",
                    help="model to relay (default: whichever model the namespace carries)")
    ap.add_argument("--min-agents-per-partial", env="MIN_AGENTS_PER_PARTIAL", type=int,
                    default=RegionalSettings.min_agents_per_partial,
                    help="privacy floor k: never forward a sum (a group) of fewer agents; the "
                    "round task's floor applies if higher")
    ap.add_argument("--max-groups", env="MAX_GROUPS", type=int,
                    default=RegionalSettings.max_groups,
                    help="sum the region's agents in at most this many disjoint groups of >= k, "
                    "so a poisoned total can be narrowed down to one group")
    ap.add_argument("--max-message-bytes", env="MAX_MESSAGE_BYTES", type=int,
                    default=RegionalSettings.max_message_bytes,
                    help="reject larger MQTT messages (the local stack's Mosquitto refuses them "
                    "too)")
    ap.add_argument("--inbox-size", env="INBOX_SIZE", type=int,
                    default=RegionalSettings.inbox_size,
                    help="MQTT messages held for verification before backpressure")
    ap.add_argument("--rate-per-s", env="RATE_PER_S", type=float,
                    default=RegionalSettings.rate_per_s,
                    help="sustained messages per second one device may send")
    ap.add_argument("--rate-burst", env="RATE_BURST", type=float,
                    default=RegionalSettings.rate_burst,
                    help="messages one device may send at once")
    ap.add_argument("--kafka-budget-s", env="KAFKA_BUDGET_S", type=float, default=15.0,
                    help="seconds one attempt to commit a partial may take before it is retried "
                    "with a new producer")
    ap.add_argument("--robust", env="ROBUST_RULE", default="",
                    help="plaintext rounds only (a trusted region that sees updates): aggregate "
                    "with a robust rule: median, trimmed:BETA, krum:F, multikrum:F:M, norm:C or "
                    "mean (default: the plain sum)")
    add_mqtt_auth(ap)
    add_service_flags(ap)
    a = ap.parse_args(argv)
    setup_logging(a.log_level)
    try:
        svc = RegionalAggregator(RegionalSettings(
            region=a.region, mqtt_host=a.mqtt[0], mqtt_port=a.mqtt[1], kafka_bootstrap=a.kafka,
            keys_dir=a.keys, model_name=a.model, min_agents_per_partial=a.min_agents_per_partial,
            max_groups=a.max_groups, inbox_size=a.inbox_size, rate_per_s=a.rate_per_s,
            rate_burst=a.rate_burst, robust=a.robust,
            max_message_bytes=a.max_message_bytes, kafka_budget_s=a.kafka_budget_s,
            metrics_port=a.metrics_port, namespace=a.namespace, **mqtt_auth(a),
        ))
    except (ValueError, FileNotFoundError, InvalidMessage) as exc:
        ap.error(str(exc))
    run_service(svc.run, svc.stop)


if __name__ == "__main__":
    main()
