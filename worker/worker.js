// Reference edge Worker for lapi-kv-sync: enforces the CrowdSec decisions the job keeps in Workers KV.
// Per request: one KV read of KV_KEY_PREFIX + the client's canonical address -> "ban" | "captcha" | none,
// and the Range, Country and AS decisions of the scope table (scopes.js), read once a minute per isolate.
// Plain JavaScript, no build step: copy it, change the pages, deploy with `wrangler deploy`.
import { tableRemediation } from "./scopes.js";

const DEFAULT_PREFIX = "ip:"; // the job's KV_KEY_PREFIX default
const DEFAULT_CACHE_TTL = 60; // seconds; Cloudflare's own default for a KV read
const MIN_CACHE_TTL = 30; // KV refuses a smaller cacheTtl: the read would throw and every request pass

export default {
  async fetch(request, env, ctx) {
    const address = canonicalAddress(request.headers.get("CF-Connecting-IP"));
    // Both at once: the table is in memory once the isolate is warm, and never adds a wait.
    const [keyed, scoped] = await Promise.all([
      address === null ? null : lookUp(env, address),
      tableRemediation(request, env, ctx, address),
    ]);
    const remediation = strongest(keyed, scoped);
    if (remediation === "ban") return page(403, "Access denied", "This site has blocked your address.");
    if (remediation === "captcha") return captcha(request, env);
    return fetch(request); // no decision: on to the origin, unchanged
  },
};

// Ban beats captcha, whichever of the address key and the scope table says it.
function strongest(a, b) {
  return a === "ban" || b === "ban" ? "ban" : a === "captcha" || b === "captcha" ? "captcha" : null;
}

// The name of a key the job writes, and how long an edge location may answer its read from cache.
export function keyName(env, suffix) {
  return (env.KV_KEY_PREFIX ?? DEFAULT_PREFIX) + suffix;
}

export function cacheTtl(env) {
  return Math.max(MIN_CACHE_TTL, Number(env.CACHE_TTL) || DEFAULT_CACHE_TTL);
}

async function lookUp(env, address) {
  try {
    return await env.DECISIONS.get(keyName(env, address), { cacheTtl: cacheTtl(env) });
  } catch (error) {
    // Fail open, as the job does: a KV outage must not take the whole site down with it.
    console.error(`KV read failed, request let through: ${error}`);
    return null;
  }
}

// A captcha decision: send the client to CAPTCHA_URL when it is set, else show a challenge page.
// To plug in Turnstile, replace this function (worker/README.md shows how).
function captcha(request, env) {
  if (!env.CAPTCHA_URL) {
    return page(403, "Please verify you are human", "This site needs to check your browser before you go on.");
  }
  const target = new URL(env.CAPTCHA_URL);
  const here = new URL(request.url);
  // The captcha page itself must stay reachable when it is served on a route this Worker runs on.
  if (here.origin === target.origin && here.pathname === target.pathname) return fetch(request);
  target.searchParams.set("return_to", request.url);
  return new Response(null, { status: 302, headers: { Location: target.href, "Cache-Control": "no-store" } });
}

function page(status, title, message) {
  const html = `<!doctype html><html lang="en"><meta charset="utf-8"><title>${title}</title>
<body style="font-family:sans-serif;max-width:36em;margin:4em auto"><h1>${title}</h1><p>${message}</p></body></html>`;
  return new Response(html, {
    status,
    headers: { "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store" },
  });
}

// ---------------------------------------------------------------- the job's spelling of an address

const OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"; // 0-255, no leading zero
const IPV4 = new RegExp(`^${OCTET}(?:\\.${OCTET}){3}$`);
const HEXTET = /^[0-9A-Fa-f]{1,4}$/;

/**
 * The address as the job writes it in keys, or null for anything that is not one address.
 * Mirrors the job's canonical_address (Python's ipaddress): IPv4 only as a plain dotted quad,
 * IPv6 in RFC 5952 form, IPv4-mapped IPv6 (::ffff:192.0.2.6) as IPv4; no zone ids, no CIDRs.
 * A client address spelled another way would silently miss every decision on it.
 */
export function canonicalAddress(text) {
  if (typeof text !== "string") return null;
  if (IPV4.test(text)) return text;
  const groups = ipv6Groups(text);
  if (groups === null) return null;
  if (groups.slice(0, 5).every((group) => group === 0) && groups[5] === 0xffff) {
    return `${groups[6] >> 8}.${groups[6] & 255}.${groups[7] >> 8}.${groups[7] & 255}`;
  }
  return rfc5952(groups);
}

// The eight 16-bit groups of an IPv6 address, or null: accepts exactly what Python's ipaddress does.
export function ipv6Groups(text) {
  const halves = text.split("::");
  if (halves.length > 2) return null;
  const parts = halves.map((half) => (half === "" ? [] : half.split(":")));
  const tail = parts[parts.length - 1];
  if (tail.length > 0 && tail[tail.length - 1].includes(".")) {
    // A dotted IPv4 address may spell the last two groups (::ffff:192.0.2.6, ::192.0.2.6).
    const dotted = tail.pop();
    if (!IPV4.test(dotted)) return null;
    const [a, b, c, d] = dotted.split(".").map(Number);
    tail.push(((a << 8) | b).toString(16), ((c << 8) | d).toString(16));
  }
  if (!parts.every((groups) => groups.every((group) => HEXTET.test(group)))) return null;
  const [head, rest = []] = parts.map((groups) => groups.map((group) => parseInt(group, 16)));
  if (parts.length === 1) return head.length === 8 ? head : null;
  const skipped = 8 - head.length - rest.length; // "::" stands for at least one zero group
  return skipped < 1 ? null : [...head, ...Array(skipped).fill(0), ...rest];
}

// RFC 5952: lower case, no leading zeros, the longest run of two or more zero groups as "::"
// (the first such run on a tie).
function rfc5952(groups) {
  let best = { start: -1, length: 1 };
  for (let start = 0; start < 8; start++) {
    let length = 0;
    while (start + length < 8 && groups[start + length] === 0) length++;
    if (length > best.length) best = { start, length };
  }
  const hex = groups.map((group) => group.toString(16));
  if (best.start < 0) return hex.join(":");
  return `${hex.slice(0, best.start).join(":")}::${hex.slice(best.start + best.length).join(":")}`;
}
