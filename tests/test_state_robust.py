"""The state file never strands a run (issue 20): any bytes at STATE_FILE, any state of its lock
file, a read-only volume, a lagging KV listing, a clock that steps back, a signal as the run
starts. The next run either audits or refuses with a clear message, never trusts a record that
claims what KV does not hold, and a following healthy run converges."""

from __future__ import annotations

import errno
import gzip
import json
import os
import resource
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lapi_kv_sync as job
from tests.conftest import SCRIPT
from tests.standins import decision
from tests.test_state import assert_kv_is_the_record, ips, ours, read_record, write_record

HEADER = {
    "kind": job.STATE_KIND,
    "format": job.STATE_FORMAT,
    "account": "a",
    "namespace": "n",
    "prefix": "ip:",
    "audited_at": 0,
    "clock_offset": 0,
    "usage_metrics_sent_at": None,
    "keys": 0,
}


@pytest.fixture
def state(tmp_path) -> Path:
    (tmp_path / "state").mkdir()
    return tmp_path / "state" / "record.gz"


def wanted_keys(stack) -> dict[str, str]:
    """What KV should hold: the LAPI stand-in's bans and captchas, as keys."""
    return {f"ip:{d['value']}": d["type"] for d in stack.lapi.decisions}


def assert_converged(stack) -> None:
    assert ours(stack.kv) == wanted_keys(stack)


# --------------------------------------------------------------------------- any bytes at STATE_FILE


def gzip_stream(parts, repeat: int = 1) -> bytes:
    """A gzip member of `parts` joined, repeated `repeat` times, packed as it goes (a bomb of a
    gigabyte is made in a few seconds, never held unpacked)."""
    pack = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = []
    for _ in range(repeat):
        out += [pack.compress(part) for part in parts]
    return b"".join(out) + pack.flush()


def header_line(**changes) -> bytes:
    return json.dumps({**HEADER, **changes}).encode() + b"\n"


def raw_header_line(text: str) -> bytes:
    return text.encode() + b"\n"


JUNK = {
    "nested header": gzip.compress(b"[" * 100_000 + b"\n"),
    "nested header object": gzip.compress(b'{"a":' * 30_000 + b"\n"),
    "nested key column": gzip.compress(header_line(keys=1) + b"[" * 100_000 + b"\n[null]\n-\n"),
    "400-digit audited_at": gzip.compress(
        raw_header_line(json.dumps(HEADER).replace('"audited_at": 0', '"audited_at": ' + "9" * 400)) + b"[]\n[]\n\n"
    ),
    "1e400 clock offset": gzip.compress(
        raw_header_line(json.dumps(HEADER).replace('"clock_offset": 0', '"clock_offset": 1e400')) + b"[]\n[]\n\n"
    ),
    "1e400 in the projection": gzip.compress(
        header_line(lapi_digest="x", projected={"wanted": 0, "by_remediation": {}, "ignored": {}}).replace(
            b'"wanted": 0', b'"wanted": 1e400'
        )
        + b"[]\n[]\n\n"
    ),
    "5000-digit key count": gzip.compress(
        raw_header_line(json.dumps(HEADER).replace('"keys": 0', '"keys": ' + "9" * 5000)) + b"[]\n[]\n\n"
    ),
    "bomb in the header line": gzip_stream([b" " * (1 << 20)], repeat=64),
    "bomb after a header claiming one key": gzip_stream([header_line(keys=1), b"[" + b" " * (1 << 20)], 1)
    + gzip_stream([b" " * (1 << 20)], repeat=32),
    "two gzip members": gzip.compress(header_line() + b"[]\n[]\n\n") * 2,
    "not gzip": b"\x00" * 100,
    "empty": b"",
}


@pytest.fixture
def first_run(stack, state):
    """A converged first run with its record, then LAPI changes: a ban un-banned, a new one."""
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(6)]
    result = stack.run(STATE_FILE=str(state))
    assert result.code == 0, result.err
    stack.lapi.decisions = stack.lapi.decisions[1:] + [decision("192.0.2.9", 3600)]
    return result


def run(stack, state, *args, **env):
    return stack.run(*args, STATE_FILE=str(state), **env)


@pytest.mark.parametrize("junk", list(JUNK), ids=list(JUNK))
def test_a_record_that_cannot_be_used_is_unreadable_and_rebuilt(stack, state, first_run, junk):
    state.write_bytes(JUNK[junk])
    result = run(stack, state)
    assert result.code == 0, result.err
    assert "audited: unreadable (record unreadable (" in result.out, result.out
    assert "internal_error" not in result.out + result.err and "Traceback" not in result.err
    assert stack.push.value("crowdsec_kv_sync_audited", 'reason="unreadable"') == 1
    assert_converged(stack)
    assert_kv_is_the_record(stack.kv, state)
    assert "not audited" in run(stack, state).out  # rebuilt: trusted again


def valid_record_bytes(stack, state) -> bytes:
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(40)]
    assert run(stack, state).code == 0
    return state.read_bytes()


junk_bytes = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(list(JUNK.values())),
    st.builds(
        lambda body, depth: gzip.compress(header_line(keys=1) + b"[" * depth + body + b"\n[1]\nb\n"),
        st.binary(max_size=20),
        st.integers(0, 5000),
    ),
    st.builds(
        lambda field, value: gzip.compress(
            raw_header_line(json.dumps({**HEADER, field: 0}).replace(": 0", f": {value}", 1)) + b"[]\n[]\n\n"
        ),
        st.sampled_from(["audited_at", "clock_offset", "usage_metrics_sent_at", "keys", "due_at"]),
        st.sampled_from(["1e400", "-1e400", "9" * 400, "NaN", "Infinity", '"x"', "[]", "{}", "null", "-1", "1.5"]),
    ),
)


def same_content(junk: bytes, original: bytes) -> bool:
    try:
        return gzip.decompress(junk) == gzip.decompress(original)
    except (OSError, EOFError, ValueError, zlib.error):
        return False


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(junk=junk_bytes, cut=st.one_of(st.none(), st.integers(0, 2000)), flip=st.one_of(st.none(), st.integers(0, 2000)))
def test_any_bytes_at_state_file_mean_an_audit_then_convergence(stack, tmp_path_factory, junk, cut, flip):
    """Junk, or a real record cut short or with a byte changed: the run audits (or, for a record
    that still reads whole, trusts only what is true of KV), and KV ends as LAPI wants."""
    state = tmp_path_factory.mktemp("state") / "record.gz"
    stack.kv.store.clear()
    original = valid_record_bytes(stack, state)
    stack.lapi.decisions = stack.lapi.decisions[3:] + [decision("192.0.2.9", 3600)]
    if cut is not None or flip is not None:
        junk = original[: cut if cut is not None else len(original)]
        if flip is not None and flip < len(junk):
            junk = junk[:flip] + bytes([junk[flip] ^ 0x41]) + junk[flip + 1 :]
    state.write_bytes(junk)
    result = run(stack, state)
    assert result.code == 0, result.err
    assert "internal_error" not in result.out + result.err
    if not same_content(junk, original):  # a flip in gzip's header (its mtime) changes no record
        assert "audited: unreadable" in result.out or "not audited" not in result.out
    assert_converged(stack)
    assert run(stack, state).code == 0
    assert_converged(stack)


def test_a_gzip_bomb_of_a_gigabyte_is_unreadable_within_the_runs_memory(stack, state, first_run):
    """1 MiB on disk that unpacks to 1 GiB in one line: found out by its header's claims, the run
    audits under an address-space limit a whole line read would pass."""
    state.write_bytes(
        gzip_stream([header_line(keys=3), b"[" + b" " * (1 << 20)], 1) + gzip_stream([b" " * (1 << 20)], repeat=1024)
    )
    assert state.stat().st_size < 4 << 20

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (768 << 20, 768 << 20))

    env = stack.env(STATE_FILE=str(state), PUSHGATEWAY_URL="")
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True, text=True, timeout=120, preexec_fn=limit,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "audited: unreadable (record unreadable (" in done.stdout
    assert_converged(stack)


# --------------------------------------------------------------------------- the lock file and the volume


def interrupted_after_applying(stack, state, monkeypatch) -> None:
    """A run that changes KV and is killed before it records what it did (as SIGKILL would)."""
    original = job.apply_plan

    def applied_then_killed(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "apply_plan", applied_then_killed)
    with pytest.raises(KeyboardInterrupt):
        run(stack, state)
    monkeypatch.undo()


@pytest.mark.parametrize("lock", ["deleted", "a symlink to /dev/null", "a directory", "a FIFO"])
def test_losing_the_lock_file_after_a_kill_never_lets_the_old_record_be_trusted(
    stack, state, monkeypatch, first_run, lock
):
    interrupted_after_applying(stack, state, monkeypatch)  # KV now holds the un-ban and the new ban
    lock_path = Path(str(state) + ".lock")
    lock_path.unlink()
    if lock == "a symlink to /dev/null":
        lock_path.symlink_to("/dev/null")
    elif lock == "a directory":
        lock_path.mkdir()
    elif lock == "a FIFO":
        os.mkfifo(lock_path)
    stack.lapi.decisions = stack.lapi.decisions + [first_run_ban()]  # LAPI bans the un-banned address again
    result = stack.run_process(STATE_FILE=str(state), PUSHGATEWAY_URL="", RUN_DEADLINE="30")
    assert result.code == 0, result.err
    assert (
        "not audited" not in result.out and "audited: unfinished" in result.out or "audited: unreadable" in result.out
    )
    assert_converged(stack)
    if lock == "deleted":
        assert_kv_is_the_record(stack.kv, state)
    else:
        assert "this run audits and records nothing (any record set aside)" in result.err


def first_run_ban() -> dict:
    return decision(ips(6)[0], 3600)


def read_only(monkeypatch, directory: Path) -> None:
    """STATE_FILE's volume remounted read-only: nothing in it can be created, written, renamed or removed."""
    real_open, real_replace, real_unlink, real_rename = os.open, os.replace, os.unlink, os.rename
    inside = str(directory)

    def refused(path) -> bool:
        return os.path.abspath(os.fsdecode(path)).startswith(inside)

    def ro_open(path, flags, *args, **kwargs):
        if refused(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, flags, *args, **kwargs)

    def ro(real):
        def call(src, *args, **kwargs):
            if refused(src):
                raise OSError(errno.EROFS, "Read-only file system", src)
            return real(src, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(os, "replace", ro(real_replace))
    monkeypatch.setattr(os, "unlink", ro(real_unlink))
    monkeypatch.setattr(os, "rename", ro(real_rename))


def test_a_read_only_volume_changes_nothing_and_leaves_the_record_true(stack, state, monkeypatch, first_run):
    """A run that can neither lock nor set the record aside must not change KV while a later run
    would still trust the record: it would claim what KV no longer holds once the volume is
    writable again. The exit code and the message name the volume, not Cloudflare."""
    before, queries = stack.kv.snapshot(), len(stack.lapi.queries)
    audited_at = read_record(state).audited_at
    stack.kv.reset_counts()
    with monkeypatch.context() as m:
        read_only(m, state.parent)
        refused = run(stack, state)
    assert refused.code == job.EXIT_STATE == 4
    assert "make the volume writable" in refused.err and "changed nothing" in refused.err
    assert "Read-only file system" in refused.err and "Cloudflare" not in refused.err
    until = job.rfc3339(audited_at + 900)
    assert f"would still be trusted by a run that can write, until {until} (" in refused.err
    assert "from then on, runs change KV without recording" in refused.err
    assert stack.kv.snapshot() == before and sum(stack.kv.requests.values()) == 0
    assert len(stack.lapi.queries) == queries  # LAPI not even read: nothing could come of it
    assert stack.push.value("crowdsec_kv_sync_exit_code") == job.EXIT_STATE
    stack.lapi.decisions.append(first_run_ban())  # LAPI bans the address again
    healthy = run(stack, state)
    assert healthy.code == 0, healthy.err
    assert_converged(stack)
    assert_kv_is_the_record(stack.kv, state)


def test_a_read_only_volume_past_the_records_audit_interval_still_enforces_and_records_nothing(
    stack, state, monkeypatch, first_run
):
    """Once no later run can trust the record in place (its audit interval, settling time and
    recent changes all past), a run on a read-only volume converges KV as a run without STATE_FILE
    does: it audits, applies, records nothing. The stale record it leaves is never trusted."""
    recorded = state.read_bytes()
    stack.kv.reset_counts()
    with monkeypatch.context() as m:
        read_only(m, state.parent)
        enforced = run(stack, state, clock_offset=901)
    assert enforced.code == 0, enforced.err
    assert "this run audits, changes KV and records nothing" in enforced.err
    assert (
        "the record in place was last audited 901s ago" in enforced.err and "make the volume writable" in enforced.err
    )
    assert "audited: unreadable (cannot open" in enforced.out and "Read-only file system" in enforced.out
    assert_converged(stack)  # the ban un-banned is deleted, the new one written
    assert "ip:192.0.2.9" in stack.kv.written_keys and f"ip:{ips(6)[0]}" in stack.kv.deleted_keys
    assert stack.kv.requests["list"] == 1
    assert state.read_bytes() == recorded and not Path(f"{state}.unfinished").exists()
    assert stack.push.value("crowdsec_kv_sync_state_trusted") == 0
    assert stack.push.value("crowdsec_kv_sync_audited", 'reason="unreadable"') == 1
    # The record left in place still holds the address un-banned above: LAPI bans it again. The
    # next run on a writable volume must not trust that record, nor leave the address out.
    stack.lapi.decisions.append(first_run_ban())
    writable = run(stack, state, clock_offset=960)
    assert writable.code == 0, writable.err
    assert "audited: interval (last audit 960s ago" in writable.out
    assert_converged(stack)
    assert_kv_is_the_record(stack.kv, state)


def test_a_read_only_volume_waits_out_the_listing_lag_of_the_records_last_changes(stack, state, monkeypatch, first_run):
    """Past its audit interval, a record whose keys changed in the last two minutes would still be
    laid over the next audit's listing: a read-only run changes nothing until those are past."""
    record = read_record(state)
    write_record(state, record._replace(audited_at=record.audited_at - 901))
    before = stack.kv.snapshot()
    with monkeypatch.context() as m:
        read_only(m, state.parent)
        refused = run(stack, state)
    assert refused.code == job.EXIT_STATE, refused.err
    assert "the listing lag of its last changes, or an audit it put off" in refused.err
    assert stack.kv.snapshot() == before


def test_a_read_only_volume_without_a_record_converges_from_the_start(stack, state, monkeypatch):
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(3)]
    with monkeypatch.context() as m:
        read_only(m, state.parent)
        result = run(stack, state)
    assert result.code == 0, result.err
    assert_converged(stack)
    assert not state.exists()


def test_a_record_that_cannot_be_set_aside_means_kv_is_not_changed(stack, state, monkeypatch, first_run):
    real_replace = os.replace

    def no_rename(src, dst, *args, **kwargs):
        if str(dst).endswith(".unfinished"):
            raise OSError(errno.EACCES, "Permission denied", src)
        return real_replace(src, dst, *args, **kwargs)

    before = stack.kv.snapshot()
    with monkeypatch.context() as m:
        m.setattr(os, "replace", no_rename)
        refused = run(stack, state)
    assert refused.code == job.EXIT_STATE and "cannot set" in refused.err and "this run changed nothing" in refused.err
    assert stack.kv.snapshot() == before
    assert run(stack, state).code == 0
    assert_converged(stack)


def test_a_failed_save_says_the_record_was_set_aside_and_the_next_run_audits(stack, state, first_run):
    blocked = Path(f"{state}.tmp{os.getpid()}")
    blocked.mkdir()  # the temporary file cannot be made: as on a full disk
    result = run(stack, state)
    assert result.code == 0, result.err
    assert "this run set the record aside before changing KV, so none is in place: the next run audits" in result.err
    assert not state.exists()
    blocked.rmdir()
    again = run(stack, state)
    assert again.code == 0 and "audited: unfinished" in again.out
    assert_kv_is_the_record(stack.kv, state)


@pytest.mark.parametrize("at", ["record", "lock"])
def test_a_fifo_at_state_file_or_its_lock_is_refused_without_blocking(stack, state, first_run, at):
    target = state if at == "record" else Path(str(state) + ".lock")
    target.unlink()
    os.mkfifo(target)
    result = stack.run_process(STATE_FILE=str(state), PUSHGATEWAY_URL="", RUN_DEADLINE="20")
    assert result.code == 0, result.err
    assert "not a regular file" in result.out + result.err
    assert "audited: " in result.out
    assert_converged(stack)


# --------------------------------------------------------------------------- a lagging listing


def written_while_the_listing_lags(stack, state, address: str) -> None:
    """Four keys written and listed; then `address` written while the listing lags behind."""
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(4)]
    assert run(stack, state).code == 0
    stack.kv.freeze_listing()  # from here, the listing does not show what follows yet
    stack.lapi.decisions.append(decision(address, 3600))
    assert run(stack, state).code == 0 and f"ip:{address}" in stack.kv.live()  # written, not listed


def test_an_audit_from_a_lagging_listing_keeps_a_write_this_job_made(stack, state):
    written_while_the_listing_lags(stack, state, "192.0.2.50")
    stack.lapi.decisions.pop()  # LAPI un-bans it
    audited = run(stack, state, "--audit")
    assert audited.code == 0, audited.err
    assert "ip:192.0.2.50" not in stack.kv.live()  # the write was not forgotten: deleted
    assert "ip:192.0.2.50" in stack.kv.deleted_keys
    assert_converged(stack)


def test_an_audit_from_a_lagging_listing_keeps_a_delete_this_job_made(stack, state):
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(4)]
    assert run(stack, state).code == 0
    stack.kv.freeze_listing()
    gone = stack.lapi.decisions.pop()
    assert run(stack, state).code == 0 and f"ip:{gone['value']}" not in stack.kv.live()  # deleted, still listed
    stack.lapi.decisions.append(decision(gone["value"], 3600))  # LAPI bans it again, to the same end
    audited = run(stack, state, "--audit")
    assert audited.code == 0, audited.err
    assert f"ip:{gone['value']}" in stack.kv.live()  # written again, not taken as still there
    assert_converged(stack)


def test_an_audit_within_the_lag_heals_a_key_deleted_behind_the_jobs_back(stack, state):
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(4)]
    assert run(stack, state).code == 0
    stack.kv.store.pop("ip:10.0.0.1")  # deleted behind the job's back, just after it wrote it
    stack.kv.reset_counts()
    healed = run(stack, state, "--audit")  # within KV_LIST_LAG of the write
    assert healed.code == 0, healed.err
    assert stack.kv.written_keys == ["ip:10.0.0.1"]  # the listing and the record disagree: sent again
    assert_converged(stack)
    stack.kv.reset_counts()
    steady = run(stack, state, "--audit")  # both agree now: nothing to send
    assert steady.code == 0 and stack.kv.writes == 0 and stack.kv.deletes == 0


def test_an_audit_within_the_lag_sends_again_what_a_lagging_listing_does_not_show(stack, state):
    written_while_the_listing_lags(stack, state, "192.0.2.50")
    stack.kv.store.pop("ip:192.0.2.50")  # and then lost: a wipe, another instance, a hand delete
    stack.kv.reset_counts()
    audited = run(stack, state, "--audit")
    assert audited.code == 0, audited.err
    assert stack.kv.written_keys == ["ip:192.0.2.50"]  # neither believed: sent again, so never lost
    assert_converged(stack)


def test_past_recent_max_changes_the_audits_of_the_lag_are_put_off(stack, state, monkeypatch):
    """A run that changes more keys than the record keeps (a cold run, a rotation) keeps none, and
    an audit within KV_LIST_LAG is put off rather than made from a listing that may lag."""
    monkeypatch.setattr(job, "RECENT_MAX", 3)
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(5)]
    assert run(stack, state).code == 0
    assert read_record(state).recent_changes() == {} and read_record(state).settling_until is not None
    stack.kv.reset_counts()
    put_off = run(stack, state, "--audit")
    assert "not audited (record trusted, audit put off" in put_off.out and stack.kv.requests["list"] == 0
    stack.kv.clock_offset = job.KV_LIST_LAG + 1
    later = run(stack, state, "--audit", clock_offset=job.KV_LIST_LAG + 1)
    assert "audited: requested" in later.out and stack.kv.requests["list"] == 1
    assert_converged(stack)


# --------------------------------------------------------------------------- a clock that steps back


def test_a_clock_step_back_makes_the_run_audit_early_never_late(stack, state):
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(4)]
    env = {"AUDIT_INTERVAL": "900"}
    assert run(stack, state, **env).code == 0  # audited at T
    stack.kv.reset_counts()
    assert "not audited" in run(stack, state, clock_offset=600, **env).out  # T+600
    stepped = run(stack, state, clock_offset=300, **env)  # the clock went back 300 s: T+300
    assert stepped.code == 0, stepped.err
    assert "audited: interval (the clock went back 300s" in stepped.out
    assert stack.kv.requests["list"] == 1


def test_a_record_audited_in_the_future_is_audited_now(stack, state):
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(4)]
    assert run(stack, state).code == 0
    write_record(state, read_record(state)._replace(audited_at=read_record(state).audited_at + 10**6))
    result = run(stack, state)
    assert "audited: interval (the clock went back" in result.out


# --------------------------------------------------------------------------- range expansion


def test_range_expansion_stops_at_max_expanded_keys():
    ranges = [
        {"scope": "Range", "value": f"10.{i >> 8}.{i & 255}.0/24", "type": "ban", "duration": "1h"} for i in range(300)
    ]
    projection = job.project(ranges, 0.0, "ip:", expand_ranges_max=256)
    assert len(projection.wanted) == job.MAX_EXPANDED_KEYS
    assert projection.ignored["range_too_large"] == 300 - job.MAX_EXPANDED_KEYS // 256
    single = [{"scope": "Range", "value": "10.0.0.0/8", "type": "ban", "duration": "1h"}]
    assert job.project(single, 0.0, "ip:", expand_ranges_max=1 << 24).ignored["range_too_large"] == 1


# --------------------------------------------------------------------------- a signal as the run starts


def test_a_sigterm_while_python_imports_the_job_is_logged_and_exits_143(stack):
    """The handlers go in before the heavy imports: a SIGTERM then (here, as `argparse` is imported)
    ends the run with one line and 143, not silently by the signal."""
    child = f"""
import builtins, os, runpy, signal, sys
real = builtins.__import__
def hooked(name, *args, **kwargs):
    if name == "argparse":
        builtins.__import__ = real
        os.kill(os.getpid(), signal.SIGTERM)
    return real(name, *args, **kwargs)
builtins.__import__ = hooked
sys.argv = [{str(SCRIPT)!r}]
runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
"""
    env = {"PATH": os.environ.get("PATH", ""), **stack.env()}
    done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 143, (done.returncode, done.stderr)
    assert "SIGTERM received" in done.stderr and "nothing was done" in done.stderr
    assert stack.lapi.queries == [] and dict(stack.kv.requests) == {}


def test_a_sigterm_while_the_configuration_is_read_is_logged_and_exits_143(stack):
    child = f"""
import os, signal, sys
sys.path.insert(0, {str(SCRIPT.parent)!r})
import lapi_kv_sync as job
real = job.load_config
def load_config(env, *rest):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(env, *rest)
job.load_config = load_config
sys.exit(job.main([]))
"""
    env = {"PATH": os.environ.get("PATH", ""), **stack.env()}
    done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 143, (done.returncode, done.stderr)
    assert "SIGTERM received" in done.stderr
    assert stack.lapi.queries == []


def test_a_sigterm_once_the_configuration_is_read_is_logged_pushed_and_exits_143(stack, monkeypatch):
    def interrupted_now(*args, **kwargs):
        raise job.Interrupted(signal.SIGTERM)  # as the handler raises it, while LAPI's TLS is set up

    monkeypatch.setattr(job, "lapi_tls", interrupted_now)
    result = stack.run()
    assert result.code == 143 and "SIGTERM received" in result.err
    assert stack.push.value("crowdsec_kv_sync_exit_code") == 143
    assert stack.push.value("crowdsec_kv_sync_success") == 0
    assert stack.lapi.queries == []
