//! `llama-webgpu serve`: an OpenAI-compatible HTTP server over one engine.
//!
//! HTTP runs on a single-threaded tokio runtime (axum). The engine runs on a thread of its own
//! (engine_thread.rs) and takes jobs from a bounded FIFO queue as it has room for them: up to
//! `--parallel` requests run together, each step of the engine advancing all of them, and each gets
//! the output it would get alone; requests share the KV pages of their common prompt prefixes. Every
//! job carries a CancelToken that a guard sets when its handler or response stream is dropped, which
//! is what hyper does when the client disconnects: a queued job is then skipped, a running one stops
//! at the next token.

mod engine_thread;
mod responses;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context as TaskContext, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use clap::Args;
use llama_webgpu::api::request::{self, Parsed, UnknownFields, Work};
use llama_webgpu::hub::ModelRef;
use llama_webgpu::api::response::{self, Endpoint, ResponseMeta};
use llama_webgpu::api::responses::{self as responses_api, Conversation, ItemPage, ResponseEvents, ResponseHeader, ResponseStore, ResponsesRequest};
use llama_webgpu::engine::{ChoiceResults, Prepared, Prompter};
use llama_webgpu::text::RenderOptions;
use llama_webgpu::{CancelToken, Completion, GpuOptions, LoadOptions};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tower_http::cors::{AllowOrigin, CorsLayer};

use self::engine_thread::{AliveWhileHeld, Client, Ended, EngineThreadOptions, Event, Job, Stats};
use self::responses::{ApiError, EventFormat, ResponseSse, SseChunks};
use super::ModelArgs;

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on. The default keeps the server to this machine.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port; 0 picks a free one (the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The model's name in the API (/v1/models and every response's `model`) instead of its
    /// file's or repository's, for clients that ask for a fixed name; several names (repeated or
    /// space-separated) are all listed, the first answers.
    #[arg(long, value_name = "NAME", num_args = 1.., value_parser = served_name)]
    served_model_name: Vec<String>,
    /// Require `Authorization: Bearer KEY` on /v1 requests (or set LLAMA_WEBGPU_API_KEY, which
    /// keeps the key out of the process list).
    #[arg(long)]
    api_key: Option<String>,
    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, default_value_t = 2 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Requests that may wait for the engine while it runs as many as it can; more get 503.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Encode special-token text inside message content (`<|eot_id|>`, ...) as special tokens, as
    /// transformers does. By default it is encoded as the text it is, so that a user or a document
    /// cannot forge turns; the template's own markup keeps its special tokens either way.
    #[arg(long)]
    special_tokens_in_content: bool,
    /// Lets web pages of ORIGIN (e.g. `https://app.example.com`; repeatable; `*` for any) call the
    /// API from the browser (CORS): their preflights are answered and responses carry
    /// Access-Control-Allow-Origin. Without it browsers keep other origins' pages out.
    #[arg(long = "cors-origin", value_name = "ORIGIN", value_parser = parse_origin)]
    cors_origins: Vec<HeaderValue>,
    /// Serve `GET /metrics` in the Prometheus (OpenMetrics) text format: requests by outcome,
    /// tokens, queue, sequences, KV pages, time to first token and request time. Like /health, it
    /// needs no API key.
    #[arg(long)]
    metrics: bool,
    /// Memory for the responses of /v1/responses kept for `previous_response_id` and
    /// `GET /v1/responses/{id}` (requests with `store: true`, OpenAI's default), e.g. 64MiB: the
    /// oldest are dropped to make room; 0 keeps none.
    #[arg(long, value_name = "BYTES", value_parser = super::parse_size, default_value_t = responses_api::DEFAULT_STORE_BYTES as u64)]
    response_store: u64,
    /// On SIGTERM or SIGINT the server stops taking connections and lets running requests finish
    /// for this many seconds; those still running then end (a stream with an error event, others
    /// with 503) and the server exits with status 0.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    shutdown_grace: f64,
    /// Waits this long after each generated token, so tests of queueing and cancellation do not
    /// depend on how fast the GPU is.
    #[arg(long, default_value_t = 0, hide = true)]
    token_interval_ms: u64,
    /// Destroys the GPU device once this many tokens have been generated, to test recovery.
    #[arg(long, hide = true)]
    lose_device_after_tokens: Option<u64>,
}

/// A `--served-model-name`: any text a client can send back, but not blank.
fn served_name(name: &str) -> Result<String, String> {
    if name.trim().is_empty() {
        return Err("a model name must not be empty or blank".into());
    }
    Ok(name.to_string())
}

/// Sequences `serve` decodes together on a GPU unless `--parallel` says otherwise.
const DEFAULT_GPU_PARALLEL: usize = 16;

/// GPU memory for rows of logits beyond one a sequence, which scored prompt positions take
/// (`echo` with `logprobs`): 130 rows of Llama 3's vocabulary, so a pass scores 130 positions
/// more instead of one a sequence.
const SCORING_MEMORY: u64 = 64 << 20;

/// What the handlers share.
struct Server {
    /// The model's names in the API: the first answers, every one is listed.
    model_ids: Vec<String>,
    api_key: Option<String>,
    max_body_bytes: usize,
    queue_capacity: usize,
    jobs: SyncSender<Job>,
    stats: Arc<Stats>,
    /// Renders and tokenizes requests on the blocking pool, beside the engine's thread.
    prompter: Prompter,
    render: RenderOptions,
    /// Requests being prepared at once: as many as the machine has cores.
    preparing: tokio::sync::Semaphore,
    /// Unix seconds at start, for /v1/models.
    started: u64,
    next_id: AtomicU64,
    metrics: bool,
    responses: Mutex<ResponseStore>,
}

impl Server {
    /// The name responses give the model.
    fn model_id(&self) -> &str {
        &self.model_ids[0]
    }
}

/// Serves `model`, which `reference` named (a path, or a Hub reference `model` was fetched for).
pub fn serve(gpu_options: GpuOptions, model: ModelArgs, reference: &str, args: ServeArgs, quiet: bool) -> anyhow::Result<()> {
    let given = std::path::Path::new(&model.model);
    let path = given.canonicalize().with_context(|| format!("model {}", model.model))?;
    let named = match ModelRef::parse(reference) {
        // A Hub model folder is named by its repository, as vLLM names it (the snapshot's folder
        // is a commit hash).
        Ok(ModelRef::Hub(hub)) if path.is_dir() => hub.repo,
        // Else the folder's name, or a model file's less the extension (a link's own name, as the
        // Hub cache's are).
        _ => {
            let name = if path.is_file() { given.file_stem() } else { path.file_name() };
            name.map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
        }
    };
    let mut model_ids = if args.served_model_name.is_empty() { vec![named] } else { args.served_model_name.clone() };
    // A name given twice is one model.
    let mut seen = std::collections::HashSet::new();
    model_ids.retain(|id| seen.insert(id.clone()));
    let api_key = args.api_key.clone().or_else(|| std::env::var("LLAMA_WEBGPU_API_KEY").ok()).filter(|k| !k.is_empty());

    // Bind before the (long) load so that a taken port fails at once; connections that arrive
    // during the load wait in the backlog.
    let listener = std::net::TcpListener::bind((args.host.as_str(), args.port))
        .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
    listener.set_nonblocking(true)?;
    let address = listener.local_addr()?;

    let stats = Arc::new(Stats::default());
    let (jobs, queue) = sync_channel::<Job>(args.queue);
    let (loaded_tx, loaded_rx) = std::sync::mpsc::channel::<anyhow::Result<Prompter>>();
    let thread_stats = stats.clone();
    let token_interval = std::time::Duration::from_millis(args.token_interval_ms);
    let render = RenderOptions { special_tokens_in_content: args.special_tokens_in_content, ..Default::default() };
    // Set when the grace period after a shutdown signal has passed: the engine ends what it holds.
    let stop_all = CancelToken::default();
    let mut model = model;
    let options = EngineThreadOptions { token_interval, stop_all: stop_all.clone(), lose_device_after_tokens: args.lose_device_after_tokens };
    std::thread::Builder::new().name("engine".into()).spawn(move || {
        let load = |model: &mut ModelArgs| {
            pollster::block_on(async {
                let gpu = llama_webgpu::Gpu::new(&gpu_options).await?;
                log::info!("adapter: {} ({:?})", gpu.info.name, gpu.info.backend);
                // A CPU adapter runs one workgroup per core: batching buys it little.
                let parallel = if gpu.info.device_type == wgpu::DeviceType::Cpu { 1 } else { DEFAULT_GPU_PARALLEL };
                model.parallel.get_or_insert(parallel);
                let options = LoadOptions { scoring_memory: SCORING_MEMORY, ..model.load_options() };
                let engine = super::load_engine(&gpu, model, &options, quiet).await?;
                let load = engine.load();
                log::info!(
                    "{} sequences together, a KV pool of {} pages of {} positions ({} MiB, {} buffers per layer)",
                    load.max_sequences,
                    load.kv_pages,
                    load.kv_page_size,
                    (load.kv_pages as u64 * load.kv_page_bytes) >> 20,
                    load.kv_buffers
                );
                if let Some(draft) = engine.draft_model() {
                    let pool = draft.kv_pool();
                    let bytes = pool.pages as u64 * llama_webgpu::model::KvPool::bytes_per_page(draft.config(), pool.kv_type);
                    log::info!("a draft model of {} layers drafts for it, its KV pool {} MiB", draft.config().n_layers, bytes >> 20);
                }
                Ok::<_, anyhow::Error>(engine)
            })
        };
        let mut engine = match load(&mut model) {
            Ok(engine) => engine,
            Err(error) => {
                let _ = loaded_tx.send(Err(error));
                return;
            }
        };
        let _ = loaded_tx.send(Ok(engine.prompter().clone()));
        let _alive = AliveWhileHeld::new(thread_stats.clone());
        let mut options = options;
        // A lost device (a driver reset, another process) is replaced: the model loads again from
        // its files while requests wait in the queue.
        while engine_thread::run(engine, &queue, thread_stats.clone(), &options) == Ended::DeviceLost {
            options.lose_device_after_tokens = None;
            thread_stats.loading.store(true, Ordering::SeqCst);
            engine = match reload(&mut model, &load) {
                Some(engine) => engine,
                None => return,
            };
            thread_stats.loading.store(false, Ordering::SeqCst);
        }
    })?;
    let prompter = loaded_rx.recv().context("the engine thread ended while loading")??;

    let cors = cors_layer(&args.cors_origins);
    let server = Arc::new(Server {
        model_ids,
        api_key,
        max_body_bytes: args.max_body_bytes,
        queue_capacity: args.queue,
        jobs,
        stats,
        prompter,
        render,
        preparing: tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(1, |n| n.get())),
        started: unix_seconds(),
        next_id: AtomicU64::new(1),
        metrics: args.metrics,
        responses: Mutex::new(ResponseStore::new(usize::try_from(args.response_store).unwrap_or(usize::MAX))),
    });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        eprintln!("llama-webgpu: serving {} on http://{address}", server.model_id());
        if server.api_key.is_some() {
            log::info!("/v1 requests need the API key");
        }
        // Each token is a small write: without TCP_NODELAY, Nagle's algorithm can hold it back.
        let listener = listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                log::warn!("TCP_NODELAY: {error}");
            }
        });
        let mut app = router(server);
        if let Some(cors) = cors {
            app = app.layer(cors);
        }
        let grace = std::time::Duration::try_from_secs_f64(args.shutdown_grace).context("--shutdown-grace")?;
        axum::serve(listener, app).with_graceful_shutdown(shutdown_signal(grace, stop_all)).await?;
        log::info!("shut down");
        Ok(())
    })
}

/// Completes on SIGTERM or SIGINT (axum then stops accepting and waits for open requests), and
/// `grace` later ends the requests still running.
async fn shutdown_signal(grace: std::time::Duration, stop_all: CancelToken) {
    let interrupt = tokio::signal::ctrl_c();
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                log::warn!("SIGTERM cannot be handled: {error}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
    eprintln!("llama-webgpu: shutting down: running requests have {grace:?} to finish");
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        stop_all.cancel();
    });
}

/// Loads the model again after the device was lost, a few times with growing pauses (the driver
/// may still be resetting); None when every try failed.
fn reload(model: &mut ModelArgs, load: &impl Fn(&mut ModelArgs) -> anyhow::Result<llama_webgpu::Engine>) -> Option<llama_webgpu::Engine> {
    for attempt in 1..=RELOAD_ATTEMPTS {
        log::warn!("the GPU device was lost: loading the model again (attempt {attempt} of {RELOAD_ATTEMPTS})");
        match load(model) {
            Ok(engine) => {
                log::info!("the model is loaded again");
                return Some(engine);
            }
            Err(error) => {
                log::error!("loading the model again failed: {error:#}");
                std::thread::sleep(std::time::Duration::from_secs(1 << attempt));
            }
        }
    }
    log::error!("the model could not be loaded again; the server answers 503 until restarted");
    None
}

/// Tries at loading the model again after a lost device.
const RELOAD_ATTEMPTS: u32 = 5;

/// An origin as a browser sends it: `*`, or scheme://host[:port] with nothing after.
fn parse_origin(origin: &str) -> Result<HeaderValue, String> {
    // Nothing after the authority: no path, not even "/".
    let bare = |uri: Uri| uri.scheme().is_some() && uri.authority().is_some_and(|a| origin.ends_with(a.as_str()));
    if origin != "*" && !origin.parse::<Uri>().is_ok_and(bare) {
        return Err(format!("{origin:?} is not an origin: give scheme://host[:port] (no path, e.g. https://app.example.com) or *"));
    }
    HeaderValue::from_str(origin).map_err(|e| format!("{origin:?}: {e}"))
}

/// The CORS layer for `--cors-origin`, none without it. Preflights are answered before the API key
/// check (browsers send them without credentials); the requests after them still need the key.
fn cors_layer(origins: &[HeaderValue]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allowed = if origins.iter().any(|o| o == "*") { AllowOrigin::any() } else { AllowOrigin::list(origins.iter().cloned()) };
    Some(
        CorsLayer::new()
            .allow_origin(allowed)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

fn router(server: Arc<Server>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(create_response))
        .route("/v1/responses/{id}", get(stored_response).delete(delete_response))
        .route("/v1/responses/{id}/input_items", get(input_items))
        .route("/v1/models", get(models))
        // A wildcard: Hub repositories' names hold a slash.
        .route("/v1/models/{*id}", get(model))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(server.clone(), require_api_key));
    let mut router = Router::new().route("/health", get(health));
    if server.metrics {
        router = router.route("/metrics", get(metrics));
    }
    router
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(server.max_body_bytes))
        .with_state(server)
}

async fn require_api_key(State(server): State<Arc<Server>>, request: Request, next: Next) -> Response {
    if let Some(key) = &server.api_key {
        let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let error = match given.map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim()) {
            None => Some("missing API key: send the header `Authorization: Bearer <key>`"),
            Some(given) if !same_bytes(given.as_bytes(), key.as_bytes()) => Some("invalid API key"),
            Some(_) => None,
        };
        if let Some(message) = error {
            return ApiError::invalid(message).with_status(StatusCode::UNAUTHORIZED).code("invalid_api_key").into_response();
        }
    }
    next.run(request).await
}

/// Compares in time that does not depend on where the bytes differ.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(server): State<Arc<Server>>) -> Response {
    let stats = &server.stats;
    let alive = stats.alive.load(Ordering::SeqCst);
    let count = |c: &AtomicU64| c.load(Ordering::SeqCst);
    let engine = stats.engine_load();
    let body = json!({
        "status": match (alive, stats.loading.load(Ordering::SeqCst)) {
            (false, _) => "error: the engine has stopped",
            (true, true) => "loading",
            (true, false) => "ok",
        },
        "model": server.model_id(),
        "queue": {"waiting": stats.queued.load(Ordering::SeqCst) + engine.waiting, "capacity": server.queue_capacity},
        "engine": engine,
        "requests": {
            "running": engine.running,
            "completed": count(&stats.completed),
            "cancelled": count(&stats.cancelled),
            "skipped": count(&stats.skipped),
            "failed": count(&stats.failed),
            "rejected": count(&stats.rejected),
        },
        "generated_tokens": count(&stats.generated_tokens),
    });
    let ready = alive && !stats.loading.load(Ordering::SeqCst);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

/// The counters of /health and more, in the OpenMetrics text format Prometheus scrapes.
async fn metrics(State(server): State<Arc<Server>>) -> Response {
    use prometheus_client::metrics::counter::{ConstCounter, Counter};
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::ConstGauge;
    let stats = &server.stats;
    let count = |c: &AtomicU64| ConstCounter::new(c.load(Ordering::SeqCst));
    let engine = stats.engine_load();
    let mut registry = prometheus_client::registry::Registry::with_prefix("llama_webgpu");
    // Built again for each scrape from the running totals.
    let by_outcome = |counters: &[(&'static str, &AtomicU64)]| {
        let family = Family::<[(&'static str, &'static str); 1], Counter>::default();
        for &(outcome, counter) in counters {
            family.get_or_create(&[("outcome", outcome)]).inc_by(counter.load(Ordering::SeqCst));
        }
        family
    };
    let requests = by_outcome(&[
        ("completed", &stats.completed),
        ("cancelled", &stats.cancelled),
        ("skipped", &stats.skipped),
        ("failed", &stats.failed),
        ("rejected", &stats.rejected),
    ]);
    registry.register("requests", "Requests ended, by how (rejected: 503 with a full queue)", requests);
    registry.register("prompt_tokens", "Prompt tokens of ended requests", count(&stats.prompt_tokens));
    registry.register("cached_prompt_tokens", "Prompt tokens whose KV pages were reused", count(&stats.cached_prompt_tokens));
    registry.register("generated_tokens", "Tokens generated", count(&stats.generated_tokens));
    let drafts = by_outcome(&[("accepted", &stats.accepted_draft_tokens), ("rejected", &stats.rejected_draft_tokens)]);
    registry.register("draft_tokens", "Drafted tokens (a grammar's forced tokens, a prediction, a draft model, prompt lookup) verified, by whether the model chose them", drafts);
    let gauge = |value: usize| ConstGauge::new(value as i64);
    registry.register("requests_queued", "Requests waiting for the engine", gauge(stats.queued.load(Ordering::SeqCst) + engine.waiting));
    registry.register("sequences_running", "Sequences the engine is running", gauge(engine.running));
    registry.register("sequences_max", "Sequences the engine runs together at most", gauge(engine.max_sequences));
    registry.register("kv_pages", "Pages of the KV pool", gauge(engine.kv_pages));
    registry.register("kv_pages_free", "Pages of the KV pool not held by a sequence", gauge(engine.kv_pages_free));
    registry.register("kv_page_positions", "Positions per KV page", gauge(engine.kv_page_size));
    registry.register("preemptions", "Sequences that gave their KV pages back to a full pool, to be computed again", ConstCounter::new(engine.preemptions));
    registry.register("engine_up", "1 while the engine thread runs", gauge(stats.alive.load(Ordering::SeqCst) as usize));
    registry.register("heap_bytes", "Bytes held through Rust's allocator (the GPU driver's own allocations are not counted)", gauge(super::heap::live_bytes()));
    registry.register("gpu_allocated_bytes", "Bytes of GPU memory allocated, as of the engine's latest idle moment", gauge(stats.gpu_allocated_bytes.load(Ordering::SeqCst) as usize));
    let (responses, response_bytes) = server.responses.lock().unwrap_or_else(PoisonError::into_inner).usage();
    registry.register("responses_stored", "Responses kept for previous_response_id", gauge(responses));
    registry.register("response_store_bytes", "Bytes of the responses kept (their JSON), within --response-store", gauge(response_bytes));
    registry.register("time_to_first_token_seconds", "From the engine taking a request to its first token", stats.first_token_seconds.clone());
    registry.register("request_seconds", "From the engine taking a request to its end", stats.request_seconds.clone());
    let mut body = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut body, &registry) {
        return ApiError::server(format!("encoding the metrics failed: {error}")).into_response();
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
}

fn model_object(server: &Server, id: &str) -> serde_json::Value {
    json!({"id": id, "object": "model", "created": server.started, "owned_by": "llama-webgpu"})
}

async fn models(State(server): State<Arc<Server>>) -> Response {
    let data: Vec<Value> = server.model_ids.iter().map(|id| model_object(&server, id)).collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn model(State(server): State<Arc<Server>>, Path(id): Path<String>) -> Response {
    if server.model_ids.contains(&id) {
        Json(model_object(&server, &id)).into_response()
    } else {
        ApiError::invalid(format!("model {id:?} is not served here; this server has {}", server.model_ids.join(", ")))
            .with_status(StatusCode::NOT_FOUND)
            .param("model")
            .code("model_not_found")
            .into_response()
    }
}

async fn not_found(method: Method, uri: Uri) -> Response {
    ApiError::invalid(format!("no such endpoint: {method} {}", uri.path()))
        .with_status(StatusCode::NOT_FOUND)
        .code("not_found")
        .into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::invalid(format!("{method} is not allowed on {}", uri.path()))
        .with_status(StatusCode::METHOD_NOT_ALLOWED)
        .code("method_not_allowed")
        .into_response()
}

async fn chat_completions(State(server): State<Arc<Server>>, body: Result<Bytes, BytesRejection>) -> Response {
    match read_body(&server, body).and_then(|b| Ok(request::read_chat(request::parse_body(&b)?, UnknownFields::Ignore)?)) {
        Ok(parsed) => respond(server, Endpoint::Chat, parsed).await,
        Err(error) => error.into_response(),
    }
}

async fn completions(State(server): State<Arc<Server>>, body: Result<Bytes, BytesRejection>) -> Response {
    match read_body(&server, body).and_then(|b| Ok(request::read_completion(request::parse_body(&b)?, UnknownFields::Ignore)?)) {
        Ok(parsed) => respond(server, Endpoint::Completion, parsed).await,
        Err(error) => error.into_response(),
    }
}

fn read_body(server: &Server, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("the request body is larger than this server's limit of {} bytes (--max-body-bytes)", server.max_body_bytes)
        } else {
            format!("could not read the request body: {}", rejection.body_text())
        };
        ApiError::invalid(message).with_status(status)
    })
}

/// Cancels its job when dropped: when the handler's future or the response stream goes away,
/// the client has gone. Cancelling a finished job does nothing.
struct CancelOnDrop(CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Queues the job, then answers with the whole completion or a stream of its chunks.
async fn respond(server: Arc<Server>, endpoint: Endpoint, parsed: Parsed) -> Response {
    let meta = ResponseMeta { endpoint, id: format!("{}-{}", endpoint.id_prefix(), serial(&server)), created: unix_seconds(), model: server.model_id().to_string() };
    let choices = parsed.all_choices();
    let Queued { mut events, guard } = match queue(&server, &meta.id, parsed.work, parsed.choices).await {
        Ok(queued) => queued,
        Err(error) => return error.into_response(),
    };
    if !parsed.stream {
        let started = Instant::now();
        return match all_completions(&mut events, choices).await {
            Ok(completions) => {
                log::debug!("{}: answered in {:.2} s", meta.id, started.elapsed().as_secs_f64());
                Json(meta.completion(&completions)).into_response()
            }
            Err(error) => error.into_response(),
        };
    }
    let first = match first_event(&mut events).await {
        Ok(event) => event,
        Err(error) => return error.into_response(),
    };
    event_stream(SseStream::new(Box::new(SseChunks::new(meta, parsed.include_usage, choices)), first, events, guard))
}

/// OpenAI's Responses API: the request as a chat, its completion as a response object or a stream
/// of Responses events; kept for `previous_response_id` unless `store` is false.
async fn create_response(State(server): State<Arc<Server>>, body: Result<Bytes, BytesRejection>) -> Response {
    let request = match read_response_request(&server, body) {
        Ok(request) => request,
        Err(error) => return error.into_response(),
    };
    let logprobs = request.logprobs();
    let header = ResponseHeader { id: format!("resp_{}", serial(&server)), created_at: unix_seconds(), model: server.model_id().to_string(), settings: request.settings };
    let Queued { mut events, guard } = match queue(&server, &header.id, request.parsed.work, 1).await {
        Ok(queued) => queued,
        Err(error) => return error.for_responses().into_response(),
    };
    let keep = request.store.then(|| {
        let (server, id, conversation) = (server.clone(), header.id.clone(), request.conversation);
        move |response: &Value, completion: &Completion| keep_response(&server, id, response, conversation, completion)
    });
    if !request.parsed.stream {
        return match all_completions(&mut events, 1).await {
            Ok(completions) => {
                let response = header.response(&completions[0]);
                if let Some(keep) = keep {
                    keep(&response, &completions[0]);
                }
                Json(response).into_response()
            }
            Err(error) => error.for_responses().into_response(),
        };
    }
    let first = match first_event(&mut events).await {
        Ok(event) => event,
        Err(error) => return error.for_responses().into_response(),
    };
    let format = ResponseSse::new(ResponseEvents::new(header, logprobs), keep.map(|keep| Box::new(keep) as _));
    event_stream(SseStream::new(Box::new(format), first, events, guard))
}

/// A Responses request, continuing the stored response its `previous_response_id` names.
fn read_response_request(server: &Server, body: Result<Bytes, BytesRejection>) -> Result<ResponsesRequest, ApiError> {
    let object = request::parse_body(&read_body(server, body)?)?;
    let previous = match responses_api::previous_response_id(&object)? {
        None => Conversation::default(),
        Some(id) => {
            let store = server.responses.lock().unwrap_or_else(PoisonError::into_inner);
            match store.get(&id) {
                Some(stored) => stored.conversation.clone(),
                None => return Err(not_stored(&store, &id).param("previous_response_id").code("previous_response_not_found")),
            }
        }
    };
    Ok(responses_api::read_responses(object, UnknownFields::Ignore, previous)?)
}

/// Stores a finished response with its conversation, its output last.
fn keep_response(server: &Server, id: String, response: &Value, conversation: Conversation, completion: &Completion) {
    let mut store = server.responses.lock().unwrap_or_else(PoisonError::into_inner);
    if !store.keep(id.clone(), response.clone(), conversation, completion) {
        log::warn!("{id}: not stored: larger than --response-store ({} bytes)", store.budget());
    }
}

/// 404 for a response this server does not hold.
fn not_stored(store: &ResponseStore, id: &str) -> ApiError {
    ApiError::invalid(format!("{} (--response-store)", store.missing(id))).with_status(StatusCode::NOT_FOUND).code("not_found")
}

async fn stored_response(State(server): State<Arc<Server>>, Path(id): Path<String>) -> Response {
    let store = server.responses.lock().unwrap_or_else(PoisonError::into_inner);
    match store.get(&id) {
        Some(stored) => Json(stored.response.clone()).into_response(),
        None => not_stored(&store, &id).into_response(),
    }
}

/// The items a stored response was given, a page at a time (`after`, `limit`, `order`,
/// `include`, as OpenAI's query; `include[]=` as the openai clients send a list).
async fn input_items(State(server): State<Arc<Server>>, Path(id): Path<String>, Query(query): Query<Vec<(String, String)>>) -> Response {
    let mut params = Map::new();
    let mut include = vec![];
    for (name, value) in query {
        match name.as_str() {
            "include" | "include[]" => include.push(Value::String(value)),
            _ => _ = params.insert(name, Value::String(value)),
        }
    }
    if !include.is_empty() {
        params.insert("include".into(), Value::Array(include));
    }
    let page = match ItemPage::read(&params) {
        Ok(page) => page,
        Err(error) => return ApiError::from(error).into_response(),
    };
    let store = server.responses.lock().unwrap_or_else(PoisonError::into_inner);
    match store.get(&id).map(|stored| stored.input_items(&page)) {
        Some(Ok(list)) => Json(list).into_response(),
        Some(Err(error)) => ApiError::from(error).into_response(),
        None => not_stored(&store, &id).into_response(),
    }
}

async fn delete_response(State(server): State<Arc<Server>>, Path(id): Path<String>) -> Response {
    let mut store = server.responses.lock().unwrap_or_else(PoisonError::into_inner);
    if store.remove(&id) {
        Json(json!({"id": id, "object": "response.deleted", "deleted": true})).into_response()
    } else {
        not_stored(&store, &id).into_response()
    }
}

/// What a new response's id holds after its prefix: the server's start time and a counter.
fn serial(server: &Server) -> String {
    format!("{:x}-{}", server.started, server.next_id.fetch_add(1, Ordering::Relaxed))
}

/// A queued job's events, and what cancels it when the response goes away.
struct Queued {
    events: UnboundedReceiver<Event>,
    guard: CancelOnDrop,
}

/// Prepares `work` and queues it for the engine.
async fn queue(server: &Arc<Server>, id: &str, work: Work, choices: usize) -> Result<Queued, ApiError> {
    let (work, prepared) = prepare(server, id, work).await?;
    let cancel = CancelToken::default();
    let guard = CancelOnDrop(cancel.clone());
    let (events_tx, events) = unbounded_channel();
    let client = Client { id: id.to_string(), cancel, events: events_tx };
    submit(server, Job { client, work, prepared, choices })?;
    log::debug!("{id}: queued");
    Ok(Queued { events, guard })
}

/// Every choice's completion, as the job's events bring them.
async fn all_completions(events: &mut UnboundedReceiver<Event>, choices: usize) -> Result<Vec<Completion>, ApiError> {
    let mut results = ChoiceResults::new(choices);
    loop {
        match events.recv().await {
            Some(Event::Delta { .. } | Event::Echo { .. }) => {}
            Some(Event::Finished { choice, completion }) => {
                if let Some(completions) = results.record(choice, completion) {
                    return Ok(completions);
                }
            }
            Some(Event::Failed(error)) => return Err(error),
            None => return Err(engine_stopped()),
        }
    }
}

/// A job's events ended before it did: the engine's thread is gone.
fn engine_stopped() -> ApiError {
    ApiError::server("the engine stopped without finishing the request")
}

/// The job's first event, waited for so that a request the engine rejects (prompt too long, a
/// sampling parameter out of range) gets its HTTP status rather than a stream that fails at once.
async fn first_event(events: &mut UnboundedReceiver<Event>) -> Result<Event, ApiError> {
    match events.recv().await {
        Some(Event::Failed(error)) => Err(error),
        None => Err(engine_stopped()),
        Some(event) => Ok(event),
    }
}

fn event_stream(stream: SseStream) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        // Tells a reverse proxy (nginx) not to buffer the stream.
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|error| ApiError::server(error.to_string()).into_response())
}

/// Renders and tokenizes `work` on the blocking pool: a long prompt takes a while (0.8 s for
/// 100,000 tokens on a 2-core machine), which the engine's thread, decoding every sequence, would
/// otherwise spend. A request the prompter refuses is a 400 here.
async fn prepare(server: &Arc<Server>, id: &str, work: Work) -> Result<(Work, Prepared), ApiError> {
    let (work, prepared) = beside_the_engine(server, move |server| {
        let prepared = server.prompter.prepare(&work, &server.render);
        (work, prepared)
    })
    .await?;
    match prepared {
        Ok(prepared) => Ok((work, prepared)),
        Err(error) => {
            let error = engine_thread::api_error(&error, &work);
            server.stats.failed.fetch_add(1, Ordering::SeqCst);
            log::info!("{id}: rejected: {}", error.message);
            Err(error)
        }
    }
}

/// Runs `work` on the blocking pool, at most as many at once as the machine has cores: rendering
/// and tokenizing take the engine's thread no time.
async fn beside_the_engine<T: Send + 'static>(server: &Arc<Server>, work: impl FnOnce(&Server) -> T + Send + 'static) -> Result<T, ApiError> {
    let _permit = server.preparing.acquire().await.map_err(|_| ApiError::server("the server is shutting down"))?;
    let server = server.clone();
    tokio::task::spawn_blocking(move || work(&server)).await.map_err(|error| ApiError::server(format!("preparing the request failed: {error}")))
}

/// vLLM's `POST /tokenize`: the tokens a completion's prompt or a chat's messages become, as the
/// engine would run them, and their count beside the context.
async fn tokenize(State(server): State<Arc<Server>>, body: Result<Bytes, BytesRejection>) -> Response {
    let request = match read_body(&server, body).and_then(|b| Ok(request::read_tokenize(request::parse_body(&b)?)?)) {
        Ok(request) => request,
        Err(error) => return error.into_response(),
    };
    let tokenized = beside_the_engine(&server, move |server| {
        let tokens = server.prompter.tokenize(&request.input, &server.render).map_err(|error| ApiError::invalid(error.to_string()).param(request.input.field()))?;
        Ok(response::tokenized(&request, &tokens, &server.prompter))
    });
    match tokenized.await.and_then(|result| result) {
        Ok(body) => Json(body).into_response(),
        Err(error) => error.into_response(),
    }
}

/// vLLM's `POST /detokenize`: the text of token ids, special tokens written out.
async fn detokenize(State(server): State<Arc<Server>>, body: Result<Bytes, BytesRejection>) -> Response {
    let tokens = match read_body(&server, body).and_then(|b| Ok(request::read_detokenize(request::parse_body(&b)?)?)) {
        Ok(tokens) => tokens,
        Err(error) => return error.into_response(),
    };
    let decoded = beside_the_engine(&server, move |server| server.prompter.tokenizer().decode(&tokens, false));
    match decoded.await {
        Ok(Ok(text)) => Json(json!({"prompt": text})).into_response(),
        Ok(Err(error)) => ApiError::invalid(error.to_string()).param("tokens").into_response(),
        Err(error) => error.into_response(),
    }
}

fn submit(server: &Server, job: Job) -> Result<(), ApiError> {
    let stats = &server.stats;
    // Counted before the send so that the engine thread never takes one off before it is on.
    stats.queued.fetch_add(1, Ordering::SeqCst);
    let refused = match server.jobs.try_send(job) {
        Ok(()) => return Ok(()),
        Err(TrySendError::Full(_)) => format!(
            "the server is busy: {} requests are already waiting for the engine (--queue {}); try again later",
            server.queue_capacity, server.queue_capacity
        ),
        Err(TrySendError::Disconnected(_)) => "the engine has stopped; restart the server".to_string(),
    };
    stats.queued.fetch_sub(1, Ordering::SeqCst);
    stats.rejected.fetch_add(1, Ordering::SeqCst);
    log::warn!("{refused}");
    Err(ApiError::server(refused).with_status(StatusCode::SERVICE_UNAVAILABLE).code("server_busy"))
}

/// The body of a streamed response: server-sent events made from the job's events as they come.
/// hyper drops it when the client disconnects, and the guard then cancels the generation.
struct SseStream {
    format: Box<dyn EventFormat>,
    events: UnboundedReceiver<Event>,
    pending: VecDeque<Bytes>,
    done: bool,
    _guard: CancelOnDrop,
}

impl SseStream {
    fn new(mut format: Box<dyn EventFormat>, first: Event, events: UnboundedReceiver<Event>, guard: CancelOnDrop) -> Self {
        let pending = format.start().into();
        let mut stream = Self { format, events, pending, done: false, _guard: guard };
        stream.push(first);
        stream
    }

    fn push(&mut self, event: Event) {
        let (events, done) = self.format.events(event);
        self.pending.extend(events);
        self.done = done;
    }
}

impl futures_core::Stream for SseStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(bytes) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(bytes)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.events.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(event)) => this.push(event),
                Poll::Ready(None) => this.push(Event::Failed(engine_stopped())),
            }
        }
    }
}

fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
