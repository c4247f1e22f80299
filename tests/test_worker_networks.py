"""The reference Worker's network table (worker/networks.js) in workerd, and what a request costs in KV.

The tables are built by the job's own functions (`disjoint_intervals`, `encode_networks`) from
networks given here, put in Miniflare's KV as bytes and read by the Worker as an ArrayBuffer;
requests carry Miniflare's placeholder `cf` (country US, AS 395747) plus their own. Every KV
read the Worker makes is counted by worker/test/drive.mjs, so the tests count reads, and say
whether a read had settled when the response came back, rather than timing anything.
"""

from __future__ import annotations

import base64
import collections
import ipaddress
import itertools
import json
import os
import random
import time
from collections.abc import Iterable

import pytest

import lapi_kv_sync as job
from tests.standins import decision
from tests.test_worker import drive, job_keys, random_groups, spell_ipv6
from tests.test_worker_scopes import NETWORKS, config, reads, request, step_reads, verdict

HOUR = 3600
FAR = 2**32 - 1  # the latest end a table can hold (2106): these entries hold whenever the test runs

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def canonical_network(text: str) -> Network:
    """The network as the job puts it in the table: host bits cleared, IPv4-mapped as IPv4
    (a network broader than the job takes stays as it is: the Worker must still match it)."""
    network = ipaddress.ip_network(text, strict=False)
    mapped = network.version == 6 and network.prefixlen >= 96 and network.network_address.ipv4_mapped
    return ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}") if mapped else network


def intervals(entries: Iterable[tuple[str, str, int]]) -> job.Intervals:
    """The job's intervals for (network, remediation, end) entries."""
    families: dict[int, list[job.Interval]] = {4: [], 6: []}
    for text, remediation, end in entries:
        network = canonical_network(text)
        ends = (end, 0) if remediation == "ban" else (0, end)
        families[network.version].append(
            job.Interval(int(network.network_address), int(network.broadcast_address), *ends)
        )
    return job.Intervals(job.disjoint_intervals(families[4]), job.disjoint_intervals(families[6]))


def table_bytes(entries: Iterable[tuple[str, str, int]]) -> bytes:
    return job.encode_networks(intervals(entries))


def network_key(value: bytes | str, name: str = NETWORKS) -> dict:
    if isinstance(value, str):
        return {"name": name, "value": value}
    return {"name": name, "base64": base64.b64encode(value).decode()}


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def network_problems(logs: list[dict]) -> list[str]:
    return [log["message"] for log in logs if "network table" in log["message"]]


# --------------------------------------------------------------------------- both edges, both families

V4_BAN = "192.0.2.0/24"
V4_CAPTCHA = "203.0.113.64/26"
V6_CAPTCHA = "2001:DB8:0:0::/32"  # as LAPI may keep it: the job maps 2001:db8::/32
MAPPED_BAN = "::ffff:198.51.100.0/120"  # an IPv4-mapped network: the job maps 198.51.100.0/24
HIGH_V6_BAN = "ffff:ffff::/32"  # words with the top bit set: compared as unsigned
TOP_V4_CAPTCHA = "255.255.255.0/24"  # the last IPv4 address, and the first, in the same table
BOTTOM_V4_BAN = "0.0.0.0/24"

EDGES = {
    # address: what the Worker must answer
    "192.0.2.0": "ban",
    "192.0.2.255": "ban",
    "192.0.1.255": None,
    "192.0.3.0": None,
    "::ffff:192.0.2.0": "ban",  # the same client, IPv4-mapped
    "203.0.113.64": "captcha",
    "203.0.113.127": "captcha",
    "203.0.113.63": None,
    "203.0.113.128": None,
    "2001:db8::": "captcha",
    "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff": "captcha",
    "2001:DB8:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF": "captcha",
    "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff": None,
    "2001:db9::": None,
    "198.51.100.0": "ban",
    "198.51.100.255": "ban",
    "::ffff:198.51.100.255": "ban",
    "198.51.99.255": None,
    "198.51.101.0": None,
    "::ffff:c633:6500": None,  # 198.51.101.0, hex-mapped: one after
    "::c633:6401": None,  # IPv4-compatible: an IPv6 address, outside every network here
    "ffff:ffff::": "ban",
    "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff": "ban",
    "ffff:fffe:ffff:ffff:ffff:ffff:ffff:ffff": None,
    "255.255.255.255": "captcha",
    "255.255.254.255": None,
    "0.0.0.0": "ban",
    "0.0.0.255": "ban",
    "0.0.1.0": None,
    "::": None,  # IPv6 zero: not IPv4's 0.0.0.0
}
EDGE_NETWORKS = [
    (V4_BAN, "ban", FAR),
    (V4_CAPTCHA, "captcha", FAR),
    (V6_CAPTCHA, "captcha", FAR),
    (MAPPED_BAN, "ban", FAR),
    (HIGH_V6_BAN, "ban", FAR),
    (TOP_V4_CAPTCHA, "captcha", FAR),
    (BOTTOM_V4_BAN, "ban", FAR),
]


def test_a_network_matches_from_its_first_address_to_its_last_and_not_one_further():
    work = [request(address) for address in EDGES]
    output = drive(config=config(), keys=[network_key(table_bytes(EDGE_NETWORKS))], requests=work)
    answers = output["responses"]
    assert {address: verdict(answer) for address, answer in zip(EDGES, answers, strict=True)} == EDGES
    # The first request reads the two tables beside its address key; once warm, one read each.
    assert reads(answers[0]) == ["ip:192.0.2.0", NETWORKS, "ip:scopes"]
    assert [len(reads(a)) for a in answers[1:]] == [1] * (len(EDGES) - 1)
    assert output["logs"] == []


# --------------------------------------------------------------------------- precedence and ends


def test_ban_beats_captcha_across_the_address_key_the_network_table_and_the_scope_table(stack):
    keys = job_keys(
        stack,
        decision("192.0.2.7", type="captcha"),  # address key: captcha; a network around it: ban
        decision("198.51.100.9"),  # address key: ban; its country: captcha
        decision("DE", scope="Country", type="captcha"),
        decision("64500", scope="AS"),  # a network's captcha, the AS's ban
    )
    networks = [
        ("192.0.2.0/24", "ban", FAR),
        ("2001:db8::/32", "captcha", FAR),  # nested: captcha around a ban
        ("2001:db8:1::/48", "ban", FAR),
        ("10.0.0.0/8", "captcha", FAR),  # and a ban around a captcha, on the same network too
        ("10.0.0.0/8", "ban", FAR),
        ("10.1.0.0/16", "captcha", FAR),
        ("203.0.113.0/24", "captcha", FAR),
    ]
    cases = [
        (request("192.0.2.7"), "ban"),
        (request("198.51.100.9", country="DE"), "ban"),
        (request("2001:db8::1"), "captcha"),
        (request("2001:db8:1::1"), "ban"),
        (request("2001:db8:1:ffff:ffff:ffff:ffff:ffff"), "ban"),
        (request("2001:db8:2::"), "captcha"),
        (request("10.1.2.3"), "ban"),
        (request("10.2.0.0"), "ban"),
        (request("203.0.113.5"), "captcha"),
        (request("203.0.113.5", asn=64500), "ban"),
        (request("203.0.113.5", country="DE"), "captcha"),
    ]
    loaded = [*keys, network_key(table_bytes(networks))]
    answers = drive(config=config(), keys=loaded, requests=[r for r, _ in cases])["responses"]
    assert [verdict(a) for a in answers] == [expected for _, expected in cases]


def test_an_interval_whose_end_has_passed_is_ignored():
    past = int(time.time()) - 10
    networks = [
        ("192.0.2.0/24", "ban", past),  # the ban ended; the captcha inside it did not
        ("192.0.2.0/25", "captcha", FAR),
        ("2001:db8::/32", "ban", past),
        ("198.51.100.0/24", "captcha", past),
    ]
    work = [request(a) for a in ("192.0.2.1", "192.0.2.200", "2001:db8::1", "198.51.100.1")]
    answers = drive(config=config(), keys=[network_key(table_bytes(networks))], requests=work)["responses"]
    assert [verdict(a) for a in answers] == ["captcha", None, None, None]


def test_intervals_ending_at_different_times_decide_at_each_moment():
    # One table held for a minute must stay right as its networks end one after another.
    base = 1_800_000_000
    networks = [
        ("10.0.0.0/8", "captcha", base + 2 * HOUR),
        ("10.1.0.0/16", "ban", base + HOUR),
        ("10.1.2.0/24", "captcha", base + 3 * HOUR),
        ("2001:db8::/32", "ban", base + 4 * HOUR),
    ]
    addresses = ["10.1.2.3", "10.1.3.0", "10.2.0.0", "2001:db8::5"]
    moments = [base + HOUR - 1, base + HOUR, base + 2 * HOUR, base + 3 * HOUR, base + 4 * HOUR]
    work = [{"base64": b64(table_bytes(networks)), "addresses": addresses, "now": now} for now in moments]
    got = [answer["verdicts"] for answer in drive(config=config(), networks=work)["networks"]]
    assert got == [
        ["ban", "ban", "captcha", "ban"],  # the /16's ban covers the /24 and its captcha
        ["captcha", "captcha", "captcha", "ban"],  # the ban has ended: the captchas show through
        ["captcha", None, None, "ban"],  # the /8's captcha has ended, the /24's holds
        [None, None, None, "ban"],
        [None, None, None, None],
    ]


# --------------------------------------------------------------------------- junk, missing, last good copy

GOOD = table_bytes([("198.51.100.0/24", "ban", FAR), ("2001:db8::/32", "ban", FAR)])
EMPTY = table_bytes([])
JUNK = {
    "no bytes": b"",
    "short": GOOD[:15],
    "header only of a table with intervals": GOOD[:16],
    "wrong magic": b"LKVM" + GOOD[4:],
    "magic in the other byte order": b"NVKL" + GOOD[4:],
    "format 2": GOOD[:4] + (2).to_bytes(2, "little") + GOOD[6:],
    "format 0": GOOD[:4] + bytes(2) + GOOD[6:],
    "one byte more": GOOD + b"\0",
    "one byte less": GOOD[:-1],
    "one IPv4 interval more than it holds": GOOD[:8] + (2).to_bytes(4, "little") + GOOD[12:],
    "counts past 2^32 bytes": GOOD[:8] + (2**32 - 1).to_bytes(4, "little") * 2 + GOOD[16:],
    "JSON": json.dumps({"v": 1, "range": {"198.51.100.0/24": ["ban", FAR]}}).encode(),
}


def test_a_table_that_is_not_format_1_is_refused_whole():
    work = [{"base64": b64(value), "addresses": ["198.51.100.1"], "now": 0} for value in JUNK.values()]
    work += [{"base64": b64(value), "addresses": ["198.51.100.1", "2001:db8::1"], "now": 0} for value in (GOOD, EMPTY)]
    *refused, good, empty = drive(config=config(), networks=work)["networks"]
    assert [set(answer) for answer in refused] == [{"error"}] * len(JUNK), dict(zip(JUNK, refused, strict=True))
    assert good == {"ends": [{"ban": FAR, "captcha": 0}] * 2, "verdicts": ["ban", "ban"]}
    assert empty == {"ends": [None, None], "verdicts": [None, None]}


def test_a_junk_table_from_a_cold_start_fails_open():
    keys = [{"name": "ip:192.0.2.7", "value": "captcha"}, network_key(JUNK["wrong magic"])]
    work = [request("198.51.100.1"), request("192.0.2.7"), request("198.51.100.2")]
    output = drive(config=config(), keys=keys, requests=work)
    # No good copy yet: the table adds nothing; the address keys still work.
    assert [verdict(a) for a in output["responses"]] == [None, "captcha", None]
    assert network_problems(output["logs"]) == [
        "network table unusable, the last good copy (if any) kept: "
        "Error: not a network table (it does not start with LKVN)"
    ]


def test_a_junk_table_keeps_the_last_good_copy_and_each_problem_is_said_once():
    # Each junk in place of the table in turn, read at least once (SCOPES_REFRESH=1), the last
    # one three times, a text value among them: the good copy stays, each problem is said once.
    junks = [network_key(value) for value in JUNK.values()] + [network_key("not a table")]
    steps = [{"requests": [request("198.51.100.1")]}]
    steps += [{"put": [junk], "sleep": 1.2, "requests": [request("198.51.100.1")]} for junk in junks]
    steps += [{"sleep": 1.2, "requests": [request("2001:db8::2")]}] * 2
    output = drive(config=config(SCOPES_REFRESH="1"), keys=[network_key(GOOD)], steps=steps)
    assert [verdict(s["responses"][0]) for s in output["steps"]] == ["ban"] * len(steps)
    junk_reads = step_reads(*output["steps"]).count(NETWORKS) - 1
    assert junk_reads >= len(junks) + 2
    # Said when the problem changes, never once per read: three junks do not start with LKVN, and
    # two of them come one after the other.
    problems = network_problems(output["logs"])
    assert len(set(problems)) == len(junks) - 2 and len(problems) == len(junks) - 1 < junk_reads, problems
    assert all(a != b for a, b in itertools.pairwise(problems)), problems


def test_a_missing_table_is_an_empty_one_and_a_new_one_is_applied_after_scopes_refresh():
    newer = table_bytes([("198.51.100.0/24", "ban", FAR), ("203.0.113.0/24", "captcha", FAR)])
    poll = [{"sleep": 0.3, "requests": [request("203.0.113.1")]}] * 10
    steps = [
        {"requests": [request("198.51.100.1"), request("203.0.113.1")]},
        {"put": [network_key(newer)], "sleep": 2.5, "requests": [request("203.0.113.1")]},
        *poll,
        {"delete": [NETWORKS], "sleep": 2.5, "requests": [request("198.51.100.1")]},
        *[{"sleep": 0.3, "requests": [request("198.51.100.1")]}] * 10,
    ]
    output = drive(config=config(SCOPES_REFRESH="2"), keys=[network_key(GOOD)], steps=steps)
    first, refresh, *later = output["steps"][: 2 + len(poll)]
    deleted, *after = output["steps"][2 + len(poll) :]
    assert [verdict(a) for a in first["responses"]] == ["ban", None]
    # After SCOPES_REFRESH the first request starts a read and is served the copy held.
    assert verdict(refresh["responses"][0]) is None and verdict(deleted["responses"][0]) == "ban"
    verdicts = [verdict(s["responses"][0]) for s in later]
    assert verdicts[-1] == "captcha" and verdicts == sorted(verdicts, key=bool)  # once applied, it stays
    verdicts = [verdict(s["responses"][0]) for s in after]
    assert verdicts[-1] is None and verdicts == sorted(verdicts, key=lambda v: v is None)
    assert network_problems(output["logs"]) == []


# --------------------------------------------------------------------------- KV reads per request

ADDRESS_KEY_BAN = "192.0.2.7"
TABLE_BAN = "198.51.100.9"  # an Ip decision the job put in the network table (TABLE_ORIGINS)


def cost_keys(stack) -> list[dict]:
    keys = job_keys(stack, decision(ADDRESS_KEY_BAN), decision("FR", scope="Country", type="captcha"))
    table = table_bytes([(TABLE_BAN, "ban", FAR), ("203.0.113.0/24", "captcha", FAR)])
    return [*keys, network_key(table)]


def test_a_clean_request_costs_one_kv_read_once_warm_and_each_table_is_read_once(stack):
    many = [request(f"10.{i // 250}.{i % 250}.1", country="DE") for i in range(100)]
    steps = [
        {"concurrent": many},  # cold: every request waits on the one read of each table
        {"concurrent": many},  # warm: the tables are in memory
        {"requests": [request("10.9.9.9"), request("2001:db8::9"), request(ADDRESS_KEY_BAN), request(TABLE_BAN)]},
    ]
    cold, warm, one_by_one = drive(config=config(), keys=cost_keys(stack), steps=steps)["steps"]
    read = step_reads(cold)
    assert read.count(NETWORKS) == read.count("ip:scopes") == 1 and len(read) == 102
    assert sorted(step_reads(warm)) == sorted("ip:" + r["address"] for r in many)  # no table read
    assert all(verdict(a) is None for a in cold["responses"] + warm["responses"])
    assert [reads(a) for a in one_by_one["responses"]] == [
        ["ip:10.9.9.9"],
        ["ip:2001:db8::9"],
        [f"ip:{ADDRESS_KEY_BAN}"],
        [f"ip:{TABLE_BAN}"],
    ]
    assert [verdict(a) for a in one_by_one["responses"]] == [None, None, "ban", "ban"]


def test_without_address_keys_a_warm_request_costs_no_kv_read(stack):
    # ADDRESS_KEYS=false, for a job that puts every Ip decision in the network table
    # (TABLE_ORIGINS=*): no address key is read, so one the job left behind is not enforced.
    many = [request(f"10.0.{i}.1") for i in range(50)]
    work = [
        request(TABLE_BAN),
        request("203.0.113.5"),
        request(ADDRESS_KEY_BAN),
        request("10.0.0.1", country="FR"),
        request("2001:db8::9"),
    ]
    steps = [{"concurrent": many}, {"concurrent": many}, {"requests": work}]
    output = drive(config=config(ADDRESS_KEYS="false"), keys=cost_keys(stack), steps=steps)
    cold, warm, one_by_one = output["steps"]
    assert sorted(step_reads(cold)) == [NETWORKS, "ip:scopes"]  # the two tables, once each
    assert step_reads(warm) == [] and step_reads(one_by_one) == []
    assert [verdict(a) for a in one_by_one["responses"]] == ["ban", "captcha", None, "captcha", None]
    assert output["logs"] == []


@pytest.mark.parametrize(("setting", "reads_keys"), [("true", True), ("0", False), ("No", False), ("maybe", True)])
def test_address_keys_is_read_as_a_flag_and_anything_else_reads_them(stack, setting, reads_keys):
    keys = cost_keys(stack)
    output = drive(config=config(ADDRESS_KEYS=setting), keys=keys, requests=[request("10.0.0.1")] * 2)
    assert reads(output["responses"][1]) == (["ip:10.0.0.1"] if reads_keys else [])
    logged = [log["message"] for log in output["logs"]]
    assert logged == (['ADDRESS_KEYS="maybe": not true or false, true used'] if setting == "maybe" else [])


# --------------------------------------------------------------------------- a slow KV never holds a request


def test_a_slow_address_key_read_lets_the_request_through_without_waiting_for_it(stack):
    slow = {f"ip:{ADDRESS_KEY_BAN}": 30, "ip:203.0.113.5": 30}
    steps = [
        {"requests": [request(ADDRESS_KEY_BAN)]},  # warm, and banned
        {"slowReads": slow, "requests": [request(ADDRESS_KEY_BAN), request(ADDRESS_KEY_BAN), request("203.0.113.5")]},
        {"slowReads": {}, "requests": [request(ADDRESS_KEY_BAN)]},
    ]
    output = drive(config=config(KV_TIMEOUT_MS="300"), keys=cost_keys(stack), steps=steps)
    warm, slowed, healed = output["steps"]
    assert verdict(warm["responses"][0]) == "ban" and verdict(healed["responses"][0]) == "ban"
    # Each answered while its read was still on its way (30 s): let through, or the table's captcha.
    assert [verdict(a) for a in slowed["responses"]] == [None, None, "captcha"]
    assert [(reads(a), a["pending"]) for a in slowed["responses"]] == [
        ([f"ip:{ADDRESS_KEY_BAN}"], 1),
        ([f"ip:{ADDRESS_KEY_BAN}"], 1),
        (["ip:203.0.113.5"], 1),
    ]
    assert [log["message"] for log in output["logs"]] == [
        "KV read of an address key failed, request let through: no answer within KV_TIMEOUT_MS (300 ms)"
    ]


def test_a_slow_first_table_read_does_not_hold_a_cold_isolate(stack):
    # Cold: the first requests would wait on the network table's read; past KV_TIMEOUT_MS they
    # go on without it (the address key still applies), and it is applied once it has come.
    slow = {NETWORKS: 3}
    steps = [
        {"slowReads": slow, "concurrent": [request(TABLE_BAN), request(ADDRESS_KEY_BAN), request("10.0.0.1")]},
        {"requests": [request(TABLE_BAN)]},
        {"sleep": 4, "requests": [request(TABLE_BAN)]},
    ]
    output = drive(config=config(KV_TIMEOUT_MS="300"), keys=cost_keys(stack), steps=steps)
    cold, meanwhile, later = output["steps"]
    assert [verdict(a) for a in cold["responses"]] == [None, "ban", None]
    starter = next(a for a in cold["responses"] if NETWORKS in reads(a))
    assert starter["pending"] >= 1  # the table's read, still on its way
    assert step_reads(cold).count(NETWORKS) == 1  # one read, not one per request
    assert verdict(meanwhile["responses"][0]) is None and reads(meanwhile["responses"][0]) == [f"ip:{TABLE_BAN}"]
    assert verdict(later["responses"][0]) == "ban"
    assert network_problems(output["logs"]) == [
        "network table not read yet, requests go on without it meanwhile: no answer within KV_TIMEOUT_MS (300 ms)"
    ]


def test_a_table_read_that_never_comes_does_not_hold_any_request(stack):
    # 30 s: each request of a cold isolate waits KV_TIMEOUT_MS at most, then goes on.
    steps = [
        {"slowReads": {NETWORKS: 30, "ip:scopes": 30}, "requests": [request(ADDRESS_KEY_BAN), request("10.0.0.1")]}
    ]
    output = drive(config=config(KV_TIMEOUT_MS="100"), keys=cost_keys(stack), steps=steps)
    first, second = output["steps"][0]["responses"]
    assert verdict(first) == "ban" and verdict(second) is None
    assert reads(first) == [f"ip:{ADDRESS_KEY_BAN}", NETWORKS, "ip:scopes"] and first["pending"] == 2
    assert reads(second) == ["ip:10.0.0.1"]


def test_a_table_read_that_never_settles_is_given_up_after_30_seconds(stack):
    # A read lost on its way (its request's waitUntil ended) must not stop the isolate from ever
    # reading the table again: past 30 s, the next request starts another read.
    steps = [
        {"slowReads": {NETWORKS: 600}, "requests": [request(TABLE_BAN)]},
        {"sleep": 5, "requests": [request(TABLE_BAN)]},  # still on its way: not read again
        {"slowReads": {}, "sleep": 26, "requests": [request(TABLE_BAN)]},  # lost: read again
        {"sleep": 0.5, "requests": [request(TABLE_BAN)]},  # within SCOPES_REFRESH: the copy held
    ]
    output = drive(config=config(SCOPES_REFRESH="1"), keys=cost_keys(stack), steps=steps)
    assert [step_reads(s).count(NETWORKS) for s in output["steps"]] == [1, 0, 1, 0]
    # A cold isolate: the request that starts the new read waits for it (within KV_TIMEOUT_MS).
    assert [verdict(s["responses"][0]) for s in output["steps"]] == [None, None, "ban", "ban"]


# --------------------------------------------------------------------------- numeric settings


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("KV_TIMEOUT_MS", "99999999", "KV_TIMEOUT_MS=99999999: outside 10..5000, 5000 used"),
        ("KV_TIMEOUT_MS", "Infinity", 'KV_TIMEOUT_MS="Infinity": not a whole number of milliseconds, 300 used'),
        ("KV_TIMEOUT_MS", "1e400", 'KV_TIMEOUT_MS="1e400": not a whole number of milliseconds, 300 used'),
        ("KV_TIMEOUT_MS", "-1", 'KV_TIMEOUT_MS="-1": not a whole number of milliseconds, 300 used'),
        ("SCOPES_REFRESH", "1e400", 'SCOPES_REFRESH="1e400": not a whole number of seconds, 60 used'),
        ("SCOPES_REFRESH", "0", "SCOPES_REFRESH=0: outside 1..3600, 1 used"),
        ("SCOPES_REFRESH", "2147483648", "SCOPES_REFRESH=2147483648: outside 1..3600, 3600 used"),
    ],
)
def test_a_timeout_or_refresh_the_runtime_cannot_use_is_clamped_or_refused_and_said_once(stack, name, value, said):
    # A slow address key (30 s): whatever the setting says, the request does not wait for it.
    steps = [
        {"requests": [request(TABLE_BAN), request("10.0.0.1")]},
        {"slowReads": {f"ip:{ADDRESS_KEY_BAN}": 30}, "requests": [request(ADDRESS_KEY_BAN)]},
    ]
    output = drive(config=config(**{name: value}), keys=cost_keys(stack), steps=steps)
    warm, slowed = output["steps"]
    assert [verdict(a) for a in warm["responses"]] == ["ban", None]
    (late,) = slowed["responses"]
    assert verdict(late) is None and late["pending"] == 1
    assert [log["message"] for log in output["logs"] if log["message"].startswith(name)] == [said]


# --------------------------------------------------------------------------- one verdict, both languages


def random_network(rng: random.Random) -> str:
    """A network as LAPI may hold it: any family, host bits set or not, any spelling."""
    shape = rng.random()
    if shape < 0.4:
        address = ".".join(str(rng.choice((0, 1, 127, 128, 255, rng.randrange(256)))) for _ in "1234")
        return f"{address}/{rng.randint(0, 32)}"
    groups = random_groups(rng)
    if shape < 0.6:  # IPv4-mapped, mostly /96 and longer, sometimes shorter (then it stays IPv6)
        groups[:6] = [0, 0, 0, 0, 0, 0xFFFF]
        return f"{spell_ipv6(groups, rng)}/{rng.choice((rng.randint(96, 128), rng.randint(80, 128)))}"
    return f"{spell_ipv6(groups, rng)}/{rng.randint(0, 128)}"


def near(network: Network, rng: random.Random) -> list[str]:
    """Addresses at, inside and just outside the network, in spellings the Worker must take."""
    top = 2**network.max_prefixlen - 1
    first, last = int(network.network_address), int(network.broadcast_address)
    values = {first, last, max(first - 1, 0), min(last + 1, top), rng.randint(first, last), rng.randint(0, top)}
    spelled = []
    for value in values:
        if network.version == 4:
            address = str(ipaddress.IPv4Address(value))
            spelled.append(f"::ffff:{address}" if rng.random() < 0.3 else address)  # IPv4-mapped too
        else:
            spelled.append(spell_ipv6([value >> (112 - 16 * i) & 0xFFFF for i in range(8)], rng))
    return spelled


def random_table(rng: random.Random, now: int) -> tuple[list[tuple[str, str, int]], list[str]]:
    """Networks, nested and overlapping (subnets of each, the same network twice), with ends
    before and after `now`, and addresses around each of them."""
    entries = []
    addresses = []
    for _ in range(40):
        base = random_network(rng)
        network = canonical_network(base)
        family = [base]
        for _ in range(rng.randint(0, 4)):
            longer = rng.randint(network.prefixlen, network.max_prefixlen)
            inside = int(network.network_address) + rng.randrange(network.num_addresses)
            family.append(str(type(network)((inside, longer), strict=False)))
        if rng.random() < 0.2:
            family.append(base)  # the same network again, with another remediation or end
        for text in family:
            end = rng.choice((now - 1, now, now + 1, now + rng.randint(-2 * HOUR, 2 * HOUR)))  # now: ended
            entries.append((text, rng.choice(("ban", "captcha")), end))
            addresses += near(canonical_network(text), rng)
    return entries, addresses


def python_says(entries: list[tuple[str, str, int]], text: str, now: int) -> tuple[dict | None, str | None]:
    """Straight from ipaddress: the latest ban and captcha ends over the networks holding the
    address, and the verdict at `now`."""
    address = ipaddress.ip_address(job.canonical_address(text))
    holding = [(r, e) for n, r, e in entries if address in canonical_network(n)]
    if not holding:
        return None, None
    ends = {r: max((e for rr, e in holding if rr == r), default=0) for r in ("ban", "captcha")}
    return ends, "ban" if ends["ban"] > now else "captcha" if ends["captcha"] > now else None


def test_the_worker_reads_the_jobs_table_as_python_does():
    seed = int(os.environ.get("WORKER_PROPERTY_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    now = 1_800_000_000
    tables = [random_table(rng, now) for _ in range(20)]
    work = [{"base64": b64(table_bytes(entries)), "addresses": addresses, "now": now} for entries, addresses in tables]
    results = drive(config=config(), networks=work)["networks"]

    differ = []
    outcomes = collections.Counter()
    for (entries, addresses), result in zip(tables, results, strict=True):
        table = intervals(entries)
        for address, ends, said in zip(addresses, result["ends"], result["verdicts"], strict=True):
            expected_ends, expected = python_says(entries, address, now)
            job_verdict = job.networks_verdict(table, job.canonical_address(address), now)
            if (ends, said) != (expected_ends, expected) or job_verdict != expected:
                differ.append((address, ends, said, expected_ends, expected, job_verdict))
            outcomes[said or ("ended" if ends else "outside")] += 1
    assert sum(outcomes.values()) >= 5000
    assert min(outcomes[outcome] for outcome in ("ban", "captcha", "ended", "outside")) > 200, outcomes
    assert not differ, f"WORKER_PROPERTY_SEED={seed}: (address, worker, python, job) {differ[:10]}"


def test_the_tables_nest_and_overlap():
    # What the property above relies on: its tables hold nested networks and the same one twice.
    rng = random.Random(7)
    entries, _ = random_table(rng, 1_800_000_000)
    networks = [canonical_network(text) for text, _, _ in entries]
    assert any(a != b and a.version == b.version and a.subnet_of(b) for a, b in itertools.permutations(networks, 2))
    assert len(set(networks)) < len(networks)
