//! Each WGSL kernel against its CPU reference (llama_webgpu::reference) on seeded random inputs at
//! odd sizes, for every weight format, with weights split over several buffers.

mod common;

use common::{assert_close, gpu, gpu_with, random_vec, rng};
use llama_webgpu::gpu::ops::{self, MatmulLayout, RopeParams, StepParams};
use llama_webgpu::gpu::WeightMatrix;
use llama_webgpu::quant::DType;
use llama_webgpu::{reference, Gpu, GpuOptions};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn step(gpu: &Gpu, n_tokens: usize, start_pos: usize) -> wgpu::Buffer {
    ops::step_buffer(gpu, StepParams { n_tokens: n_tokens as u32, start_pos: start_pos as u32, _pad: [0; 2] })
}

fn read_f32(gpu: &Gpu, buffer: &wgpu::Buffer, n: usize) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(&pollster::block_on(gpu.read(buffer, 4 * n as u64)).unwrap())
}

fn run(gpu: &Gpu, encode: impl FnOnce(&mut wgpu::ComputePass)) {
    pollster::block_on(gpu.run(encode)).unwrap();
}

/// Random weights rounded to `dtype`, as stored bytes, uploaded as a matrix.
fn weights(gpu: &Gpu, seed: u64, dtype: DType, rows: usize, cols: usize) -> (Vec<u8>, WeightMatrix) {
    let bytes = dtype.from_f32(&random_vec(&mut rng(seed), rows * cols, 1.0)).unwrap();
    let matrix = WeightMatrix::new(gpu, "w", dtype, rows, cols).unwrap();
    matrix.write_bytes(gpu, 0, &bytes);
    (bytes, matrix)
}

/// A device whose binding limit splits a (rows, cols) f32 matrix into about `parts` buffers.
fn splitting_gpu(rows: usize, cols: usize, parts: usize) -> Option<Gpu> {
    let bytes = (rows * cols * 4).div_ceil(parts).next_multiple_of(256) as u64;
    gpu_with(&GpuOptions { max_storage_binding: Some(bytes), ..Default::default() })
}

#[test]
fn embedding_matches_reference_in_every_format_and_split() {
    let (vocab, dim) = (97, 18);
    let Some(gpu) = splitting_gpu(vocab, dim, 3) else { return };
    let tokens: Vec<u32> = vec![0, 96, 13, 50, 13, 95, 64];
    for dtype in DTYPES {
        let (bytes, table) = weights(&gpu, 1, dtype, vocab, dim);
        assert!(table.parts.len() >= 2 || dtype != DType::F32, "the f32 table should be split, got {} part", table.parts.len());
        let ids: Vec<f32> = tokens.iter().map(|&t| t as f32).collect();
        let token_buffer = gpu.storage_buffer_with("tokens", &ids);
        let out = gpu.storage_buffer("out", (tokens.len() * dim * 4) as u64);
        let op = ops::embedding(&gpu, &token_buffer, &table, &out, &step(&gpu, tokens.len(), 0));
        run(&gpu, |pass| op.encode(pass, tokens.len() as u32));
        let want = reference::embedding(&tokens, &bytes, dtype, dim);
        assert_close(&format!("embedding {dtype}"), &read_f32(&gpu, &out, want.len()), &want, 0.0, 0.0);
    }
}

#[test]
fn rmsnorm_matches_reference() {
    let Some(gpu) = gpu() else { return };
    for (rows, dim) in [(1, 2), (5, 300), (3, 1030)] {
        let mut r = rng(dim as u64);
        let x = random_vec(&mut r, rows * dim, 3.0);
        let weight = random_vec(&mut r, dim, 2.0);
        let (xb, wb) = (gpu.storage_buffer_with("x", &x), gpu.storage_buffer_with("w", &weight));
        let out = gpu.storage_buffer("out", (x.len() * 4) as u64);
        let op = ops::rmsnorm(&gpu, &xb, &wb, &out, dim, 1e-5, &step(&gpu, rows, 0));
        run(&gpu, |pass| op.encode(pass, rows as u32));
        let want = reference::rmsnorm(&x, &weight, 1e-5);
        assert_close(&format!("rmsnorm {rows}x{dim}"), &read_f32(&gpu, &out, want.len()), &want, 1e-6, 1e-5);
    }
}

#[test]
fn rope_matches_reference_for_activations_and_cache_rows() {
    let Some(gpu) = gpu() else { return };
    let (n_heads, head_dim, context) = (3, 10, 40);
    let mut r = rng(7);
    let cos_sin: Vec<[f32; 2]> = (0..context * head_dim / 2).map(|i| [(i as f32 * 0.37).cos(), (i as f32 * 0.37).sin()]).collect();
    let table = gpu.storage_buffer_with("cos_sin", &cos_sin);
    let (start_pos, n) = (29, 5);
    for rows_at_position in [false, true] {
        let row_stride = n_heads * head_dim + 4; // a gap between rows must stay untouched
        let rows = if rows_at_position { context } else { n };
        let x = random_vec(&mut r, rows * row_stride, 2.0);
        let buffer = gpu.storage_buffer_with("x", &x);
        let params = RopeParams {
            n_heads: n_heads as u32,
            head_dim: head_dim as u32,
            row_stride: row_stride as u32,
            rows_at_position: rows_at_position as u32,
        };
        let op = ops::rope(&gpu, &table, &buffer, params, &step(&gpu, n, start_pos));
        run(&gpu, |pass| op.encode(pass, n as u32));
        let mut want = x.clone();
        let first_row = if rows_at_position { start_pos } else { 0 };
        let positions: Vec<usize> = (start_pos..start_pos + n).collect();
        reference::rope(&mut want[first_row * row_stride..], &positions, &cos_sin, n_heads, head_dim, row_stride);
        assert_close(&format!("rope at_position={rows_at_position}"), &read_f32(&gpu, &buffer, want.len()), &want, 1e-6, 1e-6);
    }
}

#[test]
fn matmul_matches_reference_in_every_format_strategy_and_split() {
    let (rows, k) = (67, 46);
    // 1 and 3 tokens run as GEMVs, 9 and 37 as tiles; the split device binds only up to 9 tokens.
    let Some(split) = splitting_gpu(rows, k, 3) else { return };
    let Some(whole) = gpu() else { return };
    for (gpu, token_counts) in [(&split, &[1, 3, 9][..]), (&whole, &[1, 37][..])] {
        for dtype in DTYPES {
            let (bytes, w) = weights(gpu, 2, dtype, rows, k);
            if std::ptr::eq(gpu, &split) && dtype == DType::F32 {
                assert!(w.parts.len() >= 3, "expected a split matrix, got {} parts", w.parts.len());
            }
            for &n in token_counts {
                let x = random_vec(&mut rng(n as u64), n * k, 1.0);
                let want = reference::matmul(&x, &bytes, dtype, rows, k);
                let xb = gpu.storage_buffer_with("x", &x);
                let out = gpu.storage_buffer("out", (n * rows * 4) as u64);
                let layout = MatmulLayout { in_stride: k, out_stride: rows, accumulate: false, rows_at_position: false };
                let op = ops::matmul(gpu, &xb, &w, &out, layout, &step(gpu, n, 0));
                run(gpu, |pass| op.encode(pass, n as u32));
                let what = format!("matmul {dtype} n={n} parts={}", w.parts.len());
                assert_close(&what, &read_f32(gpu, &out, want.len()), &want, 1e-5, 1e-5);
            }
        }
    }
}

#[test]
fn matmul_accumulates_and_writes_rows_at_positions() {
    let (rows, k, n, start_pos, context) = (20, 30, 9, 5, 16);
    let Some(gpu) = gpu() else { return };
    let (bytes, w) = weights(&gpu, 3, DType::BF16, rows, k);
    let x = random_vec(&mut rng(4), n * k, 1.0);
    let product = reference::matmul(&x, &bytes, DType::BF16, rows, k);
    for n_run in [1, n] {
        let initial = random_vec(&mut rng(5), context * rows, 1.0);
        let out = gpu.storage_buffer_with("out", &initial);
        let layout = MatmulLayout { in_stride: k, out_stride: rows, accumulate: true, rows_at_position: true };
        let xb = gpu.storage_buffer_with("x", &x);
        let op = ops::matmul(&gpu, &xb, &w, &out, layout, &step(&gpu, n_run, start_pos));
        run(&gpu, |pass| op.encode(pass, n_run as u32));
        let mut want = initial.clone();
        for (i, v) in product[..n_run * rows].iter().enumerate() {
            want[start_pos * rows + i] += v;
        }
        assert_close(&format!("accumulate at positions, n={n_run}"), &read_f32(&gpu, &out, want.len()), &want, 1e-5, 1e-5);
    }
}

#[test]
fn attention_matches_reference_across_key_blocks() {
    let Some(gpu) = gpu() else { return };
    // head_dim 130 exercises several dimensions per thread; positions beyond 64 several key blocks.
    for (n_heads, n_kv_heads, head_dim, start_pos, n) in [(6, 2, 12, 0, 1), (6, 2, 12, 70, 5), (4, 4, 130, 3, 9), (8, 1, 16, 127, 2)] {
        let context = start_pos + n + 3;
        let mut r = rng((start_pos + head_dim) as u64);
        let q = random_vec(&mut r, n * n_heads * head_dim, 1.0);
        let k_cache = random_vec(&mut r, context * n_kv_heads * head_dim, 1.0);
        let v_cache = random_vec(&mut r, context * n_kv_heads * head_dim, 1.0);
        let buffers = [&q, &k_cache, &v_cache].map(|v| gpu.storage_buffer_with("in", v));
        let out = gpu.storage_buffer("out", (q.len() * 4) as u64);
        let op = ops::attention(&gpu, &buffers[0], &buffers[1], &buffers[2], &out, n_heads, n_kv_heads, head_dim, &step(&gpu, n, start_pos));
        run(&gpu, |pass| op.encode(pass, n as u32));
        let want = reference::attention(&q, &k_cache, &v_cache, start_pos, n_heads, n_kv_heads, head_dim);
        let what = format!("attention heads {n_heads}/{n_kv_heads} hd {head_dim} start {start_pos} n {n}");
        assert_close(&what, &read_f32(&gpu, &out, want.len()), &want, 1e-5, 1e-5);
    }
}

#[test]
fn silu_mul_matches_reference() {
    let Some(gpu) = gpu() else { return };
    let (rows, width) = (3, 77);
    let mut r = rng(9);
    let (gate, up) = (random_vec(&mut r, rows * width, 8.0), random_vec(&mut r, rows * width, 2.0));
    let (gb, ub) = (gpu.storage_buffer_with("gate", &gate), gpu.storage_buffer_with("up", &up));
    let out = gpu.storage_buffer("out", (gate.len() * 4) as u64);
    let op = ops::silu_mul(&gpu, &gb, &ub, &out, width, &step(&gpu, rows, 0));
    run(&gpu, |pass| op.encode(pass, rows as u32));
    let want = reference::silu_mul(&gate, &up);
    assert_close("silu_mul", &read_f32(&gpu, &out, want.len()), &want, 1e-6, 1e-5);
}

#[test]
fn argmax_picks_the_first_largest() {
    let Some(gpu) = gpu() else { return };
    let mut values = random_vec(&mut rng(11), 1003, 5.0);
    values[700] = 9.0;
    values[400] = 9.0; // a tie: the first index wins, as torch.argmax
    for n in [5, 1003] {
        let input = gpu.storage_buffer_with("logits", &values[..n]);
        let out = gpu.storage_buffer("out", 4);
        let op = ops::argmax(&gpu, &input, &out, n);
        run(&gpu, |pass| op.encode(pass, 1));
        let got = u32::from_le_bytes(pollster::block_on(gpu.read(&out, 4)).unwrap().try_into().unwrap());
        assert_eq!(got as usize, reference::argmax(&values[..n]), "n={n}");
    }
}

#[test]
fn top_k_matches_reference_with_ties() {
    let Some(gpu) = gpu() else { return };
    let mut values = random_vec(&mut rng(12), 5003, 6.0);
    values[17] = 9.5;
    values[4001] = 9.5; // a tie: the lower id ranks first
    values[900] = 9.0;
    let input = gpu.storage_buffer_with("logits", &values);
    let out = gpu.storage_buffer("out", ops::TopK::OUT_BYTES);
    let top_k = ops::TopK::new(&gpu, &input, &out, values.len());
    for (k, temperature) in [(1, 1.0), (3, 0.7), (40, 1.3), (64, 2.0)] {
        top_k.set(&gpu, k, temperature);
        run(&gpu, |pass| top_k.encode(pass));
        let words: Vec<u32> = bytemuck::pod_collect_to_vec(&pollster::block_on(gpu.read(&out, ops::TopK::OUT_BYTES)).unwrap());
        let got = ops::Candidates::from_words(&words, k);
        let (want, max, exp_sum) = reference::top_k(&values, k, temperature);
        assert_eq!(got.tokens, want, "k={k}");
        assert_eq!(got.max, max);
        assert!((got.exp_sum - exp_sum).abs() <= 1e-5 * exp_sum, "k={k}: sum {} vs {}", got.exp_sum, exp_sum);
    }
}

const BLOCK_FORMATS: [DType; 5] = [DType::Q4_0, DType::Q4_1, DType::Q8_0, DType::Q4K, DType::Q6K];

#[test]
fn block_formats_decode_in_every_matmul_strategy_and_the_gather() {
    let Some(whole) = gpu() else { return };
    // 37 rows: a part ends on an odd row; k = 96 gives 54-byte q4_0 rows that straddle u32 words.
    let shapes = [(37, 512), (37, 96)];
    for dtype in BLOCK_FORMATS {
        for (rows, k) in shapes {
            if k % dtype.block().0 != 0 {
                continue;
            }
            let row_bytes = dtype.row_bytes(k).unwrap();
            // The split device binds 3 tokens of activations, and a dozen rows or more per part.
            let limit = (row_bytes * 12).max(3 * k * 4).next_multiple_of(4) as u64;
            let Some(split) = gpu_with(&GpuOptions { max_storage_binding: Some(limit), ..Default::default() }) else { return };
            for (gpu, token_counts) in [(&whole, [1, 9]), (&split, [1, 3])] {
                let (bytes, w) = weights(gpu, 21, dtype, rows, k);
                assert!(std::ptr::eq(gpu, &whole) || w.parts.len() > 1, "{dtype} {rows}x{k} was not split");
                for n in token_counts {
                    let x = random_vec(&mut rng(n as u64 + 100), n * k, 1.0);
                    let want = reference::matmul(&x, &bytes, dtype, rows, k);
                    let (xb, out) = (gpu.storage_buffer_with("x", &x), gpu.storage_buffer("out", (n * rows * 4) as u64));
                    let layout = MatmulLayout { in_stride: k, out_stride: rows, accumulate: false, rows_at_position: false };
                    let op = ops::matmul(gpu, &xb, &w, &out, layout, &step(gpu, n, 0));
                    run(gpu, |pass| op.encode(pass, n as u32));
                    let what = format!("{dtype} matmul {rows}x{k} n={n} parts={}", w.parts.len());
                    assert_close(&what, &read_f32(gpu, &out, want.len()), &want, 1e-4, 1e-4);
                }
                let tokens = [36u32, 0, 13]; // rows in different parts
                let ids: Vec<f32> = tokens.iter().map(|&t| t as f32).collect();
                let (tb, out) = (gpu.storage_buffer_with("tokens", &ids), gpu.storage_buffer("out", (tokens.len() * k * 4) as u64));
                let op = ops::embedding(gpu, &tb, &w, &out, &step(gpu, tokens.len(), 0));
                run(gpu, |pass| op.encode(pass, tokens.len() as u32));
                let want = reference::embedding(&tokens, &bytes, dtype, k);
                assert_close(&format!("{dtype} gather {rows}x{k} parts={}", w.parts.len()), &read_f32(gpu, &out, want.len()), &want, 0.0, 0.0);
            }
        }
    }
}

#[test]
fn fill_matches_reference_and_decodes_to_finite_weights() {
    let Some(gpu) = gpu() else { return };
    let buffer = gpu.storage_buffer("w", 4 * 10_007);
    let op = ops::fill(&gpu, &buffer, 42);
    run(&gpu, |pass| op.encode(pass, 1));
    let words: Vec<u32> = bytemuck::pod_collect_to_vec(&pollster::block_on(gpu.read(&buffer, 4 * 10_007)).unwrap());
    let want: Vec<u32> = (0..10_007).map(|i| reference::fill_word(i, 42)).collect();
    assert_eq!(words, want);
    let bytes: Vec<u8> = bytemuck::cast_slice(&words).to_vec();
    for dtype in [DType::F16, DType::BF16, DType::Q4_0, DType::Q8_0, DType::Q4K, DType::Q6K] {
        let whole = bytes.len() / dtype.block().1 * dtype.block().1;
        assert!(dtype.to_f32(&bytes[..whole]).unwrap().iter().all(|v| v.is_finite()), "{dtype}");
    }
}

#[test]
fn the_load_time_self_test_passes_on_this_adapter() {
    let Some(gpu) = gpu() else { return };
    pollster::block_on(llama_webgpu::gpu::self_test(&gpu)).unwrap();
}
