"""The functional core: pure functions, data in and data out."""

from __future__ import annotations

import ast
import contextlib
import datetime
import email.utils
import inspect
import ipaddress
import json
import time
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lapi_kv_sync as job
from tests.conftest import UNDER_MUTATION
from tests.test_cli import Recording, variables_read

NOW = 1_800_000_000.0


def row(value="192.0.2.1", duration="1h", type="ban", scope="Ip", **extra):
    return {
        "value": value,
        "duration": duration,
        "type": type,
        "scope": scope,
        "origin": "crowdsec",
        "scenario": "s",
        **extra,
    }


# --------------------------------------------------------------------------- Go durations


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("3h59m58.349167242s", 3 * 3600 + 59 * 60 + 58.349167242),
        ("45s", 45),
        ("-3s", -3),
        ("-16.937648ms", -0.016937648),
        ("1m29.33672758s", 89.33672758),
        ("0", 0),
        ("1h", 3600),
        ("1.5h", 5400),
        ("2us", 2e-6),
        ("2µs", 2e-6),
        ("7ns", 7e-9),
        ("+5m", 300),
    ],
)
def test_go_durations_parse(text, seconds):
    assert job.parse_go_duration(text) == pytest.approx(seconds, abs=1e-9)


@pytest.mark.parametrize("text", ["2562047h47m16.854775807s", "9223372036854775807ns"])
def test_the_longest_go_duration_is_one(text):
    # time.Duration's maximum, 2^63 - 1 ns, as Go writes it and in nanoseconds: the fast path and the loop.
    assert job.parse_go_duration(text) == job.GO_MAX_SECONDS


@pytest.mark.parametrize("text", ["", "h", "5", "5x", "1h 2m", "--1s", "1s2", "s1", "1.2.3s", "-", "1hh"])
def test_junk_is_not_a_duration(text):
    with pytest.raises(ValueError):
        job.parse_go_duration(text)


@pytest.mark.parametrize("text", ["1" * 2000 + "x", "1" * 2000, "1s" + "1" * 2000 + "x"])
def test_a_long_run_of_digits_is_refused_at_once(text):
    # A decision may be up to 2^20 characters: scanning for `[0-9]*\.?[0-9]+` at every position
    # took cubic time (2,000 digits: 16 s, 10,000: most of an hour), in C, past any deadline.
    started = time.monotonic()
    with pytest.raises(ValueError):
        job.parse_go_duration(text)
    assert time.monotonic() - started < 1


@given(
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=0, max_value=59),
    st.integers(min_value=0, max_value=999_999_999),
)
def test_go_duration_round_trip(hours, minutes, nanos):
    text = f"{hours}h{minutes}m{nanos / 1e9:.9f}s"
    assert job.parse_go_duration(text) == pytest.approx(hours * 3600 + minutes * 60 + nanos / 1e9)


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    "value, canonical",
    [
        ("2001:0DB8:0000::0001", "2001:db8::1"),
        ("::ffff:192.0.2.6", "192.0.2.6"),
        ("192.0.2.1", "192.0.2.1"),
        ("2001:DB8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),
        ("::1", "::1"),
    ],
)
def test_addresses_are_canonical(value, canonical):
    assert job.canonical_address(value) == canonical


@pytest.mark.parametrize(
    "value", ["fe80::1%eth0", "192.0.2.0/24", "example.com", "", "192.0.2.01", "1.2.3.4.5", 3232235521, None]
)
def test_non_addresses_are_refused(value):
    with pytest.raises(ValueError):
        job.canonical_address(value)


@given(st.ip_addresses())
def test_canonical_form_is_a_fixed_point(address):
    canonical = job.canonical_address(str(address))
    assert job.canonical_address(canonical) == canonical
    assert job.canonical_address(str(address).upper()) == canonical
    assert ipaddress.ip_address(canonical).version == (
        4 if address.version == 4 or getattr(address, "ipv4_mapped", None) else 6
    )


# --------------------------------------------------------------------------- projection


def test_projection_keys_values_and_ends():
    p = job.project([row("2001:0DB8:0000::0001", "2h"), row("::ffff:192.0.2.6", "90s", "captcha")], NOW, "ip:")
    assert p.wanted == {
        "ip:2001:db8::1": job.Wanted("ban", NOW + 7200, "crowdsec", "s"),
        "ip:192.0.2.6": job.Wanted("captcha", NOW + 90, "crowdsec", "s"),
    }
    assert sum(p.ignored.values()) == 0


def test_ban_beats_captcha_and_longest_time_wins():
    p = job.project(
        [row(duration="1h", type="captcha"), row(duration="10m"), row(duration="3h", type="captcha")], NOW, "ip:"
    )
    assert p.wanted["ip:192.0.2.1"].remediation == "ban"
    assert p.wanted["ip:192.0.2.1"].end == NOW + 3 * 3600
    p = job.project([row(duration="1h"), row(duration="5h")], NOW, "ip:")
    assert p.wanted["ip:192.0.2.1"].end == NOW + 5 * 3600


def test_same_address_written_two_ways_merges_into_one_key():
    p = job.project([row("::ffff:192.0.2.6", "1h", "captcha"), row("192.0.2.6", "2m")], NOW, "ip:")
    assert list(p.wanted) == ["ip:192.0.2.6"]
    assert p.wanted["ip:192.0.2.6"].remediation == "ban"


def test_left_out_decisions_are_counted_by_reason():
    decisions = [
        row(duration="-3s"),
        row(duration="0s"),
        row("198.51.100.0/24", scope="Range"),
        row("FR", scope="Country"),
        row("AS1234", scope="AS"),
        row(type="throttle"),
        row("not-an-ip"),
        row("fe80::1%eth0"),
        row(duration="forever"),
        row(duration=None),
        "junk",
        {"scope": "Ip"},
        row("10.0.0.1", "1h", scope="ip"),  # scope matches in any case
    ]
    p = job.project(decisions, NOW, "ip:")
    assert list(p.wanted) == ["ip:10.0.0.1"]
    assert p.ignored == Counter(expired=2, scope=3, type=2, invalid=5)


def test_expanded_ranges_merge_with_ip_decisions():
    decisions = [
        row("198.51.100.0/30", "1h", scope="Range"),
        row("198.51.100.2", "3h", "captcha"),
        row("10.0.0.0/8", scope="Range"),
        row("2001:db8::/126", scope="Range"),
    ]
    assert job.project(decisions, NOW, "ip:", 0).ignored == Counter(scope=3)
    p = job.project(decisions, NOW, "ip:", 256)
    assert sorted(p.wanted) == [f"ip:198.51.100.{i}" for i in range(4)]
    assert p.wanted["ip:198.51.100.2"] == job.Wanted("ban", NOW + 3 * 3600, "crowdsec", "s")
    assert p.ignored == Counter(range_too_large=2)


def test_a_range_is_expanded_with_its_host_bits_cleared_up_to_exactly_the_limit():
    # ip_network(strict=False): LAPI keeps a range as written (`198.51.100.7/30`).
    p = job.project([row("198.51.100.7/30", scope="Range"), row("203.0.113.0/29", scope="Range")], NOW, "ip:", 4)
    assert sorted(p.wanted) == [f"ip:198.51.100.{i}" for i in range(4, 8)]
    assert p.ignored == Counter(range_too_large=1)  # 8 addresses, over 4


def test_metadata_fits_cloudflare_limit():
    wanted = job.Wanted("ban", NOW, "o" * 5000, "é" * 5000)
    metadata = job.metadata_of(wanted.remediation, wanted.origin, wanted.scenario)
    assert metadata["remediation"] == "ban"
    assert len(json.dumps(metadata).encode()) <= job.MAX_METADATA_BYTES
    assert metadata["scenario"].startswith("é")


def test_a_bulk_item_carries_the_key_value_ttl_and_the_whole_metadata():
    # Origin and scenario, not only the remediation: the README documents all three, and the
    # Worker's analytics and CrowdSec's usage metrics read them.
    wanted = {"ip:192.0.2.1": job.Wanted("captcha", NOW + 3600, "cscli", "crowdsecurity/ssh-bf")}
    (write,) = job.make_plan(wanted, {}, NOW).writes
    assert write == job.Write("ip:192.0.2.1", "captcha", 3600, "cscli", "crowdsecurity/ssh-bf")
    assert job.bulk_item(write) == {
        "key": "ip:192.0.2.1",
        "value": "captcha",
        "expiration_ttl": 3600,
        "metadata": {"remediation": "captcha", "origin": "cscli", "scenario": "crowdsecurity/ssh-bf"},
    }


def test_a_decision_with_under_a_second_left_is_written_and_fields_that_are_not_text_are_empty():
    p = job.project([row(duration="500ms", origin=None, scenario=5)], NOW, "ip:")
    assert p.wanted == {"ip:192.0.2.1": job.Wanted("ban", NOW + 0.5, "", "")}


def test_a_key_of_exactly_512_bytes_is_written_and_each_longer_one_counted():
    # 10.0.0.8/29: 10.0.0.8 and .9 make keys of 512 bytes; .10 to .15 one byte more each.
    p = job.project([row("10.0.0.8/29", scope="Range")], NOW, "x" * 504, 8)
    assert sorted(p.wanted) == ["x" * 504 + "10.0.0.8", "x" * 504 + "10.0.0.9"]
    assert p.ignored == Counter(invalid=6)


def test_key_over_512_bytes_is_not_written():
    p = job.project([row("2001:db8::1")], NOW, "x" * 502)
    assert p.wanted == {} and p.ignored == Counter(invalid=1)


# --------------------------------------------------------------------------- plan


def wanted_of(remediation="ban", seconds=3600.0):
    return job.Wanted(remediation, NOW + seconds, "crowdsec", "s")


def test_plan_writes_missing_changed_and_untagged_keys():
    wanted = {
        "ip:a": wanted_of(),
        "ip:b": wanted_of(),
        "ip:c": wanted_of("captcha"),
        "ip:d": wanted_of(),
        "ip:e": wanted_of(),
    }
    present = {
        "ip:b": job.Present(NOW + 3600, "ban"),  # up to date
        "ip:c": job.Present(NOW + 3600, "ban"),  # ban turned captcha
        "ip:d": job.Present(NOW + 3600, None),  # written by hand, no metadata
        "ip:e": job.Present(NOW + 600, "ban"),  # ban made longer
        "ip:gone": job.Present(NOW + 60, "ban"),
    }
    plan = job.make_plan(wanted, present, NOW)
    assert [w.key for w in plan.writes] == ["ip:a", "ip:c", "ip:d", "ip:e"]
    assert plan.deletes == ["ip:gone"]
    assert plan.unchanged == ["ip:b"]
    assert all(w.ttl == 3600 for w in plan.writes)


def test_expiration_within_slack_is_unchanged():
    present = {
        "ip:a": job.Present(NOW + 3600 + 59, "ban"),
        "ip:b": job.Present(NOW + 3600 + 61, "ban"),  # would outlive its decision by more than the slack
        "ip:c": job.Present(None, "ban"),
    }
    plan = job.make_plan({k: wanted_of() for k in present}, present, NOW)
    assert plan.unchanged == ["ip:a"]
    assert [w.key for w in plan.writes] == ["ip:b", "ip:c"]


def test_an_end_moved_later_leaves_the_key_until_it_comes_within_refresh_ahead():
    # A blocklist refresh: the decision now ends an hour later than the key's expiration.
    key = {"ip:a": job.Present(NOW + job.REFRESH_AHEAD + 1, "ban")}
    later = {"ip:a": wanted_of(seconds=job.REFRESH_AHEAD + 1 + 3600)}
    plan = job.make_plan(later, key, NOW)
    assert (plan.unchanged, plan.writes) == (["ip:a"], [])
    assert plan.due_at == NOW + 1  # 15 minutes before the key expires
    due = job.make_plan(later, key, NOW + 1)  # now exactly REFRESH_AHEAD from its expiration
    assert [(w.key, w.ttl) for w in due.writes] == [("ip:a", job.REFRESH_AHEAD + 3600)]
    assert due.due_at == float("inf")  # written with the decision's end: nothing more to come due


def test_an_end_moved_earlier_beyond_the_slack_is_rewritten_at_once():
    key = {"ip:a": job.Present(NOW + 86400, "ban")}  # far from due, but the decision now ends in an hour
    plan = job.make_plan({"ip:a": wanted_of(seconds=3600)}, key, NOW)
    assert [(w.key, w.ttl) for w in plan.writes] == [("ip:a", 3600)]


def test_an_expiration_exactly_a_slack_off_is_unchanged_and_a_key_gone_at_its_expiration_is_not_deleted():
    within = {"ip:a": job.Present(NOW + 3600 - 60, "ban"), "ip:b": job.Present(NOW + 3600 + 60, "ban")}
    plan = job.make_plan({k: wanted_of() for k in within}, {**within, "ip:gone": job.Present(NOW, "ban")}, NOW)
    assert (plan.unchanged, plan.writes, plan.deletes) == (["ip:a", "ip:b"], [], [])


def test_a_decision_of_exactly_max_ttl_is_not_capped():
    exact = {"ip:a": wanted_of(seconds=job.MAX_TTL)}
    plan = job.make_plan(exact, {}, NOW)
    assert [w.ttl for w in plan.writes] == [job.MAX_TTL] and plan.due_at == float("inf")
    an_hour_long = {"ip:a": job.Present(NOW + job.MAX_TTL + 3600, "ban")}  # off by more than the slack
    assert [w.key for w in job.make_plan(exact, an_hour_long, NOW).writes] == ["ip:a"]


def test_short_decisions_get_cloudflare_minimum_ttl_and_are_not_rewritten():
    plan = job.make_plan({"ip:a": wanted_of(seconds=5)}, {}, NOW)
    assert plan.writes[0].ttl == job.MIN_TTL
    # written with TTL 60 when 5 s were left; a minute later the decision has 0.5 s left
    later = job.make_plan({"ip:a": wanted_of(seconds=5)}, {"ip:a": job.Present(NOW + 60, "ban")}, NOW + 4.5)
    assert later.writes == [] and later.unchanged == ["ip:a"]


def test_present_keys_reads_what_it_can_and_marks_the_rest_stale():
    page = [
        "junk",  # skipped, not the end of the page
        {"name": "ip:a", "expiration": 1_800_003_600, "metadata": {"remediation": "ban", "origin": "o"}},
        {"name": "ip:b", "expiration": "soon", "metadata": {"remediation": "block"}},
        {"name": "ip:c", "metadata": "ban"},
        {"name": "other:d", "expiration": 1},
        "junk",
        {"expiration": 5},
    ]
    assert job.present_keys(page, "ip:") == {
        "ip:a": job.Present(1_800_003_600, "ban"),
        "ip:b": job.Present(None, None),
        "ip:c": job.Present(None, None),
    }


def test_unsuccessful_keys_are_the_strings_cloudflare_lists():
    assert job.unsuccessful_keys({"successful_key_count": 1, "unsuccessful_keys": ["ip:a", 3, None, "ip:b"]}) == [
        "ip:a",
        "ip:b",
    ]
    assert job.unsuccessful_keys({"unsuccessful_keys": None}) == job.unsuccessful_keys(None) == []


def test_an_http_date_is_a_unix_time_and_anything_else_none():
    assert job.http_date("Fri, 15 Jan 2027 08:00:10 GMT") == 1_800_000_010
    assert job.http_date(None) is job.http_date("") is job.http_date("soon") is None


def test_chunks_never_exceed_the_bulk_limit():
    sizes = [len(c) for c in job.chunks(list(range(25_001)))]
    assert sizes == [10_000, 10_000, 5_001]


decision_rows = st.lists(
    st.builds(
        row,
        value=st.one_of(st.ip_addresses().map(str), st.sampled_from(["junk", "192.0.2.0/24"])),
        duration=st.one_of(st.integers(-100, 10**6).map(lambda s: f"{s}s"), st.just("bad")),
        type=st.sampled_from(["ban", "captcha", "throttle", "Ban"]),
        scope=st.sampled_from(["Ip", "ip", "Range", "Country"]),
    ),
    max_size=40,
)


@given(decision_rows)
def test_every_decision_is_either_wanted_or_counted(decisions):
    p = job.project(decisions, NOW, "ip:")
    alone = [job.project([d], NOW, "ip:") for d in decisions]
    assert set(p.wanted) == {k for a in alone for k in a.wanted}
    assert sum(len(a.wanted) for a in alone) + sum(p.ignored.values()) == len(decisions)
    assert p.ignored == sum((a.ignored for a in alone), Counter())
    assert set(p.ignored) <= set(job.IGNORE_REASONS)
    assert all(w.remediation in job.REMEDIATIONS and w.end > NOW for w in p.wanted.values())


@given(
    decision_rows,
    st.dictionaries(
        st.text(min_size=1, max_size=8).map(lambda s: "ip:" + s), st.sampled_from(["ban", "captcha", None]), max_size=10
    ),
)
def test_applying_a_plan_then_planning_again_changes_nothing(decisions, old):
    wanted = job.project(decisions, NOW, "ip:").wanted
    present = {k: job.Present(NOW + 100, r) for k, r in old.items()}
    plan = job.make_plan(wanted, present, NOW)
    assert set(plan.deletes) == set(present) - set(wanted)
    assert {w.key for w in plan.writes} | set(plan.unchanged) == set(wanted)
    after = {k: v for k, v in present.items() if k not in plan.deletes}
    after.update({w.key: job.Present(NOW + w.ttl, w.remediation) for w in plan.writes})
    again = job.make_plan(wanted, after, NOW + 30)
    assert again.writes == [] and again.deletes == []


# --------------------------------------------------------------------------- metrics


def test_exposition_is_valid_text_format():
    report = job.Report(
        started=NOW,
        duration=1.25,
        success=True,
        wanted=3,
        by_remediation=Counter(ban=2, captcha=1),
        ignored=Counter(scope=4),
        cloudflare_requests=Counter(list=1, bulk_put=1, bulk_delete=0),
    )
    text = job.exposition(job.metric_samples(report))
    assert text.endswith("\n")
    lines = text.splitlines()
    types = [line.split()[2] for line in lines if line.startswith("# TYPE")]
    assert len(types) == len(set(types))
    assert all(line.startswith("# HELP") or line.startswith("# TYPE") or len(line.split()) == 2 for line in lines)
    assert "crowdsec_kv_sync_last_success_timestamp_seconds 1800000001.25" in lines
    assert 'crowdsec_kv_sync_ignored{reason="scope"} 4' in lines
    assert 'crowdsec_kv_sync_keys{remediation="captcha"} 1' in lines
    assert "crowdsec_kv_sync_decisions 3" in lines


def test_exposition_gives_each_family_one_help_and_type_then_its_samples():
    samples = [
        ("a_total", "What a is.", {}, 3.0),
        ("b", "What b is.", {"x": "1", "y": "2"}, 0.5),
        ("b", "What b is.", {"x": "3", "y": "4"}, 1e20),
    ]
    assert job.exposition(samples) == (
        "# HELP a_total What a is.\n# TYPE a_total gauge\na_total 3\n"
        '# HELP b What b is.\n# TYPE b gauge\nb{x="1",y="2"} 0.5\nb{x="3",y="4"} 100000000000000000000\n'
    )


def test_failed_run_reports_only_success_last_run_and_duration():
    names = {name for name, *_ in job.metric_samples(job.Report(started=NOW, duration=2.0))}
    assert names == {
        "crowdsec_kv_sync_success",
        "crowdsec_kv_sync_last_run_seconds",
        "crowdsec_kv_sync_duration_seconds",
        "crowdsec_kv_sync_exit_code",  # which side failed, for the alerts
    }


# --------------------------------------------------------------------------- configuration


BASE_ENV = {"LAPI_KEY": "k" * 20, "CF_ACCOUNT_ID": "a" * 32, "CF_KV_NAMESPACE_ID": "b" * 32, "CF_API_TOKEN": "t" * 20}


def test_config_defaults():
    config = job.load_config(BASE_ENV)
    assert config.lapi_url == "http://crowdsec-service.crowdsec.svc.cluster.local:8080"
    assert config.cf_api_url == "https://api.cloudflare.com/client/v4"
    assert config.kv_key_prefix == "ip:" and config.pushgateway_url == "" and config.max_deletes is None
    assert "k" * 20 not in repr(config) and "t" * 20 not in repr(config)


def test_config_names_every_missing_variable():
    with pytest.raises(job.ConfigError) as caught:
        job.load_config({})
    text = str(caught.value)
    for name in ("LAPI_KEY", "CF_ACCOUNT_ID", "CF_KV_NAMESPACE_ID", "CF_API_TOKEN"):
        assert name in text
    assert len(caught.value.problems) == 4


def test_config_reads_each_setting_as_given(tmp_path):
    env = {
        **BASE_ENV,
        "LAPI_URL": " https://lapi.example:8443/ ",
        "CF_API_URL": "http://127.0.0.1:1/kvX//",
        "CF_ACCOUNT_ID": "Ab0" + "c" * 29,  # upper case, digits, 32 of them
        "PUSHGATEWAY_URL": "http://[::1]:65535",
        "KV_KEY_PREFIX": "k" * 64,
        "LOG_FORMAT": "JSON",
        "LAPI_USAGE_METRICS": "FALSE",
        "LAPI_ORIGINS": " crowdsec, ,cscli ",
        "LAPI_SCENARIOS_CONTAINING": "ssh",
        "LAPI_SCENARIOS_NOT_CONTAINING": "http,,",
        # Each number at its smallest allowed value.
        "RUN_DEADLINE": "1",
        "HTTP_TIMEOUT": "0.1",
        "MAX_DELETES": "0",
        "EXPAND_RANGES_MAX": "0",
        "LAPI_MAX_BYTES": "1024",
        "AUDIT_INTERVAL": "0",
        "STATE_FILE": str(tmp_path / "record.gz"),
        "LAPI_KEY": "k" * job.MIN_SECRET_LENGTH,  # as short as a secret may be
    }
    config = job.load_config(env)
    assert (config.lapi_url, config.cf_api_url, config.pushgateway_url) == (
        "https://lapi.example:8443",
        "http://127.0.0.1:1/kvX",
        "http://[::1]:65535",
    )
    assert (config.kv_key_prefix, config.log_format, config.lapi_usage_metrics) == ("k" * 64, "json", False)
    assert config.lapi_origins == ("crowdsec", "cscli")
    assert (config.lapi_scenarios_containing, config.lapi_scenarios_not_containing) == (("ssh",), ("http",))
    numbers = (config.run_deadline, config.http_timeout, config.max_deletes, config.expand_ranges_max)
    assert numbers == (1, 0.1, 0, 0) and (config.lapi_max_bytes, config.audit_interval) == (1024, 0)
    assert (config.state_file, config.lapi_key) == (str(tmp_path / "record.gz"), "k" * job.MIN_SECRET_LENGTH)
    assert config.cf_account_id == "Ab0" + "c" * 29
    assert type(config.max_deletes) is int and type(config.run_deadline) is float
    defaults = job.load_config(BASE_ENV)
    assert (defaults.run_deadline, defaults.http_timeout, defaults.audit_interval) == (240, 30, 900)
    assert (defaults.expand_ranges_max, defaults.lapi_max_bytes) == (0, 48 * 1024 * 1024)
    assert (defaults.log_format, defaults.lapi_usage_metrics, defaults.state_file) == ("text", True, "")
    assert defaults.lapi_origins == defaults.lapi_scenarios_containing == defaults.lapi_scenarios_not_containing == ()


def test_config_takes_a_client_certificate_instead_of_a_bouncer_key(tmp_path):
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    env = {
        **BASE_ENV,
        "LAPI_KEY": "",
        "LAPI_CLIENT_CERT": str(tmp_path / "c.pem"),
        "LAPI_CLIENT_KEY": str(tmp_path / "k.pem"),
    }
    config = job.load_config(env)
    assert (config.lapi_key, config.lapi_client_cert, config.lapi_client_key) == (
        "",
        env["LAPI_CLIENT_CERT"],
        env["LAPI_CLIENT_KEY"],
    )


@pytest.mark.parametrize(
    "extra, problems",
    [
        ({"LAPI_KEY": ""}, ["LAPI_KEY (or LAPI_KEY_FILE) is not set, and no LAPI_CLIENT_CERT is given"]),
        ({"CF_API_TOKEN": " "}, ["CF_API_TOKEN (or CF_API_TOKEN_FILE) is not set"]),
        ({"CF_ACCOUNT_ID": ""}, ["CF_ACCOUNT_ID is not set"]),
        (
            {"CF_KV_NAMESPACE_ID": "b" * 33},
            [f"CF_KV_NAMESPACE_ID must be a Cloudflare identifier (up to 32 letters and digits), got {'b' * 33!r}"],
        ),
        ({"LAPI_KEY_FILE": "/k"}, ["LAPI_KEY and LAPI_KEY_FILE are both set: set only one"]),
        (
            {"CF_API_TOKEN_FILE": "/nonexistent/t", "CF_API_TOKEN": ""},
            ["CF_API_TOKEN_FILE: cannot read /nonexistent/t: No such file or directory"],
        ),
        ({"LAPI_KEY": "k" * 7}, ["LAPI_KEY: the secret is under 8 characters, too short to be a real key"]),
        (
            {"LAPI_KEY": "k" * 20 + "\nx"},
            ["LAPI_KEY: the secret holds more than one line; it must be one line of visible ASCII characters"],
        ),
        (
            {"CF_API_TOKEN": "t" * 20 + "\rx"},
            ["CF_API_TOKEN: the secret holds more than one line; it must be one line of visible ASCII characters"],
        ),
        (
            {"LAPI_KEY": "k" * 20 + " x"},
            [
                "LAPI_KEY: the secret holds a character that is not visible ASCII; it must be one line of visible ASCII characters"
            ],
        ),
        ({"LAPI_URL": "ftp://x"}, ["LAPI_URL must be an http:// or https:// URL, got 'ftp://x'"]),
        ({"LAPI_URL": "http://[::1"}, ["LAPI_URL must be an http:// or https:// URL, got 'http://[::1'"]),
        ({"CF_API_URL": "https://"}, ["CF_API_URL must be an http:// or https:// URL, got 'https:'"]),
        ({"PUSHGATEWAY_URL": "http://u:p@h"}, ["PUSHGATEWAY_URL must not carry credentials in the URL"]),
        ({"PUSHGATEWAY_URL": "http://u@h"}, ["PUSHGATEWAY_URL must not carry credentials in the URL"]),
        ({"LAPI_URL": "http://h:0"}, ["LAPI_URL must have a port from 1 to 65535 (or none), got 'http://h:0'"]),
        ({"LAPI_URL": "http://h:65536"}, ["LAPI_URL must have a port from 1 to 65535 (or none), got 'http://h:65536'"]),
        ({"LAPI_URL": "http://h:port"}, ["LAPI_URL must have a port from 1 to 65535 (or none), got 'http://h:port'"]),
        (
            {"LAPI_URL": "http://lapi:8080/v1/decisions"},
            [
                "LAPI_URL is LAPI's base URL, its scheme, host and port (such as "
                "http://crowdsec-service.crowdsec.svc.cluster.local:8080), without the API path or a query, which the "
                "job adds: got 'http://lapi:8080/v1/decisions'; set 'http://lapi:8080'"
            ],
        ),
        ({"RUN_DEADLINE": "0.5"}, ["RUN_DEADLINE must be a number >= 1, got '0.5'"]),
        ({"HTTP_TIMEOUT": "0.09"}, ["HTTP_TIMEOUT must be a number >= 0.1, got '0.09'"]),
        ({"LAPI_MAX_BYTES": "1023"}, ["LAPI_MAX_BYTES must be a whole number >= 1024, got '1023'"]),
        ({"MAX_DELETES": "-1"}, ["MAX_DELETES must be a whole number >= 0, got '-1'"]),
        ({"AUDIT_INTERVAL": "-0.5"}, ["AUDIT_INTERVAL must be a number >= 0, got '-0.5'"]),
        ({"KV_KEY_PREFIX": "k" * 65}, [f"KV_KEY_PREFIX must be 1 to 64 bytes with no white space, got {'k' * 65!r}"]),
        ({"KV_KEY_PREFIX": "é" * 33}, [f"KV_KEY_PREFIX must be 1 to 64 bytes with no white space, got {'é' * 33!r}"]),
        ({"KV_KEY_PREFIX": "ip: "}, ["KV_KEY_PREFIX must be 1 to 64 bytes with no white space, got 'ip: '"]),
        ({"LOG_FORMAT": "XML"}, ["LOG_FORMAT must be text or json, got 'xml'"]),
        ({"LAPI_USAGE_METRICS": "No"}, ["LAPI_USAGE_METRICS must be true or false, got 'no'"]),
        ({"LAPI_CA_CERT": "/nonexistent/ca.pem"}, ["LAPI_CA_CERT: cannot read /nonexistent/ca.pem"]),
        (
            {"LAPI_CLIENT_CERT": "/etc/hostname"},
            ["LAPI_CLIENT_CERT and LAPI_CLIENT_KEY go together: set both or neither"],
        ),
        (
            {"LAPI_CLIENT_KEY": "/etc/hostname"},
            ["LAPI_CLIENT_CERT and LAPI_CLIENT_KEY go together: set both or neither"],
        ),
        (
            {"STATE_FILE": "/stateX/"},
            ["STATE_FILE names a directory (/stateX/): name a file in it, e.g. /stateX/record.gz"],
        ),
        ({"STATE_FILE": "/"}, ["STATE_FILE names a directory (/): name a file in it, e.g. /record.gz"]),
        ({"STATE_FILE": "/etc"}, ["STATE_FILE names a directory (/etc): name a file in it, e.g. /etc/record.gz"]),
    ],
)
def test_each_bad_setting_is_one_message_naming_it(extra, problems):
    with pytest.raises(job.ConfigError) as caught:
        job.load_config({**BASE_ENV, **extra})
    assert caught.value.problems == problems
    assert str(caught.value) == "; ".join(problems)


@pytest.mark.parametrize(
    "value, base",
    [
        ("http://lapi:8080/v1/decisions", "http://lapi:8080"),
        ("http://lapi:8080/v1/", "http://lapi:8080"),
        ("http://lapi:8080/v1/decisions?scopes=ip", "http://lapi:8080"),
        ("https://edge.example/crowdsec/v1/decisions/stream", "https://edge.example/crowdsec"),
        ("http://[2001:db8::1]:8080/v1", "http://[2001:db8::1]:8080"),
        ("http://lapi:8080?origins=cscli", "http://lapi:8080"),
    ],
)
def test_lapi_url_is_the_base_and_an_api_path_is_refused_naming_the_base(value, base):
    """LAPI_URL=http://lapi:8080/v1/decisions would ask for /v1/decisions/v1/decisions (a 404 every
    run): refused at start, with the base to set instead."""
    with pytest.raises(job.ConfigError) as caught:
        job.load_config({**BASE_ENV, "LAPI_URL": value})
    (problem,) = caught.value.problems
    assert problem.startswith("LAPI_URL is LAPI's base URL, its scheme, host and port") and f"set {base!r}" in problem


@pytest.mark.parametrize(
    "value", ["http://lapi:8080", "http://lapi:8080/", "https://edge.example/crowdsec", "http://h/v10"]
)
def test_a_lapi_base_behind_a_path_prefix_is_accepted(value):
    assert job.load_config({**BASE_ENV, "LAPI_URL": value}).lapi_url == value.rstrip("/")


def test_a_host_name_lookup_cannot_take_is_named_with_why():
    with pytest.raises(job.ConfigError) as caught:
        job.load_config({**BASE_ENV, "LAPI_URL": "http://a..b"})
    (problem,) = caught.value.problems
    assert problem.startswith("LAPI_URL: 'a..b' is not a host name: ") and "label" in problem


def test_secret_files_are_read_without_a_byte_order_mark_and_checked_like_values(tmp_path):
    (tmp_path / "bom").write_bytes("\ufefffrom-file-key\n".encode())
    (tmp_path / "empty").write_text(" \n")
    (tmp_path / "latin1").write_bytes(b"caf\xe9-key-1234")
    (tmp_path / "two-lines").write_text("line-one-key\nline-two-key\n")
    env = {k: v for k, v in BASE_ENV.items() if k != "LAPI_KEY"}  # LAPI_KEY not set at all
    assert job.load_config({**env, "LAPI_KEY_FILE": str(tmp_path / "bom")}).lapi_key == "from-file-key"
    for name, says in {
        "empty": "is empty",
        "latin1": "is not UTF-8 text",
        "two-lines": ": the secret holds more than one line; it must be one line of visible ASCII characters",
    }.items():
        with pytest.raises(job.ConfigError) as caught:
            job.load_config({**env, "LAPI_KEY_FILE": str(tmp_path / name)})
        assert caught.value.problems == [f"LAPI_KEY_FILE ({tmp_path / name}) {says}".replace(") :", "):")]


def test_config_reads_secrets_from_files(tmp_path):
    (tmp_path / "key").write_text("from-file-key\n")
    (tmp_path / "token").write_text("from-file-token")
    env = {
        **BASE_ENV,
        "LAPI_KEY": "",
        "CF_API_TOKEN": "",
        "LAPI_KEY_FILE": str(tmp_path / "key"),
        "CF_API_TOKEN_FILE": str(tmp_path / "token"),
    }
    config = job.load_config(env)
    assert (config.lapi_key, config.cf_api_token) == ("from-file-key", "from-file-token")


@pytest.mark.parametrize(
    "extra, named",
    [
        ({"LAPI_URL": "ftp://x"}, "LAPI_URL"),
        ({"CF_API_URL": "not a url"}, "CF_API_URL"),
        ({"PUSHGATEWAY_URL": "http://user:pw@host"}, "PUSHGATEWAY_URL"),
        ({"RUN_DEADLINE": "soon"}, "RUN_DEADLINE"),
        ({"HTTP_TIMEOUT": "-1"}, "HTTP_TIMEOUT"),
        ({"CF_ACCOUNT_ID": "../etc"}, "CF_ACCOUNT_ID"),
        ({"KV_KEY_PREFIX": ""}, "KV_KEY_PREFIX"),
        ({"LAPI_KEY_FILE": "/nonexistent/key"}, "LAPI_KEY"),
        ({"CF_API_TOKEN_FILE": "/nonexistent/token", "CF_API_TOKEN": ""}, "CF_API_TOKEN_FILE"),
        ({"MAX_DELETES": "-5"}, "MAX_DELETES"),
        ({"EXPAND_RANGES_MAX": "1.5"}, "EXPAND_RANGES_MAX"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"LAPI_CA_CERT": "/nonexistent/ca.pem"}, "LAPI_CA_CERT"),
        ({"LAPI_CLIENT_CERT": "/etc/hostname"}, "LAPI_CLIENT_KEY"),
    ],
)
def test_bad_values_are_named(extra, named):
    with pytest.raises(job.ConfigError) as caught:
        job.load_config({**BASE_ENV, **extra})
    assert named in str(caught.value)


NUMBER_PROBE = "2048"  # a value every number setting takes as it is


def number_settings() -> set[str]:
    """Every variable load_config reads as a number: those it hands to its `number()` parser, and
    any other it turns into a number of the Config (found by setting each variable it reads)."""
    if UNDER_MUTATION:  # no source to read: the names looked up on an empty environment (every one: it reports all)
        parsed, empty = set(), Recording({})
        with contextlib.suppress(job.ConfigError):
            job.load_config(empty)
        names = empty.asked
    else:
        parsed = {
            call.args[0].value
            for call in ast.walk(ast.parse(inspect.getsource(job.load_config)))
            if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "number" and call.args
        }
        names = variables_read()
    base = job.load_config(BASE_ENV)
    found = set()
    for name in names - set(BASE_ENV):
        try:
            config = job.load_config({**BASE_ENV, name: NUMBER_PROBE})
        except job.ConfigError:
            continue
        if any(
            type(value) in (int, float) and value == float(NUMBER_PROBE) and value != getattr(base, key)
            for key, value in vars(config).items()
        ):
            found.add(name)
    return parsed | found


def test_number_settings_are_found():
    """The scan finds what it must, so the test below covers every number setting."""
    assert {"RUN_DEADLINE", "HTTP_TIMEOUT", "AUDIT_INTERVAL", "MAX_DELETES", "EXPAND_RANGES_MAX"} <= number_settings()
    assert "LOG_FORMAT" not in number_settings() and "CF_ACCOUNT_ID" not in number_settings()


@pytest.mark.parametrize("value", ["inf", "nan", "Infinity", "-inf", "NaN", "+Infinity", "-nan", "1e999", " inf "])
def test_infinity_and_nan_are_refused_for_every_number_setting_naming_it(value):
    # RUN_DEADLINE=inf would be no deadline at all, AUDIT_INTERVAL=nan an audit every run.
    for name in sorted(number_settings()):
        with pytest.raises(job.ConfigError) as caught:
            job.load_config({**BASE_ENV, name: value})
        assert [p.split()[0] for p in caught.value.problems] == [name], caught.value.problems


def test_lapi_query_asks_for_the_scopes_and_filters_configured():
    base = job.load_config(BASE_ENV)
    assert job.lapi_query(base) == "scopes=ip,range,country,as"
    assert job.lapi_query(job.load_config({**BASE_ENV, "SCOPE_TABLE": "false"})) == "scopes=ip"
    filtered = job.Config(
        **{
            **base.__dict__,
            "scope_table": False,
            "expand_ranges_max": 16,
            "lapi_origins": ("crowdsec", "cscli"),
            "lapi_scenarios_containing": ("ssh", "smtp"),
            "lapi_scenarios_not_containing": ("http", "smb"),
        }
    )
    assert job.lapi_query(filtered) == (
        "scopes=ip,range&origins=crowdsec,cscli&scenarios_containing=ssh,smtp&scenarios_not_containing=http,smb"
    )


def test_retry_after_in_seconds_or_http_date():
    assert job.retry_after_seconds("7", NOW) == 7
    assert job.retry_after_seconds("Fri, 15 Jan 2027 08:00:10 GMT", 1_800_000_000.0) == pytest.approx(
        1_800_000_000.0 - NOW + 0, abs=1e7
    )

    date = email.utils.formatdate(NOW + 30, usegmt=True)
    assert job.retry_after_seconds(date, NOW) == pytest.approx(30)
    assert job.retry_after_seconds("soon", NOW) is None
    assert job.retry_after_seconds(None, NOW) is None


@pytest.mark.parametrize("ago", [1, 30, 3600, 10 * 365 * 86400])
def test_a_retry_after_date_already_past_means_retry_at_once(ago):
    # Our clock ahead of Cloudflare's: time.sleep() raises ValueError on a negative wait.
    assert job.retry_after_seconds(email.utils.formatdate(NOW - ago, usegmt=True), NOW) == 0


@given(st.integers(-(10**8), 10**8))
def test_a_retry_after_date_is_the_wait_until_then_never_negative(offset):
    wait = job.retry_after_seconds(email.utils.formatdate(NOW + offset, usegmt=True), NOW)
    assert wait == max(0, offset)


go_parts = st.lists(
    st.tuples(
        st.one_of(
            st.integers(0, 10**5).map(str), st.decimals(0, 10**4, places=6, allow_nan=False).map(lambda d: f"{d:f}")
        ),
        st.sampled_from(["h", "m", "s", "ms", "us", "µs", "ns"]),
    ),
    min_size=1,
    max_size=4,
)


@given(go_parts, st.booleans())
def test_go_duration_fast_path_agrees_with_the_units(parts, negative):
    text = ("-" if negative else "") + "".join(n + u for n, u in parts)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    expected = sum(float(n) * units[u] for n, u in parts)
    assert job.parse_go_duration(text) == pytest.approx(-expected if negative else expected, rel=1e-12, abs=1e-9)


@given(st.lists(st.integers(0, 300), min_size=4, max_size=4), st.lists(st.booleans(), min_size=4, max_size=4))
def test_ipv4_fast_path_agrees_with_ipaddress(octets, zero_padded):
    text = ".".join(f"0{o}" if pad else str(o) for o, pad in zip(octets, zero_padded, strict=True))
    try:
        expected = str(ipaddress.ip_address(text))
    except ValueError:
        expected = None
    try:
        got = job.canonical_address(text)
    except ValueError:
        got = None
    assert got == expected


def test_plan_compares_expirations_on_cloudflares_clock():
    present = {"ip:a": job.Present(NOW + 600 + 3600, "ban")}  # written when Cloudflare's clock read NOW + 600
    assert job.make_plan({"ip:a": wanted_of()}, present, NOW, offset=600).unchanged == ["ip:a"]
    assert [w.key for w in job.make_plan({"ip:a": wanted_of()}, present, NOW).writes] == ["ip:a"]
    assert job.make_plan({"ip:a": wanted_of()}, {}, NOW, offset=600).writes[0].ttl == 3600  # a TTL has no clock


# --------------------------------------------------------------------------- JSON log time


def test_json_log_time_is_rfc3339_utc_with_milliseconds():
    assert job.rfc3339(1795610595.1) == "2026-11-25T12:43:15.100Z"
    assert job.rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert job.rfc3339(1795610595.9996) == "2026-11-25T12:43:16.000Z"  # the millisecond carries


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_json_log_time_reads_back_as_the_same_millisecond(seconds):
    text = job.rfc3339(seconds)
    assert text.endswith("Z") and len(text) == len("2026-11-25T12:43:15.100Z")
    assert round(datetime.datetime.fromisoformat(text).timestamp() * 1000) == round(seconds * 1000)


# --------------------------------------------------------------------------- proxies, unread variables


MUST = "HTTPS_PROXY must be a proxy URL http://host:port (or http://user:password@host:port)"
ENCODED = "(/ ? # @ : in a user name or password percent-encoded)"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("socks5://u:pw@proxy:1080", f"{MUST}, got socks5://…: only a proxy spoken to in plain HTTP is supported"),
        ("https://proxy:3128", f"{MUST}, got https://…: only a proxy spoken to in plain HTTP is supported"),
        ("http://http://proxy:3128", f"{MUST}, got 'http://http://proxy:3128'"),
        ("http://u:pw@proxy", f"{MUST} {ENCODED}, got 'http://…@proxy'"),  # no port
        ("u:pw@proxy:0", f"{MUST} {ENCODED}, got '…@proxy:0'"),
        ("http://proxy:99999", f"{MUST}, got 'http://proxy:99999'"),
        ("http://proxy:3128/path", f"{MUST}, got 'http://proxy:3128/path'"),
        ("http://proxy:3128?q", f"{MUST}, got 'http://proxy:3128?q'"),
        ("http://proxy:3128#f", f"{MUST}, got 'http://proxy:3128#f'"),
        ("http://[::1:3128", f"{MUST}, got 'http://[::1:3128'"),
        ("http://:3128", f"{MUST}, got 'http://:3128'"),
        ("http://a..b:3128", "HTTPS_PROXY: 'a..b' is not a host name: "),
        ("http://u:p%0Aw@proxy:3128", "HTTPS_PROXY: the proxy credentials hold a control character"),
        ("http://u%7F:pw@proxy:3128", "HTTPS_PROXY: the proxy credentials hold a control character"),
    ],
)
def test_a_proxy_url_that_is_not_http_host_port_says_why_without_its_credentials(value, problem):
    proxy, said = job.parse_proxy("HTTPS_PROXY", value)
    assert proxy is None and said.startswith(problem) and "pw" not in said


@pytest.mark.parametrize(
    ("value", "proxy"),
    [
        ("", None),
        ("HTTP://proxy:3128/", job.Proxy("proxy", 3128, "V")),
        ("proxy:3128", job.Proxy("proxy", 3128, "V")),
        ("[fd00::1]:3128", job.Proxy("fd00::1", 3128, "V")),
        ("http://a%3Ab:c%40d@proxy:8080", job.Proxy("proxy", 8080, "V", "a:b", "c@d")),
        ("http://user@proxy:8080", job.Proxy("proxy", 8080, "V", "user", "")),
    ],
)
def test_a_proxy_url_gives_its_host_port_and_credentials(value, proxy):
    assert job.parse_proxy("V", value) == (proxy, "")


def test_a_proxy_names_itself_and_its_variable_and_never_its_credentials():
    proxy = job.Proxy("fd00::1", 3128, "https_proxy", "user", "pw-0123456789")
    assert str(proxy) == repr(proxy) == "the proxy [fd00::1]:3128 (https_proxy)"
    assert str(job.Proxy("proxy.corp", 8080, "HTTP_PROXY")) == "the proxy proxy.corp:8080 (HTTP_PROXY)"
    assert job.Proxy("p", 1, "V").authorization == ""
    assert job.Proxy("p", 1, "V", "u").authorization == "Basic dTo="  # "u:"
    assert job.Proxy("p", 1, "V", "", "p").authorization == "Basic OnA="  # ":p"


def test_each_proxy_variable_is_read_lower_case_first_and_stripped():
    assert job.proxy_variable({"HTTPS_PROXY": " up:1 ", "https_proxy": " low:1 "}, "HTTPS_PROXY") == (
        "https_proxy",
        "low:1",
    )
    assert job.proxy_variable({"HTTPS_PROXY": " up:1 "}, "HTTPS_PROXY") == ("HTTPS_PROXY", "up:1")
    assert job.proxy_variable({"HTTP_PROXY": "x"}, "HTTPS_PROXY") == ("HTTPS_PROXY", "")
    assert job.no_proxy_entries(" .A.com, ,., *,b ") == ("a.com", "*", "b")
    assert job.no_proxy_entries("X,.XX") == ("x", "xx")  # a host named X is one


def test_the_proxy_a_url_goes_through_depends_on_its_scheme_and_no_proxy():
    https, http = job.Proxy("s", 1, "HTTPS_PROXY"), job.Proxy("p", 2, "HTTP_PROXY")
    proxies = job.Proxies(https, http, ("lapi",))
    assert proxies.for_url("https", "kv", 443) is https and proxies.for_url("http", "kv", 80) is http
    assert proxies.for_url("https", "lapi", 443) is None and proxies.for_url("http", "lapi", 80) is None
    assert job.Proxies().for_url("https", "kv", 443) is None


@pytest.mark.parametrize(
    ("entries", "host", "port", "direct"),
    [
        (("lapi:8080", "*"), "kv", 443, True),  # `*` anywhere in the list
        (("other", "lapi"), "lapi", 80, True),  # not only the first entry
        (("[fd00::1]:8080",), "[fd00::1]", 8080, True),
        (("[fd00::1]:8080",), "fd00::1", 8081, False),
        (("[fd00::1]",), "fd00::1", 1, True),
        (("fd00::1",), "fd00::2", 1, False),
        (("not-an-address", "10.0.0.1"), "10.0.0.1", 1, True),  # a name never matches an address
        (("10.0.0.1:80",), "10.0.0.1", 443, False),
        (("10.1.2.3/8",), "10.9.9.9", 443, True),  # host bits set: the network they are in
        (("example.com",), "example.com.evil", 443, False),
        (("example.com",), "badexample.com", 443, False),
        (("example.com",), "a.b.example.com", 443, True),
        (("EXAMPLE.com",), "example.com", 443, False),  # entries come lower case from no_proxy_entries
    ],
)
def test_no_proxy_entries_each_for_what_they_name(entries, host, port, direct):
    assert job.bypasses_proxy(entries, host, port) is direct


def test_a_misspelled_variable_is_a_problem_and_one_with_the_jobs_prefix_a_warning():
    names = ["LAPI_X", "dry_run", "CF_Y", "DRYRUN", "KV_Z", "NO_COLOR", "LAPI_SERVICE_HOST", "LAPI-KEY", "1CF_A"]
    names += ["LAPI_KEY", "https_proxy", "STATE", "MAX_DELETE", "HTTPS_X"]
    assert job.unread_variables(names) == (
        [
            "DRYRUN is not a variable this job reads: did you mean DRY_RUN?",
            "MAX_DELETE is not a variable this job reads: did you mean MAX_DELETES?",
            "dry_run is not a variable this job reads: did you mean DRY_RUN?",
        ],
        ["CF_Y", "KV_Z", "LAPI_X"],
    )


def test_the_prefixes_warned_of_are_the_known_names_first_words():
    known = frozenset({"ALPHA_ONE_TWO", "BETA", "NO_PROXY", "https_proxy"})
    assert job.unread_variables(["ALPHA_X", "ONE_X", "BETA_X", "NO_X", "HTTPS_X", "ALPHAX"], known) == ([], ["ALPHA_X"])
    assert job.unread_variables(["ALPHA_ONE_TWX"], known)[0] == [
        "ALPHA_ONE_TWX is not a variable this job reads: did you mean ALPHA_ONE_TWO?"
    ]
    assert job.unread_variables(["alpha_one_two"], known)[0] != []  # compared in upper case


@pytest.mark.parametrize(
    ("value", "is_placeholder"),
    [("<your-account-id>", True), ("<", False), ("<x", False), ("x>", False), ("x", False), ("", False)],
)
def test_a_placeholder_is_angle_brackets_or_an_examples_value(value, is_placeholder):
    assert job.placeholder(value) is is_placeholder
    assert all(job.placeholder(v) for v in job.EXAMPLE_VALUES)


# --------------------------------------------------------------------------- what messages and logs quote


def test_control_characters_are_escaped_as_a_repr_writes_them_and_nothing_else():
    text = "a\tb\x00\n\r\x1b[31m\x7f\x80\x9f\u2028\u2029\xa0é"
    assert job.escaped_controls(text) == "a\tb\\x00\\n\\r\\x1b[31m\\x7f\\x80\\x9f\\u2028\\u2029\xa0é"


def test_each_form_of_a_secret_is_redacted_longest_first():
    assert job.redacted("key=abc abcdef", ["abcdef", "abc"]) == "key=[redacted] [redacted]"
    assert job.redacted("nothing", []) == "nothing"


def test_a_body_is_quoted_redacted_then_cut_on_one_line():
    secret = "s3cret-0123456789abcdef"
    assert job.snippet(b"  a\nb  ") == "'a b'"
    assert job.snippet(f"token {secret}!".encode(), [secret]) == "'token [redacted]!'"
    assert job.snippet(b"x" * 121) == repr("x" * 120 + "…")
    assert job.snippet(b"x" * 120) == repr("x" * 120)
    assert job.snippet(b"\xff\x1b") == repr("\ufffd\x1b")
    assert job.quoted(f"{secret}{secret}", [secret], 12) == "[redacted][r…"
    assert job.quoted("abc", [], 3) == "abc"


# --------------------------------------------------------------------------- LAPI's junk rows


def lapi_rows(rows: list[str]) -> int | str:
    """How many rows lapi_batches passes on from a list sent one row a chunk, or why it stops."""
    chunks = [b"[", *(f"{r}{',' if i < len(rows) - 1 else ''}".encode() for i, r in enumerate(rows)), b"]"]
    config = job.Config("a" * 32, "b" * 32, "t", lapi_url="http://lapi")
    try:
        return sum(map(len, job.lapi_batches(chunks, config)))
    except job.LapiUnreadable as e:
        return str(e)


def test_lapi_answering_mostly_junk_rows_is_unreadable_once_there_are_a_thousand():
    junk = ["1", "null", '"x"', "[]"] * 250  # 1,000 rows, none an object
    mostly = "LAPI answered with a list that is mostly not decisions: 1000 of its first {} rows are not JSON objects"
    assert lapi_rows(junk[:-1]) == 999  # too few to tell
    assert lapi_rows(junk) == mostly.format(1000)
    assert lapi_rows(["{}"] * 999 + junk) == mostly.format(1999)  # more than half
    assert lapi_rows(["{}"] * 1000 + junk) == 2000  # half: not more
    assert lapi_rows(["{}"] * 5 + junk[:10] + ["{}"] * 5) == 20


def failing_after(first: bytes, error: Exception):
    yield first
    raise error


@pytest.mark.parametrize(
    ("chunks", "says"),
    [
        ([b"[{}, {"], "LAPI answered with a body that is not a JSON list of decisions: "),
        (
            failing_after(b"[{}", job.TransportError("reset")),
            "LAPI at http://lapi broke off its answer part-way: reset",
        ),
        (
            failing_after(b"[{}", job.DeadlineExceeded("the run deadline passed")),
            "LAPI at http://lapi did not answer: the run deadline passed",
        ),
    ],
)
def test_lapi_breaking_off_or_sending_junk_is_unreadable_naming_why(chunks, says):
    config = job.Config("a" * 32, "b" * 32, "t", lapi_url="http://lapi")
    with pytest.raises(job.LapiUnreadable) as caught:
        list(job.lapi_batches(chunks, config))
    assert str(caught.value).startswith(says)
