"""The functional core: pure functions, data in and data out."""

from __future__ import annotations

import datetime
import ipaddress
import json
import time
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lapi_kv_sync as job

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


def test_metadata_fits_cloudflare_limit():
    wanted = job.Wanted("ban", NOW, "o" * 5000, "é" * 5000)
    metadata = job.metadata_of(wanted.remediation, wanted.origin, wanted.scenario)
    assert metadata["remediation"] == "ban"
    assert len(json.dumps(metadata).encode()) <= job.MAX_METADATA_BYTES
    assert metadata["scenario"].startswith("é")


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
        "ip:b": job.Present(NOW + 3600 - 61, "ban"),
        "ip:c": job.Present(None, "ban"),
    }
    plan = job.make_plan({k: wanted_of() for k in present}, present, NOW)
    assert plan.unchanged == ["ip:a"]
    assert [w.key for w in plan.writes] == ["ip:b", "ip:c"]


def test_short_decisions_get_cloudflare_minimum_ttl_and_are_not_rewritten():
    plan = job.make_plan({"ip:a": wanted_of(seconds=5)}, {}, NOW)
    assert plan.writes[0].ttl == job.MIN_TTL
    # written with TTL 60 when 5 s were left; a minute later the decision has 0.5 s left
    later = job.make_plan({"ip:a": wanted_of(seconds=5)}, {"ip:a": job.Present(NOW + 60, "ban")}, NOW + 4.5)
    assert later.writes == [] and later.unchanged == ["ip:a"]


def test_present_keys_reads_what_it_can_and_marks_the_rest_stale():
    page = [
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


def test_retry_after_in_seconds_or_http_date():
    assert job.retry_after_seconds("7", NOW) == 7
    assert job.retry_after_seconds("Fri, 15 Jan 2027 08:00:10 GMT", 1_800_000_000.0) == pytest.approx(
        1_800_000_000.0 - NOW + 0, abs=1e7
    )
    import email.utils

    date = email.utils.formatdate(NOW + 30, usegmt=True)
    assert job.retry_after_seconds(date, NOW) == pytest.approx(30)
    assert job.retry_after_seconds("soon", NOW) is None
    assert job.retry_after_seconds(None, NOW) is None


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
