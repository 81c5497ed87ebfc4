//! Shared test helpers: a GPU that is required in CI, seeded inputs and tolerance checks.
#![allow(dead_code)]

pub mod gguf_writer;

use std::path::{Path, PathBuf};

use llama_webgpu::gpu::KvType;
use llama_webgpu::{Gpu, GpuOptions};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Set by CI: a GPU test that finds no adapter, or an adapter without an optional feature the test
/// covers (shader-f16, subgroups: lavapipe and the H100/H200 have both), fails instead of skipping.
pub const REQUIRE_GPU_ENV: &str = "LLAMA_WEBGPU_REQUIRE_GPU";

fn gpu_required() -> bool {
    std::env::var(REQUIRE_GPU_ENV).is_ok_and(|v| v == "1")
}

/// Whether `gpu` has the optional `feature` (`has`); without it the caller skips its check, which
/// is reported, or fails where CI requires a GPU.
pub fn has_feature(gpu: &Gpu, has: bool, feature: &str) -> bool {
    if !has {
        if gpu_required() {
            panic!("{REQUIRE_GPU_ENV}=1 but {} has no {feature}", gpu.info.name);
        }
        eprintln!("SKIPPED: {} has no {feature}", gpu.info.name);
    }
    has
}

/// A device with the given options, or None (reported on stderr) when the machine has no adapter
/// and CI has not demanded one.
pub fn gpu_with(options: &GpuOptions) -> Option<Gpu> {
    match pollster::block_on(Gpu::new(options)) {
        Ok(gpu) => Some(gpu),
        Err(error) => {
            if gpu_required() {
                panic!("{REQUIRE_GPU_ENV}=1 but no GPU: {error}");
            }
            eprintln!("SKIPPED: no GPU adapter ({error})");
            None
        }
    }
}

/// Options for the exact path: prefill on cooperative matrices and an f16 KV pool round to f16, so
/// tests held to the f32 references run without them (tests of those paths ask for them).
pub fn exact() -> GpuOptions {
    GpuOptions { no_coop_matrix: true, kv_type: Some(KvType::F32), ..Default::default() }
}

pub fn gpu() -> Option<Gpu> {
    gpu_with(&exact())
}

/// Set where the adapter has cooperative matrices (bench/device.sh on an H100/H200): a test of
/// prefill on them fails instead of skipping when the engine does not take them.
pub const REQUIRE_COOP_MATRIX_ENV: &str = "LLAMA_WEBGPU_REQUIRE_COOP_MATRIX";

/// A device with `options` whose prefill runs on cooperative matrices, or None (reported) where
/// the adapter has none the engine uses (lavapipe, SwiftShader, browsers).
pub fn coop_matrix_gpu(options: &GpuOptions) -> Option<Gpu> {
    let gpu = gpu_with(options)?;
    if gpu.coop_matrix.is_none() {
        let listed = format!("{} lists {:?}, subgroup sizes {}..={}", gpu.info.name, gpu.coop_matrix_properties, gpu.info.subgroup_min_size, gpu.info.subgroup_max_size);
        if std::env::var(REQUIRE_COOP_MATRIX_ENV).is_ok_and(|v| v == "1") {
            panic!("{REQUIRE_COOP_MATRIX_ENV}=1 but prefill is not on cooperative matrices: {listed}");
        }
        eprintln!("SKIPPED: no cooperative matrices the engine takes (16x16x16 or 8x8x8 f16 -> f32 with subgroups of 32 or 8): {listed}");
        return None;
    }
    Some(gpu)
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn random_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Random weights of about unit size stored in `dtype`: random values encoded, or for a grid
/// format (not encoded here) random blocks, every bit pattern of which is valid, each block's d
/// set so that its largest weight is 0.25 to 1.
pub fn random_weight_bytes(dtype: llama_webgpu::quant::DType, rng: &mut StdRng, n: usize) -> Vec<u8> {
    if !dtype.is_grid_format() {
        return dtype.from_f32(&random_vec(rng, n, 1.0)).unwrap();
    }
    let (elements, block_bytes) = dtype.block();
    let mut bytes: Vec<u8> = (0..n / elements * block_bytes).map(|_| rng.random()).collect();
    for block in bytes.chunks_exact_mut(block_bytes) {
        set_grid_d(dtype, block, 1.0);
        let largest = dtype.to_f32(block).unwrap().iter().fold(0.0f32, |m, v| m.max(v.abs()));
        set_grid_d(dtype, block, rng.random_range(0.25..1.0) / largest.max(1e-3));
    }
    bytes
}

/// Writes a grid format's d: its first two bytes, or iq1_m's top nibbles of its 4 u16 at byte 48.
fn set_grid_d(dtype: llama_webgpu::quant::DType, block: &mut [u8], d: f32) {
    let bits = half::f16::from_f32(d).to_bits();
    if dtype != llama_webgpu::quant::DType::IQ1M {
        block[..2].copy_from_slice(&bits.to_le_bytes());
        return;
    }
    for i in 0..4 {
        let at = 48 + 2 * i;
        let scales = u16::from_le_bytes([block[at], block[at + 1]]) & 0x0fff | ((bits >> (4 * i)) & 0xf) << 12;
        block[at..at + 2].copy_from_slice(&scales.to_le_bytes());
    }
}

/// Asserts |got - want| <= atol + rtol * |want| everywhere, naming the worst element; returns the
/// largest absolute error.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0f32);
    let mut max_abs = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        max_abs = max_abs.max(err);
        let excess = err - (atol + rtol * w.abs());
        if excess > worst.1 || excess.is_nan() || !g.is_finite() {
            worst = (i, if g.is_finite() { excess } else { f32::INFINITY });
        }
    }
    let (i, excess) = worst;
    assert!(excess <= 0.0, "{what}: element {i} is {} but should be {} (|err| {} beyond tolerance by {excess})", got[i], want[i], (got[i] - want[i]).abs());
    max_abs
}

/// Loads a fixture model folder onto `gpu`.
pub fn load_model(gpu: &Gpu, name: &str, options: &llama_webgpu::LoadOptions) -> llama_webgpu::Result<llama_webgpu::Llama> {
    let dir = fixture(name);
    let config = llama_webgpu::load::read_hf_config(&dir)?;
    let source = llama_webgpu::load::open_safetensors_dir(&dir)?;
    pollster::block_on(llama_webgpu::Llama::load(gpu, config, &source, options, &mut |_| {}))
}

/// The transformers outputs recorded by tests/fixtures/make_fixtures.py.
#[derive(serde::Deserialize)]
pub struct Golden {
    pub logits: Vec<GoldenLogits>,
    pub greedy: GoldenGreedy,
}

#[derive(serde::Deserialize)]
pub struct GoldenLogits {
    pub tokens: Vec<u32>,
    pub last_logits: Vec<f32>,
}

#[derive(serde::Deserialize)]
pub struct GoldenGreedy {
    pub prompt: Vec<u32>,
    pub tokens: Vec<u32>,
}

pub fn golden(name: &str) -> Golden {
    let text = std::fs::read_to_string(fixture(name).join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Meta's Llama 3 tokenizer, fetched by scripts/fetch-tokenizer.
pub fn llama3_tokenizer_json() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/models/llama3-tokenizer/tokenizer.json");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}; run scripts/fetch-tokenizer", path.display()))
}

/// Meta's Llama 3 tokenizer, loaded once per test binary.
pub fn llama3_tokenizer() -> &'static llama_webgpu::text::Tokenizer {
    static TOKENIZER: std::sync::OnceLock<llama_webgpu::text::Tokenizer> = std::sync::OnceLock::new();
    TOKENIZER.get_or_init(|| llama_webgpu::text::Tokenizer::from_json_bytes(&llama3_tokenizer_json()).expect("tokenizer.json loads"))
}

/// The Llama 3 tokenizer cut to its first `vocab` ids (byte-level BPE stays complete: the first 256
/// ids are the bytes), for the tiny fixtures' vocabulary.
pub fn truncated_llama3_tokenizer(vocab: usize) -> llama_webgpu::text::Tokenizer {
    truncated_llama3_tokenizer_with(vocab, &[])
}

/// [`truncated_llama3_tokenizer`] with `added` (id, text) as tokens of their own, not special
/// (as DeepSeek-R1's `<think>` and `</think>`), in place of the vocabulary's tokens of those ids.
pub fn truncated_llama3_tokenizer_with(vocab: usize, added: &[(u32, &str)]) -> llama_webgpu::text::Tokenizer {
    let mut json: serde_json::Value = serde_json::from_slice(&llama3_tokenizer_json()).unwrap();
    let model = &mut json["model"];
    let kept: serde_json::Map<String, serde_json::Value> = model["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, id)| (id.as_u64().unwrap() as usize) < vocab && !added.iter().any(|&(taken, _)| id.as_u64() == Some(taken as u64)))
        .map(|(t, id)| (t.clone(), id.clone()))
        // The vocabulary holds the added tokens too, under their ids (tokenizers gives an added
        // token the vocabulary's id for its text, else the next free one).
        .chain(added.iter().map(|&(id, content)| (content.to_string(), serde_json::json!(id))))
        .collect();
    let merge_parts = |m: &serde_json::Value| -> (String, String) {
        match m {
            serde_json::Value::String(s) => {
                let (a, b) = s.split_once(' ').unwrap();
                (a.to_string(), b.to_string())
            }
            pair => (pair[0].as_str().unwrap().to_string(), pair[1].as_str().unwrap().to_string()),
        }
    };
    let merges: Vec<serde_json::Value> = model["merges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| {
            let (a, b) = merge_parts(m);
            kept.contains_key(&a) && kept.contains_key(&b) && kept.contains_key(&format!("{a}{b}"))
        })
        .cloned()
        .collect();
    model["vocab"] = serde_json::Value::Object(kept);
    model["merges"] = serde_json::Value::Array(merges);
    json["added_tokens"] = added
        .iter()
        .map(|&(id, content)| serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": false}))
        .collect();
    json["post_processor"] = serde_json::Value::Null;
    llama_webgpu::text::Tokenizer::from_json_bytes(&serde_json::to_vec(&json).unwrap()).unwrap()
}

/// The whole model on the CPU from the reference kernels (crate::reference), for `tokens` at
/// positions `start_pos..`: the last token's logits. Keys and values of positions before
/// `start_pos` are zero, as in a fresh KV pool. Reads weights in any format.
pub fn cpu_forward(config: &llama_webgpu::Config, weights: &dyn llama_webgpu::load::WeightSource, tokens: &[u32], start_pos: usize) -> Vec<f32> {
    use llama_webgpu::reference;
    let tensor = |name: &str| {
        let t = weights.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        (t.bytes.into_owned(), t.dtype)
    };
    let floats = |name: &str| -> Vec<f32> {
        let (bytes, dtype) = tensor(name);
        dtype.to_f32(&bytes).unwrap()
    };
    let matmul = |x: &[f32], name: &str, rows: usize, k: usize| {
        let (bytes, dtype) = tensor(name);
        reference::matmul(x, &bytes, dtype, rows, k)
    };
    let c = config;
    let (hidden, q_dim, kv_dim, head_dim) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.head_dim);
    let positions: Vec<usize> = (start_pos..start_pos + tokens.len()).collect();
    let cos_sin = c.rope_cos_sin(start_pos + tokens.len());
    let (embeddings, embeddings_dtype) = tensor("model.embed_tokens.weight");
    let mut x = reference::embedding(tokens, &embeddings, embeddings_dtype, hidden);
    for layer in 0..c.n_layers {
        let p = format!("model.layers.{layer}");
        let h = reference::rmsnorm(&x, &floats(&format!("{p}.input_layernorm.weight")), c.rms_norm_eps);
        let project = |name: &str, rows: usize| matmul(&h, &format!("{p}.self_attn.{name}.weight"), rows, hidden);
        let mut q = project("q_proj", q_dim);
        let mut k = project("k_proj", kv_dim);
        let v = project("v_proj", kv_dim);
        reference::rope(&mut q, &positions, &cos_sin, c.n_heads, head_dim, q_dim);
        reference::rope(&mut k, &positions, &cos_sin, c.n_kv_heads, head_dim, kv_dim);
        let mut k_cache = vec![0.0; start_pos * kv_dim];
        let mut v_cache = k_cache.clone();
        k_cache.extend(&k);
        v_cache.extend(&v);
        let attended = reference::attention(&q, &k_cache, &v_cache, start_pos, c.n_heads, c.n_kv_heads, head_dim);
        let o = matmul(&attended, &format!("{p}.self_attn.o_proj.weight"), hidden, q_dim);
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        let h = reference::rmsnorm(&x, &floats(&format!("{p}.post_attention_layernorm.weight")), c.rms_norm_eps);
        let mlp = |name: &str| matmul(&h, &format!("{p}.mlp.{name}.weight"), c.intermediate_size, hidden);
        let activated = reference::silu_mul(&mlp("gate_proj"), &mlp("up_proj"));
        let down = matmul(&activated, &format!("{p}.mlp.down_proj.weight"), hidden, c.intermediate_size);
        x.iter_mut().zip(&down).for_each(|(x, d)| *x += d);
    }
    let last = &x[(tokens.len() - 1) * hidden..];
    let normed = reference::rmsnorm(last, &floats("model.norm.weight"), c.rms_norm_eps);
    let head = if c.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
    matmul(&normed, head, c.vocab_size, hidden)
}

/// A fresh temporary folder of its own (tests run in parallel threads of one process).
pub fn temp_dir(name: &str) -> PathBuf {
    static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("llama-webgpu-test-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A copy of a fixture with a tokenizer (the fixtures have none): the Llama 3 tokenizer cut to its
/// vocabulary.
pub fn fixture_with_tokenizer(name: &str) -> PathBuf {
    let dir = temp_dir(&format!("{name}-src"));
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json" || e == "safetensors") && !path.ends_with("golden.json") {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(dir.join("tokenizer.json"), truncated_llama3_tokenizer(1003).to_json().unwrap()).unwrap();
    dir
}

/// Fixture `name` converted to shards of `quant`, in a folder of its own.
pub fn convert(name: &str, quant: llama_webgpu::quant::DType, shard_bytes: u64) -> PathBuf {
    let source = fixture_with_tokenizer(name);
    let out = temp_dir(&format!("{name}-{quant}"));
    llama_webgpu::load::convert(&source, quant, shard_bytes, &out, &mut |_| {}).unwrap();
    out
}
