//! Speed measurement shared by the native `bench` command and the wasm build's `bench` export, so
//! that a browser engine (or Dawn under Node) is timed exactly as the native one: synthetic models
//! of the published shapes, and prompt (pp) and generation (tg) rates of one sequence.

use web_time::{Duration, Instant};

use crate::model::{Config, Llama3Scaling, Llama, Rope, RopeScaling};
use crate::Result;

/// The shapes `synthetic_config` knows, by name.
pub const SYNTHETIC_MODELS: [&str; 5] = ["llama3.2-1b", "llama3.2-3b", "llama3.1-8b", "llama3.1-70b", "llama3.1-70b-layer"];

/// The config of a published Llama shape (../shared LLAMA.md) with weights to be filled
/// synthetically: speed depends on shapes, not values. `llama3.1-70b-layer` is one layer of 70B.
pub fn synthetic_config(name: &str) -> Option<Config> {
    let (hidden, layers, heads, head_dim, ffn, tied, factor) = match name {
        "llama3.2-1b" => (2048, 16, 32, 64, 8192, true, 32.0),
        "llama3.2-3b" => (3072, 28, 24, 128, 8192, true, 32.0),
        "llama3.1-8b" => (4096, 32, 32, 128, 14336, false, 8.0),
        "llama3.1-70b" => (8192, 80, 64, 128, 28672, false, 8.0),
        "llama3.1-70b-layer" => (8192, 1, 64, 128, 28672, false, 8.0),
        _ => return None,
    };
    Some(Config {
        hidden_size: hidden,
        intermediate_size: ffn,
        n_layers: layers,
        n_heads: heads,
        n_kv_heads: 8,
        head_dim,
        vocab_size: 128256,
        max_position_embeddings: 131072,
        rms_norm_eps: 1e-5,
        rope: Rope {
            theta: 500000.0,
            scaling: Some(RopeScaling::Llama3(Llama3Scaling { factor, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 })),
        },
        tie_word_embeddings: tied,
        bos_token_id: Some(128000),
        eos_token_ids: vec![128001, 128008, 128009],
        sampling_defaults: Default::default(),
    })
}

/// `n` token ids from a fixed sequence below `vocab`: speed does not depend on which ids.
pub fn bench_tokens(vocab: usize, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i.wrapping_mul(2654435761) >> 7) % vocab as u32).collect()
}

/// Passes before any timing, which compile pipelines and touch every buffer: a decode step, and a
/// pass of each prompt length placed at `depth` (as llama-bench warms each test), whose products
/// take other pipelines (GEMV columns, tiles, large tiles) than the step's, so that no work a
/// driver defers to a pipeline's first dispatch lands in a measured repetition.
pub async fn warm_up(model: &mut Llama, tokens: &[u32], prompts: &[usize], depth: usize) -> Result<()> {
    model.forward_greedy(&tokens[..1], 0).await?;
    for &n in prompts.iter().filter(|&&n| n > 1) {
        model.forward_greedy(&tokens[depth..depth + n], depth).await?;
    }
    Ok(())
}

/// Prompt tokens per second of one pass over `tokens` placed at `depth`.
pub async fn prefill_rate(model: &mut Llama, tokens: &[u32], depth: usize) -> Result<f64> {
    let started = Instant::now();
    model.forward_greedy(tokens, depth).await?;
    Ok(tokens.len() as f64 / started.elapsed().as_secs_f64())
}

/// One generation run's rate and the CPU time spent encoding its steps.
pub struct DecodeTiming {
    pub tokens_per_second: f64,
    pub encode_us_per_token: f64,
}

/// Greedy generation of `n` tokens after `first` at `depth`, as the engine decodes: each step is
/// submitted before the token it takes from the GPU is read back; `sync` reads each token and writes
/// it again before submitting the next step instead (for comparison).
pub async fn decode_rate(model: &mut Llama, first: u32, depth: usize, n: usize, sync: bool) -> Result<DecodeTiming> {
    let started = Instant::now();
    let mut encoding = Duration::ZERO;
    let submitting = Instant::now();
    model.submit_greedy(&[first], depth)?;
    encoding += submitting.elapsed();
    for step in 1..=n {
        if step < n && !sync {
            let submitting = Instant::now();
            model.submit_greedy_next(depth + step)?;
            encoding += submitting.elapsed();
        }
        let token = model.read_greedy().await?;
        if step < n && sync {
            let submitting = Instant::now();
            model.submit_greedy(&[token], depth + step)?;
            encoding += submitting.elapsed();
        }
    }
    Ok(DecodeTiming {
        tokens_per_second: n as f64 / started.elapsed().as_secs_f64(),
        encode_us_per_token: encoding.as_secs_f64() * 1e6 / n as f64,
    })
}
