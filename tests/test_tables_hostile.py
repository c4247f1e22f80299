"""The tables against hostile input, each test the smallest case a break-it pass found failing
(issues 25 and 26): a KV value past any table's size, a state record built to exhaust memory, a
scope table no Worker reads, a Date header before 1970, the job's clock stepping between audits.
Each says what it shows and why it matters."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import lapi_kv_sync as job
from tests.conftest import SCRIPT
from tests.standins import Entry, decision
from tests.test_state_robust import HEADER

CRONJOB_MEMORY_LIMIT = 448 << 20  # k8s/base/cronjob.yaml: resources.limits.memory 448Mi


def digest_of(value: bytes) -> str:
    return hashlib.sha256(value).hexdigest()[:32]


def test_a_table_value_past_the_read_limit_is_rewritten_rather_than_failing_every_run(stack):
    """A value under the prefix's `networks` key that is over TABLE_MAX_BYTES_LIMIT (20 MiB, KV
    takes 25) with a digest-shaped metadata: without STATE_FILE the run reads it back, the read
    stops at 20 MiB ("Cloudflare's answer was too large") and the run fails before it writes
    anything, so every later run fails the same way until someone deletes the key by hand. A
    value that is not a table this job can have written should be rewritten, as a junk value of
    any smaller size is."""
    stack.lapi.decisions = [decision("192.0.2.1"), decision("198.51.100.0/24", scope="Range")]
    assert stack.run().code == 0
    good = stack.kv.live()["ip:networks"]
    huge = b"LKVN" + bytes(job.TABLE_MAX_BYTES_LIMIT)  # 20 MiB and 4 bytes
    stack.kv.store["ip:networks"] = Entry(huge, good.expiration, {"table": 1, "digest": digest_of(huge), "entries": 1})
    result = stack.run()
    assert result.code == 0, result.err
    rewritten = job.decode_networks(stack.kv.live()["ip:networks"].value)
    assert [(i.first, i.last) for i in rewritten.v4] == [(i.first, i.last) for i in job.decode_networks(good.value).v4]


def test_a_record_the_limit_lets_in_is_read_within_the_cronjobs_memory(stack, tmp_path):
    """record_limit() bounds what a record may unpack to in bytes: with the defaults, 69 MiB now
    that it adds the tables' values in base64 (53 MiB on main). A 70 KiB state file whose header
    claims many keys and whose key column is `[0,0,0,...]` up to that limit is refused only after
    json.loads has built a list of 36 million references: the job peaks near 480 MiB (main: about
    365), past the CronJob's 448 Mi limit, so the pod is killed for memory on every run instead of
    the run auditing ("unreadable"), as the docs promise ("the run reads it within its memory")."""
    config = job.load_config(
        {"CF_ACCOUNT_ID": "a" * 32, "CF_KV_NAMESPACE_ID": "b" * 32, "CF_API_TOKEN": "t" * 40, "LAPI_KEY": "k" * 32}
    )
    header = {**HEADER, "keys": 10**6, "documents": []}  # enough keys for the header to allow the whole limit
    head = json.dumps(header).encode() + b"\n["
    pack = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts, chunk = [pack.compress(head)], b"0," * (1 << 20)
    for _ in range((job.record_limit(config) - len(head) - 64) // len(chunk)):
        parts.append(pack.compress(chunk))
    parts += [pack.compress(b"0]\n[]\n\n"), pack.flush()]
    state = tmp_path / "record.gz"
    state.write_bytes(b"".join(parts))
    assert state.stat().st_size < 1 << 20

    stack.lapi.decisions = [decision("192.0.2.1")]
    env = {"PATH": os.environ.get("PATH", ""), **stack.env(STATE_FILE=str(state), PUSHGATEWAY_URL="")}
    peak_kib, process = 0, subprocess.Popen([sys.executable, str(SCRIPT)], env=env, stdout=subprocess.PIPE)
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:  # VmHWM only grows: the last reading is the peak
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM"):
                    peak_kib = max(peak_kib, int(line.split()[1]))
        time.sleep(0.005)
    out = process.stdout.read().decode()
    assert process.returncode == 0 and "audited: unreadable" in out, out
    assert peak_kib * 1024 < CRONJOB_MEMORY_LIMIT, f"peak RSS {peak_kib // 1024} MiB"


def test_a_scope_table_the_reference_worker_refuses_is_not_kept():
    """A stored scope table is kept to the byte while its entries may stand. scope_entries()
    reads `"v": true` (and `1.0`, and UTF-16 JSON) as format 1, because True == 1 in Python;
    worker/scopes.js refuses it (`document.v !== 1`), so a table KV holds with its right digest
    enforces no Country or AS at the edge, and the job keeps it as long as LAPI's entries do not
    change."""
    rows = [{"value": "FR", "type": "ban", "scope": "Country", "duration": "1h", "origin": "crowdsec"}]
    entries = job.project(rows, 1_800_000_000.0, "ip:", tables=True).scopes
    fresh = job.scope_document(entries, None, 0.0, 1_800_000_000.0, 1 << 20)
    refused_by_the_worker = fresh.value.replace(b'"v":1', b'"v":true')
    kept = job.scope_document(entries, refused_by_the_worker, 0.0, 1_800_000_010.0, 1 << 20)
    assert kept.value == fresh.value


def test_a_cloudflare_date_before_1970_is_no_traceback(stack):
    """The job takes Cloudflare's clock from the listing's Date header. One in 1897 (a broken
    proxy's, say) makes every network table end negative, and encode_networks() packs them as
    uint32: OverflowError, reported as an internal error with a traceback. Everything read is
    hostile input: a clear message, never a traceback."""
    stack.kv.clock_offset = -2.3e9 - time.time()
    stack.lapi.decisions = [decision("198.51.100.0/24", scope="Range")]
    result = stack.run()
    assert "Traceback" not in result.err and "internal_error" not in result.out + result.err, result.err


def test_a_forward_step_of_the_jobs_clock_between_audits_keeps_table_ends_within_the_slack(stack, tmp_path):
    """With STATE_FILE, a run between audits takes Cloudflare's clock as its own plus the offset
    the last audit measured. Keys are written with a TTL, so a step of the job's clock does not
    move them; a table holds absolute ends, each the decision's end on the job's clock plus that
    offset. After a 10-minute forward step (an NTP correction, a VM resumed), a Range decision
    written between audits ends 10 minutes late in the table, while the table key lives on for
    its longer entries: past the 60 s the contract allows ("The same holds for the tables'
    entries"), until an audit, or for good if the job stops."""
    state = str(tmp_path / "record.gz")
    stack.lapi.decisions = [decision("192.0.2.0/24", 86400, scope="Range")]
    assert stack.run(STATE_FILE=state).code == 0  # an audit: the offset measured, 0
    short = decision("198.51.100.0/24", 3600, scope="Range")
    stack.lapi.decisions.append(short)
    stepped = stack.run(STATE_FILE=state, clock_offset=600)  # the job's clock only; Cloudflare's has not moved
    assert stepped.code == 0 and "not audited" in stepped.out, stepped.out
    table = job.decode_networks(stack.kv.live()["ip:networks"].value)
    ends = {job.network_text(4, i.first, i.last): i.ban for i in table.v4}
    assert ends["198.51.100.0/24"] <= short["until"] + job.EXPIRATION_SLACK
