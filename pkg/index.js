// llama-webgpu's JS API: an OpenAI-shaped engine (chat and text completions, responses) running Llama in
// WebGPU, in a Web Worker by default so the page never blocks.
import { createHandler } from "./protocol.js";
import catalog from "./models.json" with { type: "json" };

export class LlamaWebGpuError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}
/** The browser has no WebGPU, or offers no adapter. */
export class NoWebGpuError extends LlamaWebGpuError {}
/** An adapter limit is below what the engine needs; the message has the numbers. */
export class LimitError extends LlamaWebGpuError {}
/** Fetching, checking or uploading the model failed; the message names the file. */
export class LoadError extends LlamaWebGpuError {}
/** The request was aborted through its signal. */
export class AbortError extends LlamaWebGpuError {}
/** A request (or an option of createEngine) asks for what is not supported; `param` names the field. */
export class RequestError extends LlamaWebGpuError {
  constructor(message, param = null) {
    super(message);
    this.param = param;
  }
}
/** The GPU device was lost (a driver reset, the browser reclaiming it): `engine.reload()` makes a new one. */
export class DeviceLostError extends LlamaWebGpuError {}
/** Anything else the engine failed at. */
export class EngineError extends LlamaWebGpuError {}

const ERRORS = { NoWebGpuError, LimitError, LoadError, AbortError, RequestError, DeviceLostError, EngineError };

function toError({ name, message, param }) {
  return new (ERRORS[name] ?? EngineError)(message, param);
}

/** A port to an engine on this thread, with the worker's postMessage/onmessage shape. */
function mainThreadPort() {
  const port = { onmessage: null };
  const handle = import("./llama_webgpu.js").then(async (wasm) => {
    await wasm.default();
    return createHandler(wasm, (data) => port.onmessage?.({ data }));
  });
  port.postMessage = (data) => handle.then((h) => h(data));
  port.terminate = () => {};
  return port;
}

/** The name of the Cache API bucket that holds downloaded weights. */
export const CACHE_NAME = "llama-webgpu-shards";

/**
 * Deletes the cached weights of `model` (its URL, as given to createEngine), or of every model
 * without one (e.g. after a model changed under the same URL).
 */
export async function clearModelCache(model, { hubEndpoint = HUB_ENDPOINT } = {}) {
  if (!globalThis.caches) return false;
  if (model === undefined) return caches.delete(CACHE_NAME);
  const cache = await caches.open(CACHE_NAME);
  const ofModel = model.startsWith("hf:") ? isHubFileOf(model, hubEndpoint) : isStoredFileOf(new URL(model, globalThis.location?.href).href);
  const keys = (await cache.keys()).filter((request) => ofModel(request.url));
  await Promise.all(keys.map((request) => cache.delete(request)));
  return keys.length > 0;
}

/** Where `hf:` references are looked up unless `hubEndpoint` says otherwise. */
const HUB_ENDPOINT = "https://huggingface.co";

/** Whether a cache key is of the model at `url`: a GGUF file's ranges are kept under its URL and a query, a shard folder's files beside its manifest. */
function isStoredFileOf(url) {
  if (new URL(url).pathname.toLowerCase().endsWith(".gguf")) return (key) => key === url || key.startsWith(`${url}?`) || key.startsWith(`${url}&`);
  return (key) => key.startsWith(url.slice(0, url.lastIndexOf("/") + 1));
}

/**
 * Whether a cache key is of a file `hf:OWNER/REPO/FILE.gguf` names, or of any file of the repository in
 * the quant `hf:OWNER/REPO:QUANT` names (or in any quant, for `hf:OWNER/REPO`), read from the Hub's
 * resolve URLs as the engine reads them.
 */
function isHubFileOf(reference, endpoint) {
  const [path, quant] = reference.slice(3).split(":");
  const [owner, repo, ...file] = path.split("/");
  const base = `${endpoint.replace(/\/$/, "")}/${owner}/${repo}/resolve/main/`;
  return (key) => {
    if (!key.startsWith(base)) return false;
    const name = key.slice(base.length).split("?")[0];
    if (file.length) return name === file.join("/");
    return !quant || name.toLowerCase().endsWith(`${quant.toLowerCase()}.gguf`);
  };
}

/** What each load stage's progress report says. */
const STAGE_TEXT = {
  "self-test": "checking the kernels on this GPU",
  download: "downloading and uploading weights",
  cache: "uploading cached weights",
  prepare: "allocating the KV cache",
};

/** The context the catalog's and checkFit's estimates are for unless told: a long chat's worth. */
const ESTIMATE_CONTEXT = 8192;
/** Positions in a KV page: the pool's unit. */
const KV_PAGE = 16;

/** KV cache bytes per position of a catalog model: keys and values of every layer. */
function kvBytesPerPosition(model, elementBytes) {
  return 2 * model.layers * model.kvHeads * model.headDim * elementBytes;
}

/** An `hf:` reference to a catalog model's file. */
function referenceOf(model) {
  return `hf:${model.repo}/${model.file}`;
}

/**
 * Llama 3.1 / 3.2 Instruct GGUF files on the Hub in quants whose tensor types the engine reads, each with its `hf:` reference (a `model` for createEngine)
 * and the GPU memory it takes with an f16 KV cache of `vramContext` positions.
 */
export function listModels() {
  return catalog.map((model) => ({
    ...model,
    reference: referenceOf(model),
    vramBytes: model.size + ESTIMATE_CONTEXT * kvBytesPerPosition(model, 2),
    vramContext: ESTIMATE_CONTEXT,
  }));
}

/**
 * Whether a catalog model (an entry of listModels(), or its id or reference) will load on this
 * browser's WebGPU adapter with a context of `context` positions, before anything is downloaded.
 * @param {import("./index.d.ts").CatalogModel | string} model
 * @param {{context?: number, adapter?: GPUAdapter}} options
 * @returns {Promise<import("./index.d.ts").FitReport>}
 */
export async function checkFit(model, { context = ESTIMATE_CONTEXT, adapter, kvType } = {}) {
  const entry = typeof model === "string" ? catalog.find((m) => m.id === model || referenceOf(m) === model) : model;
  if (!entry?.layers) throw new RequestError(`checkFit: ${JSON.stringify(model)} is not a model of listModels()`, "model");
  adapter ??= await globalThis.navigator?.gpu?.requestAdapter({ powerPreference: "high-performance" });
  const problems = [];
  const warnings = [];
  if (!adapter) problems.push("this browser has no WebGPU adapter");
  // Unless told, the engine's choice: an f16 KV cache where the adapter has shader-f16.
  kvType ??= adapter?.features.has("shader-f16") ? "f16" : "f32";
  // q8_0: a byte per element and an f32 scale per 32.
  const kvElementBytes = { f32: 4, f16: 2, q8_0: 1.125 }[kvType];
  if (!kvElementBytes) throw new RequestError(`checkFit: kvType ${JSON.stringify(kvType)} is not a KV type: "f16", "f32" or "q8_0"`, "kvType");
  // The KV cache spans as many buffers as it needs; the RoPE table (a cos and a sin per frequency
  // pair and position, f32) must bind whole.
  const binding = adapter ? Math.min(adapter.limits.maxStorageBufferBindingSize, adapter.limits.maxBufferSize) : 0;
  const maxContext = Math.min(entry.context, Math.floor(binding / (4 * entry.headDim)));
  if (context > entry.context) problems.push(`a context of ${context} exceeds the model's ${entry.context}`);
  else if (adapter && context > maxContext) {
    problems.push(`a context of ${context} needs a RoPE table larger than the adapter binds (${binding} bytes): at most ${maxContext} positions`);
  }
  const kvBytes = Math.ceil(context / KV_PAGE) * KV_PAGE * kvBytesPerPosition(entry, kvElementBytes);
  const estimate = await globalThis.navigator?.storage?.estimate?.().catch(() => null);
  const storageAvailable = estimate ? Math.max(0, estimate.quota - (estimate.usage ?? 0)) : null;
  if (storageAvailable !== null && storageAvailable < entry.size) {
    const mib = (bytes) => (bytes / 2 ** 20).toFixed(0);
    warnings.push(`the storage quota has ${mib(storageAvailable)} MiB left for a ${mib(entry.size)} MiB file: it would download again on every load`);
  }
  if (adapter?.info?.isFallbackAdapter) warnings.push("the adapter is a software fallback: expect seconds per token");
  return {
    fits: problems.length === 0,
    problems,
    warnings,
    context,
    maxContext,
    kvType,
    weightsBytes: entry.size,
    kvBytes,
    gpuBytes: entry.size + kvBytes,
    storage: { needed: entry.size, available: storageAvailable, fits: storageAvailable === null || storageAvailable >= entry.size },
  };
}

/**
 * Loads a model and returns an engine.
 * @param {import("./index.d.ts").EngineOptions} options
 */
export async function createEngine({ model, onProgress, worker = true, ...options } = {}) {
  if (!model) throw new LoadError("createEngine: `model` (a manifest.json or .gguf URL, an hf: reference or a listModels() entry) is required");
  // A catalog entry, an `hf:` reference (the engine finds its file on the Hub) or a URL.
  const reference = typeof model === "object" ? referenceOf(model) : String(model);
  const modelName = typeof model === "object" ? model.id : model;
  if (!globalThis.navigator?.gpu) throw new NoWebGpuError("this browser has no WebGPU (navigator.gpu is missing)");
  const port = worker ? new Worker(new URL("./worker.js", import.meta.url), { type: "module" }) : mainThreadPort();
  const pending = new Map();
  let nextId = 1;
  port.onmessage = ({ data }) => {
    const request = pending.get(data.id);
    if (!request) return;
    if (data.type === "result" || data.type === "error") pending.delete(data.id);
    request(data);
  };
  if (worker) {
    port.onerror = (event) => {
      const error = { type: "error", name: "LoadError", message: `the engine worker failed: ${event.message ?? "unknown error"}` };
      for (const request of pending.values()) request(error);
      pending.clear();
    };
  }
  let unloaded = false;
  const call = (message, onEvent, id = nextId++) =>
    new Promise((resolve, reject) => {
      if (unloaded) throw new EngineError("the engine was unloaded");
      pending.set(id, (data) => {
        if (data.type === "result") resolve(data.value);
        else if (data.type === "error") reject(toError(data));
        else onEvent?.(data);
      });
      port.postMessage({ ...message, id });
    });

  // Page-relative URLs are made absolute here: the worker's base is its own script's.
  const absolute = (reference) => (reference.startsWith("hf:") ? reference : new URL(reference, globalThis.location?.href).href);
  const url = absolute(reference);
  if (options.draftModel !== undefined) {
    const draft = options.draftModel;
    options.draftModel = absolute(typeof draft === "object" ? referenceOf(draft) : String(draft));
  }
  const load = (report) => {
    const started = performance.now();
    return call({ type: "load", url, options }, ({ done, total, tensor, stage }) =>
      report?.({
        progress: total ? done / total : 0,
        loaded: done,
        total,
        timeElapsed: (performance.now() - started) / 1000,
        stage,
        text: tensor ? `${STAGE_TEXT[stage]}: ${tensor}` : STAGE_TEXT[stage],
      }));
  };
  let info;
  try {
    info = await load(onProgress);
  } catch (error) {
    // A failed load leaves nothing behind: the worker and its GPU device go.
    port.terminate();
    throw error;
  }

  // Requests run together in the engine (continuous batching), each under its own message id.
  const create = (type) => (params) => {
    const { signal, onPrefillProgress, ...request } = params;
    // The engine reads the request and makes the response objects (as serve does); this side
    // only carries them.
    const response = { uuid: crypto.randomUUID(), model: modelName };
    const queue = [];
    let wake = null;
    const push = (item) => { queue.push(item); wake?.(); };
    const requestId = nextId++;
    const abort = () => port.postMessage({ type: "abort", id: requestId });
    const run = (async () => {
      if (signal?.aborted) throw new AbortError("the request was aborted before it started");
      signal?.addEventListener("abort", abort);
      try {
        const result = await call({ type, request, response }, ({ chunk, prefill }) => {
          if (prefill) onPrefillProgress?.(prefill.done, prefill.total);
          else push(chunk);
        }, requestId);
        if (result.status === "cancelled" || result.choices?.some((c) => c.finish_reason === "abort")) throw new AbortError("the request was aborted");
        return result;
      } finally {
        signal?.removeEventListener("abort", abort);
      }
    })();
    if (request.stream !== true) return run;
    run.then(() => push({ done: true }), (error) => push({ error }));
    return {
      async *[Symbol.asyncIterator]() {
        let finished = false;
        try {
          for (;;) {
            if (!queue.length) await new Promise((resolve) => (wake = resolve));
            wake = null;
            const item = queue.shift();
            if (item.error) {
              finished = true;
              throw item.error;
            }
            if (item.done) {
              finished = true;
              return;
            }
            yield item;
          }
        } finally {
          // The consumer stopped early (break, return, a throw in its loop): stop generating.
          if (!finished) {
            abort();
            await run.catch(() => {});
          }
        }
      },
    };
  };

  return {
    chat: { completions: { create: create("chat") } },
    completions: { create: create("complete") },
    /** OpenAI's Responses API; responses are kept in the engine's memory unless `store: false`. */
    responses: {
      create: create("respond"),
      retrieve: (responseId) => call({ type: "retrieveResponse", responseId }),
      delete: (responseId) => call({ type: "deleteResponse", responseId }),
      inputItems: { list: (responseId, options = {}) => call({ type: "responseInputItems", responseId, options }) },
    },
    info: () => info,
    status: async () => (await call({ type: "info" })).load,
    /** The tokens a completion's prompt or a chat's messages run as (serve's /tokenize). */
    tokenize: (request) => call({ type: "tokenize", request }),
    /** The text of token ids (serve's /detokenize). */
    detokenize: (tokens) => call({ type: "detokenize", request: { tokens } }),
    /** Loads the model again on a new GPU device (weights from the Cache API), after a DeviceLostError. */
    async reload({ onProgress: report = onProgress } = {}) {
      info = await load(report);
      return info;
    },
    async unload() {
      const done = call({ type: "unload" });
      unloaded = true;
      await done;
      port.terminate();
      // Requests still running end here: their results would come from the worker just stopped.
      for (const request of pending.values()) request({ type: "error", name: "AbortError", message: "the engine was unloaded" });
      pending.clear();
    },
  };
}
