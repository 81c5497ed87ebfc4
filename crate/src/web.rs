//! wasm-bindgen exports for the browser: one engine per wasm instance (the JS package runs it in a
//! Web Worker). Concurrent `chat` calls run together (continuous batching): each queues itself, and
//! one task, the driver, started by the call that finds none running, adds queued requests to the
//! engine and steps it while any runs, handing each sequence's events to its request. Requests and
//! results cross as JSON strings in the shapes of `crate::api`; failures are thrown as JS `Error`s
//! whose `name` says what kind they are (see `ErrorKind`).

use std::cell::RefCell;
use std::collections::HashMap;

use futures_channel::oneshot::{self, Receiver};
use js_sys::{Function, Promise, Reflect};
use serde::Deserialize;
use wasm_bindgen::prelude::*;

use crate::api::ChatCompletionRequest;
use crate::engine::{ChoiceResults, Completion, Event, Load, SequenceId};
use crate::gpu::GpuError;
use crate::load::{LoadError, WebModel};
use crate::text::RenderOptions;
use crate::model::{KvPool, DEFAULT_CONTEXT, PAGE_SIZE};
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
    /// Anything else: bad requests, GPU failures, calls out of order.
    Engine,
}

impl ErrorKind {
    fn name(self) -> &'static str {
        match self {
            ErrorKind::NoWebGpu => "NoWebGpuError",
            ErrorKind::Limit => "LimitError",
            ErrorKind::Load => "LoadError",
            ErrorKind::Engine => "EngineError",
        }
    }
}

fn js_error(kind: ErrorKind, message: impl AsRef<str>) -> JsValue {
    let error = js_sys::Error::new(message.as_ref());
    error.set_name(kind.name());
    error.into()
}

impl From<&crate::Error> for ErrorKind {
    fn from(error: &crate::Error) -> Self {
        match error {
            crate::Error::Gpu(GpuError::NoAdapter { .. }) => ErrorKind::NoWebGpu,
            crate::Error::Gpu(GpuError::Limit { .. }) => ErrorKind::Limit,
            crate::Error::Load(_) => ErrorKind::Load,
            _ => ErrorKind::Engine,
        }
    }
}

fn to_js(error: crate::Error) -> JsValue {
    js_error(ErrorKind::from(&error), error.to_string())
}

/// A chat request waiting for the driver to add it to the engine.
struct Queued {
    request: ChatCompletionRequest,
    choices: usize,
    cancel: CancelToken,
    on_chunk: Function,
    done: oneshot::Sender<Result<String, JsValue>>,
}

/// A request the engine holds, as the driver knows it: a sequence per choice.
struct Active {
    on_chunk: Function,
    done: oneshot::Sender<Result<String, JsValue>>,
    cancel: CancelToken,
    sequences: Vec<SequenceId>,
    results: ChoiceResults,
}

/// The fields of a chat request beyond `crate::api::ChatCompletionRequest`.
#[derive(Deserialize)]
struct ChoiceCount {
    n: Option<usize>,
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
}

thread_local! {
    static STATE: RefCell<State> = RefCell::default();
}

/// Sequences run together unless `maxSequences` says otherwise.
const DEFAULT_MAX_SEQUENCES: usize = 4;

/// `load`'s options, as the JS API names them.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WebLoadOptions {
    context_length: Option<usize>,
    /// Caps the storage binding size below the adapter's, e.g. to test the split path.
    max_storage_binding: Option<u64>,
    max_sequences: Option<usize>,
    /// Bytes of the KV pool; default one full context, shared by the sequences.
    kv_memory: Option<u64>,
    /// Encode special-token text in message content as special tokens (default: as text).
    special_tokens_in_content: Option<bool>,
}

#[wasm_bindgen(start)]
fn start() {
    console_error_panic_hook::set_once();
}

/// Loads the model at `url` (absolute: a shard folder's manifest.json or a .gguf file), replacing any
/// loaded one (its requests end as on `unload`). `options_json`: `{"contextLength"?,
/// "maxStorageBinding"?, "maxSequences"?, "kvMemory"?, "specialTokensInContent"?}`. `on_progress(bytesDone, bytesTotal,
/// tensor)` is called as weights upload. Returns `info()`.
#[wasm_bindgen]
pub async fn load(url: String, options_json: String, on_progress: Function) -> Result<String, JsValue> {
    let options: WebLoadOptions =
        serde_json::from_str(&options_json).map_err(|e| js_error(ErrorKind::Engine, format!("load options: {e}")))?;
    unload();
    if !has_webgpu() {
        return Err(js_error(ErrorKind::NoWebGpu, "this browser has no WebGPU (navigator.gpu is missing)"));
    }
    let gpu = Gpu::new(&GpuOptions { max_storage_binding: options.max_storage_binding, ..Default::default() })
        .await
        .map_err(|e| to_js(e.into()))?;
    let source = WebModel::open(&url).await.map_err(to_js)?;
    let config = source.config().map_err(to_js)?;
    let (tokenizer, template) = source.text().await.map_err(to_js)?;
    // A tab's GPU memory is scarce: unless told otherwise, the sequences share the KV pages one
    // request had alone (a full context).
    let context = options.context_length.unwrap_or(DEFAULT_CONTEXT.min(config.max_position_embeddings));
    let one_context = context.div_ceil(PAGE_SIZE) as u64 * KvPool::bytes_per_page(&config);
    let load_options = LoadOptions {
        context_length: options.context_length,
        max_sequences: options.max_sequences.unwrap_or(DEFAULT_MAX_SEQUENCES),
        kv_memory: Some(options.kv_memory.unwrap_or(one_context)),
        ..Default::default()
    };
    let mut progress = |p: crate::LoadProgress| {
        let _ = on_progress.call3(
            &JsValue::NULL,
            &JsValue::from_f64(p.bytes_done as f64),
            &JsValue::from_f64(p.bytes_total as f64),
            &JsValue::from_str(p.tensor),
        );
    };
    let model = match Llama::load(&gpu, config, &source, &load_options, &mut progress).await {
        Ok(model) => model,
        Err(error) => {
            if let crate::Error::Load(LoadError::Checksum { file, .. }) = &error {
                source.forget(file).await;
            }
            return Err(to_js(error));
        }
    };
    let described = describe_engine(&gpu, &model, &source);
    let seed = (js_sys::Math::random() * 9007199254740992.0) as u64;
    let engine = Engine::new(model, tokenizer, template, seed).map_err(to_js)?;
    STATE.with_borrow_mut(|s| {
        s.load = engine.load();
        s.engine = Some(engine);
        s.info = Some(described);
        s.generation += 1;
        s.render = RenderOptions { special_tokens_in_content: options.special_tokens_in_content.unwrap_or(false), ..Default::default() };
    });
    Ok(info().unwrap_or_default())
}

/// Runs a chat completion request (JSON, `crate::api::ChatCompletionRequest` and `n`, the choices
/// to generate, default 1) together with any others, calling `on_chunk(text, tokenId, choice)` for
/// each generated token (`tokenId` undefined for text held back until the end). `id` is the
/// caller's name for it, for `abort`, unique among running requests. Resolves to `{"choices":
/// [{"text", "tokens", "finish_reason"}], "usage"}` as JSON, the prompt counted once in the usage.
#[wasm_bindgen]
pub fn chat(id: u32, request_json: String, on_chunk: Function) -> Promise {
    // Queued now rather than when the promise first runs, so an `abort(id)` right after finds it.
    let queued = enqueue(id, &request_json, on_chunk);
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
        result.map(JsValue::from)
    })
}

/// Queues a request for the driver, starting one when none runs. Returns the receiver of its
/// result and the generation it belongs to.
fn enqueue(id: u32, request_json: &str, on_chunk: Function) -> Result<(Receiver<Result<String, JsValue>>, u64), JsValue> {
    let request: ChatCompletionRequest =
        serde_json::from_str(request_json).map_err(|e| js_error(ErrorKind::Engine, format!("chat request: {e}")))?;
    let choices = serde_json::from_str::<ChoiceCount>(request_json)
        .map_err(|e| js_error(ErrorKind::Engine, format!("chat request: {e}")))?
        .n
        .unwrap_or(1);
    let (done, receiver) = oneshot::channel();
    let cancel = CancelToken::default();
    let (driver, generation) = STATE.with_borrow_mut(|s| {
        if s.engine.is_none() && !s.driving {
            return Err(js_error(ErrorKind::Engine, "no model is loaded"));
        }
        if s.requests.contains_key(&id) {
            return Err(js_error(ErrorKind::Engine, format!("request id {id} is already running")));
        }
        s.requests.insert(id, cancel.clone());
        s.queue.push(Queued { request, choices, cancel, on_chunk, done });
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
            let added = engine.add_chat(&request.request, &render, request.cancel.clone(), request.choices);
            match added {
                Ok(sequences) => {
                    let results = ChoiceResults::new(sequences.len());
                    active.push(Active { on_chunk: request.on_chunk, done: request.done, cancel: request.cancel, sequences, results });
                }
                Err(error) => {
                    let _ = request.done.send(Err(to_js(error)));
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
                        Event::Delta(delta) => {
                            let token = delta.token.map_or(JsValue::UNDEFINED, JsValue::from);
                            let args = [JsValue::from_str(&delta.text), token, JsValue::from(choice as u32)];
                            let _ = request.on_chunk.apply(&JsValue::NULL, &args.iter().collect());
                        }
                        Event::Finished(completion) => {
                            if let Some(choices) = request.results.record(choice, completion) {
                                let request = active.swap_remove(r);
                                let _ = request.done.send(Ok(completion_json(&choices)));
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
            // The GPU failed: the engine dropped every sequence.
            Err(error) => {
                let error = to_js(error);
                for request in active.drain(..) {
                    let _ = request.done.send(Err(error.clone()));
                }
            }
        }
    }
}

fn completion_json(choices: &[Completion]) -> String {
    let each: Vec<serde_json::Value> = choices
        .iter()
        .map(|c| serde_json::json!({"text": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason}))
        .collect();
    serde_json::json!({"choices": each, "usage": Completion::usage_of_choices(choices)}).to_string()
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
        s.driving = false;
        s.info = None;
        s.load = Load::default();
        s.generation += 1;
    });
}

/// The adapter, features and limits in use, the model's shape, and the engine's load now
/// (`running`, `waiting`, `kv_pages_free` of `kv_pages`), as JSON; null before a load.
#[wasm_bindgen]
pub fn info() -> Option<String> {
    STATE.with_borrow(|s| {
        let mut info = s.info.clone()?;
        // Queued requests wait for the driver's next step to reach the engine.
        let load = Load { waiting: s.load.waiting + s.queue.len(), ..s.load };
        info["load"] = serde_json::json!(load);
        Some(info.to_string())
    })
}

fn has_webgpu() -> bool {
    Reflect::get(&js_sys::global(), &"navigator".into())
        .and_then(|navigator| Reflect::get(&navigator, &"gpu".into()))
        .is_ok_and(|gpu| !gpu.is_undefined() && !gpu.is_null())
}

/// Bytes of wasm linear memory: it never shrinks, so after a load this is the load's peak.
fn wasm_memory_bytes() -> f64 {
    let memory: js_sys::WebAssembly::Memory = wasm_bindgen::memory().unchecked_into();
    memory.buffer().unchecked_into::<js_sys::ArrayBuffer>().byte_length() as f64
}

fn describe_engine(gpu: &Gpu, model: &Llama, source: &WebModel) -> serde_json::Value {
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
        },
        "weights": source.storage(),
        "wasm_memory_bytes": wasm_memory_bytes(),
    })
}
