// The browser test's log and checks: each passed check is logged with the time since the start.

export function log(...args) {
  console.log(`[${(performance.now() / 1000).toFixed(1)}s]`, ...args);
}

export function assertEqual(actual, expected, what) {
  if (JSON.stringify(actual) !== JSON.stringify(expected)) {
    throw new Error(`${what}: got ${JSON.stringify(actual)}, expected ${JSON.stringify(expected)}`);
  }
  log(`ok: ${what} = ${JSON.stringify(actual)}`);
}

export function assert(condition, what) {
  if (!condition) throw new Error(what);
  log(`ok: ${what}`);
}
