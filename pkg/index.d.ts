export interface EngineOptions {
  /**
   * URL of a shard folder's manifest.json (made by `llama-webgpu convert`) or of a GGUF file (read
   * with HTTP Range requests), relative to the page. Weights are kept in the Cache API.
   */
  model: string;
  onProgress?: (report: LoadProgress) => void;
  /** Positions the KV cache holds; default min(4096, the model's maximum). */
  contextLength?: number;
  /** Caps the storage binding size below the adapter's (bytes); for testing the split path. */
  maxStorageBinding?: number;
  /**
   * The most requests generating together (continuous batching); more wait for a place. Default 4.
   */
  maxSequences?: number;
  /**
   * Bytes of GPU memory for the KV cache, shared by the running requests in pages of 16 positions.
   * Default: one full context, shared by the running requests. A request reserves the pages its prompt and
   * `max_tokens` (without it: the context) can reach, and waits while they are not free.
   */
  kvMemory?: number;
  /**
   * Encode special-token text inside message content (`<|eot_id|>`, ...) as special tokens, as
   * transformers does. Default false: content is encoded as the text it is, so a user or a document
   * cannot forge turns; the chat template's own markup keeps its special tokens either way.
   */
  specialTokensInContent?: boolean;
  /** Run the engine in a Web Worker (default) or on this thread. */
  worker?: boolean;
}

export interface LoadProgress {
  /** 0..1 of the weight bytes uploaded. */
  progress: number;
  loaded: number;
  total: number;
  /** Seconds since loading started. */
  timeElapsed: number;
  text: string;
}

export interface ChatMessage {
  role: "system" | "user" | "assistant" | "tool" | "ipython";
  content?: string;
  name?: string;
  tool_call_id?: string;
}

export interface ChatCompletionParams {
  messages: ChatMessage[];
  stream?: boolean;
  /** 0 is greedy. */
  temperature?: number;
  top_p?: number;
  top_k?: number;
  min_p?: number;
  repetition_penalty?: number;
  frequency_penalty?: number;
  presence_penalty?: number;
  max_tokens?: number;
  stop?: string | string[];
  seed?: number;
  /**
   * Choices to generate, 1 (the default) to 128: they share the prompt's KV pages (computed once),
   * and with a `seed`, choice i samples as a request with seed + i.
   */
  n?: number;
  signal?: AbortSignal;
}

export type FinishReason = "stop" | "length" | "abort";

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  /** Prompt tokens whose KV cache entries were reused from an earlier or running request. */
  cached_prompt_tokens: number;
}

export interface ChatCompletion {
  id: string;
  object: "chat.completion";
  created: number;
  model: string;
  /** One per choice (`n`), in order. */
  choices: { index: number; message: { role: "assistant"; content: string }; finish_reason: FinishReason; logprobs: null; token_ids: number[] }[];
  /** The prompt counted once, the tokens of every choice. */
  usage: Usage;
}

export interface ChatCompletionChunk {
  id: string;
  object: "chat.completion.chunk";
  created: number;
  model: string;
  /** One choice, by its index; each choice ends with a chunk holding its finish_reason. */
  choices: [{ index: number; delta: { content?: string }; finish_reason: FinishReason | null; logprobs: null; token_ids: number[] }];
  /** On the last chunk only. */
  usage?: Usage;
}

export interface EngineInfo {
  /** The adapter as the browser describes it (`GPUAdapterInfo`) where it does. */
  adapter: { name: string; vendor: number | string; architecture?: string; description?: string; device_type: string; backend: string };
  features: string[];
  limits: Record<string, number>;
  model: { layers: number; hidden_size: number; vocab_size: number; context_length: number };
  /** "cache" when the weights are kept in the Cache API, else "network (why not)". */
  weights: string;
  /** Bytes of wasm memory after loading (its peak: wasm memory never shrinks). */
  wasm_memory_bytes: number;
  /** The engine's load when the model had loaded (`Engine.status()` has it now). */
  load: EngineLoad;
}

export interface EngineLoad {
  /** Requests generating. */
  running: number;
  /** Requests waiting for a place (`max_sequences`) or for KV pages. */
  waiting: number;
  max_sequences: number;
  /**
   * Pages in the KV pool, and those no request holds (some of them reserved for running requests'
   * later tokens, some keeping a cached prompt prefix).
   */
  kv_pages: number;
  kv_pages_free: number;
  /** Positions per page. */
  kv_page_size: number;
}

export interface Engine {
  chat: {
    completions: {
      /**
       * Requests made while others run generate together with them; each streams and aborts
       * (`signal`, or leaving a stream early) on its own.
       */
      create(params: ChatCompletionParams & { stream: true }): AsyncIterable<ChatCompletionChunk>;
      create(params: ChatCompletionParams & { stream?: false }): Promise<ChatCompletion>;
    };
  };
  /** What was loaded, as of the end of loading. */
  info(): EngineInfo;
  /** The engine's load now. */
  status(): Promise<EngineLoad>;
  /** Frees the GPU memory; requests still running reject with `AbortError`. */
  unload(): Promise<void>;
}

export function createEngine(options: EngineOptions): Promise<Engine>;

/** The Cache API bucket that holds downloaded weights. */
export const CACHE_NAME: string;
/** Deletes every cached model; resolves to whether there was a cache to delete. */
export function clearModelCache(): Promise<boolean>;

export class LlamaWebGpuError extends Error {}
export class NoWebGpuError extends LlamaWebGpuError {}
export class LimitError extends LlamaWebGpuError {}
export class LoadError extends LlamaWebGpuError {}
export class AbortError extends LlamaWebGpuError {}
export class EngineError extends LlamaWebGpuError {}
