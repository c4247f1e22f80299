from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import settings

import lapi_kv_sync as job
from tests.standins import ACCOUNT, NAMESPACE, KvStandin, LapiStandin, PushgatewayStandin

# Hypothesis fails an example slower than 200 ms by default: on a loaded machine that is the
# machine's speed, not the code's. No test here may depend on it.
settings.register_profile("any_speed", deadline=None)
settings.load_profile("any_speed")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "lapi_kv_sync.py"
# The mutation check (tests/README.md) runs the tests on a copy of the job that mutmut rewrote:
# its source no longer reads as the job's, so tests that scan the source leave that to the usual runs.
UNDER_MUTATION = "MUTANT_UNDER_TEST" in os.environ
# Under it, the test files it takes beyond the fast ones (test_tables.py, test_proxy.py) give only
# their pure tests: those that start stand-in servers are the usual runs' (pytest_collection_modifyitems).
SERVER_FIXTURES = frozenset({"stack", "proxied"})
LAPI_KEY = "lapi-test-key-0123456789"
CF_TOKEN = "cf-test-token-abcdefghijklmnop"
SECRETS = (LAPI_KEY, CF_TOKEN)


@dataclass
class Result:
    code: int
    out: str
    err: str
    sleeps: list[float] = field(default_factory=list)


class FakeClock:
    """Real wall time (moved by `offset` seconds), but `sleep` only moves the run's monotonic
    clock: retries cost no time."""

    def __init__(self, offset: float = 0.0) -> None:
        self.sleeps: list[float] = []
        self.slept = 0.0
        self.offset = offset

    def now(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.slept

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.slept += seconds

    def clock(self) -> job.Clock:
        return job.Clock(now=self.now, monotonic=self.monotonic, sleep=self.sleep)


def assert_no_secret(*texts: str, secrets: tuple[str, ...] = SECRETS) -> None:
    for text in texts:
        for secret in secrets:
            if secret in text:  # no `assert`: its explanation would print the secret
                pytest.fail("a secret appeared in the job's output", pytrace=False)


class Stack:
    """A LAPI, a KV and a Pushgateway stand-in, and the environment that points the job at them."""

    def __init__(self, lapi, kv: KvStandin, push, lapi_key: str = LAPI_KEY) -> None:
        self.lapi, self.kv, self.push, self.lapi_key = lapi, kv, push, lapi_key
        self.secrets = (lapi_key, CF_TOKEN)

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "LAPI_URL": self.lapi.url,
            "LAPI_KEY": self.lapi_key,
            "CF_ACCOUNT_ID": ACCOUNT,
            "CF_KV_NAMESPACE_ID": NAMESPACE,
            "CF_API_TOKEN": CF_TOKEN,
            "CF_API_URL": self.kv.api_url,
            "PUSHGATEWAY_URL": self.push.url,
            "HTTP_TIMEOUT": "30",  # the default: a short timeout only where the timeout is the subject
            "RUN_DEADLINE": "120",
            # Usage metrics go out when the wall clock says so; tests that are about them turn them on.
            "LAPI_USAGE_METRICS": "false",
        }
        env.update(extra)
        return {k: v for k, v in env.items() if v is not None}

    def run(self, *args: str, clock_offset: float = 0.0, **env: str) -> Result:
        """main() in-process, with real sockets and a clock whose sleeps cost nothing."""
        out, err, fake = io.StringIO(), io.StringIO(), FakeClock(clock_offset)
        code = job.main(list(args), self.env(**env), out, err, fake.clock())
        result = Result(code, out.getvalue(), err.getvalue(), fake.sleeps)
        assert_no_secret(result.out, result.err, secrets=self.secrets)
        return result

    def run_process(self, *args: str, env: dict[str, str] | None = None, **extra: str) -> Result:
        """The job as users run it: a separate Python process."""
        environment = {"PATH": os.environ.get("PATH", ""), **(env if env is not None else self.env(**extra))}
        done = subprocess.run(
            [sys.executable, str(SCRIPT), *args], env=environment, capture_output=True, text=True, timeout=120
        )
        assert_no_secret(done.stdout, done.stderr, secrets=self.secrets)
        return Result(done.returncode, done.stdout, done.stderr)


@contextlib.contextmanager
def fresh_stack() -> Iterator[tuple[Stack, Path]]:
    """The stand-ins and a temporary folder of their own: for each example of a Hypothesis test,
    where a fixture would last the whole test."""
    with (
        LapiStandin(LAPI_KEY) as lapi,
        KvStandin(CF_TOKEN) as kv,
        PushgatewayStandin() as push,
        tempfile.TemporaryDirectory() as tmp,
    ):
        yield Stack(lapi, kv, push), Path(tmp)


@pytest.fixture
def stack():
    with fresh_stack() as (stack, _):
        yield stack
        assert stack.kv.violations == [], "requests or answers outside Cloudflare's published schema"
        assert stack.lapi.violations == [], "usage metrics outside CrowdSec's published schema"


def pytest_collection_modifyitems(config, items):
    if not UNDER_MUTATION:
        return
    kept = [item for item in items if SERVER_FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept
