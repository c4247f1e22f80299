"""Whole runs of the job against the stand-ins, over real sockets and the job's own HTTP layer."""

from __future__ import annotations

import ast
import datetime
import email.utils
import itertools
import json
import re
import socket
import time
from unittest.mock import ANY

import pytest

import lapi_kv_sync as job
from tests.conftest import CF_TOKEN, LAPI_KEY, SCRIPT
from tests.standins import Entry, Fault, decision

PREFIXED = "crowdsec_kv_sync_"


def ips(n: int, base: str = "10") -> list[str]:
    return [f"{base}.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(n)]


def seed_foreign(kv) -> dict:
    kv.store["config:flag"] = Entry("on")
    kv.store["ipx"] = Entry("foreign", int(time.time()) + 86400, {"owner": "someone"})
    kv.store["IP:192.0.2.1"] = Entry("ban")
    return {k: v for k, v in kv.snapshot().items() if not k.startswith("ip:")}


def foreign(kv) -> dict:
    return {k: v for k, v in kv.snapshot().items() if not k.startswith("ip:")}


# --------------------------------------------------------------------------- the steady state


def test_second_run_writes_nothing_and_costs_one_read_plus_list_pages(stack):
    stack.lapi.decisions = [decision(ip, 3600 + i) for i, ip in enumerate(ips(2500))]
    first = stack.run()
    assert first.code == 0, first.err
    assert stack.kv.writes == 2500 and stack.kv.bulk_sizes["bulk_put"] == [2500]
    stack.kv.reset_counts()
    stack.lapi.queries.clear()
    second = stack.run()
    assert second.code == 0, second.err
    assert (stack.kv.writes, stack.kv.deletes) == (0, 0)
    assert dict(stack.kv.requests) == {"list": 3}  # 2,500 keys, 1,000 a page
    assert len(stack.lapi.queries) == 1
    assert "written 0, deleted 0, unchanged 2500" in second.out
    assert stack.push.value(PREFIXED + "written") == 0
    assert stack.push.value(PREFIXED + "unchanged") == 2500


def test_one_connection_per_host_per_run(stack):
    stack.lapi.decisions = [decision(ip) for ip in ips(2100)]
    stack.kv.store.update({f"ip:10.200.0.{i}": Entry("ban", int(time.time()) + 3600) for i in range(50)})
    result = stack.run()
    assert result.code == 0
    assert dict(stack.kv.requests) == {"list": 1, "bulk_put": 1, "bulk_delete": 1}
    stack.kv.reset_counts()
    stack.lapi.connections = 0
    stack.push.connections = 0
    stack.lapi.decisions = stack.lapi.decisions[:1000]
    result = stack.run()
    assert result.code == 0
    assert stack.kv.requests["list"] == 3 and stack.kv.requests["bulk_delete"] == 1
    assert (stack.lapi.connections, stack.kv.connections, stack.push.connections) == (1, 1, 1)


def test_bulk_calls_never_exceed_ten_thousand_items(stack):
    stack.lapi.decisions = [decision(ip) for ip in ips(25_000)]
    assert stack.run().code == 0
    assert stack.kv.bulk_sizes["bulk_put"] == [10_000, 10_000, 5_000]
    assert len([k for k in stack.kv.live() if k.startswith("ip:")]) == 25_000
    stack.lapi.decisions = None  # LAPI `null`: no decisions at all
    result = stack.run()
    assert result.code == 0, result.err
    assert stack.kv.bulk_sizes["bulk_delete"] == [10_000, 10_000, 5_000]
    assert stack.kv.live() == {}


# --------------------------------------------------------------------------- what lands in KV


def test_keys_values_expirations_and_reasons(stack):
    now = time.time()
    stack.lapi.decisions = [
        decision("2001:0DB8:0000::0001", 7200),
        decision("::ffff:192.0.2.6", 90),
        decision("192.0.2.3", 3600, "ban"),
        decision("192.0.2.3", 36000, "captcha"),
        decision("192.0.2.9", 600, "captcha"),
        decision("192.0.2.10", -3),
        decision("198.51.100.0/24", scope="Range"),
        decision("FR", scope="Country"),
        decision("192.0.2.4", type="throttle"),
        decision("not-an-address"),
    ]
    result = stack.run()
    assert result.code == 0, result.err
    live = stack.kv.live()
    table = json.loads(live.pop("ip:scopes").value)  # the Country decision: the scope table
    assert table == {"v": 1, "country": {"FR": ["ban", ANY]}}
    networks = job.decode_networks(live.pop("ip:networks").value)  # the Range decision: the network table
    first, last = 0xC6336400, 0xC63364FF  # 198.51.100.0/24
    assert networks == job.Intervals([job.Interval(first, last, ANY, 0)], [])
    assert abs(networks.v4[0].ban - (now + 3600)) < 5
    assert {k: e.value for k, e in live.items()} == {
        "ip:2001:db8::1": "ban",
        "ip:192.0.2.6": "ban",
        "ip:192.0.2.3": "ban",
        "ip:192.0.2.9": "captcha",
    }
    for key, seconds in {
        "ip:2001:db8::1": 7200,
        "ip:192.0.2.6": 90,
        "ip:192.0.2.3": 36000,
        "ip:192.0.2.9": 600,
    }.items():
        assert abs(live[key].expiration - (now + seconds)) < 5, key
        assert live[key].metadata["remediation"] == live[key].value
    assert "ignored 3 (expired 1, scope 0, type 1, invalid 1, range_too_large 0, table_full 0)" in result.out
    for reason, n in {"expired": 1, "scope": 0, "type": 1, "invalid": 1}.items():
        assert stack.push.value(PREFIXED + "ignored", f'reason="{reason}"') == n
    assert stack.push.value(PREFIXED + "keys", 'remediation="ban"') == 3
    assert stack.push.value(PREFIXED + "decisions") == 4  # address keys: the table's key is not one
    assert stack.push.value(PREFIXED + "table_entries", 'scope="country",remediation="ban"') == 1
    assert stack.push.value(PREFIXED + "table_entries", 'scope="network",remediation="ban"') == 1


def test_each_key_is_stored_with_its_remediation_origin_and_scenario(stack):
    # The README documents all three; the Worker's analytics and CrowdSec's usage metrics read them.
    stack.lapi.decisions = [
        decision("192.0.2.1", origin="cscli", scenario="manual 'ban' from 'admin'"),
        decision("192.0.2.2", type="captcha", origin="crowdsec", scenario="crowdsecurity/http-probing"),
        decision("192.0.2.3", 600, "captcha", origin="crowdsec", scenario="crowdsecurity/ssh-bf"),
        decision("192.0.2.3", 3600, origin="lists", scenario="firehol_level1"),  # the ban wins, with its origin
    ]
    result = stack.run()
    assert result.code == 0, result.err
    assert {key: entry.metadata for key, entry in stack.kv.live().items()} == {
        "ip:192.0.2.1": {"remediation": "ban", "origin": "cscli", "scenario": "manual 'ban' from 'admin'"},
        "ip:192.0.2.2": {"remediation": "captcha", "origin": "crowdsec", "scenario": "crowdsecurity/http-probing"},
        "ip:192.0.2.3": {"remediation": "ban", "origin": "lists", "scenario": "firehol_level1"},
    }


def test_unban_deletes_only_that_key_and_changes_rewrite_only_theirs(stack):
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(30)]
    assert stack.run().code == 0
    stack.kv.reset_counts()
    by_value = {d["value"]: d for d in stack.lapi.decisions}
    stack.lapi.decisions.remove(by_value["10.0.0.5"])  # un-ban
    by_value["10.0.0.7"]["type"] = "captcha"  # ban turned captcha
    by_value["10.0.0.9"]["until"] -= 1800  # ban made shorter: the key must not outlive it
    by_value["10.0.0.11"]["until"] += 7200  # ban made longer (a refresh): left until it comes due
    result = stack.run()
    assert result.code == 0, result.err
    assert stack.kv.deleted_keys == ["ip:10.0.0.5"]
    assert sorted(stack.kv.written_keys) == ["ip:10.0.0.7", "ip:10.0.0.9"]
    assert stack.kv.live()["ip:10.0.0.7"].value == "captcha"
    assert stack.kv.live()["ip:10.0.0.9"].expiration < time.time() + 1800 + job.EXPIRATION_SLACK
    assert stack.kv.live()["ip:10.0.0.11"].expiration < time.time() + 3600 + job.EXPIRATION_SLACK


def test_keys_without_metadata_or_expiration_are_rewritten_once(stack):
    stack.lapi.decisions = [decision("192.0.2.1"), decision("192.0.2.2")]
    stack.kv.store["ip:192.0.2.1"] = Entry("ban")  # by hand: no metadata, no expiration
    stack.kv.store["ip:192.0.2.2"] = Entry("ban", int(time.time()) + 3600, {"remediation": "ban"})
    assert stack.run().code == 0
    assert stack.kv.written_keys == ["ip:192.0.2.1"]
    stack.kv.reset_counts()
    assert stack.run().code == 0 and stack.kv.writes == 0


def test_keys_with_metadata_of_any_shape_are_rewritten_not_a_crash(stack):
    odd = [{"remediation": []}, {"remediation": {}}, {"remediation": 1}, [], "ban", {"remediation": "BAN"}]
    stack.lapi.decisions = [decision(f"192.0.2.{i}") for i in range(len(odd))]
    soon = int(time.time()) + 3600
    stack.kv.store.update({f"ip:192.0.2.{i}": Entry("ban", soon, metadata) for i, metadata in enumerate(odd)})
    result = stack.run()
    assert result.code == 0, result.err
    assert sorted(stack.kv.written_keys) == sorted(f"ip:192.0.2.{i}" for i in range(len(odd)))


def test_a_skewed_local_clock_does_not_rewrite_every_key(stack):
    stack.kv.clock_offset = 600  # Cloudflare's clock ten minutes ahead of ours
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(20)]
    assert stack.run().code == 0
    expiration = stack.kv.live()["ip:10.0.0.1"].expiration
    assert abs(expiration - (time.time() + 600 + 3600)) < 5
    stack.kv.reset_counts()
    assert stack.run().code == 0
    assert stack.kv.writes == 0


def test_custom_prefix_and_foreign_keys(stack):
    kept = seed_foreign(stack.kv)
    stack.kv.store["ip:192.0.2.50"] = Entry("ban", int(time.time()) + 600)  # ours under the default prefix
    stack.lapi.decisions = [decision("192.0.2.1")]
    result = stack.run(KV_KEY_PREFIX="cs/")
    assert result.code == 0, result.err
    assert set(stack.kv.live()) == set(kept) | {"cs/192.0.2.1", "ip:192.0.2.50"}


# --------------------------------------------------------------------------- LAPI unreadable: touch nothing


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "failure",
    ["refused", "forbidden", "server_error", "html", "json_object", "timeout", "truncated_json"],
)
def test_unreadable_lapi_leaves_kv_byte_for_byte(stack, failure):
    stack.lapi.decisions = [decision(ip) for ip in ips(40)]
    seed_foreign(stack.kv)
    assert stack.run().code == 0
    before = stack.kv.snapshot()
    success_time = stack.push.value(PREFIXED + "last_success_timestamp_seconds")
    stack.kv.reset_counts()
    stack.lapi.decisions = []  # were LAPI read, every key would go
    env = {}
    if failure == "refused":
        env["LAPI_URL"] = f"http://127.0.0.1:{unused_port()}"
    elif failure == "forbidden":
        env["LAPI_KEY"] = "wrong-bouncer-key"
    elif failure == "server_error":
        stack.lapi.answer = (500, b'{"message":"db locked"}', "application/json")
    elif failure == "html":
        stack.lapi.answer = (200, b"<html><body>Bad gateway</body></html>", "text/html")
    elif failure == "json_object":
        stack.lapi.answer = (200, b'{"message":"unexpected"}', "application/json")
    elif failure == "truncated_json":
        stack.lapi.answer = (200, b'[{"value": "192.0.2.1", "dur', "application/json")
    elif failure == "timeout":
        stack.lapi.delay = 1.0
        env["HTTP_TIMEOUT"] = "0.3"
    result = stack.run(**env)
    assert result.code == job.EXIT_LAPI
    assert stack.kv.snapshot() == before
    assert sum(stack.kv.requests.values()) == 0
    assert "skipped the run, KV left as it is" in result.err
    last = stack.push.pushes[-1]
    assert last.method == "POST" and last.status == 200
    assert stack.push.value(PREFIXED + "success") == 0
    assert stack.push.value(PREFIXED + "exit_code") == job.EXIT_LAPI
    assert stack.push.value(PREFIXED + "last_success_timestamp_seconds") == success_time
    if failure == "forbidden":
        assert "refused the bouncer credentials" in result.err
        assert len(stack.lapi.queries) == 2  # one good run, one refused read: a 403 is not retried
    if failure == "refused":
        assert result.sleeps and len(result.sleeps) == job.LAPI_RETRY.attempts - 1


def test_lapi_null_deletes_every_prefixed_key_and_nothing_else(stack):
    kept = seed_foreign(stack.kv)
    stack.lapi.decisions = [decision(ip) for ip in ips(10)]
    assert stack.run().code == 0
    stack.lapi.decisions = None
    result = stack.run()
    assert result.code == 0
    assert stack.kv.snapshot() == kept


def test_lapi_request_carries_key_user_agent_and_scope(stack):
    assert stack.run().code == 0
    assert stack.lapi.queries[-1] == {"scopes": ["ip,range,country,as"]}
    assert stack.run(SCOPE_TABLE="false").code == 0
    assert stack.lapi.queries[-1] == {"scopes": ["ip"]}
    assert stack.lapi.user_agents[-1] == f"lapi-kv-sync/{job.__version__}"


# --------------------------------------------------------------------------- Cloudflare failures


@pytest.mark.parametrize(
    "fault",
    [
        Fault("429", "bulk_put", retry_after="3"),
        Fault("429", "list", retry_after=None),
        Fault("5xx", "bulk_put", status=502, times=3),
        Fault("5xx", "list", status=503),
        Fault("drop", "bulk_put", times=2),
        Fault("drop", "list"),
        Fault("html", "bulk_delete", status=502),
    ],
    ids=lambda f: f"{f.kind}-{f.operation}",
)
def test_transient_cloudflare_failures_are_retried_and_converge(stack, fault):
    kept = seed_foreign(stack.kv)
    stack.kv.store["ip:203.0.113.9"] = Entry("ban", int(time.time()) + 3600, {"remediation": "ban"})
    stack.lapi.decisions = [decision(ip) for ip in ips(20)]
    stack.kv.faults.append(fault)
    result = stack.run()
    assert result.code == 0, result.err
    assert stack.kv.faults == []  # the fault was met
    assert set(stack.kv.live()) == set(kept) | {f"ip:{ip}" for ip in ips(20)}
    assert stack.kv.snapshot().items() >= kept.items()
    assert result.sleeps, "a retry should have waited"
    if fault.kind == "429" and fault.retry_after:
        assert result.sleeps[0] == float(fault.retry_after)


def test_retry_after_as_http_date(stack):
    stack.lapi.decisions = [decision("192.0.2.1")]
    stack.kv.faults.append(Fault("429", "list", retry_after=email.utils.formatdate(time.time() + 20, usegmt=True)))
    result = stack.run()
    assert result.code == 0
    assert 17 <= result.sleeps[0] <= 21


def test_a_retry_after_date_already_past_retries_at_once_in_a_real_process(stack):
    # Our clock ahead of Cloudflare's: the date has passed. The in-process test clock would take a
    # negative wait; a real process's time.sleep() raises ValueError on one, and the run would fail.
    stack.lapi.decisions = [decision("192.0.2.1")]
    past = email.utils.formatdate(time.time() - 120, usegmt=True)
    stack.kv.faults += [Fault("429", "list", retry_after=past), Fault("429", "bulk_put", retry_after=past)]
    result = stack.run_process()
    assert result.code == 0, result.err
    assert stack.kv.faults == []  # both were met
    assert {key: entry.value for key, entry in stack.kv.live().items()} == {"ip:192.0.2.1": "ban"}


def test_a_429_longer_than_the_deadline_gives_up(stack):
    stack.lapi.decisions = [decision("192.0.2.1")]
    stack.kv.faults.append(Fault("429", "list", retry_after="300"))
    result = stack.run(RUN_DEADLINE="60")
    assert result.code == job.EXIT_CLOUDFLARE
    assert (
        "list: HTTP 429: 10429: Too many requests; a retry in 300s (Retry-After) would pass RUN_DEADLINE" in result.err
    )
    assert result.sleeps == []
    assert stack.kv.live() == {}


def test_a_run_out_of_time_still_reports_its_failure(stack):
    stack.lapi.delay = 1.5
    result = stack.run(RUN_DEADLINE="1", HTTP_TIMEOUT="5")
    assert result.code == job.EXIT_LAPI and "did not answer" in result.err
    assert "Pushgateway" not in result.err
    assert stack.push.pushes[-1].method == "POST" and stack.push.value(PREFIXED + "success") == 0


def test_cloudflare_that_keeps_failing_exits_1_and_the_next_run_converges(stack):
    kept = seed_foreign(stack.kv)
    stack.lapi.decisions = [decision(ip) for ip in ips(10)]
    assert stack.run().code == 0
    success_time = stack.push.value(PREFIXED + "last_success_timestamp_seconds")
    stack.lapi.decisions = [decision(ip) for ip in ips(15)[5:]]
    stack.kv.faults.append(Fault("5xx", "bulk_put", status=500, times=-1))
    result = stack.run()
    assert result.code == job.EXIT_CLOUDFLARE
    assert "bulk_put" in result.err and "10500" in result.err
    assert len(result.sleeps) == job.CLOUDFLARE_RETRY.attempts - 1
    assert stack.push.pushes[-1].method == "POST"
    assert stack.push.value(PREFIXED + "success") == 0
    assert stack.push.value(PREFIXED + "exit_code") == job.EXIT_CLOUDFLARE
    assert stack.push.value(PREFIXED + "last_success_timestamp_seconds") == success_time
    stack.kv.faults.clear()
    result = stack.run()
    assert result.code == 0, result.err
    assert set(stack.kv.live()) == set(kept) | {f"ip:{ip}" for ip in ips(15)[5:]}
    assert stack.push.value(PREFIXED + "success") == 1


def test_a_refused_token_is_not_retried_and_cloudflare_errors_are_shown(stack):
    stack.lapi.decisions = [decision("192.0.2.1")]
    result = stack.run(CF_API_TOKEN="wrong-token-zzzzzzzz")
    assert result.code == job.EXIT_CLOUDFLARE
    assert "10000: Authentication error" in result.err
    assert stack.kv.requests == {"list": 1}
    assert "wrong-token-zzzzzzzz" not in result.out + result.err


def test_a_rejected_bulk_write_shows_cloudflare_error(stack):
    stack.lapi.decisions = [decision("192.0.2.1")]
    stack.kv.faults.append(Fault("5xx", "bulk_put", status=400))
    result = stack.run()
    assert result.code == job.EXIT_CLOUDFLARE
    assert "HTTP 400" in result.err and result.sleeps == []


@pytest.mark.parametrize("quirk", ["empty_first_page", "null_cursor", "absent_cursor", "null_result"])
def test_cloudflare_answer_quirks(stack, quirk):
    stack.kv.quirks.add(quirk)
    stack.lapi.decisions = [decision(ip) for ip in ips(1500)]
    assert stack.run().code == 0
    stack.kv.store["ip:203.0.113.1"] = Entry("ban", int(time.time()) + 600, {"remediation": "ban"})
    stack.kv.reset_counts()
    result = stack.run()
    assert result.code == 0, result.err
    assert stack.kv.writes == 0 and stack.kv.deleted_keys == ["ip:203.0.113.1"]


def test_unsuccessful_keys_are_retried(stack):
    stack.lapi.decisions = [decision("192.0.2.1"), decision("192.0.2.2")]
    stack.kv.unsuccessful_once = {"ip:192.0.2.2"}
    result = stack.run()
    assert result.code == 0, result.err
    assert stack.kv.bulk_sizes["bulk_put"] == [2, 1]
    assert set(stack.kv.live()) == {"ip:192.0.2.1", "ip:192.0.2.2"}


def test_keys_that_stay_unsuccessful_fail_the_run(stack):
    stack.lapi.decisions = [decision("192.0.2.1"), decision("192.0.2.2")]
    stack.kv.unsuccessful_always = {"ip:192.0.2.2"}
    result = stack.run()
    assert result.code == job.EXIT_CLOUDFLARE
    assert "could not write 1 key after 3 rounds" in result.err and "ip:192.0.2.2" in result.err
    assert stack.kv.bulk_sizes["bulk_put"] == [2, 1, 1]
    stack.kv.unsuccessful_always.clear()
    assert stack.run().code == 0 and "ip:192.0.2.2" in stack.kv.live()


def test_a_pushgateway_that_is_down_never_fails_the_job(stack):
    stack.lapi.decisions = [decision("192.0.2.1")]
    result = stack.run(PUSHGATEWAY_URL=f"http://127.0.0.1:{unused_port()}")
    assert result.code == 0
    assert "Pushgateway" in result.err and "warning" in result.err
    stack.push.fail_with = 500
    assert stack.run().code == 0


# --------------------------------------------------------------------------- CLI, configuration, output


def test_dry_run_prints_the_plan_and_writes_nothing(stack):
    stack.lapi.decisions = [decision(ip) for ip in ips(25)]
    stack.kv.store["ip:203.0.113.1"] = Entry("ban", int(time.time()) + 600, {"remediation": "ban"})
    before = stack.kv.snapshot()
    result = stack.run("--dry-run")
    assert result.code == 0
    assert stack.kv.snapshot() == before and stack.kv.writes == 0
    assert stack.push.pushes == []
    stack.lapi.answer = (500, b"down", "text/plain")
    assert stack.run("--dry-run").code == job.EXIT_LAPI and stack.push.pushes == []
    assert "write 25: ip:10.0.0.0 " in result.out and "(+5 more)" in result.out
    assert "delete 1: ip:203.0.113.1" in result.out


def test_missing_configuration_is_named_without_traceback(stack):
    result = stack.run_process(env={})
    assert result.code == job.EXIT_CONFIG
    for name in ("LAPI_KEY", "CF_ACCOUNT_ID", "CF_KV_NAMESPACE_ID", "CF_API_TOKEN"):
        assert name in result.err
    assert "Traceback" not in result.err and result.err.count("\n") == 1
    assert result.out == ""


def test_malformed_configuration_is_exit_2_and_keeps_secrets(stack):
    result = stack.run_process(RUN_DEADLINE="never", CF_API_URL="nope")
    assert result.code == job.EXIT_CONFIG
    assert "RUN_DEADLINE" in result.err and "CF_API_URL" in result.err
    assert LAPI_KEY not in result.err and CF_TOKEN not in result.err


def test_the_job_runs_as_a_process(stack):
    stack.lapi.decisions = [decision("192.0.2.1")]
    result = stack.run_process()
    assert result.code == 0, result.err
    assert result.out.startswith("lapi-kv-sync: wanted 1 (ban 1, captcha 0), written 1")
    assert result.err == ""


def test_version_and_help(stack):
    version = stack.run_process("--version", env={})
    assert version.code == 0 and version.out.strip() == f"lapi-kv-sync {job.__version__} (User-Agent: {job.USER_AGENT})"
    helped = stack.run_process("--help", env={})
    assert helped.code == 0 and "--dry-run" in helped.out


def test_json_log_lines(stack):
    stack.lapi.decisions = [decision("192.0.2.1"), decision("FR", scope="Country")]
    result = stack.run(LOG_FORMAT="json")
    assert result.code == 0
    record = json.loads(result.out)
    assert record["event"] == "run" and record["level"] == "info"
    # RFC 3339, UTC, milliseconds: what log pipelines parse without being told the format
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"]), record["time"]
    logged = datetime.datetime.fromisoformat(record["time"]).timestamp()
    assert abs(logged - time.time()) < 600  # the run's own clock, not a fixed or local-time one
    assert (record["wanted"], record["written"], record["ignored"]["scope"]) == (1, 1, 0)
    assert record["tables"] == {
        "scopes": {"action": "written", "entries": {"country:ban": 1}, "bytes": ANY},
        "networks": {"action": None, "entries": {}, "bytes": 0},
    }
    result = stack.run(LOG_FORMAT="json", LAPI_KEY="wrong-key-1234")
    record = json.loads(result.err)
    assert record["level"] == "error" and record["event"] == "lapi_unreadable"


def test_secret_echoed_by_a_server_is_redacted(stack):
    stack.lapi.answer = (500, f"bad key {LAPI_KEY}".encode(), "text/plain")
    result = stack.run()  # the run helper asserts no secret reached the output
    assert result.code == job.EXIT_LAPI and "[redacted]" in result.err


# --------------------------------------------------------------------------- the listing beside LAPI's answer


def test_a_listing_told_to_stop_sends_no_further_page(stack):
    stack.kv.store.update({f"ip:10.1.{i >> 8}.{i & 255}": Entry("ban", int(time.time()) + 600) for i in range(3000)})
    config = job.load_config(stack.env())
    with job.Http(job.SYSTEM_CLOCK, 30, time.monotonic() + 60) as http:
        cloudflare = job.Cloudflare(http, config)
        assert len(cloudflare.list_keys("ip:").present) == 3000 and stack.kv.requests["list"] == 3
        cloudflare.stop.set()
        with pytest.raises(job.CloudflareError, match="stopped"):
            cloudflare.list_keys("ip:")
    assert stack.kv.requests["list"] == 3


def test_two_threads_never_share_a_connection_and_leave_one_per_host(stack):
    config = job.load_config(stack.env())
    with job.Http(job.SYSTEM_CLOCK, 30, time.monotonic() + 60) as http:
        cloudflare = job.Cloudflare(http, config)
        stack.kv.store.update({f"ip:10.2.0.{i}": Entry("ban", int(time.time()) + 600) for i in range(200)})
        listings = [job.Background(cloudflare.list_keys, "ip:") for _ in range(8)]
        assert all(len(listing.result().present) == 200 for listing in listings)
        opened = stack.kv.connections
        assert 1 <= opened <= 8
        for _ in range(5):  # one after another: the idle connections serve, no new one is opened
            cloudflare.list_keys("ip:")
        assert stack.kv.connections == opened


def test_a_steady_run_without_state_lists_on_one_connection(stack):
    stack.lapi.decisions = [decision(ip) for ip in ips(2500)]
    assert stack.run().code == 0
    stack.kv.reset_counts()
    assert stack.run().code == 0
    assert stack.kv.requests["list"] == 3 and stack.kv.writes == 0 and stack.kv.connections == 1


def test_background_hands_its_value_over_and_raises_what_the_call_raised():
    import weakref

    class Big:
        pass

    work = job.Background(Big)
    value = work.result()
    kept = weakref.ref(value)
    del value
    assert kept() is None  # a big old record read beside LAPI's answer is not kept for the whole run
    with pytest.raises(ZeroDivisionError):
        job.Background(lambda: 1 / 0).result()


def test_a_run_that_ends_while_a_list_page_stalls_returns_at_once_and_lists_no_more(stack):
    # LAPI breaks off after its first decisions: the audit's listing has begun, and its page
    # stalls mid-answer. The run is over (exit 3); main() must not wait for that page, nor may
    # the listing send anything once main() has returned.
    stack.lapi.decisions = [decision(ip) for ip in ips(3000)]
    stack.lapi.cut = 20_000
    stack.kv.store.update({f"ip:10.1.0.{i}": Entry("ban", int(time.time()) + 600) for i in range(10)})
    stack.kv.faults.append(Fault("stall", "list", times=-1, every=20))
    started = time.monotonic()
    result = stack.run()
    took = time.monotonic() - started
    assert result.code == job.EXIT_LAPI and "broke off" in result.err
    assert took < 5, f"main() waited {took:.1f}s for a listing the run no longer wanted"
    # The one page may have been on its way as main() returned: the stand-in counts a request
    # when its thread reads it, which under load can come after. What must never come is more.
    time.sleep(0.5)
    assert stack.kv.requests["list"] <= 1


# --------------------------------------------------------------------------- counts in messages

COUNT_NOUNS = re.compile(r"\)? ?(keys|requests|entries|decisions|rows|rounds|runs|addresses|pages|attempts)\b")
# Counts that are never 1: constants, and the junk rows LAPI's answer is refused for (at least JUNK_ROWS_MIN).
NEVER_ONE = {"rows"}


def test_counts_of_one_take_the_singular(stack):
    """Each message that counts requests, keys or entries, with a count of one (they said
    `1 requests`, `(1 keys)`, `1 entries`)."""
    stack.lapi.decisions = [decision("192.0.2.1"), decision("198.51.100.0/24", scope="Range")]
    stack.kv.store["ip:203.0.113.9"] = Entry("ban", None, {"remediation": "ban"})
    dry = stack.run("--dry-run", MAX_DELETES="0")
    assert "would send Cloudflare 1 request for this plan: bulk_put 1 (2 keys), bulk_delete 0 (0 keys)," in dry.out
    assert "dry run: networks table write (1 entry; 32 bytes)" in dry.out
    assert "the plan deletes 1 key, more than MAX_DELETES=0: a real run would delete none and exit 1" in dry.err
    dry = stack.run("--dry-run", "--force", MAX_DELETES="0", SCOPE_TABLE="false")
    assert "would send Cloudflare 2 requests for this plan: bulk_put 1 (1 key), bulk_delete 1 (1 key)," in dry.out
    real = stack.run(MAX_DELETES="0")
    assert real.code == job.EXIT_CLOUDFLARE
    assert "the plan would delete 1 key, more than MAX_DELETES=0" in real.err
    assert "networks table written (1 entry; 32 bytes)" in real.err
    assert [job.counted(n, "entry", "entries") for n in (0, 1, 2)] == ["0 entries", "1 entry", "2 entries"]
    assert [job.counted(n, "key") for n in (0, 1, 2)] == ["0 keys", "1 key", "2 keys"]


def test_every_count_in_a_message_goes_through_counted():
    """The job's f-strings: a count written straight before a plural noun (`{n} keys`) is wrong
    when n is 1, so it goes through `counted` unless it is a constant or never 1."""
    found = []
    for node in ast.walk(ast.parse(SCRIPT.read_text())):
        if not isinstance(node, ast.JoinedStr):
            continue
        for value, after in itertools.pairwise(node.values):
            if isinstance(value, ast.FormattedValue) and isinstance(after, ast.Constant):
                count = ast.unparse(value.value)
                if COUNT_NOUNS.match(after.value) and not count.isupper() and count not in NEVER_ONE:
                    found.append(f"line {node.lineno}: {{{count}}}{after.value[:20]}")
    assert found == []
