#!/usr/bin/env python3
"""lapi-kv-sync: make a Cloudflare Workers KV namespace hold exactly CrowdSec LAPI's bans.

One run: read every decision from LAPI, project them onto the keys an edge Worker reads
(`ip:<addr>` -> `ban` | `captcha`), list the keys KV holds, and write or delete only what
differs. A run where LAPI did not change costs one LAPI read and the list pages: no writes.
When LAPI cannot be read nothing in KV is touched, so existing keys expire by their TTL.

Standard library only, so it runs on a stock python:3.12-alpine from a mounted file.
Exit codes: 0 done, 1 Cloudflare side failed, 2 configuration, 3 LAPI unreadable (skipped),
4 STATE_FILE's volume kept the run from changing KV, 143 / 130 stopped by SIGTERM / SIGINT.
"""

from __future__ import annotations

import signal

# A run stopped while Python imports the rest (0.1-0.3 s: a pod deleted as it starts) must still
# log and exit 143, not die silently: run as a script, the signal is noted here, and main() acts
# on it once it can log.
EARLY_SIGNALS: list[int] = []
if __name__ == "__main__":
    for _signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_signum, lambda signum, frame: EARLY_SIGNALS.append(signum))

import argparse
import array
import base64
import binascii
import bisect
import codecs
import contextlib
import difflib
import email.utils
import errno
import fcntl
import functools
import gc
import gzip
import hashlib
import http.client
import io
import ipaddress
import itertools
import json
import math
import operator
import os
import platform
import random
import re
import reprlib
import socket
import ssl
import stat
import struct
import sys
import threading
import time
import traceback
import urllib.parse
import zlib
from collections import ChainMap, Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TextIO

__version__ = "0.2.0"
USER_AGENT = f"lapi-kv-sync/{__version__}"
JOB_NAME = "crowdsec-kv-sync"

EXIT_OK, EXIT_CLOUDFLARE, EXIT_CONFIG, EXIT_LAPI = 0, 1, 2, 3
EXIT_STATE = 4  # STATE_FILE's volume kept the run from changing KV (it could not make the record untrusted)

# Cloudflare's published limits (see SPEC.md, "Facts about the two APIs").
MIN_TTL = 60
MAX_KEY_BYTES = 512
MAX_METADATA_BYTES = 1024
MAX_BULK_ITEMS = 10_000
LIST_LIMIT = 1000
# A key is up to date while its expiration is within this of where a write would put it (the
# decision's end); it also absorbs the 60 s TTL floor, so a decision with under a minute left is
# never rewritten. A key is never left to outlive its decision by more than this.
EXPIRATION_SLACK = 60
# CrowdSec refreshes its blocklists by re-inserting every decision with a later end: a key whose
# decision now ends later is left as it is while its expiration is more than this ahead, and
# rewritten, with the decision's end, once it comes within it. Fifteen minutes is fifteen runs
# at the CronJob's schedule, so one failed run or a Cloudflare outage of a few minutes never lets
# such a key lapse; a key then costs one write per life of its decision, not one per refresh.
REFRESH_AHEAD = 15 * 60
# The longest TTL the job sets: a year. A longer decision (a hand-made ban for ten years) gets a
# key of a year, rewritten as any key is when it comes within REFRESH_AHEAD of its expiration, so
# it lasts while the decision does; a key without an expiration would outlive a job that stopped.
MAX_TTL = 365 * 24 * 3600
REMEDIATIONS = ("ban", "captcha")  # strongest first
REMEDIATION_RANK = {r: len(REMEDIATIONS) - i for i, r in enumerate(REMEDIATIONS)}
IGNORE_REASONS = ("expired", "scope", "type", "invalid", "range_too_large", "table_full")
# The tables' entries by scope, as the figures count them: the network table's (Range, and the
# Ip decisions of TABLE_ORIGINS), and the scope table's.
TABLE_SCOPES = ("network", "country", "as")
SAMPLE_KEYS = 20


# --------------------------------------------------------------------------- configuration

# A secret goes into an HTTP header: one line of visible ASCII. A key shorter than this is no
# real key, and redacting it from every log line would blank ordinary words.
_SECRET_TEXT = re.compile(r"[\x21-\x7e]+")
MIN_SECRET_LENGTH = 8


# Values the examples once shipped (k8s/examples, worker/wrangler.toml, k8s/secret.example.yaml):
# they pass for real ones, so a deployment that kept one failed on every run with a 404 or 403.
# The examples now use `<…>` placeholders, which no setting accepts either.
EXAMPLE_VALUES = frozenset(
    {
        "0123456789abcdef0123456789abcdef",
        "fedcba9876543210fedcba9876543210",
        "REPLACE-WITH-THE-BOUNCER-KEY",
        "REPLACE-WITH-THE-CLOUDFLARE-API-TOKEN",
    }
)


def placeholder(value: str) -> bool:
    """Whether a setting still holds an example's placeholder (`<your-account-id>`)."""
    return value.startswith("<") and value.endswith(">") or value in EXAMPLE_VALUES


class ConfigError(Exception):
    """Every problem found in the configuration, reported together."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Config:
    cf_account_id: str
    cf_namespace_id: str
    cf_api_token: str = field(repr=False)
    lapi_key: str = field(default="", repr=False)
    lapi_url: str = "http://crowdsec-service.crowdsec.svc.cluster.local:8080"
    cf_api_url: str = "https://api.cloudflare.com/client/v4"
    pushgateway_url: str = ""
    kv_key_prefix: str = "ip:"
    run_deadline: float = 240.0
    http_timeout: float = 30.0
    lapi_ca_cert: str = ""
    lapi_client_cert: str = ""
    lapi_client_key: str = ""
    lapi_origins: tuple[str, ...] = ()
    lapi_scenarios_containing: tuple[str, ...] = ()
    lapi_scenarios_not_containing: tuple[str, ...] = ()
    max_deletes: int | None = None
    expand_ranges_max: int = 0
    log_format: str = "text"
    lapi_usage_metrics: bool = True
    # What every decision in LAPI's answer projects to is kept (and with a trusted state record
    # the answer itself, until it is known to have changed): 48 MiB is about 300,000 decisions
    # (LAPI sends 150-200 bytes each); runs of 300,000 peak at 129-224 MiB, an answer at this cap
    # at 153-364 MiB (bench/results/memory-at-cap.md), inside the CronJob's 448Mi memory limit.
    lapi_max_bytes: int = 48 * 1024 * 1024
    state_file: str = ""
    audit_interval: float = 900.0
    scope_table: bool = True  # the tables (SCOPE_TABLE=false: address keys only)
    # A Worker parses the whole scope table (the reference one once a minute per isolate): smaller
    # is cheaper in its CPU time. 4 MiB is about 110,000 countries and AS (37 bytes each).
    scope_table_max_bytes: int = 4 * 1024 * 1024
    # The LAPI origins whose Ip decisions go into the network table rather than address keys
    # (`*`: all; none: the network table holds Range decisions only).
    table_origins: frozenset[str] = frozenset()
    # The network table is mapped, not parsed, so its size costs a Worker only the read: 8 MiB is
    # 500,000 IPv4 intervals (16 bytes each), more than an answer at LAPI_MAX_BYTES can hold.
    table_max_bytes: int = 8 * 1024 * 1024
    proxies: Proxies = field(default_factory=lambda: Proxies())  # a lambda: Proxies is defined below
    # --check-edge: the site's base URL, and the Worker's STATUS_TOKEN that opens its status ("": not asked)
    edge_url: str = ""
    status_token: str = field(default="", repr=False)

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.lapi_key, self.cf_api_token, self.status_token, *self.proxies.secrets) if s)


class Proxy(NamedTuple):
    """An HTTP proxy, from HTTPS_PROXY or HTTP_PROXY: spoken to in plain HTTP, an https:// target
    reached through a CONNECT tunnel with TLS still end to end with the target."""

    host: str
    port: int
    variable: str  # the variable it came from, for messages
    user: str = ""
    password: str = ""

    def __str__(self) -> str:  # what messages show: never the credentials
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"the proxy {host}:{self.port} ({self.variable})"

    __repr__ = __str__  # a Config in a traceback must not show the password either

    @property
    def authorization(self) -> str:
        """The Proxy-Authorization header's value; "" without credentials."""
        if not (self.user or self.password):
            return ""
        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode("ascii")


class Proxies(NamedTuple):
    https: Proxy | None = None
    http: Proxy | None = None
    no_proxy: tuple[str, ...] = ()  # NO_PROXY's entries, lower case, leading dots stripped

    def for_url(self, scheme: str, host: str, port: int) -> Proxy | None:
        """The proxy a request to this URL goes through; None to go direct."""
        proxy = self.https if scheme == "https" else self.http
        return None if proxy is None or bypasses_proxy(self.no_proxy, host, port) else proxy

    @property
    def secrets(self) -> tuple[str, ...]:
        proxies = [p for p in (self.https, self.http) if p is not None]
        return tuple(s for p in proxies for s in (p.password, p.authorization.removeprefix("Basic ")) if s)


# Each proxy variable as curl and Python read them: the lower-case name wins when both are set
# (even empty: `https_proxy=` turns HTTPS_PROXY off), as urllib.request.getproxies_environment does.
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY")


def proxy_variable(env: Mapping[str, str], name: str) -> tuple[str, str]:
    """The variable that sets this proxy setting (lower case first) and its value."""
    for variable in (name.lower(), name):
        if variable in env:
            return variable, env[variable].strip()
    return name, ""


_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def parse_proxy(variable: str, value: str) -> tuple[Proxy | None, str]:
    """A proxy URL, `http://[user:password@]host:port` (`host:port` alone means http:// too, as
    curl and Python take it), and what is wrong with it ("" when nothing is). The message never
    holds the credentials."""
    if not value:
        return None, ""
    must = f"{variable} must be a proxy URL http://host:port (or http://user:password@host:port)"
    # Never the credentials: all before the last "@" is left out, as a password may hold any of
    # "/", "://" and "@" (one in base64 has "/"), written as it is instead of percent-encoded.
    scheme = _URL_SCHEME.match(value)
    shown = (scheme[0] if scheme else "") + "…" + value[value.rfind("@") :] if "@" in value else value
    if scheme and scheme[1].lower() != "http":
        return None, f"{must}, got {scheme[1]}://…: only a proxy spoken to in plain HTTP is supported"
    rest = value[scheme.end() :] if scheme else value
    try:
        parts = urllib.parse.urlsplit("http://" + rest)
        host, port = parts.hostname, parts.port
    except ValueError:  # an unclosed [IPv6 literal, a port that is not a number or past 65535
        parts, host, port = None, None, None
    if parts is None or not host or not port or parts.path not in ("", "/") or parts.query or parts.fragment:
        encoded = " (/ ? # @ : in a user name or password percent-encoded)" if "@" in value else ""
        return None, f"{must}{encoded}, got {shown!r}"
    if why := unresolvable(host):
        return None, f"{variable}: {host!r} is not a host name: {why}"
    user, password = urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or "")
    if any(not c.isprintable() for c in user + password):
        return None, f"{variable}: the proxy credentials hold a control character"
    return Proxy(host, port, variable, user, password), ""


def no_proxy_entries(value: str) -> tuple[str, ...]:
    # A leading `*.` as a leading dot, as Go reads it: a NO_PROXY written for Go's tools
    # (`*.svc.cluster.local`) must not send the in-cluster LAPI to the proxy.
    entries = (e.strip().lower() for e in value.split(","))
    return tuple(name for e in entries if (name := e.removeprefix("*.").lstrip(".")))


def bypasses_proxy(entries: tuple[str, ...], host: str, port: int) -> bool:
    """Whether NO_PROXY's entries send this host direct, as curl and Python decide: `*` for every
    host, a name for itself and every name under it (`example.com`, `.example.com`), an address
    for itself, `host:port` for that port only, and (as curl does) a CIDR for the addresses in it.
    Host names are compared as written: nothing is looked up."""
    host = host.lower().strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in entries:
        if entry == "*":
            return True
        name, entry_port = entry, None
        if bracketed := re.fullmatch(r"\[([^\]]+)\](?::([0-9]+))?", entry):  # [IPv6] or [IPv6]:port
            name, entry_port = bracketed[1], bracketed[2]
        elif entry.count(":") == 1:  # host:port (more colons: an IPv6 address or network)
            name, entry_port = entry.split(":")
        if entry_port is not None and entry_port != str(port):
            continue
        if address is not None:
            with contextlib.suppress(ValueError):
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            continue
        if host == name or host.endswith("." + name):
            return True
    return False


def valid_port(parts: urllib.parse.SplitResult) -> bool:
    """No port, or one from 1 to 65535: http.client would take `:99999` modulo 65536."""
    try:
        port = parts.port
    except ValueError:  # not a number, or past 65535
        return False
    return port is None or port > 0


def unresolvable(host: str) -> str:
    """Why socket.getaddrinfo cannot look this host up ("" when it can): it encodes the name as
    IDNA first, and a name that cannot be (an empty label, one over 63 characters) fails there with
    a UnicodeError, not as a lookup."""
    try:
        host.encode("idna")
    except UnicodeError as e:
        return str(e)
    return ""


def load_config(env: Mapping[str, str], check_edge: str | None = None) -> Config:
    """Read the configuration once from an environment mapping; raise ConfigError naming every bad
    variable. With `check_edge` (--check-edge's URL) it is for that check: LAPI is not read, and
    STATUS_TOKEN is needed."""
    problems: list[str] = []

    def text(name: str, default: str = "") -> str:
        return env.get(name, "").strip() or default

    def secret(name: str) -> str:
        value, path = env.get(name, "").strip(), env.get(name + "_FILE", "").strip()
        source = name
        if value and path:
            problems.append(f"{name} and {name}_FILE are both set: set only one")
            return ""
        if path:
            source = f"{name}_FILE ({path})"
            try:
                with open(path, "rb") as f:
                    value = f.read().decode("utf-8").removeprefix("\ufeff").strip()
            except OSError as e:
                problems.append(f"{name}_FILE: cannot read {path}: {e.strerror}")
                return ""
            except UnicodeDecodeError:
                problems.append(f"{source} is not UTF-8 text")
                return ""
            if not value:
                problems.append(f"{source} is empty")
        # Never the value in a message: only what is wrong with it.
        if value and placeholder(value):
            problems.append(f"{source} holds the example's placeholder, not a real key: set it")
            return ""
        if value and not _SECRET_TEXT.fullmatch(value):
            what = "more than one line" if "\n" in value or "\r" in value else "a character that is not visible ASCII"
            problems.append(f"{source}: the secret holds {what}; it must be one line of visible ASCII characters")
            return ""
        if value and len(value) < MIN_SECRET_LENGTH:
            problems.append(f"{source}: the secret is under {MIN_SECRET_LENGTH} characters, too short to be a real key")
            return ""
        return value

    def url(name: str, default: str = "", given: str | None = None) -> str:
        value = (text(name, default) if given is None else given.strip()).rstrip("/")
        if value:
            try:
                parts = urllib.parse.urlsplit(value)
                hostname = parts.hostname
            except ValueError:  # an unclosed [IPv6 literal
                parts, hostname = None, None
            if parts is None or parts.scheme not in ("http", "https") or not hostname:
                problems.append(f"{name} must be an http:// or https:// URL, got {value!r}")
            elif parts.username or parts.password:
                problems.append(f"{name} must not carry credentials in the URL")
            elif not valid_port(parts):
                problems.append(f"{name} must have a port from 1 to 65535 (or none), got {value!r}")
            elif why := unresolvable(hostname):
                problems.append(f"{name}: {hostname!r} is not a host name: {why}")
        return value

    def lapi_base(name: str, default: str) -> str:
        valid = len(problems)
        value = url(name, default)
        if len(problems) > valid:
            return value
        # The job adds /v1/decisions and its query itself: a URL copied from LAPI's docs or a curl
        # line would ask for /v1/decisions/v1/decisions and get a 404 on every run.
        parts = urllib.parse.urlsplit(value)
        base_path = re.sub(r"/v1(?:/.*)?$", "", parts.path)
        if base_path != parts.path or parts.query or parts.fragment:
            base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, base_path.rstrip("/"), "", ""))
            problems.append(
                f"{name} is LAPI's base URL, its scheme, host and port (such as {Config.lapi_url}), without "
                f"the API path or a query, which the job adds: got {value!r}; set {base!r}"
            )
        return value

    def number(name: str, default: float | None, minimum: float, kind: type = float, maximum: float = math.inf) -> Any:
        raw = text(name)
        if not raw:
            return default
        try:
            value = kind(raw)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < minimum:
            problems.append(f"{name} must be a {'whole ' if kind is int else ''}number >= {minimum}, got {raw!r}")
            return default
        if value > maximum:
            problems.append(f"{name} must be at most {maximum} ({maximum / 1024 / 1024:g} MiB), got {value}")
            return default
        return value

    def identifier(name: str) -> str:
        value = text(name)
        if not value:
            problems.append(f"{name} is not set")
        elif placeholder(value):
            problems.append(f"{name} is still the example's placeholder {value!r}: set it to yours")
        elif not re.fullmatch(r"[0-9A-Za-z]{1,32}", value):
            problems.append(f"{name} must be a Cloudflare identifier (up to 32 letters and digits), got {value!r}")
        return value

    def words(name: str) -> tuple[str, ...]:
        return tuple(w.strip() for w in text(name).split(",") if w.strip())

    def readable_file(name: str) -> str:
        path = text(name)
        if path and not os.access(path, os.R_OK):
            problems.append(f"{name}: cannot read {path}")
        return path

    def record_file(name: str) -> str:
        path = text(name)
        # The volume's own path is an easy slip: the job would then audit on every run, with a warning.
        if path and (path.endswith("/") or os.path.isdir(path)):
            problems.append(f"{name} names a directory ({path}): name a file in it, e.g. {path.rstrip('/')}/record.gz")
        elif path and not os.path.isdir(directory := os.path.dirname(os.path.abspath(path))):
            # Not a warning: the job would then list every key on every run, as if it had no STATE_FILE.
            problems.append(f"{name}: the directory {directory} of {path} does not exist (is the volume mounted?)")
        return path

    lapi_client_cert = readable_file("LAPI_CLIENT_CERT")
    lapi_client_key = readable_file("LAPI_CLIENT_KEY")
    if bool(lapi_client_cert) != bool(lapi_client_key):
        problems.append("LAPI_CLIENT_CERT and LAPI_CLIENT_KEY go together: set both or neither")
    lapi_key = secret("LAPI_KEY")
    if not lapi_key and not lapi_client_cert and check_edge is None and not any("LAPI_KEY" in p for p in problems):
        problems.append("LAPI_KEY (or LAPI_KEY_FILE) is not set, and no LAPI_CLIENT_CERT is given")
    edge_url, status_token = "", ""
    if check_edge is not None:
        edge_url = url("--check-edge", given=check_edge)
        if not edge_url or "?" in edge_url or "#" in edge_url:
            problems.append(f"--check-edge takes the site's base URL (https://www.example.com), got {check_edge!r}")
        status_token = secret("STATUS_TOKEN")
        if not status_token and not any("STATUS_TOKEN" in p for p in problems):
            problems.append("STATUS_TOKEN (or STATUS_TOKEN_FILE) is not set: --check-edge sends it to the Worker")
        elif status_token and len(status_token) < MIN_STATUS_TOKEN_LENGTH:
            problems.append(
                f"STATUS_TOKEN: the secret is under {MIN_STATUS_TOKEN_LENGTH} characters, which the Worker refuses "
                "(its status stays off): make one with `openssl rand -hex 32`, for both"
            )
    cf_account_id = identifier("CF_ACCOUNT_ID")
    cf_namespace_id = identifier("CF_KV_NAMESPACE_ID")
    cf_api_token = secret("CF_API_TOKEN")
    if not cf_api_token and not any("CF_API_TOKEN" in p for p in problems):
        problems.append("CF_API_TOKEN (or CF_API_TOKEN_FILE) is not set")
    prefix = env.get("KV_KEY_PREFIX", "ip:")
    if not prefix or len(prefix.encode()) > 64 or any(c.isspace() for c in prefix):
        problems.append(f"KV_KEY_PREFIX must be 1 to 64 bytes with no white space, got {prefix!r}")
    log_format = text("LOG_FORMAT", "text").lower()
    if log_format not in ("text", "json"):
        problems.append(f"LOG_FORMAT must be text or json, got {log_format!r}")
    usage_metrics = text("LAPI_USAGE_METRICS", "true").lower()
    if usage_metrics not in ("true", "false"):
        problems.append(f"LAPI_USAGE_METRICS must be true or false, got {usage_metrics!r}")
    scope_table = text("SCOPE_TABLE", "true").lower()
    if scope_table not in ("true", "false"):
        problems.append(f"SCOPE_TABLE must be true or false, got {scope_table!r}")
    scope_table_max_bytes = number(
        "SCOPE_TABLE_MAX_BYTES", Config.scope_table_max_bytes, 1024, int, TABLE_MAX_BYTES_LIMIT
    )
    table_max_bytes = number("TABLE_MAX_BYTES", Config.table_max_bytes, 1024, int, TABLE_MAX_BYTES_LIMIT)
    table_origins = frozenset(words("TABLE_ORIGINS"))
    if table_origins and scope_table == "false":
        problems.append(
            "TABLE_ORIGINS puts decisions in the network table, which SCOPE_TABLE=false turns off: unset one"
        )
    if ALL_ORIGINS in table_origins and len(table_origins) > 1:
        problems.append(
            f"TABLE_ORIGINS is `*` (every origin) or a list of origins, not both: got {text('TABLE_ORIGINS')!r}"
        )
    proxies = {}
    for name in ("HTTPS_PROXY", "HTTP_PROXY"):
        proxies[name], problem = parse_proxy(*proxy_variable(env, name))
        if problem:
            problems.append(problem)
    config = dict(
        proxies=Proxies(
            proxies["HTTPS_PROXY"], proxies["HTTP_PROXY"], no_proxy_entries(proxy_variable(env, "NO_PROXY")[1])
        ),
        lapi_url=lapi_base("LAPI_URL", Config.lapi_url),
        cf_api_url=url("CF_API_URL", Config.cf_api_url),
        pushgateway_url=url("PUSHGATEWAY_URL"),
        run_deadline=number("RUN_DEADLINE", Config.run_deadline, 1),
        http_timeout=number("HTTP_TIMEOUT", Config.http_timeout, 0.1),
        lapi_ca_cert=readable_file("LAPI_CA_CERT"),
        lapi_origins=words("LAPI_ORIGINS"),
        lapi_scenarios_containing=words("LAPI_SCENARIOS_CONTAINING"),
        lapi_scenarios_not_containing=words("LAPI_SCENARIOS_NOT_CONTAINING"),
        max_deletes=number("MAX_DELETES", None, 0, int),
        expand_ranges_max=number("EXPAND_RANGES_MAX", 0, 0, int),
        lapi_max_bytes=number("LAPI_MAX_BYTES", Config.lapi_max_bytes, 1024, int),
        state_file=record_file("STATE_FILE"),
        audit_interval=number("AUDIT_INTERVAL", Config.audit_interval, 0),
    )
    if problems:
        raise ConfigError(problems)
    return Config(
        cf_account_id=cf_account_id,
        cf_namespace_id=cf_namespace_id,
        cf_api_token=cf_api_token,
        lapi_key=lapi_key,
        lapi_client_cert=lapi_client_cert,
        lapi_client_key=lapi_client_key,
        kv_key_prefix=prefix,
        log_format=log_format,
        lapi_usage_metrics=usage_metrics != "false",
        scope_table=scope_table != "false",
        scope_table_max_bytes=scope_table_max_bytes,
        table_origins=table_origins,
        table_max_bytes=table_max_bytes,
        edge_url=edge_url,
        status_token=status_token,
        **config,
    )


# --------------------------------------------------------------------------- HTTP


class Clock(NamedTuple):
    """The job's only view of time, passed in so tests can run retries without waiting."""

    now: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


SYSTEM_CLOCK = Clock()


class Retry(NamedTuple):
    attempts: int
    backoff: float  # first wait; doubles per attempt, with jitter
    max_wait: float


class Response(NamedTuple):
    status: int
    headers: Mapping[str, str]
    body: bytes
    # A streamed 200's body, read as it arrives (`body` is then empty); nothing otherwise.
    chunks: Iterator[bytes] = iter(())
    # The proxy a plain HTTP request went through (HTTP_PROXY): the answer may be its own. None
    # direct, and through a CONNECT tunnel, where every answer is the target's.
    via: Proxy | None = None


class TransportError(Exception):
    """No HTTP answer at all: refused, reset, timed out; `retry` False when trying again cannot help
    (a proxy that refused the tunnel)."""

    def __init__(self, message: str, retry: bool = True):
        super().__init__(message)
        self.retry = retry


class DeadlineExceeded(Exception):
    """RUN_DEADLINE passed while an answer was awaited, or would before the next attempt could start."""

    def __init__(self, message: str, response: Response | None = None):
        super().__init__(message)
        self.response = response  # the last answer, when there was one (a 429, a 5xx)


RUN_OVER = "the run is over: no new connection"


class NamedTimeout(TimeoutError):
    """A wait that did not end in time; its message names what was awaited."""


class LookupTimeout(NamedTimeout):
    """A host's name lookup did not end in time."""


class ProxyError(OSError):
    """A proxy that cannot be reached or refused the tunnel; `retry` False when its answer is final."""

    def __init__(self, message: str, retry: bool = True):
        super().__init__(message)
        self.retry = retry


# The head of a proxy's answer to CONNECT: a status line and a few headers.
MAX_PROXY_HEAD = 16 * 1024


class AnswerTooLarge(Exception):
    """An answer's body went past the size it may have."""

    def __init__(self, limit: int):
        super().__init__(f"its body went past {limit} bytes")
        self.limit = limit


ANSWER_CHUNK = 64 * 1024
MAX_ANSWER_BYTES = 16 * 1024 * 1024  # any answer but LAPI's: a full KV list page is under 2 MiB


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


class _DeadlineReader(io.RawIOBase):
    """The socket under one HTTP answer, as http.client reads it (through `makefile`), with every
    read bounded by HTTP_TIMEOUT and by what is left of the run: an answer sent one byte at a time
    cannot keep the run going past RUN_DEADLINE, whether it drips its head or its body."""

    def __init__(self, sock: socket.socket, timeout: float, remaining: Callable[[], float]):
        super().__init__()
        self.sock, self.timeout, self.remaining = sock, timeout, remaining
        self.raw = sock.makefile("rb", buffering=0)  # keeps the socket open while the answer is read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.remaining()
        if left <= 0:
            raise TimeoutError("the run deadline passed")
        self.sock.settimeout(min(self.timeout, left))
        return self.raw.readinto(buffer)

    def close(self) -> None:
        self.raw.close()
        super().close()

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(self, ANSWER_CHUNK)


class Http:
    """Keep-alive connections for the whole run (one per host, unless two threads talk to a host
    at once); timeouts, retries, a run deadline that holds while an answer arrives, a size limit
    on every answer."""

    def __init__(
        self,
        clock: Clock,
        timeout: float,
        deadline: float,
        tls: Mapping[str, ssl.SSLContext] | None = None,
        proxies: Proxies | None = None,
    ):
        self.clock, self.timeout, self.deadline = clock, timeout, deadline
        self.deadline_name = "RUN_DEADLINE"  # what the errors call it
        self.tls = dict(tls or {})
        self.proxies = proxies or Proxies()
        self._idle: dict[tuple[str, str], list[http.client.HTTPConnection]] = {}
        self._opened: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._random = random.Random()

    def close(self) -> None:
        """Close every connection, and open none from now on. One still checked out (a listing
        the run no longer waits for, reading in its own thread) is shut down first: closing it
        would wait for that thread's read to end, up to HTTP_TIMEOUT, past a pod's grace period."""
        with self._lock:
            self._closed = True
            idle = {id(conn) for conns in self._idle.values() for conn in conns}
            opened, self._opened = self._opened, []
            self._idle.clear()
        for conn in opened:
            if id(conn) not in idle and conn.sock is not None:
                with contextlib.suppress(OSError):  # the socket's own method: never TLS's, which drops its state
                    socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)
        for conn in opened:
            conn.close()

    def __enter__(self) -> Http:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _remaining(self) -> float:
        return self.deadline - self.clock.monotonic()

    def grant(self, seconds: float, name: str) -> None:
        """Exactly `seconds` more from now, past the run deadline if need be: reporting a run that
        ran out of time must not be stopped by the same deadline, nor outlast the pod's grace
        period (30 s) after a SIGTERM. Errors call the new deadline `name`."""
        self.deadline, self.deadline_name = self.clock.monotonic() + seconds, name

    @contextlib.contextmanager
    def within(self, seconds: float, name: str) -> Iterator[None]:
        """At most `seconds` from now for what is sent and read inside, whole (an answer dripped a
        byte at a time included), never past the run deadline; errors call it `name`."""
        saved = self.deadline, self.deadline_name
        if self.clock.monotonic() + seconds < self.deadline:
            self.deadline, self.deadline_name = self.clock.monotonic() + seconds, name
        try:
            yield
        finally:
            self.deadline, self.deadline_name = saved

    def _checkout(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        """An idle connection to the host, or a new one; it is this caller's until _release()."""
        with self._lock:
            self._still_open()  # a thread the run left behind sends nothing once it is over
            idle = self._idle.get((scheme, netloc))
            if idle:
                return idle.pop()
        if scheme == "https":
            context = self.tls.get(netloc) or ssl.create_default_context()
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(netloc, context=context)
        else:
            conn = http.client.HTTPConnection(netloc)
        conn.pool_key, conn.read_timeout = (scheme, netloc), self.timeout  # type: ignore[attr-defined]
        conn.response_class = functools.partial(self._answer, conn)
        # Through a proxy the connection's host is still the target's, so TLS checks the target's
        # name and certificate (in the tunnel): only the socket under it goes to the proxy.
        proxy = self.proxies.for_url(scheme, conn.host, conn.port)
        conn.forward_proxy = proxy if scheme == "http" else None  # type: ignore[attr-defined]
        connect = functools.partial(self._connect, proxy=proxy, tunnel=scheme == "https") if proxy else self._connect
        conn._create_connection = connect  # type: ignore[attr-defined]
        with self._lock:
            self._still_open()
            self._opened.append(conn)
        return conn

    def _still_open(self) -> None:
        if self._closed:
            raise TransportError(RUN_OVER)

    def _connect(
        self,
        address: tuple[str, int],
        timeout: Any,
        source_address: Any = None,
        proxy: Proxy | None = None,
        tunnel: bool = False,
    ) -> socket.socket:
        """socket.create_connection, with the name lookup bounded as well: getaddrinfo takes no
        timeout, and a cluster DNS that does not answer would hold the run past RUN_DEADLINE, deaf
        to SIGTERM. The lookup has a thread of its own, left behind when it does not end in time.
        With a proxy, the socket goes to the proxy (its name looked up the same way) and, with
        `tunnel`, through a CONNECT to `address`."""
        if proxy is not None:
            return self._through(proxy, address, timeout, source_address, tunnel)
        host, port = address
        timeout = timeout if isinstance(timeout, (int, float)) else self.timeout

        def left() -> float:
            return max(0.01, min(timeout, self._remaining()))

        lookup = Background(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
        try:
            addresses = lookup.result(timeout=left())
        except TimeoutError:
            raise LookupTimeout(f"the name lookup of {host}") from None
        except ValueError as e:  # a name IDNA refuses: a failed lookup, not a crash
            raise OSError(f"cannot look {host!r} up: {e}") from None
        self._still_open()  # a run that ended while this thread looked the host up sends nothing
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in addresses:
            sock = None
            try:  # socket() too: a family this node lacks (IPv6 off) is the next address's turn
                sock = socket.socket(family, kind, proto)
                sock.settimeout(left())
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
            except OSError as e:
                if sock is not None:
                    sock.close()
                error = e
                continue
            if self._closed:  # nor one that ended while it connected
                sock.close()
                raise TransportError(RUN_OVER)
            return sock
        try:
            raise error or OSError(f"no address for {host}")
        finally:
            error = None  # the traceback holds this frame: no cycle left for a run with the GC paused

    def _through(
        self, proxy: Proxy, address: tuple[str, int], timeout: Any, source_address: Any, tunnel: bool
    ) -> socket.socket:
        """A socket to the proxy; with `tunnel`, one that CONNECT has joined to `address`."""
        try:
            sock = self._connect((proxy.host, proxy.port), timeout, source_address)
        except LookupTimeout:  # it names the proxy's host
            raise
        except TimeoutError:
            raise NamedTimeout(f"the connection to {proxy}") from None
        except OSError as e:
            raise ProxyError(f"cannot connect to {proxy}: {type(e).__name__}: {e}") from None
        if not tunnel:
            return sock
        try:
            self._tunnel(sock, proxy, address, timeout if isinstance(timeout, (int, float)) else self.timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    def _tunnel(self, sock: socket.socket, proxy: Proxy, address: tuple[str, int], timeout: float) -> None:
        """CONNECT to `address` on `sock`, bounded by `timeout` per read and by the run's deadline.
        The answer's head is read a byte at a time, so nothing past it (the target's TLS) is taken."""
        host, port = address
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {USER_AGENT}\r\n"
        if proxy.authorization:
            head += f"Proxy-Authorization: {proxy.authorization}\r\n"
        answer = bytearray()
        try:
            sock.settimeout(max(0.01, min(timeout, self._remaining())))
            sock.sendall((head + "\r\n").encode())
            while not answer.endswith(b"\r\n\r\n"):
                sock.settimeout(max(0.01, min(timeout, self._remaining())))
                byte = sock.recv(1)
                if not byte:
                    raise ProxyError(f"{proxy} closed the connection without answering CONNECT {authority}")
                answer += byte
                if len(answer) > MAX_PROXY_HEAD:
                    raise ProxyError(f"{proxy} answered CONNECT {authority} with a head over {MAX_PROXY_HEAD} bytes")
        except TimeoutError:
            raise NamedTimeout(f"the answer of {proxy} to CONNECT {authority}") from None
        except ProxyError:
            raise
        except OSError as e:  # reset, broken pipe: the proxy is what failed, say so
            raise ProxyError(f"{proxy} broke off CONNECT {authority}: {type(e).__name__}: {e}") from None
        status = re.match(rb"HTTP/1\.[01] ([0-9]{3})([^\r\n]*)", answer)
        if status is None:
            quoted_head = snippet(bytes(answer), self.proxies.secrets, 80)  # redacted before the cut
            raise ProxyError(f"{proxy} answered CONNECT {authority} with {quoted_head}, not HTTP")
        code = int(status[1])
        if 200 <= code < 300:
            return
        # A 4xx is the proxy's final word on this tunnel (policy, credentials); a 5xx may pass.
        refusal = proxy_refusal(proxy, f"CONNECT {authority}", code, status[2], self.proxies.secrets)
        raise ProxyError(refusal, retry=code >= 500)

    def _release(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed:
                self._idle.setdefault(conn.pool_key, []).append(conn)  # type: ignore[attr-defined]
                return
        conn.close()  # released after close(): nobody else will

    def _answer(self, conn: http.client.HTTPConnection, sock: socket.socket, *args: Any, **kwargs: Any) -> Any:
        reader = _DeadlineReader(sock, conn.read_timeout, self._remaining)  # type: ignore[attr-defined]
        return http.client.HTTPResponse(reader, *args, **kwargs)

    def _failure(self, error: Exception, read_timeout: float) -> Exception:
        """What a failed exchange means: the run deadline reached, or a transport failure, named."""
        if isinstance(error, ProxyError):
            return TransportError(str(error), retry=error.retry)
        if isinstance(error, TimeoutError):
            lookup = str(error) if isinstance(error, NamedTimeout) else ""  # "the name lookup of <host>"
            if self._remaining() <= 0.01:
                return DeadlineExceeded(f"{self.deadline_name} passed while {lookup or 'its answer'} was still awaited")
            limit = "HTTP_TIMEOUT" if read_timeout == self.timeout else "its timeout"
            return TransportError(f"{lookup} timed out ({limit} {read_timeout:g}s)".lstrip())
        return TransportError(f"{type(error).__name__}: {error}")

    def _once(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        sent: Callable[[], None],
        read_timeout: float,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send one request and read the head of its answer; the body is left to read, and the
        connection is the caller's to release (_chunks does, at the body's end)."""
        parts = urllib.parse.urlsplit(url)
        conn = self._checkout(parts.scheme, parts.netloc)
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        if proxy := conn.forward_proxy:  # type: ignore[attr-defined]  # plain HTTP through a proxy: the whole URL
            target = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path or "/", parts.query, ""))
            if proxy.authorization:
                headers = {**headers, "Proxy-Authorization": proxy.authorization}
        conn.read_timeout = read_timeout  # type: ignore[attr-defined]  # for the answer's reader
        timeout = max(0.01, min(read_timeout, self._remaining()))
        # A kept-alive socket the server closed while idle fails before any answer;
        # that is not the server failing, so it gets one immediate reconnect.
        for reused in (True, False) if conn.sock is not None else (False,):
            if conn.sock is None:
                conn.timeout = timeout
            else:
                conn.sock.settimeout(timeout)
            try:
                sent()
                conn.request(method, target, body=body, headers=dict(headers))
                return conn, conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                conn.close()
                if not reused:
                    self._release(conn)
                    raise self._failure(e, read_timeout) from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                self._release(conn)
                raise self._failure(e, read_timeout) from None
        raise AssertionError("unreachable")

    def _chunks(
        self, conn: http.client.HTTPConnection, answer: http.client.HTTPResponse, limit: int
    ) -> Iterator[bytes]:
        """The answer's body as it arrives, at most `limit` bytes; then the connection is released.
        Unless the body is read to its end the connection is closed: what is left on it would be
        read as the next answer."""
        received, finished = 0, False
        try:
            if answer.length is not None and answer.length > limit:
                raise AnswerTooLarge(limit)
            while chunk := answer.read1(ANSWER_CHUNK):
                received += len(chunk)
                if received > limit:
                    raise AnswerTooLarge(limit)
                yield chunk
            if answer.length:  # read1 takes a connection closed before the end for the end
                raise http.client.IncompleteRead(b"", answer.length)
            answer.close()  # read1 leaves it open at the end of a Content-Length body
            finished = True
        except (OSError, http.client.HTTPException) as e:
            raise self._failure(e, conn.read_timeout) from None  # type: ignore[attr-defined]
        finally:
            if not finished:
                conn.close()
            self._release(conn)

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        retry: Retry,
        body: bytes | None = None,
        stream: bool = False,
        limit: int = MAX_ANSWER_BYTES,
        on_attempt: Callable[[], None] | None = None,
        timeout: float | None = None,
        on_answer: Callable[[], None] | None = None,
    ) -> Response:
        """The first answer that is not a 429 or 5xx, or the last one. TransportError when none came,
        DeadlineExceeded (naming what it waited for) when the run deadline ends the waiting,
        AnswerTooLarge past `limit` bytes. With `stream`, a 200's body is left to its consumer
        (Response.chunks), read as it arrives under the same deadline and limit. `on_attempt` is
        called for every request tried: retries, and the reconnect after an idle close, included;
        `on_answer` for every answer's head received. `timeout` (per read) may only shorten HTTP_TIMEOUT."""
        cause = ""  # why the last attempt failed, when no answer came
        read_timeout = self.timeout if timeout is None else min(self.timeout, timeout)
        for attempt in range(1, retry.attempts + 1):
            if self._remaining() <= 0:
                name = self.deadline_name
                raise DeadlineExceeded(f"{cause}; {name} passed" if cause else f"{name} had passed")
            response, wait, told = None, None, ""
            try:
                conn, answer = self._once(method, url, headers, body, on_attempt or (lambda: None), read_timeout)
                via = conn.forward_proxy  # type: ignore[attr-defined]
                if via is not None and refused_by_proxy(answer.status, answer.headers):
                    conn.close()  # its page is not read: the connection goes with it
                    self._release(conn)
                    where = urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(query="", fragment=""))
                    refusal = proxy_refusal(
                        via, f"{method} {where}", answer.status, answer.reason, self.proxies.secrets
                    )
                    raise TransportError(refusal, retry=False)  # the proxy's final word, as for CONNECT
                if on_answer:
                    on_answer()
                if stream and answer.status == 200:
                    return Response(answer.status, answer.headers, b"", self._chunks(conn, answer, limit), via)
                response = Response(answer.status, answer.headers, b"".join(self._chunks(conn, answer, limit)), via=via)
            except TransportError as e:
                if attempt == retry.attempts or not e.retry:
                    raise
                cause = str(e)
            else:
                if response.status != 429 and response.status < 500 or attempt == retry.attempts:
                    return response
                cause = ""  # the answer says it
                if response.status == 429:
                    wait = retry_after_seconds(response.headers.get("Retry-After"), self.clock.now())
                    told = " (Retry-After)" if wait is not None else ""
            if wait is None:
                step = min(retry.max_wait, retry.backoff * 2 ** (attempt - 1))
                wait = self._random.uniform(step / 2, step)
            if wait > self._remaining():
                retry_text = f"a retry in {round(wait, 1):g}s{told} would pass {self.deadline_name}"
                raise DeadlineExceeded(f"{cause}, and {retry_text}" if cause else retry_text, response)
            self.clock.sleep(wait)
        raise AssertionError("unreachable")


class Background:
    """A call run in a thread of its own: result() waits for it, and returns its value or raises
    what it raised. A daemon thread, so a run that ends without waiting is not held up by it."""

    def __init__(self, call: Callable[..., Any], *args: Any) -> None:
        self._outcome: tuple[Any, BaseException | None] = (None, None)
        self._thread = threading.Thread(target=self._run, args=(call, *args), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[..., Any], *args: Any) -> None:
        try:
            self._outcome = (call(*args), None)
        except BaseException as e:  # noqa: BLE001  # handed to whoever waits for the result
            self._outcome = (None, e)

    def result(self, timeout: float | None = None) -> Any:
        """The call's value, handed over: this object keeps no reference to it (it may be big).
        TimeoutError when the call has not ended within `timeout` seconds."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"not done within {timeout:g}s")
        (value, error), self._outcome = self._outcome, (None, None)
        if error is not None:
            raise error
        return value


# What each TLS file must hold, and how to convert one that is DER (binary) instead of PEM.
PEM_FILES = {
    "LAPI_CA_CERT": ("CERTIFICATE", "openssl x509 -inform der -in {} -out ca.crt"),
    "LAPI_CLIENT_CERT": ("CERTIFICATE", "openssl x509 -inform der -in {} -out tls.crt"),
    "LAPI_CLIENT_KEY": ("PRIVATE KEY", "openssl pkey -inform der -in {} -out tls.key"),
}
PEM_READ_LIMIT = 1 << 20  # a CA bundle is a few hundred KiB; more is not what the setting is for


def pem_problem(name: str, path: str, head: bytes) -> str:
    """What is wrong with the start of a TLS file for setting `name` ("" when it holds PEM of the
    right kind): ssl says only "PEM lib" for a DER file, a key where the certificate goes, or an
    encrypted key (for which OpenSSL would ask a terminal for its passphrase)."""
    kind, convert = PEM_FILES[name]
    if b"-----BEGIN " not in head:
        if head[:1] == b"\x30":  # an ASN.1 SEQUENCE: a DER certificate or key
            return f"{name}: {path} is DER (binary), not PEM: convert it, e.g. `{convert.format(path)}`"
        return f"{name}: {path} is not PEM (no -----BEGIN line)"
    if name == "LAPI_CLIENT_KEY" and (b"ENCRYPTED" in head):
        return (
            f"{name}: {path} is an encrypted key: the job needs it unencrypted (`openssl pkey -in {path} -out tls.key`)"
        )
    if not re.search(rb"-----BEGIN [A-Z0-9 ]*" + kind.encode() + rb"-----", head):
        return f"{name}: {path} holds no {kind} (-----BEGIN ...{kind}-----)"
    return ""


def lapi_tls(config: Config) -> dict[str, ssl.SSLContext]:
    """The TLS context for LAPI's host, when a CA bundle or a client certificate is configured;
    ConfigError naming the variable when a file is not what it should be."""
    if not (config.lapi_ca_cert or config.lapi_client_cert):
        return {}
    files = {"LAPI_CA_CERT": config.lapi_ca_cert, "LAPI_CLIENT_CERT": config.lapi_client_cert}
    files["LAPI_CLIENT_KEY"] = config.lapi_client_key
    problems = []
    for name, path in files.items():
        if path:
            try:
                with open(path, "rb") as f:
                    problem = pem_problem(name, path, f.read(PEM_READ_LIMIT))
            except OSError as e:
                problem = f"{name}: cannot read {path}: {e.strerror}"
            problems += [problem] if problem else []
    if problems:
        raise ConfigError(problems)
    try:
        context = ssl.create_default_context(cafile=config.lapi_ca_cert or None)
    except ssl.SSLError as e:
        raise ConfigError([f"LAPI_CA_CERT: {config.lapi_ca_cert} is not a PEM CA bundle ({e.reason})"]) from None
    if config.lapi_client_cert:
        try:
            # An empty passphrase: an encrypted key fails here rather than OpenSSL asking a terminal.
            context.load_cert_chain(config.lapi_client_cert, config.lapi_client_key, password="")
        except ssl.SSLError as e:
            why = "the key is not the certificate's" if e.reason == "KEY_VALUES_MISMATCH" else e.reason or "unreadable"
            raise ConfigError(
                [f"LAPI_CLIENT_CERT/LAPI_CLIENT_KEY: not a certificate and its matching key ({why})"]
            ) from None
    return {urllib.parse.urlsplit(config.lapi_url).netloc: context}


# What to check when a proxy refuses a tunnel with these statuses.
PROXY_ALLOWS = "its allow list, or NO_PROXY for an in-cluster host"
PROXY_403_HINT = f"the proxy does not let the job reach this host: {PROXY_ALLOWS}"


def refused_by_proxy(status: int, headers: Mapping[str, str]) -> bool:
    """Whether an answer to a request sent through a proxy in absolute form is the proxy's own
    refusal: a 407 (only a proxy asks for proxy credentials), or a 403 the proxy marks as its own,
    as Squid does (`X-Squid-Error: ERR_ACCESS_DENIED 0`) and RFC 9209 says (`Proxy-Status` with an
    `error` parameter). A 403 it passes on from the target carries neither."""
    if status == 407:
        return True
    if status != 403:
        return False
    return (
        bool(headers.get("X-Squid-Error")) or re.search(r";\s*error\s*=", headers.get("Proxy-Status") or "") is not None
    )


def proxy_refusal(proxy: Proxy, request: str, status: int, reason: str | bytes, secrets: Iterable[str]) -> str:
    """What the job says when `proxy` refused `request` ("CONNECT host:port", "GET url") itself."""
    hints = {403: PROXY_403_HINT}
    if proxy.authorization:
        hints[407] = f"the proxy refused the credentials in {proxy.variable}: check the user and the password"
    else:
        hints[407] = f"the proxy wants credentials: http://user:password@host:port in {proxy.variable}"
    reason_text = snippet(reason if isinstance(reason, bytes) else reason.encode(errors="replace"), secrets)
    hint = f" ({hints[status]})" if status in hints else ""
    return f"{proxy} refused {request}: HTTP {status} {reason_text}{hint}"


def through_proxy_note(response: Response) -> str:
    """For an error answer not in its destination's own words: the proxy it came through, which
    may have sent it itself ("" when it came direct or through a CONNECT tunnel)."""
    if response.via is None:
        return ""
    return f" (through {response.via}: if the answer is the proxy's own, see {PROXY_ALLOWS})"


# --------------------------------------------------------------------------- LAPI


LAPI_RETRY = Retry(attempts=3, backoff=0.5, max_wait=2.0)


class LapiUnreadable(Exception):
    """LAPI gave no usable answer: the run is skipped and KV left as it is."""


# The hot loops build a NamedTuple per key; its generated __new__ is a Python call costing three
# times tuple.__new__ on the same fields, which builds the same object.
tuple_new = tuple.__new__


class Decisions(NamedTuple):
    # LAPI's answer as it arrives, to be read once (lapi_batches decodes it); TransportError,
    # DeadlineExceeded or AnswerTooLarge may come mid-way.
    chunks: Iterable[bytes]
    read_at: float  # wall time of the answer: LAPI durations count from here


def lapi_query(config: Config) -> str:
    if config.scope_table:
        scopes = ("ip", "range", *SCOPE_TABLE_SCOPES)
    else:
        scopes = ("ip", "range") if config.expand_ranges_max else ("ip",)
    params = {"scopes": ",".join(scopes)}
    if config.lapi_origins:
        params["origins"] = ",".join(config.lapi_origins)
    if config.lapi_scenarios_containing:
        params["scenarios_containing"] = ",".join(config.lapi_scenarios_containing)
    if config.lapi_scenarios_not_containing:
        params["scenarios_not_containing"] = ",".join(config.lapi_scenarios_not_containing)
    return urllib.parse.urlencode(params, safe=",")


LAPI_URL_HINT = (
    " (LAPI_URL={!r} must be LAPI's base URL, its scheme, host and port, such as {}: the job adds /v1/decisions)"
)


def read_decisions(http: Http, config: Config) -> Decisions:
    """LAPI's decisions as its answer arrives: the head is checked here, the body as it is iterated."""
    url = f"{config.lapi_url}/v1/decisions?{lapi_query(config)}"
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if config.lapi_key:
        headers["X-Api-Key"] = config.lapi_key
    with lapi_failures(config):
        response = http.request("GET", url, headers=headers, retry=LAPI_RETRY, stream=True, limit=config.lapi_max_bytes)
    read_at = http.clock.now()
    if response.status in (401, 403):
        raise LapiUnreadable(lapi_refusal(response, config.secrets))
    if response.status != 200:
        # A 404 is most often a LAPI_URL with a path that is not LAPI's (a proxy's prefix, a typo).
        hint = LAPI_URL_HINT.format(config.lapi_url, Config.lapi_url) if response.status == 404 else ""
        raise LapiUnreadable(
            f"LAPI answered HTTP {response.status} to GET {url}: {snippet(response.body, config.secrets)}{hint}"
            + through_proxy_note(response)
        )
    return Decisions(response.chunks, read_at)


def lapi_refusal(response: Response, secrets: Iterable[str]) -> str:
    """What LAPI's 401 or 403 means. LAPI refuses a bouncer key with `{"message": …}`; the same
    status through a proxy (HTTP_PROXY), in other words, may be the proxy's: then both are named."""
    try:
        own = isinstance(json.loads(response.body).get("message"), str)
    except (ValueError, AttributeError):
        own = False
    if response.via is None or own:
        return f"LAPI refused the bouncer credentials (HTTP {response.status}): check LAPI_KEY"
    return (
        f"HTTP {response.status} through {response.via}, not in LAPI's words ({snippet(response.body, secrets)}): "
        f"either the proxy refused the request ({PROXY_ALLOWS}) or LAPI refused the bouncer credentials (check LAPI_KEY)"
    )


def held_answer(chunks: Iterable[bytes], config: Config) -> list[bytes]:
    """LAPI's whole answer, read before any of it is decoded; LapiUnreadable if it fails to come."""
    with lapi_failures(config):
        return list(chunks)


# LAPI's answer is unreadable, not empty, once at least this many of its rows are not JSON objects
# and they are more than half of the rows read so far. LAPI sends objects; a list of junk comes from
# something else (a proxy, a wrong URL), would take minutes to read at LAPI_MAX_BYTES, and would
# then plan to delete every key.
JUNK_ROWS_MIN = 1000


def lapi_batches(chunks: Iterable[bytes], config: Config) -> Iterator[list[Any]]:
    """LAPI's decision objects, a batch at a time, decoded as its answer arrives; LapiUnreadable
    may come mid-way, also when the rows are mostly junk (JUNK_ROWS_MIN)."""
    rows = junk = 0
    with lapi_failures(config):
        try:
            for batch in json_array_batches(chunks):
                rows += len(batch)
                junk += len(batch) - list(map(type, batch)).count(dict)
                if junk >= JUNK_ROWS_MIN and 2 * junk > rows:
                    raise LapiUnreadable(
                        f"LAPI answered with a list that is mostly not decisions: {junk} of its first {rows} rows "
                        "are not JSON objects"
                    )
                yield batch
        except ValueError as e:
            raise LapiUnreadable(f"LAPI answered with a body that is not a JSON list of decisions: {e}") from None
        except TransportError as e:  # not retried: its decisions are being projected already
            raise LapiUnreadable(f"LAPI at {config.lapi_url} broke off its answer part-way: {e}") from None


@contextlib.contextmanager
def lapi_failures(config: Config) -> Iterator[None]:
    """Every way reading LAPI fails, as LapiUnreadable naming the cause."""
    try:
        yield
    except TransportError as e:
        raise LapiUnreadable(f"LAPI at {config.lapi_url} did not answer: {e}") from None
    except DeadlineExceeded as e:
        answered = f"answered HTTP {e.response.status}" if e.response else "did not answer"
        raise LapiUnreadable(f"LAPI at {config.lapi_url} {answered}: {e}") from None
    except AnswerTooLarge as e:
        raise LapiUnreadable(
            f"LAPI's answer was too large: over LAPI_MAX_BYTES ({e.limit} bytes); raise it, and the memory limit with it"
        ) from None


_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_CUT_TRIES = 8  # `{` tried from the end of the held text for a cut: an object list's last one is its last item's
MAX_ITEM_CHARS = 1 << 20  # a LAPI decision is a few hundred bytes; past this an item is junk
# How close to the end of the text a decoding error may be and still mean "not all here yet":
# the longest token that can be cut short and fail before the end (`\uXXXX`, `false`, `-1e+`).
_CUT_SHORT = 8


def json_array_batches(chunks: Iterable[bytes]) -> Iterator[list[Any]]:
    """The items of a JSON array (none for `null`), decoded from UTF-8 bytes as they arrive, in
    batches (lists, never empty), with only the batch being decoded held; ValueError for anything
    else, wherever it is.

    An item that is not complete yet is tried again only once the text held has doubled, so one
    giant item costs linear time; junk is told from an item cut short by where the decoder fails.

    A list of objects (`[{…},{…}]`, with any white space between them) goes faster: the items
    held up to the last `}`, `,`, `{` are decoded in one call. That cut is only a guess (a string
    may hold `},{`), but a wrong one leaves a string or a nesting open, which fails to decode:
    then it is item by item for the rest of the answer. The held text is searched for a cut once
    each time it grows, never once per item: an answer with no cut goes item by item in linear time."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    source = iter(chunks)
    text, pos, ended, batches = "", 0, False, True
    searched = False  # the held text has no cut past `pos` (it was searched, and has not grown since)

    def extend(at_least: int) -> None:
        """Read until the text not decoded yet is `at_least` characters long, or the body ends."""
        nonlocal text, pos, ended, searched
        pieces, held = [text[pos:]], len(text) - pos
        while held < at_least and not ended:
            chunk = next(source, None)
            ended = chunk is None
            piece = utf8.decode(chunk or b"", final=ended)
            pieces.append(piece)
            held += len(piece)
        text, pos, searched = "".join(pieces), 0, False

    def last_cut() -> tuple[int, int]:
        """Where the held text's last `}`, `,`, `{` (white space around the comma) is past `pos`:
        the `}`'s index and the comma's, or (-1, -1). Only the last few `{` are tried."""
        nonlocal searched
        start = len(text)
        for _ in range(_CUT_TRIES):
            start = text.rfind("{", pos, start)
            if start <= pos:
                break
            comma = before(start)
            if text[comma] == ",":
                close = before(comma)
                if close > pos and text[close] == "}":
                    return close, comma
        searched = True
        return -1, -1

    def before(at: int) -> int:
        """The index of the last character before `at` that is not white space (`pos` at least)."""
        at -= 1
        while at > pos and text[at] in " \t\n\r":
            at -= 1
        return at

    def next_char() -> str:
        """The next character that is not white space ("" at the end), left unconsumed."""
        nonlocal pos
        while True:
            pos = _JSON_SPACE.match(text, pos).end()  # type: ignore[union-attr]
            if pos < len(text) or ended:
                return text[pos : pos + 1]
            extend(1)

    def junk(expected: str) -> ValueError:
        return ValueError(f"expected {expected} at {text[pos : pos + 40]!r}")

    first = next_char()
    if first == "n":
        extend(4)
        if not text.startswith("null", pos):
            raise junk("`null` or a list")
        pos += 4
    elif first == "[":
        pos += 1
        if next_char() == "]":
            pos += 1
        else:
            while True:
                next_char()
                cut, comma = last_cut() if batches and not searched else (-1, -1)
                if cut > pos:
                    try:
                        items = decoder.decode("[" + text[pos : cut + 1] + "]")
                    except (ValueError, RecursionError):
                        batches = False
                    else:
                        yield items
                        pos = comma + 1  # past the `,`: the next item follows
                        continue
                while True:
                    try:
                        item, end = decoder.raw_decode(text, pos)
                        # A number cut short (`1` of `1e5`, `1.` of `1.5`) decodes: see what follows.
                        goes_on = type(item) in (int, float) and (end == len(text) or text[end] in ".eE")
                        if ended or not goes_on:
                            break
                    except json.JSONDecodeError as e:
                        cut_short = e.msg.startswith("Unterminated string") or e.pos >= len(text) - _CUT_SHORT
                        if ended or not cut_short:
                            raise ValueError(f"{e.msg}: {text[e.pos : e.pos + 40]!r}") from None
                    except RecursionError:
                        raise ValueError("an item nested too deeply") from None
                    if len(text) - pos > MAX_ITEM_CHARS:
                        raise ValueError(f"an item over {MAX_ITEM_CHARS} characters at {text[pos : pos + 40]!r}")
                    extend(2 * (len(text) - pos) + 1)
                pos = end
                yield [item]
                following = next_char()
                if following != ",":
                    break
                pos += 1
            if following != "]":
                raise junk("`,` or `]`")
            pos += 1
    else:
        raise junk("`null` or a list")
    if next_char():
        raise junk("the end of the answer")


class AnswerDigest:
    """A digest of LAPI's answer with every duration blanked, and of what else shapes the keys it
    projects onto (the job's version, the prefix, range expansion, LAPI's query, the scope table
    and its cap).

    LAPI gives each decision's remaining time, so its answer changes every run however still LAPI
    is; its end does not. Two answers with one digest hold the same decisions, with the same ends,
    so they project onto the same keys: a run that finds the digest its record was written with
    (by a run that converged) has nothing to plan. Blanked is only what a Go duration can hold
    (`"duration":"3h59m58.3s"`), so an answer that differs in any other byte has another digest.
    The digest does not depend on how the answer was cut into chunks."""

    # What Go's Duration.String() writes (and ParseDuration reads): `0`, or up to 8 number-and-unit
    # groups. Anything else in a duration (`bogus`, ``) is not blanked, so never taken for a
    # valid duration of the last answer. A number reads one way only (`[0-9]*\.?[0-9]+` reads
    # `111` as 1+11, 11+1...: a field of 8 groups of 20 digits not followed by a quote took hours).
    _NUMBER = rb"(?:[0-9]{1,20}(?:\.[0-9]{1,20})?|\.[0-9]{1,20})"
    _UNIT = rb"(?:h|ms|m|s|us|ns|\xc2\xb5s|\xce\xbcs)"
    FIELD = re.compile(
        rb'"duration"[ \t\n\r]{0,8}:[ \t\n\r]{0,8}"[-+]?(?:0|(?:' + _NUMBER + _UNIT + rb"){1,8})" + rb'"'
    )
    OPENING = b'"duration"'
    LONGEST = len(OPENING) + 8 + 1 + 8 + 2 + 8 * (20 + 1 + 20 + 3) + 1  # a whole field, at most
    # A blanked field: a raw NUL never stands in a JSON string, so no answer holds this itself.
    BLANKED = b'"duration":"\x00"'

    def __init__(self, config: Config):
        shaping = [__version__, config.kv_key_prefix, str(config.expand_ranges_max), lapi_query(config)]
        shaping += [str(config.scope_table), str(config.scope_table_max_bytes), str(config.table_max_bytes)]
        shaping += [sorted(config.table_origins)]
        self._hash = hashlib.blake2b(json.dumps(shaping).encode() + b"\n", digest_size=20)
        self._held = b""

    def passing(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """The chunks, each added to the digest on its way."""
        for chunk in chunks:
            held = self._held + chunk
            # Keep back a field that may go on in the next chunk: cut where it begins.
            cut = max(0, len(held) - self.LONGEST)
            began = held.rfind(self.OPENING, 0, cut + len(self.OPENING) - 1)
            if began >= 0 and began + self.LONGEST > cut:
                cut = began
            self._hash.update(self.FIELD.sub(self.BLANKED, held[:cut]))
            self._held = held[cut:]
            yield chunk

    def hexdigest(self) -> str:
        """The digest of the whole answer: call once the chunks have all passed."""
        final = self._hash.copy()
        final.update(self.FIELD.sub(self.BLANKED, self._held))
        return final.hexdigest()


def snippet(body: bytes, secrets: Iterable[str] = (), limit: int = 120) -> str:
    """An answer's body quoted in a message: `secrets` redacted first, then cut to `limit`
    characters (cut first, a secret the body echoes would lose its end and no longer be found),
    as a repr, so no control character of it reaches a log line."""
    return repr(quoted(body.decode("utf-8", "replace").strip().replace("\n", " "), secrets, limit))


def quoted(text: str, secrets: Iterable[str], limit: int) -> str:
    """Text from outside as a message may quote it: `secrets` redacted, then cut to `limit` characters."""
    text = redacted(text, secret_forms(secrets))
    return text[:limit] + ("…" if len(text) > limit else "")


# --------------------------------------------------------------------------- projection

# A number reads one way only, and each group is matched where the last ended: `[0-9]*\.?[0-9]+`
# searched for at every position took cubic time over a long run of digits.
_GO_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# What LAPI sends for almost every decision (`3h59m58.349167242s`): one match instead of a loop.
_GO_HMS = re.compile(r"(-?)(?:([0-9]+)h)?(?:([0-9]+)m(?!s))?(?:([0-9]+(?:\.[0-9]+)?)s)?")
# The longest duration Go can hold (2^63 - 1 ns, about 292 years): LAPI cannot mean anything longer.
GO_MAX_SECONDS = (2**63 - 1) / 1e9


@functools.lru_cache(maxsize=4096)
def _go_whole_seconds(hours: str | None, minutes: str | None) -> int:
    # Cached: LAPI's durations share a few hundred `3h59m` heads, and converting them was a third
    # of the parse.
    return (int(hours) * 3600 if hours else 0) + (int(minutes) * 60 if minutes else 0)


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string (`3h59m58.3s`, `-16.9ms`, `0`); ValueError if it is not one,
    including one longer than Go's time.Duration can be."""
    hms = _GO_HMS.fullmatch(text)
    if hms is not None:
        sign, hours, minutes, seconds = hms.groups()
        if hours or minutes or seconds:
            whole = _go_whole_seconds(hours, minutes) if hours or minutes else 0
            if whole > GO_MAX_SECONDS:  # checked as an int: a float of it may not exist
                raise ValueError(f"longer than a Go duration can be: {text[:40]!r}")
            total = whole + float(seconds) if seconds else float(whole)
            if total > GO_MAX_SECONDS:
                raise ValueError(f"longer than a Go duration can be: {text[:40]!r}")
            return -total if sign else total
    sign, body = (-1.0, text[1:]) if text[:1] == "-" else (1.0, text.removeprefix("+"))
    if body == "0":
        return 0.0
    total, end = 0.0, 0
    while match := _GO_DURATION.match(body, end):
        total += float(match.group(1)) * _GO_UNITS[match.group(2)]
        end = match.end()
    if end == 0 or end != len(body):
        raise ValueError(f"not a Go duration: {text[:40]!r}")
    if not total <= GO_MAX_SECONDS:
        raise ValueError(f"longer than a Go duration can be: {text[:40]!r}")
    return sign * total


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


def canonical_address(value: str) -> str:
    """RFC 5952 IPv6, IPv4-mapped IPv6 as IPv4; ValueError for anything that is not one address."""
    if not isinstance(value, str) or "%" in value:
        raise ValueError(f"not an address: {value!r}")
    if _CANONICAL_IPV4.fullmatch(value):  # already canonical: most of LAPI's values, and 5x cheaper
        return value
    address = ipaddress.ip_address(value)
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


class Wanted(NamedTuple):
    remediation: str
    end: float  # wall time the decision runs out
    origin: str
    scenario: str


# A network in the network table: (IP version, first address, last address, remediation), the
# addresses as integers. One entry per remediation, so a network keeps the latest end of each.
NetworkEntry = tuple[int, int, int, str]


class Dropped(NamedTuple):
    """A decision left out, as the log names it."""

    value: str
    scope: str
    type: str
    origin: str


LEFT_OUT_SAMPLES = 5  # decisions named per reason: enough to see what is wrong, never a flood


class LeftOut(Counter):
    """Decisions left out, counted by reason, with the first LEFT_OUT_SAMPLES of each reason kept
    to be named (an operator can only fix what the log names)."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: dict[str, list[Dropped]] = {}

    def add(self, reason: str, row: Any) -> None:
        """Count one decision left out for `reason`, and name it while there are few (a LAPI row)."""
        self[reason] += 1
        self.name(reason, row)

    def name(self, reason: str, row: Any) -> None:
        kept = self.samples.setdefault(reason, [])
        if len(kept) < LEFT_OUT_SAMPLES:
            kept.append(row if type(row) is Dropped else dropped_row(row))


def dropped_row(row: Any) -> Dropped:
    """A LAPI row as the log names it: whatever it holds, bounded (a hostile row may be huge)."""
    if type(row) is not dict:
        return Dropped(reprlib.repr(row), "", "", "")
    fields = (row.get(name) for name in ("value", "scope", "type", "origin"))
    return Dropped(
        *(field[:80] if type(field) is str else "" if field is None else reprlib.repr(field) for field in fields)
    )


class Projection(NamedTuple):
    wanted: dict[str, Wanted]  # the address keys
    ignored: LeftOut
    # The tables' entries (empty when the tables are off), ends on our clock: Country and AS by
    # (scope, canonical value); every Range, and the Ip decisions of TABLE_ORIGINS, by network.
    scopes: dict[tuple[str, str], Wanted] = {}  # noqa: RUF012  # never changed: project() passes its own
    networks: dict[NetworkEntry, Wanted] = {}  # noqa: RUF012  # likewise


_AS_NUMBER = re.compile(r"(?:[Aa][Ss])?([0-9]{1,10})")
_COUNTRY = re.compile(r"[A-Za-z]{2}")
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_IPV4_CIDR = re.compile(rf"({_OCTET}(?:\.{_OCTET}){{3}})/(3[0-2]|[12]?[0-9])")


# The broadest Range the table takes: `0.0.0.0/0`, `::/0` (or `::ffff:0:0/96`, which is IPv4's
# `0.0.0.0/0`), a mask typed short, would ban or challenge everyone at the edge with one decision.
# A network broader than an IPv4 /8 or an IPv6 /16 is far likelier a mistake than a decision (a
# regional registry's whole IPv6 allocation is a /12): it is left out as `range_too_large`.
MIN_RANGE_PREFIX = {4: 8, 6: 16}
_IPV4_BITS = {4: 32, 6: 128}


class TooBroad(ValueError):
    """A Range broader than MIN_RANGE_PREFIX allows."""


def network_bounds(value: Any) -> tuple[int, int, int]:
    """A Range decision's network as (IP version, first address, last address): host bits
    cleared, an IPv4-mapped IPv6 network as the IPv4 one (its addresses reach the Worker as IPv4).
    ValueError when it is not a network; TooBroad for one too broad to take."""
    if type(value) is not str or "%" in value:  # a zone id: no client address carries one
        raise ValueError(f"not a range: {value!r}")
    if (cidr := _IPV4_CIDR.fullmatch(value)) and (length := int(cidr[2])) >= MIN_RANGE_PREFIX[4]:
        # The common case, 6x cheaper than ip_network.
        size = 1 << (32 - length)
        first = int.from_bytes(socket.inet_aton(cidr[1]), "big") & -size
        return 4, first, first + size - 1
    network = ipaddress.ip_network(value, strict=False)
    if network.version == 6 and network.subnet_of(_IPV4_MAPPED):  # type: ignore[arg-type]
        network = ipaddress.IPv4Network((network.network_address.ipv4_mapped, network.prefixlen - 96))  # type: ignore[union-attr]
    if network.prefixlen < MIN_RANGE_PREFIX[network.version]:
        raise TooBroad(f"a range broader than /{MIN_RANGE_PREFIX[network.version]}: {network}")
    return network.version, int(network.network_address), int(network.broadcast_address)


def network_text(version: int, first: int, last: int) -> str:
    """A network as CIDR text (`192.0.2.0/24`, `2001:db8::1/128`), for a dry run's sample."""
    length = _IPV4_BITS[version] - (last - first).bit_length()
    return str((ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network)((first, length)))


def address_bounds(address: str) -> tuple[int, int, int]:
    """A canonical address as a network of one: (IP version, first, last)."""
    if _CANONICAL_IPV4.fullmatch(address):
        value = int.from_bytes(socket.inet_aton(address), "big")
        return 4, value, value
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip), int(ip)


def scope_entry(scope: str, value: Any) -> tuple[str, str]:
    """Where a Country or AS decision goes in the scope table: (scope, canonical value).
    ValueError when the value is not one of that scope."""
    if type(value) is str:
        if scope == "country" and _COUNTRY.fullmatch(value):
            return scope, value.upper()
        if scope == "as" and (number := _AS_NUMBER.fullmatch(value)) and 0 < int(number[1]) < 2**32:
            return scope, str(int(number[1]))
    raise ValueError(f"not a {scope}: {value!r}")


# The most keys range expansion may add in one run, whatever EXPAND_RANGES_MAX and the number of
# ranges: LAPI_MAX_BYTES bounds the decisions, not what they expand to (1,500 /24s at 256 each
# would be 384,000 keys from a 200 KB answer). Past it a range is left out as `range_too_large`.
MAX_EXPANDED_KEYS = 65_536


def expand_range(value: Any, expand_ranges_max: int) -> list[str]:
    """The addresses of an IPv4 range, or none when it has more than `expand_ranges_max` (or is
    IPv6); ValueError when it is not a range."""
    if not isinstance(value, str):
        raise ValueError(f"not a range: {value!r}")
    network = ipaddress.ip_network(value, strict=False)
    if network.version != 4 or network.num_addresses > expand_ranges_max:
        return []
    return [str(a) for a in network]


class Shared(dict):
    """One string object per distinct value of a field ("" for one that is not a string), so that
    100,000 keys hold a handful of origins and scenarios, not 100,000 copies of each."""

    spelling = staticmethod(str.__str__)  # how the value is kept

    def __missing__(self, text: Any) -> str:
        self[text] = shared = sys.intern(self.spelling(text)) if type(text) is str else ""
        return shared


class Lowered(Shared):
    """Shared, in lower case: each distinct spelling (`Ip`, `BAN`) lowered once."""

    spelling = staticmethod(str.lower)


# The longest canonical address (an IPv6 with an embedded IPv4 tail): with a prefix of at most
# MAX_KEY_BYTES minus this, no key can be too long and the check per key is skipped.
LONGEST_ADDRESS = len("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255")
SCOPE_TABLE_SCOPES = ("country", "as")


Origins = frozenset[str]
ALL_ORIGINS = "*"


def origin_matcher(origins: Origins) -> Callable[[str], bool]:
    """Whether a decision of this origin goes into the network table (TABLE_ORIGINS; `*`: all)."""
    if ALL_ORIGINS in origins:
        return lambda origin: True
    return origins.__contains__


def project(
    decisions: Iterable[Any],
    read_at: float,
    prefix: str,
    expand_ranges_max: int = 0,
    tables: bool = False,
    table_origins: Origins = frozenset(),
) -> Projection:
    """The keys KV should hold for these LAPI decisions (JSON objects), and what was left out, by
    reason; with `tables`, the tables' entries too: Country and AS in the scope table, every Range
    and the Ip decisions of `table_origins` in the network table (a small range, with
    `expand_ranges_max`, is then both a network and address keys).

    Iterates `decisions` once (it may be a stream decoded as it arrives, and may raise
    LapiUnreadable midway), and does the least Python work per row: this is the hot loop. A row
    that is not an object, or has a list or an object where a string belongs, is invalid."""
    wanted: dict[str, Wanted] = {}
    ignored = LeftOut()
    drop = ignored.add
    scopes: dict[tuple[str, str], Wanted] = {}
    networks: dict[NetworkEntry, Wanted] = {}
    table_scopes = SCOPE_TABLE_SCOPES if tables else ()
    to_table = origin_matcher(table_origins if tables else frozenset())
    check_length = len(prefix.encode()) + LONGEST_ADDRESS > MAX_KEY_BYTES
    lowered, shared = Lowered(), Shared()  # LAPI repeats a few spellings (`Ip`, `ban`, `crowdsec`)
    get_wanted, get_network, is_ipv4 = wanted.get, networks.get, _CANONICAL_IPV4.fullmatch
    expandable = MAX_EXPANDED_KEYS  # keys range expansion may still add
    for row in decisions:
        try:
            get = row.get
            scope, remediation = lowered[get("scope")], lowered[get("type")]
            origin, scenario = shared[get("origin")], shared[get("scenario")]
        except (AttributeError, TypeError):  # not an object; an unhashable field
            drop("invalid", row)
            continue
        if scope != "ip" and scope not in table_scopes and (scope != "range" or not (tables or expand_ranges_max)):
            drop("scope", row)
            continue
        if remediation not in REMEDIATION_RANK:
            drop("type", row)
            continue
        try:
            remaining = parse_go_duration(get("duration"))
        except (TypeError, ValueError):
            drop("invalid", row)
            continue
        if remaining <= 0:
            drop("expired", row)
            continue
        end = read_at + remaining
        new = tuple_new(Wanted, (remediation, end, origin, scenario))
        value = get("value")
        try:
            if scope == "ip":
                address = value if type(value) is str and is_ipv4(value) else canonical_address(value)
                if to_table(origin):
                    entry = (*address_bounds(address), remediation)
                    networks[entry] = merge(get_network(entry), new)
                    continue
                addresses: Iterable[str] = (address,)
            elif scope == "range":
                if tables:
                    entry = (*network_bounds(value), remediation)
                    networks[entry] = merge(get_network(entry), new)
                addresses = expand_range(value, min(expand_ranges_max, expandable)) if expand_ranges_max else ()
                expandable -= len(addresses)  # type: ignore[arg-type]
                if not addresses:
                    if not tables:  # with the tables the range is in the network table, not left out
                        drop("range_too_large", row)
                    continue
            else:  # a scope of the scope table
                entry = scope_entry(scope, value)
                scopes[entry] = merge(scopes.get(entry), new)
                continue
        except TooBroad:
            drop("range_too_large", row)
            continue
        except ValueError:
            drop("invalid", row)
            continue
        for address in addresses:
            key = prefix + address
            if check_length and len(key.encode()) > MAX_KEY_BYTES:
                drop("invalid", row)
                continue
            old = get_wanted(key)
            wanted[key] = new if old is None else merge(old, new)
    return Projection(wanted, ignored, scopes, networks)


def merge(old: Wanted | None, new: Wanted) -> Wanted:
    """Ban beats captcha; the key lives as long as the longest decision on the address."""
    if old is None:
        return new
    strongest = max(old, new, key=lambda w: (REMEDIATION_RANK[w.remediation], w.end))
    return strongest._replace(end=max(old.end, new.end))


@functools.lru_cache(maxsize=4096)
def metadata_of(remediation: str, origin: str, scenario: str) -> dict[str, str]:
    """What a run needs to compare KV with LAPI from the key list alone, cut to Cloudflare's limit."""
    # Cached: a run writes many keys with the same few origins and scenarios, and measuring the
    # JSON each time cost a sixth of a cold run. Callers only serialise the dict, never change it.
    metadata = {"remediation": remediation, "origin": origin[:64], "scenario": scenario[:256]}
    while len(json.dumps(metadata).encode()) > MAX_METADATA_BYTES:
        metadata["scenario"] = metadata["scenario"][: len(metadata["scenario"]) // 2]
    return metadata


# --------------------------------------------------------------------------- tables
#
# The two documents under the prefix, each one key: the scope table (`<prefix>scopes`, Country
# and AS, JSON) and the network table (`<prefix>networks`, binary). Both hold each entry's end, and
# both follow the rule of address keys (make_plan's table): a table is rewritten when what it
# enforces changes (an entry added or removed, another remediation), when an end it holds comes
# within REFRESH_AHEAD while its decision lasts longer, or when an end moved earlier beyond the
# slack; never because ends moved later or because time passed. To know which, a run builds the
# table from LAPI's decisions and compares it with the one KV holds (the state record's copy, or
# the value read back once): if that one may stand, it is kept as it is, to the byte, and the plan
# finds its digest unchanged.

DOCUMENT_NAMES = ("scopes", "networks")  # never an address, so never an address key
TABLE_FORMAT = 1  # the metadata's "table", and the scope table's "v"
TABLE_MAX_BYTES_LIMIT = 20 * 1024 * 1024  # KV takes values up to 25 MiB; base64 in the bulk body adds a third
MAX_END = 2**32 - 1  # an end must fit the network table's uint32 (the year 2106)

# An entry's ends as a table holds them: the latest ban end and the latest captcha end, whole
# seconds on Cloudflare's clock (0: none).
Ends = tuple[int, int]


# The network table: every Range decision, and the Ip decisions of TABLE_ORIGINS, as sorted
# disjoint address intervals of each family, each with its latest ban end and latest captcha end
# (Unix seconds on Cloudflare's clock, 0: none), in a binary layout a Worker reads through
# typed-array views over the ArrayBuffer KV returns: no parsing per entry, a binary search per
# lookup. docs/kv-contract.md gives the layout; worker/networks.js reads it.
#
#   offset  size         field (unsigned, little-endian)
#   0       4            magic, ASCII "LKVN"
#   4       2            format, 1
#   6       2            0 (reserved)
#   8       4            n4, IPv4 intervals
#   12      4            n6, IPv6 intervals
#   16      4·n4 each    IPv4: first[n4], last[n4], ban[n4], captcha[n4]
#   …       16·n6 each   IPv6: first[n6], last[n6], each address four uint32 words, most significant first
#   …       4·n6 each    IPv6: ban[n6], captcha[n6]
#
# Every array starts at a multiple of 4 bytes, so a Uint32Array views it where it lies.
NETWORKS_MAGIC = b"LKVN"
NETWORKS_FORMAT = 1
NETWORKS_HEADER = struct.Struct("<4sHHII")


class Interval(NamedTuple):
    """Addresses `first` to `last` of one family (as integers), with the latest end of each
    remediation over them (0: none)."""

    first: int
    last: int
    ban: int
    captcha: int


class Intervals(NamedTuple):
    v4: list[Interval]
    v6: list[Interval]


def disjoint_intervals(networks: Iterable[Interval]) -> list[Interval]:
    """Sorted disjoint intervals from CIDR networks of one family, each carrying the latest ban end
    and latest captcha end of every network that covers it. Two CIDR networks are either disjoint
    or one holds the other, so a sweep in order of first address (the larger first on a tie) with
    a stack of the networks open at that point sees every cover: each stack entry holds the maxima
    of itself and every network around it. Where the intervals fall depends on the networks alone,
    never on their ends, so an end moving changes no interval's bounds."""
    # (first, -last, ban, captcha) sorts in C in sweep order; a blocklist's networks are mostly
    # single addresses, none inside another: then the sorted networks are the intervals.
    ordered = sorted((n[0], -n[1], n[2], n[3]) for n in networks)
    previous = -1
    for first, negative_last, _, _ in ordered:
        if first <= previous:
            break
        previous = -negative_last
    else:
        return [
            tuple_new(Interval, (first, -negative_last, ban, captcha)) for first, negative_last, ban, captcha in ordered
        ]
    out: list[Interval] = []
    open_: list[tuple[int, int, int]] = []  # (last, ban, captcha) of the networks covering the cursor, outermost first
    cursor = 0
    for first, negative_last, ban, captcha in ordered:
        while open_ and open_[-1][0] < first:
            last, cover_ban, cover_captcha = open_.pop()
            if cursor <= last:
                out.append(tuple_new(Interval, (cursor, last, cover_ban, cover_captcha)))
            cursor = last + 1
        if open_:
            _, cover_ban, cover_captcha = open_[-1]
            if cursor <= first - 1:
                out.append(tuple_new(Interval, (cursor, first - 1, cover_ban, cover_captcha)))
            ban, captcha = max(ban, cover_ban), max(captcha, cover_captcha)
        cursor = first
        open_.append((-negative_last, ban, captcha))
    while open_:
        last, cover_ban, cover_captcha = open_.pop()
        if cursor <= last:
            out.append(tuple_new(Interval, (cursor, last, cover_ban, cover_captcha)))
        cursor = last + 1
    return out


def _words(values: Iterable[int], width: int) -> array.array:
    """Integers of `width` 32-bit words each, most significant word first, as little-endian uint32s."""
    words = array.array("I")
    if width == 1:
        words.extend(values)
    else:
        for value in values:
            words.extend(
                ((value >> 96) & 0xFFFFFFFF, (value >> 64) & 0xFFFFFFFF, (value >> 32) & 0xFFFFFFFF, value & 0xFFFFFFFF)
            )
    return words


def encode_networks(intervals: Intervals) -> bytes:
    """The network table's value for these intervals (each family sorted and disjoint)."""
    parts = [NETWORKS_HEADER.pack(NETWORKS_MAGIC, NETWORKS_FORMAT, 0, len(intervals.v4), len(intervals.v6))]
    for family, width in ((intervals.v4, 1), (intervals.v6, 4)):
        columns = list(zip(*family, strict=True)) or [(), (), (), ()]
        for column, column_width in zip(columns, (width, width, 1, 1), strict=True):
            words = _words(column, column_width)
            if sys.byteorder == "big":
                words.byteswap()
            parts.append(words.tobytes())
    return b"".join(parts)


def decode_networks(value: bytes) -> Intervals:
    """The intervals a network table holds; ValueError for anything but a whole, valid table of
    this format (whatever KV holds may have been put there by anyone)."""
    if len(value) < NETWORKS_HEADER.size:
        raise ValueError("shorter than the header")
    magic, version, _, n4, n6 = NETWORKS_HEADER.unpack_from(value)
    if magic != NETWORKS_MAGIC or version != NETWORKS_FORMAT:
        raise ValueError(f"not a network table of format {NETWORKS_FORMAT}")
    if len(value) != NETWORKS_HEADER.size + 16 * n4 + 40 * n6:
        raise ValueError("its length is not what its counts say")
    words = uint32_words(value, NETWORKS_HEADER.size, len(value) - NETWORKS_HEADER.size)
    v4 = [Interval(*row) for row in zip(*(words[i * n4 : (i + 1) * n4] for i in range(4)), strict=True)]
    at = 4 * n4

    def addresses(start: int) -> list[int]:
        w = words[start : start + 4 * n6]
        return [(w[i] << 96) | (w[i + 1] << 64) | (w[i + 2] << 32) | w[i + 3] for i in range(0, 4 * n6, 4)]

    firsts, lasts = addresses(at), addresses(at + 4 * n6)
    ends = at + 8 * n6
    v6 = [
        Interval(*row)
        for row in zip(firsts, lasts, words[ends : ends + n6], words[ends + n6 : ends + 2 * n6], strict=True)
    ]
    for family in (v4, v6):
        previous = -1
        for interval in family:
            if not (previous < interval.first <= interval.last) or not (interval.ban or interval.captcha):
                raise ValueError("intervals not sorted, overlapping, or carrying no end")
            previous = interval.last
    return Intervals(v4, v6)


def network_ends(intervals: Intervals, address: str) -> Ends | None:
    """The ban and captcha ends the table holds for an address (canonical, as a key names it), or
    None when no interval holds it, or it is not an address: a binary search, as a Worker does."""
    try:
        version, value, _ = address_bounds(address)
    except ValueError:
        return None
    family = intervals.v4 if version == 4 else intervals.v6
    at = bisect.bisect_right(family, value, key=operator.attrgetter("first")) - 1
    return (family[at].ban, family[at].captcha) if at >= 0 and value <= family[at].last else None


def networks_verdict(intervals: Intervals, address: str, now: float) -> str | None:
    """What the table says of a canonical address at `now` (Cloudflare's clock), as the reference
    Worker reads it: "ban" while a ban end is ahead, else "captcha" while a captcha end is, else None."""
    ban, captcha = network_ends(intervals, address) or (0, 0)
    return "ban" if ban > now else "captcha" if captcha > now else None


class Document(NamedTuple):
    """A table as KV is to hold it, and what the plan and the figures need of it."""

    name: str  # the key's name under the prefix
    value: bytes  # b"": no entries, so no key
    end: float  # the latest end it holds, Cloudflare's clock: the key's own expiration
    due_at: float  # Cloudflare's clock: when an end it holds comes due (inf: none does)
    entries: Counter[tuple[str, str]]  # entries wanted in it, by (scope, remediation)
    full: int  # entries left out: past the cap (table_full)
    kept: list[Any]  # the entries in it, as projected (a dry run samples them)
    left_out: list[Any] = []  # noqa: RUF012  # never changed  # the first entries past the cap, as projected

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.value).hexdigest()[:32] if self.value else ""

    @property
    def metadata(self) -> dict[str, Any]:
        return {"table": TABLE_FORMAT, "digest": self.digest, "entries": sum(self.entries.values())}

    @property
    def intervals(self) -> Intervals:
        """The network table's intervals, as KV is to hold them (decoded: only when asked)."""
        return decode_networks(self.value) if self.value else Intervals([], [])

    def sample(self, entries: list[Any] | None = None) -> list[str]:
        """Its entries (or these of its entries) as text, the first SAMPLE_KEYS of them."""
        text = network_text if self.name == "networks" else lambda scope, name: f"{scope}:{name}"
        chosen = self.kept if entries is None else entries
        return [text(*entry[:3]) + (f" ({entry[3]})" if len(entry) > 3 else "") for entry in chosen[:SAMPLE_KEYS]]


def end_cap(kv_now: float) -> int:
    """The latest end a table written at `kv_now` holds: a year on (MAX_TTL), within a uint32."""
    return min(math.ceil(kv_now + MAX_TTL), MAX_END)


def held_end(end: float, offset: float, cap: int) -> int:
    """An end (our clock) as a table holds it: Cloudflare's clock, whole seconds up, at most `cap`."""
    end = math.ceil(end + offset)
    return cap if end > cap else end


def standing(held: Mapping[Any, Ends], fresh: Mapping[Any, Ends], kv_now: float) -> float | None:
    """Whether a table that holds `held` may stand for one built fresh as `fresh` (the same
    entries, each end of each remediation as expiration_stands() allows it for a key): None when
    it may not; else when the first end it holds comes due (inf: none). An entry held whose ends
    have all passed counts as gone: the Worker ignores it, so its decision's end costs no write."""
    due_at, live = math.inf, 0
    for entry, ends in held.items():
        if max(ends) <= kv_now:
            continue
        live += 1
        wanted = fresh.get(entry)
        if wanted is None:
            return None
        for have, want in zip(ends, wanted, strict=True):
            have = have if have > kv_now else 0
            if (have == 0) != (want == 0) or (have and not expiration_stands(have, want, kv_now)):
                return None
            if want > have + EXPIRATION_SLACK:
                due_at = min(due_at, have - REFRESH_AHEAD)
    return due_at if live == len(fresh) else None


def capped_due_at(ends: Iterable[float], offset: float, kv_now: float) -> float:
    """When a table written now comes due: only an end capped at MAX_TTL (a longer decision) does."""
    cap = kv_now + MAX_TTL
    return cap - REFRESH_AHEAD if any(end + offset > cap + EXPIRATION_SLACK for end in ends) else math.inf


def strongest_first(entries: Iterable[tuple[Any, Wanted]]) -> list[tuple[Any, Wanted]]:
    """Entries in the order a capped table keeps them: bans first, then the longest ends; ties in a
    fixed order, so the same entries always make the same table."""
    return sorted(entries, key=lambda e: (-REMEDIATION_RANK[e[1].remediation], -e[1].end, e[0]))


def scope_document(
    entries: Mapping[tuple[str, str], Wanted], stored: bytes | None, offset: float, kv_now: float, max_bytes: int
) -> Document:
    """The scope table for these entries: `{"v":1,"country":{...},"as":{...}}`, each value
    `[remediation, end]`, a scope present only when it has entries; canonical JSON (keys sorted,
    no white space, ASCII). Past `max_bytes` it holds what fits, bans first, then the longest
    ends. `stored` (the table KV holds, or None) is kept as it is while it may stand."""
    sections: dict[str, dict[str, list[Any]]] = {}
    size, kept = len(json.dumps({"v": TABLE_FORMAT}, separators=(",", ":"))), []
    ordered, cap = strongest_first(entries.items()), end_cap(kv_now)
    for (scope, name), w in ordered:
        end = held_end(w.end, offset, cap)
        # `"name":["ban",1795615200]`: names and remediations are ASCII with nothing to escape.
        item = len(name) + len(w.remediation) + len(str(end)) + 8
        cost = item + (len(scope) + 6 if scope not in sections else 1)  # a scope's first entry opens it
        if size + cost > max_bytes:
            break
        sections.setdefault(scope, {})[name] = [w.remediation, end]
        size += cost
        kept.append((scope, name))
    figures = Counter((scope, entries[scope, name].remediation) for scope, name in kept)
    fresh = {(s, n): remediation_ends(*sections[s][n]) for s, n in kept}
    left_out = [e for e, _ in ordered[len(kept) : len(kept) + LEFT_OUT_SAMPLES]]
    held = scope_entries(stored) if stored and kept else {}
    due = standing(held, fresh, kv_now) if held else None
    if due is not None:
        value = stored
    else:
        value = (
            json.dumps({"v": TABLE_FORMAT, **sections}, sort_keys=True, separators=(",", ":")).encode() if kept else b""
        )
        held, due = fresh, capped_due_at((entries[e].end for e in kept), offset, kv_now)
    end = max((max(ends) for ends in held.values()), default=0)
    return Document("scopes", value, float(end), due, figures, len(entries) - len(kept), kept, left_out)


def remediation_ends(remediation: str, end: int) -> Ends:
    return (end, 0) if remediation == "ban" else (0, end)


def scope_entries(value: bytes | None) -> dict[tuple[str, str], Ends]:
    """The entries of a scope table as KV holds it, by (scope, name); {} for anything that is not
    one of format 1 (then it cannot stand, and is rewritten)."""
    try:
        document = json.loads(value or b"null")
        if not (type(document) is dict and type(document.get("v")) is int and document["v"] == TABLE_FORMAT):
            return {}
        # Only the very bytes this job writes: `"v": true`, white space or UTF-16 read as the same
        # document here, but not by every Worker (the reference one refuses `true`).
        if json.dumps(document, sort_keys=True, separators=(",", ":")).encode() != value:
            return {}
        held = {}
        for scope, names in document.items():
            if scope == "v":
                continue
            for name, (remediation, end) in names.items():
                if remediation not in REMEDIATION_RANK or type(end) is not int:
                    return {}
                held[scope, name] = remediation_ends(remediation, end)
        return held
    except (ValueError, TypeError, AttributeError, RecursionError):
        return {}


def networks_document(
    entries: Mapping[NetworkEntry, Wanted], stored: bytes | None, offset: float, kv_now: float, max_bytes: int
) -> Document:
    """The network table for these entries, at most `max_bytes` long: past it, what fits, bans
    first, then the longest ends. `stored` (the table KV holds, or None) is kept as it is while
    it may stand."""
    kept = candidates = list(entries)
    intervals = network_intervals(entries.items(), offset, kv_now)
    if networks_size(intervals) > max_bytes:  # rare: as many as fit, the strongest first
        candidates = [entry for entry, _ in strongest_first(entries.items())]
        kept = candidates[: networks_that_fit(candidates, entries, offset, kv_now, max_bytes)]
        intervals = network_intervals(((e, entries[e]) for e in kept), offset, kv_now)
    value = encode_networks(intervals) if kept else b""
    due = networks_standing(stored, value, kv_now) if stored and value else None
    if due is not None:
        value = stored
    else:
        due = capped_due_at((entries[e].end for e in kept), offset, kv_now)
    left_out = candidates[len(kept) : len(kept) + LEFT_OUT_SAMPLES]
    figures = Counter(("network", entry[3]) for entry in kept)
    full = len(entries) - len(kept)
    return Document("networks", value, float(networks_end(value)), due, figures, full, kept, left_out)


def networks_that_fit(
    candidates: list[NetworkEntry], entries: Mapping[NetworkEntry, Wanted], offset: float, kv_now: float, max_bytes: int
) -> int:
    """How many of `candidates`, from the first, make a network table of at most `max_bytes`. Each
    takes at least an interval of its own (16 bytes, 40 for IPv6), and more only where it nests in
    another: the most the lower bound allows mostly fits, checked with one build; else a search."""

    def size(n: int) -> int:
        return networks_size(network_intervals(((e, entries[e]) for e in candidates[:n]), offset, kv_now))

    least = NETWORKS_HEADER.size + sum(16 if entry[0] == 4 else 40 for entry in candidates)
    most = len(candidates)
    for entry in reversed(candidates):  # the longest prefix whose lower bound fits
        if least <= max_bytes:
            break
        least -= 16 if entry[0] == 4 else 40
        most -= 1
    if size(most) <= max_bytes:
        return most
    return bisect.bisect_right(range(most + 1), max_bytes, key=size) - 1


def networks_standing(stored: bytes, fresh: bytes, kv_now: float) -> float | None:
    """standing() for two network tables as KV holds them (None: `stored` may not stand for
    `fresh`). When both hold the same intervals (a refresh, time passing: what runs mostly see),
    their bounds are compared as bytes and their ends column by column, with no per-interval object;
    otherwise, entry by entry, an interval whose ends have all passed counting as gone."""
    n4, n6 = NETWORKS_HEADER.unpack_from(fresh)[3:]
    bounds = [(16, 16 + 8 * n4), (16 + 16 * n4, 16 + 16 * n4 + 32 * n6)]
    if len(stored) != len(fresh) or stored[:16] != fresh[:16] or any(stored[a:b] != fresh[a:b] for a, b in bounds):
        try:
            held = decode_networks(stored)
        except ValueError:
            return None
        return standing(interval_ends(held), interval_ends(decode_networks(fresh)), kv_now)
    have, want = (uint32_words(value, 16 + 8 * n4, 8 * n4) for value in (stored, fresh))  # v4 ban and captcha
    have6, want6 = (uint32_words(value, 16 + 16 * n4 + 32 * n6, 8 * n6) for value in (stored, fresh))
    due_at, slack, ahead = math.inf, EXPIRATION_SLACK, kv_now + REFRESH_AHEAD
    for have_end, want_end in zip(have + have6, want + want6, strict=True):
        if have_end <= kv_now:  # passed, or none: the Worker ignores it
            if want_end:
                return None
            continue
        # expiration_stands(), inline: this runs once per interval, a blocklist's hundreds of thousands.
        if not want_end or have_end > want_end + slack or (have_end < want_end - slack and have_end <= ahead):
            return None
        if want_end > have_end + slack and have_end - REFRESH_AHEAD < due_at:
            due_at = have_end - REFRESH_AHEAD
    return due_at


def uint32_words(value: bytes, start: int, size: int) -> array.array:
    """`size` bytes of little-endian uint32s from `start`, as integers."""
    words = array.array("I")
    words.frombytes(value[start : start + size])
    if sys.byteorder == "big":
        words.byteswap()
    return words


def networks_end(value: bytes) -> int:
    """The latest end a network table holds (0: none)."""
    if not value:
        return 0
    n4, n6 = NETWORKS_HEADER.unpack_from(value)[3:]
    ends = uint32_words(value, 16 + 8 * n4, 8 * n4) + uint32_words(value, 16 + 16 * n4 + 32 * n6, 8 * n6)
    return max(ends, default=0)


def network_intervals(entries: Iterable[tuple[NetworkEntry, Wanted]], offset: float, kv_now: float) -> Intervals:
    """The network table's intervals for these entries, ends as it holds them (held_end())."""
    cap = end_cap(kv_now)
    families: dict[int, list[tuple[int, int, int, int]]] = {4: [], 6: []}
    add4, add6 = families[4].append, families[6].append
    for (version, first, last, remediation), wanted in entries:
        end = held_end(wanted.end, offset, cap)
        (add4 if version == 4 else add6)((first, last, end, 0) if remediation == "ban" else (first, last, 0, end))
    return Intervals(disjoint_intervals(families[4]), disjoint_intervals(families[6]))


def interval_ends(intervals: Intervals) -> dict[tuple[int, int, int], Ends]:
    return {
        (version, i.first, i.last): (i.ban, i.captcha)
        for version, family in zip((4, 6), intervals, strict=True)
        for i in family
    }


def networks_size(intervals: Intervals) -> int:
    return NETWORKS_HEADER.size + 16 * len(intervals.v4) + 40 * len(intervals.v6)


# --------------------------------------------------------------------------- Cloudflare


CLOUDFLARE_RETRY = Retry(attempts=6, backoff=1.0, max_wait=30.0)
# A KV may answer an empty page before the end, but not page after page: past this many in a
# row the listing stops (one broken answer once made 456 list calls in 20 s).
MAX_EMPTY_PAGES = 10
# What to check when Cloudflare answers with these codes.
CLOUDFLARE_HINTS = {
    7003: "check CF_ACCOUNT_ID and CF_KV_NAMESPACE_ID",
    10013: "check CF_ACCOUNT_ID and CF_KV_NAMESPACE_ID",
}
SCOPE_HINT = "check that CF_API_TOKEN is valid and has the permission Workers KV Storage: Edit on this account"


class CloudflareError(Exception):
    """Cloudflare refused or kept failing a request."""


class CloudflareTooLarge(CloudflareError):
    """An answer from Cloudflare past the size it may have."""


class Present(NamedTuple):
    expiration: float | None
    # From the key's metadata; None when the key has none of ours. The scope table's key holds
    # its document's digest here, so the plan compares it as it compares a remediation.
    remediation: str | None


class Listing(NamedTuple):
    present: dict[str, Present]
    server_time: float | None  # Cloudflare's clock (Date header), which is the one that expires keys
    received_at: float  # our wall clock when that Date header arrived


class Cloudflare:
    def __init__(self, http: Http, config: Config):
        self.http = http
        self.base = (
            f"{config.cf_api_url}/accounts/{config.cf_account_id}/storage/kv/namespaces/{config.cf_namespace_id}"
        )
        self.headers = {
            "Authorization": f"Bearer {config.cf_api_token}",
            "User-Agent": USER_AGENT,
            "Content-Type": "application/json",
        }
        self.secrets = config.secrets  # redacted from a quoted answer before it is cut
        # Every request tried, retries included: what the account's API budget is charged at
        # most (one that never connected is tried, and not charged); and the HTTP answers they got.
        self.requests: Counter[str] = Counter({"list": 0, "bulk_put": 0, "bulk_delete": 0})
        self.answers: Counter[str] = Counter()
        self.stop = threading.Event()  # set: a listing in another thread ends at its next page

    def send(
        self, operation: str, method: str, path: str, body: bytes | None = None, limit: int = MAX_ANSWER_BYTES
    ) -> Response:
        """Cloudflare's answer, counted under `operation`; CloudflareError when none came."""
        try:
            return self.http.request(
                method,
                self.base + path,
                headers=self.headers,
                body=body,
                retry=CLOUDFLARE_RETRY,
                limit=limit,
                on_attempt=lambda: self.requests.update((operation,)),
                on_answer=lambda: self.answers.update((operation,)),
            )
        except TransportError as e:
            retried = " after retries" if e.retry else ""
            raise CloudflareError(f"{operation}: no answer from Cloudflare{retried}: {e}") from None
        except DeadlineExceeded as e:
            answered = f"{read_envelope(e.response, self.secrets)[1]}; " if e.response else ""
            raise CloudflareError(f"{operation}: {answered}{e}") from None
        except AnswerTooLarge as e:
            raise CloudflareTooLarge(f"{operation}: Cloudflare's answer was too large: {e}") from None

    def call(
        self, operation: str, method: str, path: str, body: bytes | None = None
    ) -> tuple[dict[str, Any], Response]:
        """Cloudflare's envelope of a successful answer; CloudflareError with its codes and messages otherwise."""
        response = self.send(operation, method, path, body)
        envelope, problem = read_envelope(response, self.secrets)
        if problem:
            # Not an envelope at all: an answer Cloudflare did not write, perhaps the proxy's.
            raise CloudflareError(f"{operation}: {problem}{'' if envelope else through_proxy_note(response)}")
        return envelope, response

    def list_keys(self, prefix: str, only: str = "") -> Listing:
        """Every key under the prefix (those starting with prefix + `only`), page by page;
        CloudflareError when `stop` is set meanwhile."""
        present: dict[str, Present] = {}
        server_time, received_at, cursor, seen, empty_pages = None, 0.0, "", set(), 0
        while True:
            if self.stop.is_set():
                raise CloudflareError("list: stopped, the run ended before the listing did")
            query = {"prefix": prefix + only, "limit": LIST_LIMIT}
            if cursor:
                query["cursor"] = cursor
            envelope, response = self.call("list", "GET", "/keys?" + urllib.parse.urlencode(query))
            if server_time is None:
                received_at = self.http.clock.now()
                server_time = cloudflare_time(response.headers.get("Date"))
            result = envelope.get("result") or []
            if not isinstance(result, list):
                raise CloudflareError(f"list: `result` is a {type(result).__name__}, not a list of keys")
            present.update(present_keys(result, prefix))
            # The last page's cursor may be "", null or absent; an empty page is not the end.
            cursor = (envelope.get("result_info") or {}).get("cursor") or ""
            if not cursor:
                return Listing(present, server_time, received_at)
            if not isinstance(cursor, str) or cursor in seen:
                raise CloudflareError("list: Cloudflare returned a cursor twice or not a string; stopped")
            seen.add(cursor)
            empty_pages = 0 if result else empty_pages + 1
            if empty_pages >= MAX_EMPTY_PAGES:
                raise CloudflareError(
                    f"list: {empty_pages} empty pages in a row, each with a new cursor; stopped, "
                    "so a broken answer cannot spend the account's API budget"
                )

    def value(self, key: str) -> bytes | None:
        """The value of one key (None: there is none, or it is larger than any table this job
        writes, so not one of them): read only to learn which table KV holds."""
        try:
            response = self.send(
                "read", "GET", f"/values/{urllib.parse.quote(key, safe='')}", limit=TABLE_MAX_BYTES_LIMIT
            )
        except CloudflareTooLarge:
            return None
        if response.status == 404:
            return None
        if response.status != 200:
            raise CloudflareError(f"read: {read_envelope(response, self.secrets)[1]}")
        return response.body

    def namespace(self) -> Response:
        """GET the namespace itself: a request the token's KV permission covers, which reads no key."""
        return self.call("namespace", "GET", "")[1]

    def clock(self) -> tuple[float | None, float]:
        """Cloudflare's clock (its Date header; None: none believable) and ours when it arrived."""
        response = self.namespace()
        return cloudflare_time(response.headers.get("Date")), self.http.clock.now()

    def bulk_put(self, body: bytes) -> list[str]:
        """One bulk write of `body` (bulk_body's); the keys Cloudflare reports unsuccessful."""
        envelope, _ = self.call("bulk_put", "PUT", "/bulk", body)
        return unsuccessful_keys(envelope.get("result"))

    def bulk_delete(self, body: bytes) -> list[str]:
        """One bulk delete of `body` (bulk_body's, of key names); the keys Cloudflare reports unsuccessful."""
        envelope, _ = self.call("bulk_delete", "POST", "/bulk/delete", body)
        return unsuccessful_keys(envelope.get("result"))


def read_envelope(response: Response, secrets: Iterable[str] = ()) -> tuple[dict[str, Any], str]:
    """Cloudflare's envelope of an answer, and what is wrong with it ("" for a success): the codes and
    messages Cloudflare gave and what to check, or how the answer is not an envelope at all."""
    try:
        envelope = json.loads(response.body)
    except ValueError:
        envelope = None
    status = f"HTTP {response.status}"
    if not isinstance(envelope, dict):
        return {}, f"{status} with a body that is not Cloudflare's envelope: {snippet(response.body, secrets)}"
    shape = {"success": (bool,), "errors": (list, type(None)), "result_info": (dict, type(None))}
    for name, kinds in shape.items():
        if not isinstance(envelope.get(name), kinds):
            kind = type(envelope.get(name)).__name__ if name in envelope else "missing"
            return {}, f"{status} with a malformed envelope: `{name}` is {kind}: {snippet(response.body, secrets)}"
    if response.status == 200 and envelope["success"]:
        return envelope, ""
    errors = [e for e in envelope.get("errors") or [] if isinstance(e, dict)]
    text = quoted("; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors), secrets, 500) or "no error given"
    codes = [e.get("code") for e in errors]
    hints = {CLOUDFLARE_HINTS[c] for c in codes if isinstance(c, int) and c in CLOUDFLARE_HINTS}
    if response.status in (401, 403):
        hints.add(SCOPE_HINT)
    return envelope, f"{status}: {text}" + "".join(f" ({hint})" for hint in sorted(hints))


def present_keys(page: list[Any], prefix: str) -> dict[str, Present]:
    """Our keys in one list page, as the plan compares them; what we cannot read counts as stale."""
    present = {}
    documents = {prefix + name for name in DOCUMENT_NAMES}
    for key in page:
        if type(key) is not dict:
            continue
        name, expiration, metadata = key.get("name"), key.get("expiration"), key.get("metadata")
        if type(name) is str and name.startswith(prefix):
            remediation = metadata.get("remediation") if type(metadata) is dict else None
            if type(remediation) is not str or remediation not in REMEDIATION_RANK:
                remediation = table_digest(metadata) if name in documents else None
            present[name] = tuple_new(Present, (expiration if type(expiration) in (int, float) else None, remediation))
    return present


_DIGEST = re.compile(r"[0-9a-f]{32}")


def table_digest(metadata: Any) -> str | None:
    """The digest a table's metadata carries; None when it is not ours (then the plan rewrites it)."""
    if type(metadata) is not dict or type(metadata.get("table")) is not int or metadata["table"] != TABLE_FORMAT:
        return None
    digest = metadata.get("digest")
    return digest if type(digest) is str and _DIGEST.fullmatch(digest) else None


def unsuccessful_keys(result: Any) -> list[str]:
    # Older API versions answer `result: null` for a fully successful bulk call.
    if isinstance(result, dict):
        return [k for k in result.get("unsuccessful_keys") or [] if isinstance(k, str)]
    return []


# Cloudflare's clock as a Date header gives it, believed only between these (Unix seconds: 2020
# and 2100): a date outside them is a broken answer (a proxy's, say), and taken as no date.
CLOUDFLARE_DATES = (1_577_836_800, 4_102_444_800)


def cloudflare_time(value: str | None) -> float | None:
    """The time of a Date header from Cloudflare, or None when it has none or an unbelievable one."""
    seconds = http_date(value)
    return seconds if seconds is not None and CLOUDFLARE_DATES[0] <= seconds < CLOUDFLARE_DATES[1] else None


def http_date(value: str | None) -> float | None:
    try:
        return email.utils.parsedate_to_datetime(value).timestamp() if value else None
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- plan


class Write(NamedTuple):
    key: str
    remediation: str
    ttl: int
    origin: str
    scenario: str


class Plan(NamedTuple):
    writes: list[Write]
    deletes: list[str]
    unchanged: list[str]
    # When, on Cloudflare's clock, the first key left as it is comes due to be rewritten (inf: none
    # does): until then a plan against the same LAPI answer finds nothing to do.
    due_at: float = math.inf
    spared: list[str] = []  # noqa: RUF012  # never changed  # keys LAPI no longer wants, left to expire (spare_covered)


# What the plan does with each key (external-dns's plan writes its table the same way):
#
#   KV holds the key            LAPI wants it                        plan
#   no                          yes                                  write
#   yes, another remediation    yes                                  write
#   yes, no metadata of ours    yes                                  write
#   yes                         yes, ends within the slack of it     unchanged
#   yes, expires > 15 min out   yes, ends later (a refresh)          unchanged (due 15 min before it expires)
#   yes, expires <= 15 min out  yes, ends later                      write, with the decision's end
#   yes                         yes, ends earlier beyond the slack   write, with the decision's end
#   yes                         no                                   delete (not when it already expired)
def expiration_stands(expiration: float, wanted: float, kv_now: float) -> bool:
    """Whether a key (or a table entry) that expires at `expiration` may stay as it is for a
    decision that a write now would make expire at `wanted`, both on Cloudflare's clock: it does
    not outlive the decision by more than EXPIRATION_SLACK, and it is either in step with it or,
    if the decision now ends later, still more than REFRESH_AHEAD away from expiring."""
    return expiration <= wanted + EXPIRATION_SLACK and (
        expiration >= wanted - EXPIRATION_SLACK or expiration > kv_now + REFRESH_AHEAD
    )


def make_plan(wanted: Mapping[str, Wanted], present: Mapping[str, Present], now: float, offset: float = 0.0) -> Plan:
    """What to write and delete so KV holds `wanted` (the table above). `now` and the wanted ends
    are on our clock; `offset` is Cloudflare's clock minus ours, the clock KV's expirations are
    on. A present key whose expiration has passed is gone (a listing never shows one; a state
    record may still)."""
    writes, unchanged = [], []
    kv_now = now + offset
    get_present, nothing = present.get, (None, None)
    due_at = math.inf
    for key, (remediation, end, origin, scenario) in wanted.items():
        expiration, had = get_present(key, nothing)
        left = end - now
        ttl = MIN_TTL if left < MIN_TTL else MAX_TTL if left > MAX_TTL else left
        expires = kv_now + ttl  # where a write now would put the expiration
        if had == remediation and expiration is not None and expiration_stands(expiration, expires, kv_now):
            unchanged.append(key)
        else:
            writes.append(tuple_new(Write, (key, remediation, math.ceil(ttl), origin, scenario)))
            expiration = expires
        if end + offset > expiration + EXPIRATION_SLACK:  # the decision outlasts the key: it comes due
            due_at = min(due_at, expiration - REFRESH_AHEAD)
    gone = present.keys() - wanted.keys()  # a set operation in C: a pass over the keys in Python cost more
    deletes = sorted(key for key in gone if present[key].expiration is None or present[key].expiration > kv_now)
    return Plan(writes, deletes, unchanged, due_at)


def spare_covered(
    plan: Plan,
    present: Mapping[str, Present],
    held: Intervals | None,
    due: Intervals | None,
    prefix: str,
    kv_now: float,
) -> Plan:
    """The plan with the deletes of keys the network table now holds left out (`spared`): a key
    whose address the table `held` (as KV is to hold it) enforces with the same remediation is left
    to expire rather than deleted (Cloudflare's free plan allows 1,000 deletes a day, and turning
    TABLE_ORIGINS on moves a whole blocklist into the table), while it does not outlive the
    decision by more than the slack: `due`, the table built fresh, holds the decision's end (a
    table kept may itself hold an end up to the slack past it). The table is written before any
    key is deleted, so no address is ever enforced by neither."""
    if not held or not due or not plan.deletes:
        return plan
    start, deletes, spared = len(prefix), [], []
    for key in plan.deletes:
        have = present[key]
        enforced, decided = network_ends(held, key[start:]), network_ends(due, key[start:])
        if have.remediation in REMEDIATION_RANK and have.expiration is not None and enforced and decided:
            which = 0 if have.remediation == "ban" else 1
            if enforced[which] > kv_now and have.expiration <= decided[which] + EXPIRATION_SLACK:
                spared.append(key)
                continue
        deletes.append(key)
    return plan._replace(deletes=deletes, spared=plan.spared + spared)


def chunks(items: list[Any], size: int = MAX_BULK_ITEMS) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------- apply


UNSUCCESSFUL_ROUNDS = 3


class Applied(NamedTuple):
    written: int
    deleted: int
    guarded: int  # deletes held back by MAX_DELETES


@dataclass
class Ledger:
    """What Cloudflare confirmed while a plan was applied, so the state record claims nothing else.
    Filled as each bulk answer arrives; after a failure it still says what landed."""

    written: list[tuple[list[Write], float]] = field(default_factory=list)  # each chunk with the time it was sent
    deleted: list[tuple[list[str], float]] = field(default_factory=list)  # the same, for deletes
    in_flight: list[str] = field(default_factory=list)  # sent, no answer yet: may or may not have landed
    uncertain: list[str] = field(default_factory=list)  # still unsuccessful after every round


def apply_plan(
    cloudflare: Cloudflare,
    plan: Plan,
    max_deletes: int | None,
    ledger: Ledger | None = None,
    documents: Mapping[str, Document] = {},  # noqa: B006  # never changed
) -> Applied:
    """Bulk writes, then bulk deletes, each key retried while Cloudflare lists it as unsuccessful.
    `documents`: the tables to write, by key (their values go where the plan writes their keys).
    Every write lands before any delete, so no key is deleted before a table holds its address."""
    ledger = Ledger() if ledger is None else ledger
    now = cloudflare.http.clock.now
    item = functools.partial(bulk_item, documents=documents) if documents else bulk_item

    def wrote(sent: list[Write], sent_at: float) -> None:
        ledger.written.append((sent, sent_at))

    send_all(cloudflare.bulk_put, plan.writes, write_key, item, "write", ledger, wrote, now)
    if guard_trips(plan, max_deletes):
        return Applied(len(plan.writes), 0, len(plan.deletes))

    def deleted(sent: list[str], sent_at: float) -> None:
        ledger.deleted.append((sent, sent_at))

    send_all(cloudflare.bulk_delete, plan.deletes, str, str, "delete", ledger, deleted, now)
    return Applied(len(plan.writes), len(plan.deletes), 0)


def guard_trips(plan: Plan, max_deletes: int | None) -> bool:
    """Whether MAX_DELETES holds back this plan's deletes (None: no guard, or --force)."""
    return max_deletes is not None and len(plan.deletes) > max_deletes


write_key = operator.itemgetter(0)  # a Write's key, taken in C: send_all asks for 100,000 of them


def bulk_item(write: Write, documents: Mapping[str, Document] = {}) -> dict[str, Any]:  # noqa: B006  # never changed
    """One pair of a bulk write, built only as its chunk is sent: a key's remediation, or a table's
    value (base64: the network table is binary) with its digest in the metadata."""
    key, remediation, ttl, origin, scenario = write
    document = documents.get(key)
    if document is not None:
        value = base64.b64encode(document.value).decode("ascii")
        return {"key": key, "value": value, "base64": True, "expiration_ttl": ttl, "metadata": document.metadata}
    return {
        "key": key,
        "value": remediation,
        "expiration_ttl": ttl,
        "metadata": metadata_of(remediation, origin, scenario),
    }


def bulk_body(items: list[Any]) -> bytes:
    return json.dumps(items, separators=(",", ":")).encode()


def send_all(
    send: Callable[[bytes], list[str]],
    entries: list[Any],
    key: Callable[[Any], str],
    item: Callable[[Any], Any],
    what: str,
    ledger: Ledger,
    confirmed: Callable[[list[Any], float], None],
    now: Callable[[], float],
) -> None:
    """Send every entry in bulk chunks, again while Cloudflare reports some unsuccessful, telling
    `confirmed` what each answer confirmed; CloudflareError when some still fail after UNSUCCESSFUL_ROUNDS.

    One chunk is in flight at a time, sent from another thread, while this one builds the next
    chunk's body: building it costs about as long as Cloudflare takes to answer."""
    pending = entries
    for _ in range(UNSUCCESSFUL_ROUNDS):
        failed: set[str] = set()
        sending: tuple[list[Any], float, Background] | None = None
        for chunk in chunks(pending):
            body = bulk_body([item(e) for e in chunk])
            if sending:
                failed |= settle(*sending, key, ledger, confirmed)
            ledger.in_flight, sent_at = list(map(key, chunk)), now()
            sending = (chunk, sent_at, Background(send, body))
        if sending:
            failed |= settle(*sending, key, ledger, confirmed)
        if not failed:
            return
        pending = [e for e in pending if key(e) in failed]
    ledger.uncertain += [key(e) for e in pending]
    raise CloudflareError(
        f"Cloudflare could not {what} {counted(len(pending), 'key')} after {UNSUCCESSFUL_ROUNDS} rounds, "
        f"e.g. {[key(e) for e in pending[:3]]}"
    )


def settle(
    chunk: list[Any],
    sent_at: float,
    sending: Background,
    key: Callable[[Any], str],
    ledger: Ledger,
    confirmed: Callable[[list[Any], float], None],
) -> set[str]:
    """Wait for a chunk's answer: tell `confirmed` what landed; the keys Cloudflare reports unsuccessful."""
    unsuccessful = set(sending.result())
    confirmed([e for e in chunk if key(e) not in unsuccessful] if unsuccessful else chunk, sent_at)
    ledger.in_flight = []
    return unsuccessful


# --------------------------------------------------------------------------- state file

STATE_FORMAT = 2
STATE_KIND = "lapi-kv-sync state"
STATE_LOCK_WAIT = 30.0  # seconds a run waits for another run's lock on the same STATE_FILE
# Why a run lists every key (audits) instead of planning against its record; the metric's labels.
AUDIT_REASONS = ("no_state_file", "requested", "no_record", "unreadable", "foreign", "unfinished", "interval")
_REMEDIATION_CODE = {"ban": "b", "captcha": "c", None: "-"}
_CODE_REMEDIATION = {c: r for r, c in _REMEDIATION_CODE.items()}
# KV's list is eventually consistent: Cloudflare says a change may take up to 60 s to show in it.
# The record keeps what this job wrote and deleted for twice that (its clock offset is measured to
# a second), and an audit lays those over the listing, which they may be newer than.
KV_LIST_LAG = 120
# The most recent changes a record keeps. A run that changes more (a cold run, a rotation) keeps
# none, and the audits of the next KV_LIST_LAG seconds are put off instead: 300,000 keys and
# their times cost a run at the cap over 100 MiB more.
RECENT_MAX = 20_000
# What a record may unpack to, header first: a header is a few hundred bytes; a key's name, as JSON,
# at most six bytes for each of its MAX_KEY_BYTES (`\u0000`), its expiration at most 21.
MAX_HEADER_BYTES = 64 * 1024
# The least a key takes in a record's columns: `"ip:1.2.3.4",` (a prefix of one character and the
# shortest address make 12), `null,` or a number and its comma, and its letter.
MIN_RECORD_KEY_BYTES = 14
MAX_NAME_JSON = MAX_KEY_BYTES * 6 + 3
MAX_RECENT_JSON = MAX_NAME_JSON + 22


class RecordCorrupt(ValueError):
    """A state file that is not a whole record of this format."""


class Record(NamedTuple):
    """The job's own account of what it put in KV under its prefix, as a file holds it.

    `keys` holds what Cloudflare confirmed: each key's remediation (None: unknown, so the plan
    rewrites or deletes it) and expiration on Cloudflare's clock (None: none known)."""

    account: str
    namespace: str
    prefix: str
    audited_at: float  # our wall time of the last full listing
    clock_offset: float  # Cloudflare's clock minus ours, measured at that listing
    usage_metrics_sent_at: float | None
    keys: dict[str, Present]
    # Set only by a run that converged (KV holds all it wanted): the digest of the LAPI answer it
    # projected (AnswerDigest) and that projection's figures, for a run that finds the same answer.
    lapi_digest: str | None = None
    projected: Projected | None = None
    due_at: float | None = None  # that run's Plan.due_at (None: no key comes due)
    # The keys this job changed in the last KV_LIST_LAG seconds, each with when (Cloudflare's
    # clock); what each holds since is in `keys` (absent: deleted). As read from a file, the line
    # as it is, decoded only by a run that needs it (recent_changes()): after a cold run it names
    # every key, and a steady run does not need it.
    recent: dict[str, int] | str = ""
    settling_until: float | None = None  # Cloudflare's clock: until then, KV's listing may lag more than `recent`
    # The tables KV holds, by name, as Cloudflare confirmed them: their keys are in `keys` (each
    # with its digest for a remediation), their values here, so that a run can keep a table that
    # may stand without reading it back from KV.
    documents: Mapping[str, bytes] = {}  # noqa: RUF012  # never changed

    def recent_changes(self) -> dict[str, int]:
        """`recent` as a dict; empty if its line is not two columns of names and whole numbers
        (it only ever makes an audit keep more of what this job did)."""
        if not isinstance(self.recent, str):
            return self.recent
        try:
            names, ats = json.loads(self.recent or "[[],[]]")
            if not (len(names) == len(ats) and set(map(type, ats)) <= {int} and set(map(type, names)) <= {str}):
                return {}
            return dict(zip(names, ats, strict=True))
        except (ValueError, TypeError, RecursionError):
            return {}

    def earliest_expiration(self) -> float:
        """When the first of the keys expires on Cloudflare's clock (inf: none does)."""
        expirations = map(operator.itemgetter(0), self.keys.values())
        return min(filter(functools.partial(operator.is_not, None), expirations), default=math.inf)


class Projected(NamedTuple):
    """A projection's figures, as the summary line and the metrics give them."""

    wanted: int
    by_remediation: dict[str, int]
    ignored: dict[str, int]
    table: dict[str, int] = {}  # noqa: RUF012  # the tables' entries by "scope:remediation"; never changed
    table_bytes: dict[str, int] = {}  # noqa: RUF012  # each table's size, by name; never changed


class Loaded(NamedTuple):
    """What a run found on disk before it began: a record, and why it cannot be trusted if it cannot."""

    record: Record | None
    problem: str | None  # an AUDIT_REASONS entry, or None when the record can be trusted
    detail: str = ""
    seen_at: float | None = None  # the latest wall time a run of this STATE_FILE began at (the lock file's)


def encode_record(record: Record, kv_now: float) -> Iterator[str]:
    """The record as four lines: a JSON header, then the keys still alive at `kv_now` (Cloudflare's
    clock) as a JSON array, their expirations as a JSON array (null: none known), and their
    remediations as one letter each (`b`, `c`, `-` for unknown). Columns, not a line per key, so
    that reading a million keys back is a few C-level passes rather than a Python loop. A fifth
    line, when the header counts `recent` changes: their keys and times as two JSON arrays in
    one, those older than KV_LIST_LAG at `kv_now` left out. Then the value of each table the
    header lists with a length, in base64, one a line."""
    # Three columns of references, not a tuple per key: a record of 300,000 keys is saved at the
    # run's fullest (a rotation: the old keys, the new, the plan), and a tuple each costs 20 MiB.
    # The tables' keys go in the header (their "remediation" is a digest), their values after.
    tables = {record.prefix + name: name for name in DOCUMENT_NAMES}
    names = [key for key, have in record.keys.items() if (have[0] is None or have[0] > kv_now) and key not in tables]
    haves = list(map(record.keys.__getitem__, names))
    expirations, remediations = map(operator.itemgetter(0), haves), map(operator.itemgetter(1), haves)
    recent = {key: at for key, at in record.recent_changes().items() if at > kv_now - KV_LIST_LAG}
    documents, values = [], []
    for key, name in tables.items():
        if (have := record.keys.get(key)) is not None and (have[0] is None or have[0] > kv_now):
            value = record.documents.get(name) if have[1] is not None else None
            documents.append(
                [name, have[1], None if have[0] is None else int(have[0]), None if value is None else len(value)]
            )
            if value is not None:
                values.append(value)
    header = {
        "kind": STATE_KIND,
        "format": STATE_FORMAT,
        "account": record.account,
        "namespace": record.namespace,
        "prefix": record.prefix,
        "audited_at": record.audited_at,
        "clock_offset": record.clock_offset,
        "usage_metrics_sent_at": record.usage_metrics_sent_at,
        "keys": len(names),
        "documents": documents,
        "lapi_digest": record.lapi_digest,
        "projected": record.projected._asdict() if record.projected else None,
        "due_at": record.due_at,
    }
    if recent:
        header["recent"] = len(recent)
    if record.settling_until is not None and record.settling_until > kv_now:
        header["settling_until"] = record.settling_until
    yield json.dumps(header) + "\n"
    yield json.dumps(names, separators=(",", ":")) + "\n"
    whole = [None if expiration is None else int(expiration) for expiration in expirations]
    yield json.dumps(whole, separators=(",", ":")) + "\n"
    yield "".join(map(_REMEDIATION_CODE.__getitem__, remediations)) + "\n"
    if recent:
        yield json.dumps([list(recent), list(recent.values())], separators=(",", ":")) + "\n"
    for value in values:
        yield base64.b64encode(value).decode("ascii") + "\n"


def decode_record(lines: Iterable[str], columns_limit: int | None = None) -> Record:
    """The record those lines hold; RecordCorrupt for anything but a whole record of this format,
    or one whose key columns take more than `columns_limit` characters."""
    lines = iter(lines)
    header = record_header(next(lines, ""))
    try:
        account, namespace, prefix = (str(header[k]) for k in ("account", "namespace", "prefix"))
        audited_at, clock_offset = float(header["audited_at"]), float(header["clock_offset"])
        sent = header.get("usage_metrics_sent_at")
        usage_metrics_sent_at = None if sent is None else float(sent)
        count, recent_count, _ = record_counts(header)
        lapi_digest, projected = header.get("lapi_digest"), header.get("projected")
        if lapi_digest is not None and not (isinstance(lapi_digest, str) and isinstance(projected, dict)):
            raise TypeError
        projected = (
            Projected(
                int(projected["wanted"]),
                figures(projected["by_remediation"]),
                figures(projected["ignored"]),
                table_figures(projected.get("table", {})),  # absent from a record written before the scope table
                table_sizes(projected.get("table_bytes", {})),
            )
            if lapi_digest is not None
            else None
        )
        documents = recorded_documents(header.get("documents", []))
        due_at = header.get("due_at")
        due_at = None if due_at is None or lapi_digest is None else float(due_at)
        if due_at is not None and not math.isfinite(due_at):
            raise ValueError
        settling_until = header.get("settling_until")
        settling_until = None if settling_until is None else float(settling_until)
        if settling_until is not None and not math.isfinite(settling_until):
            raise ValueError
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
        raise RecordCorrupt("header lacks a field or holds a wrong type") from None
    if not (math.isfinite(audited_at) and math.isfinite(clock_offset)):
        raise RecordCorrupt("header holds a number out of range")
    try:
        # Measured before they are decoded: a column of junk (`[0,0,0,…]`) as long as the tables'
        # values may be too would make tens of millions of references first, past the CronJob's memory.
        names_line, expirations_line = next(lines), next(lines)
        if columns_limit is not None and len(names_line) + len(expirations_line) > columns_limit:
            raise ValueError(f"key columns longer than a record of this configuration has ({columns_limit} bytes)")
        names = json.loads(names_line)
        expirations = json.loads(expirations_line)
        codes = next(lines).removesuffix("\n")
        recent = next(lines).removesuffix("\n") if recent_count else ""
        values = {
            name: base64.b64decode(next(lines).removesuffix("\n"), validate=True)
            for name, _, _, size in documents
            if size is not None
        }
        if next(lines, None) is not None:
            raise ValueError("more lines than the header says")
        if not (isinstance(names, list) and isinstance(expirations, list) and count == len(names)):
            raise ValueError("not as many keys as the header says")
        if not (len(expirations) == len(codes) == count):
            raise ValueError("columns of different lengths")
        if not set(map(type, expirations)) <= {int, type(None)}:
            raise ValueError("an expiration that is not a whole number")
        if not all(map(str.startswith, names, itertools.repeat(prefix))):  # TypeError for a non-string
            raise ValueError("a key outside the prefix")
        remediations = map(_CODE_REMEDIATION.__getitem__, codes)  # KeyError for an unknown letter
        present = map(functools.partial(tuple_new, Present), zip(expirations, remediations, strict=True))
        keys = dict(zip(names, present, strict=True))
    except (StopIteration, ValueError, KeyError, TypeError, binascii.Error) as e:
        raise RecordCorrupt(f"the key columns are not whole ({str(e) or type(e).__name__})") from None
    if len(keys) != count:
        raise RecordCorrupt("a key appears twice")
    for name, digest, expiration, size in documents:
        value = values.get(name)
        if value is not None and (len(value) != size or hashlib.sha256(value).hexdigest()[:32] != digest):
            raise RecordCorrupt(f"the {name} table's value is not the one its digest names")
        keys[prefix + name] = Present(expiration, digest)
    return Record(
        account, namespace, prefix, audited_at, clock_offset, usage_metrics_sent_at, keys, lapi_digest, projected,
        due_at, recent, settling_until, values,
    )  # fmt: skip


def record_header(line: str | bytes) -> dict[str, Any]:
    """A record's first line as a header of this format; RecordCorrupt for anything else."""
    try:
        header = json.loads(line or "null")
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("kind") != STATE_KIND:
        raise RecordCorrupt("not a lapi-kv-sync state record")
    if header.get("format") != STATE_FORMAT:
        raise RecordCorrupt(f"format {header.get('format')!r}, this version reads {STATE_FORMAT}")
    return header


def record_counts(header: Mapping[str, Any]) -> tuple[int, int, int]:
    """How many keys and recent changes a header says its record holds, and how many characters
    its tables' values take; ValueError (or TypeError) unless whole numbers from 0."""
    count, recent = header["keys"], header.get("recent", 0)
    if not (type(count) is int and type(recent) is int and count >= 0 and recent >= 0):
        raise ValueError("a count that is not a whole number")
    sizes = [size for _, _, _, size in recorded_documents(header.get("documents", [])) if size is not None]
    return count, recent, sum(4 * -(-size // 3) + 1 for size in sizes)  # base64, and a newline each


def unpacked_record(packed: bytes, limit: int) -> bytes:
    """A record's text from its gzip file, unpacking no more than its header allows (its counts,
    each line at its longest) and never more than `limit` bytes: a small file that unpacks to a
    gigabyte is found out after MAX_HEADER_BYTES. RecordCorrupt for anything but one whole member."""
    unpack = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip, one member
    try:
        text = unpack.decompress(packed, MAX_HEADER_BYTES + 1)
        end = text.find(b"\n")
        if not 0 <= end <= MAX_HEADER_BYTES:
            raise RecordCorrupt("no header line in its first 64 KiB")
        header = record_header(text[: end + 1])  # its own RecordCorrupt: not a record, or another format
        try:
            count, recent, tables = record_counts(header)
        except (KeyError, ValueError, TypeError):
            raise RecordCorrupt("header lacks a field or holds a wrong type") from None
        if max(count, recent) > limit // MIN_RECORD_KEY_BYTES:
            raise RecordCorrupt(f"claims more keys than a record of at most {limit} bytes can hold")
        most = min(limit, end + 1 + count * (MAX_NAME_JSON + 22 + 1) + recent * MAX_RECENT_JSON + tables + 64)
        text += unpack.decompress(unpack.unconsumed_tail, max(1, most + 1 - len(text)))
        if len(text) > most:
            raise RecordCorrupt(f"unpacks to more than its header allows ({most} bytes)")
        if not unpack.eof or unpack.unused_data:
            raise RecordCorrupt("not one whole gzip member")
        return text
    except zlib.error as e:
        raise RecordCorrupt(f"not gzip ({e})") from None


def text_lines(text: bytes) -> Iterator[str]:
    """The UTF-8 lines of `text`, split on newlines only, each decoded as it is taken (a
    StringIO of the whole would hold four bytes a character). UnicodeDecodeError for junk."""
    start = 0
    while start < len(text):
        end = text.find(b"\n", start)
        end = len(text) if end < 0 else end + 1
        yield text[start:end].decode("utf-8")
        start = end


def recorded_documents(documents: Any) -> list[tuple[str, str | None, int | None, int | None]]:
    """The tables' keys as a record's header lists them (`[name, digest, expiration, length]`, the
    last three null when unknown, the length null when the value is not kept); TypeError or
    ValueError for anything else."""
    if type(documents) is not list:
        raise TypeError
    read = []
    for name, digest, expiration, size in documents:  # TypeError or ValueError unless four each
        if name not in DOCUMENT_NAMES or name in (r[0] for r in read):
            raise ValueError(name)
        if not (digest is None or (type(digest) is str and _DIGEST.fullmatch(digest))):
            raise TypeError
        if not (expiration is None or type(expiration) is int) or not (
            size is None or (type(size) is int and size > 0)
        ):
            raise TypeError
        if size is not None and digest is None:
            raise ValueError("a value without its digest")
        read.append((name, digest, expiration, size))
    return read


def table_sizes(sizes: Any) -> dict[str, int]:
    """A record's table sizes by name; TypeError or ValueError for anything else."""
    sizes = figures(sizes)
    if not sizes.keys() <= set(DOCUMENT_NAMES):
        raise ValueError(sizes)
    return sizes


def table_figures(counts: Any) -> dict[str, int]:
    """A record's table entries by `scope:remediation`; TypeError or ValueError for anything else."""
    counts = figures(counts)
    for name in counts:
        scope, _, remediation = name.partition(":")
        if scope not in TABLE_SCOPES or remediation not in REMEDIATION_RANK:
            raise ValueError(name)
    return counts


def figures(counts: Any) -> dict[str, int]:
    """A record's counts by name; TypeError or ValueError for anything else."""
    if not isinstance(counts, dict):
        raise TypeError
    return {str(name): int(count) for name, count in counts.items()}


def audit_reason(loaded: Loaded, config: Config, now: float, requested: bool) -> tuple[str | None, str]:
    """Why this run must list every key (an AUDIT_REASONS entry and a few words), or None and a few
    words when it may plan against its record. A record problem comes first: it is what the
    metrics should show even when an audit was asked for anyway.

    The interval is measured on the wall clock, which can step back: a record audited in what is
    now the future, or a run that began before one that ran earlier (the lock file keeps the
    latest start), means the clock went back, and the run audits then, early, never late."""
    if not config.state_file:
        return "no_state_file", "every run without STATE_FILE"
    record = loaded.record
    if loaded.problem or record is None:
        return loaded.problem or "no_record", loaded.detail or "no record yet"
    theirs = (record.account, record.namespace, record.prefix)
    ours = (config.cf_account_id, config.cf_namespace_id, config.kv_key_prefix)
    if theirs != ours:
        names = ("CF_ACCOUNT_ID", "CF_KV_NAMESPACE_ID", "KV_KEY_PREFIX")
        return "foreign", "record written for another " + ", ".join(
            n for n, a, b in zip(names, theirs, ours, strict=True) if a != b
        )
    age = now - record.audited_at
    back = max(-age, (loaded.seen_at or now) - now)
    if requested:
        reason, words = "requested", f"--audit, last audit {age:.0f}s ago"
    elif back > 0:
        reason, words = "interval", f"the clock went back {back:.0f}s since the last audit or run"
    elif not age < config.audit_interval:
        reason, words = "interval", f"last audit {age:.0f}s ago, AUDIT_INTERVAL={config.audit_interval:g}"
    else:
        return None, f"record trusted, last audit {age:.0f}s ago"
    settling = (record.settling_until or -math.inf) - (now + record.clock_offset)
    if 0 < settling <= KV_LIST_LAG:  # bounded: a record cannot put an audit off for longer
        return None, f"record trusted, audit put off {settling:.0f}s for KV's listing to show the last run's changes"
    return reason, words


TRUSTED_AUDITS = (None, "requested", "interval")  # audit reasons a trusted record can have


def record_after(keys: Mapping[str, Present], ledger: Ledger, offset: float) -> dict[str, Present]:
    """What KV holds under the prefix after `ledger`'s calls, given it held `keys` before: each
    confirmed write at the expiration Cloudflare gave it (its clock, from the time the chunk was
    sent, so never later than the real one), confirmed deletes gone, and every key whose call got
    no clear answer unknown, so the next plan rewrites or deletes it."""
    after = dict(keys)
    as_present = functools.partial(tuple_new, Present)
    for sent, sent_at in ledger.written:  # a chunk of up to 10,000 at a time, in C: a cold run has 100,000s
        if not sent:
            continue
        keys_sent, remediations, ttls, _, _ = zip(*sent, strict=True)
        expirations = map(math.floor, map(operator.add, itertools.repeat(sent_at + offset), ttls))
        after.update(zip(keys_sent, map(as_present, zip(expirations, remediations, strict=True)), strict=True))
    for sent, _ in ledger.deleted:
        for key in sent:
            after.pop(key, None)
    for key in ledger.in_flight + ledger.uncertain:
        after[key] = Present(None, None)
    return after


def recent_after(recent: Mapping[str, int], ledger: Ledger, offset: float, kv_now: float) -> dict[str, int] | None:
    """The keys changed lately once `ledger`'s are added, each at the time its chunk was sent
    (Cloudflare's clock), one with no clear answer at `kv_now`; None when more than RECENT_MAX.
    Those older than KV_LIST_LAG at `kv_now` are dropped: a listing shows them by now."""
    changed = {key: at for key, at in recent.items() if at > kv_now - KV_LIST_LAG}
    sent = map(len, map(operator.itemgetter(0), itertools.chain(ledger.written, ledger.deleted)))
    if len(changed) + sum(sent) + len(ledger.in_flight) + len(ledger.uncertain) > RECENT_MAX:
        return None
    for chunk, at in ledger.written:
        changed.update(zip(map(write_key, chunk), itertools.repeat(math.floor(at + offset))))
    for chunk, at in ledger.deleted:
        changed.update(zip(chunk, itertools.repeat(math.floor(at + offset))))
    changed.update(zip(ledger.in_flight + ledger.uncertain, itertools.repeat(math.floor(kv_now))))
    return changed


def recent_and_settling(
    recent: dict[str, int] | None, settling_until: float | None, kv_now: float
) -> tuple[dict[str, int], float | None]:
    """A new record's recent changes and the end of its settling time: with more than RECENT_MAX
    changes, none, and the audits of the next KV_LIST_LAG seconds put off."""
    if recent is None:
        return {}, kv_now + KV_LIST_LAG
    return recent, settling_until if settling_until is not None and settling_until > kv_now else None


UNKNOWN = Present(None, None)  # a key whose state is not known: the plan writes it, or deletes it


def reconcile(listed: dict[str, Present], lately: Mapping[str, Present | None]) -> int:
    """Mark unknown, in place, each key that a listing and the job's own changes of the last
    KV_LIST_LAG seconds (`lately`: what each holds since, None: deleted) disagree on, so that the
    plan sends it again: a write if LAPI wants the key, a delete if not. KV's list may lag a change
    by up to a minute, and the key may have been changed behind the job's back meanwhile: neither
    is the truth alone, and a write or a delete sent again is harmless. The number marked."""
    marked = 0
    for key, have in lately.items():
        if not same_key(listed.get(key), have):
            listed[key] = UNKNOWN
            marked += 1
    return marked


def same_key(a: Present | None, b: Present | None) -> bool:
    """Whether two accounts of a key agree: both absent, or the same remediation and expirations
    within EXPIRATION_SLACK (a record counts a write's expiration from when it was sent)."""
    if a is None or b is None:
        return a is b
    if a.remediation is None or a.remediation != b.remediation or (a.expiration is None) != (b.expiration is None):
        return False
    return a.expiration is None or abs(a.expiration - b.expiration) <= EXPIRATION_SLACK


class StateFile:
    """The record on disk, replaced whole (temporary file, fsync, rename), and a lock file beside it.

    The lock file (`STATE_FILE.lock`) keeps two runs from interleaving, and holds the latest time
    a run began (an audit comes early when the clock went back). Before a run changes KV it sets
    the record aside (`STATE_FILE.unfinished`, by a rename, or an empty one when there is no record),
    and save() puts a new record in place and removes what was set aside: a run interrupted at any
    point (a signal, a kill, a crash, a full disk) leaves no record where the next run looks, so
    that run audits. Losing the lock file loses nothing but the time. Nothing but a regular file
    is opened for reading or writing, without blocking (a FIFO there would hang the run)."""

    def __init__(self, path: str, clock: Clock, limit: int = 1 << 30, columns_limit: int | None = None):
        self.path, self.clock, self.limit, self.columns_limit = path, clock, limit, columns_limit
        self.lock_path = path + ".lock"
        self.aside_path = path + ".unfinished"
        self.lock_fd: int | None = None

    def lock(self, wait: float) -> bool:
        """Hold the lock, waiting up to `wait` seconds; False if another run held it all along.
        OSError when the lock file cannot be opened or is not a regular file."""
        # O_NOFOLLOW: a symlink planted in a shared directory must not get another file truncated.
        self.lock_fd = regular_file(self.lock_path, os.O_RDWR | os.O_CREAT)
        give_up = self.clock.monotonic() + wait
        while True:
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if self.clock.monotonic() >= give_up:
                    self.unlock()
                    return False
                self.clock.sleep(0.2)

    def unlock(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing releases the flock
            self.lock_fd = None

    def began(self, now: float) -> float | None:
        """Note in the lock file that a run began at `now`; the latest time one began before (None:
        unknown). Best effort: the time only makes an audit come earlier."""
        assert self.lock_fd is not None
        seen = None
        with contextlib.suppress(OSError, ValueError, OverflowError):
            seen = float(os.pread(self.lock_fd, 64, 0).decode("ascii").strip() or "nan")
        seen = seen if seen is not None and math.isfinite(seen) else None
        with contextlib.suppress(OSError):
            text = f"{max(now, seen or now):.3f}\n".encode()
            os.pwrite(self.lock_fd, text, 0)
            os.ftruncate(self.lock_fd, len(text))
        return seen

    def load(self, seen_at: float | None = None) -> Loaded:
        """The record as found, never raising: a problem names what keeps it from being trusted.
        Anything that goes wrong reading it (a junk file, numbers out of range, nesting too deep,
        more than it may unpack to, memory) makes it unreadable: the run audits and rebuilds it."""
        try:
            record = self.read(self.path)
        except FileNotFoundError:
            if os.path.lexists(self.aside_path):  # what it set aside is of no use: it changed KV since
                return Loaded(None, "unfinished", "the run before did not finish recording", seen_at)
            return Loaded(None, "no_record", "no record yet", seen_at)
        except OSError as e:
            return Loaded(None, "unreadable", f"cannot read {self.path}: {e.strerror or e}", seen_at)
        except RecordCorrupt as e:
            return Loaded(None, "unreadable", f"record unreadable ({e})", seen_at)
        except Exception as e:  # noqa: BLE001  # nesting too deep, memory, anything unforeseen: as unreadable
            return Loaded(None, "unreadable", f"record unreadable ({type(e).__name__})", seen_at)
        return Loaded(record, None, "", seen_at)

    def read(self, path: str) -> Record:
        """The record at `path`: OSError when it cannot be read (FileNotFoundError when there is
        none), RecordCorrupt (or anything) when it is not one."""
        with open(regular_file(path, os.O_RDONLY), "rb") as f:
            packed = f.read(self.limit + 1)  # gzip never packs a record to more than it unpacks to
        if len(packed) > self.limit:
            raise RecordCorrupt(f"larger than a record may be ({self.limit} bytes)")
        text = unpacked_record(packed, self.limit)
        del packed
        return decode_record(text_lines(text), self.columns_limit)

    def set_aside(self) -> None:
        """Before KV changes: what is on disk stops being trusted until save() replaces it. OSError
        when it cannot be done: then KV must not change."""
        if os.path.lexists(self.path):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path, self.aside_path)
                sync_directory(self.path)
                return
        # No record: nothing to distrust. An empty mark only tells the next run why it audits.
        with contextlib.suppress(OSError):
            os.close(regular_file(self.aside_path, os.O_WRONLY | os.O_CREAT))

    def save(self, record: Record, kv_now: float) -> None:
        """Replace the record atomically, then remove what was set aside. OSError if any step fails
        (then nothing is where the next run looks, if the run set the record aside, so it audits)."""
        tmp = f"{self.path}.tmp{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # one a killed run left (a pod's job is PID 1 every time), or a planted link
        try:
            # O_EXCL|O_NOFOLLOW: never write through a symlink planted under that name.
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with open(os.open(tmp, flags, 0o600), "wb") as raw:
                with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as f:
                    for line in encode_record(record, kv_now):
                        f.write(line.encode())
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        sync_directory(self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.aside_path)  # if this is lost in a crash, the record in place still wins


def regular_file(path: str, flags: int) -> int:
    """A descriptor of the regular file at `path`, opened without blocking and never through a
    symlink; OSError for anything else (a FIFO, a device, a directory, a symlink)."""
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sync_directory(path: str) -> None:
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --------------------------------------------------------------------------- report and metrics


@dataclass
class Report:
    """The figures of one run, for the summary line and the Pushgateway."""

    started: float
    duration: float = 0.0
    success: bool = False
    wanted: int = 0
    by_remediation: Counter[str] = field(default_factory=Counter)
    written: int = 0
    deleted: int = 0
    unchanged: int = 0
    guarded: int = 0
    ignored: Counter[str] = field(default_factory=Counter)
    cloudflare_requests: Counter[str] = field(default_factory=Counter)  # tried, by operation
    cloudflare_answers: Counter[str] = field(default_factory=Counter)  # HTTP answers they got
    exit_code: int = EXIT_OK
    active_decisions: Counter[tuple[str, str]] = field(default_factory=Counter)  # keys by (origin, ip_type)
    audit_reason: str | None = "no_state_file"  # an AUDIT_REASONS entry; None: planned against the record
    audit_detail: str = "every run without STATE_FILE"
    record_trusted: bool = False
    lapi_unchanged: bool = False  # LAPI's answer was the one the record was written with: no plan
    spared: int = 0  # keys LAPI no longer wants that the network table holds: left to expire, not deleted
    resent: int = 0  # keys an audit sent again, where the listing and the job's last changes disagreed
    # The tables: what the run did with each one's key, by name ("written", "unchanged",
    # "deleted", "delete held back"; "to write", "to delete" until Cloudflare confirms; absent: no
    # table and no key), their entries by (scope, remediation) and their sizes. Not in the figures
    # of address keys above.
    table_actions: dict[str, str] = field(default_factory=dict)
    table_entries: Counter[tuple[str, str]] = field(default_factory=Counter)
    table_bytes: dict[str, int] = field(default_factory=dict)


Sample = tuple[str, str, dict[str, str], float]  # name, help, labels, value


def metric_samples(report: Report) -> list[Sample]:
    p = "crowdsec_kv_sync_"
    samples: list[Sample] = [
        (
            p + "success",
            "1 if the last run converged KV to LAPI, 0 if it failed or was skipped.",
            {},
            float(report.success),
        ),
        (p + "last_run_seconds", "Unix time the last run ended.", {}, report.started + report.duration),
        (p + "duration_seconds", "How long the last run took.", {}, report.duration),
        (
            p + "exit_code",
            "Exit code of the last run: 0 done, 1 Cloudflare side failed, 3 LAPI unreadable (skipped), "
            "4 STATE_FILE's volume kept it from changing KV, 143/130 SIGTERM/SIGINT.",
            {},
            report.exit_code,
        ),
    ]
    held_back = (p + "deletes_held_back", "Deletes held back by MAX_DELETES in the last run.", {}, report.guarded)
    if not report.success:
        return samples + [held_back] if report.guarded else samples
    samples += [
        (
            p + "last_success_timestamp_seconds",
            "Unix time of the last successful run.",
            {},
            report.started + report.duration,
        ),
        (p + "decisions", "Keys wanted in KV (addresses with a ban or captcha).", {}, report.wanted),
        (p + "written", "Keys written this run.", {}, report.written),
        (p + "deleted", "Keys deleted this run.", {}, report.deleted),
        (p + "unchanged", "Keys already up to date this run.", {}, report.unchanged),
        held_back,
    ]
    samples += [
        (p + "keys", "Keys wanted, by remediation.", {"remediation": r}, report.by_remediation[r])
        for r in REMEDIATION_RANK
    ]
    samples += [
        (p + "ignored", "LAPI decisions not written, by reason.", {"reason": r}, report.ignored[r])
        for r in IGNORE_REASONS
    ]
    samples.append(
        (
            p + "spared",
            "Keys LAPI no longer wants that the network table holds, left to expire instead of deleted this run.",
            {},
            report.spared,
        )
    )
    samples += [
        (
            p + "table_entries",
            "Entries in the tables, by scope (network: Range and TABLE_ORIGINS' Ip decisions; country; as) and remediation.",
            {"scope": scope, "remediation": r},
            report.table_entries[scope, r],
        )
        for scope in TABLE_SCOPES
        for r in REMEDIATION_RANK
    ]
    samples += [
        (p + "table_bytes", "Size of each table in bytes (0: none).", {"table": name}, report.table_bytes.get(name, 0))
        for name in DOCUMENT_NAMES
    ]
    samples += [
        (
            p + "cloudflare_requests",
            "Cloudflare API requests tried this run, retries included, by operation.",
            {"operation": op},
            n,
        )
        for op, n in sorted(report.cloudflare_requests.items())
    ]
    samples += [
        (
            p + "audited",
            "1 if the last run listed every key (an audit), by why; all 0 when it planned against STATE_FILE's record.",
            {"reason": r},
            float(report.audit_reason == r),
        )
        for r in AUDIT_REASONS
    ]
    samples.append(
        (p + "state_trusted", "1 if the last run found a STATE_FILE record it could trust.", {}, report.record_trusted)
    )
    return samples


def exposition(samples: list[Sample]) -> str:
    """Prometheus text format: one HELP and TYPE per family, no timestamps, a final newline."""
    lines, typed = [], set()
    for name, help_text, labels, value in samples:
        if name not in typed:
            typed.add(name)
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        number = str(int(value)) if float(value).is_integer() else repr(float(value))
        lines.append(f"{name}{{{label_text}}} {number}" if label_text else f"{name} {number}")
    return "\n".join(lines) + "\n"


PUSH_RETRY = Retry(attempts=2, backoff=0.5, max_wait=1.0)
PUSH_GRACE = 15.0  # seconds a push may take past RUN_DEADLINE; the CronJob allows 60 more


def push_metrics(http: Http, config: Config, report: Report, log: Log) -> None:
    """PUT the whole group after a success; POST only success/last run/duration after a failure,
    so the last good figures and the last success time survive for alerting."""
    if not config.pushgateway_url:
        return
    method = "PUT" if report.success else "POST"
    url = f"{config.pushgateway_url}/metrics/job/{JOB_NAME}"
    headers = {"User-Agent": USER_AGENT, "Content-Type": "text/plain; version=0.0.4"}
    http.grant(PUSH_GRACE, f"the push's {PUSH_GRACE:g}s")
    try:
        response = http.request(
            method, url, headers=headers, body=exposition(metric_samples(report)).encode(), retry=PUSH_RETRY
        )
    except (TransportError, DeadlineExceeded, AnswerTooLarge) as e:
        log.warning("push_failed", f"Pushgateway at {config.pushgateway_url} took no metrics: {e}")
        return
    if response.status >= 300:
        log.warning(
            "push_failed",
            f"Pushgateway answered HTTP {response.status}: {snippet(response.body, config.secrets)}"
            + through_proxy_note(response),
        )


# --------------------------------------------------------------------------- CrowdSec usage metrics

# CrowdSec 1.6.3 and later take usage metrics from remediation components (`cscli metrics show
# bouncers`, the Console) and ask for at least 15 minutes between two sends.
USAGE_METRICS_INTERVAL = 900
# With no record of the last send, the run that starts in the first minute of a quarter hour
# (UTC) sends: with the CronJob's one run a minute, that is one run in each quarter hour.
USAGE_METRICS_SLOT = 60
USAGE_METRICS_TIMEOUT = 5.0
USAGE_METRICS_RETRY = Retry(attempts=1, backoff=0.0, max_wait=0.0)  # best effort: never a retry loop
USAGE_COMPONENT = "lapi-kv-sync"
MAX_USAGE_TEXT = 255  # CrowdSec's schema: label values, names and units up to 255 characters
# CrowdSec keeps the last figure it got for each origin and IP type: a zero must be sent for a
# count that dropped to nothing, or `cscli metrics` would show it forever. A run does not know
# what the runs before it sent, so it reports the origins cscli names, and both IP types of
# every origin it has, even when zero.
USAGE_ORIGINS = ("CAPI", "cscli", "crowdsec")
IP_TYPES = ("ipv4", "ipv6")


def usage_metrics_due(now: float, last_sent: float | None) -> bool:
    """Whether the run that started at `now` sends usage metrics. `last_sent`: when a run last
    sent them (the state file's `usage_metrics_sent_at`), None when unknown: then the clock decides."""
    if last_sent is None:
        return now % USAGE_METRICS_INTERVAL < USAGE_METRICS_SLOT
    # A last send in the future means the clock went back: send, rather than go quiet until it catches up.
    return not 0 <= now - last_sent < USAGE_METRICS_INTERVAL


def active_decisions(
    projection: Projection, documents: Mapping[str, Document], prefix: str
) -> Counter[tuple[str, str]]:
    """What the job enforces, by (origin, ip_type), as CrowdSec's own bouncers count it: a
    blocklist's decisions (origin `lists`) as `lists:<scenario>`, the list's name. Each address
    key counts one, and each network in the network table one (a range as a firewall bouncer's set
    counts it, an address of TABLE_ORIGINS as its key would); the scope table's countries and AS
    have no place in CrowdSec's `active_decisions`, which counts by IP type."""
    start = len(prefix)
    enforced = [(("ipv6" if ":" in key[start:] else "ipv4"), w) for key, w in projection.wanted.items()]
    networks = documents.get(prefix + "networks")
    counted_as: dict[tuple[int, int, int], NetworkEntry] = {}  # a network with a ban and a captcha counts as its ban
    for entry in networks.kept if networks is not None else ():
        if entry[3] == "ban" or entry[:3] not in counted_as:
            counted_as[entry[:3]] = entry
    enforced += [(f"ipv{entry[0]}", projection.networks[entry]) for entry in counted_as.values()]
    return Counter(
        ((f"lists:{w.scenario}" if w.origin == "lists" and w.scenario else w.origin)[:MAX_USAGE_TEXT], ip_type)
        for ip_type, w in enforced
    )


def usage_metrics_payload(report: Report, os_info: Mapping[str, str], now: float) -> dict[str, Any]:
    """The body of `POST /v1/usage-metrics`: this job as one remediation component, the keys it
    keeps in KV as `active_decisions` (a gauge, so the window is only the sending interval)."""
    origins = sorted({origin for origin, _ in report.active_decisions} | set(USAGE_ORIGINS))
    items = [
        {
            "name": "active_decisions",
            "value": report.active_decisions[origin, ip_type],
            "unit": "ip",
            "labels": {"origin": origin, "ip_type": ip_type},
        }
        for origin in origins
        for ip_type in IP_TYPES
    ]
    component = {
        "type": USAGE_COMPONENT,
        "name": USAGE_COMPONENT,
        "version": __version__,
        "os": dict(os_info),
        "feature_flags": [],
        "utc_startup_timestamp": int(report.started),
        "metrics": [
            {"meta": {"utc_now_timestamp": int(now), "window_size_seconds": USAGE_METRICS_INTERVAL}, "items": items}
        ],
    }
    return {"remediation_components": [component]}


def os_release() -> dict[str, str]:
    """The OS as CrowdSec shows it (`name/version`): /etc/os-release where there is one."""
    try:
        release = platform.freedesktop_os_release()
    except OSError:
        release = {}
    name = release.get("NAME") or platform.system() or "unknown"
    version = release.get("VERSION_ID") or platform.release() or "unknown"
    return {"name": name[:MAX_USAGE_TEXT], "version": version[:MAX_USAGE_TEXT]}


def usage_metrics_to_send(config: Config, report: Report, last_sent: float | None) -> bool:
    return config.lapi_usage_metrics and report.success and usage_metrics_due(report.started, last_sent)


def send_usage_metrics(http: Http, config: Config, log: Log, report: Report, last_sent: float | None) -> float | None:
    """POST this run's usage metrics to LAPI when they are due after a run that converged; return
    the new `usage_metrics_sent_at` (the start of the run that tried, or `last_sent` unchanged).
    Best effort: one attempt, a short timeout within the run deadline; LAPI before 1.6.3 (404)
    or any error costs one debug line and never fails the run."""
    if not usage_metrics_to_send(config, report, last_sent):
        return last_sent
    headers = {"User-Agent": USER_AGENT, "Content-Type": "application/json"}
    if config.lapi_key:
        headers["X-Api-Key"] = config.lapi_key
    url = f"{config.lapi_url}/v1/usage-metrics"
    try:
        body = json.dumps(usage_metrics_payload(report, os_release(), http.clock.now())).encode()
        with http.within(USAGE_METRICS_TIMEOUT, f"the usage metrics' {USAGE_METRICS_TIMEOUT:g}s"):
            response = http.request(
                "POST", url, headers=headers, body=body, retry=USAGE_METRICS_RETRY, timeout=USAGE_METRICS_TIMEOUT
            )
    except Exception as e:  # whatever goes wrong here, the sync itself went right
        log.debug("usage_metrics", f"usage metrics not sent: {type(e).__name__}: {e}")
        return report.started
    if response.status == 404:
        log.debug("usage_metrics", "usage metrics not sent: LAPI has no /v1/usage-metrics (CrowdSec before 1.6.3)")
    elif response.status >= 300:
        log.debug(
            "usage_metrics",
            f"usage metrics not sent: LAPI answered HTTP {response.status}: {snippet(response.body, config.secrets)}",
        )
    return report.started


# --------------------------------------------------------------------------- output


_ESCAPES: tuple[Callable[[str], str], ...] = (
    lambda s: repr(s)[1:-1],
    lambda s: json.dumps(s)[1:-1],
    urllib.parse.quote,
    lambda s: urllib.parse.quote(s, safe=""),
    urllib.parse.quote_plus,
)


def secret_forms(secrets: Iterable[str]) -> list[str]:
    """Every form a secret can take in output, longest first: as is, in a repr, JSON-escaped,
    percent-encoded, and each of those escaped once more (a repr of an exception quoting a repr).
    Secrets under MIN_SECRET_LENGTH are left out: load_config refuses them, and a one-letter one
    would blank that letter everywhere."""
    forms = {s for s in secrets if len(s) >= MIN_SECRET_LENGTH}
    for _ in range(2):
        forms |= {escape(form) for form in forms for escape in _ESCAPES}
    return sorted(forms, key=len, reverse=True)


def redacted(text: str, forms: Iterable[str]) -> str:
    """`text` with each of the forms (secret_forms') replaced by `[redacted]`."""
    for form in forms:
        text = text.replace(form, "[redacted]")
    return text


# What could end or forge a line of a text log, or drive a terminal: C0 controls but the tab, DEL,
# C1 controls, and Unicode's line and paragraph separators.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def escaped_controls(text: str) -> str:
    """`text` with each control character written as Python writes it in a repr (`\\n`, `\\x1b`)."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def rfc3339(seconds: float) -> str:
    """Unix time as RFC 3339 in UTC with milliseconds (`2026-12-02T10:35:58.123Z`): what log
    pipelines (Loki, Elasticsearch, Fluent Bit, Vector) parse as a timestamp without configuration."""
    millis = round(seconds * 1000)  # whole milliseconds first, so .9996 carries into the next second
    whole = time.gmtime(millis // 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", whole) + f".{millis % 1000:03d}Z"


class Log:
    """Summary on stdout, warnings and errors on stderr; text or JSON lines; secrets never printed."""

    def __init__(
        self, out: TextIO, err: TextIO, fmt: str = "text", secrets: Iterable[str] = (), clock: Clock = SYSTEM_CLOCK
    ):
        self.out, self.err, self.fmt, self.clock = out, err, fmt, clock
        self.secrets = secret_forms(secrets)

    def redact(self, text: str) -> str:
        return redacted(text, self.secrets)

    def _emit(self, stream: TextIO, level: str, event: str, message: str, figures: Mapping[str, Any]) -> None:
        message = self.redact(message)  # before JSON escapes it once more
        if self.fmt == "json":
            record = {
                "time": rfc3339(self.clock.now()),
                "level": level,
                "event": event,
                "message": message,
                **figures,
            }
            line = json.dumps(record, sort_keys=False, default=str)
        else:
            # One event, one line: what a message quotes from outside (an error message, a body,
            # a header) cannot start a line of its own, nor a traceback spread over several.
            message = escaped_controls(message)
            line = f"lapi-kv-sync: {message}" if level == "info" else f"lapi-kv-sync: {level}: {message}"
        stream.write(self.redact(line) + "\n")
        stream.flush()

    def info(self, event: str, message: str, **figures: Any) -> None:
        self._emit(self.out, "info", event, message, figures)

    def debug(self, event: str, message: str, **figures: Any) -> None:
        """Worth knowing, never worth acting on: stdout, and never a warning."""
        self._emit(self.out, "debug", event, message, figures)

    def warning(self, event: str, message: str, **figures: Any) -> None:
        self._emit(self.err, "warning", event, message, figures)

    def error(self, event: str, message: str, **figures: Any) -> None:
        self._emit(self.err, "error", event, message, figures)


def counts(counter: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.items())


def counted(n: int, noun: str, plural: str = "") -> str:
    """A count and its noun, singular for one: `1 key`, `2 keys`, `0 entries`."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def left_out_named(ignored: Counter[str], reasons: Iterable[str]) -> dict[str, str]:
    """The decisions left out for each of these reasons, named as far as `ignored` (a LeftOut)
    kept them: value (scope type, origin), then how many more."""
    samples = getattr(ignored, "samples", {})
    named = {}
    for reason in reasons:
        kept = samples.get(reason, [])
        if not ignored[reason] or not kept:
            continue
        words = [
            f"{d.value} ({' '.join(filter(None, (d.scope, d.type))) or '?'}, origin {d.origin or '?'})" for d in kept
        ]
        more = ignored[reason] - len(kept)
        named[reason] = ", ".join(words) + (f" (+{more} more)" if more > 0 else "")
    return named


# A run names the decisions it leaves out for a reason that is new since the last converged run
# (what the state record says it left out); without a record, the run that starts in the first
# minute of an hour does: never the same names every minute. `expired` is named by dry runs only:
# a decision that ended as LAPI answered is no mistake.
NAMED_SLOT = 60


def log_left_out(log: Log, ignored: Counter[str], before: Mapping[str, int] | None, started: float) -> None:
    reasons = [
        r
        for r in IGNORE_REASONS
        if r != "expired"
        and ignored[r]
        and (before.get(r, 0) == 0 if before is not None else started % 3600 < NAMED_SLOT)
    ]
    named = left_out_named(ignored, reasons)
    if named:
        log.info(
            "ignored",
            "decisions left out, named once (a new reason since the last run, or once an hour): "
            + "; ".join(f"{reason} {ignored[reason]}: {words}" for reason, words in named.items()),
            ignored={reason: ignored[reason] for reason in named},
        )


def log_summary(log: Log, report: Report) -> None:
    ignored = Counter({r: report.ignored[r] for r in IGNORE_REASONS})
    message = (
        f"wanted {report.wanted} ({counts({r: report.by_remediation[r] for r in REMEDIATIONS})}), "
        f"written {report.written}, deleted {report.deleted}, unchanged {report.unchanged}, "
        f"{f'left to expire {report.spared}, ' if report.spared else ''}"
        f"ignored {sum(ignored.values())} ({counts(ignored)}), "
        f"{table_words(report) + ', ' if report.table_actions or report.table_entries else ''}"
        f"cloudflare attempts {sum(report.cloudflare_requests.values())} ({counts(report.cloudflare_requests)}), "
        f"answers {sum(report.cloudflare_answers.values())}, "
        f"{audit_words(report)}, {report.duration:.2f}s"
    )
    if not report.success:
        message = f"run FAILED (exit {report.exit_code}), figures so far: {message}"
    (log.info if report.success else log.error)(
        "run",
        message,
        success=report.success,
        wanted=report.wanted,
        written=report.written,
        deleted=report.deleted,
        unchanged=report.unchanged,
        held_back=report.guarded,
        spared=report.spared,
        ignored=dict(ignored),
        tables={
            name: {
                "action": report.table_actions.get(name),
                "entries": entries_by_name(table_entries(report, name)),
                "bytes": report.table_bytes.get(name, 0),
            }
            for name in DOCUMENT_NAMES
        },
        cloudflare_requests=dict(report.cloudflare_requests),
        cloudflare_answers=sum(report.cloudflare_answers.values()),
        audited=report.audit_reason is not None,
        audit_reason=report.audit_reason,
        state_trusted=report.record_trusted,
        lapi_unchanged=report.lapi_unchanged,
        duration_seconds=round(report.duration, 3),
    )


def entries_by_name(entries: Mapping[tuple[str, str], int]) -> dict[str, int]:
    """Scope table entries by `scope:remediation`, as JSON logs and the state record hold them."""
    return {f"{scope}:{remediation}": n for (scope, remediation), n in entries.items()}


def table_entries(report: Report, name: str) -> Counter[tuple[str, str]]:
    """A table's entries among the report's, by (scope, remediation)."""
    scopes = ("network",) if name == "networks" else SCOPE_TABLE_SCOPES
    return Counter({entry: n for entry, n in report.table_entries.items() if entry[0] in scopes})


def table_words(report: Report, actions: Mapping[str, str] | None = None, names: Iterable[str] = DOCUMENT_NAMES) -> str:
    """The tables in a few words: what became of each one's key, its entries by scope, its size."""
    actions = report.table_actions if actions is None else actions
    words = []
    for name in names:
        entries = table_entries(report, name)
        if name not in actions and not entries:
            continue
        by_scope = counts(
            {scope: sum(n for (s, _), n in entries.items() if s == scope) for scope in SCOPE_TABLE_SCOPES}
        )
        size = report.table_bytes.get(name, 0)
        words.append(
            f"{name} table {actions.get(name, 'none')} ({counted(sum(entries.values()), 'entry', 'entries')}"
            f"{': ' + by_scope if name == 'scopes' and by_scope else ''}; {counted(size, 'byte')})"
        )
    return ", ".join(words)


def log_table_plan(log: Log, report: Report, documents: Mapping[str, Document]) -> None:
    """Each table's line of a dry run, with a sample of its entries (none without a table or a key)."""
    dry = {"to write": "write", "to delete": "delete", "delete held back": "delete held back"}
    for document in documents.values():
        action = report.table_actions.get(document.name)
        if action is None and not document.kept:
            continue
        action = dry.get(action or "", action or "none")
        sample = document.sample()
        more = f" (+{len(document.kept) - len(sample)} more)" if len(document.kept) > len(sample) else ""
        log.info(
            "plan",
            f"dry run: {table_words(report, {document.name: action}, [document.name])}: {' '.join(sample)}{more}".rstrip(
                ": "
            ),
            table=document.name,
            action=action,
            count=len(document.kept),
            keys=sample,
        )


def audit_words(report: Report) -> str:
    if report.lapi_unchanged:
        return f"not audited ({report.audit_detail}), LAPI's answer unchanged since the record: nothing to plan"
    if report.audit_reason is None:
        return f"not audited ({report.audit_detail})"
    resent = (
        f"; {counted(report.resent, 'key')} the listing and the last two minutes' changes disagreed on, sent again"
        if report.resent
        else ""
    )
    return f"audited: {report.audit_reason} ({report.audit_detail}{resent})"


def log_plan(log: Log, plan: Plan, wanted: Mapping[str, Wanted], present: Mapping[str, Present]) -> None:
    """Each action's count and its first SAMPLE_KEYS keys, each with its remediation: the one a
    write or an unchanged key has, the one a deleted key held (`unknown`: none of ours)."""
    for action, keys, remediation in (
        ("write", [w.key for w in plan.writes], lambda key: wanted[key].remediation),
        ("delete", plan.deletes, lambda key: present[key].remediation or "unknown"),
        ("unchanged", plan.unchanged, lambda key: wanted[key].remediation),
        ("left to expire", plan.spared, lambda key: present[key].remediation or "unknown"),
    ):
        if action == "left to expire" and not keys:
            continue  # only with the network table holding keys LAPI no longer wants
        sample = keys[:SAMPLE_KEYS]
        remediations = [remediation(key) for key in sample]
        more = f" (+{len(keys) - len(sample)} more)" if len(keys) > len(sample) else ""
        listed = " ".join(f"{key} ({r})" for key, r in zip(sample, remediations, strict=True))
        log.info(
            "plan",
            f"dry run: {action} {len(keys)}: {listed}{more}".rstrip(": "),
            action=action,
            count=len(keys),
            keys=sample,
            remediations=remediations,
        )


# --------------------------------------------------------------------------- the edge's status
#
# `--check-edge URL`: no run, a check that the Worker enforces what the job wrote. The reference
# Worker answers `GET <URL>/.well-known/lapi-kv-sync/status` with `Authorization: Bearer
# <STATUS_TOKEN>` (worker/status.js) with what its isolate holds: the prefix it reads, whether its
# KV binding reads, each table's digest (the first 32 hex digits of the SHA-256 of its value, as
# the job's metadata has it) and age, and its settings. The job lists the tables' keys (their
# metadata's digests) and compares: a pure function (compare_edge) and a thin shell (check_edge).

STATUS_PATH = "/.well-known/lapi-kv-sync/status"  # worker/status.js's STATUS_PATH
MIN_STATUS_TOKEN_LENGTH = 32  # worker/status.js leaves its status off with a shorter STATUS_TOKEN
MAX_STATUS_BYTES = 64 * 1024  # the status is well under 2 KiB
STATUS_RETRY = Retry(attempts=2, backoff=1.0, max_wait=2.0)
# Seconds the check allows past SCOPES_REFRESH + CACHE_TTL, the time a table the job wrote takes to
# be in every isolate: Cloudflare promises no hard bound on its edge cache letting go, and KV's
# listing (what the check compares with) may lag what KV serves.
EDGE_MARGIN = 60
# The longest the check waits for an edge that may be catching up; past it, it says when to ask again.
MAX_EDGE_WAIT = 900
EXIT_EDGE_DIFFERS = 1
WHY_NO_STATUS = (
    "either STATUS_TOKEN is not the Worker's (or the Worker has none: `npx wrangler secret put STATUS_TOKEN`), "
    "or the request did not reach the Worker (a URL on none of its routes, a Worker deployed before 0.2.0): "
    "the Worker answers a request without the right token as it answers any request, so the two look alike"
)
NAMESPACE_HINT = (
    "check that the Worker's namespace binding (wrangler.toml, [[kv_namespaces]] binding DECISIONS) has the "
    "job's CF_KV_NAMESPACE_ID as its id, then `npx wrangler deploy`"
)


class EdgeUnreadable(Exception):
    """The Worker's status could not be had: no answer, or an answer that is not its status."""


class EdgeTable(NamedTuple):
    """A table as an isolate holds it."""

    digest: str | None  # None: no such key in KV, or never read
    size: int  # bytes
    entries: dict[str, int]  # network: intervals per family; scopes: names per scope
    age: float | None  # seconds since the isolate last read it good; None: never
    problem: str | None  # the last read's problem, if any


class EdgeStatus(NamedTuple):
    version: str
    prefix: str
    kv_reads: bool
    kv_problem: str | None
    tables: dict[str, EdgeTable]
    cache_ttl: int
    scopes_refresh: int
    kv_timeout_ms: int
    address_keys: bool
    log_only: bool

    @property
    def window(self) -> int:
        """Seconds after which an isolate holds a table the job wrote: its refresh (SCOPES_REFRESH)
        and KV's edge cache (CACHE_TTL), with a margin."""
        return self.scopes_refresh + self.cache_ttl + EDGE_MARGIN


def parse_edge_status(body: bytes) -> EdgeStatus:
    """The Worker's status answer; ValueError saying what is wrong with anything else."""
    try:
        status = json.loads(body)
    except (ValueError, RecursionError):
        raise ValueError(f"not JSON: {snippet(body)}") from None

    def field_of(parent: Any, path: str, kind: str) -> Any:
        name = path.rsplit(".", 1)[-1]
        value = parent.get(name) if type(parent) is dict else None
        fits = {
            "an object": type(value) is dict,
            "text": type(value) is str,
            "text or null": value is None or type(value) is str,
            "true or false": type(value) is bool,
            "a count": type(value) is int and 0 <= value < 2**53,
            "seconds or null": value is None or type(value) in (int, float) and 0 <= value < 2**53,
            "32 hex digits or null": value is None or type(value) is str and _DIGEST.fullmatch(value) is not None,
        }[kind]
        if not fits:
            raise ValueError(f"`{path}` is not {kind}: {snippet(json.dumps(value).encode(), limit=60)}")
        return value[:300] if type(value) is str else value

    def table(name: str) -> EdgeTable:
        held = field_of(field_of(status, "tables", "an object"), f"tables.{name}", "an object")
        at = f"tables.{name}."
        entries = field_of(held, at + "entries", "an object")
        counts = {str(k)[:20]: field_of(entries, at + f"entries.{k}", "a count") for k in list(entries)[:4]}
        return EdgeTable(
            field_of(held, at + "digest", "32 hex digits or null"),
            field_of(held, at + "bytes", "a count"),
            counts,
            field_of(held, at + "age", "seconds or null"),
            field_of(held, at + "problem", "text or null"),
        )

    if type(status) is not dict:
        raise ValueError(f"not a JSON object: {snippet(body, limit=60)}")
    version, prefix = field_of(status, "version", "text")[:40], field_of(status, "prefix", "text")
    kv, settings = field_of(status, "kv", "an object"), field_of(status, "settings", "an object")
    return EdgeStatus(
        version=version,
        prefix=prefix,
        kv_reads=field_of(kv, "kv.reads", "true or false"),
        kv_problem=field_of(kv, "kv.problem", "text or null"),
        tables={name: table(name) for name in DOCUMENT_NAMES},
        cache_ttl=field_of(settings, "settings.CACHE_TTL", "a count"),
        scopes_refresh=field_of(settings, "settings.SCOPES_REFRESH", "a count"),
        kv_timeout_ms=field_of(settings, "settings.KV_TIMEOUT_MS", "a count"),
        address_keys=field_of(settings, "settings.ADDRESS_KEYS", "true or false"),
        log_only=field_of(settings, "settings.LOG_ONLY", "true or false"),
    )


class EdgeCheck(NamedTuple):
    """What a comparison found: lines to print, (level, text); whether the edge holds what KV holds;
    else, when it may only be catching up, how long to wait before asking again (None: it does not)."""

    lines: list[tuple[str, str]]
    agree: bool
    wait: float | None


def compare_edge(
    edge: EdgeStatus,
    kv: Mapping[str, str | None],
    prefix: str,
    before: Mapping[str, str | None] | None = None,
) -> EdgeCheck:
    """The edge's status against KV's tables: `kv` maps each table KV holds under `prefix` to the
    digest its metadata carries (None: none of ours). `before`: KV's tables one window earlier,
    when this is the second look at an edge that differed (then holding what KV held is following)."""
    lines: list[tuple[str, str]] = []
    failed, pending = [], False
    window = edge.window
    within = (
        f"{window} s (SCOPES_REFRESH {edge.scopes_refresh} + CACHE_TTL {edge.cache_ttl} + a margin of {EDGE_MARGIN})"
    )
    if edge.version != __version__:
        lines.append(("warning", f"the Worker is {edge.version!r}, this job {__version__}: deploy the same release"))
    if edge.prefix == prefix:
        lines.append(("info", f"prefix: the edge reads {prefix!r}, as the job writes"))
    else:
        lines.append(("error", f"prefix: the edge reads {edge.prefix!r}, the job writes {prefix!r}"))
        failed.append("set the Worker's KV_KEY_PREFIX (wrangler.toml, [vars]) to the job's, then `npx wrangler deploy`")
    if edge.kv_reads:
        lines.append(("info", "KV: the edge's binding reads"))
    else:
        lines.append(("error", f"KV: the edge's binding does not read: {edge.kv_problem or 'no reason given'}"))
        failed.append(NAMESPACE_HINT)
    for name in DOCUMENT_NAMES:
        held, age = edge.tables[name], edge.tables[name].age
        want = kv.get(name)
        said = f"{name}: the edge {describe_edge_table(held)}; KV {describe_kv_table(name, kv)}"
        problem = f" ({held.problem})" if held.problem else ""
        if name in kv and want is None:
            lines.append(("error", f"{said}: no digest of the job's in its metadata (a run of the job rewrites it)"))
            failed.append("run the job, then check again")
        elif held.digest == want:
            lines.append(("info", f"{said}: the same"))
            if age is not None and age > window:
                lines.append(("warning", f"{name}: the edge's copy is {age:g} s old, past {within}{problem}"))
        elif age is not None and age > window:
            lines.append(("error", f"{said}: the edge lags, its copy {age:g} s old, past {within}{problem}"))
            failed.append("see why the Worker's reads fail: `npx wrangler tail`")
        elif before is not None and age is not None and held.digest == before.get(name):
            lines.append(("info", f"{said}: the edge holds what KV held {window} s ago, following"))
        elif before is not None:
            lines.append(("error", f"{said}: still different after {within}{problem}"))
            failed.append(NAMESPACE_HINT)
        else:
            pending = True
            lines.append(("info", f"{said}: different, which KV may not have carried to the edge yet{problem}"))
    if not kv and all(t.digest is None for t in edge.tables.values()):
        lines.append(("info", "no table on either side: the namespace could not be told apart by its tables"))
    if edge.log_only:
        lines.append(("warning", "the edge enforces nothing: LOG_ONLY is on (wrangler.toml, [vars])"))
    if failed:
        hints = "; ".join(dict.fromkeys(failed))
        lines.append(("error", f"the edge does not hold what KV holds: {hints}"))
        return EdgeCheck(lines, False, None)
    if pending:
        return EdgeCheck(lines, False, float(window))
    lines.append(("info", "the edge holds what KV holds"))
    return EdgeCheck(lines, True, None)


def describe_edge_table(table: EdgeTable) -> str:
    if table.age is None:
        return "has not read it yet"
    if table.digest is None:
        return f"holds none (read {table.age:g} s ago)"
    entries = ", ".join(f"{k} {v}" for k, v in table.entries.items())
    return f"holds {table.digest} ({table.size} bytes; {entries}; read {table.age:g} s ago)"


def describe_kv_table(name: str, kv: Mapping[str, str | None]) -> str:
    return "holds none" if name not in kv else f"holds {kv[name]}" if kv[name] else "holds one"


def read_edge_status(http: Http, config: Config) -> EdgeStatus:
    """The Worker's status, asked with STATUS_TOKEN; EdgeUnreadable saying what to check otherwise."""
    url = config.edge_url + STATUS_PATH
    headers = {"Authorization": f"Bearer {config.status_token}", "User-Agent": USER_AGENT, "Accept": "application/json"}
    try:
        response = http.request("GET", url, headers=headers, retry=STATUS_RETRY, limit=MAX_STATUS_BYTES)
    except (TransportError, DeadlineExceeded) as e:
        raise EdgeUnreadable(
            f"no answer from {url}: {e} (is it the site's URL, on one of the Worker's routes?)"
        ) from None
    except AnswerTooLarge:
        raise EdgeUnreadable(f"{url} answered with more than {MAX_STATUS_BYTES} bytes: {WHY_NO_STATUS}") from None
    if 300 <= response.status < 400:
        where = snippet(response.headers.get("Location", "").encode(), config.secrets)
        raise EdgeUnreadable(
            f"{url} answered HTTP {response.status}, to {where}: give --check-edge the URL it leads to"
        )
    if response.status != 200:
        answered = f"HTTP {response.status} {snippet(response.body, config.secrets, 60)}"
        raise EdgeUnreadable(f"{url} answered {answered}{through_proxy_note(response)}: {WHY_NO_STATUS}")
    try:
        return parse_edge_status(response.body)
    except ValueError as e:
        raise EdgeUnreadable(f"{url} answered HTTP 200, but not the Worker's status ({e}): {WHY_NO_STATUS}") from None


def kv_tables(cloudflare: Cloudflare, prefix: str) -> dict[str, str | None]:
    """The tables KV holds under the prefix, and their metadata's digests: one list request each."""
    tables = {}
    for name in DOCUMENT_NAMES:
        present = cloudflare.list_keys(prefix, only=name).present
        if prefix + name in present:
            tables[name] = present[prefix + name].remediation  # a table's digest stands there
    return tables


def check_edge(config: Config, tls: dict[str, ssl.SSLContext], log: Log, clock: Clock) -> int:
    """--check-edge: the edge's status against KV, said line by line; its exit code. When the
    edge differs but may be catching up, asked again once the window has passed."""
    prefix = config.kv_key_prefix
    with Http(clock, config.http_timeout, clock.monotonic() + config.run_deadline, tls, config.proxies) as http:
        try:
            cloudflare = Cloudflare(http, config)
            before = kv_tables(cloudflare, prefix)
            found = compare_edge(read_edge_status(http, config), before, prefix)
            if found.wait is not None and found.wait <= MAX_EDGE_WAIT:
                say(log, found.lines)
                log.info("check_edge", f"waiting {found.wait:g} s for the edge to catch up, then asking again")
                clock.sleep(found.wait)
                http.grant(config.run_deadline, "RUN_DEADLINE")
                found = compare_edge(read_edge_status(http, config), kv_tables(cloudflare, prefix), prefix, before)
            elif found.wait is not None:
                found.lines.append(("info", f"too long to wait here: run --check-edge again in {found.wait:g} s"))
        except EdgeUnreadable as e:
            log.error("check_edge", f"the edge: {e}")
            return EXIT_EDGE_DIFFERS
        except (CloudflareError, DeadlineExceeded) as e:
            log.error("check_edge", f"Cloudflare: {e}")
            return EXIT_EDGE_DIFFERS
        except Interrupted as stop:
            log_interrupted(log, stop, "the check stopped; it changes nothing")
            return stop.exit_code
    say(log, found.lines)
    return EXIT_OK if found.agree or found.wait is not None else EXIT_EDGE_DIFFERS


def say(log: Log, lines: Iterable[tuple[str, str]]) -> None:
    for level, text in lines:
        getattr(log, level)("check_edge", text)


# --------------------------------------------------------------------------- main


# Every variable the job reads, one line each: `--help` prints them, since the image carries no
# README. A test checks that every name load_config() reads is here and in k8s/examples/overlay.
ENVIRONMENT = (
    ("LAPI_URL", f"CrowdSec LAPI's base URL: scheme, host, port; no /v1/... (default {Config.lapi_url})"),
    ("LAPI_KEY", "bouncer key (cscli bouncers add lapi-kv-sync)"),
    ("LAPI_KEY_FILE", "a file holding the bouncer key, instead of LAPI_KEY"),
    ("LAPI_CA_CERT", "CA bundle for an https:// LAPI (default: the system's)"),
    ("LAPI_CLIENT_CERT", "client certificate for LAPI's TLS auth, instead of a bouncer key"),
    ("LAPI_CLIENT_KEY", "its private key"),
    ("LAPI_ORIGINS", "only these origins, comma-separated, e.g. crowdsec,cscli (default: all)"),
    ("LAPI_SCENARIOS_CONTAINING", "only scenarios containing one of these words, comma-separated"),
    ("LAPI_SCENARIOS_NOT_CONTAINING", "no scenario containing one of these words, comma-separated"),
    ("LAPI_MAX_BYTES", f"most bytes of LAPI's answer; more skips the run (default {Config.lapi_max_bytes}: 48 MiB)"),
    ("LAPI_USAGE_METRICS", "false: send CrowdSec no usage metrics (default true)"),
    (
        "EXPAND_RANGES_MAX",
        "one key per address for IPv4 ranges up to this size, also with the scope table (default 0: off)",
    ),
    (
        "SCOPE_TABLE",
        "false: no tables (Range in <KV_KEY_PREFIX>networks, Country and AS in <KV_KEY_PREFIX>scopes); default true",
    ),
    (
        "SCOPE_TABLE_MAX_BYTES",
        f"most bytes of the scope table; past it bans first (default {Config.scope_table_max_bytes}: 4 MiB, at most 20 MiB)",
    ),
    (
        "TABLE_ORIGINS",
        "origins whose Ip decisions go into the network table, not keys, e.g. CAPI,lists; * for all (default: none)",
    ),
    (
        "TABLE_MAX_BYTES",
        f"most bytes of the network table; past it bans first (default {Config.table_max_bytes}: 8 MiB, at most 20 MiB)",
    ),
    ("CF_ACCOUNT_ID", "Cloudflare account id (required)"),
    ("CF_KV_NAMESPACE_ID", "Workers KV namespace id (required)"),
    ("CF_API_TOKEN", "API token with Workers KV Storage: Edit (required)"),
    ("CF_API_TOKEN_FILE", "a file holding the API token, instead of CF_API_TOKEN"),
    ("STATUS_TOKEN", "for --check-edge only: the Worker's STATUS_TOKEN, 32 characters or more"),
    ("STATUS_TOKEN_FILE", "a file holding it, instead of STATUS_TOKEN"),
    ("CF_API_URL", f"Cloudflare API base (default {Config.cf_api_url})"),
    ("KV_KEY_PREFIX", f"prefix of the keys this job owns (default {Config.kv_key_prefix})"),
    ("MAX_DELETES", "a plan deleting more keys than this deletes none, exit 1 (default: no limit)"),
    ("STATE_FILE", "job's record of its KV keys, in a directory that exists: steady runs list nothing (default: none)"),
    ("AUDIT_INTERVAL", "with STATE_FILE, seconds between audits, i.e. full listings (default 900; 0: every run)"),
    ("PUSHGATEWAY_URL", "Pushgateway for the run's metrics (default: none: no metrics, only the absence alert fires)"),
    ("RUN_DEADLINE", f"seconds a run may take in all, retries included (default {Config.run_deadline:g})"),
    ("HTTP_TIMEOUT", f"seconds any one name lookup, connect or read may wait (default {Config.http_timeout:g})"),
    ("LOG_FORMAT", "text or json (default text)"),
    ("HTTPS_PROXY", "proxy for https:// (Cloudflare): http://[user:password@]host:port, a CONNECT tunnel"),
    ("HTTP_PROXY", "proxy for http:// URLs (default: none; https_proxy, http_proxy, no_proxy win if set)"),
    ("NO_PROXY", "hosts reached direct: names and their subdomains, addresses, CIDRs, host:port, or *"),
)

# Each flag and the environment variable that does the same: a one-off Job made with
# `kubectl create job --from=cronjob/...` runs the CronJob's command, so it takes only environment.
RUN_FLAGS = (
    ("--dry-run", "DRY_RUN", "read both sides and print the plan; write and push nothing"),
    ("--audit", "AUDIT", "list every key in KV this run and rebuild the state record (STATE_FILE)"),
    ("--force", "FORCE", "lift the MAX_DELETES guard for this run"),
)
FLAG_VALUES = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False, "": False}
# Every variable the job reads, from the two lists above (a test checks they hold all that
# load_config reads): what a misspelling is measured against.
KNOWN_VARIABLES = (
    frozenset(name for name, _ in ENVIRONMENT)
    | {variable for _, variable, _ in RUN_FLAGS}
    | {name.lower() for name in PROXY_VARIABLES}  # read in both cases, as curl and Python do
)
# How alike (difflib's ratio) a name must be to a known one to be taken for a misspelling of it:
# DRYRUN/DRY_RUN is 0.92, MAX_DELETE/MAX_DELETES 0.95, LAPI_KEYFILE/LAPI_KEY_FILE 0.96; no
# variable a container commonly has (HOSTNAME, PYTHON_VERSION, GPG_KEY, KUBERNETES_*) comes near.
MISSPELLING_CUTOFF = 0.85
# What Kubernetes sets for each Service in the namespace (enableServiceLinks): a Service named
# `lapi` gives LAPI_PORT, LAPI_SERVICE_HOST, LAPI_PORT_8080_TCP_ADDR... They are not the operator's.
_SERVICE_LINK = re.compile(
    r"[A-Z0-9_]+_(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?|PORT(?:_[0-9]+_(?:TCP|UDP|SCTP)(?:_(?:ADDR|PORT|PROTO))?)?)"
)
_VARIABLE_SHAPE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def unread_variables(names: Iterable[str], known: frozenset[str] = KNOWN_VARIABLES) -> tuple[list[str], list[str]]:
    """Variables set but not read: the misspellings of known ones (problems: the job would run
    without a setting its operator meant, DRYRUN=true making a real run), and the rest that carry
    one of the job's prefixes (a known name's first word and `_`: LAPI_, CF_, KV_...), to warn of.
    Names of another shape, and Kubernetes' Service links, are none of the job's business."""
    # Not the proxies' HTTP_ and NO_: those name many variables of other tools (NO_COLOR).
    mine = (name for name in known if "_" in name and name.upper() not in PROXY_VARIABLES)
    prefixes = tuple(sorted({name.split("_")[0] + "_" for name in mine}))
    misspelled, unknown = [], []
    for name in sorted(names):
        if name in known or not _VARIABLE_SHAPE.fullmatch(name) or _SERVICE_LINK.fullmatch(name):
            continue
        # The first letter as typed, as spell checkers assume: API_KEY or API_URL, common in a pod's
        # environment for other tools, must not stop every run as a misspelling of LAPI_KEY.
        upper = name.upper()
        close = [c for c in difflib.get_close_matches(upper, known, n=3, cutoff=MISSPELLING_CUTOFF) if c[0] == upper[0]]
        if close:
            misspelled.append(f"{name} is not a variable this job reads: did you mean {close[0]}?")
        elif name.startswith(prefixes):
            unknown.append(name)
    return misspelled, unknown


def parse_args(argv: list[str] | None, env: Mapping[str, str] | None = None) -> argparse.Namespace:
    """The command line, each flag also set by its variable (DRY_RUN=true is --dry-run); ConfigError on a bad value."""
    width = max(len(name) for name, _ in ENVIRONMENT)
    environment = "".join(f"  {name:<{width}}  {meaning}\n" for name, meaning in ENVIRONMENT)
    flags = "".join(f"  {variable + '=true':<{width}}  as {option}\n" for option, variable, _ in RUN_FLAGS)
    parser = argparse.ArgumentParser(
        prog="lapi-kv-sync",
        description="Make a Cloudflare Workers KV namespace hold exactly CrowdSec LAPI's bans and captchas.",
        epilog=f"environment (the configuration):\n{environment}{flags}\n"
        "A variable named close to one of these (DRYRUN, MAX_DELETE) is a configuration error; others with\n"
        "their prefixes (CF_, LAPI_, ...) get a warning. The examples' <...> placeholders are refused.\n\n"
        "exit codes: 0 done, 1 Cloudflare side failed, 2 configuration, 3 LAPI unreadable (run skipped), "
        "4 STATE_FILE's volume kept the run from changing KV, 143 SIGTERM, 130 SIGINT\n"
        "--check-edge: 0 the Worker holds what KV holds (or is catching up), 1 it does not, or a side could not "
        "be read, 2 configuration",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for option, variable, meaning in RUN_FLAGS:
        parser.add_argument(option, action="store_true", help=f"{meaning} (or {variable}=true)")
    parser.add_argument(
        "--check-edge",
        metavar="URL",
        help="no run: ask the Worker at URL (the site's base URL, on one of its routes) what it holds, with "
        "STATUS_TOKEN (or STATUS_TOKEN_FILE), and compare it with KV: prefix, table digests, lag",
    )
    parser.add_argument("--version", action="version", version=f"lapi-kv-sync {__version__} (User-Agent: {USER_AGENT})")
    args = parser.parse_args(argv)
    problems = []
    for option, variable, _ in RUN_FLAGS:
        raw = (env or {}).get(variable, "").strip()
        value = FLAG_VALUES.get(raw.lower())
        if value is None:
            problems.append(f"{variable} must be true or false, got {raw!r}")
        elif value:
            setattr(args, option[2:].replace("-", "_"), True)
    if problems:
        raise ConfigError(problems)
    return args


def configure(argv: list[str] | None, env: Mapping[str, str]) -> tuple[argparse.Namespace, Config, list[str]]:
    """The command line and the configuration, read once, and the variables with the job's prefixes
    it does not read; one ConfigError names every bad variable in either, and every misspelled one."""
    problems, unknown = unread_variables(env.keys())
    args = None
    try:
        args = parse_args(argv, env)
    except ConfigError as e:
        problems += e.problems
    check_edge = getattr(args, "check_edge", None)
    if check_edge is not None and any(getattr(args, option[2:].replace("-", "_")) for option, _, _ in RUN_FLAGS):
        flags = " or ".join(f"{option} ({variable})" for option, variable, _ in RUN_FLAGS)
        problems.append(f"--check-edge is a check, not a run: it takes no {flags}")
    try:
        config = load_config(env, check_edge)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    return args, config, unknown


def config_warnings(config: Config) -> list[str]:
    """Settings that work but are likely slips: each a warning, never a refusal."""
    warnings = []
    if config.kv_key_prefix[-1].isalnum():
        example = config.kv_key_prefix + "192.0.2.1"
        warnings.append(
            f"KV_KEY_PREFIX={config.kv_key_prefix!r} ends with a letter or digit: keys are named like "
            f"{example!r}; end it with a separator (e.g. {config.kv_key_prefix + ':'!r}), and set the Worker's "
            "KV_KEY_PREFIX to the same"
        )
    return warnings


def sync(http: Http, config: Config, log: Log, report: Report, dry_run: bool, force: bool, audit: bool = False) -> int:
    """One run; fills `report` as it goes and returns the exit code. With STATE_FILE, the run holds
    its lock throughout (a dry run only reads the record, and takes no lock)."""
    if not config.state_file:
        return converge(http, config, log, report, dry_run, force, audit, None, lambda: Loaded(None, None))
    state = StateFile(config.state_file, http.clock, record_limit(config), columns_limit(config))
    report.audit_reason, report.audit_detail = None, "the record not read yet"  # until audit_reason() says
    if dry_run:
        return converge(http, config, log, report, dry_run, force, audit, None, state.load)
    wait = max(0.0, min(STATE_LOCK_WAIT, http.deadline - http.clock.monotonic()))
    try:
        locked = state.lock(wait)
    except OSError as e:
        # Without the lock the run records nothing; it may change KV only once no record on disk
        # can claim what KV held before (a read-only volume: neither).
        detail = f"cannot open {state.lock_path}: {e.strerror or e}"
        try:
            state.set_aside()
        except OSError as aside:  # a read-only volume
            cause = f"STATE_FILE: {detail}, nor set {state.path} aside ({aside.strerror or aside})"
            return on_read_only_volume(http, config, log, report, force, audit, state, cause)
        log.warning(
            "state_unusable", f"STATE_FILE: {detail}; this run audits and records nothing (any record set aside)"
        )
        unusable = Loaded(None, "unreadable", detail)
        return converge(http, config, log, report, dry_run, force, audit, None, lambda: unusable)
    if not locked:
        log.error(
            "state_locked",
            f"another run holds {state.lock_path} (waited {wait:.0f}s): this run changed nothing",
        )
        return EXIT_CLOUDFLARE
    try:
        seen_at = state.began(http.clock.now())
        return converge(http, config, log, report, dry_run, force, audit, state, functools.partial(state.load, seen_at))
    finally:
        state.unlock()


def on_read_only_volume(
    http: Http, config: Config, log: Log, report: Report, force: bool, audit: bool, state: StateFile, cause: str
) -> int:
    """A run on a STATE_FILE volume where nothing can be written (read-only): the lock cannot be
    taken, nor the record set aside. It changes KV, as a run without STATE_FILE does (an audit,
    recording nothing), once no later run can trust the record in place; until then it changes
    nothing and exits EXIT_STATE, saying when that will be: had it changed KV, the record would
    claim what KV no longer holds, and be trusted once the volume is writable again."""
    record, readable_later = record_on_disk(state)
    now = http.clock.now()
    trusted_until = record_trusted_until(record, readable_later, config)
    if now < trusted_until:
        when = (
            "cannot be read now, and a later run might read and trust it: no run changes KV until it can be"
            if trusted_until == math.inf
            else f"would still be trusted by a run that can write, until {rfc3339(trusted_until)} ("
            f"{trusted_until - now:.0f}s from now: {until_what(record, trusted_until, config)}); from then on, "
            "runs change KV without recording"
        )
        log.error(
            "state_stale",
            f"{cause}: this run changed nothing, since the record in place would no longer match KV; that record "
            f"{when}; make the volume writable",
        )
        return EXIT_STATE
    why = (
        "no record is in place"
        if record is None
        else f"the record in place was last audited {now - record.audited_at:.0f}s ago"
    )
    log.warning(
        "state_unusable",
        f"{cause}; this run audits, changes KV and records nothing, since no later run can trust the record on "
        f"disk ({why}); make the volume writable",
    )
    unusable = Loaded(None, "unreadable", cause.removeprefix("STATE_FILE: "))
    return converge(http, config, log, report, False, force, audit, None, lambda: unusable)


def until_what(record: Record | None, trusted_until: float, config: Config) -> str:
    if record is not None and trusted_until == record.audited_at + config.audit_interval:
        return "AUDIT_INTERVAL after its last audit"
    return "the listing lag of its last changes, or an audit it put off"


def record_on_disk(state: StateFile) -> tuple[Record | None, bool]:
    """The record at STATE_FILE, if it can be read; and, when it cannot, whether a later run might:
    not when there is none, nor when what is there is no record of this format or no regular file."""
    try:
        return state.read(state.path), True
    except FileNotFoundError:
        return None, False
    except OSError as e:  # unreadable now (permissions, I/O): perhaps not later
        return None, e.errno not in (errno.EINVAL, errno.ELOOP)  # not a regular file, a symbolic link
    except Exception:  # noqa: BLE001  # not a record, and it cannot change on a read-only volume
        return None, False


def record_trusted_until(record: Record | None, readable_later: bool, config: Config) -> float:
    """The last wall time at which a run could still plan against `record` or lay its recent changes
    over a listing, were the clock never to go back (audit_reason, converge): the end of its audit
    interval, of its settling time, of its recent changes' KV_LIST_LAG. -inf when no run ever will
    (none, another owner's, or not a record); inf when it cannot be told (not read now, `readable_later`)."""
    if record is None:
        return math.inf if readable_later else -math.inf
    if (record.account, record.namespace, record.prefix) != (
        config.cf_account_id,
        config.cf_namespace_id,
        config.kv_key_prefix,
    ):
        return -math.inf
    until = record.audited_at + config.audit_interval
    if record.settling_until is not None:
        until = max(until, record.settling_until - record.clock_offset)
    recent = record.recent_changes()
    if recent:
        until = max(until, max(recent.values()) - record.clock_offset + KV_LIST_LAG)
    return until


def record_limit(config: Config) -> int:
    """The most a record may unpack to: its key columns (columns_limit()) and the tables' values in
    base64. A larger record cannot have come from this configuration: the run audits and rebuilds it."""
    tables = 4 * -(-(config.scope_table_max_bytes + config.table_max_bytes) // 3)
    return columns_limit(config) + tables


def columns_limit(config: Config) -> int:
    """The most a record's key columns may take: what an answer at LAPI_MAX_BYTES could make (a
    record takes 30-60 bytes a key where LAPI's answer takes 150-200 a decision), and the expanded
    ranges' keys. Checked apart from the tables' values, so that their allowance cannot be spent
    on a column of junk."""
    return config.lapi_max_bytes + MAX_EXPANDED_KEYS * 64 + (1 << 20)


def converge(
    http: Http,
    config: Config,
    log: Log,
    report: Report,
    dry_run: bool,
    force: bool,
    audit: bool,
    state: StateFile | None,
    load: Callable[[], Loaded],
) -> int:
    """One run's phases: read LAPI and the record, decide what KV holds (the record, or a listing:
    an audit), project LAPI's answer onto keys and tables, plan, apply, and record what Cloudflare
    confirmed.

    The waits overlap: the record is read while LAPI prepares its answer, and the keys are listed
    (an audit) while LAPI's answer is projected. The listing begins only once LAPI's answer has
    given its first decision (or ended, a valid empty list), so a LAPI that answers with an error
    page or junk costs none of the account's API budget.

    With a trusted record written by a run that converged, LAPI's answer is first read whole: when
    it is that run's answer again (AnswerDigest), nothing has changed and nothing is planned."""
    cloudflare = Cloudflare(http, config)
    report.cloudflare_requests, report.cloudflare_answers = cloudflare.requests, cloudflare.answers
    decisions, loaded = read_lapi_and_record(http, config, load)
    reason, report.audit_detail = audit_reason(loaded, config, http.clock.now(), audit)
    report.audit_reason, report.record_trusted = reason, bool(config.state_file) and reason in TRUSTED_AUDITS
    answer = AnswerDigest(config)
    chunks = answer.passing(decisions.chunks) if state is not None else decisions.chunks  # a record keeps it
    if not dry_run and reason is None and may_be_unchanged(loaded.record, config, report.started, http.clock.now()):
        held = held_answer(chunks, config)
        if answer.hexdigest() == loaded.record.lapi_digest:
            check_token(cloudflare, config, loaded.record.audited_at, http.clock.now(), state, log)
            return unchanged(report, loaded.record)
        chunks = draining(held)
    # What the run needs of the record; an audit rebuilds it from the listing, so it goes first.
    carried = from_record(loaded.record, reason, http.clock.now())
    del loaded
    kv, projection = list_and_project(http, config, cloudflare, carried, decisions._replace(chunks=chunks), report)
    del decisions
    kv, documents, plan = plan_with_tables(projection, kv, carried.tables, cloudflare, config, dry_run)
    count_tables_left_out(projection.ignored, documents, config, log)
    report.table_entries = sum((d.entries for d in documents.values()), Counter())
    report.table_bytes = {d.name: len(d.value) for d in documents.values()}
    tally(report, plan, Ledger(), config.kv_key_prefix, guarded=False)  # until Cloudflare confirms: what is to be done
    if dry_run:
        log_dry_run(log, plan, None if force else config.max_deletes, projection.wanted, documents, kv, report)
        return EXIT_OK
    log_left_out(log, projection.ignored, carried.ignored_before, report.started)
    carried = carried._replace(trusted=None)  # the plan holds what it needs of it
    return apply_and_record(
        http, config, log, report, cloudflare, plan, documents, kv, carried, state, answer, force, projection
    )


def read_lapi_and_record(http: Http, config: Config, load: Callable[[], Loaded]) -> tuple[Decisions, Loaded]:
    """LAPI's answer as it arrives, and the record, read meanwhile."""
    reading = Background(load)
    decisions = read_decisions(http, config)
    try:  # a file read that hangs (a stuck network volume) must not hold the run past its deadline
        loaded = reading.result(timeout=max(0.0, http.deadline - http.clock.monotonic()))
    except TimeoutError:
        loaded = Loaded(None, "unreadable", f"{config.state_file} not read within {http.deadline_name}")
    return decisions, loaded


class FromRecord(NamedTuple):
    """What a run takes from the record it found, before an audit lets the record go."""

    trusted: Record | None  # the record the run plans against (None: it lists KV, an audit)
    lately: dict[str, Present | None]  # an audit's: the keys changed within KV_LIST_LAG, what each holds since
    recent: dict[str, int]  # a trusted record's changes of the last KV_LIST_LAG, for the next record
    settling_until: float | None  # likewise
    tables: Mapping[str, bytes]  # the tables' values as recorded (any record: a digest tells if KV holds them)
    usage_metrics_sent_at: float | None
    ignored_before: Mapping[str, int] | None = None  # the last converged run's decisions left out, by reason


def from_record(record: Record | None, reason: str | None, now: float) -> FromRecord:
    """What the run needs of the record it found (`reason`: why it audits, None: it does not)."""
    if record is None:
        return FromRecord(None, {}, {}, None, {}, None)
    tables, sent = record.documents, record.usage_metrics_sent_at
    before = record.projected.ignored if record.projected else None
    if reason not in TRUSTED_AUDITS:
        return FromRecord(None, {}, {}, None, tables, sent, before)
    recent = record.recent_changes()
    since = now + record.clock_offset - KV_LIST_LAG
    lately = {key: record.keys.get(key) for key, at in recent.items() if at > since} if reason else {}
    return FromRecord(None if reason else record, lately, recent, record.settling_until, tables, sent, before)


def list_and_project(
    http: Http,
    config: Config,
    cloudflare: Cloudflare,
    carried: FromRecord,
    decisions: Decisions,
    report: Report,
) -> tuple[KnownKv, Projection]:
    """What KV holds under the prefix (the record, or, without one, a listing, run while LAPI's
    answer is projected), and LAPI's answer projected onto keys and tables."""
    batches, listing = lapi_batches(decisions.chunks, config), []
    if carried.trusted is None:
        batches = once_flowing(batches, lambda: listing.append(Background(cloudflare.list_keys, config.kv_key_prefix)))
    try:
        rows = itertools.chain.from_iterable(batches)
        projection = project(
            rows, decisions.read_at, config.kv_key_prefix, config.expand_ranges_max, config.scope_table,
            config.table_origins,
        )  # fmt: skip
        # Counted before the listing is awaited: a run that fails there read LAPI all the same.
        report.wanted, report.ignored = len(projection.wanted), projection.ignored
        report.by_remediation = Counter(w.remediation for w in projection.wanted.values())
        listed = listing[0].result() if listing else None
    finally:
        cloudflare.stop.set()  # a listing still going (LAPI broke off, a signal) ends at its next page
    if listed is None:
        assert carried.trusted is not None
        return kv_as_recorded(carried.trusted, http.clock.now()), projection
    report.resent = reconcile(listed.present, carried.lately)  # the listing's own dict: no copy of 100,000s of keys
    return kv_as_listed(listed), projection


def build_tables(
    projection: Projection,
    kv: KnownKv,
    kept: Mapping[str, bytes],
    cloudflare: Cloudflare,
    config: Config,
) -> dict[str, Document]:
    """The tables KV is to hold, by key (none when they are off). Each is built from LAPI's
    decisions against the one KV holds, which it keeps while that may stand: the record's copy of
    it when its digest is the one KV's key carries, else its value read back from KV (a run without
    STATE_FILE, or an audit that found another table than the record's)."""
    if not config.scope_table:
        return {}
    kv_now = kv.now + kv.offset
    tables = {}
    for name, build, entries, max_bytes in (
        ("scopes", scope_document, projection.scopes, config.scope_table_max_bytes),
        ("networks", networks_document, projection.networks, config.table_max_bytes),
    ):
        key = config.kv_key_prefix + name
        have = kv.present.get(key)
        held = held_table(key, have, kept.get(name), cloudflare)
        if held is None and have is not None and have.remediation is not None:
            # Not the value its metadata names (edited behind the job's back), or gone since the
            # listing: unknown, so the plan writes it whatever the new table's digest.
            kv.present[key] = UNKNOWN  # type: ignore[index]
        tables[key] = build(entries, held, kv.offset, kv_now, max_bytes)
    return tables


def count_tables_left_out(ignored: LeftOut, documents: Mapping[str, Document], config: Config, log: Log) -> None:
    """The entries the tables' caps left out, counted and named as `table_full`, and said."""
    settings = {"scopes": ("SCOPE_TABLE_MAX_BYTES", config.scope_table_max_bytes)}
    settings["networks"] = ("TABLE_MAX_BYTES", config.table_max_bytes)
    for document in documents.values():
        if not document.full:
            continue
        ignored["table_full"] += document.full
        for text in document.sample(document.left_out):
            ignored.name("table_full", Dropped(text, document.name, "", ""))
        setting, max_bytes = settings[document.name]
        log.warning(
            "table_full",
            f"{document.name} table: {counted(document.full, 'entry', 'entries')} left out (table_full), past "
            f"{setting}={max_bytes} (kept {len(document.kept)}: bans first, then the longest ends); raise it, up to "
            f"{TABLE_MAX_BYTES_LIMIT}",
            table=document.name,
            left_out=document.full,
        )


def plan_with_tables(
    projection: Projection,
    kv: KnownKv,
    kept: Mapping[str, bytes],
    cloudflare: Cloudflare,
    config: Config,
    dry_run: bool,
) -> tuple[KnownKv, dict[str, Document], Plan]:
    """The tables and the plan. A table holds ends on Cloudflare's clock, which a record's offset
    (measured at the last audit) stops giving once the job's clock has stepped: a run that is to
    write one without a listing asks Cloudflare's clock first (the namespace, one request) and,
    when the offset moved past the slack, builds and plans again with the one measured."""
    documents = build_tables(projection, kv, kept, cloudflare, config)
    plan = plan_run(projection, documents, kv, config)
    tables = {config.kv_key_prefix + name for name in DOCUMENT_NAMES}
    if dry_run or kv.listed or not tables & set(map(write_key, plan.writes[-len(tables) :])):
        return kv, documents, plan
    server_time, received_at = cloudflare.clock()
    offset = server_time - received_at if server_time is not None else kv.offset
    if abs(offset - kv.offset) <= EXPIRATION_SLACK / 2:
        return kv, documents, plan
    kv = kv._replace(offset=offset, now=received_at)
    documents = build_tables(projection, kv, kept, cloudflare, config)
    return kv, documents, plan_run(projection, documents, kv, config)


def held_table(key: str, have: Present | None, kept: bytes | None, cloudflare: Cloudflare) -> bytes | None:
    """The value of the table KV holds at `key` (`have`: as listed or recorded), if it is ours and
    its digest is what its metadata says; else None (then a table built fresh is written)."""
    if have is None or have.remediation is None:
        return None
    if kept is None or hashlib.sha256(kept).hexdigest()[:32] != have.remediation:
        kept = cloudflare.value(key)
    return kept if kept is not None and hashlib.sha256(kept).hexdigest()[:32] == have.remediation else None


def plan_run(projection: Projection, documents: Mapping[str, Document], kv: KnownKv, config: Config) -> Plan:
    """make_plan over the address keys and the tables' keys alike (a table's digest stands for a
    remediation, its latest end for an end), then the policy that leaves to expire the keys the
    network table now holds (spare_covered)."""
    wanted = projection.wanted
    tables = {key: tuple_new(Wanted, (d.digest, d.end - kv.offset, "", "")) for key, d in documents.items() if d.value}
    wanted.update(tables)  # added for the plan and taken out again: a copy of `wanted` would cost a pass
    try:
        plan = make_plan(wanted, kv.present, kv.now, kv.offset)
    finally:
        for key in tables:
            del wanted[key]
    plan = plan._replace(due_at=min([plan.due_at, *(d.due_at for d in documents.values() if d.value)]))
    networks = documents.get(config.kv_key_prefix + "networks")
    if networks is None or not networks.value or not plan.deletes:
        return plan
    kv_now = kv.now + kv.offset
    fresh = network_intervals(((e, projection.networks[e]) for e in networks.kept), kv.offset, kv_now)
    return spare_covered(plan, kv.present, networks.intervals, fresh, config.kv_key_prefix, kv_now)


def apply_and_record(
    http: Http,
    config: Config,
    log: Log,
    report: Report,
    cloudflare: Cloudflare,
    plan: Plan,
    documents: Mapping[str, Document],
    kv: KnownKv,
    carried: FromRecord,
    state: StateFile | None,
    answer: AnswerDigest,
    force: bool,
    projection: Projection,
) -> int:
    """Apply the plan and record what Cloudflare confirmed; the run's exit code."""
    sent = carried.usage_metrics_sent_at
    if not kv.listed and not plan.writes and not plan.deletes:  # a run that sends Cloudflare nothing
        check_token(cloudflare, config, kv.audited_at, http.clock.now(), state, log)
    record_to, set_aside = state, False
    if state is not None and (plan.writes or plan.deletes):
        try:
            state.set_aside()  # before KV changes: until save(), no record on disk can be trusted
            set_aside = True
        except OSError as e:
            log.error(
                "state_stale",
                f"STATE_FILE: cannot set {state.path} aside before changing KV ({e.strerror or e}): this run "
                "changed nothing, since the record would no longer match KV",
            )
            return EXIT_STATE
    elif not kv.listed:
        record_to = None  # nothing to record: a steady run with a trusted record leaves the file as it is

    def record(ledger: Ledger, converged: bool) -> None:
        if record_to is not None:
            kv_now = http.clock.now() + kv.offset
            digest = answer.hexdigest() if converged else None
            after = record_of_run(
                kv,
                ledger,
                documents,
                carried._replace(usage_metrics_sent_at=sent),
                config,
                digest,
                report,
                plan,
                kv_now,
            )
            save_record(record_to, after, kv_now, log, set_aside)

    ledger = Ledger()
    try:
        applied = apply_plan(cloudflare, plan, None if force else config.max_deletes, ledger, documents)
    except Exception:
        tally(report, plan, ledger, config.kv_key_prefix, guarded=False)  # what Cloudflare confirmed before the failure
        record(ledger, converged=False)  # what landed, and the rest as it was
        raise
    tally(report, plan, ledger, config.kv_key_prefix, guarded=bool(applied.guarded))
    report.guarded = applied.guarded
    if not applied.guarded:
        report.success = True
        if usage_metrics_to_send(config, report, sent):  # a pass over every key: only when it is sent
            report.active_decisions = active_decisions(projection, documents, config.kv_key_prefix)
        last_sent, sent = sent, send_usage_metrics(http, config, log, report, last_sent=sent)
        due_at = plan.due_at if plan.due_at < math.inf else None
        if (
            record_to is None
            and (
                sent != last_sent
                or answer.hexdigest() != kv.lapi_digest
                or due_at != kv.due_at
                or any(e is not None and e <= kv.now + kv.offset for e, _ in kv.present.values())
            )
        ):  # a trusted record, unchanged but for when usage metrics went, LAPI's digest, when a key is due, or keys expired
            record_to = state
    record(ledger, converged=not applied.guarded)
    if applied.guarded:
        log.error(
            "delete_guard",
            f"the plan would delete {counted(applied.guarded, 'key')}, more than MAX_DELETES={config.max_deletes}: "
            "deleted none (is LAPI answering with a partial set?); run with --force to allow it once",
            planned_deletes=applied.guarded,
            max_deletes=config.max_deletes,
        )
        return EXIT_CLOUDFLARE
    return EXIT_OK


def tally(report: Report, plan: Plan, ledger: Ledger, prefix: str, guarded: bool) -> None:
    """The run's figures as Cloudflare confirmed them in `ledger` (after a failure, what landed
    before it): the address keys written, deleted, unchanged and spared, and what became of each
    table's key: "written", "deleted", "unchanged", "to write" or "to delete" while unconfirmed,
    "delete held back" by MAX_DELETES."""
    tables = {prefix + name: name for name in DOCUMENT_NAMES}
    written = {key for chunk, _ in ledger.written for key in map(write_key, chunk) if key in tables}
    deleted = {key for chunk, _ in ledger.deleted for key in chunk if key in tables}
    # make_plan goes through `wanted` in order, and plan_run adds the tables' keys last.
    unchanged = tables.keys() & plan.unchanged[-len(tables) :]
    to_write = tables.keys() & map(write_key, plan.writes[-len(tables) :])
    report.written = sum(len(chunk) for chunk, _ in ledger.written) - len(written)
    report.deleted = sum(len(chunk) for chunk, _ in ledger.deleted) - len(deleted)
    report.unchanged, report.spared = len(plan.unchanged) - len(unchanged), len(plan.spared)
    actions = {}
    for key, name in tables.items():
        at = bisect.bisect_left(plan.deletes, key)  # deletes are sorted
        if key in written or key in deleted or key in unchanged:
            actions[name] = "written" if key in written else "deleted" if key in deleted else "unchanged"
        elif key in to_write:
            actions[name] = "to write"
        elif at < len(plan.deletes) and plan.deletes[at] == key:
            actions[name] = "delete held back" if guarded else "to delete"
    report.table_actions = actions


def record_of_run(
    kv: KnownKv,
    ledger: Ledger,
    documents: Mapping[str, Document],
    carried: FromRecord,
    config: Config,
    lapi_digest: str | None,
    report: Report,
    plan: Plan,
    kv_now: float,
) -> Record:
    """The record a run leaves: what KV held (`kv`) once `ledger`'s calls landed; with LAPI's
    digest, the projection's figures and when a key comes due, when the run converged."""
    keys = record_after(kv.present, ledger, kv.offset)
    figures = Projected(
        report.wanted, dict(report.by_remediation), dict(report.ignored), entries_by_name(report.table_entries),
        dict(report.table_bytes),
    )  # fmt: skip
    due_at = plan.due_at if plan.due_at < math.inf else None
    recent, settling_until = recent_and_settling(
        recent_after(carried.recent, ledger, kv.offset, kv_now), carried.settling_until, kv_now
    )
    # Each table's value is the one whose digest its key now carries: as built, or as it was.
    candidates = [*(d.value for d in documents.values()), *carried.tables.values()]
    by_digest = {hashlib.sha256(value).hexdigest()[:32]: value for value in candidates if value}
    tables = {
        name: by_digest[have.remediation]
        for name in DOCUMENT_NAMES
        if (have := keys.get(config.kv_key_prefix + name)) is not None and have.remediation in by_digest
    }
    return Record(
        config.cf_account_id, config.cf_namespace_id, config.kv_key_prefix, kv.audited_at, kv.offset,
        carried.usage_metrics_sent_at, keys,
        *((lapi_digest, figures, due_at) if lapi_digest else (None, None, None)),
        recent, settling_until, tables,
    )  # fmt: skip


class KnownKv(NamedTuple):
    """What a run plans against: the keys KV holds under the prefix, as listed or as recorded."""

    present: Mapping[str, Present]
    now: float  # our wall time the keys were known at
    offset: float  # Cloudflare's clock minus ours
    audited_at: float  # when they were last listed
    lapi_digest: str | None  # the record's digest of LAPI's answer (None after a listing)
    due_at: float | None  # the record's (None after a listing)
    listed: bool = False  # as listed this run, not as recorded


def kv_as_listed(listed: Listing) -> KnownKv:
    # LAPI durations count on our clock; KV expirations on Cloudflare's. Compare on Cloudflare's,
    # so a skewed local clock cannot make every key look stale and be rewritten each run.
    offset = listed.server_time - listed.received_at if listed.server_time is not None else 0.0
    return KnownKv(listed.present, listed.received_at, offset, listed.received_at, None, None, listed=True)


def kv_as_recorded(record: Record, now: float) -> KnownKv:
    return KnownKv(record.keys, now, record.clock_offset, record.audited_at, record.lapi_digest, record.due_at)


def log_dry_run(
    log: Log,
    plan: Plan,
    max_deletes: int | None,
    wanted: Mapping[str, Wanted],
    documents: Mapping[str, Document],
    kv: KnownKv,
    report: Report,
) -> None:
    """The plan, and what it rests on: a listing of KV or the state record (which a change made
    to KV behind the job's back does not show), the decisions left out, the requests it costs."""
    if kv.listed:
        log.info("plan", f"dry run: compared with a listing of KV ({audit_words(report)})", compared_with="listing")
    else:
        age = kv.now - kv.audited_at
        log.info(
            "plan",
            f"dry run: compared with the state record, not with KV itself: the keys as runs recorded them, "
            f"last checked against a listing {age:.0f}s ago; --audit --dry-run lists KV",
            compared_with="record",
            record_age_seconds=round(age),
        )
    # The tables' keys among the address keys' samples, shown as the tables they are.
    tables = {key: f"{document.name} table" for key, document in documents.items()}
    shown = ChainMap({key: Wanted(label, 0.0, "", "") for key, label in tables.items()}, wanted)
    log_plan(log, plan, shown, ChainMap({key: Present(None, label) for key, label in tables.items()}, kv.present))
    log_table_plan(log, report, documents)
    ignored = {r: report.ignored[r] for r in IGNORE_REASONS}
    log.info("plan", f"dry run: ignored {sum(ignored.values())} ({counts(ignored)})", ignored=ignored)
    for reason, named in left_out_named(report.ignored, IGNORE_REASONS).items():
        log.info("plan", f"dry run: ignored ({reason}): {named}", reason=reason, count=report.ignored[reason])
    deletes = 0 if guard_trips(plan, max_deletes) else len(plan.deletes)
    bulk_put, bulk_delete = -(-len(plan.writes) // MAX_BULK_ITEMS), -(-deletes // MAX_BULK_ITEMS)
    log.info(
        "plan",
        f"dry run: a real run would send Cloudflare {counted(bulk_put + bulk_delete, 'request')} for this plan: "
        f"bulk_put {bulk_put} ({counted(len(plan.writes), 'key')}), "
        f"bulk_delete {bulk_delete} ({counted(deletes, 'key')}), "
        f"more if Cloudflare reports keys unsuccessful; this dry run sent {sum(report.cloudflare_requests.values())} "
        f"({counts(report.cloudflare_requests)})",
        cloudflare_requests={"bulk_put": bulk_put, "bulk_delete": bulk_delete},
    )
    if guard_trips(plan, max_deletes):
        log.warning(
            "delete_guard",
            f"dry run: the plan deletes {counted(len(plan.deletes), 'key')}, more than MAX_DELETES={max_deletes}: "
            "a real run would delete none and exit 1; --force (FORCE=true) lets them through once",
            planned_deletes=len(plan.deletes),
            max_deletes=max_deletes,
        )


def may_be_unchanged(record: Record, config: Config, started: float, now: float) -> bool:
    """Whether a run planning against this trusted record may find nothing to do without planning,
    if LAPI's answer is the one the record was written with: unless usage metrics are due (they
    count the keys afresh), a key capped at MAX_TTL is due to be rewritten, or a key has expired
    since (it may be one LAPI still wants, if a decision's end was ever moved: then the plan
    writes it again)."""
    due_at = math.inf if record.due_at is None else record.due_at
    return (
        record.lapi_digest is not None
        and not (config.lapi_usage_metrics and usage_metrics_due(started, record.usage_metrics_sent_at))
        and now + record.clock_offset < min(record.earliest_expiration(), due_at)
    )


# A run planning against a trusted record that sends Cloudflare nothing would not notice a token
# revoked (or stripped of its KV permission) until the next audit: the run in the minute past half
# of AUDIT_INTERVAL (with the CronJob's one run a minute, one run an interval) asks Cloudflare for
# the namespace, which the token's permission covers and which is none of the key operations
# (reads, writes, deletes, lists) the plans count.
TOKEN_CHECK_SLOT = 60


def token_check_due(audited_at: float, config: Config, now: float) -> bool:
    """Whether a run that sends Cloudflare nothing, with a record audited at `audited_at`, checks its token."""
    half = config.audit_interval / 2
    return half <= now - audited_at < half + TOKEN_CHECK_SLOT


def check_token(
    cloudflare: Cloudflare, config: Config, audited_at: float, now: float, state: StateFile | None, log: Log
) -> None:
    """Ask Cloudflare for the namespace when token_check_due; CloudflareError when it is refused,
    after marking the record untrusted, so that every run after this one audits (and fails alike
    until the token works again): the failure lasts, for the alert on failed runs to see."""
    if not token_check_due(audited_at, config, now):
        return
    try:
        cloudflare.namespace()
    except CloudflareError:
        if state is not None:
            with contextlib.suppress(OSError):  # if it cannot be set aside, KV is unchanged: the record still holds
                state.set_aside()
        raise


def unchanged(report: Report, record: Record) -> int:
    """A run whose LAPI answer is the record's: the figures of the projection it would repeat."""
    assert record.projected is not None
    report.wanted = report.unchanged = record.projected.wanted
    report.by_remediation = Counter(record.projected.by_remediation)
    report.ignored = Counter(record.projected.ignored)
    report.table_entries = Counter(
        {tuple(entry.split(":", 1)): n for entry, n in record.projected.table.items()}  # type: ignore[misc]
    )
    report.table_bytes = dict(record.projected.table_bytes)
    report.table_actions = {name: "unchanged" for name in DOCUMENT_NAMES if record.prefix + name in record.keys}
    report.lapi_unchanged = report.success = True
    return EXIT_OK


def draining(held: list[bytes]) -> Iterator[bytes]:
    """The chunks in order, each let go as it is taken."""
    held.reverse()
    while held:
        yield held.pop()


def once_flowing(batches: Iterable[list[Any]], begin: Callable[[], None]) -> Iterator[list[Any]]:
    """`batches`, with `begin` called once: when the first has been decoded, or at their end if
    there is none."""
    begun = False
    for batch in batches:
        if not begun:
            begun = True
            begin()
        yield batch
    if not begun:
        begin()


def save_record(state: StateFile, record: Record, kv_now: float, log: Log, set_aside: bool) -> None:
    try:
        state.save(record, kv_now)
    except OSError as e:
        happened = (
            f"this run set the record aside before changing KV, so none is in place: the next run audits "
            f"(what is left is {state.aside_path})"
            if set_aside
            else "KV did not change, and the record in place still matches it"
        )
        log.warning("state_unwritable", f"STATE_FILE: cannot write {state.path}: {e.strerror or e}; {happened}")


def run(http: Http, config: Config, log: Log, report: Report, args: argparse.Namespace) -> int:
    """sync(), with every way it can fail turned into its exit code and one clear error line."""
    try:
        return sync(http, config, log, report, args.dry_run, args.force, args.audit)
    except LapiUnreadable as e:
        log.error("lapi_unreadable", f"{e}; skipped the run, KV left as it is")
        return EXIT_LAPI
    except (CloudflareError, DeadlineExceeded) as e:
        log.error("cloudflare_failed", f"Cloudflare: {e}")
    except Interrupted as stop:
        log_interrupted(log, stop, "KV holds at most part of this run's plan, which the next run completes")
        return stop.exit_code
    except Exception:  # a bug: say so loudly, but never with a secret in it
        log.error("internal_error", traceback.format_exc().strip())
    return EXIT_CLOUDFLARE


def log_interrupted(log: Log, stop: Interrupted, what: str) -> None:
    log.error("interrupted", f"{stop} received: stopped the run where it was; {what}", signal=str(stop))


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the run. A run builds hundreds of thousands of
    objects that all live to its end and makes next to no cycles, so the collector would only
    walk the same objects again and again: a third of a steady run at 100,000 decisions."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class Interrupted(BaseException):
    """SIGTERM (Kubernetes at activeDeadlineSeconds, a drain, an eviction) or SIGINT, raised in the
    main thread wherever the run is. A BaseException, so no `except Exception` on the way stops it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal ended: 143, 130


class Signals:
    """While in effect, the first SIGTERM or SIGINT raises Interrupted; later ones, and any after
    `hold()`, are ignored, so the failure is still reported (in PUSH_GRACE, well inside the pod's
    30 s grace period). Only the main thread can receive signals; elsewhere this does nothing."""

    HANDLED = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, pending: list[int] = EARLY_SIGNALS) -> None:  # noqa: B006  # the one list, on purpose
        self.armed = True
        self.previous: dict[int, Any] = {}
        self.pending = pending  # signals that came before these handlers were in place

    def raise_pending(self) -> None:
        """Interrupted for a signal that came before the handlers were in place, if one did."""
        if self.armed and self.pending:
            self.armed = False
            raise Interrupted(self.pending[0])

    def _handle(self, signum: int, frame: Any) -> None:
        if self.armed:
            self.armed = False
            raise Interrupted(signum)

    def hold(self) -> None:
        self.armed = False

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.HANDLED}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def main(
    argv: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> int:
    # The handlers first: a SIGTERM while the configuration is read (a pod deleted as it starts)
    # must still be logged and end the run with 143, not kill it silently.
    with Signals() as signals:
        env = os.environ if env is None else env
        out, err = out or sys.stdout, err or sys.stderr
        # No Config yet: LOG_FORMAT as set, if it is usable, so a JSON log gets JSON here too.
        fmt = "json" if env.get("LOG_FORMAT", "").strip().lower() == "json" else "text"
        config: Config | None = None
        try:
            signals.raise_pending()
            args, config, unknown = configure(argv, env)
            tls = lapi_tls(config)
            log = Log(out, err, config.log_format, config.secrets, clock)
            if unknown:
                log.warning(
                    "configuration", f"set but not read by this job (misspelled?): {', '.join(unknown)}", unread=unknown
                )
            for warning in config_warnings(config):
                log.warning("configuration", warning)
            if config.edge_url:
                return check_edge(config, tls, log, clock)
            report, started = Report(started=clock.now()), clock.monotonic()
        except ConfigError as e:
            Log(out, err, fmt, clock=clock).error("configuration", "configuration: " + "; ".join(e.problems))
            return EXIT_CONFIG
        except Interrupted as stop:  # before the run began; pushed if the configuration says where
            signals.hold()
            return interrupted_early(stop, config, Log(out, err, fmt, clock=clock), clock)
        try:
            return run_reported(args, config, tls, log, report, started, clock, signals)
        except Interrupted as stop:  # in the instant before its run began
            signals.hold()
            return interrupted_early(stop, config, log, clock)


def interrupted_early(stop: Interrupted, config: Config | None, log: Log, clock: Clock) -> int:
    log_interrupted(log, stop, "before the run began: nothing was done")
    if config is not None:
        with Http(clock, config.http_timeout, clock.monotonic(), proxies=config.proxies) as http:
            push_metrics(http, config, Report(started=clock.now(), exit_code=stop.exit_code), log)
    return stop.exit_code


def run_reported(
    args: argparse.Namespace,
    config: Config,
    tls: dict[str, ssl.SSLContext],
    log: Log,
    report: Report,
    started: float,
    clock: Clock,
    signals: Signals,
) -> int:
    """The run, its summary and its push, from a whole configuration; a signal at any point
    before the push is reported as such."""
    with Http(clock, config.http_timeout, started + config.run_deadline, tls, config.proxies) as http:
        try:
            with collector_paused():
                report.exit_code = run(http, config, log, report, args)
        except Interrupted as stop:  # outside run()'s own handling: just before it, or after its end
            report.exit_code = stop.exit_code
            log_interrupted(log, stop, "KV holds at most part of this run's plan, which the next run completes")
        signals.hold()
        report.duration = clock.monotonic() - started
        if not args.dry_run:
            if report.exit_code in (EXIT_OK, EXIT_CLOUDFLARE):  # LAPI and signals said it in one line
                log_summary(log, report)
            push_metrics(http, config, report, log)
    return report.exit_code


def exit_at_once(code: int) -> None:
    """End the process with `code`, its output flushed, without the interpreter's teardown: Python
    puts the default signal handlers back there, so a SIGTERM in it (a pod deleted as the run
    ends) killed a finished run by signal 15; and freeing a large run's objects one by one costs
    time for nothing. Nothing is left to do: the record is saved, the connections are closed."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def cli() -> None:
    """The console script's entry point (`lapi-kv-sync`): main(), ended as the script ends."""
    exit_at_once(main())


if __name__ == "__main__":
    cli()
