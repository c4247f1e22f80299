#!/usr/bin/env python3
"""Cost and speed of lapi_kv_sync.py from 1,000 to 1,000,000 decisions, beside the script it replaces.

For each N, a LAPI stand-in (and the real CrowdSec LAPI where it is available, up to 100,000)
and the Cloudflare KV stand-in on loopback, the latter over plain HTTP and, up to 100,000, over
TLS with a locally made CA; the job runs as a process, without and with STATE_FILE: cold (KV
empty), steady (nothing changed), audit (steady, with --audit: what every AUDIT_INTERVAL costs)
and churn (1% new bans, 1% un-bans, 1% remediation or duration changes). The baseline script
(../shared/reference/baseline/full_rewrite.py, which rewrites every key each run) runs the same
scenarios against its own KV stand-in in the same benchmark run, as a column with the ratio.
Each row is the median of several runs, with min and max. Writes bench/results/<name>.json
and .md; see bench/README.md.

    python3 bench/run.py               # N = 1,000, 10,000, 100,000, 300,000, 1,000,000
    python3 bench/run.py --quick       # N = 1,000 only, one run each, checks the count targets (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import gzip
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from io import StringIO
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lapi_kv_sync as job  # noqa: E402
from tests.standins import ACCOUNT, NAMESPACE, KvStandin, LapiStandin  # noqa: E402

SCRIPT = ROOT / "lapi_kv_sync.py"
BASELINE = Path(
    os.environ.get("BENCH_BASELINE") or ROOT.parent / "shared" / "reference" / "baseline" / "full_rewrite.py"
)
RESULTS = ROOT / "bench" / "results"
LAPI_KEY, CF_TOKEN = "bench-lapi-key-000000", "bench-cf-token-000000"
RUNS_PER_DAY = 24 * 60  # a one-minute schedule
TABLE_KEYS = frozenset({"ip:networks", "ip:scopes"})  # the tables' keys under the default prefix
PRICE_PER_MILLION = 5.00  # USD, Workers Paid: writes, deletes and lists alike, past 1M a month included
INCLUDED_PER_MONTH = 1_000_000
FREE_PER_DAY = 1_000


def address(i: int) -> str:
    return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


class FastLapi(LapiStandin):
    """The LAPI stand-in, rendering remaining durations in plain seconds (`14399.52s`, a valid
    Go duration) and each row with one f-string instead of a dict through json.dumps, so that
    serving 1,000,000 decisions costs the bench process well under a second of the wall time
    the job and the baseline are measured by. The bench's values need no JSON escaping
    (addresses, `ban`/`captcha`); the origin and the scenario are quoted by json.dumps, once per
    distinct one. A row's own `id` and `origin` are rendered when it has them (a blocklist's)."""

    def body(self) -> bytes:
        now = self.now()  # the stand-in's clock: the bench moves it to let simulated hours pass
        quoted: dict[str, str] = {}

        def quote(text: str) -> str:
            return quoted.get(text) or quoted.setdefault(text, json.dumps(text))

        rows = [
            f'{{"duration":"{d["until"] - now:.6f}s","id":{d.get("id", i)},"origin":{quote(d.get("origin", "crowdsec"))},'
            f'"scenario":{quote(d["scenario"])},"scope":"Ip","type":"{d["type"]}","value":"{d["value"]}"}}'
            for i, d in enumerate(self.decisions or [], 1)
        ]
        return ("[" + ",".join(rows) + "]").encode()


def decisions(n: int, start: int = 0) -> list[dict]:
    now = time.time()
    return [
        {
            "value": address(i),
            "type": "ban",
            "scope": "Ip",
            "until": now + 4 * 3600 + i % 3600,
            "scenario": "crowdsecurity/ssh-bf",
        }
        for i in range(start, start + n)
    ]


def run_job(env: dict[str, str], args: tuple[str, ...] = (), script: Path = SCRIPT) -> dict:
    """The job as a process: wall and CPU seconds (wait4's rusage) and peak RSS.

    Peak RSS is the child's own VmHWM, polled from /proc: rusage's ru_maxrss would also count
    the bench process it was forked from, which holds the stand-ins' 100,000 keys. VmHWM only
    grows, so the last reading before exit is the peak, to within the last 5 ms."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=out, stderr=err)
        status_file, peak_kib = Path(f"/proc/{process.pid}/status"), 0
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            with contextlib.suppress(OSError, ValueError, TypeError):
                peak_kib = max(
                    peak_kib,
                    *(
                        int(line.split()[1])
                        for line in status_file.read_text().splitlines()
                        if line.startswith("VmHWM")
                    ),
                )
            time.sleep(0.005)
        wall = time.monotonic() - started
        code = os.waitstatus_to_exitcode(status)
        process.returncode = code
        err.seek(0)
        if code != 0:
            raise RuntimeError(f"the job exited {code}: {err.read().decode()[-800:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": peak_kib / 1024}


class Bench:
    def __init__(self, kv: KvStandin, lapi_url: str, lapi_key: str, lapi_counter, ca_file: str | None):
        self.kv, self.lapi_url, self.lapi_key, self.lapi_counter = kv, lapi_url, lapi_key, lapi_counter
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "LAPI_URL": lapi_url,
            "LAPI_KEY": lapi_key,
            "CF_ACCOUNT_ID": ACCOUNT,
            "CF_KV_NAMESPACE_ID": NAMESPACE,
            "CF_API_TOKEN": CF_TOKEN,
            "CF_API_URL": kv.api_url,
            "RUN_DEADLINE": "900",  # 1,000,000 cold takes longer than the CronJob's 240 s
            # LAPI's answer at 1,000,000 decisions is over the default cap, which fits the
            # CronJob's 320Mi (about 300,000): the bench sizes the memory limit past it.
            "LAPI_MAX_BYTES": str(1 << 30),
        }
        if ca_file:
            self.env["SSL_CERT_FILE"] = ca_file  # the job trusts the bench's own CA for the KV stand-in

    def measure(self, *args: str, script: Path = SCRIPT, **env: str) -> dict:
        self.kv.reset_counts()
        reads_before, lapi_conns_before, lapi_bytes_before = self.lapi_counter()
        figures = run_job({**self.env, **env}, args, script)
        reads_after, lapi_conns_after, lapi_bytes_after = self.lapi_counter()
        figures.update(
            lapi_reads=reads_after - reads_before,
            list=self.kv.requests["list"],
            bulk_put=self.kv.requests["bulk_put"],
            bulk_delete=self.kv.requests["bulk_delete"],
            cloudflare_requests=sum(self.kv.requests.values()),
            lapi_connections=lapi_conns_after - lapi_conns_before,
            kv_connections=self.kv.connections,
            written=self.kv.writes,
            deleted=self.kv.deletes,
            read=self.kv.requests["read"],  # values read back (a table's, without STATE_FILE)
            table_writes=sum(key in TABLE_KEYS for key in self.kv.written_keys),
            kv_bytes_sent=self.kv.bytes_in,
            kv_bytes_received=self.kv.bytes_out,
            lapi_bytes_received=lapi_bytes_after - lapi_bytes_before,
        )
        return figures


def summarise(samples: list[dict]) -> dict:
    summary = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return summary


def churn(lapi: LapiStandin, n: int, next_new: int, rng: random.Random) -> int:
    """1% new bans, 1% un-bans, 1% changes (half ban->captcha, half ending two hours earlier: an
    end moved later costs no write until the key nears its expiration, the refresh scenario's
    subject)."""
    k = max(1, n // 100)
    rows = lapi.decisions
    for row in rng.sample(rows, k):
        rows.remove(row)
    changed = rng.sample(rows, k)
    for j, row in enumerate(changed):
        if j % 2:
            row["until"] -= 7200
        else:
            row["type"] = "captcha" if row["type"] == "ban" else "ban"
    rows += decisions(k, next_new)
    return next_new + k


def past_the_lag(path: Path) -> None:
    """The record as it is once KV_LIST_LAG has passed, so that an audit is not put off after a
    big change (a cold run of more keys than a record keeps changes of): the bench does not wait
    two minutes."""
    state = job.StateFile(str(path), job.SYSTEM_CLOCK)
    record = state.read(str(path))._replace(settling_until=None)
    with gzip.open(path, "wt", encoding="utf-8", newline="\n") as f:
        f.writelines(job.encode_record(record, 0))


def scenarios(bench: Bench, lapi: LapiStandin, n: int, repeats: int, rng: random.Random, **how) -> dict:
    """Cold, steady, (audit,) churn: `repeats` runs each, as the job (or `script`) runs them."""
    state = how.pop("state", None)
    samples: dict[str, list[dict]] = {"cold": [], "steady": [], "churn": []}
    if state:
        samples = {"cold": [], "steady": [], "audit": [], "churn": []}
        how["STATE_FILE"] = str(state)
    lapi.decisions = decisions(n)
    for _ in range(repeats):
        bench.kv.store.clear()
        for stale in state.parent.iterdir() if state else ():
            stale.unlink()
        samples["cold"].append(bench.measure(**how))
    samples["steady"] = [bench.measure(**how) for _ in range(repeats)]
    if state:
        samples["audit"] = []
        for _ in range(repeats):
            past_the_lag(state)
            samples["audit"].append(bench.measure("--audit", **how))
    next_new = n
    for _ in range(repeats):
        next_new = churn(lapi, n, next_new, rng)
        samples["churn"].append(bench.measure(**how))
    return samples


def bench_standin(n: int, repeats: int, tls_ca, rng: random.Random) -> list[dict]:
    rows: list[dict] = []
    with FastLapi(LAPI_KEY) as lapi:
        baseline: dict[str, dict] = {}
        if BASELINE.exists():
            with KvStandin(CF_TOKEN, schema=False) as kv:
                bench = Bench(
                    kv, lapi.url, LAPI_KEY, lambda: (len(lapi.queries), lapi.connections, lapi.bytes_out), None
                )
                for scenario, samples in scenarios(bench, lapi, n, repeats, rng, script=BASELINE).items():
                    baseline[scenario] = summarise(samples)
                    rows.append({"n": n, "lapi": "stand-in", "kv": "http", "state": "baseline", "scenario": scenario})
                    rows[-1].update(baseline[scenario])
                    print(format_row(rows[-1]), flush=True)
        else:
            print(f"baseline: {BASELINE} not found; no baseline column", flush=True)
        for transport in ("http", "https") if tls_ca and n <= 100_000 else ("http",):
            kv = KvStandin(CF_TOKEN, schema=False)
            ca_file = None
            if transport == "https":
                import ssl

                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                tls_ca.issue_cert("127.0.0.1").configure_cert(context)
                kv.serve_tls(context)
                ca_file = str(Path(tempfile.mkdtemp()) / "ca.pem")
                tls_ca.cert_pem.write_to_path(ca_file)
            with kv, tempfile.TemporaryDirectory() as tmp:
                bench = Bench(
                    kv, lapi.url, LAPI_KEY, lambda: (len(lapi.queries), lapi.connections, lapi.bytes_out), ca_file
                )
                for state in ("none", "STATE_FILE"):
                    record = Path(tmp) / "state" / "record" if state == "STATE_FILE" else None
                    if record:
                        record.parent.mkdir()
                    for scenario, samples in scenarios(bench, lapi, n, repeats, rng, state=record).items():
                        row = {"n": n, "lapi": "stand-in", "kv": transport, "state": state, "scenario": scenario}
                        row.update(summarise(samples))
                        base = baseline.get("steady" if scenario == "audit" else scenario)
                        if base:
                            row["baseline_wall_s"] = base["wall_s"]
                            row["baseline_peak_rss_mib"] = base["peak_rss_mib"]
                        rows.append(row)
                        print(format_row(row), flush=True)
    return rows


def bench_real_lapi(n: int, repeats: int) -> list[dict]:
    """Cold and steady against the real LAPI, loaded with `cscli decisions import`. (Churn needs
    one cscli call per un-ban, which would measure cscli, not the job.)"""
    from tests.real import RealLapi, find

    if not (find("crowdsec") and find("cscli")):
        print("real LAPI: crowdsec/cscli not found (bash .ci/install-components fetches them); skipped", flush=True)
        return []
    lapi = RealLapi().start()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            csv = Path(tmp) / "decisions.csv"
            csv.write_text("duration,scope,type,value\n" + "".join(f"4h,ip,ban,{address(i)}\n" for i in range(n)))
            lapi.import_csv(csv)
        with KvStandin(CF_TOKEN, schema=False) as kv:
            bench = Bench(kv, lapi.url, lapi.bouncer_key, lambda: (0, 0, 0), None)
            cold = []
            for _ in range(repeats):
                kv.store.clear()
                cold.append(bench.measure())
            steady = [bench.measure() for _ in range(repeats)]
            for scenario, samples in (("cold", cold), ("steady", steady)):
                for sample in samples:
                    # not counted on the real one
                    sample["lapi_reads"] = sample["lapi_connections"] = sample["lapi_bytes_received"] = float("nan")
                rows.append(
                    {"n": n, "lapi": "real 1.4.6", "kv": "http", "state": "none", "scenario": scenario}
                    | summarise(samples)
                )
                print(format_row(rows[-1]), flush=True)
    finally:
        lapi.close()
    return rows


COLUMNS = [
    ("N", lambda r: f"{r['n']:,}"),
    ("LAPI", lambda r: r["lapi"]),
    ("KV", lambda r: r["kv"]),
    (
        "job",
        lambda r: (
            "baseline script"
            if r["state"] == "baseline"
            else f"STATE_FILE {'set' if r['state'] != 'none' else 'unset'}"
        ),
    ),
    ("run", lambda r: r["scenario"]),
    ("wall s", lambda r: spread(r["wall_s"], "{:.2f}")),
    ("baseline wall s", lambda r: spread(r["baseline_wall_s"], "{:.2f}") if "baseline_wall_s" in r else "–"),
    ("ratio", lambda r: ratio(r)),
    ("CPU s", lambda r: spread(r["cpu_s"], "{:.2f}")),
    ("peak RSS MiB", lambda r: spread(r["peak_rss_mib"], "{:.0f}")),
    ("LAPI reads", lambda r: count(r["lapi_reads"])),
    ("list", lambda r: count(r["list"])),
    ("bulk put", lambda r: count(r["bulk_put"])),
    ("bulk delete", lambda r: count(r["bulk_delete"])),
    ("Cloudflare requests", lambda r: count(r["cloudflare_requests"])),
    ("connections LAPI/KV", lambda r: f"{count(r['lapi_connections'])}/{count(r['kv_connections'])}"),
    ("written", lambda r: count(r["written"])),
    ("deleted", lambda r: count(r["deleted"])),
    ("LAPI bytes received", lambda r: size(r["lapi_bytes_received"]["median"])),
    ("KV bytes sent", lambda r: size(r["kv_bytes_sent"]["median"])),
    ("KV bytes received", lambda r: size(r["kv_bytes_received"]["median"])),
]


def ratio(row: dict) -> str:
    """The job's median wall time over the baseline script's in the same scenario and benchmark run."""
    if "baseline_wall_s" not in row:
        return "–"
    return f"{row['wall_s']['median'] / row['baseline_wall_s']['median']:.2f}"


def spread(stat: dict, fmt: str) -> str:
    return f"{fmt.format(stat['median'])} ({fmt.format(stat['min'])}–{fmt.format(stat['max'])})"


def count(stat: dict) -> str:
    m = stat["median"]
    if m != m:  # nan: not counted
        return "–"
    text = f"{m:,.0f}"
    return text if stat["min"] == stat["max"] else f"{text} ({stat['min']:,.0f}–{stat['max']:,.0f})"


def size(n: float) -> str:
    if n != n:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_row(row: dict) -> str:
    return " | ".join(f"{name} {fn(row)}" for name, fn in COLUMNS)


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| " + " | ".join(n for n, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fn(r) for _, fn in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


AUDIT_INTERVAL = 900  # the default: 96 audits a day
FIVE_MINUTE_BUDGET = 1200  # Cloudflare API requests per 5 minutes per user, shared with every other tool


def cost_table(rows: list[dict]) -> str:
    """Cloudflare requests a day by operation at a one-minute schedule, steady (LAPI unchanged),
    with and without STATE_FILE, from the measured per-run counts; and what share of the
    user's 1,200 requests per 5 minutes they take."""
    measured = {
        (r["n"], r["state"], r["scenario"]): {k: v["median"] for k, v in r.items() if isinstance(v, dict)}
        for r in rows
        if r["lapi"] == "stand-in" and r["kv"] == "http"
    }
    audits = 24 * 3600 // AUDIT_INTERVAL
    lines = [
        f"Cloudflare requests a day at a one-minute schedule ({RUNS_PER_DAY:,} runs), LAPI unchanged, from the "
        f"per-run counts measured above; with STATE_FILE at the default AUDIT_INTERVAL={AUDIT_INTERVAL} ({audits} "
        f"audits a day). The job reads no values (0 reads a day); churn adds one write or delete per changed key. "
        f"Free plan: {FREE_PER_DAY:,} writes, deletes and lists a day each. The API allows {FIVE_MINUTE_BUDGET:,} "
        "requests per 5 minutes per user, shared with every other tool using the token's user.",
        "",
        "| N | STATE_FILE | reads/day | writes/day | deletes/day | lists/day | fits the free plan | share of 1,200 requests / 5 min (mean; worst 5 min) | AUDIT_INTERVAL that fits the free plan | baseline script: writes/day, lists/day |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sorted({k[0] for k in measured}):
        steady, baseline = measured.get((n, "none", "steady")), measured.get((n, "baseline", "steady"))
        with_state, audit = measured.get((n, "STATE_FILE", "steady")), measured.get((n, "STATE_FILE", "audit"))
        base = f"{n * RUNS_PER_DAY:,}, {baseline['list'] * RUNS_PER_DAY:,.0f}" if baseline else "–"
        if steady:
            per_run = steady["cloudflare_requests"]
            lists = steady["list"] * RUNS_PER_DAY
            writes, deletes = steady["written"] * RUNS_PER_DAY, steady["deleted"] * RUNS_PER_DAY
            fits = "yes" if max(lists, writes, deletes) <= FREE_PER_DAY else "no"
            share = f"{5 * per_run / FIVE_MINUTE_BUDGET:.1%}; {5 * per_run / FIVE_MINUTE_BUDGET:.1%}"
            lines.append(
                f"| {n:,} | unset | 0 | {writes:,.0f} | {deletes:,.0f} | {lists:,.0f} | {fits} | {share} | – | {base} |"
            )
        if with_state and audit:
            lists = audit["list"] * audits + with_state["list"] * (RUNS_PER_DAY - audits)
            requests = audit["cloudflare_requests"] * audits + with_state["cloudflare_requests"] * (
                RUNS_PER_DAY - audits
            )
            writes = audit["written"] * audits + with_state["written"] * (RUNS_PER_DAY - audits)
            deletes = audit["deleted"] * audits + with_state["deleted"] * (RUNS_PER_DAY - audits)
            fits = "yes" if max(lists, writes, deletes) <= FREE_PER_DAY else "no"
            mean = requests / (RUNS_PER_DAY / 5) / FIVE_MINUTE_BUDGET
            worst = (audit["cloudflare_requests"] + 4 * with_state["cloudflare_requests"]) / FIVE_MINUTE_BUDGET
            # lists a day = 86,400 / AUDIT_INTERVAL x pages <= 1,000
            needed = 86400 * audit["list"] / FREE_PER_DAY
            fitting = "900 (the default)" if needed <= AUDIT_INTERVAL else f"≥ {math.ceil(needed):,} s"
            lines.append(
                f"| {n:,} | set | 0 | {writes:,.0f} | {deletes:,.0f} | {lists:,.0f} | {fits} | {mean:.1%}; {worst:.1%} "
                f"| {fitting} | {base} |"
            )
    return "\n".join(lines) + "\n"


def check_targets(rows: list[dict]) -> list[str]:
    """The count targets (never timing): a steady run is free (with STATE_FILE: no list and at most
    one Cloudflare request), churn costs the churn, cold is few calls."""
    problems = []
    for r in rows:
        if r["state"] == "baseline":
            continue
        n, med = r["n"], {k: v["median"] for k, v in r.items() if isinstance(v, dict)}
        pages = -(-n // 1000)
        state = r["state"] != "none"
        what = f"{r['scenario']} {n}{' with STATE_FILE' if state else ''}"
        if r["scenario"] == "steady":
            if med["written"] or med["deleted"]:
                problems.append(f"{what}: wrote {med['written']}, deleted {med['deleted']}")
            if med["list"] > (0 if state else pages) or med["bulk_put"] or med["bulk_delete"]:
                problems.append(f"{what}: {med['list']} list pages, {med['bulk_put']} bulk puts")
            if state and r["cloudflare_requests"]["max"] > 1:
                problems.append(f"{what}: {r['cloudflare_requests']['max']} Cloudflare requests (want at most 1)")
            if r["kv_connections"]["max"] > 1 or (r["lapi"] == "stand-in" and r["lapi_connections"]["max"] > 1):
                problems.append(f"{what}: more than one connection per host")
        if r["scenario"] == "audit" and (med["written"] or med["deleted"] or med["list"] != pages):
            problems.append(f"{what}: {med['list']} list pages (want {pages}), wrote {med['written']}")
        if r["scenario"] == "churn" and r["lapi"] == "stand-in":
            k = max(1, n // 100)
            if med["written"] != 2 * k or med["deleted"] != k:
                problems.append(
                    f"{what}: wrote {med['written']}, deleted {med['deleted']}; the churn was {2 * k} writes, {k} deletes"
                )
            if state and med["list"]:
                problems.append(f"{what}: {med['list']} list pages (want none)")
        if r["scenario"] == "cold" and med["bulk_put"] > -(-n // 10_000):
            problems.append(f"{what}: {med['bulk_put']} bulk writes")
    return problems


# --------------------------------------------------------------------------- blocklist refreshes (issue 25)

SHIFTED = ROOT / "bench" / "shifted.py"
HOUR, DAY = 3600, 86400
TABLE_SETTINGS = ("", "CAPI,lists")  # TABLE_ORIGINS unset, and as the example overlay sets it
# A simulated day runs the job every 10 minutes (a deployment's day every 15): a key or a table
# comes due REFRESH_AHEAD (15 minutes) before it expires, so a run at least every 15 minutes
# writes what a run every minute writes; a run every minute would make the day most of the bench.
DAY_STEP = 600
MIX_STEP = 900
FREE_READS_PER_DAY = 100_000
AUDITS_PER_DAY = 86400 // AUDIT_INTERVAL


class Source(NamedTuple):
    """Decisions that CrowdSec inserts and refreshes as a whole: the community blocklist (origin
    CAPI) or a subscribed list (origin lists, the list's name as scenario)."""

    origin: str
    scenario: str
    count: int
    every: int  # seconds between two refreshes
    duration: int = DAY  # a decision inserted by a refresh ends this long after it
    churn: float = 0.0  # the share of its addresses replaced by others at each refresh


class Own(NamedTuple):
    """Your own detections: new bans at a steady rate, a few lifted by hand (cscli decisions delete)."""

    per_day: int = 0
    lifted_per_day: int = 0
    duration: int = 4 * HOUR  # CrowdSec's default ban


class Simulation:
    """LAPI's decisions over simulated time (seconds since the start, on every clock in play):
    blocklists refreshed as CrowdSec refreshes them (`pkg/database/alerts.go`,
    UpdateCommunityBlocklist: every decision deleted and inserted again, so a new id, and an end
    `duration` after the refresh), some of their addresses replaced, and own detections."""

    def __init__(self, sources: list[Source], own: Own | None = None) -> None:
        self.sources, self.own = sources, own or Own()
        self.next_id = self.next_address = 0
        self.rows: list[list[dict]] = [[] for _ in sources]
        self.own_rows: list[dict] = []

    def row(self, origin: str, scenario: str, until: float) -> dict:
        self.next_id += 1
        self.next_address += 1
        value = address(self.next_address)
        return {
            "id": self.next_id,
            "value": value,
            "type": "ban",
            "origin": origin,
            "scenario": scenario,
            "until": until,
        }

    def start(self) -> list[dict]:
        self.rows = [[self.row(s.origin, s.scenario, s.duration) for _ in range(s.count)] for s in self.sources]
        return self.decisions()

    def advance(self, at: int) -> list[dict]:
        """LAPI at `at` (a whole number of seconds): the refreshes due, own detections (counted a
        day at a time, they arrive on the hour: the writes they cost are the same)."""
        for source, rows in zip(self.sources, self.rows, strict=True):
            if at % source.every == 0:
                replaced = round(source.count * source.churn)
                del rows[:replaced]
                rows += [self.row(source.origin, source.scenario, 0) for _ in range(replaced)]
                for row in rows:
                    self.next_id += 1
                    row["id"], row["until"] = self.next_id, at + source.duration
        own = self.own
        self.own_rows = [row for row in self.own_rows if row["until"] > at]  # LAPI answers with live decisions only
        if at % HOUR == 0:  # an hour's detections at once: between the hours LAPI's answer stays the same
            hour = at // HOUR
            self.own_rows += [
                self.row("crowdsec", "crowdsecurity/ssh-bf", at + own.duration)
                for _ in range(own.per_day * hour // 24 - own.per_day * (hour - 1) // 24)
            ]
            del self.own_rows[: own.lifted_per_day * hour // 24 - own.lifted_per_day * (hour - 1) // 24]
        return self.decisions()

    def decisions(self) -> list[dict]:
        return [row for rows in self.rows for row in rows] + self.own_rows


def refreshed_blocklist(n: int) -> list[Source]:
    """N addresses refreshed hourly, 24 h bans: a quarter the community blocklist, the rest a list."""
    return [
        Source("CAPI", "crowdsecurity/community-blocklist", n // 4, HOUR),
        Source("lists", "firehol_level1", n - n // 4, HOUR),
    ]


def set_clocks(lapi: LapiStandin, kv: KvStandin, at: float) -> None:
    """Simulated time: `at` seconds on, for LAPI's durations and KV's clock alike (the job's is
    moved by as much: bench/shifted.py for a process, a Clock for main() in-process)."""
    lapi.clock_offset = kv.clock_offset = at


def refresh_runs(
    bench: Bench, lapi: LapiStandin, n: int, repeats: int, state: Path | None, script: Path = SHIFTED, **how: str
) -> dict[str, list[dict]]:
    """As processes: a cold run; then `repeats` times, an hour later, every decision refreshed and
    a run, and a minute on, LAPI unchanged, a steady run (with STATE_FILE, an audit a minute
    before the refresh)."""
    bench.kv.store.clear()
    if state:
        state.parent.mkdir(parents=True, exist_ok=True)
        how["STATE_FILE"] = str(state)
    simulation = Simulation(refreshed_blocklist(n))
    set_clocks(lapi, bench.kv, 0)
    base = lapi.now()  # simulated time 0 on the stand-ins' clocks, as an absolute `until`
    lapi.decisions = rebased(simulation.start(), base)
    samples: dict[str, list[dict]] = {"cold": [bench.measure(script=script, BENCH_CLOCK_OFFSET="0", **how)]}
    for k in range(1, repeats + 1):
        at = k * HOUR
        # With STATE_FILE an hour's runs audit every AUDIT_INTERVAL: here a minute before the
        # refresh, so that the refresh's own run is not also an audit.
        runs = [("audit", at - 60, ("--audit",))] if state else []
        runs += [("refresh", at, ()), ("steady", at + 60, ())]
        for scenario, moment, args in runs:
            set_clocks(lapi, bench.kv, moment)
            if scenario == "refresh":
                lapi.decisions = rebased(simulation.advance(at), base)
            measured = bench.measure(*args, script=script, BENCH_CLOCK_OFFSET=str(moment), **how)
            samples.setdefault(scenario, []).append(measured)
    return samples


def rebased(rows: list[dict], base: float) -> list[dict]:
    """The simulation's rows with `until` on the stand-in's clock (the simulation counts from 0)."""
    return [{**row, "until": base + row["until"]} for row in rows]


def bench_refresh(n: int, repeats: int) -> list[dict]:
    """The refresh scenario's per-run rows, as processes, each setting on a KV of its own."""
    rows = []
    with FastLapi(LAPI_KEY) as lapi:

        def counter():
            return len(lapi.queries), lapi.connections, lapi.bytes_out

        settings: list[tuple[str, str, Path]] = []
        if BASELINE.exists():
            settings.append(("baseline", "–", BASELINE))
        settings += [(state, origins, SHIFTED) for state in ("none", "STATE_FILE") for origins in TABLE_SETTINGS]
        for state, origins, script in settings:
            with KvStandin(CF_TOKEN, schema=False) as kv, tempfile.TemporaryDirectory() as tmp:
                bench = Bench(kv, lapi.url, LAPI_KEY, counter, None)
                record = Path(tmp) / "state" / "record" if state == "STATE_FILE" else None
                how = {} if state == "baseline" else {"TABLE_ORIGINS": origins}
                for scenario, samples in refresh_runs(bench, lapi, n, repeats, record, script, **how).items():
                    row = {"n": n, "lapi": "stand-in", "kv": "http", "state": state, "table_origins": origins}
                    row |= {"scenario": "refresh " + scenario} | summarise(samples)
                    rows.append(row)
                    print(format_refresh_row(row), flush=True)
    return rows


def run_in_process(env: dict[str, str], at: float) -> str:
    """main() in this process, its clock `at` seconds on; its output (it must exit 0)."""
    out, err = StringIO(), StringIO()
    code = job.main([], env, out, err, job.Clock(now=lambda: time.time() + at))
    if code != 0:
        raise RuntimeError(f"the job exited {code} at {at:.0f} s: {err.getvalue()[-800:]}")
    return out.getvalue()


def simulated_day(simulation: Simulation, state: bool, table_origins: str, step: int = DAY_STEP) -> dict:
    """A cold run, then a simulated day with a run every `step` seconds, in-process: main() with its
    clock moved (a process per run would make the day most of the bench's time), against the
    stand-ins over real sockets. What the day's runs cost, the cold run left out; and whether every
    address LAPI wants is enforced at the day's end (its key, or the network table)."""
    with FastLapi(LAPI_KEY) as lapi, KvStandin(CF_TOKEN, schema=False) as kv, tempfile.TemporaryDirectory() as tmp:
        env = Bench(kv, lapi.url, LAPI_KEY, lambda: (0, 0, 0), None).env | {"TABLE_ORIGINS": table_origins}
        if state:
            env["STATE_FILE"] = str(Path(tmp) / "record")
        base = lapi.now()
        lapi.decisions = rebased(simulation.start(), base)
        run_in_process(env, 0)
        kv.reset_counts()
        runs = audits = 0
        for at in range(step, DAY + 1, step):
            set_clocks(lapi, kv, at)
            lapi.decisions = rebased(simulation.advance(at), base)
            out = run_in_process(env, at)
            runs += 1
            audits += " audited: " in out
        wanted = {row["value"] for row in lapi.decisions if row["until"] > lapi.now()}
        enforced = enforced_addresses(kv)
        return {
            "runs": runs,
            "audits": audits,
            "addresses": len(wanted),
            "key_writes": kv.writes - sum(key in TABLE_KEYS for key in kv.written_keys),
            "table_writes": sum(key in TABLE_KEYS for key in kv.written_keys),
            "deleted": kv.deletes,
            "list": kv.requests["list"],
            "read": kv.requests["read"],
            "cloudflare_requests": sum(kv.requests.values()),
            "unenforced_at_end": len(wanted - enforced),
        }


def enforced_addresses(kv: KvStandin) -> set[str]:
    """The addresses KV bans now, as the reference Worker reads it: their key, or the network table."""
    live = kv.live()
    banned = {key[3:] for key, entry in live.items() if key not in TABLE_KEYS and entry.value == "ban"}
    table = live.get("ip:networks")
    if table is not None:
        now = kv.now()
        for interval in job.decode_networks(table.value).v4:
            if interval.ban > now:
                banned.update(
                    job.network_text(4, a, a).removesuffix("/32") for a in range(interval.first, interval.last + 1)
                )
    return banned


def bench_refresh_day(n: int) -> list[dict]:
    rows = []
    for state in ("none", "STATE_FILE"):
        for origins in TABLE_SETTINGS:
            day = simulated_day(Simulation(refreshed_blocklist(n)), state == "STATE_FILE", origins)
            rows.append({"n": n, "state": state, "table_origins": origins} | day)
            print(format_day_row(rows[-1]), flush=True)
    return rows


def mixes(scale: float) -> dict[str, tuple[list[Source], Own]]:
    """The deployments docs/costs.md prices (`scale` shrinks them for --quick): own detections
    (288 new 4 h bans a day, 24 lifted by hand); plus the community blocklist (20,000 addresses,
    pulled every 2 h: CrowdSec's pullIntervalDefault); plus three subscribed lists of 50,000,
    refreshed hourly. Each refresh replaces 1% of a list's addresses (an assumption: CrowdSec
    publishes no churn figure; TABLE_ORIGINS unset, each point of churn costs a write and a delete
    per replaced address, set, nothing more than the table's write)."""
    own = Own(max(1, round(288 * scale)), max(1, round(24 * scale)))
    community = Source("CAPI", "crowdsecurity/community-blocklist", round(20_000 * scale), 2 * HOUR, churn=0.01)
    lists = [Source("lists", name, round(50_000 * scale), HOUR, churn=0.01) for name in ("list_a", "list_b", "list_c")]
    return {
        "own detections": ([], own),
        "+ community blocklist": ([community], own),
        "+ 3 lists of 50,000": ([community, *lists], own),
    }


def bench_mixes(scale: float, only: tuple[str, ...] = ()) -> list[dict]:
    """A simulated day of each deployment, with STATE_FILE (the free plan needs it for its lists),
    TABLE_ORIGINS unset and set. Writes and deletes do not depend on STATE_FILE (the refresh rows
    show it); lists do, and are priced from the per-run counts."""
    rows = []
    for name, (sources, own) in mixes(scale).items():
        if only and name not in only:
            continue
        for origins in TABLE_SETTINGS:
            day = simulated_day(Simulation(sources, own), True, origins, MIX_STEP)
            rows.append({"mix": name, "scale": scale, "table_origins": origins} | day)
            print(format_mix_row(rows[-1]), flush=True)
    return rows


def plural_setting(origins: str) -> str:
    return origins or "unset"


SHARED_COLUMNS = dict(COLUMNS)
REFRESH_COLUMNS = [
    *((name, SHARED_COLUMNS[name]) for name in ("N", "job")),
    ("TABLE_ORIGINS", lambda r: plural_setting(r["table_origins"])),
    ("run", lambda r: r["scenario"].removeprefix("refresh ")),
    *((name, SHARED_COLUMNS[name]) for name in ("wall s", "CPU s", "peak RSS MiB", "list")),
    ("read", lambda r: count(r["read"])),
    ("written", SHARED_COLUMNS["written"]),
    ("of which tables", lambda r: count(r["table_writes"])),
    *((name, SHARED_COLUMNS[name]) for name in ("deleted", "Cloudflare requests")),
]
DAY_COLUMNS = [
    ("N", lambda r: f"{r['n']:,}"),
    ("STATE_FILE", lambda r: "set" if r["state"] != "none" else "unset"),
    ("TABLE_ORIGINS", lambda r: plural_setting(r["table_origins"])),
    ("runs (audits)", lambda r: f"{r['runs']} ({r['audits']})"),
    ("key writes", lambda r: f"{r['key_writes']:,}"),
    ("key writes per address", lambda r: f"{r['key_writes'] / r['n']:.2f}"),
    ("table writes", lambda r: f"{r['table_writes']:,}"),
    ("deletes", lambda r: f"{r['deleted']:,}"),
    ("lists", lambda r: f"{r['list']:,}"),
    ("reads", lambda r: f"{r['read']:,}"),
    ("Cloudflare requests", lambda r: f"{r['cloudflare_requests']:,}"),
    ("addresses not enforced at the end", lambda r: f"{r['unenforced_at_end']:,}"),
    ("baseline script: writes", lambda r: f"{r['n'] * RUNS_PER_DAY:,}"),
]


def lists_per_day(r: dict) -> float:
    """With STATE_FILE only audits list: AUDITS_PER_DAY at a one-minute schedule (the simulated
    day runs every DAY_STEP, so it audits less often), each as many pages as measured."""
    return AUDITS_PER_DAY * r["list"] / r["audits"] if r["audits"] else 0.0


def paid_per_month(writes: float, deletes: float, lists: float, reads: float) -> float:
    """USD a month on Workers Paid ($5 with its inclusions) for these operations a day."""
    over = sum(max(0.0, 30 * n - INCLUDED_PER_MONTH) for n in (writes, deletes, lists)) * PRICE_PER_MILLION
    return 5.0 + over / 1e6 + max(0.0, 30 * reads - 10_000_000) * 0.50 / 1e6


def fits_free(writes: float, deletes: float, lists: float, reads: float) -> bool:
    return max(writes, deletes, lists) <= FREE_PER_DAY and reads <= FREE_READS_PER_DAY


MIX_COLUMNS = [
    ("deployment", lambda r: r["mix"]),
    ("addresses", lambda r: f"{r['addresses']:,}"),
    ("TABLE_ORIGINS", lambda r: plural_setting(r["table_origins"])),
    ("writes/day (tables)", lambda r: f"{r['key_writes'] + r['table_writes']:,} ({r['table_writes']:,})"),
    ("deletes/day", lambda r: f"{r['deleted']:,}"),
    ("lists/day", lambda r: f"{lists_per_day(r):,.0f}"),
    ("job's reads/day", lambda r: f"{r['read']:,}"),
    ("free plan (job's share)", lambda r: "fits" if fits_free(*mix_day(r)) else "no"),
    ("Workers Paid, USD/month (job's share)", lambda r: f"{paid_per_month(*mix_day(r)):,.2f}"),
]


def mix_day(r: dict) -> tuple[float, float, float, float]:
    return r["key_writes"] + r["table_writes"], r["deleted"], lists_per_day(r), r["read"]


def format_refresh_row(row: dict) -> str:
    return " | ".join(f"{name} {fn(row)}" for name, fn in REFRESH_COLUMNS)


def format_day_row(row: dict) -> str:
    return " | ".join(f"{name} {fn(row)}" for name, fn in DAY_COLUMNS)


def format_mix_row(row: dict) -> str:
    return " | ".join(f"{name} {fn(row)}" for name, fn in MIX_COLUMNS)


def table_of(columns: list, rows: list[dict]) -> str:
    lines = ["| " + " | ".join(n for n, _ in columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(fn(r) for _, fn in columns) + " |" for r in rows]) + "\n"


def refresh_report(rows: list[dict], days: list[dict], mix_rows: list[dict]) -> str:
    parts = []
    if rows:
        parts += [
            "A blocklist refreshed hourly (a quarter CAPI, the rest `lists`; 24 h bans; a refresh gives every "
            "decision a new id and an end an hour later), the job as a process, its clock moved an hour per "
            "refresh: per run, the cold run and then each refresh, a steady run a minute later and, with "
            "STATE_FILE, an audit a minute before the refresh (so that the refresh's run is not also one).",
            "",
            table_of(REFRESH_COLUMNS, rows),
        ]
    if days:
        parts += [
            f"The same blocklist over a simulated day: a cold run (not counted), then a run every {DAY_STEP // 60} "
            "minutes for 24 hours, in-process (main() with its clock moved), each decision refreshed on the hour "
            "(24 refreshes). The baseline script rewrites every key each run: N writes a run, at a one-minute "
            "schedule N × 1,440 a day.",
            "",
            table_of(DAY_COLUMNS, days),
        ]
    if mix_rows:
        scale = mix_rows[0]["scale"]
        parts += [
            "A day of each deployment priced in docs/costs.md"
            + (f" (scaled by {scale}: --quick)" if scale != 1 else "")
            + f", simulated as above (a run every {MIX_STEP // 60} minutes) with STATE_FILE; lists a day at a "
            f"one-minute schedule ({AUDITS_PER_DAY} "
            "audits) from the pages an audit listed. The Worker's reads come on top (docs/costs.md).",
            "",
            table_of(MIX_COLUMNS, mix_rows),
        ]
    return "\n".join(parts)


def check_refresh_targets(rows: list[dict], days: list[dict], mix_rows: list[dict]) -> list[str]:
    """Issue 25's count targets: a refresh costs no write and no delete, with and without
    STATE_FILE, TABLE_ORIGINS unset (no key) and set (no table); a day of 24 hourly refreshes at
    most one key write per address (unset), at most one table write (set), every address still
    enforced at its end; the free plan's row with the community blocklist fits."""
    problems = []
    for r in rows:
        if r["state"] == "baseline" or r["scenario"] == "refresh cold":
            continue
        if r["written"]["max"] or r["deleted"]["max"]:
            problems.append(
                f"{r['scenario']} {r['n']} (STATE_FILE {r['state']}, TABLE_ORIGINS {plural_setting(r['table_origins'])}): "
                f"wrote {r['written']['max']}, deleted {r['deleted']['max']}"
            )
    for d in days:
        what = f"a day of refreshes at {d['n']} (STATE_FILE {d['state']}, TABLE_ORIGINS {plural_setting(d['table_origins'])})"
        if d["key_writes"] > (0 if d["table_origins"] else d["n"]) or d["table_writes"] > (
            1 if d["table_origins"] else 0
        ):
            problems.append(f"{what}: {d['key_writes']} key writes, {d['table_writes']} table writes")
        if d["deleted"] or d["unenforced_at_end"]:
            problems.append(
                f"{what}: {d['deleted']} deletes, {d['unenforced_at_end']} addresses not enforced at the end"
            )
    for m in mix_rows:
        if (
            m["scale"] == 1
            and m["mix"] == "+ community blocklist"
            and m["table_origins"]
            and not fits_free(*mix_day(m))
        ):
            problems.append(
                f"{m['mix']} with TABLE_ORIGINS={m['table_origins']} does not fit the free plan: {mix_day(m)}"
            )
    return problems


def machine() -> str:
    cpu = ""
    if Path("/proc/cpuinfo").exists():
        models = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = models[0] if models else ""
    return f"{os.cpu_count()} cores {cpu}, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def repeats_for(n: int, repeats: int) -> int:
    """Fewer runs at the largest sizes, so the full benchmark ends within the hour."""
    return repeats if n <= 100_000 else max(1, repeats // 2) if n <= 300_000 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 1,000 only, one run each; for CI")
    parser.add_argument("--sizes", default="1000,10000,100000,300000,1000000")
    parser.add_argument("--repeats", type=int, default=5, help="runs per row up to 100,000 (fewer above)")
    parser.add_argument("--no-real", action="store_true", help="skip the real-LAPI rows")
    parser.add_argument(
        "--refresh",
        action="store_true",
        help="only the blocklist refreshes (issue 25): bench/results/refresh.{md,json}",
    )
    parser.add_argument("--refresh-size", type=int, default=20_000, help="addresses refreshed (default 20,000)")
    args = parser.parse_args()
    # The stand-ins hold up to millions of objects in this process; the cyclic GC's full passes
    # over them stalled the stand-ins' answers by seconds, time charged to the job measured.
    gc.disable()
    sizes = [] if args.refresh else [1000] if args.quick else [int(s) for s in args.sizes.split(",")]
    try:
        import trustme

        ca = trustme.CA()
    except ImportError:
        ca = None
        print("trustme not installed (pip install -e '.[test]'): no TLS rows", flush=True)
    rng = random.Random(1)
    rows = []
    for n in sizes:
        repeats = 1 if args.quick else repeats_for(n, args.repeats)
        rows += bench_standin(n, repeats, ca, rng)
        if not args.no_real and not args.quick and n <= 100_000:
            rows += bench_real_lapi(n, repeats)
    refresh_n = 1000 if args.quick else args.refresh_size
    refreshes = bench_refresh(refresh_n, 1 if args.quick else args.repeats)
    days = bench_refresh_day(refresh_n)
    # --quick: the free plan's deployment only, at a hundredth of its size (so that it never rots).
    mix_rows = bench_mixes(0.01, ("+ community blocklist",)) if args.quick else bench_mixes(1.0)
    today = datetime.date.today().isoformat()
    header = (
        f"Measured {today} on {machine()}; median of {1 if args.quick else args.repeats} runs up to 100,000 "
        f"({repeats_for(300_000, args.repeats)} at 300,000, 1 at 1,000,000) (min–max); the job as a process."
    )
    if args.refresh:
        header = f"Measured {today} on {machine()}; per-run rows: the median of {args.repeats} refreshes (min–max)."
    table = (markdown(rows, header) + "\n" + cost_table(rows) + "\n") if rows else header + "\n\n"
    table += refresh_report(refreshes, days, mix_rows)
    print("\n" + table)
    name = "refresh" if args.refresh else "quick" if args.quick else "latest"
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {"rows": rows, "refresh": refreshes, "refresh_days": days, "mixes": mix_rows}
    (RESULTS / f"{name}.json").write_text(
        json.dumps({"date": today, "machine": machine(), "repeats": args.repeats} | results, indent=1)
    )
    (RESULTS / f"{name}.md").write_text(table)
    problems = check_targets(rows) + check_refresh_targets(refreshes, days, mix_rows)
    for problem in problems:
        print("TARGET MISSED:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
