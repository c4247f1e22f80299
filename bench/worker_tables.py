#!/usr/bin/env python3
"""What the reference Worker's tables cost in workerd: CPU and wall, cold and warm, per table size.

The network tables are built by the job's own functions (`disjoint_intervals`, `encode_networks`):
empty (the baseline), 100,000 IPv4 + 10,000 IPv6 intervals, and 900,000 IPv4 + 100,000 IPv6; beside
them the JSON scope table the Worker read ranges from before (its scopes.js, at commit LEGACY), with
the same 110,000 networks, and its own empty baseline. bench/worker_tables.mjs runs them all in one
workerd (Miniflare) and measures; this script builds the tables, summarises, checks the targets
(issue 25) and writes bench/results/worker-tables.{md,json}. See bench/README.md.

    python3 bench/worker_tables.py            # 9 repetitions of each measure
    python3 bench/worker_tables.py --reps 3   # quicker, noisier
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lapi_kv_sync as job  # noqa: E402

WORKER = ROOT / "worker"
RESULTS = ROOT / "bench" / "results"
# The last commit whose Worker read Range decisions from the JSON scope table (and swept them into
# intervals itself, with BigInts for IPv6): the comparison's "before".
LEGACY = "2451af7"
TARGETS = {  # issue 25: CPU over the empty table's, per load; per lookup
    "network-110k": 5.0,
    "network-1m": 20.0,
}
LOOKUP_TARGETS_US = {4: 2.0, 6: 5.0}


def random_intervals(rng: random.Random, n4: int, n6: int, now: int) -> job.Intervals:
    """Disjoint intervals from n4 distinct IPv4 addresses (/32) and n6 distinct IPv6 /64s, each a
    ban or a captcha ending within a day, swept by the job's disjoint_intervals."""

    def networks(count: int, bits: int, host_bits: int) -> list[job.Interval]:
        firsts = rng.sample(range(1 << (bits - host_bits)), count) if bits == 32 else set()
        while len(firsts) < count:  # IPv6: a sample of 2^64 prefixes without the range object
            firsts.add(rng.getrandbits(bits - host_bits))
        out = []
        for prefix in firsts:
            end = now + rng.randint(3600, 86400)
            ban, captcha = (end, 0) if rng.random() < 0.8 else (0, end)
            first = prefix << host_bits
            out.append(job.Interval(first, first + (1 << host_bits) - 1, ban, captcha))
        return out

    return job.Intervals(job.disjoint_intervals(networks(n4, 32, 0)), job.disjoint_intervals(networks(n6, 128, 64)))


def legacy_document(intervals: job.Intervals) -> bytes:
    """The same networks as ranges of the JSON scope table of format 1 (docs/kv-contract.md)."""
    ranges = {}
    for family, bits in ((intervals.v4, 32), (intervals.v6, 128)):
        for interval in family:
            prefix = bits - (interval.last - interval.first + 1).bit_length() + 1
            network = ipaddress.ip_network((interval.first, prefix))
            ranges[str(network)] = ["ban", interval.ban] if interval.ban else ["captcha", interval.captcha]
    document = {"v": 1, **({"range": ranges} if ranges else {})}
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def lookup_addresses(rng: random.Random, intervals: list[job.Interval], family: int, count: int) -> list[str]:
    """Canonical addresses, half inside an interval of the table, half anywhere (mostly outside)."""
    make = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    bits = 32 if family == 4 else 128
    out = []
    for i in range(count):
        if i % 2 == 0 and intervals:
            chosen = rng.choice(intervals)
            out.append(str(make(rng.randint(chosen.first, chosen.last))))
        else:
            out.append(str(make(rng.getrandbits(bits))))
    return out


def legacy_worker(folder: Path) -> Path:
    """worker/*.js as they were at LEGACY, extracted into `folder`."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", LEGACY, "worker"], check=True, capture_output=True
    ).stdout
    tar_path = folder / "legacy.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(folder, members=[m for m in tar.getmembers() if m.name.count("/") == 1], filter="data")
    return folder / "worker"


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(measured: dict, digits: int = 2) -> str:
    return f"{measured['median']:.{digits}f} ({measured['min']:.{digits}f}–{measured['max']:.{digits}f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=9, help="repetitions of each measure (default 9)")
    parser.add_argument("--name", default="worker-tables", help="bench/results/<name>.{md,json}")
    args = parser.parse_args()
    rng = random.Random(25)
    now = int(time.time())
    started = time.monotonic()
    load_before = Path("/proc/loadavg").read_text().split()[0]

    tables = {
        "network-empty": job.Intervals([], []),
        "network-110k": random_intervals(rng, 100_000, 10_000, now),
        "network-1m": random_intervals(rng, 900_000, 100_000, now),
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        variants = []
        for name, intervals in tables.items():
            (folder / name).write_bytes(job.encode_networks(intervals))
            variants.append({"name": name, "kind": "networks", "key": "networks", "file": str(folder / name)})
        for name, intervals in (("json-empty", tables["network-empty"]), ("json-110k", tables["network-110k"])):
            (folder / name).write_bytes(legacy_document(intervals))
            variants.append({"name": name, "kind": "legacy", "key": "scopes", "file": str(folder / name)})
        sizes = {v["name"]: Path(v["file"]).stat().st_size for v in variants}
        lookups = []
        for name in ("network-110k", "network-1m", "json-110k"):
            intervals = tables[name.replace("json", "network")]
            for family, rows in ((4, intervals.v4), (6, intervals.v6)):
                n = 1_000_000 if name.startswith("network") else 100_000
                addresses = lookup_addresses(rng, rows, family, 20_000)
                lookups.append({"variant": name, "family": family, "addresses": addresses, "n": n})
        toml = tomllib.loads((WORKER / "wrangler.toml").read_text())
        work = {
            "worker": str(WORKER),
            "legacy": str(legacy_worker(folder)),
            "compatibilityDate": toml["compatibility_date"],
            "variants": variants,
            "reps": args.reps,
            "warm": 20,
            "loads": 6,
            "lookups": lookups,
        }
        done = subprocess.run(
            ["node", str(ROOT / "bench" / "worker_tables.mjs")],
            input=json.dumps(work),
            capture_output=True,
            text=True,
            cwd=WORKER,
            timeout=3600,
        )
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return 1
    measured = json.loads(done.stdout)

    rows = []
    for name in sizes:
        row = {"table": name, "bytes": sizes[name]}
        for kind in ("cold", "warm"):
            for clock in ("cpuMs", "wallMs"):
                row[f"{kind}_{clock}"] = summary([m[clock] for m in measured[kind][name]])
        for clock in ("cpuMs", "wallMs", "isolateMs"):
            row[f"load_{clock}"] = summary([m[clock] for m in measured["load"][name]])
        for clock in ("cpuMs", "isolateMs"):
            row[f"use_{clock}"] = summary([m[clock] for m in measured["use"][name]])
        rows.append(row)
    by_name = {row["table"]: row for row in rows}
    lookup_rows = [
        {"table": key, **{clock: summary([m[clock] for m in values]) for clock in ("cpuUs", "isolateUs")}}
        | {"hits": values[0]["found"]}
        for key, values in measured["lookup"].items()
    ]

    # The targets are on CPU: wall time on a shared machine counts other processes' turns too.
    checks = []
    for name, limit in TARGETS.items():
        for measure, what in (("cold_cpuMs", "a cold request"), ("load_cpuMs", "one load")):
            extra = by_name[name][measure]["median"] - by_name["network-empty"][measure]["median"]
            checks.append((f"{name}: CPU of {what}, over the empty table's", extra, limit, "ms"))
    for row in lookup_rows:
        if row["table"].startswith("network"):
            limit = LOOKUP_TARGETS_US[int(row["table"][-1])]
            checks.append((f"{row['table']}: CPU of one lookup", row["cpuUs"]["median"], limit, "µs"))

    load_after = Path("/proc/loadavg").read_text().split()[0]
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    machine = f"{os.cpu_count()} CPUs, {platform.platform()}, node {node}"
    lines = [
        f"# The Worker's tables in workerd ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"`python3 bench/worker_tables.py --reps {args.reps}` on {machine}, Miniflare as pinned in",
        f"worker/package-lock.json; load average {load_before} before, {load_after} after (wall times",
        "count other processes' turns on a busy machine; CPU does not). Medians of the repetitions (min–max).",
        "",
        "| table | bytes | cold request CPU ms | cold wall ms | warm request CPU ms | warm wall ms "
        "| one load CPU ms | one load in-isolate ms | its map or parse alone, CPU ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['table']} | {row['bytes']:,} | {fmt(row['cold_cpuMs'])} | {fmt(row['cold_wallMs'])} "
            f"| {fmt(row['warm_cpuMs'])} | {fmt(row['warm_wallMs'])} | {fmt(row['load_cpuMs'])} "
            f"| {fmt(row['load_isolateMs'])} | {fmt(row['use_cpuMs'], 4)} |"
        )
    lines += ["", "| lookups | CPU µs each | in-isolate µs each | share found |", "| --- | ---: | ---: | ---: |"]
    for row in lookup_rows:
        lines.append(f"| {row['table']} | {fmt(row['cpuUs'], 3)} | {fmt(row['isolateUs'], 3)} | {row['hits']:.2f} |")
    lines += ["", "| target (issue 25) | measured | limit | met |", "| --- | ---: | ---: | --- |"]
    for label, value, limit, unit in checks:
        lines.append(f"| {label} | {value:.3f} {unit} | {limit} {unit} | {'yes' if value <= limit else '**no**'} |")
    lines.append("")
    lines.append(f"Took {time.monotonic() - started:.0f} s.")
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / args.name).parent.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(text)
    payload = {
        "rows": rows,
        "lookups": lookup_rows,
        "checks": checks,
        "machine": machine,
        "load_average": [load_before, load_after],
        "reps": args.reps,
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    return 0 if all(value <= limit for _, value, limit, _ in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
