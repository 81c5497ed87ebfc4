//! CPU reference implementations of every kernel in `shaders/`, written for clarity, not speed.
//! Tests compare each kernel with its reference; all rows are token-major, f32.

use crate::quant::DType;

/// The gather of shaders/matmul.wgsl: rows of a (vocab, dim) table stored as `dtype`.
pub fn embedding(tokens: &[u32], table: &[u8], dtype: DType, dim: usize) -> Vec<f32> {
    let row_bytes = dtype.row_bytes(dim).expect("whole blocks per row");
    tokens.iter().flat_map(|&t| dtype.to_f32(&table[t as usize * row_bytes..][..row_bytes]).expect("whole blocks")).collect()
}

/// RMSNorm, which shaders/matmul.wgsl fuses into its input (INPUT 1).
pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let dim = weight.len();
    x.chunks(dim)
        .flat_map(|row| {
            let mean_square = row.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / dim as f64;
            let inv_rms = 1.0 / (mean_square + eps as f64).sqrt();
            row.iter().zip(weight).map(move |(v, w)| (*v as f64 * inv_rms) as f32 * w)
        })
        .collect()
}

/// RoPE as matmul.wgsl's rotary output applies it: rotates halves of the first `n_heads` heads of each row; row `r`
/// is at position `positions[r]`.
/// `cos_sin` is the (positions, head_dim / 2) table of (cos, sin) pairs.
pub fn rope(x: &mut [f32], positions: &[usize], cos_sin: &[[f32; 2]], n_heads: usize, head_dim: usize, row_stride: usize) {
    let half = head_dim / 2;
    for (row, &pos) in positions.iter().enumerate() {
        for head in 0..n_heads {
            let base = row * row_stride + head * head_dim;
            for i in 0..half {
                let [c, s] = cos_sin[pos * half + i];
                let (x1, x2) = (x[base + i], x[base + i + half]);
                x[base + i] = x1 * c - x2 * s;
                x[base + i + half] = x2 * c + x1 * s;
            }
        }
    }
}

/// shaders/matmul.wgsl (INPUT 0): x (n, k) @ w.T for w (rows, k) stored as `dtype`.
pub fn matmul(x: &[f32], w: &[u8], dtype: DType, rows: usize, k: usize) -> Vec<f32> {
    let w = dtype.to_f32(w).expect("whole blocks");
    x.chunks(k)
        .flat_map(|xr| {
            let w = &w;
            (0..rows).map(move |r| w[r * k..(r + 1) * k].iter().zip(xr).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32)
        })
        .collect()
}

/// shaders/attention.wgsl: q (n, n_heads, hd) at positions start_pos.., caches (positions, n_kv, hd).
pub fn attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    start_pos: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
) -> Vec<f32> {
    let n_tokens = q.len() / (n_heads * head_dim);
    let kv_stride = n_kv_heads * head_dim;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut out = vec![0.0; q.len()];
    for t in 0..n_tokens {
        let pos = start_pos + t;
        for h in 0..n_heads {
            let kv = h / (n_heads / n_kv_heads);
            let qh = &q[(t * n_heads + h) * head_dim..][..head_dim];
            let scores: Vec<f64> = (0..=pos)
                .map(|j| {
                    let kj = &k_cache[j * kv_stride + kv * head_dim..][..head_dim];
                    qh.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for d in 0..head_dim {
                let v: f64 = (0..=pos).map(|j| weights[j] * v_cache[j * kv_stride + kv * head_dim + d] as f64).sum();
                out[(t * n_heads + h) * head_dim + d] = (v / total) as f32;
            }
        }
    }
    out
}

/// The gated MLP activation, which shaders/matmul.wgsl fuses into its input (INPUT 2).
pub fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter().zip(up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect()
}

/// shaders/argmax.wgsl: the first index of the largest value.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// shaders/top_k.wgsl: the k largest (id, value) pairs, value descending then id ascending, the
/// maximum and the sum of exp((v - max) / temperature) over all values.
pub fn top_k(values: &[f32], k: usize, temperature: f32) -> (Vec<(u32, f32)>, f32, f32) {
    let mut ranked: Vec<(u32, f32)> = values.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let max = ranked[0].1;
    let exp_sum = values.iter().map(|v| ((v - max) as f64 / temperature as f64).exp()).sum::<f64>() as f32;
    ranked.truncate(k);
    (ranked, max, exp_sum)
}

/// shaders/fill.wgsl: word i of a synthetic weight buffer, masked by `mask`.
pub fn fill_word(i: u32, seed: u32, mask: u32) -> u32 {
    fn hash(mut x: u32) -> u32 {
        x ^= x >> 16;
        x = x.wrapping_mul(0x7feb352d);
        x ^= x >> 15;
        x = x.wrapping_mul(0x846ca68b);
        x ^ (x >> 16)
    }
    hash(i ^ hash(seed)) & mask
}
