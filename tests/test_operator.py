"""Operator features: TLS to LAPI, LAPI filters, the delete guard, range expansion."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import pytest
import trustme

import lapi_kv_sync as job
from tests.conftest import CF_TOKEN, LAPI_KEY, Stack
from tests.standins import Entry, KvStandin, LapiStandin, PushgatewayStandin, decision


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def tls_stack(ca, tmp_path, require_client_cert: bool):
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    if require_client_cert:
        server_context.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(server_context)
    lapi = LapiStandin(LAPI_KEY)
    lapi.serve_tls(server_context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client = ca.issue_cert("kvsync@bouncer")
    client.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    client.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    return lapi


@pytest.fixture
def https_stack(ca, tmp_path, request):
    lapi = tls_stack(ca, tmp_path, getattr(request, "param", False))
    with lapi, KvStandin(CF_TOKEN) as kv, PushgatewayStandin() as push:
        lapi.decisions = [decision("192.0.2.1")]
        yield Stack(lapi, kv, push), tmp_path


def test_https_lapi_with_a_ca_bundle(https_stack):
    stack, certs = https_stack
    result = stack.run(LAPI_CA_CERT=str(certs / "ca.pem"))
    assert result.code == 0, result.err
    assert set(stack.kv.live()) == {"ip:192.0.2.1"}


def test_https_lapi_with_the_wrong_ca_is_unreadable(https_stack):
    stack, certs = https_stack
    stack.kv.store["ip:203.0.113.1"] = Entry("ban", int(time.time()) + 600, {"remediation": "ban"})
    before = stack.kv.snapshot()
    trustme.CA().cert_pem.write_to_path(str(certs / "other-ca.pem"))
    result = stack.run(LAPI_CA_CERT=str(certs / "other-ca.pem"))
    assert result.code == job.EXIT_LAPI
    assert "CERTIFICATE_VERIFY_FAILED" in result.err
    assert stack.kv.snapshot() == before and sum(stack.kv.requests.values()) == 0


@pytest.mark.parametrize("https_stack", [True], indirect=True)
def test_client_certificate_instead_of_a_key(https_stack):
    stack, certs = https_stack
    stack.lapi.key = "a-key-nobody-sends"
    env = {
        "LAPI_CA_CERT": str(certs / "ca.pem"),
        "LAPI_CLIENT_CERT": str(certs / "client.pem"),
        "LAPI_CLIENT_KEY": str(certs / "client.key"),
    }
    result = stack.run(LAPI_KEY="", **env)
    assert result.code == 0, result.err
    assert set(stack.kv.live()) == {"ip:192.0.2.1"}


@pytest.mark.parametrize("https_stack", [True], indirect=True)
def test_missing_client_certificate_is_unreadable(https_stack):
    stack, certs = https_stack
    result = stack.run(LAPI_CA_CERT=str(certs / "ca.pem"))
    assert result.code == job.EXIT_LAPI
    assert stack.kv.live() == {}


def test_client_certificate_needs_its_key(stack, tmp_path):
    (tmp_path / "c.pem").write_text("x")
    result = stack.run(LAPI_KEY="", LAPI_CLIENT_CERT=str(tmp_path / "c.pem"))
    assert result.code == job.EXIT_CONFIG
    assert "LAPI_CLIENT_KEY" in result.err


def test_unusable_tls_files_are_configuration_errors(stack, tmp_path):
    (tmp_path / "junk.pem").write_text("not a certificate")
    result = stack.run(LAPI_CA_CERT=str(tmp_path / "junk.pem"))
    assert result.code == job.EXIT_CONFIG and "LAPI_CA_CERT" in result.err
    result = stack.run(LAPI_CLIENT_CERT=str(tmp_path / "junk.pem"), LAPI_CLIENT_KEY=str(tmp_path / "junk.pem"))
    assert result.code == job.EXIT_CONFIG and "LAPI_CLIENT_CERT" in result.err
    assert "Traceback" not in result.err and stack.lapi.queries == []


def der(pem: Path, suffix: str) -> Path:
    """The same certificate or key as DER (binary), as Windows tools and some CAs hand them out."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    data = pem.read_bytes()
    if b"PRIVATE KEY" in data:
        key = serialization.load_pem_private_key(data, None)
        out = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    else:
        out = x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    path = pem.with_suffix(suffix)
    path.write_bytes(out)
    return path


@pytest.mark.parametrize(
    "files, expected",
    [
        (
            {"LAPI_CLIENT_CERT": "client.der"},
            "LAPI_CLIENT_CERT: {certs}/client.der is DER (binary), not PEM: convert it",
        ),
        ({"LAPI_CLIENT_KEY": "client.key.der"}, "LAPI_CLIENT_KEY: {certs}/client.key.der is DER (binary), not PEM"),
        ({"LAPI_CA_CERT": "ca.der"}, "LAPI_CA_CERT: {certs}/ca.der is DER (binary), not PEM: convert it"),
        ({"LAPI_CLIENT_KEY": "encrypted.key"}, "LAPI_CLIENT_KEY: {certs}/encrypted.key is an encrypted key"),
        (
            {"LAPI_CLIENT_KEY": "other.key"},
            "LAPI_CLIENT_CERT/LAPI_CLIENT_KEY: not a certificate and its matching key (the key is not the certificate's)",
        ),
        ({"LAPI_CLIENT_CERT": "client.key"}, "LAPI_CLIENT_CERT: {certs}/client.key holds no CERTIFICATE"),
    ],
)
def test_a_der_or_wrong_tls_file_is_named_with_what_pem_it_needs(ca, stack, tmp_path, files, expected):
    """ssl says only `PEM lib` (the message once ended in `(None)`): the job says which file is
    DER and how to convert it, which key is encrypted or not the certificate's."""
    from cryptography.hazmat.primitives import serialization

    tls_stack(ca, tmp_path, require_client_cert=True)  # writes ca.pem, client.pem, client.key
    for pem, suffix in (("client.pem", ".der"), ("ca.pem", ".der"), ("client.key", ".key.der")):
        der(tmp_path / pem, suffix)
    key = serialization.load_pem_private_key((tmp_path / "client.key").read_bytes(), None)
    encryption = serialization.BestAvailableEncryption(b"passphrase")
    (tmp_path / "encrypted.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    ca.issue_cert("someone-else").private_key_pem.write_to_path(str(tmp_path / "other.key"))
    env = {"LAPI_CLIENT_CERT": "client.pem", "LAPI_CLIENT_KEY": "client.key", "LAPI_CA_CERT": "ca.pem", **files}
    result = stack.run(LAPI_KEY="", **{name: str(tmp_path / file) for name, file in env.items()})
    assert result.code == job.EXIT_CONFIG and stack.lapi.queries == []
    assert (
        expected.format(certs=tmp_path) in result.err and "(None)" not in result.err and "Traceback" not in result.err
    )


def test_filters_are_passed_to_lapi_as_crowdsec_bouncers_name_them(stack):
    result = stack.run(
        LAPI_ORIGINS="crowdsec, cscli",
        LAPI_SCENARIOS_CONTAINING="ssh,http",
        LAPI_SCENARIOS_NOT_CONTAINING="probing",
    )
    assert result.code == 0
    assert stack.lapi.queries[-1] == {
        "scopes": ["ip,range,country,as"],
        "origins": ["crowdsec,cscli"],
        "scenarios_containing": ["ssh,http"],
        "scenarios_not_containing": ["probing"],
    }


def test_delete_guard_holds_back_deletes_and_force_lifts_it(stack):
    stack.lapi.decisions = [decision(f"10.0.0.{i}") for i in range(20)]
    assert stack.run().code == 0
    stack.lapi.decisions = stack.lapi.decisions[:8] + [decision("10.0.1.1")]  # 12 un-bans, 1 new ban
    stack.kv.reset_counts()
    guarded = stack.run(MAX_DELETES="10")
    assert guarded.code == job.EXIT_CLOUDFLARE
    assert "MAX_DELETES=10" in guarded.err and "12" in guarded.err and "--force" in guarded.err
    assert stack.kv.written_keys == ["ip:10.0.1.1"] and stack.kv.deletes == 0
    assert stack.push.pushes[-1].method == "POST"
    assert stack.push.value("crowdsec_kv_sync_deletes_held_back") == 12
    assert stack.push.value("crowdsec_kv_sync_success") == 0
    assert stack.run(MAX_DELETES="12").code == 0  # at the limit is allowed
    stack.lapi.decisions = []
    assert stack.run(MAX_DELETES="3").code == job.EXIT_CLOUDFLARE
    forced = stack.run("--force", MAX_DELETES="3")
    assert forced.code == 0, forced.err
    assert stack.kv.live() == {}
    assert stack.push.value("crowdsec_kv_sync_deletes_held_back") == 0


def test_a_dry_run_says_when_the_delete_guard_would_trip(stack):
    """The runbook's first step after the guard trips is a dry run: it must say so (issue 10)."""
    stack.lapi.decisions = [decision(f"10.0.0.{i}") for i in range(20)]
    assert stack.run().code == 0
    stack.lapi.decisions = stack.lapi.decisions[:8]  # 12 un-bans
    dry = stack.run("--dry-run", MAX_DELETES="10")
    assert dry.code == 0
    assert "MAX_DELETES=10" in dry.out + dry.err and "would" in dry.out + dry.err
    assert stack.kv.deletes == 0
    for quiet in (stack.run("--dry-run", MAX_DELETES="12"), stack.run("--dry-run", "--force", MAX_DELETES="10")):
        assert quiet.code == 0 and "MAX_DELETES" not in quiet.out + quiet.err


def test_ranges_expand_when_asked(stack):
    stack.lapi.decisions = [
        decision("198.51.100.0/24", 3600, scope="Range"),
        decision("198.51.100.7", 7200, "captcha"),
        decision("10.0.0.0/8", scope="Range"),
        decision("2001:db8::/120", scope="Range"),
    ]
    off = stack.run(SCOPE_TABLE="false")
    assert off.code == 0 and set(stack.kv.live()) == {"ip:198.51.100.7"}
    assert "scope 3" in off.out
    on = stack.run(EXPAND_RANGES_MAX="256", SCOPE_TABLE="false")
    assert on.code == 0, on.err
    assert stack.lapi.queries[-1]["scopes"] == ["ip,range"]
    live = stack.kv.live()
    assert len(live) == 256 and {e.value for e in live.values()} == {"ban"}
    assert live["ip:198.51.100.7"].expiration > time.time() + 7000  # merged: ban, the longest time
    assert "range_too_large 2" in on.out
    assert stack.run(EXPAND_RANGES_MAX="100", SCOPE_TABLE="false").code == 0
    assert {k: e.value for k, e in stack.kv.live().items()} == {"ip:198.51.100.7": "captcha"}


def test_ranges_expand_beside_the_network_table(stack):
    # EXPAND_RANGES_MAX keeps its meaning with the table: a small range is ALSO address keys
    # (for Workers that read only those); every range, small or not, is in the network table.
    stack.lapi.decisions = [
        decision("198.51.100.0/30", 3600, scope="Range"),
        decision("10.0.0.0/8", scope="Range", type="captcha"),
        decision("2001:db8::/120", scope="Range"),
    ]
    result = stack.run(EXPAND_RANGES_MAX="4")
    assert result.code == 0, result.err
    assert stack.lapi.queries[-1]["scopes"] == ["ip,range,country,as"]
    live = stack.kv.live()
    table = job.decode_networks(live.pop("ip:networks").value)
    held = {
        job.network_text(version, i.first, i.last): "ban" if i.ban else "captcha"
        for version, family in ((4, table.v4), (6, table.v6))
        for i in family
    }
    assert held == {"198.51.100.0/30": "ban", "10.0.0.0/8": "captcha", "2001:db8::/120": "ban"}
    assert set(live) == {f"ip:198.51.100.{i}" for i in range(4)}
    assert "range_too_large 0" in result.out  # in the table, so not left out
    assert "wanted 4 (ban 4, captcha 0)" in result.out
