"""The playground: the job at work with neither CrowdSec nor Cloudflare (README, Quick start).

A LAPI, a Cloudflare Workers KV and a Pushgateway stand-in on 127.0.0.1 (tests/standins.py),
holding a few decisions. Standard library only: no virtual environment needed.

    python3 -m tests.sandbox                       a fixed demo: two runs of the job, printed
    python3 -m tests.sandbox --serve               the stand-ins until Ctrl-C; prints the export lines
    eval "$(python3 -m tests.sandbox env)"         those lines, in another shell
    python3 -m tests.sandbox add 192.0.2.9 ban 4h  a decision more (remove VALUE: none on it)
    python3 -m tests.sandbox decisions | kv        what LAPI holds, what KV holds

The commands talk to the running sandbox over HTTP on 127.0.0.1; `--serve` says where in a small
file (`--file`, in the temporary directory by default), which it removes when it stops.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

from lapi_kv_sync import parse_go_duration
from tests.standins import (
    ACCOUNT,
    NAMESPACE,
    Entry,
    KvStandin,
    LapiStandin,
    PushgatewayStandin,
    Standin,
    _Handler,
    decision,
    go_duration,
)

SCRIPT = Path(__file__).resolve().parent.parent / "lapi_kv_sync.py"
LAPI_KEY, CF_TOKEN = "sandbox-lapi-key", "sandbox-cf-token"
DEFAULT_FILE = Path(tempfile.gettempdir()) / f"lapi-kv-sync-sandbox-{os.getuid()}.json"
NOT_RUNNING = "no sandbox is running (start one with: python3 -m tests.sandbox --serve)"
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")


def demo_decisions() -> list[dict]:
    """A few of each kind: what the job writes, merges, spells canonically and leaves out."""
    return [
        decision("192.0.2.1", 4 * 3600, scenario="crowdsecurity/ssh-bf"),
        decision("2001:0DB8:0000::0001", 3600),  # written as 2001:db8::1
        decision("::ffff:192.0.2.6", 90),  # written as 192.0.2.6
        decision("192.0.2.3", 3600, "ban"),  # a ban and a captcha on one address: ban
        decision("192.0.2.3", 10 * 3600, "captcha"),
        decision("198.51.100.0/24", scope="Range"),  # left out: scope (EXPAND_RANGES_MAX=256 writes it)
        decision("FR", scope="Country"),  # left out: scope
        decision("192.0.2.4", type="throttle"),  # left out: type
        decision("192.0.2.9", 600, "captcha"),
    ]


def environment(lapi: LapiStandin, kv: KvStandin, push: PushgatewayStandin, state_file: str = "") -> dict[str, str]:
    env = {
        "LAPI_URL": lapi.url,
        "LAPI_KEY": LAPI_KEY,
        "CF_API_URL": kv.api_url,
        "CF_API_TOKEN": CF_TOKEN,
        "CF_ACCOUNT_ID": ACCOUNT,
        "CF_KV_NAMESPACE_ID": NAMESPACE,
        "PUSHGATEWAY_URL": push.url,
    }
    if state_file:
        env["STATE_FILE"] = state_file
    if any(os.environ.get(name) for name in PROXY_VARIABLES):  # the stand-ins are not behind the proxy
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1"
    return env


def standins() -> tuple[LapiStandin, KvStandin, PushgatewayStandin]:
    # No schema checks: they need the test extra, and the playground needs only Python.
    lapi, kv = LapiStandin(LAPI_KEY, schema=False), KvStandin(CF_TOKEN, schema=False)
    lapi.decisions = demo_decisions()
    kv.store["config:maintenance"] = Entry("off")  # not under the prefix: the job never touches it
    return lapi, kv, PushgatewayStandin()


def demo() -> int:
    """Two runs of the job as a process: the first writes, the second finds nothing to do."""
    lapi, kv, push = standins()
    with lapi, kv, push:
        env = {"PATH": os.environ.get("PATH", ""), **environment(lapi, kv, push)}
        codes = []
        for run in (1, 2):
            kv.reset_counts()
            print(f"--- run {run}: python3 lapi_kv_sync.py", flush=True)
            codes.append(subprocess.run([sys.executable, str(SCRIPT)], env=env, timeout=120).returncode)
            print(f"    KV requests: {dict(kv.requests)}; keys written: {kv.writes}, deleted: {kv.deletes}")
            if run == 1:
                print(kv_table(kv), end="")
        print(
            f"--- the Pushgateway holds: success={push.value('crowdsec_kv_sync_success')}, "
            f"decisions={push.value('crowdsec_kv_sync_decisions')}, written={push.value('crowdsec_kv_sync_written')}"
        )
        return 0 if codes == [0, 0] and kv.writes == 0 else 1


# --------------------------------------------------------------------------- --serve


def left(seconds: float | None) -> str:
    if seconds is None:
        return "no expiration"
    return go_duration(round(max(0.0, seconds))) + " left"


def kv_table(kv: KvStandin) -> str:
    now = kv.now()
    rows = [
        f"    {key:24} {shown(entry.value):8} {left(None if entry.expiration is None else entry.expiration - now):16} "
        f"{json.dumps(entry.metadata) if entry.metadata is not None else ''}".rstrip()
        for key, entry in sorted(kv.live().items())
    ]
    return "".join(row + "\n" for row in rows) or "    (no keys)\n"


def shown(value: str | bytes) -> str:
    """A value as the table shows it: the network table is binary, so its size stands for it."""
    return f"({len(value)} bytes, binary)" if isinstance(value, bytes) else value


def decisions_table(lapi: LapiStandin) -> str:
    now = time.time()
    rows = [
        f"    {d['value']:24} {d['type']:8} {d['scope']:8} {left(d['until'] - now):16} {d['origin']}"
        for d in lapi.decisions or []
    ]
    return "".join(row + "\n" for row in rows) or "    (no decisions)\n"


class Control(Standin):
    """What the commands ask the running sandbox: GET /env, /kv, /decisions; POST /decisions (a
    decision to add, as JSON); DELETE /decisions?value=… (every decision on that value)."""

    def __init__(self, lapi: LapiStandin, kv: KvStandin, exports: str) -> None:
        super().__init__()
        self.lapi, self.kv, self.exports = lapi, kv, exports

    def handle(self, request: _Handler, method: str) -> None:
        url = urllib.parse.urlsplit(request.path)
        raw = request.body()
        if method == "GET" and url.path == "/env":
            return request.send(200, self.exports, "text/plain")
        if method == "GET" and url.path == "/kv":
            return request.send(200, kv_table(self.kv), "text/plain")
        if method == "GET" and url.path == "/decisions":
            return request.send(200, decisions_table(self.lapi), "text/plain")
        if method == "POST" and url.path == "/decisions":
            new = json.loads(raw)
            added = decision(new["value"], new["seconds"], new["type"], new["scope"], origin="cscli", scenario="")
            with self.lapi.lock:
                self.lapi.decisions = [*(self.lapi.decisions or []), added]
            return request.send(200, f"added: {decisions_table(self.lapi).splitlines()[-1].strip()}\n", "text/plain")
        if method == "DELETE" and url.path == "/decisions":
            value = urllib.parse.parse_qs(url.query).get("value", [""])[0]
            with self.lapi.lock:
                kept = [d for d in self.lapi.decisions or [] if d["value"] != value]
                removed = len(self.lapi.decisions or []) - len(kept)
                self.lapi.decisions = kept
            return request.send(200, f"removed {removed} decision(s) on {value}\n", "text/plain")
        return request.send(404, "no such command\n", "text/plain")


def serve(where: Path, lifetime: float | None) -> int:
    lapi, kv, push = standins()
    state_dir = tempfile.mkdtemp(prefix="lapi-kv-sync-sandbox-")
    env = environment(lapi, kv, push, os.path.join(state_dir, "record.gz"))
    exports = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())
    control = Control(lapi, kv, exports)
    for standin in (lapi, kv, push, control):
        standin.lifetime = lifetime or 365 * 24 * 3600.0  # the playground runs until Ctrl-C
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C (twice, too) or kill: clean up, exit 0
        signal.signal(signum, lambda signum, frame: stop.set())
    try:
        with lapi, kv, push, control:
            print(f"lapi-kv-sync sandbox: LAPI {lapi.url}, KV {kv.api_url}, Pushgateway {push.url}")
            print(f"LAPI holds {len(lapi.decisions or [])} decisions; KV holds only a key of someone else's.")
            print(
                'In another shell, in this clone, paste these lines (or run: eval "$(python3 -m tests.sandbox env)"):'
            )
            print()
            print(exports)
            print("then: python3 lapi_kv_sync.py --dry-run   the plan, nothing written")
            print("      python3 lapi_kv_sync.py             the first sync")
            print("      python3 -m tests.sandbox kv         what KV holds")
            print("      python3 -m tests.sandbox add 192.0.2.99 ban 4h | remove 192.0.2.99 | decisions")
            print("Ctrl-C stops the sandbox.", flush=True)
            where.write_text(json.dumps({"control": control.url, "pid": os.getpid()}))
            stop.wait(lifetime)
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(where.read_text()).get("pid") == os.getpid():  # another sandbox's file stays
                where.unlink()
        shutil.rmtree(state_dir, ignore_errors=True)
    print("sandbox stopped", flush=True)
    return 0


# --------------------------------------------------------------------------- the commands


def ask(where: Path, method: str, path: str, body: dict | None = None) -> tuple[int, str]:
    """One request to the running sandbox (never through a proxy); exit 1 when none runs."""
    try:
        url = urllib.parse.urlsplit(json.loads(where.read_text())["control"])
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        conn.request(method, path, json.dumps(body) if body is not None else None)
        answer = conn.getresponse()
        return answer.status, answer.read().decode()
    except (OSError, ValueError, KeyError):
        sys.exit(f"sandbox: {NOT_RUNNING}")


def seconds(text: str) -> float:
    """`4h`, `30m`, `1h30m`, `90s` or plain seconds."""
    try:
        value = float(text) if text.replace(".", "", 1).isdigit() else parse_go_duration(text)
    except ValueError:
        value = -1
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 4h, 30m, 90s)")
    return value


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m tests.sandbox",
        description="The job against local stand-ins of LAPI, Workers KV and the Pushgateway, on 127.0.0.1. "
        "Without a command or --serve: a fixed demo, two runs of the job, printed.",
        epilog="A first sync: `python3 -m tests.sandbox --serve` here; in another shell, in the clone, "
        '`eval "$(python3 -m tests.sandbox env)" && python3 lapi_kv_sync.py`.',
    )
    parser.add_argument("--serve", action="store_true", help="run the stand-ins until Ctrl-C; print the export lines")
    parser.add_argument(
        "--lifetime", type=float, metavar="SECONDS", help="with --serve: stop by itself after this long"
    )
    parser.add_argument(
        "--file", type=Path, default=DEFAULT_FILE, help=f"where --serve says where it listens (default {DEFAULT_FILE})"
    )
    commands = parser.add_subparsers(dest="command", title="commands, to a running sandbox")
    commands.add_parser("env", help='the export lines: eval "$(python3 -m tests.sandbox env)"')
    commands.add_parser("decisions", help="the decisions LAPI holds")
    commands.add_parser("kv", help="the keys KV holds, as the Worker reads them")
    add = commands.add_parser("add", help="add a decision, e.g. add 192.0.2.99 ban 4h")
    add.add_argument("value", help="an address (or a CIDR: a Range decision)")
    add.add_argument(
        "type", nargs="?", default="ban", help="ban (default), captcha, or another type the job leaves out"
    )
    add.add_argument("duration", nargs="?", default="4h", type=seconds, help="e.g. 4h (default), 30m, 90s")
    add.add_argument("--scope", help="Ip, Range, Country or AS (default: Range for a CIDR, Ip otherwise)")
    remove = commands.add_parser("remove", help="remove every decision on a value")
    remove.add_argument("value")
    args = parser.parse_args(argv)
    if args.serve and args.command:
        parser.error("--serve runs the sandbox; the commands talk to one: give one or the other")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.serve:
        return serve(args.file, args.lifetime)
    if args.command is None:
        return demo()
    if args.command == "add":
        scope = args.scope or ("Range" if "/" in args.value else "Ip")
        body = {"value": args.value, "type": args.type, "seconds": args.duration, "scope": scope}
        status, text = ask(args.file, "POST", "/decisions", body)
    elif args.command == "remove":
        status, text = ask(args.file, "DELETE", "/decisions?" + urllib.parse.urlencode({"value": args.value}))
    else:
        status, text = ask(args.file, "GET", "/" + args.command)
    print(text, end="")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
