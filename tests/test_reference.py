"""Real LAPI 1.4.6 answers, recorded in tests/reference, feed the job."""

from __future__ import annotations

import json
import time
from collections import Counter
from unittest.mock import ANY

import pytest

import lapi_kv_sync as job
from tests.standins import REFERENCE
from tests.test_tables import held_ranges

LAPI = REFERENCE / "crowdsec-lapi-1.4.6"


def load(name: str):
    return json.loads((LAPI / name).read_text())


def test_real_decisions_project_as_specified():
    p = job.project(load("decisions.json"), 1_800_000_000.0, "ip:")
    assert {k: w.remediation for k, w in p.wanted.items()} == {
        "ip:192.0.2.6": "ban",
        "ip:192.0.2.3": "ban",
        "ip:192.0.2.1": "ban",
        "ip:2001:db8::1": "ban",
    }
    # a ban for an hour and a captcha for ten on one address: ban, living as long as the captcha
    assert p.wanted["ip:192.0.2.3"].end == pytest.approx(1_800_000_000.0 + 9 * 3600 + 59 * 60 + 59.336724555)
    assert p.wanted["ip:192.0.2.1"].scenario == "crowdsecurity/ssh-bf"
    assert p.ignored == Counter(scope=2, type=1)


def test_scopes_ip_answer_and_stream_durations():
    p = job.project(load("decisions-scopes-ip.json"), 0.0, "ip:")
    assert len(p.wanted) == 4 and p.ignored == Counter(type=1)
    deleted = load("stream-after-delete.json")["deleted"]
    assert job.parse_go_duration(deleted[0]["duration"]) == pytest.approx(-0.016937648)
    assert job.project(deleted, 0.0, "ip:").ignored == Counter(expired=1)
    assert load("decisions-empty.json") is None


def test_real_answer_through_the_job(stack):
    stack.lapi.answer = (200, (LAPI / "decisions.json").read_bytes(), "application/json; charset=utf-8")
    result = stack.run()
    assert result.code == 0, result.err
    live = stack.kv.live()
    table = json.loads(live.pop("ip:scopes").value)  # its Country decision
    assert {scope: entries for scope, entries in table.items() if scope != "v"} == {"country": {"FR": ["ban", ANY]}}
    assert held_ranges(live.pop("ip:networks").value) == {"198.51.100.0/24": ("ban", ANY)}  # its Range decision
    assert sorted(live) == ["ip:192.0.2.1", "ip:192.0.2.3", "ip:192.0.2.6", "ip:2001:db8::1"]
    assert abs(live["ip:192.0.2.6"].expiration - (time.time() + 89)) < 5
    assert "ignored 1 (expired 0, scope 0, type 1, invalid 0, range_too_large 0, table_full 0)" in result.out


def test_real_empty_and_forbidden_answers(stack):
    stack.lapi.answer = (200, (LAPI / "decisions-empty.json").read_bytes(), "application/json")
    assert stack.run().code == 0
    head, _, body = (LAPI / "forbidden.http").read_bytes().partition(b"\r\n\r\n")
    if not body:
        head, _, body = (LAPI / "forbidden.http").read_bytes().partition(b"\n\n")
    status = int(head.split()[1])
    stack.lapi.answer = (status, body, "application/json; charset=utf-8")
    result = stack.run()
    assert status == 403 and result.code == job.EXIT_LAPI
    assert "refused the bouncer credentials" in result.err
