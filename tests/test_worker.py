"""The reference Worker (worker/) run in workerd through Miniflare, against the keys the job itself wrote.

Each test prepares data here and hands it to worker/test/drive.mjs, which starts Miniflare with
worker.js, the vars and the KV binding of worker/wrangler.toml, and says what the Worker answered.
Needs node and `npm ci` in worker/: skipped without them, except under CI=true, where it fails.
"""

from __future__ import annotations

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


def wrangler(**vars: str) -> dict:
    """What Miniflare needs from the example wrangler.toml, so the example is what gets tested."""
    toml = tomllib.loads((WORKER / "wrangler.toml").read_text())
    (namespace,) = toml["kv_namespaces"]
    return {
        "main": toml["main"],
        "compatibilityDate": toml["compatibility_date"],
        "binding": namespace["binding"],
        "vars": {**toml["vars"], **vars},
    }


def node() -> str:
    found = shutil.which("node")
    if found and (WORKER / "node_modules" / "miniflare").is_dir():
        return found
    reason = "needs node and `npm ci` in worker/"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: .ci/run installs both")
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
        {"name": name, "value": entry.value, "expiration": entry.expiration, "metadata": entry.metadata}
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
    answers = drive(config=wrangler(), keys=keys + planted, requests=requests(*addresses))["responses"]
    by_address = dict(zip(addresses, answers, strict=True))

    for address in [*BANNED_SPELLINGS, "198.51.100.20"]:
        assert is_ban_page(by_address[address]), address
        assert by_address[address]["headers"]["content-type"].startswith("text/html")
    for address in CAPTCHA_SPELLINGS:
        answer = by_address[address]
        assert (answer["status"], answer["origin"]) == (403, False), address
        assert "verify you are human" in answer["body"] and "Access denied" not in answer["body"]
    for address in UNLISTED + MALFORMED:
        assert passed_unchanged(by_address[address]), address
    assert all(a["headers"].get("cache-control") == "no-store" for a in answers if not a["origin"])


def test_an_unlisted_client_reaches_the_origin_with_its_request_as_sent(keys):
    work = [{"url": f"{SITE}/form", "address": "192.0.2.9", "method": "POST", "body": "a=1&b=2"}]
    (answer,) = drive(config=wrangler(), keys=keys, requests=work)["responses"]
    assert passed_unchanged(answer, url=f"{SITE}/form", method="POST", body="a=1&b=2")


def test_a_captcha_can_redirect_to_a_challenge_and_the_challenge_stays_reachable(keys):
    challenge = "https://site.test/challenge"
    work = requests("2001:db8::1:0:0:7") + [{"url": challenge, "address": "2001:DB8::1:0:0:7"}]
    redirect, own_page = drive(config=wrangler(CAPTCHA_URL=challenge), keys=keys, requests=work)["responses"]
    assert redirect["status"] == 302 and not redirect["origin"]
    assert redirect["headers"]["location"] == challenge + "?return_to=" + urllib.parse.quote(
        f"{SITE}/page?q=1", safe=""
    )
    assert passed_unchanged(own_page, url=challenge)


def test_a_kv_that_throws_lets_every_request_through():
    # Every read fails, so no key can be found: a banned address passes, as one with no key does.
    answers = drive(config=wrangler(), brokenKv=True, requests=requests(BANNED_V4, "2001:db8::1:0:0:7"))
    assert all(passed_unchanged(a) for a in answers["responses"])


@pytest.mark.parametrize("cache_ttl", ["5", "soon", ""])
def test_a_cache_ttl_kv_would_refuse_does_not_turn_enforcement_off(keys, cache_ttl):
    # KV throws on a cacheTtl under 30 s: taken as is, the Worker would fail open on every request.
    (answer,) = drive(config=wrangler(CACHE_TTL=cache_ttl), keys=keys, requests=requests(BANNED_V4))["responses"]
    assert is_ban_page(answer)


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


# --------------------------------------------------------------------------- the README's Turnstile recipe


def turnstile_worker(directory: Path) -> Path:
    """worker.js with captcha() replaced by worker/README.md's Turnstile recipe, as the README says."""
    readme = (WORKER / "README.md").read_text()
    (recipe,) = re.findall(r"```js\n(const PASS_SECONDS.*?)```", readme, re.DOTALL)
    source = (WORKER / "worker.js").read_text()
    start, end = source.index("// A captcha decision"), source.index("function page(")
    call = "return captcha(request, env);"
    assert source.count(call) == 1
    for module in WORKER.glob("*.js"):  # the modules worker.js imports, beside it
        shutil.copy(module, directory)
    path = directory / "worker.js"
    path.write_text(source[:start].replace(call, "return captcha(request, env, address);") + recipe + source[end:])
    return path


def turnstile_pass(secret: str, address: str, until: int) -> str:
    mac = hmac.new(secret.encode(), f"{address}|{until}".encode(), hashlib.sha256).hexdigest()
    return f"kv_pass={until}.{mac}"


def test_the_readme_turnstile_recipe_lets_a_solved_challenge_through_and_nothing_else(keys, tmp_path):
    secret, address, now = "turnstile-secret", "2001:db8::1:0:0:7", int(time.time())
    config = wrangler(TURNSTILE_SITE_KEY="site-key-123", TURNSTILE_SECRET=secret)
    config["main"] = str(turnstile_worker(tmp_path))

    def solve(token: str, return_to: str) -> dict:
        body = urllib.parse.urlencode({"cf-turnstile-response": token, "return_to": return_to})
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        return {"url": f"{SITE}/__turnstile", "address": address, "method": "POST", "body": body, "headers": form}

    def visit(cookie: str, who: str = address) -> dict:
        return {"url": f"{SITE}/page?q=1", "address": who, "headers": {"Cookie": cookie}}

    work = [
        {"url": f'{SITE}/page?q="><script>', "address": "2001:DB8:0:0:1::7"},
        solve("bad-token", "/page?q=1"),
        solve("good-token", "/page?q=1"),
        visit(turnstile_pass(secret, address, now + 600)),
        visit(turnstile_pass(secret, address, now - 1)),  # run out
        visit(turnstile_pass("another-secret", address, now + 600)),  # forged
        visit(turnstile_pass(secret, "198.51.100.20", now + 600), who="198.51.100.20"),  # never lifts a ban
        solve("good-token", "//evil.test/"),
        solve("good-token", "/\\evil.test/"),
    ]
    challenge, failed, solved, passed, expired, forged, banned, *off_site = drive(
        config=config, keys=keys, requests=work
    )["responses"]

    assert challenge["status"] == 403 and 'data-sitekey="site-key-123"' in challenge["body"]
    assert "<script>" not in challenge["body"].split("</script>", 1)[1]  # the URL cannot break out of the form
    assert failed["status"] == 403 and "set-cookie" not in failed["headers"]
    assert solved["status"] == 303 and solved["headers"]["location"] == "/page?q=1"
    cookie = solved["headers"]["set-cookie"].split(";")[0]
    until = int(cookie.removeprefix("kv_pass=").split(".")[0])
    assert cookie == turnstile_pass(secret, address, until) and now < until <= time.time() + 1800
    assert passed_unchanged(passed)
    assert [expired["status"], forged["status"]] == [403, 403] and not (expired["origin"] or forged["origin"])
    assert is_ban_page(banned)
    assert [a["headers"]["location"] for a in off_site] == ["/", "/"]
