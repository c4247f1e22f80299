"""The tables under the prefix: the scope table (`<KV_KEY_PREFIX>scopes`: Country and AS, JSON) and
the network table (`<KV_KEY_PREFIX>networks`: every Range, and the Ip decisions of TABLE_ORIGINS,
binary).

The projection and both documents as pure functions, against straightforward versions; when a
table KV holds may stand (ends moved later, time passing, a millisecond's jitter) and when it must
be rewritten; then whole runs against the stand-ins: written only when what they enforce changes,
planned from the listing or the state record, deleted when empty, capped (`table_full`), keys the
network table now holds left to expire, off with SCOPE_TABLE=false."""

from __future__ import annotations

import base64
import gzip
import hashlib
import ipaddress
import json
import math
import time
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lapi_kv_sync as job
from tests.standins import Entry, Fault, decision, go_duration

NOW = 1_800_000_000.0
PREFIXED = "crowdsec_kv_sync_"
LATER = 7 * 86400  # a week: comfortably more than REFRESH_AHEAD


def row(value, seconds=3600.0, type="ban", scope="Range", origin="crowdsec"):
    return {"value": value, "type": type, "scope": scope, "duration": go_duration(seconds), "origin": origin}


def projected(rows, read_at=NOW, table_origins=frozenset()):
    return job.project(rows, read_at, "ip:", tables=True, table_origins=table_origins)


def scopes_of(rows, max_bytes=job.Config.scope_table_max_bytes, read_at=NOW, stored=None, kv_now=None):
    kv_now = read_at if kv_now is None else kv_now
    return job.scope_document(projected(rows, read_at).scopes, stored, 0.0, kv_now, max_bytes)


def networks_of(rows, max_bytes=job.Config.table_max_bytes, read_at=NOW, stored=None, kv_now=None, origins=()):
    kv_now = read_at if kv_now is None else kv_now
    entries = projected(rows, read_at, frozenset(origins)).networks
    return job.networks_document(entries, stored, 0.0, kv_now, max_bytes)


def v4(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


# --------------------------------------------------------------------------- the formats, by example


def test_the_scope_table_is_canonical_json_as_the_docs_show_it():
    rows = [
        row("fr", 3600, "captcha", "Country"),
        row("AS64500", 3600, scope="AS"),
        row("64500", 60, "captcha", "AS"),  # the same AS: ban beats captcha, the longest end wins
        row("192.0.2.0/24", 3600),  # a Range: the network table's, not this one's
    ]
    table = scopes_of(rows, read_at=1_795_611_600.4)
    # Ends are whole seconds, rounded up, on Cloudflare's clock (here the offset is 0).
    assert table.value == b'{"as":{"64500":["ban",1795615201]},"country":{"FR":["captcha",1795615201]},"v":1}'
    assert table.end == 1795615201 and table.full == 0 and table.due_at == math.inf
    assert table.metadata == {"table": 1, "digest": table.digest, "entries": 2}
    assert table.digest == hashlib.sha256(table.value).hexdigest()[:32]
    assert table.entries == Counter({("country", "captcha"): 1, ("as", "ban"): 1})


def test_the_network_table_is_the_documented_binary_layout():
    rows = [
        row("192.0.2.77/24", 3600),  # host bits cleared
        row("192.0.2.128/25", 7200, "captcha"),  # nested: splits the /24
        row("2001:0DB8::/32", 600, "captcha"),
        row("::ffff:198.51.100.0/120", 60),  # an IPv4-mapped network is the IPv4 one
    ]
    table = networks_of(rows, read_at=NOW)
    n4, n6 = 3, 1
    assert len(table.value) == 16 + 16 * n4 + 40 * n6
    assert table.value[:16] == b"LKVN" + (1).to_bytes(2, "little") + bytes(2) + n4.to_bytes(4, "little") + (
        n6
    ).to_bytes(4, "little")

    def words(offset, count):
        return [int.from_bytes(table.value[offset + 4 * i : offset + 4 * i + 4], "little") for i in range(count)]

    end = int(NOW)
    assert words(16, 3) == [v4("192.0.2.0"), v4("192.0.2.128"), v4("198.51.100.0")]  # first
    assert words(16 + 12, 3) == [v4("192.0.2.127"), v4("192.0.2.255"), v4("198.51.100.255")]  # last
    assert words(16 + 24, 3) == [end + 3600, end + 3600, end + 60]  # ban
    assert words(16 + 36, 3) == [0, end + 7200, 0]  # captcha
    base = 16 + 16 * n4
    assert words(base, 4) == [0x20010DB8, 0, 0, 0]  # first, most significant word first
    assert words(base + 16, 4) == [0x20010DB8, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF]  # last
    assert words(base + 32, 2) == [0, end + 600]  # ban, captcha
    assert table.intervals.v4[1] == job.Interval(v4("192.0.2.128"), v4("192.0.2.255"), end + 3600, end + 7200)
    assert table.metadata == {"table": 1, "digest": table.digest, "entries": 4}
    assert table.entries == Counter({("network", "ban"): 2, ("network", "captcha"): 2})


@pytest.mark.parametrize(
    ("value", "network"),
    [
        ("192.0.2.1", "192.0.2.1/32"),
        ("192.0.2.0/255.255.255.0", "192.0.2.0/24"),
        ("10.0.0.1/31", "10.0.0.0/31"),  # host bits set, down to the lowest
        ("192.0.2.255/25", "192.0.2.128/25"),
        ("10.1.2.3/8", "10.0.0.0/8"),
        ("::ffff:192.0.2.0/120", "192.0.2.0/24"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),  # the broadest IPv4 range taken
        ("::ffff:0:0/95", "::fffe:0:0/95"),  # wider than the mapped block: stays IPv6
        ("2001::/16", "2001::/16"),  # the broadest IPv6 range taken
        ("2001:0DB8:0000::/48", "2001:db8::/48"),
    ],
)
def test_ranges_are_made_canonical(value, network):
    expected = ipaddress.ip_network(network)
    bounds = (expected.version, int(expected.network_address), int(expected.broadcast_address))
    assert job.network_bounds(value) == bounds
    assert job.network_text(*bounds) == network


@pytest.mark.parametrize(
    ("scope", "value", "entry"),
    [("country", "fr", "FR"), ("country", "Fr", "FR"), ("as", "AS64500", "64500"), ("as", "as64500", "64500")]
    + [("as", "064500", "64500"), ("as", "4294967295", "4294967295")],
)
def test_countries_and_as_are_made_canonical(scope, value, entry):
    assert job.scope_entry(scope, value) == (scope, entry)


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
        job.network_bounds(value) if scope == "range" else job.scope_entry(scope, value)
    assert projected([row(value, scope=scope)]).ignored == Counter(invalid=1)


@pytest.mark.parametrize(
    "value", ["0.0.0.0/0", "::/0", "::ffff:0:0/96", "128.0.0.0/1", "10.0.0.0/7", "10.1.2.3/7", "2000::/15"]
)
def test_a_range_that_would_block_everyone_or_near_is_left_out(value):
    """One decision on 0.0.0.0/0 (or a mask typed short) must not ban every visitor at the edge."""
    with pytest.raises(job.TooBroad):
        job.network_bounds(value)
    projection = projected([row(value), row("192.0.2.0/24")])
    assert projection.ignored == Counter(range_too_large=1)
    assert list(projection.networks) == [(4, v4("192.0.2.0"), v4("192.0.2.255"), "ban")]


def test_table_origins_put_those_ip_decisions_in_the_network_table():
    rows = [
        row("192.0.2.1", scope="Ip", origin="CAPI"),
        row("::ffff:192.0.2.2", scope="Ip", origin="lists"),  # canonical: the IPv4 address
        row("192.0.2.3", scope="Ip", origin="crowdsec"),
        row("2001:db8::1", 600, "captcha", scope="Ip", origin="CAPI"),
    ]
    some = projected(rows, table_origins=frozenset({"CAPI", "lists"}))
    assert set(some.wanted) == {"ip:192.0.2.3"}
    assert set(some.networks) == {
        (4, v4("192.0.2.1"), v4("192.0.2.1"), "ban"),
        (4, v4("192.0.2.2"), v4("192.0.2.2"), "ban"),
        (6, 0x20010DB8 << 96 | 1, 0x20010DB8 << 96 | 1, "captcha"),
    }
    every = projected(rows, table_origins=frozenset({"*"}))
    assert every.wanted == {} and len(every.networks) == 4
    assert set(projected(rows).wanted) == {"ip:192.0.2.1", "ip:192.0.2.2", "ip:192.0.2.3", "ip:2001:db8::1"}


def test_without_the_tables_those_scopes_are_left_out_as_before():
    rows = [row("198.51.100.0/24"), row("FR", scope="Country"), row("AS64500", scope="AS")]
    projection = job.project(rows, NOW, "ip:")
    assert projection.scopes == {} and projection.networks == {} and projection.ignored == Counter(scope=3)


def test_no_entries_no_table():
    rows = [row("192.0.2.1", scope="Ip"), row("FR", -1, scope="Country"), row("AS1", type="throttle", scope="AS")]
    assert scopes_of(rows).value == b"" and networks_of(rows).value == b""
    assert scopes_of([row("FR", scope="Country")], max_bytes=0).full == 1


# --------------------------------------------------------------------------- caps


def test_the_cap_keeps_bans_first_then_the_longest_ends():
    rows = [row(f"10.{i}.0.0/16", 3600 * (1 + i % 7), "captcha" if i % 3 else "ban") for i in range(100)]
    whole, capped = networks_of(rows), networks_of(rows, max_bytes=16 + 16 * 40)
    assert len(capped.value) <= 16 + 16 * 40 < len(whole.value)
    assert capped.full == 100 - len(capped.kept) == 60
    weakest_kept = min((job.REMEDIATION_RANK[e[3]], capped_end(capped, e)) for e in capped.kept)
    left_out = set(whole.kept) - set(capped.kept)
    assert all((job.REMEDIATION_RANK[e[3]], capped_end(whole, e)) <= weakest_kept for e in left_out)
    assert sum(e[3] == "ban" for e in capped.kept) == 34  # every ban kept, then the longest captchas


def capped_end(document, entry):
    version, first, _, remediation = entry
    return job.network_ends(document.intervals, job.network_text(version, first, first).split("/")[0])[
        remediation != "ban"
    ]


def test_the_network_tables_cap_is_counted_to_the_byte():
    rows = [row("10.0.0.0/8", 7200), row("10.1.0.0/16", 3600, "captcha"), row("192.0.2.0/24", 600)]
    whole = networks_of(rows)  # the /16 splits the /8: 4 intervals
    assert len(whole.intervals.v4) == 4 and len(whole.value) == 16 + 16 * 4
    assert networks_of(rows, max_bytes=len(whole.value)).full == 0  # exactly its length: every entry fits
    less = networks_of(rows, max_bytes=len(whole.value) - 1)  # a byte less: the weakest entry is left out
    ban_8, captcha_16, ban_24 = whole.kept  # as LAPI gave them: under the cap, no order is needed
    assert (less.full, less.kept, less.left_out) == (1, [ban_8, ban_24], [captcha_16])
    assert len(less.value) == 16 + 16 * 2


def test_the_scope_tables_cap_is_counted_to_the_byte():
    rows = [row("FR", scope="Country"), row("DE", 7200, scope="Country"), row("AS64500", scope="AS")]
    rows += [row("AS64501", 600, "captcha", scope="AS")]
    whole = scopes_of(rows)
    # Bans first, then the longest ends, then by scope and name.
    assert whole.kept == [("country", "DE"), ("as", "64500"), ("country", "FR"), ("as", "64501")]
    assert scopes_of(rows, max_bytes=len(whole.value)) == whole  # exactly its length: every entry fits
    less = scopes_of(rows, max_bytes=len(whole.value) - 1)  # a byte less: the weakest entry is left out
    assert (less.full, less.kept) == (1, whole.kept[:-1]) and len(less.value) < len(whole.value)


# --------------------------------------------------------------------------- against straightforward versions


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


def plain_verdict(rows, address, read_at, now):
    """What the Range decisions say of an address at `now`, the obvious way: every decision whose
    network holds it, ban beating captcha while it lasts."""
    ip = ipaddress.ip_address(address)
    remediations = set()
    for r in rows:
        if str(r["scope"]).lower() != "range" or r["type"].lower() not in ("ban", "captcha"):
            continue
        try:
            network = ipaddress.ip_network(plain_entry("range", r["value"]))
        except ValueError:
            continue
        end = math.ceil(read_at + job.parse_go_duration(r["duration"]))
        if ip.version == network.version and ip in network and end > now:
            remediations.add(r["type"].lower())
    return "ban" if "ban" in remediations else "captcha" if "captcha" in remediations else None


networks = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(lambda n: f"{n[0]}/{n[1]}"),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 128)).map(lambda n: f"{n[0]}/{n[1]}"),
    st.tuples(st.ip_addresses(v=4), st.integers(96, 128)).map(lambda n: f"::ffff:{n[0]}/{n[1]}"),
    st.ip_addresses().map(str),
    # Nested and neighbouring networks, which the sweep must split and keep apart.
    st.tuples(st.integers(0, 3), st.integers(22, 32)).map(lambda n: f"10.0.{n[0]}.7/{n[1]}"),
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


def plain_scope_table(rows, read_at, max_bytes):
    """The scope table written the obvious way: each decision checked, made canonical and merged
    in turn; then entries added strongest first while the whole document still fits."""
    merged = {}
    for r in rows:
        scope, remediation = str(r["scope"]).lower(), str(r["type"]).lower()
        if scope not in ("country", "as") or remediation not in ("ban", "captcha"):
            continue
        remaining = job.parse_go_duration(r["duration"])
        try:
            name = plain_entry(scope, r["value"])
        except ValueError:
            continue
        if remaining <= 0:
            continue
        end = read_at + remaining
        old = merged.get((scope, name))
        if old is None:
            merged[scope, name] = (remediation, end)
        else:
            strongest = "ban" if "ban" in (remediation, old[0]) else "captcha"
            merged[scope, name] = (strongest, max(end, old[1]))
    order = sorted(merged, key=lambda k: (merged[k][0] != "ban", -merged[k][1], k))
    document, kept = {"v": 1}, 0
    for scope, name in order:
        trial = json.loads(json.dumps(document))
        trial.setdefault(scope, {})[name] = [merged[scope, name][0], math.ceil(merged[scope, name][1])]
        if len(json.dumps(trial, sort_keys=True, separators=(",", ":"))) > max_bytes:
            break
        document, kept = trial, kept + 1
    return json.dumps(document, sort_keys=True, separators=(",", ":")) if kept else "", len(order) - kept


@given(table_rows, st.integers(60, 4000), st.floats(NOW - 10**6, NOW + 10**6))
def test_the_scope_table_equals_the_straightforward_one(rows, max_bytes, read_at):
    table = scopes_of(rows, max_bytes, read_at)
    document, full = plain_scope_table(rows, read_at, max_bytes)
    assert table.value.decode() == document
    assert table.full == full and len(table.value) <= max_bytes
    if document:
        assert table.end == max(
            end for names in json.loads(document).values() if names != 1 for _, end in names.values()
        )
        assert sum(table.entries.values()) == len(table.kept) == table.metadata["entries"]


probes = st.one_of(
    st.ip_addresses(),
    st.tuples(st.integers(0, 3), st.integers(0, 255)).map(lambda n: f"10.0.{n[0]}.{n[1]}"),
)


@given(table_rows, st.lists(probes, max_size=30), st.floats(0, 10**6))
def test_the_network_table_says_of_every_address_what_its_networks_say(rows, addresses, later):
    table = networks_of(rows, read_at=NOW)
    intervals = job.decode_networks(table.value) if table.value else job.Intervals([], [])
    assert intervals == (table.intervals if table.value else intervals)
    for family in intervals:  # sorted, disjoint, each with an end
        assert all(a.last < b.first for a, b in zip(family, family[1:], strict=False))
        assert all(i.first <= i.last and (i.ban or i.captcha) for i in family)
    # Every network's edges and a neighbour of each, besides the random addresses.
    for entry in table.kept:
        version, first, last, _ = entry
        for value in (first - 1, first, last, last + 1):
            if 0 <= value < 2 ** (32 if version == 4 else 128):
                addresses.append(ipaddress.ip_address(value) if version == 4 else ipaddress.IPv6Address(value))
    for address in addresses:
        canonical = job.canonical_address(str(address))
        now = NOW + later
        assert job.networks_verdict(intervals, canonical, now) == plain_verdict(rows, canonical, NOW, now), canonical


# --------------------------------------------------------------------------- when a table KV holds may stand


def test_a_table_stands_while_its_ends_move_later_and_is_rewritten_as_one_comes_due():
    first = [row(f"198.51.{i}.0/24", 86400, origin="CAPI") for i in range(10)] + [row("FR", 86400, scope="Country")]
    held_n, held_s = networks_of(first), scopes_of(first)
    refreshed = [{**r, "duration": go_duration(86400 + 3600)} for r in first]  # ends an hour later
    for build, held in ((networks_of, held_n), (scopes_of, held_s)):
        kept = build(refreshed, stored=held.value)
        assert kept.value == held.value and kept.digest == held.digest  # the same bytes: the plan writes nothing
        assert kept.due_at == NOW + 86400 - job.REFRESH_AHEAD  # 15 minutes before the first held end
        # A day on, its ends come within REFRESH_AHEAD: rewritten with the decisions' ends.
        due = build(refreshed, stored=held.value, read_at=NOW, kv_now=NOW + 86400 - job.REFRESH_AHEAD)
        assert due.value != held.value and due.due_at == math.inf
        # Time passing alone rewrites nothing, up to then.
        assert build(first, stored=held.value, kv_now=NOW + 86400 - job.REFRESH_AHEAD - 1).value == held.value


@pytest.mark.parametrize(
    "change",
    [
        lambda rows: rows + [row("203.0.113.0/24")],  # an entry added
        lambda rows: rows[1:],  # one removed
        lambda rows: [{**rows[0], "type": "captcha"}, *rows[1:]],  # another remediation
        lambda rows: [*rows, {**rows[0], "type": "captcha"}],  # a second remediation on one network
        lambda rows: [{**rows[0], "duration": go_duration(3600 - 2 * job.EXPIRATION_SLACK)}, *rows[1:]],  # earlier
    ],
)
def test_a_table_is_rewritten_when_what_it_enforces_changes(change):
    rows = [row("198.51.100.0/24"), row("192.0.2.0/24", 7200)]
    held = networks_of(rows)
    assert networks_of(rows, stored=held.value).value == held.value
    assert networks_of(change(rows), stored=held.value).value != held.value


def test_an_entry_whose_ends_have_passed_costs_no_write_when_its_decision_goes():
    rows = [row("198.51.100.0/24", 600), row("192.0.2.0/24", 7200)]
    held = networks_of(rows)
    # 20 minutes on, the first decision has ended and LAPI no longer answers with it.
    gone = networks_of(rows[1:], read_at=NOW + 1200, stored=held.value)
    assert gone.value == held.value


@given(st.lists(st.integers(1, 86400 * 3), min_size=1, max_size=20), st.floats(-0.9, 0.9))
def test_a_jitter_of_under_a_second_never_rewrites_a_table(seconds, jitter):
    """Ends are computed from when LAPI's answer arrived: a run a moment later reads them a moment
    off, on either side of any boundary (the scope table once flapped on hour boundaries)."""
    rows = [row(f"10.{i}.0.0/16", s) for i, s in enumerate(seconds)] + [row("FR", seconds[0], scope="Country")]
    for build in (networks_of, scopes_of):
        held = build(rows, read_at=NOW)
        assert build(rows, read_at=NOW + jitter, stored=held.value).value == held.value


def test_anything_but_a_table_of_ours_cannot_stand():
    rows = [row("198.51.100.0/24"), row("FR", scope="Country")]
    for build, junk in (
        (networks_of, [b"", b"LKVN", b"LKVN\x02\x00" + bytes(10), networks_of(rows).value[:-1], b"x" * 100]),
        (scopes_of, [b"", b"{}", b'{"v":2}', b'{"v":1,"country":{"FR":["ban",1.5]}}', b'{"v":1,"country":[]}', b"["]),
    ):
        for value in junk:
            assert build(rows, stored=value).value == build(rows).value


def test_a_network_table_with_an_interval_out_of_order_or_without_an_end_is_refused():
    def table(*v4):
        return job.encode_networks(job.Intervals([job.Interval(*i) for i in v4], []))

    assert job.decode_networks(table((3, 4, 1, 0), (5, 9, 0, 1))).v4[1] == job.Interval(5, 9, 0, 1)
    for bad in (
        table((5, 9, 1, 0), (3, 4, 1, 0)),  # out of order
        table((3, 5, 1, 0), (5, 9, 1, 0)),  # overlapping
        table((9, 5, 1, 0)),  # its first after its last
        table((3, 4, 0, 0)),  # no end at all
    ):
        with pytest.raises(ValueError):
            job.decode_networks(bad)


# --------------------------------------------------------------------------- the plan, the listing, the record


def test_keys_the_network_table_holds_are_left_to_expire():
    held = networks_of(
        [row("192.0.2.0/24", 7200), row("198.51.100.7", 3600, "captcha", scope="Ip", origin="CAPI")], origins={"CAPI"}
    ).intervals
    present = {
        "ip:192.0.2.1": job.Present(NOW + 3600, "ban"),  # held by a /24 ban that lasts longer: left
        "ip:192.0.2.2": job.Present(NOW + 7200 + 3600, "ban"),  # would outlive the table's end: deleted
        "ip:192.0.2.3": job.Present(NOW + 3600, "captcha"),  # another remediation than the table's: deleted
        "ip:198.51.100.7": job.Present(NOW + 3600, "captcha"),  # held as a captcha: left
        "ip:198.51.100.8": job.Present(NOW + 3600, "ban"),  # not held: deleted
        "ip:scopes": job.Present(NOW + 3600, "ab" * 16),  # not an address: deleted
        "ip:192.0.2.4": job.Present(None, None),  # not ours: deleted
    }
    plan = job.make_plan({}, present, NOW)
    spared = job.spare_covered(plan, present, held, held, "ip:", NOW)
    assert spared.spared == ["ip:192.0.2.1", "ip:198.51.100.7"]
    assert spared.deletes == sorted(set(present) - set(spared.spared))
    assert job.spare_covered(plan, present, None, None, "ip:", NOW) == plan
    # The table KV keeps may hold an end up to the slack past its decision's (kept as it stood):
    # a key is bounded by the decision's end, the fresh table's, not by the held one.
    earlier = networks_of(
        [row("192.0.2.0/24", 3600 - 100), row("198.51.100.7", 3600, "captcha", scope="Ip", origin="CAPI")],
        origins={"CAPI"},
    ).intervals
    assert job.spare_covered(plan, present, held, earlier, "ip:", NOW).spared == ["ip:198.51.100.7"]
    later = job.spare_covered(plan, present, held, held, "ip:", NOW + 7200)  # the table's ends have passed
    assert later.spared == []


def test_the_listing_reads_a_digest_only_from_the_tables_keys():
    digest = "0123456789abcdef" * 2
    page = [
        {"name": "ip:scopes", "expiration": 1, "metadata": {"table": 1, "digest": digest, "entries": 2}},
        {"name": "ip:networks", "expiration": 2, "metadata": {"table": 1, "digest": digest, "entries": 2}},
        {"name": "ip:192.0.2.1", "metadata": {"table": 1, "digest": digest}},
    ]
    assert job.present_keys(page, "ip:") == {
        "ip:scopes": job.Present(1, digest),
        "ip:networks": job.Present(2, digest),
        "ip:192.0.2.1": job.Present(None, None),
    }
    for metadata in (
        {"table": True, "digest": digest},
        {"table": 2, "digest": digest},
        {"table": 1, "digest": "x"},
        {"table": 1, "digest": digest.upper()},
        {"table": 1, "digest": digest + "0"},
        {"table": 1, "digest": list(digest)},
        {"digest": digest},
        "x",
        None,
    ):
        assert (
            job.present_keys([{"name": "ip:networks", "metadata": metadata}], "ip:")["ip:networks"].remediation is None
        )


def test_a_tables_bulk_item_carries_its_value_in_base64_and_its_digest():
    table = networks_of([row("198.51.100.0/24"), row("2001:db8::/32", type="captcha")])
    item = job.bulk_item(job.Write("ip:networks", table.digest, 7200, "", ""), {"ip:networks": table})
    assert item == {
        "key": "ip:networks",
        "value": base64.b64encode(table.value).decode(),
        "base64": True,
        "expiration_ttl": 7200,
        "metadata": {"table": 1, "digest": table.digest, "entries": 2},
    }
    address = job.Write("ip:192.0.2.1", "ban", 60, "crowdsec", "ssh-bf")
    assert job.bulk_item(address, {"ip:networks": table}) == job.bulk_item(address)


def test_the_record_keeps_the_tables_values_and_refuses_one_its_digest_does_not_name():
    scopes, networks = scopes_of([row("FR", scope="Country")]), networks_of([row("198.51.100.0/24")])
    keys = {
        "ip:192.0.2.1": job.Present(NOW + 60, "ban"),
        "ip:scopes": job.Present(int(NOW) + 7200, scopes.digest),
        "ip:networks": job.Present(int(NOW) + 3600, networks.digest),
    }
    record = job.Record(
        "a", "n", "ip:", NOW, 0.0, None, keys, documents={"scopes": scopes.value, "networks": networks.value}
    )
    lines = list(job.encode_record(record, NOW))
    header = json.loads(lines[0])
    assert header["keys"] == 1 and "scopes" not in lines[1] and len(lines) == 6
    assert header["documents"] == [
        ["scopes", scopes.digest, int(NOW) + 7200, len(scopes.value)],
        ["networks", networks.digest, int(NOW) + 3600, len(networks.value)],
    ]
    back = job.decode_record(lines)
    assert back.keys == keys and back.documents == record.documents
    other = base64.b64encode(networks_of([row("198.51.100.0/25")]).value).decode() + "\n"
    with pytest.raises(job.RecordCorrupt, match="the networks table's value is not the one its digest names"):
        job.decode_record([*lines[:5], other])
    with pytest.raises(job.RecordCorrupt):
        job.decode_record([*lines[:5], "not base64!\n"])
    # A key whose value is not kept (unknown, or a table the job does not know): no line for it.
    unknown = record._replace(keys={**keys, "ip:networks": job.Present(None, None)}, documents={"scopes": scopes.value})
    assert job.decode_record(job.encode_record(unknown, NOW)).keys["ip:networks"] == job.Present(None, None)


# --------------------------------------------------------------------------- whole runs


def table_decisions(n: int = 3) -> list[dict]:
    return [decision(f"198.51.{i}.0/24", 3600 * (1 + i % 3), scope="Range") for i in range(n)] + [
        decision("FR", 7200, "captcha", scope="Country"),
        decision("AS64500", scope="AS"),
    ]


def held_networks(kv) -> job.Intervals:
    return job.decode_networks(kv.live()["ip:networks"].value)


def held_ranges(value: bytes) -> dict[str, tuple[str, int]]:
    """A network table's intervals as CIDR text (where none is nested, each is one network), each
    with its strongest remediation and that remediation's end."""
    table = job.decode_networks(value)
    return {
        job.network_text(version, i.first, i.last): ("ban", i.ban) if i.ban else ("captcha", i.captcha)
        for version, family in ((4, table.v4), (6, table.v6))
        for i in family
    }


def test_a_run_writes_both_tables_and_a_second_writes_nothing(stack):
    stack.lapi.decisions = [decision("192.0.2.1"), *table_decisions()]
    first = stack.run()
    assert first.code == 0, first.err
    assert stack.kv.writes == 3 and "written 1," in first.out
    scopes, networks = stack.kv.live()["ip:scopes"], stack.kv.live()["ip:networks"]
    assert json.loads(scopes.value)["country"]["FR"][0] == "captcha"
    assert len(held_networks(stack.kv).v4) == 3
    latest = max(max(i.ban, i.captcha) for i in held_networks(stack.kv).v4)
    assert 0 <= networks.expiration - latest <= 5  # a TTL from the plan's time, applied a moment later
    assert networks.metadata == {"table": 1, "digest": hashlib.sha256(networks.value).hexdigest()[:32], "entries": 3}
    assert "scopes table written (2 entries: country 1, as 1;" in first.out
    assert "networks table written (3 entries;" in first.out
    assert stack.push.value(PREFIXED + "decisions") == 1  # address keys only
    assert stack.push.value(PREFIXED + "table_entries", 'scope="network",remediation="ban"') == 3
    assert stack.push.value(PREFIXED + "table_bytes", 'table="networks"') == len(networks.value)
    stack.kv.reset_counts()
    second = stack.run()
    assert second.code == 0, second.err
    assert (stack.kv.writes, stack.kv.deletes) == (0, 0)
    # Without a state file each table KV holds is read back once a run, to know its ends.
    assert dict(stack.kv.requests) == {"list": 1, "read": 2}
    assert "written 0, deleted 0, unchanged 1," in second.out and "networks table unchanged" in second.out


def test_time_passing_rewrites_nothing_even_for_ends_on_an_hour(stack):
    # Ends exactly on an hour boundary: the scope table once rewrote itself 5 runs in 6 here.
    boundary = (int(time.time()) // 3600 + 2) * 3600
    stack.lapi.decisions = table_decisions(20)
    for d in stack.lapi.decisions:
        d["until"] = boundary
    assert stack.run().code == 0
    before = stack.kv.snapshot()
    stack.kv.reset_counts()
    for minutes in range(1, 7):
        later = stack.run(clock_offset=60 * minutes)
        assert later.code == 0, later.err
    assert (stack.kv.writes, stack.kv.deletes) == (0, 0)
    assert stack.kv.snapshot() == before


@pytest.mark.parametrize("with_state_file", [False, True])
def test_a_blocklist_refresh_costs_no_write(stack, tmp_path, with_state_file):
    """CrowdSec refreshes CAPI and its lists by re-inserting every decision: new ids, ends an hour
    later. With TABLE_ORIGINS, and without, that costs nothing."""
    env = {"STATE_FILE": str(tmp_path / "record.gz")} if with_state_file else {}
    stack.lapi.decisions = [decision(f"10.0.{i // 250}.{i % 250}", 86400, origin="CAPI") for i in range(500)]
    stack.lapi.decisions += [decision(f"10.1.{i // 250}.{i % 250}", 86400, origin="lists") for i in range(500)]
    stack.lapi.decisions += [decision(f"198.51.{i}.0/24", 86400, scope="Range", origin="CAPI") for i in range(20)]
    for table_origins in ("", "CAPI,lists"):
        assert stack.run(TABLE_ORIGINS=table_origins, **env).code == 0
        for hour in range(1, 4):
            for n, d in enumerate(stack.lapi.decisions):
                d["id"], d["until"] = 10_000 * hour + n, d["until"] + 3600
            stack.kv.reset_counts()
            refreshed = stack.run(TABLE_ORIGINS=table_origins, **env)
            assert refreshed.code == 0, refreshed.err
            assert (stack.kv.writes, stack.kv.deletes) == (0, 0), (table_origins, hour)


def test_turning_table_origins_on_moves_a_blocklist_into_the_table_and_deletes_nothing_it_holds(stack):
    stack.lapi.decisions = [decision(f"10.0.0.{i}", 7200, origin="CAPI") for i in range(1, 41)]
    stack.lapi.decisions += [decision("192.0.2.1", origin="crowdsec")]
    assert stack.run().code == 0 and len(stack.kv.live()) == 41
    gone = stack.lapi.decisions.pop(0)  # and one CAPI decision lifted meanwhile
    stack.kv.reset_counts()
    on = stack.run(TABLE_ORIGINS="CAPI", MAX_DELETES="5")  # far fewer than the 39 keys the table now holds
    assert on.code == 0, on.err
    assert stack.kv.written_keys == ["ip:networks"]  # written before anything is deleted
    assert stack.kv.deleted_keys == [f"ip:{gone['value']}"]  # its decision is gone: deleted as usual
    assert "left to expire 39," in on.out
    assert stack.push.value(PREFIXED + "spared") == 39
    held = held_networks(stack.kv)
    assert len(held.v4) == 39 and all(i.first == i.last for i in held.v4)
    for key, entry in stack.kv.live().items():  # each key left is held by the table, as long or longer
        if key not in ("ip:networks", "ip:192.0.2.1"):
            assert job.network_ends(held, key[3:])[0] >= entry.expiration - job.EXPIRATION_SLACK
    stack.kv.reset_counts()
    again = stack.run(TABLE_ORIGINS="CAPI", MAX_DELETES="5")
    assert again.code == 0 and (stack.kv.writes, stack.kv.deletes) == (0, 0)


def test_an_emptied_table_is_deleted_and_one_changed_behind_the_job_is_put_right(stack, tmp_path):
    stack.lapi.decisions = [decision("192.0.2.1"), *table_decisions()]
    assert stack.run().code == 0
    good = stack.kv.live()["ip:networks"]
    # The same metadata, another value (an API write that kept it): read back, found out, rewritten.
    stack.kv.store["ip:networks"] = Entry(job.encode_networks(job.Intervals([], [])), good.expiration, good.metadata)
    stack.kv.reset_counts()
    assert stack.run().code == 0 and stack.kv.written_keys == ["ip:networks"]
    assert job.decode_networks(stack.kv.live()["ip:networks"].value) == job.decode_networks(good.value)
    stack.kv.store["ip:networks"] = Entry(b"{}", good.expiration, {"x": 1})  # not ours: rewritten
    stack.kv.reset_counts()
    assert stack.run().code == 0 and stack.kv.written_keys == ["ip:networks"]
    stack.lapi.decisions = [decision("192.0.2.1")]
    stack.kv.reset_counts()
    emptied = stack.run()
    assert emptied.code == 0 and sorted(stack.kv.deleted_keys) == ["ip:networks", "ip:scopes"]
    assert "deleted 0," in emptied.out and "networks table deleted (0 entries" in emptied.out
    stack.kv.reset_counts()
    none = stack.run()
    assert none.code == 0 and (stack.kv.writes, stack.kv.deletes) == (0, 0) and "table " not in none.out


def test_with_a_record_a_steady_run_reads_no_table_and_an_audit_heals_a_deleted_one(stack, tmp_path):
    state = str(tmp_path / "record.gz")
    stack.lapi.decisions = [decision("192.0.2.1"), *table_decisions()]
    assert stack.run(STATE_FILE=state).code == 0
    stack.lapi.decisions.append(decision("192.0.2.2"))  # another answer: planned against the record
    stack.kv.reset_counts()
    changed = stack.run(STATE_FILE=state)
    assert changed.code == 0 and stack.kv.written_keys == ["ip:192.0.2.2"] and "read" not in stack.kv.requests
    assert "networks table unchanged" in changed.out
    stack.kv.reset_counts()
    audit = stack.run("--audit", STATE_FILE=state)  # the listing's digests are the record's: nothing read
    assert audit.code == 0 and dict(stack.kv.requests) == {"list": 1}
    del stack.kv.store["ip:networks"]  # behind the job's back
    stack.kv.reset_counts()
    healed = stack.run("--audit", STATE_FILE=state)
    assert healed.code == 0 and stack.kv.written_keys == ["ip:networks"]


def test_table_full_writes_what_fits_and_says_so(stack):
    stack.lapi.decisions = [decision(f"10.{i}.0.0/16", 3600 * (1 + i % 5), scope="Range") for i in range(200)]
    result = stack.run(TABLE_MAX_BYTES="2048")
    assert result.code == 0, result.err
    held = held_networks(stack.kv)
    kept = len(held.v4)
    assert 16 + 16 * kept <= 2048 < 16 + 16 * (kept + 1)
    assert f"networks table: {200 - kept} entries left out (table_full), past TABLE_MAX_BYTES=2048" in result.err
    assert f"table_full {200 - kept})" in result.out
    assert stack.push.value(PREFIXED + "ignored", 'reason="table_full"') == 200 - kept
    stack.kv.reset_counts()
    assert stack.run(TABLE_MAX_BYTES="2048").code == 0 and stack.kv.writes == 0  # the same cut each run


def test_scope_table_false_is_the_original_behaviour_and_deletes_the_tables(stack):
    stack.lapi.decisions = [decision("192.0.2.1"), *table_decisions()]
    assert stack.run().code == 0 and {"ip:scopes", "ip:networks"} <= set(stack.kv.live())
    stack.kv.reset_counts()
    off = stack.run(SCOPE_TABLE="false")
    assert off.code == 0, off.err
    assert stack.lapi.queries[-1] == {"scopes": ["ip"]}
    assert sorted(stack.kv.deleted_keys) == ["ip:networks", "ip:scopes"] and set(stack.kv.live()) == {"ip:192.0.2.1"}
    assert "scope 5" in off.out and "networks table deleted" in off.out and "scopes table deleted" in off.out
    stack.kv.reset_counts()
    again = stack.run(SCOPE_TABLE="false")
    assert again.code == 0 and (stack.kv.writes, stack.kv.deletes) == (0, 0) and "table " not in again.out


def test_a_dry_run_shows_the_tables_and_the_keys_left_to_expire_and_writes_nothing(stack):
    stack.lapi.decisions = [decision("192.0.2.1", origin="CAPI"), *table_decisions()]
    assert stack.run().code == 0
    stack.kv.reset_counts()
    dry = stack.run("--dry-run", TABLE_ORIGINS="CAPI")
    assert dry.code == 0 and stack.kv.writes == 0
    assert "dry run: write 1: ip:networks (networks table)" in dry.out
    assert "dry run: left to expire 1: ip:192.0.2.1 (ban)" in dry.out
    (line,) = [line for line in dry.out.splitlines() if "dry run: networks table" in line]
    assert line.startswith("lapi-kv-sync: dry run: networks table write (4 entries;")
    assert "198.51.0.0/24 (ban)" in line and "192.0.2.1/32 (ban)" in line


def test_usage_metrics_count_each_network_once(stack):
    from tests.test_usage import at_quarter, sent_items

    stack.lapi.decisions = [
        decision("192.0.2.1"),
        # One network, a captcha (first) and a ban: counted once, as its ban (its origin), whatever LAPI's order.
        decision("198.51.100.0/24", scope="Range", origin="crowdsec", type="captcha"),
        decision("198.51.100.0/24", scope="Range", origin="cscli"),
        decision("2001:db8::/32", scope="Range", origin="cscli"),
        decision("203.0.113.9", origin="lists", scenario="firehol_level1"),  # in the table: as CrowdSec names a list
        decision("FR", scope="Country"),  # a country has no IP type: not in active_decisions
    ]
    assert stack.run(clock_offset=at_quarter(5), LAPI_USAGE_METRICS="true", TABLE_ORIGINS="lists").code == 0
    (body,) = stack.lapi.usage_metrics
    assert sent_items(body) == {
        ("crowdsec", "ipv4"): 1,
        ("cscli", "ipv4"): 1,
        ("cscli", "ipv6"): 1,
        ("lists:firehol_level1", "ipv4"): 1,
    }


def test_the_record_holds_the_tables_as_kv_does(stack, tmp_path):
    state = tmp_path / "record.gz"
    stack.lapi.decisions = [decision("192.0.2.1"), *table_decisions()]
    assert stack.run(STATE_FILE=str(state)).code == 0
    with gzip.open(state, "rt") as f:
        record = job.decode_record(f)
    for name in ("scopes", "networks"):
        live = stack.kv.live()[f"ip:{name}"]
        assert record.keys[f"ip:{name}"].remediation == live.metadata["digest"]
        assert live.expiration - 5 <= record.keys[f"ip:{name}"].expiration <= live.expiration
        assert record.documents[name] == live.value
    assert record.projected.table == {"network:ban": 3, "country:captcha": 1, "as:ban": 1}


def test_a_failed_run_reports_what_cloudflare_confirmed(stack):
    stack.lapi.decisions = table_decisions()
    stack.kv.faults.append(Fault("5xx", "bulk_put", status=400, times=-1))
    failed = stack.run()
    assert failed.code == job.EXIT_CLOUDFLARE
    assert "run FAILED (exit 1)" in failed.err and "networks table to write (3 entries" in failed.err
    assert "ip:networks" not in stack.kv.live()
    # A bulk write that landed, then a bulk delete that failed: the written keys are counted.
    stack.kv.faults.clear()
    stack.lapi.decisions = [decision(f"192.0.2.{i}") for i in range(1, 4)]
    assert stack.run().code == 0
    stack.lapi.decisions = [decision(f"192.0.2.{i}") for i in range(3, 6)]
    stack.kv.faults.append(Fault("5xx", "bulk_delete", status=400, times=-1))
    half = stack.run()
    assert half.code == job.EXIT_CLOUDFLARE
    assert "figures so far: wanted 3 (ban 3, captcha 0), written 2, deleted 0," in half.err


def test_the_shortcut_is_not_taken_when_the_table_settings_change(stack, tmp_path):
    state = str(tmp_path / "record.gz")
    stack.lapi.decisions = [*table_decisions(70), decision("192.0.2.9", origin="CAPI")]
    assert stack.run(STATE_FILE=state).code == 0
    assert "LAPI's answer unchanged" in stack.run(STATE_FILE=state).out
    capped = stack.run(STATE_FILE=state, TABLE_MAX_BYTES="1024")
    assert capped.code == 0 and "LAPI's answer unchanged" not in capped.out and "table_full" in capped.err
    moved = stack.run(STATE_FILE=state, TABLE_ORIGINS="CAPI")
    assert moved.code == 0 and "LAPI's answer unchanged" not in moved.out and "left to expire 1" in moved.out
    off = stack.run(STATE_FILE=state, SCOPE_TABLE="false")
    assert off.code == 0 and "LAPI's answer unchanged" not in off.out and "networks table deleted" in off.out


ENV = {"CF_ACCOUNT_ID": "a" * 32, "CF_KV_NAMESPACE_ID": "b" * 32, "CF_API_TOKEN": "t" * 40, "LAPI_KEY": "k" * 32}


def test_the_settings_are_checked():
    config = job.load_config(ENV)
    assert (config.scope_table, config.scope_table_max_bytes, config.table_max_bytes) == (True, 4 << 20, 8 << 20)
    assert config.table_origins == frozenset()
    config = job.load_config({**ENV, "TABLE_ORIGINS": " CAPI, lists ,", "TABLE_MAX_BYTES": str(20 << 20)})
    assert (config.table_origins, config.table_max_bytes) == (frozenset({"CAPI", "lists"}), 20 << 20)
    assert job.load_config({**ENV, "TABLE_ORIGINS": "*"}).table_origins == frozenset({"*"})
    config = job.load_config({**ENV, "SCOPE_TABLE": "FALSE", "SCOPE_TABLE_MAX_BYTES": str(20 << 20)})
    assert (config.scope_table, config.scope_table_max_bytes) == (False, 20 << 20)
    assert job.lapi_query(config) == "scopes=ip"
    with pytest.raises(job.ConfigError) as refused:
        job.load_config(
            {
                **ENV,
                "SCOPE_TABLE": "no",
                "SCOPE_TABLE_MAX_BYTES": str((20 << 20) + 1),
                "TABLE_MAX_BYTES": "1000",
                "TABLE_ORIGINS": "*,CAPI",
            }
        )
    assert refused.value.problems == [
        "SCOPE_TABLE must be true or false, got 'no'",
        "SCOPE_TABLE_MAX_BYTES must be at most 20971520 (20 MiB), got 20971521",
        "TABLE_MAX_BYTES must be a whole number >= 1024, got '1000'",
        "TABLE_ORIGINS is `*` (every origin) or a list of origins, not both: got '*,CAPI'",
    ]
    with pytest.raises(
        job.ConfigError, match="TABLE_ORIGINS puts decisions in the network table, which SCOPE_TABLE=false"
    ):
        job.load_config({**ENV, "SCOPE_TABLE": "false", "TABLE_ORIGINS": "CAPI"})
