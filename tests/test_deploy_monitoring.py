"""The monitoring components as a user's overlay renders them: k8s/components/prometheus-rule
(the alert rules as a PrometheusRule, from their one copy) and k8s/components/grafana-dashboard
(the dashboard as a ConfigMap for Grafana's sidecar, from its one file)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_dashboard import DASHBOARD
from tests.test_deploy import ALERTS, assert_the_cluster_can_run, one, overlay, plain_rules, render

# A Go duration as the PrometheusRule CRD's schema accepts it for `for` (y w d h m s ms, in order).
DURATION = re.compile(r"0|(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?")


@pytest.fixture(scope="module")
def monitored(tmp_path_factory) -> list[dict]:
    """The base with both monitoring components, as a user's overlay enables them."""
    return render(overlay(tmp_path_factory.mktemp("overlay"), "prometheus-rule", "grafana-dashboard", "state"))


def test_the_prometheus_rule_has_the_shape_the_operator_selects(monitored):
    rule = one(monitored, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["name"] == "lapi-kv-sync"
    labels = rule["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "lapi-kv-sync"
    assert labels["release"]  # kube-prometheus-stack's ruleSelector; the example overlay says how to set it
    # What the CRD's schema requires (prometheus-operator's monitoring.coreos.com_prometheusrules):
    # spec.groups only, each group named (names unique), each rule an expr and one of alert/record,
    # `for` a Go duration, labels and annotations strings.
    assert list(rule["spec"]) == ["groups"]
    names = [g["name"] for g in rule["spec"]["groups"]]
    assert all(names) and len(set(names)) == len(names)
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}
        for r in group["rules"]:
            assert isinstance(r["expr"], str) and ("alert" in r) != ("record" in r)
            assert set(r) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
            assert DURATION.fullmatch(r.get("for", "0"))
            for mapping in (r.get("labels", {}), r.get("annotations", {})):
                assert all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items())


def test_the_rendered_rules_are_the_rules_file_promtool_proves(monitored, tmp_path):
    """The PrometheusRule's spec, the one copy, and the plain rules file made by the documented
    command (docs/operations.md) are the same rules; tests/test_alerts.py runs `promtool test
    rules` on the rendered spec itself."""
    rendered = one(monitored, "PrometheusRule")["spec"]
    assert rendered == yaml.safe_load(ALERTS.read_text())["spec"]
    assert json.loads(plain_rules(tmp_path).read_text()) == rendered


def test_the_rules_exist_once():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    rule = "- alert: " + "CrowdsecKvSyncStale"  # a line of the rules, not of this file
    holding = [p for p in tracked if rule in map(str.strip, (ROOT / p).read_text(errors="replace").splitlines())]
    assert holding in ([], [str(ALERTS.relative_to(ROOT))])  # [] outside a git checkout


def test_the_dashboard_configmap_is_the_dashboard_file_labelled_for_the_sidecar(monitored):
    import kubernetes_validate

    dashboard = one(monitored, "ConfigMap", "lapi-kv-sync-dashboard")
    assert dashboard["metadata"]["name"] == "lapi-kv-sync-dashboard"  # no hash suffix: no stale copy left behind
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["labels"]["app.kubernetes.io/name"] == "lapi-kv-sync"
    assert dashboard["data"] == {"lapi-kv-sync.json": DASHBOARD.read_text()}  # byte for byte
    assert json.loads(dashboard["data"]["lapi-kv-sync.json"])["uid"] == "lapi-kv-sync"
    version = kubernetes_validate.utils.latest_version()
    for doc in monitored:
        if doc["kind"] != "PrometheusRule":  # a CRD: checked above
            kubernetes_validate.validate(doc, version, strict=True)
    # The components add objects and change nothing the job runs with.
    assert_the_cluster_can_run(monitored)


def test_the_dashboard_exists_once():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    copies = [
        path for path in tracked if path.endswith(".json") and '"uid": "lapi-kv-sync"' in (ROOT / path).read_text()
    ]
    assert copies in ([], [str(DASHBOARD.relative_to(ROOT))])


def test_the_base_has_no_monitoring_objects():
    """The components are optional: the base renders in a cluster without the Operator's CRDs."""
    base = render(ROOT)
    assert not [d for d in base if d["kind"] == "PrometheusRule"]
    assert not [d for d in base if "grafana_dashboard" in d["metadata"].get("labels", {})]
