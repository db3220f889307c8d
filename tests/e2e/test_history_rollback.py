"""Model history and rollback end to end, on real Mosquitto and Kafka, every service a process.

One federation (2 regions x 2 devices, 6 rounds) runs with its model topic compacting within
seconds. While it runs, forged rollback requests (signed by a region, by a stranger's key,
unsigned) and one for a version that never existed are sent to the control topic; then the
operator's ``fedstream-models rollback --to 1`` (the real command) and the same request a second
time, all while the global aggregator is stopped, which is then killed -9 and restarted (the
requests pending across a crash); once the rollback version is out, the request is sent a third
time and the global is killed -9 and restarted again (a crash after the commit). The
module's tests then check what that run left behind:

- every version stays readable, with its provenance, in the history topic after the model topic
  was compacted down to its latest versions;
- exactly one rollback version exists, bit-identical to v1 (parameters and optimizer state),
  its provenance saying so; the federation went on training from it with every device; the
  streaming consumer followed it; the forged requests were refused and counted by reason;
- ``fedstream-models list | show | diff | export`` read it all back (export bit for bit).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from compose.federation import Federation
from global_aggregator.consumer import VerifiedModel
from global_aggregator.export import load_export, named_params
from global_aggregator.history import read_history, scan
from global_aggregator.models_cli import main as models_main
from global_aggregator.models_cli import request_rollback
from global_aggregator.rollback import rollback_command
from schemas import fedstream_pb2 as pb
from schemas.kafka import MAX_MESSAGE_BYTES, KafkaConn
from schemas.signing import TrustStore, load_private_key, seal
from schemas.topics import Topics
from tests.e2e.helpers import DIGITS, make_federation, rejected, scrape, watch, with_metrics

pytestmark = [pytest.mark.network, pytest.mark.slow]

ROUNDS = 6
REQUEST = "e2e-rollback-1"
#: the model topic's cleaner acts within seconds (test only; as tests/integration does)
FAST_COMPACTION = {"cleanup.policy": "compact", "max.message.bytes": str(MAX_MESSAGE_BYTES),
                   "segment.ms": "100", "min.cleanable.dirty.ratio": "0.001",
                   "min.compaction.lag.ms": "0", "delete.retention.ms": "100"}


@dataclass
class Run:
    fed: Federation
    trust: TrustStore
    watched: list[VerifiedModel]
    history: dict[int, VerifiedModel]
    on_model_topic: list[int]
    forged_metrics: dict
    exits: dict[str, int]
    events: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _cli(fed: Federation, *args: str) -> list[str]:
    return ["--kafka", fed.kafka, "--kafka-plaintext", "--namespace", fed.namespace,
            "--trust", str(fed.keys_dir / "trust.json"), *args]


async def _send_forged(fed: Federation) -> None:
    """Rollback requests the global must refuse: signed by a region (not an operator), by a
    stranger's key in the operator's name, unsigned, and a valid one for a version that never
    existed."""
    t = Topics(fed.namespace)
    keys = fed.keys_dir / "identities"

    def signed(identity: str, key, **kw) -> bytes:
        cmd = rollback_command(kw.pop("to", 1), identity=identity, **kw)
        return seal(pb.CONTROL, cmd, identity, key, topic=t.control)

    unsigned = pb.Envelope.FromString(signed("operator", load_private_key(keys / "operator.pem")))
    unsigned.signature = b""
    records = [
        signed("region-0", load_private_key(keys / "region-0.pem"), request_id="forged-region"),
        signed("operator", Ed25519PrivateKey.generate(), request_id="forged-key"),
        unsigned.SerializeToString(),
        signed("operator", load_private_key(keys / "operator.pem"), to=999,
               request_id="no-such-version"),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=fed.kafka, enable_idempotence=True)
    await producer.start()
    try:
        for raw in records:
            await producer.send_and_wait(t.control, raw)
    finally:
        await producer.stop()


REFUSALS = ("unauthorized", "bad_signature", "unsigned", "unknown_version")


async def _counted(port: int, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        m = await asyncio.to_thread(scrape, port)
        if all(rejected(m, "global", r) >= 1 for r in REFUSALS) or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.5)


async def _model_topic_after_compaction(fed: Federation, trust: TrustStore, published: int,
                                        timeout_s: float = 40.0) -> list[int]:
    """The versions the compacted model topic still holds, once the cleaner dropped old ones."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = [v.version async for v in scan(fed.kafka, trust, Topics(fed.namespace).models,
                                               namespace=fed.namespace)]
        if len(seen) <= 2 or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(1.0)


@pytest.fixture(scope="module")
def run(stack, tmp_path_factory) -> Run:
    t0 = time.monotonic()
    tmp = tmp_path_factory.mktemp("history-rollback")
    ns = f"t-history-rollback-{uuid.uuid4().hex[:8]}"
    fed = make_federation(stack.mqtt, stack.kafka_bootstrap, tmp, ns, agents=4, regions=2,
                          rounds=ROUNDS, extra_global=["--linger-s", "120"])
    port = with_metrics(fed, "global")
    stack.create_topics([{"name": Topics(ns).models, "config": FAST_COMPACTION}])
    trust = TrustStore.load(fed.keys_dir / "trust.json")
    state: dict = {"forged": None, "requested": False, "duplicate": False}
    events: list[str] = []

    async def on_version(v: VerifiedModel) -> None:
        events.append(f"v{v.version} round {v.round}"
                      + (" rollback" if v.message.provenance.HasField("rollback") else ""))
        if v.version >= 2 and not v.final and not state["requested"]:
            # rounds take about a second here: hold the global still while the requests go in
            os.kill(fed.procs["global"].pid, signal.SIGSTOP)
            await _send_forged(fed)
            # the operator's command, as typed (its checks pass: v1 exists, is not the newest)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "global_aggregator.consumer", "rollback", "--to", "1",
                "--reason", "v2+ regressed", "--request-id", REQUEST, "--json",
                *_cli(fed, "--keys", str(fed.keys_dir)), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
            out, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            events.append(f"requested: {out.decode().strip()}")
            await request_rollback(KafkaConn(fed.kafka), fed.keys_dir, trust, fed.namespace, 1,
                                   request_id=REQUEST, check=False)  # the same request twice
            # a crash with the requests pending: the next incarnation must apply them
            fed.kill("global")
            fed.start("global")
            events.append("global killed -9 with the requests pending, restarted")
            state["requested"] = True
        elif v.message.provenance.HasField("rollback") and not state["duplicate"]:
            state["forged"] = await _counted(port)  # counted before the rollback was applied
            await request_rollback(KafkaConn(fed.kafka), fed.keys_dir, trust, fed.namespace, 1,
                                   request_id=REQUEST, check=False)  # and again, later
            # a crash after the rollback's commit: the next incarnation must not repeat it
            fed.kill("global")
            fed.start("global")
            events.append("global killed -9 after the rollback, restarted")
            state["duplicate"] = True

    try:
        fed.start_all()
        watched = asyncio.run(watch(fed, timeout_s=300, on_version=on_version))
        history = asyncio.run(read_history(fed.kafka, trust, namespace=ns))
        on_topic = asyncio.run(_model_topic_after_compaction(fed, trust, len(history)))
        exits = {}
        for name in fed.procs:  # devices end with the final version; the rest on SIGTERM
            if name not in fed.fleet_ids:
                fed.procs[name].send_signal(signal.SIGTERM)
            exits[name] = fed.wait(name, 60)
    finally:
        fed.stop_all()
    out = Run(fed, trust, watched, history, on_topic, state["forged"] or {}, exits, events,
              time.monotonic() - t0)
    print(f"history/rollback federation: {out.seconds:.0f} s; {events}")
    return out


def _rollbacks(run: Run) -> list[VerifiedModel]:
    return [v for v in run.history.values() if v.message.provenance.HasField("rollback")]


def test_history_keeps_every_version_after_the_model_topic_is_compacted(run):
    # every version from v0 to the final one, each exactly as the streaming consumer saw it
    final = run.watched[-1]
    assert final.final and run.exits == dict.fromkeys(run.fed.procs, 0), run.events
    assert list(run.history) == list(range(final.version + 1))
    for v in run.watched:
        assert run.history[v.version].params.tobytes() == v.params.tobytes()
        assert run.history[v.version].message == v.message  # provenance included
    for v in list(run.history.values())[1:]:
        assert v.message.provenance.parent_version == v.version - 1
        assert v.message.provenance.created_unix > 0
    # while the compacted model topic kept only the latest (the cleaner may leave one more)
    assert final.version in run.on_model_topic and len(run.on_model_topic) <= 2, \
        run.on_model_topic
    assert 0 not in run.on_model_topic


def test_rollback_republishes_v1_and_the_federation_trains_on_from_it(run):
    (rb,) = _rollbacks(run)  # once, despite the kill -9 and the duplicate request
    prov = rb.message.provenance
    v1 = run.history[1]
    # Assert: a NEW signed version, equal to v1 bit for bit, saying so
    assert rb.version > 2 and prov.parent_version == rb.version - 1
    assert rb.params.tobytes() == v1.params.tobytes()
    assert rb.message.optimizer_state == v1.message.optimizer_state
    assert (prov.rollback.to_version, prov.rollback.request_id, prov.rollback.requested_by,
            prov.rollback.reason) == (1, REQUEST, "operator", "v2+ regressed")
    assert prov.rollback.discarded_round == prov.round == rb.message.next_task.round - 1
    assert rb.message.next_task.model_version == rb.version
    # the streaming consumer followed it like any version
    assert rb.version in [v.version for v in run.watched]
    # and the next round trained from it, with every device
    after = run.history[rb.version + 1]
    assert after.message.provenance.parent_version == rb.version
    assert after.message.provenance.rollback.request_id == ""
    assert sum(len(a) for a in after.participants.values()) == run.fed.num_agents
    assert after.params.tobytes() != rb.params.tobytes()
    # the rounds go on to the configured last one
    assert run.watched[-1].round == ROUNDS


def test_forged_and_unknown_rollbacks_are_refused_and_counted(run):
    for reason in REFUSALS:
        assert rejected(run.forged_metrics, "global", reason) >= 1, (reason, run.events)
    # none of them made a version
    assert {v.message.provenance.rollback.request_id for v in _rollbacks(run)} == {REQUEST}


def test_models_cli_lists_shows_diffs_and_exports(run, capsys, tmp_path):
    fed = run.fed
    (rb,) = _rollbacks(run)

    def cli(*args: str) -> str:
        capsys.readouterr()
        models_main(_cli(fed, *args))
        return capsys.readouterr().out

    # list: one row per version, the rollback marked
    rows = [json.loads(line) for line in cli("list", "--json").splitlines()]
    assert [r["version"] for r in rows] == list(run.history)
    assert rows[rb.version]["kind"] == "rollback" and rows[rb.version]["rollback_to"] == 1
    assert rows[0]["kind"] == "initial" and rows[-1]["final"]
    table = cli("list")
    assert "rollback to v1" in table and f"{len(rows)} versions" in table
    # show: the provenance, for people and for programs
    assert "rollback of v1" in cli("show", str(rb.version))
    record = json.loads(cli("show", str(rb.version), "--json"))
    assert record["kind"] == "rollback" and record["provenance"]["rollback"]["to_version"] == "1"
    assert record["params_sha256"] == json.loads(cli("show", "1", "--json"))["params_sha256"]
    # diff: the rollback equals v1; a round moved every named parameter
    assert json.loads(cli("diff", "1", str(rb.version), "--json"))["identical"]
    d = json.loads(cli("diff", "1", "2", "--project", str(DIGITS), "--json"))
    assert not d["identical"] and d["changed"] > 0 and set(d["per_param"]) >= {"fc/kernel"}
    assert "fc/kernel" in cli("diff", "1", "2", "--project", str(DIGITS))
    # export: named float32 arrays, bit for bit, and the provenance beside them
    out = json.loads(cli("export", str(rb.version), "--out", str(tmp_path / "m.npz"),
                         "--project", str(DIGITS)))
    with np.load(out["file"]) as z:
        arrays = {k: z[k] for k in z.files}
    from edge_agent.models import project_spec
    from schemas.project import load_project

    spec = project_spec(load_project(DIGITS))
    expected = named_params(spec, rb.params)
    assert list(arrays) == list(expected)
    assert all(arrays[k].dtype == np.float32 and arrays[k].tobytes() == expected[k].tobytes()
               for k in expected)
    assert load_export(Path(out["file"])).tobytes() == rb.params.tobytes()
    prov = json.loads(Path(out["provenance"]).read_text())
    assert prov["version"] == rb.version and prov["kind"] == "rollback"
    assert prov["provenance"]["rollback"]["request_id"] == REQUEST
    for fmt in ("msgpack", "npy"):
        f = tmp_path / f"m.{fmt}"
        cli("export", "2", "--out", str(f), "--format", fmt, "--project", str(DIGITS))
        assert load_export(f).tobytes() == run.history[2].params.tobytes()
    # what does not exist is refused clearly, before anything is sent
    for args, says in ((("show", "999"), "no version v999"),
                       (("rollback", "--to", "999", "--keys", str(fed.keys_dir)),
                        "no version 999"),
                       (("rollback", "--to", "1", "--keys", str(fed.keys_dir)), "final")):
        with pytest.raises(SystemExit) as e:
            cli(*args)
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_fedstream_models_without_a_subcommand_still_streams_json_lines(run):
    out = subprocess.run([sys.executable, "-m", "global_aggregator.consumer", *_cli(run.fed)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines and lines[-1]["final"] and lines[-1]["version"] == run.watched[-1].version
    assert set(lines[-1]) == {"model", "version", "round", "final", "num_params", "metrics",
                              "participants"}
