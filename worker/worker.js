// Reference edge Worker for lapi-kv-sync: enforces the CrowdSec decisions the job keeps in Workers KV.
// Per request: one KV read of KV_KEY_PREFIX + the client's canonical address -> "ban" | "captcha" | none
// (none with ADDRESS_KEYS=false), plus two tables each isolate holds in memory, read at most once a
// minute: the network table (networks.js: Range decisions, and the Ip decisions the job puts there)
// and the scope table (scopes.js: Country and AS). No KV read keeps a request waiting past KV_TIMEOUT_MS.
// Plain JavaScript modules, no build step: copy them, change the pages, deploy with `wrangler deploy`.
// It never writes KV: a solved captcha is remembered in a signed cookie, not in a store.
// With STATUS_TOKEN set, it tells the operator what it sees (status.js), to that token only.

import { clientAddress } from "./address.js";
import { cacheTtl, keyName, problemReporter, withinBound } from "./kv.js";
import { answerVerified, holdsPass, isChallengeAnswer, passGranted, turnstileConfigured } from "./captcha.js";
import { networkRemediation } from "./networks.js";
import { banPage, challengePage } from "./pages.js";
import { scopeRemediation } from "./scopes.js";
import { flagSetting } from "./settings.js";
import { onStatusPath, statusAnswer } from "./status.js";

export { canonicalAddress } from "./address.js";

export default {
  async fetch(request, env, ctx) {
    const url = new URL(request.url);
    // The operator's status request (status.js); without its token, on as any request below.
    if (onStatusPath(url)) {
      // A status that fails is no answer: the path stays any request, never a 500 that shows it.
      const status = await statusAnswer(request, env, ctx).catch((error) => void console.error(`status: ${error}`));
      if (status) return status;
    }
    const address = clientAddress(request.headers); // null: not one address, nothing to look up
    const host = url.hostname;
    // All at once: a warm isolate holds both tables in memory, a cold one reads them alongside.
    const [keyed, networked, scoped] = await Promise.all([
      address === null || !flagSetting(env, "ADDRESS_KEYS", true) ? null : addressRemediation(env, address),
      networkRemediation(env, ctx, address), // the networks holding the address
      scopeRemediation(request, env, ctx), // its country and AS (request.cf)
    ]);
    let remediation = strongest(keyed, strongest(networked, scoped));
    // Any other source of decisions joins here, one line each: remediation = strongest(remediation, …(ctx)).
    // Everything below treats the result alike, whatever its source: a pass only ever lifts a captcha.
    if (remediation === "captcha" && !turnstileConfigured(env)) remediation = captchaFallback(env);
    if (remediation === null) return fetch(request); // no decision: on to the origin, unchanged

    if (flagSetting(env, "LOG_ONLY", false)) {
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

const reportKeyRead = problemReporter();

// The address key's remediation. Fail open, as the job does: a KV outage, or a read slower than
// KV_TIMEOUT_MS, must not take the whole site down with it.
async function addressRemediation(env, address) {
  try {
    const reading = env.DECISIONS.get(keyName(env, address), { cacheTtl: cacheTtl(env) });
    return strongest(await withinBound(reading, env), null);
  } catch (error) {
    reportKeyRead(`KV read of an address key failed, request let through: ${error.message ?? error}`);
    return null;
  }
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
