// Sizes, rates and durations as the demo shows them.

/** `bytes` in kB, MB or GB (decimal, as downloads are counted). */
export function formatBytes(bytes) {
  const [unit, scale] = bytes >= 1e9 ? ["GB", 1e9] : bytes >= 1e6 ? ["MB", 1e6] : ["kB", 1e3];
  const value = bytes / scale;
  return `${value.toFixed(value < 10 ? 2 : 1)} ${unit}`;
}

/** Binary units for GPU limits, which are powers of two. */
export function formatBinary(bytes) {
  return bytes >= 2 ** 30 ? `${+(bytes / 2 ** 30).toFixed(1)} GiB` : `${+(bytes / 2 ** 20).toFixed(1)} MiB`;
}

export function formatSeconds(seconds) {
  if (seconds < 1) return "under 1 s";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

export const formatRate = (perSecond, unit) => `${perSecond.toFixed(perSecond < 10 ? 1 : 0)} ${unit}/s`;
