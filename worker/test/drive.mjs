// Runs worker.js in workerd through Miniflare, as tests/test_worker.py asks, and prints what it saw.
// Input (JSON on stdin):
//   config:    { main, compatibilityDate, binding, vars } from wrangler.toml (main: relative to worker/)
//   keys:      [{ name, value, expiration?, metadata? }] loaded into the local KV namespace first
//   requests:  [{ url, address, method?, body?, headers?, cf? }] sent one after the other, with
//              CF-Connecting-IP: address (none when null) and cf merged into Miniflare's placeholder
//   steps:     [{ put?: keys, delete?: [name], failReads?: [name] | true, sleep?: seconds,
//                 requests?: [request] (one after the other), concurrent?: [request] (all at once) }]
//              run in order after `requests`, against the same Worker (one isolate, one module state)
//   brokenKv:  true: every KV read throws, as KV does in an outage
//   addresses: [text] run through the Worker's own canonicalAddress, in workerd
//   scopes:    [{ document, addresses?: [text], verdicts?: [{ address, cf, now }] }] each document
//              through scopes.js's buildTable, each address through canonicalAddress and matchRange,
//              each verdict through tableVerdict, in workerd
// Output (JSON on stdout):
//   responses: [{ status, headers, body, origin, reads }] for `requests` (reads: the KV keys read
//              while that request was in flight), steps: [{ responses, reads, seconds }] (reads: every
//              key read during the step; seconds: how long its requests took, sleep not included),
//              reads: every key read in the whole run, logs: [{ level, message }] the Worker's console,
//   canonical: [text | null],
//   scopes:    [{ skipped, matches: [{ ban, captcha } | null], verdicts: ["ban" | "captcha" | null] } | { error }]
import { readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { Miniflare } from "miniflare";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const input = JSON.parse(readFileSync(0, "utf8"));
const { config } = input;
const NAMESPACE = "decisions";
const ES_MODULES = [{ type: "ESModule", include: ["**/*.js"] }]; // package.json says "type": "module"

// Turnstile's siteverify, for the README's recipe: the token "good-token" passes.
async function siteverify(request) {
  const form = new URLSearchParams(await request.text());
  const success = form.get("response") === "good-token" && form.get("secret") === config.vars.TURNSTILE_SECRET;
  return Response.json({ success, remoteip: form.get("remoteip") });
}

// The origin behind the Worker: answers 200 and says what reached it.
async function origin(request) {
  if (request.url === "https://challenges.cloudflare.com/turnstile/v0/siteverify") return siteverify(request);
  const seen = { method: request.method, url: request.url, body: await request.text(), tag: request.headers.get("X-Tag") };
  return Response.json(seen, { headers: { "X-Origin": "reached" } });
}

// Every KV read the Worker makes goes through here first: counted, and failed on demand.
let failReads = input.brokenKv ? true : [];
let reads = [];
async function recordRead(request) {
  const key = await request.text();
  reads.push(key);
  return new Response(failReads === true || failReads.includes(key) ? "fail" : "ok");
}

// The Worker's KV binding: Miniflare's KV namespace behind a wrapper that reports each read to
// recordRead (wrapped bindings, see Miniflare's README).
const countingKv = {
  name: "counting-kv",
  modules: true,
  kvNamespaces: { INNER: NAMESPACE },
  serviceBindings: { READS: recordRead },
  script: `export default function (env) {
    return {
      async get(key, options) {
        const verdict = await env.READS.fetch("http://reads/", { method: "POST", body: key });
        if ((await verdict.text()) === "fail") throw new Error("KV GET failed: 503 Service Unavailable");
        return env.INNER.get(key, options);
      },
    };
  }`,
};

// The same namespace, bound plainly, for loading keys.
const loader = {
  name: "kv-loader",
  modules: true,
  script: "export default { fetch() { return new Response(null, { status: 404 }); } };",
  compatibilityDate: config.compatibilityDate,
  kvNamespaces: { DECISIONS: NAMESPACE },
};

function enforcer() {
  const main = resolve(root, config.main);
  return {
    name: "enforcer",
    modules: true,
    scriptPath: main, // its imports are found from here
    modulesRoot: dirname(main),
    modulesRules: ES_MODULES,
    compatibilityDate: config.compatibilityDate,
    bindings: config.vars,
    wrappedBindings: { [config.binding]: "counting-kv" },
    outboundService: origin,
  };
}

// A Worker that imports worker.js and scopes.js as modules and answers with their pure functions.
const harness = {
  name: "harness",
  modules: true,
  modulesRoot: root,
  modulesRules: ES_MODULES,
  scriptPath: join(root, "test/harness.js"),
  script: `import { canonicalAddress } from "../${config.main}";
import { buildTable, matchRange, tableVerdict } from "../scopes.js";
export default {
  async fetch(request) {
    const work = await request.json();
    if (new URL(request.url).pathname === "/canonical") return Response.json(work.map((text) => canonicalAddress(text)));
    return Response.json(
      work.map(({ document, addresses = [], verdicts = [] }) => {
        let table;
        try {
          table = buildTable(document);
        } catch (error) {
          return { error: String(error) };
        }
        return {
          skipped: table.skipped,
          matches: addresses.map((text) => {
            const address = canonicalAddress(text);
            return address === null ? "not an address" : matchRange(table, address);
          }),
          verdicts: verdicts.map(({ address, cf, now }) => tableVerdict(table, canonicalAddress(address), cf, now)),
        };
      }),
    );
  },
};`,
  compatibilityDate: config.compatibilityDate,
};

async function send(mf, { url, address, method = "GET", body, headers: extra = {}, cf }) {
  const headers = { "X-Tag": "from-client", ...extra, ...(address === null ? {} : { "CF-Connecting-IP": address }) };
  const response = await mf.dispatchFetch(url, { method, body, headers, redirect: "manual", cf });
  return {
    status: response.status,
    headers: Object.fromEntries(response.headers),
    body: await response.text(),
    origin: response.headers.get("X-Origin") === "reached",
  };
}

async function oneByOne(mf, requests) {
  const responses = [];
  for (const request of requests) {
    const before = reads.length;
    const response = await send(mf, request);
    responses.push({ ...response, reads: reads.slice(before) });
  }
  return responses;
}

async function step(mf, kv, { put = [], delete: names = [], failReads: fail, sleep: seconds, ...work }) {
  for (const { name, value, expiration, metadata } of put) {
    await kv.put(name, value, { expiration: expiration ?? undefined, metadata: metadata ?? undefined });
  }
  for (const name of names) await kv.delete(name);
  if (fail !== undefined) failReads = fail;
  if (seconds) await sleep(seconds * 1000);
  const [before, started] = [reads.length, performance.now()];
  const responses = [
    ...(await oneByOne(mf, work.requests ?? [])),
    ...(await Promise.all((work.concurrent ?? []).map((request) => send(mf, request)))),
  ];
  return { responses, reads: reads.slice(before), seconds: (performance.now() - started) / 1000 };
}

const logs = [];
// cf: false: requests carry Miniflare's placeholder cf (country US, asn 395747) plus their own,
// and nothing is fetched from the network.
const shared = { cf: false, handleStructuredLogs: ({ level, message }) => void logs.push({ level, message }) };
const output = { responses: [], steps: [], reads: [], canonical: [], scopes: [] };
if (input.requests?.length || input.steps?.length) {
  const mf = new Miniflare({ ...shared, workers: [enforcer(), countingKv, loader] });
  try {
    const kv = await mf.getKVNamespace("DECISIONS", "kv-loader");
    await step(mf, kv, { put: input.keys ?? [] });
    output.responses = await oneByOne(mf, input.requests ?? []);
    for (const work of input.steps ?? []) output.steps.push(await step(mf, kv, work));
    output.reads = reads; // all of them, background reads a step's window may have missed included
  } finally {
    await mf.dispose();
  }
}
if (input.addresses?.length || input.scopes?.length) {
  const mf = new Miniflare({ ...shared, workers: [harness] });
  try {
    for (const [path, work, into] of [
      ["/canonical", input.addresses, "canonical"],
      ["/scopes", input.scopes, "scopes"],
    ]) {
      if (!work?.length) continue;
      const response = await mf.dispatchFetch(`http://harness.test${path}`, { method: "POST", body: JSON.stringify(work) });
      if (!response.ok) throw new Error(`harness ${path}: ${response.status} ${await response.text()}`);
      output[into] = await response.json();
    }
  } finally {
    await mf.dispose();
  }
}
output.logs = logs;
process.stdout.write(JSON.stringify(output));
