"""The alert rules, Prometheus and Alertmanager configuration and the Grafana dashboard, without
running either: the committed files are the renders of compose/monitoring.py, promtool and
amtool accept them, promtool's unit tests (compose/monitoring/rules.test.yml: input series ->
the alerts expected) pass, every alert has a test and a runbook, and every metric a rule or a
panel reads is one the services define. tests/integration/test_monitoring.py fires them for
real."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from compose import monitoring as mon
from compose.deploy import region_names

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = ROOT / "docs" / "operations.md"


def _require_promtool() -> None:
    """Like the broker tests: a missing tool is a failure (compose/install.sh installs it)."""
    lost = mon.missing_binaries()
    if lost:
        pytest.fail(lost)


def _rules(text: str | None = None) -> list[dict]:
    doc = yaml.safe_load(text if text is not None else (mon.MONITORING / "rules.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def _defined_metrics() -> set[str]:
    """Sample names of every metric the services' processes register (schemas.telemetry and
    prometheus_client's process collector), labelled ones without a series yet included."""
    from prometheus_client import REGISTRY

    import global_aggregator.rollback  # noqa: F401 - fedstream_rollbacks_total
    import schemas.telemetry  # noqa: F401 - registers the metrics

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum",
                                                                  "_created"),
                "summary": ("_count", "_sum", "_created")}
    out = set()
    for fam in REGISTRY.collect():
        out.add(fam.name)
        out.update(fam.name + s for s in suffixes.get(fam.type, ()))
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


# ----------------------------------------------------------------------------------------------


def test_committed_files_are_the_renders():
    for name, text in mon.render_compose(region_names(3)).items():
        assert (mon.MONITORING / name).read_text() == text, \
            f"compose/monitoring/{name} is stale: python -m compose.monitoring render"


def test_promtool_and_amtool_accept_the_configuration():
    _require_promtool()
    out = mon.check()
    assert "SUCCESS" in out[0] and "21 rules found" in out[0], out[0]
    assert "SUCCESS" in out[1], out[1]


def test_promtool_unit_tests_of_the_rules():
    _require_promtool()
    p = subprocess.run([mon.PROMTOOL_BIN, "test", "rules", "rules.test.yml"],
                       cwd=mon.MONITORING, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout


def test_every_alert_has_a_unit_test_a_severity_and_a_runbook():
    tests = yaml.safe_load((mon.MONITORING / "rules.test.yml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t["alert_rule_test"]
              if case["exp_alerts"]}  # a case where it fires, not only one where it does not
    headings = {_slug(line.lstrip("#")) for line in OPERATIONS.read_text().splitlines()
                if line.startswith("#")}
    rules = _rules()
    assert len(rules) == 21
    for r in rules:
        name = r["alert"]
        assert name in tested, f"{name} has no promtool test that makes it fire"
        assert r["labels"]["severity"] in ("critical", "warning", "info"), name
        assert r["labels"]["sli"], name
        runbook = r["annotations"]["runbook"]
        assert runbook == f"docs/operations.md#{name.lower()}", name
        assert name.lower() in headings, f"docs/operations.md has no section {name}"
        assert r["annotations"]["summary"] and r["annotations"]["description"], name


def test_every_metric_of_the_rules_and_the_dashboard_is_defined():
    defined = _defined_metrics() | mon.PROMETHEUS_SERIES
    for r in _rules():
        assert mon.metric_names(r["expr"]) <= defined, \
            f"{r['alert']} reads {mon.metric_names(r['expr']) - defined}, which no service defines"
    queries = mon.dashboard_queries()
    assert len(queries) >= 30
    for title, expr in queries:
        names = mon.metric_names(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        assert names <= defined, f"panel {title!r} reads {names - defined}: not defined"
    # every SLI of docs/operations.md's table is on the dashboard
    shown = set().union(*(mon.metric_names(q) for _, q in queries))
    for sli in ("fedstream_participation_ratio", "fedstream_round_seconds_bucket",
                "fedstream_partial_commit_seconds_bucket", "fedstream_global_accuracy",
                "fedstream_global_loss", "fedstream_round_update_bytes", "fedstream_rejected_total",
                "fedstream_update_staleness_versions_bucket", "fedstream_model_version",
                "fedstream_devices_by_project_version", "fedstream_privacy_epsilon",
                "fedstream_anomalous_updates_total", "process_cpu_seconds_total",
                "process_resident_memory_bytes", "fedstream_inbox_depth",
                "fedstream_rounds_to_target", "fedstream_kafka_retries_total",
                "fedstream_kafka_consumer_lag"):
        assert sli in shown, f"{sli} is on no dashboard panel"


def test_dashboard_layout():
    import json

    dash = json.loads(mon.DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), p["title"]


def test_metric_names_reads_promql():
    expr = ('histogram_quantile(0.9, sum by (le, region) (rate(fedstream_x_bucket{region=~"$region",'
            'le!="1e9"}[$__rate_interval]))) / on(job) group_left(process) fedstream_y > 1e9 '
            'and ignoring(instance) fedstream_z offset 5m unless scalar(up)')
    assert mon.metric_names(expr) == {"fedstream_x_bucket", "fedstream_y", "fedstream_z", "up"}
    assert mon.as_run('rate(x{region=~"$region"}[$__rate_interval])') == \
        'rate(x{region=~".*"}[1m])'


def test_rules_with_other_settings_are_valid(tmp_path):
    _require_promtool()
    short = mon.AlertSettings(participation_for="0s", rejection_window="20s", rejections=3,
                              down_for="2s", pending_for="10s", stale_versions=4)
    (tmp_path / "rules.yml").write_text(mon.render_rules(short))
    p = subprocess.run([mon.PROMTOOL_BIN, "check", "rules", str(tmp_path / "rules.yml")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert 'le="4.0"' in (tmp_path / "rules.yml").read_text()
    with pytest.raises(ValueError, match="bucket"):
        mon.AlertSettings(stale_versions=5)


def test_prometheus_config_for_local_targets():
    targets = [mon.Target("global", "127.0.0.1:9101", "global"),
               mon.Target("regional", "127.0.0.1:9102", "region-0@a", "region-0"),
               mon.Target("edge", "127.0.0.1:9103", "agent-000", "region-0")]
    cfg = yaml.safe_load(mon.render_prometheus(targets, "127.0.0.1:9093",
                                               scrape_interval="1s"))
    jobs = {j["job_name"]: j["static_configs"] for j in cfg["scrape_configs"]}
    assert set(jobs) == {"global", "regional", "edge"}
    assert jobs["regional"] == [{"targets": ["127.0.0.1:9102"],
                                 "labels": {"process": "region-0@a", "region": "region-0"}}]
    assert cfg["global"]["scrape_interval"] == "1s"
    hook = yaml.safe_load(mon.render_alertmanager("http://127.0.0.1:5001/hook"))
    (oncall,) = [r for r in hook["receivers"] if r["name"] == hook["route"]["receiver"]]
    assert oncall["webhook_configs"] == [{"url": "http://127.0.0.1:5001/hook",
                                          "send_resolved": True}]
    with pytest.raises(ValueError):
        mon.Target("kafka", "127.0.0.1:1", "kafka")
