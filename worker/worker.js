// Reference edge Worker for lapi-kv-sync: enforces the CrowdSec decisions the job keeps in Workers KV.
// Per request: one KV read of KV_KEY_PREFIX + the client's canonical address -> "ban" | "captcha" | none,
// and the Range, Country and AS decisions of the scope table (scopes.js), read once a minute per isolate.
// Plain JavaScript modules, no build step: copy them, change the pages, deploy with `wrangler deploy`.
// It never writes KV: a solved captcha is remembered in a signed cookie, not in a store.

import { clientAddress } from "./address.js";
import { cacheTtl, keyName } from "./kv.js";
import { answerVerified, holdsPass, isChallengeAnswer, passGranted, turnstileConfigured } from "./captcha.js";
import { banPage, challengePage } from "./pages.js";
import { tableRemediation } from "./scopes.js";

export { canonicalAddress } from "./address.js";

export default {
  async fetch(request, env, ctx) {
    const address = clientAddress(request.headers); // null: not one address, nothing to look up
    const host = new URL(request.url).hostname;
    // Both at once: a warm isolate holds the scope table in memory, a cold one reads it alongside.
    const [keyed, scoped] = await Promise.all([
      address === null ? null : lookUp(env, address),
      tableRemediation(request, env, ctx, address), // Range (the address), Country and AS (request.cf)
    ]);
    let remediation = strongest(keyed, scoped);
    // Any other source of decisions joins here, one line each: remediation = strongest(remediation, …(ctx)).
    // Everything below treats the result alike, whatever its source: a pass only ever lifts a captcha.
    if (remediation === "captcha" && !turnstileConfigured(env)) remediation = captchaFallback(env);
    if (remediation === null) return fetch(request); // no decision: on to the origin, unchanged

    if (logOnly(env)) {
      console.log(JSON.stringify({ logOnly: true, wouldDo: remediation, address, host }));
      count(env, "log_only", remediation, host);
      return fetch(request);
    }
    if (remediation === "ban") {
      count(env, "ban", remediation, host);
      return banPage(); // a pass never lifts a ban
    }
    // A captcha: a pass for this address and host lets the request through; a verified answer
    // earns one; anything else sees the challenge (again, saying so, after a failed check).
    if (await holdsPass(request, env, address, host)) {
      count(env, "pass_honoured", remediation, host);
      return fetch(request);
    }
    const answered = isChallengeAnswer(request);
    if (answered && (await answerVerified(request, env, address, host))) {
      count(env, "challenge_passed", remediation, host);
      return passGranted(request, env, address, host);
    }
    count(env, "challenge_shown", remediation, host);
    return challengePage(env.TURNSTILE_SITE_KEY, answered);
  },
};

const STRENGTH = new Map([
  ["captcha", 1],
  ["ban", 2],
]);

/** The stronger of two remediations: ban > captcha > none. Anything else counts as none. */
export function strongest(a, b) {
  const [x, y] = [STRENGTH.get(a) ?? 0, STRENGTH.get(b) ?? 0];
  if (x === 0 && y === 0) return null;
  return x >= y ? a : b;
}

async function lookUp(env, address) {
  try {
    const value = await env.DECISIONS.get(keyName(env, address), { cacheTtl: cacheTtl(env) });
    return strongest(value, null);
  } catch (error) {
    // Fail open, as the job does: a KV outage must not take the whole site down with it.
    console.error(`KV read failed, request let through: ${error}`);
    return null;
  }
}

// LOG_ONLY read as the job reads its flags (DRY_RUN=1): a first rollout with LOG_ONLY=1 or yes must
// not enforce. Anything else but false, 0, no or nothing is said, and enforced.
const LOG_ONLY_VALUES = new Map([
  ["true", true],
  ["1", true],
  ["yes", true],
  ["false", false],
  ["0", false],
  ["no", false],
  ["", false],
]);

function logOnly(env) {
  const text = String(env.LOG_ONLY ?? "").trim().toLowerCase();
  const value = LOG_ONLY_VALUES.get(text);
  if (value === undefined) console.warn(`LOG_ONLY=${JSON.stringify(text)}: not true or false, so enforced`);
  return value === true;
}

// Without both Turnstile keys nobody could solve a challenge: CAPTCHA_FALLBACK says what a
// captcha decision becomes instead, "ban" (the default, also for a value it does not know) or "allow".
function captchaFallback(env) {
  const fallback = String(env.CAPTCHA_FALLBACK ?? "").trim() || "ban";
  if (fallback === "allow") return null;
  if (fallback !== "ban") console.warn(`CAPTCHA_FALLBACK=${JSON.stringify(fallback)}: not "ban" or "allow", so ban`);
  return "ban";
}

// One Analytics Engine data point per thing done, when a dataset is bound as METRICS; counting
// must never cost the visitor their page, so a failed write is only logged.
function count(env, event, remediation, host) {
  if (!env.METRICS) return;
  try {
    // An index is at most 96 bytes; a host name is ASCII (punycode) and up to 253.
    env.METRICS.writeDataPoint({ indexes: [host.slice(0, 96)], blobs: [event, remediation, host], doubles: [1] });
  } catch (error) {
    console.error(`Analytics Engine write failed: ${error}`);
  }
}
