//! q4_k, q5_k and q6_k: super-blocks of 256 weights whose sub-blocks carry quantized scales. The
//! quantizers port ggml's `quantize_row_q4_K_ref` and `quantize_row_q5_K_ref` (make_qkx2_quants: a
//! weighted least-squares search over scale and minimum) and `quantize_row_q6_K_ref`
//! (make_qx_quants: a search over symmetric scales), operation for operation in f32.

use super::{largest_magnitude, nearest_int, read_f16, write_f16, GROUP_MAX_EPS};

/// The 6-bit scale and minimum of q4_k sub-block `j` from the 12 packed bytes: sub-blocks 0..4 use
/// the low 6 bits of bytes j and j + 4; sub-blocks 4..8 put their low 4 bits in byte j + 4 and their
/// high 2 bits in the top bits of bytes j - 4 and j (ggml's get_scale_min_k4).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Each sub-block's scale and minimum of a q4_k or q5_k super-block: d * sc and dmin * m.
fn sub_block_scales(block: &[u8]) -> [(f32, f32); 8] {
    let (d, dmin) = (read_f16(block, 0), read_f16(block, 2));
    std::array::from_fn(|j| {
        let (sc, m) = scale_min_k4(j, &block[4..16]);
        (d * sc as f32, dmin * m as f32)
    })
}

/// Layout: f16 d, f16 dmin, 12 scale bytes, 128 bytes in which byte i of each 32-byte group g holds
/// element 64g + i (low nibble) and 64g + 32 + i (high nibble).
pub(super) fn dequantize_q4_k(block: &[u8], out: &mut [f32]) {
    let scales = sub_block_scales(block);
    for g in 0..4 {
        let ((d1, m1), (d2, m2)) = (scales[2 * g], scales[2 * g + 1]);
        for (i, &q) in block[16 + 32 * g..16 + 32 * (g + 1)].iter().enumerate() {
            out[64 * g + i] = d1 * (q & 0xF) as f32 - m1;
            out[64 * g + 32 + i] = d2 * (q >> 4) as f32 - m2;
        }
    }
}

/// Layout: f16 d, f16 dmin, 12 scale bytes, qh (32 bytes), then q4_k's 128 bytes of nibbles; the
/// fifth bit of element 32s + i (sub-block s) is bit s of qh[i].
pub(super) fn dequantize_q5_k(block: &[u8], out: &mut [f32]) {
    let scales = sub_block_scales(block);
    let qh = &block[16..48];
    for g in 0..4 {
        let ((d1, m1), (d2, m2)) = (scales[2 * g], scales[2 * g + 1]);
        for (i, &q) in block[48 + 32 * g..48 + 32 * (g + 1)].iter().enumerate() {
            let high = |s: usize| (qh[i] >> s & 1) << 4;
            out[64 * g + i] = d1 * ((q & 0xF) | high(2 * g)) as f32 - m1;
            out[64 * g + 32 + i] = d2 * ((q >> 4) | high(2 * g + 1)) as f32 - m2;
        }
    }
}

/// Layout: ql (128 bytes), qh (64), 16 int8 scales, f16 d. In each half h of 128 elements, element
/// 128h + 32k + i (k = 0..4) takes its low 4 bits from ql[64h + i + 32 (k & 1)] (high nibble when
/// k >= 2) and its high 2 bits from bits 2k of qh[32h + i]; its scale is scales[8h + 2k + i / 16].
pub(super) fn dequantize_q6_k(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 208);
    for h in 0..2 {
        let ql = &block[64 * h..64 * (h + 1)];
        let qh = &block[128 + 32 * h..128 + 32 * (h + 1)];
        let sc = &block[192 + 8 * h..192 + 8 * (h + 1)];
        let y = &mut out[128 * h..128 * (h + 1)];
        for i in 0..32 {
            let is = i / 16;
            let q1 = ((ql[i] & 0xF) | ((qh[i] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[i + 32] & 0xF) | (((qh[i] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[i] >> 4) | (((qh[i] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[i + 32] >> 4) | (((qh[i] >> 6) & 3) << 4)) as i32 - 32;
            y[i] = d * sc[is] as i8 as f32 * q1 as f32;
            y[i + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
            y[i + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
            y[i + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
        }
    }
}

pub(super) fn quantize_q4_k(x: &[f32], out: &mut [u8]) {
    let levels = quantize_scales_mins(x, 15, -1.0, 20, out);
    for g in 0..4 {
        for i in 0..32 {
            out[16 + 32 * g + i] = levels[64 * g + i] | (levels[64 * g + 32 + i] << 4);
        }
    }
}

pub(super) fn quantize_q5_k(x: &[f32], out: &mut [u8]) {
    let levels = quantize_scales_mins(x, 31, -0.5, 15, out);
    let (qh, ql) = out[16..176].split_at_mut(32);
    qh.fill(0);
    for g in 0..4 {
        for i in 0..32 {
            let (a, b) = (levels[64 * g + i], levels[64 * g + 32 + i]);
            qh[i] |= (a >> 4) << (2 * g) | (b >> 4) << (2 * g + 1);
            ql[32 * g + i] = (a & 0xF) | ((b & 0xF) << 4);
        }
    }
}

/// The part q4_k and q5_k share: each sub-block's scale and minimum fitted (levels 0..=nmax, the
/// search's first trial at rmin, nstep + 1 trials 0.1 apart), written as 6-bit multiples of the
/// super-block's d and dmin into out[0..16], and the levels requantized against them as stored.
fn quantize_scales_mins(x: &[f32], nmax: i32, rmin: f32, nstep: i32, out: &mut [u8]) -> [u8; 256] {
    let mut levels = [0u8; 256];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * (j + 1)];
        let sum_x2 = xs.iter().fold(0f32, |s, v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|i| av_x + xs[i].abs());
        let (scale, min) = make_qkx2_quants(nmax, xs, &weights, &mut levels[32 * j..32 * (j + 1)], rmin, 0.1, nstep);
        (scales[j], mins[j]) = (scale, min);
        max_scale = if scale > max_scale { scale } else { max_scale };
        max_min = if min > max_min { min } else { max_min };
    }

    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        // ggml stores nearest_int into a uint8_t before clamping; `as u8` wraps the same way.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    write_f16(out, 0, max_scale / 63.0);
    write_f16(out, 2, max_min / 63.0);
    out[4..16].copy_from_slice(&packed);

    let (d, dmin) = (read_f16(out, 0), read_f16(out, 2));
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = d * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for i in 32 * j..32 * (j + 1) {
            levels[i] = nearest_int((x[i] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    levels
}

/// Levels 0..=nmax for `x` with scale and minimum fitted by weighted least squares over `nstep` + 1
/// trial scales (ggml's make_qkx2_quants with use_mad = false). Returns (scale, -minimum); x is
/// reconstructed as scale * level - (-minimum).
fn make_qkx2_quants(nmax: i32, x: &[f32], weights: &[f32], levels: &mut [u8], rmin: f32, rdelta: f32, nstep: i32) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        min = if x[i] < min { x[i] } else { min };
        max = if x[i] > max { x[i] } else { max };
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let level = |iscale: f32, v: f32, min: f32| nearest_int(iscale * (v - min)).clamp(0, nmax);
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = level(iscale, x[i], min);
        levels[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut trial = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = level(iscale, x[i], min);
            trial[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut error = 0f32;
            for i in 0..n {
                let diff = this_scale * trial[i] as f32 + this_min - x[i];
                error += weights[i] * (diff * diff);
            }
            if error < best_error {
                levels.copy_from_slice(&trial[..n]);
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

pub(super) fn quantize_q6_k(x: &[f32], out: &mut [u8]) {
    let mut levels = [0u8; 256];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let scale = make_qx_quants(32, &x[16 * ib..16 * (ib + 1)], &mut levels[16 * ib..16 * (ib + 1)]);
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        out.fill(0);
        return;
    }

    // Sub-block scales become int8 multiples of d; the largest maps to -128.
    let iscale = -128.0 / max_scale;
    write_f16(out, 208, 1.0 / iscale);
    let d = read_f16(out, 208);
    for ib in 0..16 {
        out[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    for j in 0..16 {
        let dj = d * out[192 + j] as i8 as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 16 * j..16 * (j + 1) {
            levels[i] = (nearest_int(x[i] / dj).clamp(-32, 31) + 32) as u8;
        }
    }
    for h in 0..2 {
        for i in 0..32 {
            let l = |k: usize| levels[128 * h + 32 * k + i];
            out[64 * h + i] = (l(0) & 0xF) | ((l(2) & 0xF) << 4);
            out[64 * h + 32 + i] = (l(1) & 0xF) | ((l(3) & 0xF) << 4);
            out[128 + 32 * h + i] = (l(0) >> 4) | ((l(1) >> 4) << 2) | ((l(2) >> 4) << 4) | ((l(3) >> 4) << 6);
        }
    }
}

/// Symmetric levels -nmax..nmax-1 (stored + nmax) for `x`, trying 19 scales around -nmax / max and
/// keeping the one with the best x²-weighted fit (ggml's make_qx_quants, rmse_type 1, no weights).
fn make_qx_quants(nmax: i32, x: &[f32], levels: &mut [u8]) -> f32 {
    let (max, amax) = largest_magnitude(x);
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        x.iter().fold((0f32, 0f32), |(sumlx, suml2), &v| {
            let (w, l) = (v * v, level(iscale, v) as f32);
            (sumlx + w * v * l, suml2 + w * l * l)
        })
    };
    let mut iscale = -(nmax as f32) / max;
    for (stored, &v) in levels.iter_mut().zip(x) {
        *stored = (level(iscale, v) + nmax) as u8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (stored, &v) in levels.iter_mut().zip(x) {
                *stored = (level(iscale, v) + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}
