"""Alerts, dashboard, chart schema and runbook stay true to what the worker really exports."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from dlq_worker import config as config_mod
from dlq_worker.watch.metrics import Metrics

ROOT = Path(__file__).parents[2]
CHART = ROOT / "charts" / "dlq-worker"
NAME = re.compile(r"\b(dlq_worker_[a-z_]+)")
EXTERNAL = {"redis_memory_used_bytes", "up"}  # redis_exporter's, and Prometheus's own


def exported_names() -> set[str]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.init_stream("audit:dlq:events", "audit_events")
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def alert_rules() -> list[dict[str, object]]:
    doc = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_metric_in_alerts_and_dashboard_is_exported() -> None:
    exported = exported_names()
    exprs = [str(rule["expr"]) for rule in alert_rules()]
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for expr in exprs for name in NAME.findall(expr)}
    assert used, "no metric found in the expressions"
    assert used - exported == set(), f"not exported: {sorted(used - exported)}"


def test_every_alert_has_a_runbook_section() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    anchors = {re.sub(r"[^a-z0-9]", "", h.lower())
               for h in re.findall(r"^## (.+)$", runbook, re.M)}
    for rule in alert_rules():
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        anchor = str(annotations["runbook_url"]).split("#", 1)[1]
        assert anchor == str(rule["alert"]).lower()
        assert anchor in anchors, f"docs/runbook.md has no section for {rule['alert']}"
        assert annotations["summary"] and annotations["description"]


def test_chart_schema_knows_every_worker_setting() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    sections = schema["properties"]["config"]["properties"]
    owned = {("redis", "password"), ("database", "password"), ("worker", "shutdown_timeout"),
             ("http", "port"), ("http", "host"), ("redis", "password_file"),
             ("database", "password_file"), ("database", "hash_chain_key")}
    for name, cls in config_mod._SECTIONS.items():
        keys = {f.name for f in dataclasses.fields(cls)} - {k for s, k in owned if s == name}
        assert set(sections[name]["properties"]) == keys, name


def test_every_dashboard_query_follows_the_namespace_and_job_variables() -> None:
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "job"} <= variables
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            for selector in re.findall(r"\b(dlq_worker_[a-z_]+)(\{[^}]*\})?", target["expr"]):
                assert 'namespace=~"$namespace"' in selector[1], target["expr"]
                assert 'job=~"$job"' in selector[1], target["expr"]


def test_alerts_keep_two_namespaces_apart() -> None:
    for rule in alert_rules():
        expr = str(rule["expr"])
        for grouping in re.findall(r"\b(?:max|sum) by \(([^)]*)\)", expr):
            assert "namespace" in grouping, (rule["alert"], expr)


def _reasons_in_code() -> set[str]:
    """Every reason the package can raise, read from its source: ``reason="..."``
    arguments, ``reason = "..."`` class attributes and the values of classify's tables."""
    import ast

    from dlq_worker.drain import classify

    found: set[str] = set()
    for path in (ROOT / "dlq_worker").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "reason" and isinstance(
                    node.value, ast.Constant) and isinstance(node.value.value, str):
                found.add(node.value.value)
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "reason" for t in node.targets) and \
                    isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                found.add(node.value.value)
    found |= set(classify._REASONS.values()) | set(classify._CLASS_REASONS.values())
    return found


def test_every_reason_the_code_can_emit_exists_at_zero_from_the_start() -> None:
    # Given every reason the code can reject or park an entry with
    from dlq_worker.errors import REASONS

    in_code = _reasons_in_code()
    assert len(in_code) > 20  # the walk really read the package
    assert in_code <= REASONS, f"reasons missing from errors.REASONS: {in_code - REASONS}"

    # When a stream's series are initialised
    registry = CollectorRegistry()
    Metrics(registry).init_stream("audit:dlq:events", "audit_events")

    # Then each parked and rejected series exists at 0, so the first one counted pages
    for reason in in_code:
        for name in ("dlq_worker_entries_parked_total", "dlq_worker_entries_rejected_total"):
            value = registry.get_sample_value(name, {"stream": "audit:dlq:events",
                                                     "reason": reason})
            assert value == 0.0, (name, reason)
