"""The benchmark's own helpers, where a mistake would make its figures measure something else."""

from __future__ import annotations

import importlib.util

import lapi_kv_sync as job
from tests.conftest import CF_TOKEN, LAPI_KEY, ROOT, Stack
from tests.standins import KvStandin, LapiStandin, PushgatewayStandin, decision


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchs_audit_lists_even_right_after_a_big_change(tmp_path):
    """After a run that changed more keys than a record keeps (RECENT_MAX), the job puts audits
    off for KV_LIST_LAG, --audit included: the bench ages the record first, or its "audit" row
    measures a run that lists nothing (the 300,000 row once did)."""
    n = job.RECENT_MAX + 1
    # No schema check: 20,001 keys through it would take the test most of a minute.
    with LapiStandin(LAPI_KEY) as lapi, KvStandin(CF_TOKEN, schema=False) as kv, PushgatewayStandin() as push:
        stack = Stack(lapi, kv, push)
        lapi.decisions = [decision(f"10.0.{i >> 8}.{i & 255}") for i in range(n)]
        state = {"STATE_FILE": str(tmp_path / "record.gz")}
        assert stack.run(**state).code == 0 and kv.writes == n
        kv.reset_counts()
        assert stack.run("--audit", **state).code == 0 and kv.requests["list"] == 0  # put off
        bench_module().past_the_lag(tmp_path / "record.gz")
        audited = stack.run("--audit", **state)
        assert audited.code == 0 and kv.requests["list"] == -(-n // 1000) and kv.writes == 0
