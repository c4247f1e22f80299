// The network table: every Range decision, and the Ip decisions of the job's TABLE_ORIGINS, as
// sorted disjoint address intervals, one KV value under the prefix (`<KV_KEY_PREFIX>networks`)
// that the job builds and this module maps without parsing: typed-array views over the
// ArrayBuffer KV returns, and one binary search per request. Read at most once per SCOPES_REFRESH
// seconds per isolate (held.js), so it costs a clean request no KV read.
//
// Format 1 (docs/kv-contract.md, "The network table"): unsigned integers, little-endian.
//
//   offset             size     field
//   0                  4        magic, ASCII "LKVN"
//   4                  2        format, 1
//   6                  2        reserved, 0
//   8                  4        n4: IPv4 intervals
//   12                 4        n6: IPv6 intervals
//   16                 4·n4     IPv4 first[n4]: each interval's first address
//   16 + 4·n4          4·n4     IPv4 last[n4]: its last address (inclusive)
//   16 + 8·n4          4·n4     IPv4 ban[n4]: the latest ban end over it, Unix seconds (0: none)
//   16 + 12·n4         4·n4     IPv4 captcha[n4]: the latest captcha end, likewise
//   16 + 16·n4         16·n6    IPv6 first[n6]: four uint32 words each, the most significant first
//   16 + 16·n4 + 16·n6 16·n6    IPv6 last[n6], likewise
//   16 + 16·n4 + 32·n6 4·n6     IPv6 ban[n6]
//   16 + 16·n4 + 36·n6 4·n6     IPv6 captcha[n6]
//
// The value is exactly 16 + 16·n4 + 40·n6 bytes. Each family is sorted by first address and
// disjoint. Every array starts at a multiple of 4 bytes, so a Uint32Array views it where it lies
// (in the host's byte order: little-endian on every Workers host; a big-endian reader would swap).
import { heldDocument } from "./held.js";

const MAGIC = 0x4e564b4c; // "LKVN" read as a little-endian uint32
const FORMAT = 1;
const HEADER_BYTES = 16;

/**
 * The table a format 1 value holds, as views over its bytes (nothing copied, nothing per entry):
 * {v4, v6}, each {width, first, last, ban, captcha}, an address being `width` uint32 words.
 * Throws on anything else: too short, another magic or format, a length its counts do not give.
 */
export function mapNetworks(buffer) {
  if (!(buffer instanceof ArrayBuffer)) throw new Error("not a binary value");
  if (buffer.byteLength < HEADER_BYTES) throw new Error(`${buffer.byteLength} bytes, shorter than its header`);
  const header = new DataView(buffer, 0, HEADER_BYTES);
  if (header.getUint32(0, true) !== MAGIC) throw new Error("not a network table (it does not start with LKVN)");
  const format = header.getUint16(4, true);
  if (format !== FORMAT) throw new Error(`format ${format}, where this Worker reads format ${FORMAT}`);
  const [n4, n6] = [header.getUint32(8, true), header.getUint32(12, true)];
  const length = HEADER_BYTES + 16 * n4 + 40 * n6; // exact: under 2^53
  if (buffer.byteLength !== length) {
    throw new Error(`${buffer.byteLength} bytes, where ${n4} IPv4 and ${n6} IPv6 intervals take ${length}`);
  }
  let offset = HEADER_BYTES;
  const next = (words) => {
    const view = new Uint32Array(buffer, offset, words);
    offset += 4 * words;
    return view;
  };
  return {
    v4: { width: 1, first: next(n4), last: next(n4), ban: next(n4), captcha: next(n4) },
    v6: { width: 4, first: next(4 * n6), last: next(4 * n6), ban: next(n6), captcha: next(n6) },
  };
}

const EMPTY = mapNetworks(new Uint32Array([MAGIC, FORMAT, 0, 0]).buffer); // on a little-endian host

/**
 * The latest ban and captcha ends over a canonical address (as canonicalAddress spells it: an
 * IPv4-mapped address as IPv4), or null when no interval holds it: one binary search.
 */
export function networkEnds(table, address) {
  const v6 = address.includes(":");
  const family = v6 ? table.v6 : table.v4;
  const target = v6 ? ipv6Words(address) : [ipv4Word(address)];
  const { width, first, last } = family;
  // The last interval whose first address is at most the target; the target is in it or in none.
  let [low, high] = [0, first.length / width - 1];
  while (low <= high) {
    const middle = (low + high) >>> 1;
    if (compare(first, middle * width, target) <= 0) low = middle + 1;
    else high = middle - 1;
  }
  if (high < 0 || compare(last, high * width, target) < 0) return null;
  return { ban: family.ban[high], captcha: family.captcha[high] };
}

// The address at words[at], `target.length` words long, against the target: <0, 0 or >0.
function compare(words, at, target) {
  for (let i = 0; i < target.length; i++) {
    if (words[at + i] !== target[i]) return words[at + i] - target[i];
  }
  return 0;
}

// A canonical dotted quad as a number (by hand: no split, no array).
function ipv4Word(text) {
  let [value, octet] = [0, 0];
  for (let i = 0; i < text.length; i++) {
    const code = text.charCodeAt(i);
    if (code === 46) [value, octet] = [value * 256 + octet, 0]; // "."
    else octet = octet * 10 + code - 48;
  }
  return value * 256 + octet;
}

// A canonical IPv6 address (RFC 5952, as canonicalAddress spells it) as four 32-bit words, the
// most significant first: by hand, in one pass (ipv6Groups' splits and patterns cost more than the
// search). "::" is where the groups after it move to the end.
function ipv6Words(text) {
  const groups = [0, 0, 0, 0, 0, 0, 0, 0];
  let [count, value, digits, gap] = [0, 0, 0, -1];
  for (let i = 0; i <= text.length; i++) {
    const code = i < text.length ? text.charCodeAt(i) : 58; // a ":" after the last group ends it
    if (code !== 58) {
      value = value * 16 + (code <= 57 ? code - 48 : (code | 32) - 87); // 0-9, a-f (A-F)
      digits++;
    } else if (digits > 0) {
      [groups[count++], value, digits] = [value, 0, 0];
    } else if (i > 0 && gap < 0) {
      gap = count; // the second ":" of "::"
    }
  }
  for (let k = count - gap - 1; gap >= 0 && k >= 0; k--) {
    const group = groups[gap + k];
    groups[gap + k] = 0;
    groups[8 - (count - gap) + k] = group;
  }
  const g = groups;
  return [g[0] * 65536 + g[1], g[2] * 65536 + g[3], g[4] * 65536 + g[5], g[6] * 65536 + g[7]];
}

/** What the table says of a canonical address at `now` (Unix seconds): "ban", "captcha" or null. */
export function networkVerdict(table, address, now) {
  const ends = networkEnds(table, address);
  if (ends === null) return null;
  return ends.ban > now ? "ban" : ends.captcha > now ? "captcha" : null;
}

export const networkTable = heldDocument({
  name: "networks",
  label: "network table",
  type: "arrayBuffer",
  use: mapNetworks,
  empty: EMPTY,
});

/**
 * "ban" | "captcha" | null for the client's canonical address (null: none), from the copy of the
 * network table the isolate holds. Never throws: without a usable table, nothing (fail open).
 */
export async function networkRemediation(env, ctx, address) {
  if (address === null) return null;
  return networkVerdict(await networkTable(env, ctx), address, Date.now() / 1000);
}
