// Runs the Worker in workerd through Miniflare, as tests/test_worker.py asks, and prints what it saw.
// Input (JSON on stdin):
//   config:    { main, compatibilityDate, binding, vars } from wrangler.toml (main: relative to worker/)
//   keys:      [{ name, value, expiration?, metadata? }] loaded into the local KV namespace first
//   requests:  [{ url, address, method?, body?, headers?, passFrom? }] sent with CF-Connecting-IP: address
//              (none when null); passFrom: i sends the cookie the answer to request i set
//   brokenKv:  true binds a KV namespace whose every read throws
//   analytics: true binds an Analytics Engine dataset as METRICS (Miniflare's own, which drops the points)
//   addresses: [text] run through the Worker's own canonicalAddress, in workerd
//   pairs:     [[a, b]] of remediations, run through the Worker's own strongest, in workerd
// Output (JSON on stdout):
//   responses: [{ status, headers, body, origin, kv, points }]: kv, every call the Worker made on its
//              KV binding ([method, key]); points, every Analytics Engine data point it wrote
//   siteverify: [{ response, remoteip, secretOk, fields }]: what reached the Turnstile stand-in
//   logs:      [{ level, message }]: what the Worker logged
//   canonical: [text | null]; strongest: [remediation | null]
import { readdirSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
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
export default {
  async fetch(request, env, ctx) {
    const kv = [];
    const points = [];
    const observed = { ...env };
    observed[BINDING] = watched(env[BINDING], kv, (name, args) => [name, String(args[0])]);
    if (typeof env.METRICS === "object") {
      observed.METRICS = watched(env.METRICS, points, (name, args) => ({ call: name, point: args[0] }));
    }
    const response = await worker.fetch(request, observed, ctx);
    const seen = new Response(response.body, response);
    seen.headers.set("X-Test-KV", JSON.stringify(kv));
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

// A Worker that imports the Worker's main module and answers with its canonicalAddress of each
// text and its strongest of each pair.
const canonicalHarness = {
  name: "canonical",
  modulesRoot: root,
  modules: workerModules({
    type: "ESModule",
    path: join(root, "test/canonical-harness.js"),
    contents: `import { canonicalAddress, strongest } from "../${config.main}";
export default {
  async fetch(request) {
    const { texts, pairs } = await request.json();
    return Response.json({
      canonical: texts.map((text) => canonicalAddress(text)),
      strongest: pairs.map(([a, b]) => strongest(a, b)),
    });
  },
};`,
  }),
  compatibilityDate: config.compatibilityDate,
};

async function send(mf, { url, address, method = "GET", body, headers: extra = {}, passFrom }) {
  const headers = { "X-Tag": "from-client", ...extra, ...(address === null ? {} : { "CF-Connecting-IP": address }) };
  if (passFrom !== undefined) headers.Cookie = output.responses[passFrom].headers["set-cookie"].split(";")[0];
  const response = await mf.dispatchFetch(url, { method, body, headers, redirect: "manual" });
  const watched = (name) => (response.headers.has(name) ? JSON.parse(response.headers.get(name)) : null);
  const answer = {
    status: response.status,
    headers: Object.fromEntries(response.headers),
    body: await response.text(),
    origin: response.headers.get("X-Origin") === "reached",
    kv: watched("X-Test-KV"),
    points: watched("X-Test-Points"),
  };
  delete answer.headers["x-test-kv"];
  delete answer.headers["x-test-points"];
  return answer;
}

// What the Worker logged (console.*), kept off stdout, which carries the output.
const logs = [];
const logging = {
  structuredWorkerdLogs: true,
  handleStructuredLogs: ({ level, message }) => void logs.push({ level, message }),
};

const output = { responses: [], siteverify: siteverifyCalls, logs, canonical: [], strongest: [] };
if (input.requests?.length) {
  const mf = new Miniflare({ workers: enforcer(), ...logging });
  try {
    if (!input.brokenKv) {
      const kv = await mf.getKVNamespace(config.binding);
      for (const { name, value, expiration, metadata } of input.keys ?? []) {
        await kv.put(name, value, { expiration: expiration ?? undefined, metadata: metadata ?? undefined });
      }
    }
    for (const request of input.requests) output.responses.push(await send(mf, request));
  } finally {
    await mf.dispose();
  }
}
if (input.addresses?.length || input.pairs?.length) {
  const mf = new Miniflare({ workers: [canonicalHarness], ...logging });
  try {
    const response = await mf.dispatchFetch("http://canonical.test/", {
      method: "POST",
      body: JSON.stringify({ texts: input.addresses ?? [], pairs: input.pairs ?? [] }),
    });
    if (!response.ok) throw new Error(`canonical harness: ${response.status} ${await response.text()}`);
    Object.assign(output, await response.json());
  } finally {
    await mf.dispose();
  }
}
process.stdout.write(JSON.stringify(output));
