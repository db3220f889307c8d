"""Shared entry-point plumbing: flags that default to environment variables, logging, signals.

Configuration is read here, at the edge of the program, and nowhere else (a Kubernetes Deployment
sets the environment; a person passes flags; flags win).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any


class EnvDefaults(argparse.ArgumentParser):
    """An ArgumentParser whose ``env=`` option keyword makes an environment variable the default."""

    def add_argument(self, *args: Any, env: str | None = None, **kw: Any):  # type: ignore[override]
        if env is not None:
            kw["help"] = f"{kw.get('help', '')} [env {env}]".strip()
            if env in os.environ:
                raw = os.environ[env]
                typ = kw.get("type", str)
                kw["default"] = raw.lower() in ("1", "true", "yes") if kw.get("action") == \
                    "store_true" else typ(raw)
                kw["required"] = False
        return super().add_argument(*args, **kw)


def host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def add_service_flags(ap: EnvDefaults) -> None:
    """Flags every service has: metrics port, topic namespace, log level."""
    ap.add_argument("--metrics-port", env="METRICS_PORT", type=int, default=None,
                    help="serve Prometheus metrics on this port")
    ap.add_argument("--namespace", env="FEDSTREAM_NAMESPACE", default="fedstream",
                    help="prefix of every MQTT and Kafka topic")
    ap.add_argument("--log-level", env="LOG_LEVEL", default="info")


def add_mqtt_auth(ap: EnvDefaults) -> None:
    """Per-identity MQTT credentials and TLS, as the compose stack's Mosquitto requires."""
    ap.add_argument("--mqtt-username", env="MQTT_USERNAME", default=None, help="MQTT user name")
    ap.add_argument("--mqtt-password-file", env="MQTT_PASSWORD_FILE", type=Path, default=None,
                    help="file holding the MQTT password")
    ap.add_argument("--mqtt-ca-file", env="MQTT_CA_FILE", type=Path, default=None,
                    help="CA certificate: connect with TLS and verify the broker")


def mqtt_auth(a: argparse.Namespace) -> dict[str, Any]:
    password = a.mqtt_password_file.read_text().strip() if a.mqtt_password_file else None
    return {"mqtt_username": a.mqtt_username, "mqtt_password": password,
            "mqtt_ca_file": a.mqtt_ca_file}


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


def run_service(main: Callable[[], Any], stop: Callable[[], None]) -> None:
    """Run ``main()`` on an event loop; SIGTERM and SIGINT call ``stop`` for a clean exit."""

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        await main()

    asyncio.run(runner())
