"""The Grafana dashboard (k8s/dashboards/lapi-kv-sync.json): every panel's query is PromQL that
Prometheus accepts, over series the job really pushes, and shows what the runs did.

Real runs of the job (main()), once a simulated minute against the stand-ins, push to the real
Pushgateway, scraped every minute as Prometheus does (tests/test_alerts.py's machinery). Each
panel query becomes a recording rule (Grafana's $__range and $__interval filled in), and
`promtool test rules` evaluates them on those scrapes: each must give series, and the counting
panels (runs by exit code, audits, the last 24 hours against the free plan) the counts the runs
made. Needs promtool and the Pushgateway: skipped without them, a failure under CI=true.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

import lapi_kv_sync as job
from tests.conftest import ROOT
from tests.real import RealPushgateway, require
from tests.standins import decision
from tests.test_alerts import CLOUDFLARE_REFUSED, JOB, LAPI_REFUSED, OK, Run, healthy, selector, timeline

DASHBOARD = ROOT / "k8s" / "dashboards" / "lapi-kv-sync.json"
GRID_COLUMNS = 24


def panels() -> list[dict]:
    return json.loads(DASHBOARD.read_text())["panels"]


def queries() -> list[tuple[str, str]]:
    """(recording rule name, expression) for every panel target, in the dashboard's order."""
    return [(f"dashboard:panel{p['id']}_{t['refId']}", t["expr"]) for p in panels() for t in p["targets"]]


def promql(expr: str, range_minutes: int) -> str:
    """The query Grafana sends: its variables filled in as it would for a `range_minutes` view."""
    filled = expr.replace("$__range", f"{range_minutes}m").replace("$__rate_interval", "4m")
    filled = filled.replace("$__interval", "1m")
    assert "$" not in filled, f"a Grafana variable left in {expr}"
    return filled


# --------------------------------------------------------------------------- the runs


def scenario(state_file: Path) -> list[Run]:
    """Forty minutes with a state file: a cold start, a new ban, its removal, LAPI down three
    minutes, Cloudflare refusing two runs that have something to write, then steady runs
    (with an audit every AUDIT_INTERVAL)."""
    state = (("STATE_FILE", str(state_file)),)
    steady = replace(OK, env=state)
    new_ban = replace(steady, decisions=lambda: [*healthy(), decision("192.0.2.50")])
    lapi_down = replace(LAPI_REFUSED, env=LAPI_REFUSED.env + state)
    cloudflare_down = replace(
        CLOUDFLARE_REFUSED, decisions=lambda: [*healthy(), decision("192.0.2.51")], env=CLOUDFLARE_REFUSED.env + state
    )
    return [steady] * 8 + [new_ban] * 4 + [steady] * 4 + [lapi_down] * 3 + [cloudflare_down] * 2 + [steady] * 19


@pytest.fixture(scope="module")
def pushed(tmp_path_factory) -> tuple[list[Run], dict[str, list[str]]]:
    """The runs, and each series the Pushgateway held, minute by minute."""
    require("promtool")
    runs = scenario(tmp_path_factory.mktemp("state") / "record.gz")
    with RealPushgateway() as pushgateway:
        return runs, timeline(runs, pushgateway)


def series(values: dict[str, list[str]], name: str, **labels: str) -> list[str]:
    return values[selector(name, {**labels, "job": JOB})]


def new_success_minutes(values: dict[str, list[str]]) -> list[int]:
    """The minutes whose scrape shows a successful run the one before did not."""
    row = series(values, "crowdsec_kv_sync_last_success_timestamp_seconds")
    absent = {"_", "stale"}
    return [k for k, v in enumerate(row) if v not in absent and (k == 0 or row[k - 1] in absent or row[k - 1] != v)]


def summed_at_new_successes(values: dict[str, list[str]], name: str, **labels: str) -> int:
    row = series(values, name, **labels)
    return sum(round(float(row[k])) for k in new_success_minutes(values))


# --------------------------------------------------------------------------- the tests


def test_every_panel_query_gives_series_and_the_counts_the_runs_made(pushed, tmp_path):
    runs, values = pushed
    end = len(next(iter(values.values()))) - 1  # the last scrape, in minutes
    rules = [{"record": name, "expr": promql(expr, end)} for name, expr in queries()]
    (tmp_path / "dashboard.rules.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False, width=10**6)
    )
    by_title = {p["title"]: p for p in panels()}

    def record(title: str, ref: str = "A") -> str:
        return f"dashboard:panel{by_title[title]['id']}_{ref}"

    checks = [  # every query gives at least one series at the end
        {"expr": f"count({name}) > bool 0", "eval_time": f"{end}m", "exp_samples": [{"labels": "{}", "value": 1}]}
        for name, _ in queries()
    ]

    def exact(name: str, samples: dict[str, float]) -> None:
        checks.append(
            {
                "expr": name,
                "eval_time": f"{end}m",
                "exp_samples": [{"labels": labels, "value": value} for labels, value in samples.items()],
            }
        )

    codes = Counter(run.exit_code for run in runs)
    assert set(codes) == {job.EXIT_OK, job.EXIT_LAPI, job.EXIT_CLOUDFLARE}
    exact(
        record("Runs by exit code"),
        {f'{record("Runs by exit code")}{{code="{code}"}}': n for code, n in codes.items()},
    )
    audits = {r: summed_at_new_successes(values, "crowdsec_kv_sync_audited", reason=r) for r in job.AUDIT_REASONS}
    assert audits["no_record"] == 1 and audits["interval"] >= 1 and audits["no_state_file"] == 0
    exact(record("Audits by reason"), {f'{record("Audits by reason")}{{reason="{r}"}}': n for r, n in audits.items()})
    lists = summed_at_new_successes(values, "crowdsec_kv_sync_cloudflare_requests", operation="list")
    assert lists == sum(audits.values())  # a few keys: one list page an audit, none between audits
    daily = record("Last 24 h against the free plan's daily limits", "{}")
    exact(daily.format("A"), {f'{daily.format("A")}{{job="{JOB}",operation="list"}}': lists})
    written = summed_at_new_successes(values, "crowdsec_kv_sync_written")
    deleted = summed_at_new_successes(values, "crowdsec_kv_sync_deleted")
    assert written >= 3 + 1 and deleted >= 1  # at least the cold start, the new ban, its removal
    exact(daily.format("B"), {f'{daily.format("B")}{{job="{JOB}"}}': written})
    exact(daily.format("C"), {f'{daily.format("C")}{{job="{JOB}"}}': deleted})

    test_file = tmp_path / "dashboard.test.yml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": ["dashboard.rules.yml"],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": [{"series": n, "values": " ".join(v)} for n, v in values.items()],
                        "promql_expr_test": checks,
                    }
                ],
            },
            sort_keys=False,
            width=10**6,
        )
    )
    (promtool,) = require("promtool")
    done = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n(the test file: {test_file})"
    assert "SUCCESS" in done.stdout


def test_the_check_sees_an_empty_panel(pushed, tmp_path):
    """A query over a metric the job does not push gives nothing, and the check above says so."""
    _, values = pushed
    (tmp_path / "r.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "x", "expr": "crowdsec_kv_sync_nonesuch"}]}]})
    )
    check = {"expr": "count(x) > bool 0", "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": 1}]}
    test = {"interval": "1m", "input_series": [{"series": n, "values": " ".join(v)} for n, v in values.items()]}
    (tmp_path / "t.yml").write_text(
        yaml.safe_dump({"rule_files": ["r.yml"], "tests": [test | {"promql_expr_test": [check]}]}, width=10**6)
    )
    (promtool,) = require("promtool")
    done = subprocess.run([promtool, "test", "rules", "t.yml"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode != 0


def test_the_dashboard_uses_only_metrics_the_job_pushes():
    requests = Counter({"list": 1, "bulk_put": 1, "bulk_delete": 1})
    pushed = {
        name for name, *_ in job.metric_samples(job.Report(started=0.0, success=True, cloudflare_requests=requests))
    }
    used = {m for _, expr in queries() for m in re.findall(r"crowdsec_kv_sync_[a-z_]+", expr)}
    assert used <= pushed, used - pushed
    for _, expr in queries():
        for selector_text in re.findall(r"crowdsec_kv_sync_[a-z_]+(\{[^}]*\})?", expr):
            if selector_text:
                assert 'job="crowdsec-kv-sync"' in selector_text  # as the alerts select
    # Every panel the issue asks for.
    titles = {p["title"] for p in panels()}
    for wanted in ("Since the last success", "Last success", "Runs by exit code", "Keys by remediation and scope"):
        assert wanted in titles
    for wanted in ("Writes and deletes per run", "Run duration", "Audits by reason"):
        assert wanted in titles
    limits = {t["expr"] for p in panels() if "free plan" in p["title"] for t in p["targets"]}
    assert {"vector(1000)", "vector(100000)"} <= limits  # lists, writes, deletes; reads


def test_the_panels_fit_the_grid_without_overlapping():
    cells: dict[tuple[int, int], int] = {}
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
    for p in panels():
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= GRID_COLUMNS
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells.get((x, y))} and {p['id']} overlap"
                cells[x, y] = p["id"]
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"]
