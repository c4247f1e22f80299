"""CrowdSec usage metrics: the cadence (pure), the payload against CrowdSec's schema, and whole
runs against the LAPI stand-in: sent when due after a run that converged, never otherwise, and
nothing a LAPI can answer changes the run."""

from __future__ import annotations

import functools
import io
import json
import time
from collections import Counter

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

import lapi_kv_sync as job
from tests.conftest import CF_TOKEN, FakeClock, Stack
from tests.standins import Entry, KvStandin, PushgatewayStandin, UsageSchemaCheck, decision
from tests.test_operator import tls_stack

QUARTER = job.USAGE_METRICS_INTERVAL


def at_quarter(seconds_into: float) -> float:
    """The clock offset that puts a run starting now `seconds_into` the current quarter hour (UTC)."""
    now = time.time()
    return now - now % QUARTER + seconds_into - now


def sent_items(body: dict) -> dict[tuple[str, str], float]:
    """The non-zero `active_decisions` of a usage-metrics body, by (origin, ip_type)."""
    (component,) = body["remediation_components"]
    (window,) = component["metrics"]
    return {(i["labels"]["origin"], i["labels"]["ip_type"]): i["value"] for i in window["items"] if i["value"]}


# --------------------------------------------------------------------------- the cadence (pure)


@pytest.mark.parametrize(
    ("into", "due"), [(0, True), (1, True), (59.999, True), (60, False), (61, False), (450, False), (899.9, False)]
)
def test_without_a_record_the_run_starting_in_the_first_minute_of_a_quarter_sends(into, due):
    for quarter in (0, 1, 1_790_000_000 // QUARTER):
        assert job.usage_metrics_due(quarter * QUARTER + into, None) is due


@given(
    first=st.integers(0, 10**6),
    delays=st.lists(st.floats(0, 59.0), min_size=60, max_size=60),
)
def test_one_run_a_minute_sends_once_in_each_quarter_hour(first, delays):
    """Whatever each run's start delay under a minute, each quarter hour has exactly one due run."""
    starts = [(first + i) * 60 + delay for i, delay in enumerate(delays)]
    due = Counter(int(s // QUARTER) for s in starts if job.usage_metrics_due(s, None))
    complete = {int(s // QUARTER) for s in starts} - {int(starts[0] // QUARTER), int(starts[-1] // QUARTER)}
    assert all(due[q] == 1 for q in complete)
    assert max(due.values(), default=1) == 1


@given(gaps=st.lists(st.floats(1, 1200), min_size=1, max_size=80), first=st.floats(0, 10**9))
def test_with_a_record_sends_are_at_least_fifteen_minutes_apart_and_none_is_skipped(gaps, first):
    starts = [first]
    for gap in gaps:
        starts.append(starts[-1] + gap)
    last_sent, sends = first - QUARTER, []  # the record says: sent a quarter hour before the first run
    for start in starts:
        if job.usage_metrics_due(start, last_sent):
            last_sent = start
            sends.append(start)
        else:  # a run that does not send comes less than a quarter hour after the last send
            assert start - last_sent < QUARTER
    assert sends[0] == first
    assert all(b - a >= QUARTER for a, b in zip(sends, sends[1:], strict=False))


def test_a_record_from_the_future_does_not_silence_them():
    assert job.usage_metrics_due(1000.0, 5000.0)  # the clock went back
    assert not job.usage_metrics_due(1000.0, 1000.0)
    assert not job.usage_metrics_due(1000.0 + QUARTER - 1, 1000.0)
    assert job.usage_metrics_due(1000.0 + QUARTER, 1000.0)


# --------------------------------------------------------------------------- what is sent (pure)


def wanted(origin: str, scenario: str = "s") -> job.Wanted:
    return job.Wanted("ban", 0.0, origin, scenario)


def active(keys: dict[str, job.Wanted], prefix: str = "ip:") -> Counter:
    """active_decisions of address keys alone (tests/test_tables.py counts the network table's)."""
    return job.active_decisions(job.Projection(keys, Counter()), {}, prefix)


def test_active_decisions_by_origin_and_ip_type():
    keys = {
        "ip:192.0.2.1": wanted("crowdsec"),
        "ip:192.0.2.2": wanted("crowdsec"),
        "ip:2001:db8::1": wanted("crowdsec"),  # the prefix's own colon does not make a key IPv6
        "ip:192.0.2.3": wanted("cscli"),
        "ip:192.0.2.4": wanted("lists", "firehol_voipbl"),
        "ip:192.0.2.5": wanted("lists", ""),
        "ip:192.0.2.6": wanted("CAPI", "http:scan"),
    }
    assert active(keys) == Counter(
        {
            ("crowdsec", "ipv4"): 2,
            ("crowdsec", "ipv6"): 1,
            ("cscli", "ipv4"): 1,
            ("lists:firehol_voipbl", "ipv4"): 1,
            ("lists", "ipv4"): 1,
            ("CAPI", "ipv4"): 1,
        }
    )
    assert active({"x192.0.2.1": wanted("cscli")}, "x") == Counter({("cscli", "ipv4"): 1})


def test_origins_are_cut_to_the_schema_limit_and_counted_together():
    keys = {f"ip:192.0.2.{i}": wanted("lists", "x" * 300 + str(i)) for i in range(3)}
    assert active(keys) == Counter({("lists:" + "x" * 249, "ipv4"): 3})


def report_with(active: Counter, started: float = 1_790_000_000.25) -> job.Report:
    return job.Report(started=started, success=True, active_decisions=active)


OS = {"name": "Alpine Linux", "version": "3.20.3"}


def test_the_payload_is_one_remediation_component():
    active = Counter({("crowdsec", "ipv4"): 2, ("cscli", "ipv6"): 1})
    body = job.usage_metrics_payload(report_with(active), OS, 1_790_000_003.9)
    (component,) = body["remediation_components"]
    assert (component["type"], component["name"], component["version"]) == ("lapi-kv-sync",) * 2 + (job.__version__,)
    assert component["os"] == OS and component["feature_flags"] == []
    assert component["utc_startup_timestamp"] == 1_790_000_000
    (window,) = component["metrics"]
    assert window["meta"] == {"utc_now_timestamp": 1_790_000_003, "window_size_seconds": QUARTER}
    assert {i["name"] for i in window["items"]} == {"active_decisions"} and {i["unit"] for i in window["items"]} == {
        "ip"
    }
    assert sent_items(body) == {("crowdsec", "ipv4"): 2, ("cscli", "ipv6"): 1}


def test_counts_that_dropped_to_nothing_are_sent_as_zero():
    """CrowdSec keeps the last figure per origin and IP type: the origins cscli names and both IP
    types of every origin present are always sent, so a count that went away reads 0, not stale."""
    body = job.usage_metrics_payload(report_with(Counter({("lists:firehol_voipbl", "ipv4"): 7})), OS, 1_790_000_000)
    (window,) = body["remediation_components"][0]["metrics"]
    sent = {(i["labels"]["origin"], i["labels"]["ip_type"]): i["value"] for i in window["items"]}
    origins = ("CAPI", "crowdsec", "cscli", "lists:firehol_voipbl")
    assert sent == {
        (o, t): 7 if o.startswith("lists") and t == "ipv4" else 0 for o in origins for t in ("ipv4", "ipv6")
    }


@functools.cache
def schema_check() -> UsageSchemaCheck:
    return UsageSchemaCheck()


@given(
    decisions=st.lists(
        st.tuples(st.sampled_from(["crowdsec", "cscli", "CAPI", "lists"]) | st.text(min_size=1), st.text(max_size=300)),
        max_size=20,
    ),
    started=st.floats(0, 4e9),
)
def test_every_payload_validates_against_crowdsecs_schema(decisions, started):
    keys = {
        f"ip:2001:db8::{i:x}" if i % 2 else f"ip:10.0.0.{i}": job.Wanted("ban", 0.0, origin, scenario)
        for i, (origin, scenario) in enumerate(decisions)
    }
    report = report_with(active(keys), started)
    body = json.loads(json.dumps(job.usage_metrics_payload(report, job.os_release(), started + 5)))
    assert schema_check().errors(body) == []
    assert sum(sent_items(body).values()) == len(keys)


def test_the_schema_check_catches_what_crowdsec_refuses():
    check = schema_check()
    good = job.usage_metrics_payload(report_with(Counter({("cscli", "ipv4"): 1})), OS, 1_790_000_000)
    assert check.errors(good) == []
    component = good["remediation_components"][0]
    assert check.errors({"remediation_components": []})
    assert check.errors({"remediation_components": [{**component, "utc_startup_timestamp": 1.5}]})
    assert check.errors({"remediation_components": [{k: v for k, v in component.items() if k != "version"}]})
    assert check.errors({"remediation_components": [component, component]})
    assert check.errors({"remediation_components": [{**component, "os": {"name": "Alpine Linux"}}]})
    bad_item = {"name": "active_decisions", "value": 1, "unit": "ip", "labels": {"origin": "cscli"}}
    window = {"meta": {"utc_now_timestamp": 1, "window_size_seconds": 900}, "items": [bad_item]}
    assert check.errors({"remediation_components": [{**component, "metrics": [window]}]})


def test_the_os_is_named():
    os_info = job.os_release()
    assert set(os_info) == {"name", "version"} and all(os_info.values())


# --------------------------------------------------------------------------- whole runs


def mixed_decisions() -> list[dict]:
    return [
        decision("192.0.2.1"),
        decision("192.0.2.2", origin="cscli"),
        decision("2001:0DB8::1", 7200, "captcha"),
        decision("198.51.100.7", origin="lists", scenario="firehol_voipbl"),
        decision("FR", scope="Country"),  # not in KV, so not active here
    ]


def test_sent_after_a_run_that_converged_when_due(stack):
    stack.lapi.decisions = mixed_decisions()
    offset = at_quarter(5)
    before = time.time() + offset
    result = stack.run(clock_offset=offset, LAPI_USAGE_METRICS="true")
    assert result.code == 0 and result.err == ""
    assert "usage" not in result.out  # sent and taken: nothing to say
    (body,) = stack.lapi.usage_metrics
    assert sent_items(body) == {
        ("crowdsec", "ipv4"): 1,
        ("crowdsec", "ipv6"): 1,
        ("cscli", "ipv4"): 1,
        ("lists:firehol_voipbl", "ipv4"): 1,
    }
    (component,) = body["remediation_components"]
    assert int(before) <= component["utc_startup_timestamp"] <= component["metrics"][0]["meta"]["utc_now_timestamp"]
    assert component["utc_startup_timestamp"] % QUARTER < job.USAGE_METRICS_SLOT
    assert stack.push.value("crowdsec_kv_sync_success") == 1
    assert len(stack.lapi.queries) == 1  # the decisions; the usage metrics are not a second read


def test_sent_at_most_once_a_quarter_hour_without_a_record(stack):
    stack.lapi.decisions = [decision("192.0.2.1")]
    for into in (61, 300, 899):
        assert stack.run(clock_offset=at_quarter(into), LAPI_USAGE_METRICS="true").code == 0
    assert stack.lapi.usage_metrics == []


@pytest.mark.parametrize(
    ("args", "env", "setup", "exit_code"),
    [
        ((), {"LAPI_USAGE_METRICS": "false"}, None, job.EXIT_OK),
        ((), {"LAPI_USAGE_METRICS": "FALSE"}, None, job.EXIT_OK),
        (("--dry-run",), {}, None, job.EXIT_OK),
        ((), {}, "lapi_down", job.EXIT_LAPI),
        ((), {"LAPI_KEY": "not-the-bouncer-key"}, None, job.EXIT_LAPI),
        ((), {"CF_API_TOKEN": "wrong-token-zzzzzzzz"}, None, job.EXIT_CLOUDFLARE),
        ((), {"MAX_DELETES": "0"}, "stray_key", job.EXIT_CLOUDFLARE),
    ],
    ids=["off", "off-any-case", "dry-run", "lapi-unreadable", "key-refused", "cloudflare-failed", "held-back"],
)
def test_not_sent_when_off_on_a_dry_run_or_after_a_run_that_did_not_converge(stack, args, env, setup, exit_code):
    stack.lapi.decisions = [decision("192.0.2.1")]
    if setup == "lapi_down":
        stack.lapi.answer = (500, b"down", "text/plain")
    if setup == "stray_key":  # a key LAPI does not want: a delete MAX_DELETES=0 holds back
        stack.kv.store["ip:203.0.113.9"] = Entry("ban", int(time.time()) + 3600, {"remediation": "ban"})
    result = stack.run(*args, clock_offset=at_quarter(5), **{"LAPI_USAGE_METRICS": "true", **env})
    assert result.code == exit_code
    assert stack.lapi.usage_metrics == []
    assert "usage" not in result.out + result.err


def test_the_off_switch_is_checked(stack):
    result = stack.run_process(LAPI_USAGE_METRICS="maybe")
    assert result.code == job.EXIT_CONFIG and "LAPI_USAGE_METRICS must be true or false" in result.err
    assert job.load_config(stack.env(LAPI_USAGE_METRICS="")).lapi_usage_metrics is True
    assert job.load_config(stack.env(LAPI_USAGE_METRICS=" False ")).lapi_usage_metrics is False


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        ("unsupported", "LAPI has no /v1/usage-metrics (CrowdSec before 1.6.3)"),
        ((500, b'{"message":"database is locked"}', "application/json"), "HTTP 500"),
        ((422, b'{"message":"validation failure list"}', "application/json"), "HTTP 422"),
        ((403, b'{"message":"access forbidden"}', "application/json"), "HTTP 403"),
        ("drop", "not sent: TransportError"),
    ],
    ids=["404-before-1.6.3", "500", "422", "403", "connection-dropped"],
)
def test_whatever_lapi_answers_the_run_is_unaffected(stack, answer, says):
    stack.lapi.decisions = [decision("192.0.2.1"), decision("2001:db8::2")]
    if answer == "unsupported":
        stack.lapi.usage_metrics_supported = False
    elif answer == "drop":
        stack.lapi.usage_drop = True
    else:
        stack.lapi.usage_answer = answer
    result = stack.run(clock_offset=at_quarter(5), LAPI_USAGE_METRICS="true")
    assert result.code == 0 and result.err == ""  # never a warning, never a failed run
    debug = [line for line in result.out.splitlines() if "usage metrics" in line]
    assert len(debug) == 1 and debug[0].startswith("lapi-kv-sync: debug: ") and says in debug[0]
    assert len(stack.lapi.usage_metrics) <= 1  # one attempt: no retry loop
    assert result.sleeps == []
    assert stack.push.value("crowdsec_kv_sync_success") == 1
    assert set(stack.kv.live()) == {"ip:192.0.2.1", "ip:2001:db8::2"}


def test_the_debug_line_in_json(stack):
    stack.lapi.usage_metrics_supported = False
    result = stack.run(clock_offset=at_quarter(5), LAPI_USAGE_METRICS="true", LOG_FORMAT="json")
    records = [json.loads(line) for line in result.out.splitlines()]
    assert [(r["level"], r["event"]) for r in records] == [("debug", "usage_metrics"), ("info", "run")]


def test_with_a_state_file_the_record_keeps_the_cadence(stack, tmp_path):
    """With STATE_FILE the last send is in the record: due 15 minutes after it, whatever minute of
    the quarter hour, and keeping it costs a steady run no Cloudflare request."""
    env = {"LAPI_USAGE_METRICS": "true", "STATE_FILE": str(tmp_path / "record"), "AUDIT_INTERVAL": "3600"}
    start = at_quarter(30)

    def run_at(minutes: int):
        """A run `minutes` after the first, every clock moved alike: the ban an hour from the first."""
        stack.kv.clock_offset = start + 60 * minutes
        stack.lapi.decisions = [decision("192.0.2.1", seconds=3600 - 60 * minutes)]
        result = stack.run(clock_offset=start + 60 * minutes, **env)
        assert result.code == 0, result.err
        return result

    run_at(0)  # a first minute, and no send on record
    assert len(stack.lapi.usage_metrics) == 1
    run_at(1)  # a minute later: not due
    assert len(stack.lapi.usage_metrics) == 1
    requests = sum(stack.kv.requests.values())
    # The next quarter hour's second minute: the clock alone would not send; the record says it is due.
    assert "not audited" in run_at(16).out
    assert len(stack.lapi.usage_metrics) == 2
    assert sum(stack.kv.requests.values()) == requests
    run_at(17)  # and the record kept that send
    assert len(stack.lapi.usage_metrics) == 2


def test_a_slow_lapi_costs_a_short_timeout(stack, monkeypatch):
    """The timeout is the subject: a LAPI that never answers the usage metrics holds the run for
    USAGE_METRICS_TIMEOUT (shortened here), not HTTP_TIMEOUT."""
    monkeypatch.setattr(job, "USAGE_METRICS_TIMEOUT", 0.2)
    stack.lapi.usage_delay = 5
    result = stack.run(clock_offset=at_quarter(5), LAPI_USAGE_METRICS="true", HTTP_TIMEOUT="60")
    assert result.code == 0 and result.err == ""
    # (Whichever ends it first, the read's timeout or the send's bound: both are 0.2 s.)
    assert "usage metrics not sent: " in result.out and "0.2s" in result.out


def test_an_answer_dripped_a_byte_at_a_time_costs_no_more_than_the_timeout(stack, monkeypatch):
    """USAGE_METRICS_TIMEOUT bounds the whole send, not each read: a 201 whose every byte comes
    within the timeout must not hold the run (and its lock) to RUN_DEADLINE."""
    monkeypatch.setattr(job, "USAGE_METRICS_TIMEOUT", 0.5)
    stack.lapi.usage_drip = 0.05  # the head alone is about 70 bytes: 3.5 s
    result = stack.run(clock_offset=at_quarter(5), LAPI_USAGE_METRICS="true", HTTP_TIMEOUT="60")
    assert result.code == 0 and result.err == ""
    assert "usage metrics not sent: DeadlineExceeded: the usage metrics' 0.5s passed" in result.out
    assert stack.push.value("crowdsec_kv_sync_success") == 1


def direct(stack, **config: str) -> tuple[job.Config, job.Log, io.StringIO]:
    out = io.StringIO()
    env = stack.env(LAPI_USAGE_METRICS="true", **config)
    return job.load_config(env), job.Log(out, out), out


def test_bounded_by_the_run_deadline(stack):
    config, log, out = direct(stack)
    report = report_with(Counter({("cscli", "ipv4"): 1}), started=QUARTER * 2_000_000)
    clock = FakeClock().clock()
    with job.Http(clock, 30, deadline=clock.monotonic() - 1) as http:  # the run's time is up
        assert job.send_usage_metrics(http, config, log, report, last_sent=None) == report.started
    assert stack.lapi.usage_metrics == [] and "RUN_DEADLINE had passed" in out.getvalue()


def test_returns_what_the_state_file_keeps(stack):
    """`usage_metrics_sent_at` in, its next value out: unchanged unless this run tried to send."""
    config, log, _ = direct(stack)
    report = report_with(Counter({("cscli", "ipv4"): 1}), started=QUARTER * 2_000_000 + 300)  # not a first minute
    clock = FakeClock().clock()
    with job.Http(clock, 30, deadline=clock.monotonic() + 60) as http:
        assert job.send_usage_metrics(http, config, log, report, last_sent=None) is None
        assert job.send_usage_metrics(http, config, log, report, last_sent=report.started - 60) == report.started - 60
        assert stack.lapi.usage_metrics == []
        sent = job.send_usage_metrics(http, config, log, report, last_sent=report.started - QUARTER)
        assert sent == report.started and len(stack.lapi.usage_metrics) == 1
        stack.lapi.usage_metrics_supported = False
        tried = job.send_usage_metrics(http, config, log, report, last_sent=report.started - 2 * QUARTER)
        assert tried == report.started  # an attempt counts: LAPI before 1.6.3 is asked once a quarter hour


def test_sent_with_a_client_certificate_instead_of_a_key(tmp_path):
    lapi = tls_stack(trustme.CA(), tmp_path, require_client_cert=True)
    lapi.key = "a-key-nobody-sends"
    lapi.decisions = [decision("192.0.2.1")]
    with lapi, KvStandin(CF_TOKEN) as kv, PushgatewayStandin() as push:
        result = Stack(lapi, kv, push).run(
            clock_offset=at_quarter(5),
            LAPI_USAGE_METRICS="true",
            LAPI_KEY="",
            LAPI_CA_CERT=str(tmp_path / "ca.pem"),
            LAPI_CLIENT_CERT=str(tmp_path / "client.pem"),
            LAPI_CLIENT_KEY=str(tmp_path / "client.key"),
        )
        assert result.code == 0 and "usage" not in result.out + result.err
        (body,) = lapi.usage_metrics
        assert sent_items(body) == {("crowdsec", "ipv4"): 1} and lapi.violations == []
