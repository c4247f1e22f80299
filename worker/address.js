// The client's address, spelled exactly as lapi-kv-sync spells the keys it writes.

/**
 * The address decisions are looked up for: CF-Connecting-IP, or, when Cloudflare's Pseudo IPv4
 * ("Overwrite Headers") has put a made-up class E address there for an IPv6 client, the real one
 * it keeps in CF-Connecting-IPv6. Null when there is no one address to look up.
 * CF-Connecting-IPv6 is read only behind a class E CF-Connecting-IP, which Cloudflare alone sets:
 * an IPv4 client cannot borrow someone else's IPv6 address by sending that header itself.
 */
export function clientAddress(headers) {
  const connecting = canonicalAddress(headers.get("CF-Connecting-IP"));
  if (connecting === null || !isClassE(connecting)) return connecting;
  return canonicalAddress(headers.get("CF-Connecting-IPv6")) ?? connecting;
}

// 240.0.0.0/4: reserved, never a real client, where Pseudo IPv4 takes its addresses from.
function isClassE(address) {
  return IPV4.test(address) && Number(address.split(".")[0]) >= 240;
}

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
