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

// The four int8 values of `word` times `scale`.
fn q8_quad(word: u32, scale: f32) -> vec4<f32> {
    let values = (vec4(bitcast<i32>(word)) << vec4(24u, 16u, 8u, 0u)) >> vec4(24u);
    return vec4<f32>(values) * scale;
}
