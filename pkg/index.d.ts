export interface EngineOptions {
  /**
   * URL of a shard folder's manifest.json (made by `llama-webgpu convert`) or of a GGUF file (read
   * with HTTP Range requests), relative to the page; an `hf:` reference to a GGUF file on the
   * Hugging Face Hub (`hf:OWNER/REPO/FILE.gguf`, or `hf:OWNER/REPO:QUANT` such as
   * `hf:bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M`, looked up in the repository's file list);
   * or an entry of `listModels()`. Weights are kept in the Cache API.
   */
  model: string | CatalogModel;
  /** Where `hf:` references are looked up: default "https://huggingface.co" (or a mirror). */
  hubEndpoint?: string;
  onProgress?: (report: LoadProgress) => void;
  /**
   * Positions one request may reach; default the model's maximum (131,072 for Llama 3.1), or as many
   * as the KV cache the GPU's memory holds (`info().model.context_length` says which).
   */
  contextLength?: number;
  /** Caps the storage binding size below the adapter's (bytes); for testing the split path. */
  maxStorageBinding?: number;
  /**
   * The most requests generating together (continuous batching); more wait for a place. Default 4.
   */
  maxSequences?: number;
  /**
   * Bytes of GPU memory for the KV cache, shared by the running requests in pages of 16 positions.
   * Default: one full context, shared by the running requests, halved while the GPU's memory cannot
   * hold it. A request starts when its prompt's pages are free and takes more as it generates;
   * when none is left, the request started last gives its pages back and is computed again later.
   */
  kvMemory?: number;
  /**
   * The KV cache's element type: "f16" (half the memory of "f32", logits within about 1e-2 of it)
   * where the adapter has shader-f16, which is the default there; "f32" elsewhere. "f16" on an
   * adapter without shader-f16 fails with a LimitError.
   */
  kvType?: "f16" | "f32" | "q8_0";
  /**
   * The format matrices stored as f32, f16 or bf16 (an F16 GGUF's) are re-encoded into as they
   * stream to the GPU, a chunk at a time, e.g. "q4_0" (a quarter of f16's memory) or "q8_0": the
   * bytes `llama-webgpu convert --quant` writes. Matrices already in a block format are kept.
   * Default: every matrix as stored.
   */
  quant?: "q4_0" | "q4_1" | "q5_0" | "q5_1" | "q8_0" | "q2_k" | "q3_k" | "q4_k" | "q5_k" | "q6_k" | "iq4_nl" | "iq4_xs" | "f16" | "bf16" | "f32";
  /**
   * Matmuls of block-quantized weights (the llama.cpp formats) take their inputs rounded
   * to int8 blocks of 32, and decode multiplies them with integer dot products, as llama.cpp does:
   * fewer bytes and instructions per weight, logits no longer exact to f32 inputs (log
   * probabilities move by up to about 0.15 on SmolLM2-135M). Default false.
   */
  q8Activations?: boolean;
  /**
   * The decode matmuls sum through workgroup memory even where the browser offers subgroups (with
   * WGSL's `subgroup_id`), as they do where it does not: for a GPU whose subgroup operations fail
   * the load's self-test. Default false.
   */
  noSubgroups?: boolean;
  /**
   * Speculative decoding by prompt lookup: a request drafts the
   * tokens that followed an earlier occurrence of its last 2-4 tokens, in its prompt or output,
   * and verifies up to 6 in one pass, keeping those the model chooses too, while fewer than 7
   * requests decode. Pays where the output repeats the input (editing, extraction, code); the
   * tokens are those of plain decoding. A request's `prediction` drafts whatever this says.
   * Default false.
   */
  promptLookup?: boolean;
  /**
   * A reasoning model's thought (DeepSeek-R1's distilled Llamas write `<think>` ... `</think>`
   * before answering): "auto" gives it apart from the answer, as the message's and deltas'
   * `reasoning` and `reasoning_content` (a response's `reasoning` item), where the model's template speaks of
   * `<think>` and its vocabulary has both markers as tokens; "none" leaves it in the content.
   * Where the prompt opens the thought, a `response_format` or required tool call shapes the
   * answer after it. Default "auto".
   */
  reasoningFormat?: "auto" | "none";
  /**
   * What a request that sets no temperature, top_p, top_k, min_p or repetition_penalty samples
   * with: "model", as the model's files recommend (generation_config.json, a GGUF's
   * general.sampling.*; `info().model.recommended_sampling`), as vLLM and llama.cpp do; "none",
   * OpenAI's defaults (temperature 1, every token). Each setting a request gives is its own.
   * Default "model".
   */
  samplingDefaults?: "model" | "none";
  /**
   * Speculative decoding with a draft model: a smaller model with the same tokenizer (Llama 3.2
   * 1B for Llama 3.1 8B), given as `model` is, loaded after the model on the same device with as
   * many KV pages; it drafts up to 6 tokens a step for each request while fewer than 7 decode,
   * which the model verifies in one pass. The tokens are those of plain decoding.
   */
  draftModel?: string | CatalogModel;
  /**
   * Encode special-token text inside message content (`<|eot_id|>`, ...) as special tokens, as
   * transformers does. Default false: content is encoded as the text it is, so a user or a document
   * cannot forge turns; the chat template's own markup keeps its special tokens either way.
   */
  specialTokensInContent?: boolean;
  /** A chat template (Jinja) in place of the model's, e.g. for a GGUF that carries none; it reads the model's `bos_token` and `eos_token`. */
  chatTemplate?: string;
  /** Bytes of the responses kept for `previous_response_id` (default 64 MiB; the oldest go first, 0 keeps none). They outlive `unload`. */
  responseStore?: number;
  /** Run the engine in a Web Worker (default) or on this thread. */
  worker?: boolean;
  // Other options are refused with a RequestError naming them.
}

/**
 * A load's stages, in order: "self-test" (the kernels checked on this GPU), then per chunk of weights
 * uploaded "download" (fetched now) or "cache" (stored by an earlier load), then "prepare" once every
 * weight is on the GPU (the KV cache allocated, the passes built).
 */
export type LoadStage = "self-test" | "download" | "cache" | "prepare";

export interface LoadProgress {
  /** 0..1 of the weight bytes uploaded. */
  progress: number;
  /** Weight bytes uploaded (0 before the weights). */
  loaded: number;
  /** Weight bytes in all (0 before the weights). */
  total: number;
  /** Seconds since loading started. */
  timeElapsed: number;
  stage: LoadStage;
  /** The stage, and the tensor last uploaded, in words. */
  text: string;
}

export interface ChatMessage {
  role: "system" | "user" | "assistant" | "tool" | "ipython";
  content?: string | null;
  name?: string;
  /** An assistant's calls, sent back with the conversation; `arguments` as JSON text or an object. */
  tool_calls?: { id?: string; type?: "function"; function: { name: string; arguments: string | object } }[];
  tool_call_id?: string;
  /** An assistant's thought, sent back as a response gave it (`reasoning` is taken too). */
  reasoning_content?: string;
  reasoning?: string;
}

/** A function the model may call; the JSON keys keep their order into the prompt. */
export interface Tool {
  type: "function";
  function: { name: string; description?: string; parameters?: object; [key: string]: unknown };
}

/** "none" hides the tools; "required" or a named function makes the output calls (constrained decoding). */
export type ToolChoice = "none" | "auto" | "required" | { type: "function"; function: { name: string } };

/** What the output must be (constrained decoding). */
export type ResponseFormat =
  | { type: "text" }
  | { type: "json_object" }
  | { type: "json_schema"; json_schema: { name?: string; description?: string; schema?: object; strict?: boolean } }
  /** Lark as llguidance reads it (`%json {...}` embeds a JSON schema), or a regular expression. */
  | { type: "grammar"; grammar: { syntax: "lark" | "regex"; definition: string } };

/**
 * What chat and text completion requests share. A field not listed here, or a value of the wrong
 * type or range, is refused with a `RequestError` naming it; null is the same as absent.
 */
export interface SamplingParams {
  stream?: boolean;
  /** 0 is greedy. */
  temperature?: number;
  top_p?: number;
  top_k?: number;
  min_p?: number;
  repetition_penalty?: number;
  frequency_penalty?: number;
  presence_penalty?: number;
  /** Token id (as a string) -> bias added to its logit. */
  logit_bias?: Record<string, number>;
  max_tokens?: number;
  /** Another name for `max_tokens`. */
  max_completion_tokens?: number;
  stop?: string | string[];
  seed?: number;
  /**
   * Choices to generate of each prompt, 1 (the default) to 128 in all: they share the prompt's KV
   * pages (computed once), and with a `seed`, choice i of a prompt samples as a request with seed + i.
   */
  n?: number;
  response_format?: ResponseFormat;
  /**
   * Text the output is expected to be much like (OpenAI's Predicted Outputs): the request drafts
   * its tokens from it and verifies several a pass; the output is the same as without (a sampled
   * one's for the same seed).
   */
  prediction?: { type: "content"; content: string | { type: "text"; text: string }[] };
  /** Ignored: the engine runs the model it loaded. */
  model?: string;
  signal?: AbortSignal;
  /**
   * Called after each pass that computed a chunk of a prompt longer than one pass (256 tokens):
   * `done` of the prompt's `total` tokens are in the KV cache (fewer than before where the request
   * gave its pages back to a full pool and starts over from what stayed cached).
   */
  onPrefillProgress?: (done: number, total: number) => void;
}

export interface ChatCompletionParams extends SamplingParams {
  messages: ChatMessage[];
  tools?: Tool[];
  /** Default "auto" when tools are given. */
  tool_choice?: ToolChoice;
  /** Whether a required call may be followed by more (default true). */
  parallel_tool_calls?: boolean;
  /** Llama 3.1's built-in tools to enable: "brave_search", "wolfram_alpha", "code_interpreter". */
  builtin_tools?: string[];
  /**
   * More variables for the chat template, e.g. `{ enable_thinking: false }` where the template
   * lets a reasoning model answer at once; not the request's own (messages, tools, ...).
   */
  chat_template_kwargs?: Record<string, unknown>;
  /** Return each output token's log probability (`choices[].logprobs`). */
  logprobs?: boolean;
  /** With `logprobs: true`: the most likely alternatives to return with each token, 0 to 20. */
  top_logprobs?: number;
}

/**
 * What `tokenize` tokenizes: a completion's text prompt (after the model's BOS token unless
 * `add_special_tokens` is false), or a chat's messages and tools as its template renders them.
 */
export type TokenizeParams = ({ prompt: string; add_special_tokens?: boolean } | {
  messages: ChatMessage[];
  tools?: Tool[];
  builtin_tools?: string[];
  /** The assistant header the model's answer follows (default true, as a chat request has it). */
  add_generation_prompt?: boolean;
}) & {
  /** Each token's piece of the vocabulary too (`token_strs`). */
  return_token_strs?: boolean;
};

export interface Tokenized {
  count: number;
  /** Positions a sequence may reach (the context). */
  max_model_len: number;
  tokens: number[];
  token_strs: string[] | null;
}

/**
 * A raw text completion: the model's BOS token then `prompt`, no chat template; or token ids, run
 * as given. Several prompts (a list of strings or of id lists) run together, `n` choices each,
 * numbered prompt by prompt (choice i is prompt floor(i / n)'s).
 */
export interface CompletionParams extends SamplingParams {
  prompt: string | number[] | (string | number[])[];
  /** The most likely alternatives to return with each token's log probability, 0 to 20. */
  logprobs?: number;
  /**
   * Give the prompt back before the completion (streamed: in a chunk of its own before the first
   * token's); with `logprobs`, every prompt
   * token's log probability given the tokens before it too (the first's is null). `max_tokens: 0`
   * (only with `echo`) asks for the prompt alone.
   */
  echo?: boolean;
}

export type FinishReason = "stop" | "length" | "tool_calls" | "abort";

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  /** cached_tokens: prompt tokens whose KV cache entries were reused from an earlier or running request. */
  prompt_tokens_details: { cached_tokens: number };
  /**
   * Where the request brought a `prediction` or drafted by prompt lookup: the drafted tokens the
   * model chose too, and those it did not.
   */
  completion_tokens_details?: { accepted_prediction_tokens?: number; rejected_prediction_tokens?: number; reasoning_tokens?: number };
}

/** A call the model made; `arguments` is JSON text. */
export interface ToolCall {
  id: string;
  type: "function";
  function: { name: string; arguments: string };
}

/**
 * A token's log probability under the model (before sampling options and grammar masks). `token`
 * is the text of `bytes`, a character cut in half shown as U+FFFD.
 */
export interface TokenLogprob {
  token: string;
  logprob: number;
  bytes: number[];
  /** The most likely tokens, most likely first. */
  top_logprobs: { token: string; logprob: number; bytes: number[] }[];
}

export interface ChatLogprobs {
  content: TokenLogprob[];
  refusal: null;
}

/** Text completions' logprobs, OpenAI's legacy shape: parallel lists, one entry per token. */
export interface TextLogprobs {
  tokens: string[];
  token_logprobs: number[];
  /** Each token's alternatives, token text -> log probability. */
  top_logprobs: Record<string, number>[];
  /** Characters from the start of the completion. */
  text_offset: number[];
}

export interface ChatCompletion {
  id: string;
  object: "chat.completion";
  created: number;
  model: string;
  /** One per choice (`n`), in order. `content` is null when the output is only calls. */
  choices: {
    index: number;
    /**
     * A reasoning model's thought, apart from its answer (`reasoningFormat`), under both names
     * clients read: `reasoning` and `reasoning_content`.
     */
    message: { role: "assistant"; content: string | null; reasoning?: string; reasoning_content?: string; tool_calls?: ToolCall[] };
    logprobs: ChatLogprobs | null;
    finish_reason: FinishReason;
    token_ids: number[];
  }[];
  /** The prompt counted once, the tokens of every choice. */
  usage: Usage;
}

export interface ChatCompletionChunk {
  id: string;
  object: "chat.completion.chunk";
  created: number;
  model: string;
  /**
   * One choice, by its index: first the assistant's role (content ""), then a token's text, then
   * (after its last token) a chunk per tool call, then a chunk holding its finish_reason.
   */
  choices: [{
    index: number;
    delta: { role?: "assistant"; content?: string; reasoning?: string; reasoning_content?: string; tool_calls?: (ToolCall & { index: number })[] };
    logprobs: ChatLogprobs | null;
    finish_reason: FinishReason | null;
    token_ids: number[];
  }];
  /** On the last chunk only. */
  usage?: Usage;
}

export interface TextCompletion {
  id: string;
  object: "text_completion";
  created: number;
  model: string;
  choices: { index: number; text: string; logprobs: TextLogprobs | null; finish_reason: FinishReason; token_ids: number[] }[];
  usage: Usage;
}

export interface TextCompletionChunk {
  id: string;
  object: "text_completion";
  created: number;
  model: string;
  /** One choice, by its index; `text_offset` counts from the start of that choice's text. */
  choices: [{ index: number; text: string; logprobs: TextLogprobs | null; finish_reason: FinishReason | null; token_ids: number[] }];
  /** On the last chunk only. */
  usage?: Usage;
}

/** A turn of a Responses API input: a message (`type` may be left out), a call, or a call's output. */
export type ResponseInputItem =
  | { type?: "message"; role: "user" | "assistant" | "system" | "developer"; content: string | { type: "input_text" | "output_text"; text: string }[] }
  | { type: "function_call"; call_id: string; name: string; arguments: string; id?: string; status?: string }
  | { type: "function_call_output"; call_id: string; output: string | { type: "input_text"; text: string }[] }
  | ReasoningItem;

/**
 * OpenAI's Responses API request: it runs as the chat of the same turns (`instructions` as the
 * system message), so the chat's sampling fields apply too (`seed`, `stop`, `top_k`, ...).
 */
export interface ResponseCreateParams extends Omit<SamplingParams, "max_tokens" | "response_format" | "logprobs" | "top_logprobs"> {
  input?: string | ResponseInputItem[];
  instructions?: string;
  /** Continues a kept response: its turns come before `input`. */
  previous_response_id?: string;
  /** Keep the response for `previous_response_id` and `responses.retrieve` (default true). */
  store?: boolean;
  tools?: { type: "function"; name: string; description?: string; parameters?: object; strict?: boolean }[];
  tool_choice?: "none" | "auto" | "required" | { type: "function"; name: string };
  parallel_tool_calls?: boolean;
  max_output_tokens?: number;
  text?: { format: { type: "text" } | { type: "json_object" } | { type: "json_schema"; name?: string; description?: string; schema?: object; strict?: boolean } | { type: "grammar"; grammar: { syntax: "lark" | "regex"; definition: string } } };
  /** `["message.output_text.logprobs"]` returns each output token's log probability. */
  include?: string[];
  top_logprobs?: number;
  metadata?: Record<string, string>;
  user?: string;
  signal?: AbortSignal;
  onPrefillProgress?: (done: number, total: number) => void;
}

/** A reasoning model's thought, given back as it came (models' templates leave earlier thoughts out). */
export type ReasoningItem = { type: "reasoning"; id: string; summary: []; content: { type: "reasoning_text"; text: string }[] };

export type ResponseOutputItem =
  | ReasoningItem
  | { type: "message"; id: string; status: string; role: "assistant"; content: { type: "output_text"; text: string; annotations: []; logprobs?: TokenLogprob[] }[] }
  | { type: "function_call"; id: string; call_id: string; name: string; arguments: string; status: string };

export interface Response {
  id: string;
  object: "response";
  created_at: number;
  /** "incomplete" where max_output_tokens (or the context) cut it short. */
  status: "in_progress" | "completed" | "incomplete" | "cancelled" | "failed";
  incomplete_details: { reason: "max_output_tokens" } | null;
  model: string;
  /**
   * A reasoning model's thought (a `reasoning` item), the message (none where the output is only
   * calls), then a function_call item per call.
   */
  output: ResponseOutputItem[];
  usage: { input_tokens: number; input_tokens_details: { cached_tokens: number }; output_tokens: number; output_tokens_details: { reasoning_tokens: number }; total_tokens: number } | null;
  previous_response_id: string | null;
  store: boolean;
  [setting: string]: unknown;
}

/** A page of a response's input items, as OpenAI lists them; each item has an `id`. */
export interface ResponseItemList {
  object: "list";
  data: ((ResponseInputItem & { id: string; status: string }) | ResponseOutputItem)[];
  first_id: string | null;
  last_id: string | null;
  has_more: boolean;
}

/** One of Responses' streamed events; `type` says which, e.g. "response.output_text.delta" with `delta`. */
export interface ResponseStreamEvent {
  type: string;
  sequence_number: number;
  response?: Response;
  item?: ResponseOutputItem;
  output_index?: number;
  delta?: string;
  [member: string]: unknown;
}

export interface EngineInfo {
  /** The adapter as the browser describes it (`GPUAdapterInfo`) where it does. */
  adapter: { name: string; vendor: number | string; architecture?: string; description?: string; device_type: string; backend: string };
  /** Optional features the engine uses: "SHADER_F16" (f16 KV), "SUBGROUP" (the decode matmuls' sums
   * reduced with subgroup operations, where the browser offers `subgroups` with WGSL's
   * `subgroup_id`, as Chrome 144 and later do). */
  features: string[];
  /** The KV cache's element type (the `kvType` option or its default). */
  kv_type: "f16" | "f32" | "q8_0";
  /** Buffers each layer's keys (and values) lie in: more than one where the binding limit is smaller than a layer's share of the pool. */
  kv_buffers_per_layer: number;
  /** Whether decode matmuls run on int8 inputs (the `q8Activations` option). */
  q8_activations: boolean;
  limits: Record<string, number>;
  model: {
    layers: number;
    hidden_size: number;
    vocab_size: number;
    context_length: number;
    /** The sampling the model's files recommend (`samplingDefaults`). */
    recommended_sampling: { temperature?: number; top_p?: number; top_k?: number; min_p?: number; repetition_penalty?: number };
  };
  /** "cache" when the weights are kept in the Cache API, else "network (why not)". */
  weights: string;
  /** The draft model (the `draftModel` option), where one was loaded. */
  draft_model?: { layers: number; hidden_size: number; weights: string };
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
   * Pages in the KV pool, and those no request holds (some of them reserved for prompts being
   * computed, some keeping a cached prompt prefix).
   */
  kv_pages: number;
  kv_pages_free: number;
  /** Positions per page. */
  kv_page_size: number;
  /** Bytes a page takes over all layers, keys and values. */
  kv_page_bytes: number;
  /** Buffers each layer's keys (and values) lie in. */
  kv_buffers: number;
  /** Requests that gave their KV pages back to a full pool and were computed again, in all. */
  preemptions: number;
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
  /** Raw text completions, run together with chat requests. */
  completions: {
    create(params: CompletionParams & { stream: true }): AsyncIterable<TextCompletionChunk>;
    create(params: CompletionParams & { stream?: false }): Promise<TextCompletion>;
  };
  /** OpenAI's Responses API, run together with the other requests. */
  responses: {
    create(params: ResponseCreateParams & { stream: true }): AsyncIterable<ResponseStreamEvent>;
    create(params: ResponseCreateParams & { stream?: false }): Promise<Response>;
    /** A kept response; a `RequestError` where none is kept under that id. */
    retrieve(id: string): Promise<Response>;
    delete(id: string): Promise<{ id: string; object: "response.deleted"; deleted: true }>;
    /**
     * The items a kept response was given: the turns it continued (their inputs and outputs),
     * then its own input; newest first unless `order: "asc"`, `limit` (1-100, default 20) at a
     * time after the item id `after`.
     */
    inputItems: {
      list(id: string, options?: { after?: string; limit?: number; order?: "asc" | "desc"; include?: string[] }): Promise<ResponseItemList>;
    };
  };
  /** What was loaded, as of the end of loading. */
  info(): EngineInfo;
  /** The engine's load now. */
  status(): Promise<EngineLoad>;
  /** The tokens a request would run as its prompt, to budget the context before asking. */
  tokenize(params: TokenizeParams): Promise<Tokenized>;
  /** The text of token ids, special tokens written out. */
  detokenize(tokens: number[]): Promise<string>;
  /**
   * Loads the model again on a new GPU device, weights from the Cache API where they are kept: after
   * a `DeviceLostError` (requests fail with it until then), without reloading the page. Requests
   * still running end as on `unload`.
   */
  reload(options?: { onProgress?: (progress: LoadProgress) => void }): Promise<EngineInfo>;
  /** Frees the GPU memory; requests still running reject with `AbortError`. */
  unload(): Promise<void>;
}

export function createEngine(options: EngineOptions): Promise<Engine>;

/** A Llama GGUF file on the Hub, as `listModels()` lists it. */
export interface CatalogModel {
  /** e.g. "Llama-3.2-1B-Instruct-Q4_K_M". */
  id: string;
  /** e.g. "Llama 3.2 1B Instruct". */
  name: string;
  /** The Hub repository, e.g. "bartowski/Llama-3.2-1B-Instruct-GGUF". */
  repo: string;
  file: string;
  /** e.g. "Q4_K_M", "Q4_0". */
  quant: string;
  /** The file's size in bytes: the download, and about the weights' size on the GPU. */
  size: number;
  /** Positions the model was trained for (131,072). */
  context: number;
  layers: number;
  hidden: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  vocab: number;
  /** `hf:REPO/FILE`: a `model` for createEngine. */
  reference: string;
  /** GPU memory for the weights and an f16 KV cache of `vramContext` positions. */
  vramBytes: number;
  vramContext: number;
}

/** Llama 3.1 / 3.2 Instruct GGUF files on the Hub in quants whose tensor types the engine reads. */
export function listModels(): CatalogModel[];

/** Whether a model will load on this browser's adapter, found before anything downloads. */
export interface FitReport {
  /** False when a problem stops the load. */
  fits: boolean;
  /** Why it will not load: a context beyond the model's, or a RoPE table beyond the adapter's binding limit. */
  problems: string[];
  /** What loads but hurts: too little storage quota to cache the file, a software adapter. */
  warnings: string[];
  context: number;
  /** The longest context the adapter binds the RoPE table of (the KV cache spans buffers as it needs). */
  maxContext: number;
  /** The KV cache's element type: `kvType` as given, else the engine's choice on this adapter. */
  kvType: "f16" | "f32" | "q8_0";
  weightsBytes: number;
  kvBytes: number;
  /**
   * GPU memory the model takes: weights plus the KV cache at `context`. WebGPU does not tell a
   * page how much the GPU has; with less, the engine shortens the context to what fits.
   */
  gpuBytes: number;
  /** The Cache API's room for the file (`navigator.storage.estimate()`); available is null where unknown. */
  storage: { needed: number; available: number | null; fits: boolean };
}

/**
 * Checks a catalog model (an entry of listModels(), its id or its reference) against the adapter's
 * limits and the storage quota, for a context of `context` positions (default 8192).
 */
export function checkFit(model: CatalogModel | string, options?: { context?: number; adapter?: GPUAdapter; kvType?: "f16" | "f32" | "q8_0" }): Promise<FitReport>;

/** The Cache API bucket that holds downloaded weights. */
export const CACHE_NAME: string;
/**
 * Deletes the cached weights of `model` (a URL as createEngine takes it), or of every model without
 * one; resolves to whether there was anything to delete.
 */
export function clearModelCache(model?: string, options?: { hubEndpoint?: string }): Promise<boolean>;

export class LlamaWebGpuError extends Error {}
export class NoWebGpuError extends LlamaWebGpuError {}
export class LimitError extends LlamaWebGpuError {}
export class LoadError extends LlamaWebGpuError {}
export class AbortError extends LlamaWebGpuError {}
/** A request or createEngine option asks for what is not supported: an unknown field, a bad value. */
export class RequestError extends LlamaWebGpuError {
  /** The field at fault (a top-level request field or option name), or null for the whole request. */
  param: string | null;
}
/** The GPU device was lost (a driver reset, the browser reclaiming it); `engine.reload()` makes a new one. */
export class DeviceLostError extends LlamaWebGpuError {}
export class EngineError extends LlamaWebGpuError {}
