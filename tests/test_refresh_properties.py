"""Property (issue 25): for any sequence of blocklist refreshes (new ids, ends moved later by any
amount), ends moved earlier, new, lifted and changed decisions and time passing, with and without
STATE_FILE, and TABLE_ORIGINS unset, `*` or a list (changed between runs too), after every
successful run:

- every address LAPI wants is enforced, by its key or the network table, read as the reference
  Worker reads them (ban beats captcha), now and for REFRESH_AHEAD to come (a run at least every
  15 minutes then keeps it so: rule 1 leaves a refreshed key alone only that long before it
  expires);
- no key outlives the decisions on its address by more than EXPIRATION_SLACK, nor a table entry
  the decisions it holds.

Runs are in-process against the stand-ins, over real sockets; time passes on every clock at once
(the job's, KV's, LAPI's durations). "Wanted" leaves out a decision ending within the slack: a key
in step with its decision may expire up to EXPIRATION_SLACK before it, by design. Clocks are read
to the second here and there (KV's Date header, whole-second expirations): every bound allows
CLOCK_GRAIN for it."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import lapi_kv_sync as job
from tests.conftest import fresh_stack
from tests.standins import KvStandin

CLOCK_GRAIN = 2  # seconds: Cloudflare's Date header and expirations are whole seconds
ADDRESSES = [f"10.0.0.{i}" for i in range(1, 9)] + ["10.0.1.5", "2001:db8::1", "2001:db8::2"]
RANGES = ["10.0.0.0/30", "10.0.1.0/24", "2001:db8::/127"]  # each holds some of the addresses above
ORIGINS = ["crowdsec", "cscli", "CAPI", "lists"]
TABLE_SETTINGS = ["", "*", "CAPI,lists"]
RANK = {None: 0, "captcha": 1, "ban": 2}

durations = st.sampled_from([30, 61, 600, 900, 3600, 4 * 3600, 86400])
decision_rows = st.fixed_dictionaries(
    {
        "value": st.sampled_from(ADDRESSES + RANGES),
        "type": st.sampled_from(["ban", "ban", "captcha"]),
        "origin": st.sampled_from(ORIGINS),
        "seconds": durations,
    }
)
# Amounts that sit on either side of the slack and of REFRESH_AHEAD, and any other.
moves = st.one_of(st.sampled_from([1, 30, 59, 60, 61, 120, 899, 900, 901, 3600, 86400]), st.integers(1, 2 * 86400))
changes = st.one_of(
    st.tuples(st.just("refresh"), st.sampled_from([("CAPI",), ("lists",), ("CAPI", "lists"), tuple(ORIGINS)]), moves),
    st.tuples(st.just("earlier"), st.integers(0, 50), moves),
    st.tuples(st.just("new"), decision_rows),
    st.tuples(st.just("lift"), st.integers(0, 50)),
    st.tuples(st.just("remediation"), st.integers(0, 50)),
)
steps = st.lists(
    st.fixed_dictionaries(
        {
            "changes": st.lists(changes, max_size=3),
            "later": st.sampled_from([0, 1, 30, 61, 300, 840, 899, 901, 1800, 3600, 4 * 3600]),
            "table_origins": st.sampled_from([None, None, None, None, *TABLE_SETTINGS]),  # None: as before
        }
    ),
    min_size=1,
    max_size=7,
)


class Lapi:
    """LAPI's decisions, each with its end on the simulated clock; the stand-in is told them as
    LAPI would answer at a moment: the live ones only, counting down."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.next_id = 0

    def add(self, value: str, type: str, origin: str, until: float) -> None:
        self.next_id += 1
        scope = "Range" if "/" in value else "Ip"
        self.rows.append(
            {"id": self.next_id, "value": value, "type": type, "scope": scope, "origin": origin, "until": until}
        )

    def change(self, change: tuple, now: float) -> None:
        what, *how = change
        if what == "new":
            d = how[0]
            self.add(d["value"], d["type"], d["origin"], now + d["seconds"])
        elif what == "refresh":  # CrowdSec deletes and inserts again: a new id, a later end
            origins, seconds = how
            for row in self.rows:
                if row["origin"] in origins and row["until"] > now:
                    self.next_id += 1
                    row["id"], row["until"] = self.next_id, row["until"] + seconds
        elif self.rows:
            row = self.rows[how[0] % len(self.rows)]
            if what == "lift":
                self.rows.remove(row)
                return
            # LAPI never edits a decision: one that ends earlier or turns captcha was deleted and
            # inserted again, so it has a new id (the record's digest of LAPI's answer, which
            # leaves the durations out, relies on it).
            self.next_id += 1
            row["id"] = self.next_id
            if what == "earlier":
                row["until"] -= how[1]
            else:
                row["type"] = "captcha" if row["type"] == "ban" else "ban"

    def answer(self, now: float, offset: float) -> list[dict]:
        """The live decisions, `until` on the stand-in's (real) clock, which lags ours by `offset`."""
        return [{**row, "scenario": "x", "until": row["until"] - offset} for row in self.rows if row["until"] > now]

    def covering(self, address: str) -> list[dict]:
        ip = ipaddress.ip_address(address)
        return [row for row in self.rows if ip in ipaddress.ip_network(row["value"])]


def in_table(row: dict, table_origins: str) -> bool:
    origins = set(table_origins.split(",")) - {""}
    return row["scope"] == "Range" or "*" in origins or row["origin"] in origins


def wanted(lapi: Lapi, address: str, at: float) -> str | None:
    """The remediation LAPI asks for the address at `at`, counting only decisions that end more
    than the slack after it."""
    live = {row["type"] for row in lapi.covering(address) if row["until"] > at + job.EXPIRATION_SLACK + CLOCK_GRAIN}
    return "ban" if "ban" in live else "captcha" if "captcha" in live else None


def verdict(keys: dict, table: job.Intervals | None, address: str, at: float) -> str | None:
    """What the reference Worker does with the address at `at`: its key, the network table, the
    strongest of the two."""
    entry = keys.get("ip:" + address)
    by_key = entry.value if entry is not None and (entry.expiration is None or entry.expiration > at) else None
    by_table = job.networks_verdict(table, address, at) if table is not None else None
    return max(by_key, by_table, key=RANK.__getitem__)


def check(lapi: Lapi, kv: KvStandin, table_origins: str, why: object) -> None:
    now = kv.now()
    live = kv.live()
    keys = {k: e for k, e in live.items() if k.startswith("ip:") and k not in ("ip:networks", "ip:scopes")}
    table = job.decode_networks(live["ip:networks"].value) if "ip:networks" in live else None
    # Enforced now, and until the next run is due at the latest.
    for at in (now, now + job.REFRESH_AHEAD - 5):
        for address in ADDRESSES:
            want, have = wanted(lapi, address, at), verdict(keys, table, address, at)
            assert RANK[have] >= RANK[want], (address, at - now, want, have, why)
    # No key outlives the decisions on its address by more than the slack: its own, or a range's
    # of the same remediation that the network table holds (the key is then left to expire).
    for key, entry in keys.items():
        ends = [row["until"] for row in lapi.covering(key[3:]) if row["scope"] == "Ip" or row["type"] == entry.value]
        assert ends, (key, "a key for an address without a decision", why)
        assert entry.expiration <= max(ends) + job.EXPIRATION_SLACK + CLOCK_GRAIN, (
            key,
            entry.expiration - max(ends),
            why,
        )
    # Nor a table entry the decisions it holds (each remediation's end, for each interval).
    for version, family in ((4, table.v4 if table else []), (6, table.v6 if table else [])):
        for interval in family:
            first = str(ipaddress.ip_address(interval.first) if version == 4 else ipaddress.IPv6Address(interval.first))
            for remediation, end in (("ban", interval.ban), ("captcha", interval.captcha)):
                if end <= now:
                    continue
                ends = [
                    row["until"]
                    for row in lapi.covering(first)
                    if row["type"] == remediation and in_table(row, table_origins)
                ]
                assert ends and end <= max(ends) + job.EXPIRATION_SLACK + CLOCK_GRAIN, (first, remediation, why)


def ban(value: str, seconds: int, origin: str = "CAPI") -> dict:
    return {"value": value, "type": "ban", "origin": origin, "seconds": seconds}


def step(*changes: tuple, later: int = 0, table_origins: str | None = None) -> dict:
    return {"changes": list(changes), "later": later, "table_origins": table_origins}


DUE_LATER = [step(later=1800), step(later=901), step(later=61)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(decision_rows, min_size=1, max_size=10),
    steps,
    st.sampled_from([None, 900, 86400]),  # STATE_FILE unset, or set with this AUDIT_INTERVAL
    st.sampled_from(TABLE_SETTINGS),
)
# A refreshed key is left alone only while it is more than REFRESH_AHEAD from expiring.
@example([ban("10.0.0.1", 600)], [step(("refresh", ("CAPI",), 3600))], None, "")
# Likewise a table entry; and with a record, the time either comes due is kept: a run on the same
# LAPI answer after it (here at 2,701 s, the old end at 3,600 s, no audit meanwhile) rewrites it.
@example([ban("10.0.0.1", 3600)], [step(("refresh", ("CAPI",), 3600)), *DUE_LATER], 86400, "CAPI,lists")
@example([ban("10.0.0.1", 3600)], [step(("refresh", ("CAPI",), 3600)), *DUE_LATER], 86400, "")
# A key the table now holds is left to expire only if it does not outlive the table's entry.
@example([ban("10.0.0.1", 3600)], [step(("earlier", 0, 1800), table_origins="CAPI,lists")], None, "")
def test_after_every_run_what_lapi_wants_is_enforced_and_nothing_outlives_its_decision(
    first, sequence, audit_interval, table_origins
):
    with fresh_stack() as (stack, tmp):
        lapi_standin, kv = stack.lapi, stack.kv
        env = {"PUSHGATEWAY_URL": ""}
        if audit_interval is not None:
            env.update(STATE_FILE=str(Path(tmp) / "record"), AUDIT_INTERVAL=str(audit_interval))
        lapi, offset = Lapi(), 0.0
        for d in first:
            lapi.add(d["value"], d["type"], d["origin"], time.time() + d["seconds"])
        for n, step in enumerate([{"changes": [], "later": 0, "table_origins": None}, *sequence]):
            offset += step["later"]
            kv.clock_offset = offset
            now = time.time() + offset
            for change in step["changes"]:
                lapi.change(change, now)
            table_origins = step["table_origins"] if step["table_origins"] is not None else table_origins
            lapi_standin.decisions = lapi.answer(now, offset)
            result = stack.run(clock_offset=offset, TABLE_ORIGINS=table_origins, **env)
            assert result.code == 0, (n, result.err)
            check(lapi, kv, table_origins, (n, step, result.out))
        assert kv.violations == []


def test_a_key_left_to_expire_outlives_its_decision_by_no_more_than_the_slack(stack):
    """A key the network table now holds is left to expire while its expiration is within the
    slack of the table's end; the table's end may itself stand within the slack of the decision's.
    Two ends moved earlier by under the slack each must not let the key outlive its decision by
    more than the slack."""
    end = time.time() + 7200
    stack.lapi.decisions = [{"value": "192.0.2.1", "type": "ban", "scope": "Ip", "origin": "CAPI", "until": end}]
    assert stack.run().code == 0  # TABLE_ORIGINS unset: a key, expiring at `end`
    key_expires = stack.kv.live()["ip:192.0.2.1"].expiration
    for n, earlier in enumerate((50, 100), 1):  # re-inserted twice, each time ending 50 s earlier
        stack.lapi.decisions = [{**stack.lapi.decisions[0], "id": 100 + n, "until": end - earlier}]
        result = stack.run(TABLE_ORIGINS="CAPI")
        assert result.code == 0, result.err
    live = stack.kv.live()
    assert "ip:networks" in live
    if "ip:192.0.2.1" in live:  # left to expire: by no more than the slack past its decision's end
        assert live["ip:192.0.2.1"].expiration == key_expires
        assert key_expires <= end - 100 + job.EXPIRATION_SLACK + CLOCK_GRAIN, key_expires - (end - 100)
