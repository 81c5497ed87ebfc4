//! Each WGSL kernel against its CPU reference (llama_webgpu::reference) on seeded random inputs at
//! odd sizes, for every weight format, with weights split over several buffers.

mod common;

use common::{assert_close, coop_matrix_gpu, exact, gpu, gpu_with, has_feature, random_vec, random_weight_bytes, rng};
use llama_webgpu::gpu::ops::{self, AttentionHeads, AttentionPass, InputFormat, MatmulInput, MatmulLayout, MatmulOutput, Rotary, StepParams, Strategy, TokenSlot};
use llama_webgpu::model::PAGE_SIZE;
use llama_webgpu::gpu::{quantize_q8_block, KvType, TileType, WeightMatrix, Q8_BLOCK};
use llama_webgpu::quant::DType;
use llama_webgpu::{reference, Gpu, GpuOptions};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn step(gpu: &Gpu, n_tokens: usize, start_pos: usize) -> wgpu::Buffer {
    ops::step_buffer(gpu, StepParams::new(n_tokens as u32, start_pos as u32, ops::MAX_KEY_SPLITS))
}

fn read_f32(gpu: &Gpu, buffer: &wgpu::Buffer, n: usize) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(&pollster::block_on(gpu.read(buffer, 4 * n as u64)).unwrap())
}

fn run(gpu: &Gpu, encode: impl FnOnce(&mut wgpu::ComputePass)) {
    pollster::block_on(gpu.run(encode)).unwrap();
}

/// Random weights rounded to `dtype`, as stored bytes, uploaded as a matrix.
fn weights(gpu: &Gpu, seed: u64, dtype: DType, rows: usize, cols: usize) -> (Vec<u8>, WeightMatrix) {
    let bytes = random_weight_bytes(dtype, &mut rng(seed), rows * cols);
    let matrix = WeightMatrix::new(gpu, "w", dtype, rows, cols).unwrap();
    matrix.write_rows(gpu, 0, &bytes);
    (bytes, matrix)
}

/// A device whose binding limit splits a (rows, cols) f32 matrix into about `parts` buffers.
fn splitting_gpu(rows: usize, cols: usize, parts: usize, bounds_checks: bool) -> Option<Gpu> {
    let bytes = (rows * cols * 4).div_ceil(parts).next_multiple_of(256) as u64;
    gpu_with(&GpuOptions { max_storage_binding: Some(bytes), bounds_checks, gemv_max_tokens: Some(GEMV_MAX_TOKENS), ..exact() })
}

/// A device that keeps naga's bounds checks in every kernel, or drops them where kernels are in
/// bounds by construction (the default on native): matmul tests run both ways, so an index past a
/// buffer would show as a difference (or a fault) between the two.
fn checked_gpu(bounds_checks: bool) -> Option<Gpu> {
    gpu_with(&GpuOptions { bounds_checks, gemv_max_tokens: Some(GEMV_MAX_TOKENS), ..exact() })
}

/// The most tokens the tests' devices run as GEMVs, so that their token counts cover each strategy.
const GEMV_MAX_TOKENS: u32 = 8;

/// The prefill matmul's register tiles, 4x4 (the default) and 8x8, with and without bounds checks.
const TILED_FORMS: [(u32, bool); 4] = [(4, false), (4, true), (8, false), (8, true)];

#[test]
fn matmul_runs_without_bounds_checks_by_default() {
    let Some(gpu) = gpu() else { return };
    assert!(!gpu.bounds_checks && llama_webgpu::gpu::KERNELS.iter().any(|k| k.name == "matmul" && k.in_bounds));
}

#[test]
fn embedding_matches_reference_in_every_format_and_split() {
    let (vocab, dim) = (97, 18);
    let Some(gpu) = splitting_gpu(vocab, dim, 3, false) else { return };
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

/// A stacked q/k/v projection with rotary output: q rotated into out, k rotated into the K cache
/// and v copied into the V cache at each token's position, the rest of the caches as they were.
/// GEMVs of one token and of 8 per workgroup (rows per workgroup forced to 1, which rotary output
/// raises to 2, and 4) and tiles (4x4 and 8x8 register tiles), with q/k and v in blocks of
/// different formats, split by the binding limit into parts of whole heads.
#[test]
fn rotary_output_rotates_q_and_writes_k_and_v_to_the_cache() {
    // head_dim 10: an odd number of rotation pairs per head.
    let (n_heads, n_kv_heads, head_dim, k): (usize, usize, usize, usize) = (6, 2, 10, 256);
    let (q_dim, kv_dim) = (n_heads * head_dim, n_kv_heads * head_dim);
    let (qk_rows, qkv_dim) = (q_dim + kv_dim, q_dim + 2 * kv_dim);
    let binding = (qk_rows * k * 4).div_ceil(3).next_multiple_of(256) as u64;
    // The tiles on cooperative matrices round to f16 (f16_tiles_within_rounding has the bound); an
    // f16 KV pool holds the f32 results rounded to f16. Past position 100,000, Llama 3.1's table
    // (llama3 scaling): Llama 3.1's long context.
    // Staged: k and v to row t of f32 staging rows, which kv_store moves into the pool.
    let cases = [
        (1, 4, false, KvType::F32, false, 29),
        (4, 8, false, KvType::F32, false, 29),
        (4, 4, true, KvType::F32, false, 29),
        (1, 8, false, KvType::F16, false, 29),
        (4, 4, false, KvType::F32, false, 100_000),
        (2, 4, false, KvType::F32, true, 29),
    ];
    for (gemv_rows, register_tile, coop_matrix, kv_type, staged, start_pos) in cases {
        let context = start_pos + 11;
        let cos_sin: Vec<[f32; 2]> = if start_pos < 1000 {
            (0..context * head_dim / 2).map(|i| [(i as f32 * 0.37).cos(), (i as f32 * 0.37).sin()]).collect()
        } else {
            llama_webgpu::Config { head_dim, ..llama_webgpu::bench::synthetic_config("llama3.1-8b").unwrap() }.rope_cos_sin(context)
        };
        // 1 token: one GEMV; 3 and 9: GEMVs of 8 tokens (9: a second workgroup of one); 11: tiles.
        let gemv_max_tokens = Some(10);
        let options = GpuOptions {
            gemv_rows: Some(gemv_rows),
            gemv_max_tokens,
            register_tile: Some(register_tile),
            // Deep, the table and the cache pass the small binding limit that splits the weights.
            max_storage_binding: (start_pos < 1000).then_some(binding),
            no_coop_matrix: !coop_matrix,
            ..Default::default()
        };
        if kv_type == KvType::F16 && !gpu().is_some_and(|gpu| has_feature(&gpu, gpu.features.contains(wgpu::Features::SHADER_F16), "shader-f16")) {
            continue;
        }
        let options = GpuOptions { kv_type: Some(kv_type), ..options };
        let Some(gpu) = (if coop_matrix { coop_matrix_gpu(&options) } else { gpu_with(&options) }) else { continue };
        let tolerance = if coop_matrix { 2e-2 } else { 1e-4 };
        let cache_tolerance = if kv_type == KvType::F16 { 1e-3 } else { tolerance };
        let table = gpu.storage_buffer_with("cos_sin", &cos_sin);
        for (qk_dtype, v_dtype) in [(DType::F32, DType::Q4_0), (DType::Q4K, DType::F16)] {
            let block = |seed, dtype, rows| {
                let bytes = random_weight_bytes(dtype, &mut rng(seed), rows * k);
                let matrix = WeightMatrix::in_parts_of(&gpu, "qkv", dtype, rows, k, head_dim).unwrap();
                matrix.write_rows(&gpu, 0, &bytes);
                (bytes, matrix)
            };
            let (qk_bytes, qk) = block(61, qk_dtype, qk_rows);
            let (v_bytes, v) = block(62, v_dtype, kv_dim);
            if qk_dtype == DType::F32 && start_pos < 1000 {
                assert!(qk.parts.len() >= 3 && qk.parts.iter().all(|p| p.rows % head_dim == 0), "parts of whole heads expected");
            }
            for n in [1, 3, 9, 11] {
                let x = random_vec(&mut rng(n as u64 + 63), n * k, 1.0);
                let xb = gpu.storage_buffer_with("x", &x);
                let out = gpu.storage_buffer("out", (n * qkv_dim * 4) as u64);
                let (k_cache, v_cache) = (gpu.kv_type.rounded(&random_vec(&mut rng(64), context * kv_dim, 1.0)), gpu.kv_type.rounded(&random_vec(&mut rng(65), context * kv_dim, 1.0)));
                let caches = [&k_cache, &v_cache].map(|c| gpu.kv_buffer_with("cache", c, kv_dim));
                let rotary = Rotary { cos_sin: &table, k_cache: &caches[0], v_cache: &caches[1], staged, heads: AttentionHeads { n_heads, n_kv_heads, head_dim } };
                let op = ops::ByTokens::join([(0, &qk), (qk_rows, &v)].map(|(column, w)| {
                    let layout = MatmulLayout { in_stride: k, out_stride: qkv_dim, out_offset: column, accumulate: false };
                    ops::matmul(&gpu, ops::Product { x: &xb, input: MatmulInput::Plain, w, out: &out, output: MatmulOutput::Rotary(rotary), layout, step: &step(&gpu, n, start_pos), prepared: None })
                }));
                run(&gpu, |pass| op.for_tokens(n as u32).encode(pass, n as u32));

                let (qk_out, v_out) = (reference::matmul(&x, &qk_bytes, qk_dtype, qk_rows, k), reference::matmul(&x, &v_bytes, v_dtype, kv_dim, k));
                let positions: Vec<usize> = (start_pos..start_pos + n).collect();
                let mut want_q: Vec<f32> = qk_out.chunks(qk_rows).flat_map(|row| row[..q_dim].to_vec()).collect();
                reference::rope(&mut want_q, &positions, &cos_sin, n_heads, head_dim, q_dim);
                let (mut want_k, mut want_v) = (k_cache.clone(), v_cache.clone());
                let first_row = if staged { 0 } else { start_pos };
                for t in 0..n {
                    want_k[(first_row + t) * kv_dim..][..kv_dim].copy_from_slice(&qk_out[t * qk_rows + q_dim..][..kv_dim]);
                    want_v[(first_row + t) * kv_dim..][..kv_dim].copy_from_slice(&v_out[t * kv_dim..][..kv_dim]);
                }
                reference::rope(&mut want_k[first_row * kv_dim..][..n * kv_dim], &positions, &cos_sin, n_kv_heads, head_dim, kv_dim);
                let got = read_f32(&gpu, &out, n * qkv_dim);
                let got_q: Vec<f32> = got.chunks(qkv_dim).flat_map(|row| row[..q_dim].to_vec()).collect();
                let what = format!("{qk_dtype} q/k, {v_dtype} v, n={n} at {start_pos}, {gemv_rows} GEMV rows asked, register tile {register_tile}, cooperative matrices {coop_matrix}");
                assert_close(&format!("rotated q, {what}"), &got_q, &want_q, tolerance, tolerance);
                let what = format!("{what}, {kv_type:?} KV, staged {staged}");
                assert_close(&format!("k cache, {what}"), &read_kv(&gpu, &caches[0], want_k.len(), kv_dim), &want_k, cache_tolerance, cache_tolerance);
                assert_close(&format!("v cache, {what}"), &read_kv(&gpu, &caches[1], want_v.len(), kv_dim), &want_v, cache_tolerance, cache_tolerance);
            }
        }
    }
}

#[test]
fn matmul_matches_reference_in_every_format_strategy_and_split() {
    for bounds_checks in [false, true] {
        matmul_in_every_format_strategy_and_split(bounds_checks);
    }
}

fn matmul_in_every_format_strategy_and_split(bounds_checks: bool) {
    let (rows, k) = (67, 46);
    // 1 token runs as one GEMV, 3 as GEMVs of 8 tokens, 9 and 37 as tiles; the split device binds
    // only up to 9 tokens.
    let Some(split) = splitting_gpu(rows, k, 3, bounds_checks) else { return };
    let Some(whole) = checked_gpu(bounds_checks) else { return };
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
                let layout = MatmulLayout { in_stride: k, out_stride: rows, out_offset: 0, accumulate: false };
                let op = ops::matmul(gpu, ops::Product { x: &xb, input: MatmulInput::Plain, w: &w, out: &out, output: MatmulOutput::Rows, layout, step: &step(gpu, n, 0), prepared: None });
                run(gpu, |pass| op.encode(pass, n as u32));
                let what = format!("matmul {dtype} n={n} parts={}", w.parts.len());
                assert_close(&what, &read_f32(gpu, &out, want.len()), &want, 1e-5, 1e-5);
            }
        }
    }
}

#[test]
fn matmul_fuses_rmsnorm_and_silu_mul_into_its_input() {
    for (register_tile, bounds_checks) in TILED_FORMS {
        // 1 token runs as one GEMV, 3 as GEMVs of 8 tokens, 9 and 37 as tiles (37: a partial tile
        // of tokens); 70 rows leave the second tile of rows part-filled.
        let options = GpuOptions { bounds_checks, register_tile: Some(register_tile), gemv_max_tokens: Some(GEMV_MAX_TOKENS), ..exact() };
        let Some(gpu) = gpu_with(&options) else { return };
        for dtype in [DType::F32, DType::Q4_0, DType::Q4_1, DType::Q8_0, DType::Q4K, DType::Q6K] {
            let tokens: &[usize] = if register_tile == 4 { &[1, 3, 9, 37] } else { &[9, 37] };
            matmul_of_every_input(&gpu, dtype, 70, 256, tokens, &format!("register tile {register_tile}, bounds checks {bounds_checks}"));
        }
    }
}

/// The decode GEMVs of one token and of 8 per workgroup in both reductions (subgroups where the
/// adapter has them, and workgroup memory) at 1, 2 and 4 rows per workgroup, with every fused
/// input, with and without bounds checks.
#[test]
fn gemv_matches_reference_in_both_reductions_and_every_rows_per_workgroup() {
    let Some(probe) = gpu() else { return };
    let subgroup_forms = if has_feature(&probe, probe.subgroups, "subgroups") { vec![true, false] } else { vec![false] };
    for (subgroups, bounds_checks) in subgroup_forms.into_iter().flat_map(|s| [(s, false), (s, true)]) {
        for gemv_rows in [1, 2, 4] {
            let options = GpuOptions { no_subgroups: !subgroups, gemv_rows: Some(gemv_rows), gemv_max_tokens: Some(16), bounds_checks, ..exact() };
            let Some(gpu) = gpu_with(&options) else { return };
            assert_eq!(gpu.subgroups, subgroups);
            // 37 rows leave the last workgroup part-filled at 2 and 4 rows per workgroup, 3 rows
            // one short at 4; k = 2304 (288 block quarters, 144 super-block pieces) ends in a
            // step that only some threads share, k = 768 (96 quarters, 48 pieces) leaves some
            // threads a lone quarter or nothing.
            for (rows, k) in [(37, 2304), (3, 768)] {
                for dtype in [DType::F32].into_iter().chain(gemv_formats(gemv_rows == 4 && !bounds_checks)) {
                    let what = format!("{gemv_rows} rows per workgroup, subgroups {subgroups}, bounds checks {bounds_checks}");
                    // 3 tokens: one workgroup of 8 columns, 5 past the pass; 11: a full one and a
                    // partial one.
                    let tokens: &[usize] = if gemv_rows == 4 { &[1, 3, 11] } else { &[1, 3] };
                    matmul_of_every_input(&gpu, dtype, rows, k, tokens, &what);
                }
            }
        }
    }
}

/// quantize.wgsl's to_f16 (the inputs of the tiles on cooperative matrices): every value of the
/// plain, RMSNorm-ed and SiLU-gated input rows as the CPU rounds it to f16, within one f16 step
/// (a value on a rounding boundary may go either way after the input stage's f32 arithmetic).
#[test]
fn to_f16_prepares_every_input_as_the_cpu_rounds_it() {
    let Some(gpu) = gpu() else { return };
    let (n, k) = (3, 2304);
    let norm = random_vec(&mut rng(73), k, 2.0);
    let norm_buffer = gpu.storage_buffer_with("norm", &norm);
    let (xb, cases) = fused_inputs(&gpu, n, k, 74, &norm, &norm_buffer);
    for (input_name, input, input_rows) in cases {
        let prepared = ops::PreparedInputs::new(&gpu, InputFormat::F16, n, k);
        let op = ops::prepare_input(&gpu, &xb, input, k, 2 * k, &prepared, &step(&gpu, n, 0));
        run(&gpu, |pass| op.encode(pass, n as u32));
        let bytes = pollster::block_on(gpu.read(prepared.buffer(), (n * k * 2) as u64)).unwrap();
        let got: Vec<f32> = bytes.chunks(2).map(|h| half::f16::from_le_bytes([h[0], h[1]]).to_f32()).collect();
        for (i, (&g, &x)) in got.iter().zip(&input_rows).enumerate() {
            let want = half::f16::from_f32(x).to_f32();
            let step = (x.abs() * 2f32.powi(-10)).max(2f32.powi(-24));
            assert!((g - want).abs() <= step, "{input_name}: value {i} is {g} but {x} rounds to {want}");
        }
    }
}

/// Token rows of quantize.wgsl's output, read back.
struct Q8Rows {
    quants: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<f32>,
}

impl Q8Rows {
    fn read(gpu: &Gpu, buffer: &wgpu::Buffer, n: usize, k: usize) -> Self {
        let words: Vec<u32> = bytemuck::pod_collect_to_vec(&pollster::block_on(gpu.read(buffer, (4 * n * ops::q8_row_words(k)) as u64)).unwrap());
        let blocks = k / Q8_BLOCK;
        let mut rows = Q8Rows { quants: vec![], scales: vec![], sums: vec![] };
        for row in words.chunks(ops::q8_row_words(k)) {
            rows.quants.extend(row[..k / 4].iter().flat_map(|w| w.to_le_bytes().map(|b| b as i8)));
            rows.scales.extend(row[k / 4..][..blocks].iter().map(|w| f32::from_bits(*w)));
            rows.sums.extend(row[k / 4 + blocks..][..blocks].iter().map(|w| f32::from_bits(*w)));
        }
        rows
    }

    /// The values the quants and scales stand for.
    fn values(&self) -> Vec<f32> {
        self.quants.iter().enumerate().map(|(i, &q)| q as f32 * self.scales[i / Q8_BLOCK]).collect()
    }
}

/// quantize.wgsl against the CPU's rounding (quantize_q8_block) for every fused input: scales
/// within f32 rounding, each value within one step of the CPU's (a value on a rounding boundary
/// may go either way after the input stage's f32 arithmetic) and almost all equal, and each
/// block's sum that of its own values. k = 2304: 72 blocks, a second workgroup part-filled.
#[test]
fn quantize_rounds_every_input_to_q8_as_the_cpu_does() {
    let Some(gpu) = gpu() else { return };
    let (n, k) = (3, 2304);
    let norm = random_vec(&mut rng(71), k, 2.0);
    let norm_buffer = gpu.storage_buffer_with("norm", &norm);
    let (xb, cases) = fused_inputs(&gpu, n, k, 72, &norm, &norm_buffer);
    for (input_name, input, input_rows) in cases {
        let x_q8 = ops::PreparedInputs::new(&gpu, ops::InputFormat::Q8, n, k);
        let op = ops::prepare_input(&gpu, &xb, input, k, 2 * k, &x_q8, &step(&gpu, n, 0));
        run(&gpu, |pass| op.encode(pass, n as u32));
        let got = Q8Rows::read(&gpu, x_q8.buffer(), n, k);
        let mut differing = 0;
        for (b, block) in input_rows.chunks(Q8_BLOCK).enumerate() {
            let (scale, quants) = quantize_q8_block(block);
            assert!((got.scales[b] - scale).abs() <= 1e-6 * scale, "{input_name}: block {b}'s scale is {} but should be {scale}", got.scales[b]);
            let got_quants = &got.quants[b * Q8_BLOCK..][..Q8_BLOCK];
            for (i, (&g, &w)) in got_quants.iter().zip(&quants).enumerate() {
                assert!((g as i32 - w as i32).abs() <= 1, "{input_name}: value {i} of block {b} is {g} but should be {w}");
                differing += (g != w) as usize;
            }
            let sum: i32 = got_quants.iter().map(|&q| q as i32).sum();
            assert_eq!(got.sums[b], got.scales[b] * sum as f32, "{input_name}: block {b}'s sum");
        }
        assert!(differing * 1000 <= input_rows.len(), "{input_name}: {differing} of {} values rounded otherwise than on the CPU", input_rows.len());
    }
}

/// matmul.wgsl's block GEMVs (q4_0, q4_1, q8_0; q4_k, q6_k) and the tiles on q8 inputs against the CPU's product of the weights with the values quantize.wgsl gave (read
/// back): the GEMVs' products are exact integers, so only the order of the f32 sums differs. Both
/// reductions, 1, 2 and 4 rows per workgroup, every fused input, one token, GEMVs of 8 (a partial
/// workgroup and one past the pass) and 37 tokens as tiles, the sizes of
/// gemv_matches_reference_in_both_reductions_and_every_rows_per_workgroup.
#[test]
fn matmul_on_q8_inputs_matches_the_reference_on_those_inputs() {
    let Some(probe) = gpu() else { return };
    let subgroup_forms = if has_feature(&probe, probe.subgroups, "subgroups") { vec![true, false] } else { vec![false] };
    for subgroups in subgroup_forms {
        for gemv_rows in [1, 2, 4] {
            let bounds_checks = gemv_rows == 2;
            let options = GpuOptions { no_subgroups: !subgroups, gemv_rows: Some(gemv_rows), gemv_max_tokens: Some(16), bounds_checks, q8_activations: true, ..exact() };
            let Some(gpu) = gpu_with(&options) else { return };
            for (rows, k) in [(37, 2304), (3, 768)] {
                let norm = random_vec(&mut rng(52), k, 2.0);
                let norm_buffer = gpu.storage_buffer_with("norm", &norm);
                for dtype in gemv_formats(gemv_rows == 4) {
                    let (bytes, w) = weights(&gpu, 51, dtype, rows, k);
                    let tokens: &[usize] = if gemv_rows == 2 { &[1, 3, 11, 37] } else { &[1, 3, 11] };
                    for &n in tokens {
                        let (xb, cases) = fused_inputs(&gpu, n, k, n as u64 + 53, &norm, &norm_buffer);
                        for (input_name, input, _) in cases {
                            let x_q8 = ops::PreparedInputs::new(&gpu, ops::InputFormat::Q8, n, k);
                            let out = gpu.storage_buffer("out", (n * rows * 4) as u64);
                            let layout = MatmulLayout { in_stride: 2 * k, out_stride: rows, out_offset: 0, accumulate: false };
                            let step = step(&gpu, n, 0);
                            let op = ops::matmul(&gpu, ops::Product { x: &xb, input, w: &w, out: &out, output: MatmulOutput::Rows, layout, step: &step, prepared: Some(&x_q8) })
                                .after(&x_q8, ops::prepare_input(&gpu, &xb, input, k, layout.in_stride, &x_q8, &step));
                            run(&gpu, |pass| op.encode(pass, n as u32));
                            let values = Q8Rows::read(&gpu, x_q8.buffer(), n, k).values();
                            let want = reference::matmul(&values, &bytes, dtype, rows, k);
                            // f32 sums of 2304 products in another order: within 1e-5 of the sum
                            // of their magnitudes (the rounding is about 1e-7 per add).
                            let abs_x: Vec<f32> = values.iter().map(|v| v.abs()).collect();
                            let abs_w: Vec<f32> = dtype.to_f32(&bytes).unwrap().iter().map(|v| v.abs()).collect();
                            let magnitude = reference::matmul(&abs_x, &DType::F32.from_f32(&abs_w).unwrap(), DType::F32, rows, k);
                            let got = read_f32(&gpu, &out, want.len());
                            let what = format!("{dtype} matmul on q8 inputs {rows}x{k} of {input_name}, n={n}, {gemv_rows} rows per workgroup, subgroups {subgroups}, bounds checks {bounds_checks}");
                            for i in 0..want.len() {
                                assert!((got[i] - want[i]).abs() <= 1e-5 * magnitude[i] + 1e-6, "{what}: element {i} is {} but should be {} (|products| {})", got[i], want[i], magnitude[i]);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A fused input's name, the input, and the k inputs per token it gives on the CPU.
type FusedInput<'a> = (&'static str, MatmulInput<'a>, Vec<f32>);

/// `n` token rows of 2k random values (seeded by `seed`), uploaded: the gate, then the up half that
/// SiLU-mul reads (the other inputs read only the first k). With them, each fused input over
/// those rows (RMSNorm with `norm`, uploaded as `norm_buffer`).
fn fused_inputs<'a>(gpu: &Gpu, n: usize, k: usize, seed: u64, norm: &[f32], norm_buffer: &'a wgpu::Buffer) -> (wgpu::Buffer, [FusedInput<'a>; 3]) {
    let x = random_vec(&mut rng(seed), n * 2 * k, 3.0);
    let gate: Vec<f32> = x.chunks(k).step_by(2).flatten().copied().collect();
    let up: Vec<f32> = x.chunks(k).skip(1).step_by(2).flatten().copied().collect();
    let cases = [
        ("plain", MatmulInput::Plain, gate.clone()),
        ("rmsnorm", MatmulInput::RmsNorm { weight: norm_buffer, eps: 1e-5 }, reference::rmsnorm(&gate, norm, 1e-5)),
        ("silu_mul", MatmulInput::SiluMul, reference::silu_mul(&gate, &up)),
    ];
    (gpu.storage_buffer_with("x", &x), cases)
}

/// `token_counts` tokens of plain, RMSNorm-ed and SiLU-gated inputs through a (rows, k) matrix
/// against the CPU reference.
fn matmul_of_every_input(gpu: &Gpu, dtype: DType, rows: usize, k: usize, token_counts: &[usize], what: &str) {
    let (bytes, w) = weights(gpu, 51, dtype, rows, k);
    let norm = random_vec(&mut rng(52), k, 2.0);
    let norm_buffer = gpu.storage_buffer_with("norm", &norm);
    for &n in token_counts {
        let (xb, cases) = fused_inputs(gpu, n, k, n as u64 + 53, &norm, &norm_buffer);
        for (input_name, input, input_rows) in cases {
            let want = reference::matmul(&input_rows, &bytes, dtype, rows, k);
            let out = gpu.storage_buffer("out", (n * rows * 4) as u64);
            let layout = MatmulLayout { in_stride: 2 * k, out_stride: rows, out_offset: 0, accumulate: false };
            let op = ops::matmul(gpu, ops::Product { x: &xb, input, w: &w, out: &out, output: MatmulOutput::Rows, layout, step: &step(gpu, n, 0), prepared: None });
            run(gpu, |pass| op.encode(pass, n as u32));
            let label = format!("{dtype} matmul {rows}x{k} of {input_name}, n={n}, {what}");
            assert_close(&label, &read_f32(gpu, &out, want.len()), &want, 1e-4, 1e-4);
        }
    }
}

#[test]
fn gemv_rows_per_workgroup_fill_a_large_gpu_where_rows_allow() {
    // Llama 3.1-8B: q/k/v 6144 rows, o and down 4096, gate/up 28672, lm_head 128256; 3.2-1B: q/k/v
    // 3072, o and down 2048, gate/up 16384; SmolLM2: q/k/v 960.
    let shapes = [6144, 4096, 28672, 128256, 3072, 2048, 16384, 960];
    let chosen = |device| shapes.iter().map(|&rows| ops::gemv_rows(rows, device, None, false)).collect::<Vec<u32>>();
    assert_eq!(chosen(wgpu::DeviceType::DiscreteGpu), [2, 2, 4, 4, 1, 1, 4, 1]);
    assert_eq!(chosen(wgpu::DeviceType::Other), [2, 2, 4, 4, 1, 1, 4, 1]); // a GPU in a browser
    // A CPU has no latency to hide with more workgroups.
    assert_eq!(chosen(wgpu::DeviceType::Cpu), [4; 8]);
    assert_eq!(ops::gemv_rows(28672, wgpu::DeviceType::DiscreteGpu, Some(1), false), 1);
    // Rotary output takes rows in pairs.
    assert_eq!(ops::gemv_rows(3072, wgpu::DeviceType::DiscreteGpu, None, true), 2);
    assert_eq!(ops::gemv_rows(6144, wgpu::DeviceType::DiscreteGpu, Some(1), true), 2);
}

#[test]
fn tuning_options_out_of_range_are_an_error() {
    use llama_webgpu::gpu::GpuError::InvalidOption;
    let error = |options: GpuOptions| pollster::block_on(Gpu::new(&options)).err();
    let e = error(GpuOptions { gemv_rows: Some(3), ..exact() });
    assert!(matches!(e, Some(InvalidOption { name: "gemv_rows", value: 3, .. })), "{e:?}");
    let e = error(GpuOptions { register_tile: Some(6), ..exact() });
    assert!(matches!(e, Some(InvalidOption { name: "register_tile", value: 6, .. })), "{e:?}");
    for tokens in [0, ops::MAX_BATCH_TOKENS as u32 + 1] {
        let e = error(GpuOptions { gemv_max_tokens: Some(tokens), ..exact() });
        assert!(matches!(e, Some(InvalidOption { name: "gemv_max_tokens", value, .. }) if value == tokens), "{e:?}");
    }
    for splits in [0, 257] {
        let e = error(GpuOptions { max_key_splits: Some(splits), ..exact() });
        assert!(matches!(e, Some(InvalidOption { name: "max_key_splits", value, .. }) if value == splits), "{e:?}");
    }
    let e = error(GpuOptions { coop_tile: Some(96), ..exact() });
    assert!(matches!(e, Some(InvalidOption { name: "coop_tile", value: 96, .. })), "{e:?}");
}

/// A device staging prefill tiles as f16 with the given register tile, or None (reported) where the
/// adapter lacks shader-f16.
fn f16_tile_gpu(register_tile: u32) -> Option<Gpu> {
    let gpu = gpu_with(&GpuOptions { f16_tiles: true, register_tile: Some(register_tile), ..exact() })?;
    if !has_feature(&gpu, gpu.features.contains(wgpu::Features::SHADER_F16), "shader-f16") {
        return None;
    }
    assert_eq!(gpu.tile_type, TileType::F16);
    Some(gpu)
}

#[test]
fn tiled_matmul_with_f16_tiles_stays_within_f16_rounding_of_the_reference() {
    for register_tile in [4, 8] {
        let Some(gpu) = f16_tile_gpu(register_tile) else { return };
        f16_tiles_within_rounding(&gpu, &format!("f16 tiles ({register_tile}x{register_tile} register tile)"), 45, &[9, 37]);
    }
}

/// matmul.wgsl's tiled_coop in tiles of 64 and 128: partial tiles of tokens and rows, every fused
/// input. 140 rows and 133 tokens pass a whole tile of 128, so that every fragment of a subgroup
/// (of 16 on NVIDIA, 8 on lavapipe) holds some of the sums.
#[test]
fn tiled_matmul_on_cooperative_matrices_stays_within_f16_rounding_of_the_reference() {
    for side in [64, 128] {
        let Some(gpu) = coop_matrix_gpu(&GpuOptions { gemv_max_tokens: Some(GEMV_MAX_TOKENS), coop_tile: Some(side), ..Default::default() }) else { return };
        f16_tiles_within_rounding(&gpu, &format!("cooperative matrices in tiles of {side}"), 140, &[9, 37, 133]);
    }
}

/// A product takes large tiles on cooperative matrices from the pass that makes
/// LARGE_COOP_TILE_WORKGROUPS of them (each part of a split matrix counted on its own), unless a
/// tile is forced.
#[test]
fn products_take_large_tiles_on_cooperative_matrices_where_a_pass_makes_enough_of_them() {
    let Some(gpu) = coop_matrix_gpu(&GpuOptions::default()) else { return };
    let k = 32;
    let strategy = |gpu: &Gpu, w: &WeightMatrix, n: u32| {
        let (x, out) = (gpu.storage_buffer("x", 4 * k as u64 * 512), gpu.storage_buffer("out", 4 * w.rows as u64 * 512));
        let layout = MatmulLayout { in_stride: k, out_stride: w.rows, out_offset: 0, accumulate: false };
        ops::matmul(gpu, ops::Product { x: &x, input: MatmulInput::Plain, w, out: &out, output: MatmulOutput::Rows, layout, step: &step(gpu, 1, 0), prepared: None }).strategy(n)
    };
    // 256 row tiles of 128: two token tiles make 512.
    let rows = 256 * 128;
    let w = WeightMatrix::new(&gpu, "w", DType::Q4_0, rows, k).unwrap();
    let gemv_max = gpu.gemv_max_tokens;
    let want = [(1, Strategy::Gemv), (gemv_max, Strategy::GemvColumns), (gemv_max + 1, Strategy::Tiles), (128, Strategy::Tiles), (129, Strategy::LargeTiles), (512, Strategy::LargeTiles)];
    for (n, strategy_wanted) in want {
        assert_eq!(strategy(&gpu, &w, n), strategy_wanted, "{n} tokens of {rows} rows");
    }
    // Half the rows: four token tiles.
    let half = WeightMatrix::new(&gpu, "w", DType::Q4_0, rows / 2, k).unwrap();
    assert_eq!((strategy(&gpu, &half, 384), strategy(&gpu, &half, 385)), (Strategy::Tiles, Strategy::LargeTiles));
    // Forced either way.
    for (side, wanted) in [(64, Strategy::Tiles), (128, Strategy::LargeTiles)] {
        let Some(forced) = coop_matrix_gpu(&GpuOptions { coop_tile: Some(side), ..Default::default() }) else { return };
        let half = WeightMatrix::new(&forced, "w", DType::Q4_0, rows / 2, k).unwrap();
        assert_eq!((strategy(&forced, &half, gemv_max + 1), strategy(&forced, &half, 512)), (wanted, wanted), "tiles of {side} forced");
    }
}

/// The tiled products on `gpu` of `rows` rows and passes of `token_counts` tokens, against the CPU
/// reference within the rounding of f16 inputs and weights.
fn f16_tiles_within_rounding(gpu: &Gpu, what_path: &str, rows: usize, token_counts: &[usize]) {
    let k = 256;
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::Q4_0, DType::Q4_1, DType::Q8_0, DType::Q4K] {
        let (bytes, w) = weights(gpu, 41, dtype, rows, k);
        let norm = random_vec(&mut rng(42), k, 2.0);
        let norm_buffer = gpu.storage_buffer_with("norm", &norm);
        for &n in token_counts {
            let (xb, cases) = fused_inputs(gpu, n, k, n as u64 + 43, &norm, &norm_buffer);
            for (what, input, input_rows) in cases {
                let want = reference::matmul(&input_rows, &bytes, dtype, rows, k);
                // x and w rounded to f16: each product within 2 * 2^-11 (1e-3) of its value, so the
                // sum within 2e-3 of the sum of |products|.
                let abs_x: Vec<f32> = input_rows.iter().map(|v| v.abs()).collect();
                let abs_w: Vec<f32> = dtype.to_f32(&bytes).unwrap().iter().map(|v| v.abs()).collect();
                let magnitude = reference::matmul(&abs_x, &DType::F32.from_f32(&abs_w).unwrap(), DType::F32, rows, k);
                // On cooperative matrices the inputs are also read as to_f16 prepares them (the
                // model's way there): rounded to f16 once, INPUT applied.
                let formats: &[Option<InputFormat>] = if gpu.coop_matrix.is_some() { &[None, Some(InputFormat::F16)] } else { &[None] };
                for format in formats {
                    let out = gpu.storage_buffer("out", (n * rows * 4) as u64);
                    let layout = MatmulLayout { in_stride: 2 * k, out_stride: rows, out_offset: 0, accumulate: false };
                    let step = step(gpu, n, 0);
                    let prepared = format.map(|format| ops::PreparedInputs::new(gpu, format, n, k));
                    let mut op = ops::matmul(gpu, ops::Product { x: &xb, input, w: &w, out: &out, output: MatmulOutput::Rows, layout, step: &step, prepared: prepared.as_ref() });
                    if let Some(prepared) = &prepared {
                        op = op.after(prepared, ops::prepare_input(gpu, &xb, input, k, layout.in_stride, prepared, &step));
                    }
                    run(gpu, |pass| op.encode(pass, n as u32));
                    let got = read_f32(gpu, &out, want.len());
                    let (i, excess) = (0..want.len())
                        .map(|i| (i, (got[i] - want[i]).abs() - 2e-3 * magnitude[i]))
                        .fold((0, f32::NEG_INFINITY), |a, b| if b.1 > a.1 || b.1.is_nan() { b } else { a });
                    assert!(excess <= 0.0, "{dtype} {what_path} of {what}, n={n}, inputs {format:?}: element {i} is {} but should be {} (|products| {})", got[i], want[i], magnitude[i]);
                }
            }
        }
    }
}

#[test]
fn stacked_matmuls_accumulate_into_their_own_output_columns() {
    let (rows, k, n, stride) = (20, 30, 9, 50);
    let Some(gpu) = checked_gpu(false) else { return };
    let x = random_vec(&mut rng(4), n * k, 1.0);
    let xb = gpu.storage_buffer_with("x", &x);
    // Two matrices in different formats stacked at columns 3 and 23 of 50-wide output rows.
    let stacked = [(3, DType::BF16), (23, DType::F16)].map(|(column, dtype)| (column, dtype, weights(&gpu, column as u64, dtype, rows, k)));
    for n_run in [1, 3, n] {
        let initial = random_vec(&mut rng(5), n * stride, 1.0);
        let out = gpu.storage_buffer_with("out", &initial);
        let matmul = ops::ByTokens::join(stacked.iter().map(|(column, _, (_, w))| {
            let layout = MatmulLayout { in_stride: k, out_stride: stride, out_offset: *column, accumulate: true };
            ops::matmul(&gpu, ops::Product { x: &xb, input: MatmulInput::Plain, w, out: &out, output: MatmulOutput::Rows, layout, step: &step(&gpu, n_run, 0), prepared: None })
        }));
        run(&gpu, |pass| matmul.encode(pass, n_run as u32));
        let mut want = initial.clone();
        for (column, dtype, (bytes, _)) in &stacked {
            let product = reference::matmul(&x[..n_run * k], bytes, *dtype, rows, k);
            for (i, v) in product.iter().enumerate() {
                want[i / rows * stride + column + i % rows] += v;
            }
        }
        assert_close(&format!("stacked and accumulated, n={n_run}"), &read_f32(&gpu, &out, want.len()), &want, 1e-5, 1e-5);
    }
}

#[test]
fn attention_matches_reference_in_both_strategies() {
    for gpu in kv_type_gpus() {
        attention_matches_reference_on(&gpu);
    }
}

#[test]
fn attention_merges_key_splits_by_the_last_split_or_in_a_dispatch() {
    let Some(gpu) = gpu() else { return };
    // Native Vulkan merges in the last split, as lavapipe runs it; browsers and other backends
    // in a dispatch of their own, which the option forces here.
    assert_eq!(gpu.merge_in_last_split, gpu.info.backend == wgpu::Backend::Vulkan);
    let Some(separate) = gpu_with(&GpuOptions { separate_split_merge: true, ..exact() }) else { return };
    assert!(!separate.merge_in_last_split);
    attention_matches_reference_on(&separate);
}

/// Devices with each KV pool type this adapter has: f32, q8_0, and f16 where it has shader-f16.
fn kv_type_gpus() -> Vec<Gpu> {
    let Some(gpu) = gpu() else { return vec![] };
    let mut gpus = vec![];
    gpus.extend(gpu_with(&GpuOptions { kv_type: Some(KvType::Q8_0), ..exact() }));
    if has_feature(&gpu, gpu.features.contains(wgpu::Features::SHADER_F16), "shader-f16") {
        gpus.extend(gpu_with(&GpuOptions { kv_type: Some(KvType::F16), ..exact() }));
    }
    gpus.insert(0, gpu);
    gpus
}

/// The first `n` elements (rows of kv_dim) of a KV pool buffer of `gpu`'s type, as f32.
fn read_kv(gpu: &Gpu, buffer: &wgpu::Buffer, n: usize, kv_dim: usize) -> Vec<f32> {
    let bytes = gpu.kv_type.row_bytes(kv_dim) * (n / kv_dim) as u64;
    gpu.kv_type.decode(&pollster::block_on(gpu.read(buffer, bytes)).unwrap(), kv_dim)
}

fn attention_matches_reference_on(gpu: &Gpu) {
    // Below 8 tokens (decode) the keys are cut into splits merged after, from 8 on (prefill) one
    // split. head_dim 132 exercises several dimensions per thread and a 7-key tile; start_pos > 0 a
    // chunked prefill; GQA groups of 1, 3, 4 and 8 lay query blocks over several tokens or heads,
    // and 9, 13 and 37 tokens leave partial blocks. Decode: 8-key splits up to the cap (context
    // 71-75: 10 splits; 129: 17), a last split that some of the step's tokens do not reach (start
    // 62, 5 tokens: keys 64-66), wider splits at a long context (1503 keys: 32 of 48, or 3 of 504
    // under a cap of 3), one split (a cap of 1, or a context of 1), and past 8,192 keys a split per
    // 256 (9,004 keys: 35 splits, here over pool buffers of 5 pages).
    let cases = [
        (6, 2, 12, 0, 1, 32),
        (6, 2, 12, 70, 5, 32),
        (4, 4, 132, 3, 9, 32),
        (8, 1, 16, 127, 2, 32),
        (6, 2, 12, 0, 37, 32),
        (6, 2, 12, 70, 13, 32),
        (8, 2, 64, 0, 9, 32),
        (8, 1, 16, 127, 8, 32),
        (4, 4, 256, 40, 11, 32),
        (8, 2, 16, 62, 5, 32),
        (8, 2, 64, 1500, 3, 32),
        (6, 2, 132, 1500, 1, 3),
        (8, 2, 16, 200, 4, 1),
        (4, 1, 256, 300, 7, 32),
        (8, 2, 16, 9000, 1, 256),
    ];
    // The pool in one buffer, and in buffers of 2 and 5 pages (a binding limit that one context
    // passes), case by case; q8_0 pools take rows of whole blocks of 32.
    for (case, (n_heads, n_kv_heads, head_dim, start_pos, n, max_key_splits)) in cases.into_iter().enumerate() {
        if !gpu.kv_type.fits(n_kv_heads * head_dim) {
            continue;
        }
        let pages_per_buffer = [None, Some(2), Some(5)][case % 3];
        let context = start_pos + n + 3;
        let mut r = rng((start_pos + head_dim + n) as u64);
        // q rows lead stacked q/k/v rows; the k and v columns after them are not read.
        let q_stride = (n_heads + 2 * n_kv_heads) * head_dim;
        let qkv = random_vec(&mut r, n * q_stride, 1.0);
        let q: Vec<f32> = qkv.chunks(q_stride).flat_map(|row| &row[..n_heads * head_dim]).copied().collect();
        let k_cache = gpu.kv_type.rounded(&random_vec(&mut r, context * n_kv_heads * head_dim, 1.0));
        let v_cache = gpu.kv_type.rounded(&random_vec(&mut r, context * n_kv_heads * head_dim, 1.0));
        // The sequence's pages lie shuffled in a pool with pages of no one between them.
        let pool = PagedPool::new(&mut r, &[(&k_cache, &v_cache)], n_kv_heads * head_dim);
        let slots: Vec<TokenSlot> = (start_pos..start_pos + n).map(|p| TokenSlot { position: p as u32, kv_row: 0, sequence: 0, _pad: 0 }).collect();
        let what = format!("attention heads {n_heads}/{n_kv_heads} hd {head_dim} start {start_pos} n {n} splits <= {max_key_splits}, {:?} KV in buffers of {pages_per_buffer:?} pages", gpu.kv_type);
        let got = pool.attend(gpu, AttentionHeads { n_heads, n_kv_heads, head_dim }, &qkv, q_stride, &slots, max_key_splits, pages_per_buffer);
        let want = reference::attention(&q, &k_cache, &v_cache, start_pos, n_heads, n_kv_heads, head_dim);
        // q8_0 pools hold the rounded values up to their scales' own rounding.
        let tolerance = if gpu.kv_type == KvType::Q8_0 { 1e-4 } else { 1e-5 };
        assert_close(&what, &got, &want, tolerance, tolerance);
    }
}

/// Sequences' K/V caches scattered over the pages of one pool, with its page table.
struct PagedPool {
    k: Vec<f32>,
    v: Vec<f32>,
    table: Vec<u32>,
    pages_per_sequence: usize,
    kv_dim: usize,
}

impl PagedPool {
    /// `caches`: each sequence's contiguous (positions, kv_dim) keys and values.
    fn new(r: &mut rand::rngs::StdRng, caches: &[(&[f32], &[f32])], kv_dim: usize) -> Self {
        use rand::seq::SliceRandom;
        let pages_of = |cache: &[f32]| (cache.len() / kv_dim).div_ceil(PAGE_SIZE);
        let pages_per_sequence = caches.iter().map(|(k, _)| pages_of(k)).max().unwrap_or(1);
        let total = caches.iter().map(|(k, _)| pages_of(k)).sum::<usize>() + 3;
        let mut order: Vec<u32> = (0..total as u32).collect();
        order.shuffle(r);
        let page_floats = PAGE_SIZE * kv_dim;
        let (mut k, mut v) = (random_vec(r, total * page_floats, 1.0), random_vec(r, total * page_floats, 1.0));
        let mut table = vec![0; caches.len() * pages_per_sequence];
        let mut next = order.into_iter();
        for (s, (kc, vc)) in caches.iter().enumerate() {
            for page in 0..pages_of(kc) {
                let to = next.next().unwrap();
                table[s * pages_per_sequence + page] = to;
                let from = page * page_floats..((page + 1) * page_floats).min(kc.len());
                let at = to as usize * page_floats;
                k[at..at + from.len()].copy_from_slice(&kc[from.clone()]);
                v[at..at + from.len()].copy_from_slice(&vc[from]);
            }
        }
        Self { k, v, table, pages_per_sequence, kv_dim }
    }

    /// The pool's pages in buffers of `pages_per_buffer` (one buffer if None), as `gpu`'s KV type
    /// holds them (the filler pages rounded; the caches' pages are exact there).
    fn buffers(&self, gpu: &Gpu, pages_per_buffer: Option<usize>) -> (Vec<(wgpu::Buffer, wgpu::Buffer)>, usize) {
        let page_floats = PAGE_SIZE * self.kv_dim;
        let per_buffer = pages_per_buffer.unwrap_or(self.pages());
        let encode = |x: &[f32]| gpu.kv_buffer_with("kv pool", x, self.kv_dim);
        let buffers = self.k.chunks(per_buffer * page_floats).zip(self.v.chunks(per_buffer * page_floats)).map(|(k, v)| (encode(k), encode(v))).collect();
        (buffers, per_buffer)
    }

    fn pages(&self) -> usize {
        self.k.len() / (PAGE_SIZE * self.kv_dim)
    }

    /// Attention of the tokens `slots` place, their q rows in `qkv`, over the pool in buffers of
    /// `pages_per_buffer` pages.
    #[allow(clippy::too_many_arguments)]
    fn attend(&self, gpu: &Gpu, heads: AttentionHeads, qkv: &[f32], q_stride: usize, slots: &[TokenSlot], max_key_splits: u32, pages_per_buffer: Option<usize>) -> Vec<f32> {
        let qkv_buffer = gpu.storage_buffer_with("qkv", qkv);
        let (buffers, pages_per_buffer) = self.buffers(gpu, pages_per_buffer);
        let page_table = gpu.storage_buffer_with("page table", &self.table);
        let kv = ops::KvLayer { buffers: &buffers, pages: self.pages(), pages_per_buffer, page_table: &page_table, pages_per_sequence: self.pages_per_sequence };
        let n = slots.len() * heads.n_heads * heads.head_dim;
        let out = gpu.storage_buffer("out", (n * 4) as u64);
        let partials = ops::AttentionPartials::new(gpu, heads, max_key_splits, buffers.len(), slots.len());
        let step = StepParams::for_slots(slots, max_key_splits);
        let step_buffer = ops::step_buffer(gpu, step);
        let attention = |qkv| ops::attention(gpu, heads, qkv, q_stride, kv, &out, &partials, &step_buffer);
        // An earlier pass (other queries) shares the partials and out, as the model's layers do:
        // it must leave nothing the next one reads (the merge's arrival counts back at zero).
        let negated = gpu.storage_buffer_with("negated qkv", &qkv.iter().map(|x| -x).collect::<Vec<f32>>());
        let (earlier, op) = (attention(&negated), attention(&qkv_buffer));
        run(gpu, |pass| {
            earlier.encode(pass, &step);
            op.encode(pass, &step);
        });
        read_f32(gpu, &out, n)
    }
}

#[test]
fn attention_runs_several_sequences_in_one_pass() {
    let Some(gpu) = gpu() else { return };
    // Sequences of different lengths in one pass: decode tokens and prefill chunks side by side, as
    // the engine batches them. GQA groups of 3 and 4 put query blocks across tokens of different
    // sequences; 5 tokens run as a decode pass (key splits), 12 in 4 runs and 9 single tokens as a
    // batch (`attend`'s blocks), 34 in 3 runs as a prefill pass (`attend_tiles`).
    let mixes: [&[(usize, usize)]; 5] = [
        &[(40, 1), (3, 1), (20, 1), (70, 1), (0, 1)],
        &[(40, 1), (3, 5), (20, 2), (9, 4)],
        &[(17, 3), (0, 1), (33, 1)],
        &[(12, 20), (5, 13), (30, 1)],
        &[(40, 1), (3, 1), (20, 1), (70, 1), (0, 1), (8, 1), (15, 1), (33, 1), (2, 1)],
    ];
    for (n_heads, n_kv_heads, head_dim) in [(6, 2, 16), (8, 2, 32)] {
        let heads = AttentionHeads { n_heads, n_kv_heads, head_dim };
        for (case, mix) in mixes.iter().enumerate() {
            // The second and fourth mixes over a pool in buffers of 3 pages.
            attention_of_a_mix_matches_reference(&gpu, case as u64 + 100, heads, mix, (case % 2 == 1).then_some(3), 1e-5, &format!("mix {case}"));
        }
    }
}

/// The tokens of sequences `mix` ((start, tokens) each), one after another.
fn slots_of(mix: &[(usize, usize)]) -> Vec<TokenSlot> {
    mix.iter()
        .enumerate()
        .flat_map(|(s, &(start, n))| (start..start + n).map(move |p| TokenSlot { position: p as u32, kv_row: 0, sequence: s as u32, _pad: 0 }))
        .collect()
}

/// The sequences of `mix` with random caches (as `gpu`'s KV type holds them) in one pool, in
/// buffers of `pages_per_buffer` pages, attended in one pass: each sequence's outputs against the
/// reference within `tolerance`.
fn attention_of_a_mix_matches_reference(gpu: &Gpu, seed: u64, heads: AttentionHeads, mix: &[(usize, usize)], pages_per_buffer: Option<usize>, tolerance: f32, what: &str) {
    let AttentionHeads { n_heads, n_kv_heads, head_dim } = heads;
    let mut r = rng(seed);
    let kv_dim = n_kv_heads * head_dim;
    let q_stride = (n_heads + 2 * n_kv_heads) * head_dim;
    let caches: Vec<(Vec<f32>, Vec<f32>)> = mix
        .iter()
        .map(|&(start, n)| {
            let positions = start + n + 5;
            (gpu.kv_type.rounded(&random_vec(&mut r, positions * kv_dim, 1.0)), gpu.kv_type.rounded(&random_vec(&mut r, positions * kv_dim, 1.0)))
        })
        .collect();
    let refs: Vec<(&[f32], &[f32])> = caches.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
    let pool = PagedPool::new(&mut r, &refs, kv_dim);
    let n_total: usize = mix.iter().map(|m| m.1).sum();
    let qkv = random_vec(&mut r, n_total * q_stride, 1.0);
    let got = pool.attend(gpu, heads, &qkv, q_stride, &slots_of(mix), 32, pages_per_buffer);
    let mut row = 0;
    for (s, &(start, n)) in mix.iter().enumerate() {
        let q: Vec<f32> = qkv[row * q_stride..(row + n) * q_stride].chunks(q_stride).flat_map(|r| &r[..n_heads * head_dim]).copied().collect();
        let want = reference::attention(&q, &caches[s].0, &caches[s].1, start, n_heads, n_kv_heads, head_dim);
        let what = format!("{what}, {:?} KV, heads {n_heads}/{n_kv_heads} hd {head_dim}: sequence {s} ({n} tokens from {start})", gpu.kv_type);
        assert_close(&what, &got[row * n_heads * head_dim..(row + n) * n_heads * head_dim], &want, tolerance, tolerance);
        row += n;
    }
}

/// attention.wgsl's attend_coop (prefill on cooperative matrices, heads of 64 and 128 dimensions):
/// prompts and chunked prefill over several key tiles, partial query blocks, GQA groups of 1, 4 and
/// 8, three sequences in one pass; f16 operands against the f32 reference, for each KV pool type.
/// A pool in several buffers (the last case) takes attend_tiles, whose partials merge (ops::attention).
#[test]
fn prefill_attention_on_cooperative_matrices_stays_within_f16_rounding_of_the_reference() {
    // Heads, KV heads, head_dim, each sequence's (start, tokens), pages per pool buffer.
    type Case = (usize, usize, usize, &'static [(usize, usize)], Option<usize>);
    let cases: [Case; 7] = [
        (8, 2, 64, &[(0, 37)], None),
        (8, 2, 128, &[(70, 30)], None),
        (4, 4, 64, &[(3, 24)], None),
        (8, 1, 128, &[(127, 20)], None),
        (32, 8, 128, &[(500, 40)], None),
        (8, 2, 64, &[(12, 20), (5, 13), (90, 9)], None),
        (8, 2, 64, &[(12, 20), (5, 13), (90, 9)], Some(3)),
    ];
    for kv_type in [KvType::F16, KvType::F32, KvType::Q8_0] {
        let Some(gpu) = coop_matrix_gpu(&GpuOptions { kv_type: Some(kv_type), ..Default::default() }) else { return };
        assert!(gpu.coop_attention);
        for (case, &(n_heads, n_kv_heads, head_dim, mix, pages_per_buffer)) in cases.iter().enumerate() {
            assert_eq!(AttentionPass::of(&StepParams::for_slots(&slots_of(mix), 32), (n_heads / n_kv_heads) as u32), AttentionPass::Prefill);
            let what = format!("cooperative matrices, case {case}");
            attention_of_a_mix_matches_reference(&gpu, case as u64 + 200, AttentionHeads { n_heads, n_kv_heads, head_dim }, mix, pages_per_buffer, 4e-3, &what);
        }
    }
}

#[test]
fn attention_takes_tiles_for_long_runs_of_one_sequence() {
    let pass = |mix: &[(usize, usize)], group| AttentionPass::of(&StepParams::for_slots(&slots_of(mix), 32), group);
    // The mixes of attention_runs_several_sequences_in_one_pass, with groups of 3 and 4 heads.
    for group in [3, 4] {
        assert_eq!(pass(&[(40, 1), (3, 1), (20, 1), (70, 1), (0, 1)], group), AttentionPass::DecodeSplit);
        assert_eq!(pass(&[(0, 1), (3, 1)], group), AttentionPass::Decode);
        assert_eq!(pass(&[(40, 1), (3, 5), (20, 2), (9, 4)], group), AttentionPass::Batch);
        assert_eq!(pass(&[(12, 20), (5, 13), (30, 1)], group), AttentionPass::Prefill);
        assert_eq!(pass(&[(40, 1), (3, 1), (20, 1), (70, 1), (0, 1), (8, 1), (15, 1), (33, 1), (2, 1)], group), AttentionPass::Batch);
    }
    // A prompt; 16 streams' decode tokens, and the same beside one stream's prefill chunk.
    let streams: Vec<(usize, usize)> = (0..16).map(|s| (100 + s, 1)).collect();
    assert_eq!(pass(&[(0, 256)], 4), AttentionPass::Prefill);
    assert_eq!(pass(&streams, 4), AttentionPass::Batch);
    assert_eq!(pass(&[streams.as_slice(), &[(0, 240)]].concat(), 4), AttentionPass::Prefill);
}

/// kv_store moves staged rows into the buffers holding their tokens' KV rows, in each pool type:
/// exact for f32 and f16, and for q8_0 the CPU's blocks (KvType::encode) up to one level where a
/// quotient rounds the other way on the GPU.
#[test]
fn kv_store_writes_staged_rows_into_their_pool_buffers() {
    for gpu in kv_type_gpus() {
        let (kv_dim, pages, pages_per_buffer) = (64, 8, 3);
        let mut r = rng(71);
        let pool = PagedPool { k: random_vec(&mut r, pages * PAGE_SIZE * kv_dim, 1.0), v: random_vec(&mut r, pages * PAGE_SIZE * kv_dim, 1.0), table: vec![0], pages_per_sequence: 1, kv_dim };
        let (buffers, per_buffer) = pool.buffers(&gpu, Some(pages_per_buffer));
        let page_table = gpu.storage_buffer_with("page table", &pool.table);
        let kv = ops::KvLayer { buffers: &buffers, pages, pages_per_buffer: per_buffer, page_table: &page_table, pages_per_sequence: 1 };
        // Rows in every buffer, at the edges of buffers and pages, in no order; a block of zeros.
        let kv_rows = [0u32, 47, 48, 127, 95, 96, 17, 33, 100];
        let n = kv_rows.len();
        let (mut k_rows, v_rows) = (random_vec(&mut r, n * kv_dim, 2.0), random_vec(&mut r, n * kv_dim, 0.5));
        k_rows[32..64].fill(0.0);
        let slots: Vec<TokenSlot> = kv_rows.iter().enumerate().map(|(t, &kv_row)| TokenSlot { position: t as u32, kv_row, sequence: 0, _pad: 0 }).collect();
        let step = StepParams::for_slots(&slots, 1);
        let step_buffer = ops::step_buffer(&gpu, step);
        let [k_staged, v_staged] = [&k_rows, &v_rows].map(|x| gpu.storage_buffer_with("staging", x));
        let op = ops::kv_store(&gpu, &k_staged, &v_staged, kv, kv_dim, &step_buffer);
        run(&gpu, |pass| op.encode(pass, n as u32));
        for (staged, initial, which) in [(&k_rows, &pool.k, 0), (&v_rows, &pool.v, 1)] {
            let mut want = gpu.kv_type.rounded(initial);
            for (t, &row) in kv_rows.iter().enumerate() {
                want[row as usize * kv_dim..][..kv_dim].copy_from_slice(&gpu.kv_type.rounded(&staged[t * kv_dim..][..kv_dim]));
            }
            let got: Vec<f32> = buffers
                .iter()
                .flat_map(|pair| {
                    let buffer = if which == 0 { &pair.0 } else { &pair.1 };
                    let rows = (buffer.size() / gpu.kv_type.row_bytes(kv_dim)) as usize;
                    read_kv(&gpu, buffer, rows * kv_dim, kv_dim)
                })
                .collect();
            let what = format!("{} pool after kv_store, {:?}", ["k", "v"][which], gpu.kv_type);
            match gpu.kv_type {
                KvType::Q8_0 => {
                    let level = 2.0 / 127.0 + 1e-6;
                    let off = got.iter().zip(&want).filter(|(g, w)| (*g - *w).abs() > 1e-6).count();
                    assert!(off * 200 <= want.len(), "{what}: {off} of {} values off", want.len());
                    assert_close(&what, &got, &want, level, 0.0);
                }
                _ => {
                    assert_close(&what, &got, &want, 0.0, 0.0);
                }
            }
        }
    }
}

#[test]
fn decode_steps_split_their_keys() {
    let split = |n, start, cap| {
        let s = StepParams::new(n, start, cap);
        (s.keys_per_split, s.key_splits)
    };
    assert_eq!(split(1, 0, 32), (8, 1));
    assert_eq!(split(1, 32, 32), (8, 5));
    assert_eq!(split(1, 639, 32), (24, 27));
    assert_eq!(split(1, 2047, 32), (64, 32));
    assert_eq!(split(3, 1500, 32), (48, 32));
    assert_eq!(split(1, 131_071, 32), (4096, 32));
    // Past 8,192 keys, a split per 256 where the cap allows.
    assert_eq!(split(1, 8191, 256), (256, 32));
    assert_eq!(split(1, 32_767, 256), (256, 128));
    assert_eq!(split(1, 131_071, 256), (512, 256));
    assert_eq!(split(1, 1000, 1), (1008, 1));
    // Prefill attends in one split.
    assert_eq!(split(8, 1000, 32), (1008, 1));
    for (n, start, cap) in [(1, 0, 32), (7, 93, 5), (2, 100_000, 32), (1, 31, 2)] {
        let (keys, splits) = split(n, start, cap);
        assert!(splits <= cap && keys * splits >= n + start && keys * (splits - 1) < n + start, "{n} tokens from {start}, cap {cap}");
    }
}

#[test]
fn argmax_picks_the_first_largest() {
    let Some(gpu) = gpu() else { return };
    // One workgroup of the first pass; a few; all 256, each reading its share twice over.
    for n in [5, 1003, 70_000, 300_000] {
        let mut values = random_vec(&mut rng(11), n, 5.0);
        // A tie, in different workgroups of the first pass where there are several: the first
        // index wins, as torch.argmax.
        for i in [n / 3, 2 * n / 3, n - 1] {
            values[i] = 9.0;
        }
        // A second row, reversed: its own argmax.
        let mut rows = values.clone();
        rows.extend(values.iter().rev());
        let input = gpu.storage_buffer_with("logits", &rows);
        let out = gpu.storage_buffer("out", 8);
        let op = ops::argmax(&gpu, &input, &out, n, 2);
        run(&gpu, |pass| op.encode(pass, 2));
        let got: Vec<f32> = bytemuck::pod_collect_to_vec(&pollster::block_on(gpu.read(&out, 8)).unwrap());
        assert_eq!(got[0] as usize, n / 3, "n={n}");
        assert_eq!(got[1] as usize, reference::argmax(&rows[n..]), "n={n}, second row");
        assert_eq!(reference::argmax(&values), n / 3);
    }
}

#[test]
fn top_k_matches_reference_with_ties() {
    let Some(gpu) = gpu() else { return };
    // Two partial selections; 18; all 256, some of their threads reading a 17th logit.
    for n in [5003, 70_000, 1_100_000] {
        let mut values = random_vec(&mut rng(12), n, 6.0);
        values[17] = 9.5;
        values[n - 2] = 9.5; // a tie across partials: the lower id ranks first
        values[n / 2] = 9.0;
        // A second row of other values, selected with its own k and temperature in the same pass.
        let other = random_vec(&mut rng(13), n, 4.0);
        let input = gpu.storage_buffer_with("logits", &[values.as_slice(), &other].concat());
        let out = gpu.storage_buffer("out", 2 * ops::TopK::OUT_BYTES);
        let top_k = ops::TopK::new(&gpu, &input, &out, values.len(), 2);
        for (k, temperature) in [(1, 1.0), (3, 0.7), (40, 1.3), (64, 2.0)] {
            // The first row scores a token far down its ranking, the second none.
            let rows = [
                ops::Selection { k, temperature, scored_token: Some(n as u32 - 3) },
                ops::Selection { k: 65 - k, temperature: 1.0 / temperature, scored_token: None },
            ];
            top_k.set(&gpu, &rows);
            run(&gpu, |pass| top_k.encode(pass, 2));
            let words: Vec<u32> = bytemuck::pod_collect_to_vec(&pollster::block_on(gpu.read(&out, 2 * ops::TopK::OUT_BYTES)).unwrap());
            let row_words = words.len() / 2;
            for (row, logits, selection) in [(0, &values, rows[0]), (1, &other, rows[1])] {
                let k = selection.k;
                let got = ops::Candidates::from_words(&words[row * row_words..], &selection);
                let (want, max, exp_sum) = reference::top_k(logits, k, selection.temperature);
                assert_eq!(got.tokens, want, "n={n} row {row} k={k}");
                assert_eq!(got.max, max);
                assert!((got.exp_sum - exp_sum).abs() <= 1e-5 * exp_sum, "n={n} row {row} k={k}: sum {} vs {}", got.exp_sum, exp_sum);
                let (_, _, softmax_sum) = reference::top_k(logits, 1, 1.0);
                assert!((got.softmax_sum - softmax_sum).abs() <= 1e-5 * softmax_sum, "n={n} row {row}: softmax sum {} vs {}", got.softmax_sum, softmax_sum);
                assert_eq!(got.scored_logit, selection.scored_token.map(|t| logits[t as usize]));
            }
        }
    }
}

/// Formats that decode in the GEMV frames of another (the 5-bit ones as their 4-bit twins with a
/// word of high bits more, iq4 with a table of levels, q2_k and q3_k in q6_k's quarters: the same
/// quarters and pieces), so the GEMV tests run them in one form of each reduction, not all.
const TWIN_FORMATS: [DType; 7] = [DType::Q5_0, DType::Q5_1, DType::Q2K, DType::Q3K, DType::Q5K, DType::IQ4NL, DType::IQ4XS];

/// The block formats a GEMV test runs in a form: the twins only where `every_format`. The grid
/// formats' groups all become q8_0-like quarters through one decoder (grid_group, which
/// block_formats_decode_in_every_matmul_strategy_and_the_gather checks for each): iq1_s and iq1_m,
/// with an offset per block and per group, stand for them, as twins.
fn gemv_formats(every_format: bool) -> impl Iterator<Item = DType> {
    DType::block_formats().filter(move |dtype| {
        let twin = TWIN_FORMATS.contains(dtype) || matches!(dtype, DType::IQ1S | DType::IQ1M);
        (every_format || !twin) && (!dtype.is_grid_format() || twin)
    })
}

#[test]
fn block_formats_decode_in_every_matmul_strategy_and_the_gather() {
    for bounds_checks in [false, true] {
        block_formats_in_every_strategy(bounds_checks);
    }
}

fn block_formats_in_every_strategy(bounds_checks: bool) {
    let Some(whole) = checked_gpu(bounds_checks) else { return };
    // 37 rows: a part ends on an odd row; k = 96 gives 54-byte q4_0 rows that straddle u32 words.
    let shapes = [(37, 512), (37, 96)];
    // With bounds checks, one grid format stands for all: their loads are the same code.
    let checked_here = |dtype: DType| !bounds_checks || !dtype.is_grid_format() || dtype == DType::IQ1M;
    for dtype in DType::block_formats().filter(|&dtype| checked_here(dtype)) {
        for (rows, k) in shapes {
            if k % dtype.block().0 != 0 {
                continue;
            }
            let row_bytes = dtype.row_bytes(k).unwrap();
            // The split device binds 3 tokens of activations, and a dozen rows or more per part (and
            // a grid format's grid).
            let grid = dtype.grid().map_or(0, <[u8]>::len);
            let limit = (row_bytes * 12 + grid).max(3 * k * 4).next_multiple_of(4) as u64;
            let Some(split) = gpu_with(&GpuOptions { max_storage_binding: Some(limit), bounds_checks, ..exact() }) else { return };
            for (gpu, token_counts) in [(&whole, [1, 9]), (&split, [1, 3])] {
                let (bytes, w) = weights(gpu, 21, dtype, rows, k);
                assert!(std::ptr::eq(gpu, &whole) || w.parts.len() > 1, "{dtype} {rows}x{k} was not split");
                for n in token_counts {
                    let x = random_vec(&mut rng(n as u64 + 100), n * k, 1.0);
                    let want = reference::matmul(&x, &bytes, dtype, rows, k);
                    let (xb, out) = (gpu.storage_buffer_with("x", &x), gpu.storage_buffer("out", (n * rows * 4) as u64));
                    let layout = MatmulLayout { in_stride: k, out_stride: rows, out_offset: 0, accumulate: false };
                    let op = ops::matmul(gpu, ops::Product { x: &xb, input: MatmulInput::Plain, w: &w, out: &out, output: MatmulOutput::Rows, layout, step: &step(gpu, n, 0), prepared: None });
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

/// Quant values made from float bits (the default) are exactly those the GPU's integer-to-float
/// conversions give: every block format's products agree bit for bit as a GEMV of one token, GEMVs
/// of several (3, 11: 8 a workgroup) and tiles (37), with every fused input.
#[test]
fn quant_values_from_float_bits_equal_their_integer_conversions() {
    let (rows, k) = (37, 512);
    let options = GpuOptions { gemv_max_tokens: Some(GEMV_MAX_TOKENS), ..exact() };
    let Some(from_bits) = gpu_with(&options) else { return };
    let Some(converted) = gpu_with(&GpuOptions { int_conversions: true, ..options }) else { return };
    let norm = random_vec(&mut rng(62), k, 2.0);
    // The grid formats' values are all int8 bytes made as q8_0's: one stands for them.
    for dtype in DType::block_formats().filter(|d| !d.is_grid_format() || *d == DType::IQ2XXS) {
        for n in [1, 3, 11, 37] {
            let [bits, conversions] = [&from_bits, &converted].map(|gpu| {
                let (_, w) = weights(gpu, 61, dtype, rows, k);
                let norm_buffer = gpu.storage_buffer_with("norm", &norm);
                let (xb, cases) = fused_inputs(gpu, n, k, n as u64 + 63, &norm, &norm_buffer);
                cases.map(|(_, input, _)| {
                    let out = gpu.storage_buffer("out", (n * rows * 4) as u64);
                    let layout = MatmulLayout { in_stride: 2 * k, out_stride: rows, out_offset: 0, accumulate: false };
                    let op = ops::matmul(gpu, ops::Product { x: &xb, input, w: &w, out: &out, output: MatmulOutput::Rows, layout, step: &step(gpu, n, 0), prepared: None });
                    run(gpu, |pass| op.encode(pass, n as u32));
                    read_f32(gpu, &out, n * rows)
                })
            });
            for (input, (bits, conversions)) in ["plain", "rmsnorm", "silu_mul"].iter().zip(bits.iter().zip(&conversions)) {
                let differ = bits.iter().zip(conversions).position(|(a, b)| a.to_bits() != b.to_bits());
                assert!(differ.is_none(), "{dtype} {rows}x{k} of {input}, n={n}: element {differ:?} differs: {bits:?} against {conversions:?}");
            }
        }
    }
}

#[test]
fn fill_matches_reference_and_decodes_to_small_finite_weights() {
    let Some(gpu) = gpu() else { return };
    let buffer = gpu.storage_buffer("w", 4 * 10_007);
    for dtype in DType::ALL {
        let mask = ops::fill_mask(dtype);
        let op = ops::fill(&gpu, &buffer, 4 * 10_007, 42, mask);
        run(&gpu, |pass| op.encode(pass, 1));
        let words: Vec<u32> = bytemuck::pod_collect_to_vec(&pollster::block_on(gpu.read(&buffer, 4 * 10_007)).unwrap());
        let want: Vec<u32> = (0..10_007).map(|i| reference::fill_word(i, 42, mask)).collect();
        assert_eq!(words, want, "{dtype}");
        let bytes: Vec<u8> = bytemuck::cast_slice(&words).to_vec();
        let whole = bytes.len() / dtype.block().1 * dtype.block().1;
        // Small like a real model's weights, so random activations stay inside f16's range.
        let largest = dtype.to_f32(&bytes[..whole]).unwrap().iter().fold(0.0f32, |m, v| if v.is_finite() { m.max(v.abs()) } else { f32::INFINITY });
        assert!(largest < 2.0, "{dtype}: largest weight {largest}");
    }
}

#[test]
fn the_load_time_self_test_passes_on_this_adapter() {
    let Some(gpu) = gpu() else { return };
    pollster::block_on(llama_webgpu::gpu::self_test(&gpu)).unwrap();
}
