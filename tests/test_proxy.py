"""HTTPS_PROXY, HTTP_PROXY and NO_PROXY: read as curl and Python read them, Cloudflare reached
through a CONNECT tunnel with TLS checked end to end, in-cluster services sent direct."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import subprocess
import sys

import pytest
import trustme

import lapi_kv_sync as job
from tests.conftest import CF_TOKEN, LAPI_KEY, SCRIPT, Stack, assert_no_secret
from tests.standins import (
    ACCOUNT,
    NAMESPACE,
    KvStandin,
    LapiStandin,
    ProxyStandin,
    PushgatewayStandin,
    decision,
)

PROXY_USER, PROXY_PASSWORD = "kvsync", "proxy-pass-0123456789"
KV_HOST = "kv.cloudflare.test"  # a name no DNS knows: only the proxy can reach it (as the stand-in's hosts say)

# --------------------------------------------------------------------------- reading the variables


def proxies(**env: str) -> job.Proxies:
    base = {"CF_ACCOUNT_ID": ACCOUNT, "CF_KV_NAMESPACE_ID": NAMESPACE, "CF_API_TOKEN": CF_TOKEN, "LAPI_KEY": LAPI_KEY}
    return job.load_config({**base, **env}).proxies


def test_the_lower_case_variable_wins_as_with_curl_and_python():
    assert str(proxies(HTTPS_PROXY="http://upper:3128", https_proxy="http://lower:3128").https).startswith(
        "the proxy lower:3128 (https_proxy)"
    )
    assert proxies(HTTPS_PROXY="http://upper:3128", https_proxy="").https is None  # empty lower case: off
    assert proxies(HTTPS_PROXY="http://upper:3128").https.host == "upper"
    both = proxies(HTTP_PROXY="http://p:8080", NO_PROXY="a", no_proxy=".svc, .cluster.local")
    assert both.https is None and both.http.port == 8080 and both.no_proxy == ("svc", "cluster.local")


def test_host_port_alone_is_an_http_proxy_and_credentials_become_proxy_authorization():
    proxy = proxies(HTTPS_PROXY="u%40corp:p%3Ass@proxy.corp:3128").https
    assert (proxy.host, proxy.port, proxy.user, proxy.password) == ("proxy.corp", 3128, "u@corp", "p:ss")
    assert proxy.authorization == "Basic " + base64.b64encode(b"u@corp:p:ss").decode()
    assert "p:ss" not in repr(proxy) and "p:ss" not in str(proxy)


@pytest.mark.parametrize(
    "value",
    [
        "socks5://proxy:1080",
        "https://proxy:3128",
        "http://proxy",  # no port: curl would say 1080, Python 80
        "http://proxy:0",
        "http://proxy:99999",
        "http://proxy:3128/path",
        "http://[::1:3128",
        "http://a..b:3128",
    ],
)
def test_a_proxy_that_is_not_http_host_port_is_a_configuration_error_naming_the_variable(stack, value):
    result = stack.run(HTTPS_PROXY=value.replace("proxy", "user:secret-proxy-password@proxy"))
    assert result.code == job.EXIT_CONFIG
    assert "HTTPS_PROXY" in result.err and "secret-proxy-password" not in result.err
    assert sum(stack.kv.requests.values()) == 0 and stack.lapi.queries == []


@pytest.mark.parametrize(
    "value",
    [
        "http://kvsync:{password}@proxy:3128",  # a password with "/" (base64) not percent-encoded
        "kvsync:{password}@proxy:3128",
        "http://kvsync:se://{password}@proxy:3128",  # "://" in the password
        "kvsync:se://{password}@proxy:3128",
        "http://kvsync:{password}@proxy",  # no port as well
    ],
)
def test_a_bad_proxy_url_is_named_without_any_of_its_password(value):
    password = "Zm9v+YmFy/c2VjcmV0=="
    with pytest.raises(job.ConfigError) as raised:
        proxies(HTTPS_PROXY=value.format(password=password))
    message = "; ".join(raised.value.problems)
    assert "HTTPS_PROXY" in message and "@proxy" in message
    assert not any(part in message for part in ("Zm9v", "c2VjcmV0", "kvsync:se")), message


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "direct"),
    [
        ("*", "api.cloudflare.com", 443, True),
        ("", "api.cloudflare.com", 443, False),
        ("cluster.local", "crowdsec-service.crowdsec.svc.cluster.local", 8080, True),
        (".cluster.local", "crowdsec-service.crowdsec.svc.cluster.local", 8080, True),
        ("cluster.local", "cluster.local", 8080, True),
        ("cluster.local", "notcluster.local", 8080, False),
        ("svc, .cluster.local ,", "pushgateway.monitoring.svc", 9091, True),
        ("CloudFlare.com", "API.cloudflare.COM", 443, True),
        ("10.0.0.0/8", "10.96.0.10", 8080, True),
        ("10.0.0.0/8", "11.0.0.1", 8080, False),
        ("10.0.0.0/8", "ten.example", 8080, False),  # a name is never looked up to match a CIDR
        ("192.0.2.7", "192.0.2.7", 80, True),
        ("fd00::/8", "fd00::1", 80, True),
        ("[::1]", "::1", 80, True),
        ("[::1]:8080", "::1", 80, False),
        ("lapi:8080", "lapi", 8080, True),
        ("lapi:8080", "lapi", 8081, False),
        # `*.` as Go (kubectl, Helm, containerd) reads it: many clusters' NO_PROXY is written so
        ("*.svc.cluster.local", "crowdsec-service.crowdsec.svc.cluster.local", 8080, True),
        ("*.cluster.local", "notcluster.local", 8080, False),
    ],
)
def test_no_proxy_as_curl_and_python_read_it(no_proxy, host, port, direct):
    entries = job.no_proxy_entries(no_proxy)
    assert job.bypasses_proxy(entries, host, port) is direct
    through = job.Proxies(job.Proxy("proxy", 3128, "HTTPS_PROXY"), None, entries)
    assert (through.for_url("https", host, port) is None) is direct
    assert through.for_url("http", host, port) is None  # no HTTP_PROXY: plain HTTP goes direct


# --------------------------------------------------------------------------- whole runs through the proxy


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def proxied(ca, tmp_path):
    """LAPI and the Pushgateway in the cluster (plain HTTP on 127.0.0.1), the KV over TLS under a
    name only the proxy can reach, and the proxy; the CA the KV's certificate comes from."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(KV_HOST).configure_cert(context)
    kv = KvStandin(CF_TOKEN)
    kv.serve_tls(context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    with LapiStandin(LAPI_KEY) as lapi, kv, PushgatewayStandin() as push, ProxyStandin() as proxy:
        proxy.hosts[KV_HOST] = "127.0.0.1"
        proxy.credentials = f"{PROXY_USER}:{PROXY_PASSWORD}"
        lapi.decisions = [decision("192.0.2.1"), decision("2001:db8::1", 600, "captcha")]
        yield Stack(lapi, kv, push), proxy, tmp_path / "ca.pem"
        assert kv.violations == []


def through_proxy(stack: Stack, proxy: ProxyStandin, **extra: str) -> dict[str, str]:
    proxy_url = f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{proxy.server.server_address[1]}"
    settings = {
        "CF_API_URL": f"https://{KV_HOST}:{stack.kv.server.server_address[1]}/client/v4",
        "HTTPS_PROXY": proxy_url,
        "HTTP_PROXY": proxy_url,
        "NO_PROXY": "localhost,127.0.0.1,.svc,.cluster.local",  # the in-cluster LAPI and Pushgateway
    }
    return stack.env(**{**settings, **extra})


def test_a_whole_run_reaches_cloudflare_through_a_connect_tunnel(proxied):
    stack, proxy, ca_file = proxied
    env = {"PATH": os.environ.get("PATH", ""), "SSL_CERT_FILE": str(ca_file), **through_proxy(stack, proxy)}
    secrets = (*stack.secrets, PROXY_PASSWORD)
    for _ in (1, 2):
        done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
        assert_no_secret(done.stdout, done.stderr, secrets=secrets)
        assert done.returncode == 0, done.stderr
    assert {k: e.value for k, e in stack.kv.live().items()} == {"ip:192.0.2.1": "ban", "ip:2001:db8::1": "captcha"}
    # Every Cloudflare request went through the tunnel, to the host named in CF_API_URL, with the
    # credentials; LAPI and the Pushgateway (NO_PROXY) went direct: the proxy saw nothing of them.
    kv_port = stack.kv.server.server_address[1]
    authorization = "Basic " + base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()
    assert {(r.method, r.target, r.authorization) for r in proxy.requests} == {
        ("CONNECT", f"{KV_HOST}:{kv_port}", authorization)
    }
    assert len(proxy.requests) == 2  # one tunnel a run, kept alive for every Cloudflare call
    assert stack.kv.requests["list"] == 2 and stack.lapi.queries and stack.push.pushes


def test_tls_through_the_tunnel_checks_the_target_not_the_proxy(proxied):
    """The certificate is checked against the name in CF_API_URL: one the system does not trust
    fails the run, although the proxy itself answered."""
    stack, proxy, _ = proxied
    result = stack.run(**through_proxy(stack, proxy))  # no SSL_CERT_FILE: the KV's CA is not trusted
    assert result.code == job.EXIT_CLOUDFLARE
    assert "CERTIFICATE_VERIFY_FAILED" in result.err
    assert proxy.requests and all(r.method == "CONNECT" for r in proxy.requests)
    assert stack.kv.live() == {}


def test_plain_http_goes_through_the_proxy_in_absolute_form_unless_no_proxy_says(stack):
    stack.lapi.decisions = [decision("192.0.2.1")]
    with ProxyStandin() as proxy:
        proxy.credentials = f"{PROXY_USER}:{PROXY_PASSWORD}"
        proxy_url = f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{proxy.server.server_address[1]}"
        result = stack.run(HTTP_PROXY=proxy_url)  # every stand-in is http:// here: all through the proxy
        assert result.code == 0, result.err
        assert PROXY_PASSWORD not in result.out + result.err
        targets = [(r.method, r.target.split("?")[0]) for r in proxy.requests]
        assert targets == [
            ("GET", f"{stack.lapi.url}/v1/decisions"),
            ("GET", f"{stack.kv.api_url}/accounts/{ACCOUNT}/storage/kv/namespaces/{NAMESPACE}/keys"),
            ("PUT", f"{stack.kv.api_url}/accounts/{ACCOUNT}/storage/kv/namespaces/{NAMESPACE}/bulk"),
            ("PUT", f"{stack.push.url}/metrics/job/crowdsec-kv-sync"),
        ]
        assert {k: e.value for k, e in stack.kv.live().items()} == {"ip:192.0.2.1": "ban"}
        assert stack.push.value("crowdsec_kv_sync_success") == 1
        proxy.requests.clear()
        lapi_host = stack.lapi.url.removeprefix("http://")
        assert stack.run(HTTP_PROXY=proxy_url, no_proxy=f"{lapi_host},other.example").code == 0
        assert [r.target for r in proxy.requests if "/v1/decisions" in r.target] == []  # LAPI went direct
        assert [r.method for r in proxy.requests] == ["GET", "PUT"]  # the listing and the push did not


@pytest.mark.parametrize("status", [403, 407])
def test_a_proxy_that_refuses_the_tunnel_fails_the_run_at_once(proxied, status):
    stack, proxy, _ = proxied
    proxy.refuse = status
    result = stack.run(**through_proxy(stack, proxy))
    assert result.code == job.EXIT_CLOUDFLARE
    port = proxy.server.server_address[1]
    assert f"refused CONNECT {KV_HOST}:" in result.err and f"HTTP {status}" in result.err
    assert f"the proxy 127.0.0.1:{port} (HTTPS_PROXY)" in result.err
    assert ("allow list" if status == 403 else "the proxy refused the credentials in HTTPS_PROXY") in result.err
    assert PROXY_PASSWORD not in result.err
    assert len(proxy.requests) == 1 and result.sleeps == []  # its final word: not retried
    assert stack.kv.live() == {} and stack.lapi.queries  # LAPI read, KV never reached
    assert stack.push.value("crowdsec_kv_sync_exit_code") == job.EXIT_CLOUDFLARE


# Where each answer is cut (its reason at 120 characters, a head that is not HTTP at 80 bytes),
# with the password across the cut.
@pytest.mark.parametrize(("head", "pad"), [(b"HTTP/1.1 407 %s\r\n\r\n", 110), (b"HTTQ/9 %s\r\n\r\n", 63)])
def test_a_proxy_quoting_the_password_in_its_answer_gets_it_redacted_before_the_cut(head, pad):
    """Its answer is cut to a snippet: redacted after the cut, the password's head would remain."""
    proxy = job.Proxy("proxy.corp", 3128, "HTTPS_PROXY", PROXY_USER, PROXY_PASSWORD)
    http = job.Http(job.SYSTEM_CLOCK, 5, job.SYSTEM_CLOCK.monotonic() + 30, proxies=job.Proxies(proxy))
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(head % (b"x" * pad + PROXY_PASSWORD.encode()))
        with pytest.raises(job.ProxyError) as raised:
            http._tunnel(ours, proxy, (KV_HOST, 443), 5)
    assert "proxy-pass" not in str(raised.value) and "[redacted]" in str(raised.value)


def test_the_proxy_wants_credentials_the_variable_does_not_give(proxied):
    stack, proxy, _ = proxied
    port = proxy.server.server_address[1]
    result = stack.run(**through_proxy(stack, proxy, HTTPS_PROXY=f"http://127.0.0.1:{port}"))
    assert result.code == job.EXIT_CLOUDFLARE and "HTTP 407" in result.err
    assert "the proxy wants credentials: http://user:password@host:port in HTTPS_PROXY" in result.err
    assert [r.authorization for r in proxy.requests] == [None]


# --------------------------------------------------------------------------- a proxy's own refusal, in plain HTTP


def through_http_proxy_to(stack: Stack, proxy: ProxyStandin, destination: str, credentials: bool = True) -> dict:
    """HTTP_PROXY for one destination only; the other two go direct (NO_PROXY's host:port entries)."""
    urls = {"lapi": stack.lapi.url, "cloudflare": stack.kv.url, "pushgateway": stack.push.url}
    direct = [url.removeprefix("http://") for name, url in urls.items() if name != destination]
    userinfo = f"{PROXY_USER}:{PROXY_PASSWORD}@" if credentials else ""
    return {"HTTP_PROXY": f"http://{userinfo}127.0.0.1:{proxy.server.server_address[1]}", "NO_PROXY": ",".join(direct)}


@pytest.mark.parametrize("status", [403, 407])
@pytest.mark.parametrize("destination", ["lapi", "cloudflare", "pushgateway"])
def test_a_proxy_refusing_a_plain_http_request_is_named_not_the_destination(stack, destination, status):
    """Squid's `access denied` (403) and its demand for credentials (407), in answer to a request
    sent to it in absolute form: the proxy's word, not LAPI's, Cloudflare's or the Pushgateway's."""
    stack.lapi.decisions = [decision("192.0.2.1")]
    with ProxyStandin() as proxy:
        proxy.credentials = f"{PROXY_USER}:{PROXY_PASSWORD}"
        proxy.refuse = status  # 407 with the credentials given: refused
        result = stack.run(**through_http_proxy_to(stack, proxy, destination))
        port = proxy.server.server_address[1]
        seen = [(r.method, r.target.split("?")[0]) for r in proxy.requests]
    assert f"the proxy 127.0.0.1:{port} (HTTP_PROXY) refused " in result.err and f"HTTP {status}" in result.err
    assert ("allow list" if status == 403 else "the proxy refused the credentials in HTTP_PROXY") in result.err
    assert "LAPI_KEY" not in result.err and "CF_API_TOKEN" not in result.err
    assert PROXY_PASSWORD not in result.out + result.err
    assert result.sleeps == []  # the proxy's final word: not retried
    if destination == "lapi":
        assert result.code == job.EXIT_LAPI and "bouncer" not in result.err
        assert seen == [("GET", f"{stack.lapi.url}/v1/decisions")] and stack.lapi.queries == []
        assert sum(stack.kv.requests.values()) == 0
    elif destination == "cloudflare":
        assert result.code == job.EXIT_CLOUDFLARE and "list: no answer from Cloudflare: the proxy" in result.err
        assert seen == [("GET", f"{stack.kv.api_url}/accounts/{ACCOUNT}/storage/kv/namespaces/{NAMESPACE}/keys")]
        assert sum(stack.kv.requests.values()) == 0 and stack.kv.live() == {}
    else:
        assert result.code == 0 and f"Pushgateway at {stack.push.url} took no metrics: the proxy" in result.err
        assert seen == [("PUT", f"{stack.push.url}/metrics/job/crowdsec-kv-sync")] and stack.push.pushes == []
        assert {k: e.value for k, e in stack.kv.live().items()} == {"ip:192.0.2.1": "ban"}


def test_a_proxy_wanting_credentials_for_plain_http_says_where_they_go(stack):
    with ProxyStandin() as proxy:
        proxy.credentials = f"{PROXY_USER}:{PROXY_PASSWORD}"
        result = stack.run(**through_http_proxy_to(stack, proxy, "lapi", credentials=False))
        port = proxy.server.server_address[1]
    assert result.code == job.EXIT_LAPI
    assert f"the proxy 127.0.0.1:{port} (HTTP_PROXY) refused GET {stack.lapi.url}/v1/decisions: HTTP 407" in result.err
    assert "the proxy wants credentials: http://user:password@host:port in HTTP_PROXY" in result.err


def test_a_403_the_proxy_does_not_mark_as_its_own_names_both_the_proxy_and_the_bouncer_key(stack):
    """Without Squid's X-Squid-Error (or RFC 9209's Proxy-Status error), a 403 that is not in LAPI's
    words may be either's: the message says both, and where each is fixed."""
    with ProxyStandin() as proxy:
        proxy.refuse, proxy.marked = 403, False
        result = stack.run(**through_http_proxy_to(stack, proxy, "lapi"))
        port = proxy.server.server_address[1]
    assert result.code == job.EXIT_LAPI
    assert f"HTTP 403 through the proxy 127.0.0.1:{port} (HTTP_PROXY)" in result.err
    assert "NO_PROXY" in result.err and "check LAPI_KEY" in result.err


def test_lapi_refusing_the_key_through_a_proxy_still_blames_the_key(stack):
    """LAPI's own 403 (`{"message":"access forbidden"}`), passed on by the proxy, is LAPI's."""
    with ProxyStandin() as proxy:
        result = stack.run(LAPI_KEY="not-the-bouncer-key", **through_http_proxy_to(stack, proxy, "lapi"))
        assert [r.method for r in proxy.requests] == ["GET"]
    assert result.code == job.EXIT_LAPI
    assert "LAPI refused the bouncer credentials (HTTP 403): check LAPI_KEY" in result.err
    assert "proxy" not in result.err


@pytest.mark.parametrize(
    ("status", "headers", "own"),
    [
        (407, {}, True),  # only a proxy sends 407
        (403, {"X-Squid-Error": "ERR_ACCESS_DENIED 0"}, True),
        (403, {"Proxy-Status": "corp-proxy; error=http_request_denied"}, True),
        (403, {"Proxy-Status": 'edge; received-status=200, corp; error="destination_ip_prohibited"'}, True),
        (403, {"Proxy-Status": "corp-proxy; received-status=403"}, False),  # passed on from the target
        (403, {}, False),
        (403, {"Via": "1.1 squid"}, False),  # Via is added to what a proxy passes on, too
        (401, {"X-Squid-Error": "ERR_ACCESS_DENIED 0"}, False),
        (502, {"X-Squid-Error": "ERR_CONNECT_FAIL 111"}, False),  # a failure to reach it: retried as a 5xx
    ],
)
def test_which_answers_are_a_proxys_own_refusal(status, headers, own):
    assert job.refused_by_proxy(status, headers) is own


def test_a_proxys_refusal_names_the_proxy_the_request_and_where_the_fix_goes():
    given = job.Proxy("proxy.corp", 3128, "HTTP_PROXY", PROXY_USER, PROXY_PASSWORD)
    bare = job.Proxy("proxy.corp", 3128, "https_proxy")
    secrets = job.Proxies(http=given).secrets
    assert job.proxy_refusal(given, "GET http://lapi:8080/v1/decisions", 403, "Forbidden", secrets) == (
        "the proxy proxy.corp:3128 (HTTP_PROXY) refused GET http://lapi:8080/v1/decisions: HTTP 403 'Forbidden' "
        "(the proxy does not let the job reach this host: its allow list, or NO_PROXY for an in-cluster host)"
    )
    assert job.proxy_refusal(given, "CONNECT kv:443", 407, b" Denied " + PROXY_PASSWORD.encode(), secrets) == (
        "the proxy proxy.corp:3128 (HTTP_PROXY) refused CONNECT kv:443: HTTP 407 'Denied [redacted]' "
        "(the proxy refused the credentials in HTTP_PROXY: check the user and the password)"
    )
    assert job.proxy_refusal(bare, "CONNECT kv:443", 407, "", ()).endswith(
        "(the proxy wants credentials: http://user:password@host:port in https_proxy)"
    )
    assert job.proxy_refusal(bare, "CONNECT kv:443", 502, "Bad Gateway", ()).endswith("HTTP 502 'Bad Gateway'")


@pytest.mark.parametrize("via", [None, job.Proxy("proxy.corp", 3128, "HTTP_PROXY")])
@pytest.mark.parametrize("body", [b'{"message":"access forbidden"}', b"<html>denied</html>", b'{"msg": 1}', b"[]"])
def test_lapis_refusal_is_the_bouncer_keys_unless_a_proxy_may_have_sent_it(via, body):
    message = job.lapi_refusal(job.Response(401, {}, body, via=via), ())
    if via is None or body.startswith(b'{"message"'):
        assert message == "LAPI refused the bouncer credentials (HTTP 401): check LAPI_KEY"
    else:
        assert message.startswith("HTTP 401 through the proxy proxy.corp:3128 (HTTP_PROXY), not in LAPI's words (")
        assert message.endswith(
            "either the proxy refused the request (its allow list, or NO_PROXY for an in-cluster host) "
            "or LAPI refused the bouncer credentials (check LAPI_KEY)"
        )


def test_an_answer_through_a_proxy_says_so():
    via = job.Proxy("proxy.corp", 3128, "HTTP_PROXY")
    assert job.through_proxy_note(job.Response(502, {}, b"", via=None)) == ""
    assert job.through_proxy_note(job.Response(502, {}, b"", via=via)) == (
        " (through the proxy proxy.corp:3128 (HTTP_PROXY): if the answer is the proxy's own, "
        "see its allow list, or NO_PROXY for an in-cluster host)"
    )


def test_a_proxy_that_cannot_be_reached_fails_the_run_naming_it(proxied):
    stack, proxy, _ = proxied
    port = proxy.server.server_address[1]
    proxy.stop()  # nothing listens there any more: connection refused
    result = stack.run(**through_proxy(stack, proxy))
    assert result.code == job.EXIT_CLOUDFLARE
    assert f"cannot connect to the proxy 127.0.0.1:{port} (HTTPS_PROXY)" in result.err
    assert "after retries" in result.err and result.sleeps  # as any refused connection: retried, then given up
    assert stack.kv.live() == {}


def test_the_run_deadline_holds_while_the_proxy_says_nothing(proxied):
    stack, proxy, _ = proxied
    proxy.silent = True
    result = stack.run(**through_proxy(stack, proxy, RUN_DEADLINE="2"))  # the deadline is the subject
    assert result.code == job.EXIT_CLOUDFLARE
    assert "RUN_DEADLINE passed while the answer of the proxy" in result.err and "to CONNECT" in result.err
