"""Property: for any LAPI decisions and any starting KV, one run makes KV the projection of LAPI
plus the untouched foreign keys, and a second run writes and deletes nothing."""

from __future__ import annotations

import json
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lapi_kv_sync as job
from tests.conftest import CF_TOKEN, LAPI_KEY, Stack
from tests.standins import Entry, KvStandin, LapiStandin, PushgatewayStandin, go_duration

addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.ip_addresses(v=6).map(lambda a: a.exploded.upper()),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    st.sampled_from(["192.0.2.1", "::ffff:192.0.2.1", "2001:db8::1", "2001:0DB8::0001", "junk", "fe80::1%eth0"]),
)
table_values = st.one_of(  # what a Range, Country or AS decision may hold, valid or not
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(lambda n: f"{n[0]}/{n[1]}"),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 128)).map(lambda n: f"{n[0]}/{n[1]}"),
    st.sampled_from(["198.51.100.0/24", "198.51.100.7/24", "::ffff:192.0.2.0/120", "FR", "fr", "AS64500", "64500"]),
    st.sampled_from(["AS0", "AS4294967296", "FRA", "10.0.0.0/33", "junk"]),
)
decisions = st.lists(
    st.fixed_dictionaries(
        {
            "value": st.one_of(addresses, table_values),
            "seconds": st.one_of(
                st.integers(-120, 0), st.integers(1, 90), st.integers(91, 400_000), st.floats(0.001, 10**6)
            ),
            "type": st.sampled_from(["ban", "ban", "captcha", "throttle"]),
            "scope": st.sampled_from(["Ip", "Ip", "Ip", "Range", "Country", "AS"]),
        }
    ),
    max_size=60,
)
starting_kv = st.dictionaries(
    st.one_of(addresses.map(lambda a: "ip:" + a), st.text("abcxyz:/-", min_size=1, max_size=12), st.just("ip:scopes")),
    st.tuples(
        st.sampled_from(["ban", "captcha", "other", '{"v":1}']),
        st.one_of(st.none(), st.integers(120, 500_000)),
        st.sampled_from(
            [None, {"remediation": "ban"}, {"remediation": "captcha"}, {"x": 1}, {"table": 1, "digest": "0" * 32}]
        ),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(decisions, starting_kv)
def test_one_run_converges_and_a_second_is_free(rows, start):
    with LapiStandin(LAPI_KEY) as lapi, KvStandin(CF_TOKEN) as kv, PushgatewayStandin() as push:
        stack = Stack(lapi, kv, push)
        now = time.time()
        lapi.decisions = [
            # a fixed duration, so the test's projection sees exactly what the job read
            {
                "value": r["value"],
                "type": r["type"],
                "scope": r["scope"],
                "duration": go_duration(r["seconds"]),
                "origin": "o",
                "scenario": "s",
            }
            for r in rows
        ]
        for key, (value, ttl, metadata) in start.items():
            if isinstance(metadata, dict) and "remediation" in metadata:
                # A value other than its metadata's remediation is the one edit an audit does not
                # see, as documented (docs/operations.md, "What holds"): not a state this property covers.
                value = metadata["remediation"]
            if key.strip() and len(key.encode()) <= 512:
                kv.store[key] = Entry(value, None if ttl is None else int(now + ttl), metadata)
        foreign = {k: v for k, v in kv.snapshot().items() if not k.startswith("ip:")}

        first = stack.run(PUSHGATEWAY_URL="")
        assert first.code == 0, first.err
        projection = job.project(json.loads(lapi.body()), time.time(), "ip:", tables=True)
        live = kv.live()
        # The tables: the same entries and remediations as built here (ends a moment apart).
        scopes = job.scope_document(projection.scopes, None, 0.0, time.time(), job.Config.scope_table_max_bytes)
        if scopes.value:
            written, expected = job.scope_entries(live.pop("ip:scopes").value), job.scope_entries(scopes.value)
            assert written.keys() == expected.keys()
            for entry, ends in written.items():
                assert all((a == 0) == (b == 0) and abs(a - b) <= 5 for a, b in zip(ends, expected[entry], strict=True))
        networks = job.networks_document(projection.networks, None, 0.0, time.time(), job.Config.table_max_bytes)
        if networks.value:
            written, expected = map(
                job.interval_ends, (job.decode_networks(live.pop("ip:networks").value), networks.intervals)
            )
            assert written.keys() == expected.keys()
            for entry, ends in written.items():
                assert all((a == 0) == (b == 0) and abs(a - b) <= 5 for a, b in zip(ends, expected[entry], strict=True))
        assert "ip:scopes" not in live and "ip:networks" not in live
        ours = {k: e for k, e in live.items() if k.startswith("ip:")}
        assert {k: e.value for k, e in ours.items()} == {k: w.remediation for k, w in projection.wanted.items()}
        for key, entry in ours.items():
            assert abs(entry.expiration - max(projection.wanted[key].end, time.time() + 60)) <= 65
            assert entry.metadata == {"remediation": entry.value, "origin": "o", "scenario": "s"}
        assert {k: v for k, v in kv.snapshot().items() if not k.startswith("ip:")} == foreign

        kv.reset_counts()
        second = stack.run(PUSHGATEWAY_URL="")
        assert second.code == 0, second.err
        assert (kv.writes, kv.deletes) == (0, 0)
        assert kv.violations == []
