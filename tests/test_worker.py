"""The reference Worker (worker/) run in workerd through Miniflare, against the keys the job itself wrote.

Each test prepares data here and hands it to worker/test/drive.mjs, which starts Miniflare with
worker.js, the vars and the KV binding of worker/wrangler.toml, and says what the Worker answered.
Needs node and `npm ci` in worker/: skipped without them, except under CI=true, where it fails.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import re
import shutil
import subprocess
import time
import tomllib
import urllib.parse
from pathlib import Path

import pytest

import lapi_kv_sync as job
from tests.real import INSTALL
from tests.standins import decision

WORKER = Path(__file__).resolve().parent.parent / "worker"
SITE = "http://site.test"

BANNED_V4 = "192.0.2.7"
CAPTCHA_V6 = "2001:0DB8:0:0:1:0:0:0007"  # as LAPI keeps it: written by hand, not canonical
MAPPED_BAN = "::ffff:198.51.100.20"  # an IPv4-mapped IPv6 decision: the job writes it as IPv4
BANNED_SPELLINGS = ["192.0.2.7", "::ffff:192.0.2.7", "::FFFF:C000:0207", "0:0:0:0:0:ffff:192.0.2.7"]
CAPTCHA_SPELLINGS = [
    "2001:db8::1:0:0:7",  # RFC 5952: of two equal zero runs, the first is compressed
    "2001:DB8::1:0:0:7",
    "2001:0db8:0000:0000:0001:0000:0000:0007",
    "2001:db8:0:0:1::7",
    "2001:db8:0:0:1:0:0.0.0.7",  # the last 32 bits as a dotted quad: Python accepts it
]
UNLISTED = ["192.0.2.8", "2001:db8::8", "::ffff:192.0.2.8"]
# Not one address each: the Worker must not look them up, even where KV happens to hold that key.
MALFORMED = ["not-an-address", "192.0.2.7, 10.0.0.1", "192.0.2.07", "fe80::1%eth0", "2001:db8::1:0:0:7/64"]


# The bound on a KV read a request waits for, in the tests: Miniflare's local KV on a busy machine
# can take longer than the Worker's 300 ms default, and a test must not depend on the machine's
# speed. The tests of the bound itself set KV_TIMEOUT_MS.
TEST_KV_TIMEOUT_MS = "5000"


def wrangler(**vars: str) -> dict:
    """What Miniflare needs from the example wrangler.toml, so the example is what gets tested
    (but for KV_TIMEOUT_MS, TEST_KV_TIMEOUT_MS unless a test sets it)."""
    toml = tomllib.loads((WORKER / "wrangler.toml").read_text())
    (namespace,) = toml["kv_namespaces"]
    return {
        "main": toml["main"],
        "compatibilityDate": toml["compatibility_date"],
        "binding": namespace["binding"],
        "vars": {**toml["vars"], "KV_TIMEOUT_MS": TEST_KV_TIMEOUT_MS, **vars},
    }


def node(package: str = "miniflare") -> str:
    """node, with `package` installed in worker/ (an install from before wrangler was pinned lacks it)."""
    found = shutil.which("node")
    if found and (WORKER / "node_modules" / package).is_dir():
        return found
    reason = f"needs node and the Worker's packages (`npm ci` in worker/): `{INSTALL}` installs both"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def drive(**work) -> dict:
    done = subprocess.run(
        [node(), str(WORKER / "test" / "drive.mjs")],
        input=json.dumps(work),
        capture_output=True,
        text=True,
        cwd=WORKER,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def job_keys(stack, *decisions: dict, **env: str) -> list[dict]:
    """Run the job against the stand-ins and return the keys it wrote, as Miniflare's KV takes them."""
    stack.lapi.decisions = list(decisions)
    assert stack.run(**env).code == 0
    return [
        {
            "name": name,
            # A binary value (the network table) goes to Miniflare in base64, as drive.mjs takes it.
            **(
                {"base64": base64.b64encode(entry.value).decode()}
                if isinstance(entry.value, bytes)
                else {"value": entry.value}
            ),
            "expiration": entry.expiration,
            "metadata": entry.metadata,
        }
        for name, entry in stack.kv.live().items()
    ]


def requests(*addresses: str) -> list[dict]:
    return [{"url": f"{SITE}/page?q=1", "address": address} for address in addresses]


def is_ban_page(response: dict) -> bool:
    return response["status"] == 403 and "Access denied" in response["body"] and not response["origin"]


def passed_unchanged(response: dict, url: str = f"{SITE}/page?q=1", method: str = "GET", body: str = "") -> bool:
    """The origin answered, and saw the request as the client sent it."""
    seen = json.loads(response["body"]) if response["origin"] else {}
    return response["status"] == 200 and seen == {"method": method, "url": url, "body": body, "tag": "from-client"}


TURNSTILE_SECRET = "turnstile-secret"
PASS_SECRET = "pass-secret-0123456789abcdefghijklmnop"  # 32 characters or more: no warning
# The recommended setup: both Turnstile keys, and a key of the pass's own.
TURNSTILE = {"TURNSTILE_SITE_KEY": "site-key-123", "TURNSTILE_SECRET_KEY": TURNSTILE_SECRET, "PASS_SECRET": PASS_SECRET}
PASS_COOKIE = "__Host-crowdsec_pass"
CAPTCHA_ADDRESS = "2001:db8::1:0:0:7"  # CAPTCHA_V6 as the job and the Worker spell it


def is_challenge(response: dict, failed: bool = False, site_key: str = "site-key-123") -> bool:
    """The Turnstile challenge: the widget with the site key, in a form posting back to the same URL."""
    body = response["body"]
    return (
        response["status"] == 403
        and not response["origin"]
        and f'class="cf-turnstile" data-sitekey="{site_key}"' in body
        and '<form method="post" id="crowdsec-challenge">' in body  # no action: the same URL
        and '<button type="submit">Continue</button>' in body  # for when its script does not run
        and "https://challenges.cloudflare.com/turnstile/v0/api.js" in body
        and ("The check did not go through" in body) == failed
        and "set-cookie" not in response["headers"]
    )


def signed_pass(address: str, host: str, expiry: int, secret: str = PASS_SECRET) -> str:
    """A pass as the Worker signs one: HMAC-SHA256 over address, host and expiry (worker/captcha.js)."""
    message = f"crowdsec-pass-v1\n{address}\n{host}\n{expiry}".encode()
    mac = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return f"{PASS_COOKIE}={expiry}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def only_reads(answers: list[dict]) -> bool:
    """Every call the Worker made on KV was a read: no put, delete or list, ever."""
    return all(answer["kv"] is not None and all(call == "get" for call, _ in answer["kv"]) for answer in answers)


def events(answer: dict) -> list[str]:
    """The Analytics Engine events a response wrote."""
    return [point["point"]["blobs"][0] for point in answer["points"]]


@pytest.fixture
def keys(stack) -> list[dict]:
    written = job_keys(
        stack,
        decision(BANNED_V4),
        decision(CAPTCHA_V6, type="captcha"),
        decision(MAPPED_BAN),
    )
    assert sorted(k["name"] for k in written) == ["ip:192.0.2.7", "ip:198.51.100.20", "ip:2001:db8::1:0:0:7"]
    return written


def test_the_worker_enforces_what_the_job_wrote_in_every_spelling(keys):
    planted = [{"name": "ip:" + text, "value": "ban"} for text in MALFORMED]  # keys the job never writes
    addresses = BANNED_SPELLINGS + ["198.51.100.20"] + CAPTCHA_SPELLINGS + UNLISTED + MALFORMED
    answers = drive(config=wrangler(**TURNSTILE), keys=keys + planted, requests=requests(*addresses))["responses"]
    by_address = dict(zip(addresses, answers, strict=True))

    for address in [*BANNED_SPELLINGS, "198.51.100.20"]:
        assert is_ban_page(by_address[address]), address
        assert by_address[address]["headers"]["content-type"].startswith("text/html")
    for address in CAPTCHA_SPELLINGS:
        assert is_challenge(by_address[address]), address
    for address in UNLISTED + MALFORMED:
        assert passed_unchanged(by_address[address]), address
    assert all(a["headers"].get("cache-control") == "no-store" for a in answers if not a["origin"])
    # One KV read per request, of the address as the job spells it; none for what is not an address.
    # The first also reads the two tables, which the isolate then holds (test_worker_networks.py).
    for i, (address, answer) in enumerate(by_address.items()):
        reads = [] if address in MALFORMED else [["get", "ip:" + job.canonical_address(address)]]
        assert answer["kv"] == reads + [["get", "ip:networks"], ["get", "ip:scopes"]] * (i == 0), address


def test_an_unlisted_client_reaches_the_origin_with_its_request_as_sent(keys):
    work = [{"url": f"{SITE}/form", "address": "192.0.2.9", "method": "POST", "body": "a=1&b=2"}]
    (answer,) = drive(config=wrangler(), keys=keys, requests=work)["responses"]
    assert passed_unchanged(answer, url=f"{SITE}/form", method="POST", body="a=1&b=2")


def test_a_kv_that_throws_lets_every_request_through():
    # Every read fails, so no key can be found: a banned address passes, as one with no key does.
    output = drive(config=wrangler(), brokenKv=True, requests=requests(BANNED_V4, "2001:db8::1:0:0:7", BANNED_V4))
    assert all(passed_unchanged(a) for a in output["responses"])
    # Said once each (the address keys, each table), not once per request.
    assert sorted(log["message"].split(":")[0] for log in output["logs"]) == [
        "KV read of an address key failed, request let through",
        "network table unusable, the last good copy (if any) kept",
        "scope table unusable, the last good copy (if any) kept",
    ]


@pytest.mark.parametrize(
    ("cache_ttl", "said"),
    [
        ("5", "CACHE_TTL=5: outside 30..31536000, 30 used"),
        ("soon", 'CACHE_TTL="soon": not a whole number of seconds, 60 used'),
        ("", None),
        ("2147483648", "CACHE_TTL=2147483648: outside 30..31536000, 31536000 used"),
        ("1e10", 'CACHE_TTL="1e10": not a whole number of seconds, 60 used'),
        ("1e400", 'CACHE_TTL="1e400": not a whole number of seconds, 60 used'),
        ("Infinity", 'CACHE_TTL="Infinity": not a whole number of seconds, 60 used'),
        ("-60", 'CACHE_TTL="-60": not a whole number of seconds, 60 used'),
        ("60.5", 'CACHE_TTL="60.5": not a whole number of seconds, 60 used'),
    ],
)
def test_a_cache_ttl_kv_would_refuse_does_not_turn_enforcement_off(keys, cache_ttl, said):
    # KV throws on a cacheTtl under 30 s, and workerd on one past 2^31 - 1 (and on 1e10, 1e400,
    # Infinity): taken as is, the Worker would fail open on every request. Said once, not per request.
    work = requests(BANNED_V4, "2001:db8::1:0:0:7", BANNED_V4)
    output = drive(config=wrangler(CACHE_TTL=cache_ttl), keys=keys, requests=work)
    banned, challenged, again = output["responses"]
    assert is_ban_page(banned) and is_ban_page(again)
    assert is_ban_page(challenged)  # a captcha without Turnstile keys: CAPTCHA_FALLBACK, ban
    assert [log["message"] for log in output["logs"]] == ([said] if said else [])


def test_the_prefix_is_the_jobs_kv_key_prefix(stack):
    keys = job_keys(stack, decision(BANNED_V4), KV_KEY_PREFIX="crowdsec/")
    assert [k["name"] for k in keys] == ["crowdsec/192.0.2.7"]
    default_prefix = {"name": "ip:192.0.2.8", "value": "ban"}  # outside the Worker's prefix: not read
    work = requests(BANNED_V4, "192.0.2.8")
    banned, other = drive(config=wrangler(KV_KEY_PREFIX="crowdsec/"), keys=[*keys, default_prefix], requests=work)[
        "responses"
    ]
    assert is_ban_page(banned) and passed_unchanged(other)


# --------------------------------------------------------------------------- one spelling, both sides


def hextet(group: int, rng: random.Random) -> str:
    digits = f"{group:x}".zfill(rng.randint(len(f"{group:x}"), 4))  # zero-padded to any width
    return "".join(rng.choice((d, d.upper())) for d in digits)


def spell_ipv6(groups: list[int], rng: random.Random) -> str:
    """Any spelling Python's ipaddress accepts: mixed case, zero padding, `::` over any run of
    zero groups (even one, at either end), the last 32 bits as a dotted quad."""
    items = [hextet(g, rng) for g in groups]
    if rng.random() < 0.25:
        items[6:] = [f"{groups[6] >> 8}.{groups[6] & 255}.{groups[7] >> 8}.{groups[7] & 255}"]
    zeros = [i for i, g in enumerate(groups[: len(items)]) if g == 0 and not (i == 6 and len(items) == 7)]
    if zeros and rng.random() < 0.8:
        start = rng.choice(zeros)
        end = start + 1
        while end < len(items) and end in zeros and rng.random() < 0.8:
            end += 1
        return ":".join(items[:start]) + "::" + ":".join(items[end:])
    return ":".join(items)


def random_groups(rng: random.Random) -> list[int]:
    """Eight groups, zero-heavy, so zero runs of every length and place (ties too) come up."""
    v4 = [rng.randrange(0x10000), rng.randrange(0x10000)]
    shape = rng.random()
    if shape < 0.15:
        return [0, 0, 0, 0, 0, 0xFFFF, *v4]  # IPv4-mapped
    if shape < 0.2:
        return [0, 0, 0, 0, 0, 0, *v4]  # IPv4-compatible (deprecated): stays IPv6
    if shape < 0.25:
        return [0, 0, 0, 0, 0xFFFF, 0, *v4]  # IPv4-translated: stays IPv6
    pool = (0, 0, 0, 0, 1, 0xFFFF, rng.randrange(0x100), rng.randrange(0x10000))
    return [rng.choice(pool) for _ in range(8)]


def random_ipv4(rng: random.Random) -> str:
    return ".".join(
        str(rng.choice((0, 1, 9, 10, 99, 100, 199, 200, 249, 250, 255, rng.randrange(256)))) for _ in "1234"
    )


def mutate(text: str, rng: random.Random) -> str:
    """A near miss: Python rejects most, accepts some; either way both sides must agree."""
    alphabet = [*"0123456789abcdefABCDEFgG:.%/ x", "::", "%eth0", "/64", "\n", "\uff10", "\u0663", "0000"]
    for _ in range(rng.randint(1, 2)):
        at = rng.randint(0, len(text))
        action = rng.random()
        if action < 0.4:
            text = text[:at] + rng.choice(alphabet) + text[at:]
        elif action < 0.7:
            text = text[:at] + text[at + 1 :]
        else:
            text = text[:at] + rng.choice(alphabet) + text[at + 1 :]
    return text


EDGES = [
    *["", "::", "::1", "1::", ":::", "::ffff:0.0.0.0", "::ffff:255.255.255.255", "::0.0.0.0", "::1.2.3.4"],
    *["1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7::", "::2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8::", "::1:2:3:4:5:6:7:8"],
    *["1:2:3:4:5:6:1.2.3.4", "1:2:3:4:5:6:7:1.2.3.4", "1.2.3.4::", "::1.2.3.4:5", "1:2:3:4:5:6:7"],
    *["::ffff:1.2.3", "::ffff:1.2.3.4.5", "::ffff:01.2.3.4", "1.2.3.04", "256.1.1.1", "0.0.0.0", "1.2.3.4."],
    *[" 1.2.3.4", "1.2.3.4 ", "1.2.3.4\n", "fe80::1%eth0", "fe80::1%", "2001:db8::/32", "192.0.2.0/24"],
    *["0x7f.0.0.1", "127.1", "2130706433", "12345::", "1:2:3:4:5:6:7:8:9", "g::", "\uff11.2.3.4", "1.2.3.\u0663"],
    *["1::2::3", "1:::2", ":1::2", "1::2:", ":1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8:", "::ffff:1.2.3.4%x"],
]


def job_says(text: str) -> str | None:
    try:
        return job.canonical_address(text)
    except ValueError:
        return None


def test_the_worker_spells_every_address_as_the_job_does():
    seed = int(os.environ.get("WORKER_PROPERTY_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    valid = [random_ipv4(rng) for _ in range(1000)] + [spell_ipv6(random_groups(rng), rng) for _ in range(5000)]
    near_misses = [mutate(rng.choice(valid), rng) for _ in range(4000)]
    texts = EDGES + valid + near_misses
    expected = [job_says(text) for text in texts]
    assert None not in expected[len(EDGES) : len(EDGES) + len(valid)], "the generator made an invalid spelling"
    assert 1000 < expected.count(None) < len(texts) - len(valid)  # both sides of the line are exercised

    answers = drive(config=wrangler(), addresses=[None, *texts])["canonical"]

    assert answers[0] is None  # no CF-Connecting-IP header at all
    differ = [(t, e, w) for t, e, w in zip(texts, expected, answers[1:], strict=True) if e != w]
    assert not differ, f"WORKER_PROPERTY_SEED={seed}: (text, job, worker) {differ[:20]}"


def test_strongest_ranks_ban_over_captcha_over_none():
    # How any other source of decisions joins the address key's (worker.js): whatever it is, a
    # ban wins, and a value that is neither counts as none.
    values = ["ban", "captcha", None, "", "Ban", "allow", "__proto__", "constructor"]
    pairs = [[a, b] for a in values for b in values]
    rank = {"ban": 2, "captcha": 1}
    expected = [max((v for v in pair if v in rank), key=rank.get, default=None) for pair in pairs]
    assert drive(config=wrangler(), pairs=pairs)["strongest"] == expected


# --------------------------------------------------------------------------- the captcha, with Turnstile

ANOTHER_CAPTCHA = "203.0.113.5"
PSEUDO_BANNED_V6 = "2001:db8::66"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def answer(token: str | None, address: str = CAPTCHA_ADDRESS, **fields: str) -> dict:
    """The challenge page's form, posted back to the URL it was shown on."""
    form = ({} if token is None else {"cf-turnstile-response": token}) | fields
    body = urllib.parse.urlencode(form)
    return {"url": f"{SITE}/page?q=1", "address": address, "method": "POST", "body": body, "headers": FORM}


def visit(cookie: str | None = None, address: str = CAPTCHA_ADDRESS, url: str = f"{SITE}/page?q=1", **extra) -> dict:
    return {"url": url, "address": address, "headers": {} if cookie is None else {"Cookie": cookie}, **extra}


@pytest.fixture
def captcha_keys(keys) -> list[dict]:
    return [*keys, {"name": f"ip:{ANOTHER_CAPTCHA}", "value": "captcha"}]


def test_a_solved_challenge_earns_a_pass_for_this_address_and_host_only(captcha_keys):
    now = int(time.time())
    work = [
        visit(address="2001:DB8:0:0:1::7"),  # 0: the challenge, whatever the spelling
        answer("solved|site.test"),  # 1: a good token: a pass
        visit(passFrom=1),  # 2: the pass: the origin
        {**answer(None, a="1"), "passFrom": 1},  # 3: a form of the site's own, with the pass: the origin, unread
        visit(address=ANOTHER_CAPTCHA, passFrom=1),  # 4: replayed from another address
        visit(url="http://other.test/page?q=1", passFrom=1),  # 5: on another host
        visit(signed_pass(CAPTCHA_ADDRESS, "site.test", now - 1)),  # 6: run out
        visit(signed_pass(CAPTCHA_ADDRESS, "site.test", now + 600, secret="another-secret")),  # 7: forged
        visit(signed_pass(CAPTCHA_ADDRESS, "site.test", now + 600).replace(f"={now + 600}.", f"={now + 601}.")),  # 8
        visit(signed_pass(CAPTCHA_ADDRESS, "site.test", now + 10 * 7200)),  # 9: longer than PASS_TTL allows
        visit(signed_pass(BANNED_V4, "site.test", now + 600), address=BANNED_V4),  # 10: never lifts a ban
        visit(signed_pass(CAPTCHA_ADDRESS, "site.test", now + 600)),  # 11: signed here, as the Worker signs
        visit(f"a=b; {PASS_COOKIE}=junk; {PASS_COOKIE}=1.x; " + signed_pass(CAPTCHA_ADDRESS, "site.test", now + 600)),
        # 13: fifty forged passes before a good one: only the first three are checked, so no client
        # can make the Worker run fifty signature checks
        visit(
            "; ".join(
                [f"{PASS_COOKIE}={now + 600}.{'A' * 43}"] * 50 + [signed_pass(CAPTCHA_ADDRESS, "site.test", now + 600)]
            )
        ),
    ]
    result = drive(config=wrangler(**TURNSTILE), keys=captcha_keys, requests=work, analytics=True)
    answers = result["responses"]
    challenge, solved, passed, posted, other_address, other_host, expired, forged, altered, too_long = answers[:10]
    banned, signed_here, among_junk, buried = answers[10:]

    assert is_challenge(challenge) and events(challenge) == ["challenge_shown"]
    policy = challenge["headers"]["content-security-policy"]
    assert (
        "script-src https://challenges.cloudflare.com" in policy
        and "frame-src https://challenges.cloudflare.com" in policy
    )
    assert "default-src 'none'" in policy and "form-action 'self'" in policy
    assert solved["status"] == 303 and solved["headers"]["location"] == f"{SITE}/page?q=1" and not solved["origin"]
    cookie, *attributes = solved["headers"]["set-cookie"].split("; ")
    assert attributes == ["Max-Age=7200", "Path=/", "Secure", "HttpOnly", "SameSite=Lax"]
    expiry = int(cookie.removeprefix(f"{PASS_COOKIE}=").split(".")[0])
    assert cookie == signed_pass(CAPTCHA_ADDRESS, "site.test", expiry) and now + 7200 <= expiry <= time.time() + 7200
    assert result["siteverify"] == [
        {
            "response": "solved|site.test",
            "remoteip": CAPTCHA_ADDRESS,
            "secretOk": True,
            "fields": ["secret", "response", "remoteip"],
        }
    ]
    assert events(solved) == ["challenge_passed"]
    assert passed_unchanged(passed) and events(passed) == ["pass_honoured"]
    assert passed_unchanged(posted, method="POST", body="a=1")
    for refused in (other_address, other_host, expired, forged, altered, too_long):
        assert is_challenge(refused)
    assert is_ban_page(banned) and events(banned) == ["ban"]
    assert passed_unchanged(signed_here) and passed_unchanged(among_junk) and is_challenge(buried)
    # KV: one read per request (and the two tables' with the first), whatever the captcha did,
    # and not one write.
    assert only_reads(answers) and [len(a["kv"]) for a in answers] == [3] + [1] * (len(answers) - 1)


FAILING_TOKENS = [
    "refused",  # siteverify says no
    "solved|other.test",  # a real solve, for another host name
    "solved|",  # for no host name
    "down",  # siteverify unreachable
    "5xx",
    "junk",  # not JSON
    "truthy|site.test",  # success: "true", not true
    "huge|site.test",  # a success buried in a megabyte
    "redirect|site.test",  # to where the same question would pass: not followed
]


def test_a_check_that_fails_shows_the_challenge_again_saying_so(keys):
    result = drive(config=wrangler(**TURNSTILE), keys=keys, requests=[answer(token) for token in FAILING_TOKENS])
    for token, failed in zip(FAILING_TOKENS, result["responses"], strict=True):
        assert is_challenge(failed, failed=True), token  # a 403 page: never a 5xx
    assert [call["response"] for call in result["siteverify"]] == FAILING_TOKENS
    warnings = [log["message"] for log in result["logs"] if log["message"].startswith("captcha check failed")]
    assert len(warnings) == len(FAILING_TOKENS)
    assert 'siteverify vouched for "other.test", not site.test' in warnings[1]  # says which host, to fix the widget


def test_a_siteverify_that_does_not_answer_in_time_is_a_failed_check(keys):
    # Both would pass, a minute late or never: the Worker stops waiting and shows the challenge again.
    result = drive(
        config=wrangler(**TURNSTILE), keys=keys, requests=[answer("slow|site.test"), answer("stall|site.test")]
    )
    assert all(is_challenge(failed, failed=True) for failed in result["responses"])
    assert len(result["siteverify"]) == 2


def test_answers_that_are_not_one_token_never_reach_siteverify(keys):
    work = [
        answer(None),  # no token
        answer(""),
        answer("x" * 2049),  # longer than any Turnstile token
        {**answer(None), "body": "cf-turnstile-response=solved%7Csite.test&cf-turnstile-response=refused"},
        {**answer("solved|site.test"), "body": "cf-turnstile-response=solved%7Csite.test&pad=" + "x" * 1_000_000},
        {**answer("solved|site.test"), "headers": {"Content-Type": "text/plain"}},  # not the form: the challenge
        {**answer("solved|site.test"), "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
        {**answer("solved|site.test"), "method": "PUT"},
    ]
    result = drive(config=wrangler(**TURNSTILE), keys=keys, requests=work)
    *refused, plain, multipart, put = result["responses"]
    assert all(is_challenge(a, failed=True) for a in refused)
    assert all(is_challenge(a) for a in (plain, multipart, put))
    assert result["siteverify"] == []


@pytest.mark.parametrize(
    ("settings", "banned"),
    [
        ({}, True),  # the default: a captcha nobody can solve is a ban
        ({"CAPTCHA_FALLBACK": "ban"}, True),
        ({"CAPTCHA_FALLBACK": "allow"}, False),
        ({"CAPTCHA_FALLBACK": "Allow "}, True),  # not a value it knows: ban
        ({"CAPTCHA_FALLBACK": "allow", "TURNSTILE_SITE_KEY": "site-key-123"}, False),  # one key is no key
        ({"TURNSTILE_SECRET_KEY": TURNSTILE_SECRET}, True),
        ({"TURNSTILE_SITE_KEY": " ", "TURNSTILE_SECRET_KEY": TURNSTILE_SECRET}, True),  # blank is no key
    ],
)
def test_without_both_turnstile_keys_a_captcha_is_the_fallback(keys, settings, banned):
    config = wrangler(**settings)
    if "CAPTCHA_FALLBACK" not in settings:
        config["vars"].pop("CAPTCHA_FALLBACK")
    work = [visit(), answer("solved|site.test")]
    result = drive(config=config, keys=keys, requests=work)
    for response in result["responses"]:
        assert is_ban_page(response) if banned else passed_unchanged(response, **_as_sent(response))
        assert 'class="cf-turnstile"' not in response["body"]  # never a page that promises a check it cannot do
    assert result["siteverify"] == []


def _as_sent(response: dict) -> dict:
    seen = json.loads(response["body"])
    return {"method": seen["method"], "body": seen["body"]}


# As an operator might type it; read as the job reads DRY_RUN: a trial rollout with LOG_ONLY=1
# once enforced every decision.
@pytest.mark.parametrize("log_only", [" True", "1", "yes"])
def test_log_only_enforces_nothing_and_logs_what_it_would_have_done(keys, log_only):
    config = wrangler(**TURNSTILE, LOG_ONLY=log_only)
    result = drive(config=config, keys=keys, requests=requests(BANNED_V4, CAPTCHA_ADDRESS, "192.0.2.8"), analytics=True)
    assert all(passed_unchanged(a) for a in result["responses"])
    logged = [json.loads(log["message"]) for log in result["logs"] if log["message"].startswith("{")]
    assert logged == [
        {"logOnly": True, "wouldDo": "ban", "address": BANNED_V4, "host": "site.test"},
        {"logOnly": True, "wouldDo": "captcha", "address": CAPTCHA_ADDRESS, "host": "site.test"},
    ]
    assert [events(a) for a in result["responses"]] == [["log_only"], ["log_only"], []]


def test_behind_pseudo_ipv4_the_real_ipv6_address_is_looked_up(keys):
    planted = [*keys, {"name": f"ip:{PSEUDO_BANNED_V6}", "value": "ban"}]

    def pseudo(connecting: str, real: str) -> dict:
        return {"url": f"{SITE}/page?q=1", "address": connecting, "headers": {"CF-Connecting-IPv6": real}}

    work = [
        pseudo("240.16.0.1", PSEUDO_BANNED_V6),  # Pseudo IPv4, "Overwrite Headers": the IPv6 holds the ban
        pseudo("255.255.255.255", "2001:DB8:0:0:0:0:0:66"),  # any class E address, any spelling
        pseudo("240.16.0.1", "2001:db8::67"),  # an IPv6 client without a decision
        pseudo("240.16.0.1", "not-an-address"),  # nothing better: the class E address, not listed
        pseudo("203.0.113.9", PSEUDO_BANNED_V6),  # a real IPv4 client cannot borrow an IPv6 address
        pseudo("239.255.255.255", PSEUDO_BANNED_V6),  # just below class E
    ]
    answers = drive(config=wrangler(), keys=planted, requests=work)["responses"]
    assert [is_ban_page(a) for a in answers] == [True, True, False, False, False, False]
    assert all(passed_unchanged(a) for a in answers[2:])
    looked_up = [a["kv"][0][1] for a in answers]
    assert looked_up == [f"ip:{PSEUDO_BANNED_V6}"] * 2 + [
        "ip:2001:db8::67",
        "ip:240.16.0.1",
        "ip:203.0.113.9",
        "ip:239.255.255.255",
    ]


@pytest.mark.parametrize("metrics", [None, "not a dataset"])
def test_without_a_dataset_bound_nothing_is_counted_and_nothing_breaks(keys, metrics):
    # Also: a site key that would break out of its attribute stays in it, escaped.
    settings = {**TURNSTILE, "TURNSTILE_SITE_KEY": 'k"><script>alert(1)</script>'}
    if metrics is not None:
        settings["METRICS"] = metrics  # something else under the dataset's name: writes fail, the pages do not
    work = [visit(address=BANNED_V4), visit(), answer("solved|site.test")]
    result = drive(config=wrangler(**settings), keys=keys, requests=work)
    banned, challenge, solved = result["responses"]
    assert is_ban_page(banned) and solved["status"] == 303
    assert is_challenge(challenge, site_key="k&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;")
    assert "<script>alert" not in challenge["body"]
    assert all(a["points"] == [] for a in result["responses"])
    failed_writes = [log for log in result["logs"] if "Analytics Engine write failed" in log["message"]]
    assert len(failed_writes) == (0 if metrics is None else 3)


@pytest.mark.parametrize(
    ("ttl", "used", "said"),
    [
        ("60", 60, None),
        ("1e9", 7200, 'PASS_TTL="1e9": not a whole number of seconds, 7200 used'),
        ("Infinity", 7200, 'PASS_TTL="Infinity": not a whole number of seconds, 7200 used'),
        ("-5", 7200, 'PASS_TTL="-5": not a whole number of seconds, 7200 used'),
        # a pass that could run out before the browser is back from the 303: the visitor would loop
        ("0", 60, "PASS_TTL=0: outside 60..2592000, 60 used"),
        ("2147483648", 2592000, "PASS_TTL=2147483648: outside 60..2592000, 2592000 used"),  # past 30 days
    ],
)
def test_pass_ttl_sets_how_long_a_pass_lasts_and_a_value_out_of_range_is_clamped_and_said(keys, ttl, used, said):
    now = int(time.time())
    work = [answer("solved|site.test"), visit(signed_pass(CAPTCHA_ADDRESS, "site.test", now + 600)), visit()]
    result = drive(config=wrangler(**TURNSTILE, PASS_TTL=ttl), keys=keys, requests=work)
    granted, held, _ = result["responses"]
    assert f"Max-Age={used};" in granted["headers"]["set-cookie"]
    assert passed_unchanged(held) if used > 600 else is_challenge(held)  # a pass reaching past PASS_TTL: refused
    # said once per isolate, not once per request (each of the three read PASS_TTL)
    assert [log["message"] for log in result["logs"] if "PASS_TTL" in log["message"]] == ([said] if said else [])


TEST_KEYS = {
    "TURNSTILE_SITE_KEY": "1x00000000000000000000AA",
    "TURNSTILE_SECRET_KEY": "1x0000000000000000000000000000000AA",
}


def test_turnstiles_test_keys_fail_the_host_check_as_the_readme_says(keys):
    # Turnstile's "always passes" test secret: siteverify says success, for the host name
    # example.com whatever the site. The operator trying them sees the challenge again, saying the
    # check did not go through, and `wrangler tail` shows the line worker/README.md quotes.
    result = drive(config=wrangler(**TEST_KEYS), keys=keys, requests=[visit(), answer("solved|example.com")])
    challenge, refused = result["responses"]
    assert is_challenge(challenge, site_key=TEST_KEYS["TURNSTILE_SITE_KEY"])
    assert is_challenge(refused, failed=True, site_key=TEST_KEYS["TURNSTILE_SITE_KEY"])
    # The first page sends itself once solved; the one after a failed check waits for "Continue",
    # or a widget that always solves and a check that always fails would loop without end.
    assert 'data-callback="' in challenge["body"] and "data-callback" not in refused["body"]
    (said,) = [log["message"] for log in result["logs"] if log["message"].startswith("captcha check failed")]
    assert "example.com" in said and "test keys" in said
    readme = (WORKER / "README.md").read_text()
    assert said.replace("site.test", "<your host name>") in readme


# --------------------------------------------------------------------------- the pass and its key


def test_a_pass_in_either_of_two_cookie_lines_is_honoured(keys):
    # A client may send its cookies on two Cookie lines; workerd joins them with ", ", not "; "
    # (fetch, and so Miniflare's dispatchFetch, would join them with "; " before sending).
    good = signed_pass(CAPTCHA_ADDRESS, "site.test", int(time.time()) + 600)
    work = [
        visit(cookieLines=["theme=dark", good]),  # the pass on the second line
        visit(cookieLines=[good, "theme=dark; lang=en"]),  # on the first
        visit(cookieLines=["theme=dark", "lang=en"]),  # no pass on either: the challenge
        visit(cookieLines=["theme=dark", f"{PASS_COOKIE}=junk, {good}"]),  # a comma inside a line, too
    ]
    second, first, none, among = drive(config=wrangler(**TURNSTILE), keys=keys, requests=work)["responses"]
    assert passed_unchanged(second) and passed_unchanged(first) and passed_unchanged(among)
    assert is_challenge(none)


OLD_PASS_SECRET = "old-pass-secret-0123456789abcdefghijkl"
NEW_PASS_SECRET = "new-pass-secret-0123456789abcdefghijkl"


def pass_secret_warnings(result: dict) -> list[str]:
    return [log["message"] for log in result["logs"] if log["message"].startswith("PASS_SECRET")]


def test_pass_secret_rotates_as_the_readme_says_and_the_turnstile_secret_freely(keys):
    # Before: PASS_SECRET signs every pass.
    before = wrangler(**(TURNSTILE | {"PASS_SECRET": OLD_PASS_SECRET}))
    result = drive(config=before, keys=keys, requests=[answer("solved|site.test")])
    given_before = result["responses"][0]["headers"]["set-cookie"].split(";")[0]
    expiry = int(given_before.removeprefix(f"{PASS_COOKIE}=").split(".")[0])
    assert given_before == signed_pass(CAPTCHA_ADDRESS, "site.test", expiry, secret=OLD_PASS_SECRET)
    assert pass_secret_warnings(result) == []

    # During (worker/README.md): the old one as PASS_SECRET_PREVIOUS, a new PASS_SECRET; the
    # Turnstile secret rotated too, which no longer touches passes.
    signed_with_turnstile = signed_pass(CAPTCHA_ADDRESS, "site.test", expiry, secret=TURNSTILE_SECRET)
    rotated = {"TURNSTILE_SECRET_KEY": "rotated-turnstile-secret", "PASS_SECRET": NEW_PASS_SECRET}
    during = wrangler(**(TURNSTILE | rotated), PASS_SECRET_PREVIOUS=OLD_PASS_SECRET)
    work = [visit(given_before), answer("solved|site.test"), visit(signed_with_turnstile)]
    result = drive(config=during, keys=keys, requests=work)
    kept, solved, not_ours = result["responses"]
    assert passed_unchanged(kept)  # a pass given before the rotation still lets its holder through
    given_during = solved["headers"]["set-cookie"].split(";")[0]
    expiry = int(given_during.removeprefix(f"{PASS_COOKIE}=").split(".")[0])
    assert given_during == signed_pass(CAPTCHA_ADDRESS, "site.test", expiry, secret=NEW_PASS_SECRET)
    assert is_challenge(not_ours)  # with PASS_SECRET set, the Turnstile secret signs nothing
    assert result["siteverify"][0]["secretOk"] and pass_secret_warnings(result) == []

    # After PASS_TTL: PASS_SECRET_PREVIOUS deleted, the old passes end.
    after = wrangler(**(TURNSTILE | {"PASS_SECRET": NEW_PASS_SECRET}))
    old, new = drive(config=after, keys=keys, requests=[visit(given_before), visit(given_during)])["responses"]
    assert is_challenge(old) and passed_unchanged(new)


@pytest.mark.parametrize(
    ("pass_secret", "said"),
    [
        (None, "PASS_SECRET is not set: passes are signed with TURNSTILE_SECRET_KEY, so rotating it ends every pass"),
        (" ", "PASS_SECRET is not set: passes are signed with TURNSTILE_SECRET_KEY, so rotating it ends every pass"),
        ("short-secret", "PASS_SECRET has 12 characters: use 32 or more, random"),
    ],
)
def test_without_a_usable_pass_secret_passes_still_work_and_the_worker_says_so_once(keys, pass_secret, said):
    config = wrangler(**TURNSTILE)
    if pass_secret is None:
        config["vars"].pop("PASS_SECRET")
    else:
        config["vars"]["PASS_SECRET"] = pass_secret
    signing = TURNSTILE_SECRET if pass_secret in (None, " ") else pass_secret  # as before PASS_SECRET existed
    held = signed_pass(CAPTCHA_ADDRESS, "site.test", int(time.time()) + 600, secret=signing)
    result = drive(config=config, keys=keys, requests=[answer("solved|site.test"), visit(passFrom=0), visit(held)])
    solved, passed, kept = result["responses"]
    assert solved["status"] == 303 and passed_unchanged(passed) and passed_unchanged(kept)
    assert pass_secret_warnings(result) == [said]  # once per isolate, not once per request


# --------------------------------------------------------------------------- the challenge page's own script


RUN_CHALLENGE_SCRIPT = """
const vm = require("node:vm");
const { script, callback, formId, widgetField } = JSON.parse(require("node:fs").readFileSync(0, "utf8"));
const added = [];
const submitted = [];
const elements = widgetField ? { "cf-turnstile-response": { value: "" } } : {};
const field = () => elements["cf-turnstile-response"] ?? added.find((node) => node.name === "cf-turnstile-response");
const form = { elements, appendChild: (node) => added.push(node), submit: () => submitted.push(field().value) };
const document = {
  getElementById: (id) => (id === formId ? form : null),
  createElement: (tag) => ({ tag }),
};
const context = vm.createContext({ document });
vm.runInContext(script, context);
vm.runInContext(`${callback}("the-token")`, context);
process.stdout.write(JSON.stringify({ submitted, added }));
"""


def test_the_challenge_sends_itself_once_solved_by_a_script_its_csp_allows_by_hash(keys):
    (challenge,) = drive(config=wrangler(**TURNSTILE), keys=keys, requests=[visit()])["responses"]
    assert is_challenge(challenge)
    body = challenge["body"]
    inline = re.findall(r"<script>(.*?)</script>", body, flags=re.DOTALL)
    assert len(inline) == 1 and len(re.findall(r"<script", body)) == 2  # its own, and Turnstile's api.js
    directives = dict(d.strip().split(" ", 1) for d in challenge["headers"]["content-security-policy"].split(";"))
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    assert directives["script-src"].split() == ["https://challenges.cloudflare.com", f"'sha256-{digest}'"]
    assert "unsafe-inline" not in directives["script-src"] and "unsafe-eval" not in directives["script-src"]

    (callback,) = re.findall(r'data-callback="([A-Za-z_$][\w$]*)"', body)  # Turnstile calls it once solved
    (form_id,) = re.findall(r'<form method="post" id="([^"]+)">', body)
    for widget_field in (True, False):  # the widget's hidden field already there, or not yet
        run = subprocess.run(
            [node(), "-e", RUN_CHALLENGE_SCRIPT],
            input=json.dumps(
                {"script": inline[0], "callback": callback, "formId": form_id, "widgetField": widget_field}
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        ran = json.loads(run.stdout)
        assert ran["submitted"] == ["the-token"]  # the form went, once, with the token in its field
        assert len(ran["added"]) == (0 if widget_field else 1)  # never a second token field


def test_the_pinned_wrangler_bundles_the_worker_with_its_bindings(tmp_path):
    node("wrangler")
    # wrangler.toml as shipped, with the optional Analytics Engine dataset switched on.
    toml = (WORKER / "wrangler.toml").read_text()
    assert "# [[analytics_engine_datasets]]\n# binding" in toml and "SECRET" not in str(tomllib.loads(toml)["vars"])
    toml = re.sub(r"^# (\[\[analytics_engine_datasets\]\]|binding =|dataset =)", r"\1", toml, flags=re.MULTILINE)
    toml = toml.replace('main = "worker.js"', f"main = {json.dumps(str(WORKER / 'worker.js'))}")
    (tmp_path / "wrangler.toml").write_text(toml)
    done = subprocess.run(
        [WORKER / "node_modules" / ".bin" / "wrangler", "deploy", "--dry-run", "--outdir", tmp_path / "out"]
        + ["--config", tmp_path / "wrangler.toml"],
        capture_output=True,
        text=True,
        cwd=WORKER,
        env={**os.environ, "WRANGLER_SEND_METRICS": "false"},
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "wrangler 4.86.0" in done.stdout
    assert all(f"env.{name} " in done.stdout for name in ("DECISIONS", "METRICS", "TURNSTILE_SITE_KEY", "PASS_TTL"))
    bundle = (tmp_path / "out" / "worker.js").read_text()
    assert all(part in bundle for part in ("function canonicalAddress", "crowdsec-pass-v1", "function challengePage"))


def test_every_install_script_in_the_lock_is_decided_in_allow_scripts():
    """npm 11 skips a dependency's install script unless package.json's `allowScripts` allows it,
    and warns about each package it does not list: every one the lock installs is listed (denied:
    the Worker and its tests run without them, and `npm ci` stays quiet)."""
    lock = json.loads((WORKER / "package-lock.json").read_text())
    scripted = {
        path.rsplit("node_modules/", 1)[1]
        for path, package in lock["packages"].items()
        if package.get("hasInstallScript")
    }
    allowed = json.loads((WORKER / "package.json").read_text()).get("allowScripts", {})
    assert scripted and set(allowed) == scripted
    assert set(allowed.values()) == {False}
