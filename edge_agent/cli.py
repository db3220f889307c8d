"""``fedstream-edge-agent``: one device of the fleet."""

from __future__ import annotations

from pathlib import Path

from edge_agent.service import EdgeAgent, EdgeSettings
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
        prog="fedstream-edge-agent",
        description="Train on this device's data when a round task arrives (retained MQTT model "
        "topic of the region), publish the clipped, quantized, CKKS-encrypted update with QoS 1, "
        "and keep it until the regional receipt names this agent. Exits after the final model.",
    )
    ap.add_argument("--agent-id", env="AGENT_ID", required=True, help="identity, e.g. agent-003")
    ap.add_argument("--region", env="REGION", required=True, help="region, e.g. region-0")
    ap.add_argument("--mqtt", env="MQTT_ADDR", type=host_port, required=True,
                    help="regional broker HOST:PORT")
    ap.add_argument("--keys", env="KEYS_DIR", type=Path, required=True,
                    help="key directory from fedstream-keygen (public HE context + own key)")
    ap.add_argument("--num-agents", env="NUM_AGENTS", type=int, required=True,
                    help="fleet size (the demo derives this device's data shard from it)")
    ap.add_argument("--task", env="TASK", default="digits", choices=["digits", "telemetry"],
                    help="local dataset")
    ap.add_argument("--partition", env="PARTITION", default="dirichlet",
                    choices=["iid", "dirichlet", "quantity"], help="how the demo data is split")
    ap.add_argument("--alpha", env="ALPHA", type=float, default=0.5, help="Dirichlet alpha")
    ap.add_argument("--data-seed", env="DATA_SEED", type=int, default=0, help="data split seed")
    ap.add_argument("--straggle-s", env="STRAGGLE_S", type=float, default=0.0,
                    help="testing: wait this long before publishing each update")
    ap.add_argument("--report-eval", env="REPORT_EVAL", action="store_true",
                    help="opt in: send this device's local test loss and accuracy IN CLEAR beside "
                    "its encrypted update (off by default: only ciphertext and a coarse weight "
                    "leave the device)")
    add_mqtt_auth(ap)
    add_service_flags(ap)
    a = ap.parse_args(argv)
    setup_logging(a.log_level)
    try:
        agent = EdgeAgent(EdgeSettings(
            agent_id=a.agent_id, region=a.region, mqtt_host=a.mqtt[0], mqtt_port=a.mqtt[1],
            keys_dir=a.keys, num_agents=a.num_agents, partition=a.partition, alpha=a.alpha,
            data_seed=a.data_seed, task_name=a.task, straggle_s=a.straggle_s,
            metrics_port=a.metrics_port, namespace=a.namespace, report_eval=a.report_eval,
            **mqtt_auth(a),
        ))
    except (ValueError, FileNotFoundError, InvalidMessage) as exc:
        ap.error(str(exc))
    run_service(agent.run, agent.stop)


if __name__ == "__main__":
    main()
