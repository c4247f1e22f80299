"""The pure parts of the state file and the leaner core, against straightforward versions."""

from __future__ import annotations

import ast
import dataclasses
import gzip
import inspect
import ipaddress
import json
import math
import time
import tracemalloc
import zlib
from collections import Counter
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lapi_kv_sync as job
from tests.conftest import UNDER_MUTATION
from tests.standins import decision
from tests.test_tables import plain_entry

NOW = 1_800_000_000.0
CONFIG = job.Config(cf_account_id="a" * 32, cf_namespace_id="b" * 32, cf_api_token="t", state_file="/s/record")


def record(keys=None, **changes) -> job.Record:
    fields = dict(
        account=CONFIG.cf_account_id,
        namespace=CONFIG.cf_namespace_id,
        prefix="ip:",
        audited_at=NOW - 100,
        clock_offset=2.5,
        usage_metrics_sent_at=None,
        keys=keys if keys is not None else {"ip:192.0.2.1": job.Present(NOW + 3600, "ban")},
    )
    return job.Record(**{**fields, **changes})


# --------------------------------------------------------------------------- absurd durations, the TTL cap


@pytest.mark.parametrize("text", ["9" * 400 + "h", "9" * 400 + "s", "9" * 30 + "m", "2562048h", "1e400s"])
def test_durations_past_what_go_can_hold_are_not_durations(text):
    with pytest.raises(ValueError):
        job.parse_go_duration(text)


def test_an_absurd_duration_is_invalid_and_the_other_bans_are_kept():
    rows = [{**decision("192.0.2.1"), "duration": "9" * 400 + "h"}, {**decision("192.0.2.2"), "duration": "4h"}]
    projection = job.project(rows, NOW, "ip:")
    assert list(projection.wanted) == ["ip:192.0.2.2"] and projection.ignored == Counter(invalid=1)


def test_ttl_is_capped_at_a_year_and_a_capped_key_is_rewritten_as_it_comes_due():
    wanted = {"ip:192.0.2.1": job.Wanted("ban", NOW + 10 * job.MAX_TTL, "o", "s")}
    plan = job.make_plan(wanted, {}, NOW)
    assert [w.ttl for w in plan.writes] == [job.MAX_TTL]
    written = {"ip:192.0.2.1": job.Present(NOW + job.MAX_TTL, "ban")}
    for days in (0, 1, 29, 364):
        assert job.make_plan(wanted, written, NOW + days * 86400).writes == []
    assert len(job.make_plan(wanted, written, NOW + job.MAX_TTL - job.REFRESH_AHEAD).writes) == 1


def test_a_run_survives_an_absurd_duration(stack):
    stack.lapi.decisions = [
        {"value": "192.0.2.1", "type": "ban", "scope": "Ip", "duration": "9" * 400 + "h", "origin": "o"},
        {"value": "192.0.2.2", "type": "ban", "scope": "Ip", "duration": "87600h", "origin": "o"},
        decision("192.0.2.3", 3600),
    ]
    result = stack.run()
    assert result.code == 0, result.err
    assert "invalid 1" in result.out
    live = stack.kv.live()
    assert sorted(live) == ["ip:192.0.2.2", "ip:192.0.2.3"]
    assert abs(live["ip:192.0.2.2"].expiration - (time.time() + job.MAX_TTL)) < 10
    stack.kv.reset_counts()
    assert stack.run().code == 0 and stack.kv.writes == 0


# --------------------------------------------------------------------------- the projection, against the plain version


def plain_merge(old, new):
    if old is None:
        return new
    rank = {"ban": 2, "captcha": 1}
    strongest = max(old, new, key=lambda w: (rank[w.remediation], w.end))
    return strongest._replace(end=max(old.end, new.end))


def plain_network(value):
    """A Range decision's network as (version, first, last), the obvious way: as plain_entry makes
    it canonical; ValueError (TooBroad) as it does."""
    network = ipaddress.ip_network(plain_entry("range", value))
    return network.version, int(network.network_address), int(network.broadcast_address)


def plain_project(decisions, read_at, prefix, expand_ranges_max=0, tables=False, table_origins=frozenset()):
    """The projection written the obvious way: as the job did before it was made lean, and with
    the tables' entries."""
    wanted, ignored, scopes, networks = {}, Counter(), {}, {}
    for raw in decisions:
        fields = ("scope", "type", "origin", "scenario")
        if not isinstance(raw, dict) or any(isinstance(raw.get(f), (list, dict)) for f in fields):
            ignored["invalid"] += 1
            continue
        text = {f: raw[f] if isinstance(raw.get(f), str) else "" for f in fields}
        row = SimpleNamespace(value=raw.get("value"), duration=raw.get("duration"), **text)
        scope, remediation = row.scope.lower(), row.type.lower()
        table_scope = tables and scope in ("range", "country", "as")
        if not table_scope and (scope not in ("ip", "range") or scope == "range" and not expand_ranges_max):
            ignored["scope"] += 1
            continue
        if remediation not in ("ban", "captcha"):
            ignored["type"] += 1
            continue
        try:
            remaining = job.parse_go_duration(row.duration)
        except (TypeError, ValueError):
            ignored["invalid"] += 1
            continue
        if remaining <= 0:
            ignored["expired"] += 1
            continue
        new = job.Wanted(remediation, read_at + remaining, row.origin, row.scenario)
        if table_scope:
            try:
                if scope == "range":
                    entry = (*plain_network(row.value), remediation)
                    networks[entry] = plain_merge(networks.get(entry), new)
                else:
                    entry = (scope, plain_entry(scope, row.value))
                    scopes[entry] = plain_merge(scopes.get(entry), new)
            except job.TooBroad:
                ignored["range_too_large"] += 1
                continue
            except ValueError:
                ignored["invalid"] += 1
                continue
            if scope != "range" or not expand_ranges_max:
                continue
        try:
            if scope == "ip":
                if not isinstance(row.value, str) or "%" in row.value:
                    raise ValueError
                address = ipaddress.ip_address(row.value)
                address = getattr(address, "ipv4_mapped", None) or address
                if tables and ("*" in table_origins or row.origin in table_origins):
                    entry = (address.version, int(address), int(address), remediation)
                    networks[entry] = plain_merge(networks.get(entry), new)
                    continue
                addresses = [str(address)]
            else:
                if not isinstance(row.value, str):
                    raise ValueError
                network = ipaddress.ip_network(row.value, strict=False)
                if network.version != 4 or network.num_addresses > expand_ranges_max:
                    if not table_scope:  # in the table, so not left out
                        ignored["range_too_large"] += 1
                    continue
                addresses = [str(a) for a in network]
        except ValueError:
            ignored["invalid"] += 1
            continue
        for address in addresses:
            key = prefix + address
            if len(key.encode()) > 512:
                ignored["invalid"] += 1
                continue
            wanted[key] = plain_merge(wanted.get(key), new)
    return job.Projection(wanted, ignored, scopes, networks)


# What may stand where LAPI puts a string: nothing at all, or any other JSON value.
not_strings = st.one_of(st.none(), st.integers(), st.booleans(), st.floats(), st.lists(st.none()), st.just({}))


def odd_fields(row):
    """The row with some fields left out or holding something other than a string."""
    names = sorted(row)
    return st.tuples(
        st.sets(st.sampled_from(names), max_size=1), st.dictionaries(st.sampled_from(names), not_strings, max_size=1)
    ).map(lambda drop_and_odd: {**{k: v for k, v in row.items() if k not in drop_and_odd[0]}, **drop_and_odd[1]})


rows = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {
                "value": st.one_of(
                    st.sampled_from(["192.0.2.1", "::ffff:192.0.2.1", "2001:0DB8::1", "192.0.2.0/30", "x", "01.2.3.4"]),
                    st.sampled_from(["192.0.2.5/30", "::ffff:192.0.2.0/126", "2001:db8::/64", "fr", "AS64500", "0"]),
                    st.ip_addresses().map(str),
                    st.none(),
                    st.integers(),
                ),
                "duration": st.one_of(
                    st.sampled_from(["4h", "3h59m58.3s", "-3s", "0", "1.5h", "45s", "9" * 400 + "h", "junk", "2ms"]),
                    st.floats(-100, 10**6).map(lambda f: f"{f:.3f}s"),
                    st.none(),
                ),
                "type": st.sampled_from(["ban", "Ban", "captcha", "throttle", ""]),
                "scope": st.sampled_from(["Ip", "ip", "IP", "Range", "Country", "AS"]),
                "origin": st.sampled_from(["crowdsec", "cscli"]),
                "scenario": st.sampled_from(["a", "b"]),
            },
        ).flatmap(odd_fields),
        st.sampled_from([None, 1, "text", []]),
    ),
    max_size=40,
)


@given(
    rows,
    st.sampled_from([0, 4]),
    st.sampled_from(["ip:", "x" * 480]),
    st.booleans(),
    st.sampled_from([frozenset(), frozenset({"crowdsec"}), frozenset({"*"})]),
)
def test_the_lean_projection_equals_the_plain_one(decisions, expand, prefix, tables, table_origins):
    # a one-pass iterator, as a stream is
    lean = job.project(iter(decisions), NOW, prefix, expand, tables, table_origins)
    plain = plain_project(decisions, NOW, prefix, expand, tables, table_origins)
    assert lean.wanted == plain.wanted
    assert lean.scopes == plain.scopes
    assert lean.networks == plain.networks
    assert +lean.ignored == +plain.ignored


def test_projection_reads_its_rows_once_and_lets_a_reader_failure_through():
    def stream():
        yield decision("192.0.2.1")
        raise job.LapiUnreadable("the answer broke off")

    with pytest.raises(job.LapiUnreadable):
        job.project(stream(), NOW, "ip:")


# --------------------------------------------------------------------------- the record


keys_strategy = st.dictionaries(
    st.one_of(
        st.ip_addresses().map(lambda a: f"ip:{a}"),
        st.text(min_size=0, max_size=12).map(lambda t: "ip:" + t),
        st.sampled_from(['ip:"quoted', "ip:a\nb", "ip:tab\there", "ip:\r"]),
    ),
    st.builds(
        job.Present,
        st.one_of(st.none(), st.integers(int(NOW) - 1000, int(NOW) + 10**8)),
        st.sampled_from(["ban", "captcha", None]),
    ),
    max_size=30,
)


@given(keys_strategy, st.one_of(st.none(), st.floats(0, 2e9)))
def test_a_record_reads_back_as_written_less_what_expired(keys, sent_at):
    original = record(keys, usage_metrics_sent_at=sent_at)
    text = "".join(job.encode_record(original, NOW))
    back = job.decode_record(line + "\n" for line in text.split("\n")[:-1])  # as a file splits it
    alive = {k: p for k, p in keys.items() if p.expiration is None or p.expiration > NOW}
    assert back == original._replace(keys=alive)


def test_a_record_split_only_on_newlines_reads_back(tmp_path):
    original = record({"ip:a\rb": job.Present(None, None), "ip:c\u2028d": job.Present(int(NOW) + 5, "ban")})
    path = tmp_path / "r"
    path.write_text("".join(job.encode_record(original, NOW)), encoding="utf-8", newline="\n")
    with open(path, encoding="utf-8", newline="\n") as f:
        assert job.decode_record(f) == original


@pytest.mark.parametrize(
    "lines",
    [
        [],
        ["junk\n"],
        ['{"kind": "lapi-kv-sync state", "format": 2}\n'],
        ['{"kind": "something else", "format": 1}\n'],
        ['{"kind": "lapi-kv-sync state", "format": 1, "account": "a"}\n'],
    ],
)
def test_what_is_not_a_whole_record_is_corrupt(lines):
    with pytest.raises(job.RecordCorrupt):
        job.decode_record(lines)


@pytest.mark.parametrize(
    "column, bad",
    [
        (1, '["ip:10.0.0.0","ip:10.0.0.1"]\n'),  # a key short
        (1, '["ip:10.0.0.0","ip:10.0.0.1","ip:10.0.0.1"]\n'),  # a key twice
        (1, '["ip:10.0.0.0","ip:10.0.0.1","other:10.0.0.2"]\n'),  # a key outside the prefix
        (1, '["ip:10.0.0.0","ip:10.0.0.1",3]\n'),  # not a string
        (1, '{"ip:10.0.0.0": 1}\n'),
        (2, "[1,2]\n"),
        (2, '[1,2,"3"]\n'),
        (2, "[1,2,3.5]\n"),
        (2, "[1,2,\n"),
        (3, "bb\n"),
        (3, "bbx\n"),
    ],
)
def test_a_record_with_a_column_cut_or_wrong_is_corrupt(column, bad):
    lines = list(job.encode_record(record({f"ip:10.0.0.{i}": job.Present(int(NOW) + 9, "ban") for i in range(3)}), 0))
    assert job.decode_record(lines).keys  # as written, it reads
    with pytest.raises(job.RecordCorrupt):
        job.decode_record(lines[:column] + [bad] + lines[column + 1 :])
    with pytest.raises(job.RecordCorrupt):
        job.decode_record(lines[:column])  # cut short
    with pytest.raises(job.RecordCorrupt):
        job.decode_record([*lines, "more\n"])


def three_keys() -> list[str]:
    keys = {f"ip:10.0.0.{i}": job.Present(int(NOW) + 9, "ban") for i in range(3)}
    figures = job.Projected(3, {"ban": 3}, {})
    return list(job.encode_record(record(keys, lapi_digest="d" * 40, projected=figures, due_at=NOW), 0))


def with_header(**changes) -> list[str]:
    lines = three_keys()
    return [json.dumps({**json.loads(lines[0]), **changes}) + "\n", *lines[1:]]


def with_column(column: int, text: str) -> list[str]:
    lines = three_keys()
    return [*lines[:column], text, *lines[column + 1 :]]


NOT_WHOLE = "the key columns are not whole"


@pytest.mark.parametrize(
    "lines, says",
    [
        ([], "not a lapi-kv-sync state record"),
        (["junk\n"], "not a lapi-kv-sync state record"),
        (with_header(format=1), "format 1, this version reads 2"),
        (with_header(keys="three"), "header lacks a field or holds a wrong type"),
        (with_header(due_at=math.inf), "header lacks a field or holds a wrong type"),
        (with_header(audited_at=math.inf), "header holds a number out of range"),
        (with_header(clock_offset=math.nan), "header holds a number out of range"),
        ([*three_keys(), "more\n"], f"{NOT_WHOLE} (more lines than the header says)"),
        (
            with_column(1, '{"ip:10.0.0.0":1,"ip:10.0.0.1":1,"ip:10.0.0.2":1}\n'),
            f"{NOT_WHOLE} (not as many keys as the header says)",
        ),
        (with_column(2, '{"a":1,"b":2,"c":3}\n'), f"{NOT_WHOLE} (not as many keys as the header says)"),
        (with_column(3, "bb\n"), f"{NOT_WHOLE} (columns of different lengths)"),
        (with_column(2, "[1,2,3.5]\n"), f"{NOT_WHOLE} (an expiration that is not a whole number)"),
        (with_column(1, '["ip:10.0.0.0","ip:10.0.0.1","other:10.0.0.2"]\n'), f"{NOT_WHOLE} (a key outside the prefix)"),
        (with_column(1, '["ip:10.0.0.0","ip:10.0.0.1","ip:10.0.0.1"]\n'), "a key appears twice"),
        # An error without words is named by its type: a record cut short, an unknown remediation.
        (three_keys()[:3], f"{NOT_WHOLE} (StopIteration)"),
        (with_column(3, "bbz\n"), f"{NOT_WHOLE} ('z')"),
    ],
)
def test_a_corrupt_record_says_what_is_wrong(lines, says):
    # The warning of the run that audits because of it quotes this.
    assert job.decode_record(three_keys()).due_at == NOW  # whole, it reads
    with pytest.raises(job.RecordCorrupt) as caught:
        job.decode_record(lines)
    assert str(caught.value) == says


def header_line(length: int | None = None, **fields) -> bytes:
    """A record's header line (its newline included), padded to `length` bytes."""
    header = {**json.loads(three_keys()[0]), "keys": 0, **fields}
    line = json.dumps(header, separators=(",", ":")) + "\n"
    if length is not None:
        line = (
            json.dumps({**header, "pad": "x" * (length - len(line) - len(',"pad":""'))}, separators=(",", ":")) + "\n"
        )
    assert length is None or len(line) == length
    return line.encode()


def gzip_of(text: bytes) -> bytes:
    return gzip.compress(text, mtime=0)


def unpacking_says(packed: bytes, limit: int = 1 << 30) -> str:
    with pytest.raises(job.RecordCorrupt) as caught:
        job.unpacked_record(packed, limit)
    return str(caught.value)


def test_a_record_unpacks_to_at_most_what_its_header_allows():
    whole = "".join(three_keys()).encode()
    assert job.unpacked_record(gzip_of(whole), 1 << 30) == whole
    # Each key and recent change at its longest, and 64 bytes, after the header.
    for keys, recent in [(0, 0), (2, 0), (0, 3), (1, 1), (100, 10)]:  # the last past the first 64 KiB read
        head = header_line(keys=keys, recent=recent)
        most = len(head) + keys * (job.MAX_NAME_JSON + 23) + recent * job.MAX_RECENT_JSON + 64
        at_most = head + b"x" * (most - len(head))
        assert job.unpacked_record(gzip_of(at_most), 1 << 30) == at_most
        assert unpacking_says(gzip_of(at_most + b"x")) == f"unpacks to more than its header allows ({most} bytes)"
        assert job.unpacked_record(gzip_of(at_most), most) == at_most
        assert (
            unpacking_says(gzip_of(at_most), most - 1) == f"unpacks to more than its header allows ({most - 1} bytes)"
        )


@pytest.mark.parametrize("head", [b"", header_line()])
def test_a_bomb_is_found_out_without_being_unpacked(head):
    """32 MiB of spaces from 32 KiB of gzip, with no header line or after one: refused having
    unpacked at most what the header allows (tracemalloc counts bytes, not time)."""
    pack = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = pack.compress(head) + b"".join(pack.compress(b" " * (1 << 20)) for _ in range(32)) + pack.flush()
    tracemalloc.start()
    try:
        with pytest.raises(job.RecordCorrupt):
            job.unpacked_record(bomb, 1 << 30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_a_header_line_is_found_in_the_first_64_kib_or_not_at_all():
    at_most = header_line(job.MAX_HEADER_BYTES + 1)  # the newline at offset MAX_HEADER_BYTES
    assert job.unpacked_record(gzip_of(at_most), 1 << 30) == at_most
    assert unpacking_says(gzip_of(header_line(job.MAX_HEADER_BYTES + 2))) == "no header line in its first 64 KiB"
    assert unpacking_says(gzip_of(b"no newline")) == "no header line in its first 64 KiB"
    assert unpacking_says(gzip_of(b"")) == "no header line in its first 64 KiB"


@pytest.mark.parametrize(
    ("packed", "says"),
    [
        (gzip_of(header_line(keys="3")), "header lacks a field or holds a wrong type"),
        (gzip_of(header_line(keys=-1)), "header lacks a field or holds a wrong type"),
        (gzip_of(header_line(recent=-1)), "header lacks a field or holds a wrong type"),
        (gzip_of(header_line(recent=1.0)), "header lacks a field or holds a wrong type"),
        (gzip_of(b"{}\n"), "not a lapi-kv-sync state record"),
        (gzip_of(header_line(format=1)), "format 1, this version reads 2"),
        (gzip_of(header_line()) + gzip_of(header_line()), "not one whole gzip member"),
        (gzip_of(header_line()) + b"\0", "not one whole gzip member"),
        (gzip_of(header_line())[:-1], "not one whole gzip member"),
        (header_line(), "not gzip (Error -3 while decompressing data: incorrect header check)"),
        (zlib.compress(header_line()), "not gzip (Error -3 while decompressing data: incorrect header check)"),
        (gzip_of(b"\n" + header_line()), "not a lapi-kv-sync state record"),  # an empty first line
    ],
)
def test_a_record_file_that_is_not_one_gzip_member_with_a_header_says_so(packed, says):
    assert unpacking_says(packed) == says


def test_a_header_counts_two_whole_numbers_from_zero():
    assert job.record_counts({"keys": 0}) == (0, 0, 0)
    assert job.record_counts({"keys": 5, "recent": 2}) == (5, 2, 0)
    # And the tables' values in base64, a line each: 16 bytes are 24 characters and a newline.
    tables = [["networks", "a" * 32, 1800000000, 16], ["scopes", "b" * 32, None, None]]
    assert job.record_counts({"keys": 0, "documents": tables}) == (0, 0, 25)
    for header in [
        {"keys": True},
        {"keys": 1, "recent": False},
        {"keys": 1.0},
        {"keys": 1, "recent": -1},
        {"keys": -1},
    ]:
        with pytest.raises(ValueError, match="^a count that is not a whole number$"):
            job.record_counts(header)


def test_a_records_text_splits_on_newlines_only():
    assert list(job.text_lines(b"a\nb\r\x0bc\n\nd")) == ["a\n", "b\r\x0bc\n", "\n", "d"]
    assert list(job.text_lines(b"")) == [] and list(job.text_lines(b"\n")) == ["\n"]
    assert list(job.text_lines(b"\nx")) == ["\n", "x"]  # a newline first
    with pytest.raises(UnicodeDecodeError):
        list(job.text_lines(b"ok\n\xff\n"))


@pytest.mark.parametrize(
    ("documents", "read"),
    [
        ([], []),
        ([["networks", "a" * 32, 1800000000, 16]], [("networks", "a" * 32, 1800000000, 16)]),
        ([["scopes", "a" * 32, 1800000000, None]], [("scopes", "a" * 32, 1800000000, None)]),
        ([["scopes", None, None, None]], [("scopes", None, None, None)]),
    ],
)
def test_the_tables_keys_read_from_a_header(documents, read):
    assert job.recorded_documents(documents) == read


@pytest.mark.parametrize(
    "documents",
    [
        [["scopes", "A" * 32, 1, None]],
        [["scopes", "a" * 31, 1, None]],
        [["scopes", "a" * 32, 1.0, None]],
        [["scopes", "a" * 32, True, None]],
        [["scopes", 1, 1, None]],
        [["scopes", "a" * 32, 1]],
        [["ranges", "a" * 32, 1, None]],  # not a table's name
        [["scopes", "a" * 32, 1, None], ["scopes", "a" * 32, 1, None]],  # twice
        [["scopes", None, 1, 16]],  # a value without its digest
        [["scopes", "a" * 32, 1, 0]],
        [["scopes", "a" * 32, 1, "16"]],
        "ab",
        3,
        None,
    ],
)
def test_a_tables_key_of_another_shape_is_refused(documents):
    with pytest.raises((TypeError, ValueError)):
        job.recorded_documents(documents)


def test_the_tables_figures_name_a_scope_and_a_remediation():
    assert job.table_figures({"network:ban": 2, "country:captcha": "1", "as:ban": 0}) == {
        "network:ban": 2,
        "country:captcha": 1,
        "as:ban": 0,
    }
    for bad in [{"ip:ban": 1}, {"network:log": 1}, {"network": 1}, {"network:ban:x": 1}, {"range:ban": 1}]:
        with pytest.raises(ValueError):
            job.table_figures(bad)
    with pytest.raises(TypeError):
        job.table_figures([])


# --------------------------------------------------------------------------- when to audit


@pytest.mark.parametrize(
    "loaded, config, requested, reason",
    [
        (job.Loaded(record(), None), job.Config("a", "b", "t"), False, "no_state_file"),
        (job.Loaded(None, "no_record"), CONFIG, False, "no_record"),
        (job.Loaded(None, "unreadable", "x"), CONFIG, True, "unreadable"),
        (job.Loaded(record(), "unfinished"), CONFIG, False, "unfinished"),
        (job.Loaded(record(namespace="c" * 32), None), CONFIG, False, "foreign"),
        (job.Loaded(record(account="c" * 32), None), CONFIG, False, "foreign"),
        (job.Loaded(record(prefix="cs/"), None), CONFIG, False, "foreign"),
        (job.Loaded(record(), None), CONFIG, True, "requested"),
        (job.Loaded(record(audited_at=NOW - 900), None), CONFIG, False, "interval"),
        (job.Loaded(record(audited_at=NOW + 60), None), CONFIG, False, "interval"),  # the clock went back
        (
            job.Loaded(record(), None),
            job.Config("a" * 32, "b" * 32, "t", state_file="s", audit_interval=0),
            False,
            "interval",
        ),
        (job.Loaded(record(audited_at=NOW - 899), None), CONFIG, False, None),
    ],
)
def test_audit_reasons(loaded, config, requested, reason):
    found, words = job.audit_reason(loaded, config, NOW, requested)
    assert found == reason and words
    assert (found in job.TRUSTED_AUDITS) == (reason in (None, "requested", "interval"))
    assert found is None or found in job.AUDIT_REASONS


def test_audit_reasons_say_why_in_words():
    def reason(loaded, config=CONFIG, requested=False):
        return job.audit_reason(loaded, config, NOW, requested)

    assert reason(job.Loaded(record(), None), job.Config("a", "b", "t")) == (
        "no_state_file",
        "every run without STATE_FILE",
    )
    assert reason(job.Loaded(None, None)) == ("no_record", "no record yet")
    assert reason(job.Loaded(None, "unreadable", "record unreadable (x)")) == ("unreadable", "record unreadable (x)")
    assert reason(job.Loaded(record(account="c" * 32, prefix="cs/"), None))[1] == (
        "record written for another CF_ACCOUNT_ID, KV_KEY_PREFIX"
    )
    assert reason(job.Loaded(record(namespace="c" * 32), None))[1] == "record written for another CF_KV_NAMESPACE_ID"
    assert reason(job.Loaded(record(), None), requested=True)[1] == "--audit, last audit 100s ago"
    assert reason(job.Loaded(record(audited_at=NOW - 900.4), None))[1] == "last audit 900s ago, AUDIT_INTERVAL=900"
    assert reason(job.Loaded(record(), None)) == (None, "record trusted, last audit 100s ago")
    assert reason(job.Loaded(record(audited_at=NOW), None)) == (None, "record trusted, last audit 0s ago")  # just now


# --------------------------------------------------------------------------- a record no run will trust again


@given(
    audited=st.floats(-3000, 0),
    settling=st.none() | st.floats(-600, 600),
    recent=st.lists(st.integers(-600, 100), max_size=3),
    interval=st.sampled_from([0.0, 60.0, 900.0]),
    offset=st.floats(-5, 5),
    after=st.floats(0, 5000),
)
def test_no_run_uses_a_record_past_record_trusted_until_and_one_would_just_before(
    audited, settling, recent, interval, offset, after
):
    """What a read-only volume's run relies on to change KV: from record_trusted_until on, no run
    plans against the record (audit_reason) nor lays its recent changes over a listing (converge's
    `lately`), as long as the clock does not go back; a moment earlier, one would."""
    found = record(
        audited_at=NOW + audited,
        clock_offset=offset,
        settling_until=None if settling is None else NOW + settling,
        recent={f"ip:192.0.2.{i}": int(NOW + r) for i, r in enumerate(recent)},
    )
    config = dataclasses.replace(CONFIG, audit_interval=interval)
    until = job.record_trusted_until(found, True, config)
    assert math.isfinite(until)

    def used_at(t: float) -> bool:
        since = t + found.clock_offset - job.KV_LIST_LAG
        lately = [at for at in found.recent_changes().values() if at > since]
        return job.audit_reason(job.Loaded(found, None), config, t, False)[0] is None or bool(lately)

    assert not used_at(until + after)
    if until - 0.5 >= found.audited_at:  # before the last audit the clock went back: an audit anyway
        assert used_at(until - 0.5)


def test_a_record_no_run_can_read_or_trust_is_trusted_until_never_and_one_unread_until_ever():
    assert job.record_trusted_until(None, False, CONFIG) == -math.inf  # none, or not a record
    assert job.record_trusted_until(None, True, CONFIG) == math.inf  # cannot be read now: perhaps later
    for foreign in ({"account": "c" * 32}, {"namespace": "c" * 32}, {"prefix": "cs:"}):
        assert job.record_trusted_until(record(**foreign), True, CONFIG) == -math.inf
    assert job.record_trusted_until(record(), True, CONFIG) == NOW - 100 + 900


# --------------------------------------------------------------------------- applying confirmed results


write = st.builds(
    job.Write,
    st.sampled_from([f"ip:10.0.0.{i}" for i in range(8)]),
    st.sampled_from(["ban", "captcha"]),
    st.integers(60, 10**6),
    st.just("o"),
    st.just("s"),
)
names = st.lists(st.sampled_from([f"ip:10.0.0.{i}" for i in range(8)]), max_size=8)


@given(
    st.dictionaries(
        st.sampled_from([f"ip:10.0.0.{i}" for i in range(8)]),
        st.builds(job.Present, st.integers(), st.sampled_from(["ban", None])),
    ),
    st.lists(st.tuples(st.lists(write, max_size=4), st.floats(NOW - 10, NOW)), max_size=3),
    names,
    names,
    names,
)
def test_the_record_after_apply_claims_only_what_cloudflare_confirmed(before, written, deleted, in_flight, uncertain):
    ledger = job.Ledger(written, [(deleted, NOW - 5)], in_flight, uncertain)
    after = job.record_after(before, ledger, offset=3.0)
    unknown = set(in_flight) | set(uncertain)
    confirmed_writes = {w.key: (w, at) for chunk, at in written for w in chunk}
    for key in set(before) | set(after) | set(confirmed_writes) | set(deleted):
        if key in unknown:
            assert after[key] == job.Present(None, None)  # the next plan rewrites or deletes it
        elif key in deleted:
            assert key not in after
        elif key in confirmed_writes:
            w, at = confirmed_writes[key]
            assert after[key].remediation == w.remediation
            assert at + 3.0 + w.ttl - 1 < after[key].expiration <= at + 3.0 + w.ttl  # never later than Cloudflare's
        else:
            assert after.get(key) == before.get(key)
    assert before == {k: v for k, v in before.items()}  # untouched


@given(
    st.dictionaries(
        st.sampled_from([f"ip:10.0.0.{i}" for i in range(8)]),
        st.builds(
            job.Present,
            st.one_of(st.none(), st.integers(int(NOW) - 100, int(NOW) + 100)),
            st.sampled_from(["ban", None]),
        ),
    )
)
def test_expired_keys_in_a_record_are_gone(present):
    plan = job.make_plan({}, present, NOW, offset=0)
    assert set(plan.deletes) == {k for k, p in present.items() if p.expiration is None or p.expiration > NOW}


# --------------------------------------------------------------------------- LAPI's answer, less its durations


def answer_digest(chunks, config=CONFIG) -> str:
    digest = job.AnswerDigest(config)
    assert b"".join(digest.passing(chunks)) == b"".join(chunks)  # passed on as they came
    return digest.hexdigest()


def lapi_answer(durations, compact=True, **change) -> bytes:
    rows = [
        {
            "duration": d,
            "id": i,
            "origin": "crowdsec",
            "scenario": "s",
            "scope": "Ip",
            "type": "ban",
            "value": f"192.0.2.{i}",
        }
        for i, d in enumerate(durations)
    ]
    rows[0].update(change)
    # As Go writes it: `µ` as it is, not escaped.
    text = (
        json.dumps(rows, separators=(",", ":"), ensure_ascii=False)
        if compact
        else json.dumps(rows, indent=4, ensure_ascii=False)
    )
    return text.encode()


go_durations = st.one_of(
    st.floats(-10, 10**7).map(lambda f: job_go_duration(f)), st.sampled_from(["0s", "4h", "1.5ms", "500µs", "3μs"])
)


def job_go_duration(seconds: float) -> str:
    from tests.standins import go_duration

    return go_duration(seconds)


@given(st.lists(go_durations, min_size=1, max_size=20), st.data(), st.booleans())
def test_the_digest_ignores_durations_and_how_the_answer_was_cut(durations, data, compact):
    body = lapi_answer(durations, compact)
    later = lapi_answer([job_go_duration(3) for _ in durations], compact)  # the same decisions, later
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=12)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    assert (
        answer_digest(pieces)
        == answer_digest([body])
        == answer_digest([later[i : i + 7] for i in range(0, len(later), 7)])
    )


@pytest.mark.parametrize(
    "change",
    [
        {"value": "192.0.2.99"},
        {"type": "captcha"},
        {"scope": "Range"},
        {"origin": "cscli"},
        {"scenario": "t"},
        {"id": 77},
        {"duration": "4h<b>"},  # not a Go duration: not blanked, so never taken for the last one
        {"duration": "bogus"},
        {"duration": ""},
        {"duration": "4hh"},
        {"duration": "9" * 41 + "s"},
        {"until": "2026-11-27T10:00:00Z"},
    ],
)
def test_the_digest_changes_with_anything_but_a_duration(change):
    assert answer_digest([lapi_answer(["4h"] * 3, **change)]) != answer_digest([lapi_answer(["4h"] * 3)])


@pytest.mark.parametrize("size", [1, 7, 64, 383, 1000])
def test_the_digest_of_rows_longer_than_a_duration_field_ignores_the_chunks_too(size):
    # Rows far apart (a long scenario): a field cut by a chunk's end is the only one held back.
    body = lapi_answer(["3h59m58.349167242s"] * 4, scenario="s" * 2000)
    later = lapi_answer(["3h58m1.5s"] * 4, scenario="s" * 2000)
    assert answer_digest([body[i : i + size] for i in range(0, len(body), size)]) == answer_digest([later])


@pytest.mark.parametrize("junk", [("1" * 20 + "h") * 6 + "x", "1" * 20 + "." + "1" * 20 + "x"])
def test_the_digest_takes_no_time_over_a_duration_that_is_almost_a_go_duration(junk):
    # Each number could be split two ways ([0-9]*, an optional dot, [0-9]+): six groups of 20
    # digits cost the blanking 20^6 tries, ten seconds (eight, hours), with no deadline or signal
    # able to stop it. LAPI's answer with a trusted record is digested whole before it is decoded.
    started = time.monotonic()
    assert answer_digest([lapi_answer([junk] * 2)]) != answer_digest([lapi_answer(["4h"] * 2)])
    assert time.monotonic() - started < 1


def test_the_digest_changes_with_a_decision_more_or_less_and_with_what_shapes_the_keys():
    three, two = lapi_answer(["4h"] * 3), lapi_answer(["4h"] * 2)
    assert answer_digest([three]) != answer_digest([two])
    for other in (
        job.Config(**{**CONFIG.__dict__, "kv_key_prefix": "ban:"}),
        job.Config(**{**CONFIG.__dict__, "expand_ranges_max": 256}),
        job.Config(**{**CONFIG.__dict__, "lapi_origins": ("cscli",)}),
    ):
        assert answer_digest([three], other) != answer_digest([three])


# Each setting that shapes the keys a LAPI answer projects onto, with two values that are not the
# default, and whether the two keep LAPI's query the same (then only the digest can tell them apart).
SHAPES_THE_KEYS = {
    "kv_key_prefix": ("ban:", "cs/", True),
    "expand_ranges_max": (16, 256, True),
    "lapi_origins": (("crowdsec",), ("cscli",), False),
    "lapi_scenarios_containing": (("ssh",), ("http",), False),
    "lapi_scenarios_not_containing": (("ssh",), ("http",), False),
    "scope_table": (True, False, False),
    "scope_table_max_bytes": (1024 * 1024, 2 * 1024 * 1024, True),
    "table_max_bytes": (1024 * 1024, 2 * 1024 * 1024, True),
    "table_origins": (frozenset({"CAPI"}), frozenset({"*"}), True),
}
# Every other setting, and why it need not be in the digest.
SHAPES_NO_KEY = {
    "cf_account_id": "the record's own: a record for another account is not trusted (audit_reason)",
    "cf_namespace_id": "the record's own, as the account",
    "cf_api_token": "a credential",
    "lapi_key": "a credential",
    "lapi_url": "another LAPI answers with its own decisions, which are digested",
    "cf_api_url": "where the keys go, not which",
    "pushgateway_url": "metrics",
    "run_deadline": "time, not keys",
    "http_timeout": "time, not keys",
    "lapi_ca_cert": "TLS to LAPI",
    "lapi_client_cert": "TLS to LAPI",
    "lapi_client_key": "TLS to LAPI",
    "max_deletes": "a run it holds back does not converge, so records no digest",
    "log_format": "output",
    "lapi_usage_metrics": "may_be_unchanged() plans again when usage metrics are due",
    "lapi_max_bytes": "an answer over it is unreadable: no run, no digest",
    "state_file": "where the record is",
    "audit_interval": "when the record is trusted, not what it holds",
    "proxies": "how the job reaches LAPI and Cloudflare, not what it asks",
    "edge_url": "--check-edge's, which makes no run",
    "status_token": "a credential, --check-edge's",
}


def config_fields_read(node: ast.AST) -> set[str]:
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and getattr(n.value, "id", "") == "config"}


def settings_the_projection_reads() -> set[str]:
    """Read from the code: the settings handed to project() and build_tables() (what lands in KV)
    wherever they are called, and those that make LAPI's query (which decisions LAPI answers with)."""
    module = ast.parse(inspect.getsource(job))
    fields = set()
    for whole in (
        job.lapi_query,
        job.build_tables,
        job.plan_run,
        job.count_tables_left_out,
    ):  # these take the whole configuration
        fields |= config_fields_read(ast.parse(inspect.getsource(whole)))
    for call in ast.walk(module):
        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "project":
            fields |= config_fields_read(call)
    return fields


@pytest.mark.skipif(UNDER_MUTATION, reason="reads the job's source, which mutmut rewrites")
def test_every_setting_is_known_to_shape_the_keys_or_not():
    settings = {f.name for f in dataclasses.fields(job.Config)}
    unknown = settings - set(SHAPES_THE_KEYS) - set(SHAPES_NO_KEY)
    assert not unknown, f"a new setting: put it in SHAPES_THE_KEYS (and in AnswerDigest) or SHAPES_NO_KEY: {unknown}"
    assert set(SHAPES_THE_KEYS) | set(SHAPES_NO_KEY) <= settings  # no setting that is gone
    read = settings_the_projection_reads()
    scanned = {"kv_key_prefix", "expand_ranges_max", "lapi_origins", "scope_table_max_bytes", "table_origins"}
    assert scanned <= read  # the scan works
    assert read <= set(SHAPES_THE_KEYS), (
        f"the projection reads {read - set(SHAPES_THE_KEYS)}: add it to SHAPES_THE_KEYS"
    )


@pytest.mark.parametrize("name", sorted(SHAPES_THE_KEYS))
def test_the_digest_changes_with_each_setting_that_shapes_the_keys(name):
    # A trusted record whose digest matched would make the run plan nothing: with a digest blind to
    # EXPAND_RANGES_MAX (16 -> 256) none of the newly allowed keys would be written until the next audit.
    one, other, same_query = SHAPES_THE_KEYS[name]
    configs = [job.Config(**{**CONFIG.__dict__, name: value}) for value in (one, other)]
    if not isinstance(one, bool):
        assert all(getattr(c, name) != getattr(CONFIG, name) for c in configs)  # neither is the default
    assert (job.lapi_query(configs[0]) == job.lapi_query(configs[1])) == same_query
    answer = [lapi_answer(["4h"] * 3)]
    assert answer_digest(answer, configs[0]) != answer_digest(answer, configs[1])
    assert answer_digest(answer, configs[0]) == answer_digest(answer, configs[0])


def test_a_record_keeps_its_digest_and_figures_and_knows_its_first_expiry():
    figures = job.Projected(3, {"ban": 2, "captcha": 1}, {"scope": 4})
    keys = {"ip:192.0.2.1": job.Present(NOW + 60, "ban"), "ip:192.0.2.2": job.Present(None, None)}
    original = record(keys, lapi_digest="d" * 40, projected=figures, due_at=NOW + 86400.5)
    back = job.decode_record(line + "\n" for line in "".join(job.encode_record(original, NOW)).split("\n")[:-1])
    assert back == original and back.earliest_expiration() == NOW + 60
    assert record({}).earliest_expiration() == float("inf")
    assert record({"ip:192.0.2.1": job.Present(0, "ban")}).earliest_expiration() == 0  # 0 is an expiration too


def test_a_key_expiring_at_the_moment_the_record_is_written_is_left_out():
    keys = {"ip:192.0.2.1": job.Present(int(NOW), "ban"), "ip:192.0.2.2": job.Present(int(NOW) + 1, "ban")}
    written = job.decode_record(job.encode_record(record(keys), NOW))
    assert list(written.keys) == ["ip:192.0.2.2"]  # as make_plan counts a key gone at its expiration


@pytest.mark.parametrize("projected", [None, [], {"wanted": 1}, {"wanted": "x", "by_remediation": {}, "ignored": {}}])
def test_a_digest_without_whole_figures_is_a_corrupt_record(projected):
    lines = "".join(job.encode_record(record(lapi_digest="d" * 40, projected=job.Projected(1, {}, {})), NOW)).split(
        "\n"
    )
    header = json.loads(lines[0])
    header["projected"] = projected
    with pytest.raises(job.RecordCorrupt):
        job.decode_record([json.dumps(header) + "\n"] + [line + "\n" for line in lines[1:-1]])


def test_a_record_may_stand_for_the_run_only_while_nothing_else_is_due():
    figures = job.Projected(1, {"ban": 1}, {})
    keys = {"ip:192.0.2.1": job.Present(NOW + 600, "ban")}
    fresh = record(keys, lapi_digest="d" * 40, projected=figures, usage_metrics_sent_at=NOW - 60)
    on = job.Config(**{**CONFIG.__dict__, "lapi_usage_metrics": True})
    assert job.may_be_unchanged(fresh, on, NOW, NOW)
    assert not job.may_be_unchanged(fresh._replace(lapi_digest=None, projected=None), on, NOW, NOW)
    assert not job.may_be_unchanged(fresh._replace(usage_metrics_sent_at=NOW - 3600), on, NOW, NOW)  # they are due
    off = job.Config(**{**CONFIG.__dict__, "lapi_usage_metrics": False})
    assert job.may_be_unchanged(fresh._replace(usage_metrics_sent_at=NOW - 3600), off, NOW, NOW)
    assert not job.may_be_unchanged(fresh, on, NOW, NOW + 600 - fresh.clock_offset)  # its key has expired
    due = fresh._replace(due_at=NOW + 300)  # a key left as its decision moved later comes due then
    assert job.may_be_unchanged(due, off, NOW, NOW + 299 - fresh.clock_offset)
    assert not job.may_be_unchanged(due, off, NOW, NOW + 300 - fresh.clock_offset)


def test_the_plan_says_when_the_first_key_capped_at_max_ttl_is_due_again():
    capped = job.Wanted("ban", NOW + 5 * job.MAX_TTL, "o", "s")
    short = job.Wanted("ban", NOW + 3600, "o", "s")
    assert job.make_plan({"ip:192.0.2.2": short}, {}, NOW).due_at == float("inf")
    written = job.make_plan({"ip:192.0.2.1": capped, "ip:192.0.2.2": short}, {}, NOW, offset=2.0)
    assert written.due_at == NOW + 2.0 + job.MAX_TTL - job.REFRESH_AHEAD
    kept = {"ip:192.0.2.1": job.Present(NOW + job.MAX_TTL - 86400, "ban")}  # written a day ago
    plan = job.make_plan({"ip:192.0.2.1": capped}, kept, NOW)
    assert plan.writes == [] and plan.due_at == NOW - 86400 + job.MAX_TTL - job.REFRESH_AHEAD
