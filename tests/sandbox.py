"""See the job work with neither CrowdSec nor Cloudflare: `python3 -m tests.sandbox`.

Starts a LAPI stand-in holding a few decisions, a Cloudflare KV stand-in and a Pushgateway
stand-in on 127.0.0.1, runs lapi_kv_sync.py twice as a process, and shows what each run did.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.standins import ACCOUNT, NAMESPACE, Entry, KvStandin, LapiStandin, PushgatewayStandin, decision

SCRIPT = Path(__file__).resolve().parent.parent / "lapi_kv_sync.py"


def main() -> int:
    with (
        LapiStandin("sandbox-lapi-key") as lapi,
        KvStandin("sandbox-cf-token", schema=False) as kv,
        PushgatewayStandin() as push,
    ):
        lapi.decisions = [
            decision("192.0.2.1", 4 * 3600, scenario="crowdsecurity/ssh-bf"),
            decision("2001:0DB8:0000::0001", 3600),
            decision("::ffff:192.0.2.6", 90),
            decision("192.0.2.3", 3600, "ban"),
            decision("192.0.2.3", 10 * 3600, "captcha"),
            decision("198.51.100.0/24", scope="Range"),
            decision("FR", scope="Country"),
            decision("192.0.2.4", type="throttle"),
            decision("192.0.2.9", 600, "captcha"),
        ]
        kv.store["config:maintenance"] = Entry("off")  # not ours: never touched
        env = {
            "PATH": os.environ.get("PATH", ""),
            "LAPI_URL": lapi.url,
            "LAPI_KEY": "sandbox-lapi-key",
            "CF_ACCOUNT_ID": ACCOUNT,
            "CF_KV_NAMESPACE_ID": NAMESPACE,
            "CF_API_TOKEN": "sandbox-cf-token",
            "CF_API_URL": kv.api_url,
            "PUSHGATEWAY_URL": push.url,
        }
        codes = []
        for run in (1, 2):
            kv.reset_counts()
            print(f"--- run {run}: python3 lapi_kv_sync.py", flush=True)
            codes.append(subprocess.run([sys.executable, str(SCRIPT)], env=env, timeout=120).returncode)
            print(f"    KV requests: {dict(kv.requests)}; keys written: {kv.writes}, deleted: {kv.deletes}")
            if run == 1:
                for key, entry in sorted(kv.live().items()):
                    print(f"    {key:20} {entry.value:8} expiration={entry.expiration} metadata={entry.metadata}")
        print(
            f"--- the Pushgateway holds: success={push.value('crowdsec_kv_sync_success')}, "
            f"decisions={push.value('crowdsec_kv_sync_decisions')}, written={push.value('crowdsec_kv_sync_written')}"
        )
        return 0 if codes == [0, 0] and kv.writes == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
