"""fedstream-models' parser, export and diff, and the canary's pure parts (no broker)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edge_agent.models import init_flat, project_spec
from global_aggregator.canary import PROMOTED, ROLLED_BACK, Canaries, pick_regions
from global_aggregator.export import diff_params, export_version, load_export, named_params
from global_aggregator.history import kind_of
from global_aggregator.models_cli import SUBCOMMANDS, build_parser
from schemas import fedstream_pb2 as pb
from schemas.canary import relayed_by
from schemas.project import load_project
from schemas.signing import header

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"


@pytest.fixture(scope="module")
def spec():
    return project_spec(load_project(DIGITS))


def _version(flat: np.ndarray, version: int = 3) -> pb.ModelVersion:
    return pb.ModelVersion(header=header("global", 2, version, "fp"), model_name="digits",
                           num_params=flat.size, params=flat.astype("<f4").tobytes(),
                           provenance=pb.Provenance(parent_version=version - 1, round=2))


def test_common_flags_go_before_or_after_the_subcommand_and_the_old_form_still_parses():
    ap = build_parser()
    a = ap.parse_args(["--kafka", "k:1", "--namespace", "ns", "list", "--trust", "t", "--json"])
    assert (a.command, a.kafka, a.namespace, str(a.trust), a.json) == ("list", "k:1", "ns", "t",
                                                                       True)
    a = ap.parse_args(["rollback", "--to", "4", "--kafka", "k:1", "--keys", "K"])
    assert (a.command, a.to_version, a.namespace, str(a.keys)) == ("rollback", 4, "fedstream",
                                                                   "K")
    a = ap.parse_args(["--kafka", "k:1", "--trust", "t", "--follow", "--save", "d"])
    assert a.command is None and a.follow and str(a.save) == "d"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command):
    out = subprocess.run([sys.executable, "-m", "global_aggregator.consumer", command, "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--kafka" in out.stdout and "--trust" in out.stdout


@pytest.mark.parametrize("fmt", ["npz", "msgpack", "npy"])
def test_export_loads_back_bit_for_bit_with_named_arrays(spec, fmt, tmp_path):
    # Prepare: a version whose values include the awkward ones
    flat = init_flat(spec, 1).copy()
    flat[:4] = [0.0, -0.0, np.float32(1e-45), np.float32(3.4e38)]
    mv = _version(flat)
    # Execute
    out, prov = export_version(mv, tmp_path / f"m.{fmt}", fmt, spec=spec)
    # Assert
    assert load_export(out).tobytes() == flat.tobytes()
    assert prov.exists() and '"params_sha256"' in prov.read_text()
    if fmt == "npz":
        with np.load(out) as z:
            assert list(z.files) == list(named_params(spec, flat))
            assert z["fc/kernel"].shape == (512, 32) and z["fc/kernel"].dtype == np.float32


def test_export_without_a_project_is_one_flat_array_and_msgpack_needs_one(spec, tmp_path):
    flat = init_flat(spec, 0)
    out, _ = export_version(_version(flat), tmp_path / "m.npz", "npz")
    with np.load(out) as z:
        assert z.files == ["params"] and z["params"].tobytes() == flat.tobytes()
    with pytest.raises(ValueError, match="--project"):
        export_version(_version(flat), tmp_path / "m.msgpack", "msgpack")


def test_diff_of_a_version_with_itself_and_with_a_scaled_copy(spec):
    flat = init_flat(spec, 0)
    same = diff_params(flat, flat.copy(), spec)
    assert same["identical"] and same["changed"] == 0 and same["l2"] == 0.0
    scaled = diff_params(flat, flat * 2, spec)
    assert not scaled["identical"] and scaled["cosine"] == pytest.approx(1.0)
    assert scaled["rel_l2"] == pytest.approx(1.0, rel=1e-6)
    assert sum(p["size"] for p in scaled["per_param"].values()) == flat.size
    assert diff_params(flat, flat[:10])["comparable"] is False


def test_canary_regions_are_some_never_all_and_the_same_everywhere():
    regions = [f"region-{i}" for i in range(5)]
    for r in range(50):
        got = pick_regions(regions, 0.4, 7, r)
        assert got == pick_regions(list(reversed(regions)), 0.4, 7, r) and len(got) == 2
        assert len(pick_regions(regions, 1.0, 7, r)) == 4  # never all
        assert len(pick_regions(regions, 0.01, 7, r)) == 1  # at least one
    assert pick_regions(["only"], 0.5, 0, 1) == ["only"]
    assert len({tuple(pick_regions(regions, 0.4, 7, r)) for r in range(50)}) > 1


def test_a_candidate_is_relayed_by_its_canary_regions_only():
    mv = pb.ModelVersion(canary=pb.Canary(regions=["region-1"]))
    assert relayed_by(mv, "region-1") and not relayed_by(mv, "region-0")
    assert relayed_by(pb.ModelVersion(), "region-0")
    assert kind_of(mv) == "candidate"


@pytest.mark.parametrize(("regions", "evals", "baseline", "decision"), [
    (["a"], {"a": (0.80, 100)}, 0.82, PROMOTED),     # a drop of 0.02, 0.05 allowed
    (["a"], {"a": (0.70, 100)}, 0.82, ROLLED_BACK),  # a drop of 0.12
    (["a", "b"], {"a": (0.9, 50), "b": (0.1, 150)}, 0.35, PROMOTED),  # by examples: 0.3
    (["a", "b"], {"a": (0.9, 50), "b": (0.1, 150)}, 0.36, ROLLED_BACK),
    (["a"], {"b": (0.9, 50)}, 0.1, ROLLED_BACK),     # no report from the canary region
])
def test_canary_judgement(regions, evals, baseline, decision):
    s = SimpleNamespace(canary_fraction=0.5, canary_max_drop=0.05, mode="sync")
    c = Canaries(SimpleNamespace(s=s))  # type: ignore[arg-type]
    c.start_round(pb.ModelVersion(), {"a", "b"})
    for region, (acc, n) in evals.items():
        part = pb.PartialChunk(region=region, eval=pb.EvalSums(accuracy_sum=acc * n, count=n))
        c.observe(part)
        c.observe(part)  # a batch's sums count once
    got, reason, _, _ = c.judge(pb.Canary(regions=regions, baseline_accuracy=baseline,
                                          max_drop=0.05, has_baseline=True, stable_version=4))
    assert got == decision, reason


def test_canary_rounds_refuse_fedbuff():
    s = SimpleNamespace(canary_fraction=0.5, canary_max_drop=0.05, mode="fedbuff")
    with pytest.raises(ValueError, match="synchronous"):
        Canaries(SimpleNamespace(s=s))  # type: ignore[arg-type]


def _verified(mv: pb.ModelVersion):
    from global_aggregator.consumer import VerifiedModel
    params = np.frombuffer(mv.params, "<f4")
    return VerifiedModel(model_name=mv.model_name, version=mv.header.model_version,
                         round=mv.provenance.round, final=mv.final, params=params,
                         metrics=dict(mv.provenance.metrics), participants={}, message=mv,
                         offset=0)


def test_list_and_show_tell_the_privacy_spent(spec):
    # Prepare: a DP version that reached its budget, and one without DP
    from rich.console import Console

    from global_aggregator.models_cli import print_list, print_show, summary
    flat = init_flat(spec, 0)
    dp = _version(flat, 4)
    dp.provenance.privacy.CopyFrom(pb.Privacy(
        mode="distributed", epsilon=7.912, delta=1e-5, budget=8.0, budget_reached=True,
        sigma_device=44.3, sensitivity=620.0, n_min=1000, epsilon_amplified=1.25,
        rounds=[pb.PrivacyRound(population=1000, sample=1000, contributors=1000,
                                noise_multiplier=3.0)] * 12))
    dp.final = True
    plain = _version(flat, 3)
    console = Console(record=True, width=200)

    # Execute
    rows = [summary(_verified(plain)), summary(_verified(dp))]
    print_list(console, rows, "versions")
    print_show(console, _verified(dp))
    out = console.export_text()

    # Assert: the numbers of the provenance, in the list and in show
    assert rows[0]["epsilon"] is None and rows[1]["epsilon"] == pytest.approx(7.912)
    assert "7.91" in out and "privacy budget reached" in out
    assert "distributed DP: epsilon 7.912 at delta 1e-05 over 12 rounds" in out
    assert "(with it: 1.25)" in out and "budget 8 reached" in out and "n_min 1000" in out
    # ... and an unbounded epsilon stays JSON-safe
    dp.provenance.privacy.epsilon = float("inf")
    assert summary(_verified(dp))["epsilon"] == "inf"
