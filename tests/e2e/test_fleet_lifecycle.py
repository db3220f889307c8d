"""The fleet changes while the federation runs, locked down, on the real brokers, no restart.

Six devices in two regions. When round 2 opens (model v1 is published), the operator, with
``fedstream-fleet`` on the live fleet topic:

* enrols ``dev-new``, whose keys were made on the device (``fedstream-device init``; only its
  public key and certificate request reached the operator): it is refused in round 2, which had
  started without it (``not_selected``, or ``late`` once its region closed the round), and
  counted from round 3 on;
* revokes ``dev-b`` (a slow device: its round-2 update comes after the revocation): refused as
  ``revoked``, and the region stops waiting for it;
* rotates ``dev-d``'s key with effect from round 3, and the device restarts with its new key at
  once: its round-2 update, signed with the new key, is refused (``rotated_key``); from round 3
  on it counts again.

The final model equals the simulation of the same seven devices in which exactly those updates
never count, bit for bit.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.helpers import (
    SEED,
    make_federation,
    rejected,
    scrape,
    simulate_federation,
    watch,
    with_metrics,
)

pytestmark = [pytest.mark.network, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# the secure stack's second pair of regions (the first pair is test_secure's: a region's MQTT
# session belongs to its certificate's name)
FLEET = {"region-2": ["dev-a", "dev-b", "dev-c"], "region-3": ["dev-d", "dev-e", "dev-f"]}
NEW, REVOKED, ROTATED = "dev-new", "dev-b", "dev-d"
ROUNDS = 3


def _cli(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0, f"{args[:2]} failed:\n{r.stdout}\n{r.stderr}"


def test_enrol_revoke_and_rotate_during_a_run(secure_stack, tmp_path, topic_prefix):
    # Prepare: the federation, and an operator's key directory with the CAs' keys
    fed = make_federation(secure_stack.mqtt, secure_stack.kafka_bootstrap, tmp_path,
                          topic_prefix, devices={r: list(ids) for r, ids in FLEET.items()},
                          rounds=ROUNDS, deadline_s=25,
                          stack=secure_stack)
    operator = tmp_path / "operator"
    shutil.copytree(fed.keys_dir, operator)
    shutil.copytree(secure_stack.pki.ca_dir, operator / "ca")
    kafka = ["--kafka", fed.kafka, "--namespace", fed.namespace, "--keys", str(operator)]
    # the new device's own data (its own file, as any device's)
    from digits_fl.data import make_data

    make_data([NEW], tmp_path / "new-data", seed=SEED, alpha=0.5)
    shutil.copy(tmp_path / "new-data" / f"{NEW}.npz", tmp_path / "data" / f"{NEW}.npz")
    for slow in (REVOKED, ROTATED):  # their round-2 updates come after the operator's change
        fed.per_process_args[slow] = ["--straggle-s", "15"]
    ports = {r: with_metrics(fed, r) for r in FLEET}

    async def on_version(v) -> None:
        if v.version != 1:
            return
        # round 2 is open. Revoke (before the slow device's round-2 update goes out)
        await asyncio.to_thread(_cli, "global_aggregator.fleet_cli", "revoke", *kafka,
                                "--device", REVOKED)
        # rotate: a new key made on the device, valid from round 3; the device restarts with it
        # (before its old incarnation's slow round-2 update goes out)
        own = fed.keys_of(ROTATED)
        await asyncio.to_thread(_cli, "edge_agent.device_cli", "init", "--keys", str(own),
                                "--device-id", ROTATED, "--region", "region-3", "--force")
        await asyncio.to_thread(_cli, "global_aggregator.fleet_cli", "rotate", *kafka,
                                "--request", str(own / f"enrol-{ROTATED}.json"),
                                "--effective-round", "3",
                                "--cert-out", str(own / "tls" / f"{ROTATED}.mqtt.crt"))
        fed.per_process_args[ROTATED] = []  # no longer slow
        fed.restart(ROTATED)
        # enrol: keys made on the device, its request to the operator
        dev = tmp_path / "devices" / NEW
        await asyncio.to_thread(_cli, "edge_agent.device_cli", "init", "--keys", str(dev),
                                "--device-id", NEW, "--region", "region-2")
        for public in ("trust.json", "he/public.ctx", "tls/ca-region-2.crt"):
            (dev / public).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(fed.keys_dir / public, dev / public)
        await asyncio.to_thread(_cli, "global_aggregator.fleet_cli", "enrol", *kafka,
                                "--request", str(dev / f"enrol-{NEW}.json"),
                                "--cert-out", str(dev / "tls" / f"{NEW}.mqtt.crt"))
        fed.fleet["region-2"].append(NEW)
        fed.own_keys[NEW] = dev
        fed.per_process_args[NEW] = ["--region", "region-2"]  # not in the trust.json it has
        fed.start(NEW)

    # Execute
    try:
        fed.start_all()
        versions = asyncio.run(watch(fed, timeout_s=400, on_version=on_version))
        metrics = {r: scrape(p) for r, p in ports.items()}
        fleet_list = subprocess.run(
            [sys.executable, "-m", "global_aggregator.fleet_cli", "list", *kafka],
            capture_output=True, text=True, timeout=120, cwd=ROOT)
    finally:
        fed.stop_all()

    # Assert: who counted in which round
    counted = [sorted(a for ids in v.participants.values() for a in ids) for v in versions[1:]]
    everyone = sorted(d for ids in FLEET.values() for d in ids)
    assert counted[0] == everyone
    assert counted[1] == sorted(set(everyone) - {REVOKED, ROTATED})
    assert counted[2] == sorted(set(everyone) - {REVOKED} | {NEW})
    # ... the refusals, each with its reason, where the regions see them
    assert rejected(metrics["region-2"], "regional", "revoked") >= 1
    # dev-new's round-2 update: not in that round (refused as not_selected, or as late once the
    # region closed round 2, which it does as soon as it stops waiting for the revoked device)
    assert (rejected(metrics["region-2"], "regional", "not_selected")
            + rejected(metrics["region-2"], "regional", "late")) >= 1
    assert f"rejected update on {fed.namespace}/region-2/updates/{NEW}" in fed.log("region-2", 400)
    assert rejected(metrics["region-3"], "regional", "rotated_key") >= 1
    # ... the operator's view of the fleet
    assert fleet_list.returncode == 0, fleet_list.stderr
    for name, state in ((NEW, "active"), (REVOKED, "revoked"), (ROTATED, "active")):
        line = next(ln for ln in fleet_list.stdout.splitlines() if f" {name} " in f" {ln} ")
        assert state in line, line
    # ... and the model is the simulation's in which exactly those updates never count
    excluded = {1: frozenset({NEW}), 2: frozenset({NEW, REVOKED, ROTATED}),
                3: frozenset({REVOKED})}
    sim = simulate_federation(fed, rounds=ROUNDS, excluded=excluded)
    assert versions[-1].params.tobytes() == np.asarray(sim.final_params, np.float32).tobytes()
