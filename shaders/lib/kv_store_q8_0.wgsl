// kv_store for q8_0 pools: one block of Q8_0_KV_BLOCK elements per unit, quantized as
// crate::gpu::KvType::Q8_0 says (the layout is kv_load_q8_0's).

struct Q8Block {
    words: array<u32, Q8_0_KV_BLOCK / 4u>,
    scale: f32,
}

// d = max |x| / 127 and x / d rounded half away from zero, as ggml's q8_0.
fn q8_0_block(values: array<f32, Q8_0_KV_BLOCK>) -> Q8Block {
    var x = values;
    var largest = 0.0;
    for (var i = 0u; i < Q8_0_KV_BLOCK; i++) {
        largest = max(largest, abs(x[i]));
    }
    var block: Q8Block;
    block.scale = largest / 127.0;
    let inverse = select(0.0, 1.0 / block.scale, block.scale > 0.0);
    for (var i = 0u; i < Q8_0_KV_BLOCK; i++) {
        let v = x[i] * inverse;
        let q = i32(clamp(sign(v) * floor(abs(v) + 0.5), -127.0, 127.0));
        block.words[i / 4u] |= (bitcast<u32>(q) & 0xffu) << (8u * (i % 4u));
    }
    return block;
}

fn store_unit(t: u32, row: u32, column: u32) {
    let kv_dim = params.kv_dim;
    var keys: array<f32, Q8_0_KV_BLOCK>;
    var values: array<f32, Q8_0_KV_BLOCK>;
    for (var i = 0u; i < Q8_0_KV_BLOCK; i++) {
        keys[i] = k_rows[t * kv_dim + column + i];
        values[i] = v_rows[t * kv_dim + column + i];
    }
    let k = q8_0_block(keys);
    let v = q8_0_block(values);
    let first = q8_0_value_word(row, column, kv_dim);
    for (var j = 0u; j < Q8_0_KV_BLOCK / 4u; j++) {
        k_cache[first + j] = k.words[j];
        v_cache[first + j] = v.words[j];
    }
    let scale = q8_0_scale_word(row, column, kv_dim);
    k_cache[scale] = bitcast<u32>(k.scale);
    v_cache[scale] = bitcast<u32>(v.scale);
}
