// kv_store for q8_0 pools: one block of Q8_BLOCK elements per unit, quantized by lib/q8_block
// as crate::gpu::KvType::Q8_0 says (the layout is kv_load_q8_0's).

fn store_unit(t: u32, row: u32, column: u32) {
    let kv_dim = params.kv_dim;
    var keys: array<f32, Q8_BLOCK>;
    var values: array<f32, Q8_BLOCK>;
    for (var i = 0u; i < Q8_BLOCK; i++) {
        keys[i] = k_rows[t * kv_dim + column + i];
        values[i] = v_rows[t * kv_dim + column + i];
    }
    let k = q8_block(keys);
    let v = q8_block(values);
    let first = q8_0_value_word(row, column, kv_dim);
    for (var j = 0u; j < Q8_BLOCK / 4u; j++) {
        k_cache[first + j] = k.words[j];
        v_cache[first + j] = v.words[j];
    }
    let scale = q8_0_scale_word(row, column, kv_dim);
    k_cache[scale] = bitcast<u32>(k.scale);
    v_cache[scale] = bitcast<u32>(v.scale);
}
