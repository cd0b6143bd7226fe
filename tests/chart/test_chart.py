"""The Helm chart, rendered with the real helm binary and checked against the Kubernetes
schemas (kubernetes-validate) and against the worker's own strict config loader.

Selected with ``-m chart``; needs helm (``HELM`` or on PATH). CI installs it (.ci/tools.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dlq_worker import config as config_mod

pytestmark = pytest.mark.chart

CHART = Path(__file__).parents[2] / "charts" / "dlq-worker"
VALUE_SETS = [None, *sorted(str(p) for p in (CHART / "ci").glob("*-values.yaml"))]
CRDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication"}


def helm() -> str:
    found = os.environ.get("HELM") or shutil.which("helm")
    if not found:
        raise RuntimeError("helm not found: set HELM or run .ci/tools.sh")
    return found


def render(*args: str, values: str | None = None) -> list[dict[str, Any]]:
    cmd = [helm(), "template", "rel", str(CHART), *args]
    if values:
        cmd += ["-f", values]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def render_error(*args: str) -> str:
    result = subprocess.run([helm(), "template", "rel", str(CHART), *args],
                            capture_output=True, text=True, check=False)
    assert result.returncode != 0, "rendering should have failed"
    return result.stderr


def kind(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == name]
    assert len(matches) == 1, f"{len(matches)} {name}"
    return matches[0]


@pytest.mark.parametrize("values", VALUE_SETS, ids=lambda v: Path(v).name if v else "default")
def test_lint_and_validate_against_kubernetes_schemas(values: str | None) -> None:
    cmd = [helm(), "lint", "--strict", str(CHART)] + (["-f", values] if values else [])
    lint = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    for doc in render(values=values):
        if doc["kind"] in CRDS:
            assert doc["apiVersion"] in ("monitoring.coreos.com/v1", "keda.sh/v1alpha1")
            continue
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


@pytest.mark.parametrize("values", VALUE_SETS, ids=lambda v: Path(v).name if v else "default")
def test_rendered_config_is_accepted_by_the_worker(values: str | None, tmp_path: Path) -> None:
    docs = render(values=values)
    configmap = next(d for d in docs if d["kind"] == "ConfigMap" and "worker.yaml" in d["data"])
    path = tmp_path / "worker.yaml"
    path.write_text(configmap["data"]["worker.yaml"])
    cfg = config_mod.load(path, env={})
    deployment = kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > cfg.worker.shutdown_timeout
    rendered = yaml.safe_load(configmap["data"]["worker.yaml"])
    assert not [k for section in rendered.values() for k in section if "password" in k]


def test_deployment_defaults_are_secure_and_probed() -> None:
    docs = render()
    pod = kind(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {e["name"] for e in container["env"]} == {"POD_NAME"}  # no secret configured
    labels = kind(docs, "Deployment")["metadata"]["labels"]
    for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                "app.kubernetes.io/managed-by", "helm.sh/chart"):
        assert key in labels
    cm = yaml.safe_load(kind(docs, "ConfigMap")["data"]["worker.yaml"])
    assert cm["redis"] == {"addr": "redis.kubernaut-system.svc.cluster.local:6379", "db": 1,
                           "username": "", "tls": False}
    assert cm["database"]["name"] == "action_history" and cm["database"]["user"] == "slm_user"


def _checksum(*args: str) -> str:
    pod = kind(render(*args), "Deployment")["spec"]["template"]
    return str(pod["metadata"]["annotations"]["checksum/config"])


def test_a_config_change_changes_the_checksum() -> None:
    base = _checksum()
    assert _checksum("--set", "config.worker.batch_size=1000") != base
    assert _checksum("--set", "database.host=elsewhere") != base
    assert _checksum("--set", "replicaCount=3") == base


def test_passwords_go_to_a_secret_never_to_the_configmap() -> None:
    docs = render("--set", "auth.databasePassword=s3cret-db",
                  "--set", "auth.redisPassword=s3cret-r")
    secret = kind(docs, "Secret")
    assert set(secret["data"]) == {"db-password", "redis-password"}
    configmap = kind(docs, "ConfigMap")
    assert "s3cret" not in yaml.safe_dump(configmap)
    env = {e["name"]: e.get("value") for e in
           kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DB_PASSWORD_FILE"] == "/etc/dlq-worker/secrets/db-password"

    existing = render("--set", "auth.existingSecret=mine")
    assert not [d for d in existing if d["kind"] == "Secret"]
    volumes = kind(existing, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "secrets", "secret": {"secretName": "mine", "defaultMode": 0o400}} in volumes


@pytest.mark.parametrize(("args", "fragment"), [
    (("--set", "replicaCnt=2"), "Additional property replicaCnt is not allowed"),
    (("--set", "config.worker.batch_sise=3"), "Additional property batch_sise is not allowed"),
    (("--set", "config.database.password=x"), "Additional property password is not allowed"),
    (("--set-string", "redis.db=one"), "redis.db"),
    (("--set", "redis.addr=nohostport"), "redis.addr"),
    (("--set", "shutdownTimeoutSeconds=40"), "must be greater than shutdownTimeoutSeconds"),
])
def test_bad_values_are_refused(args: tuple[str, ...], fragment: str) -> None:
    assert fragment in render_error(*args)


def test_keda_scales_on_group_lag_with_authentication() -> None:
    docs = render("-f", str(CHART / "ci" / "keda-existing-secret-values.yaml"))
    scaled = kind(docs, "ScaledObject")
    assert "replicas" not in kind(docs, "Deployment")["spec"]
    triggers = scaled["spec"]["triggers"]
    # one trigger per routed stream: none routed in config is missing from the scaler
    assert [t["metadata"]["stream"] for t in triggers] == ["audit:dlq:audit-v2",
                                                           "audit:dlq:events"]
    meta = triggers[0]["metadata"]
    assert meta["consumerGroup"] == "dlq-worker" and meta["lagCount"] == "500"
    assert meta["databaseIndex"] == "1" and meta["enableTLS"] == "true"
    assert meta["address"] == "redis.kubernaut-system.svc.cluster.local:6380"
    auth = kind(docs, "TriggerAuthentication")
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "dlq-credentials", "key": "redis-password"},
        {"parameter": "ca", "name": "redis-ca", "key": "ca.crt"},
        {"parameter": "cert", "name": "redis-ca", "key": "tls.crt"},
        {"parameter": "key", "name": "redis-ca", "key": "tls.key"}]
    assert triggers[0]["authenticationRef"]["name"] == auth["metadata"]["name"]


def test_alert_thresholds_durations_and_switches_come_from_values() -> None:
    docs = render("--namespace", "audit", "--set", "prometheusRule.enabled=true",
                  "--set", "prometheusRule.rules.AuditDLQDepthHigh.threshold=500",
                  "--set", "prometheusRule.rules.AuditDLQDepthHigh.for=10m",
                  "--set", "prometheusRule.rules.AuditDLQStuckForDays.severity=page",
                  "--set", "prometheusRule.rules.AuditDLQEntriesParked.enabled=false",
                  "--set", "prometheusRule.additionalRuleLabels.team=audit")
    rules = {r["alert"]: r for r in kind(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]}
    depth = rules["AuditDLQDepthHigh"]
    assert depth["expr"].endswith("> 500") and depth["for"] == "10m"
    assert rules["AuditDLQStuckForDays"]["labels"] == {"severity": "page", "team": "audit"}
    assert "AuditDLQEntriesParked" not in rules
    assert all(r["labels"]["team"] == "audit" for r in rules.values())
    assert 'namespace="audit"' in rules["AuditDLQWorkerDown"]["expr"]
    # the others are the tested file's, untouched
    source = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    near = next(r for r in source["groups"][0]["rules"] if r["alert"] == "AuditDLQNearCap")
    assert rules["AuditDLQNearCap"]["expr"] == near["expr"]


def test_an_unknown_alert_or_a_threshold_it_cannot_take_is_refused() -> None:
    assert "no such alert" in render_error("--set", "prometheusRule.enabled=true", "--set",
                                           "prometheusRule.rules.AuditDLQDepthHihg.for=1m")
    assert "does not end in a comparison" in render_error(
        "--set", "prometheusRule.enabled=true",
        "--set", "prometheusRule.rules.AuditDLQStalled.threshold=3")


def test_keda_follows_the_sentinels_when_the_worker_does() -> None:
    docs = render("--set", "keda.enabled=true", "--set",
                  "config.redis.sentinels=s1:26379\\,s2:26379",
                  "--set", "config.redis.master_name=dlq")
    trigger = kind(docs, "ScaledObject")["spec"]["triggers"][0]
    assert trigger["type"] == "redis-sentinel-streams"
    assert trigger["metadata"]["addresses"] == "s1:26379,s2:26379"
    assert trigger["metadata"]["sentinelMaster"] == "dlq"
    assert "address" not in trigger["metadata"]


def test_keda_triggers_default_to_the_workers_routes() -> None:
    docs = render("--set", "keda.enabled=true")
    streams = [t["metadata"]["stream"] for t in kind(docs, "ScaledObject")["spec"]["triggers"]]
    assert streams == [f"audit:dlq:{name}" for name in
                       sorted(config_mod.StreamsConfig().routes)]


def test_every_new_option_renders_where_it_belongs() -> None:
    docs = render("-f", str(CHART / "ci" / "all-values.yaml"))
    deployment = kind(docs, "Deployment")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["image"].startswith("registry.example/dlq-worker@sha256:")
    assert all(d["metadata"]["labels"]["team"] == "audit" for d in docs)
    assert pod["metadata"]["annotations"]["example.com/owner"] == "audit"
    assert container["envFrom"] == [{"configMapRef": {"name": "more-env"}}]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DLQ_WORKER_PLATFORM_CONFIG"] == "/etc/dlq-worker/platform/config.yaml"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["redis-ca"] == "/etc/dlq-worker/tls"
    assert mounts["platform-config"] == "/etc/dlq-worker/platform"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["platform-config"]["configMap"]["name"] == "datastorage-config"
    # the platform's Secrets where its file names them; its file, not the chart's values,
    # says where Redis and PostgreSQL are, and KEDA reads DB 0 where the platform writes
    assert mounts["platform-secret-0"] == "/etc/datastorage/secrets"
    assert volumes["platform-secret-0"]["secret"]["secretName"] == "datastorage-secrets"
    configmap = next(d for d in docs if d["kind"] == "ConfigMap" and "worker.yaml" in d["data"])
    rendered = yaml.safe_load(configmap["data"]["worker.yaml"])
    assert "redis" not in rendered and "database" not in rendered
    assert volumes["redis-ca"]["secret"]["secretName"] == "redis-ca"
    policy = kind(docs, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert [rule["ports"][0]["port"] for rule in policy["egress"]] == [6379, 5432, 53]
    assert policy["egress"][0]["to"][0]["podSelector"]["matchLabels"] == {"app": "redis"}
    # helm test: doctor with the worker's config, secrets and platform config, not
    # selected by the worker's Service
    test_pod = next(d for d in docs if d["kind"] == "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    spec = test_pod["spec"]["containers"][0]
    assert spec["args"][:1] == ["doctor"] and "--fail-on" in spec["args"]
    assert spec["env"] == container["env"] and spec["volumeMounts"] == container["volumeMounts"]
    service = kind(docs, "Service")["spec"]["selector"]
    assert not all(test_pod["metadata"]["labels"].get(k) == v for k, v in service.items())


def test_chart_readme_values_table_matches_values_yaml() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    table = readme.split("## Values", 1)[1].split("\n## ", 1)[0]
    documented: set[str] = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            cell = line.split("|")[1]
            documented |= {k.strip("` ") for k in cell.split(",") if k.strip().startswith("`")}

    def resolves(key: str) -> bool:
        node: Any = values
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    def leaves(node: Any, prefix: str = "") -> list[str]:
        if isinstance(node, dict) and node:
            return [leaf for k, v in node.items() for leaf in leaves(v, f"{prefix}{k}.")]
        return [prefix.rstrip(".")]

    assert sorted(k for k in documented if not resolves(k)) == [], "documented, not in values"
    undocumented = [leaf for leaf in leaves(values)
                    if not any(leaf == k or leaf.startswith(k + ".") for k in documented)]
    assert undocumented == [], "in values.yaml, not in the README's table"


def test_prometheus_rule_is_the_tested_rule_file() -> None:
    docs = render("-f", str(CHART / "ci" / "all-values.yaml"))
    rule = kind(docs, "PrometheusRule")
    source = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    rendered = rule["spec"]["groups"][0]["rules"]
    # every rule of the tested file but the one all-values.yaml switches off
    assert [r["alert"] for r in rendered] == [r["alert"] for r in source["groups"][0]["rules"]
                                              if r["alert"] != "AuditDLQEntriesParked"]
    for r in rendered:
        assert r["annotations"]["runbook_url"].startswith("https://")
        assert "DLQ_JOB" not in r["expr"] and "DLQ_NAMESPACE" not in r["expr"]
    monitor = kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert kind(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    dashboard = next(d for d in docs if d["metadata"]["name"].endswith("-dashboard"))
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
