"""One runner for the three services: typed settings from flags, environment and the project's
table, logging, signals, and a clean error for bad settings.

Each service declares its settings once, as a pydantic-settings model (:class:`ServiceSettings`
and the mixins below); flags, ``FEDSTREAM_*`` environment variables and ``--help`` all come from
that model, and so do the defaults. Precedence, highest first: flags, environment, the
``[tool.fedstream.federation]`` table of ``--project`` (for settings that have it), defaults.
Configuration is read here, at the edge of the program, and nowhere else.

Example:
    def main(argv=None):
        run(RegionalSettings, RegionalAggregator, argv)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    CliApp,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from schemas.errors import InvalidMessage
from schemas.kafka import KafkaConn
from schemas.pki import TlsFiles
from schemas.settings import FederationSettings

ENV_PREFIX = "FEDSTREAM_"


def host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


class ServiceSettings(BaseSettings):
    """Settings every service has."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", cli_kebab_case=True,
        cli_implicit_flags=True, cli_avoid_json=True, nested_model_default_partial_update=True,
        extra="forbid",
    )

    namespace: str = Field("fedstream", description="prefix of every MQTT and Kafka topic")
    metrics_port: int | None = Field(None, description="serve Prometheus metrics on this port")
    metrics_host: str = Field(
        "127.0.0.1", description="address /metrics listens on (0.0.0.0 in a container that "
        "Prometheus scrapes from another one)")
    log_level: str = Field("info", description="debug, info, warning or error")


class MqttClient(BaseSettings):
    """A broker address with per-identity credentials and TLS."""

    mqtt: str = Field(description="the region's MQTT broker, HOST:PORT")
    mqtt_username: str | None = Field(None, description="MQTT user name")
    mqtt_password_file: Path | None = Field(None, description="file holding the MQTT password")
    mqtt_ca_file: Path | None = Field(
        None, description="CA certificate: connect with TLS and verify the broker")
    mqtt_cert_file: Path | None = Field(
        None, description="this identity's MQTT client certificate (mutual TLS; the broker "
        "takes the identity from it)")
    mqtt_key_file: Path | None = Field(None, description="the TLS key of --mqtt-cert-file")

    def mqtt_tls(self, name: str, role: str) -> TlsFiles | None:
        """The MQTT TLS files, checked to be ``name``'s own (None: plain MQTT)."""
        return _tls("mqtt", self.mqtt_ca_file, self.mqtt_cert_file, self.mqtt_key_file, name, role)

    @field_validator("mqtt")
    @classmethod
    def _addr(cls, v: str) -> str:
        host_port(v)
        return v

    @property
    def mqtt_host(self) -> str:
        return host_port(self.mqtt)[0]

    @property
    def mqtt_port(self) -> int:
        return host_port(self.mqtt)[1]

    @property
    def mqtt_password(self) -> str | None:
        f = self.mqtt_password_file
        return f.read_text().strip() if f is not None else None


class KafkaClient(BaseSettings):
    """Kafka's address and, for a locked-down cluster, this identity's mutual-TLS files."""

    kafka: str = Field(description="Kafka bootstrap servers")
    kafka_ca_file: Path | None = Field(
        None, description="CA certificate of the Kafka brokers: connect with TLS")
    kafka_cert_file: Path | None = Field(
        None, description="this identity's Kafka client certificate (mutual TLS; the broker's "
        "ACLs name its CN)")
    kafka_key_file: Path | None = Field(None, description="the TLS key of --kafka-cert-file")

    @property
    def kafka_bootstrap(self) -> str:
        return self.kafka

    def kafka_conn(self, name: str, role: str) -> KafkaConn:
        """How this identity reaches Kafka, its TLS files checked to be its own."""
        tls = _tls("kafka", self.kafka_ca_file, self.kafka_cert_file, self.kafka_key_file,
                   name, role)
        return KafkaConn(self.kafka, tls)


def _tls(kind: str, ca: Path | None, cert: Path | None, key: Path | None, name: str,
         role: str) -> TlsFiles | None:
    if ca is None and cert is None and key is None:
        return None
    if ca is None or cert is None or key is None:
        raise ValueError(f"--{kind}-ca-file, --{kind}-cert-file and --{kind}-key-file go "
                         "together (mutual TLS)")
    files = TlsFiles(ca, cert, key)
    files.check(name, role)  # PkiError (a ValueError): another identity's files
    return files


class _TableSource(PydanticBaseSettingsSource):
    """The project's ``federation`` table as the lowest-precedence settings source."""

    def __init__(self, settings_cls: type[BaseSettings], table: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self.table = table

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.table.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self.table.items() if k in self.settings_cls.model_fields}


S = TypeVar("S", bound=BaseSettings)


def parse_settings(cls: type[S], argv: list[str] | None = None, prog: str | None = None) -> S:
    """Settings from ``argv`` (flags), the environment and, for the federation's settings, the
    federation table of ``--project``. Bad settings exit with status 2 and one message."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or cls.model_config.get("cli_prog_name") or cls.__name__
    table: dict[str, Any] = {}
    if issubclass(cls, FederationSettings) and "-h" not in argv and "--help" not in argv:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--project", default=os.environ.get(f"{ENV_PREFIX}PROJECT"))
        path = pre.parse_known_args(argv)[0].project
        if path:
            from schemas.project import load_project

            try:
                table = load_project(path).federation_table
            except ValueError as exc:
                _fail(prog, str(exc))

    class WithTable(cls):  # type: ignore[valid-type, misc]
        @classmethod
        def settings_customise_sources(cls_, settings_cls, init_settings, env_settings,
                                       dotenv_settings, file_secret_settings):
            return init_settings, env_settings, _TableSource(settings_cls, table)

    WithTable.__name__ = WithTable.__qualname__ = cls.__name__
    WithTable.__doc__ = cls.__doc__
    WithTable.model_config = {**cls.model_config, "cli_prog_name": prog}
    try:
        parsed = CliApp.run(WithTable, cli_args=argv)
    except ValidationError as exc:
        _fail(prog, "invalid settings:\n" + "\n".join(
            f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()))
    return parsed  # an instance of cls (a subclass that only adds the project's table)


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Service(Protocol):
    async def run(self) -> None: ...
    def stop(self) -> None: ...


def run(cls: type[S], make: Callable[[S], Service], argv: list[str] | None = None,
        prog: str | None = None) -> None:
    """Parse settings, set up logging, build the service (a ``ValueError`` is a clear
    configuration error, exit 2), then run it until it finishes or gets SIGTERM / SIGINT."""
    s = parse_settings(cls, argv, prog)
    setup_logging(str(getattr(s, "log_level", "info")))
    try:
        svc = make(s)
    except (ValueError, FileNotFoundError, InvalidMessage) as exc:
        _fail(prog or cls.__name__, str(exc))
    run_service(svc.run, svc.stop)


def tune_malloc(*, mmap_threshold: int | None = None, arena_max: int | None = None) -> None:
    """glibc's allocator settings for a long-running service (a no-op elsewhere).

    ``mmap_threshold``: serve every buffer above it with its own mmap, returned to the OS when
    freed. ``arena_max``: at most this many malloc arenas, instead of 8 per core for the
    threads a runtime such as XLA starts (each arena keeps its own free memory).
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        if mmap_threshold is not None:
            libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
        if arena_max is not None:
            libc.mallopt(-8, arena_max)  # M_ARENA_MAX


def die_with_parent() -> None:
    """Runs in a child between fork and exec: the kernel kills it (SIGKILL) when the thread
    that started it exits, so it cannot outlive a parent killed -9."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def terminate_child(proc: Any, timeout: float = 10.0) -> None:
    """SIGTERM a child this process started (a ``subprocess.Popen``), SIGKILL after
    ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


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
