// What the Worker's tables cost in workerd (Miniflare): run by bench/worker_tables.py, which builds
// the tables with the job's own functions and says what to measure (JSON on stdin). Prints JSON.
//
// One workerd process holds every Worker measured, each its own isolate, so a Worker's first
// request is a cold isolate's (modules are compiled when workerd loads them, before any request).
// CPU is workerd's own: the nanoseconds its threads spent on a CPU (/proc/<pid>/task/*/schedstat)
// over one request, the process otherwise idle, requests one at a time. Wall is the request as
// Node's dispatchFetch sees it. Inside an isolate performance.now() advances with the work in local
// workerd (not on Cloudflare), to the millisecond: the in-isolate figures are over many repetitions.
import { readdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const input = JSON.parse(readFileSync(0, "utf8"));
const { worker: root, legacy, variants, reps, warm, loads, lookups } = input;
const { Miniflare } = await import(pathToFileURL(createRequire(join(root, "package.json")).resolve("miniflare")));

// ------------------------------------------------------------------------------------ the clocks

function workerdPid() {
  for (const entry of readdirSync("/proc")) {
    if (!/^[0-9]+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, "utf8");
      const [, comm, rest] = /^\d+ \((.*)\) (.*)$/s.exec(stat);
      if (comm.startsWith("workerd") && Number(rest.split(" ")[1]) === process.pid) return Number(entry);
    } catch {
      // gone meanwhile
    }
  }
  throw new Error("no workerd process under this one");
}

let pid;
function cpuNs() {
  let total = 0;
  for (const task of readdirSync(`/proc/${pid}/task`)) {
    try {
      total += Number(readFileSync(`/proc/${pid}/task/${task}/schedstat`, "utf8").split(" ")[0]);
    } catch {
      // a thread that ended meanwhile
    }
  }
  return total;
}

async function measured(fetcher, url, init) {
  const [cpu, wall] = [cpuNs(), performance.now()];
  const response = await fetcher.fetch(url, init);
  const body = await response.text();
  const spent = { cpuMs: (cpuNs() - cpu) / 1e6, wallMs: performance.now() - wall };
  if (!response.ok) throw new Error(`${url}: ${response.status} ${body.slice(0, 400)}`);
  return { ...spent, body: body.startsWith("{") ? JSON.parse(body) : body };
}

// ------------------------------------------------------------------------------------ the Workers

function modulesOf(folder, extra = []) {
  const own = readdirSync(folder).filter((name) => name.endsWith(".js"));
  return [...extra, ...own.map((name) => ({ type: "ESModule", path: join(folder, name) }))];
}

// Runs the Worker's fetch with an origin that answers at once (no network).
const enforcer = (folder) => ({
  type: "ESModule",
  path: join(folder, "bench-enforcer.js"),
  contents: `import worker from "./worker.js";
export default { fetch: (request, env, ctx) => worker.fetch(request, env, ctx) };`,
});

// Loads a table `reps` times in one request (the work a read bringing a new table costs the
// isolate: the KV get, then mapNetworks, or JSON.parse and buildTable), and looks addresses up.
const tableHarness = (folder, kind) => ({
  type: "ESModule",
  path: join(folder, "bench-tables.js"),
  contents:
    kind === "networks"
      ? `import { mapNetworks, networkVerdict } from "./networks.js";
const read = (env, key) => env.DECISIONS.get(key, { type: "arrayBuffer" });
const use = (value) => mapNetworks(value);
const look = (table, address, now) => networkVerdict(table, address, now);
${harnessBody}`
      : `import { buildTable, tableVerdict } from "./scopes.js";
const read = (env, key) => env.DECISIONS.get(key, { type: "text" });
const use = (value) => buildTable(JSON.parse(value));
const look = (table, address, now) => tableVerdict(table, address, null, now);
${harnessBody}`,
});

const harnessBody = `export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    const key = url.searchParams.get("key");
    const reps = Number(url.searchParams.get("reps"));
    if (url.pathname === "/load") {
      const started = performance.now();
      for (let i = 0; i < reps; i++) use(await read(env, key));
      return Response.json({ ms: performance.now() - started });
    }
    if (url.pathname === "/use") {
      const value = await read(env, key);
      const started = performance.now();
      for (let i = 0; i < reps; i++) use(value);
      return Response.json({ ms: performance.now() - started });
    }
    // /lookup: the table loaded, then n lookups of the addresses given (n = 0: the same work
    // without the lookups, to subtract)
    const { addresses } = await request.json();
    const table = use(await read(env, key));
    const n = Number(url.searchParams.get("n"));
    const now = Date.now() / 1000;
    let found = 0;
    const started = performance.now();
    for (let i = 0; i < n; i++) if (look(table, addresses[i % addresses.length], now) !== null) found++;
    return Response.json({ ms: performance.now() - started, found });
  },
};`;

const workers = [];
for (const variant of variants) {
  const folder = variant.kind === "legacy" ? legacy : root;
  const vars = { KV_KEY_PREFIX: `${variant.name}:`, CACHE_TTL: "60", SCOPES_REFRESH: "60" };
  for (let i = 0; i < reps; i++) {
    workers.push({
      name: `${variant.name}-cold-${i}`,
      modulesRoot: folder,
      modules: modulesOf(folder, [enforcer(folder)]),
      compatibilityDate: input.compatibilityDate,
      kvNamespaces: { DECISIONS: "bench" },
      bindings: vars,
      outboundService: () => new Response("origin"),
    });
  }
  workers.push({
    name: `${variant.name}-tables`,
    modulesRoot: folder,
    modules: modulesOf(folder, [tableHarness(folder, variant.kind === "legacy" ? "legacy" : "networks")]),
    compatibilityDate: input.compatibilityDate,
    kvNamespaces: { DECISIONS: "bench" },
    bindings: vars,
  });
}

const mf = new Miniflare({ workers, cf: false });
const output = { cold: {}, warm: {}, load: {}, use: {}, lookup: {} };
try {
  const kv = await mf.getKVNamespace("DECISIONS", workers[0].name);
  for (const variant of variants) {
    const value = readFileSync(variant.file);
    await kv.put(`${variant.name}:${variant.key}`, variant.kind === "legacy" ? value.toString("utf8") : Uint8Array.from(value));
  }
  pid = workerdPid();
  const request = (address) => ({ headers: { "CF-Connecting-IP": address } });

  // Cold, then warm: the first request of each isolate reads the tables (the empty variant
  // finds no table); the ones after use the copy held. Variants interleaved, so that drift in
  // the machine's load falls on all alike.
  for (let i = 0; i < reps; i++) {
    for (const variant of variants) {
      const worker = await mf.getWorker(`${variant.name}-cold-${i}`);
      (output.cold[variant.name] ??= []).push(await measured(worker, "http://site.test/", request("10.9.8.7")));
      for (let j = 0; j < warm; j++) {
        const spent = await measured(worker, "http://site.test/", request(`10.9.${j % 250}.7`));
        (output.warm[variant.name] ??= []).push(spent);
      }
    }
  }
  // A table loaded `loads` times in one request, against the same request loading it once: the
  // difference over (loads - 1) is one load's CPU, the isolate's and the KV simulator's together.
  for (let i = 0; i < reps; i++) {
    for (const variant of variants) {
      const worker = await mf.getWorker(`${variant.name}-tables`);
      const url = (n) => `http://bench.test/load?key=${encodeURIComponent(`${variant.name}:${variant.key}`)}&reps=${n}`;
      const once = await measured(worker, url(1));
      const many = await measured(worker, url(loads));
      (output.load[variant.name] ??= []).push({
        cpuMs: (many.cpuMs - once.cpuMs) / (loads - 1),
        wallMs: (many.wallMs - once.wallMs) / (loads - 1),
        isolateMs: (many.body.ms - once.body.ms) / (loads - 1),
      });
    }
  }
  // What the Worker does with the value once read, alone: mapNetworks (views over the bytes), or
  // JSON.parse and buildTable; `uses` times against once in one request, per use.
  for (let i = 0; i < reps; i++) {
    for (const variant of variants) {
      const worker = await mf.getWorker(`${variant.name}-tables`);
      const uses = variant.kind === "legacy" ? 3 : 1000;
      const url = (n) => `http://bench.test/use?key=${encodeURIComponent(`${variant.name}:${variant.key}`)}&reps=${n}`;
      const once = await measured(worker, url(1));
      const many = await measured(worker, url(uses));
      (output.use[variant.name] ??= []).push({
        cpuMs: (many.cpuMs - once.cpuMs) / (uses - 1),
        isolateMs: (many.body.ms - once.body.ms) / (uses - 1),
      });
    }
  }
  // Lookups: n against 0 in the same setting, per lookup.
  for (const { variant: name, family, addresses, n } of lookups) {
    const variant = variants.find((v) => v.name === name);
    const worker = await mf.getWorker(`${variant.name}-tables`);
    const body = JSON.stringify({ addresses });
    const url = (count) => `http://bench.test/lookup?key=${encodeURIComponent(`${variant.name}:${variant.key}`)}&n=${count}`;
    for (let i = 0; i < reps; i++) {
      const none = await measured(worker, url(0), { method: "POST", body });
      const all = await measured(worker, url(n), { method: "POST", body });
      (output.lookup[`${name} IPv${family}`] ??= []).push({
        cpuUs: ((all.cpuMs - none.cpuMs) * 1000) / n,
        isolateUs: (all.body.ms * 1000) / n,
        found: all.body.found / n,
      });
    }
  }
} finally {
  await mf.dispose();
}
process.stdout.write(JSON.stringify(output));
