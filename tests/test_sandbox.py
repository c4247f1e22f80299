"""The playground (tests/sandbox.py) as a newcomer uses it from the README: `--serve`, the export
lines it prints, the job run with them, decisions added and removed while it runs."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, SCRIPT, Result, assert_no_secret

# -S: no site-packages, so the playground is shown to need nothing but the standard library.
SANDBOX = [sys.executable, "-S", "-m", "tests.sandbox"]
START_TIMEOUT = 60


def sandbox(*args: str, where=None) -> Result:
    command = [*SANDBOX, *(["--file", str(where)] if where else []), *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, env=clean_env())
    return Result(done.returncode, done.stdout, done.stderr)


def clean_env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), **extra}


@pytest.fixture
def served(tmp_path):
    """`python3 -m tests.sandbox --serve` as a process; the export lines it printed. It stops by
    itself after --lifetime, and is interrupted at the end of the test in any case."""
    where = tmp_path / "sandbox.json"
    process = subprocess.Popen(
        [*SANDBOX, "--serve", "--lifetime", "600", "--file", str(where)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        printed = []
        deadline = time.monotonic() + START_TIMEOUT
        while not printed or not printed[-1].startswith("Ctrl-C"):  # its last line before it waits
            line = process.stdout.readline()
            assert line and time.monotonic() < deadline, f"the sandbox did not start: {printed}"
            printed.append(line.rstrip("\n"))
        exports = dict(
            shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in printed if line.startswith("export ")
        )
        yield process, exports, where, printed
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stdout.close()


def job(exports: dict[str, str], *args: str) -> Result:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=clean_env(**exports),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_no_secret(done.stdout, done.stderr, secrets=(exports["LAPI_KEY"], exports["CF_API_TOKEN"]))
    return Result(done.returncode, done.stdout, done.stderr)


def test_serve_prints_exports_that_a_first_sync_runs_with(served):
    process, exports, where, printed = served
    assert set(exports) == {
        "LAPI_URL",
        "LAPI_KEY",
        "CF_API_URL",
        "CF_API_TOKEN",
        "CF_ACCOUNT_ID",
        "CF_KV_NAMESPACE_ID",
        "PUSHGATEWAY_URL",
        "STATE_FILE",
    }
    # `eval "$(python3 -m tests.sandbox env)"` gives the same lines as printed.
    env = sandbox("env", where=where)
    assert env.code == 0 and env.out.splitlines() == [line for line in printed if line.startswith("export ")]

    dry = job(exports, "--dry-run")
    assert dry.code == 0 and "dry run: write 7: ip:192.0.2.1" in dry.out  # 5 addresses, the two tables
    assert "ip:" not in sandbox("kv", where=where).out  # a dry run writes nothing

    first = job(exports)
    assert first.code == 0, first.err
    assert "written 5" in first.out and "audited: no_record" in first.out
    kv = sandbox("kv", where=where).out
    assert "ip:192.0.2.1 " in kv and "ip:2001:db8::1 " in kv and "config:maintenance" in kv
    assert "ip:192.0.2.99" not in kv

    added = sandbox("add", "192.0.2.99", "captcha", "30m", where=where)
    assert added.code == 0 and "192.0.2.99" in added.out and "captcha" in added.out
    assert "192.0.2.99" in sandbox("decisions", where=where).out
    second = job(exports)
    assert second.code == 0 and "written 1," in second.out
    assert "cloudflare attempts 1 (list 0, bulk_put 1" in second.out  # the state file: no listing
    kv = sandbox("kv", where=where).out
    assert "ip:192.0.2.99" in kv and "captcha" in kv.split("ip:192.0.2.99")[1].splitlines()[0]

    removed = sandbox("remove", "192.0.2.99", where=where)
    assert removed.code == 0 and "removed 1" in removed.out
    third = job(exports)
    assert third.code == 0 and "deleted 1," in third.out
    assert "ip:192.0.2.99" not in sandbox("kv", where=where).out

    process.send_signal(signal.SIGINT)  # Ctrl-C
    assert process.wait(30) == 0
    assert "sandbox stopped" in process.stdout.read()
    assert not where.exists() and not os.path.exists(os.path.dirname(exports["STATE_FILE"]))


def test_a_bad_duration_is_refused_and_no_sandbox_is_named(tmp_path):
    bad = sandbox("add", "192.0.2.99", "ban", "soon", where=tmp_path / "none.json")
    assert bad.code == 2 and "not a duration" in bad.err
    absent = sandbox("kv", where=tmp_path / "none.json")
    assert absent.code == 1 and "no sandbox is running" in absent.err and "--serve" in absent.err


def test_help_names_serve_and_every_command():
    helped = sandbox("--help")
    assert helped.code == 0
    for word in ("--serve", "--lifetime", "env", "add", "remove", "decisions", "kv"):
        assert word in helped.out


def test_the_demo_runs_twice_and_the_second_run_writes_nothing():
    demo = sandbox()
    assert demo.code == 0, demo.out + demo.err
    assert "--- run 2" in demo.out and "keys written: 0" in demo.out.split("--- run 2")[1]


def test_the_readme_quick_start_runs_as_written(tmp_path):
    """The README's three commands, from the clone: the sandbox (its file in TMPDIR, here the
    test's own folder), then the first sync in another shell, through `eval`."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    clone, serve, first_sync = block.splitlines()
    assert clone.startswith("git clone ") and serve == "python3 -m tests.sandbox --serve"
    bin_dir = os.path.dirname(sys.executable)  # `python3` is this Python, as in an activated environment
    env = clean_env(TMPDIR=str(tmp_path), PATH=f"{bin_dir}:{os.environ.get('PATH', '')}")
    process = subprocess.Popen(  # coreutils' timeout: it stops by itself, whatever happens to the test
        ["timeout", "600", *shlex.split(serve)], cwd=ROOT, stdout=subprocess.DEVNULL, env=env
    )
    try:
        where = tmp_path / f"lapi-kv-sync-sandbox-{os.getuid()}.json"
        deadline = time.monotonic() + START_TIMEOUT
        while not where.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the sandbox did not start"
            time.sleep(0.05)
        done = subprocess.run(
            ["bash", "-c", first_sync], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert "written 5" in done.stdout
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
