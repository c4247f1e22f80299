"""The reference Worker's scope table (worker/scopes.js): Range, Country and AS decisions in workerd.

The tables come from the job (run against the stand-ins, as test_worker.py's address keys do);
requests carry Miniflare's placeholder `cf` (country US, AS 395747) plus their own. Every KV
read the Worker makes is counted by worker/test/drive.mjs, so the tests count reads, not time.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import random
import time

import pytest

import lapi_kv_sync as job
from tests.standins import decision
from tests.test_worker import (
    SITE,
    TURNSTILE,
    answer,
    drive,
    is_ban_page,
    is_challenge,
    job_keys,
    only_reads,
    passed_unchanged,
    random_groups,
    signed_pass,
    spell_ipv6,
    visit,
    wrangler,
)

TABLE = "ip:scopes"
HOUR = 3600


def canonical_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The network as the job writes it in the table (host bits cleared, IPv4-mapped as IPv4)."""
    try:
        _, name = job.table_entry("range", text)
    except job.TooBroad:  # the job leaves these out; a table written by hand may still hold one
        network = ipaddress.ip_network(text, strict=False)
        if network.version == 6 and network.network_address.ipv4_mapped is not None and network.prefixlen >= 96:
            return ipaddress.ip_network(f"{network.network_address.ipv4_mapped}/{network.prefixlen - 96}")
        return network
    return ipaddress.ip_network(name)


def canonical_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(job.canonical_address(text))


def table_of(keys: list[dict]) -> dict:
    (value,) = [k["value"] for k in keys if k["name"] == TABLE]
    return json.loads(value)


def with_table(keys: list[dict], document: dict | str) -> list[dict]:
    value = document if isinstance(document, str) else json.dumps(document)
    return [k for k in keys if k["name"] != TABLE] + [{"name": TABLE, "value": value}]


def request(address: str | None, **cf) -> dict:
    return {"url": f"{SITE}/page?q=1", "address": address, **({"cf": cf} if cf else {})}


def config(**vars: str) -> dict:
    """wrangler.toml's, with Turnstile set up: a captcha decision shows the challenge."""
    return wrangler(**TURNSTILE, **vars)


def verdict(response: dict) -> str | None:
    if is_ban_page(response):
        return "ban"
    if is_challenge(response):
        return "captcha"
    assert passed_unchanged(response), response
    return None


def reads(*responses: dict) -> list[str]:
    """The keys the Worker read while answering these (a background read on the one that started it)."""
    assert only_reads(list(responses))
    return [key for response in responses for _, key in response["kv"]]


def step_reads(*steps: dict) -> list[str]:
    return reads(*(response for step in steps for response in step["responses"]))


def table_reads(keys: list[str]) -> int:
    return keys.count(TABLE)


# --------------------------------------------------------------------------- Range: both edges, both families

V4_BAN = "192.0.2.0/24"
V4_CAPTCHA = "203.0.113.64/26"
V6_CAPTCHA = "2001:DB8:0:0::/32"  # as LAPI may keep it: the job writes 2001:db8::/32
MAPPED_BAN = "::ffff:198.51.100.0/120"  # an IPv4-mapped network: the job writes 198.51.100.0/24

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
}


@pytest.fixture
def range_keys(stack) -> list[dict]:
    return job_keys(
        stack,
        decision(V4_BAN, scope="Range"),
        decision(V4_CAPTCHA, scope="Range", type="captcha"),
        decision(V6_CAPTCHA, scope="Range", type="captcha"),
        decision(MAPPED_BAN, scope="Range"),
    )


def test_the_job_writes_canonical_networks(range_keys):
    assert sorted(table_of(range_keys)["range"]) == sorted(
        ["192.0.2.0/24", "203.0.113.64/26", "2001:db8::/32", "198.51.100.0/24"]
    )


def test_a_range_matches_from_its_first_address_to_its_last_and_not_one_further(range_keys):
    answers = drive(config=config(), keys=range_keys, requests=[request(a) for a in EDGES])["responses"]
    got = {address: verdict(answer) for address, answer in zip(EDGES, answers, strict=True)}
    assert got == EDGES
    # One read each once warm: the table was read once, with the first request's address key.
    assert [len(reads(a)) for a in answers] == [2] + [1] * (len(EDGES) - 1)


# --------------------------------------------------------------------------- Country and AS through cf


@pytest.fixture
def cf_keys(stack) -> list[dict]:
    return job_keys(
        stack,
        decision("FR", scope="Country", type="captcha"),
        decision("AS64500", scope="AS"),
        decision("64501", scope="AS", type="captcha"),
        decision("192.0.2.7", type="captcha"),
    )


def test_country_and_as_come_from_cf(cf_keys):
    assert sorted(table_of(cf_keys)["as"]) == ["64500", "64501"] and list(table_of(cf_keys)["country"]) == ["FR"]
    cases = [
        (request("10.0.0.1", country="FR"), "captcha"),
        (request("10.0.0.1", country="DE"), None),
        (request("10.0.0.1", asn=64500), "ban"),
        (request("10.0.0.1", asn=64501), "captcha"),
        (request("10.0.0.1", asn=64502), None),
        (request("10.0.0.1"), None),  # Miniflare's placeholder: US, AS 395747
        (request("10.0.0.1", country="FR", asn=64500), "ban"),  # two table matches: ban beats captcha
        (request("not-an-address", country="FR"), "captcha"),  # no address to look up: the table still applies
        (request("192.0.2.7", asn=64500), "ban"),  # the address key's captcha loses to the AS's ban
    ]
    answers = drive(config=config(), keys=cf_keys, requests=[r for r, _ in cases])["responses"]
    assert [verdict(a) for a in answers] == [expected for _, expected in cases]
    assert reads(answers[7]) == []  # nothing to look up but the table, which is warm


def test_a_solved_challenge_lifts_a_table_captcha_and_never_a_table_ban(cf_keys):
    # The captcha flow is the address key's (test_worker.py), whatever the decision's source.
    client, banned = "10.0.0.1", "192.0.2.7"  # 192.0.2.7: the address key's captcha, AS 64500's ban
    pass_for_banned = signed_pass(banned, "site.test", int(time.time()) + 600)
    work = [
        visit(address=client, cf={"country": "FR"}),  # 0: the challenge
        {**answer("solved|site.test", address=client), "cf": {"country": "FR"}},  # 1: solved: a pass
        visit(address=client, passFrom=1, cf={"country": "FR"}),  # 2: the pass: the origin
        visit(pass_for_banned, address=banned, cf={"asn": 64500}),  # 3: a good pass, an AS ban
        visit(pass_for_banned, address=banned),  # 4: the same pass, where only the captcha holds
    ]
    challenge, solved, passed, ban, lifted = drive(config=config(), keys=cf_keys, requests=work)["responses"]
    assert is_challenge(challenge) and solved["status"] == 303 and passed_unchanged(passed)
    assert is_ban_page(ban) and passed_unchanged(lifted)


# --------------------------------------------------------------------------- precedence and expiry


def test_ban_beats_captcha_across_the_address_key_and_every_table_match(stack):
    keys = job_keys(
        stack,
        decision("192.0.2.7", type="captcha"),  # address key: captcha; its /24: ban
        decision("192.0.2.0/24", scope="Range"),
        decision("198.51.100.9"),  # address key: ban; its country: captcha
        decision("DE", scope="Country", type="captcha"),
        decision("2001:db8::/32", scope="Range", type="captcha"),  # nested: captcha around a ban
        decision("2001:db8:1::/48", scope="Range"),
        decision("10.0.0.0/8", scope="Range", type="captcha"),  # and a ban around a captcha
        decision("10.0.0.0/8", scope="Range"),
        decision("10.1.0.0/16", scope="Range", type="captcha"),
    )
    cases = {
        "192.0.2.7": "ban",
        "198.51.100.9": "ban",
        "2001:db8::1": "captcha",
        "2001:db8:1::1": "ban",
        "2001:db8:1:ffff:ffff:ffff:ffff:ffff": "ban",
        "2001:db8:2::": "captcha",
        "10.1.2.3": "ban",
        "10.2.0.0": "ban",
    }
    work = [request(a, country="DE") if a == "198.51.100.9" else request(a) for a in cases]
    answers = drive(config=config(), keys=keys, requests=work)["responses"]
    assert dict(zip(cases, map(verdict, answers), strict=True)) == cases


def test_an_entry_whose_end_has_passed_is_ignored(stack):
    keys = job_keys(
        stack,
        decision("192.0.2.0/24", scope="Range"),
        decision("192.0.2.0/25", scope="Range", type="captcha"),
        decision("FR", scope="Country"),
        decision("64500", scope="AS", type="captcha"),
    )
    document = table_of(keys)
    past = int(time.time()) - 10
    document["range"]["192.0.2.0/24"][1] = past  # the ban ended; the captcha inside it did not
    document["country"]["FR"][1] = past
    document["as"]["64500"][1] = past
    work = [request("192.0.2.1"), request("192.0.2.200"), request("10.0.0.1", country="FR", asn=64500)]
    answers = drive(config=config(), keys=with_table(keys, document), requests=work)["responses"]
    assert [verdict(a) for a in answers] == ["captcha", None, None]


def test_entries_ending_at_different_times_decide_at_each_moment(stack):
    # One cached table must stay right as its entries end one after another: pure, at given times.
    keys = job_keys(
        stack,
        decision("10.0.0.0/8", scope="Range", type="captcha", seconds=2 * HOUR),
        decision("10.1.0.0/16", scope="Range", seconds=HOUR),
        decision("10.1.2.0/24", scope="Range", type="captcha", seconds=3 * HOUR),
        decision("FR", scope="Country", seconds=4 * HOUR),
    )
    document = table_of(keys)
    end = {network: entry[1] for network, entry in document["range"].items()}
    moments = [end["10.1.0.0/16"] - 1, end["10.1.0.0/16"], end["10.0.0.0/8"], end["10.1.2.0/24"]]
    queries = [
        {"address": address, "cf": cf, "now": now}
        for now in moments
        for address, cf in [("10.1.2.3", {}), ("10.1.3.0", {}), ("10.2.0.0", {}), ("10.1.2.3", {"country": "FR"})]
    ]
    (answers,) = drive(config=config(), scopes=[{"document": document, "verdicts": queries}])["scopes"]
    got = answers["verdicts"]
    assert [got[i : i + 4] for i in range(0, len(got), 4)] == [
        ["ban", "ban", "captcha", "ban"],  # the /16's ban covers the /24 and its captcha
        ["captcha", "captcha", "captcha", "ban"],  # the ban has ended: the captchas show through
        ["captcha", None, None, "ban"],  # the /8's captcha has ended, the /24's holds
        [None, None, None, "ban"],  # only the country's ban is left
    ]


# --------------------------------------------------------------------------- empty, missing, junk


def test_an_empty_or_missing_table_leaves_the_address_keys_in_charge(stack):
    keys = job_keys(stack, decision("192.0.2.7"), decision("2001:db8::1", type="captcha"))
    assert TABLE not in {k["name"] for k in keys}  # no Range, Country or AS decision: no table
    work = [request("192.0.2.7"), request("2001:db8::1"), request("192.0.2.8", country="FR", asn=64500)]
    for table in [None, {"v": 1}, {"v": 1, "range": {}, "country": {}, "as": {}}]:
        loaded = keys if table is None else with_table(keys, table)
        output = drive(config=config(), keys=loaded, requests=work)
        assert [verdict(a) for a in output["responses"]] == ["ban", "captcha", None], table
        assert output["logs"] == []


FAR = 2**40  # an end far off: these entries hold whenever the test runs
JUNK = [  # no version 1 table: nothing in it may be used
    {"v": 2, "range": {"192.0.2.0/24": ["ban", FAR]}},
    {"v": "1", "range": {"192.0.2.0/24": ["ban", FAR]}},
    {"range": {"192.0.2.0/24": ["ban", FAR]}},
    {"v": 1, "range": ["192.0.2.0/24"]},
    {"v": 1, "country": "FR"},
    [1],
    None,
]
ODD_ENTRIES = {  # a version 1 table with entries the Worker does not understand: those are left out
    "v": 1,
    "range": {
        "192.0.2.0/24": ["ban", FAR],
        "192.0.2.0/33": ["ban", FAR],
        "192.0.2.0/24/1": ["ban", FAR],
        "192.0.2.0/-1": ["ban", FAR],
        "example.com/8": ["ban", FAR],
        "10.0.0.0/8": ["throttle", FAR],
        "10.0.0.0/9": ["ban"],
        "10.0.0.0/10": ["ban", "1795615200"],
        "10.0.0.0/11": {"ban": FAR},
    },
    "country": {"fr": ["ban", FAR], "FRA": ["ban", FAR], "DE": ["captcha", FAR]},
    "as": {"AS64500": ["ban", FAR], "-1": ["ban", FAR], "64500": ["ban", FAR]},
}


def test_a_table_that_is_not_version_1_is_refused_whole_and_an_odd_entry_alone():
    work = [{"document": junk} for junk in JUNK]
    cf = [{"country": "DE"}, {"country": "FR"}, {"asn": 64500}, {}]
    verdicts = [{"address": address, "cf": c, "now": 0} for address in ("192.0.2.1", "10.0.0.1") for c in cf]
    work.append({"document": ODD_ENTRIES, "addresses": ["192.0.2.1", "10.0.0.1"], "verdicts": verdicts})
    *refused, odd = drive(config=config(), scopes=work)["scopes"]
    assert all(set(answer) == {"error"} for answer in refused), refused
    assert odd["skipped"] == 12
    assert odd["matches"] == [{"ban": FAR, "captcha": 0}, None]
    assert odd["verdicts"] == ["ban"] * 4 + ["captcha", None, "ban", None]


def scope_table_problems(logs: list[dict]) -> list[str]:
    return [log["message"] for log in logs if "scope table" in log["message"]]


def test_a_junk_table_from_a_cold_start_fails_open(stack):
    keys = job_keys(stack, decision("192.0.2.7", type="captcha"), decision("198.51.100.0/24", scope="Range"))
    work = [request("198.51.100.1"), request("192.0.2.7"), request("198.51.100.2")]
    output = drive(config=config(), keys=with_table(keys, "not json"), requests=work)
    # No good copy yet: the table adds nothing; the address keys still work.
    assert [verdict(a) for a in output["responses"]] == [None, "captcha", None]
    assert len(scope_table_problems(output["logs"])) == 1


def test_a_junk_table_keeps_the_last_good_copy_and_is_reported_once(stack):
    keys = job_keys(stack, decision("198.51.100.0/24", scope="Range"))
    # Each junk in place of the table in turn, each read at least once (SCOPES_REFRESH=1), the
    # last one several times: the good copy stays, and each problem is logged once.
    junks = ["not json", *map(json.dumps, JUNK)]
    steps = [{"requests": [request("198.51.100.1")]}]
    steps += [{"put": with_table([], junk), "sleep": 1.2, "requests": [request("198.51.100.1")]} for junk in junks]
    steps += [{"sleep": 1.2, "requests": [request("198.51.100.2")]}] * 2
    output = drive(config=config(SCOPES_REFRESH="1"), keys=keys, steps=steps)
    assert [verdict(s["responses"][0]) for s in output["steps"]] == ["ban"] * len(steps)
    junk_reads = table_reads(step_reads(*output["steps"])) - 1
    assert junk_reads >= len(junks) + 2  # every junk read, the last one thrice
    # Logged when the problem changes (several junks are "not a version 1 scope table"), never
    # once per read: fewer lines than junk reads, none repeating the line before.
    problems = scope_table_problems(output["logs"])
    assert len(set(problems)) >= 4 and len(problems) <= len(junks) < junk_reads, problems
    assert all(a != b for a, b in itertools.pairwise(problems)), problems


def test_a_table_read_that_fails_is_retried_after_the_refresh_not_per_request(stack):
    keys = job_keys(stack, decision("192.0.2.7"), decision("198.51.100.0/24", scope="Range"))
    steps = [
        {"failReads": [TABLE], "concurrent": [request(f"10.0.0.{i}") for i in range(20)]},
        {"requests": [request("198.51.100.1"), request("192.0.2.7")]},
    ]
    output = drive(config=config(), keys=keys, steps=steps)
    failing, after = output["steps"]
    assert table_reads(step_reads(failing)) == 1 and len(step_reads(failing)) == 21
    assert [verdict(a) for a in after["responses"]] == [None, "ban"]  # fail open; the address key holds
    assert [reads(a) for a in after["responses"]] == [["ip:198.51.100.1"], ["ip:192.0.2.7"]]


# --------------------------------------------------------------------------- KV reads per request


def test_a_clean_request_costs_one_kv_read_once_warm_and_the_table_is_read_once(stack):
    keys = job_keys(
        stack,
        decision("192.0.2.7"),
        decision("198.51.100.0/24", scope="Range"),
        decision("FR", scope="Country", type="captcha"),
        decision("64500", scope="AS"),
    )
    many = [request(f"10.{i // 250}.{i % 250}.1", country="DE") for i in range(100)]
    steps = [
        {"concurrent": many},  # cold: every request waits on the one table read
        {"concurrent": many},  # warm: the table is in memory
        {"requests": [request("10.9.9.9"), request("2001:db8::9"), request("192.0.2.7")]},
    ]
    cold, warm, one_by_one = drive(config=config(), keys=keys, steps=steps)["steps"]
    assert table_reads(step_reads(cold)) == 1 and len(step_reads(cold)) == 101
    assert sorted(step_reads(warm)) == sorted("ip:" + r["address"] for r in many)  # no table read
    assert all(passed_unchanged(a) for a in cold["responses"] + warm["responses"])
    assert [reads(a) for a in one_by_one["responses"]] == [["ip:10.9.9.9"], ["ip:2001:db8::9"], ["ip:192.0.2.7"]]
    assert verdict(one_by_one["responses"][2]) == "ban"


def test_concurrent_requests_read_the_table_at_most_once_per_scopes_refresh(stack):
    keys = job_keys(stack, decision("198.51.100.0/24", scope="Range"))
    batch = [request(f"10.0.0.{i}") for i in range(30)]
    steps = [{"concurrent": batch}] + [{"sleep": 1.2, "concurrent": batch}] * 4
    output = drive(config=config(SCOPES_REFRESH="1"), keys=keys, steps=steps)
    # Each batch comes over a second after the read before it began, so it reads the table again;
    # however slow the machine, no more than once per second of its own plus the one it starts with.
    for done in output["steps"]:
        keys_read = step_reads(done)
        assert 1 <= table_reads(keys_read) <= 1 + done["seconds"], (keys_read, done["seconds"])
        assert len(keys_read) - table_reads(keys_read) == len(batch)


def test_the_table_is_read_again_after_scopes_refresh_and_a_missing_one_is_empty(stack):
    keys = job_keys(stack, decision("198.51.100.0/24", scope="Range"))
    newer = job_keys(stack, decision("198.51.100.0/24", scope="Range"), decision("203.0.113.0/24", scope="Range"))
    poll = [{"sleep": 0.3, "requests": [request("203.0.113.1")]}] * 10
    steps = [
        {"requests": [request("203.0.113.1")]},
        # After SCOPES_REFRESH, the first request starts a read and is served the copy the isolate
        # holds; the read runs in the background, and later requests see the new table.
        {"put": with_table([], table_of(newer)), "sleep": 2.5, "requests": [request("203.0.113.1")]},
        *poll,
        # The job deletes an empty table: no key is an empty table, not a failed read.
        {"delete": [TABLE], "sleep": 2.5, "requests": [request("203.0.113.1")]},
        *poll,
    ]
    output = drive(config=config(SCOPES_REFRESH="2"), keys=keys, steps=steps)
    first, refresh, *later = output["steps"][: 2 + len(poll)]
    deleted, *after = output["steps"][2 + len(poll) :]
    assert verdict(first["responses"][0]) is None and table_reads(step_reads(first)) == 1
    assert verdict(refresh["responses"][0]) is None and verdict(deleted["responses"][0]) == "ban"
    verdicts = [verdict(s["responses"][0]) for s in later]
    assert verdicts[-1] == "ban" and verdicts == sorted(verdicts, key=bool)  # once applied, it stays
    verdicts = [verdict(s["responses"][0]) for s in after]
    assert verdicts[-1] is None and verdicts == sorted(verdicts, key=lambda v: v is None)
    assert table_reads(step_reads(*output["steps"])) >= 3
    assert scope_table_problems(output["logs"]) == []


# --------------------------------------------------------------------------- one match, both sides


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


def near(network: ipaddress.IPv4Network | ipaddress.IPv6Network, rng: random.Random) -> list[str]:
    """Addresses at, inside and just outside the network, in spellings the Worker must take."""
    top = 2**network.max_prefixlen - 1
    first, last = int(network.network_address), int(network.broadcast_address)
    values = {first, last, max(first - 1, 0), min(last + 1, top), rng.randint(first, last), rng.randint(0, top)}
    addresses = [ipaddress.ip_address(v) if network.version == 4 else ipaddress.IPv6Address(v) for v in values]
    spelled = []
    for address in addresses:
        if address.version == 4 and rng.random() < 0.3:
            spelled.append(f"::ffff:{address}")  # the client as an IPv4-mapped IPv6 address
        elif address.version == 6:
            spelled.append(spell_ipv6([int(address) >> (112 - 16 * i) & 0xFFFF for i in range(8)], rng))
        else:
            spelled.append(str(address))
    return spelled


def test_the_worker_matches_a_range_as_python_does():
    seed = int(os.environ.get("WORKER_PROPERTY_SEED") or random.randrange(2**32))
    rng = random.Random(seed)

    # One network a table: does the address fall in it?
    singles = []
    for _ in range(800):
        text = random_network(rng)
        singles.append((text, canonical_network(text), near(canonical_network(text), rng)))
    # Many networks, nested and overlapping, one table: the latest ban and captcha end over every
    # network holding the address (the disjoint intervals the Worker builds at load).
    bases = [random_network(rng) for _ in range(60)]
    crowd = {}
    for base in bases:
        network = canonical_network(base)
        for _ in range(rng.randint(1, 4)):
            longer = rng.randint(network.prefixlen, network.max_prefixlen)
            inside = int(network.network_address) + rng.randrange(network.num_addresses)
            sub = type(network)((inside, longer), strict=False)
            crowd[str(sub)] = [rng.choice(("ban", "captcha")), rng.randint(1, 10)]
        crowd[base] = [rng.choice(("ban", "captcha")), rng.randint(1, 10)]
    crowd_addresses = [a for base in bases for _ in range(8) for a in near(canonical_network(base), rng)]

    work = [
        {"document": {"v": 1, "range": {text: ["ban", 1]}}, "addresses": addresses} for text, _, addresses in singles
    ]
    work.append({"document": {"v": 1, "range": crowd}, "addresses": crowd_addresses})
    results = drive(config=config(), scopes=work)["scopes"]

    differ = []
    matches = [result["matches"] for result in results]
    for (text, network, addresses), got in zip(singles, matches[:-1], strict=True):
        for address, match in zip(addresses, got, strict=True):
            if (canonical_address(address) in network) != (match is not None):
                differ.append((text, address, match))
    networks = [(canonical_network(text), remediation, end) for text, (remediation, end) in crowd.items()]
    for address, match in zip(crowd_addresses, matches[-1], strict=True):
        holding = [(r, e) for n, r, e in networks if canonical_address(address) in n]
        expected = {r: max((e for rr, e in holding if rr == r), default=0) for r in ("ban", "captcha")}
        if (match or None) != (expected if holding else None):
            differ.append(("crowd", address, match, expected))
    checked = sum(len(a) for _, _, a in singles) + len(crowd_addresses)
    assert checked > 5000 and sum(a is not None for got in matches for a in got) > 1000
    assert not differ, f"WORKER_PROPERTY_SEED={seed}: {differ[:10]}"
