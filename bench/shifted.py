#!/usr/bin/env python3
"""The job as a process, as `python3 lapi_kv_sync.py` runs it, but with its clock moved by
BENCH_CLOCK_OFFSET seconds: how bench/run.py lets simulated hours pass between process runs (it
moves the stand-ins' clocks by as much). Nothing else differs: the same main(), the same exit."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lapi_kv_sync as job  # noqa: E402

offset = float(os.environ.pop("BENCH_CLOCK_OFFSET", "0"))
job.exit_at_once(job.main(clock=job.Clock(now=lambda: time.time() + offset)))
