//! The `llama-webgpu` command line (native only).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use llama_webgpu::{load, Gpu, GpuOptions, Llama, LoadOptions};

#[derive(Parser)]
#[command(name = "llama-webgpu", version, about = "Llama 3.1 through WGSL compute shaders")]
struct Cli {
    /// Adapter to use: a substring of its name or backend (also LLAMA_WEBGPU_ADAPTER).
    #[arg(long, global = true)]
    adapter: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the greedy continuation of a prompt given as token ids.
    Run {
        /// A Hugging Face model folder: config.json and safetensors weights.
        #[arg(long)]
        model: PathBuf,
        /// Prompt token ids, separated by commas or spaces.
        #[arg(long)]
        tokens: String,
        /// Number of tokens to generate.
        #[arg(short = 'n', long, default_value_t = 32)]
        max_tokens: usize,
        /// KV cache positions (default min(4096, max_position_embeddings)).
        #[arg(long)]
        context: Option<usize>,
        /// Print JSON: prompt, generated ids, timings.
        #[arg(long)]
        json: bool,
    },
    /// List GPU adapters, and the features and limits the engine gets on the chosen one.
    Info,
}

pub fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("LLAMA_WEBGPU_LOG", "warn")).init();
    let cli = Cli::parse();
    match pollster::block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let options = GpuOptions { adapter: cli.adapter, ..Default::default() };
    match cli.command {
        Command::Info => {
            for name in llama_webgpu::gpu::adapter_names().await {
                println!("adapter: {name}");
            }
            let gpu = Gpu::new(&options).await?;
            println!("chosen: {} ({:?})", gpu.info.name, gpu.info.backend);
            println!("features: {:?}", gpu.features);
            println!("max_storage_buffer_binding_size: {}", gpu.limits.max_storage_buffer_binding_size);
            println!("max_buffer_size: {}", gpu.limits.max_buffer_size);
            Ok(())
        }
        Command::Run { model, tokens, max_tokens, context, json } => {
            let prompt = parse_tokens(&tokens)?;
            if prompt.is_empty() {
                bail!("--tokens is empty");
            }
            let gpu = Gpu::new(&options).await?;
            let started = std::time::Instant::now();
            let config = load::read_hf_config(&model)?;
            let source = load::open_safetensors_dir(&model)?;
            let load_options = LoadOptions { context_length: context, ..Default::default() };
            let bar = load_bar();
            let mut llama = Llama::load(&gpu, config, &source, &load_options, &mut |p| {
                bar.set_length(p.bytes_total);
                bar.set_position(p.bytes_done);
            })
            .await
            .with_context(|| format!("loading {}", model.display()))?;
            bar.finish_and_clear();
            let load_s = started.elapsed().as_secs_f64();
            let started = std::time::Instant::now();
            let generated = llama.generate_greedy(&prompt, max_tokens).await?;
            let generate_s = started.elapsed().as_secs_f64();
            if json {
                let out = serde_json::json!({
                    "adapter": gpu.info.name,
                    "prompt": prompt,
                    "tokens": generated,
                    "load_seconds": load_s,
                    "generate_seconds": generate_s,
                });
                println!("{out}");
            } else {
                let ids: Vec<String> = generated.iter().map(u32::to_string).collect();
                println!("{}", ids.join(" "));
            }
            Ok(())
        }
    }
}

fn load_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("loading {bar:40} {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("a valid progress template"),
    );
    bar
}

fn parse_tokens(text: &str) -> anyhow::Result<Vec<u32>> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().with_context(|| format!("{s:?} is not a token id")))
        .collect()
}
