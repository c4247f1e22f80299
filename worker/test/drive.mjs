// Runs the Worker in workerd through Miniflare, as tests/test_worker.py asks, and prints what it saw.
// Input (JSON on stdin):
//   config:    { main, compatibilityDate, binding, vars } from wrangler.toml (main: relative to worker/)
//   keys:      [{ name, value | base64, expiration?, metadata? }] loaded into the local KV namespace first
//              (base64: a binary value, such as the network table)
//   requests:  [{ url, address, method?, body?, headers?, passFrom?, cf?, cookieLines? }] sent with
//              CF-Connecting-IP: address (none when null; Miniflare then sets 127.0.0.1); passFrom: i
//              sends the cookie the answer to request i set; cf: merged into Miniflare's placeholder
//              (country US, asn 395747); cookieLines: [text] sent as that many Cookie header lines,
//              as a browser may (fetch would join them into one line with "; " first; workerd joins
//              separate lines with ", "), over plain HTTP to Miniflare, without cf
//   steps:     [{ put?: keys, delete?: [name], failReads?: [name], slowReads?: {name: seconds},
//                 sleep?: seconds, requests?: [request] (one after the other), concurrent?: [request] (all at once) }]
//              run in order after `requests`, against the same Worker (one isolate, one module state);
//              failReads: from then on, a read of one of these keys throws; slowReads: from then on, a
//              read of one of these keys answers that many seconds late
//   brokenKv:  true binds a KV namespace whose every read throws
//   analytics: true binds an Analytics Engine dataset as METRICS (Miniflare's own, which drops the points)
//   addresses: [text] run through the Worker's own canonicalAddress, in workerd
//   pairs:     [[a, b]] of remediations, run through the Worker's own strongest, in workerd
//   scopes:    [{ document, verdicts?: [{ cf, now }] }] each document through scopes.js's buildTable,
//              each verdict through tableVerdict, in workerd
//   networks:  [{ base64, addresses: [text], now }] each table put in KV and read back as an ArrayBuffer
//              (as held.js reads a table), mapped by networks.js's mapNetworks, each address through
//              canonicalAddress, networkEnds and networkVerdict at `now`, in workerd
// Output (JSON on stdout):
//   responses: [{ status, headers, body, origin, kv, pending, points }]: kv, every call the Worker made
//              on its KV binding ([method, key]), the background reads it started included; pending,
//              how many of those had not settled when its response came back; points, every
//              Analytics Engine data point it wrote
//   steps:     [{ responses, seconds }]: seconds, how long the step's requests took (sleep not included)
//   siteverify: [{ response, remoteip, secretOk, fields }]: what reached the Turnstile stand-in
//   logs:      [{ level, message }]: what the Worker logged
//   canonical: [text | null]; strongest: [remediation | null]
//   scopes:    [{ skipped, ranges, verdicts: [remediation | null] } | { error }]
//   networks:  [{ ends: [{ ban, captcha } | null | "not an address"], verdicts: [remediation | null] } | { error }]
import { readdirSync, readFileSync } from "node:fs";
import { request as httpRequest } from "node:http";
import { dirname, join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { Miniflare } from "miniflare";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const input = JSON.parse(readFileSync(0, "utf8"));
const { config } = input;
const SITEVERIFY = "https://challenges.cloudflare.com/turnstile/v0/siteverify";

// Turnstile's siteverify, stood in for: the token says how it answers ("solved:<host name>", ...).
const siteverifyCalls = [];
async function siteverify(request) {
  const form = new URLSearchParams(await request.text());
  const token = form.get("response") ?? "";
  const secretOk = form.get("secret") === config.vars.TURNSTILE_SECRET_KEY;
  siteverifyCalls.push({ response: token, remoteip: form.get("remoteip"), secretOk, fields: [...form.keys()] });
  const [kind, hostname = ""] = token.split("|");
  const solved = { success: true, "error-codes": [], challenge_ts: new Date().toISOString(), hostname, action: "" };
  if (!secretOk) return Response.json({ success: false, "error-codes": ["invalid-input-secret"] });
  if (request.url.endsWith("?again")) return Response.json(solved); // where "redirect" sends it
  switch (kind) {
    case "solved":
      return Response.json(solved);
    case "down":
      throw new Error("siteverify stand-in: connection refused");
    case "5xx":
      return new Response("<h1>502 Bad Gateway</h1>", { status: 502, headers: { "Content-Type": "text/html" } });
    case "redirect": // elsewhere, where the same question would pass
      return Response.redirect(`${SITEVERIFY}?again`, 307);
    case "junk":
      return new Response("<html>not JSON</html>", { headers: { "Content-Type": "application/json" } });
    case "truthy": // "true" is not true
      return Response.json({ ...solved, success: "true" });
    case "huge": // a success, buried in a megabyte
      return Response.json({ ...solved, padding: "x".repeat(1 << 20) });
    case "slow": // a success, a minute late
      await new Promise((resolve) => setTimeout(resolve, 60_000).unref());
      return Response.json(solved);
    case "stall": // the headers at once, then half a body that never ends
      return new Response(
        new ReadableStream({ start: (c) => c.enqueue(new TextEncoder().encode('{"success":true,')) }),
        { headers: { "Content-Type": "application/json" } },
      );
    default:
      return Response.json({ success: false, "error-codes": ["invalid-input-response"] });
  }
}

// The origin behind the Worker: answers 200 and says what reached it.
async function origin(request) {
  if (request.url.startsWith(SITEVERIFY)) return siteverify(request);
  const seen = { method: request.method, url: request.url, body: await request.text(), tag: request.headers.get("X-Tag") };
  return Response.json(seen, { headers: { "X-Origin": "reached" } });
}

// A KV binding whose every read fails, as KV does in an outage (wrapped binding, see Miniflare's README).
const brokenKvWorker = {
  name: "broken-kv",
  modules: true,
  script: `export default function () {
    return { async get() { throw new Error("KV GET failed: 503 Service Unavailable"); } };
  }`,
};

// The Worker's own modules (worker/*.js), and a first module of the test's that imports its main.
function workerModules(harness) {
  const own = readdirSync(root).filter((name) => name.endsWith(".js"));
  return [harness, ...own.map((name) => ({ type: "ESModule", path: join(root, name) }))];
}

// Runs the Worker's fetch with its KV and Analytics Engine bindings watched: every call it makes on
// them is recorded (a write would show here as surely as a read) and sent back in two headers.
const enforcerHarness = {
  type: "ESModule",
  path: join(root, "test/enforcer-harness.js"),
  contents: `import worker from "../${config.main}";
const BINDING = ${JSON.stringify(config.binding)};
function watched(binding, calls, record) {
  return new Proxy(binding, {
    get(target, name) {
      const value = Reflect.get(target, name);
      if (typeof value !== "function") return value;
      return (...args) => {
        calls.push(record(String(name), args));
        return value.apply(target, args);
      };
    },
  });
}
// Set by the test through /__faults: keys whose reads throw, as in a KV outage, and keys whose
// reads answer late ({key: seconds}).
let failReads = [];
let slowReads = {};
function failing(binding) {
  return new Proxy(binding, {
    get(target, name) {
      const value = Reflect.get(target, name);
      if (name !== "get") return typeof value === "function" ? value.bind(target) : value;
      return async (key, ...rest) => {
        if (failReads.includes(key)) throw new Error("KV GET failed: 503 Service Unavailable");
        if (slowReads[key]) await new Promise((resolve) => setTimeout(resolve, slowReads[key] * 1000));
        return value.call(target, key, ...rest);
      };
    },
  });
}
// Counts the calls on a binding that have not settled yet.
function counted(binding, calls) {
  return new Proxy(binding, {
    get(target, name) {
      const value = Reflect.get(target, name);
      if (typeof value !== "function") return value;
      return (...args) => {
        calls.pending++;
        return Promise.resolve(value.apply(target, args)).finally(() => calls.pending--);
      };
    },
  });
}
export default {
  async fetch(request, env, ctx) {
    if (request.url === "http://drive.test/__faults") {
      ({ failReads = failReads, slowReads = slowReads } = await request.json());
      return new Response(null, { status: 204 });
    }
    const kv = [];
    const calls = { pending: 0 };
    const points = [];
    const observed = { ...env };
    observed[BINDING] = watched(counted(failing(env[BINDING]), calls), kv, (name, args) => [name, String(args[0])]);
    if (typeof env.METRICS === "object") {
      observed.METRICS = watched(env.METRICS, points, (name, args) => ({ call: name, point: args[0] }));
    }
    const response = await worker.fetch(request, observed, ctx);
    const seen = new Response(response.body, response);
    seen.headers.set("X-Test-KV", JSON.stringify(kv));
    seen.headers.set("X-Test-KV-Pending", String(calls.pending));
    seen.headers.set("X-Test-Points", JSON.stringify(points));
    return seen;
  },
};`,
};

function enforcer() {
  const worker = {
    name: "enforcer",
    modulesRoot: root,
    modules: workerModules(enforcerHarness),
    compatibilityDate: config.compatibilityDate,
    bindings: config.vars,
    outboundService: origin,
    ...(input.analytics ? { analyticsEngineDatasets: { METRICS: { dataset: "crowdsec_worker" } } } : {}),
  };
  if (input.brokenKv) return [{ ...worker, wrappedBindings: { [config.binding]: "broken-kv" } }, brokenKvWorker];
  return [{ ...worker, kvNamespaces: [config.binding] }];
}

// A Worker that imports the Worker's modules and answers with its canonicalAddress of each text, its
// strongest of each pair, the scope table's pure functions on each document, and the network table's
// on each table, read back from KV as the Worker reads it (an ArrayBuffer).
const canonicalHarness = {
  name: "canonical",
  modulesRoot: root,
  modules: workerModules({
    type: "ESModule",
    path: join(root, "test/canonical-harness.js"),
    contents: `import { canonicalAddress, strongest } from "../${config.main}";
import { buildTable, tableVerdict } from "../scopes.js";
import { mapNetworks, networkEnds, networkVerdict } from "../networks.js";
function scopes({ document, verdicts = [] }) {
  let table;
  try {
    table = buildTable(document);
  } catch (error) {
    return { error: String(error) };
  }
  return {
    skipped: table.skipped,
    ranges: table.ranges,
    verdicts: verdicts.map(({ cf, now }) => tableVerdict(table, cf, now)),
  };
}
async function networks(kv, { base64, addresses = [], now = 0 }) {
  await kv.put("networks-under-test", Uint8Array.from(atob(base64), (c) => c.charCodeAt(0)));
  let table;
  try {
    table = mapNetworks(await kv.get("networks-under-test", { type: "arrayBuffer" }));
  } catch (error) {
    return { error: String(error) };
  }
  const canonical = addresses.map((text) => canonicalAddress(text));
  return {
    ends: canonical.map((address) => (address === null ? "not an address" : networkEnds(table, address))),
    verdicts: canonical.map((address) => (address === null ? null : networkVerdict(table, address, now))),
  };
}
export default {
  async fetch(request, env) {
    const { texts, pairs, documents, tables } = await request.json();
    const mapped = [];
    for (const table of tables) mapped.push(await networks(env[${JSON.stringify(config.binding)}], table));
    return Response.json({
      canonical: texts.map((text) => canonicalAddress(text)),
      strongest: pairs.map(([a, b]) => strongest(a, b)),
      scopes: documents.map(scopes),
      networks: mapped,
    });
  },
};`,
  }),
  compatibilityDate: config.compatibilityDate,
  kvNamespaces: [config.binding],
};

async function send(mf, { url, address, method = "GET", body, headers: extra = {}, passFrom, cf, cookieLines }) {
  const headers = { "X-Tag": "from-client", ...extra, ...(address === null ? {} : { "CF-Connecting-IP": address }) };
  if (passFrom !== undefined) headers.Cookie = output.responses[passFrom].headers["set-cookie"].split(";")[0];
  if (cookieLines !== undefined) return sendLines(mf, { url, method, body, headers, cookieLines });
  const response = await mf.dispatchFetch(url, { method, body, headers, redirect: "manual", cf });
  return answerSeen(response.status, Object.fromEntries(response.headers), await response.text());
}

// A request with its own header lines, as the client wrote them, to Miniflare's own address: its
// entry point takes the URL the Worker sees from MF-Original-URL, as for dispatchFetch.
async function sendLines(mf, { url, method, body, headers, cookieLines }) {
  const listening = await mf.ready;
  const lines = ["Host", listening.host, "MF-Original-URL", url, ...Object.entries(headers).flat()];
  for (const line of cookieLines) lines.push("Cookie", line);
  if (body !== undefined) lines.push("Content-Length", String(Buffer.byteLength(body)));
  const path = new URL(url).pathname + new URL(url).search;
  return new Promise((resolve, reject) => {
    const asked = httpRequest(listening, { method, path, headers: lines }, (answer) => {
      const chunks = [];
      answer.on("data", (chunk) => chunks.push(chunk));
      answer.on("error", reject);
      answer.on("end", () => {
        const seen = Object.fromEntries(
          Object.entries(answer.headers).map(([name, value]) => [name, [value].flat().join(", ")]),
        );
        resolve(answerSeen(answer.statusCode, seen, Buffer.concat(chunks).toString("utf8")));
      });
    });
    asked.on("error", reject);
    asked.end(body);
  });
}

function answerSeen(status, headers, body) {
  const watched = (name) => (name in headers ? JSON.parse(headers[name]) : null);
  const answer = {
    status,
    headers,
    body,
    origin: headers["x-origin"] === "reached",
    kv: watched("x-test-kv"),
    pending: watched("x-test-kv-pending"),
    points: watched("x-test-points"),
  };
  for (const name of ["x-test-kv", "x-test-kv-pending", "x-test-points"]) delete answer.headers[name];
  return answer;
}

async function put(kv, keys) {
  for (const { name, value, base64, expiration, metadata } of keys) {
    const bytes = base64 === undefined ? value : Uint8Array.from(Buffer.from(base64, "base64")); // not a pooled Buffer
    await kv.put(name, bytes, { expiration: expiration ?? undefined, metadata: metadata ?? undefined });
  }
}

async function step(mf, kv, { put: keys = [], delete: names = [], failReads, slowReads, sleep: seconds, ...work }) {
  await put(kv, keys);
  for (const name of names) await kv.delete(name);
  if (failReads || slowReads) {
    const faults = JSON.stringify({ failReads, slowReads });
    await mf.dispatchFetch("http://drive.test/__faults", { method: "POST", body: faults });
  }
  if (seconds) await sleep(seconds * 1000);
  const started = performance.now();
  const responses = [];
  for (const request of work.requests ?? []) responses.push(await send(mf, request));
  responses.push(...(await Promise.all((work.concurrent ?? []).map((request) => send(mf, request)))));
  return { responses, seconds: (performance.now() - started) / 1000 };
}

// What the Worker logged (console.*), kept off stdout, which carries the output. cf: false: requests
// carry Miniflare's placeholder cf plus their own, and nothing is fetched from the network for it.
const logs = [];
const logging = {
  cf: false,
  structuredWorkerdLogs: true,
  handleStructuredLogs: ({ level, message }) => void logs.push({ level, message }),
};

const output = { responses: [], steps: [], siteverify: siteverifyCalls, logs };
Object.assign(output, { canonical: [], strongest: [], scopes: [], networks: [] });
if (input.requests?.length || input.steps?.length) {
  const mf = new Miniflare({ workers: enforcer(), ...logging });
  try {
    const kv = input.brokenKv ? null : await mf.getKVNamespace(config.binding);
    if (kv) await put(kv, input.keys ?? []);
    for (const request of input.requests ?? []) output.responses.push(await send(mf, request));
    for (const work of input.steps ?? []) output.steps.push(await step(mf, kv, work));
  } finally {
    await mf.dispose();
  }
}
if (input.addresses?.length || input.pairs?.length || input.scopes?.length || input.networks?.length) {
  const mf = new Miniflare({ workers: [canonicalHarness], ...logging });
  try {
    const response = await mf.dispatchFetch("http://canonical.test/", {
      method: "POST",
      body: JSON.stringify({
        texts: input.addresses ?? [],
        pairs: input.pairs ?? [],
        documents: input.scopes ?? [],
        tables: input.networks ?? [],
      }),
    });
    if (!response.ok) throw new Error(`canonical harness: ${response.status} ${await response.text()}`);
    Object.assign(output, await response.json());
  } finally {
    await mf.dispose();
  }
}
process.stdout.write(JSON.stringify(output));
