// Runs worker.js in workerd through Miniflare, as tests/test_worker.py asks, and prints what it saw.
// Input (JSON on stdin):
//   config:    { main, compatibilityDate, binding, vars } from wrangler.toml (main: relative to worker/)
//   keys:      [{ name, value, expiration?, metadata? }] loaded into the local KV namespace first
//   requests:  [{ url, address, method?, body?, headers? }] sent with CF-Connecting-IP: address (none when null)
//   brokenKv:  true binds a KV namespace whose every read throws
//   addresses: [text] run through the Worker's own canonicalAddress, in workerd
// Output (JSON on stdout): { responses: [{ status, headers, body, origin }], canonical: [text | null] }
import { readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { Miniflare } from "miniflare";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const input = JSON.parse(readFileSync(0, "utf8"));
const { config } = input;

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

// A KV binding whose every read fails, as KV does in an outage (wrapped binding, see Miniflare's README).
const brokenKvWorker = {
  name: "broken-kv",
  modules: true,
  script: `export default function () {
    return { async get() { throw new Error("KV GET failed: 503 Service Unavailable"); } };
  }`,
};

function enforcer() {
  const main = resolve(root, config.main);
  const worker = {
    name: "enforcer",
    modulesRoot: dirname(main),
    modules: [{ type: "ESModule", path: main }],
    compatibilityDate: config.compatibilityDate,
    bindings: config.vars,
    outboundService: origin,
  };
  if (input.brokenKv) return [{ ...worker, wrappedBindings: { [config.binding]: "broken-kv" } }, brokenKvWorker];
  return [{ ...worker, kvNamespaces: [config.binding] }];
}

// A Worker that imports worker.js as a module and answers with its canonicalAddress of each text.
const canonicalHarness = {
  name: "canonical",
  modulesRoot: root,
  modules: [
    {
      type: "ESModule",
      path: join(root, "test/canonical-harness.js"),
      contents: `import { canonicalAddress } from "../${config.main}";
export default {
  async fetch(request) {
    const texts = await request.json();
    return Response.json(texts.map((text) => canonicalAddress(text)));
  },
};`,
    },
    { type: "ESModule", path: join(root, config.main) },
  ],
  compatibilityDate: config.compatibilityDate,
};

async function send(mf, { url, address, method = "GET", body, headers: extra = {} }) {
  const headers = { "X-Tag": "from-client", ...extra, ...(address === null ? {} : { "CF-Connecting-IP": address }) };
  const response = await mf.dispatchFetch(url, { method, body, headers, redirect: "manual" });
  return {
    status: response.status,
    headers: Object.fromEntries(response.headers),
    body: await response.text(),
    origin: response.headers.get("X-Origin") === "reached",
  };
}

const output = { responses: [], canonical: [] };
if (input.requests?.length) {
  const mf = new Miniflare({ workers: enforcer() });
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
if (input.addresses?.length) {
  const mf = new Miniflare({ workers: [canonicalHarness] });
  try {
    const response = await mf.dispatchFetch("http://canonical.test/", {
      method: "POST",
      body: JSON.stringify(input.addresses),
    });
    if (!response.ok) throw new Error(`canonical harness: ${response.status} ${await response.text()}`);
    output.canonical = await response.json();
  } finally {
    await mf.dispose();
  }
}
process.stdout.write(JSON.stringify(output));
