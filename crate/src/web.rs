//! wasm-bindgen exports for the browser: one engine per wasm instance (the JS package runs it in a
//! Web Worker). Concurrent `chat`, `complete` and `respond` calls run together (continuous batching): each
//! queues itself, and one task, the driver, started by the call that finds none running, adds
//! queued requests to the engine and steps it while any runs, handing each sequence's events to its
//! request. Requests and options cross as JS values (serde-wasm-bindgen) in the shapes of
//! `crate::api`, responses and their chunks as `crate::api::response` (and `crate::api::responses`
//! for the Responses API) makes them for every host;
//! failures are thrown as JS `Error`s whose `name` says what kind they are (see
//! `ErrorKind`), and a request's own fault names the field to blame in `param`.

use std::cell::RefCell;
use std::collections::HashMap;

use futures_channel::oneshot::{self, Receiver};
use js_sys::{Function, Promise, Reflect};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use wasm_bindgen::prelude::*;

use crate::api::request::{Parsed, UnknownFields, Work};
use crate::api::response::{ChunkStream, ResponseMeta, StreamUsage};
use crate::api::responses::{self, Conversation, ItemPage, ResponseEvents, ResponseHeader, ResponseStore};
use crate::api;
use crate::engine::{Event, Load, Prompter, SequenceId};
use crate::gpu::{GpuError, KvType};
use crate::load::{LoadError, WebModel};
use crate::quant::DType;
use crate::text::RenderOptions;
use crate::{CancelToken, Engine, Gpu, GpuOptions, Llama, LoadOptions};

/// The `name` of the errors thrown to JS.
#[derive(Clone, Copy)]
enum ErrorKind {
    /// The browser has no WebGPU, or offers no adapter.
    NoWebGpu,
    /// The adapter's limits are below what the engine needs; the message has the numbers.
    Limit,
    /// Fetching, checking or uploading the model failed; the message names the file.
    Load,
    /// A request or the load options ask for what is not supported; `param` names the field.
    Request,
    /// The GPU device was lost (a driver reset, the browser reclaiming it): load again.
    DeviceLost,
    /// Anything else: GPU failures, calls out of order.
    Engine,
}

impl ErrorKind {
    fn name(self) -> &'static str {
        match self {
            ErrorKind::NoWebGpu => "NoWebGpuError",
            ErrorKind::Limit => "LimitError",
            ErrorKind::Load => "LoadError",
            ErrorKind::Request => "RequestError",
            ErrorKind::DeviceLost => "DeviceLostError",
            ErrorKind::Engine => "EngineError",
        }
    }
}

fn js_error(kind: ErrorKind, message: impl AsRef<str>) -> JsValue {
    let error = js_sys::Error::new(message.as_ref());
    error.set_name(kind.name());
    error.into()
}

/// A `RequestError` blaming `param` (a top-level field), or the request as a whole.
fn request_error(param: Option<&str>, message: impl AsRef<str>) -> JsValue {
    let error = js_error(ErrorKind::Request, message);
    let _ = Reflect::set(&error, &"param".into(), &param.map_or(JsValue::NULL, JsValue::from_str));
    error
}

impl From<&crate::Error> for ErrorKind {
    fn from(error: &crate::Error) -> Self {
        match error {
            crate::Error::Gpu(GpuError::NoAdapter { .. }) => ErrorKind::NoWebGpu,
            crate::Error::Gpu(GpuError::Limit { .. } | GpuError::MissingFeature { .. }) => ErrorKind::Limit,
            crate::Error::Load(_) | crate::Error::Hub(_) => ErrorKind::Load,
            crate::Error::Gpu(GpuError::DeviceLost(_)) => ErrorKind::DeviceLost,
            _ => ErrorKind::Engine,
        }
    }
}

fn to_js(error: crate::Error) -> JsValue {
    js_error(ErrorKind::from(&error), error.to_string())
}

/// An option that is `on` (its default) or "none", read as whether it is on; any other value is
/// refused naming `param`.
fn on_unless_none(value: Option<&str>, param: &str, on: &str) -> Result<bool, JsValue> {
    match value {
        None => Ok(true),
        Some("none") => Ok(false),
        Some(value) if value == on => Ok(true),
        Some(other) => Err(request_error(Some(param), format!("{param}: {other:?} is neither {on:?} nor \"none\""))),
    }
}

/// `error`, which the engine refused `work` with, thrown to JS: a `RequestError` when the request
/// is at fault, naming the field as the request's API does.
fn failure(work: &Work, reply: &Reply, error: crate::Error) -> JsValue {
    match work.blamed_field(&error) {
        Some(field) if matches!(reply, Reply::Response { .. }) => request_error(Some(responses::responses_param(field)), error.to_string()),
        Some(field) => request_error(Some(field), error.to_string()),
        None => to_js(error),
    }
}

/// What a request answers with: OpenAI's completion objects and chunks, or a Responses API
/// response and its events.
enum Reply {
    Completion,
    Response {
        settings: Map<String, Value>,
        /// The turns to keep with the response, unless `store` is false.
        conversation: Option<Conversation>,
        logprobs: bool,
    },
}

/// A running request's response, as it is made.
enum Output {
    Chunks(ChunkStream),
    Response { events: ResponseEvents, conversation: Option<Conversation> },
}

/// How the JS API wants a request's response: the unique part of its id and the model name it
/// reports.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResponseOptions {
    uuid: String,
    model: String,
}

/// A request waiting for the driver to add it to the engine.
struct Queued {
    request: Parsed,
    reply: Reply,
    response: ResponseOptions,
    cancel: CancelToken,
    on_chunk: Function,
    done: oneshot::Sender<Result<JsValue, JsValue>>,
}

/// A request the engine holds, as the driver knows it: a sequence per choice, and its response's
/// chunks or events (sent while it runs when it streams; the whole response resolves it either
/// way).
struct Active {
    on_chunk: Function,
    done: oneshot::Sender<Result<JsValue, JsValue>>,
    cancel: CancelToken,
    sequences: Vec<SequenceId>,
    output: Output,
    stream: bool,
}

impl Active {
    fn send(&self, chunk: &Value) {
        let _ = self.on_chunk.call1(&JsValue::NULL, &js_value(&serde_json::json!({ "chunk": chunk })));
    }
}

#[derive(Default)]
struct State {
    /// Taken out by the driver while requests run (it awaits the GPU, so it cannot stay borrowed).
    engine: Option<Engine>,
    /// Whether a driver holds the engine: new requests then only queue for it.
    driving: bool,
    queue: Vec<Queued>,
    /// The cancel token of every request not ended yet, by the caller's id.
    requests: HashMap<u32, CancelToken>,
    info: Option<serde_json::Value>,
    /// The engine's load as the driver last saw it.
    load: Load,
    /// Bumped by every load and unload, so a driver that outlives its engine does not restore it.
    generation: u64,
    /// How chat requests become prompt tokens.
    render: RenderOptions,
    /// The engine's prompter, for tokenizing while the driver holds the engine.
    prompter: Option<Prompter>,
    /// Why the engine went with its lost GPU device, until the next load.
    lost: Option<String>,
    /// Responses kept for `previous_response_id`; they outlive unloads (they are text).
    responses: ResponseStore,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::default();
}

/// Sequences run together unless `maxSequences` says otherwise.
const DEFAULT_MAX_SEQUENCES: usize = 4;

/// Tokens a pass holds in a tab: half a native pass, because a browser loses its device when one
/// submission runs for seconds (its GPU watchdog; Windows' is 2 s), as a 512-token pass of an 8B
/// model on an integrated GPU can.
const MAX_BATCH: usize = 256;

/// `load`'s options, as the JS API names them.
#[derive(Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct WebLoadOptions {
    context_length: Option<usize>,
    /// Caps the storage binding size below the adapter's, e.g. to test the split path.
    max_storage_binding: Option<u64>,
    max_sequences: Option<usize>,
    /// Bytes of the KV pool; default one full context, shared by the sequences.
    kv_memory: Option<u64>,
    /// Encode special-token text in message content as special tokens (default: as text).
    special_tokens_in_content: Option<bool>,
    /// A chat template (Jinja) in place of the model's, reading the model's special tokens.
    chat_template: Option<String>,
    /// Bytes of the responses kept for `previous_response_id` (ResponseStore; default 64 MiB).
    response_store: Option<usize>,
    /// The KV cache's element type, "f16" or "f32" (default: f16 where the adapter has shader-f16).
    kv_type: Option<String>,
    /// The format f32/f16/bf16 matrices are re-encoded into as they stream (LoadOptions::quant).
    quant: Option<String>,
    /// Where `hf:` references are looked up (default: the Hugging Face Hub).
    hub_endpoint: Option<String>,
    /// Matmuls of block-quantized weights on int8 inputs (GpuOptions::q8_activations).
    q8_activations: Option<bool>,
    /// The decode GEMVs reduce through workgroup memory even where the browser offers subgroups
    /// (GpuOptions::no_subgroups).
    no_subgroups: Option<bool>,
    /// Requests draft by prompt lookup (Engine::with_prompt_lookup; default false).
    prompt_lookup: Option<bool>,
    /// "auto" (the default): a reasoning model's thought apart from its answer
    /// (Engine::with_reasoning_parsed); "none": left in the content.
    reasoning_format: Option<String>,
    /// "model" (the default): requests that set no sampling sample as the model's files
    /// recommend (Engine::with_sampling_defaults); "none": OpenAI's defaults.
    sampling_defaults: Option<String>,
    /// A smaller model of the same tokenizer that drafts tokens (Engine::with_draft_model), as
    /// `url` is given.
    draft_model: Option<String>,
}

/// The model at `url` (or `hf:` reference), opened.
async fn open_web_model(url: &str, options: &WebLoadOptions) -> Result<WebModel, JsValue> {
    let url = crate::load::resolve_reference(url, options.hub_endpoint.as_deref()).await.map_err(to_js)?;
    WebModel::open(&url).await.map_err(to_js)
}

/// Uploads `source`'s weights, reporting each chunk with its tensor's name after `label`; a
/// file whose checksum fails is forgotten by the cache, so that a retry downloads it again.
async fn load_web_model(
    gpu: &Gpu,
    config: crate::Config,
    source: &WebModel,
    options: &LoadOptions,
    label: &str,
    report: &dyn Fn(u64, u64, &str, &str),
) -> Result<Llama, JsValue> {
    let mut progress = |p: crate::LoadProgress| {
        let stage = if p.bytes_done == p.bytes_total { "prepare" } else { source.stage() };
        report(p.bytes_done, p.bytes_total, &format!("{label}{}", p.tensor), stage);
    };
    match Llama::load(gpu, config, source, options, &mut progress).await {
        Ok(model) => Ok(model),
        Err(error) => {
            if let crate::Error::Load(LoadError::Checksum { file, .. }) = &error {
                source.forget(file).await;
            }
            Err(to_js(error))
        }
    }
}

#[wasm_bindgen(start)]
fn start() {
    console_error_panic_hook::set_once();
}

/// Loads the model at `url` (absolute: a shard folder's manifest.json or a .gguf file; or an `hf:`
/// reference to a GGUF file on the Hub), replacing any loaded one (its requests end as on `unload`).
/// `options`: `{contextLength?, maxStorageBinding?, maxSequences?, kvMemory?,
/// specialTokensInContent?, kvType?, hubEndpoint?, q8Activations?, noSubgroups?, promptLookup?,
/// draftModel?, reasoningFormat?, samplingDefaults?}`. `on_progress(bytesDone, bytesTotal, tensor, stage)` is called as the load goes through its
/// stages: "self-test" (the kernels checked on this GPU, before the weights), then per chunk of
/// weights uploaded "download" or "cache" (where they came from), then "prepare" once they all
/// are (the KV cache allocated, the passes built); a draft model's weights follow, their tensors
/// named "draft model: ...". Returns `info()`.
#[wasm_bindgen]
pub async fn load(url: String, options: JsValue, on_progress: Function) -> Result<JsValue, JsValue> {
    let options: WebLoadOptions = read_options(object_of(options, "the load options")?)?;
    unload();
    if !has_webgpu() {
        return Err(js_error(ErrorKind::NoWebGpu, "this browser has no WebGPU (navigator.gpu is missing)"));
    }
    let parse_reasoning = on_unless_none(options.reasoning_format.as_deref(), "reasoningFormat", "auto")?;
    let model_sampling = on_unless_none(options.sampling_defaults.as_deref(), "samplingDefaults", "model")?;
    let kv_type = match options.kv_type.as_deref() {
        None => None,
        Some(name) => Some(KvType::from_name(name).ok_or_else(|| request_error(Some("kvType"), format!("kvType: {name:?} is not a KV type: {}", KvType::choices())))?),
    };
    let quant = options.quant.as_deref().map(|name| DType::encodable_from_name(name).map_err(|e| request_error(Some("quant"), format!("quant: {e}")))).transpose()?;
    let gpu_options = GpuOptions {
        max_storage_binding: options.max_storage_binding,
        kv_type,
        q8_activations: options.q8_activations.unwrap_or(false),
        no_subgroups: options.no_subgroups.unwrap_or(false),
        ..Default::default()
    };
    let gpu = Gpu::new(&gpu_options).await.map_err(|e| to_js(e.into()))?;
    let source = open_web_model(&url, &options).await?;
    let config = source.config().map_err(to_js)?;
    let (tokenizer, template) = source.text().await.map_err(to_js)?;
    let template = match &options.chat_template {
        Some(given) => template.replaced_by(given).map_err(|e| request_error(Some("chatTemplate"), e.to_string()))?,
        None => template,
    };
    // A tab's GPU memory is scarce: unless told otherwise, the sequences share the KV pages of one
    // full context (or as much of it as the memory holds), and scored prompts take no rows of
    // logits of their own.
    let load_options = LoadOptions {
        context_length: options.context_length,
        max_sequences: options.max_sequences.unwrap_or(DEFAULT_MAX_SEQUENCES),
        scoring_memory: 0,
        kv_memory: options.kv_memory,
        kv_contexts: Some(1),
        max_batch: MAX_BATCH,
        quant,
    };
    let report = |bytes_done: u64, bytes_total: u64, tensor: &str, stage: &str| {
        let (done, total) = (JsValue::from_f64(bytes_done as f64), JsValue::from_f64(bytes_total as f64));
        let _ = on_progress.call4(&JsValue::NULL, &done, &total, &tensor.into(), &stage.into());
    };
    // Llama::load checks the kernels before it streams the first weights.
    report(0, 0, "", "self-test");
    let model = load_web_model(&gpu, config, &source, &load_options, "", &report).await?;
    let mut described = describe_engine(&gpu, &model, Some(&source));
    let seed = (js_sys::Math::random() * 9007199254740992.0) as u64;
    let mut engine = Engine::new(model, tokenizer, template, seed)
        .map_err(to_js)?
        .with_prompt_lookup(options.prompt_lookup.unwrap_or(false))
        .with_reasoning_parsed(parse_reasoning)
        .with_sampling_defaults(model_sampling);
    if let Some(draft_url) = &options.draft_model {
        let draft_source = open_web_model(draft_url, &options).await?;
        let draft_config = draft_source.config().map_err(to_js)?;
        let draft_options = LoadOptions { quant, ..engine.draft_load_options(&draft_config) };
        let draft = load_web_model(&gpu, draft_config, &draft_source, &draft_options, "draft model: ", &report).await?;
        described["draft_model"] = serde_json::json!({ "layers": draft.config().n_layers, "hidden_size": draft.config().hidden_size, "weights": draft_source.storage() });
        engine = engine.with_draft_model(draft).map_err(to_js)?;
    }
    STATE.with_borrow_mut(|s| {
        s.load = engine.load();
        s.prompter = Some(engine.prompter().clone());
        s.engine = Some(engine);
        s.info = Some(described);
        s.generation += 1;
        s.render = RenderOptions { special_tokens_in_content: options.special_tokens_in_content.unwrap_or(false), ..Default::default() };
        if let Some(budget) = options.response_store {
            s.responses.set_budget(budget);
        }
    });
    Ok(info())
}

/// Runs a chat completion request (the body of serve's `/v1/chat/completions`, read by
/// `crate::api::request`, fields it does not know refused) together with any others. `response`
/// is `{uuid, model}`: the response's id is `chatcmpl-<uuid>`, and a streamed one calls
/// `on_chunk({chunk})` with each chunk of OpenAI's `chat.completion.chunk` objects (the usage on
/// the last), as `serve` streams them; `on_chunk({prefill: {done, total}})` reports the prompt's
/// progress. `id` is the caller's
/// name for the request, for `abort`, unique among running requests. Resolves to the whole
/// `chat.completion` object, streamed or not.
#[wasm_bindgen]
pub fn chat(id: u32, request: JsValue, response: JsValue, on_chunk: Function) -> Promise {
    submit(id, read(request, api::request::read_chat).map(|parsed| (parsed, Reply::Completion)), response, on_chunk)
}

/// Runs a raw text completion request (the body of serve's `/v1/completions`: the model's BOS
/// token, then the prompt, no chat template; or token ids), as `chat` runs a chat request:
/// `text_completion` objects, the id `cmpl-<uuid>`.
#[wasm_bindgen]
pub fn complete(id: u32, request: JsValue, response: JsValue, on_chunk: Function) -> Promise {
    submit(id, read(request, api::request::read_completion).map(|parsed| (parsed, Reply::Completion)), response, on_chunk)
}

/// Runs a Responses API request (the body of serve's `/v1/responses`, fields it does not know
/// refused) as `chat` runs a chat: the id `resp_<uuid>`; a streamed one calls `on_chunk({chunk})`
/// with each of Responses' events. Resolves to the `response` object. Kept in this instance's
/// memory for `previous_response_id` and `stored_response` unless `store` is false.
#[wasm_bindgen]
pub fn respond(id: u32, request: JsValue, response: JsValue, on_chunk: Function) -> Promise {
    submit(id, read_response_request(request), response, on_chunk)
}

fn read_response_request(request: JsValue) -> Result<(Parsed, Reply), JsValue> {
    let object = object_of(request, "a request")?;
    let previous = match responses::previous_response_id(&object).map_err(request_fault)? {
        None => Conversation::default(),
        Some(id) => STATE.with_borrow(|s| match s.responses.get(&id) {
            Some(stored) => Ok(stored.conversation.clone()),
            None => Err(request_error(Some("previous_response_id"), s.responses.missing(&id))),
        })?,
    };
    let request = responses::read_responses(object, UnknownFields::Refuse, previous).map_err(request_fault)?;
    let reply = Reply::Response { logprobs: request.logprobs(), settings: request.settings, conversation: request.store.then_some(request.conversation) };
    Ok((request.parsed, reply))
}

/// A response kept by `respond`, as it resolved.
#[wasm_bindgen]
pub fn stored_response(id: String) -> Result<JsValue, JsValue> {
    STATE.with_borrow(|s| match s.responses.get(&id) {
        Some(stored) => Ok(js_value(&stored.response)),
        None => Err(request_error(Some("id"), s.responses.missing(&id))),
    })
}

/// A page of the items a kept response was given, as serve's `/v1/responses/{id}/input_items`:
/// `options` holds `after`, `limit`, `order` and `include`, all optional.
#[wasm_bindgen]
pub fn response_input_items(id: String, options: JsValue) -> Result<JsValue, JsValue> {
    let options = if options.is_undefined() || options.is_null() { Map::new() } else { object_of(options, "the options")? };
    let page = ItemPage::read(&options).map_err(request_fault)?;
    STATE.with_borrow(|s| match s.responses.get(&id) {
        Some(stored) => stored.input_items(&page).map(|list| js_value(&list)).map_err(request_fault),
        None => Err(request_error(Some("id"), s.responses.missing(&id))),
    })
}

/// Drops a kept response: `{id, object: "response.deleted", deleted: true}`.
#[wasm_bindgen]
pub fn delete_response(id: String) -> Result<JsValue, JsValue> {
    STATE.with_borrow_mut(|s| match s.responses.remove(&id) {
        true => Ok(js_value(&serde_json::json!({ "id": id, "object": "response.deleted", "deleted": true }))),
        false => Err(request_error(Some("id"), s.responses.missing(&id))),
    })
}

/// The tokens a request would run as its prompt, as serve's `/tokenize` gives them: `request`
/// is `{prompt, add_special_tokens?}` or `{messages, tools?, add_generation_prompt?}` (with
/// `return_token_strs`, each token's vocabulary piece too). Resolves to `{count,
/// max_model_len, tokens, token_strs}`.
#[wasm_bindgen]
pub fn tokenize(request: JsValue) -> Result<JsValue, JsValue> {
    let request = api::request::read_tokenize(object_of(request, "a tokenize request")?).map_err(request_fault)?;
    let (prompter, render) = loaded_prompter()?;
    let tokens = prompter.tokenize(&request.input, &render).map_err(|error| request_error(Some(request.input.field()), error.to_string()))?;
    Ok(js_value(&api::response::tokenized(&request, &tokens, &prompter)))
}

/// The text of `request.tokens`, special tokens written out (serve's `/detokenize`).
#[wasm_bindgen]
pub fn detokenize(request: JsValue) -> Result<String, JsValue> {
    let tokens = api::request::read_detokenize(object_of(request, "a detokenize request")?).map_err(request_fault)?;
    let (prompter, _) = loaded_prompter()?;
    prompter.tokenizer().decode(&tokens, false).map_err(|error| request_error(Some("tokens"), error.to_string()))
}

/// The loaded model's prompter and render options.
fn loaded_prompter() -> Result<(Prompter, RenderOptions), JsValue> {
    STATE.with_borrow(|s| {
        match &s.prompter {
            Some(prompter) => Ok((prompter.clone(), s.render.clone())),
            None => Err(js_error(ErrorKind::Engine, "no model is loaded")),
        }
    })
}

fn submit(id: u32, read: Result<(Parsed, Reply), JsValue>, response: JsValue, on_chunk: Function) -> Promise {
    let response = serde_wasm_bindgen::from_value::<ResponseOptions>(response).map_err(|error| js_error(ErrorKind::Engine, format!("response options: {error}")));
    // Queued now rather than when the promise first runs, so an `abort(id)` right after finds it.
    let queued = read.and_then(|(request, reply)| enqueue(id, request, reply, response?, on_chunk));
    wasm_bindgen_futures::future_to_promise(async move {
        let (receiver, generation) = queued?;
        let result = receiver
            .await
            .unwrap_or_else(|_| Err(js_error(ErrorKind::Engine, "the model was unloaded before the request started")));
        STATE.with_borrow_mut(|s| {
            if s.generation == generation {
                s.requests.remove(&id);
            }
        });
        result
    })
}

/// Options as `crate::api::request` reads requests, thrown as a `RequestError` naming the field.
fn read_options<T: DeserializeOwned + Serialize>(object: Map<String, Value>) -> Result<T, JsValue> {
    api::request::read_options(object).map_err(request_fault)
}

fn request_fault(error: api::request::RequestError) -> JsValue {
    request_error(error.param.as_deref(), error.message)
}

/// A request as `crate::api::request` reads it for every host, refusing fields it does not know
/// (serve ignores them, as OpenAI-compatible servers do).
fn read(request: JsValue, read: fn(Map<String, Value>, UnknownFields) -> Result<Parsed, api::request::RequestError>) -> Result<Parsed, JsValue> {
    read(object_of(request, "a request")?, UnknownFields::Refuse).map_err(request_fault)
}

/// A JS object as JSON, its null and undefined members left out (OpenAI treats null as absent).
/// Members keep their order (tools keep the client's key order), and every type then reads it with
/// serde_json's rules.
fn object_of(value: JsValue, what: &str) -> Result<Map<String, Value>, JsValue> {
    match serde_wasm_bindgen::from_value(value) {
        Ok(Value::Object(mut object)) => {
            object.retain(|_, value| !value.is_null());
            Ok(object)
        }
        Ok(_) => Err(request_error(None, format!("{what} must be an object"))),
        Err(error) => Err(request_error(None, format!("{what}: {error}"))),
    }
}

/// A Rust value as a plain JS value (objects, not `Map`s; null for None).
fn js_value<T: Serialize>(value: &T) -> JsValue {
    value.serialize(&serde_wasm_bindgen::Serializer::json_compatible()).unwrap_or_else(|error| js_error(ErrorKind::Engine, error.to_string()))
}

/// Queues a request for the driver, starting one when none runs. Returns the receiver of its
/// result and the generation it belongs to.
fn enqueue(id: u32, request: Parsed, reply: Reply, response: ResponseOptions, on_chunk: Function) -> Result<(Receiver<Result<JsValue, JsValue>>, u64), JsValue> {
    let (done, receiver) = oneshot::channel();
    let cancel = CancelToken::default();
    let (driver, generation) = STATE.with_borrow_mut(|s| {
        if s.engine.is_none() && !s.driving {
            return Err(match &s.lost {
                Some(lost) => js_error(ErrorKind::DeviceLost, lost),
                None => js_error(ErrorKind::Engine, "no model is loaded"),
            });
        }
        if s.requests.contains_key(&id) {
            return Err(js_error(ErrorKind::Engine, format!("request id {id} is already running")));
        }
        s.requests.insert(id, cancel.clone());
        s.queue.push(Queued { request, reply, response, cancel, on_chunk, done });
        let driver = if s.driving { None } else { s.engine.take() };
        s.driving = true;
        Ok((driver, s.generation))
    })?;
    if let Some(engine) = driver {
        wasm_bindgen_futures::spawn_local(drive(engine, generation));
    }
    Ok((receiver, generation))
}

/// Runs the engine while it has work: adds queued requests, steps, and hands each sequence's events
/// to its request; then puts the engine back. After an unload it takes no new requests, steps until
/// the ones it holds (all cancelled) have ended, and drops the engine.
async fn drive(mut engine: Engine, generation: u64) {
    let mut active: Vec<Active> = vec![];
    loop {
        let (current, queued, render) = STATE.with_borrow_mut(|s| {
            let current = s.generation == generation;
            (current, if current { std::mem::take(&mut s.queue) } else { vec![] }, s.render.clone())
        });
        for request in queued {
            let Queued { request: Parsed { work, choices, stream, .. }, reply, response, cancel, on_chunk, done } = request;
            match engine.add_work(&work, &render, cancel.clone(), choices) {
                Ok(sequences) => {
                    let ResponseOptions { uuid, model } = response;
                    let created = (js_sys::Date::now() / 1000.0) as u64;
                    let mut output = match reply {
                        Reply::Completion => {
                            let endpoint = work.endpoint();
                            let meta = ResponseMeta { endpoint, id: format!("{}-{uuid}", endpoint.id_prefix()), created, model };
                            Output::Chunks(ChunkStream::new(meta, StreamUsage::LastChunk, sequences.len()))
                        }
                        Reply::Response { settings, conversation, logprobs } => {
                            let header = ResponseHeader { id: format!("resp_{uuid}"), created_at: created, model, settings };
                            Output::Response { events: ResponseEvents::new(header, logprobs), conversation }
                        }
                    };
                    let opening = match &mut output {
                        Output::Chunks(chunks) => chunks.start(),
                        Output::Response { events, .. } => events.start(),
                    };
                    let request = Active { on_chunk, done, cancel, sequences, output, stream };
                    if stream {
                        opening.iter().for_each(|chunk| request.send(chunk));
                    }
                    active.push(request);
                }
                Err(error) => {
                    let _ = done.send(Err(failure(&work, &reply, error)));
                }
            }
        }
        if current {
            STATE.with_borrow_mut(|s| s.load = engine.load());
        }
        if engine.is_idle() {
            // Nothing was awaited since the queue was taken, so no request is left in it.
            if current {
                STATE.with_borrow_mut(|s| {
                    s.engine = Some(engine);
                    s.driving = false;
                });
            }
            return;
        }
        match engine.step().await {
            Ok(events) => {
                for (sequence, event) in events {
                    let Some((r, choice)) = active.iter().enumerate().find_map(|(r, a)| a.sequences.iter().position(|&s| s == sequence).map(|c| (r, c)))
                    else {
                        continue;
                    };
                    let request = &mut active[r];
                    match event {
                        // The first choice reports the progress of its prompt, which its other choices share (a
                        // request of several prompts shows its first).
                        Event::Prefill { done, total } if choice == 0 => {
                            let _ = request.on_chunk.call1(&JsValue::NULL, &js_value(&serde_json::json!({ "prefill": { "done": done, "total": total } })));
                        }
                        Event::Prefill { .. } => {}
                        Event::Delta(delta) if request.stream => {
                            let chunks = match &mut request.output {
                                Output::Chunks(chunks) => vec![chunks.delta(choice, &delta)],
                                Output::Response { events, .. } => events.delta(&delta),
                            };
                            chunks.iter().for_each(|chunk| request.send(chunk));
                        }
                        Event::Delta(_) => {}
                        Event::Echo(echo) if request.stream => {
                            if let Output::Chunks(chunks) = &mut request.output {
                                let chunk = chunks.echo(choice, &echo);
                                request.send(&chunk);
                            }
                        }
                        Event::Echo(_) => {}
                        Event::Finished(completion) => {
                            let (chunks, whole) = match &mut request.output {
                                Output::Chunks(chunks) => {
                                    let (sent, completions) = chunks.finish(choice, completion);
                                    (sent, completions.map(|completions| chunks.meta().completion(&completions)))
                                }
                                Output::Response { events, conversation } => {
                                    let sent = events.finish(&completion);
                                    let response = sent.last().map(|event| event["response"].clone()).unwrap_or_default();
                                    if let Some(conversation) = conversation.take() {
                                        let id = events.header().id.clone();
                                        STATE.with_borrow_mut(|s| s.responses.keep(id, response.clone(), conversation, &completion));
                                    }
                                    (sent, Some(response))
                                }
                            };
                            if request.stream {
                                chunks.iter().for_each(|chunk| request.send(chunk));
                            }
                            if let Some(whole) = whole {
                                let request = active.swap_remove(r);
                                let _ = request.done.send(Ok(js_value(&whole)));
                            }
                        }
                        // One choice failing ends the request; the others are cancelled.
                        Event::Failed(error) => {
                            let request = active.swap_remove(r);
                            request.cancel.cancel();
                            let _ = request.done.send(Err(to_js(error)));
                        }
                    }
                }
            }
            // The GPU failed: the engine dropped every sequence. A lost device takes the engine
            // with it: requests fail with DeviceLostError until a load makes a new one.
            Err(error) => {
                let lost = device_lost(&engine, &error).await;
                let error = to_js(lost.clone().map_or(error, |lost| GpuError::DeviceLost(lost).into()));
                for request in active.drain(..) {
                    let _ = request.done.send(Err(error.clone()));
                }
                if let Some(lost) = lost.filter(|_| current) {
                    STATE.with_borrow_mut(|s| {
                        for request in s.queue.drain(..) {
                            let _ = request.done.send(Err(error.clone()));
                        }
                        s.requests.clear();
                        s.driving = false;
                        s.info = None;
                        s.load = Load::default();
                        s.lost = Some(format!("the GPU device was lost ({lost}): load the model again (engine.reload())"));
                    });
                    return;
                }
            }
        }
    }
}

/// What the device said when it was lost, if `error` (a failed step) came from losing it. The
/// browser reports the loss through a promise of its own, which may settle after the failed
/// mapping that ended the step: one task later it has.
async fn device_lost(engine: &Engine, error: &crate::Error) -> Option<String> {
    if let crate::Error::Gpu(GpuError::DeviceLost(lost)) = error {
        return Some(lost.clone());
    }
    crate::load::sleep(0).await;
    match engine.model().gpu().check() {
        Err(GpuError::DeviceLost(lost)) => Some(lost),
        _ => None,
    }
}

/// `bench`'s options, as the JS API names them.
#[derive(Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct WebBenchOptions {
    synthetic: String,
    #[serde(default = "default_bench_quant")]
    quant: String,
    layers: Option<usize>,
    #[serde(default = "default_bench_prompt")]
    prompt: usize,
    #[serde(default = "default_bench_generate")]
    generate: usize,
    #[serde(default = "default_bench_repetitions")]
    repetitions: usize,
    /// Decode on int8 inputs (GpuOptions::q8_activations).
    #[serde(default)]
    q8_activations: bool,
    /// The decode GEMVs reduce through workgroup memory, as in browsers without subgroups
    /// (GpuOptions::no_subgroups).
    #[serde(default)]
    no_subgroups: bool,
}

fn default_bench_quant() -> String {
    "q4_0".into()
}
fn default_bench_prompt() -> usize {
    512
}
fn default_bench_generate() -> usize {
    128
}
fn default_bench_repetitions() -> usize {
    3
}

/// The weight format a synthetic model's option `quant` names.
fn weight_format(name: &str) -> Result<DType, JsValue> {
    DType::from_name(name).ok_or_else(|| request_error(Some("quant"), format!("quant: {name:?} is not a weight format: {}", DType::choices())))
}

/// Times a synthetic model of a published shape on this WebGPU as the native `bench` does (the same
/// code): `options` `{synthetic: "llama3.2-1b" | "llama3.2-3b" | "llama3.1-8b" | ..., quant?:
/// "q4_0", layers?, prompt?: 512, generate?: 128, repetitions?: 3, q8Activations?: false}`. After warm-up passes, each
/// repetition times one prompt pass (pp) and one greedy generation (tg). Resolves to `{adapter,
/// features, limits, model, quant, layers, results: [{test, tokens_per_second: [per repetition],
/// encode_us_per_token?}]}`. A loaded model stays loaded, its GPU memory beside the bench's.
#[wasm_bindgen]
pub async fn bench(options: JsValue) -> Result<JsValue, JsValue> {
    let options: WebBenchOptions = read_options(object_of(options, "the bench options")?)?;
    let Some(mut config) = crate::bench::synthetic_config(&options.synthetic) else {
        let known = crate::bench::SYNTHETIC_MODELS.join(", ");
        return Err(request_error(Some("synthetic"), format!("synthetic: unknown model {:?}; known: {known}", options.synthetic)));
    };
    let dtype = weight_format(&options.quant)?;
    if let Some(layers) = options.layers {
        config.n_layers = layers;
    }
    if options.repetitions == 0 {
        return Err(request_error(Some("repetitions"), "repetitions: at least 1"));
    }
    if !has_webgpu() {
        return Err(js_error(ErrorKind::NoWebGpu, "this browser has no WebGPU (navigator.gpu is missing)"));
    }
    let gpu_options = GpuOptions { q8_activations: options.q8_activations, no_subgroups: options.no_subgroups, ..Default::default() };
    let gpu = Gpu::new(&gpu_options).await.map_err(|e| to_js(e.into()))?;
    let longest = options.prompt + options.generate + 1;
    let load_options = LoadOptions { context_length: Some(longest.max(16)), max_sequences: 1, ..Default::default() };
    let mut model = Llama::synthetic(&gpu, config.clone(), dtype, &load_options).await.map_err(to_js)?;
    let tokens = crate::bench::bench_tokens(config.vocab_size, longest);
    crate::bench::warm_up(&mut model, &tokens, &[options.prompt], 0).await.map_err(to_js)?;
    let mut results = vec![];
    if options.prompt > 0 {
        let mut rates = vec![];
        for _ in 0..options.repetitions {
            rates.push(crate::bench::prefill_rate(&mut model, &tokens[..options.prompt], 0).await.map_err(to_js)?);
        }
        results.push(serde_json::json!({ "test": format!("pp{}", options.prompt), "tokens_per_second": rates }));
    }
    if options.generate > 0 {
        let (mut rates, mut encode) = (vec![], vec![]);
        for _ in 0..options.repetitions {
            let timing = crate::bench::decode_rate(&mut model, tokens[0], 0, options.generate, false).await.map_err(to_js)?;
            rates.push(timing.tokens_per_second);
            encode.push(timing.encode_us_per_token);
        }
        results.push(serde_json::json!({ "test": format!("tg{}", options.generate), "tokens_per_second": rates, "encode_us_per_token": encode }));
    }
    let described = describe_engine(&gpu, &model, None);
    Ok(js_value(&serde_json::json!({
        "adapter": described["adapter"],
        "features": described["features"],
        "limits": described["limits"],
        "model": options.synthetic,
        "quant": dtype.name(),
        "layers": config.n_layers,
        "q8_activations": described["q8_activations"],
        "no_subgroups": options.no_subgroups,
        "results": results,
    })))
}

/// Stops request `id`, or every request when `id` is undefined, after its current token; it
/// resolves with finish_reason "abort". An id that has ended already is ignored.
#[wasm_bindgen]
pub fn abort(id: Option<u32>) {
    STATE.with_borrow(|s| match id {
        Some(id) => {
            if let Some(cancel) = s.requests.get(&id) {
                cancel.cancel();
            }
        }
        None => s.requests.values().for_each(CancelToken::cancel),
    });
}

/// Frees the model's GPU memory: running requests end after their current token (finish_reason
/// "abort"), queued ones fail.
#[wasm_bindgen]
pub fn unload() {
    STATE.with_borrow_mut(|s| {
        s.requests.drain().for_each(|(_, cancel)| cancel.cancel());
        s.queue.clear();
        s.engine = None;
        s.prompter = None;
        s.driving = false;
        s.info = None;
        s.load = Load::default();
        s.generation += 1;
        s.lost = None;
    });
}

/// The adapter, features and limits in use, the model's shape, and the engine's load now
/// (`running`, `waiting`, `kv_pages_free` of `kv_pages`); null before a load.
#[wasm_bindgen]
pub fn info() -> JsValue {
    STATE.with_borrow(|s| {
        let Some(mut info) = s.info.clone() else { return JsValue::NULL };
        // Queued requests wait for the driver's next step to reach the engine.
        let load = Load { waiting: s.load.waiting + s.queue.len(), ..s.load };
        info["load"] = serde_json::json!(load);
        js_value(&info)
    })
}

fn has_webgpu() -> bool {
    crate::gpu::navigator_gpu().is_some()
}

/// Bytes of wasm linear memory: it never shrinks, so after a load this is the load's peak.
fn wasm_memory_bytes() -> f64 {
    let memory: js_sys::WebAssembly::Memory = wasm_bindgen::memory().unchecked_into();
    memory.buffer().unchecked_into::<js_sys::ArrayBuffer>().byte_length() as f64
}

fn describe_engine(gpu: &Gpu, model: &Llama, source: Option<&WebModel>) -> serde_json::Value {
    let limits = &gpu.limits;
    let config = model.config();
    serde_json::json!({
        "adapter": {
            "name": gpu.info.name,
            "vendor": gpu.info.vendor,
            "device_type": format!("{:?}", gpu.info.device_type),
            "backend": format!("{:?}", gpu.info.backend),
        },
        "features": gpu.features.iter_names().map(|(name, _)| name).collect::<Vec<_>>(),
        "kv_type": gpu.kv_type.name(),
        "kv_buffers_per_layer": model.kv_pool().buffers(),
        "q8_activations": gpu.q8_activations,
        "limits": {
            "max_storage_buffer_binding_size": limits.max_storage_buffer_binding_size,
            "max_buffer_size": limits.max_buffer_size,
            "max_compute_workgroup_storage_size": limits.max_compute_workgroup_storage_size,
            "max_compute_workgroups_per_dimension": limits.max_compute_workgroups_per_dimension,
        },
        "model": {
            "layers": config.n_layers,
            "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size,
            "context_length": model.context_length(),
            "recommended_sampling": config.sampling_defaults,
        },
        "weights": source.map(WebModel::storage),
        "wasm_memory_bytes": wasm_memory_bytes(),
    })
}
