"""Topic names: the only place they are spelled.

Every name lives under a namespace (default ``fedstream``), so several federations (or test
runs) can share one Mosquitto and one Kafka. With namespace ``ns``:

MQTT (one broker or listener per region)::

    ns/<region>/model              retained: the current ModelVersion (with its RoundTask)
    ns/<region>/updates/<agent>    QoS 1: the agent's UpdateChunk envelopes
    ns/<region>/receipts           QoS 1, retained: the latest Receipt of the region
    ns/<region>/replicas/<name>    QoS 1, retained: a regional replica's status (up, down,
                                   adopted:<by>): the replicas' watchdog

Kafka::

    ns.partials   PartialChunk envelopes, key = "<round>/<region>/<chunk>"
    ns.models     ModelVersion envelopes, compacted, key = model name
    ns.history    the same ModelVersion envelopes (byte for byte, signed for ns.models), never
                  compacted nor expired, key = "<model name>/<version>": every version ever
                  published, with its provenance (global_aggregator/history.py)
    ns.control    Control envelopes (operator commands to the global aggregator)
    ns.fleet      FleetRecord envelopes (enrol, revoke, rotate), compacted, key = identity
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


@dataclass(frozen=True)
class Topics:
    namespace: str = "fedstream"

    def __post_init__(self) -> None:
        if not _NAME.match(self.namespace):
            raise ValueError(f"namespace {self.namespace!r}: use 1-200 of [A-Za-z0-9_.-]")

    @property
    def partials(self) -> str:
        return f"{self.namespace}.partials"

    @property
    def models(self) -> str:
        return f"{self.namespace}.models"

    @property
    def history(self) -> str:
        return f"{self.namespace}.history"

    @property
    def control(self) -> str:
        return f"{self.namespace}.control"

    @property
    def fleet(self) -> str:
        return f"{self.namespace}.fleet"

    def model(self, region: str) -> str:
        return f"{self.namespace}/{region}/model"

    def update(self, region: str, agent_id: str) -> str:
        return f"{self.namespace}/{region}/updates/{agent_id}"

    def updates(self, region: str) -> str:
        return f"{self.namespace}/{region}/updates/+"

    def receipts(self, region: str) -> str:
        return f"{self.namespace}/{region}/receipts"

    def replica(self, region: str, replica: str) -> str:
        return f"{self.namespace}/{region}/replicas/{replica}"

    def replicas(self, region: str) -> str:
        return f"{self.namespace}/{region}/replicas/+"
