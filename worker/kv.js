// The job's keys as the Worker reads them: their names under KV_KEY_PREFIX, how long an edge
// location may answer a read from its cache, and how long a request waits for a read. Shared by
// the address key (worker.js) and the tables (held.js).
import { wholeSetting } from "./settings.js";

const DEFAULT_PREFIX = "ip:"; // the job's KV_KEY_PREFIX default
// Seconds. KV refuses a cacheTtl under 30, and workerd one past 2^31 - 1: either way the read would
// throw and every request pass. Past a year, caching a decision means nothing more.
const CACHE_TTL = { fallback: 60, min: 30, max: 365 * 24 * 3600 };
// Milliseconds a request waits for a KV read: past it the request goes on as on a failed read. A
// read the edge has cached takes a few ms, one from KV's central stores tens to a few hundred.
// Not under 10 (that would switch most decisions off), not over 5 s (a request must not hang).
const KV_TIMEOUT_MS = { fallback: 300, min: 10, max: 5000, unit: "milliseconds" };

/** The name of a key the job writes: KV_KEY_PREFIX + `suffix` (an address, or a table's name). */
export function keyName(env, suffix) {
  return (env.KV_KEY_PREFIX ?? DEFAULT_PREFIX) + suffix;
}

/** How long an edge location may answer a read from its cache: CACHE_TTL, within what KV takes. */
export function cacheTtl(env) {
  return wholeSetting(env, "CACHE_TTL", CACHE_TTL);
}

/** How many milliseconds a request waits for a KV read: KV_TIMEOUT_MS, within what a request may wait. */
export function kvTimeoutMs(env) {
  return wholeSetting(env, "KV_TIMEOUT_MS", KV_TIMEOUT_MS);
}

/**
 * `reading` (a KV read, or work that waits on one), or a rejection once KV_TIMEOUT_MS has passed:
 * a request never waits longer for KV. The read itself goes on; only this wait for it ends.
 */
export function withinBound(reading, env) {
  const limit = kvTimeoutMs(env);
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer within KV_TIMEOUT_MS (${limit} ms)`)), limit);
  });
  return Promise.race([reading, late]).finally(() => clearTimeout(timer));
}

/**
 * A logger that says a problem once, not once per request or per read (a failing KV or a bad table
 * can last for hours): a line only when the problem differs from the last one said. `null` says
 * all is well again, so the same problem coming back later is said again.
 */
export function problemReporter() {
  let last = null;
  return (problem) => {
    if (problem !== null && problem !== last) console.error(problem);
    last = problem;
  };
}
