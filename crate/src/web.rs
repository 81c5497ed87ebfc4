//! wasm-bindgen exports for the browser: one engine per wasm instance (the JS package runs it in a
//! Web Worker). Requests and results cross as JSON strings in the shapes of `crate::api`; failures
//! are thrown as JS `Error`s whose `name` says what kind they are (see `ErrorKind`).

use std::cell::RefCell;

use js_sys::{Function, Reflect};
use serde::Deserialize;
use wasm_bindgen::prelude::*;

use crate::api::ChatCompletionRequest;
use crate::gpu::GpuError;
use crate::load::{LoadError, WebModel};
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

#[derive(Default)]
struct State {
    /// Taken out while a request runs, so a second request is refused instead of interleaved.
    engine: Option<Engine>,
    busy: bool,
    info: Option<serde_json::Value>,
    cancel: CancelToken,
    /// Bumped by every load and unload, so a request that outlives its engine does not restore it.
    generation: u64,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::default();
}

/// `load`'s options, as the JS API names them.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WebLoadOptions {
    context_length: Option<usize>,
    /// Caps the storage binding size below the adapter's, e.g. to test the split path.
    max_storage_binding: Option<u64>,
}

#[wasm_bindgen(start)]
fn start() {
    console_error_panic_hook::set_once();
}

/// Loads the model at `url` (absolute: a shard folder's manifest.json or a .gguf file), replacing any
/// loaded one. `options_json`: `{"contextLength"?, "maxStorageBinding"?}`. `on_progress(bytesDone,
/// bytesTotal, tensor)` is called as weights upload. Returns `info()`.
#[wasm_bindgen]
pub async fn load(url: String, options_json: String, on_progress: Function) -> Result<String, JsValue> {
    let options: WebLoadOptions =
        serde_json::from_str(&options_json).map_err(|e| js_error(ErrorKind::Engine, format!("load options: {e}")))?;
    if STATE.with_borrow(|s| s.busy) {
        return Err(js_error(ErrorKind::Engine, "a chat request is running; abort it before loading"));
    }
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
    let load_options = LoadOptions { context_length: options.context_length, ..Default::default() };
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
    let info = describe_engine(&gpu, &model, &source);
    let seed = (js_sys::Math::random() * 9007199254740992.0) as u64;
    let engine = Engine::new(model, tokenizer, template, seed).map_err(to_js)?;
    let text = info.to_string();
    STATE.with_borrow_mut(|s| {
        s.engine = Some(engine);
        s.info = Some(info);
        s.generation += 1;
    });
    Ok(text)
}

/// Runs a chat completion request (JSON, `crate::api::ChatCompletionRequest`), calling
/// `on_chunk(text, tokenId)` for each generated token (`tokenId` undefined for text held back until
/// the end). Returns `{"text", "tokens", "finish_reason", "usage"}` as JSON.
#[wasm_bindgen]
pub async fn chat(request_json: String, on_chunk: Function) -> Result<String, JsValue> {
    let request: ChatCompletionRequest =
        serde_json::from_str(&request_json).map_err(|e| js_error(ErrorKind::Engine, format!("chat request: {e}")))?;
    let (mut engine, cancel, generation) = STATE.with_borrow_mut(|s| {
        if s.busy {
            return Err(js_error(ErrorKind::Engine, "a chat request is already running"));
        }
        let engine = s.engine.take().ok_or_else(|| js_error(ErrorKind::Engine, "no model is loaded"))?;
        s.busy = true;
        s.cancel = CancelToken::default();
        Ok((engine, s.cancel.clone(), s.generation))
    })?;
    let result = engine
        .chat(&request, &cancel, &mut |delta| {
            let token = delta.token.map_or(JsValue::UNDEFINED, JsValue::from);
            let _ = on_chunk.call2(&JsValue::NULL, &JsValue::from_str(&delta.text), &token);
        })
        .await;
    STATE.with_borrow_mut(|s| {
        s.busy = false;
        if s.generation == generation {
            s.engine = Some(engine);
        }
    });
    let completion = result.map_err(to_js)?;
    Ok(serde_json::json!({
        "text": completion.text,
        "tokens": completion.tokens,
        "finish_reason": completion.finish_reason,
        "usage": completion.usage,
    })
    .to_string())
}

/// Stops the running request after its current token; it returns with finish_reason "abort".
#[wasm_bindgen]
pub fn abort() {
    STATE.with_borrow(|s| s.cancel.cancel());
}

/// Frees the model's GPU memory; a running request ends after its current token.
#[wasm_bindgen]
pub fn unload() {
    STATE.with_borrow_mut(|s| {
        s.cancel.cancel();
        s.engine = None;
        s.info = None;
        s.generation += 1;
    });
}

/// The adapter, features and limits in use and the model's shape, as JSON; null before a load.
#[wasm_bindgen]
pub fn info() -> Option<String> {
    STATE.with_borrow(|s| s.info.as_ref().map(|i| i.to_string()))
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
