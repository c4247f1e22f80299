// Range, Country and AS decisions: the job's scope table, one KV document under the prefix
// (`<KV_KEY_PREFIX>scopes`), read at most once per SCOPES_REFRESH seconds per isolate and
// matched in memory, so a clean request still costs one KV read: its address key.
//
// The document: {"v":1,"range":{"192.0.2.0/24":["ban",1795615200]},"country":{"FR":[...]},"as":{"64500":[...]}}
// each entry [remediation, end in Unix seconds]; range, country and as may each be absent.
import { canonicalAddress, ipv6Groups } from "./address.js";
import { cacheTtl, keyName } from "./kv.js";

const TABLE_KEY = "scopes"; // never an address, so it cannot collide with an address key
const DEFAULT_REFRESH = 60; // seconds between two reads of the table in one isolate
const MIN_REFRESH = 1;

// ---------------------------------------------------------------- the document, parsed and indexed

/**
 * The scope table of a parsed document, indexed for matching; throws when the document is not a
 * version 1 table. An entry it does not understand (an unknown remediation, a network that is not
 * one) is left out and counted in `skipped`: one odd entry must not drop every other decision.
 */
export function buildTable(document) {
  if (!isObject(document) || document.v !== 1) throw new Error("not a version 1 scope table");
  let skipped = 0;
  const networks = { 4: [], 6: [] };
  for (const [text, entry] of part(document, "range")) {
    const [network, ends] = [parseNetwork(text), parseEntry(entry)];
    if (network === null || ends === null) skipped++;
    else networks[network.version].push({ first: network.first, last: network.last, ...ends });
  }
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
    v4: disjointIntervals(networks[4], 1),
    v6: disjointIntervals(networks[6], 1n),
    country: keyed("country", (text) => (/^[A-Z]{2}$/.test(text) ? text : null)),
    as: keyed("as", (text) => (/^[0-9]{1,10}$/.test(text) ? String(Number(text)) : null)),
    skipped,
  };
}

const EMPTY_TABLE = buildTable({ v: 1 });

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
 * A network as {version, first, last} (IPv4 as numbers, IPv6 as BigInts), or null. Canonical as
 * the job writes networks (Python's ip_network(text, strict=False)): host bits cleared, an
 * IPv4-mapped IPv6 network taken as the IPv4 one, as its addresses reach the Worker as IPv4.
 */
function parseNetwork(text) {
  if (typeof text !== "string") return null;
  const slash = text.indexOf("/");
  const address = slash < 0 ? text : text.slice(0, slash);
  const length = slash < 0 ? null : text.slice(slash + 1);
  if (length !== null && !/^[0-9]{1,3}$/.test(length)) return null;
  if (!address.includes(":")) {
    const prefix = length === null ? 32 : Number(length);
    return prefix > 32 || canonicalAddress(address) !== address ? null : ipv4Network(ipv4Value(address), prefix);
  }
  const groups = ipv6Groups(address); // what Python accepts, as canonicalAddress takes it
  const prefix = length === null ? 128 : Number(length);
  if (groups === null || prefix > 128) return null;
  const hostBits = BigInt(128 - prefix);
  const first = (ipv6Value(groups) >> hostBits) << hostBits;
  if (prefix >= 96 && first >> 32n === 0xffffn) return ipv4Network(Number(first & 0xffffffffn), prefix - 96);
  return { version: 6, first, last: first | ((1n << hostBits) - 1n) };
}

// IPv4 in plain numbers: every value up to 2^32 is exact, and far cheaper than a BigInt.
function ipv4Network(value, prefix) {
  const size = 2 ** (32 - prefix);
  const first = value - (value % size);
  return { version: 4, first, last: first + size - 1 };
}

// A dotted quad canonicalAddress accepts, as a number (by hand: split() costs a third of a load).
function ipv4Value(text) {
  let value = 0;
  let octet = 0;
  for (let i = 0; i < text.length; i++) {
    const code = text.charCodeAt(i);
    if (code === 46) [value, octet] = [value * 256 + octet, 0]; // "."
    else octet = octet * 10 + code - 48;
  }
  return value * 256 + octet;
}

// The eight groups of an IPv6 address as one BigInt.
function ipv6Value(groups) {
  return BigInt(`0x${groups.map((group) => group.toString(16).padStart(4, "0")).join("")}`);
}

/**
 * Sorted disjoint intervals from networks of one family, each carrying the latest ban end and
 * the latest captcha end of every network covering it. Two CIDR networks are either disjoint or
 * one holds the other, so a sweep in order of first address (the larger first on a tie) with a
 * stack of the networks open at that point sees every cover: each stack entry holds the maxima
 * of itself and every network around it.
 */
function disjointIntervals(networks, one) {
  networks.sort((a, b) => compare(a.first, b.first) || compare(b.last, a.last));
  const starts = [];
  const lasts = [];
  const bans = [];
  const captchas = [];
  const open = [];
  let cursor;
  // One interval from the cursor to `last`, covered by `cover` and the networks around it.
  const closeTo = (cover, last = cover.last) => {
    if (cursor <= last) {
      starts.push(cursor);
      lasts.push(last);
      bans.push(cover.ban);
      captchas.push(cover.captcha);
    }
    cursor = last + one;
  };
  for (const network of networks) {
    while (open.length > 0 && open[open.length - 1].last < network.first) closeTo(open.pop());
    if (open.length > 0) closeTo(open[open.length - 1], network.first - one);
    cursor = network.first;
    const outer = open[open.length - 1] ?? { ban: 0, captcha: 0 };
    open.push({
      last: network.last,
      ban: Math.max(network.ban, outer.ban),
      captcha: Math.max(network.captcha, outer.captcha),
    });
  }
  while (open.length > 0) closeTo(open.pop());
  return { starts, lasts, bans, captchas };
}

function compare(a, b) {
  return a < b ? -1 : a > b ? 1 : 0;
}

// ---------------------------------------------------------------- matching

/**
 * The latest ban and captcha ends of the networks holding `address` (canonical, as
 * canonicalAddress spells it), or null when none does: a binary search, O(log n).
 */
export function matchRange(table, address) {
  const v6 = address.includes(":");
  const value = v6 ? ipv6Value(ipv6Groups(address)) : ipv4Value(address);
  const { starts, lasts, bans, captchas } = v6 ? table.v6 : table.v4;
  let low = 0;
  let high = starts.length - 1;
  while (low <= high) {
    const middle = (low + high) >> 1;
    if (starts[middle] <= value) low = middle + 1;
    else high = middle - 1;
  }
  return high >= 0 && value <= lasts[high] ? { ban: bans[high], captcha: captchas[high] } : null;
}

/**
 * What the table says about a request at `now` (Unix seconds): "ban" when any matching entry
 * bans and has not ended, else "captcha" likewise, else null. Entries end at different times,
 * so the latest end of each remediation decides, not the strongest entry alone.
 */
export function tableVerdict(table, address, cf, now) {
  const found = [
    address === null ? null : matchRange(table, address),
    typeof cf?.country === "string" ? table.country.get(cf.country.toUpperCase()) : undefined,
    cf?.asn == null ? undefined : table.as.get(String(cf.asn)),
  ];
  let ban = 0;
  let captcha = 0;
  for (const ends of found) {
    if (ends) [ban, captcha] = [Math.max(ban, ends.ban), Math.max(captcha, ends.captcha)];
  }
  return ban > now ? "ban" : captcha > now ? "captcha" : null;
}

// ---------------------------------------------------------------- one cached copy per isolate

// Module state lives as long as the isolate: the table is read once and shared by its requests.
const cache = { table: EMPTY_TABLE, text: null, readAt: -Infinity, reading: null, loaded: false, lastProblem: null };

/**
 * "ban" | "captcha" | null for the request, from the scope table. Reads the table at most once per
 * SCOPES_REFRESH seconds per isolate, one read shared by the requests that arrive meanwhile;
 * once a copy is held (or a read has failed), requests use it at once and a refresh runs in the
 * background. Never throws: a table that cannot be read or used leaves the last good copy in
 * place, or none (fail open, as for the address key).
 */
export async function tableRemediation(request, env, ctx, address) {
  try {
    const table = await currentTable(env, ctx);
    return tableVerdict(table, address, request.cf, Date.now() / 1000);
  } catch (error) {
    report(`scope table not applied, request let through: ${error}`);
    return null;
  }
}

function currentTable(env, ctx) {
  const refresh = Math.max(MIN_REFRESH, Number(env.SCOPES_REFRESH) || DEFAULT_REFRESH);
  if (cache.reading === null && Date.now() - cache.readAt >= refresh * 1000) {
    cache.readAt = Date.now();
    cache.reading = readTable(env).finally(() => {
      cache.reading = null;
    });
    // The request that starts the read keeps it alive, even if that request ends first: the
    // others awaiting it would otherwise wait on a read its cancelled request took down.
    ctx?.waitUntil?.(cache.reading);
  }
  return cache.loaded ? cache.table : cache.reading;
}

async function readTable(env) {
  try {
    const text = await env.DECISIONS.get(keyName(env, TABLE_KEY), { type: "text", cacheTtl: cacheTtl(env) });
    // The same document as the copy held (most refreshes): no parse, no index, a string compare.
    if (text !== cache.text) {
      const table = text === null ? EMPTY_TABLE : buildTable(JSON.parse(text)); // no key: no such decisions
      [cache.table, cache.text] = [table, text];
    }
    const { skipped } = cache.table;
    report(skipped > 0 ? `scope table: ${skipped} entries not understood, left out` : null);
  } catch (error) {
    report(`scope table unusable, the last good copy (if any) kept: ${error}`);
  }
  cache.loaded = true;
  return cache.table;
}

// Once per problem, not once per request or per refresh: a bad table can stay for hours.
function report(problem) {
  if (problem !== null && problem !== cache.lastProblem) console.error(problem);
  cache.lastProblem = problem;
}
