"""Whole runs with STATE_FILE against the strict KV stand-in: the job plans against its own record,
lists only when it audits, and its record never claims what KV does not hold."""

from __future__ import annotations

import fcntl
import gzip
import os
import threading
import time
from pathlib import Path

import pytest

import lapi_kv_sync as job
from tests.standins import ACCOUNT, NAMESPACE, Entry, _error, decision

PREFIXED = "crowdsec_kv_sync_"


def ips(n: int, base: str = "10") -> list[str]:
    return [f"{base}.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(n)]


@pytest.fixture
def state(tmp_path) -> Path:
    return tmp_path / "state" / "record.gz"


@pytest.fixture
def run(stack, state):
    state.parent.mkdir()

    def run(*args: str, **env: str):
        return stack.run(*args, STATE_FILE=str(state), **env)

    return run


def ours(kv) -> dict[str, str]:
    return {k: e.value for k, e in kv.live().items() if k.startswith("ip:")}


def read_record(path: Path) -> job.Record:
    with gzip.open(path, "rt", encoding="utf-8", newline="\n") as f:
        return job.decode_record(f)


def write_record(path: Path, record: job.Record) -> None:
    with gzip.open(path, "wt", encoding="utf-8", newline="\n") as f:
        f.writelines(job.encode_record(record, 0))


def assert_kv_is_the_record(kv, path: Path) -> None:
    """The record claims exactly what KV holds under the prefix, to within the expiration slack."""
    record = read_record(path)
    live = {k: e for k, e in kv.live().items() if k.startswith("ip:")}
    assert set(record.keys) == set(live)
    for key, have in record.keys.items():
        if key in ("ip:scopes", "ip:networks"):  # a table: its digest stands for the remediation
            assert have.remediation == live[key].metadata["digest"]
        else:
            assert have.remediation == live[key].value == live[key].metadata["remediation"]
        assert live[key].expiration - 5 <= have.expiration <= live[key].expiration


# --------------------------------------------------------------------------- steady and churn


def test_a_steady_run_with_a_trusted_record_makes_no_cloudflare_request(stack, run, state):
    stack.lapi.decisions = [decision(ip, 3600 + i) for i, ip in enumerate(ips(2500))]
    first = run()
    assert first.code == 0, first.err
    assert "audited: no_record" in first.out
    assert stack.kv.requests["list"] == 1 and stack.kv.writes == 2500  # KV was empty: one page
    assert_kv_is_the_record(stack.kv, state)
    before = state.read_bytes()
    stack.kv.reset_counts()
    second = run()
    assert second.code == 0, second.err
    assert dict(stack.kv.requests) == {}  # no list, no write, nothing at all
    assert stack.kv.connections == 0
    assert "written 0, deleted 0, unchanged 2500" in second.out
    assert "not audited (record trusted, last audit" in second.out
    assert state.read_bytes() == before  # nothing changed, nothing rewritten
    assert stack.push.value(PREFIXED + "state_trusted") == 1
    assert stack.push.value(PREFIXED + "audited", 'reason="no_record"') == 0
    assert stack.push.value(PREFIXED + "unchanged") == 2500


def test_a_run_that_finds_lapi_as_the_record_has_it_plans_nothing(stack, run, state):
    stack.lapi.decisions = [decision(ip, 3600 + i) for i, ip in enumerate(ips(300))]
    stack.lapi.decisions += [decision("192.0.2.1", type="captcha"), decision("192.0.2.2", scope="Country")]
    first = run()
    assert first.code == 0 and "LAPI's answer unchanged" not in first.out
    assert read_record(state).lapi_digest is not None
    before = state.read_bytes()
    stack.kv.reset_counts()
    time.sleep(0.05)  # every duration in LAPI's answer is a little shorter now
    second = run()
    assert second.code == 0, second.err
    assert "LAPI's answer unchanged since the record: nothing to plan" in second.out
    assert "wanted 301 (ban 300, captcha 1), written 0, deleted 0, unchanged 301, ignored 1 (" in second.out
    assert dict(stack.kv.requests) == {} and state.read_bytes() == before
    assert stack.push.value(PREFIXED + "decisions") == 301 and stack.push.value(PREFIXED + "success") == 1
    assert stack.push.value(PREFIXED + "unchanged") == 301
    stack.lapi.decisions.append(decision("192.0.2.3"))  # a new ban: another answer
    third = run()
    assert third.code == 0 and "LAPI's answer unchanged" not in third.out and stack.kv.written_keys == ["ip:192.0.2.3"]
    assert run().code == 0 and "LAPI's answer unchanged" in run().out
    assert_kv_is_the_record(stack.kv, state)


def test_a_decision_whose_end_moved_is_written_once_its_old_key_expires(stack, run, state):
    stack.lapi.decisions = [decision("192.0.2.1", 120), decision("192.0.2.2", 7200)]
    assert run().code == 0
    stack.lapi.decisions[0]["until"] += 3600  # LAPI never does this, but if it did: the same bytes but the duration
    stack.kv.reset_counts()
    assert "LAPI's answer unchanged" in run().out and stack.kv.writes == 0  # its key still lives
    stack.kv.clock_offset = 300  # five minutes later, on both clocks: the old key has expired
    later = run(clock_offset=300)
    assert later.code == 0 and "LAPI's answer unchanged" not in later.out
    # (The other key is written too: LAPI's durations count on the real clock, the job's is moved.)
    assert "ip:192.0.2.1" in stack.kv.written_keys and stack.kv.live()["ip:192.0.2.1"].value == "ban"


def test_a_key_capped_at_max_ttl_is_refreshed_though_lapi_is_unchanged(stack, run, state):
    # A ten-year ban gets a key of MAX_TTL (a year), rewritten once it comes within REFRESH_AHEAD
    # of its expiration, so that it lasts while the decision does. LAPI's answer does not change
    # meanwhile (the duration is blanked), and the key has not expired: the shortcut must still
    # let the refresh through, as a full plan would.
    due = job.MAX_TTL - job.REFRESH_AHEAD + 60
    stack.lapi.decisions = [decision("192.0.2.1", 10 * 365 * 86400), decision("192.0.2.2", due + 4 * 3600)]
    rarely = {"AUDIT_INTERVAL": str(10 * due)}  # an audit would refresh it: this is between audits
    assert run(**rarely).code == 0
    stack.kv.reset_counts()
    stack.kv.clock_offset = due
    later = run(clock_offset=due, **rarely)  # LAPI's answer: the same but for its durations
    assert later.code == 0, later.err
    assert "ip:192.0.2.1" in stack.kv.written_keys, later.out
    assert stack.kv.live()["ip:192.0.2.1"].expiration > time.time() + due + job.MAX_TTL - 3600


def test_a_ban_longer_than_max_ttl_still_lets_steady_runs_plan_nothing(stack, run, state):
    stack.lapi.decisions = [decision("192.0.2.1", 10 * 365 * 86400), decision("192.0.2.2", 4 * 3600)]
    assert run().code == 0
    due_at = read_record(state).due_at
    assert (
        abs(due_at - (time.time() + job.MAX_TTL - job.REFRESH_AHEAD)) < 60
    )  # the capped key, 15 minutes before it expires
    stack.kv.reset_counts()
    steady = run()
    assert "LAPI's answer unchanged" in steady.out and dict(stack.kv.requests) == {}


def test_a_key_capped_by_less_than_the_slack_never_comes_due(stack, run, state):
    # Capped at MAX_TTL with under EXPIRATION_SLACK of its decision past it: the key already ends
    # with its decision, so it is never due, and the record says so: steady runs take the shortcut.
    stack.lapi.decisions = [decision("192.0.2.1", job.MAX_TTL + 30), decision("192.0.2.2", 3600)]
    assert run().code == 0 and read_record(state).due_at is None
    stack.kv.reset_counts()
    steady = run()
    assert "LAPI's answer unchanged" in steady.out and dict(stack.kv.requests) == {}


def test_a_run_held_back_by_max_deletes_records_no_digest(stack, run, state):
    stack.lapi.decisions = [decision(ip) for ip in ips(20)]
    assert run().code == 0
    stack.lapi.decisions = stack.lapi.decisions[:5]
    assert run(MAX_DELETES="3").code == 1
    assert read_record(state).lapi_digest is None
    assert "LAPI's answer unchanged" not in run(MAX_DELETES="3").out  # planned again, and held back again


def test_churn_costs_exactly_the_churn_and_no_list(stack, run, state):
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(30)]
    assert run().code == 0
    stack.kv.reset_counts()
    by_value = {d["value"]: d for d in stack.lapi.decisions}
    stack.lapi.decisions.remove(by_value["10.0.0.5"])  # un-ban
    by_value["10.0.0.7"]["type"] = "captcha"  # ban turned captcha
    by_value["10.0.0.9"]["until"] -= 1800  # ban made shorter: the key must not outlive it
    by_value["10.0.0.11"]["until"] += 7200  # ban made longer (a refresh): the key is left until due
    stack.lapi.decisions.append(decision("192.0.2.77", 600))  # new ban
    result = run()
    assert result.code == 0, result.err
    assert stack.kv.requests["list"] == 0
    assert stack.kv.deleted_keys == ["ip:10.0.0.5"]
    assert sorted(stack.kv.written_keys) == ["ip:10.0.0.7", "ip:10.0.0.9", "ip:192.0.2.77"]
    assert_kv_is_the_record(stack.kv, state)
    stack.kv.reset_counts()
    assert run().code == 0 and dict(stack.kv.requests) == {}


def test_keys_past_their_expiration_are_gone_from_the_record(stack, run, state):
    stack.lapi.decisions = [decision("192.0.2.1", 3600), decision("192.0.2.2", 3600)]
    assert run().code == 0
    record = read_record(state)
    # As if 192.0.2.2's key had been written long ago and KV expired it since.
    record.keys["ip:192.0.2.2"] = job.Present(int(time.time()) - 10, "ban")
    write_record(state, record)
    stack.kv.store.pop("ip:192.0.2.2")
    stack.kv.reset_counts()
    result = run()
    assert result.code == 0, result.err
    assert stack.kv.written_keys == ["ip:192.0.2.2"] and stack.kv.requests["list"] == 0
    assert_kv_is_the_record(stack.kv, state)


# --------------------------------------------------------------------------- drift and audits


def drift(kv, state: Path | None = None) -> None:
    """Changes made to KV behind the job's back: a key deleted, one added, one's value changed; and,
    given the record, KV_LIST_LAG gone by since the job's own changes, so an audit believes its
    listing (within that time it believes what the job wrote: the listing may lag)."""
    if state is not None:
        write_record(state, read_record(state)._replace(recent=""))
    kv.store.pop("ip:10.0.0.1")
    kv.store["ip:203.0.113.9"] = Entry("ban", int(time.time()) + 3600, {"remediation": "ban"})
    kv.store["ip:10.0.0.2"] = Entry("captcha", int(time.time()) + 3600, {"remediation": "captcha"})


def test_drift_stays_until_an_audit_and_audit_puts_it_right(stack, run, state):
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(10)]
    assert run().code == 0
    wanted = ours(stack.kv)
    drift(stack.kv, state)
    assert run().code == 0  # the record is trusted: the job cannot see the drift
    assert ours(stack.kv) != wanted
    stack.kv.reset_counts()
    audited = run("--audit")
    assert audited.code == 0, audited.err
    assert "audited: requested (--audit" in audited.out
    assert stack.kv.requests["list"] == 1
    assert sorted(stack.kv.written_keys) == ["ip:10.0.0.1", "ip:10.0.0.2"]
    assert stack.kv.deleted_keys == ["ip:203.0.113.9"]
    assert ours(stack.kv) == wanted
    assert_kv_is_the_record(stack.kv, state)
    assert stack.push.value(PREFIXED + "audited", 'reason="requested"') == 1
    assert stack.push.value(PREFIXED + "state_trusted") == 1


def test_drift_is_put_right_within_audit_interval(stack, run, state):
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(10)]
    assert run().code == 0
    wanted = ours(stack.kv)
    drift(stack.kv, state)
    # The last audit was 901 s ago.
    record = read_record(state)
    write_record(state, record._replace(audited_at=record.audited_at - 901))
    stack.kv.reset_counts()
    result = run()
    assert result.code == 0, result.err
    assert "audited: interval (last audit 901s ago, AUDIT_INTERVAL=900)" in result.out
    assert ours(stack.kv) == wanted and stack.kv.requests["list"] == 1
    stack.kv.reset_counts()
    assert run().code == 0 and stack.kv.requests["list"] == 0  # the audit restarted the interval
    drift(stack.kv, state)
    assert run(AUDIT_INTERVAL="0").code == 0  # 0: every run audits
    assert ours(stack.kv) == wanted and stack.kv.requests["list"] == 1


# Edits behind the job's back under its prefix, each as KV holds the key afterwards, from how the
# job wrote it (`ip:10.0.0.3`, a ban for an hour): what docs/operations.md says an audit puts right.
HOUR = 3600
REPAIRED_EDITS = {
    "deleted": None,
    "written without metadata (wrangler kv key put)": lambda e: Entry("allow", e.expiration, None),
    "metadata of another remediation, value kept": lambda e: Entry("ban", e.expiration, {"remediation": "captcha"}),
    "value and metadata of another remediation": lambda e: Entry("captcha", e.expiration, {"remediation": "captcha"}),
    "metadata not the job's": lambda e: Entry("allow", e.expiration, {"note": "let in"}),
    "no expiration": lambda e: Entry(e.value, None, e.metadata),
    "expiration a day later": lambda e: Entry(e.value, e.expiration + 24 * HOUR, e.metadata),
    # Moved earlier to within REFRESH_AHEAD: due. (Moved earlier but further off, it is left until
    # then, as a key whose decision now ends later: tests/test_core.py.)
    "expiration 50 minutes earlier": lambda e: Entry(e.value, e.expiration - 50 * 60, e.metadata),
}


@pytest.mark.parametrize("with_state", [True, False], ids=["STATE_FILE --audit", "no STATE_FILE"])
@pytest.mark.parametrize("edit", list(REPAIRED_EDITS))
def test_an_edit_the_listing_shows_is_put_right_by_an_audit(stack, run, state, edit, with_state):
    stack.lapi.decisions = [decision(ip, HOUR) for ip in ips(5)]
    audit = (lambda: run("--audit")) if with_state else stack.run
    assert audit().code == 0
    wanted = {k: (e.value, e.metadata["remediation"]) for k, e in stack.kv.live().items()}
    if with_state:
        write_record(state, read_record(state)._replace(recent=""))  # the job's own changes long listed
    key = "ip:10.0.0.3"
    if REPAIRED_EDITS[edit] is None:
        stack.kv.store.pop(key)
    else:
        stack.kv.store[key] = REPAIRED_EDITS[edit](stack.kv.store[key])
    stack.kv.reset_counts()
    result = audit()
    assert result.code == 0, result.err
    assert stack.kv.written_keys == [key]
    assert {k: (e.value, e.metadata["remediation"]) for k, e in stack.kv.live().items()} == wanted
    assert time.time() + HOUR - 60 <= stack.kv.store[key].expiration <= time.time() + HOUR + 60
    if with_state:
        assert_kv_is_the_record(stack.kv, state)


@pytest.mark.parametrize("with_state", [True, False], ids=["STATE_FILE --audit", "no STATE_FILE"])
def test_a_value_edited_with_the_jobs_metadata_kept_is_not_seen_until_its_key_is_deleted(stack, run, state, with_state):
    """The documented limit (docs/operations.md, "What holds"): a listing shows names, expirations
    and metadata, not values, and the job reads no value. A key's value changed by a write that
    sends the job's metadata and expiration back stays so through audits; deleted by hand, the
    key is written again by the next audit (`--audit` at once), as the docs say to do."""
    stack.lapi.decisions = [decision(ip, HOUR) for ip in ips(5)]
    audit = (lambda: run("--audit")) if with_state else stack.run
    assert audit().code == 0
    if with_state:
        write_record(state, read_record(state)._replace(recent=""))
    key = "ip:10.0.0.3"
    stack.kv.store[key] = Entry("allow", stack.kv.store[key].expiration, stack.kv.store[key].metadata)
    stack.kv.reset_counts()
    assert audit().code == 0
    assert stack.kv.requests["list"] == 1 and stack.kv.written_keys == []
    assert stack.kv.live()[key].value == "allow"  # not seen
    stack.kv.store.pop(key)  # the remedy: delete it (wrangler kv key delete), then audit
    assert audit().code == 0
    assert stack.kv.written_keys == [key] and stack.kv.live()[key].value == "ban"


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"garbage, not even gzip", "unreadable"),
        (gzip.compress(b'{"kind": "lapi-kv-sync state", "format": 1}\n'), "unreadable"),
        (gzip.compress(b'{"kind": "lapi-kv-sync state", "format": 2}\n'), "unreadable"),
        ("truncated", "unreadable"),
        ("another namespace", "foreign"),
        ("another prefix", "foreign"),
        ("another account", "foreign"),
    ],
)
def test_garbage_and_foreign_records_are_not_trusted(stack, run, state, content, reason):
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(10)]
    assert run().code == 0
    record = read_record(state)
    if content == "truncated":
        content = state.read_bytes()[:-9]
    elif content == "another namespace":
        write_record(state, record._replace(namespace="0" * 32, keys={}, recent=""))
    elif content == "another prefix":
        write_record(state, record._replace(prefix="cs/", keys={}, recent=""))
    elif content == "another account":
        write_record(state, record._replace(account="f" * 32, keys={}, recent=""))
    if isinstance(content, bytes):
        state.write_bytes(content)
    stack.kv.store.pop("ip:10.0.0.3")  # drift the untrusted record would not show
    stack.kv.reset_counts()
    result = run()
    assert result.code == 0, result.err
    assert f"audited: {reason} (" in result.out
    assert stack.kv.requests["list"] == 1 and stack.kv.written_keys == ["ip:10.0.0.3"]
    assert stack.push.value(PREFIXED + "audited", f'reason="{reason}"') == 1
    assert stack.push.value(PREFIXED + "state_trusted") == 0
    assert_kv_is_the_record(stack.kv, state)


# --------------------------------------------------------------------------- failures


def fail_bulk_put_after(kv, ok: int, landed: bool) -> list[int]:
    """The KV stand-in answers bulk write number ok+1 with a 400; `landed`: it wrote the keys
    anyway (the answer was lost, as after a timeout), else it wrote none."""
    original, calls = kv.bulk_put, []

    def bulk_put(query, items):
        calls.append(len(items))
        if len(calls) == ok + 1:
            if landed:
                original(query, items)
            return 400, _error(10001, "the stand-in refuses this one")
        return original(query, items)

    kv.bulk_put = bulk_put
    return calls


@pytest.mark.parametrize("landed", [False, True])
def test_a_failure_after_the_first_bulk_call_leaves_a_record_the_next_run_can_trust(stack, run, state, landed):
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(25_000)]
    calls = fail_bulk_put_after(stack.kv, 1, landed)
    failed = run()
    assert failed.code == 1 and calls == [10_000, 10_000]
    record = read_record(state)
    known = [k for k, p in record.keys.items() if p.remediation is not None]
    unknown = [k for k, p in record.keys.items() if p.remediation is None]
    assert len(known) == 10_000 and len(unknown) == 10_000  # the refused chunk: may or may not have landed
    assert record.lapi_digest is None and record.projected is None  # it did not converge
    assert set(known) <= set(stack.kv.live())
    del stack.kv.bulk_put
    if landed:
        stack.lapi.decisions = stack.lapi.decisions[:5000]  # and LAPI un-bans most of them
    stack.kv.reset_counts()
    healthy = run()
    assert healthy.code == 0, healthy.err
    assert "not audited" in healthy.out and stack.kv.requests["list"] == 0
    stack.kv.reset_counts()
    # KV_LIST_LAG on: 20,000 changes are more than a record keeps, and an audit before would be put off.
    write_record(state, read_record(state)._replace(settling_until=None))
    check = run("--audit")
    assert check.code == 0 and "audited: requested" in check.out
    assert (stack.kv.writes, stack.kv.deletes) == (0, 0)  # converged
    assert len(ours(stack.kv)) == len(stack.lapi.decisions)
    assert_kv_is_the_record(stack.kv, state)


def test_an_interrupted_run_leaves_a_record_the_next_run_does_not_trust(stack, run, state, monkeypatch):
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(10)]
    assert run().code == 0
    stack.lapi.decisions.pop()

    def interrupted(*args):
        raise KeyboardInterrupt  # as a signal handler's exception would, mid-apply

    monkeypatch.setattr(job, "apply_plan", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.undo()
    stack.kv.reset_counts()
    result = run()
    assert result.code == 0, result.err
    assert "audited: unfinished (the run before did not finish recording)" in result.out
    assert stack.kv.deleted_keys == ["ip:10.0.0.9"]
    assert_kv_is_the_record(stack.kv, state)


def test_a_record_that_cannot_be_written_is_a_warning_and_the_next_run_audits(stack, run, state):
    # A directory where the in-process run's temporary file goes: the record cannot be replaced.
    blocked = Path(f"{state}.tmp{os.getpid()}")
    blocked.mkdir()
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(5)]
    result = run()
    assert result.code == 0, result.err
    assert "warning: STATE_FILE: cannot write" in result.err and "the next run audits" in result.err
    assert len(ours(stack.kv)) == 5 and not state.exists()
    blocked.rmdir()
    stack.kv.reset_counts()
    again = run()
    assert again.code == 0 and "audited: unfinished" in again.out  # the mark stayed
    assert stack.kv.requests["list"] == 1 and stack.kv.writes == 0


# --------------------------------------------------------------------------- two runs, dry runs


def test_a_second_run_waits_for_the_lock_then_gives_up_having_changed_nothing(stack, run, state):
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(5)]
    assert run().code == 0
    before, kv_before = state.read_bytes(), stack.kv.snapshot()
    stack.lapi.decisions = []
    stack.lapi.queries.clear()
    stack.kv.reset_counts()
    with open(str(state) + ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = run()  # the test clock's sleeps cost nothing: the bounded wait passes at once
    assert result.code == 1
    assert "another run holds" in result.err and "changed nothing" in result.err
    assert stack.lapi.queries == [] and dict(stack.kv.requests) == {}
    assert state.read_bytes() == before and stack.kv.snapshot() == kv_before


def test_two_runs_at_once_do_not_interleave(stack, state):
    state.parent.mkdir()
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(3000)]
    results = []

    def one_run():
        results.append(stack.run_process(STATE_FILE=str(state), PUSHGATEWAY_URL=""))

    threads = [threading.Thread(target=one_run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.code for r in results] == [0, 0], [r.err for r in results]
    assert stack.kv.writes == 3000  # the second waited, then found the first's record: wrote nothing
    assert sorted("not audited" in r.out for r in results) == [False, True]
    assert_kv_is_the_record(stack.kv, state)


def test_dry_run_never_touches_the_record(stack, run, state):
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(5)]
    dry = run("--dry-run")
    assert dry.code == 0 and "write 5" in dry.out
    assert list(state.parent.iterdir()) == []  # no record, no lock file
    assert run().code == 0
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in state.parent.iterdir()}
    stack.lapi.decisions.pop()
    stack.kv.reset_counts()
    dry = run("--dry-run")
    assert dry.code == 0 and "delete 1: ip:10.0.0.4" in dry.out
    assert stack.kv.requests["list"] == 0  # it planned against the trusted record
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in state.parent.iterdir()} == before


def test_a_dry_run_says_what_it_compared_with_and_what_a_real_run_would_send(stack, run, state):
    """With a trusted record the dry run plans against the record, which does not show a key
    removed behind the job's back: it says so, with the record's age; `--audit` lists KV."""
    stack.lapi.decisions = [
        decision("192.0.2.1"),
        decision("192.0.2.2", type="captcha"),
        decision("192.0.2.3", type="throttle"),
    ]
    assert run().code == 0
    del stack.kv.store["ip:192.0.2.1"]  # behind the job's back
    stack.kv.store["ip:192.0.2.9"] = Entry("ban", None, {"remediation": "ban"})
    # Two minutes on: the job's own changes are past KV_LIST_LAG, an audit believes its listing.
    write_record(state, read_record(state)._replace(audited_at=time.time() - 120, recent=""))
    stack.kv.reset_counts()
    dry = run("--dry-run")
    assert dry.code == 0
    assert "dry run: compared with the state record, not with KV itself" in dry.out
    assert "last checked against a listing 120s ago; --audit --dry-run lists KV" in dry.out
    assert "dry run: unchanged 2: ip:192.0.2.1 (ban) ip:192.0.2.2 (captcha)\n" in dry.out
    assert "dry run: ignored 1 (expired 0, scope 0, type 1, invalid 0, range_too_large 0, table_full 0)" in dry.out
    assert "would send Cloudflare 0 requests for this plan: bulk_put 0 (0 keys), bulk_delete 0 (0 keys)" in dry.out
    assert stack.kv.requests["list"] == 0

    audit = run("--dry-run", "--audit")
    assert audit.code == 0
    assert "dry run: compared with a listing of KV (audited: requested" in audit.out
    assert "dry run: write 1: ip:192.0.2.1 (ban)\n" in audit.out
    assert "dry run: delete 1: ip:192.0.2.9 (ban)\n" in audit.out
    assert "would send Cloudflare 2 requests for this plan: bulk_put 1 (1 key), bulk_delete 1 (1 key)" in audit.out
    assert "this dry run sent 1 (list 1, bulk_put 0, bulk_delete 0)" in audit.out
    assert stack.kv.writes == 0 and stack.kv.deletes == 0


def test_a_dry_run_counts_bulk_calls_of_10000_keys_and_none_past_the_delete_guard(stack):
    stack.lapi.decisions = [decision(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}") for i in range(10_001)]
    stack.kv.store.update({f"ip:192.0.2.{i}": Entry("ban", None, {"remediation": "ban"}) for i in range(3)})
    dry = stack.run("--dry-run", MAX_DELETES="2")
    assert "bulk_put 2 (10001 keys), bulk_delete 0 (0 keys)" in dry.out
    assert "the plan deletes 3 keys, more than MAX_DELETES=2: a real run would delete none and exit 1" in dry.err
    dry = stack.run("--dry-run", "--force", MAX_DELETES="2")
    assert "would send Cloudflare 3 requests for this plan: bulk_put 2 (10001 keys), bulk_delete 1 (3 keys)" in dry.out


def test_the_record_carries_its_owner_and_usage_metrics_time(stack, run, state):
    stack.lapi.decisions = [decision("192.0.2.1", 3600)]
    assert run().code == 0
    record = read_record(state)
    assert (record.account, record.namespace, record.prefix) == (ACCOUNT, NAMESPACE, "ip:")
    assert record.usage_metrics_sent_at is None
    write_record(state, record._replace(usage_metrics_sent_at=1_800_000_000.0))
    stack.lapi.decisions.append(decision("192.0.2.2", 3600))
    assert run().code == 0
    assert read_record(state).usage_metrics_sent_at == 1_800_000_000.0


@pytest.mark.parametrize("planted", [".lock", f".tmp{os.getpid()}"])
def test_a_symlink_planted_beside_the_record_is_never_followed(stack, run, state, planted):
    """Whoever can write STATE_FILE's directory (a shared /tmp, a shared volume) must not make the
    job truncate or overwrite another file through its lock or temporary file."""
    precious = state.parent.parent / "precious"
    precious.write_text("not the job's\n")
    os.symlink(precious, str(state) + planted)
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(5)]
    result = run()
    assert result.code == 0, result.err
    assert len(ours(stack.kv)) == 5
    assert precious.read_text() == "not the job's\n"


@pytest.mark.parametrize("named", ["the directory", "a trailing slash"])
def test_state_file_naming_a_directory_is_a_configuration_error(stack, state, named):
    """STATE_FILE set to the volume's mount path would audit every run (a list per 1,000 keys, the
    free plan's 1,000 a day gone by noon) behind a warning: exit 2, naming the variable."""
    state.parent.mkdir()
    path = str(state.parent) if named == "the directory" else str(state) + "/"
    stack.lapi.decisions = [decision(ip, 3600) for ip in ips(5)]
    result = stack.run(STATE_FILE=path)
    assert result.code == job.EXIT_CONFIG
    assert "STATE_FILE names a directory" in result.err
    assert dict(stack.kv.requests) == {} and stack.lapi.queries == []


# --------------------------------------------------------------------------- a revoked token


def age_record(state: Path, seconds: float) -> None:
    write_record(state, read_record(state)._replace(audited_at=time.time() - seconds))


def test_a_token_revoked_between_audits_fails_the_run_past_half_the_interval_and_every_run_after(stack, run, state):
    """A steady run sends Cloudflare nothing; the one in the minute past AUDIT_INTERVAL / 2 asks
    for the namespace. Refused, the run exits 1 and leaves the record untrusted: the runs after it
    audit and fail alike, so the alert on failed runs sees a failure that lasts."""
    stack.lapi.decisions = [decision("192.0.2.1")]
    assert run().code == 0
    stack.kv.reset_counts()
    age_record(state, 400)  # before half of the default 900 s: no check, no request
    revoked = {"CF_API_TOKEN": "a-revoked-token-0123456789"}
    assert run(**revoked).code == 0 and dict(stack.kv.requests) == {}
    age_record(state, 460)
    result = run(**revoked)
    assert result.code == job.EXIT_CLOUDFLARE
    assert "Cloudflare: namespace: HTTP 403" in result.err and "Workers KV Storage: Edit" in result.err
    assert "cloudflare attempts 1 (list 0, bulk_put 0, bulk_delete 0, namespace 1), answers 1" in result.err
    after = run(**revoked)  # out of the check's minute, yet it fails: it audits
    assert after.code == job.EXIT_CLOUDFLARE and "audited: unfinished" in after.err
    assert run().code == 0 and ours(stack.kv) == {"ip:192.0.2.1": "ban"}  # a working token again


@pytest.mark.parametrize("lapi_changed", [False, True])
def test_with_a_working_token_the_check_costs_one_request_an_interval(stack, run, state, lapi_changed):
    stack.lapi.decisions = [decision("192.0.2.1")]
    assert run().code == 0
    if lapi_changed:  # planned, but nothing to write: the check happens on that path too
        stack.lapi.decisions = [decision("192.0.2.1"), decision("192.0.2.2", type="throttle")]
    stack.kv.reset_counts()
    age_record(state, 455)
    assert run().code == 0
    assert dict(stack.kv.requests) == {"namespace": 1}
    age_record(state, 520)  # past the minute: no check
    stack.kv.reset_counts()
    assert run().code == 0 and dict(stack.kv.requests) == {}


# --------------------------------------------------------------------------- decisions left out, named


def test_decisions_left_out_are_named_once_per_new_reason(stack, run, state):
    stack.lapi.decisions = [decision("192.0.2.1"), decision("192.0.2.4", type="throttle")]
    off_slot = 600  # not in the first minute of an hour: only a record tells what is new
    first = run(clock_offset=off_slot - time.time() % 3600)
    assert first.code == 0 and "named once" not in first.out  # no record of what the last run left out
    stack.lapi.decisions += [decision("not-an-address"), decision("0.0.0.0/0", scope="Range", origin="cscli")]
    stack.lapi.decisions += [decision(f"junk-{i}") for i in range(7)]
    second = run()
    assert second.code == 0, second.err
    (line,) = [line for line in second.out.splitlines() if "named once" in line]
    # New since the last run: invalid and range_too_large, each named (a few, then how many more);
    # type was there before, so it is not named again.
    assert "invalid 8: not-an-address (Ip ban, origin crowdsec), junk-0 (Ip ban, origin crowdsec)" in line
    assert "junk-3 (Ip ban, origin crowdsec) (+3 more)" in line
    assert "range_too_large 1: 0.0.0.0/0 (Range ban, origin cscli)" in line
    assert "type" not in line
    stack.lapi.decisions.append(decision("192.0.2.2"))  # another answer, the same reasons
    third = run()
    assert third.code == 0 and "named once" not in third.out


def test_without_a_record_decisions_left_out_are_named_once_an_hour(stack):
    stack.lapi.decisions = [decision("192.0.2.1"), decision("192.0.2.4", type="throttle")]
    at_the_hour = 3600 - time.time() % 3600 + 5  # five seconds into the next hour
    named = stack.run(clock_offset=at_the_hour)
    assert "named once (a new reason since the last run, or once an hour): type 1: 192.0.2.4 (Ip throttle" in named.out
    assert "named once" not in stack.run(clock_offset=at_the_hour + 120).out


def test_a_dry_run_names_every_reason(stack):
    stack.lapi.decisions = [decision("192.0.2.1"), decision("192.0.2.4", type="throttle"), decision("192.0.2.5", -3)]
    stack.lapi.decisions.append({"value": ["a"] * 10_000, "type": "ban", "scope": "Ip", "duration": "4h"})
    dry = stack.run("--dry-run")
    assert dry.code == 0
    assert "dry run: ignored (type): 192.0.2.4 (Ip throttle, origin crowdsec)" in dry.out
    assert "dry run: ignored (expired): 192.0.2.5 (Ip ban, origin crowdsec)" in dry.out
    # A hostile value is named bounded, whatever its size; a missing origin says so.
    (invalid,) = [line for line in dry.out.splitlines() if "ignored (invalid)" in line]
    assert len(invalid) < 200 and "origin ?" in invalid
