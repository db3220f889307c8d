"""The device's DP-SGD ledger: steps survive restarts, mixed runs compose exactly as
dp-accounting composes them directly, and a damaged ledger stops the start instead of
silently under-reporting."""

from __future__ import annotations

import json

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.dp_ledger import DpLedger

DELTA = 1e-5


def _direct(runs) -> float:
    acc = RdpAccountant()
    for q, z, steps in runs:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
                    steps)
    return acc.get_epsilon(DELTA)


def test_steps_survive_a_restart_and_compose_with_a_new_data_size(tmp_path):
    # Prepare: a device records 2 rounds, restarts, then trains on more data
    path = tmp_path / "dev-a.dp-ledger.json"
    first = DpLedger(path, "dev-a")
    first.record(16 / 100, 1.1, 14)
    first.record(16 / 100, 1.1, 14)

    # Execute: a new process opens the same ledger
    again = DpLedger(path, "dev-a")
    again.record(16 / 160, 1.1, 20)

    # Assert: all 48 steps count, as dp-accounting composes them directly
    assert again.steps == 48 and DpLedger(path, "dev-a").steps == 48
    expected = _direct([(0.16, 1.1, 28), (0.1, 1.1, 20)])
    assert again.epsilon(DELTA) == pytest.approx(expected, rel=1e-9)
    # ... and more than the restarted process alone would have reported
    assert again.epsilon(DELTA) > _direct([(0.1, 1.1, 20)])
    assert not (tmp_path / "dev-a.dp-ledger.json.tmp").exists()


def test_no_steps_is_no_epsilon(tmp_path):
    assert DpLedger(tmp_path / "x.json", "dev-a").epsilon(DELTA) == 0.0


@pytest.mark.parametrize("content", [
    "not json", "[]", "{}", '{"version": 2, "device_id": "dev-a", "runs": []}',
    '{"version": 1, "device_id": "dev-b", "runs": []}',
    '{"version": 1, "device_id": "dev-a", "runs": [{"q": 0.1, "z": 1.1, "steps": -3}]}',
    '{"version": 1, "device_id": "dev-a", "runs": [{"q": 1.5, "z": 1.1, "steps": 3}]}',
    '{"version": 1, "device_id": "dev-a", "runs": [{"q": 0.1, "z": "NaN", "steps": 3}]}',
    '{"version": 1, "device_id": "dev-a", "runs": [{"q": 0.1, "z": 1.1, "steps": 2.5}]}',
    '{"version": 1, "device_id": "dev-a", "runs": {"q": 0.1}}',
])
def test_a_damaged_or_foreign_ledger_stops_the_start(tmp_path, content):
    path = tmp_path / "dev-a.dp-ledger.json"
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        DpLedger(path, "dev-a")
    assert str(path) in str(e.value) and "under-report" in str(e.value)


def test_a_ledger_path_that_cannot_be_created_records_nothing(tmp_path):
    (tmp_path / "file").write_text("")
    ledger = DpLedger(tmp_path / "file" / "dev-a.json", "dev-a")  # a parent that is a file
    with pytest.raises(OSError):
        ledger.record(0.1, 1.1, 5)
    assert ledger.steps == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4), max_leaves=20)
run = st.fixed_dictionaries({"q": json_values | st.floats(0, 1), "z": json_values | st.floats(0, 5),
                             "steps": json_values | st.integers(-5, 10**10)})


@settings(max_examples=400, deadline=None)
@given(doc=st.one_of(json_values, st.fixed_dictionaries(
    {"version": st.sampled_from([1, 1, 2, "1"]), "device_id": st.sampled_from(["dev-a", "x"]),
     "runs": st.lists(run, max_size=4) | json_values})))
def test_fuzz_ledger_files_load_only_when_valid(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("l") / "dev-a.json"
    path.write_text(json.dumps(doc))
    try:
        ledger = DpLedger(path, "dev-a")
    except ValueError as e:
        assert "under-report" in str(e)
        return
    # loaded: then every run is a usable accounting event, and epsilon is computable
    assert all(0 < q <= 1 and z > 0 and 0 < s <= 10**9 for (q, z), s in ledger.runs.items())
    assert ledger.epsilon(DELTA) >= 0
