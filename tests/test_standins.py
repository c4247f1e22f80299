"""The stand-ins are only worth what they refuse: check them against Cloudflare's limits and
CrowdSec's usage-metrics schema."""

from __future__ import annotations

import http.client
import json

import pytest

import lapi_kv_sync as job
from tests.conftest import CF_TOKEN, LAPI_KEY
from tests.standins import ACCOUNT, NAMESPACE, KvStandin, LapiStandin, PushgatewayStandin, decision


@pytest.fixture
def kv():
    with KvStandin(CF_TOKEN) as server:
        yield server


def call(kv, method, suffix, body=None, token=CF_TOKEN, base=None):
    conn = http.client.HTTPConnection("127.0.0.1", kv.server.server_address[1], timeout=5)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    path = (base or kv.base) + suffix
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    answer = conn.getresponse()
    data = json.loads(answer.read())
    conn.close()
    return answer.status, data


@pytest.mark.parametrize(
    "items, status",
    [
        ([{"key": f"ip:{i}", "value": "ban"} for i in range(10_001)], 413),
        ([{"key": "ip:a", "value": "ban", "expiration_ttl": 59}], 400),
        ([{"key": "k" * 513, "value": "ban"}], 414),
        ([{"key": "ip:a", "value": "ban", "metadata": {"s": "x" * 1020}}], 413),
        ([{"key": "ip:a"}], 400),
    ],
)
def test_bulk_write_refused_as_cloudflare_does(kv, items, status):
    answer_status, answer = call(kv, "PUT", "/bulk", items)
    assert answer_status == status and answer["success"] is False and answer["errors"][0]["code"] >= 1000
    assert kv.store == {}


def test_wrong_token_and_limits(kv):
    assert call(kv, "GET", "/keys", token="nope")[0] == 403
    assert call(kv, "GET", "/keys?limit=5")[0] == 400
    assert call(kv, "GET", "/keys?limit=1001")[0] == 400
    assert call(kv, "POST", "/bulk/delete", [f"k{i}" for i in range(10_001)])[0] == 413


def test_pagination_with_opaque_cursor(kv):
    status, _ = call(
        kv, "PUT", "/bulk", [{"key": f"ip:{i:04}", "value": "ban", "expiration_ttl": 600} for i in range(25)]
    )
    assert status == 200
    names, cursor, pages = [], "", 0
    while True:
        _, page = call(kv, "GET", "/keys?prefix=ip:&limit=10" + (f"&cursor={cursor}" if cursor else ""))
        names += [k["name"] for k in page["result"]]
        pages += 1
        cursor = page["result_info"].get("cursor")
        if not cursor:
            break
        assert not cursor.startswith("ip:")
    assert names == [f"ip:{i:04}" for i in range(25)] and pages == 3


def test_keys_expire(kv):
    call(kv, "PUT", "/bulk", [{"key": "ip:a", "value": "ban", "expiration_ttl": 60}])
    assert "ip:a" in kv.live()
    kv.clock_offset = 61
    assert kv.live() == {} and call(kv, "GET", "/keys")[1]["result"] == []


def test_schema_check_catches_a_request_outside_the_schema(kv):
    call(kv, "PUT", "/bulk", {"key": "ip:a", "value": "ban"})  # an object, not an array
    assert any("request" in v for v in kv.violations)
    kv.violations.clear()
    call(kv, "PUT", "/bulk", [{"key": "ip:a", "value": "ban", "expiration_ttl": 120}])
    assert kv.violations == []


@pytest.mark.parametrize("body", ["m 1", "m 1 1700000000000\n", "# TYPE m gauge\n# TYPE m gauge\nm 1\n"])
def test_pushgateway_refuses_what_the_real_one_refuses(body):
    assert PushgatewayStandin.problem(body) is not None
    assert PushgatewayStandin.problem('# TYPE m gauge\nm 1\nn{a="b"} 2.5\n') is None


def post_usage(lapi, body, key=LAPI_KEY, method="POST"):
    conn = http.client.HTTPConnection("127.0.0.1", lapi.server.server_address[1], timeout=5)
    conn.request(method, "/v1/usage-metrics", body=json.dumps(body), headers={"X-Api-Key": key})
    answer = conn.getresponse()
    answer.read()
    conn.close()
    return answer.status


def test_lapi_usage_metrics_answered_and_checked_as_crowdsec_does():
    good = {"remediation_components": [{"version": "1", "utc_startup_timestamp": 1707399316}]}
    with LapiStandin(LAPI_KEY) as lapi:
        assert post_usage(lapi, good) == 201 and lapi.violations == []
        assert post_usage(lapi, good, key="wrong") == 403
        assert post_usage(lapi, {"remediation_components": [{"version": "1"}]}) == 422
        assert lapi.violations and "utc_startup_timestamp" in lapi.violations[0]
        assert post_usage(lapi, good, method="GET") == 404
        lapi.usage_metrics_supported = False  # LAPI before 1.6.3
        assert post_usage(lapi, good) == 404
        assert len(lapi.usage_metrics) == 2 and lapi.queries == []  # not counted as decision reads


def test_the_namespace_get_is_served_as_cloudflare_documents_it_and_nothing_else(kv):
    status, answer = call(kv, "GET", "")
    assert status == 200 and answer["success"] is True and answer["result"]["id"] == kv.base.rsplit("/", 1)[1]
    assert set(answer["result"]) == {"id", "title", "supports_url_encoding"}
    assert call(kv, "GET", "", token="a-revoked-token-0123")[0] == 403
    assert call(kv, "GET", "?x=1")[0] == 400 and kv.violations  # a GET that carries a query
    kv.violations.clear()
    assert call(kv, "DELETE", "")[0] == 404 and call(kv, "PUT", "", body={})[0] == 404
    assert kv.requests["namespace"] == 3


@pytest.mark.parametrize(
    "method, suffix, body, what",
    [
        ("GET", "/keys?prefix=ip%3A&limit=1000", None, "list keys"),
        ("PUT", "/bulk", [{"key": "ip:192.0.2.1", "value": "ban"}], "bulk write"),
        ("POST", "/bulk/delete", ["ip:192.0.2.1"], "bulk delete"),
        ("GET", "", None, "get"),
    ],
)
def test_an_unknown_namespace_gets_cloudflares_404_whatever_the_operation(kv, method, suffix, body, what):
    """Not `a GET takes no query or body` (a list on another namespace once fell through to the
    namespace GET): 404 with Cloudflare's code for a namespace it does not know, nothing stored."""
    other = kv.base.replace(NAMESPACE, "f" * 32)
    status, answer = call(kv, method, suffix, body, base=other)
    assert (status, answer["errors"]) == (404, [{"code": 10013, "message": f"{what}: 'namespace not found'"}])
    assert kv.store == {} and kv.violations == []


def test_another_account_is_refused_not_routed(kv):
    status, answer = call(kv, "GET", "/keys?limit=1000", base=kv.base.replace(ACCOUNT, "e" * 32))
    assert (status, answer["errors"][0]["code"]) == (403, 10000) and kv.violations == []
    status, answer = call(kv, "PUT", "/values/ip:192.0.2.1")  # an operation the stand-in does not serve
    assert (status, answer["errors"][0]["code"]) == (404, 7003)
    status, answer = call(kv, "GET", "/values/ip:192.0.2.1")  # a value read: no such key
    assert (status, answer["errors"][0]["code"]) == (404, 10009)


def test_the_job_told_of_an_unknown_namespace_names_the_setting(stack):
    stack.lapi.decisions = [decision("192.0.2.1")]
    result = stack.run(CF_KV_NAMESPACE_ID="f" * 32)
    assert result.code == job.EXIT_CLOUDFLARE, result.err
    assert "HTTP 404: 10013: list keys: 'namespace not found'" in result.err and "CF_KV_NAMESPACE_ID" in result.err
