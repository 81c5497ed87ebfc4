// Quantizing Q8_BLOCK values to int8 and a scale, ggml's q8_0 rule with the scale kept in f32
// (crate::gpu::kernels::quantize_q8_block is the CPU's), for a q8_0 KV pool's rows (kv_store) and
// the matmuls' quantized inputs (quantize); and reading four of them back.

struct Q8Block {
    words: array<u32, Q8_BLOCK / 4u>, // value i in byte i % 4 of word i / 4
    scale: f32,
    quant_sum: i32,                   // the sum of the int8 values
}

// d = max |x| / 127 and x / d rounded half away from zero.
fn q8_block(values: array<f32, Q8_BLOCK>) -> Q8Block {
    var x = values;
    var largest = 0.0;
    for (var i = 0u; i < Q8_BLOCK; i++) {
        largest = max(largest, abs(x[i]));
    }
    var block: Q8Block;
    block.scale = largest / 127.0;
    let inverse = select(0.0, 1.0 / block.scale, block.scale > 0.0);
    for (var i = 0u; i < Q8_BLOCK; i++) {
        let v = x[i] * inverse;
        let q = i32(clamp(sign(v) * floor(abs(v) + 0.5), -127.0, 127.0));
        block.words[i / 4u] |= (bitcast<u32>(q) & 0xffu) << (8u * (i % 4u));
        block.quant_sum += q;
    }
    return block;
}

// Whole numbers v - offset as f32 (v and offset under 2^23), exactly, without integer-to-float
// conversions: the bits of v go into the mantissa of 2^23, and 2^23 + offset is taken away. An OR
// and a subtraction at the full rate, where a u32-to-f32 conversion runs at 16 a clock per SM on
// NVIDIA (CUDA's throughput table; FMAs at 64 to 128): in the GEMVs it would bound q4_0 at about
// half an H200's bandwidth.
fn values_from_bits(v: vec4<u32>, offset: f32) -> vec4<f32> {
    return bitcast<vec4<f32>>(v | vec4(0x4b000000u)) - (8388608.0 + offset);
}

// The four int8 values of `word` (byte i value i) plus 128 each, as u32: each byte's sign bit flipped.
fn biased_bytes(word: u32) -> vec4<u32> {
    return (vec4(word ^ 0x80808080u) >> vec4(0u, 8u, 16u, 24u)) & vec4(0xffu);
}

// The four int8 values of `word`.
fn int8_values(word: u32) -> vec4<f32> {
    return values_from_bits(biased_bytes(word), 128.0);
}

// The four int8 values of `word` times `scale`.
fn q8_quad(word: u32, scale: f32) -> vec4<f32> {
    return int8_values(word) * scale;
}
