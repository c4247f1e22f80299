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
from pathlib import Path

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
    (addresses, `ban`/`captcha`); the scenario is quoted by json.dumps, once per distinct one."""

    def body(self) -> bytes:
        now = time.time()
        quoted: dict[str, str] = {}
        rows = [
            f'{{"duration":"{d["until"] - now:.6f}s","id":{i},"origin":"crowdsec",'
            f'"scenario":{quoted.get(d["scenario"]) or quoted.setdefault(d["scenario"], json.dumps(d["scenario"]))},'
            f'"scope":"Ip","type":"{d["type"]}","value":"{d["value"]}"}}'
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
    """1% new bans, 1% un-bans, 1% changes (half ban->captcha, half two hours longer)."""
    k = max(1, n // 100)
    rows = lapi.decisions
    for row in rng.sample(rows, k):
        rows.remove(row)
    changed = rng.sample(rows, k)
    for j, row in enumerate(changed):
        if j % 2:
            row["until"] += 7200
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
    args = parser.parse_args()
    # The stand-ins hold up to millions of objects in this process; the cyclic GC's full passes
    # over them stalled the stand-ins' answers by seconds, time charged to the job measured.
    gc.disable()
    sizes = [1000] if args.quick else [int(s) for s in args.sizes.split(",")]
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
    today = datetime.date.today().isoformat()
    header = (
        f"Measured {today} on {machine()}; median of {1 if args.quick else args.repeats} runs up to 100,000 "
        f"({repeats_for(300_000, args.repeats)} at 300,000, 1 at 1,000,000) (min–max); the job as a process."
    )
    table = markdown(rows, header) + "\n" + cost_table(rows)
    print("\n" + table)
    name = "quick" if args.quick else "latest"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(
        json.dumps({"date": today, "machine": machine(), "repeats": args.repeats, "rows": rows}, indent=1)
    )
    (RESULTS / f"{name}.md").write_text(table)
    problems = check_targets(rows)
    for problem in problems:
        print("TARGET MISSED:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
