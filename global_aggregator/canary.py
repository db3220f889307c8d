"""Canary rounds: a new model reaches a fraction of the regions first, and only a federated
evaluation there lets it go everywhere.

With ``--canary-fraction F`` (> 0, synchronous rounds), the result of every training round is
published as a **candidate**: a version carrying ``ModelVersion.canary`` (its canary regions,
the stable version it started from, the stable version's federated accuracy on those regions,
the allowed drop). Regions not named do not relay it (``relayed_by``: their devices keep the
stable version, and their aggregator starts no round for it: ``schemas.canary``); the canary regions' devices
evaluate it on their own test data (edges with ``--report-eval``) in the **canary round**, which
waits for the canary regions only. Then the global publishes, for every region:

- the candidate **promoted** (a new version with the candidate's parameters and optimizer
  state, ``provenance.canary.decision = "promoted"``) when its federated accuracy on the canary
  regions is at most ``--canary-max-drop`` below the stable version's on the same regions;
- else a **rollback** to the stable version (its parameters and optimizer state,
  ``provenance.rollback`` with ``requested_by = "canary"``, and the decision), counted in
  ``fedstream_rollbacks_total{trigger="canary"}`` and ``fedstream_canary_decisions_total``
  (alert on their increase; ``fedstream_canary_accuracy_drop`` holds the last measured drop).

No evaluation from the canary regions (devices without ``--report-eval``, or none reported
before the deadline) rolls the candidate back: a model is promoted on evidence only. The canary
round's training updates are not used (nothing is decrypted): the promoted model is exactly the
candidate that was evaluated. A canary round uses one round number, so a federation of N rounds
trains in about N/2 of them. The decision is made and published like every version, in the
Kafka transaction with the partials' offsets (exactly once; a restarted global repeats the
canary round from the topics, the baseline travels in the candidate).

The baseline is the stable version's accuracy measured by the same regions' devices in the
round that made the candidate (devices evaluate the version they are about to train on), so
both numbers come from the same devices' data and the comparison is not confounded by non-IID
regions.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import Counter, Gauge

from global_aggregator.history import find_version
from global_aggregator.rollback import ROLLBACKS
from schemas import fedstream_pb2 as pb
from schemas.canary import relayed_by  # noqa: F401 - the regions' half, in schemas

if TYPE_CHECKING:
    from global_aggregator.service import GlobalAggregator

log = logging.getLogger("fedstream.canary")
PROMOTED, ROLLED_BACK = "promoted", "rolled_back"

CANARY_DECISIONS = Counter(
    "fedstream_canary_decisions_total",
    "Canary rounds decided: the candidate promoted to every region, or rolled back to the "
    "stable version after its federated accuracy on the canary regions dropped too far",
    ["decision"],
)
for _decision in (PROMOTED, ROLLED_BACK):  # exported at 0 from the start
    CANARY_DECISIONS.labels(_decision)
CANARY_DROP = Gauge(
    "fedstream_canary_accuracy_drop",
    "Stable minus candidate federated accuracy on the canary regions, at the last canary "
    "decision (positive: the candidate is worse)",
)
CANARY_ACTIVE = Gauge(
    "fedstream_canary_active", "1 while a candidate version is out to its canary regions only")


def pick_regions(regions: list[str], fraction: float, seed: int, round_id: int) -> list[str]:
    """The canary regions of the round ``round_id``: ``round(fraction * n)`` of the ``n``
    regions, at least one and (with more than one) never all, drawn from (seed, round) only."""
    regions = sorted(regions)
    n = len(regions)
    m = max(1, int(round(fraction * n)))
    if n > 1:
        m = min(m, n - 1)
    rng = np.random.default_rng([seed, round_id, 0xCA])
    return sorted(regions[i] for i in rng.choice(n, size=m, replace=False).tolist())


class Canaries:
    """The global aggregator's canary rounds (see the module docstring).

    :meth:`start_round` names the regions a round waits for; :meth:`observe` collects the
    per-region federated evaluation of the round; :meth:`propose` turns a round's new version
    into a candidate; :meth:`decide` ends a canary round."""

    def __init__(self, agg: GlobalAggregator) -> None:
        self.agg = agg
        self.fraction = float(getattr(agg.s, "canary_fraction", 0.0))
        self.max_drop = float(getattr(agg.s, "canary_max_drop", 0.05))
        if self.fraction > 0 and agg.s.mode != "sync":
            raise ValueError("canary rounds need synchronous rounds: --canary-fraction with "
                             f"--mode {agg.s.mode} is not supported")
        self._eval: dict[str, list[float]] = {}  # region -> [accuracy sum, examples]
        self._seen: set[tuple[str, str]] = set()
        self._agents: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self.fraction > 0

    def start_round(self, mv: pb.ModelVersion, regions: set[str]) -> set[str]:
        """The regions the round on ``mv`` waits for (a canary round: its canary regions)."""
        self._eval, self._seen, self._agents = {}, set(), set()
        CANARY_ACTIVE.set(1 if mv.HasField("canary") else 0)
        if mv.HasField("canary"):
            return set(mv.canary.regions) & regions
        return regions

    def observe(self, part: pb.PartialChunk) -> None:
        """A partial chunk accepted in this round: its batch's evaluation sums, once."""
        self._agents.update(part.agents)
        if part.HasField("eval") and (part.region, part.batch) not in self._seen:
            self._seen.add((part.region, part.batch))
            e = self._eval.setdefault(part.region, [0.0, 0.0])
            e[0] += part.eval.accuracy_sum
            e[1] += part.eval.count

    def accuracy(self, regions: list[str]) -> tuple[float, float] | None:
        """(federated accuracy, examples) over ``regions`` this round; None without reports."""
        acc = sum(self._eval.get(r, [0.0, 0.0])[0] for r in regions)
        n = sum(self._eval.get(r, [0.0, 0.0])[1] for r in regions)
        return (acc / n, n) if n > 0 else None

    def propose(self, new: pb.ModelVersion, mv: pb.ModelVersion) -> None:
        """Make ``new`` (a training round's result, started from ``mv``) a canary candidate:
        its canary regions, its baseline, and a next task for their devices only."""
        if not self.enabled or new.final or not new.HasField("next_task"):
            return
        agg = self.agg
        regions = pick_regions(agg.regions, self.fraction, agg.s.seed, new.next_task.round)
        quarantined = set(new.next_task.quarantined_agents)
        chosen = set(new.next_task.selected_agents) or set(agg.agents)
        devices = sorted(a for a in chosen if a not in quarantined
                         and (ident := agg.keys.trust.get(a)) is not None
                         and ident.region in regions)
        if not devices:
            log.warning("round %d: no device in canary regions %s: v%d goes to every region",
                        new.next_task.round, regions, new.header.model_version)
            return
        base = self.accuracy(regions)
        new.canary.CopyFrom(pb.Canary(
            regions=regions, stable_version=mv.header.model_version,
            baseline_accuracy=base[0] if base else 0.0, max_drop=self.max_drop,
            has_baseline=base is not None))
        del new.next_task.selected_agents[:]
        new.next_task.selected_agents.extend(devices)
        if base is None:
            log.warning("no federated evaluation of v%d from %s (devices need --report-eval): "
                        "the canary of v%d has no baseline", mv.header.model_version, regions,
                        new.header.model_version)
        log.info("v%d is a canary candidate for %s (%d devices; stable v%d, baseline %s)",
                 new.header.model_version, regions, len(devices), mv.header.model_version,
                 f"{base[0]:.4f}" if base else "none")

    def judge(self, c: pb.Canary) -> tuple[str, str, float | None, float]:
        """(decision, reason, canary accuracy, examples) of the canary round now ending."""
        got = self.accuracy(list(c.regions))
        if got is None:
            return (ROLLED_BACK, f"no federated evaluation from the canary regions "
                    f"{list(c.regions)} (devices need --report-eval): not promoted unjudged",
                    None, 0.0)
        acc, n = got
        if not c.has_baseline:
            return (PROMOTED, f"accuracy {acc:.4f} on {list(c.regions)}; no baseline to compare",
                    acc, n)
        drop = c.baseline_accuracy - acc
        CANARY_DROP.set(drop)
        verdict = (f"accuracy {acc:.4f} on {list(c.regions)} ({n:g} examples) against "
                   f"{c.baseline_accuracy:.4f} for v{c.stable_version}: a drop of {drop:+.4f}")
        if drop > c.max_drop:
            return ROLLED_BACK, f"{verdict}, more than the {c.max_drop:g} allowed", acc, n
        return PROMOTED, f"{verdict}, within the {c.max_drop:g} allowed", acc, n

    async def decide(self, producer: AIOKafkaProducer, consumer: AIOKafkaConsumer,
                     mv: pb.ModelVersion, lifts: set[str],
                     offsets: dict[TopicPartition, int] | None) -> pb.ModelVersion:
        """End the canary round of candidate ``mv``: publish it promoted, or the stable version
        back, as the next version for every region."""
        from edge_agent.train import evaluate
        from global_aggregator.combine import RoundResult

        agg, c = self.agg, mv.canary
        r, version = mv.next_task.round, mv.header.model_version
        decision, reason, acc, n = self.judge(c)
        params, opt_raw = np.frombuffer(mv.params, "<f4").copy(), mv.optimizer_state
        rollback = None
        if decision == ROLLED_BACK:
            stable = await find_version(agg.kafka, agg.keys.trust, namespace=agg.s.namespace,
                                        model_name=mv.model_name, version=c.stable_version,
                                        service="global")
            if stable is None:  # the history lost it: keep the candidate rather than nothing
                log.error("canary: stable v%d not found in the model history; v%d stays",
                          c.stable_version, version)
                decision, reason = PROMOTED, reason + f"; stable v{c.stable_version} not found"
            else:
                params = np.array(stable.params, dtype=np.float32)
                opt_raw = stable.message.optimizer_state
                rollback = pb.Rollback(to_version=c.stable_version,
                                       request_id=f"canary-v{version}", requested_by="canary",
                                       reason=reason, discarded_round=r)
        metrics: dict[str, float] = {"participants": float(len(self._agents)),
                                     "canary_examples": n,
                                     "baseline_accuracy": c.baseline_accuracy}
        if acc is not None:
            metrics["canary_accuracy"] = acc
            metrics["federated_accuracy"] = acc
        if agg.test_set is not None:
            ev = evaluate(agg.spec, params, *agg.test_set)
            metrics.update({f"server_{k}": v for k, v in ev.items()})
        prov = pb.Provenance(
            parent_version=version, round=r, codec=mv.next_task.codec, strategy=agg.s.strategy,
            created_unix=time.time(), metrics=metrics, rollback=rollback,
            canary=pb.CanaryDecision(candidate_version=version, stable_version=c.stable_version,
                                     regions=c.regions, baseline_accuracy=c.baseline_accuracy,
                                     canary_accuracy=acc or 0.0, examples=n, decision=decision,
                                     reason=reason),
            # privacy spent never goes back: the discarded round's sums were never decrypted
            privacy=mv.provenance.privacy if mv.provenance.HasField("privacy") else None,
        )
        quarantine = agg._quarantine(mv.quarantine, RoundResult(None, 0, {}), lifts)
        new = agg._version(version + 1, r, params, opt_raw, prov, quarantine)
        raw = await agg._publish(producer, new, consumer, offsets)
        CANARY_DECISIONS.labels(decision).inc()
        CANARY_ACTIVE.set(0)
        if rollback is not None:
            ROLLBACKS.labels("canary").inc()
        agg.history.append({"round": r, "version": version + 1, "bytes": len(raw), **metrics})
        outcome = f"rolled back to v{c.stable_version}" if rollback is not None else "promoted"
        (log.warning if decision == ROLLED_BACK else log.info)(
            "canary round %d: v%d %s -> v%d: %s", r, version, outcome, version + 1, reason)
        return new
