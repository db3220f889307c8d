"""Which regions relay a model version: the part of canary rounds every tier must agree on.

A canary candidate (``ModelVersion.canary``, made by ``global_aggregator/canary.py``) goes to
its canary regions only: their aggregators relay it to their devices and run its round; every
other region keeps relaying the stable version and starts no round until the decision (a
promotion or a rollback, a version for every region) arrives.
"""

from __future__ import annotations

from schemas import fedstream_pb2 as pb


def relayed_by(mv: pb.ModelVersion, region: str) -> bool:
    """Whether ``region`` relays ``mv`` to its devices: every version but a canary candidate
    whose canary regions do not include it."""
    return not mv.HasField("canary") or region in mv.canary.regions
