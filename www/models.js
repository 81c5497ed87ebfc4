// The models the picker offers and what is known of each before it loads: the default SmolLM2, the
// package's catalog where it exports one (listModels), any URL; and whether a model fits this
// browser's storage and GPU.
import * as llama from "../pkg/index.js";
import { formatBinary, formatBytes } from "./format.js";

/**
 * A model as the picker shows it: `model` is what createEngine loads; size in bytes, quant and
 * context where known (null where not).
 */
export const DEFAULT_MODEL = {
  name: "SmolLM2-135M-Instruct",
  model: "../target/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
  size: 98_362_432,
  quant: "Q4_1",
  context: 8192,
};

/** The default model, then the package's catalog, each entry kept for the package's fit check. */
export async function pickerModels() {
  const catalog = typeof llama.listModels === "function" ? await llama.listModels() : [];
  return [DEFAULT_MODEL, ...catalog.map((entry) => ({
    name: `${entry.name} ${entry.quant}`,
    model: entry.reference,
    size: entry.size,
    quant: entry.quant,
    context: entry.context,
    vram: entry.vramBytes,
    vramContext: entry.vramContext,
    entry,
  }))];
}

/** What a URL says of its model without loading it: a GGUF file's size, a shard folder's manifest. */
export async function describeUrl(model) {
  const unknown = { name: model, model, size: null, quant: null, context: null };
  try {
    const url = new URL(model, location.href);
    if (url.pathname.toLowerCase().endsWith(".gguf")) {
      const response = await fetch(url, { method: "HEAD" });
      const quant = /[-_.]((?:I?Q\d_[A-Z0-9_]+)|F16|BF16|F32)\.gguf$/i.exec(url.pathname)?.[1].toUpperCase() ?? null;
      return { ...unknown, size: Number(response.headers.get("content-length")) || null, quant };
    }
    const manifest = await (await fetch(url)).json();
    const dtypes = new Set(manifest.tensors.map((t) => t.dtype));
    return {
      ...unknown,
      size: manifest.shards.reduce((sum, shard) => sum + shard.bytes, 0),
      quant: [...dtypes].join(" + "),
      context: manifest.config.max_position_embeddings ?? null,
    };
  } catch {
    return unknown;
  }
}

/** The adapter a load would get, as the browser describes it, or null. */
export async function describeAdapter() {
  const adapter = await navigator.gpu?.requestAdapter({ powerPreference: "high-performance" }).catch(() => null);
  if (!adapter) return null;
  const { vendor, architecture, device, description, isFallbackAdapter } = adapter.info ?? {};
  return {
    name: description || [vendor, architecture, device].filter(Boolean).join(" ") || "unnamed adapter",
    f16: adapter.features.has("shader-f16"),
    // The engine's subgroup reduction also needs WGSL's subgroup_id (Chrome 144 and later).
    subgroups: adapter.features.has("subgroups") && Boolean(navigator.gpu.wgslLanguageFeatures?.has("subgroup_id")),
    fallback: Boolean(isFallbackAdapter ?? adapter.isFallbackAdapter),
    maxBufferSize: adapter.limits.maxBufferSize,
    maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize,
  };
}

/**
 * Whether `model` fits before it downloads: its size against the storage the browser still grants
 * this site (`navigator.storage.estimate()`), and the adapter's limits and features. Returns
 * `{notes, warnings}` as sentences.
 */
export async function checkFit(model, adapter) {
  const notes = [];
  const warnings = [];
  const facts = [model.size && formatBytes(model.size), model.quant, model.context && `context ${model.context.toLocaleString("en")}`];
  notes.push(facts.some(Boolean) ? facts.filter(Boolean).join(" · ") : "size unknown until it loads");
  const estimate = await navigator.storage?.estimate?.().catch(() => null);
  if (estimate?.quota) {
    const left = estimate.quota - estimate.usage;
    if (model.size && model.size > left) {
      warnings.push(`This site may store ${formatBytes(left)} more, less than the model's ${formatBytes(model.size)} (less what is cached already): the weights will download again on every load.`);
    } else {
      notes.push(`storage: ${formatBytes(left)} free for this site`);
    }
  }
  if (!adapter) {
    warnings.push("No WebGPU adapter: the model cannot run in this browser.");
    return { notes, warnings };
  }
  const offers = (has) => (has ? "yes" : "no");
  notes.push(`GPU: ${adapter.name}, offering shader-f16 ${offers(adapter.f16)}, subgroups ${offers(adapter.subgroups)}; `
    + `buffers up to ${formatBinary(adapter.maxBufferSize)}, bindings up to ${formatBinary(adapter.maxStorageBufferBindingSize)} (larger matrices are split)`);
  if (model.vram) {
    notes.push(`needs about ${formatBytes(model.vram)} of GPU memory with a ${model.vramContext.toLocaleString("en")}-token KV cache (browsers do not say how much there is)`);
  }
  if (model.entry && typeof llama.checkFit === "function") {
    const report = await llama.checkFit(model.entry, { context: model.vramContext }).catch(() => null);
    for (const problem of report?.problems ?? []) warnings.push(`It will not load: ${problem}.`);
  }
  if (adapter.fallback) warnings.push("This is a software adapter (no GPU acceleration): expect seconds per token beyond the smallest models.");
  if (!adapter.f16) warnings.push("No shader-f16: the KV cache takes f32, twice the memory per token.");
  return { notes, warnings };
}
