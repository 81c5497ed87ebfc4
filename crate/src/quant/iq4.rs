//! iq4_nl and iq4_xs: 4-bit indices into 16 non-linear int8 levels (denser near zero, where most
//! weights lie), in blocks of 32 with an f16 scale (iq4_nl), or super-blocks of 256 whose eight
//! blocks of 32 carry 6-bit scales of one f16 d (iq4_xs). Nibble j < 16 of a block of 32 is the low
//! half of byte j, nibble j >= 16 the high half of byte j - 16, as in q4_0. The quantizers port
//! ggml's `quantize_row_iq4_nl_impl` (a weighted search over 2 ntry + 1 trial scales, ntry 7 as
//! `quantize_iq4_nl` and `quantize_iq4_xs` call it), operation for operation in f32.

use super::{largest_magnitude, nearest_int, read_f16, write_f16, GROUP_MAX_EPS};

/// ggml's kvalues_iq4nl.
pub const IQ4_LEVELS: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// Values d * level of the 32 nibbles of `qs` (16 bytes).
fn dequantize_block(d: f32, qs: &[u8], out: &mut [f32]) {
    for (j, &byte) in qs[..16].iter().enumerate() {
        out[j] = d * IQ4_LEVELS[(byte & 0xF) as usize] as f32;
        out[j + 16] = d * IQ4_LEVELS[(byte >> 4) as usize] as f32;
    }
}

/// Layout: f16 d, 16 bytes of nibbles.
pub(super) fn dequantize_iq4_nl(block: &[u8], out: &mut [f32]) {
    dequantize_block(read_f16(block, 0), &block[2..18], out);
}

/// The 6-bit scale (less 32) of block `ib` of an iq4_xs super-block: low 4 bits from nibble `ib`
/// of scales_l, high 2 bits from bits 2 ib of scales_h.
fn iq4_xs_scale(block: &[u8], ib: usize) -> i32 {
    let scales_h = u16::from_le_bytes([block[2], block[3]]);
    let low = (block[4 + ib / 2] >> (4 * (ib % 2))) & 0xF;
    let high = ((scales_h >> (2 * ib)) & 3) as u8;
    (low | (high << 4)) as i32 - 32
}

/// Layout: f16 d, u16 scales_h, 4 bytes scales_l, then 16 bytes of nibbles per block of 32.
pub(super) fn dequantize_iq4_xs(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 0);
    for ib in 0..8 {
        let dl = d * iq4_xs_scale(block, ib) as f32;
        dequantize_block(dl, &block[8 + 16 * ib..8 + 16 * (ib + 1)], &mut out[32 * ib..32 * (ib + 1)]);
    }
}

pub(super) fn quantize_iq4_nl(x: &[f32], out: &mut [u8]) {
    let scale = fit_block(x, 7);
    write_f16(out, 0, scale);
    // Requantized against the scale as found, not as stored (ggml's order); an all-zero block's
    // indices are the level nearest 0.
    let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    pack(&std::array::from_fn(|j| nearest_level(id * x[j])), &mut out[2..18]);
}

pub(super) fn quantize_iq4_xs(x: &[f32], out: &mut [u8]) {
    let scales: [f32; 8] = std::array::from_fn(|ib| fit_block(&x[32 * ib..32 * (ib + 1)], 7));
    let (max_scale, _) = largest_magnitude(&scales);
    // Block scales become 6-bit multiples of d, the largest -32.
    let d = -max_scale / 32.0;
    write_f16(out, 0, d);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let (mut scales_h, mut scales_l) = (0u16, [0u8; 4]);
    for (ib, &scale) in scales.iter().enumerate() {
        let l = nearest_int(id * scale).clamp(-32, 31);
        let dl = d * l as f32;
        let idl = if dl != 0.0 { 1.0 / dl } else { 0.0 };
        let xb = &x[32 * ib..32 * (ib + 1)];
        pack(&std::array::from_fn(|j| nearest_level(idl * xb[j])), &mut out[8 + 16 * ib..8 + 16 * (ib + 1)]);
        let l = (l + 32) as u8;
        scales_l[ib / 2] |= (l & 0xF) << (4 * (ib % 2));
        scales_h |= ((l >> 4) as u16) << (2 * ib);
    }
    out[2..4].copy_from_slice(&scales_h.to_le_bytes());
    out[4..8].copy_from_slice(&scales_l);
}

/// The scale of one block of 32 (0 for an all-zero block): the best weighted fit (weights x²) of
/// the levels over the first guess and 2 ntry + 1 trial scales.
fn fit_block(x: &[f32], ntry: i32) -> f32 {
    let (max, amax) = largest_magnitude(x);
    if amax < GROUP_MAX_EPS {
        return 0.0;
    }
    let sums = |id: f32| {
        let (mut sumqx, mut sumq2) = (0f32, 0f32);
        for &v in x {
            let q = IQ4_LEVELS[nearest_level(id * v) as usize] as f32;
            let w = v * v;
            sumqx += w * q * v;
            sumq2 += w * q * q;
        }
        (sumqx, sumq2)
    };
    let first = IQ4_LEVELS[0] as f32;
    let guess = if ntry > 0 { -max / first } else { max / first };
    let (sumqx, sumq2) = sums(1.0 / guess);
    let mut d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
    let mut best = d * sumqx;
    for itry in -ntry..=ntry {
        let (sumqx, sumq2) = sums((itry as f32 + first) / max);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    d
}

/// The index of the level nearest `x` (ggml's best_index_int8; a tie goes to the upper one).
fn nearest_level(x: f32) -> u8 {
    let last = IQ4_LEVELS.len() - 1;
    if x <= IQ4_LEVELS[0] as f32 {
        return 0;
    }
    if x >= IQ4_LEVELS[last] as f32 {
        return last as u8;
    }
    let (mut low, mut high) = (0, last);
    while high - low > 1 {
        let mid = (low + high) / 2;
        if x < IQ4_LEVELS[mid] as f32 {
            high = mid;
        } else {
            low = mid;
        }
    }
    if x - (IQ4_LEVELS[high - 1] as f32) < IQ4_LEVELS[high] as f32 - x {
        (high - 1) as u8
    } else {
        high as u8
    }
}

fn pack(levels: &[u8; 32], out: &mut [u8]) {
    for j in 0..16 {
        out[j] = levels[j] | (levels[j + 16] << 4);
    }
}
