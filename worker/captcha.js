// A captcha decision, answered with Cloudflare Turnstile: the challenge page, the check of its
// answer with Turnstile's siteverify, and the pass that lets a client through afterwards.
// Nothing here writes KV: a pass lives in the client's cookie, signed, not in a store.

import { warnOnce, wholeSetting } from "./settings.js";

const SITEVERIFY_URL = "https://challenges.cloudflare.com/turnstile/v0/siteverify";
const SITEVERIFY_TIMEOUT_MS = 5000; // siteverify answers in well under a second; past this, the check failed
const MAX_VERDICT_BYTES = 16 * 1024; // its answer is a small JSON object
const MAX_FORM_BYTES = 8 * 1024; // the form carries one token, at most 2,048 characters
const MAX_TOKEN_LENGTH = 2048;
const MAX_DRAIN_BYTES = 4 * 1024 * 1024; // read and dropped, so the client is not cut off mid-send

const PASS_COOKIE = "__Host-crowdsec_pass"; // __Host-: only this host, over HTTPS, may have set it
const PASS_FORMAT = /^([0-9]{1,12})\.([A-Za-z0-9_-]{43})$/; // <expiry>.<HMAC-SHA256, base64url>
const MAX_PASS_COOKIES = 3; // a client sending more gets at most this many passes checked
// PASS_TTL: under a minute, the pass could run out before the browser is back from the 303, and
// the visitor would go round the challenge for ever.
const PASS_TTL = { fallback: 7200, min: 60, max: 30 * 24 * 3600 };
const MIN_PASS_SECRET_LENGTH = 32; // shorter, a pass cookie (message and MAC) invites guessing the key offline
// Turnstile's documented test secret that always passes: its siteverify answers vouch for the
// host name example.com, whatever the site, so the host check refuses them (worker/README.md).
const TEST_SECRET_PASSES = "1x0000000000000000000000000000000AA";

/** Both keys set: the Worker can show a challenge and check its answer. */
export function turnstileConfigured(env) {
  return [env.TURNSTILE_SITE_KEY, env.TURNSTILE_SECRET_KEY].every((key) => String(key ?? "").trim() !== "");
}

/** The client holds a pass for this address and host that has not run out. */
export async function holdsPass(request, env, address, host) {
  const now = nowSeconds();
  const latest = now + passTtl(env); // one reaching further (given under a longer PASS_TTL) is refused
  const secrets = passSecrets(env);
  for (const value of cookieValues(request.headers.get("Cookie"), PASS_COOKIE).slice(0, MAX_PASS_COOKIES)) {
    const parts = PASS_FORMAT.exec(value);
    if (parts === null) continue;
    const expiry = Number(parts[1]);
    if (expiry <= now || expiry > latest) continue;
    const mac = base64urlBytes(parts[2]);
    const message = passMessage(address, host, expiry);
    for (const secret of secrets) {
      if (await crypto.subtle.verify("HMAC", await passKey(secret), mac, message)) return true;
    }
  }
  return false;
}

/** A POST of a form: what the challenge page sends back (anything else just sees the challenge). */
export function isChallengeAnswer(request) {
  const type = (request.headers.get("Content-Type") ?? "").split(";")[0].trim().toLowerCase();
  return request.method === "POST" && type === "application/x-www-form-urlencoded";
}

/**
 * Turnstile vouches for the form's token, for this very host name. Anything else (no token, two
 * tokens, siteverify unreachable, slow, answering junk or saying no) is a failed check, logged.
 */
export async function answerVerified(request, env, address, host) {
  const body = await readAtMost(request, MAX_FORM_BYTES);
  const tokens = body === null ? [] : new URLSearchParams(body).getAll("cf-turnstile-response");
  if (tokens.length !== 1 || tokens[0] === "" || tokens[0].length > MAX_TOKEN_LENGTH) {
    return refused("the form carried no usable cf-turnstile-response");
  }
  const question = new URLSearchParams({ secret: env.TURNSTILE_SECRET_KEY, response: tokens[0] });
  if (address !== null) question.set("remoteip", address);
  let verdict;
  const deadline = new AbortController();
  const timer = setTimeout(() => deadline.abort(new Error("no answer in time")), SITEVERIFY_TIMEOUT_MS);
  try {
    const asked = { method: "POST", body: question, redirect: "manual", signal: deadline.signal };
    const answer = await fetch(SITEVERIFY_URL, asked); // a redirect is not an answer: !ok
    const text = await readAtMost(answer, MAX_VERDICT_BYTES);
    if (!answer.ok || text === null) return refused(`siteverify answered HTTP ${answer.status}`);
    verdict = JSON.parse(text);
  } catch (error) {
    return refused(`siteverify could not be asked: ${error}`);
  } finally {
    clearTimeout(timer);
  }
  if (verdict?.success !== true) {
    const codes = Array.isArray(verdict?.["error-codes"]) ? verdict["error-codes"].slice(0, 5).join(",") : "";
    return refused(`siteverify said no (${String(codes).slice(0, 200)})`);
  }
  if (typeof verdict.hostname !== "string" || verdict.hostname.toLowerCase() !== host) {
    // Which host siteverify named (JSON-quoted: no control character reaches the log), so the
    // operator can tell a widget set up for another host name, or Turnstile's test keys.
    const named =
      typeof verdict.hostname === "string" ? JSON.stringify(verdict.hostname.slice(0, 253)) : "no host name";
    const hint =
      env.TURNSTILE_SECRET_KEY === TEST_SECRET_PASSES
        ? ": Turnstile's test keys always answer example.com; try the flow with a widget of your own (worker/README.md)"
        : "";
    return refused(`siteverify vouched for ${named}, not ${host}${hint}`);
  }
  return true;
}

/** 303 back to the same URL (the browser comes back with GET), with a pass for PASS_TTL seconds. */
export async function passGranted(request, env, address, host) {
  const ttl = passTtl(env);
  const expiry = nowSeconds() + ttl;
  const key = await passKey(passSecrets(env)[0]);
  const mac = new Uint8Array(await crypto.subtle.sign("HMAC", key, passMessage(address, host, expiry)));
  const value = `${expiry}.${bytesBase64url(mac)}`;
  const cookie = `${PASS_COOKIE}=${value}; Max-Age=${ttl}; Path=/; Secure; HttpOnly; SameSite=Lax`;
  return new Response(null, {
    status: 303,
    headers: { Location: request.url, "Set-Cookie": cookie, "Cache-Control": "no-store" },
  });
}

/** PASS_TTL in seconds: clamped to 1 minute .. 30 days; not a whole number, the default (2 hours). */
export function passTtl(env) {
  return wholeSetting(env, "PASS_TTL", PASS_TTL);
}

/**
 * The secrets a pass may be signed with, the one that signs new passes first: PASS_SECRET, and
 * during a rotation PASS_SECRET_PREVIOUS, accepted until the passes it signed have run out.
 * Without PASS_SECRET, the Turnstile secret signs them (as before PASS_SECRET existed, so the
 * passes already given stay good), said once per isolate: rotating that secret then ends every pass.
 */
export function passSecrets(env) {
  const current = secretSetting(env, "PASS_SECRET");
  const previous = secretSetting(env, "PASS_SECRET_PREVIOUS");
  if (current === "") {
    warnOnce("PASS_SECRET is not set: passes are signed with TURNSTILE_SECRET_KEY, so rotating it ends every pass");
  } else if (current.length < MIN_PASS_SECRET_LENGTH) {
    warnOnce(`PASS_SECRET has ${current.length} characters: use ${MIN_PASS_SECRET_LENGTH} or more, random`);
  }
  const signing = current || String(env.TURNSTILE_SECRET_KEY);
  return previous === "" || previous === signing ? [signing] : [signing, previous];
}

function secretSetting(env, name) {
  return String(env[name] ?? "").trim();
}

// What the pass signs: the address and host it is good for, and its end. A newline cannot occur in
// any of the three, so no two different passes sign the same text. Without an address (only off
// Cloudflare, which always sends CF-Connecting-IP) the pass binds to the empty one.
function passMessage(address, host, expiry) {
  return new TextEncoder().encode(`crowdsec-pass-v1\n${address ?? ""}\n${host}\n${expiry}`);
}

const cachedKeys = new Map(); // secret -> key: one import per secret per isolate, not one per request
const MAX_CACHED_KEYS = 4; // an isolate sees one set of settings (two keys at most): a bound, not a working size

async function passKey(secret) {
  let key = cachedKeys.get(secret);
  if (key === undefined) {
    key = await crypto.subtle.importKey(
      "raw",
      new TextEncoder().encode(secret),
      { name: "HMAC", hash: "SHA-256" },
      false,
      ["sign", "verify"],
    );
    if (cachedKeys.size >= MAX_CACHED_KEYS) cachedKeys.clear();
    cachedKeys.set(secret, key);
  }
  return key;
}

function refused(reason) {
  console.warn(`captcha check failed: ${reason}`);
  return false;
}

// The body as text, or null when it is larger than limit bytes. An oversized body is still read to
// its end, up to MAX_DRAIN_BYTES, and dropped: answering while the client is still sending makes the
// connection reset under the client, and the visitor sees an error instead of the challenge.
async function readAtMost(message, limit) {
  const declared = message.headers.get("Content-Length");
  if (message.body === null) return "";
  const reader = message.body.getReader();
  if (declared !== null && !(Number(declared) <= MAX_DRAIN_BYTES)) {
    reader.cancel().catch(() => {});
    return null;
  }
  const chunks = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > MAX_DRAIN_BYTES) {
      reader.cancel().catch(() => {});
      return null;
    }
    if (size <= limit) chunks.push(value);
  }
  if (size > limit) return null;
  const bytes = new Uint8Array(size);
  let at = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, at);
    at += chunk.byteLength;
  }
  return new TextDecoder().decode(bytes);
}

// Pairs are split on ";" and on ",": a client that sends two Cookie lines has them joined with
// ", " by workerd (its pass would be lost in the value before it). A comma cannot occur in a
// cookie value (RFC 6265), so a pass is never cut in two.
function cookieValues(header, name) {
  if (header === null) return [];
  const values = [];
  for (const pair of header.split(/[;,]/)) {
    const at = pair.indexOf("=");
    if (at > 0 && pair.slice(0, at).trim() === name) values.push(pair.slice(at + 1).trim());
  }
  return values;
}

function nowSeconds() {
  return Math.floor(Date.now() / 1000);
}

function bytesBase64url(bytes) {
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function base64urlBytes(text) {
  const binary = atob(text.replace(/-/g, "+").replace(/_/g, "/"));
  return Uint8Array.from(binary, (character) => character.charCodeAt(0));
}
