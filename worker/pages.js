// The pages the Worker answers with instead of the origin. Change the wording freely; keep the
// headers: nothing here may be cached, framed, or run a script other than Turnstile's.

const TURNSTILE_ORIGIN = "https://challenges.cloudflare.com";
const TURNSTILE_SCRIPT = `${TURNSTILE_ORIGIN}/turnstile/v0/api.js`;

// The one script and frame the challenge needs (Turnstile's own CSP guidance); the form may post
// only back to this site, and the inline style below is the only other thing the pages use.
const CHALLENGE_POLICY = [
  "default-src 'none'",
  `script-src ${TURNSTILE_ORIGIN}`,
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

/** The Turnstile widget in a form that posts its token (cf-turnstile-response) back to this same URL. */
export function challengePage(siteKey, failed) {
  const notice = failed ? "<p><strong>The check did not go through. Please try again.</strong></p>" : "";
  const body = `<p>This site needs to check that you are human before you go on.</p>${notice}
<form method="post"><div class="cf-turnstile" data-sitekey="${escapeHtml(siteKey)}"></div>
<p><button type="submit">Continue</button></p></form>
<script src="${TURNSTILE_SCRIPT}" async defer></script>`;
  return page(403, CHALLENGE_POLICY, "Please verify you are human", body);
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
