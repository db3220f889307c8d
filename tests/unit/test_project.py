"""The project table (schemas/project.py), the task hash and the version-skew metric.

A project file is configuration an operator writes; a device's version string comes from a
possibly stolen device. Both are checked here with plain cases and Hypothesis fuzzers: a bad
table is one clear ``ValueError`` naming the file, never another exception; a hostile version
string can neither crash the region nor grow its metrics without bound.
"""

from __future__ import annotations

import tomllib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regional_aggregator.service import RegionalAggregator
from schemas import fedstream_pb2 as pb
from schemas.project import check_device_id, contiguous_fleet, load_project, task_hash
from schemas.telemetry import PROJECT_VERSIONS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MINIMAL = 'name = "p"\nmodel = "edge_agent.models:mlp"\ninput_shape = [4]\n'


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "fedstream.toml").write_text(text)
    return tmp_path


def test_examples_load_with_their_settings():
    digits = load_project(EXAMPLES / "digits")
    assert (digits.name, digits.version, digits.input_shape) == ("digits", "1.0.0", (8, 8, 1))
    assert digits.federation.codec.chunk_bytes == 100_000 < 128 * 1024
    iot = load_project(EXAMPLES / "iot-anomaly")
    assert iot.table.server_eval is None and iot.table.loader == "csv"
    raw = tomllib.loads((EXAMPLES / "iot-anomaly" / "pyproject.toml").read_text())
    assert iot.federation.rounds == raw["tool"]["fedstream"]["federation"]["rounds"]


@pytest.mark.parametrize(("text", "says"), [
    (MINIMAL + "modle = 'typo'\n", "modle"),                     # a typo is not a default
    (MINIMAL + "[federation]\nrounds = 0\n", "rounds"),
    (MINIMAL + "[federation.codec]\nbits = 1\n", "bits"),
    (MINIMAL + "[federation]\nstrategy = 'sgd'\n", "strategy"),
    ('name = "p"\ninput_shape = [4]\n', "model"),
    (MINIMAL.replace('"p"', '"bad name!"'), "project name"),
    ("model = [", "not valid TOML"),
])
def test_a_bad_table_is_one_clear_error_naming_the_file(tmp_path, text, says):
    with pytest.raises(ValueError) as exc:
        load_project(_write(tmp_path, text))
    assert says in str(exc.value)
    assert "fedstream.toml" in str(exc.value) or "bad name" in str(exc.value)


def test_a_directory_without_a_table_says_how_to_start_one(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    with pytest.raises(ValueError, match="fedstream new"):
        load_project(tmp_path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300))
def test_fuzz_any_text_is_a_project_or_a_value_error(tmp_path, text):
    try:
        p = load_project(_write(tmp_path, text))
    except ValueError:
        return
    assert p.name and p.input_shape


def test_device_ids_are_the_fleets_own_and_regions_are_contiguous():
    for good in ("SN-00A7.x", "a", "x" * 64, "00_first"):
        assert check_device_id(good) == good
    for bad in ("", "x" * 65, "a/b", "a+b", "a#", "a b", "é"):
        with pytest.raises(ValueError):
            check_device_id(bad)
    fleet = contiguous_fleet([f"d{i}" for i in range(7)], 3)
    assert [len(v) for v in fleet.values()] == [3, 2, 2]
    assert sum(fleet.values(), []) == [f"d{i}" for i in range(7)]


def test_task_hash_binds_project_model_and_plan():
    h = task_hash("p", "m" * 64, b"12345678")
    assert len(h) == 32
    assert h != task_hash("q", "m" * 64, b"12345678")
    assert h != task_hash("p", "n" * 64, b"12345678")
    assert h != task_hash("p", "m" * 64, b"12345679")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([f"a{i}" for i in range(6)]), st.text(max_size=80)),
                min_size=1, max_size=30))
def test_fuzz_hostile_versions_keep_the_skew_metric_bounded(updates):
    """Whatever versions devices claim, the gauge has at most one series per device of the
    round, every label is well formed, and the counts add up to the devices seen."""
    PROJECT_VERSIONS.clear()  # as a new round does
    r = SimpleNamespace(versions={}, version_counts=Counter(), task=pb.RoundTask(task_name="p"))
    for agent, version in updates:
        up = pb.UpdateChunk(agent_id=agent, project_version=version)
        RegionalAggregator._count_version(None, r, up)  # type: ignore[arg-type]
    series = {s.labels["version"]: s.value for m in PROJECT_VERSIONS.collect()
              for s in m.samples}
    assert len(series) <= len({a for a, _ in updates})
    assert sum(series.values()) == len({a for a, _ in updates})
    for label in series:
        assert label == "invalid" or (len(label) <= 32 and label.isprintable())


@settings(max_examples=300, deadline=None)
@given(agent=st.sampled_from(["a0", "a1", "a2", "a3"]), payload=st.binary(max_size=8),
       count=st.integers(0, 3), reason=st.text(max_size=100),
       summed=st.sets(st.sampled_from(["a0", "a1", "a2", "a3"])),
       expected=st.sets(st.sampled_from(["a0", "a1", "a2", "a3"])))
def test_fuzz_a_decline_only_ever_stops_the_wait_for_its_own_unsent_device(
        agent, payload, count, reason, summed, expected):
    """A (possibly stolen) device's signed decline: the region stops waiting for that device
    only if it sent nothing yet and is expected; anything else changes nothing; never raises."""
    import asyncio

    r = SimpleNamespace(expected=set(expected), summer=SimpleNamespace(has=summed.__contains__),
                        task=pb.RoundTask(round=1), fedbuff=None, committed=set())
    region = SimpleNamespace(s=SimpleNamespace(region="region-0", replica=""),
                             _round_changed=asyncio.Event(),
                             _counted=lambda r, a: a in r.committed)
    up = pb.UpdateChunk(header=pb.Header(chunk_count=count), agent_id=agent, payload=payload,
                        declined=reason or "data_error")
    before = set(r.expected)
    RegionalAggregator._on_decline(region, r, up)  # type: ignore[arg-type]
    honest = not payload and count == 0 and agent in before and agent not in summed
    assert r.expected == (before - {agent} if honest else before)
    assert region._round_changed.is_set() == honest  # the round loop looks again
