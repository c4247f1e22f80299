"""A bounded soak of the job with STATE_FILE (issues 20, 25, 26): many runs as processes, with LAPI
changing between them (own detections come and go; CrowdSec's blocklists, origins CAPI and lists,
are refreshed: new ids, ends moved later), TABLE_ORIGINS switched between unset and CAPI,lists,
Cloudflare failing now and then, a listing that lags, runs stopped part-way by SIGTERM or SIGKILL,
and KV changed behind the job's back seconds after the job changed it (within KV_LIST_LAG: a key
it just wrote deleted or changed, one it just deleted put back, the network table deleted).

After every run that exits 0, KV enforces exactly what LAPI wants (each address by its key or the
network table, as the reference Worker reads them) and the record claims exactly what KV holds;
once KV was changed behind the job's back, from the first run that exits 0 after an audit on a
listing that shows the change. Bounded by a count of runs, not by time; seeded (SOAK_SEED replays)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import lapi_kv_sync as job
from tests.conftest import SCRIPT, assert_no_secret
from tests.standins import Entry, Fault, decision
from tests.test_state import assert_kv_is_the_record

RUNS = 40
TABLES = ("ip:networks", "ip:scopes")


def address(i: int) -> str:
    return f"10.{i >> 8 & 255}.{i & 255}.{i % 7}"


def listed(i: int) -> str:
    """An address of the blocklists: none of address()'s."""
    return f"10.200.{i >> 8 & 255}.{i & 255}"


def changed(rng: random.Random, decisions: list[dict], next_new: int) -> tuple[list[dict], int]:
    """Own detections between two runs: some bans lifted, some added, some turned captcha or made longer."""
    decisions = [d for d in decisions if rng.random() > 0.1]
    for d in rng.sample(decisions, k=min(len(decisions), rng.randrange(4))):
        d["type"] = rng.choice(["ban", "captcha"])
        d["until"] += rng.choice([0, 3600])
    for _ in range(rng.randrange(12)):
        decisions.append(decision(address(next_new), rng.randrange(3600, 20000), type=rng.choice(["ban", "captcha"])))
        next_new += 1
    return decisions, next_new


def blocklist_decision(i: int, rng: random.Random) -> dict:
    origin = rng.choice(["CAPI", "lists"])
    scenario = "crowdsecurity/community-blocklist" if origin == "CAPI" else "firehol_level1"
    return decision(listed(i), rng.choice([7200, 86400]), type=rng.choice(["ban", "ban", "captcha"]), origin=origin,
                    scenario=scenario, id=10_000 + i)  # fmt: skip


def refreshed(rng: random.Random, blocklist: list[dict], next_new: int, next_id: int) -> tuple[list[dict], int, int]:
    """CrowdSec's blocklists between two runs: most often refreshed (every decision inserted again:
    a new id, an end moved later, by less than the slack or by hours), a few addresses dropped
    from them and others added."""
    if rng.random() < 0.6:
        later = rng.choice([0, 30, 600, 3600])
        for d in blocklist:
            d["id"], d["until"], next_id = next_id, d["until"] + later, next_id + 1
    if rng.random() < 0.3:
        blocklist = [d for d in blocklist if rng.random() > 0.05]
        for _ in range(rng.randrange(6)):
            blocklist.append(blocklist_decision(next_new, rng))
            next_new += 1
    return blocklist, next_new, next_id


def wanted(decisions: list[dict]) -> dict[str, str]:
    return {d["value"]: d["type"] for d in decisions}


def enforced(kv) -> dict[str, str]:
    """What KV enforces, address by address, as the reference Worker reads it: the address's key,
    else the network table (every interval a single address here), ban beating captcha."""
    live, now = kv.live(), kv.now()
    verdicts = {key[3:]: entry.value for key, entry in live.items() if key.startswith("ip:") and key not in TABLES}
    if "ip:networks" in live:
        for interval in job.decode_networks(live["ip:networks"].value).v4:
            assert interval.first == interval.last
            table = "ban" if interval.ban > now else "captcha" if interval.captcha > now else None
            address = job.network_text(4, interval.first, interval.last).removesuffix("/32")
            if table and verdicts.get(address) != "ban":
                verdicts[address] = table
    return verdicts


def drift(rng: random.Random, kv) -> str | None:
    """KV changed behind the job's back, seconds after the job's last run changed it (so within
    KV_LIST_LAG): a key it wrote deleted or turned to the other remediation, one it deleted put
    back, or the network table deleted. What was done, or None when the run changed nothing."""
    written = [k for k in kv.written_keys if k in kv.store and k not in TABLES]
    deleted = [k for k in kv.deleted_keys if k not in kv.store and k not in TABLES]
    choices = [c for c, keys in (("delete", written), ("change", written), ("put back", deleted)) if keys]
    if "ip:networks" in kv.store:
        choices.append("delete the network table")
    if not choices:
        return None
    what = rng.choice(choices)
    if what == "delete the network table":
        del kv.store["ip:networks"]
        return what
    key = rng.choice(deleted if what == "put back" else written)
    if what == "delete":
        del kv.store[key]
    else:
        entry = kv.store.get(key) or Entry("captcha", int(kv.now()) + 3600, {"remediation": "captcha"})
        value = "captcha" if entry.value == "ban" else "ban"
        kv.store[key] = Entry(value, entry.expiration, {**(entry.metadata or {}), "remediation": value})
    return f"{what} {key}"


def test_many_runs_with_changes_refreshes_faults_lag_kills_and_drift_converge(stack, tmp_path):
    seed = int(os.environ.get("SOAK_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    state = tmp_path / "record.gz"
    env = {"PATH": os.environ.get("PATH", ""), **stack.env(STATE_FILE=str(state), PUSHGATEWAY_URL="")}
    env.update(RUN_DEADLINE="30", AUDIT_INTERVAL=str(rng.choice([0, 60, 900])))
    own, next_new = [decision(address(i), 7200) for i in range(150)], 150
    blocklist = [blocklist_decision(i, rng) for i in range(80)]
    next_listed, next_id = 80, 20_000
    clean = stopped = healed = drifted = 0
    lagging = 0
    disturbed: list[str] = []  # KV changed behind the job's back since its last audit on a listing that shows it
    for n in range(RUNS):
        why = f"seed {seed}, run {n}"
        own, next_new = changed(rng, own, next_new)
        blocklist, next_listed, next_id = refreshed(rng, blocklist, next_listed, next_id)
        stack.lapi.decisions = own + blocklist
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
        stack.kv.reset_counts()
        run_env = {**env, "TABLE_ORIGINS": rng.choice(["", "CAPI,lists", "CAPI,lists"])}
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args], env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
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
        else:
            clean += 1
            if disturbed and " audited: " in out and stack.kv.listing_view is None:
                disturbed, healed = [], healed + 1  # an audit whose listing shows the change
            if not disturbed:
                assert enforced(stack.kv) == wanted(own + blocklist), (why, out)
                assert_kv_is_the_record(stack.kv, state)
        if rng.random() < 0.25 and (what := drift(rng, stack.kv)):
            disturbed.append(what)
            drifted += 1
    # A last healthy audit, no fault, no lag: it converges whatever came before.
    stack.kv.faults, stack.kv.listing_view = [], None
    final = subprocess.run(
        [sys.executable, str(SCRIPT), "--audit"], env=run_env, capture_output=True, text=True, timeout=120
    )
    assert final.returncode == 0, (seed, final.stderr)
    assert enforced(stack.kv) == wanted(own + blocklist), seed
    assert_kv_is_the_record(stack.kv, state)
    assert clean >= 1, f"seed {seed}: no run ended cleanly"
    print(
        f"seed {seed}: {clean} runs exited 0, {stopped} did not; {drifted} changes behind the job's back, {healed} audits after them"
    )
