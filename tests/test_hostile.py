"""Hostile conditions (issue 10): slow and endless answers, signals, odd secrets, bad ports,
malformed Cloudflare answers. Short deadlines here are the subject of the tests that set them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import lapi_kv_sync as job
from tests.conftest import SCRIPT, assert_no_secret
from tests.standins import Fault, decision

PREFIXED = "crowdsec_kv_sync_"
# A drip of one byte every half second would take minutes to deliver any of these answers;
# a run bounded by its deadline ends within seconds of it. The margin is generous on purpose.
DEADLINE = 2
MARGIN = 15


def ips(n: int) -> list[str]:
    return [f"10.0.{i >> 8 & 255}.{i & 255}" for i in range(n)]


def timed(run):
    started = time.monotonic()
    result = run()
    return result, time.monotonic() - started


# --------------------------------------------------------------------------- item 1: the run deadline holds


@pytest.mark.parametrize(
    "slow, code, named",
    [
        ("lapi", job.EXIT_LAPI, "LAPI at http://127.0.0.1"),
        ("list", job.EXIT_CLOUDFLARE, "Cloudflare: list: "),
        ("bulk_put", job.EXIT_CLOUDFLARE, "Cloudflare: bulk_put: "),
    ],
)
def test_an_answer_dripped_byte_by_byte_ends_the_run_at_its_deadline(stack, slow, code, named):
    stack.lapi.decisions = [decision(ip) for ip in ips(5)]
    if slow == "lapi":
        stack.lapi.drip = 0.5
    else:
        stack.kv.faults.append(Fault("drip", slow, every=0.5))
    result, took = timed(lambda: stack.run(RUN_DEADLINE=str(DEADLINE)))
    assert result.code == code, result.err
    assert took < DEADLINE + MARGIN
    assert named in result.err and "RUN_DEADLINE passed" in result.err
    if slow == "lapi":
        assert sum(stack.kv.requests.values()) == 0  # KV untouched
    last = stack.push.pushes[-1]
    assert last.method == "POST" and stack.push.value(PREFIXED + "exit_code") == code
    assert stack.push.value(PREFIXED + "success") == 0


def test_a_lapi_body_that_streams_forever_ends_at_the_deadline(stack):
    stack.lapi.endless = 0.05  # the head at once, then a decision every 50 ms, for ever
    result, took = timed(lambda: stack.run(RUN_DEADLINE=str(DEADLINE)))
    assert result.code == job.EXIT_LAPI, result.err
    assert took < DEADLINE + MARGIN
    assert "RUN_DEADLINE passed" in result.err and sum(stack.kv.requests.values()) == 0
    assert stack.push.value(PREFIXED + "exit_code") == job.EXIT_LAPI


def test_a_dripping_pushgateway_costs_at_most_the_push_allowance(stack, monkeypatch):
    monkeypatch.setattr(job, "PUSH_GRACE", 1.0)  # the allowance is the subject: keep the test short
    stack.lapi.decisions = [decision("192.0.2.1")]
    stack.push.drip = 0.5
    result, took = timed(lambda: stack.run(RUN_DEADLINE=str(DEADLINE)))
    assert result.code == job.EXIT_OK, result.err
    assert took < DEADLINE + 1 + MARGIN
    assert "warning: Pushgateway at" in result.err and "RUN_DEADLINE passed" in result.err


# --------------------------------------------------------------------------- item 3: secrets

BASE_ENV = {"LAPI_KEY": "k" * 20, "CF_ACCOUNT_ID": "a" * 32, "CF_KV_NAMESPACE_ID": "b" * 32, "CF_API_TOKEN": "t" * 20}


def config_problems(env: dict) -> str:
    with pytest.raises(job.ConfigError) as caught:
        job.load_config({**BASE_ENV, **env})
    return str(caught.value)


@pytest.mark.parametrize(
    "content, what",
    [
        (b"tok-AAAAAAAA\ntok-BBBBBBBB\n", "more than one line"),
        (b"tok-AAAAAAAA\rtok-BBBBBBBB", "more than one line"),
        (b"tok-AAAA\x00AAAA", "not visible ASCII"),
        (b"tok-AAAA\x7fAAAA", "not visible ASCII"),
        ("tok-AAAAé-AAAA".encode(), "not visible ASCII"),
        (b"tok-AAAA AAAA", "not visible ASCII"),
        (b"\xfftok-AAAAAAAA", "not UTF-8"),
        (b"tok-AAA", "under 8 characters"),
        (b"\xef\xbb\xbf\n", "empty"),
    ],
)
@pytest.mark.parametrize("name", ["CF_API_TOKEN", "LAPI_KEY"])
def test_an_unusable_secret_file_is_named_never_shown(tmp_path, name, content, what):
    path = tmp_path / "secret"
    path.write_bytes(content)
    text = config_problems({name: "", f"{name}_FILE": str(path)})
    assert f"{name}_FILE" in text and what in text
    assert "tok-" not in text and "AAAA" not in text


@pytest.mark.parametrize("value", ["tok-AAAAAAAA\ntok-BBBBBBBB", "tok-AAAA\tAAAA", "e"])
def test_an_unusable_secret_variable_is_named_never_shown(value):
    text = config_problems({"CF_API_TOKEN": value})
    assert "CF_API_TOKEN" in text and "tok-" not in text and "'e'" not in text


def test_a_byte_order_mark_and_the_final_newline_are_stripped(tmp_path):
    (tmp_path / "token").write_bytes(b"\xef\xbb\xbfcf-token-0123456789\r\n")
    config = job.load_config({**BASE_ENV, "CF_API_TOKEN": "", "CF_API_TOKEN_FILE": str(tmp_path / "token")})
    assert config.cf_api_token == "cf-token-0123456789"


def test_a_two_line_token_file_ends_in_exit_2_without_the_secret(stack, tmp_path):
    (tmp_path / "token").write_text("tok-AAAAAAAA\ntok-BBBBBBBB\n")
    result = stack.run_process(CF_API_TOKEN=None, CF_API_TOKEN_FILE=str(tmp_path / "token"))
    assert result.code == job.EXIT_CONFIG
    assert "CF_API_TOKEN_FILE" in result.err and "Traceback" not in result.err
    assert_no_secret(result.out, result.err, secrets=("tok-AAAAAAAA", "tok-BBBBBBBB"))


SECRET = "s3cr\\et\"'/+%&=?#x"  # every character that some encoding changes


@pytest.mark.parametrize(
    "form",
    [
        SECRET,
        repr(SECRET),
        json.dumps(SECRET),
        job.urllib.parse.quote(SECRET),
        job.urllib.parse.quote(SECRET, safe=""),
        job.urllib.parse.quote_plus(SECRET),
        repr(SECRET.encode()),
    ],
)
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_form_of_a_secret_is_redacted(form, fmt):
    import io

    out = io.StringIO()
    log = job.Log(out, out, fmt, secrets=[SECRET])
    log.error("x", f"the server said {form} and {form!r}")
    assert "[redacted]" in out.getvalue()
    assert "s3cr" not in out.getvalue(), out.getvalue()


def test_a_one_letter_secret_does_not_blank_the_log():
    import io

    out = io.StringIO()
    job.Log(out, out, secrets=["e"]).info("x", "every e stays")
    assert "every e stays" in out.getvalue()


# --------------------------------------------------------------------------- item 6: ports


@pytest.mark.parametrize("name", ["LAPI_URL", "CF_API_URL", "PUSHGATEWAY_URL"])
@pytest.mark.parametrize("netloc", ["host:abc", "host:99999", "host:65536", "host:0", "host:-1", "[::1"])
def test_a_url_whose_port_is_not_1_to_65535_is_a_configuration_error(name, netloc):
    assert name in config_problems({name: f"http://{netloc}/x"})


@pytest.mark.parametrize("netloc", ["host:1", "host:65535", "host", "[::1]:8080"])
def test_ports_from_1_to_65535_are_fine(netloc):
    assert job.load_config({**BASE_ENV, "LAPI_URL": f"http://{netloc}"}).lapi_url == f"http://{netloc}"


def test_a_bad_port_is_exit_2_not_a_traceback(stack):
    result = stack.run_process(LAPI_URL="http://127.0.0.1:99999")
    assert result.code == job.EXIT_CONFIG and "LAPI_URL" in result.err and "Traceback" not in result.err
    assert stack.lapi.queries == []


# --------------------------------------------------------------------------- configuration errors as JSON


def test_configuration_errors_are_json_lines_when_the_log_is(stack):
    result = stack.run_process(env={"LOG_FORMAT": "json", "LAPI_URL": "http://x:0"})
    assert result.code == job.EXIT_CONFIG and result.out == ""
    record = json.loads(result.err)
    assert record["level"] == "error" and record["event"] == "configuration"
    for name in ("LAPI_URL", "LAPI_KEY", "CF_ACCOUNT_ID", "CF_API_TOKEN"):
        assert name in record["message"]


# --------------------------------------------------------------------------- item 2: SIGTERM and SIGINT


def wait_for(condition, seconds: float = 60) -> None:
    give_up = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < give_up, "the job never got that far"
        time.sleep(0.05)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("waiting_on", ["lapi", "bulk_put"])
def test_a_signal_stops_the_run_with_one_line_a_push_and_its_exit_code(stack, signum, code, waiting_on):
    wanted = ips(5)
    stack.lapi.decisions = [decision(ip) for ip in wanted]
    if waiting_on == "lapi":
        stack.lapi.drip = 0.5
    else:
        stack.kv.faults.append(Fault("drip", "bulk_put", every=0.5))
    environment = {"PATH": os.environ.get("PATH", ""), **stack.env()}
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT)], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: stack.lapi.queries if waiting_on == "lapi" else stack.kv.requests["bulk_put"])
        sent = time.monotonic()
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert_no_secret(out, err)
    assert process.returncode == code, err
    assert took < 20, "the pod's grace period is 30 s"
    assert out == "" and err.count("\n") == 1 and signal.Signals(signum).name in err and "Traceback" not in err
    last = stack.push.pushes[-1]
    assert last.method == "POST" and stack.push.value(PREFIXED + "exit_code") == code
    assert stack.push.value(PREFIXED + "success") == 0
    # KV holds at most part of the plan; the next run completes it.
    stack.lapi.drip = 0.0
    stack.kv.faults.clear()
    assert stack.run().code == job.EXIT_OK
    assert set(stack.kv.live()) == {f"ip:{ip}" for ip in wanted}


def test_the_signal_handlers_are_put_back_after_a_run(stack):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    assert stack.run().code == job.EXIT_OK
    assert {s: signal.getsignal(s) for s in before} == before


def test_interrupted_is_no_exception_that_code_may_swallow():
    assert not issubclass(job.Interrupted, Exception) and issubclass(job.Interrupted, BaseException)
    assert job.Interrupted(signal.SIGTERM).exit_code == 143 and str(job.Interrupted(signal.SIGINT)) == "SIGINT"
