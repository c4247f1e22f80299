"""The real CrowdSec LAPI 1.4.6 -> the job -> the KV stand-in; the real Pushgateway 1.5.1.

Skipped where the components are absent (a failure under CI=true); `.ci/run` fetches them.
"""

from __future__ import annotations

import json
import time

import pytest

import lapi_kv_sync as job
from tests.conftest import CF_TOKEN, Stack
from tests.real import RealLapi, RealPushgateway
from tests.standins import Entry, KvStandin
from tests.test_tables import held_ranges
from tests.test_usage import at_quarter

P = "crowdsec_kv_sync_"


@pytest.fixture(scope="module")
def lapi():
    with RealLapi() as server:
        yield server


@pytest.fixture(scope="module")
def pushgateway():
    with RealPushgateway() as server:
        yield server


@pytest.fixture
def real(lapi, pushgateway):
    if lapi.process is None:
        lapi.start()
    lapi.delete_all()
    with KvStandin(CF_TOKEN) as kv:
        kv.store["config:flag"] = Entry("on")  # a key that is not ours
        yield Stack(lapi, kv, pushgateway, lapi_key=lapi.bouncer_key)
        assert kv.violations == []


def test_decisions_made_with_cscli_land_as_expected(real):
    real.lapi.add("-i", "192.0.2.1", "-d", "4h", "-R", "crowdsecurity/ssh-bf")
    real.lapi.add("-i", "2001:0DB8:0000::0001", "-d", "4h")
    real.lapi.add("-i", "192.0.2.3", "-d", "1h", "-t", "ban")
    real.lapi.add("-i", "192.0.2.3", "-d", "10h", "-t", "captcha")
    real.lapi.add("-i", "192.0.2.7", "-d", "2h", "-t", "captcha")
    real.lapi.add("-r", "198.51.100.0/24", "-d", "4h")
    real.lapi.add("-i", "192.0.2.4", "-d", "4h", "-t", "throttle")
    real.lapi.add("--scope", "Country", "-v", "FR", "-d", "4h")
    real.lapi.add("-i", "::ffff:192.0.2.6", "-d", "90s")
    now = time.time()
    result = real.run()
    assert result.code == 0, result.err
    live = real.kv.live()
    expected = {
        "ip:192.0.2.1": ("ban", 4 * 3600),
        "ip:2001:db8::1": ("ban", 4 * 3600),
        "ip:192.0.2.3": ("ban", 10 * 3600),
        "ip:192.0.2.7": ("captcha", 2 * 3600),
        "ip:192.0.2.6": ("ban", 90),
    }
    table = json.loads(live.pop("ip:scopes").value)  # the Country decision
    assert {scope: list(entries) for scope, entries in table.items() if scope != "v"} == {"country": ["FR"]}
    assert list(held_ranges(live.pop("ip:networks").value)) == ["198.51.100.0/24"]  # the Range decision
    assert set(live) == set(expected) | {"config:flag"}
    for key, (value, seconds) in expected.items():
        assert live[key].value == value, key
        assert abs(live[key].expiration - (now + seconds)) < 60, key
    assert live["ip:192.0.2.1"].metadata["scenario"] == "crowdsecurity/ssh-bf"
    assert "ignored 1 (expired 0, scope 0, type 1, invalid 0, range_too_large 0, table_full 0)" in result.out

    real.lapi.cscli_run("decisions", "delete", "-i", "192.0.2.1")
    real.kv.reset_counts()
    result = real.run()
    assert result.code == 0, result.err
    assert real.kv.deleted_keys == ["ip:192.0.2.1"] and real.kv.writes == 0


def test_refused_key_and_stopped_lapi_touch_nothing(real):
    real.lapi.add("-i", "192.0.2.1", "-d", "4h")
    assert real.run().code == 0
    before = real.kv.snapshot()
    real.lapi.cscli_run("decisions", "delete", "--all")

    refused = real.run(LAPI_KEY="not-a-bouncer-key")
    assert refused.code == job.EXIT_LAPI and "refused the bouncer credentials" in refused.err
    assert real.kv.snapshot() == before

    real.lapi.stop()
    stopped = real.run()
    assert stopped.code == job.EXIT_LAPI and "did not answer" in stopped.err
    assert real.kv.snapshot() == before

    real.lapi.start()
    real.lapi.add("-i", "192.0.2.2", "-d", "4h")
    result = real.run()
    assert result.code == 0, result.err
    assert set(real.kv.live()) == {"config:flag", "ip:192.0.2.2"}


def test_one_hundred_thousand_decisions(real, tmp_path):
    csv = tmp_path / "decisions.csv"
    csv.write_text(
        "duration,scope,type,value\n"
        + "".join(f"4h,ip,ban,10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}\n" for i in range(100_000))
    )
    real.lapi.import_csv(csv)
    first = real.run(PUSHGATEWAY_URL="")
    assert first.code == 0, first.err
    assert real.kv.writes == 100_000 and max(real.kv.bulk_sizes["bulk_put"]) <= 10_000
    assert len(real.kv.live()) == 100_001
    real.kv.reset_counts()
    second = real.run(PUSHGATEWAY_URL="")
    assert second.code == 0, second.err
    assert (real.kv.writes, real.kv.deletes) == (0, 0)
    assert dict(real.kv.requests) == {"list": 100}  # 1 LAPI read + 100 list pages, nothing else


def test_real_pushgateway_keeps_last_success_through_a_failure(real, pushgateway):
    real.lapi.add("-i", "192.0.2.1", "-d", "4h")
    real.lapi.add("-i", "192.0.2.2", "-d", "4h", "-t", "captcha")
    ok = real.run()
    assert ok.code == 0 and "Pushgateway" not in ok.err  # the exposition was accepted
    metrics = pushgateway.metrics()
    assert metrics[P + "success"] == 1
    assert metrics[P + "decisions"] == 2
    assert metrics[P + 'keys{remediation="captcha"}'] == 1
    assert metrics[P + "written"] == 2
    last_success = metrics[P + "last_success_timestamp_seconds"]
    assert abs(last_success - time.time()) < 60

    failed = real.run(LAPI_KEY="not-a-bouncer-key")
    assert failed.code == job.EXIT_LAPI and "Pushgateway" not in failed.err
    metrics = pushgateway.metrics()
    assert metrics[P + "success"] == 0
    assert metrics[P + "last_success_timestamp_seconds"] == last_success
    assert metrics[P + "decisions"] == 2  # the last good figures survive
    assert metrics[P + "last_run_seconds"] >= last_success


def test_filters_and_range_expansion_against_real_lapi(real, tmp_path):
    real.lapi.add("-i", "192.0.2.1", "-d", "4h", "-R", "crowdsecurity/ssh-bf")
    real.lapi.add("-i", "192.0.2.2", "-d", "4h", "-R", "crowdsecurity/http-probing")
    real.lapi.add("-r", "198.51.100.0/30", "-d", "4h")
    csv = tmp_path / "list.csv"
    csv.write_text("duration,scope,type,value\n4h,ip,ban,192.0.2.9\n")
    real.lapi.import_csv(csv)  # origin `cscli-import`, as a blocklist would be

    def keys(**env):
        result = real.run(PUSHGATEWAY_URL="", **env)
        assert result.code == 0, result.err
        return {k for k in real.kv.live() if k.startswith("ip:") and k not in ("ip:scopes", "ip:networks")}

    assert keys() == {"ip:192.0.2.1", "ip:192.0.2.2", "ip:192.0.2.9"}
    assert keys(LAPI_ORIGINS="cscli") == {"ip:192.0.2.1", "ip:192.0.2.2"}
    assert keys(LAPI_SCENARIOS_CONTAINING="ssh") == {"ip:192.0.2.1"}
    assert keys(LAPI_SCENARIOS_NOT_CONTAINING="probing") == {"ip:192.0.2.1", "ip:192.0.2.9"}
    ranges = {f"ip:198.51.100.{i}" for i in range(4)}
    assert keys(EXPAND_RANGES_MAX="4") == {"ip:192.0.2.1", "ip:192.0.2.2", "ip:192.0.2.9"} | ranges


def test_real_lapi_before_1_6_3_answers_404_to_usage_metrics_and_the_run_is_unaffected(real, pushgateway):
    real.lapi.add("-i", "192.0.2.1", "-d", "4h")
    result = real.run(clock_offset=at_quarter(5), LAPI_USAGE_METRICS="true")
    assert result.code == 0 and result.err == ""
    assert "written 1" in result.out
    (debug,) = [line for line in result.out.splitlines() if "usage metrics" in line]
    assert debug == "lapi-kv-sync: debug: usage metrics not sent: LAPI has no /v1/usage-metrics (CrowdSec before 1.6.3)"
    assert pushgateway.metrics()[P + "success"] == 1
    assert set(real.kv.live()) == {"config:flag", "ip:192.0.2.1"}
    again = real.run(clock_offset=at_quarter(5), LAPI_USAGE_METRICS="true")  # LAPI still well after the 404
    assert again.code == 0 and "written 0" in again.out


def test_a_second_run_against_real_lapi_with_nothing_changed_takes_the_shortcut(real, tmp_path):
    # The shortcut only pays if the real LAPI's answer is byte-stable apart from its durations
    # (the same order, the same spelling of every other field) from one read to the next.
    real.lapi.add("-i", "192.0.2.1", "-d", "4h", "-R", "crowdsecurity/ssh-bf")
    real.lapi.add("-i", "2001:0DB8:0000::0001", "-d", "4h")
    real.lapi.add("-i", "192.0.2.3", "-d", "1h", "-t", "ban")
    real.lapi.add("-i", "192.0.2.3", "-d", "10h", "-t", "captcha")
    real.lapi.add("-i", "192.0.2.4", "-d", "4h", "-t", "throttle")
    csv = tmp_path / "decisions.csv"
    csv.write_text(
        "duration,scope,type,value\n" + "".join(f"{1 + i % 5}h,ip,ban,10.0.{i >> 8}.{i & 255}\n" for i in range(2000))
    )
    real.lapi.import_csv(csv)
    state = tmp_path / "state" / "record.gz"
    state.parent.mkdir()
    first = real.run(PUSHGATEWAY_URL="", STATE_FILE=str(state))
    assert first.code == 0, first.err
    assert "written 2003" in first.out
    for _ in range(3):
        time.sleep(0.3)  # every duration is a little shorter
        real.kv.reset_counts()
        again = real.run(PUSHGATEWAY_URL="", STATE_FILE=str(state))
        assert again.code == 0, again.err
        assert "LAPI's answer unchanged since the record: nothing to plan" in again.out, again.out
        assert dict(real.kv.requests) == {}
    real.lapi.cscli_run("decisions", "delete", "-i", "192.0.2.1")
    changed = real.run(PUSHGATEWAY_URL="", STATE_FILE=str(state))
    assert changed.code == 0 and "LAPI's answer unchanged" not in changed.out
    assert real.kv.deleted_keys == ["ip:192.0.2.1"]


def test_the_four_scopes_from_real_lapi_land_in_the_keys_and_the_tables(real, tmp_path):
    real.lapi.add("-i", "192.0.2.1", "-d", "4h")
    real.lapi.add("-r", "198.51.100.77/24", "-d", "4h", "-R", "crowdsecurity/ssh-bf")
    real.lapi.add("-r", "2001:0DB8::/32", "-d", "2h", "-t", "captcha")
    real.lapi.add("-r", "::ffff:203.0.113.0/120", "-d", "3h")
    real.lapi.add("--scope", "Country", "-v", "fr", "-d", "4h", "-t", "captcha")
    real.lapi.add("--scope", "AS", "-v", "AS64500", "-d", "4h")
    real.lapi.add("--scope", "as", "-v", "64500", "-d", "1h", "-t", "captcha")  # the same AS, merged
    real.lapi.add("--scope", "username", "-v", "bob", "-d", "4h")  # another scope: LAPI leaves it out
    now = time.time()
    state = str(tmp_path / "record.gz")
    result = real.run(PUSHGATEWAY_URL="", STATE_FILE=state)
    assert result.code == 0, result.err
    assert "ignored 0 (" in result.out
    live = real.kv.live()
    entry = live["ip:scopes"]
    table = json.loads(entry.value)
    assert {scope: {name: value[0] for name, value in table[scope].items()} for scope in ("country", "as")} == {
        "country": {"FR": "captcha"},
        "as": {"64500": "ban"},
    }
    for names in (table["country"], table["as"]):
        for name, (_, end) in names.items():
            assert abs(end - (now + 4 * 3600)) <= 60, name  # the decision's end, to a second, on Cloudflare's clock
    assert entry.metadata == {"table": 1, "digest": entry.metadata["digest"], "entries": 2}
    ranges = held_ranges(live["ip:networks"].value)
    assert {name: remediation for name, (remediation, _) in ranges.items()} == {
        "198.51.100.0/24": "ban",
        "2001:db8::/32": "captcha",
        "203.0.113.0/24": "ban",
    }
    for name, (_, end) in ranges.items():
        seconds = 2 * 3600 if name == "2001:db8::/32" else 3 * 3600 if name == "203.0.113.0/24" else 4 * 3600
        assert abs(end - (now + seconds)) <= 60, name
    assert set(live) == {"config:flag", "ip:192.0.2.1", "ip:scopes", "ip:networks"}

    real.kv.reset_counts()  # the real LAPI's answer is byte-stable but for durations: the shortcut
    again = real.run(PUSHGATEWAY_URL="", STATE_FILE=state)
    assert again.code == 0 and "LAPI's answer unchanged since the record" in again.out
    assert dict(real.kv.requests) == {}

    real.lapi.cscli_run("decisions", "delete", "-r", "2001:0DB8::/32")  # a Range lifted: one write
    churn = real.run(PUSHGATEWAY_URL="", STATE_FILE=state)
    assert churn.code == 0 and real.kv.written_keys == ["ip:networks"] and real.kv.deletes == 0
    assert "2001:db8::/32" not in held_ranges(real.kv.live()["ip:networks"].value)

    def ranges_with(**env):  # the filters hold for the table too
        result = real.run(PUSHGATEWAY_URL="", **env)
        assert result.code == 0, result.err
        held = real.kv.live().get("ip:networks")
        return None if held is None else held_ranges(held.value)

    assert list(ranges_with(LAPI_SCENARIOS_CONTAINING="ssh")) == ["198.51.100.0/24"]
    assert ranges_with(LAPI_ORIGINS="crowdsec") is None  # every decision here is cscli's: no table
    assert len(ranges_with(LAPI_ORIGINS="cscli")) == 2

    real.kv.reset_counts()
    off = real.run(PUSHGATEWAY_URL="", SCOPE_TABLE="false")
    assert off.code == 0 and sorted(real.kv.deleted_keys) == ["ip:networks", "ip:scopes"]
    assert "ignored 0 (" in off.out  # LAPI was asked for `scopes=ip` only
    assert set(real.kv.live()) == {"config:flag", "ip:192.0.2.1"}
