//! The grid formats, iq1_s, iq1_m, iq2_xxs, iq2_xs, iq2_s, iq3_xxs and iq3_s: super-blocks of 256
//! weights in 8 blocks of 32, each block 4 groups of 8 weights whose magnitudes are one point of a
//! fixed grid (iq3: two points of 4), named by an 8- to 11-bit index, with a sign bit per weight
//! (iq1: no signs, an offset of +-1/8 instead) and a scale per block or half block. Decoded as
//! ggml's `dequantize_row_iq*`, operation for operation in f32. Files come in these formats
//! quantized with an importance matrix (llama.cpp's `llama-quantize --imatrix`); nothing here
//! encodes them.

use super::iq_grid_tables::{IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID};
use super::read_f16;

/// iq1's offset of every weight from its grid value, +-1/8 (ggml's IQ1S_DELTA).
pub const IQ1_DELTA: f32 = 0.125;

/// ggml's ksigns_iq2xs: 7 stored sign bits and an eighth that makes their count even.
pub fn sign_bits(stored: u32) -> u8 {
    let stored = stored & 127;
    (stored | ((stored.count_ones() & 1) << 7)) as u8
}

fn u16_at(block: &[u8], offset: usize) -> u32 {
    u16::from_le_bytes([block[offset], block[offset + 1]]) as u32
}

fn u32_at(block: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes([block[offset], block[offset + 1], block[offset + 2], block[offset + 3]])
}

/// Weights `scale * (+-point[j])` of a group (or half group), weight j negative where bit j of
/// `signs` is set.
fn signed_points(scale: f32, points: &[u8], signs: u32, out: &mut [f32]) {
    for (j, (&point, out)) in points.iter().zip(out).enumerate() {
        let value = point as f32;
        *out = scale * if signs >> j & 1 == 1 { -value } else { value };
    }
}

/// Layout: f16 d, then per block of 32 two u32: the 4 groups' 8-bit grid indices, then their
/// 7-bit sign indices (bits 7l..) and a 4-bit scale (bits 28..); w = d (0.5 + scale) / 4 * +-point.
pub(super) fn dequantize_iq2_xxs(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 0);
    for (ib, out) in out.chunks_exact_mut(32).enumerate() {
        let (indices, signs) = (u32_at(block, 2 + 8 * ib), u32_at(block, 6 + 8 * ib));
        let db = d * (0.5 + (signs >> 28) as f32) * 0.25;
        for (l, out) in out.chunks_exact_mut(8).enumerate() {
            let point = &IQ2XXS_GRID[(indices >> (8 * l) & 255) as usize];
            signed_points(db, point, sign_bits(signs >> (7 * l)) as u32, out);
        }
    }
}

/// Layout: f16 d, 32 u16 (one a group: a 9-bit grid index, a 7-bit sign index), 8 bytes of 4-bit
/// scales (a block's low nibble for its first 16 weights, its high for the others).
pub(super) fn dequantize_iq2_xs(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 0);
    for (ib, out) in out.chunks_exact_mut(32).enumerate() {
        let scales = block[66 + ib] as u32;
        for (l, out) in out.chunks_exact_mut(8).enumerate() {
            let db = d * (0.5 + (scales >> (4 * (l / 2)) & 15) as f32) * 0.25;
            let q = u16_at(block, 2 + 2 * (4 * ib + l));
            signed_points(db, &IQ2XS_GRID[(q & 511) as usize], sign_bits(q >> 9) as u32, out);
        }
    }
}

/// Layout: f16 d, 32 bytes of the grid indices' low 8 bits, 32 bytes of signs (one a group), 8
/// bytes of their high 2 bits (2l.. for group l of the block), 8 bytes of scales as iq2_xs's.
pub(super) fn dequantize_iq2_s(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 0);
    for (ib, out) in out.chunks_exact_mut(32).enumerate() {
        let (high, scales) = (block[66 + ib] as usize, block[74 + ib] as u32);
        for (l, out) in out.chunks_exact_mut(8).enumerate() {
            let db = d * (0.5 + (scales >> (4 * (l / 2)) & 15) as f32) * 0.25;
            let index = block[2 + 4 * ib + l] as usize | (high << (8 - 2 * l) & 0x300);
            signed_points(db, &IQ2S_GRID[index], block[34 + 4 * ib + l] as u32, out);
        }
    }
}

/// Layout: f16 d, 64 bytes of 8-bit indices of 4-value points (two a group), then per block a
/// u32 of iq2_xxs's sign indices and scale; w = d (0.5 + scale) / 2 * +-point.
pub(super) fn dequantize_iq3_xxs(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 0);
    for (ib, out) in out.chunks_exact_mut(32).enumerate() {
        let signs = u32_at(block, 66 + 4 * ib);
        let db = d * (0.5 + (signs >> 28) as f32) * 0.5;
        for (l, out) in out.chunks_exact_mut(8).enumerate() {
            let group_signs = sign_bits(signs >> (7 * l)) as u32;
            let at = 2 + 8 * ib + 2 * l;
            signed_points(db, &IQ3XXS_GRID[block[at] as usize], group_signs, &mut out[..4]);
            signed_points(db, &IQ3XXS_GRID[block[at + 1] as usize], group_signs >> 4, &mut out[4..]);
        }
    }
}

/// Layout: f16 d, 64 bytes of the 9-bit indices' low bits (two 4-value points a group), 8 bytes of
/// their ninth bits (bit i of a block's byte for its index i), 32 bytes of signs (one a group), 4
/// bytes of 4-bit scales (block ib's nibble ib % 2 of byte ib / 2); w = d (1 + 2 scale) * +-point.
pub(super) fn dequantize_iq3_s(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 0);
    for (ib, out) in out.chunks_exact_mut(32).enumerate() {
        let db = d * (1 + 2 * (block[106 + ib / 2] >> (4 * (ib % 2)) & 15) as i32) as f32;
        let high = block[66 + ib] as usize;
        for (l, out) in out.chunks_exact_mut(8).enumerate() {
            let signs = block[74 + 4 * ib + l] as u32;
            let index = |i: usize| block[2 + 8 * ib + i] as usize | (high >> i & 1) << 8;
            signed_points(db, &IQ3S_GRID[index(2 * l)], signs, &mut out[..4]);
            signed_points(db, &IQ3S_GRID[index(2 * l + 1)], signs >> 4, &mut out[4..]);
        }
    }
}

/// Weights `scale * (point[j] + delta)` of a group of iq1 (point values -1, 0, 1).
fn offset_points(scale: f32, point: &[u8; 8], delta: f32, out: &mut [f32]) {
    for (&value, out) in point.iter().zip(out) {
        *out = scale * (value as i8 as f32 + delta);
    }
}

/// Layout: f16 d, 32 bytes of the 11-bit indices' low bits, then per block a u16: the groups' high
/// 3 bits (3l..), a 3-bit scale (12..) and the sign of delta (15); w = d (2 scale + 1) (point + delta).
pub(super) fn dequantize_iq1_s(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 0);
    for (ib, out) in out.chunks_exact_mut(32).enumerate() {
        let qh = u16_at(block, 34 + 2 * ib);
        let dl = d * (2 * (qh >> 12 & 7) + 1) as f32;
        let delta = if qh & 0x8000 != 0 { -IQ1_DELTA } else { IQ1_DELTA };
        for (l, out) in out.chunks_exact_mut(8).enumerate() {
            let index = block[2 + 4 * ib + l] as usize | ((qh >> (3 * l) & 7) << 8) as usize;
            offset_points(dl, &IQ1S_GRID[index], delta, out);
        }
    }
}

/// iq1_m's f16 d, its 16 bits the top nibbles of the 4 u16 of scales at byte 48.
pub(super) fn iq1_m_d(block: &[u8]) -> f32 {
    let sc = |i: usize| u16_at(block, 48 + 2 * i);
    let bits = (sc(0) >> 12) | (sc(1) >> 8 & 0xf0) | (sc(2) >> 4 & 0xf00) | (sc(3) & 0xf000);
    half::f16::from_bits(bits as u16).to_f32()
}

/// Layout: 32 bytes of the 11-bit indices' low bits, 16 bytes of their high 3 bits and delta's
/// sign (a nibble a group: bits 0..2 and 3), 8 bytes of 3-bit scales of half blocks (four a u16,
/// beside the bits of d); w = d (2 scale + 1) (point + delta).
pub(super) fn dequantize_iq1_m(block: &[u8], out: &mut [f32]) {
    let d = iq1_m_d(block);
    for (ib, out) in out.chunks_exact_mut(32).enumerate() {
        let scales = u16_at(block, 48 + 2 * (ib / 2)) >> (6 * (ib % 2));
        for (l, out) in out.chunks_exact_mut(8).enumerate() {
            let dl = d * (2 * (scales >> (3 * (l / 2)) & 7) + 1) as f32;
            let nibble = block[32 + 2 * ib + l / 2] as u32 >> (4 * (l % 2)) & 15;
            let index = block[4 * ib + l] as usize | ((nibble & 7) << 8) as usize;
            let delta = if nibble & 8 != 0 { -IQ1_DELTA } else { IQ1_DELTA };
            offset_points(dl, &IQ1S_GRID[index], delta, out);
        }
    }
}
