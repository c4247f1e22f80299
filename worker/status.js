// The status request: what this isolate sees, for the operator (and the job's --check-edge) to
// compare with what the job wrote: its version, the prefix it reads, whether its KV binding
// reads, each table's entries, digest, size and age, and the settings that decide what it
// enforces. GET <any path ending in STATUS_PATH> with `Authorization: Bearer <STATUS_TOKEN>`.
//
// Without the token nothing is answered here: a request on the path with no STATUS_TOKEN set (or
// one too short), no token, a wrong one, or another method, goes on as any request does (the
// origin answers it, its own 404 for a path it does not have), so nobody without the token can
// tell the path from any other, nor whether the feature is on (worker/README.md).
import { networkTable } from "./networks.js";
import { scopesRefresh } from "./held.js";
import { cacheTtl, keyName, kvTimeoutMs, withinBound } from "./kv.js";
import { scopeTable } from "./scopes.js";
import { flagSetting, warnOnce } from "./settings.js";

/** The job's __version__ (lapi_kv_sync.py): the two halves are released together, a test keeps them equal. */
export const WORKER_VERSION = "0.2.0";
/** Where the status is asked for: at the end of any path on the Worker's routes (a route may cover /app/* only). */
export const STATUS_PATH = "/.well-known/lapi-kv-sync/status";
// Shorter, a token invites guessing; `openssl rand -hex 32` makes one of 64 characters.
const MIN_STATUS_TOKEN_LENGTH = 32;
// The key the probe reads: under the prefix, never an address nor a table, so never written.
const PROBE_KEY = "status-probe";
const BEARER = /^Bearer +(\S+) *$/i;

/** Whether a request is on the status path: the one thing every request pays for this feature. */
export function onStatusPath(url) {
  return url.pathname.endsWith(STATUS_PATH);
}

/**
 * The status answer (200, JSON, no-store) for a GET holding the token, or null for anything
 * else: the request then goes on as any request does.
 */
export async function statusAnswer(request, env, ctx) {
  if (request.method !== "GET" || !(await holdsStatusToken(request, env))) return null;
  const [kv, networks, scopes] = await Promise.all([
    probe(env),
    // Entries: the network table's intervals of each family (one ban end each), the scope table's names.
    tableStatus(networkTable, env, ctx, (table) => ({ v4: table.v4.ban.length, v6: table.v6.ban.length })),
    tableStatus(scopeTable, env, ctx, (table) => ({ country: table.country.size, as: table.as.size })),
  ]);
  const status = {
    version: WORKER_VERSION,
    prefix: keyName(env, ""),
    kv,
    tables: { networks, scopes },
    settings: {
      ADDRESS_KEYS: flagSetting(env, "ADDRESS_KEYS", true),
      CACHE_TTL: cacheTtl(env),
      SCOPES_REFRESH: scopesRefresh(env),
      KV_TIMEOUT_MS: kvTimeoutMs(env),
      LOG_ONLY: flagSetting(env, "LOG_ONLY", false),
    },
  };
  return Response.json(status, { headers: { "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff" } });
}

// The Authorization header names STATUS_TOKEN, compared in constant time: both sides signed with
// a key of this isolate's, and the signatures compared by crypto.subtle.verify (as captcha.js
// checks passes), so neither where a wrong token differs nor its length shows in the time taken.
async function holdsStatusToken(request, env) {
  const expected = String(env.STATUS_TOKEN ?? "").trim();
  if (expected === "") return false;
  if (expected.length < MIN_STATUS_TOKEN_LENGTH) {
    const needed = `${MIN_STATUS_TOKEN_LENGTH} or more, random`;
    warnOnce(`STATUS_TOKEN has ${expected.length} characters: status requests are off until it has ${needed}`);
    return false;
  }
  const presented = BEARER.exec(request.headers.get("Authorization") ?? "");
  if (presented === null) return false;
  const key = await comparisonKey();
  const signature = await crypto.subtle.sign("HMAC", key, encoded(expected));
  return crypto.subtle.verify("HMAC", key, signature, encoded(presented[1]));
}

let comparing = null; // one key per isolate, made on its first status request
function comparisonKey() {
  comparing ??= crypto.subtle.generateKey({ name: "HMAC", hash: "SHA-256" }, false, ["sign", "verify"]);
  return comparing;
}

// Whether the KV binding reads now: one read of a key that does not exist, bounded as a request's.
async function probe(env) {
  if (typeof env.DECISIONS?.get !== "function") return { reads: false, problem: "no KV namespace bound as DECISIONS" };
  try {
    await withinBound(env.DECISIONS.get(keyName(env, PROBE_KEY)), env);
    return { reads: true, problem: null };
  } catch (error) {
    return { reads: false, problem: String(error?.message ?? error).slice(0, 300) };
  }
}

// A table as this isolate holds it, a due refresh waited for (at most KV_TIMEOUT_MS): its digest
// is the job's (the first 32 hex digits of the SHA-256 of the value, as its metadata's `digest`),
// null when KV holds no such key or it was never read; age: seconds since it was last read good.
async function tableStatus(table, env, ctx, entries) {
  const { copy, value, gotAt, problem } = await table.held(env, ctx);
  const bytes = value === null ? null : typeof value === "string" ? encoded(value) : new Uint8Array(value);
  return {
    digest: bytes === null ? null : await digest(bytes),
    bytes: bytes === null ? 0 : bytes.byteLength,
    entries: entries(copy),
    age: gotAt === null ? null : Math.max(0, Math.floor((Date.now() - gotAt) / 1000)),
    problem: problem === null ? null : String(problem).slice(0, 300),
  };
}

function encoded(text) {
  return new TextEncoder().encode(text);
}

async function digest(bytes) {
  const hash = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(hash.subarray(0, 16), (byte) => byte.toString(16).padStart(2, "0")).join("");
}
