"""The scope table: Range, Country and AS decisions in one document, `<KV_KEY_PREFIX>scopes`.

The projection and the document as pure functions, against straightforward versions; then whole
runs against the stand-ins: written only when its content changes, planned from the listing or
the state record, deleted when empty, capped (`table_full`), off with SCOPE_TABLE=false."""

from __future__ import annotations

import gzip
import hashlib
import ipaddress
import json
import math
import time
from collections import Counter

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import lapi_kv_sync as job
from tests.standins import Entry, Fault, decision, go_duration

NOW = 1_800_000_000.0
PREFIXED = "crowdsec_kv_sync_"


def row(value, seconds=3600.0, type="ban", scope="Range", origin="crowdsec"):
    return {"value": value, "type": type, "scope": scope, "duration": go_duration(seconds), "origin": origin}


def table_of(rows, max_bytes=job.Config.scope_table_max_bytes, read_at=NOW):
    return job.scope_table(job.project(rows, read_at, "ip:", scope_table=True).table, max_bytes)


# --------------------------------------------------------------------------- the format, by example


def test_the_document_is_canonical_json_as_the_readme_shows_it():
    at = 1_795_611_000.0  # ends are rounded up to the hour: 1795615200 is the next one after at + 1h
    rows = [
        row("192.0.2.77/24", 3600),  # host bits cleared
        row("2001:0DB8::/32", 3600 + 3600, "captcha"),
        row("fr", 3600, "captcha", "Country"),
        row("AS64500", 3600, scope="AS"),
        row("64500", 60, "captcha", "AS"),  # the same AS: ban beats captcha, the longest end wins
    ]
    table = table_of(rows, read_at=at)
    assert table.document == (
        b'{"as":{"64500":["ban",1795615200]},"country":{"FR":["captcha",1795615200]},'
        b'"range":{"192.0.2.0/24":["ban",1795615200],"2001:db8::/32":["captcha",1795618800]},"v":1}'
    )
    assert table.end == 1795618800 and table.full == 0
    assert table.metadata == {"table": 1, "digest": table.digest, "entries": 4}
    assert table.digest == hashlib.sha256(table.document).hexdigest()[:32]
    assert table.entries == Counter(
        {("range", "ban"): 1, ("range", "captcha"): 1, ("country", "captcha"): 1, ("as", "ban"): 1}
    )


@pytest.mark.parametrize(
    ("scope", "value", "entry"),
    [
        ("range", "192.0.2.1", "192.0.2.1/32"),
        ("range", "192.0.2.0/255.255.255.0", "192.0.2.0/24"),
        ("range", "192.0.2.0/24", "192.0.2.0/24"),
        ("range", "10.0.0.1/31", "10.0.0.0/31"),  # host bits set, down to the lowest
        ("range", "192.0.2.255/25", "192.0.2.128/25"),
        ("range", "10.1.2.3/8", "10.0.0.0/8"),
        ("range", "10.1.2.3/32", "10.1.2.3/32"),
        ("range", "::ffff:192.0.2.0/120", "192.0.2.0/24"),
        ("range", "::ffff:10.0.0.0/104", "10.0.0.0/8"),  # the broadest IPv4 range taken
        ("range", "::ffff:0:0/95", "::fffe:0:0/95"),  # wider than the mapped block: stays IPv6
        ("range", "2001::/16", "2001::/16"),  # the broadest IPv6 range taken
        ("range", "2001:0DB8:0000::/48", "2001:db8::/48"),
        ("country", "fr", "FR"),
        ("country", "Fr", "FR"),
        ("as", "AS64500", "64500"),
        ("as", "as64500", "64500"),
        ("as", "064500", "64500"),
        ("as", "4294967295", "4294967295"),
    ],
)
def test_values_are_made_canonical(scope, value, entry):
    assert job.table_entry(scope, value) == (scope, entry)


@pytest.mark.parametrize(
    ("scope", "value"),
    [
        ("range", "fe80::/64%eth0"),
        ("range", "fe80::%eth0/64"),
        ("range", "10.0.0.0/33"),
        ("range", "junk"),
        ("range", 167772160),  # ip_network would take an int: LAPI's value is a string
        ("range", ["10.0.0.0/8"]),
        ("country", "FRA"),
        ("country", "F1"),
        ("country", "ÉÉ"),
        ("country", ""),
        ("as", "AS0"),
        ("as", "4294967296"),
        ("as", "AS-1"),
        ("as", "AS 64500"),
        ("as", "६४५००"),  # digits, but not ASCII ones
        ("as", 64500),
    ],
)
def test_values_that_are_not_of_their_scope_are_invalid(scope, value):
    with pytest.raises(ValueError):
        job.table_entry(scope, value)
    assert job.project([row(value, scope=scope)], NOW, "ip:", scope_table=True).ignored == Counter(invalid=1)


@pytest.mark.parametrize(
    "value", ["0.0.0.0/0", "::/0", "::ffff:0:0/96", "128.0.0.0/1", "10.0.0.0/7", "10.1.2.3/7", "2000::/15"]
)
def test_a_range_that_would_block_everyone_or_near_is_left_out(value):
    """One decision on 0.0.0.0/0 (or a mask typed short) must not ban every visitor at the edge."""
    with pytest.raises(job.TooBroad):
        job.table_entry("range", value)
    projection = job.project([row(value), row("192.0.2.0/24")], NOW, "ip:", scope_table=True)
    assert projection.ignored == Counter(range_too_large=1)
    assert list(projection.table) == [("range", "192.0.2.0/24")]


def test_the_cap_keeps_bans_first_then_the_longest_ends():
    rows = [row(f"10.{i}.0.0/16", 3600 * (1 + i % 7), "captcha" if i % 3 else "ban") for i in range(100)]
    whole = table_of(rows)
    capped = table_of(rows, max_bytes=1024)
    assert len(capped.document) <= 1024 < len(whole.document)
    assert capped.full == 100 - len(capped.kept) > 0
    kept = json.loads(capped.document)["range"]
    left_out = {name: value for name, value in json.loads(whole.document)["range"].items() if name not in kept}
    weakest_kept = min((job.REMEDIATION_RANK[r], end) for r, end in kept.values())
    assert all((job.REMEDIATION_RANK[r], end) <= weakest_kept for r, end in left_out.values())
    assert {r for r, _ in kept.values()} == {"ban"}  # 34 bans, more than fit


def test_under_the_cap_equal_entries_are_kept_by_scope_then_name_whatever_their_order():
    def kept(*entries):
        wanted = {entry: job.Wanted("ban", NOW + 3600, "", "") for entry in entries}
        one = job.scope_table(dict([next(iter(sorted(wanted.items())))]), 1 << 20)  # the first in order, alone
        return job.scope_table(wanted, len(one.document)).kept

    assert kept(("range", "10.0.0.0/8"), ("as", "64500")) == [("as", "64500")]  # `as` before `range`
    assert kept(("range", "10.2.0.0/16"), ("range", "10.1.0.0/16")) == [("range", "10.1.0.0/16")]


def test_the_cap_is_counted_to_the_byte():
    rows = [row("198.51.100.0/24"), row("10.0.0.0/8", 7200, "captcha"), row("FR", scope="Country")]
    rows += [row("DE", scope="Country"), row("AS64500", scope="AS"), row("AS64501", 600, "captcha", scope="AS")]
    whole = table_of(rows)
    # Bans first, then the longest ends, then by scope and name.
    assert whole.kept == [
        ("as", "64500"),
        ("country", "DE"),
        ("country", "FR"),
        ("range", "198.51.100.0/24"),
        ("range", "10.0.0.0/8"),
        ("as", "64501"),
    ]
    assert table_of(rows, max_bytes=len(whole.document)) == whole  # exactly its length: every entry fits
    less = table_of(rows, max_bytes=len(whole.document) - 1)  # a byte less: the weakest entry is left out
    assert (less.full, less.kept) == (1, whole.kept[:-1]) and len(less.document) < len(whole.document)


def test_no_entries_no_document():
    table = table_of(
        [row("192.0.2.1", scope="Ip"), row("FR", -1, scope="Country"), row("AS1", type="throttle", scope="AS")]
    )
    assert table == job.ScopeTable(b"", "", 0.0, Counter(), 0, [])
    assert job.scope_table({}, 0) == table and table_of([row("10.0.0.0/8")], max_bytes=0).full == 1


# --------------------------------------------------------------------------- against a straightforward version


def plain_entry(scope, value):
    """A Range, Country or AS decision's value made canonical the obvious way; ValueError if it is not one."""
    try:
        if scope == "range":
            assert "%" not in value
            network = ipaddress.ip_network(value, strict=False)
            if network.version == 6 and network.network_address.ipv4_mapped is not None and network.prefixlen >= 96:
                mapped = network.network_address.ipv4_mapped
                network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
            if network.prefixlen < (8 if network.version == 4 else 16):
                raise job.TooBroad(value)
            return str(network)
        if scope == "country":
            assert len(value) == 2 and all(c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" for c in value)
            return value.upper()
        digits = value[2:] if value[:2].lower() == "as" else value
        assert 1 <= len(digits) <= 10 and all(c in "0123456789" for c in digits)
        assert 0 < int(digits) < 2**32
        return str(int(digits))
    except (AssertionError, TypeError) as e:
        raise ValueError(value) from e


def plain_table(rows, read_at, max_bytes):
    """The scope table written the obvious way: each decision checked, made canonical and merged
    in turn; then entries added strongest first while the whole document still fits."""
    merged, ignored = {}, Counter()
    for r in rows:
        scope, remediation = str(r["scope"]).lower(), str(r["type"]).lower()
        if scope not in ("range", "country", "as"):
            continue
        if remediation not in ("ban", "captcha"):
            ignored["type"] += 1
            continue
        remaining = job.parse_go_duration(r["duration"])
        if remaining <= 0:
            ignored["expired"] += 1
            continue
        try:
            name = plain_entry(scope, r["value"])
        except job.TooBroad:
            ignored["range_too_large"] += 1
            continue
        except ValueError:
            ignored["invalid"] += 1
            continue
        end = read_at + remaining
        old = merged.get((scope, name))
        if old is None:
            merged[scope, name] = (remediation, end)
        else:
            strongest = "ban" if "ban" in (remediation, old[0]) else "captcha"
            merged[scope, name] = (strongest, max(end, old[1]))
    rounded = {k: (r, math.ceil(end / 3600) * 3600) for k, (r, end) in merged.items()}
    order = sorted(rounded, key=lambda k: (rounded[k][0] != "ban", -rounded[k][1], k))
    document, kept = {"v": 1}, 0
    for scope, name in order:
        trial = json.loads(json.dumps(document))
        trial.setdefault(scope, {})[name] = list(rounded[scope, name])
        text = json.dumps(trial, sort_keys=True, separators=(",", ":"))
        if len(text) > max_bytes:
            break
        document, kept = trial, kept + 1
    text = json.dumps(document, sort_keys=True, separators=(",", ":")) if kept else ""
    return text, len(order) - kept, ignored


networks = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(lambda n: f"{n[0]}/{n[1]}"),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 128)).map(lambda n: f"{n[0]}/{n[1]}"),
    st.tuples(st.ip_addresses(v=4), st.integers(96, 128)).map(lambda n: f"::ffff:{n[0]}/{n[1]}"),
    st.ip_addresses().map(str),
)
values = {
    "Range": st.one_of(networks, st.sampled_from(["10.0.0.0/33", "fe80::%1/64", "junk", "1.2.3.4/", ""])),
    "Country": st.one_of(st.text(min_size=0, max_size=3), st.sampled_from(["FR", "fr", "dE", "US"])),
    "AS": st.one_of(
        st.integers(-1, 2**32 + 1).map(str),
        st.integers(0, 2**32).map(lambda n: f"AS{n}"),
        st.integers(0, 99).map(lambda n: f"as{n:05d}"),
        st.text(max_size=12),
    ),
}
table_rows = st.lists(
    st.sampled_from(sorted(values)).flatmap(
        lambda scope: st.fixed_dictionaries(
            {
                "scope": st.sampled_from([scope, scope.lower(), scope.upper()]),
                "value": values[scope],
                "type": st.sampled_from(["ban", "captcha", "Ban", "throttle"]),
                "duration": st.one_of(
                    st.integers(-100, 10**7).map(go_duration), st.floats(0.001, 10**6).map(go_duration)
                ),
                "origin": st.just("crowdsec"),
            }
        )
    ),
    max_size=40,
)


@given(table_rows, st.integers(60, 4000), st.floats(NOW - 10**6, NOW + 10**6))
def test_the_table_equals_the_straightforward_one(rows, max_bytes, read_at):
    projection = job.project(iter(rows), read_at, "ip:", scope_table=True)
    table = job.scope_table(projection.table, max_bytes)
    document, full, ignored = plain_table(rows, read_at, max_bytes)
    assert table.document.decode() == document
    assert table.full == full and len(table.document) <= max_bytes
    assert +projection.ignored == +ignored
    assert projection.wanted == {}  # no address keys come of these without EXPAND_RANGES_MAX
    if document:
        assert table.end == max(
            end for scope in job.TABLE_SCOPES for _, end in json.loads(document).get(scope, {}).values()
        )
        assert sum(table.entries.values()) == len(table.kept) == table.metadata["entries"]


@given(table_rows, st.floats(0, 5))
def test_the_document_does_not_change_as_time_passes(rows, later):
    # Read `later` seconds on, LAPI's remaining durations are that much shorter: the same ends,
    # give or take the float arithmetic, and the same document unless an end sits on an hour.
    rows = [r for r in rows if job.parse_go_duration(r["duration"]) > 0]  # (one that ended in between: not here)
    earlier = [{**r, "duration": go_duration(job.parse_go_duration(r["duration"]) + later)} for r in rows]
    now = job.project(rows, NOW + later, "ip:", scope_table=True).table
    assume(all(min(w.end % 3600, 3600 - w.end % 3600) > 1e-3 for w in now.values()))
    before = job.project(earlier, NOW, "ip:", scope_table=True).table
    assert job.scope_table(before, 10**6).document == job.scope_table(now, 10**6).document


def test_without_the_table_those_scopes_are_left_out_as_before():
    rows = [row("198.51.100.0/24"), row("FR", scope="Country"), row("AS64500", scope="AS")]
    projection = job.project(rows, NOW, "ip:")
    assert projection.table == {} and projection.ignored == Counter(scope=3)


# --------------------------------------------------------------------------- the plan and the record


def test_the_plan_compares_the_digest_and_deletes_an_empty_table():
    table = table_of([row("198.51.100.0/24"), row("FR", scope="Country")])
    key = "ip:scopes"
    present = {key: job.Present(table.end, table.digest)}
    wanted: dict[str, job.Wanted] = {}
    plan, action = job.make_plan_with_table(wanted, key, table, present, NOW, 0.0)
    assert (plan.writes, plan.deletes, plan.unchanged, action) == ([], [], [key], "unchanged")
    assert wanted == {}  # the table's key was only lent to the plan
    plan, action = job.make_plan_with_table({}, key, table, {key: job.Present(table.end, "0" * 32)}, NOW, 0.0)
    # The digest stands for the remediation; no origin or scenario (the key's metadata is the table's own).
    assert plan.writes == [job.Write(key, table.digest, math.ceil(table.end - NOW), "", "")] and action == "written"
    # Its expiration as KV's clock says, `offset` ahead of ours: the same end.
    ahead = {key: job.Present(table.end + 7200, table.digest)}
    assert job.make_plan_with_table({}, key, table, ahead, NOW, 7200.0)[1] == "unchanged"
    assert job.make_plan_with_table({}, key, table, ahead, NOW, 0.0)[1] == "written"
    plan, action = job.make_plan_with_table({}, key, table_of([]), present, NOW, 0.0)
    assert (plan.deletes, action) == ([key], "deleted")
    assert job.make_plan_with_table({}, key, table_of([]), {}, NOW, 0.0)[1] is None


def test_the_listing_reads_the_digest_only_from_the_table_key():
    digest = "0123456789abcdef" * 2
    page = [
        {"name": "ip:scopes", "expiration": 1, "metadata": {"table": 1, "digest": digest, "entries": 2}},
        {"name": "ip:192.0.2.1", "metadata": {"table": 1, "digest": digest}},
    ]
    assert job.present_keys(page, "ip:") == {
        "ip:scopes": job.Present(1, digest),
        "ip:192.0.2.1": job.Present(None, None),
    }
    for metadata in (
        {"table": True, "digest": digest},
        {"table": 2, "digest": digest},
        {"table": 1, "digest": "x"},
        "x",
    ):
        assert job.present_keys([{"name": "ip:scopes", "metadata": metadata}], "ip:")["ip:scopes"].remediation is None


def test_the_tables_bulk_item_carries_its_document_and_digest_and_other_keys_their_own():
    table = table_of([row("198.51.100.0/24"), row("FR", scope="Country", type="captcha")])
    item = job.table_item("ip:scopes", table)
    assert item(job.Write("ip:scopes", table.digest, 7200, "", "")) == {
        "key": "ip:scopes",
        "value": table.document.decode(),
        "expiration_ttl": 7200,
        "metadata": {"table": 1, "digest": table.digest, "entries": 2},
    }
    address = job.Write("ip:192.0.2.1", "ban", 60, "crowdsec", "ssh-bf")
    assert item(address) == job.bulk_item(address)


def test_the_tables_digest_is_read_only_from_metadata_of_its_format():
    digest = "0123456789abcdef" * 2
    assert job.table_digest({"table": 1, "digest": digest}) == digest
    for metadata in [
        None,
        [],
        {"digest": digest},
        {"table": 1.0, "digest": digest},
        {"table": 2, "digest": digest},
        {"table": 1},
        {"table": 1, "digest": digest.upper()},
        {"table": 1, "digest": digest + "0"},
        {"table": 1, "digest": digest[:-1]},
        {"table": 1, "digest": list(digest)},
    ]:
        assert job.table_digest(metadata) is None


def test_an_entrys_end_is_rounded_up_to_the_hour_and_entries_are_named_scope_remediation():
    assert [job.table_end(e) for e in (0, 1, 3599.5, 3600, 3600.001)] == [0, 3600, 3600, 3600, 7200]
    assert job.entries_by_name(Counter({("range", "ban"): 2, ("as", "captcha"): 1})) == {
        "range:ban": 2,
        "as:captcha": 1,
    }


def test_the_record_keeps_the_table_in_its_header_and_reads_an_older_record():
    digest = "ab" * 16
    keys = {"ip:192.0.2.1": job.Present(NOW + 60, "ban"), "ip:scopes": job.Present(NOW + 7200, digest)}
    record = job.Record("a", "n", "ip:", NOW, 0.0, None, keys)
    lines = list(job.encode_record(record, NOW))
    header = json.loads(lines[0])
    assert header["table"] == [digest, int(NOW + 7200)] and header["keys"] == 1
    assert "scopes" not in lines[1]
    assert job.decode_record(lines).keys == keys
    del header["table"]  # a record written before the scope table: no table key in KV then
    assert job.decode_record([json.dumps(header), *lines[1:]]).keys == {"ip:192.0.2.1": keys["ip:192.0.2.1"]}
    for junk in (["x", 1], [digest], [digest, 1.5], 5, {"digest": digest}):
        with pytest.raises(job.RecordCorrupt):
            job.decode_record([json.dumps({**header, "table": junk}), *lines[1:]])
    projected = {"wanted": 1, "by_remediation": {"ban": 1}, "ignored": {}, "table": {"range:ban": 2}}
    header = {**header, "lapi_digest": "d", "projected": projected}
    assert job.decode_record([json.dumps(header), *lines[1:]]).projected.table == {"range:ban": 2}
    for junk in ({"range": 2}, {"ip:ban": 1}, {"range:throttle": 1}, {"range:ban": "x"}, []):
        with pytest.raises(job.RecordCorrupt):  # the shortcut reports these figures: no junk in them
            job.decode_record([json.dumps({**header, "projected": {**projected, "table": junk}}), *lines[1:]])


# --------------------------------------------------------------------------- whole runs


def table_decisions(n: int = 3) -> list[dict]:
    return [decision(f"198.51.{i}.0/24", 3600 * (1 + i % 3), scope="Range") for i in range(n)] + [
        decision("FR", 7200, "captcha", scope="Country"),
        decision("AS64500", scope="AS"),
    ]


def written_table(kv) -> dict:
    return json.loads(kv.live()["ip:scopes"].value)


def test_a_run_writes_the_table_and_a_second_writes_nothing(stack):
    stack.lapi.decisions = [decision("192.0.2.1"), *table_decisions()]
    first = stack.run()
    assert first.code == 0, first.err
    assert stack.kv.writes == 2 and "written 1," in first.out
    entry = stack.kv.live()["ip:scopes"]
    table = json.loads(entry.value)
    assert set(table) == {"v", "range", "country", "as"} and table["country"]["FR"][0] == "captcha"
    assert table["as"] == {"64500": ["ban", table["as"]["64500"][1]]} and table["as"]["64500"][1] % 3600 == 0
    latest = max(end for scope in job.TABLE_SCOPES for _, end in table[scope].values())
    assert 0 <= entry.expiration - latest <= 5  # a TTL from the plan's time, applied a moment later
    assert entry.metadata == {"table": 1, "digest": entry.metadata["digest"], "entries": 5}
    assert "scope table written (5 entries: range 3, country 1, as 1;" in first.out
    assert stack.push.value(PREFIXED + "decisions") == 1  # address keys only
    assert stack.push.value(PREFIXED + "table_entries", 'scope="range",remediation="ban"') == 3
    assert stack.push.value(PREFIXED + "table_bytes") == len(entry.value)
    stack.kv.reset_counts()
    second = stack.run()
    assert second.code == 0, second.err
    assert (stack.kv.writes, stack.kv.deletes) == (0, 0) and dict(stack.kv.requests) == {"list": 1}
    assert "written 0, deleted 0, unchanged 1," in second.out and "scope table unchanged" in second.out


def test_time_passing_rewrites_nothing(stack):
    # Half an hour later: LAPI's durations are half an hour shorter, the job's clock half an hour on.
    stack.lapi.decisions = table_decisions(20)
    assert stack.run().code == 0
    before = stack.kv.snapshot()
    for d in stack.lapi.decisions:
        d["until"] -= 1800
    stack.kv.reset_counts()
    stack.kv.clock_offset = 1800
    later = stack.run(clock_offset=1800)
    assert later.code == 0, later.err
    assert (stack.kv.writes, stack.kv.deletes) == (0, 0)
    assert stack.kv.snapshot() == before


def test_a_churn_in_range_decisions_rewrites_one_key(stack, tmp_path):
    state = str(tmp_path / "record.gz")
    stack.lapi.decisions = [decision(f"10.0.{i}.1") for i in range(50)] + table_decisions(100)
    assert stack.run(STATE_FILE=state).code == 0
    stack.kv.reset_counts()
    steady = stack.run(STATE_FILE=state)
    assert steady.code == 0 and dict(stack.kv.requests) == {}  # the shortcut: LAPI's answer unchanged
    del stack.lapi.decisions[50:55]  # five ranges lifted
    stack.lapi.decisions += [decision(f"203.0.{i}.0/24", scope="Range", type="captcha") for i in range(5)]
    stack.lapi.decisions[60]["type"] = "captcha"  # one changed
    stack.kv.reset_counts()
    churn = stack.run(STATE_FILE=state)
    assert churn.code == 0, churn.err
    assert stack.kv.written_keys == ["ip:scopes"] and stack.kv.deletes == 0
    assert dict(stack.kv.requests) == {"bulk_put": 1}
    assert "written 0, deleted 0, unchanged 50," in churn.out and "scope table written (102 entries" in churn.out
    ranges = written_table(stack.kv)["range"]
    assert len(ranges) == 100 and ranges["203.0.4.0/24"][0] == "captcha"
    stack.kv.reset_counts()
    audit = stack.run("--audit", STATE_FILE=state)  # the record said what KV holds
    assert audit.code == 0 and (stack.kv.writes, stack.kv.deletes) == (0, 0)


def test_a_steady_run_with_a_record_makes_no_request_even_when_lapi_changed_elsewhere(stack, tmp_path):
    state = str(tmp_path / "record.gz")
    stack.lapi.decisions = [decision("192.0.2.1"), *table_decisions()]
    assert stack.run(STATE_FILE=state).code == 0
    stack.lapi.decisions.append(decision("192.0.2.2"))  # another answer: planned against the record
    stack.kv.reset_counts()
    changed = stack.run(STATE_FILE=state)
    assert changed.code == 0 and stack.kv.written_keys == ["ip:192.0.2.2"]
    assert "scope table unchanged" in changed.out
    stack.kv.reset_counts()
    for _ in range(2):
        again = stack.run(STATE_FILE=state)
        assert again.code == 0 and dict(stack.kv.requests) == {}
        assert "scope table unchanged (5 entries: range 3, country 1, as 1;" in again.out


def test_an_emptied_table_is_deleted_and_a_table_changed_behind_the_job_is_put_right(stack):
    stack.lapi.decisions = [decision("192.0.2.1"), *table_decisions()]
    assert stack.run().code == 0
    good = stack.kv.live()["ip:scopes"]
    stack.kv.store["ip:scopes"] = Entry('{"v":1}', good.expiration, good.metadata)  # same metadata, other value:
    stack.kv.reset_counts()  # the plan trusts the digest, as it trusts a key's remediation
    assert stack.run().code == 0 and stack.kv.writes == 0
    stack.kv.store["ip:scopes"] = Entry("{}", good.expiration, {"x": 1})  # not ours: rewritten
    assert stack.run().code == 0 and stack.kv.written_keys == ["ip:scopes"]
    assert stack.kv.live()["ip:scopes"].value == good.value
    stack.lapi.decisions = [decision("192.0.2.1")]
    stack.kv.reset_counts()
    emptied = stack.run()
    assert emptied.code == 0 and stack.kv.deleted_keys == ["ip:scopes"] and stack.kv.writes == 0
    assert "deleted 0," in emptied.out and "scope table deleted (0 entries" in emptied.out
    stack.kv.reset_counts()
    none = stack.run()
    assert none.code == 0 and (stack.kv.writes, stack.kv.deletes) == (0, 0) and "scope table" not in none.out


def test_table_full_writes_what_fits_and_says_so(stack):
    stack.lapi.decisions = [decision(f"10.{i}.0.0/16", 3600 * (1 + i % 5), scope="Range") for i in range(200)]
    stack.lapi.decisions += [decision("FR", scope="Country", type="captcha")]
    result = stack.run(SCOPE_TABLE_MAX_BYTES="2048")
    assert result.code == 0, result.err
    document = stack.kv.live()["ip:scopes"].value
    assert len(document) <= 2048 and "country" not in json.loads(document)  # bans first
    kept = len(json.loads(document)["range"])
    assert f"{201 - kept} entries left out (table_full), past SCOPE_TABLE_MAX_BYTES=2048" in result.err
    assert f"table_full {201 - kept})" in result.out
    assert stack.push.value(PREFIXED + "ignored", 'reason="table_full"') == 201 - kept
    stack.kv.reset_counts()
    assert stack.run(SCOPE_TABLE_MAX_BYTES="2048").code == 0 and stack.kv.writes == 0  # the same cut each run


def test_scope_table_false_is_the_original_behaviour_and_deletes_the_table(stack):
    stack.lapi.decisions = [decision("192.0.2.1"), *table_decisions()]
    assert stack.run().code == 0 and "ip:scopes" in stack.kv.live()
    stack.kv.reset_counts()
    off = stack.run(SCOPE_TABLE="false")
    assert off.code == 0, off.err
    assert stack.lapi.queries[-1] == {"scopes": ["ip"]}
    assert stack.kv.deleted_keys == ["ip:scopes"] and set(stack.kv.live()) == {"ip:192.0.2.1"}
    assert "scope 5" in off.out and "scope table deleted" in off.out
    stack.kv.reset_counts()
    again = stack.run(SCOPE_TABLE="false")
    assert again.code == 0 and (stack.kv.writes, stack.kv.deletes) == (0, 0) and "scope table" not in again.out


def test_a_dry_run_shows_the_table_and_writes_nothing(stack):
    stack.lapi.decisions = [decision("192.0.2.1"), *table_decisions()]
    dry = stack.run("--dry-run")
    assert dry.code == 0 and stack.kv.writes == 0
    assert "dry run: write 2: ip:192.0.2.1 (ban) ip:scopes (scope table)" in dry.out
    (line,) = [line for line in dry.out.splitlines() if "dry run: scope table" in line]
    assert line.startswith("lapi-kv-sync: dry run: scope table write (5 entries: range 3, country 1, as 1;")
    assert "range:198.51.0.0/24" in line and "country:FR" in line and "as:64500" in line


def test_usage_metrics_count_each_range_once(stack):
    from tests.test_usage import at_quarter, sent_items

    stack.lapi.decisions = [
        decision("192.0.2.1"),
        decision("198.51.100.0/24", scope="Range", origin="cscli"),
        decision("2001:db8::/32", scope="Range", origin="cscli"),
        decision("FR", scope="Country"),  # a country has no IP type: not in active_decisions
    ]
    assert stack.run(clock_offset=at_quarter(5), LAPI_USAGE_METRICS="true").code == 0
    (body,) = stack.lapi.usage_metrics
    assert sent_items(body) == {("crowdsec", "ipv4"): 1, ("cscli", "ipv4"): 1, ("cscli", "ipv6"): 1}


def test_the_record_holds_the_table_as_kv_does(stack, tmp_path):
    state = tmp_path / "record.gz"
    stack.lapi.decisions = [decision("192.0.2.1"), *table_decisions()]
    assert stack.run(STATE_FILE=str(state)).code == 0
    with gzip.open(state, "rt") as f:
        record = job.decode_record(f)
    live = stack.kv.live()["ip:scopes"]
    assert record.keys["ip:scopes"].remediation == live.metadata["digest"]
    assert live.expiration - 5 <= record.keys["ip:scopes"].expiration <= live.expiration
    assert record.projected.table == {"range:ban": 3, "country:captcha": 1, "as:ban": 1}
    assert time.time() < record.keys["ip:scopes"].expiration


def test_a_failed_write_is_not_reported_as_written(stack):
    stack.lapi.decisions = table_decisions()
    stack.kv.faults.append(Fault("5xx", "bulk_put", status=400, times=-1))
    failed = stack.run()
    assert failed.code == job.EXIT_CLOUDFLARE
    assert "run FAILED (exit 1)" in failed.err and "scope table to write (5 entries" in failed.err
    assert "ip:scopes" not in stack.kv.live()


def test_the_shortcut_is_not_taken_when_the_table_settings_change(stack, tmp_path):
    state = str(tmp_path / "record.gz")
    stack.lapi.decisions = table_decisions(30)
    assert stack.run(STATE_FILE=state).code == 0
    assert "LAPI's answer unchanged" in stack.run(STATE_FILE=state).out
    capped = stack.run(STATE_FILE=state, SCOPE_TABLE_MAX_BYTES="1024")
    assert capped.code == 0 and "LAPI's answer unchanged" not in capped.out and "table_full" in capped.err
    off = stack.run(STATE_FILE=state, SCOPE_TABLE="false")
    assert off.code == 0 and "LAPI's answer unchanged" not in off.out and "scope table deleted" in off.out


def test_the_settings_are_checked():
    env = {"CF_ACCOUNT_ID": "a" * 32, "CF_KV_NAMESPACE_ID": "b" * 32, "CF_API_TOKEN": "t" * 40, "LAPI_KEY": "k" * 32}
    config = job.load_config(env)
    assert (config.scope_table, config.scope_table_max_bytes) == (True, 4 * 1024 * 1024)
    config = job.load_config({**env, "SCOPE_TABLE": "FALSE", "SCOPE_TABLE_MAX_BYTES": str(20 * 1024 * 1024)})
    assert (config.scope_table, config.scope_table_max_bytes) == (False, 20 * 1024 * 1024)
    assert job.lapi_query(config) == "scopes=ip"
    with pytest.raises(job.ConfigError) as refused:
        job.load_config({**env, "SCOPE_TABLE": "no", "SCOPE_TABLE_MAX_BYTES": str(20 * 1024 * 1024 + 1)})
    assert refused.value.problems == [
        "SCOPE_TABLE must be true or false, got 'no'",
        "SCOPE_TABLE_MAX_BYTES must be at most 20971520 (20 MiB), got 20971521",
    ]
    with pytest.raises(job.ConfigError, match="SCOPE_TABLE_MAX_BYTES must be a whole number >= 1024"):
        job.load_config({**env, "SCOPE_TABLE_MAX_BYTES": "1000"})
