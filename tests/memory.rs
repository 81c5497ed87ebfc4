//! Host memory while loading: a synthetic 1.2 GB checkpoint streams to the GPU through bounded host
//! memory, as it is and re-encoded into q8_0 as it streams. The only test in this file, so the
//! process's peak RSS is its own.

mod common;

use std::io::Write;

use common::gpu;
use llama_webgpu::load::{open_safetensors_dir, read_hf_config};
use llama_webgpu::quant::DType;
use llama_webgpu::{Llama, LoadOptions};

const MIB: u64 = 1 << 20;

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Writes a Llama-shaped checkpoint of f16 weights (hidden 2048, FFN 8192, 8 layers, vocab 32000,
/// untied: 1.23 GB) without holding it in memory.
fn write_checkpoint(dir: &std::path::Path) -> u64 {
    let (hidden, ffn, layers, vocab, kv) = (2048usize, 8192usize, 8usize, 32000usize, 512usize);
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": false,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, &str)> = vec![("model.embed_tokens.weight".into(), vec![vocab, hidden], "F16")];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (name, shape, dtype) in [
            ("input_layernorm", vec![hidden], "F32"),
            ("self_attn.q_proj", vec![hidden, hidden], "F16"),
            ("self_attn.k_proj", vec![kv, hidden], "F16"),
            ("self_attn.v_proj", vec![kv, hidden], "F16"),
            ("self_attn.o_proj", vec![hidden, hidden], "F16"),
            ("post_attention_layernorm", vec![hidden], "F32"),
            ("mlp.gate_proj", vec![ffn, hidden], "F16"),
            ("mlp.up_proj", vec![ffn, hidden], "F16"),
            ("mlp.down_proj", vec![hidden, ffn], "F16"),
        ] {
            tensors.push((format!("{p}.{name}.weight"), shape, dtype));
        }
    }
    tensors.push(("model.norm.weight".into(), vec![hidden], "F32"));
    tensors.push(("lm_head.weight".into(), vec![vocab, hidden], "F16"));
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape, dtype) in &tensors {
        let bytes = shape.iter().product::<usize>() as u64 * if *dtype == "F16" { 2 } else { 4 };
        header.insert(name.clone(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}));
        offset += bytes;
    }
    let mut header = serde_json::Value::Object(header).to_string();
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let mut file = std::io::BufWriter::new(std::fs::File::create(dir.join("model.safetensors")).unwrap());
    file.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    file.write_all(header.as_bytes()).unwrap();
    // 0x2c00 is f16 1/16; as f32 pairs it is a small positive number: finite either way.
    let block = [0x00u8, 0x2c].repeat(512 * 1024);
    let mut left = offset;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        file.write_all(&block[..n]).unwrap();
        left -= n as u64;
    }
    file.flush().unwrap();
    offset
}

/// Loads the checkpoint in `dir` with `options`; returns the growth of the process's peak RSS over
/// the load, and its anonymous and file-backed RSS once loaded.
fn load_peak(gpu: &llama_webgpu::Gpu, dir: &std::path::Path, options: &LoadOptions) -> (u64, u64, u64) {
    let config = read_hf_config(dir).unwrap();
    let source = open_safetensors_dir(dir).unwrap();
    // Peak RSS from here on: reset the high-water mark.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_kib("VmHWM:") * 1024;
    let model = pollster::block_on(Llama::load(gpu, config, &source, options, &mut |_| {})).unwrap();
    let peak = status_kib("VmHWM:") * 1024 - before;
    let (anon, file) = (status_kib("RssAnon:") * 1024, status_kib("RssFile:") * 1024);
    drop(model);
    (peak, anon, file)
}

#[test]
fn loading_streams_weights_through_bounded_host_memory() {
    let Some(gpu) = gpu() else { return };
    let dir = std::env::temp_dir().join(format!("llama-webgpu-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let weight_bytes = write_checkpoint(&dir);
    assert!(weight_bytes > 1 << 30, "the checkpoint should exceed 1 GiB");
    let options = LoadOptions { context_length: Some(256), max_batch: 16, ..Default::default() };
    // First, while nothing freed can be reused: re-encoded into q8_0 as it streams (f16 weights
    // are 2 bytes each, q8_0's 34 a block of 32). Beside the plain load's slack (below), a chunk's
    // values in f32 and their q8_0 bytes, 21 MiB; holding the f16 checkpoint or a tensor's f32
    // values would pass this bound. Measured: 738 MiB for 625 MiB of weights.
    let (peak_q8_0, _, _) = load_peak(&gpu, &dir, &LoadOptions { quant: Some(DType::Q8_0), ..options.clone() });
    let q8_0_bytes = weight_bytes / 64 * 34;
    let bound_q8_0 = q8_0_bytes + weight_bytes / 20 + 96 * MIB;
    println!("re-encoded into q8_0: {} MiB of weights; peak RSS growth {} MiB (bound {} MiB)", q8_0_bytes / MIB, peak_q8_0 / MIB, bound_q8_0 / MIB);
    assert!(peak_q8_0 <= bound_q8_0, "peak RSS grew by {} MiB re-encoding, more than {} MiB", peak_q8_0 / MIB, bound_q8_0 / MIB);

    let (peak, anon, file) = load_peak(&gpu, &dir, &options);
    std::fs::remove_dir_all(&dir).unwrap();
    // lavapipe keeps "GPU" buffers in this process's memory, so the weights themselves count once;
    // the loader adds its 8 MiB read chunk and two 9 MiB staging buffers, lavapipe its pipelines
    // and the rest (measured: 110 MiB over the weights when this load came first). A loader that
    // held the checkpoint, left its pages mapped or kept each tensor's bytes until the end would
    // add the whole 1.2 GB again, past this bound (of which the first load's freed memory, reused,
    // hides at most its 0.6 GB).
    let bound = weight_bytes + weight_bytes / 20 + 64 * MIB;
    println!(
        "weights {} MiB; peak RSS growth {} MiB (bound {} MiB); after load: anon {} MiB, file-backed {} MiB",
        weight_bytes / MIB,
        peak / MIB,
        bound / MIB,
        anon / MIB,
        file / MIB
    );
    assert!(peak <= bound, "peak RSS grew by {} MiB, more than {} MiB", peak / MIB, bound / MIB);
}
