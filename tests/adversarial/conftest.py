"""One local stack for the adversarial suite, with Mosquitto saving on a timer (the demo's and
docker-compose's setting), not after every change: floods of 10,000 queued messages would
otherwise make the broker rewrite its whole database per message."""

from __future__ import annotations

import pytest

from tests.conftest import _require_brokers


@pytest.fixture(scope="module")
def stack():
    _require_brokers()
    from compose.localstack import LocalStack

    s = LocalStack(["region-0", "region-1"], mqtt_autosave_seconds=1)
    s.start()
    try:
        yield s
    finally:
        s.stop()
