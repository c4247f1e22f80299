"""Property: for any sequence of LAPI answers, Cloudflare failures and changes made to KV behind the
job's back, runs with a state file end with KV equal to the projection of LAPI (plus the untouched
foreign keys) after every successful audit, and after every successful run when nothing was changed
behind the job's back since the last audit."""

from __future__ import annotations

import json
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lapi_kv_sync as job
from tests.conftest import fresh_stack
from tests.standins import Entry, Fault, KvStandin, _error, go_duration
from tests.test_state import read_record, write_record

ADDRESSES = [f"10.0.0.{i}" for i in range(12)] + ["2001:0DB8::1", "::ffff:10.0.0.1"]

lapi_answers = st.lists(
    st.fixed_dictionaries(
        {
            "value": st.sampled_from(ADDRESSES),
            "seconds": st.sampled_from([-5, 30, 600, 3600, 7200]),
            "type": st.sampled_from(["ban", "ban", "captcha"]),
        }
    ),
    max_size=14,
)
behind_the_back = st.lists(
    st.tuples(
        st.sampled_from(["delete", "add", "change"]),
        st.sampled_from([f"ip:{a}" for a in ADDRESSES[:12]] + ["ip:203.0.113.5"]),
    ),
    min_size=1,
    max_size=3,
)
failures = st.tuples(st.sampled_from(["list", "bulk_put", "bulk_delete"]), st.sampled_from(["refused", "landed"]))
steps = st.lists(
    st.fixed_dictionaries(
        {
            "lapi": st.one_of(st.none(), lapi_answers),  # None: LAPI unchanged
            "failure": st.one_of(st.none(), failures),
            "behind": st.one_of(st.none(), st.none(), behind_the_back),
            "audit": st.sampled_from([False, False, False, True]),
        }
    ),
    min_size=1,
    max_size=8,
)


def answer(rows: list[dict]) -> list[dict]:
    """Fixed durations, so the test's projection sees exactly what the job read."""
    return [
        {"value": r["value"], "type": r["type"], "scope": "Ip", "duration": go_duration(r["seconds"]), "origin": "o"}
        for r in rows
    ]


def fail_once(kv: KvStandin, operation: str, landed: bool) -> None:
    """The next `operation` is answered with a 400; `landed`: the stand-in did it anyway (an
    answer lost, as after a timeout)."""
    if not landed:
        kv.faults.append(Fault("5xx", operation, status=400))
        return
    original = getattr(kv, operation)

    def once(query, body):
        del kv.__dict__[operation]
        original(query, body)
        return 400, _error(10001, "the answer was lost")

    setattr(kv, operation, once)


def change_behind(kv: KvStandin, changes: list[tuple[str, str]]) -> None:
    later = int(time.time()) + 3600
    for what, key in changes:
        if what == "delete":
            kv.store.pop(key, None)
        elif what == "add":
            kv.store[key] = Entry("ban", later, {"remediation": "ban"})
        elif key in kv.store:
            entry = kv.store[key]
            value = "captcha" if entry.value == "ban" else "ban"
            kv.store[key] = Entry(value, entry.expiration, {"remediation": value})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lapi_answers, steps)
def test_runs_with_a_state_file_converge_after_every_audit_and_every_undisturbed_run(first, sequence):
    with fresh_stack() as (stack, tmp):
        lapi, kv = stack.lapi, stack.kv
        kv.store["config:flag"] = Entry("on")
        kv.store["ipx"] = Entry("foreign", int(time.time()) + 86400, {"owner": "someone"})
        foreign = {k: v for k, v in kv.snapshot().items() if not k.startswith("ip:")}
        state = str(Path(tmp) / "record")
        lapi.decisions = answer(first)
        disturbed = False  # KV changed behind the job's back since its last audit
        for step in [{"lapi": None, "failure": None, "behind": None, "audit": False}, *sequence]:
            if step["lapi"] is not None:
                lapi.decisions = answer(step["lapi"])
            if step["behind"]:
                change_behind(kv, step["behind"])
                disturbed = True
                if Path(state).exists():  # and KV_LIST_LAG since the job's own changes: an audit believes its listing
                    write_record(Path(state), read_record(Path(state))._replace(recent=""))
            if step["failure"]:
                operation, how = step["failure"]
                fail_once(kv, operation, how == "landed")
            result = stack.run(*(["--audit"] if step["audit"] else []), STATE_FILE=state, PUSHGATEWAY_URL="")
            kv.faults.clear()
            for operation in ("list", "bulk_put", "bulk_delete"):
                kv.__dict__.pop(operation, None)  # a failure the run never reached
            audited = "lapi-kv-sync: wanted" in result.out and " audited: " in result.out
            if result.code != 0:
                assert result.code == 1, result.err
                continue
            if audited:
                disturbed = False
            if not disturbed:
                wanted = job.project(json.loads(lapi.body()), time.time(), "ip:").wanted
                ours = {k: e.value for k, e in kv.live().items() if k.startswith("ip:")}
                assert ours == {k: w.remediation for k, w in wanted.items()}, (step, result.out)
            assert {k: v for k, v in kv.snapshot().items() if not k.startswith("ip:")} == foreign
        assert kv.violations == []
