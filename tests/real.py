"""The real CrowdSec LAPI and the real Prometheus Pushgateway, started for the tests.

Both come from Debian's packages (`.ci/run` fetches them): CrowdSec 1.4.6 unpacked into
`.cache/crowdsec` (its package cannot be installed here: its post-install step registers
with CrowdSec's Central API over the internet), the Pushgateway installed. Where they are
absent the tests skip with the reason, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "crowdsec"
CACHES = (CACHE, ROOT / ".cache" / "prometheus")  # what .ci/install-components unpacks
# What a skip tells the reader to run: it installs everything the tests need (README, Quick start).
INSTALL = "bash .ci/install-components"
START_TIMEOUT = 30
LIFETIME = 1800  # seconds: a server left behind by a killed test run stops by itself


def bounded(command: list[str]) -> list[str]:
    """The command under coreutils' `timeout`, which also passes our SIGTERM on to it."""
    return ["timeout", str(LIFETIME), *command] if shutil.which("timeout") else command


def find(name: str) -> str | None:
    for candidate in (shutil.which(name), *(cache / "usr" / "bin" / name for cache in CACHES)):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def require(*names: str) -> list[str]:
    """The paths of these programs, or a skip (a failure under CI=true) naming what is missing."""
    found = [find(n) for n in names]
    missing = [n for n, path in zip(names, found, strict=True) if path is None]
    if missing:
        reason = f"{', '.join(missing)} not found on PATH or in .cache: `{INSTALL}` installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the real-component tests: {reason}", pytrace=False)
        pytest.skip(reason)
    return [p for p in found if p]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, process: subprocess.Popen, headers: dict | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready within {START_TIMEOUT}s")


def stop(process: subprocess.Popen | None) -> None:
    if process and process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


class Component:
    """A real server started for the tests: `with Component() as c:` starts it and always stops it."""

    def start(self) -> Component:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


class RealLapi(Component):
    """`crowdsec -no-cs -no-capi`: LAPI alone, on a throwaway config, sqlite db and port."""

    def __init__(self) -> None:
        self.crowdsec, self.cscli = require("crowdsec", "cscli")
        self.dir = Path(tempfile.mkdtemp(prefix="lapi-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = self.dir / "config.yaml"
        self.process: subprocess.Popen | None = None
        self.bouncer_key = ""

    def write_config(self) -> None:
        d = self.dir
        for sub in ("data", "hub", "log"):
            (d / sub).mkdir(exist_ok=True)
        etc = Path(self.crowdsec).parent.parent.parent / "etc" / "crowdsec"
        if not etc.exists():
            etc = Path("/etc/crowdsec")
        for name in ("profiles.yaml", "simulation.yaml"):
            shutil.copy(etc / name, d / name)
        (d / "hub" / ".index.json").write_text("{}")
        self.config.write_text(
            f"""common:
  daemonize: false
  log_media: file
  log_level: info
  log_dir: {d}/log
  working_dir: .
config_paths:
  config_dir: {d}/
  data_dir: {d}/data/
  simulation_path: {d}/simulation.yaml
  hub_dir: {d}/hub/
  index_path: {d}/hub/.index.json
  notification_dir: {d}/notifications/
  plugin_dir: {d}/plugins/
db_config:
  type: sqlite
  db_path: {d}/data/crowdsec.db
  use_wal: true
  log_level: info
api:
  client:
    credentials_path: {d}/local_api_credentials.yaml
  server:
    listen_uri: 127.0.0.1:{self.port}
    profiles_path: {d}/profiles.yaml
    log_level: info
prometheus:
  enabled: false
"""
        )

    def cscli_run(self, *args: str) -> str:
        done = subprocess.run([self.cscli, "-c", str(self.config), *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"cscli {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
        return done.stdout

    def start(self) -> RealLapi:
        if not self.config.exists():
            self.write_config()
            self.cscli_run("machines", "add", "-a", "--force", "-f", str(self.dir / "local_api_credentials.yaml"))
            self.bouncer_key = self.cscli_run("bouncers", "add", "kvsync", "-o", "raw").strip()
        self.process = subprocess.Popen(
            bounded([self.crowdsec, "-c", str(self.config), "-no-cs", "-no-capi"]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # /health answers before the API is usable, and another server on the port would answer
        # it too: wait for our bouncer key to be accepted by our process.
        wait_until_ready(self.url + "/v1/decisions", self.process, {"X-Api-Key": self.bouncer_key})
        return self

    def stop(self) -> None:
        stop(self.process)
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def add(self, *args: str) -> None:
        self.cscli_run("decisions", "add", *args)

    def delete_all(self) -> None:
        self.cscli_run("decisions", "delete", "--all")

    def import_csv(self, path: Path) -> None:
        self.cscli_run("decisions", "import", "-i", str(path))


class RealPushgateway(Component):
    def __init__(self) -> None:
        (self.binary,) = require("prometheus-pushgateway")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process: subprocess.Popen | None = None

    def start(self) -> RealPushgateway:
        self.process = subprocess.Popen(
            bounded([self.binary, f"--web.listen-address={self.url.removeprefix('http://')}", "--persistence.file="]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until_ready(self.url + "/-/ready", self.process)
        return self

    def close(self) -> None:
        stop(self.process)

    def metrics(self) -> dict[str, float]:
        """Every series of our job, `name{labels}` without the job/instance labels -> value."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as answer:
            text = answer.read().decode()
        series = {}
        for line in text.splitlines():
            if line.startswith("crowdsec_kv_sync_") and 'job="crowdsec-kv-sync"' in line:
                name, value = line.rsplit(" ", 1)
                base, _, labels = name.partition("{")
                kept = [p for p in labels.rstrip("}").split(",") if p and not p.startswith(("job=", "instance="))]
                series[base + ("{" + ",".join(kept) + "}" if kept else "")] = float(value)
        return series
