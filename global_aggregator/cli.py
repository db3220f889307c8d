"""``fedstream-global-aggregator``: the round coordinator (the only holder of the secret key)."""

from __future__ import annotations

from pathlib import Path

from edge_agent.train import LocalTrainConfig
from global_aggregator.service import GlobalAggregator, GlobalSettings
from global_aggregator.strategies import STRATEGIES
from schemas.cli import EnvDefaults, add_service_flags, run_service, setup_logging
from schemas.codec import CodecParams
from schemas.errors import InvalidMessage


def build_parser() -> EnvDefaults:
    ap = EnvDefaults(
        prog="fedstream-global-aggregator",
        description="Drive the federated rounds: publish signed model versions with their round "
        "task to the compacted Kafka model topic, consume the regions' encrypted partial sums, "
        "decrypt only their total, apply the server optimizer, and publish the next version in "
        "the same Kafka transaction as the consumer offsets. Resumes from the topics on restart.",
    )
    ap.add_argument("--kafka", env="KAFKA_BOOTSTRAP", required=True, help="Kafka bootstrap servers")
    ap.add_argument("--keys", env="KEYS_DIR", type=Path, required=True,
                    help="key directory with the SECRET HE context and the global key")
    ap.add_argument("--secret-context", env="HE_SECRET_CONTEXT", type=Path, default=None,
                    help="secret HE context file (default: KEYS/he/secret.ctx)")
    ap.add_argument("--rounds", env="ROUNDS", type=int, default=15, help="rounds to run")
    ap.add_argument("--min-participants", env="MIN_PARTICIPANTS", type=int, default=1,
                    help="agents a round needs before the model may change")
    ap.add_argument("--strategy", env="AGGREGATION_STRATEGY", default="fedavg",
                    choices=sorted(STRATEGIES), help="server optimizer")
    ap.add_argument("--server-lr", env="SERVER_LR", type=float, default=None,
                    help="server learning rate (default: the strategy's own, 1.0 for fedavg)")
    ap.add_argument("--deadline-s", env="ROUND_DEADLINE_S", type=float, default=60.0,
                    help="seconds agents have per round")
    ap.add_argument("--grace-s", env="ROUND_GRACE_S", type=float, default=15.0,
                    help="extra seconds to wait for regions after the deadline")
    ap.add_argument("--task", env="TASK", default="digits", choices=["digits", "telemetry"])
    ap.add_argument("--model", env="MODEL_NAME", default="", help="model (default: the task's)")
    ap.add_argument("--seed", env="SEED", type=int, default=0, help="federation seed")
    ap.add_argument("--clients-per-round", env="CLIENTS_PER_ROUND", type=float, default=1.0,
                    help="fraction of agents sampled each round")
    ap.add_argument("--bits", env="QUANT_BITS", type=int, default=8, help="quantization bits")
    ap.add_argument("--clip-l2", env="CLIP_L2", type=float, default=CodecParams.clip_l2)
    ap.add_argument("--clip-coord", env="CLIP_COORD", type=float, default=CodecParams.clip_coord)
    ap.add_argument("--max-summands", env="MAX_SUMMANDS", type=int, default=64,
                    help="largest number of updates one sum may hold")
    ap.add_argument("--chunk-bytes", env="CHUNK_BYTES", type=int,
                    default=CodecParams.chunk_bytes,
                    help="target size of one update chunk (one MQTT / Kafka message)")
    ap.add_argument("--plaintext", env="PLAINTEXT", action="store_true",
                    help="trusted deployments: quantize + zstd, no HE")
    ap.add_argument("--min-group", env="MIN_GROUP", type=int, default=GlobalSettings.min_group,
                    help="privacy floor k: never decrypt a sum of fewer agents (regions sum "
                    "agents in groups of at least k)")
    ap.add_argument("--quarantine-after", env="QUARANTINE_AFTER", type=int,
                    default=GlobalSettings.quarantine_after,
                    help="quarantine a device after this many rounds in a row in which its group "
                    "failed the bounds (lift with fedstream-quarantine)")
    ap.add_argument("--linger-s", env="LINGER_S", type=float, default=0.0,
                    help="after the final version, keep serving /metrics this many seconds (or "
                    "until SIGTERM) so the last round's numbers can be scraped")
    ap.add_argument("--local-optimizer", env="LOCAL_OPTIMIZER", default="sgd")
    ap.add_argument("--local-lr", env="LOCAL_LR", type=float, default=0.1)
    ap.add_argument("--local-epochs", env="LOCAL_EPOCHS", type=int, default=1)
    ap.add_argument("--batch-size", env="BATCH_SIZE", type=int, default=32)
    ap.add_argument("--prox-mu", env="PROX_MU", type=float, default=0.0, help="FedProx mu")
    add_service_flags(ap)
    return ap


def settings_from_args(a) -> GlobalSettings:
    return GlobalSettings(
        kafka_bootstrap=a.kafka, keys_dir=a.keys, rounds=a.rounds,
        min_participants=a.min_participants, strategy=a.strategy, server_lr=a.server_lr,
        round_deadline_s=a.deadline_s, grace_s=a.grace_s, task_name=a.task,
        model_name=a.model, seed=a.seed, clients_per_round=a.clients_per_round,
        codec=CodecParams(bits=a.bits, clip_l2=a.clip_l2, clip_coord=a.clip_coord,
                          max_summands=a.max_summands, encrypted=not a.plaintext,
                          chunk_bytes=a.chunk_bytes),
        train=LocalTrainConfig(optimizer=a.local_optimizer, lr=a.local_lr,
                               epochs=a.local_epochs, batch_size=a.batch_size,
                               prox_mu=a.prox_mu),
        metrics_port=a.metrics_port, secret_context=a.secret_context, namespace=a.namespace,
        min_group=a.min_group, quarantine_after=a.quarantine_after, linger_s=a.linger_s,
    )


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    a = ap.parse_args(argv)
    setup_logging(a.log_level)
    try:
        svc = GlobalAggregator(settings_from_args(a))
    except (ValueError, FileNotFoundError, InvalidMessage) as exc:
        ap.error(str(exc))
    run_service(svc.run, svc.stop)


if __name__ == "__main__":
    main()
