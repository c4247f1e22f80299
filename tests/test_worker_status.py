"""The reference Worker's status request (worker/status.js) in workerd, against tables the job wrote.

With the Worker's STATUS_TOKEN, `GET …/.well-known/lapi-kv-sync/status` answers what the isolate
holds: the digests there must be the very ones the job put in its tables' metadata. Without the
token (none set, one too short, none sent, a wrong one) the request is any request: it reaches the
origin, or the ban page, with the KV reads of any request. Every KV read is counted by
worker/test/drive.mjs, so the tests count reads, not time.
"""

from __future__ import annotations

import json
import re

import pytest

import lapi_kv_sync as job
from tests.standins import decision
from tests.test_worker import (
    PASS_SECRET,
    SITE,
    TURNSTILE,
    TURNSTILE_SECRET,
    WORKER,
    drive,
    is_ban_page,
    job_keys,
    passed_unchanged,
    wrangler,
)
from tests.test_worker_scopes import reads

STATUS_TOKEN = "status-token-0123456789abcdefghijklmnopqrstuv"  # 46 characters: 32 or more
STATUS_URL = SITE + job.STATUS_PATH
CLIENT = "10.0.0.1"
BANNED = "192.0.2.7"


def config(**vars: str) -> dict:
    return wrangler(**{**TURNSTILE, "STATUS_TOKEN": STATUS_TOKEN, **vars})


def status_request(token: str | None = STATUS_TOKEN, url: str = STATUS_URL, address: str = CLIENT, **extra) -> dict:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return {"url": url, "address": address, "headers": headers, **extra}


def page(address: str = CLIENT) -> dict:
    return {"url": f"{SITE}/page?q=1", "address": address}


def status_of(response: dict) -> dict:
    assert response["status"] == 200 and not response["origin"], response
    assert response["headers"]["content-type"].startswith("application/json")
    assert response["headers"]["cache-control"] == "no-store"
    return json.loads(response["body"])


def without_ages(status: dict) -> dict:
    """The status with each table's age taken out, once checked to be whole seconds: how old a copy
    read during the request is depends on the machine's speed, which no test may."""
    tables = {}
    for name, table in status["tables"].items():
        assert type(table["age"]) is int and table["age"] >= 0
        tables[name] = {k: v for k, v in table.items() if k != "age"}
    return {**status, "tables": tables}


@pytest.fixture
def keys(stack) -> list[dict]:
    """Both tables and an address key, as the job writes them."""
    return job_keys(
        stack,
        decision(BANNED),
        decision("198.51.100.0/24", scope="Range"),
        decision("2001:db8::/32", scope="Range", type="captcha"),
        decision("203.0.113.0/24", scope="Range"),
        decision("FR", scope="Country", type="captcha"),
        decision("64500", scope="AS"),
        decision("64501", scope="AS"),
    )


def table_metadata(keys: list[dict], name: str) -> dict:
    (metadata,) = [k["metadata"] for k in keys if k["name"] == "ip:" + name]
    return metadata


def test_the_version_and_path_are_the_jobs():
    text = (WORKER / "status.js").read_text()
    assert re.search(r'export const WORKER_VERSION = "([^"]+)"', text)[1] == job.__version__
    assert re.search(r'export const STATUS_PATH = "([^"]+)"', text)[1] == job.STATUS_PATH
    assert re.search(r"const MIN_STATUS_TOKEN_LENGTH = ([0-9]+)", text)[1] == str(job.MIN_STATUS_TOKEN_LENGTH)


def test_the_status_says_what_the_isolate_holds_with_the_jobs_digests(stack, keys):
    work = [
        status_request(),  # cold: the status request reads both tables, and the probe
        page(),  # a clean request: its address key only, the tables being warm
        status_request(headers={"Authorization": f"bearer  {STATUS_TOKEN}"}),  # the scheme in any case
        status_request(url=f"{SITE}/app/sub{job.STATUS_PATH}?x=1", address=BANNED),  # any path; a banned client too
    ]
    cold, clean, lower, under_app = drive(config=config(), keys=keys, requests=work)["responses"]
    status = without_ages(status_of(cold))
    networks = next(e for e in stack.kv.live().items() if e[0] == "ip:networks")[1].value
    scopes = next(e for e in stack.kv.live().items() if e[0] == "ip:scopes")[1].value
    intervals = job.decode_networks(networks)
    assert status == {
        "version": job.__version__,
        "prefix": "ip:",
        "kv": {"reads": True, "problem": None},
        "tables": {
            "networks": {
                "digest": table_metadata(keys, "networks")["digest"],
                "bytes": len(networks),
                "entries": {"v4": len(intervals.v4), "v6": len(intervals.v6)},
                "problem": None,
            },
            "scopes": {
                "digest": table_metadata(keys, "scopes")["digest"],
                "bytes": len(scopes),
                "entries": {"country": 1, "as": 2},
                "problem": None,
            },
        },
        "settings": {
            "ADDRESS_KEYS": True,
            "CACHE_TTL": 60,
            "SCOPES_REFRESH": 60,
            "KV_TIMEOUT_MS": int(config()["vars"]["KV_TIMEOUT_MS"]),  # wrangler.toml's, or the tests' bound
            "LOG_ONLY": False,
        },
    }
    assert status["tables"]["networks"]["entries"] == {"v4": 2, "v6": 1}
    assert status["tables"]["networks"]["digest"] == job.Document("networks", networks, 0, 0, {}, 0, []).digest
    # Its reads: the probe (a key never written) and the two tables; a clean request then reads
    # its address key alone, as without any status request.
    assert sorted(reads(cold)) == ["ip:networks", "ip:scopes", "ip:status-probe"]
    assert reads(clean) == [f"ip:{CLIENT}"] and passed_unchanged(clean)
    assert without_ages(status_of(lower)) == without_ages(status_of(under_app)) == status
    assert reads(lower) == reads(under_app) == ["ip:status-probe"]
    for secret in (STATUS_TOKEN, TURNSTILE_SECRET, PASS_SECRET):
        assert secret not in cold["body"] + json.dumps(cold["headers"])


def test_without_the_right_token_the_status_path_is_any_request(keys):
    near = STATUS_TOKEN[:-1] + ("x" if STATUS_TOKEN[-1] != "x" else "y")
    work = [
        page(),  # cold: the address key and both tables
        status_request(token=None),
        status_request(token="wrong"),
        status_request(token=near),  # one character off
        status_request(token=STATUS_TOKEN + "x"),
        status_request(token=STATUS_TOKEN[:-1]),
        status_request(headers={"Authorization": f"Basic {STATUS_TOKEN}"}),
        status_request(headers={"Authorization": STATUS_TOKEN}),
        status_request(method="POST", body="x"),  # the right token, but not a GET
        status_request(token=None, address=BANNED),  # a banned client sees its ban page there too
    ]
    answers = drive(config=config(), keys=keys, requests=work)["responses"]
    for answer, sent in zip(answers[1:-2], work[1:-2], strict=True):
        assert passed_unchanged(answer, url=STATUS_URL), sent
        assert reads(answer) == [f"ip:{CLIENT}"], sent  # a clean request's read, nothing more
    assert passed_unchanged(answers[-2], url=STATUS_URL, method="POST", body="x")
    assert is_ban_page(answers[-1]) and reads(answers[-1]) == [f"ip:{BANNED}"]
    assert all(STATUS_TOKEN not in answer["body"] for answer in answers)


@pytest.mark.parametrize(
    ("token", "said"),
    [
        (None, []),
        ("", []),
        ("   ", []),
        (
            STATUS_TOKEN[:31],
            ["STATUS_TOKEN has 31 characters: status requests are off until it has 32 or more, random"],
        ),
    ],
    ids=["unset", "empty", "blank", "short"],
)
def test_without_a_usable_status_token_set_the_status_path_is_any_request(keys, token, said):
    vars = config()["vars"]
    vars.pop("STATUS_TOKEN")
    if token is not None:
        vars["STATUS_TOKEN"] = token
    work = [page(), status_request(token=token or STATUS_TOKEN), status_request(token=token or STATUS_TOKEN)]
    output = drive(config={**config(), "vars": vars}, keys=keys, requests=work)
    for answer in output["responses"][1:]:
        assert passed_unchanged(answer, url=STATUS_URL) and reads(answer) == [f"ip:{CLIENT}"]
    assert [log["message"] for log in output["logs"]] == said  # said once, not once per request


def test_the_age_of_a_copy_and_a_due_refresh_waited_for(stack, keys):
    newer = job_keys(stack, decision("DE", scope="Country"))  # the job's next table
    (new_scopes,) = [k for k in newer if k["name"] == "ip:scopes"]
    steps = [
        {"requests": [status_request()]},
        {"sleep": 2.2, "requests": [status_request()]},  # held, not due: no table read
        {"put": [new_scopes], "sleep": 1.2, "requests": [status_request()]},  # SCOPES_REFRESH 3: due
    ]
    first, held, due = drive(config=config(SCOPES_REFRESH="3"), keys=keys, steps=steps)["steps"]
    (first,), (held,), (due,) = first["responses"], held["responses"], due["responses"]
    assert status_of(held)["tables"]["scopes"]["age"] >= 2
    assert status_of(held)["tables"]["scopes"]["digest"] == table_metadata(keys, "scopes")["digest"]
    assert reads(held) == ["ip:status-probe"]
    # The refresh the status request started was waited for: the new table's digest, at once.
    assert status_of(due)["tables"]["scopes"]["digest"] == new_scopes["metadata"]["digest"]
    assert status_of(due)["tables"]["scopes"]["entries"] == {"country": 1, "as": 0}
    assert sorted(reads(due)) == ["ip:networks", "ip:scopes", "ip:status-probe"]


def test_no_tables_another_prefix_and_the_settings_in_effect(stack):
    keys = job_keys(stack, decision(BANNED), KV_KEY_PREFIX="crowdsec/")  # no table: none written
    settings = {"KV_KEY_PREFIX": "crowdsec/", "CACHE_TTL": "5", "SCOPES_REFRESH": "1e9", "ADDRESS_KEYS": "no"}
    (answer,) = drive(config=config(**settings, LOG_ONLY="yes"), keys=keys, requests=[status_request()])["responses"]
    status = without_ages(status_of(answer))
    assert status["prefix"] == "crowdsec/"
    assert status["tables"] == {  # read, and found none: an age, no digest
        "networks": {"digest": None, "bytes": 0, "entries": {"v4": 0, "v6": 0}, "problem": None},
        "scopes": {"digest": None, "bytes": 0, "entries": {"country": 0, "as": 0}, "problem": None},
    }
    # As the Worker uses them: CACHE_TTL clamped to 30, SCOPES_REFRESH not a number so 60.
    assert status["settings"] == {
        "ADDRESS_KEYS": False,
        "CACHE_TTL": 30,
        "SCOPES_REFRESH": 60,
        "KV_TIMEOUT_MS": int(config()["vars"]["KV_TIMEOUT_MS"]),
        "LOG_ONLY": True,
    }
    assert sorted(reads(answer)) == ["crowdsec/networks", "crowdsec/scopes", "crowdsec/status-probe"]


def test_a_kv_that_throws_is_said_in_the_status():
    (answer,) = drive(config=config(), brokenKv=True, requests=[status_request()])["responses"]
    status = status_of(answer)
    assert status["kv"] == {"reads": False, "problem": "KV GET failed: 503 Service Unavailable"}
    for name, label in [("networks", "network table"), ("scopes", "scope table")]:
        table = status["tables"][name]
        assert table["digest"] is None and table["age"] is None and table["bytes"] == 0
        assert table["problem"].startswith(f"{label} unusable, the last good copy (if any) kept: Error: KV GET failed")


def test_a_slow_kv_keeps_a_status_request_no_longer_than_any_request(keys):
    """Reads answering 30 s late: the status says what it has after KV_TIMEOUT_MS, the tables
    not read yet and the probe's wait, and answers while those reads are still on their way."""
    slow = {"ip:networks": 30, "ip:status-probe": 30}
    steps = [{"slowReads": slow, "requests": [status_request()]}]
    output = drive(config=config(KV_TIMEOUT_MS="100"), keys=keys, steps=steps)
    (answer,) = output["steps"][0]["responses"]
    status = status_of(answer)
    assert answer["pending"] == 2  # the probe and the network table, still unsettled
    assert status["kv"] == {"reads": False, "problem": "no answer within KV_TIMEOUT_MS (100 ms)"}
    assert status["tables"]["networks"] == {
        "digest": None,
        "bytes": 0,
        "entries": {"v4": 0, "v6": 0},
        "age": None,
        "problem": "network table not read yet",
    }
    assert status["tables"]["scopes"]["digest"] == table_metadata(keys, "scopes")["digest"]
