"""A bounded soak of the job with STATE_FILE (issue 20): many runs as processes, with LAPI changing
between them, Cloudflare failing now and then, a listing that lags, and runs stopped part-way by
SIGTERM or SIGKILL. After every run that exits 0, KV holds exactly what LAPI wants and the record
claims exactly what KV holds. Bounded by a count of runs, not by time; seeded (SOAK_SEED replays)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

from tests.conftest import SCRIPT, assert_no_secret
from tests.standins import Fault, decision
from tests.test_state import assert_kv_is_the_record, ours

RUNS = 40


def address(i: int) -> str:
    return f"10.{i >> 8 & 255}.{i & 255}.{i % 7}"


def changed(rng: random.Random, decisions: list[dict], next_new: int) -> tuple[list[dict], int]:
    """LAPI between two runs: some bans lifted, some added, some turned captcha or made longer."""
    decisions = [d for d in decisions if rng.random() > 0.1]
    for d in rng.sample(decisions, k=min(len(decisions), rng.randrange(4))):
        d["type"] = rng.choice(["ban", "captcha"])
        d["until"] += rng.choice([0, 3600])
    for _ in range(rng.randrange(12)):
        decisions.append(decision(address(next_new), rng.randrange(3600, 20000), type=rng.choice(["ban", "captcha"])))
        next_new += 1
    return decisions, next_new


def wanted(decisions: list[dict]) -> dict[str, str]:
    return {f"ip:{d['value']}": d["type"] for d in decisions}


def test_many_runs_with_changes_faults_lag_and_kills_converge_whenever_a_run_succeeds(stack, tmp_path):
    seed = int(os.environ.get("SOAK_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    state = tmp_path / "record.gz"
    env = {"PATH": os.environ.get("PATH", ""), **stack.env(STATE_FILE=str(state), PUSHGATEWAY_URL="")}
    env.update(RUN_DEADLINE="30", AUDIT_INTERVAL=str(rng.choice([0, 60, 900])))
    decisions, next_new = [decision(address(i), 7200) for i in range(150)], 150
    stack.lapi.decisions = decisions
    clean = stopped = 0
    lagging = 0
    for n in range(RUNS):
        why = f"seed {seed}, run {n}"
        decisions, next_new = changed(rng, decisions, next_new)
        stack.lapi.decisions = decisions
        stack.kv.faults = []
        if rng.random() < 0.25:
            stack.kv.faults.append(
                Fault(
                    rng.choice(["5xx", "drop", "html"]),
                    rng.choice(["list", "bulk_put", "bulk_delete"]),
                    times=rng.choice([1, 2]),
                )
            )
        if lagging:  # KV's list lags at most a minute: here, two runs at most
            lagging -= 1
            if not lagging:
                stack.kv.listing_view = None
        elif rng.random() < 0.3:
            stack.kv.freeze_listing()
            lagging = 2
        args = ["--audit"] if rng.random() < 0.15 else []
        stop = rng.choice([None, None, None, signal.SIGTERM, signal.SIGKILL])
        queried = len(stack.lapi.queries)
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        if stop is not None:
            time.sleep(rng.uniform(0.05, 0.8))
            process.send_signal(stop)
        out, err = process.communicate(timeout=120)
        assert_no_secret(out, err)
        assert "Traceback" not in err, (why, err)
        code = process.returncode
        if stop == signal.SIGKILL:
            assert code in (0, 1, -9), (why, code, err)
        elif stop == signal.SIGTERM:
            # -15: only before Python ran a line of the job (its interpreter starting).
            assert code in (0, 1, 143) or code == -15 and len(stack.lapi.queries) == queried, (why, code, err)
        else:
            assert code in (0, 1), (why, code, err)
        if code != 0:
            stopped += 1
            stack.kv.listing_view, lagging = None, 0  # the next real run is a minute on: the lag is gone
            continue
        clean += 1
        assert ours(stack.kv) == wanted(decisions), why
        assert_kv_is_the_record(stack.kv, state)
    # A last healthy run, no fault, no lag: it converges whatever came before.
    stack.kv.faults, stack.kv.listing_view = [], None
    final = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, (seed, final.stderr)
    assert ours(stack.kv) == wanted(decisions)
    assert_kv_is_the_record(stack.kv, state)
    assert clean >= 1, f"seed {seed}: no run ended cleanly"
