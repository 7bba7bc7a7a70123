"""Static checks of what reads genq's metrics: the alert rules (compose's file and the Kubernetes
copy), the Grafana dashboard and the Prometheus scaling trigger parse as PromQL and name only
metrics genq exports; the rule file holds nothing Prometheus's loader refuses; docs/observability.md
lists exactly those metrics, and a runbook for each alert."""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY

import common.reaper  # noqa: F401  (registers genq_jobs_reaped_total)
import gateway.metrics  # noqa: F401  (registers the gateway's metrics)
import worker.metrics  # noqa: F401  (registers the worker's metrics)
from tests.deploy_files import K8S, ROOT, of_kind, render
from tests.scrape import documented_metrics

RULES = ROOT / "compose" / "prometheus" / "rules" / "genq.yml"
K8S_RULES = K8S / "components" / "monitoring" / "prometheusrule-serving.yaml"
DASHBOARD = ROOT / "compose" / "grafana" / "dashboards" / "genq.json"
DOC = (ROOT / "docs" / "observability.md").read_text()

# What Prometheus adds to a family's name in its samples.
_SUFFIXES = re.compile(r"_(total|bucket|sum|count|created)$")
# Prometheus's rule files (its rulefmt package): fields, and names and durations.
_GROUP_FIELDS = {"name", "interval", "limit", "query_offset", "labels", "rules"}
_RULE_FIELDS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
# Grafana's variables, as a query would read once Grafana has filled them in.
_GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$pool": ".*"}


@cache
def exported() -> dict[str, str]:
    """genq's metric families, by name: their type."""
    return {f.name: f.type for f in REGISTRY.collect() if f.name.startswith("genq_")}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (raises if it does not parse)."""
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def unknown_metrics(expr: str) -> set[str]:
    return {n for n in metric_names(expr) if _SUFFIXES.sub("", n) not in exported()}


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    queries += [v["definition"] for v in board["templating"]["list"]]
    out = []
    for query in queries:
        for variable, value in _GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        # label_values(metric, label) is Grafana's, not PromQL: its metric is what matters.
        out.append(re.sub(r"^label_values\((\w+), \w+\)$", r"\1", query))
    return out


def test_the_checks_catch_an_unknown_metric_and_a_broken_expression() -> None:
    assert unknown_metrics("rate(genq_requests_failed_total[5m]) > 0") == set()
    assert unknown_metrics("sum(genq_no_such_thing) / max(genq_queue_depth)") == {
        "genq_no_such_thing"
    }
    with pytest.raises(ValueError, match="unclosed"):
        metric_names("sum(rate(genq_queue_depth[5m])")


def test_every_alert_rule_parses_and_names_only_exported_metrics() -> None:
    alerts = rules()
    assert len(alerts) == 9
    for rule in alerts:
        assert metric_names(rule["expr"]), rule["alert"]
        assert unknown_metrics(rule["expr"]) == set(), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]


def test_the_issue_s_alerts_are_all_there() -> None:
    names = {rule["alert"] for rule in rules()}
    assert names == {
        "GenqQueueGrowing",
        "GenqQueueOldestJobTooOld",
        "GenqTimeToFirstTokenHigh",
        "GenqKVCacheNearlyFull",
        "GenqWorkerMemoryNearLimit",
        "GenqNoLiveWorker",
        "GenqErrorRatioHigh",
        "GenqRedisUnreachable",
        "GenqRedisCircuitBreakerOpen",
    }


def test_every_alert_has_its_runbook_in_the_docs() -> None:
    for rule in rules():
        name = rule["alert"]
        assert f"\n### {name}\n" in DOC, name
        assert rule["annotations"]["runbook"] == f"docs/observability.md#{name.lower()}"


def test_kubernetes_carries_the_same_rules_as_compose() -> None:
    (copy,) = yaml.safe_load_all(K8S_RULES.read_text())
    assert copy["spec"] == yaml.safe_load(RULES.read_text()), (
        f"{K8S_RULES.name} must hold the groups of {RULES.relative_to(ROOT)}: copy them over"
    )
    rendered = [r for r in of_kind(render("prod"), "PrometheusRule")]
    assert copy["spec"] in [r["spec"] for r in rendered]


def rule_file_problems(text: str) -> list[str]:
    """What Prometheus's loader (`promtool check rules`) refuses in a rules file beyond PromQL
    that does not parse: an unknown field, a group without a unique name, a rule that is not
    exactly one of alert or record, a duration, label name or recorded metric name that is not
    one, `for` or annotations on a recording rule, and a template left open. Checked here in
    Python, so that it runs on every machine (promtool is not on PyPI)."""
    problems = []
    document = yaml.safe_load(text)
    if set(document) != {"groups"}:
        problems.append(f"top level: {sorted(document)}, not just groups")
    names = [group.get("name") for group in document.get("groups", [])]
    if None in names or len(set(names)) != len(names):
        problems.append(f"group names missing or repeated: {names}")
    for group in document.get("groups", []):
        if unknown := set(group) - _GROUP_FIELDS:
            problems.append(f"group {group.get('name')}: unknown fields {sorted(unknown)}")
        if "interval" in group and not _DURATION.match(str(group["interval"])):
            problems.append(f"group {group.get('name')}: interval {group['interval']!r}")
        for rule in group.get("rules", []):
            name = rule.get("alert", rule.get("record"))
            if unknown := set(rule) - _RULE_FIELDS:
                problems.append(f"{name}: unknown fields {sorted(unknown)}")
            if ("alert" in rule) == ("record" in rule):
                problems.append(f"{name}: give exactly one of alert and record")
            if "record" in rule:
                if not _METRIC_NAME.match(str(rule["record"])):
                    problems.append(f"{name}: not a metric name")
                if {"for", "keep_firing_for", "annotations"} & set(rule):
                    problems.append(f"{name}: for, keep_firing_for or annotations on a record")
            if not isinstance(rule.get("expr"), str) or not rule["expr"].strip():
                problems.append(f"{name}: no expr")
            for field in ("for", "keep_firing_for"):
                if field in rule and not _DURATION.match(str(rule[field])):
                    problems.append(f"{name}: {field} {rule[field]!r} is not a duration")
            for field in ("labels", "annotations"):
                for key, value in (rule.get(field) or {}).items():
                    if not _LABEL_NAME.match(str(key)):
                        problems.append(f"{name}: {field} name {key!r}")
                    if str(value).count("{{") != str(value).count("}}"):
                        problems.append(f"{name}: {field} {key} leaves a template open")
    return problems


def test_the_rule_file_check_catches_what_prometheus_refuses() -> None:
    good = {"alert": "A", "expr": "up == 0", "for": "5m", "labels": {"severity": "warning"}}
    broken = [
        {**good, "fore": "5m"},
        {**good, "record": "a:b"},
        {"record": "not a name", "expr": "up"},
        {"record": "a:b", "expr": "up", "for": "5m"},
        {**good, "for": "five minutes"},
        {**good, "labels": {"bad-name": "x"}},
        {**good, "annotations": {"summary": "{{ $labels.pool "}},
        {"alert": "A"},
    ]
    assert rule_file_problems(yaml.safe_dump({"groups": [{"name": "g", "rules": [good]}]})) == []
    for rule in broken:
        text = yaml.safe_dump({"groups": [{"name": "g", "rules": [rule]}]})
        assert rule_file_problems(text), rule
    twice = {"groups": [{"name": "g", "rules": [good]}, {"name": "g", "rules": [good]}]}
    assert rule_file_problems(yaml.safe_dump(twice))


def test_the_rule_file_loads_as_prometheus_loads_it() -> None:
    assert rule_file_problems(RULES.read_text()) == []


def test_every_dashboard_query_parses_and_names_only_exported_metrics() -> None:
    queries = dashboard_queries()
    assert len(queries) > 20
    for query in queries:
        assert metric_names(query), query
        assert unknown_metrics(query) == set(), query


def test_the_scaling_trigger_and_deployment_alerts_name_only_exported_metrics() -> None:
    (scaled,) = of_kind(render("prod+prometheus-scaling"), "ScaledObject")
    queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"]]
    rule_sets = of_kind(render("prod"), "PrometheusRule")
    queries += [r["expr"] for s in rule_sets for g in s["spec"]["groups"] for r in g["rules"]]
    named: set[str] = set()
    for query in queries:
        genq = {n for n in metric_names(query) if n.startswith("genq_")}
        assert {n for n in genq if _SUFFIXES.sub("", n) not in exported()} == set(), query
        named |= genq
    # Some alerts read kube-state-metrics alone; the trigger reads genq's queue.
    assert "genq_queue_depth" in {_SUFFIXES.sub("", n) for n in named}


def test_the_docs_list_every_exported_metric_with_its_type() -> None:
    documented = documented_metrics()
    assert {_SUFFIXES.sub("", name): d.kind for name, d in documented.items()} == exported()
    for name, d in documented.items():
        assert name.endswith("_total") == (d.kind == "counter"), name
        assert d.processes <= {"gateway", "worker"}, name
