//! The `llama-webgpu` command line (native only).

mod bench;
pub mod heap;
mod serve;

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use llama_webgpu::api::{ChatCompletionRequest, ChatMessage, SamplingParams, Stop};
use llama_webgpu::gpu::KvType;
use llama_webgpu::quant::DType;
use llama_webgpu::engine::Event;
use llama_webgpu::hub::{self, FileChoice, HubCache, HubClient, ModelRef};
use llama_webgpu::model::{size_text, MemoryEstimate};
use llama_webgpu::{load, CancelToken, Engine, Gpu, GpuOptions, Llama, LoadOptions};

#[derive(Parser)]
#[command(name = "llama-webgpu", version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("LLAMA_WEBGPU_COMMIT"), ")"), about = "Llama 3.1 through WGSL compute shaders")]
struct Cli {
    /// Adapter to use: a substring of its name or backend (also LLAMA_WEBGPU_ADAPTER).
    #[arg(long, global = true)]
    adapter: Option<String>,
    /// No progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Run prefill on the portable tiles even where the adapter has cooperative matrices (tensor
    /// cores), for comparison or to step around a driver's bug.
    #[arg(long, global = true)]
    no_coop_matrix: bool,
    /// Reduce the decode GEMVs through workgroup memory even where the adapter has subgroups, for
    /// comparison or to step around a driver's bug.
    #[arg(long, global = true)]
    no_subgroups: bool,
    /// The KV cache's element type, f16, f32 or q8_0: f16 (half the memory) where the adapter has
    /// shader-f16, else f32; q8_0 (int8 blocks, 1.125 bytes an element) on any adapter.
    #[arg(long, global = true, value_parser = parse_kv_type)]
    kv_type: Option<KvType>,
    /// Matmuls of block-quantized weights (the llama.cpp formats) take their inputs rounded
    /// to int8 blocks, and decode multiplies them with integer dot products (as llama.cpp does):
    /// faster decoding, logits no longer exact to f32 inputs.
    #[arg(long, global = true)]
    q8_activations: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate from one prompt and print the result.
    Run {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt text. With --chat it is the user's message in the model's chat template.
        #[arg(long, short, conflicts_with = "tokens", required_unless_present = "tokens")]
        prompt: Option<String>,
        /// Prompt token ids (commas or spaces); prints the greedy continuation's ids. Needs no tokenizer.
        #[arg(long)]
        tokens: Option<String>,
        /// Render the prompt as a chat turn.
        #[arg(long)]
        chat: bool,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Print one JSON object: text, token ids, finish reason, usage, timings.
        #[arg(long)]
        json: bool,
    },
    /// Chat in the terminal, streaming replies; /reset starts over, /exit or end of input quits.
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        /// A system prompt.
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions).
    Serve {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        server: serve::ServeArgs,
    },
    /// Convert a Hugging Face folder or a GGUF file to the shard format (manifest.json, shards,
    /// tokenizer.json) for the browser, re-encoding the matrices.
    Convert {
        /// The model to convert.
        source: PathBuf,
        /// Format of the matrices: q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, iq4_nl,
        /// iq4_xs, f16, bf16 or f32 (the iq1, iq2 and iq3 formats load from GGUF files, but need an
        /// importance matrix to write).
        #[arg(long, default_value = "q4_0", value_parser = parse_quant)]
        quant: DType,
        /// Largest shard, e.g. 64MiB (a bigger tensor gets a shard of its own).
        #[arg(long, default_value = "64MiB")]
        shard_size: String,
        /// Output folder.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Measure prompt processing (pp) and generation (tg) speed, like llama-bench.
    Bench(bench::BenchArgs),
    /// List GPU adapters, and the features and limits the engine gets on the chosen one.
    Info,
    /// Download a model from the Hugging Face Hub (or a URL) into the cache, resuming an earlier
    /// attempt, after saying how much GPU memory it will take.
    Pull {
        /// hf:OWNER/REPO:QUANT, hf:OWNER/REPO/FILE.gguf or an https:// URL of a GGUF file.
        reference: String,
        /// The context the memory estimate is for (default: the one a load would choose).
        #[arg(long)]
        context: Option<usize>,
    },
    /// List the models in the Hugging Face cache (HF_HOME); with --catalog, Llama 3.1 / 3.2 GGUF
    /// files on the Hub whose tensor types the engine reads.
    List {
        /// List the Llama GGUF files on the Hub that the engine reads (with sizes), not the cache.
        #[arg(long)]
        catalog: bool,
    },
    /// Delete a model from the Hugging Face cache: hf:OWNER/REPO/FILE.gguf or hf:OWNER/REPO:QUANT
    /// one file, hf:OWNER/REPO the whole repository.
    Rm { reference: String },
}

/// Where scripts/setup puts SmolLM2-135M-Instruct, relative to the repository.
const DEFAULT_MODEL: &str = "target/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Args)]
struct ModelArgs {
    /// A Hugging Face model folder (config.json, safetensors weights, tokenizer.json), a GGUF file
    /// (weights, configuration, tokenizer and chat template in one) or a shard folder; or a GGUF
    /// on the Hugging Face Hub, downloaded into its cache: hf:OWNER/REPO:QUANT (e.g.
    /// hf:bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M), hf:OWNER/REPO/FILE.gguf, or an https:// URL.
    /// The default is the SmolLM2 GGUF that scripts/setup fetches.
    #[arg(long, short, default_value = DEFAULT_MODEL)]
    model: String,
    /// Positions one sequence may reach (default: the model's max_position_embeddings, 131072 for
    /// Llama 3.1, or as many as the KV pool the GPU's memory holds; the log says which).
    #[arg(long)]
    context: Option<usize>,
    /// Sequences decoded together (serve: default 16 on a GPU, 1 on a CPU adapter; 1 elsewhere).
    #[arg(long)]
    parallel: Option<usize>,
    /// Memory of the paged KV pool, e.g. 8GiB (default: a full context for every sequence, as far
    /// as one buffer binds, halved while the GPU's memory cannot hold it).
    #[arg(long, value_parser = parse_size)]
    kv_memory: Option<u64>,
    /// Speculative decoding by prompt lookup: a request drafts the tokens that followed an
    /// earlier occurrence of its last 2-4 tokens (in its prompt or output) and verifies up to 6 in
    /// one pass, keeping those the model chooses too, while fewer than 7 sequences decode. Pays
    /// where the output repeats its input (editing, extraction, code); the tokens are those of
    /// plain decoding.
    #[arg(long)]
    prompt_lookup: bool,
    /// Speculative decoding with a draft model: a smaller model with the same tokenizer (e.g.
    /// Llama 3.2 1B for Llama 3.1 8B; a path or reference as --model takes) drafts up to 6 tokens
    /// a step for each request while fewer than 7 sequences decode, which the model verifies in
    /// one pass; the tokens are those of plain decoding. Its KV pool has as many pages as the
    /// model's (a quarter more memory for 1B beside 8B).
    #[arg(long)]
    draft_model: Option<String>,
    /// Re-encode the matrices stored as f32, f16 or bf16 (a Hugging Face checkpoint's, e.g.
    /// Meta's bf16) into this format as they load, a chunk at a time: q8_0 halves their memory and
    /// the bytes each decode step reads, q4_0 or q4_k quarter them. The same weights `convert
    /// --quant` writes; matrices already in a block format (a GGUF's) are kept as they are.
    #[arg(long, value_parser = parse_quant)]
    quant: Option<DType>,
    /// A chat template (Jinja, as transformers renders it) in place of the model's: a file's path,
    /// or the template itself. For a model that carries none (Llama 3.1's is used then) or the
    /// wrong one; it reads the model's own bos_token and eos_token.
    #[arg(long, value_name = "FILE|TEMPLATE")]
    chat_template: Option<String>,
    /// A reasoning model's thought (DeepSeek-R1's distilled Llamas: `<think>` ... `</think>`) in
    /// chat responses: `auto` gives it apart from the answer, as `reasoning_content` (a response's
    /// reasoning item), where the template speaks of `<think>` and the vocabulary has both markers
    /// as tokens; `none` leaves it in the content as the model wrote it.
    #[arg(long, value_enum, default_value_t = ReasoningFormat::Auto)]
    reasoning_format: ReasoningFormat,
    /// What a request that sets no temperature, top_p, top_k, min_p or repetition_penalty samples
    /// with: `model`, as the model's files recommend (generation_config.json, a GGUF's
    /// general.sampling.*; Llama 3.1 Instruct: temperature 0.6, top_p 0.9), as vLLM and llama.cpp
    /// do; `none`, OpenAI's defaults (temperature 1, every token).
    #[arg(long, value_enum, default_value_t = SamplingDefaultsFrom::Model)]
    sampling_defaults: SamplingDefaultsFrom,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SamplingDefaultsFrom {
    Model,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ReasoningFormat {
    Auto,
    None,
}

impl ModelArgs {
    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            context_length: self.context,
            max_sequences: self.parallel.unwrap_or(1),
            kv_memory: self.kv_memory,
            quant: self.quant,
            ..Default::default()
        }
    }
}

#[derive(Args)]
struct SamplingArgs {
    /// Tokens to generate at most (default: until the turn ends or the context is full).
    #[arg(short = 'n', long)]
    max_tokens: Option<u32>,
    /// Sampling temperature, 0 to 2; 0 is greedy (the most likely token every step). Default 1.
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling: draw from the most likely tokens whose probabilities add up to this, above
    /// 0 up to 1. Default 1 (every token).
    #[arg(long)]
    top_p: Option<f32>,
    /// Draw from this many of the most likely tokens only. Default 0 (every token).
    #[arg(long)]
    top_k: Option<u32>,
    /// Draw only from tokens at least this fraction as likely as the most likely one, 0 to 1.
    /// Default 0.
    #[arg(long)]
    min_p: Option<f32>,
    /// Penalty on the tokens of the prompt and the output so far, as transformers applies it (above
    /// 1 repeats less). Default 1 (none).
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Seed of the sampler's random stream: the same seed gives the same sampled text. Default: a
    /// new one every run.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            max_tokens: self.max_tokens,
            stop: (!self.stop.is_empty()).then(|| Stop::Many(self.stop.clone())),
            ..Default::default()
        }
    }
}

pub fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("LLAMA_WEBGPU_LOG", "warn")).init();
    // The Vulkan loader's Wayland probe prints "error: XDG_RUNTIME_DIR is invalid or not set" on a
    // machine without a session (a server, a container), which reads like our own failure. Compute
    // needs no display: any existing directory quiets it. Set before any thread starts.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    let cli = Cli::parse();
    // Output into a closed pipe (`info | head -1`) ends the process quietly, as it does any Unix
    // tool, instead of panicking in println!. The server keeps SIGPIPE ignored: sockets never
    // raise it (std sends with MSG_NOSIGNAL), and a closed log pipe must not end it.
    #[cfg(unix)]
    if !matches!(cli.command, Command::Serve { .. }) {
        // SAFETY: called before any thread starts; SIG_DFL is a valid disposition for SIGPIPE.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match pollster::block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let options = GpuOptions { adapter: cli.adapter, no_coop_matrix: cli.no_coop_matrix, no_subgroups: cli.no_subgroups, kv_type: cli.kv_type, q8_activations: cli.q8_activations, ..Default::default() };
    match cli.command {
        Command::Info => {
            for name in llama_webgpu::gpu::adapter_names().await {
                println!("adapter: {name}");
            }
            let gpu = Gpu::new(&options).await?;
            println!("chosen: {} ({:?})", gpu.info.name, gpu.info.backend);
            println!("features: {:?}", gpu.features);
            println!("subgroup sizes: {}..={}", gpu.info.subgroup_min_size, gpu.info.subgroup_max_size);
            for p in &gpu.coop_matrix_properties {
                println!("cooperative matrix: {}x{}x{} {:?} -> {:?}", p.m_size, p.n_size, p.k_size, p.ab_type, p.cr_type);
            }
            match gpu.coop_matrix {
                Some(f) => println!("prefill on cooperative matrices: {0}x{0} fragments, subgroups of {1}", f.side(), f.subgroup_size()),
                None => println!("prefill on cooperative matrices: no"),
            }
            println!("KV cache: {}", gpu.kv_type.name());
            println!("max_storage_buffer_binding_size: {}", gpu.limits.max_storage_buffer_binding_size);
            println!("max_buffer_size: {}", gpu.limits.max_buffer_size);
            Ok(())
        }
        Command::Run { model, prompt: None, tokens: Some(tokens), json, sampling, .. } => {
            let prompt = parse_tokens(&tokens)?;
            let gpu = Gpu::new(&options).await?;
            let model = fetch_model(model, Some(&gpu), cli.quiet)?;
            let started = Instant::now();
            let mut llama = load_model(&gpu, &model, cli.quiet).await?;
            let load_s = started.elapsed().as_secs_f64();
            let started = Instant::now();
            let generated = llama.generate_greedy(&prompt, sampling.max_tokens.unwrap_or(32) as usize).await?;
            if json {
                let out = serde_json::json!({
                    "adapter": gpu.info.name,
                    "prompt": prompt,
                    "tokens": generated,
                    "load_seconds": load_s,
                    "generate_seconds": started.elapsed().as_secs_f64(),
                });
                println!("{out}");
            } else {
                let ids: Vec<String> = generated.iter().map(u32::to_string).collect();
                println!("{}", ids.join(" "));
            }
            Ok(())
        }
        Command::Run { model, prompt, chat, sampling, json, .. } => {
            let prompt = prompt.context("--prompt or --tokens is required")?;
            let gpu = Gpu::new(&options).await?;
            let model = fetch_model(model, Some(&gpu), cli.quiet)?;
            let started = Instant::now();
            let mut engine = load_engine(&gpu, &model, &model.load_options(), cli.quiet).await?;
            let load_s = started.elapsed().as_secs_f64();
            let params = sampling.params();
            let started = Instant::now();
            let on_text = |text: &str, thought: bool| {
                if !json {
                    write_delta(text, thought);
                }
            };
            let mut events = terminal_events(cli.quiet, on_text);
            let completion = if chat {
                let request = ChatCompletionRequest { messages: vec![ChatMessage::new("user", &prompt)], sampling: params, ..Default::default() };
                engine.chat_with_events(&request, &CancelToken::default(), &mut events).await?
            } else {
                let mut ids: Vec<u32> = engine.model().config().bos_token_id.into_iter().collect();
                ids.extend(engine.tokenizer().encode(&prompt, true).map_err(llama_webgpu::engine::EngineError::from)?);
                engine.generate_with_events(&ids, &params, &CancelToken::default(), &mut events).await?
            };
            let generate_s = started.elapsed().as_secs_f64();
            if json {
                let out = serde_json::json!({
                    "adapter": gpu.info.name,
                    "text": completion.text,
                    "reasoning": completion.reasoning,
                    "tokens": completion.tokens,
                    "finish_reason": completion.finish_reason,
                    "usage": completion.usage,
                    "load_seconds": load_s,
                    "generate_seconds": generate_s,
                });
                println!("{out}");
            } else {
                println!();
            }
            Ok(())
        }
        Command::Convert { source, quant, shard_size, out } => {
            let shard_bytes = parse_size(&shard_size)?;
            let bar = load_bar(cli.quiet);
            let report = load::convert(&source, quant, shard_bytes, &out, &mut |p| {
                bar.set_length(p.bytes_total);
                bar.set_position(p.bytes_done);
            })?;
            bar.finish_and_clear();
            println!("wrote {} tensors in {} shards ({} bytes) to {}", report.tensors, report.shards, report.bytes, out.display());
            Ok(())
        }
        Command::Bench(args) => {
            let options = GpuOptions { timestamps: args.profile, f16_tiles: args.f16_tiles, gemv_rows: args.gemv_rows, gemv_max_tokens: args.gemv_max_tokens, register_tile: args.register_tile, max_key_splits: args.max_key_splits, separate_split_merge: args.separate_split_merge, no_coop_attention: args.no_coop_attention, coop_tile: args.coop_tile, bounds_checks: args.bounds_checks, int_conversions: args.int_conversions, max_storage_binding: args.max_storage_binding, ..options };
            bench::bench(Gpu::new(&options).await?, args, cli.quiet).await
        }
        Command::Serve { model, server } => {
            // A download's memory estimate is made on a device of its own: the server's comes up
            // on its thread.
            let gpu = if ModelRef::is_remote(&model.model) { Gpu::new(&options).await.ok() } else { None };
            let reference = model.model.clone();
            let model = fetch_model(model, gpu.as_ref(), cli.quiet)?;
            drop(gpu);
            serve::serve(options, model, &reference, server, cli.quiet)
        }
        Command::Pull { reference, context } => {
            // The memory estimate needs a device; a download does not.
            let gpu = Gpu::new(&options).await.inspect_err(|e| eprintln!("no GPU for a memory estimate: {e}")).ok();
            let args = ModelArgs { model: reference, context, parallel: None, kv_memory: None, prompt_lookup: false, draft_model: None, quant: None, chat_template: None, reasoning_format: ReasoningFormat::Auto, sampling_defaults: SamplingDefaultsFrom::Model };
            let args = fetch_model(args, gpu.as_ref(), cli.quiet)?;
            println!("{}", args.model);
            Ok(())
        }
        Command::List { catalog: false } => {
            let cache = HubCache::from_env();
            let files = cache.list();
            if files.is_empty() {
                eprintln!("no models in {}", cache.root().display());
            }
            for f in files {
                println!("hf:{}/{}\t{}", f.repo, f.file, size_text(f.size));
            }
            Ok(())
        }
        Command::List { catalog: true } => {
            let cache = HubCache::from_env();
            for e in hub::catalog() {
                let cached = if cache.file(&e.repo, hub::REVISION, &e.file).is_some() { "\tcached" } else { "" };
                println!("{}\t{}\t{}{cached}", e.reference(), e.name, size_text(e.size));
            }
            Ok(())
        }
        Command::Rm { reference } => {
            let ModelRef::Hub(r) = ModelRef::parse(&reference)? else { bail!("rm takes an hf: reference, not {reference:?}") };
            let cache = HubCache::from_env();
            let file = match &r.file {
                FileChoice::Default => None,
                _ => Some(r.pick(&cache.files(&r.repo, hub::REVISION)).with_context(|| format!("{reference} in the cache {}", cache.root().display()))?),
            };
            let freed = cache.remove(&r.repo, file.as_deref())?;
            println!("removed {reference} ({} freed)", size_text(freed));
            Ok(())
        }
        Command::Chat { model, system, sampling } => {
            let gpu = Gpu::new(&options).await?;
            let model = fetch_model(model, Some(&gpu), cli.quiet)?;
            let mut engine = load_engine(&gpu, &model, &model.load_options(), cli.quiet).await?;
            chat(&mut engine, system, sampling.params(), cli.quiet).await
        }
    }
}

async fn chat(engine: &mut Engine, system: Option<String>, params: SamplingParams, quiet: bool) -> anyhow::Result<()> {
    let initial: Vec<ChatMessage> = system.iter().map(|s| ChatMessage::new("system", s)).collect();
    let mut messages = initial.clone();
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        print!("> ");
        stdout.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            println!();
            return Ok(());
        }
        match line.trim() {
            "" => continue,
            "/exit" => return Ok(()),
            "/reset" => {
                messages = initial.clone();
                continue;
            }
            text => messages.push(ChatMessage::new("user", text)),
        }
        let request = ChatCompletionRequest { messages: messages.clone(), sampling: params.clone(), ..Default::default() };
        let started = Instant::now();
        let completion = engine.chat_with_events(&request, &CancelToken::default(), &mut terminal_events(quiet, write_delta)).await?;
        let seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "\n[{} tokens, {:.1} tok/s, {} prompt tokens reused]",
            completion.usage.completion_tokens,
            completion.usage.completion_tokens as f64 / seconds,
            completion.usage.cached_prompt_tokens
        );
        messages.push(ChatMessage { reasoning_content: completion.reasoning, ..ChatMessage::new("assistant", &completion.text) });
    }
}

/// `args` with a remote model (hf: reference or URL) replaced by its file in the cache, downloaded
/// first unless there; before the weights download, the GPU memory it will take is shown (or why it
/// cannot load on `gpu`).
fn fetch_model(mut args: ModelArgs, gpu: Option<&Gpu>, quiet: bool) -> anyhow::Result<ModelArgs> {
    let options = args.load_options();
    args.model = fetch_file(args.model, &options, gpu, quiet)?;
    args.draft_model = args.draft_model.map(|draft| fetch_file(draft, &options, gpu, quiet)).transpose()?;
    Ok(args)
}

/// `model`, or where it is remote its file in the cache, downloaded first unless there (see
/// [`fetch_model`]).
fn fetch_file(model: String, options: &LoadOptions, gpu: Option<&Gpu>, quiet: bool) -> anyhow::Result<String> {
    if !ModelRef::is_remote(&model) {
        return Ok(model);
    }
    let reference = ModelRef::parse(&model)?;
    let client = HubClient::from_env();
    let bar = if quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(0) };
    bar.set_style(indicatif::ProgressStyle::with_template("downloading {bar:40} {bytes}/{total_bytes} {bytes_per_sec}, {eta} left").expect("a valid progress template"));
    let mut check = |incoming: &hub::Incoming| -> Result<(), llama_webgpu::Error> {
        let Some(gpu) = gpu else { return Ok(()) };
        let estimate = MemoryEstimate::new(gpu, incoming.config, incoming.weights_bytes, options)?;
        if !quiet {
            let hint = if options.context_length.is_none() { "; with less, the context shortens to what fits (or choose --context)" } else { "" };
            bar.suspend(|| eprintln!("{}: {estimate}{hint}", incoming.name));
        }
        Ok(())
    };
    let mut progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let path = client.fetch(&reference, &mut check, &mut progress).with_context(|| format!("getting {model}"))?;
    bar.finish_and_clear();
    Ok(path.display().to_string())
}

async fn load_model(gpu: &Gpu, args: &ModelArgs, quiet: bool) -> anyhow::Result<Llama> {
    let files = open_model(args)?;
    upload_model(gpu, &files, &args.load_options(), quiet).await
}

async fn load_engine(gpu: &Gpu, args: &ModelArgs, options: &LoadOptions, quiet: bool) -> anyhow::Result<Engine> {
    let files = open_model(args)?;
    let (tokenizer, template) = files.text().with_context(|| text_files(Path::new(&args.model)))?;
    let template = match &args.chat_template {
        Some(given) => template.replaced_by(&chat_template_source(given)?).context("--chat-template")?,
        None => template,
    };
    let model = upload_model(gpu, &files, options, quiet).await?;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let engine = Engine::new(model, tokenizer, template, seed)?
        .with_prompt_lookup(args.prompt_lookup)
        .with_reasoning_parsed(args.reasoning_format == ReasoningFormat::Auto)
        .with_sampling_defaults(args.sampling_defaults == SamplingDefaultsFrom::Model);
    if !engine.sampling_defaults().is_empty() {
        log::info!("requests that set no sampling of their own sample as the model recommends: {}", serde_json::json!(engine.sampling_defaults()));
    }
    let Some(draft) = &args.draft_model else { return Ok(engine) };
    let files = load::open_model(Path::new(draft)).with_context(|| format!("opening the draft model {draft}"))?;
    // The draft's checkpoint matrices are re-encoded as the model's are.
    let options = LoadOptions { quant: args.quant, ..engine.draft_load_options(&files.config) };
    let pages = engine.model().kv_pool().pages;
    let context = || format!("loading the draft model {draft} with a KV pool of the model's {pages} pages (with too little memory left, lower --kv-memory or --context)");
    let draft_model = upload_model(gpu, &files, &options, quiet).await.with_context(context)?;
    Ok(engine.with_draft_model(draft_model)?)
}

/// `--chat-template`: a file's text, or the template given as it is.
fn chat_template_source(given: &str) -> anyhow::Result<String> {
    let path = Path::new(given);
    if path.is_file() {
        return std::fs::read_to_string(path).with_context(|| format!("reading the chat template {given}"));
    }
    if !given.contains("{{") && !given.contains("{%") {
        anyhow::bail!("--chat-template {given:?}: no such file, and not a template (no {{{{ or {{% in it)");
    }
    Ok(given.to_string())
}

fn open_model(args: &ModelArgs) -> anyhow::Result<load::ModelFiles> {
    load::open_model(Path::new(&args.model)).with_context(|| format!("opening {}", args.model))
}

async fn upload_model(gpu: &Gpu, files: &load::ModelFiles, options: &LoadOptions, quiet: bool) -> anyhow::Result<Llama> {
    let bar = load_bar(quiet);
    let llama = Llama::load(gpu, files.config.clone(), files.stream(), options, &mut |p| {
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
    })
    .await
    .with_context(|| format!("loading {}", files.path.display()))?;
    bar.finish_and_clear();
    Ok(llama)
}

fn text_files(path: &Path) -> String {
    format!(
        "reading the tokenizer of {} (text prompts need a folder's tokenizer.json or a GGUF file's tokenizer; --tokens does not)",
        path.display()
    )
}

fn load_bar(quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("loading {bar:40} {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("a valid progress template"),
    );
    bar
}

/// Writes a delta's text: the answer to stdout, a reasoning model's thought to stderr (dimmed on
/// a terminal), so that stdout holds the answer alone.
fn write_delta(text: &str, thought: bool) {
    if !thought {
        let mut stdout = std::io::stdout();
        let _ = stdout.write_all(text.as_bytes());
        let _ = stdout.flush();
    } else if std::io::stderr().is_terminal() {
        eprint!("\x1b[2m{text}\x1b[0m");
    } else {
        eprint!("{text}");
    }
}

/// A generation's events on the terminal: while a prompt longer than a pass is computed, a
/// progress bar on stderr (unless `quiet`); then each delta's text, and whether it is a thought,
/// to `on_text`.
fn terminal_events<'a>(quiet: bool, mut on_text: impl FnMut(&str, bool) + 'a) -> impl FnMut(&Event) + 'a {
    let mut bar: Option<indicatif::ProgressBar> = None;
    move |event| match event {
        Event::Prefill { done, total } if !quiet => {
            let bar = bar.get_or_insert_with(|| {
                let bar = indicatif::ProgressBar::new(*total as u64);
                bar.set_style(
                    indicatif::ProgressStyle::with_template("prompt {bar:40} {pos}/{len} tokens, {per_sec}, {eta} left")
                        .expect("a valid progress template"),
                );
                bar
            });
            bar.set_position(*done as u64);
        }
        Event::Delta(delta) => {
            if let Some(bar) = bar.take() {
                bar.finish_and_clear();
            }
            on_text(&delta.text, delta.thought);
        }
        _ => {}
    }
}

fn parse_kv_type(text: &str) -> Result<KvType, String> {
    KvType::from_name(text).ok_or_else(|| format!("{text:?} is not a KV type: {}", KvType::choices()))
}

/// A format matrices are re-encoded into.
fn parse_quant(text: &str) -> Result<DType, String> {
    DType::encodable_from_name(text)
}

/// Any format the kernels read (a synthetic model's, filled on the GPU).
fn parse_weight_format(text: &str) -> Result<DType, String> {
    DType::from_name(text).ok_or_else(|| format!("{text:?} is not a weight format: {}", DType::choices()))
}

/// "64MiB", "512KiB", "1GiB", "1000000".
fn parse_size(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        other => bail!("size unit {other:?} in {text:?}: use B, KiB, MiB or GiB"),
    };
    let n: u64 = digits.parse().with_context(|| format!("{text:?} is not a size"))?;
    n.checked_mul(scale).filter(|&b| b > 0).with_context(|| format!("{text:?} is not a usable size"))
}

fn parse_tokens(text: &str) -> anyhow::Result<Vec<u32>> {
    let tokens = text
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().with_context(|| format!("{s:?} is not a token id")))
        .collect::<anyhow::Result<Vec<u32>>>()?;
    if tokens.is_empty() {
        bail!("--tokens is empty");
    }
    Ok(tokens)
}
