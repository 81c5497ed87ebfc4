//! q4_0, q4_1 and q8_0: blocks of 32 weights with one f16 scale (and an f16 minimum for q4_1).
//! Nibble j < 16 of a 4-bit block is the low half of byte j, nibble j >= 16 the high half of byte j - 16.
//! Quantization does its arithmetic in f32 in the order of ggml's `quantize_row_*_ref` as the `gguf`
//! package computes it, so the bytes are identical.

use super::{read_f16, write_f16};

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

pub(super) fn dequantize_q8_0(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 0);
    for (value, &q) in out.iter_mut().zip(&block[2..34]) {
        *value = q as i8 as f32 * d;
    }
}

pub(super) fn quantize_q4_0(x: &[f32], out: &mut [u8]) {
    // The first element of largest magnitude, sign kept, maps to -8.
    let mut max = x[0];
    for &v in &x[1..] {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    write_f16(out, 0, d);
    let q = |v: f32| ((v * id + 8.5).trunc() as u8).min(15);
    for j in 0..16 {
        out[2 + j] = q(x[j]) | (q(x[j + 16]) << 4);
    }
}

pub(super) fn quantize_q4_1(x: &[f32], out: &mut [u8]) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        min = if v < min { v } else { min };
        max = if v > max { v } else { max };
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    write_f16(out, 0, d);
    write_f16(out, 2, min);
    let q = |v: f32| (((v - min) * id + 0.5).trunc() as u8).min(15);
    for j in 0..16 {
        out[4 + j] = q(x[j]) | (q(x[j + 16]) << 4);
    }
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
