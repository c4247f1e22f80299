// Numeric settings and flags (vars and secrets): read one way everywhere, so no value the runtime
// cannot use reaches it. A value out of range is clamped and one out of shape falls back to the
// default, each said once per isolate (not once per request): never a setting that makes every KV
// read throw, and so every request pass (CACHE_TTL=1e10 once did).

const said = new Set();

/**
 * `env[name]` as a whole number from `min` to `max`: missing or empty gives `fallback`; a number
 * out of range is clamped to it; anything else (not a whole decimal number, Infinity, 1e400)
 * gives `fallback`. Each problem is logged once per isolate, naming the setting and what is used.
 */
export function wholeSetting(env, name, { fallback, min, max, unit = "seconds" }) {
  const text = String(env?.[name] ?? "").trim();
  if (text === "") return fallback;
  if (!/^[0-9]{1,16}$/.test(text)) {
    warnOnce(`${name}=${JSON.stringify(text.slice(0, 40))}: not a whole number of ${unit}, ${fallback} used`);
    return fallback;
  }
  const value = Number(text);
  if (value < min || value > max) {
    const used = value < min ? min : max;
    warnOnce(`${name}=${text}: outside ${min}..${max}, ${used} used`);
    return used;
  }
  return value;
}

// Read as the job reads its flags (DRY_RUN=1): a first rollout with LOG_ONLY=1 or yes must not
// enforce.
const FLAGS = new Map([
  ["true", true],
  ["1", true],
  ["yes", true],
  ["false", false],
  ["0", false],
  ["no", false],
]);

/**
 * `env[name]` as true or false: true, 1, yes or false, 0, no, in any case; missing or empty gives
 * `fallback`, and so does anything else, said once per isolate.
 */
export function flagSetting(env, name, fallback) {
  const text = String(env?.[name] ?? "")
    .trim()
    .toLowerCase();
  if (text === "") return fallback;
  const value = FLAGS.get(text);
  if (value !== undefined) return value;
  warnOnce(`${name}=${JSON.stringify(text.slice(0, 40))}: not true or false, ${fallback} used`);
  return fallback;
}

export function warnOnce(problem) {
  if (said.has(problem)) return;
  said.add(problem);
  console.warn(problem);
}
