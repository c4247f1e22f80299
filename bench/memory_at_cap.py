#!/usr/bin/env python3
"""Peak memory of the job at the default LAPI_MAX_BYTES, the figure the CronJob's limit is sized by.

LAPI's answer is made just under the cap with the smallest realistic rows (Go durations, one
scenario, IPv4 addresses: the most decisions the cap lets in), and the job runs as a process
with STATE_FILE through the runs that hold the most at once: cold (KV empty), steady, an audit,
churn (1% each way), a full rotation (every decision replaced: as many deletes as writes), the
same rotation without STATE_FILE, and the cap's answer with ranges that expand to
MAX_EXPANDED_KEYS more keys. Peak RSS is the process's own VmHWM (bench/run.py's run_job); the
baseline is the same job with an empty answer, in the same run. Wall and CPU seconds are the job
process's; the machine's load average is noted before and after each run, since a busy machine
stretches the wall time (not the CPU time). Writes bench/results/memory-at-cap.{md,json}.

    python3 bench/memory_at_cap.py
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import RESULTS, Bench, FastLapi, address, machine, past_the_lag  # noqa: E402

import lapi_kv_sync as job  # noqa: E402
from tests.standins import KvStandin  # noqa: E402

CAP = job.Config.lapi_max_bytes
SCRIPT = Path(os.environ.get("BENCH_SCRIPT", ROOT / "lapi_kv_sync.py"))  # another version, to compare
OUT = os.environ.get("BENCH_OUT", "memory-at-cap")


class CapLapi(FastLapi):
    """Rows as LAPI sends them (`3h59m58.349167242s`), ranges among them when asked."""

    def body(self) -> bytes:
        now = time.time()
        rows = []
        for i, d in enumerate(self.decisions or [], 1):
            left = d["until"] - now
            hours, rest = divmod(left, 3600)
            minutes, seconds = divmod(rest, 60)
            rows.append(
                f'{{"duration":"{int(hours)}h{int(minutes)}m{seconds:.9f}s","id":{i},"origin":"crowdsec",'
                f'"scenario":"crowdsecurity/ssh-bf","scope":"{d["scope"]}","type":"ban","value":"{d["value"]}"}}'
            )
        return ("[" + ",".join(rows) + "]").encode()


def load_average() -> str:
    """The machine's one-minute load average: other work on it stretches the wall times."""
    return Path("/proc/loadavg").read_text().split()[0]


def rows(n: int, start: int = 0, ranges: int = 0) -> list[dict]:
    now = time.time()
    made = [{"value": address(i), "scope": "Ip", "until": now + 4 * 3600 + i % 3600} for i in range(start, start + n)]
    for r in range(ranges):  # /24s far from the addresses above
        made[r] = {"value": f"172.{16 + (r >> 8)}.{r & 255}.0/24", "scope": "Range", "until": now + 4 * 3600}
    return made


def at_cap(lapi: CapLapi, start: int = 0, ranges: int = 0) -> int:
    """As many rows as fit just under the cap (within a few hundred bytes)."""
    n = CAP // 140
    while True:
        lapi.decisions = rows(n, start, ranges)
        size = len(lapi.body())
        if size > CAP:
            n -= (size - CAP) // 120 + 1
            continue
        if CAP - size < 400:
            return n
        n += (CAP - size) // 160 + 1


def markdown(meta: dict, results: list[dict]) -> str:
    """The results page: what was measured, on what, and each run's figures."""
    lines = [
        "# Peak memory at LAPI_MAX_BYTES",
        "",
        f"{meta['date']}, {meta['machine']}: `python3 bench/memory_at_cap.py`. LAPI's answer: "
        f"{meta['answer_bytes']:,} bytes (the cap is {meta['lapi_max_bytes']:,}), {meta['decisions']:,} decisions; "
        f"the expansion row: {meta['decisions_with_ranges']:,} decisions of which {meta['ranges']} are /24 ranges "
        "(EXPAND_RANGES_MAX=256).",
        "",
        "Wall and CPU seconds are the job process's, against the stand-ins on loopback (the KV stand-in without",
        "its schema check, as in bench/run.py). The load is /proc/loadavg's one-minute figure before and after",
        "each run: the job and the bench's stand-ins make about 2 of it on 2 cores; more is other work on the",
        "machine, which stretches the wall and, on this VM, the CPU seconds too. How to read these figures, and",
        'why the first ones (2026-12-02) put a full rotation at 122-301 s: bench/README.md, "Memory at the cap".',
        "",
        "| run | peak RSS (MiB) | wall (s) | CPU (s) | written | deleted | list requests | Cloudflare requests | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['scenario']} | {r['peak_rss_mib']:.0f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['written']:,} "
        f"| {r['deleted']:,} | {r['list']} | {r['cloudflare_requests']} | {r['load_before']}–{r['load_after']} |"
        for r in results
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    results = []
    # No schema check in the KV stand-in, as in bench/run.py: it validates every bulk item against
    # Cloudflare's OpenAPI schema in this process, and the job waits for it. With it, a cold run at
    # the cap took 150 s of wall time for 7 s of the job's CPU (the first measurement's 74-301 s).
    lapi, kv = CapLapi("bench-lapi-key-000000"), KvStandin("bench-cf-token-000000", schema=False)
    lapi.lifetime = kv.lifetime = 4 * 3600  # on a busy machine this takes more than the tests' 15 minutes
    only_expansion = os.environ.get("BENCH_ONLY") == "expansion"  # its two runs alone
    with lapi, kv:
        bench = Bench(kv, lapi.url, "bench-lapi-key-000000", lambda: (0, 0, 0), None)
        bench.env.pop("LAPI_MAX_BYTES")  # the default: what the CronJob runs with
        n = at_cap(lapi)
        answer = len(lapi.body())
        with tempfile.TemporaryDirectory() as tmp:
            state = {"STATE_FILE": f"{tmp}/record.gz"}

            def measure(name: str, *args: str, **env: str) -> None:
                if "--audit" in args and env.get("STATE_FILE"):
                    past_the_lag(Path(env["STATE_FILE"]))
                load_before = load_average()
                figures = bench.measure(*args, script=SCRIPT, **env)
                results.append(
                    {
                        "scenario": name,
                        **{k: figures[k] for k in ("wall_s", "cpu_s", "peak_rss_mib", "written", "deleted", "list")},
                        "cloudflare_requests": figures["cloudflare_requests"],
                        "load_before": load_before,
                        "load_after": load_average(),
                    }
                )
                print(
                    f"{name}: {figures['peak_rss_mib']:.0f} MiB, {figures['wall_s']:.1f}s "
                    f"(CPU {figures['cpu_s']:.1f}s, load {load_before} -> {load_average()})",
                    flush=True,
                )

            saved = lapi.decisions
            lapi.decisions = []
            measure("baseline: an empty answer", **{"STATE_FILE": f"{tmp}/empty.gz"})
            lapi.decisions = saved
            if only_expansion:
                at_cap(lapi, start=2 * n)
                measure("cold, STATE_FILE (before the next row)", **state)
            else:
                measure("cold, STATE_FILE", **state)
                measure("steady, STATE_FILE (LAPI unchanged)", **state)
                measure("audit, STATE_FILE", "--audit", **state)
                lapi.decisions = lapi.decisions[n // 50 :] + rows(n // 100, start=n)  # 2% un-banned, 1% new
                measure("churn, STATE_FILE", **state)
                at_cap(lapi, start=2 * n)
                measure("full rotation, STATE_FILE", **state)
                at_cap(lapi, start=0)
                measure("full rotation, audit, STATE_FILE", "--audit", **state)
                at_cap(lapi, start=2 * n)
                measure("full rotation, no STATE_FILE")
            ranges = job.MAX_EXPANDED_KEYS // 256
            expanded_n = at_cap(lapi, start=4 * n, ranges=ranges)
            measure(
                "expanded to the cap's keys + MAX_EXPANDED_KEYS, rotation, STATE_FILE", EXPAND_RANGES_MAX="256", **state
            )
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "python": sys.version.split()[0],
        "lapi_max_bytes": CAP,
        "answer_bytes": answer,
        "decisions": n,
        "decisions_with_ranges": expanded_n,
        "ranges": ranges,
    }
    (RESULTS / f"{OUT}.json").write_text(json.dumps({**meta, "results": results}, indent=1) + "\n")
    (RESULTS / f"{OUT}.md").write_text(markdown(meta, results))
    print(markdown(meta, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
