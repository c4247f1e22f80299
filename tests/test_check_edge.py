"""`--check-edge URL`: the Worker's status (a stand-in of the endpoint worker/status.js answers)
against the tables the job wrote to the KV stand-in. What the real Worker answers, digests
included, is tested in workerd by tests/test_worker_status.py; here, what the job makes of it:
agree, a prefix or a table that differs, an edge that lags or is catching up, and every way the
status cannot be had. The comparison itself is a pure function, tested by example first.
"""

from __future__ import annotations

import copy
import json
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lapi_kv_sync as job
from tests.conftest import Result, assert_no_secret
from tests.standins import EdgeStandin, Entry, decision

STATUS_TOKEN = "status-token-0123456789abcdefghijklmnopqrstuv"
WINDOW = 60 + 60 + job.EDGE_MARGIN  # SCOPES_REFRESH + CACHE_TTL + the margin, at the defaults
OTHER_DIGEST = "0123456789abcdef0123456789abcdef"
SETTINGS = {"ADDRESS_KEYS": True, "CACHE_TTL": 60, "SCOPES_REFRESH": 60, "KV_TIMEOUT_MS": 300, "LOG_ONLY": False}


def status_of(kv_entries: dict, prefix: str = "ip:", age: float = 3) -> dict:
    """The status the reference Worker answers when it holds, read `age` seconds ago, what KV holds."""
    tables = {}
    for name in job.DOCUMENT_NAMES:
        entry = kv_entries.get(prefix + name)
        tables[name] = {
            "digest": entry.metadata["digest"] if entry else None,
            "bytes": len(entry.value) if entry else 0,
            "entries": {"v4": 1, "v6": 1} if name == "networks" else {"country": 1, "as": 0},
            "age": age,
            "problem": None,
        }
    kv = {"reads": True, "problem": None}
    return {"version": job.__version__, "prefix": prefix, "kv": kv, "tables": tables, "settings": dict(SETTINGS)}


def changed(status: dict, **tables: dict) -> dict:
    """The status with these tables' fields changed."""
    status = copy.deepcopy(status)
    for name, fields in tables.items():
        status["tables"][name].update(fields)
    return status


@pytest.fixture
def edge(stack):
    """The job has written both tables; the edge answers its status with the token."""
    stack.lapi.decisions = [
        decision("192.0.2.7"),
        decision("198.51.100.0/24", scope="Range"),
        decision("FR", scope="Country", type="captcha"),
    ]
    assert stack.run().code == 0
    assert {"ip:networks", "ip:scopes"} <= set(stack.kv.live())
    stack.kv.reset_counts()
    stack.push.pushes.clear()
    with EdgeStandin(STATUS_TOKEN) as standin:
        standin.answers = [status_of(stack.kv.live())]
        yield standin


def check(stack, url: str, **env: str | None) -> Result:
    """--check-edge URL, in-process, with the status token and without LAPI_KEY (not needed)."""
    env = {"STATUS_TOKEN": STATUS_TOKEN, "LAPI_KEY": None, **env}
    result = stack.run("--check-edge", url, **env)
    assert_no_secret(result.out, result.err, secrets=(STATUS_TOKEN,))
    return result


# --------------------------------------------------------------------------- against the stand-ins


def test_an_edge_holding_what_kv_holds_agrees(stack, edge):
    result = check(stack, edge.url + "/")  # a trailing slash is the same base URL
    assert result.code == 0, result.err
    assert "prefix: the edge reads 'ip:', as the job writes" in result.out
    for name in job.DOCUMENT_NAMES:
        digest = stack.kv.live()["ip:" + name].metadata["digest"]
        assert f"{name}: the edge holds {digest} (" in result.out and f"; KV holds {digest}: the same" in result.out
    assert result.out.rstrip().endswith("the edge holds what KV holds") and result.err == ""
    assert result.sleeps == []
    # One status request, with the token; one list request per table; nothing written, LAPI not asked.
    (asked,) = edge.asked
    assert asked.path == job.STATUS_PATH and asked.authorization == f"Bearer {STATUS_TOKEN}"
    assert asked.user_agent == job.USER_AGENT
    assert stack.kv.requests == {"list": 2} and stack.kv.writes == stack.kv.deletes == 0
    assert stack.push.pushes == []


def test_the_status_is_asked_under_the_base_urls_path(stack, edge):
    assert check(stack, edge.url + "/app").code == 0
    assert [a.path for a in edge.asked] == ["/app" + job.STATUS_PATH]


def test_no_table_on_either_side_agrees_and_says_what_that_cannot_tell(stack):
    with EdgeStandin(STATUS_TOKEN) as edge:
        edge.answers = [status_of({})]
        result = check(stack, edge.url)
    assert result.code == 0
    assert "networks: the edge holds none (read 3 s ago); KV holds none: the same" in result.out
    assert "no table on either side: the namespace could not be told apart by its tables" in result.out


def test_another_prefix_is_a_disagreement_naming_the_workers_setting(stack, edge):
    edge.answers = [{**status_of(stack.kv.live()), "prefix": "crowdsec"}]
    result = check(stack, edge.url)
    assert result.code == 1 and result.sleeps == []
    assert "prefix: the edge reads 'crowdsec', the job writes 'ip:'" in result.err
    assert (
        "set the Worker's KV_KEY_PREFIX (wrangler.toml, [vars]) to the job's, then `npx wrangler deploy`" in result.err
    )


def test_a_table_that_differs_in_an_old_copy_is_an_edge_that_lags(stack, edge):
    old = WINDOW + 1
    problem = "network table unusable, the last good copy (if any) kept: Error: KV GET failed"
    edge.answers = [
        changed(status_of(stack.kv.live()), networks={"digest": OTHER_DIGEST, "age": old, "problem": problem})
    ]
    result = check(stack, edge.url)
    assert result.code == 1 and result.sleeps == []  # nothing to wait for: its reads fail
    assert f"networks: the edge holds {OTHER_DIGEST} (" in result.err
    lags = f"the edge lags, its copy {old} s old, past {WINDOW} s (SCOPES_REFRESH 60 + CACHE_TTL 60 + a margin of 60)"
    assert lags in result.err
    assert problem in result.err and "`npx wrangler tail`" in result.err
    assert "scopes: " in result.out and "the same" in result.out


def test_a_table_that_differs_in_a_fresh_copy_is_waited_for_and_caught_up(stack, edge):
    holds = status_of(stack.kv.live())
    edge.answers = [changed(holds, scopes={"digest": OTHER_DIGEST, "age": 5}), holds]
    result = check(stack, edge.url)
    assert result.code == 0, result.err
    assert "different, which KV may not have carried to the edge yet" in result.out
    assert f"waiting {WINDOW} s for the edge to catch up, then asking again" in result.out
    assert result.sleeps == [WINDOW] and len(edge.asked) == 2 and stack.kv.requests == {"list": 4}
    assert result.out.rstrip().endswith("the edge holds what KV holds")


def test_an_edge_that_holds_what_kv_held_a_window_ago_is_following(stack, edge):
    """KV changed while the check waited: the edge holding the table KV held before is following."""
    before = status_of(stack.kv.live())
    newer = Entry(b'{"as":{"64500":["ban",4000000000]},"v":1}', None, {"table": 1, "digest": "d" * 32, "entries": 1})

    def after_the_wait():  # KV holds a newer table by now, which the edge has not read yet
        with stack.kv.lock:
            stack.kv.store["ip:scopes"] = newer
        return before

    edge.answers = [changed(before, scopes={"digest": OTHER_DIGEST, "age": 5}), after_the_wait]
    result = check(stack, edge.url)
    assert result.code == 0, result.err
    assert f"scopes: the edge holds {before['tables']['scopes']['digest']} (" in result.out
    assert f"the edge holds what KV held {WINDOW} s ago, following" in result.out


def test_a_fresh_copy_still_different_after_the_window_names_the_namespace_binding(stack, edge):
    edge.answers = [changed(status_of(stack.kv.live()), networks={"digest": OTHER_DIGEST, "age": 1})]
    result = check(stack, edge.url)
    assert result.code == 1 and result.sleeps == [WINDOW]
    assert f"networks: the edge holds {OTHER_DIGEST} (" in result.err and "still different after" in result.err
    assert "[[kv_namespaces]] binding DECISIONS) has the job's CF_KV_NAMESPACE_ID as its id" in result.err


def test_a_table_the_edge_never_read_is_waited_for(stack, edge):
    never = changed(status_of(stack.kv.live()), networks={"digest": None, "age": None, "problem": "not read yet"})
    edge.answers = [never, never]
    result = check(stack, edge.url)
    assert result.code == 1 and result.sleeps == [WINDOW]
    assert "networks: the edge has not read it yet; KV holds " in result.out + result.err


def test_a_window_too_long_to_wait_says_when_to_ask_again(stack, edge):
    status = changed(status_of(stack.kv.live()), scopes={"digest": OTHER_DIGEST, "age": 5})
    status["settings"]["CACHE_TTL"] = 3600
    edge.answers = [status]
    result = check(stack, edge.url)
    assert result.code == 0 and result.sleeps == []
    assert f"too long to wait here: run --check-edge again in {3600 + 60 + 60} s" in result.out


def test_an_edge_whose_binding_does_not_read_names_the_binding(stack, edge):
    status = status_of(stack.kv.live())
    status["kv"] = {"reads": False, "problem": "no KV namespace bound as DECISIONS"}
    edge.answers = [status]
    result = check(stack, edge.url)
    assert result.code == 1
    assert "KV: the edge's binding does not read: no KV namespace bound as DECISIONS" in result.err
    assert "CF_KV_NAMESPACE_ID" in result.err


def test_another_version_and_log_only_are_said_and_do_not_fail(stack, edge):
    status = {**status_of(stack.kv.live()), "version": "0.1.0"}
    status["settings"]["LOG_ONLY"] = True
    edge.answers = [status]
    result = check(stack, edge.url)
    assert result.code == 0
    assert f"the Worker is '0.1.0', this job {job.__version__}: deploy the same release" in result.err
    assert "the edge enforces nothing: LOG_ONLY is on" in result.err


@pytest.mark.parametrize("wrong", ["token", "route"])
def test_a_404_says_the_token_or_the_route_is_wrong_both(stack, edge, wrong):
    """The Worker answers a wrong token as any request: the site's own 404 then. A URL off the
    Worker's routes gets the same 404 from the origin, whatever the token."""
    url, token = edge.url, STATUS_TOKEN
    if wrong == "token":
        token = "another-token-0123456789abcdefghijklmnop"
    else:
        url += "/static"
        edge.PATH = "/app" + EdgeStandin.PATH  # the Worker runs on /app/* only
    result = check(stack, url, STATUS_TOKEN=token)
    assert result.code == 1
    assert f"{url}{job.STATUS_PATH} answered HTTP 404 '<h1>Not Found</h1>'" in result.err
    assert "either STATUS_TOKEN is not the Worker's" in result.err and "on none of its routes" in result.err
    assert stack.kv.writes == 0


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ((200, "<html>the origin's page</html>", {}), "not the Worker's status (not JSON: \"<html>the origin's page"),
        ((200, "[1, 2]", {}), "not the Worker's status (not a JSON object: '[1, 2]')"),
        ((200, '{"version": "0.2.0"}', {}), "not the Worker's status (`prefix` is not text: 'null')"),
        ((403, "<h1>Access denied</h1>", {}), "answered HTTP 403 '<h1>Access denied</h1>'"),
        ((503, "down", {}), "answered HTTP 503 'down'"),
        ((200, "x" * (job.MAX_STATUS_BYTES + 1), {}), f"answered with more than {job.MAX_STATUS_BYTES} bytes"),
    ],
    ids=["html", "a-list", "a-part", "ban-page", "5xx", "huge"],
)
def test_an_answer_that_is_not_the_status_says_the_token_or_the_route(stack, edge, answer, said):
    edge.answers = [answer]
    result = check(stack, edge.url)
    assert result.code == 1 and said in result.err, result.err
    assert "either STATUS_TOKEN is not the Worker's" in result.err


def test_a_junk_field_is_named(stack, edge):
    edge.answers = [changed(status_of(stack.kv.live()), networks={"digest": "not-a-digest"})]
    result = check(stack, edge.url)
    assert result.code == 1
    assert "(`tables.networks.digest` is not 32 hex digits or null: '\"not-a-digest\"')" in result.err


def test_a_redirect_names_where_it_leads(stack, edge):
    edge.answers = [(301, "", {"Location": "https://www.example.com/.well-known/lapi-kv-sync/status"})]
    result = check(stack, edge.url)
    assert result.code == 1
    assert "answered HTTP 301, to 'https://www.example.com/.well-known/lapi-kv-sync/status'" in result.err
    assert "give --check-edge the URL it leads to" in result.err


def test_an_unreachable_edge_says_so(stack):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: refused
        result = check(stack, f"http://127.0.0.1:{port}", HTTP_TIMEOUT="2")
    assert result.code == 1
    assert f"the edge: no answer from http://127.0.0.1:{port}{job.STATUS_PATH}" in result.err
    assert "is it the site's URL, on one of the Worker's routes?" in result.err


def test_a_kv_that_cannot_be_listed_says_so(stack, edge):
    result = check(stack, edge.url, CF_API_TOKEN="not-the-token-0123456789")
    assert result.code == 1 and "Cloudflare: list: HTTP 403: 10000: Authentication error" in result.err
    assert edge.asked == []  # KV first: the edge is asked only when there is something to compare


def test_the_token_from_a_file_and_the_whole_script(stack, edge, tmp_path):
    token_file = tmp_path / "status-token"
    token_file.write_text(STATUS_TOKEN + "\n")
    env = stack.env(LAPI_KEY=None, STATUS_TOKEN_FILE=str(token_file))
    result = stack.run_process("--check-edge", edge.url, env=env)
    assert result.code == 0, result.err
    assert_no_secret(result.out, result.err, secrets=(STATUS_TOKEN,))
    assert edge.asked[0].authorization == f"Bearer {STATUS_TOKEN}"


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"STATUS_TOKEN": None}, "STATUS_TOKEN (or STATUS_TOKEN_FILE) is not set: --check-edge sends it to the Worker"),
        ({"STATUS_TOKEN": "short-but-8"}, "STATUS_TOKEN: the secret is under 32 characters, which the Worker refuses"),
        ({"STATUS_TOKEN": "two words"}, "STATUS_TOKEN: the secret holds a character that is not visible ASCII"),
        ({"STATUS_TOKEN_FILE": "/nonexistent/token"}, "STATUS_TOKEN and STATUS_TOKEN_FILE are both set"),
        ({"DRY_RUN": "true"}, "--check-edge is a check, not a run: it takes no --dry-run (DRY_RUN)"),
        ({"CF_API_TOKEN": None}, "CF_API_TOKEN (or CF_API_TOKEN_FILE) is not set"),
    ],
)
def test_configuration_for_the_check(stack, env, said):
    result = stack.run("--check-edge", "https://www.example.com", **{"STATUS_TOKEN": STATUS_TOKEN, **env})
    assert result.code == job.EXIT_CONFIG and said in result.err, result.err
    assert "LAPI_KEY" not in result.err  # not needed for the check


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("www.example.com", "--check-edge must be an http:// or https:// URL, got 'www.example.com'"),
        ("https://user:pw@www.example.com", "--check-edge must not carry credentials in the URL"),
        ("https://www.example.com/?x=1", "--check-edge takes the site's base URL (https://www.example.com)"),
        ("", "--check-edge takes the site's base URL"),
    ],
)
def test_the_url_must_be_a_sites_base_url(stack, url, said):
    result = stack.run("--check-edge", url, STATUS_TOKEN=STATUS_TOKEN, LAPI_KEY=None)
    assert result.code == job.EXIT_CONFIG and said in result.err


def test_a_run_still_needs_lapi_key_and_ignores_status_token(stack):
    result = stack.run(LAPI_KEY=None, STATUS_TOKEN="short")  # a run reads no STATUS_TOKEN at all
    assert result.code == job.EXIT_CONFIG
    assert "LAPI_KEY (or LAPI_KEY_FILE) is not set" in result.err and "STATUS_TOKEN" not in result.err


# --------------------------------------------------------------------------- the comparison, pure


def edge_status(**fields) -> job.EdgeStatus:
    tables = {
        "networks": job.EdgeTable("a" * 32, 56, {"v4": 1, "v6": 1}, 3, None),
        "scopes": job.EdgeTable("b" * 32, 40, {"country": 1, "as": 0}, 3, None),
    }
    status = job.EdgeStatus(job.__version__, "ip:", True, None, tables, 60, 60, 300, True, False)
    return status._replace(**fields)


def table(name: str, **fields) -> dict[str, job.EdgeTable]:
    held = edge_status().tables
    return {**held, name: held[name]._replace(**fields)}


KV = {"networks": "a" * 32, "scopes": "b" * 32}


@pytest.mark.parametrize(
    ("status", "kv", "before", "agree", "wait", "said"),
    [
        (edge_status(), KV, None, True, None, "the edge holds what KV holds"),
        (edge_status(prefix="ip"), KV, None, False, None, "prefix: the edge reads 'ip', the job writes 'ip:'"),
        (edge_status(kv_reads=False, kv_problem="x"), KV, None, False, None, "binding does not read: x"),
        # A differing table: its copy fresh, waited for; old, an edge that lags.
        (edge_status(tables=table("scopes", digest="c" * 32)), KV, None, False, 180, "may not have carried"),
        (edge_status(tables=table("scopes", digest="c" * 32, age=181)), KV, None, False, None, "the edge lags"),
        (edge_status(tables=table("scopes", digest="c" * 32, age=180)), KV, None, False, 180, "may not have carried"),
        (edge_status(tables=table("scopes", age=999)), KV, None, True, None, "past 180 s"),  # the same, but old
        # KV's side: a table the edge holds and KV no longer does, and the reverse.
        (edge_status(), {"networks": "a" * 32}, None, False, 180, "scopes: the edge holds bbbb"),
        (edge_status(tables=table("scopes", digest=None)), KV, None, False, 180, "scopes: the edge holds none"),
        (edge_status(), {**KV, "scopes": None}, None, False, None, "no digest of the job's in its metadata"),
        (edge_status(tables=table("scopes", digest=None, age=None)), KV, None, False, 180, "has not read it yet"),
        # The second look, a window later.
        (edge_status(tables=table("scopes", digest="c" * 32)), KV, {"scopes": "c" * 32}, True, None, "following"),
        (edge_status(tables=table("scopes", digest=None)), KV, {}, True, None, "following"),
        (edge_status(tables=table("scopes", digest="c" * 32)), KV, KV, False, None, "still different"),
        (edge_status(tables=table("scopes", age=None, digest=None)), KV, {}, False, None, "still different"),
        # A larger window: CACHE_TTL and SCOPES_REFRESH as the edge uses them.
        (edge_status(cache_ttl=300, tables=table("scopes", digest="c" * 32, age=400)), KV, None, False, 420, "may"),
        (
            edge_status(scopes_refresh=1, cache_ttl=30, tables=table("networks", digest="c" * 32, age=92)),
            KV,
            None,
            False,
            None,
            "past 91 s",
        ),
    ],
)
def test_compare_edge(status, kv, before, agree, wait, said):
    found = job.compare_edge(status, kv, "ip:", before)
    assert (found.agree, found.wait) == (agree, wait)
    assert any(said in text for _, text in found.lines), found.lines
    assert any(level == "error" for level, _ in found.lines) == (not agree and wait is None)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


def leaves(value: object, path: tuple = ()) -> list[tuple]:
    """The path of every value inside a JSON value, itself included."""
    found = [path]
    if isinstance(value, dict):
        for key, inner in value.items():
            found += leaves(inner, (*path, key))
    return found


@given(st.data(), JSON_VALUES)
def test_a_status_with_anything_anywhere_is_read_or_refused_never_a_crash(data, value):
    """Hostile input: any one value of a good status replaced by any JSON value gives a status
    the comparison takes, or a ValueError (which the check says), never another exception."""
    status = status_of({"ip:networks": Entry(b"LKVN", None, {"digest": "a" * 32})})
    path = data.draw(st.sampled_from(leaves(status)))
    if path:
        parent = status
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value
    else:
        status = value
    try:
        read = job.parse_edge_status(json.dumps(status).encode())
    except ValueError as e:
        assert "`" in str(e) or str(e).startswith(("not JSON", "not a JSON object"))
    else:  # and compared, said, whatever it holds
        assert isinstance(read, job.EdgeStatus) and set(read.tables) == set(job.DOCUMENT_NAMES)
        for kv, before in [({}, None), ({"networks": "a" * 32}, {}), ({"scopes": None}, {"scopes": "b" * 32})]:
            assert all(type(text) is str for _, text in job.compare_edge(read, kv, "ip:", before).lines)


@given(
    st.sampled_from(["version", "prefix", "kv", "tables", "settings"]),
    st.sampled_from([None, 1, -1, "x", [], {}, True, 1e400]),
)
def test_a_status_with_any_one_part_broken_is_refused_by_name(part, value):
    status = status_of({})
    status[part] = value
    if isinstance(value, str) and part in ("version", "prefix"):
        assert job.parse_edge_status(json.dumps(status).encode())  # text is what these are
        return
    with pytest.raises(ValueError, match=f"`{part}"):
        job.parse_edge_status(json.dumps(status).encode())
