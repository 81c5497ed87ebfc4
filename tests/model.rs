//! The whole forward pass against transformers goldens (tests/fixtures/make_fixtures.py), on both
//! fixtures: Llama 3.1-style (untied, f32, sharded) and Llama 3.2-style (tied, f16 + bf16).

mod common;

use common::{assert_close, coop_matrix_gpu, exact, golden, gpu, gpu_with, has_feature, load_model};
use llama_webgpu::gpu::KvType;
use llama_webgpu::{Error, GpuOptions, LoadOptions};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

const FIXTURES: [&str; 2] = ["tiny-llama31", "tiny-llama32-tied"];
/// Logits agree within ATOL + RTOL * |logit|.
const ATOL: f32 = 1e-4;
const RTOL: f32 = 1e-4;

#[test]
fn last_logits_match_transformers_at_every_prompt_length() {
    let Some(gpu) = gpu() else { return };
    for name in FIXTURES {
        let mut model = load_model(&gpu, name, &LoadOptions::default()).unwrap();
        for case in golden(name).logits {
            let logits = pollster::block_on(model.forward(&case.tokens, 0)).unwrap();
            let what = format!("{name}, prompt of {}", case.tokens.len());
            let max_err = assert_close(&what, &logits, &case.last_logits, ATOL, RTOL);
            println!("{what}: max |logit error| {max_err:.2e}");
        }
    }
}

/// f16 prefill tiles (GpuOptions::f16_tiles) round activations and weights to f16, so their logits
/// miss the f32 goldens' 1e-4 (the reason f32 is the default) but stay within this.
const F16_TILES_TOLERANCE: f32 = 5e-2;

#[test]
fn f16_prefill_tiles_keep_logits_within_their_tolerance() {
    let Some(gpu) = gpu_with(&GpuOptions { f16_tiles: true, ..exact() }) else { return };
    if !has_feature(&gpu, gpu.tile_type == llama_webgpu::gpu::TileType::F16, "shader-f16") {
        return;
    }
    prefill_logits_within_f16_tolerance(&gpu, "with f16 tiles");
}

/// Every fixture's golden prompts of 8 tokens or more (20 tokens: GEMVs of several columns; 40 and
/// 80: tiles) on `gpu`, against the goldens within F16_TILES_TOLERANCE.
fn prefill_logits_within_f16_tolerance(gpu: &llama_webgpu::Gpu, path: &str) {
    for name in FIXTURES {
        let mut model = load_model(gpu, name, &LoadOptions::default()).unwrap();
        for case in golden(name).logits.iter().filter(|c| c.tokens.len() >= 8) {
            let logits = pollster::block_on(model.forward(&case.tokens, 0)).unwrap();
            let what = format!("{name} {path}, prompt of {}", case.tokens.len());
            let max_err = assert_close(&what, &logits, &case.last_logits, F16_TILES_TOLERANCE, F16_TILES_TOLERANCE);
            println!("{what}: max |logit error| {max_err:.2e}");
        }
    }
}

/// Prefill on cooperative matrices (where the adapter has them, the default there) rounds as f16
/// tiles do: the same tolerance against the goldens.
#[test]
fn prefill_on_cooperative_matrices_keeps_logits_within_the_f16_tolerance() {
    let Some(gpu) = coop_matrix_gpu(&GpuOptions { kv_type: Some(KvType::F32), ..Default::default() }) else { return };
    prefill_logits_within_f16_tolerance(&gpu, "on cooperative matrices");
}

/// A profiled prefill on cooperative matrices: its passes have more dispatches than a decode step
/// (each product's inputs made f16 first), and the profile times every one.
#[test]
fn a_profiled_prefill_on_cooperative_matrices_times_every_dispatch() {
    let Some(gpu) = coop_matrix_gpu(&GpuOptions { timestamps: true, kv_type: Some(KvType::F32), ..Default::default() }) else { return };
    let mut model = load_model(&gpu, "tiny-llama31", &LoadOptions::default()).unwrap();
    let tokens: Vec<u32> = (0..gpu.gemv_max_tokens + 8).collect();
    let (_, times) = pollster::block_on(model.profile_greedy(&tokens, 0)).unwrap();
    // q/k/v, o, gate/up and down of every layer.
    let prepared = times.iter().filter(|t| t.name == "to_f16").count();
    assert_eq!(prepared, 4 * model.config().n_layers, "{:?}", times.iter().map(|t| t.name).collect::<Vec<_>>());
}

/// An f16 KV pool (the default where the adapter has shader-f16) holds keys and values rounded to
/// f16: logits within 1e-2 of the goldens in units of the logits' spread (their standard deviation:
/// 1.4 for tiny-llama31, 10 for tiny-llama32-tied, whose errors are as much larger; measured at
/// most 3.9e-3 and 3.2e-2), and the goldens' greedy continuation.
#[test]
fn f16_kv_pool_keeps_logits_within_1e_2_of_their_spread_and_the_greedy_tokens() {
    let Some(exact_gpu) = gpu() else { return };
    if !has_feature(&exact_gpu, exact_gpu.features.contains(wgpu::Features::SHADER_F16), "shader-f16") {
        return;
    }
    assert_eq!(gpu_with(&GpuOptions::default()).map(|g| g.kv_type), Some(KvType::F16), "f16 is the default with shader-f16");
    kv_pool_keeps_logits_within_their_spread_and_the_greedy_tokens(KvType::F16, 1e-2);
}

/// A q8_0 KV pool (int8 blocks of 32 with a scale, on any adapter): logits within Q8_0_KV_TOLERANCE
/// of the goldens in units of the logits' spread (measured at most 5.5e-2 on tiny-llama31, 8.0e-2 on
/// tiny-llama32-tied: random weights amplify the int8 rounding), and the goldens' greedy
/// continuation.
#[test]
fn q8_0_kv_pool_keeps_logits_within_its_tolerance_and_the_greedy_tokens() {
    kv_pool_keeps_logits_within_their_spread_and_the_greedy_tokens(KvType::Q8_0, Q8_0_KV_TOLERANCE);
}

const Q8_0_KV_TOLERANCE: f32 = 0.1;

/// Each fixture on a pool of `kv_type` against the goldens: logits within `tolerance` of their
/// spread (their standard deviation), and the greedy continuation where its margins allow.
fn kv_pool_keeps_logits_within_their_spread_and_the_greedy_tokens(kv_type: KvType, tolerance: f32) {
    let Some(exact_gpu) = gpu() else { return };
    let Some(gpu) = gpu_with(&GpuOptions { kv_type: Some(kv_type), ..exact() }) else { return };
    for name in FIXTURES {
        let mut model = load_model(&gpu, name, &LoadOptions::default()).unwrap();
        for case in golden(name).logits {
            let logits = pollster::block_on(model.forward(&case.tokens, 0)).unwrap();
            let what = format!("{name} with a {kv_type:?} KV pool, prompt of {}", case.tokens.len());
            let spread = standard_deviation(&case.last_logits);
            let max_err = assert_close(&what, &logits, &case.last_logits, tolerance * spread, 0.0);
            println!("{what}: max |logit error| {max_err:.2e}, {:.2e} of the spread", max_err / spread);
        }
        // The greedy continuation may leave the goldens' only where the exact model's two
        // candidates lie within the tolerance.
        let greedy = golden(name).greedy;
        let tokens = pollster::block_on(model.generate_greedy(&greedy.prompt, greedy.tokens.len())).unwrap();
        if let Some(step) = tokens.iter().zip(&greedy.tokens).position(|(a, b)| a != b) {
            let mut exact_model = load_model(&exact_gpu, name, &LoadOptions::default()).unwrap();
            let context = [&greedy.prompt[..], &greedy.tokens[..step]].concat();
            let logits = pollster::block_on(exact_model.forward(&context, 0)).unwrap();
            let margin = logits[greedy.tokens[step] as usize] - logits[tokens[step] as usize];
            let spread = standard_deviation(&logits);
            println!("{name} greedy with a {kv_type:?} KV pool leaves the goldens at step {step}, where the exact logits differ by {:.2e} of their spread", margin / spread);
            assert!(margin <= tolerance * spread, "{name} greedy with a {kv_type:?} KV pool: step {step} took {} over {} (exact margin {margin})", tokens[step], greedy.tokens[step]);
        }
    }
}

fn standard_deviation(values: &[f32]) -> f32 {
    let mean = values.iter().sum::<f32>() / values.len() as f32;
    (values.iter().map(|l| (l - mean).powi(2)).sum::<f32>() / values.len() as f32).sqrt()
}

/// Llama 3.1's long context: the tiny fixture (llama3 RoPE scaling) with its maximum raised to
/// 131,072, a short prompt placed at position 100,000 of a fresh pool (6,252 pages; the positions
/// before it hold zero keys and values), against the whole model on the CPU at the same positions.
/// The 100,000 zero keys outweigh the prompt's own in every softmax, so these logits hardly depend
/// on the prompt's rotation (one position later they move by 1e-6): RoPE at such positions is
/// checked by the rotary kernel test, this one checks the pass end to end there.
#[test]
fn a_prompt_past_position_100000_matches_the_cpu_forward() {
    let Some(gpu) = gpu() else { return };
    let dir = std::env::temp_dir().join(format!("llama-webgpu-deep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = common::fixture("tiny-llama31");
    let mut config_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap()).unwrap();
    config_json["max_position_embeddings"] = 131072.into();
    std::fs::write(dir.join("config.json"), config_json.to_string()).unwrap();
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") || path.ends_with("model.safetensors.index.json") {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    let config = llama_webgpu::load::read_hf_config(&dir).unwrap();
    let source = llama_webgpu::load::open_safetensors_dir(&dir).unwrap();
    let (start, tokens) = (100_000, [17, 300, 42, 999]);
    let options = LoadOptions { context_length: Some(start + 32), ..Default::default() };
    let mut model = pollster::block_on(llama_webgpu::Llama::load(&gpu, config.clone(), &source, &options, &mut |_| {})).unwrap();
    let logits = pollster::block_on(model.forward(&tokens, start)).unwrap();
    let want = common::cpu_forward(&config, &source, &tokens, start);
    let max_err = assert_close("prompt at position 100,000", &logits, &want, ATOL, RTOL);
    println!("at position {start}: max |logit error| {max_err:.2e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Decode runs the GEMVs, in both reductions: subgroups (the default where the adapter has them)
/// and workgroup memory (browsers, other adapters).
#[test]
fn prefill_then_decode_equals_one_prefill() {
    for no_subgroups in [false, true] {
        let Some(gpu) = gpu_with(&GpuOptions { no_subgroups, ..exact() }) else { return };
        if !no_subgroups && !has_feature(&gpu, gpu.subgroups, "subgroups") {
            continue;
        }
        for name in FIXTURES {
            let mut model = load_model(&gpu, name, &LoadOptions::default()).unwrap();
            let golden = golden(name);
            let longest = golden.logits.iter().max_by_key(|c| c.tokens.len()).unwrap();
            // Prefill 10 tokens, then decode the rest one at a time through the KV cache.
            let split = 10;
            pollster::block_on(model.forward(&longest.tokens[..split], 0)).unwrap();
            let mut logits = vec![];
            for (i, &token) in longest.tokens.iter().enumerate().skip(split) {
                logits = pollster::block_on(model.forward(&[token], i)).unwrap();
            }
            let what = format!("{name}: decoded step by step, subgroups {}", gpu.subgroups);
            let max_err = assert_close(&what, &logits, &longest.last_logits, ATOL, RTOL);
            println!("{what}: max |logit error| {max_err:.2e}");
        }
    }
}

#[test]
fn greedy_continuation_matches_transformers() {
    let Some(gpu) = gpu() else { return };
    for name in FIXTURES {
        let mut model = load_model(&gpu, name, &LoadOptions::default()).unwrap();
        let golden = golden(name);
        let tokens = pollster::block_on(model.generate_greedy(&golden.greedy.prompt, golden.greedy.tokens.len())).unwrap();
        assert_eq!(tokens, golden.greedy.tokens, "{name}");
    }
}

#[test]
fn greedy_tokens_kept_on_the_gpu_equal_tokens_read_back_each_step() {
    let Some(gpu) = gpu() else { return };
    for name in FIXTURES {
        let mut model = load_model(&gpu, name, &LoadOptions::default()).unwrap();
        let prompt = golden(name).greedy.prompt;
        let n = 12;
        // Each step's token read back and written again by the host.
        let mut stepwise = vec![pollster::block_on(model.forward_greedy(&prompt, 0)).unwrap()];
        while stepwise.len() < n {
            let position = prompt.len() + stepwise.len() - 1;
            stepwise.push(pollster::block_on(model.forward_greedy(&[*stepwise.last().unwrap()], position)).unwrap());
        }
        // Each step submitted before the token it takes from the GPU is read.
        let pipelined = pollster::block_on(model.generate_greedy(&prompt, n)).unwrap();
        assert_eq!(pipelined, stepwise, "{name}");
        // Only a pass in flight can feed the next one.
        let err = model.submit_greedy_next(prompt.len()).unwrap_err().to_string();
        assert!(err.contains("0 greedy passes are in flight"), "{err}");
    }
}

#[test]
fn long_prompts_run_in_chunks_with_the_same_logits() {
    let Some(gpu) = gpu() else { return };
    for name in FIXTURES {
        let mut model = load_model(&gpu, name, &LoadOptions { max_batch: 7, ..Default::default() }).unwrap();
        for case in golden(name).logits {
            let logits = pollster::block_on(model.forward(&case.tokens, 0)).unwrap();
            assert_close(&format!("{name}, {} tokens in chunks of 7", case.tokens.len()), &logits, &case.last_logits, ATOL, RTOL);
        }
    }
}

#[test]
fn a_tiny_binding_limit_splits_weights_and_keeps_the_logits() {
    // 48 KiB: every matrix above 48 KiB (embeddings, lm_head, MLP) is split over several buffers,
    // and the prompt batch shrinks so each activation buffer fits.
    let limit = 48 << 10;
    let Some(small) = gpu_with(&GpuOptions { max_storage_binding: Some(limit), ..exact() }) else { return };
    let Some(gpu) = gpu() else { return };
    assert_eq!(small.limits.max_storage_buffer_binding_size, limit);
    for name in FIXTURES {
        let whole = load_model(&gpu, name, &LoadOptions::default()).unwrap();
        let mut split = load_model(&small, name, &LoadOptions::default()).unwrap();
        assert!(split.dispatches_per_token(0) > whole.dispatches_per_token(0), "{name}: nothing was split");
        assert!(split.max_batch() < 80, "{name}: the batch should shrink to the limit");
        for case in golden(name).logits {
            let logits = pollster::block_on(split.forward(&case.tokens, 0)).unwrap();
            assert_close(&format!("{name} split, prompt of {}", case.tokens.len()), &logits, &case.last_logits, ATOL, RTOL);
        }
    }
}

#[test]
fn stacked_tensors_in_different_formats_load_as_blocks_of_their_own() {
    // The tied fixture with every k_proj (f16) and up_proj (bf16) widened exactly to f32: q/k/v
    // become three blocks and gate/up two, and the logits stay those of transformers.
    let Some(gpu) = gpu() else { return };
    let name = "tiny-llama32-tied";
    let bytes = std::fs::read(common::fixture(name).join("model.safetensors")).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let widened: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = tensors
        .tensors()
        .into_iter()
        .map(|(tensor, view)| {
            let data = view.data();
            let f32_bytes = |values: Vec<f32>| values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
            let halves = || data.chunks(2).map(|b| u16::from_le_bytes([b[0], b[1]]));
            let (dtype, data) = match view.dtype() {
                Dtype::F16 if tensor.contains("k_proj") => (Dtype::F32, f32_bytes(halves().map(|h| half::f16::from_bits(h).to_f32()).collect())),
                Dtype::BF16 if tensor.contains("up_proj") => (Dtype::F32, f32_bytes(halves().map(|h| f32::from_bits((h as u32) << 16)).collect())),
                dtype => (dtype, data.to_vec()),
            };
            (tensor, view.shape().to_vec(), dtype, data)
        })
        .collect();
    let views: Vec<(&str, TensorView)> =
        widened.iter().map(|(tensor, shape, dtype, data)| (tensor.as_str(), TensorView::new(*dtype, shape.clone(), data).unwrap())).collect();
    let dir = std::env::temp_dir().join(format!("llama-webgpu-mixed-formats-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    std::fs::copy(common::fixture(name).join("config.json"), dir.join("config.json")).unwrap();

    let config = llama_webgpu::load::read_hf_config(&dir).unwrap();
    let source = llama_webgpu::load::open_safetensors_dir(&dir).unwrap();
    let mut mixed = pollster::block_on(llama_webgpu::Llama::load(&gpu, config, &source, &LoadOptions::default(), &mut |_| {})).unwrap();
    let uniform = load_model(&gpu, name, &LoadOptions::default()).unwrap();
    let layers = mixed.config().n_layers;
    assert_eq!(mixed.dispatches_per_token(0), uniform.dispatches_per_token(0) + 3 * layers);
    for case in golden(name).logits {
        let logits = pollster::block_on(mixed.forward(&case.tokens, 0)).unwrap();
        assert_close(&format!("mixed formats, prompt of {}", case.tokens.len()), &logits, &case.last_logits, ATOL, RTOL);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_requests_get_named_errors_and_leave_the_model_usable() {
    let Some(gpu) = gpu() else { return };
    let name = "tiny-llama31";
    let mut model = load_model(&gpu, name, &LoadOptions { context_length: Some(48), ..Default::default() }).unwrap();
    let err = pollster::block_on(model.forward(&[1, 5000], 0)).unwrap_err().to_string();
    assert!(err.contains("token id 5000") && err.contains("1003"), "{err}");
    let err = pollster::block_on(model.forward(&[1; 10], 40)).unwrap_err().to_string();
    assert!(err.contains("50 positions") && err.contains("48"), "{err}");
    let err = pollster::block_on(model.forward(&[], 0)).unwrap_err().to_string();
    assert!(err.contains("no input tokens"), "{err}");
    let case = &golden(name).logits[1];
    let logits = pollster::block_on(model.forward(&case.tokens, 0)).unwrap();
    assert_close("after errors", &logits, &case.last_logits, ATOL, RTOL);
}

#[test]
fn context_length_is_checked_against_the_model_and_the_device() {
    let Some(gpu) = gpu() else { return };
    let err = load_model(&gpu, "tiny-llama31", &LoadOptions { context_length: Some(257), ..Default::default() }).err().unwrap();
    assert!(matches!(err, Error::Model(_)) && err.to_string().contains("max_position_embeddings 256"), "{err}");
    // Unasked, the context is the model's own (256), as far as the cos/sin table binds: 12 KiB
    // binds 192 positions of 64 bytes (the KV pool, 2 KiB a page and layer buffer, takes buffers
    // of 6 pages).
    assert_eq!(load_model(&gpu, "tiny-llama31", &LoadOptions::default()).unwrap().context_length(), 256);
    let Some(small) = gpu_with(&GpuOptions { max_storage_binding: Some(12 << 10), ..exact() }) else { return };
    let model = load_model(&small, "tiny-llama31", &LoadOptions::default()).unwrap();
    assert_eq!((model.context_length(), model.kv_pool().pages, model.kv_pool().buffers()), (192, 12, 2));
    // A page must bind: 16 positions of 32 keys take 2 KiB.
    let Some(tinier) = gpu_with(&GpuOptions { max_storage_binding: Some(1 << 10), ..exact() }) else { return };
    let err = load_model(&tinier, "tiny-llama31", &LoadOptions { context_length: Some(16), ..Default::default() }).err().unwrap().to_string();
    assert!(err.contains("kv pool page") && err.contains("needed 2048, available 1024"), "{err}");
}

/// A pool whose layer buffers would pass the binding limit is cut into several (the tiny fixture's
/// 32 KiB of f32 per layer and context into 10 and 6 pages under 20 KiB): the goldens' logits and
/// greedy continuation as with one buffer.
#[test]
fn a_kv_pool_past_the_binding_limit_spans_buffers_with_the_same_tokens() {
    let Some(small) = gpu_with(&GpuOptions { max_storage_binding: Some(20 << 10), ..exact() }) else { return };
    for name in FIXTURES {
        let mut model = load_model(&small, name, &LoadOptions::default()).unwrap();
        let pool = model.kv_pool();
        assert_eq!((model.context_length(), pool.pages, pool.buffers(), pool.staged()), (256, 16, 2, true), "{name}");
        for case in golden(name).logits {
            let logits = pollster::block_on(model.forward(&case.tokens, 0)).unwrap();
            assert_close(&format!("{name} over two pool buffers, prompt of {}", case.tokens.len()), &logits, &case.last_logits, ATOL, RTOL);
        }
        let greedy = golden(name).greedy;
        let tokens = pollster::block_on(model.generate_greedy(&greedy.prompt, greedy.tokens.len())).unwrap();
        assert_eq!(tokens, greedy.tokens, "{name} greedy over two pool buffers");
    }
}

#[test]
fn load_progress_counts_every_weight_byte_once() {
    let Some(gpu) = gpu() else { return };
    for name in FIXTURES {
        let dir = common::fixture(name);
        let config = llama_webgpu::load::read_hf_config(&dir).unwrap();
        let source = llama_webgpu::load::open_safetensors_dir(&dir).unwrap();
        let mut reports = vec![];
        pollster::block_on(llama_webgpu::Llama::load(&gpu, config, &source, &LoadOptions::default(), &mut |p| {
            reports.push((p.tensor.to_string(), p.bytes_done, p.bytes_total))
        }))
        .unwrap();
        let safetensors_bytes: u64 = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap();
                let header = u64::from_le_bytes(bytes[..8].try_into().unwrap());
                bytes.len() as u64 - 8 - header
            })
            .sum();
        let (_, done, total) = reports.last().unwrap().clone();
        assert_eq!((done, total), (safetensors_bytes, safetensors_bytes), "{name}");
        assert!(reports.windows(2).all(|w| w[0].1 < w[1].1), "{name}: progress must grow");
        // One report per chunk read, naming the last tensor it reached.
        assert!(reports.iter().all(|r| r.0.starts_with("model.") || r.0 == "lm_head.weight"), "{name}: {reports:?}");
    }
}

#[test]
fn the_memory_estimate_is_what_the_load_allocates() {
    let Some(gpu) = gpu() else { return };
    let name = "tiny-llama31";
    let config = llama_webgpu::load::read_hf_config(&common::fixture(name)).unwrap();
    let page_bytes = llama_webgpu::model::KvPool::bytes_per_page(&config, gpu.kv_type);
    for options in [
        LoadOptions::default(),
        LoadOptions { context_length: Some(100), max_sequences: 3, ..Default::default() },
        LoadOptions { kv_memory: Some(7 * page_bytes + 1), ..Default::default() },
    ] {
        let estimate = llama_webgpu::model::MemoryEstimate::new(&gpu, &config, 0, &options).unwrap();
        let model = load_model(&gpu, name, &options).unwrap();
        assert_eq!(estimate.kv_bytes, model.kv_pool().pages as u64 * page_bytes, "{options:?}");
        assert_eq!(estimate.context, model.context_length(), "{options:?}");
    }
    // What the load refuses, the estimate refuses the same way.
    for options in [
        LoadOptions { kv_memory: Some(page_bytes - 1), ..Default::default() },
        LoadOptions { context_length: Some(config.max_position_embeddings + 1), ..Default::default() },
    ] {
        let estimated = llama_webgpu::model::MemoryEstimate::new(&gpu, &config, 0, &options).unwrap_err().to_string();
        let loaded = load_model(&gpu, name, &options).err().expect("the load refuses it").to_string();
        assert_eq!(estimated, loaded);
    }
}
