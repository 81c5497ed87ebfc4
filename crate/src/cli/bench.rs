//! `bench`: prompt processing (pp) and generation (tg) speed, llama-bench style, on a model file or
//! on synthetic weights of a real Llama shape built on the GPU.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use llama_webgpu::gpu::ops::TokenSlot;
use llama_webgpu::gpu::{ops, DispatchTime};
use llama_webgpu::bench::{bench_tokens, decode_rate, prefill_rate, synthetic_config, SYNTHETIC_MODELS};
use llama_webgpu::model::{Batch, KvPool, PassTokens, PAGE_SIZE};
use llama_webgpu::quant::DType;
use llama_webgpu::api::{ChatCompletionRequest, ChatMessage, JsonSchemaFormat, ResponseFormat, SamplingParams};
use llama_webgpu::grammar::Grammar;
use llama_webgpu::text::RenderOptions;
use llama_webgpu::{CancelToken, Config, Engine, Gpu, Llama, LoadOptions};

#[derive(Args)]
pub struct BenchArgs {
    /// A model to load (Hugging Face folder, GGUF file or shard folder).
    #[arg(long, short, conflicts_with = "synthetic", required_unless_present = "synthetic")]
    model: Option<std::path::PathBuf>,
    /// Random weights of a real shape: llama3.2-1b, llama3.2-3b, llama3.1-8b, llama3.1-70b,
    /// llama3.1-70b-layer.
    #[arg(long)]
    synthetic: Option<String>,
    /// Weight format of the synthetic model: q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k,
    /// q6_k, iq4_nl, iq4_xs, iq1_s, iq1_m, iq2_xxs, iq2_xs, iq2_s, iq3_xxs, iq3_s, f16 or bf16.
    #[arg(long, default_value = "q4_0", value_parser = super::parse_weight_format)]
    quant: DType,
    /// Fewer layers than the shape has (a smaller synthetic model).
    #[arg(long)]
    layers: Option<usize>,
    /// Prompt lengths to time (0 skips prompt processing).
    #[arg(short = 'p', long, default_value = "512", value_delimiter = ',')]
    prompt: Vec<usize>,
    /// Tokens to generate (0 skips generation).
    #[arg(short = 'n', long, default_value = "128", value_delimiter = ',')]
    generate: Vec<usize>,
    /// Tokens already in the KV cache when each test starts (llama-bench's depth): prefill and
    /// decode at a long context.
    #[arg(short = 'd', long, default_value_t = 0)]
    depth: usize,
    /// Positions each sequence's KV pool holds (default: what the tests reach), e.g. 131072 to show
    /// that a model's whole context fits; `kv_bytes_per_1k_positions` in the JSON says what it costs.
    #[arg(long)]
    context: Option<usize>,
    /// Repetitions of each test.
    #[arg(short = 'r', long, default_value_t = 3)]
    repetitions: usize,
    /// Sequences run together, llama-batched-bench style: for each count P, P prompts prefilled
    /// together and P sequences decoded together, reported as aggregate and per-stream tokens per
    /// second. Without it, one sequence through the lone-sequence path.
    #[arg(long, value_delimiter = ',')]
    parallel: Vec<usize>,
    /// Memory bandwidth of the card in GB/s, to report the fraction the speed implies.
    #[arg(long)]
    bandwidth_gbps: Option<f64>,
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Time every dispatch of the decode steps with GPU timestamp queries (where the adapter has
    /// them) and report time, bytes moved and GB/s per kernel per token; and the time per kernel
    /// of one pass over the longest prompt.
    #[arg(long)]
    pub profile: bool,
    /// Decode as before GPU-resident greedy decoding: read each token back and write it again
    /// before submitting the next step (for comparison).
    #[arg(long)]
    sync: bool,
    /// Prefill matmul tiles stored as f16 where the adapter has shader-f16.
    #[arg(long)]
    pub f16_tiles: bool,
    /// Rows per workgroup of the decode GEMVs, 1, 2 or 4, for every matrix instead of the choice
    /// by matrix size (q/k/v's rotary output takes at least 2).
    #[arg(long)]
    pub gemv_rows: Option<u32>,
    /// The most tokens, 1 to 512, a pass runs its matmuls as GEMVs with (up to 8 tokens per
    /// workgroup, default 32); more run as tiles.
    #[arg(long)]
    pub gemv_max_tokens: Option<u32>,
    /// The side of a prefill thread's register tile of sums, 4 or 8 (64 sums per thread, 64
    /// threads per workgroup).
    #[arg(long)]
    pub register_tile: Option<u32>,
    /// The most splits a decode step cuts its keys into, 1 to 256 (1: no splits, no merge).
    #[arg(long)]
    pub max_key_splits: Option<u32>,
    /// Merge attention's key splits in a dispatch of their own, as browsers do, also on Vulkan,
    /// where the last split to finish merges them (for comparison).
    #[arg(long)]
    pub separate_split_merge: bool,
    /// Keep prefill attention on the portable tiles where the matmuls run on cooperative matrices
    /// (for comparison).
    #[arg(long)]
    pub no_coop_attention: bool,
    /// The workgroup tile of every prefill product on cooperative matrices, 64 or 128 tokens and
    /// rows, instead of 128 where a pass makes enough of them (for comparison).
    #[arg(long)]
    pub coop_tile: Option<u32>,
    /// Keep naga's runtime bounds checks in the kernels that are in bounds by construction, as a
    /// browser does (for comparison).
    #[arg(long)]
    pub bounds_checks: bool,
    /// Decode quant values with the GPU's integer-to-float conversion instead of from float bits
    /// (the same values; for comparison).
    #[arg(long)]
    pub int_conversions: bool,
    /// Caps the storage binding size below the adapter's, as a browser's limit does (e.g.
    /// 134217728): a KV pool larger than it spreads over several buffers per layer.
    #[arg(long, value_name = "BYTES")]
    pub max_storage_binding: Option<u64>,
    /// A JSON schema file: after the other tests, time each tg test through the engine (greedy,
    /// from a chat prompt) constrained to the schema and unconstrained, and the schema's token
    /// mask per generated token. Needs --model (its tokenizer).
    #[arg(long, value_name = "FILE", conflicts_with = "synthetic")]
    json_schema: Option<std::path::PathBuf>,
}

/// Bytes of weights a decode step reads: every layer matrix and the head (the embedding row is
/// negligible).
fn weight_bytes_per_token(c: &Config, dtype: DType) -> u64 {
    let row = |cols: usize| dtype.row_bytes(cols).unwrap_or(0) as u64;
    let (hidden, q, kv, ffn) = (c.hidden_size as u64, c.q_dim() as u64, c.kv_dim() as u64, c.intermediate_size as u64);
    let q_k_v = (q + 2 * kv) * row(c.hidden_size);
    let o = hidden * row(c.q_dim());
    let gate_up = 2 * ffn * row(c.hidden_size);
    let down = hidden * row(c.intermediate_size);
    let layer = q_k_v + o + gate_up + down;
    c.n_layers as u64 * layer + row(c.hidden_size) * c.vocab_size as u64
}

struct Sample {
    test: String,
    /// Sequences run together; tokens_per_second is their aggregate.
    streams: usize,
    tokens_per_second: Vec<f64>,
    /// Decode only: host time per token spent checking, encoding and submitting a step (the
    /// part the CPU must finish before the GPU can start it), per repetition.
    encode_us_per_token: Option<Vec<f64>>,
}

pub async fn bench(gpu: Gpu, args: BenchArgs, quiet: bool) -> anyhow::Result<()> {
    if args.profile && !gpu.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
        bail!("--profile: the adapter {:?} has no timestamp queries (wgpu feature TIMESTAMP_QUERY), so dispatches cannot be timed", gpu.info.name);
    }
    let depth = args.depth;
    let longest = depth + args.prompt.iter().max().copied().unwrap_or(0) + args.generate.iter().max().copied().unwrap_or(0) + 1;
    if args.parallel.iter().any(|&p| p == 0 || p > ops::MAX_BATCH_TOKENS) {
        bail!("--parallel: each count must be 1 to {}", ops::MAX_BATCH_TOKENS);
    }
    // Room for the --json-schema tests' chat prompt.
    let longest = longest + if args.json_schema.is_some() { 128 } else { 0 };
    let max_sequences = args.parallel.iter().max().copied().unwrap_or(1);
    if let Some(context) = args.context.filter(|&c| c < longest) {
        bail!("--context {context}: the tests reach position {longest}");
    }
    let options = LoadOptions { context_length: Some(args.context.unwrap_or(longest.max(16))), max_sequences, ..Default::default() };
    let (label, dtype, mut model) = match (&args.synthetic, &args.model) {
        (Some(name), _) => {
            let mut config = synthetic_config(name)
                .with_context(|| format!("unknown synthetic model {name:?}: {}", SYNTHETIC_MODELS.join(", ")))?;
            if let Some(layers) = args.layers {
                config.n_layers = layers;
            }
            let dtype = args.quant;
            let started = Instant::now();
            let model = Llama::synthetic(&gpu, config, dtype, &options).await?;
            if !quiet {
                eprintln!("built {name} ({dtype}) on the GPU in {:.1} s", started.elapsed().as_secs_f64());
            }
            (name.clone(), Some(dtype), model)
        }
        (None, Some(path)) => {
            let files = llama_webgpu::load::open_model(path)?;
            let model = Llama::load(&gpu, files.config.clone(), files.stream(), &options, &mut |_| {}).await?;
            (path.display().to_string(), None, model)
        }
        (None, None) => bail!("--model or --synthetic is required"),
    };
    let vocab = model.config().vocab_size;
    let tokens = bench_tokens(vocab, longest);
    let timed_prompts: &[usize] = if args.parallel.is_empty() { &args.prompt } else { &[] };
    llama_webgpu::bench::warm_up(&mut model, &tokens, timed_prompts, depth).await?;
    // The tests write positions from depth on, so the context before it is filled once.
    if depth > 0 {
        model.forward_greedy(&tokens[..depth], 0).await?;
    }
    let at_depth = |test: String| if depth > 0 { format!("{test} @ d{depth}") } else { test };
    let mut samples = vec![];
    for &n in args.prompt.iter().filter(|&&n| n > 0 && args.parallel.is_empty()) {
        let mut rates = vec![];
        for _ in 0..args.repetitions {
            rates.push(prefill_rate(&mut model, &tokens[depth..depth + n], depth).await?);
        }
        samples.push(Sample { test: at_depth(format!("pp{n}")), streams: 1, tokens_per_second: rates, encode_us_per_token: None });
    }
    for &n in args.generate.iter().filter(|&&n| n > 0 && args.parallel.is_empty()) {
        let mut rates = vec![];
        let mut encode = vec![];
        for _ in 0..args.repetitions {
            let timing = decode_rate(&mut model, tokens[depth], depth, n, args.sync).await?;
            rates.push(timing.tokens_per_second);
            encode.push(timing.encode_us_per_token);
        }
        samples.push(Sample { test: at_depth(format!("tg{n}")), streams: 1, tokens_per_second: rates, encode_us_per_token: Some(encode) });
    }
    for &streams in &args.parallel {
        let pages = model.kv_pool().pages;
        let per_sequence = model.kv_pool().pages_per_sequence;
        if streams * per_sequence > pages {
            bail!("--parallel {streams}: the KV pool holds {pages} pages, {streams} contexts of {longest} positions need {}", streams * per_sequence);
        }
        // Sequence s keeps its positions in pool pages s * per_sequence.. in order.
        for s in 0..streams {
            let own: Vec<u32> = (s * per_sequence..(s + 1) * per_sequence).map(|p| p as u32).collect();
            model.write_page_table(s, 0, &own);
        }
        for &n in args.prompt.iter().filter(|&&n| n > 0) {
            let mut rates = vec![];
            for _ in 0..args.repetitions {
                let started = Instant::now();
                prefill_together(&mut model, streams, per_sequence, depth, n, &tokens).await?;
                rates.push((streams * n) as f64 / started.elapsed().as_secs_f64());
            }
            samples.push(Sample { test: at_depth(format!("pp{n}")), streams, tokens_per_second: rates, encode_us_per_token: None });
        }
        for &n in args.generate.iter().filter(|&&n| n > 0) {
            let mut rates = vec![];
            let mut encode = vec![];
            for _ in 0..args.repetitions {
                let started = Instant::now();
                let encoding = decode_together(&mut model, streams, per_sequence, depth, n, &tokens).await?;
                rates.push((streams * n) as f64 / started.elapsed().as_secs_f64());
                encode.push(encoding.as_secs_f64() * 1e6 / (streams * n) as f64);
            }
            samples.push(Sample { test: at_depth(format!("tg{n}")), streams, tokens_per_second: rates, encode_us_per_token: Some(encode) });
        }
    }
    let profile = if args.profile {
        // As many decode steps as the longest tg test, at least one.
        let steps = args.generate.iter().max().copied().unwrap_or(0).max(1);
        let mut times = vec![];
        let mut token = tokens[depth];
        for position in depth..depth + steps {
            let (next, step) = model.profile_greedy(&[token], position).await?;
            times.extend(step);
            token = next;
        }
        Some(kernel_profile(&times, steps))
    } else {
        None
    };
    // One pass over the longest prompt, timed the same way.
    let prefill_profile = match args.prompt.iter().max() {
        Some(&n) if args.profile && n > 0 => {
            let (_, times) = model.profile_greedy(&tokens[depth..depth + n], depth).await?;
            Some((n, kernel_profile(&times, 1)))
        }
        _ => None,
    };
    let bytes_per_token = dtype.map(|d| weight_bytes_per_token(model.config(), d));
    report(&gpu, &label, dtype, &model, depth, &samples, bytes_per_token, args.bandwidth_gbps, profile.as_deref(), args.json);
    if let Some((n, kernels)) = prefill_profile {
        report_prefill(n, &kernels, args.json);
    }
    if let (Some(schema), Some(path)) = (&args.json_schema, &args.model) {
        bench_json_schema(model, path, schema, &args.generate, args.repetitions, args.json).await?;
    }
    Ok(())
}

/// Greedy generation through the engine constrained to a JSON schema against the same
/// unconstrained, and the grammar's mask per token, replayed on the constrained output's tokens.
async fn bench_json_schema(model: Llama, path: &Path, schema_path: &Path, generate: &[usize], repetitions: usize, json: bool) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(schema_path).with_context(|| format!("--json-schema {}", schema_path.display()))?;
    let schema: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("--json-schema {}: not JSON", schema_path.display()))?;
    let (tokenizer, template) = llama_webgpu::load::open_model(path)?.text()?;
    let mut engine = Engine::new(model, tokenizer, template, 1)?;
    let request = ChatCompletionRequest { messages: vec![ChatMessage::new("user", "Describe a customer of a web shop.")], ..Default::default() };
    let prompt = engine.prompter().chat_prompt(&request, &RenderOptions::default())?;
    let format = ResponseFormat::JsonSchema {
        json_schema: JsonSchemaFormat { name: Some("bench".into()), description: None, schema: Some(schema.clone()), strict: Some(true) },
    };
    let started = Instant::now();
    let compiler = engine.prompter().grammars()?;
    let compiler_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut rows = vec![];
    for &n in generate.iter().filter(|&&n| n > 0) {
        for response_format in [None, Some(format.clone())] {
            let params = SamplingParams { temperature: Some(0.0), max_tokens: Some(n as u32), response_format: response_format.clone(), ..Default::default() };
            // The first run puts the prompt in the prefix cache: the timed ones compute its last token only.
            let mut completion = engine.generate(&prompt, &params, &CancelToken::default(), &mut |_| {}).await?;
            let mut rates = vec![];
            for _ in 0..repetitions {
                let started = Instant::now();
                completion = engine.generate(&prompt, &params, &CancelToken::default(), &mut |_| {}).await?;
                rates.push(completion.usage.completion_tokens as f64 / started.elapsed().as_secs_f64());
            }
            let mut row = serde_json::json!({
                "test": format!("tg{n}{}", if response_format.is_some() { " json_schema" } else { "" }),
                "tokens": completion.usage.completion_tokens,
                "tokens_per_second": mean_and_std(&rates).0,
                "samples": rates,
                // Tokens the grammar forced, drafted and taken: passes saved.
                "drafts_taken": completion.usage.drafts.map_or(0, |d| d.accepted),
            });
            if response_format.is_some() {
                let started = Instant::now();
                let mut constraint = compiler.compile(&Grammar::JsonSchema(schema.clone()))?;
                row["grammar_compile_ms"] = (started.elapsed().as_secs_f64() * 1e3).into();
                let mut masks = vec![];
                for &token in completion.tokens.iter().filter(|t| !engine.stop_tokens().contains(t)) {
                    let started = Instant::now();
                    constraint.mask()?;
                    masks.push(started.elapsed().as_secs_f64() * 1e6);
                    constraint.accept(token)?;
                }
                row["mask_us_per_token"] = mean_and_std(&masks).0.into();
                row["mask_us_max"] = masks.iter().copied().fold(0.0, f64::max).into();
                row["output"] = completion.text.clone().into();
            }
            rows.push(row);
        }
    }
    let out = serde_json::json!({"json_schema": schema_path.display().to_string(), "compiler_build_ms": compiler_ms, "tests": rows});
    if json {
        println!("{out}");
    } else {
        println!("json schema {} (grammar compiler built in {compiler_ms:.0} ms):", schema_path.display());
        for row in &rows {
            let mask = row.get("mask_us_per_token").map_or(String::new(), |m| {
                let drafts = row["drafts_taken"].as_u64().unwrap_or(0);
                format!(", {drafts} forced tokens drafted and taken, mask {:.0} us/token (max {:.0})", m.as_f64().unwrap_or(0.0), row["mask_us_max"].as_f64().unwrap_or(0.0))
            });
            println!("  {:<18} {:>8.2} tok/s over {} tokens{mask}", row["test"].as_str().unwrap_or(""), row["tokens_per_second"].as_f64().unwrap_or(0.0), row["tokens"]);
        }
    }
    Ok(())
}

/// The slot of sequence `s`'s position `position`, its pages pool pages s * per_sequence.. in order.
fn slot(s: usize, per_sequence: usize, position: usize) -> TokenSlot {
    TokenSlot { position: position as u32, kv_row: (s * per_sequence * PAGE_SIZE + position) as u32, sequence: s as u32, _pad: 0 }
}

/// Prefills `n` prompt tokens of each of `streams` sequences at positions depth.. in passes of
/// up to the model's batch size, as the engine's scheduler packs them; each sequence's last token
/// gives logits.
async fn prefill_together(model: &mut Llama, streams: usize, per_sequence: usize, depth: usize, n: usize, tokens: &[u32]) -> anyhow::Result<()> {
    let all: Vec<(usize, usize)> = (0..streams).flat_map(|s| (depth..depth + n).map(move |p| (s, p))).collect();
    for chunk in all.chunks(model.max_batch()) {
        let slots: Vec<TokenSlot> = chunk.iter().map(|&(s, p)| slot(s, per_sequence, p)).collect();
        let outputs = chunk.iter().enumerate().filter(|(_, (_, p))| *p + 1 == depth + n).map(|(i, _)| i as u32).collect();
        let ids: Vec<u32> = chunk.iter().map(|&(_, p)| tokens[p]).collect();
        let batch = Batch { slots, outputs, top_k: vec![] };
        model.submit(&batch, PassTokens::Host(&ids))?;
        if !batch.outputs.is_empty() {
            model.read_pass().await?;
        }
    }
    Ok(())
}

/// Decodes `n` greedy tokens of each of `streams` sequences together from position depth, each
/// pass submitted before the tokens it takes from the GPU are read, as the engine does; returns
/// the host time spent submitting.
async fn decode_together(model: &mut Llama, streams: usize, per_sequence: usize, depth: usize, n: usize, tokens: &[u32]) -> anyhow::Result<Duration> {
    let batch_at = |position: usize| Batch {
        slots: (0..streams).map(|s| slot(s, per_sequence, position)).collect(),
        outputs: (0..streams as u32).collect(),
        top_k: vec![],
    };
    let submitting = Instant::now();
    let first: Vec<u32> = (0..streams).map(|s| tokens[(depth + s) % tokens.len()]).collect();
    model.submit(&batch_at(depth), PassTokens::Host(&first))?;
    let mut encoding = submitting.elapsed();
    for step in 1..=n {
        if step < n {
            let submitting = Instant::now();
            model.submit(&batch_at(depth + step), PassTokens::Previous)?;
            encoding += submitting.elapsed();
        }
        model.read_pass().await?;
    }
    Ok(encoding)
}

/// One kernel's share of a decode step, averaged over the profiled steps.
struct KernelTime {
    name: &'static str,
    dispatches: f64,
    seconds: f64,
    bytes: f64,
}

/// Sums the profiled dispatches by name, in order of first appearance, per decode step.
fn kernel_profile(times: &[DispatchTime], steps: usize) -> Vec<KernelTime> {
    let mut kernels: Vec<KernelTime> = vec![];
    for t in times {
        let index = match kernels.iter().position(|k| k.name == t.name) {
            Some(i) => i,
            None => {
                kernels.push(KernelTime { name: t.name, dispatches: 0.0, seconds: 0.0, bytes: 0.0 });
                kernels.len() - 1
            }
        };
        let k = &mut kernels[index];
        k.dispatches += 1.0 / steps as f64;
        k.seconds += t.seconds / steps as f64;
        k.bytes += t.bytes as f64 / steps as f64;
    }
    kernels
}

/// GPU time per kernel of one prefill pass of `n` tokens (its bytes are not a one-token pass's, so
/// none are reported).
fn report_prefill(n: usize, kernels: &[KernelTime], json: bool) {
    let total: f64 = kernels.iter().map(|k| k.seconds).sum();
    if json {
        let rows: Vec<serde_json::Value> = kernels
            .iter()
            .map(|k| serde_json::json!({"kernel": k.name, "dispatches": k.dispatches, "ms_per_pass": k.seconds * 1e3, "us_per_token": k.seconds * 1e6 / n as f64}))
            .collect();
        println!("{}", serde_json::json!({"prefill_tokens": n, "prefill_profile": rows, "prefill_ms": total * 1e3}));
        return;
    }
    println!();
    println!("| prefill pp{n} kernel | dispatches | ms/pass | us/token | share |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for k in kernels.iter().chain([&KernelTime { name: "total", dispatches: kernels.iter().map(|k| k.dispatches).sum(), seconds: total, bytes: 0.0 }]) {
        println!("| {} | {:.0} | {:.2} | {:.1} | {:.1}% |", k.name, k.dispatches, k.seconds * 1e3, k.seconds * 1e6 / n as f64, 100.0 * k.seconds / total);
    }
}

fn mean_and_std(values: &[f64]) -> (f64, f64) {
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (values.len().max(2) - 1) as f64;
    (mean, variance.sqrt())
}

#[allow(clippy::too_many_arguments)]
fn report(
    gpu: &Gpu,
    label: &str,
    dtype: Option<DType>,
    model: &Llama,
    depth: usize,
    samples: &[Sample],
    bytes_per_token: Option<u64>,
    bandwidth_gbps: Option<f64>,
    profile: Option<&[KernelTime]>,
    json: bool,
) {
    let gbps = |k: &KernelTime| if k.seconds > 0.0 { k.bytes / k.seconds / 1e9 } else { 0.0 };
    let profile_rows: Option<Vec<serde_json::Value>> = profile.map(|kernels| {
        kernels
            .iter()
            .map(|k| {
                serde_json::json!({
                    "kernel": k.name,
                    "dispatches_per_token": k.dispatches,
                    "us_per_token": k.seconds * 1e6,
                    "bytes_per_token": k.bytes,
                    "gbps": gbps(k),
                })
            })
            .collect()
    });
    let rows: Vec<serde_json::Value> = samples
        .iter()
        .map(|s| {
            let (mean, std) = mean_and_std(&s.tokens_per_second);
            // Decode reads every weight once per step (of a token per stream); prefill shares the
            // reads across the batch.
            let bandwidth_fraction = match (s.test.starts_with("tg"), bytes_per_token, bandwidth_gbps) {
                (true, Some(bytes), Some(gbps)) => Some(bytes as f64 * mean / s.streams as f64 / (gbps * 1e9)),
                _ => None,
            };
            serde_json::json!({
                "test": s.test,
                "parallel": s.streams,
                "tokens_per_second": mean,
                "per_stream_tokens_per_second": mean / s.streams as f64,
                "std": std,
                "samples": s.tokens_per_second,
                "bandwidth_fraction": bandwidth_fraction,
                "cpu_encode_us_per_token": s.encode_us_per_token.as_deref().map(|e| mean_and_std(e).0),
            })
        })
        .collect();
    if json {
        let out = serde_json::json!({
            "commit": env!("LLAMA_WEBGPU_COMMIT"),
            "model": label,
            "quant": dtype.map(DType::name),
            "adapter": gpu.info.name,
            "backend": format!("{:?}", gpu.info.backend),
            "layers": model.config().n_layers,
            "depth": depth,
            "context": model.context_length(),
            "dispatches_per_token": model.dispatches_per_token(depth),
            "weight_bytes_per_token": bytes_per_token,
            "bandwidth_gbps": bandwidth_gbps,
            "gemv_reduction": gemv_reduction(gpu),
            "gemv_rows": gpu.gemv_rows.map_or(serde_json::json!("auto"), serde_json::Value::from),
            "gemv_rows_by_matrix": serde_json::Map::from_iter(gemv_rows_by_matrix(gpu, model.config()).map(|(matrix, n)| (matrix.to_string(), n.into()))),
            "subgroup_sizes": [gpu.info.subgroup_min_size, gpu.info.subgroup_max_size],
            "prefill_tiles": format!("{:?}", gpu.tile_type).to_lowercase(),
            "coop_matrix": gpu.coop_matrix.is_some(),
            "coop_fragment": gpu.coop_matrix.map(|f| f.side()),
            "coop_attention": gpu.coop_attention,
            "coop_tile": gpu.coop_tile.map_or(serde_json::json!("auto"), |tile| tile.side().into()),
            "coop_large_tiles_from_tokens": large_coop_tiles_by_matrix(gpu, model.config()).map(|by_matrix| serde_json::Map::from_iter(by_matrix.into_iter().map(|(matrix, from)| (matrix.to_string(), from.into())))),
            "kv_type": gpu.kv_type.name(),
            "q8_activations": gpu.q8_activations,
            "int_conversions": gpu.int_conversions,
            "kv_bytes_per_1k_positions": KvPool::bytes_per_page(model.config(), gpu.kv_type) * 1000 / PAGE_SIZE as u64,
            "kv_buffers_per_layer": model.kv_pool().buffers(),
            "coop_matrix_properties": gpu.coop_matrix_properties.iter().map(|p| format!("{}x{}x{} {:?}->{:?}", p.m_size, p.n_size, p.k_size, p.ab_type, p.cr_type)).collect::<Vec<_>>(),
            "gemv_max_tokens": gpu.gemv_max_tokens,
            "register_tile": gpu.register_tile.side(),
            "max_key_splits": model.max_key_splits(),
            "split_merge": split_merge(gpu),
            "bounds_checks": gpu.bounds_checks,
            "results": rows,
            "profile": profile_rows,
        });
        println!("{out}");
        return;
    }
    println!("| model | quant | adapter | test | streams | t/s (all streams) | t/s per stream | fraction of bandwidth | CPU encode us/token |");
    println!("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for row in &rows {
        let fraction = row["bandwidth_fraction"].as_f64().map_or("-".to_string(), |f| format!("{:.1}%", 100.0 * f));
        let encode = row["cpu_encode_us_per_token"].as_f64().map_or("-".to_string(), |us| format!("{us:.0}"));
        println!(
            "| {label} | {} | {} | {} | {} | {:.2} ± {:.2} | {:.2} | {fraction} | {encode} |",
            dtype.map_or("as stored", DType::name),
            gpu.info.name,
            row["test"].as_str().unwrap_or(""),
            row["parallel"],
            row["tokens_per_second"].as_f64().unwrap_or(0.0),
            row["std"].as_f64().unwrap_or(0.0),
            row["per_stream_tokens_per_second"].as_f64().unwrap_or(0.0),
        );
    }
    if let Some(kernels) = profile {
        println!();
        println!("| kernel | dispatches/token | us/token | MB/token | GB/s |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for k in kernels {
            println!("| {} | {:.0} | {:.1} | {:.3} | {:.2} |", k.name, k.dispatches, k.seconds * 1e6, k.bytes / 1e6, gbps(k));
        }
        let total = KernelTime {
            name: "total",
            dispatches: kernels.iter().map(|k| k.dispatches).sum(),
            seconds: kernels.iter().map(|k| k.seconds).sum(),
            bytes: kernels.iter().map(|k| k.bytes).sum(),
        };
        println!("| **{}** | {:.0} | {:.1} | {:.3} | {:.2} |", total.name, total.dispatches, total.seconds * 1e6, total.bytes / 1e6, gbps(&total));
    }
    if let Some(bytes) = bytes_per_token {
        println!("weights read per token: {:.1} MiB", bytes as f64 / (1 << 20) as f64);
    }
    println!("dispatches per token at position {depth}: {}", model.dispatches_per_token(depth));
    let rows: Vec<String> = gemv_rows_by_matrix(gpu, model.config()).map(|(matrix, n)| format!("{matrix} {n}")).to_vec();
    let how = if gpu.gemv_rows.is_some() { "forced" } else { "by matrix size" };
    println!("GEMV reduction: {}; GEMV rows per workgroup ({how}): {}", gemv_reduction(gpu), rows.join(", "));
    let inputs = if gpu.q8_activations { "int8 blocks, --q8-activations" } else { "f32" };
    let quants = if gpu.int_conversions { "converted from integers, --int-conversions" } else { "from float bits" };
    let coop_tiles = match (gpu.coop_tile, large_coop_tiles_by_matrix(gpu, model.config())) {
        (Some(tile), _) => format!("tiles of {} forced", tile.side()),
        (None, by_matrix) => {
            let from: Vec<String> = by_matrix.unwrap_or_default().into_iter().filter_map(|(matrix, from)| Some(format!("{matrix} from {} tokens", from?))).collect();
            let from = if from.is_empty() { "no product in a pass".to_string() } else { from.join(", ") };
            format!("tiles of 64, of 128 where a pass makes {} of them: {from}", ops::LARGE_COOP_TILE_WORKGROUPS)
        }
    };
    let tiles = match gpu.coop_matrix {
        Some(f) if gpu.coop_attention => format!("on cooperative matrices ({0}x{0}, {coop_tiles}), prefill attention too", f.side()),
        Some(f) => format!("on cooperative matrices ({0}x{0}, {coop_tiles}), prefill attention on portable tiles", f.side()),
        None => "portable".to_string(),
    };
    println!("matmuls as GEMVs up to {} tokens per pass (inputs: {inputs}; quant values {quants}), as tiles beyond ({tiles})", gpu.gemv_max_tokens);
    println!("attention's key splits merged {}", split_merge(gpu));
}

/// Where attention's key splits merge.
fn split_merge(gpu: &Gpu) -> &'static str {
    if gpu.merge_in_last_split { "by the last split" } else { "in a dispatch of their own" }
}

/// Rows per workgroup the GEMVs take for each matrix of the model, unsplit (q/k/v's rotary output
/// takes at least 2).
fn gemv_rows_by_matrix(gpu: &Gpu, c: &Config) -> [(&'static str, u32); 5] {
    matrix_rows(c).map(|(matrix, rows)| (matrix, ops::gemv_rows(rows as u32, gpu.info.device_type, gpu.gemv_rows, matrix == "qkv_proj")))
}

/// Each product's rows.
fn matrix_rows(c: &Config) -> [(&'static str, usize); 5] {
    [
        ("qkv_proj", c.q_dim() + 2 * c.kv_dim()),
        ("o_proj", c.hidden_size),
        ("gate_up_proj", 2 * c.intermediate_size),
        ("down_proj", c.hidden_size),
        ("lm_head", c.vocab_size),
    ]
}

/// The fewest tokens of a pass from which each product takes tiles of 128 on cooperative
/// matrices (none past a pass's most tokens), where the choice is by pass size.
fn large_coop_tiles_by_matrix(gpu: &Gpu, c: &Config) -> Option<Vec<(&'static str, Option<u32>)>> {
    (gpu.coop_matrix.is_some() && gpu.coop_tile.is_none()).then(|| {
        matrix_rows(c).into_iter().map(|(matrix, rows)| (matrix, ops::large_coop_tiles_from(gpu, rows).filter(|&from| from as usize <= ops::MAX_BATCH_TOKENS))).collect()
    })
}

/// How the decode GEMVs reduce over their workgroup.
fn gemv_reduction(gpu: &Gpu) -> &'static str {
    if gpu.subgroups {
        "subgroups"
    } else {
        "workgroup memory"
    }
}
