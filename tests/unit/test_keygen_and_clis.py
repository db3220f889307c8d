"""Key generation and the command-line entry points (no broker)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from global_aggregator.keygen import fleet, write_keys
from schemas.codec import Codec, CodecParams
from schemas.errors import InvalidMessage
from schemas.keyring import Keyring


def test_keygen_gives_secret_only_to_the_global_tier(tmp_path):
    # Prepare / Execute
    summary = write_keys(tmp_path, num_agents=6, num_regions=2)
    # Assert: every identity has a key and a trust entry with its role and region
    trust = json.loads((tmp_path / "trust.json").read_text())["identities"]
    assert set(trust) == {"global", "operator", "region-0", "region-1",
                          *(f"agent-{i:03d}" for i in range(6))}
    assert trust["operator"]["role"] == "operator"
    for region, agents in fleet(6, 2).items():
        assert all(trust[a]["region"] == region and trust[a]["role"] == "agent" for a in agents)
    assert (tmp_path / "he" / "secret.ctx").stat().st_mode & 0o077 == 0
    # the edge's and the global's contexts are one key pair (same fingerprint) ...
    edge = Keyring.load(tmp_path, "agent-000")
    glob = Keyring.load(tmp_path, "global", secret=True)
    assert edge.he.fingerprint == glob.he.fingerprint == summary["he_fingerprint"]
    assert glob.he.is_private and not edge.he.is_private
    # ... but only the global's can read a sum
    params = CodecParams()
    q = Codec(params, 1000, edge.he).encode(np.full(1000, 0.01, np.float32), 10, seed=3)
    with pytest.raises(InvalidMessage) as exc:
        Codec(params, 1000, edge.he).decode(q)
    assert exc.value.reason == "no_secret_key"
    qsum, weight = Codec(params, 1000, glob.he).decode(q)
    assert weight == 10 and qsum.shape == (1000,)


@pytest.mark.parametrize(
    ("module", "must_mention"),
    [
        ("edge_agent.cli", ["--device-id", "--mqtt", "--keys", "--project", "--data",
                            "--mqtt-cert-file", "--mqtt-key-file", "FEDSTREAM_"]),
        ("regional_aggregator.cli", ["--region", "--kafka", "--min-agents-per-partial",
                                     "--kafka-ca-file", "--mqtt-cert-file", "FEDSTREAM_"]),
        ("global_aggregator.cli", ["--rounds", "--min-participants", "--strategy",
                                   "--deadline-s", "--codec.chunk-bytes", "--train.lr",
                                   "--project", "FEDSTREAM_"]),
        ("global_aggregator.keygen", ["--agents", "--regions", "--project", "--fleet",
                                      "--ca-dir", "--rotate", "--effective-round"]),
        ("global_aggregator.consumer", ["--follow", "--trust", "--kafka-cert-file",
                                        "--kafka-plaintext"]),
        ("global_aggregator.quarantine_cli", ["lift", "--kafka-ca-file", "--kafka-plaintext"]),
        ("global_aggregator.fleet_cli", ["enrol", "revoke", "rotate", "list"]),
        ("edge_agent.device_cli", ["init"]),
        ("compose.deploy", ["certs", "render", "kafka-setup", "k8s-secrets"]),
        ("compose.localstack", ["up", "status", "down"]),
        ("global_aggregator.simulation_cli", ["--rounds", "--project"]),
        ("global_aggregator.demo", ["--rounds", "--project"]),
        ("global_aggregator.scaffold", ["NAME"]),
    ],
)
def test_every_command_has_help(module, must_mention):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for word in must_mention:
        assert word in out.stdout


def test_nonsense_settings_are_refused_at_the_entry_point():
    out = subprocess.run([sys.executable, "-m", "global_aggregator.cli", "--kafka", "x:1",
                          "--keys", "/nonexistent", "--project", "examples/digits",
                          "--rounds", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2  # a usage error, not a traceback
    assert "error: invalid settings" in out.stderr and "rounds:" in out.stderr
    assert "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "edge_agent.cli", "--device-id", "bad/id",
                          "--mqtt", "h:1", "--keys", "k", "--project", "p"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "device_id" in out.stderr and "Traceback" not in out.stderr


def test_settings_precedence_flags_then_environment_then_project_then_defaults(tmp_path,
                                                                             monkeypatch):
    """One typed model: the project's table sets rounds and bits, the environment overrides
    bits, a flag overrides rounds, and what nobody set is the one default."""
    from global_aggregator.service import GlobalSettings
    from schemas.cli import parse_settings
    from schemas.settings import FederationSettings

    (tmp_path / "fedstream.toml").write_text(
        'name = "p"\nmodel = "edge_agent.models:mlp"\ninput_shape = [4]\n'
        "[federation]\nrounds = 7\nseed = 3\n[federation.codec]\nbits = 6\n")
    monkeypatch.setenv("FEDSTREAM_CODEC__BITS", "5")
    s = parse_settings(GlobalSettings, ["--kafka", "k:1", "--keys", "k", "--project",
                                        str(tmp_path), "--rounds", "9"])
    assert (s.rounds, s.seed, s.codec.bits) == (9, 3, 5)
    assert s.codec.clip_l2 == FederationSettings().codec.clip_l2 == CodecParams().clip_l2
    assert s.train == FederationSettings().train


def test_simulation_and_services_start_from_the_same_defaults():
    from edge_agent.train import LocalTrainConfig
    from global_aggregator.simulation import SimConfig
    from schemas.settings import FederationSettings

    fed, sim = FederationSettings(), SimConfig()
    assert sim.local == LocalTrainConfig(**fed.train.model_dump())
    assert sim.codec_params() == fed.codec.params() == CodecParams()
    assert (sim.rounds, sim.strategy, sim.min_group, sim.seed) == (
        fed.rounds, fed.strategy, fed.min_group, fed.seed)


def test_secret_context_can_live_off_the_shared_key_volume(tmp_path):
    write_keys(tmp_path / "keys", num_agents=2, num_regions=1, secret_out=tmp_path / "secret")
    assert not (tmp_path / "keys" / "he" / "secret.ctx").exists()
    glob = Keyring.load(tmp_path / "keys", "global", secret=True,
                        secret_path=tmp_path / "secret" / "secret.ctx")
    assert glob.he.is_private
    assert glob.he.fingerprint == Keyring.load(tmp_path / "keys", "agent-000").he.fingerprint
