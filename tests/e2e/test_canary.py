"""Canary rounds end to end, on real Mosquitto and Kafka, every service a process.

2 regions x 2 devices (reporting their local evaluation), 6 rounds, ``--canary-fraction 0.5``:
every training round's version is a candidate for one region first. Round 1 trains a decent
model from the random one: its canary round promotes it. Then every device's training labels
are poisoned (their test data stays clean), so round 3 trains a candidate that is much worse on
the devices' own test data: its canary round rolls it back to the stable version, automatically,
counted. While the first candidate is out, the other region's devices keep the stable version
(their aggregator does not relay the candidate).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from global_aggregator.consumer import VerifiedModel
from global_aggregator.history import kind_of, read_history
from global_aggregator.models_cli import main as models_main
from schemas import fedstream_pb2 as pb
from schemas.signing import TrustStore
from schemas.topics import Topics
from tests.e2e.helpers import make_federation, scrape, watch, with_metrics

pytestmark = [pytest.mark.network, pytest.mark.slow]

ROUNDS = 6
MAX_DROP = 0.05


def retained_version(host: str, port: int, topic: str, timeout_s: float = 5.0) -> int | None:
    """The model version retained on an MQTT topic (None: nothing retained)."""
    got: list[int] = []
    done = threading.Event()

    def on_message(_c, _u, msg):
        if msg.payload:
            env = pb.Envelope.FromString(msg.payload)
            got.append(pb.ModelVersion.FromString(env.body).header.model_version)
        done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}")
    c.on_message = on_message
    c.on_connect = lambda cl, *_a: cl.subscribe(topic, qos=1)
    c.connect(host, port)
    c.loop_start()
    try:
        done.wait(timeout_s)
    finally:
        c.loop_stop()
        c.disconnect()
    return got[0] if got else None


def poison_labels(data_dir: Path) -> None:
    """Every device now trains on the label 0 only (its test set stays as it was)."""
    for f in sorted(data_dir.glob("*.npz")):
        with np.load(f) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["y_train"] = np.zeros_like(arrays["y_train"])
        tmp = f.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, f)  # a device reading it sees the old file or the new one


@pytest.fixture(scope="module")
def run(stack, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("canary")
    ns = f"t-canary-{uuid.uuid4().hex[:8]}"
    fed = make_federation(stack.mqtt, stack.kafka_bootstrap, tmp, ns, agents=4, regions=2,
                          rounds=ROUNDS, extra_global=[
                              "--canary-fraction", "0.5", "--canary-max-drop", str(MAX_DROP),
                              "--linger-s", "120"])
    fed.edge_args = ["--report-eval"]
    port = with_metrics(fed, "global")
    trust = TrustStore.load(fed.keys_dir / "trust.json")
    t = Topics(ns)
    seen: dict = {}

    def on_version(v: VerifiedModel) -> None:
        if v.message.HasField("canary") and "retained" not in seen:
            # hold the global (no decision yet) and look at what each region relays
            os.kill(fed.procs["global"].pid, signal.SIGSTOP)
            try:
                (canary,) = v.message.canary.regions
                deadline = time.monotonic() + 15
                retained: dict[str, int | None] = {}
                while time.monotonic() < deadline:
                    retained = {r: retained_version(*fed.mqtt[r], t.model(r)) for r in fed.fleet}
                    if retained[canary] == v.version:
                        break
                    time.sleep(0.3)
                seen["retained"] = (v.version, canary, retained)
                poison_labels(tmp / "data")  # from the next training round on
            finally:
                os.kill(fed.procs["global"].pid, signal.SIGCONT)

    try:
        fed.start_all()
        t0 = time.monotonic()
        watched = asyncio.run(watch(fed, timeout_s=300, on_version=on_version))
        seconds = time.monotonic() - t0
        metrics = scrape(port)
        history = asyncio.run(read_history(fed.kafka, trust, namespace=ns))
        exits = {}
        for name in fed.procs:
            if name not in fed.fleet_ids:
                fed.procs[name].send_signal(signal.SIGTERM)
            exits[name] = fed.wait(name, 60)
    finally:
        fed.stop_all()
    print(f"canary federation: {seconds:.0f} s; " + ", ".join(
        f"v{v.version} {kind_of(v.message)}" for v in history.values()))
    return {"fed": fed, "watched": watched, "history": history, "metrics": metrics,
            "seen": seen, "exits": exits}


def _fleet_region(fed, agent: str) -> str:
    return next(r for r, ids in fed.fleet.items() if agent in ids)


def test_a_candidate_reaches_its_canary_region_only_and_is_promoted(run):
    h, fed = run["history"], run["fed"]
    assert run["exits"] == dict.fromkeys(fed.procs, 0)
    v1, v2 = h[1], h[2]
    # v1: round 1's model, a candidate for one region; the other keeps v0
    assert kind_of(v1.message) == "candidate"
    (canary,) = v1.message.canary.regions
    assert v1.message.canary.stable_version == 0 and v1.message.canary.has_baseline
    version, region, retained = run["seen"]["retained"]
    assert (version, region) == (1, canary)
    assert retained == {r: (1 if r == canary else 0) for r in fed.fleet}, retained
    # its canary round asked the canary region's devices only
    assert {_fleet_region(fed, a) for a in v1.message.next_task.selected_agents} == {canary}
    # v2: promoted, bit for bit, judged on the canary region's evaluation
    d = v2.message.provenance.canary
    assert kind_of(v2.message) == "promotion" and not v2.message.HasField("canary")
    assert (d.decision, d.candidate_version, d.stable_version, list(d.regions)) == (
        "promoted", 1, 0, [canary])
    assert d.examples > 0 and d.canary_accuracy >= d.baseline_accuracy - MAX_DROP
    assert v2.params.tobytes() == v1.params.tobytes()
    assert v2.message.optimizer_state == v1.message.optimizer_state
    assert v2.metrics["participants"] == len(fed.fleet[canary])
    # and the next training round used every device again
    assert not v2.message.next_task.selected_agents
    assert sum(len(a) for a in h[3].participants.values()) == fed.num_agents


def test_a_candidate_that_drops_accuracy_is_rolled_back_automatically(run):
    h, m = run["history"], run["metrics"]
    v3, v4 = h[3], h[4]
    # round 3 trained on poisoned labels: a candidate, then rolled back to v2
    assert kind_of(v3.message) == "candidate" and v3.message.canary.stable_version == 2
    d, rb = v4.message.provenance.canary, v4.message.provenance.rollback
    assert kind_of(v4.message) == "rollback" and d.decision == "rolled_back"
    assert d.baseline_accuracy - d.canary_accuracy > MAX_DROP, d
    assert (rb.to_version, rb.requested_by, rb.request_id) == (2, "canary", "canary-v3")
    assert "drop" in rb.reason and "allowed" in rb.reason
    assert v4.params.tobytes() == h[2].params.tobytes()
    assert v4.message.optimizer_state == h[2].message.optimizer_state
    assert not v4.message.HasField("canary")  # every region gets it
    # counted (and so alertable): every canary decision, the rollbacks by trigger
    decided = {lbl[0][1]: val for (name, lbl), val in m.items()
               if name == "fedstream_canary_decisions_total"}
    rolled = [v for v in h.values() if v.message.provenance.canary.decision == "rolled_back"]
    assert decided == {"promoted": 1.0, "rolled_back": float(len(rolled))}
    assert m[("fedstream_rollbacks_total", (("trigger", "canary"),))] == len(rolled) >= 1
    # and the federation went on to its last round
    assert run["watched"][-1].final and run["watched"][-1].round == ROUNDS


def test_models_cli_names_candidates_promotions_and_rollbacks(run, capsys):
    fed = run["fed"]
    models_main(["--kafka", fed.kafka, "--kafka-plaintext", "--namespace", fed.namespace,
                 "--trust", str(fed.keys_dir / "trust.json"), "list", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["kind"] for r in rows][:5] == ["initial", "candidate", "promotion", "candidate",
                                            "rollback"]
    assert rows[4]["rollback_by"] == "canary" and rows[4]["canary_decision"] == "rolled_back"
    models_main(["--kafka", fed.kafka, "--kafka-plaintext", "--namespace", fed.namespace,
                 "--trust", str(fed.keys_dir / "trust.json"), "show", "4"])
    out = capsys.readouterr().out
    assert "rollback of v2" in out and "automatic: its canary round" in out
    assert "rolled back candidate v3" in out
