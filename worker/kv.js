// The job's keys as the Worker reads them: their names under KV_KEY_PREFIX, and how long an edge
// location may answer a read from its cache. Shared by the address lookup and the scope table.

const DEFAULT_PREFIX = "ip:"; // the job's KV_KEY_PREFIX default
const DEFAULT_CACHE_TTL = 60; // seconds; Cloudflare's own default for a KV read
const MIN_CACHE_TTL = 30; // KV refuses a smaller cacheTtl: the read would throw and every request pass

/** The name of a key the job writes: KV_KEY_PREFIX + `suffix` (an address, or the table's name). */
export function keyName(env, suffix) {
  return (env.KV_KEY_PREFIX ?? DEFAULT_PREFIX) + suffix;
}

/** How long an edge location may answer a read from its cache: CACHE_TTL, at least KV's minimum. */
export function cacheTtl(env) {
  return Math.max(MIN_CACHE_TTL, Number(env.CACHE_TTL) || DEFAULT_CACHE_TTL);
}
