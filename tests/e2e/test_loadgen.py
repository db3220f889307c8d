"""fedstream-loadgen against the real brokers and services, and its pure parts.

- a virtual fleet (200 enrolled devices, 2 regions, half of them sampled per round, heavy-tailed
  arrivals, some devices republishing after a "reconnect") completes its rounds with every
  selected device's update in the model version's provenance, and no update refused;
- forged updates (a device signing for another device's topic, signing as another device, an
  unenrolled device, a device of another region) are refused and counted by the region and change
  nothing: the final model is bit-identical to the run without them;
- Hypothesis: the seed-derived keys and the arrival schedule.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compose.federation import Federation
from edge_agent.loadgen import (
    Arrival,
    Connection,
    Loadgen,
    LoadgenConfig,
    arrival_delay,
    device_key,
    device_names,
    make_fleet_keys,
    public_hex,
    schedule,
)
from schemas import fedstream_pb2 as pb
from schemas.project import contiguous_fleet
from schemas.signing import TrustStore, header, seal
from schemas.topics import Topics
from tests.conftest import MANAGED_BROKER_LIMIT
from tests.e2e.helpers import rejected, scrape, watch, with_metrics

IOT = Path(__file__).resolve().parents[2] / "examples" / "iot-anomaly"
SEED = "test-loadgen"
DEVICES = 200
ROUNDS = 2


def _federation(stack, tmp: Path, namespace: str, keys: Path | None = None) -> Federation:
    """Regions and global (no edge processes) of a 200-device virtual fleet; keys made in
    ``tmp`` unless given."""
    devices = contiguous_fleet(device_names(DEVICES), 2)
    if keys is None:
        keys = tmp / "keys"
        make_fleet_keys(keys, devices, SEED)
    return Federation(
        mqtt=stack.mqtt, kafka=stack.kafka_bootstrap, keys_dir=keys, admin=stack.kafka_conn,
        fleet={r: [] for r in devices}, workdir=tmp / "logs", project=IOT, namespace=namespace,
        global_args=["--rounds", str(ROUNDS), "--clients-per-round", "0.5", "--deadline-s", "60",
                     "--grace-s", "2", "--seed", "3", "--codec.max-summands", "128"],
        regional_args=["--max-message-bytes", str(MANAGED_BROKER_LIMIT)])


def _loadgen(fed: Federation) -> Loadgen:
    return Loadgen(LoadgenConfig(
        keys=fed.keys_dir, mqtt=dict(fed.mqtt), seed=SEED, namespace=fed.namespace,
        arrival=Arrival("pareto", 0.3, 1.5, 1.5), reconnect=0.1, reconnect_delay_s=0.3))


async def _run(fed: Federation, *extra) -> tuple[list, dict]:
    gen = _loadgen(fed)
    run = asyncio.create_task(gen.run())
    try:
        versions = await watch(fed, 120)
        summary = await asyncio.wait_for(run, 30)
    finally:
        run.cancel()
    return versions, summary


@pytest.fixture(scope="module")
def baseline(stack, tmp_path_factory):
    """The virtual fleet's federation without any attacker: versions, loadgen statistics and
    the regions' metrics."""
    tmp = tmp_path_factory.mktemp("loadgen-baseline")
    fed = _federation(stack, tmp, f"t-loadgen-base-{tmp.name[-8:]}")
    ports = {r: with_metrics(fed, r) for r in fed.fleet}
    fed.start_all()
    try:
        versions, summary = asyncio.run(_run(fed))
        metrics = {r: scrape(p) for r, p in ports.items()}
    finally:
        fed.stop_all()
    return fed, versions, summary, metrics


@pytest.mark.network
@pytest.mark.slow
def test_virtual_fleet_completes_rounds_with_every_selected_update(baseline):
    fed, versions, summary, metrics = baseline
    assert [v.round for v in versions] == list(range(ROUNDS + 1)) and versions[-1].final
    trust = TrustStore.load(fed.keys_dir / "trust.json")
    for prev, v in zip(versions, versions[1:]):
        selected = set(prev.message.next_task.selected_agents)
        assert len(selected) == DEVICES // 2
        got = {a for agents in v.participants.values() for a in agents}
        assert got == selected, f"round {v.round}: missing {sorted(selected - got)[:5]}"
        for region, agents in v.participants.items():  # each device in its own region
            assert {trust.get(a).region for a in agents} == {region}
    rounds = {r["round"]: r for r in summary["rounds"]}
    assert sorted(rounds) == list(range(1, ROUNDS + 1))
    for r in rounds.values():
        assert r["selected"] == r["sent"] == r["accepted"] == DEVICES // 2, r
    republished = sum(r["republished"] for r in rounds.values())
    assert republished > 0  # duplicates were sent...
    for region, m in metrics.items():  # ...and answered, not refused; a republish (2 s after a
        # reconnect) that finds its round already closed is refused as late, nothing else is
        refused = {dict(k[1])["reason"]: v for k, v in m.items()
                   if k[0] == "fedstream_rejected_total" and v and ("service", "regional") in k[1]}
        assert set(refused) <= {"late"} and refused.get("late", 0) <= republished, \
            (region, refused)
    dups = sum(m.get(("fedstream_duplicates_total", (("service", "regional"),)), 0)
               for m in metrics.values())
    assert dups > 0


@pytest.mark.network
@pytest.mark.slow
def test_forged_and_unenrolled_updates_are_refused_and_change_nothing(baseline, stack,
                                                                       tmp_path):
    base_fed, base_versions, _, _ = baseline
    # the same fleet and keys, another namespace
    fed = _federation(stack, tmp_path, base_fed.namespace.replace("base", "attack"),
                      keys=base_fed.keys_dir)
    port = with_metrics(fed, "region-0")
    t = Topics(fed.namespace)
    trust = TrustStore.load(fed.keys_dir / "trust.json")
    region0 = trust.names(role="agent", region="region-0")
    region1 = trust.names(role="agent", region="region-1")
    sent: dict[str, int] = {}

    async def attack(task: pb.RoundTask, mv: pb.ModelVersion) -> None:
        host, p = fed.mqtt["region-0"]
        conn = Connection(host, p, f"{fed.namespace}-thief", asyncio.get_running_loop())
        conn.start()
        await asyncio.wait_for(conn.connected.wait(), 10)
        sel = [a for a in task.selected_agents if a in set(region0)]
        victim = sel[0]
        thief = next(a for a in region0 if a != victim)
        ghost = "ghost-000001"
        intruder = region1[0]

        def update(signer: str, agent: str, key, topic: str) -> bytes:
            up = pb.UpdateChunk(header=header(signer, task.round, mv.header.model_version,
                                              task.he_fingerprint, 0, 1),
                                agent_id=agent, region="region-0", payload=b"\0" * 64,
                                weight=64)
            return seal(pb.UPDATE_CHUNK, up, signer, key, topic=topic)

        forged = {
            # an enrolled device signs (as itself) for the victim's topic
            "wrong_topic": (t.update("region-0", victim),
                            update(thief, victim, device_key(SEED, thief),
                                   t.update("region-0", victim))),
            # ... or claims to be the victim: its key does not verify as the victim's
            "bad_signature": (t.update("region-0", victim),
                              update(victim, victim, device_key(SEED, thief),
                                     t.update("region-0", victim))),
            # a device nobody enrolled
            "unknown_signer": (t.update("region-0", ghost),
                               update(ghost, ghost, device_key(SEED, ghost),
                                      t.update("region-0", ghost))),
            # an enrolled device of another region: region-0 keeps only its own devices' keys
            "another_region": (t.update("region-0", intruder),
                               update(intruder, intruder, device_key(SEED, intruder),
                                      t.update("region-0", intruder))),
        }
        for what, (topic, raw) in forged.items():
            await conn.publish(topic, raw)
            sent[what] = 1
        await asyncio.sleep(0.5)
        conn.stop()

    async def main():
        attacked: set[int] = set()

        async def on_version(v):
            task = v.message.next_task
            if not v.final and task.round == 1 and 1 not in attacked:
                attacked.add(1)
                await attack(task, v.message)

        gen = _loadgen(fed)
        gen.cfg.arrival = Arrival("uniform", 1.0, 1.0, 1.0)  # the forgeries go first
        run = asyncio.create_task(gen.run())
        try:
            versions = await watch(fed, 120, on_version=on_version)
            await asyncio.wait_for(run, 30)
        finally:
            run.cancel()
        return versions

    fed.start_all()
    try:
        versions = asyncio.run(main())
        metrics = scrape(port)
    finally:
        fed.stop_all()
    assert sorted(sent) == ["another_region", "bad_signature", "unknown_signer", "wrong_topic"]
    for reason in ("bad_signature", "wrong_topic"):
        assert rejected(metrics, "regional", reason) >= 1, (reason, metrics)
    # the ghost and the other region's device: neither is in region-0's trust store
    assert rejected(metrics, "regional", "unknown_signer") >= 2, metrics
    # nothing changed: the same participants and a bit-identical model in every round
    assert len(versions) == len(base_versions)
    for a, b in zip(versions, base_versions):
        assert a.participants == b.participants
        assert np.array_equal(a.params, b.params), f"round {a.round} differs"


# -- pure parts -----------------------------------------------------------------------------------

names = st.text("abcdefghijklmnopqrstuvwxyz0123456789-._", min_size=1, max_size=64)
seeds = st.text(min_size=0, max_size=20)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, a=names, b=names)
def test_device_keys_are_deterministic_and_distinct(seed, a, b):
    ka, ka2 = device_key(seed, a), device_key(seed, a)
    assert public_hex(ka) == public_hex(ka2)
    assert (public_hex(ka) == public_hex(device_key(seed, b))) == (a == b)
    assert public_hex(ka) != public_hex(device_key(seed + "x", a))
    msg = b"fedstream"
    ka.public_key().verify(ka2.sign(msg), msg)  # the rebuilt key signs for the stored one


arrivals = st.builds(Arrival, kind=st.sampled_from(["none", "uniform", "lognormal", "pareto"]),
                     scale_s=st.floats(0.0, 100.0), shape=st.floats(0.05, 5.0),
                     cap_s=st.floats(0.0, 1000.0))


@settings(max_examples=60, deadline=None)
@given(arrival=arrivals, u=st.floats(0.0, 1.0, exclude_max=True),
       v=st.floats(0.0, 1.0, exclude_max=True))
def test_delays_are_capped_and_monotone(arrival, u, v):
    du, dv = arrival.delay(u), arrival.delay(v)
    assert 0.0 <= du <= arrival.cap_s and math.isfinite(du)
    if u <= v:
        assert du <= dv + 1e-9 * max(1.0, dv)
    if arrival.kind == "pareto":
        assert du >= min(arrival.scale_s, arrival.cap_s) * (1 - 1e-12)


@settings(max_examples=30, deadline=None)
@given(arrival=arrivals, seed=seeds, round_id=st.integers(0, 10**6),
       fleet=st.sets(names, max_size=40), pick=st.data(),
       dropout=st.floats(0.0, 1.0))
def test_schedule_of_a_device_does_not_depend_on_the_others(arrival, seed, round_id, fleet,
                                                            pick, dropout):
    everyone = schedule(arrival, seed, round_id, sorted(fleet), dropout)
    assert everyone == sorted(everyone)
    some = pick.draw(st.sets(st.sampled_from(sorted(fleet)))) if fleet else set()
    subset = schedule(arrival, seed, round_id, sorted(some), dropout)
    assert subset == [(d, n) for d, n in everyone if n in some]
    for d, n in everyone:
        assert d == arrival_delay(arrival, seed, round_id, n)
    if dropout == 0.0:
        assert {n for _, n in everyone} == fleet
    if dropout == 1.0:
        assert everyone == []


def test_schedule_statistics():
    """The lognormal's median is its scale; a Pareto tail has stragglers far past its minimum;
    dropout drops about its probability."""
    fleet = device_names(4000)
    logn = [d for d, _ in schedule(Arrival("lognormal", 2.0, 1.0, 1e9), "s", 1, fleet)]
    assert abs(float(np.median(logn)) - 2.0) < 0.2
    par = [d for d, _ in schedule(Arrival("pareto", 1.0, 1.2, 1e9), "s", 1, fleet)]
    assert min(par) >= 1.0 and max(par) > 50.0
    kept = schedule(Arrival(), "s", 1, fleet, dropout=0.25)
    assert abs(len(kept) / len(fleet) - 0.75) < 0.03
