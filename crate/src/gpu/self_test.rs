//! A load-time self-test: a small known computation through the real kernels, compared with the CPU
//! references, so a broken adapter or driver fails loudly instead of producing garbage text.

use super::ops::{self, MatmulInput, MatmulLayout, StepParams};
use super::{CoopTile, Gpu, GpuError, KvType, TileType, WeightMatrix};
use crate::quant::DType;
use crate::reference;
use crate::model::PAGE_SIZE;

/// Where a check ran on cooperative matrices, which a driver may implement wrongly.
const COOP_HINT: &str = "on cooperative matrices (--no-coop-matrix, GpuOptions::no_coop_matrix, runs without them)";

/// Where a GEMV summed with subgroup operations, which a driver may implement wrongly.
const SUBGROUP_HINT: &str = "summed with subgroup operations (--no-subgroups, GpuOptions::no_subgroups or the JS option noSubgroups runs without them)";

/// Deterministic inputs in [-1, 1).
fn inputs(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32).map(|i| (reference::fill_word(i, seed, u32::MAX) % 2000) as f32 / 1000.0 - 1.0).collect()
}

/// Runs a q4_0 matrix product (GEMVs of one and of several tokens, and tiled; on q8 inputs where
/// the device quantizes them) of plain, RMSNorm-ed and SiLU-gated inputs, causal attention and
/// argmax on the GPU and checks each against its CPU reference.
pub async fn self_test(gpu: &Gpu) -> Result<(), GpuError> {
    // Rows past one large tile, so that every fragment of a tile on cooperative matrices computes
    // some of them; rows of 64 quarter blocks, so that every thread of a GEMV workgroup holds a
    // part of its sums and the reduction adds them over every subgroup (under a binding limit too
    // small for n such token rows, a few tests', rows of 8 quarter blocks).
    let (rows, n) = (136, 9);
    let k = if (4 * n * 2 * 512) as u64 <= gpu.max_binding() { 512 } else { 64 };
    // Token rows of x (2k: the SiLU-gated input's up half after it) and of the output must bind.
    let pass_tokens = |tokens: usize| tokens.min(ops::MAX_BATCH_TOKENS).min((gpu.max_binding() / (4 * (2 * k).max(rows) as u64)) as usize);
    // The fewest tokens the matmuls run as tiles, where a pass and the binding limit hold them.
    let tiled = pass_tokens(gpu.gemv_max_tokens as usize + 1);
    // Where products may take large tiles on cooperative matrices (by the pass's size, which a
    // test this small never reaches, or forced), a pass past one of them runs on them too.
    let large_tiles = ops::large_coop_tiles_from(gpu, rows).is_some().then(|| Gpu { coop_tile: Some(CoopTile::Large), ..gpu.clone() });
    let large_tiled = pass_tokens(CoopTile::Large.side() as usize + 3);
    let runs: Vec<(&Gpu, usize)> = [(gpu, 1), (gpu, 3), (gpu, tiled)].into_iter().chain(large_tiles.as_ref().map(|large| (large, large_tiled))).collect();
    let most_tokens = runs.iter().map(|&(_, tokens)| tokens).max().unwrap_or(n);
    let weights = DType::Q4_0.from_f32(&inputs(rows * k, 1)).map_err(|e| GpuError::SelfTest(e.to_string()))?;
    let matrix = WeightMatrix::new(gpu, "self-test weights", DType::Q4_0, rows, k)?;
    matrix.write_rows(gpu, 0, &weights);
    // Token rows of 2k: x and, for the SiLU-gated input, the up half after it.
    let x = inputs(n.max(most_tokens) * 2 * k, 2);
    let x_buffer = gpu.storage_buffer_with("self-test x", &x);
    // Two key splits at most: the partials stay small enough for any binding limit.
    let max_key_splits = 2;
    let step = |n: usize, start_pos: usize| ops::step_buffer(gpu, StepParams::new(n as u32, start_pos as u32, max_key_splits));
    let norm = inputs(k, 3);
    let norm_buffer = gpu.storage_buffer_with("self-test norm", &norm);
    let (gate, up): (Vec<f32>, Vec<f32>) = (x.chunks(k).step_by(2).flatten().copied().collect(), x.chunks(k).skip(1).step_by(2).flatten().copied().collect());
    let cases = [
        ("matmul q4_0", MatmulInput::Plain, gate.clone()),
        ("matmul q4_0 of rmsnorm", MatmulInput::RmsNorm { weight: &norm_buffer, eps: 1e-5 }, reference::rmsnorm(&gate, &norm, 1e-5)),
        ("matmul q4_0 of silu_mul", MatmulInput::SiluMul, reference::silu_mul(&gate, &up)),
    ];
    let layout = MatmulLayout { in_stride: 2 * k, out_stride: rows, out_offset: 0, accumulate: false };
    // Inputs prepared as the model's are (q8 for every strategy, f16 for the tiles on cooperative
    // matrices).
    let prepared = ops::InputFormat::for_gpu(gpu).map(|format| ops::PreparedInputs::new(gpu, format, most_tokens, k));
    for (kernel, input, input_rows) in cases {
        let product = reference::matmul(&input_rows, &weights, DType::Q4_0, rows, k);
        let q8_product = reference::matmul(&KvType::Q8_0.rounded(&input_rows), &weights, DType::Q4_0, rows, k);
        for &(on, tokens) in &runs {
            let out = gpu.storage_buffer("self-test out", (tokens * rows * 4) as u64);
            let step = step(tokens, 0);
            let q8 = gpu.q8_activations;
            let mut op = ops::matmul(on, ops::Product { x: &x_buffer, input, w: &matrix, out: &out, output: ops::MatmulOutput::Rows, layout, step: &step, prepared: prepared.as_ref() });
            if let Some(prepared) = &prepared {
                op = op.after(prepared, ops::prepare_input(gpu, &x_buffer, input, k, layout.in_stride, prepared, &step));
            }
            gpu.run(|pass| op.encode(pass, tokens as u32)).await?;
            // f16 tiles and cooperative matrices round inputs and weights to 11 bits; garbage
            // still lies far outside this. The reference takes q8 inputs as the CPU rounds them,
            // and an input the GPU rounds the other way moves a product by up to 1/127.
            let on_tiles = tokens as u32 > gpu.gemv_max_tokens;
            let f16_tiles = on_tiles && (gpu.tile_type == TileType::F16 || gpu.coop_matrix.is_some());
            let want = if q8 { &q8_product } else { &product };
            let what = match (on_tiles && gpu.coop_matrix.is_some(), on.coop_tile) {
                (false, _) if !on_tiles && gpu.subgroups => format!("{kernel} {SUBGROUP_HINT}"),
                (false, _) => kernel.to_string(),
                (true, Some(CoopTile::Large)) => format!("{kernel} in tiles of 128 (--coop-tile 64 keeps to tiles of 64) {COOP_HINT}"),
                (true, _) => format!("{kernel} {COOP_HINT}"),
            };
            compare(gpu, &what, &out, &want[..tokens * rows], if f16_tiles || q8 { 2e-2 } else { 1e-4 }).await?;
        }
    }

    // Four query heads over two KV heads of 16, or of 64 where prefill attends on cooperative
    // matrices (heads of 64 or 128 only) and the pool's buffer binds: nine tokens after five cached
    // positions (prefill), and three after forty (decode, its keys in two splits).
    let context: usize = 43;
    let (heads, kv_heads) = (4, 2);
    let pool_bytes = |head_dim: usize| gpu.kv_type.row_bytes(kv_heads * head_dim) * context.next_multiple_of(PAGE_SIZE) as u64;
    let head_dim = if gpu.coop_attention && pool_bytes(64) <= gpu.max_binding() { 64 } else { 16 };
    // As the pool's type holds them, so that the reference sees the same keys and values.
    let (keys, values) = (gpu.kv_type.rounded(&inputs(context * kv_heads * head_dim, 5)), gpu.kv_type.rounded(&inputs(context * kv_heads * head_dim, 6)));
    let caches = [(gpu.kv_buffer_with("self-test keys", &keys, kv_heads * head_dim), gpu.kv_buffer_with("self-test values", &values, kv_heads * head_dim))];
    let shape = ops::AttentionHeads { n_heads: heads, n_kv_heads: kv_heads, head_dim };
    let partials = ops::AttentionPartials::new(gpu, shape, max_key_splits, 1, 0);
    // One sequence whose pages are the pool's first ones, in order.
    let pages_per_sequence = context.div_ceil(PAGE_SIZE);
    let page_table = gpu.storage_buffer_with("self-test page table", &(0..pages_per_sequence as u32).collect::<Vec<u32>>());
    let kv = ops::KvLayer { buffers: &caches, pages: pages_per_sequence, pages_per_buffer: pages_per_sequence, page_table: &page_table, pages_per_sequence };
    for (tokens, start) in [(n, 5), (3, 40)] {
        let q = inputs(tokens * heads * head_dim, 4);
        let q_buffer = gpu.storage_buffer_with("self-test q", &q);
        let attended = gpu.storage_buffer("self-test attended", (q.len() * 4) as u64);
        let step_params = StepParams::new(tokens as u32, start as u32, max_key_splits);
        let step_buffer = ops::step_buffer(gpu, step_params);
        let op = ops::attention(gpu, shape, &q_buffer, heads * head_dim, kv, &attended, &partials, &step_buffer);
        gpu.run(|pass| op.encode(pass, &step_params)).await?;
        // Cooperative matrices round q, k, v and the weights to f16.
        let on_coop = gpu.coop_attention && tokens == n;
        let tolerance = if on_coop { 4e-3 } else { 1e-4 };
        let what = if on_coop { format!("attention {COOP_HINT}") } else { "attention".to_string() };
        compare(gpu, &what, &attended, &reference::attention(&q, &keys, &values, start, heads, kv_heads, head_dim), tolerance).await?;
    }

    let best = gpu.storage_buffer("self-test argmax", 4);
    let op = ops::argmax(gpu, &x_buffer, &best, x.len(), 1);
    gpu.run(|pass| op.encode(pass, 1)).await?;
    let got = f32::from_le_bytes(gpu.read(&best, 4).await?.try_into().unwrap_or_default()) as u32;
    let want = reference::argmax(&x);
    if got as usize != want {
        return Err(GpuError::SelfTest(format!("argmax gave {got}, the CPU {want}")));
    }
    Ok(())
}

/// Fails naming the kernel and the worst element when the GPU's values leave `tolerance` (relative
/// to 1 + |value|) of the CPU's.
async fn compare(gpu: &Gpu, kernel: &str, buffer: &wgpu::Buffer, want: &[f32], tolerance: f32) -> Result<(), GpuError> {
    let got: Vec<f32> = bytemuck::pod_collect_to_vec(&gpu.read(buffer, (want.len() * 4) as u64).await?);
    let worst = got
        .iter()
        .zip(want)
        .enumerate()
        .map(|(i, (g, w))| (i, if g.is_finite() { (g - w).abs() / (1.0 + w.abs()) } else { f32::INFINITY }))
        .fold((0, 0.0f32), |a, b| if b.1 > a.1 { b } else { a });
    if worst.1 > tolerance {
        let (i, _) = worst;
        return Err(GpuError::SelfTest(format!("{kernel}: element {i} is {} on the GPU but {} on the CPU", got[i], want[i])));
    }
    Ok(())
}
