#!/usr/bin/env python3
"""Profile one steady run at N decisions (default 100,000) in-process with cProfile:
python3 bench/profile_steady.py [N]. Prints the top functions by cumulative and own time."""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import CF_TOKEN, LAPI_KEY, FastLapi, decisions  # noqa: E402

import lapi_kv_sync as job  # noqa: E402
from tests.standins import ACCOUNT, NAMESPACE, KvStandin  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with FastLapi(LAPI_KEY) as lapi, KvStandin(CF_TOKEN, schema=False) as kv:
        lapi.decisions = decisions(n)
        env = {
            "LAPI_URL": lapi.url,
            "LAPI_KEY": LAPI_KEY,
            "CF_ACCOUNT_ID": ACCOUNT,
            "CF_KV_NAMESPACE_ID": NAMESPACE,
            "CF_API_TOKEN": CF_TOKEN,
            "CF_API_URL": kv.api_url,
        }
        assert job.main([], env, io.StringIO(), sys.stderr) == 0  # cold: fill KV
        profile = cProfile.Profile()
        out = io.StringIO()
        profile.enable()
        code = job.main([], env, out, sys.stderr)
        profile.disable()
        print(out.getvalue().strip(), f"(exit {code})")
        stats = pstats.Stats(profile).strip_dirs()
        stats.sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
