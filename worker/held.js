// A document under the prefix that every request consults (the scope table, the network table),
// held in memory by each isolate: read at most once per SCOPES_REFRESH seconds, one read shared by
// the requests that arrive meanwhile, the last good copy kept when a read fails or brings
// something unusable, each problem logged once. Module state lives as long as the isolate.
import { cacheTtl, keyName, problemReporter, withinBound } from "./kv.js";
import { wholeSetting } from "./settings.js";

// Seconds between two reads in one isolate: past an hour, a decision could come and go unseen.
const SCOPES_REFRESH = { fallback: 60, min: 1, max: 3600 };
// A read still unsettled after this long is taken as lost (a request's waitUntil ends 30 s after
// its response, and what it was waiting for may then never settle): the next refresh reads again.
const READ_LOST_AFTER_MS = 30_000;

/** Seconds an isolate keeps a table before it reads it again: SCOPES_REFRESH, clamped. */
export function scopesRefresh(env) {
  return wholeSetting(env, "SCOPES_REFRESH", SCOPES_REFRESH);
}

/**
 * The copy an isolate holds of `<KV_KEY_PREFIX><name>`, as a function of (env, ctx) that never
 * throws and never keeps a request waiting past KV_TIMEOUT_MS:
 * - `type`: how KV returns the value ("text", "arrayBuffer");
 * - `use(value)`: what requests consult, made from the value; throws when the value is unusable;
 * - `empty`: what they consult when there is no key (the job deletes a document left empty), and
 *   before the first good read;
 * - `remark(copy)`: a problem worth a log line in a usable copy, or null.
 * Once a copy is held (or a read has failed), requests use it at once and a refresh runs in the
 * background; a cold isolate's requests wait for the first read, each at most KV_TIMEOUT_MS.
 */
export function heldDocument({ name, label, type, use, empty, remark = () => null }) {
  // gotAt: when the copy held was last read good (null: never); problem: the last read's, or null.
  const held = { copy: empty, value: null, loaded: false, readAt: -Infinity, reading: null, generation: 0 };
  Object.assign(held, { gotAt: null, problem: null });
  const report = problemReporter();
  const note = (problem) => report((held.problem = problem));

  async function read(env, generation) {
    try {
      const value = await env.DECISIONS.get(keyName(env, name), { type, cacheTtl: cacheTtl(env) });
      if (generation !== held.generation) return; // taken as lost meanwhile: a newer read decides
      // The same text as the copy held (most refreshes of a JSON document): nothing to redo.
      if (value !== held.value) [held.copy, held.value] = [value === null ? empty : use(value), value];
      held.gotAt = Date.now();
      note(remark(held.copy));
    } catch (error) {
      note(`${label} unusable, the last good copy (if any) kept: ${error}`);
    }
    held.loaded = true;
  }

  async function current(env, ctx) {
    const now = Date.now();
    const due = now - held.readAt >= scopesRefresh(env) * 1000;
    if (due && (held.reading === null || now - held.readAt >= READ_LOST_AFTER_MS)) {
      held.readAt = now;
      const reading = read(env, ++held.generation).finally(() => {
        if (held.reading === reading) held.reading = null;
      });
      held.reading = reading;
      // The request that starts the read keeps it alive, even if that request ends first: the
      // others awaiting it would otherwise wait on a read its cancelled request took down.
      ctx?.waitUntil?.(reading);
    }
    if (held.loaded || held.reading === null) return held.copy;
    try {
      await withinBound(held.reading, env); // a cold isolate: the first read, but not for long
    } catch (error) {
      report(`${label} not read yet, requests go on without it meanwhile: ${error.message}`);
    }
    return held.copy;
  }

  /**
   * For a status request only (status.js): the copy held, once a read that is due has been
   * waited for (at most KV_TIMEOUT_MS), as {copy, value, gotAt, problem}; value is what KV
   * returned for it (null: no key, or never read).
   */
  current.held = async (env, ctx) => {
    const consulted = current(env, ctx); // starts a read when one is due, before its first await
    if (held.reading !== null) await withinBound(held.reading, env).catch(() => {});
    await consulted; // settled by now, or within the same bound
    const { copy, value, gotAt, problem } = held;
    return { copy, value, gotAt, problem: problem ?? (held.loaded ? null : `${label} not read yet`) };
  };
  return current;
}
