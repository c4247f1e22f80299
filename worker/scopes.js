// Country and AS decisions: the job's scope table, one JSON document under the prefix
// (`<KV_KEY_PREFIX>scopes`), read at most once per SCOPES_REFRESH seconds per isolate (held.js)
// and matched in memory against request.cf, so it costs a clean request no KV read.
//
// The document: {"v":1,"country":{"FR":["captcha",1795615200]},"as":{"64500":["ban",1795615200]}}
// each entry [remediation, end in Unix seconds]; country and as may each be absent. Range
// decisions are in the network table (networks.js), not here.
import { heldDocument } from "./held.js";

/**
 * The scope table of a parsed document, indexed for matching; throws when the document is not a
 * version 1 table. An entry it does not understand (an unknown remediation, a country that is
 * not one) is left out and counted in `skipped`: one odd entry must not drop every other decision.
 */
export function buildTable(document) {
  if (!isObject(document) || document.v !== 1) throw new Error("not a version 1 scope table");
  let skipped = 0;
  const keyed = (name, key) => {
    const map = new Map();
    for (const [text, entry] of part(document, name)) {
      const [canonical, ends] = [key(text), parseEntry(entry)];
      if (canonical === null || ends === null) skipped++;
      else map.set(canonical, ends);
    }
    return map;
  };
  return {
    country: keyed("country", (text) => (/^[A-Z]{2}$/.test(text) ? text : null)),
    as: keyed("as", (text) => (/^[0-9]{1,10}$/.test(text) ? String(Number(text)) : null)),
    skipped,
    ranges: part(document, "range").length, // an older job's: this Worker reads them elsewhere
  };
}

function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

function part(document, name) {
  const value = document[name];
  if (value === undefined) return [];
  if (!isObject(value)) throw new Error(`"${name}" is not an object`);
  return Object.entries(value);
}

// [remediation, end] as the latest end of each remediation (0: none).
function parseEntry(entry) {
  if (!Array.isArray(entry) || !Number.isFinite(entry[1])) return null;
  if (entry[0] === "ban") return { ban: entry[1], captcha: 0 };
  if (entry[0] === "captcha") return { ban: 0, captcha: entry[1] };
  return null;
}

/**
 * What the table says about a request's `cf` at `now` (Unix seconds): "ban" when a matching entry
 * bans and has not ended, else "captcha" likewise, else null. Entries end at different times, so
 * the latest end of each remediation decides, not the strongest entry alone.
 */
export function tableVerdict(table, cf, now) {
  const found = [
    typeof cf?.country === "string" ? table.country.get(cf.country.toUpperCase()) : undefined,
    cf?.asn == null ? undefined : table.as.get(String(cf.asn)),
  ];
  let [ban, captcha] = [0, 0];
  for (const ends of found) {
    if (ends) [ban, captcha] = [Math.max(ban, ends.ban), Math.max(captcha, ends.captcha)];
  }
  return ban > now ? "ban" : captcha > now ? "captcha" : null;
}

function remark({ skipped, ranges }) {
  if (ranges > 0) return `scope table: ${ranges} ranges, which this Worker reads from the network table only`;
  return skipped > 0 ? `scope table: ${skipped} entries not understood, left out` : null;
}

export const scopeTable = heldDocument({
  name: "scopes", // never an address, so it cannot collide with an address key
  label: "scope table",
  type: "text",
  use: (text) => buildTable(JSON.parse(text)),
  empty: buildTable({ v: 1 }),
  remark,
});

/**
 * "ban" | "captcha" | null for the request's country and AS (request.cf), from the copy of the
 * scope table the isolate holds. Never throws: without a usable table, nothing (fail open).
 */
export async function scopeRemediation(request, env, ctx) {
  return tableVerdict(await scopeTable(env, ctx), request.cf, Date.now() / 1000);
}
