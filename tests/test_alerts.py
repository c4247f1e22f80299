"""The alert rules proven with `promtool test rules`, on series the job really pushes.

Each scenario runs the real job (main()) once a simulated minute against the stand-ins, pushing
to the real Pushgateway, and scrapes the Pushgateway every minute as Prometheus does with
`honor_labels: true`. Those scrapes become the promtool test's input series; the test asserts
that each alert fires in its scenario only once its `for` has passed, and that nothing fires
for a healthy job, a job that failed once and recovered, or dry runs (which push nothing).

Needs promtool (unpacked by .ci/install-components) and the Pushgateway: skipped without them,
a failure under CI=true.
"""

from __future__ import annotations

import io
import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

import lapi_kv_sync as job
from tests.conftest import CF_TOKEN, LAPI_KEY, Stack, assert_no_secret
from tests.real import RealPushgateway, require
from tests.standins import Entry, KvStandin, LapiStandin, decision
from tests.test_deploy import ALERTS, rendered_rules
from tests.test_state_robust import read_only

JOB = job.JOB_NAME
START = 5  # seconds past the minute a CronJob's run starts (scheduling, pod start)


def alert_rules() -> dict[str, dict]:
    groups = yaml.safe_load(ALERTS.read_text())["spec"]["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def minutes(duration: str | None) -> int:
    """A rule's `for` in whole minutes (the rules use m and h only)."""
    if not duration:
        return 0
    value, unit = re.fullmatch(r"(\d+)([mh])", duration).groups()
    return int(value) * (60 if unit == "h" else 1)


# --------------------------------------------------------------------------- runs, minute by minute


class SimClock:
    """The job's clock at a simulated time: promtool's series start at Unix time 0. Time stands
    still within a run, except for the retries' waits."""

    def __init__(self, at: float) -> None:
        self.at = at

    def now(self) -> float:
        return self.at

    def sleep(self, seconds: float) -> None:
        self.at += seconds

    def clock(self) -> job.Clock:
        return job.Clock(now=self.now, monotonic=self.now, sleep=self.sleep)


def healthy() -> list[dict]:
    return [decision("192.0.2.1"), decision("192.0.2.2", type="captcha"), decision("2001:db8::1", origin="cscli")]


def mostly_ignored() -> list[dict]:
    """150 throttles next to 3 decisions written: most of what LAPI holds never reaches the edge."""
    return healthy() + [decision(f"198.51.100.{i}", type="throttle") for i in range(150)]


@dataclass(frozen=True)
class Run:
    """One kind of run: what LAPI holds, the job's arguments and environment, KV beforehand, and
    the exit code that shows the run was the kind it is meant to be."""

    decisions: Callable[[], list[dict]] = healthy
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    stray_key: bool = False  # a key in KV that LAPI no longer wants
    # A directory where the STATE_FILE's lock file goes: every run audits, and records nothing.
    lock_blocked: bool = False
    exit_code: int = job.EXIT_OK
    read_only: bool = False  # the scenario's STATE_FILE folder as on a volume remounted read-only


OK = Run()
LAPI_REFUSED = Run(env=(("LAPI_KEY", "not-the-bouncer-key"),), exit_code=job.EXIT_LAPI)
CLOUDFLARE_REFUSED = Run(env=(("CF_API_TOKEN", "wrong-token-zzzzzzzz"),), exit_code=job.EXIT_CLOUDFLARE)
HELD_BACK = Run(env=(("MAX_DELETES", "0"),), stray_key=True, exit_code=job.EXIT_CLOUDFLARE)
IGNORING = Run(decisions=mostly_ignored)
# With STATE_FILE (`{state}`: a folder of the scenario's own) steady runs send Cloudflare nothing.
WITH_STATE = (("STATE_FILE", "{state}/record.gz"),)
OK_WITH_STATE = Run(env=WITH_STATE)
REVOKED_WITH_STATE = Run(env=WITH_STATE + CLOUDFLARE_REFUSED.env)
REVOKED_WITH_STATE_FAILING = Run(env=REVOKED_WITH_STATE.env, exit_code=job.EXIT_CLOUDFLARE)
# The volume turns read-only after a first audit: refused while a later run could still trust the
# record in place (AUDIT_INTERVAL after that audit), then converging KV without recording.
READ_ONLY_REFUSED = Run(env=WITH_STATE, read_only=True, exit_code=job.EXIT_STATE)
READ_ONLY_ENFORCING = Run(env=WITH_STATE, read_only=True)
DRY = Run(args=("--dry-run",))
DRY_FAILING = Run(args=("--dry-run",), env=LAPI_REFUSED.env, exit_code=job.EXIT_LAPI)
NONE = None  # no run that minute (CronJob suspended)


OK_WITH_STATE_LOCK_BLOCKED = Run(env=WITH_STATE, lock_blocked=True)


def scrape(pushgateway: RealPushgateway) -> dict[str, str]:
    """Our job's series as Prometheus stores them when it scrapes the Pushgateway with
    honor_labels: true: the pushed `job` label kept, the empty `instance` label dropped."""
    scraped = {}
    for name, value in pushgateway.metrics().items():
        base, _, labels = name.rstrip("}").partition("{")
        pairs = dict(pair.split("=", 1) for pair in labels.split(",") if pair)
        scraped[selector(base, {k: v.strip('"') for k, v in pairs.items()} | {"job": JOB})] = repr(value)
    return scraped


def timeline(runs_by_minute: list[Run | list[Run] | None], pushgateway: RealPushgateway) -> dict[str, list[str]]:
    """Run the job as scheduled, scrape every minute; each series' values for promtool, where
    index k is the scrape at minute k (the runs of minutes before k have pushed)."""
    scrapes = []
    with LapiStandin(LAPI_KEY) as lapi, KvStandin(CF_TOKEN) as kv, tempfile.TemporaryDirectory() as state:
        stack = Stack(lapi, kv, pushgateway)
        for minute, runs in enumerate(runs_by_minute):
            scrapes.append(scrape(pushgateway))
            for i, run in enumerate(runs if isinstance(runs, list) else [runs] if runs else []):
                lapi.decisions = run.decisions()
                if run.stray_key:
                    kv.store.setdefault("ip:203.0.113.9", Entry("ban", None, {"remediation": "ban"}))
                out, err = io.StringIO(), io.StringIO()
                at = SimClock(minute * 60 + START + 30 * i)  # a second run in a minute: by hand, half a minute on
                env = {name: value.replace("{state}", state) for name, value in run.env}
                if run.lock_blocked:
                    Path(state, "record.gz.lock").mkdir(exist_ok=True)
                with pytest.MonkeyPatch.context() as patch:
                    if run.read_only:
                        read_only(patch, Path(state))
                    code = job.main(list(run.args), stack.env(**env), out, err, at.clock())
                assert_no_secret(out.getvalue(), err.getvalue())
                assert code == run.exit_code, err.getvalue()
        scrapes.append(scrape(pushgateway))
        assert kv.violations == []
    names = sorted({name for s in scrapes for name in s})
    values = {}
    for name in names:
        row = []
        for k, s in enumerate(scrapes):
            row.append(s[name] if name in s else "stale" if k and name in scrapes[k - 1] else "_")
        values[name] = row
    return values


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    runs: Callable[[], list]
    fires: dict[str, int] = field(default_factory=dict)  # alert -> the first scrape (minute) its condition holds
    silent: bool = False  # no alert fires at any minute
    never: tuple[str, ...] = ()  # alerts that must not fire at any minute (another is the one that names the cause)


def after(minute_of_last: int, threshold: int) -> int:
    """The first scrape (minute) at which `time() - <pushed at that run> > threshold`."""
    return (minute_of_last * 60 + START + threshold) // 60 + 1


SCENARIOS = [
    Scenario("healthy: success every minute", lambda: [OK] * 60, silent=True),
    Scenario(
        "failed once, on each side, and recovered",
        lambda: [OK] * 10 + [LAPI_REFUSED] + [OK] * 10 + [CLOUDFLARE_REFUSED] + [OK] * 10,
        silent=True,
    ),
    Scenario(
        "dry runs by hand between the runs, succeeding or failing: they push nothing",
        lambda: [OK] * 5 + [[OK, DRY], [OK, DRY_FAILING]] * 10 + [OK] * 10,
        silent=True,
    ),
    Scenario(
        "LAPI refuses the bouncer key from minute 10",
        lambda: [OK] * 10 + [LAPI_REFUSED] * 30,
        fires={"CrowdsecKvSyncLapiUnreadable": 11, "CrowdsecKvSyncStale": after(9, 900)},
    ),
    Scenario(
        "Cloudflare refuses the token from minute 10",
        lambda: [OK] * 10 + [CLOUDFLARE_REFUSED] * 10,
        fires={"CrowdsecKvSyncCloudflareFailing": 11},
    ),
    Scenario(
        # Revoked at minute 1, just after an audit: the run past half of AUDIT_INTERVAL (450 s)
        # checks the token and fails, and so does every run after it; without that check the
        # failure would wait for the next audit (minute 15) and the alert for minute 20.
        "with STATE_FILE, Cloudflare refuses the token from minute 1: caught within AUDIT_INTERVAL",
        lambda: [OK_WITH_STATE] + [REVOKED_WITH_STATE] * 7 + [REVOKED_WITH_STATE_FAILING] * 12,
        fires={"CrowdsecKvSyncCloudflareFailing": 9},
    ),
    Scenario(
        "a new deployment that never succeeds",
        lambda: [CLOUDFLARE_REFUSED] * 20,
        fires={"CrowdsecKvSyncNeverSucceeded": 1, "CrowdsecKvSyncCloudflareFailing": 1},
    ),
    Scenario(
        "the CronJob stops running after minute 4",
        lambda: [OK] * 5 + [NONE] * 20,
        fires={"CrowdsecKvSyncLastRunOld": after(4, 600), "CrowdsecKvSyncStale": after(4, 900)},
    ),
    Scenario(
        "MAX_DELETES holds deletes back from minute 5",
        lambda: [OK] * 5 + [HELD_BACK] * 10,
        fires={"CrowdsecKvSyncDeletesHeldBack": 6, "CrowdsecKvSyncCloudflareFailing": 6},
    ),
    Scenario(
        "most decisions are not written (throttles)",
        lambda: [IGNORING] * 35,
        fires={"CrowdsecKvSyncManyIgnored": 1},
    ),
    Scenario("healthy with a state file: trusted but on the first run", lambda: [OK_WITH_STATE] * 40, silent=True),
    Scenario(
        "a state file whose lock cannot be opened from minute 5: never trusted",
        lambda: [OK] * 5 + [OK_WITH_STATE_LOCK_BLOCKED] * 25,
        fires={"CrowdsecKvSyncStateUntrusted": 6},
    ),
    Scenario(
        # Audited at minute 0 (5 s past it); read-only from minute 3. The runs of minutes 3 to 14
        # change nothing (exit 4): a run that can write would trust the record until 905 s. From
        # minute 15 they converge KV without it (exit 0, state_trusted 0). Not Cloudflare's alert.
        "a state volume that turns read-only at minute 3: named, and enforcing again after AUDIT_INTERVAL",
        lambda: [OK_WITH_STATE] * 3 + [READ_ONLY_REFUSED] * 12 + [READ_ONLY_ENFORCING] * 20,
        fires={"CrowdsecKvSyncStateUnwritable": 4, "CrowdsecKvSyncStateUntrusted": 16},
        never=("CrowdsecKvSyncCloudflareFailing", "CrowdsecKvSyncStale"),
    ),
    Scenario(
        "never pushed: only dry runs",
        lambda: [DRY] * 15,
        fires={"CrowdsecKvSyncAbsent": 0},
    ),
]


def promtool_test(scenario: Scenario, series: dict[str, list[str]], rules: dict[str, dict]) -> dict:
    end = len(series[next(iter(series))]) - 1 if series else len(scenario.runs())
    test: dict = {
        "name": scenario.name,
        "interval": "1m",
        "input_series": [{"series": name, "values": " ".join(values)} for name, values in series.items()],
        "alert_rule_test": [],
        "promql_expr_test": [],
    }
    firing = 'ALERTS{alertstate="firing"%s}'
    if scenario.silent:
        test["promql_expr_test"].append(
            {"expr": f"count_over_time({firing % ''}[{end}m])", "eval_time": f"{end}m", "exp_samples": []}
        )
    for alert in scenario.never:
        only = firing % f',alertname="{alert}"'
        test["promql_expr_test"].append(
            {"expr": f"count_over_time({only}[{end}m])", "eval_time": f"{end}m", "exp_samples": []}
        )
    for alert, onset in scenario.fires.items():
        fires_at = onset + minutes(rules[alert].get("for"))
        assert fires_at <= end, f"{scenario.name}: too short to see {alert} fire"
        labels = {"alertname": alert, "alertstate": "firing", "job": JOB, **rules[alert]["labels"]}
        if fires_at > 0:  # not a minute earlier: the `for` (or the threshold) holds it back
            test["alert_rule_test"].append({"eval_time": f"{fires_at - 1}m", "alertname": alert, "exp_alerts": []})
        test["promql_expr_test"].append(
            {
                "expr": firing % f',alertname="{alert}"',
                "eval_time": f"{fires_at}m",
                "exp_samples": [{"labels": selector("ALERTS", labels), "value": 1}],
            }
        )
    return test


@pytest.fixture(scope="module")
def promtool_file(tmp_path_factory) -> Path:
    """The promtool test file of every scenario, from the job's real pushes, for the rules the
    PrometheusRule component renders (tests/test_deploy_monitoring.py: the same as the plain
    rules file)."""
    require("promtool")
    rules_file = rendered_rules(tmp_path_factory.mktemp("rules"))
    rules = alert_rules()
    tests = []
    for scenario in SCENARIOS:
        with RealPushgateway() as pushgateway:  # a fresh one per scenario: no group left from the last
            tests.append(promtool_test(scenario, timeline(scenario.runs(), pushgateway), rules))
    path = tmp_path_factory.mktemp("alerts") / "lapi-kv-sync.test.yml"
    path.write_text(
        yaml.safe_dump(
            {"rule_files": [str(rules_file)], "evaluation_interval": "1m", "tests": tests}, sort_keys=False, width=10**6
        )
    )
    return path


def test_every_alert_fires_in_its_scenario_and_none_in_the_healthy_ones(promtool_file):
    (promtool,) = require("promtool")
    done = subprocess.run([promtool, "test", "rules", str(promtool_file)], capture_output=True, text=True)
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n(the test file: {promtool_file})"
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_scenario_and_the_scenarios_see_what_the_job_pushes(promtool_file):
    tests = yaml.safe_load(promtool_file.read_text())["tests"]
    proven = {t["alertname"] for test in tests for t in test["alert_rule_test"]}
    proven |= {
        re.search(r'alertname="(\w+)"', t["expr"]).group(1)
        for test in tests
        for t in test["promql_expr_test"]
        if "alertname" in t["expr"]
    }
    assert proven == set(alert_rules())
    scraped = {s["series"] for s in tests[0]["input_series"]}  # the healthy job's
    requests = Counter({"list": 1, "bulk_put": 1, "bulk_delete": 1})  # the operations the job counts
    pushed = job.metric_samples(job.Report(started=0.0, success=True, cloudflare_requests=requests))
    assert scraped == {selector(name, {**labels, "job": JOB}) for name, _, labels, _ in pushed}


def selector(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def test_the_rules_say_they_need_honor_labels():
    assert "honor_labels: true" in ALERTS.read_text()


def test_the_scenarios_leave_nothing_in_the_temp_directory(tmp_path, monkeypatch):
    """A scenario's state file lives in its timeline's own temporary folder, which goes with it:
    building the runs makes no folder (it once left a lapi-kv-sync-alerts-* folder per scenario)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for scenario in SCENARIOS:
        assert scenario.runs()
    assert list(tmp_path.iterdir()) == []
    assert any(OK_WITH_STATE_LOCK_BLOCKED in scenario.runs() for scenario in SCENARIOS)
