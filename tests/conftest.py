"""Shared fixtures. Brokers start lazily: only a test that requests `stack` / `stack_factory`
(mark it @pytest.mark.network) starts Mosquitto/Kafka; unit tests never do.

- stack          session-scoped LocalStack (regions "region-0", "region-1" + one KRaft Kafka;
                 Mosquitto capped at 128 KB messages like AWS IoT Core), started on first use, stopped at the end of the session. Don't kill it: use
                 stack_factory for fault injection.
- secure_stack   session-scoped locked-down LocalStack (mutual TLS, ACLs; regions region-0..3).
- stack_factory  function-scoped: make(regions=("region-0",), kafka=True, **kw) -> started LocalStack
                 of your own (kill/restart freely); all are stopped at teardown.
- topic_prefix   function-scoped unique, Kafka- and MQTT-safe name prefix, e.g. "t-test-foo-1a2b3c4d".
"""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

import pytest

DEFAULT_REGIONS = ("region-0", "region-1")
MANAGED_BROKER_LIMIT = 128 * 1024


def _brokers_available() -> str | None:
    """None when the local brokers can be started here, else the reason they cannot."""
    from compose import localstack as ls

    if not (shutil.which(ls.MOSQUITTO_BIN) or Path(ls.MOSQUITTO_BIN).exists()):
        return f"mosquitto not found ({ls.MOSQUITTO_BIN}); run compose/install.sh"
    if not (ls.KAFKA_LIBS / f"kafka_2.13-{ls.KAFKA_VERSION}.jar").exists():
        return f"Kafka {ls.KAFKA_VERSION} jars not found in {ls.KAFKA_LIBS}; run compose/install.sh"
    if not shutil.which(ls.JAVA_BIN):
        return "java not found"
    return None


def _require_brokers() -> None:
    """Broker tests never skip: a missing broker is a failure (run `make test`, which installs)."""
    reason = _brokers_available()
    if reason:
        pytest.fail(reason)


@pytest.fixture(scope="session")
def stack():
    _require_brokers()
    from compose.localstack import LocalStack

    # every federation test runs under a managed broker's message cap (AWS IoT Core: 128 KB)
    s = LocalStack(list(DEFAULT_REGIONS), mqtt_message_limit=MANAGED_BROKER_LIMIT)
    s.start()
    try:
        yield s
    finally:
        s.stop()


#: The locked-down stack's regions: each secure federation test takes its own pair, since the
#: broker binds MQTT sessions to the certificate's name (a region's session is its own).
SECURE_REGIONS = ("region-0", "region-1", "region-2", "region-3")


@pytest.fixture(scope="session")
def secure_stack():
    """Session-scoped locked-down LocalStack: mutual TLS on Mosquitto (one CA per region,
    identity from the certificate, ACL) and on Kafka (standard authorizer, ACLs per federation,
    granted by ``Federation.start_all``), under the same 128 KB message cap."""
    _require_brokers()
    from compose.localstack import LocalStack

    s = LocalStack(list(SECURE_REGIONS), mqtt_message_limit=MANAGED_BROKER_LIMIT, secure=True)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def stack_factory():
    _require_brokers()
    from compose.localstack import LocalStack

    made: list[LocalStack] = []

    def make(regions=("region-0",), kafka: bool = True, **kw) -> LocalStack:
        s = LocalStack(list(regions), kafka=kafka, **kw)
        made.append(s)
        s.start()
        return s

    try:
        yield make
    finally:
        for s in reversed(made):
            s.stop()


@pytest.fixture
def topic_prefix(request) -> str:
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:60]
    return f"t-{name}-{uuid.uuid4().hex[:8]}"
