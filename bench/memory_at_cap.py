#!/usr/bin/env python3
"""Peak memory of the job at the default LAPI_MAX_BYTES, the figure the CronJob's limit is sized by.

LAPI's answer is made just under the cap with the smallest realistic rows (Go durations, one
scenario, IPv4 addresses: the most decisions the cap lets in), and the job runs as a process
with STATE_FILE through the runs that hold the most at once: cold (KV empty), steady, an audit,
churn (1% each way), a full rotation (every decision replaced: as many deletes as writes), the
same rotation without STATE_FILE, and the cap's answer with ranges that expand to
MAX_EXPANDED_KEYS more keys. Peak RSS is the process's own VmHWM (bench/run.py's run_job); the
baseline is the same job with an empty answer, in the same run. Writes
bench/results/memory-at-cap.{md,json}.

    python3 bench/memory_at_cap.py
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import RESULTS, Bench, FastLapi, address, machine  # noqa: E402

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


def past_the_lag(path: Path) -> None:
    """The record as it is once KV_LIST_LAG has passed, so that an audit is not put off after a
    big change (the bench does not wait two minutes)."""
    state = job.StateFile(str(path), job.SYSTEM_CLOCK)
    record = state.read(str(path))._replace(settling_until=None)
    with gzip.open(path, "wt", encoding="utf-8", newline="\n") as f:
        f.writelines(job.encode_record(record, 0))


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


def main() -> int:
    results = []
    lapi, kv = CapLapi("bench-lapi-key-000000"), KvStandin("bench-cf-token-000000")
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
                figures = bench.measure(*args, script=SCRIPT, **env)
                results.append(
                    {
                        "scenario": name,
                        **{k: figures[k] for k in ("wall_s", "peak_rss_mib", "written", "deleted", "list")},
                    }
                )
                print(f"{name}: {figures['peak_rss_mib']:.0f} MiB, {figures['wall_s']:.1f}s", flush=True)

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
    lines = [
        "# Peak memory at LAPI_MAX_BYTES",
        "",
        f"{meta['date']}, {meta['machine']}, Python {meta['python']}: `python3 bench/memory_at_cap.py`.",
        f"LAPI's answer: {answer:,} bytes (the cap is {CAP:,}), {n:,} decisions; the expansion row: "
        f"{expanded_n:,} decisions of which {ranges} are /24 ranges (EXPAND_RANGES_MAX=256).",
        "",
        "| run | peak RSS (MiB) | wall (s) | written | deleted | list requests |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['scenario']} | {r['peak_rss_mib']:.0f} | {r['wall_s']:.1f} | {r['written']:,} | {r['deleted']:,} | {r['list']} |"
        for r in results
    ]
    (RESULTS / f"{OUT}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
