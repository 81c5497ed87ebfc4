//! q4_0, q4_1, q5_0, q5_1 and q8_0: blocks of 32 weights with one f16 scale (and an f16 minimum
//! for q4_1 and q5_1). Nibble j < 16 of a 4- or 5-bit block is the low half of byte j, nibble j >= 16
//! the high half of byte j - 16; a 5-bit block's fifth bits are the 32 bits of its little-endian qh,
//! bit j for weight j.
//! Quantization does its arithmetic in f32 in the order of ggml's `quantize_row_*_ref` as the `gguf`
//! package computes it, so the bytes are identical.

use super::{largest_magnitude, read_f16, write_f16};

pub(super) fn dequantize_q4_0(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 0);
    for (j, &byte) in block[2..18].iter().enumerate() {
        out[j] = ((byte & 0xF) as i32 - 8) as f32 * d;
        out[j + 16] = ((byte >> 4) as i32 - 8) as f32 * d;
    }
}

pub(super) fn dequantize_q4_1(block: &[u8], out: &mut [f32]) {
    let (d, m) = (read_f16(block, 0), read_f16(block, 2));
    for (j, &byte) in block[4..20].iter().enumerate() {
        out[j] = (byte & 0xF) as f32 * d + m;
        out[j + 16] = (byte >> 4) as f32 * d + m;
    }
}

/// Layout: f16 d, u32 qh, 16 bytes of nibbles; w = d * (q - 16).
pub(super) fn dequantize_q5_0(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 0);
    for (j, q) in five_bit_levels(&block[2..22]).into_iter().enumerate() {
        out[j] = (q as i32 - 16) as f32 * d;
    }
}

/// Layout: f16 d, f16 m, u32 qh, 16 bytes of nibbles; w = d * q + m.
pub(super) fn dequantize_q5_1(block: &[u8], out: &mut [f32]) {
    let (d, m) = (read_f16(block, 0), read_f16(block, 2));
    for (j, q) in five_bit_levels(&block[4..24]).into_iter().enumerate() {
        out[j] = q as f32 * d + m;
    }
}

/// The 32 levels (0..32) of a 5-bit block's qh and nibbles (20 bytes).
fn five_bit_levels(bytes: &[u8]) -> [u8; 32] {
    let qh = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    std::array::from_fn(|j| {
        let nibble = if j < 16 { bytes[4 + j] & 0xF } else { bytes[4 + j - 16] >> 4 };
        nibble | (((qh >> j) & 1) as u8) << 4
    })
}

/// Packs 32 levels (0..32) into a 5-bit block's qh and nibbles (20 bytes).
fn pack_five_bit_levels(levels: &[u8; 32], out: &mut [u8]) {
    let qh = levels.iter().enumerate().fold(0u32, |qh, (j, &l)| qh | (((l >> 4) & 1) as u32) << j);
    out[..4].copy_from_slice(&qh.to_le_bytes());
    for j in 0..16 {
        out[4 + j] = (levels[j] & 0xF) | ((levels[j + 16] & 0xF) << 4);
    }
}

pub(super) fn dequantize_q8_0(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 0);
    for (value, &q) in out.iter_mut().zip(&block[2..34]) {
        *value = q as i8 as f32 * d;
    }
}

/// The scale d of q4_0 and q5_0, which maps the first element of largest magnitude, sign kept, to
/// -`lowest_level` (8, 16), and 1 / d (0 for d = 0).
fn symmetric_scale(x: &[f32], lowest_level: f32) -> (f32, f32) {
    let (max, _) = largest_magnitude(x);
    let d = max / -lowest_level;
    (d, if d != 0.0 { 1.0 / d } else { 0.0 })
}

/// The scale d of q4_1 and q5_1, `steps` (15, 31) of which span the block, 1 / d (0 for d = 0),
/// and the block's minimum.
fn offset_scale(x: &[f32], steps: f32) -> (f32, f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        min = if v < min { v } else { min };
        max = if v > max { v } else { max };
    }
    let d = (max - min) / steps;
    (d, if d != 0.0 { 1.0 / d } else { 0.0 }, min)
}

pub(super) fn quantize_q4_0(x: &[f32], out: &mut [u8]) {
    let (d, id) = symmetric_scale(x, 8.0);
    write_f16(out, 0, d);
    let q = |v: f32| ((v * id + 8.5).trunc() as u8).min(15);
    for j in 0..16 {
        out[2 + j] = q(x[j]) | (q(x[j + 16]) << 4);
    }
}

pub(super) fn quantize_q4_1(x: &[f32], out: &mut [u8]) {
    let (d, id, min) = offset_scale(x, 15.0);
    write_f16(out, 0, d);
    write_f16(out, 2, min);
    let q = |v: f32| (((v - min) * id + 0.5).trunc() as u8).min(15);
    for j in 0..16 {
        out[4 + j] = q(x[j]) | (q(x[j + 16]) << 4);
    }
}

pub(super) fn quantize_q5_0(x: &[f32], out: &mut [u8]) {
    let (d, id) = symmetric_scale(x, 16.0);
    write_f16(out, 0, d);
    // ggml truncates through an int8_t: (v * id + 16.5) is at least 0.5 here.
    let levels = std::array::from_fn(|j| ((x[j] * id + 16.5).trunc() as i8).min(31) as u8);
    pack_five_bit_levels(&levels, &mut out[2..22]);
}

pub(super) fn quantize_q5_1(x: &[f32], out: &mut [u8]) {
    let (d, id, min) = offset_scale(x, 31.0);
    write_f16(out, 0, d);
    write_f16(out, 2, min);
    let levels = std::array::from_fn(|j| (((x[j] - min) * id + 0.5).trunc() as u8).min(31));
    pack_five_bit_levels(&levels, &mut out[4..24]);
}

pub(super) fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    write_f16(out, 0, d);
    for (byte, &v) in out[2..34].iter_mut().zip(x) {
        // roundf: halves away from zero.
        *byte = (v * id).round() as i8 as u8;
    }
}
