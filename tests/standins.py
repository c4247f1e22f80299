"""Local stand-ins for CrowdSec LAPI, Cloudflare Workers KV, the Pushgateway and an HTTP proxy.

Each is a real HTTP/1.1 server with keep-alive on 127.0.0.1, started in a daemon thread,
counting the connections it accepts. They stop when their `with` block ends, and on their
own after `LIFETIME` seconds in any case, so a stuck test never leaves a server behind.

The KV stand-in is strict to Cloudflare's published limits and checks every request it gets
and every answer it gives against Cloudflare's own OpenAPI schema (tests/reference); what does
not fit lands in `violations`, which the tests assert is empty. The LAPI stand-in checks usage
metrics against CrowdSec's swagger the same way.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import contextlib
import http.client
import json
import re
import secrets
import select
import socket
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

LIFETIME = 900
REFERENCE = Path(__file__).resolve().parent / "reference"  # the published schemas: tests/reference/README.md
KV_SCHEMA = REFERENCE / "cloudflare" / "workers-kv-openapi.json"
KV_SCHEMA_2024 = REFERENCE / "cloudflare" / "workers-kv-openapi-2024-08-06.json"
USAGE_SCHEMA = REFERENCE / "crowdsec-lapi-swagger" / "usage-metrics.json"
ACCOUNT = "023e105f4ecef8ad9ca31a8372d0c353"
NAMESPACE = "0f2ac74b498b48028cb68387c421e279"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: Standin, handler: type[BaseHTTPRequestHandler]):
        super().__init__(("127.0.0.1", 0), handler)
        self.owner = owner

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (timeouts, dropped connections) is expected here, not news


class _Counted:
    """A socket stream that adds the HTTP bytes it carries to a counter of its server's owner."""

    def __init__(self, stream: Any, owner: Standin, counter: str) -> None:
        self.stream, self.owner, self.counter = stream, owner, counter

    def _count(self, n: int) -> None:
        with self.owner.lock:
            setattr(self.owner, self.counter, getattr(self.owner, self.counter) + n)

    def read(self, *args: Any) -> bytes:
        data = self.stream.read(*args)
        self._count(len(data))
        return data

    def readline(self, *args: Any) -> bytes:
        data = self.stream.readline(*args)
        self._count(len(data))
        return data

    def write(self, data: bytes) -> int:
        self._count(len(data))
        return self.stream.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle's algorithm, a small body then waits for
    # the client's delayed ACK of the headers, 40 ms per answer (a bulk call's), which no real
    # server adds. Off, as Go's net/http and Cloudflare's edge have it.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        owner = self.server.owner
        with owner.lock:
            owner.connections += 1
        self.rfile = _Counted(self.rfile, owner, "bytes_in")
        self.wfile = _Counted(self.wfile, owner, "bytes_out")

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def date_time_string(self, timestamp: float | None = None) -> str:
        return super().date_time_string(self.server.owner.now() if timestamp is None else timestamp)

    def body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send(
        self,
        status: int,
        body: bytes | str | Any,
        content_type: str = "application/json",
        headers: dict | None = None,
        drip: float = 0.0,
    ) -> None:
        if not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        if drip or self.server.owner.drip:
            return self.drip(status, body, content_type, headers or {}, drip or self.server.owner.drip)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def drip(self, status: int, body: bytes, content_type: str, headers: dict, every: float) -> None:
        """The whole answer, head and body, one byte every `every` seconds, as a stalled proxy or a
        hostile server sends it; it stops when the client goes away or the server stops."""
        head = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}", f"Content-Type: {content_type}"]
        head += [f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
        raw = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        self.close_connection = True
        for i in range(len(raw)):
            try:
                self.wfile.write(raw[i : i + 1])
            except OSError:
                return
            if self.server.owner.stopped.wait(every):
                return

    def stream(self, first: bytes, repeated: bytes, every: float) -> None:
        """A 200 whose chunked body is `first` then `repeated` again and again, every `every`
        seconds (0: as fast as the client reads), until the client goes away or the server stops."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        piece = first
        while not self.server.owner.stopped.wait(every):
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            except OSError:
                return
            piece = repeated

    def cut(self, body: bytes, keep: int) -> None:
        """A 200 that promises the whole body, sends its first `keep` bytes and closes."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:keep])
        self.drop()

    def stall(self, body: bytes, keep: int, seconds: float) -> None:
        """A 200 that sends its head and the first `keep` bytes of its body, then nothing for
        `seconds` (or until the server stops), then closes: a KV edge that stalls mid-answer."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:keep])
        self.wfile.flush()
        self.server.owner.stopped.wait(seconds)
        with contextlib.suppress(OSError):
            self.drop()

    def drop(self) -> None:
        """Close the connection with no answer at all, as a reset proxy does."""
        self.close_connection = True
        self.connection.shutdown(2)

    def do_GET(self) -> None:
        self.server.owner.handle(self, "GET")

    def do_PUT(self) -> None:
        self.server.owner.handle(self, "PUT")

    def do_POST(self) -> None:
        self.server.owner.handle(self, "POST")

    def do_DELETE(self) -> None:
        self.server.owner.handle(self, "DELETE")

    def do_CONNECT(self) -> None:
        self.server.owner.handle(self, "CONNECT")


class Standin:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.connections = 0
        self.bytes_in = 0  # HTTP bytes the server received (the client sent)
        self.bytes_out = 0
        self.clock_offset = 0.0
        self.drip = 0.0  # seconds between the bytes of every answer; 0: answers come at once
        self.stopped = threading.Event()
        self.server = _Server(self, _Handler)
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.lifetime = LIFETIME  # seconds until it stops by itself (the playground sets its own)
        self._timer: threading.Timer | None = None

    scheme = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}"

    def serve_tls(self, context) -> None:
        """Answer over TLS with this server-side ssl.SSLContext (before `start`)."""
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https"

    def now(self) -> float:
        return time.time() + self.clock_offset

    def start(self) -> Standin:
        self._thread.start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        if self._timer is not None:
            self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def handle(self, request: _Handler, method: str) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------- LAPI


def go_duration(seconds: float) -> str:
    """Render seconds as Go's time.Duration.String() does: `3h59m58.349167242s`, `-16.937648ms`."""
    sign, s = ("-" if seconds < 0 else ""), abs(seconds)
    if s < 1:
        return sign + (f"{s * 1000:.6f}".rstrip("0").rstrip(".") or "0") + "ms"
    hours, rest = divmod(s, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{int(hours)}h" if hours else ""
    text += f"{int(minutes)}m" if hours or minutes else ""
    return sign + text + f"{secs:.9f}".rstrip("0").rstrip(".") + "s"


def decision(value: str, seconds: float = 3600, type: str = "ban", scope: str = "Ip", **extra: Any) -> dict:
    """A LAPI decision whose duration counts down from now, as LAPI's does."""
    return {
        "value": value,
        "type": type,
        "scope": scope,
        "until": time.time() + seconds,
        "origin": extra.pop("origin", "crowdsec"),
        "scenario": extra.pop("scenario", "crowdsecurity/ssh-bf"),
        **extra,
    }


class UsageSchemaCheck:
    """Validates a `POST /v1/usage-metrics` body against CrowdSec's swagger (Swagger 2.0 schemas
    are JSON Schema draft 4: an integer is not 1.0, as Go's int64 is not), plus what CrowdSec's
    code and bouncer-metrics spec add (tests/reference/README.md)."""

    def __init__(self, path: Path = USAGE_SCHEMA) -> None:
        from jsonschema import Draft4Validator

        definitions = json.loads(path.read_text())["definitions"]
        self.validator = Draft4Validator({"$ref": "#/definitions/AllMetrics", "definitions": definitions})

    def errors(self, body: Any) -> list[str]:
        problems = [
            f"usage metrics {'/'.join(map(str, e.absolute_path))}: {e.message}"[:300]
            for e in self.validator.iter_errors(body)
        ]
        components = body.get("remediation_components") if isinstance(body, dict) else None
        if problems or not isinstance(components, list):
            return problems or ["usage metrics: no remediation_components"]
        if len(components) != 1:
            problems.append(f"usage metrics: a bouncer sends exactly one remediation component, not {len(components)}")
        for window in (c.get("metrics") or [] for c in components):
            for item in (i for w in window for i in w["items"] if i["name"] == "active_decisions"):
                labels = item.get("labels") or {}
                if item["unit"] != "ip" or labels.get("ip_type") not in ("ipv4", "ipv6") or not labels.get("origin"):
                    problems.append(f"usage metrics: active_decisions wants unit ip, origin and ip_type: {item}")
        return problems


class LapiStandin(Standin):
    """GET /v1/decisions with X-Api-Key. `decisions` (None answers `null`), or `answer` to misbehave.
    POST /v1/usage-metrics as CrowdSec 1.6.3+ takes it (201), bodies kept in `usage_metrics` and
    checked against CrowdSec's schema (unless `schema=False`); `usage_answer` to misbehave,
    `usage_metrics_supported = False` to answer 404 as LAPI before 1.6.3 does."""

    def __init__(self, key: str = "lapi-test-key-0123456789", schema: bool = True) -> None:
        super().__init__()
        self.key = key
        self.decisions: list[dict] | None = []
        self.answer: tuple[int, bytes, str] | None = None  # status, body, content type
        self.delay = 0.0
        self.endless: float | None = None  # a body that never ends: seconds between its decisions
        self.cut: int | None = None  # send only this many bytes of the body, then close
        self.queries: list[dict[str, list[str]]] = []
        self.user_agents: list[str] = []
        self.usage_metrics: list[Any] = []
        self.usage_metrics_supported = True
        self.usage_answer: tuple[int, bytes, str] | None = None
        self.usage_delay = 0.0
        self.usage_drop = False
        self.usage_drip = 0.0  # seconds between the bytes of its 201
        self.violations: list[str] = []
        self.usage_schema = UsageSchemaCheck() if schema else None

    def body(self) -> bytes:
        if self.decisions is None:
            return b"null"
        rows = []
        for i, d in enumerate(self.decisions, 1):
            row = {"id": i, **{k: v for k, v in d.items() if k != "until"}}
            if "until" in d:
                row["duration"] = go_duration(d["until"] - time.time())
            rows.append(row)
        return json.dumps(rows).encode()

    def authorized(self, request: _Handler) -> bool:
        has_client_cert = hasattr(request.connection, "getpeercert") and bool(request.connection.getpeercert())
        return not self.key or request.headers.get("X-Api-Key") == self.key or has_client_cert

    def usage(self, request: _Handler, method: str) -> None:
        raw = request.body()
        if self.usage_delay:
            time.sleep(self.usage_delay)
        if self.usage_drop:
            return request.drop()
        if method != "POST" or not self.usage_metrics_supported:
            return request.send(404, "404 page not found", "text/plain")
        if not self.authorized(request):
            return request.send(403, {"message": "access forbidden"})
        try:
            body = json.loads(raw)
        except ValueError:
            return request.send(400, {"message": "invalid JSON"})
        problems = self.usage_schema.errors(body) if self.usage_schema else []
        with self.lock:
            self.usage_metrics.append(body)
            self.violations += problems
        if problems:  # as LAPI refuses a body outside its schema
            return request.send(422, {"message": "validation failure list:\n" + "\n".join(problems)})
        if self.usage_answer:
            status, answer, content_type = self.usage_answer
            return request.send(status, answer, content_type)
        request.send(201, b"", "application/json", drip=self.usage_drip)

    def handle(self, request: _Handler, method: str) -> None:
        url = urllib.parse.urlsplit(request.path)
        if url.path == "/v1/usage-metrics":
            return self.usage(request, method)
        with self.lock:
            self.queries.append(urllib.parse.parse_qs(url.query))
            self.user_agents.append(request.headers.get("User-Agent", ""))
        if self.delay:
            time.sleep(self.delay)
        if url.path == "/health":
            return request.send(200, {"status": "up"})
        if method != "GET" or url.path != "/v1/decisions":
            return request.send(404, {"message": "Not Found"})
        if not self.authorized(request):
            return request.send(403, {"message": "access forbidden"})
        if self.answer:
            status, body, content_type = self.answer
            return request.send(status, body, content_type)
        if self.endless is not None:
            row = json.dumps({"value": "192.0.2.1", "type": "ban", "scope": "Ip", "duration": "3h", "origin": "x"})
            return request.stream(b"[" + row.encode(), b"," + row.encode(), self.endless)
        if self.cut is not None:
            return request.cut(self.body(), self.cut)
        request.send(200, self.body())


# --------------------------------------------------------------------------- Cloudflare KV


@dataclass
class Entry:
    value: str | bytes  # bytes: written with `base64: true` (the network table)
    expiration: int | None = None
    metadata: Any = None


@dataclass
class Fault:
    # "429", "5xx", "drop", "html", "drip" (the real answer, slowly), "cut" (its first bytes),
    # "stall" (its head and first bytes, then nothing for `every` seconds), "raw" (status and body)
    kind: str
    operation: str | None = None  # list, bulk_put, bulk_delete; None: any
    status: int = 500
    retry_after: str | None = "1"
    times: int = 1  # how many requests it hits; -1: every one
    body: Any = None  # for "raw"
    every: float = 0.5  # for "drip": seconds between bytes; for "stall": how long it stalls


# A Workers KV API path: /client/v4/accounts/<account>/storage/kv/namespaces/<namespace><suffix>.
KV_ROUTE = re.compile(
    r"/client/v4/accounts/(?P<account>[^/]+)/storage/kv/namespaces/(?P<namespace>[^/]+)(?P<suffix>/.*)?"
)
# How Cloudflare names each operation when it answers that the namespace does not exist.
NAMESPACE_NOT_FOUND = {"list": "list keys", "bulk_put": "bulk write", "bulk_delete": "bulk delete", "namespace": "get"}


def _error(code: int, message: str) -> dict:
    return {"success": False, "errors": [{"code": code, "message": message}], "messages": [], "result": None}


class SchemaCheck:
    """Validates KV requests and answers against Cloudflare's published OpenAPI schema."""

    def __init__(self, path: Path = KV_SCHEMA) -> None:
        from openapi_schema_validator import OAS30Validator

        self.validator = OAS30Validator
        self.spec = json.loads(path.read_text())
        self.legacy = json.loads(KV_SCHEMA_2024.read_text())

    def operation(self, spec: dict, method: str, suffix: str) -> dict:
        for path, ops in spec["paths"].items():
            if path.endswith("/{namespace_id}" + suffix):
                return ops[method.lower()]
        raise KeyError(suffix)

    def errors(self, schema: dict, instance: Any) -> list[str]:
        return [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"[:300]
            for e in self.validator(schema).iter_errors(instance)
        ]

    def request(self, method: str, suffix: str, query: dict[str, str], body: Any) -> list[str]:
        op = self.operation(self.spec, method, suffix)
        problems = []
        for param in op.get("parameters", []):
            if param["in"] == "query" and param["name"] in query:
                raw = query[param["name"]]
                value = (
                    float(raw)
                    if param["schema"].get("type") == "number" and re.fullmatch(r"-?\d+(\.\d+)?", raw)
                    else raw
                )
                problems += [f"query {param['name']}: {e}" for e in self.errors(param["schema"], value)]
        if "requestBody" in op:
            problems += [
                f"request: {e}" for e in self.errors(op["requestBody"]["content"]["application/json"]["schema"], body)
            ]
        return problems

    def response(self, method: str, suffix: str, status: int, body: Any, legacy: bool = False) -> list[str]:
        if status == 200:
            op = self.operation(self.legacy if legacy else self.spec, method, suffix)
            schema = op["responses"]["200"]["content"]["application/json"]["schema"]
        else:
            schema = self.spec["components"]["schemas"]["cloudflare_error_envelope"]
        return [f"answer {status}: {e}" for e in self.errors(schema, body)]


class KvStandin(Standin):
    """Cloudflare's Workers KV API for one namespace, strict to its limits, with faults on demand."""

    OPERATIONS = {
        ("GET", "/keys"): "list",
        ("PUT", "/bulk"): "bulk_put",
        ("POST", "/bulk/delete"): "bulk_delete",
        ("GET", ""): "namespace",  # Get a Namespace: not in the trimmed KV schema of tests/reference
    }

    def __init__(self, token: str = "cf-test-token-abcdefghijklmnop", schema: bool = True) -> None:
        super().__init__()
        self.token = token
        self.store: dict[str, Entry] = {}
        self.faults: list[Fault] = []
        # empty_first_page, null_cursor, absent_cursor, null_result, endless_empty_pages
        self.quirks: set[str] = set()
        self.unsuccessful_once: set[str] = set()
        self.unsuccessful_always: set[str] = set()
        self.requests: Counter[str] = Counter()
        self.bulk_sizes: dict[str, list[int]] = {"bulk_put": [], "bulk_delete": []}
        self.writes = 0
        self.deletes = 0
        self.violations: list[str] = []
        self.written_keys: list[str] = []
        self.deleted_keys: list[str] = []
        self._cursors: dict[str, tuple[str, str]] = {}
        self._names: list[str] = []
        # A lagging list (KV's list is eventually consistent, up to 60 s): while set, listings show
        # this frozen view; reads and writes go to the store as ever. freeze_listing() sets it.
        self.listing_view: dict[str, Entry] | None = None
        self._metadata_sizes: dict[tuple, int] = {}
        self.schema = SchemaCheck() if schema else None
        self.base = f"/client/v4/accounts/{ACCOUNT}/storage/kv/namespaces/{NAMESPACE}"

    @property
    def api_url(self) -> str:
        return self.url + "/client/v4"

    def reset_counts(self) -> None:
        with self.lock:
            self.requests.clear()
            self.bulk_sizes = {"bulk_put": [], "bulk_delete": []}
            self.writes = self.deletes = self.connections = self.bytes_in = self.bytes_out = 0
            self.written_keys, self.deleted_keys = [], []

    def live(self) -> dict[str, Entry]:
        """The keys that have not expired, as Cloudflare would list them."""
        with self.lock:
            now = self.now()
            for name in [n for n, e in self.store.items() if e.expiration is not None and e.expiration <= now]:
                del self.store[name]
            return dict(self.store)

    def freeze_listing(self) -> None:
        """From now on, list the keys as they are now, whatever is written or deleted after."""
        with self.lock:
            self.listing_view = dict(self.store)

    def snapshot(self) -> dict[str, tuple]:
        return {k: (e.value, e.expiration, json.dumps(e.metadata, sort_keys=True)) for k, e in self.live().items()}

    def fault_for(self, operation: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.operation in (None, operation):
                    if fault.times > 0:
                        fault.times -= 1
                        if fault.times == 0:
                            self.faults.remove(fault)
                    return fault
        return None

    def handle(self, request: _Handler, method: str) -> None:
        url = urllib.parse.urlsplit(request.path)
        raw = request.body()
        if len(raw) < int(request.headers.get("Content-Length") or 0):
            # The client went away mid-body (a run killed as it sent): no server acts on half a request.
            request.close_connection = True
            return
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        route = KV_ROUTE.fullmatch(url.path)
        suffix = (route["suffix"] or "") if route else None
        operation = self.OPERATIONS.get((method, suffix)) if route else None
        if operation is None and route and method == "GET" and suffix.startswith("/values/"):
            operation = "read"
        if operation is None:
            return request.send(404, _error(7003, "No route for the URI"))
        with self.lock:
            self.requests[operation] += 1
        if request.headers.get("Authorization") != f"Bearer {self.token}" or route["account"] != ACCOUNT:
            # Another account's namespaces are not this token's to see: Cloudflare refuses it, not a 404.
            return self.answer(request, method, suffix, 403, _error(10000, "Authentication error"))
        if route["namespace"] != NAMESPACE:
            # As Cloudflare answers a namespace id it does not know (the code and wording of its
            # local API in Miniflare: KV_ERROR_NAMESPACE_NOT_FOUND), whatever the operation.
            what = NAMESPACE_NOT_FOUND.get(operation, operation)
            return self.answer(request, method, suffix, 404, _error(10013, f"{what}: 'namespace not found'"))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            return self.answer(request, method, suffix, 400, _error(10002, "request body is not valid JSON"))
        if operation == "namespace":
            return self.namespace(request, query, raw)
        if operation == "read":
            return self.read(request, urllib.parse.unquote(suffix.removeprefix("/values/")), query, raw)
        if self.schema:
            self.violations += self.schema.request(method, suffix, query, body)
        fault = self.fault_for(operation)
        if fault and fault.kind in ("drip", "cut", "stall"):
            status, answer = getattr(self, operation)(query, body)
            if fault.kind == "cut":
                return request.cut(json.dumps(answer).encode(), 20)
            if fault.kind == "stall":
                return request.stall(json.dumps(answer).encode(), 20, fault.every)
            return request.send(status, answer, drip=fault.every)
        if fault:
            if fault.kind == "raw":
                return request.send(fault.status, fault.body)
            if fault.kind == "drop":
                return request.drop()
            if fault.kind == "html":
                return request.send(
                    fault.status, "<html><body><h1>502 Bad Gateway</h1>cloudflare</body></html>", "text/html"
                )
            if fault.kind == "429":
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                return request.send(429, _error(10429, "Too many requests"), headers=headers)
            return request.send(fault.status, _error(10500, "Internal server error"))
        status, answer = getattr(self, operation)(query, body)
        legacy = answer.get("result", 0) is None and status == 200 and operation != "list"
        self.answer(request, method, suffix, status, answer, legacy)

    def answer(
        self, request: _Handler, method: str, suffix: str, status: int, body: dict, legacy: bool = False
    ) -> None:
        if self.schema:
            checked = body
            if (body.get("result_info") or {}).get("cursor", "") is None:
                # The schema says string; a null last cursor is a quirk seen in the wild, so
                # check the rest of the answer and send the null.
                checked = {**body, "result_info": {k: v for k, v in body["result_info"].items() if k != "cursor"}}
            self.violations += self.schema.response(method, suffix, status, checked, legacy)
        request.send(status, body)

    def namespace(self, request: _Handler, query: dict[str, str], raw: bytes) -> None:
        """GET /accounts/{account_id}/storage/kv/namespaces/{namespace_id}: no query, no body; the
        envelope with the namespace (id, title, supports_url_encoding), as Cloudflare documents it."""
        if query or raw:
            with self.lock:
                self.violations.append(f"namespace: a GET with a query or a body: {query} {raw[:40]!r}")
            return request.send(400, _error(10001, "a GET takes no query or body"))
        fault = self.fault_for("namespace")
        if fault and fault.kind == "raw":
            return request.send(fault.status, fault.body)
        if fault:
            return request.send(fault.status, _error(10500, "Internal server error"))
        result = {"id": NAMESPACE, "title": "crowdsec-decisions", "supports_url_encoding": True}
        request.send(200, {"success": True, "errors": [], "messages": [], "result": result})

    def read(self, request: _Handler, key: str, query: dict[str, str], raw: bytes) -> None:
        """GET .../values/{key_name}: the value's bytes as they were stored (application/octet-stream),
        or 404 with Cloudflare's envelope (10009) when there is no such key (or it has expired)."""
        if query or raw or len(key.encode()) > 512:
            with self.lock:
                self.violations.append(f"read: a query, a body or a key over 512 bytes: {query} {raw[:40]!r}")
            return request.send(400, _error(10001, "a GET takes no query or body"))
        fault = self.fault_for("read")
        if fault:
            return request.send(fault.status, _error(10500, "Internal server error"))
        entry = self.live().get(key)
        if entry is None:
            return self.answer(request, "GET", "/values/{key_name}", 404, _error(10009, "get: 'key not found'"))
        value = entry.value if isinstance(entry.value, bytes) else entry.value.encode()
        request.send(200, value, "application/octet-stream")

    def list(self, query: dict[str, str], body: Any) -> tuple[int, dict]:
        try:
            limit = int(query.get("limit", "1000"))
        except ValueError:
            return 400, _error(10003, "invalid limit")
        if not 10 <= limit <= 1000:
            return 400, _error(10003, "limit must be between 10 and 1000")
        prefix, after = query.get("prefix", ""), ""
        store = self.store if self.listing_view is None else self.listing_view
        if query.get("cursor"):
            if query["cursor"] not in self._cursors:
                return 400, _error(10004, "invalid cursor")
            prefix, after = self._cursors[query["cursor"]]
        else:
            with self.lock:  # a listing sees the key names as they were when it began
                self._names = sorted(store)
        names, now, page = self._names, self.now(), []
        i = bisect.bisect_right(names, after) if after else bisect.bisect_left(names, prefix)
        if "endless_empty_pages" in self.quirks:  # a broken KV: empty pages, each with a new cursor
            self._cursors[token := secrets.token_urlsafe(24)] = (prefix, after)
            return 200, {"success": True, "errors": [], "messages": [], "result": [], "result_info": {"cursor": token}}
        if "empty_first_page" in self.quirks and not query.get("cursor"):
            i = bisect.bisect_left(names, prefix)
            after, more = "", True
        else:
            while i < len(names) and len(page) < limit and names[i].startswith(prefix):
                entry = store.get(names[i])
                if entry is not None and (entry.expiration is None or entry.expiration > now):
                    page.append((names[i], entry))
                i += 1
            more = i < len(names) and names[i].startswith(prefix)
        result = []
        for name, entry in page:
            item: dict[str, Any] = {"name": name}
            if entry.expiration is not None:
                item["expiration"] = entry.expiration
            if entry.metadata is not None:
                item["metadata"] = entry.metadata
            result.append(item)
        info: dict[str, Any] = {"count": len(result)}
        if more:
            token = secrets.token_urlsafe(24)
            self._cursors[token] = (prefix, page[-1][0] if page else after)
            info["cursor"] = token
        elif "null_cursor" in self.quirks:
            info["cursor"] = None
        elif "absent_cursor" not in self.quirks:
            info["cursor"] = ""
        return 200, {"success": True, "errors": [], "messages": [], "result": result, "result_info": info}

    def bulk_put(self, query: dict[str, str], items: Any) -> tuple[int, dict]:
        if not isinstance(items, list):
            return 400, _error(10001, "request body must be an array")
        if len(items) > 10_000:
            return 413, _error(10005, f"too many items in bulk request: {len(items)} > 10000")
        now = self.now()
        for item in items:
            key = item.get("key") if isinstance(item, dict) else None
            if not isinstance(key, str) or not isinstance(item.get("value"), str):
                return 400, _error(10001, "each item needs a string key and value")
            if len(key.encode()) > 512:
                return 414, _error(10033, f"key too long: {len(key.encode())} bytes > 512")
            ttl = item.get("expiration_ttl")
            if ttl is not None and (not isinstance(ttl, (int, float)) or ttl < 60):
                return 400, _error(10019, f"invalid expiration_ttl of {ttl}: must be at least 60")
            if "metadata" in item and self.metadata_bytes(item["metadata"]) > 1024:
                return 413, _error(10024, "metadata too large: over 1024 bytes")
            if item.get("base64"):
                try:
                    item["value"] = base64.b64decode(item["value"], validate=True)
                except binascii.Error:
                    return 400, _error(10001, f"the value of {key} is not base64")
            if len(item["value"]) > 25 * 1024 * 1024:
                return 413, _error(10025, "value too large: over 25 MiB")
        unsuccessful = []
        with self.lock:
            for item in items:
                key = item["key"]
                if key in self.unsuccessful_once or key in self.unsuccessful_always:
                    self.unsuccessful_once.discard(key)
                    unsuccessful.append(key)
                    continue
                ttl = item.get("expiration_ttl")
                expiration = int(now + ttl) if ttl is not None else item.get("expiration")
                self.store[key] = Entry(item["value"], expiration, item.get("metadata"))
                self.writes += 1
                self.written_keys.append(key)
            self.bulk_sizes["bulk_put"].append(len(items))
        return 200, self.bulk_answer(len(items) - len(unsuccessful), unsuccessful)

    def metadata_bytes(self, metadata: Any) -> int:
        """Its size as JSON, measured once per distinct metadata: a bulk write repeats a few, and
        measuring each (json.dumps per item) made the stand-in, not the job, most of a cold run."""
        try:
            seen = (tuple(metadata.items()), tuple(map(type, metadata.values())))
            return self._metadata_sizes[seen]
        except (AttributeError, TypeError):  # not an object, or a value that is a list or an object
            return len(json.dumps(metadata).encode())
        except KeyError:
            size = self._metadata_sizes[seen] = len(json.dumps(metadata).encode())
            return size

    def bulk_delete(self, query: dict[str, str], names: Any) -> tuple[int, dict]:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return 400, _error(10001, "request body must be an array of key names")
        if len(names) > 10_000:
            return 413, _error(10005, f"too many items in bulk request: {len(names)} > 10000")
        unsuccessful = []
        with self.lock:
            for name in names:
                if name in self.unsuccessful_once:
                    self.unsuccessful_once.discard(name)
                    unsuccessful.append(name)
                    continue
                self.store.pop(name, None)
                self.deletes += 1
                self.deleted_keys.append(name)
            self.bulk_sizes["bulk_delete"].append(len(names))
        return 200, self.bulk_answer(len(names) - len(unsuccessful), unsuccessful)

    def bulk_answer(self, successful: int, unsuccessful: list[str]) -> dict:
        result = (
            None
            if "null_result" in self.quirks and not unsuccessful
            else {"successful_key_count": successful, "unsuccessful_keys": unsuccessful}
        )
        return {"success": True, "errors": [], "messages": [], "result": result}


# --------------------------------------------------------------------------- Pushgateway


@dataclass
class Push:
    method: str
    path: str
    body: str
    status: int


class PushgatewayStandin(Standin):
    """Keeps groups as the real one does (PUT replaces the group, POST the families it names)
    and answers 400 where the real one does: no final newline, a timestamp, a second TYPE."""

    def __init__(self) -> None:
        super().__init__()
        self.pushes: list[Push] = []
        self.groups: dict[str, dict[str, list[str]]] = {}
        self.fail_with: int | None = None

    def handle(self, request: _Handler, method: str) -> None:
        body = request.body().decode()
        problem = self.problem(body)
        status = self.fail_with or (400 if problem else 200)
        with self.lock:
            self.pushes.append(Push(method, request.path, body, status))
            if status == 200:
                families = self.families(body)
                group = self.groups.setdefault(request.path, {})
                if method == "PUT":
                    group.clear()
                group.update(families)
        request.send(status, problem or "", "text/plain")

    @staticmethod
    def problem(body: str) -> str | None:
        if not body.endswith("\n"):
            return "text format parsing error: body does not end with a newline"
        typed = set()
        for line in body.splitlines():
            if line.startswith("# TYPE "):
                name = line.split()[2]
                if name in typed:
                    return f"second TYPE line for metric name {name}"
                typed.add(name)
            elif line and not line.startswith("#"):
                rest = line.rsplit("}", 1)[1] if "}" in line else line.split(" ", 1)[-1]
                if len(rest.split()) != 1:
                    return f"pushed metrics are invalid or inconsistent: timestamp or junk in {line!r}"
        return None

    @staticmethod
    def families(body: str) -> dict[str, list[str]]:
        families: dict[str, list[str]] = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                families.setdefault(re.split(r"[{ ]", line, maxsplit=1)[0], []).append(line)
        return families

    def value(self, name: str, labels: str = "", job: str = "crowdsec-kv-sync") -> float | None:
        group = self.groups.get(f"/metrics/job/{job}", {})
        for line in group.get(name, []):
            series, value = line.rsplit(" ", 1)
            if series == (f"{name}{{{labels}}}" if labels else name):
                return float(value)
        return None


# --------------------------------------------------------------------------- HTTP proxy


@dataclass
class Proxied:
    method: str  # CONNECT, or the method of a plain HTTP request sent on
    target: str  # host:port for CONNECT, the whole URL otherwise
    authorization: str | None  # the Proxy-Authorization header as it came


class ProxyStandin(Standin):
    """An HTTP proxy as Squid or a corporate proxy is: CONNECT tunnels (then bytes both ways,
    untouched: TLS stays between the client and the target) and plain HTTP requests in absolute
    form, sent on. It records what it was asked in `requests`. `hosts` maps a target's name to
    the address it connects to (a name no DNS knows then reaches a stand-in on 127.0.0.1);
    `refuse` answers every request with that status instead; `credentials` ("user:password")
    makes it answer 407 to a request without them. Its refusals are Squid's: an HTML page with
    `X-Squid-Error` (ERR_ACCESS_DENIED, ERR_CACHE_ACCESS_DENIED for 407); `marked` False leaves
    that header out, as a proxy that says nothing of itself does."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Proxied] = []
        self.hosts: dict[str, str] = {}
        self.refuse: int | None = None
        self.credentials: str | None = None
        self.marked = True
        self.silent = False  # read a CONNECT, then answer nothing until the client goes away

    def handle(self, request: _Handler, method: str) -> None:
        authorization = request.headers.get("Proxy-Authorization")
        with self.lock:
            self.requests.append(Proxied(method, request.path, authorization))
        body = request.body()
        expected = None
        if self.credentials is not None:
            expected = "Basic " + base64.b64encode(self.credentials.encode()).decode()
        if self.refuse or (expected is not None and authorization != expected):
            status = self.refuse or 407
            headers = {"Server": "squid/6.10"}
            if self.marked:
                headers["X-Squid-Error"] = f"{'ERR_CACHE_ACCESS_DENIED' if status == 407 else 'ERR_ACCESS_DENIED'} 0"
            if status == 407:
                headers["Proxy-Authenticate"] = 'Basic realm="proxy"'
            request.close_connection = True
            page = f"<html><body><h1>ERROR</h1><p>{status}: access denied by the proxy</p></body></html>"
            return request.send(status, page, "text/html", headers)
        if method == "CONNECT" and self.silent:
            request.close_connection = True
            self.stopped.wait(LIFETIME)
            return None
        if method == "CONNECT":
            return self.tunnel(request)
        url = urllib.parse.urlsplit(request.path)
        upstream = http.client.HTTPConnection(self.hosts.get(url.hostname, url.hostname), url.port, timeout=60)
        try:
            headers = {k: v for k, v in request.headers.items() if k.lower() != "proxy-authorization"}
            upstream.request(method, urllib.parse.urlunsplit(("", "", url.path, url.query, "")), body, headers)
            answer = upstream.getresponse()
            request.send(answer.status, answer.read(), answer.getheader("Content-Type", "text/plain"))
        finally:
            upstream.close()

    def tunnel(self, request: _Handler) -> None:
        request.close_connection = True
        host, _, port = request.path.rpartition(":")
        try:
            upstream = socket.create_connection((self.hosts.get(host, host), int(port)), timeout=10)
        except OSError:
            return request.send(502, "cannot reach the target", "text/plain")
        with upstream:
            request.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            request.wfile.flush()
            ends = (request.connection, upstream)
            while not self.stopped.is_set():
                readable, _, _ = select.select(ends, [], [], 0.1)
                for end in readable:
                    try:
                        data = end.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    (upstream if end is request.connection else request.connection).sendall(data)


# --------------------------------------------------------------------------- the Worker's status


@dataclass
class Asked:
    path: str
    authorization: str | None
    user_agent: str | None


class EdgeStandin(Standin):
    """The reference Worker's status request (worker/status.js) as a site answers it: a GET of a
    path ending in the status path with `Authorization: Bearer <token>` gets the next of `answers`
    (the last one again once they run out), each a status as a dict, or (status, body, headers),
    or a function called then that gives one; any other request gets the site's own 404, as the
    Worker passes it on to the origin."""

    PATH = "/.well-known/lapi-kv-sync/status"

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token
        self.answers: list[Any] = []
        self.asked: list[Asked] = []

    def handle(self, request: _Handler, method: str) -> None:
        authorization = request.headers.get("Authorization")
        with self.lock:
            self.asked.append(Asked(request.path, authorization, request.headers.get("User-Agent")))
            allowed = method == "GET" and request.path.endswith(self.PATH) and authorization == f"Bearer {self.token}"
            answer = (self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]) if allowed else None
        if callable(answer):
            answer = answer()
        if answer is None:
            request.send(404, "<h1>Not Found</h1>", "text/html")
        elif isinstance(answer, dict):
            request.send(200, answer, headers={"Cache-Control": "no-store"})
        else:
            status, body, headers = answer
            request.send(status, body, "text/html", headers)
