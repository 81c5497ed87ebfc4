//! q2_k, q3_k, q4_k, q5_k and q6_k: super-blocks of 256 weights whose sub-blocks carry quantized
//! scales. The quantizers port ggml's `quantize_row_q2_K_ref`, `quantize_row_q4_K_ref` and
//! `quantize_row_q5_K_ref` (make_qkx2_quants: a weighted search over scale and minimum),
//! `quantize_row_q3_K_ref` (make_q3_quants: symmetric levels refined one at a time) and
//! `quantize_row_q6_K_ref` (make_qx_quants: a search over symmetric scales), operation for
//! operation in f32.

use super::{largest_magnitude, nearest_int, read_f16, write_f16, GROUP_MAX_EPS};

/// The 2-bit level of element `e` of a q2_k or q3_k super-block from its 64 bytes `qs`: in each half
/// h of 128 elements, element 128h + 32k + i is bits 2k..2k + 1 of qs[32h + i].
fn two_bit_level(qs: &[u8], e: usize) -> u8 {
    (qs[32 * (e / 128) + e % 32] >> (2 * (e % 128 / 32))) & 3
}

/// The inverse of [`two_bit_level`]: 256 levels 0..=3 packed into 64 bytes.
fn pack_two_bit_levels(levels: &[u8; 256], qs: &mut [u8]) {
    for h in 0..2 {
        for i in 0..32 {
            let l = |k: usize| levels[128 * h + 32 * k + i];
            qs[32 * h + i] = l(0) | (l(1) << 2) | (l(2) << 4) | (l(3) << 6);
        }
    }
}

/// Layout: 16 bytes of sub-block scale (low nibble) and min (high nibble) for the 16 sub-blocks of
/// 16, qs (64 bytes, [`two_bit_level`]), f16 d, f16 dmin; w = d * scale * q - dmin * min.
pub(super) fn dequantize_q2_k(block: &[u8], out: &mut [f32]) {
    let (d, dmin) = (read_f16(block, 80), read_f16(block, 82));
    for (e, y) in out.iter_mut().enumerate() {
        let sc = block[e / 16];
        let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
        *y = dl * two_bit_level(&block[16..80], e) as f32 - ml;
    }
}

/// The 6-bit scale of q3_k sub-block `j` (0..16) from its 12 packed bytes: the low 4 bits are the
/// low (j < 8) or high nibble of byte j % 8, the high 2 bits bits 2 (j / 4) of byte 8 + j % 4.
fn q3_k_scale(j: usize, packed: &[u8]) -> u8 {
    let low = (packed[j % 8] >> (4 * (j / 8))) & 0xF;
    low | (((packed[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)
}

/// Layout: hmask (32 bytes; the third bit of element e is bit e / 32 of hmask[e % 32]), qs (64
/// bytes, [`two_bit_level`]), 12 bytes of 6-bit scales ([`q3_k_scale`]), f16 d;
/// w = d * (scale - 32) * (q - 4).
pub(super) fn dequantize_q3_k(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 108);
    for (e, y) in out.iter_mut().enumerate() {
        let dl = d * (q3_k_scale(e / 16, &block[96..108]) as i32 - 32) as f32;
        let high = (block[e % 32] >> (e / 32)) & 1;
        *y = dl * (two_bit_level(&block[32..96], e) as i32 - if high == 1 { 0 } else { 4 }) as f32;
    }
}

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

pub(super) fn quantize_q2_k(x: &[f32], out: &mut [u8]) {
    const SEARCH: ScaleSearch = ScaleSearch { rmin: -0.5, rdelta: 0.1, nstep: 15, use_mad: true };
    let mut levels = [0u8; 256];
    let mut scales = [0f32; 16];
    let mut mins = [0f32; 16];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..16 {
        let xs = &x[16 * j..16 * (j + 1)];
        let weights: [f32; 16] = std::array::from_fn(|i| xs[i].abs());
        let (scale, min) = make_qkx2_quants(3, xs, &weights, &mut levels[16 * j..16 * (j + 1)], SEARCH);
        (scales[j], mins[j]) = (scale, min);
        max_scale = if scale > max_scale { scale } else { max_scale };
        max_min = if min > max_min { min } else { max_min };
    }

    // 4-bit multiples of d and dmin; ggml stores the rounded ints into bytes unclamped (the largest
    // is 15 by construction), which `as u8` does the same way.
    out[..16].fill(0);
    write_f16(out, 80, 0.0);
    write_f16(out, 82, 0.0);
    if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        for (byte, scale) in out[..16].iter_mut().zip(scales) {
            *byte = nearest_int(iscale * scale) as u8;
        }
        write_f16(out, 80, max_scale / 15.0);
    }
    if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        for (byte, min) in out[..16].iter_mut().zip(mins) {
            *byte |= (nearest_int(iscale * min) << 4) as u8;
        }
        write_f16(out, 82, max_min / 15.0);
    }
    let (d, dmin) = (read_f16(out, 80), read_f16(out, 82));
    for (j, &sc) in out[..16].iter().enumerate() {
        let dj = d * (sc & 0xF) as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * (sc >> 4) as f32;
        for i in 16 * j..16 * (j + 1) {
            levels[i] = nearest_int((x[i] + dm) / dj).clamp(0, 3) as u8;
        }
    }
    pack_two_bit_levels(&levels, &mut out[16..80]);
}

pub(super) fn quantize_q3_k(x: &[f32], out: &mut [u8]) {
    let mut levels = [0u8; 256];
    let scales: [f32; 16] = std::array::from_fn(|j| make_q3_quants(4, &x[16 * j..16 * (j + 1)], &mut levels[16 * j..16 * (j + 1)]));
    let (max_scale, _) = largest_magnitude(&scales);

    // Sub-block scales become 6-bit multiples of d, stored + 32; the largest maps to -32.
    let packed = &mut out[96..108];
    packed.fill(0);
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for (j, &scale) in scales.iter().enumerate() {
            let l = (nearest_int(iscale * scale).clamp(-32, 31) + 32) as u8;
            packed[j % 8] |= (l & 0xF) << (4 * (j / 8));
            packed[8 + j % 4] |= (l >> 4) << (2 * (j / 4));
        }
        write_f16(out, 108, 1.0 / iscale);
    } else {
        write_f16(out, 108, 0.0);
    }
    let d = read_f16(out, 108);
    for j in 0..16 {
        let dj = d * (q3_k_scale(j, &out[96..108]) as i32 - 32) as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 16 * j..16 * (j + 1) {
            levels[i] = (nearest_int(x[i] / dj).clamp(-4, 3) + 4) as u8;
        }
    }
    // Levels 4..=7 keep their third bit in hmask, the rest their two low bits in qs.
    out[..32].fill(0);
    for (e, level) in levels.iter_mut().enumerate() {
        if *level > 3 {
            out[e % 32] |= 1 << (e / 32);
            *level -= 4;
        }
    }
    pack_two_bit_levels(&levels, &mut out[32..96]);
}

/// Symmetric levels -nmax..nmax-1 (stored + nmax) for `x` from the scale -nmax / max, then each
/// level moved where that improves the x²-weighted fit, up to 5 rounds (ggml's make_q3_quants
/// with do_rmse). Returns the fitted scale.
fn make_q3_quants(nmax: i32, x: &[f32], levels: &mut [u8]) -> f32 {
    let (max, amax) = largest_magnitude(x);
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let mut signed = [0i32; 16];
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (l, &v) in signed.iter_mut().zip(x) {
        *l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        let w = v * v;
        sumlx += w * v * *l as f32;
        suml2 += w * *l as f32 * *l as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (l, &v) in signed.iter_mut().zip(x) {
            let w = v * v;
            let mut slx = sumlx - w * v * *l as f32;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * *l as f32 * *l as f32;
                let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != *l {
                    slx += w * v * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        (*l, sumlx, suml2) = (new_l, slx, sl2);
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for (stored, l) in levels.iter_mut().zip(signed) {
        *stored = (l + nmax) as u8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

pub(super) fn quantize_q4_k(x: &[f32], out: &mut [u8]) {
    let levels = quantize_scales_mins(x, 15, ScaleSearch { rmin: -1.0, rdelta: 0.1, nstep: 20, use_mad: false }, out);
    for g in 0..4 {
        for i in 0..32 {
            out[16 + 32 * g + i] = levels[64 * g + i] | (levels[64 * g + 32 + i] << 4);
        }
    }
}

pub(super) fn quantize_q5_k(x: &[f32], out: &mut [u8]) {
    let levels = quantize_scales_mins(x, 31, ScaleSearch { rmin: -0.5, rdelta: 0.1, nstep: 15, use_mad: false }, out);
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

/// The part q4_k and q5_k share: each sub-block's scale and minimum fitted (levels 0..=nmax),
/// written as 6-bit multiples of the super-block's d and dmin into out[0..16], and the levels
/// requantized against them as stored.
fn quantize_scales_mins(x: &[f32], nmax: i32, search: ScaleSearch, out: &mut [u8]) -> [u8; 256] {
    let mut levels = [0u8; 256];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * (j + 1)];
        let sum_x2 = xs.iter().fold(0f32, |s, v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|i| av_x + xs[i].abs());
        let (scale, min) = make_qkx2_quants(nmax, xs, &weights, &mut levels[32 * j..32 * (j + 1)], search);
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

/// The trial scales of [`make_qkx2_quants`]: nstep + 1 of them, (nmax + rmin + rdelta i) / range,
/// each fit judged by its weighted absolute (use_mad) or squared error.
#[derive(Clone, Copy)]
struct ScaleSearch {
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
}

/// Levels 0..=nmax for `x` with scale and minimum fitted by weighted least squares over the trial
/// scales of `search` (ggml's make_qkx2_quants). Returns (scale, -minimum); x is reconstructed as
/// scale * level - (-minimum).
fn make_qkx2_quants(nmax: i32, x: &[f32], weights: &[f32], levels: &mut [u8], search: ScaleSearch) -> (f32, f32) {
    let ScaleSearch { rmin, rdelta, nstep, use_mad } = search;
    let error_of = |diff: f32| if use_mad { diff.abs() } else { diff * diff };
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
        best_error += weights[i] * error_of(scale * l as f32 + min - x[i]);
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
                error += weights[i] * error_of(this_scale * trial[i] as f32 + this_min - x[i]);
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
    let scales: [f32; 16] = std::array::from_fn(|ib| make_qx_quants(32, &x[16 * ib..16 * (ib + 1)], &mut levels[16 * ib..16 * (ib + 1)]));
    let (max_scale, max_abs_scale) = largest_magnitude(&scales);
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
