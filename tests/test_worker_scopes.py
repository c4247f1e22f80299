"""The reference Worker's scope table (worker/scopes.js): Country and AS decisions in workerd.

The tables come from the job (run against the stand-ins, as test_worker.py's address keys do);
requests carry Miniflare's placeholder `cf` (country US, AS 395747) plus their own. Every KV
read the Worker makes is counted by worker/test/drive.mjs, so the tests count reads, not time.
The reading of a table (once per SCOPES_REFRESH, one read for concurrent requests, the last good
copy kept, each problem logged once: worker/held.js) is the network table's too; it is tested
here on the scope table, and its points that differ for a binary table in test_worker_networks.py.
Range decisions are the network table's (test_worker_networks.py).
"""

from __future__ import annotations

import base64
import itertools
import json
import time

import pytest

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
    signed_pass,
    visit,
    wrangler,
)

TABLE = "ip:scopes"
NETWORKS = "ip:networks"
HOUR = 3600


def table_of(keys: list[dict]) -> dict:
    # The job sends the tables in base64 (job_keys hands on such a value as it is kept: bytes).
    (value,) = [k.get("value") or base64.b64decode(k["base64"]) for k in keys if k["name"] == TABLE]
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


# --------------------------------------------------------------------------- ends


def test_an_entry_whose_end_has_passed_is_ignored(stack):
    keys = job_keys(
        stack,
        decision("FR", scope="Country"),
        decision("FR", scope="Country", type="captcha"),
        decision("64500", scope="AS", type="captcha"),
        decision("64501", scope="AS"),
    )
    document = table_of(keys)
    past = int(time.time()) - 10
    document["country"]["FR"][1] = past  # FR's ban ended (the job keeps the stronger entry)
    document["as"]["64500"][1] = past
    work = [request("10.0.0.1", country="FR"), request("10.0.0.1", asn=64500), request("10.0.0.1", asn=64501)]
    answers = drive(config=config(), keys=with_table(keys, document), requests=work)["responses"]
    assert [verdict(a) for a in answers] == [None, None, "ban"]


def test_entries_ending_at_different_times_decide_at_each_moment(stack):
    # One cached table must stay right as its entries end one after another: pure, at given times.
    keys = job_keys(
        stack,
        decision("FR", scope="Country", type="captcha", seconds=2 * HOUR),
        decision("64500", scope="AS", seconds=HOUR),
        decision("64501", scope="AS", type="captcha", seconds=3 * HOUR),
        decision("DE", scope="Country", seconds=4 * HOUR),
    )
    document = table_of(keys)
    end = {**document["country"], **document["as"]}
    moments = [end["64500"][1] - 1, end["64500"][1], end["FR"][1], end["64501"][1]]
    cfs = [{"country": "FR", "asn": 64500}, {"country": "FR", "asn": 64501}, {"asn": 64501}, {"country": "DE"}]
    (answers,) = drive(
        config=config(),
        scopes=[{"document": document, "verdicts": [{"cf": cf, "now": now} for now in moments for cf in cfs]}],
    )["scopes"]
    got = answers["verdicts"]
    assert [got[i : i + 4] for i in range(0, len(got), 4)] == [
        ["ban", "captcha", "captcha", "ban"],  # AS 64500's ban covers FR's captcha
        ["captcha", "captcha", "captcha", "ban"],  # the ban has ended: the captchas show through
        [None, "captcha", "captcha", "ban"],  # FR's captcha has ended, AS 64501's holds
        [None, None, None, "ban"],  # only DE's ban is left
    ]


# --------------------------------------------------------------------------- empty, missing, junk


def test_an_empty_or_missing_table_leaves_the_address_keys_in_charge(stack):
    keys = job_keys(stack, decision("192.0.2.7"), decision("2001:db8::1", type="captcha"))
    assert TABLE not in {k["name"] for k in keys}  # no Country or AS decision: no table
    work = [request("192.0.2.7"), request("2001:db8::1"), request("192.0.2.8", country="FR", asn=64500)]
    for table in [None, {"v": 1}, {"v": 1, "country": {}, "as": {}}]:
        loaded = keys if table is None else with_table(keys, table)
        output = drive(config=config(), keys=loaded, requests=work)
        assert [verdict(a) for a in output["responses"]] == ["ban", "captcha", None], table
        assert output["logs"] == []


FAR = 2**40  # an end far off: these entries hold whenever the test runs
JUNK = [  # no version 1 table: nothing in it may be used
    {"v": 2, "country": {"FR": ["ban", FAR]}},
    {"v": "1", "country": {"FR": ["ban", FAR]}},
    {"country": {"FR": ["ban", FAR]}},
    {"v": 1, "country": ["FR"]},
    {"v": 1, "as": "64500"},
    [1],
    None,
]
ODD_ENTRIES = {  # a version 1 table with entries the Worker does not understand: those are left out
    "v": 1,
    "country": {
        "fr": ["ban", FAR],
        "FRA": ["ban", FAR],
        "DE": ["captcha", FAR],
        "IT": ["throttle", FAR],
        "ES": ["ban"],
        "PT": ["ban", "1795615200"],
        "NL": {"ban": FAR},
    },
    "as": {"AS64500": ["ban", FAR], "-1": ["ban", FAR], "64500": ["ban", FAR], "0064501": ["captcha", FAR]},
}


def test_a_table_that_is_not_version_1_is_refused_whole_and_an_odd_entry_alone():
    cfs = [{"country": "DE"}, {"country": "FR"}, {"country": "fr"}, {"asn": 64500}, {"asn": 64501}, {"country": "IT"}]
    work = [{"document": junk} for junk in JUNK]
    work.append({"document": ODD_ENTRIES, "verdicts": [{"cf": cf, "now": 0} for cf in cfs]})
    *refused, odd = drive(config=config(), scopes=work)["scopes"]
    assert all(set(answer) == {"error"} for answer in refused), refused
    assert odd["skipped"] == 8 and odd["ranges"] == 0
    assert odd["verdicts"] == ["captcha", None, None, "ban", "captcha", None]


def scope_table_problems(logs: list[dict]) -> list[str]:
    return [log["message"] for log in logs if "scope table" in log["message"]]


def test_ranges_from_an_older_job_are_said_once_and_the_rest_used(stack):
    # Range decisions are the network table's: a scope table that still holds some (written by an
    # older job) is used for Country and AS, and the Worker says once that it leaves the ranges.
    keys = job_keys(stack, decision("FR", scope="Country"))
    document = {**table_of(keys), "range": {"192.0.2.0/24": ["ban", FAR]}}
    work = [request("192.0.2.1"), request("10.0.0.1", country="FR"), request("192.0.2.2")]
    output = drive(config=config(), keys=with_table(keys, document), requests=work)
    assert [verdict(a) for a in output["responses"]] == [None, "ban", None]
    assert scope_table_problems(output["logs"]) == [
        "scope table: 1 ranges, which this Worker reads from the network table only"
    ]


def test_a_junk_table_from_a_cold_start_fails_open(stack):
    keys = job_keys(stack, decision("192.0.2.7", type="captcha"), decision("FR", scope="Country"))
    work = [request("10.0.0.1", country="FR"), request("192.0.2.7"), request("10.0.0.2", country="FR")]
    output = drive(config=config(), keys=with_table(keys, "not json"), requests=work)
    # No good copy yet: the table adds nothing; the address keys still work.
    assert [verdict(a) for a in output["responses"]] == [None, "captcha", None]
    assert len(scope_table_problems(output["logs"])) == 1


def test_a_junk_table_keeps_the_last_good_copy_and_is_reported_once(stack):
    keys = job_keys(stack, decision("64500", scope="AS"))
    # Each junk in place of the table in turn, each read at least once (SCOPES_REFRESH=1), the
    # last one several times: the good copy stays, and each problem is logged once.
    junks = ["not json", *map(json.dumps, JUNK)]
    steps = [{"requests": [request("10.0.0.1", asn=64500)]}]
    steps += [
        {"put": with_table([], junk), "sleep": 1.2, "requests": [request("10.0.0.1", asn=64500)]} for junk in junks
    ]
    steps += [{"sleep": 1.2, "requests": [request("10.0.0.2", asn=64500)]}] * 2
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
    keys = job_keys(stack, decision("192.0.2.7"), decision("FR", scope="Country"))
    steps = [
        {"failReads": [TABLE], "concurrent": [request(f"10.0.0.{i}") for i in range(20)]},
        {"requests": [request("10.0.0.1", country="FR"), request("192.0.2.7")]},
    ]
    output = drive(config=config(), keys=keys, steps=steps)
    failing, after = output["steps"]
    # One read of each table, one of each address key.
    assert table_reads(step_reads(failing)) == 1 and len(step_reads(failing)) == 22
    assert [verdict(a) for a in after["responses"]] == [None, "ban"]  # fail open; the address key holds
    assert [reads(a) for a in after["responses"]] == [["ip:10.0.0.1"], ["ip:192.0.2.7"]]
    assert len(scope_table_problems(output["logs"])) == 1


# --------------------------------------------------------------------------- KV reads per request


def test_concurrent_requests_read_the_table_at_most_once_per_scopes_refresh(stack):
    keys = job_keys(stack, decision("FR", scope="Country"))
    batch = [request(f"10.0.0.{i}") for i in range(30)]
    steps = [{"concurrent": batch}] + [{"sleep": 1.2, "concurrent": batch}] * 4
    output = drive(config=config(SCOPES_REFRESH="1"), keys=keys, steps=steps)
    # Each batch comes over a second after the read before it began, so it reads the table again;
    # however slow the machine, no more than once per second of its own plus the one it starts with.
    for done in output["steps"]:
        keys_read = step_reads(done)
        assert 1 <= table_reads(keys_read) <= 1 + done["seconds"], (keys_read, done["seconds"])
        assert keys_read.count(NETWORKS) == table_reads(keys_read)  # the network table alike
        assert len(keys_read) - 2 * table_reads(keys_read) == len(batch)


def test_the_table_is_read_again_after_scopes_refresh_and_a_missing_one_is_empty(stack):
    keys = job_keys(stack, decision("FR", scope="Country"))
    newer = job_keys(stack, decision("FR", scope="Country"), decision("DE", scope="Country"))
    poll = [{"sleep": 0.3, "requests": [request("10.0.0.1", country="DE")]}] * 10
    steps = [
        {"requests": [request("10.0.0.1", country="DE")]},
        # After SCOPES_REFRESH, the first request starts a read and is served the copy the isolate
        # holds; the read runs in the background, and later requests see the new table.
        {"put": with_table([], table_of(newer)), "sleep": 2.5, "requests": [request("10.0.0.1", country="DE")]},
        *poll,
        # The job deletes an empty table: no key is an empty table, not a failed read.
        {"delete": [TABLE], "sleep": 2.5, "requests": [request("10.0.0.1", country="DE")]},
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
