"""Topic names: the only place they are spelled.

MQTT (one broker or listener per region)::

    fedstream/<region>/model              retained: the current ModelVersion (with its RoundTask)
    fedstream/<region>/updates/<agent>    QoS 1: the agent's UpdateChunk envelopes
    fedstream/<region>/receipts           QoS 1: Receipt envelopes (which agents are committed)

Kafka::

    fedstream.partials   PartialChunk envelopes, key = "<round>/<region>/<chunk>"
    fedstream.models     ModelVersion envelopes, compacted; key = model name (latest) and
                         "<model name>@<version>" (history, for streaming consumers)
"""

from __future__ import annotations

PARTIALS_TOPIC = "fedstream.partials"
MODELS_TOPIC = "fedstream.models"


def model_topic(region: str) -> str:
    return f"fedstream/{region}/model"


def update_topic(region: str, agent_id: str) -> str:
    return f"fedstream/{region}/updates/{agent_id}"


def update_wildcard(region: str) -> str:
    return f"fedstream/{region}/updates/+"


def receipt_topic(region: str) -> str:
    return f"fedstream/{region}/receipts"
