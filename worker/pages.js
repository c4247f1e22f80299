// The pages the Worker answers with instead of the origin. Change the wording freely; keep the
// headers: nothing here may be cached, framed, or run a script other than Turnstile's and the
// challenge's own (allowed by its hash, computed from the text served, so edit it freely too).

const TURNSTILE_ORIGIN = "https://challenges.cloudflare.com";
const TURNSTILE_SCRIPT = `${TURNSTILE_ORIGIN}/turnstile/v0/api.js`;

// The challenge's own script: Turnstile calls it with the token once the widget is solved, and it
// sends the form, so the visitor need not press "Continue" (kept for when it does not run). It
// puts the token in the form itself, in case the widget's hidden field is not filled in yet.
const CHALLENGE_FORM = "crowdsec-challenge";
const SOLVED_CALLBACK = "crowdsecSolved";
const CHALLENGE_SCRIPT = `function ${SOLVED_CALLBACK}(token) {
  var form = document.getElementById("${CHALLENGE_FORM}");
  var field = form.elements["cf-turnstile-response"];
  if (!field) {
    field = document.createElement("input");
    field.type = "hidden";
    field.name = "cf-turnstile-response";
    form.appendChild(field);
  }
  field.value = token;
  form.submit();
}`;

// The one script and frame the challenge needs (Turnstile's own CSP guidance) and the script
// above, by its hash: no 'unsafe-inline', so nothing injected into the page could run. The form
// may post only back to this site, and the inline style below is the only other thing the pages use.
const challengePolicy = (scriptHash) =>
  [
    "default-src 'none'",
    `script-src ${TURNSTILE_ORIGIN} '${scriptHash}'`,
    `frame-src ${TURNSTILE_ORIGIN}`,
    "style-src 'unsafe-inline'",
    "form-action 'self'",
    "base-uri 'none'",
    "frame-ancestors 'none'",
  ].join("; ");
const STATIC_POLICY = [
  "default-src 'none'",
  "style-src 'unsafe-inline'",
  "form-action 'none'",
  "base-uri 'none'",
  "frame-ancestors 'none'",
].join("; ");

export function banPage() {
  return page(403, STATIC_POLICY, "Access denied", "<p>This site has blocked your address.</p>");
}

/**
 * The Turnstile widget in a form that posts its token (cf-turnstile-response) back to this same
 * URL, by itself once the widget is solved. Not after a failed check: a widget that always
 * solves and a check that always fails (Turnstile's test keys, a widget for another host name)
 * would send the browser round in a loop, asking siteverify each time; there, "Continue" does it.
 */
export async function challengePage(siteKey, failed) {
  const notice = failed ? "<p><strong>The check did not go through. Please try again.</strong></p>" : "";
  const callback = failed ? "" : ` data-callback="${SOLVED_CALLBACK}"`;
  const body = `<p>This site needs to check that you are human before you go on.</p>${notice}
<form method="post" id="${CHALLENGE_FORM}"><div class="cf-turnstile" data-sitekey="${escapeHtml(siteKey)}"${callback}></div>
<p><button type="submit">Continue</button></p></form>
<script>${CHALLENGE_SCRIPT}</script>
<script src="${TURNSTILE_SCRIPT}" async defer></script>`;
  return page(403, challengePolicy(await challengeScriptHash()), "Please verify you are human", body);
}

let cachedScriptHash = null; // once per isolate

async function challengeScriptHash() {
  if (cachedScriptHash === null) {
    const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(CHALLENGE_SCRIPT));
    cachedScriptHash = `sha256-${btoa(String.fromCharCode(...new Uint8Array(digest)))}`;
  }
  return cachedScriptHash;
}

function page(status, policy, title, body) {
  const html = `<!doctype html><html lang="en"><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>${escapeHtml(title)}</title>
<body style="font-family:sans-serif;max-width:36em;margin:4em auto;padding:0 1em"><h1>${escapeHtml(title)}</h1>
${body}</body></html>`;
  return new Response(html, {
    status,
    headers: {
      "Content-Type": "text/html; charset=utf-8",
      "Cache-Control": "no-store",
      "Content-Security-Policy": policy,
      "X-Content-Type-Options": "nosniff",
    },
  });
}

const HTML_ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (character) => HTML_ESCAPES[character]);
}
