// Reads of a q8_0 KV pool (kv_t is u32): a row is its kv_dim int8 values, four to a word, then its
// kv_dim / Q8_BLOCK f32 scales (crate::gpu::KvType::Q8_0).

fn q8_0_row_words(kv_dim: u32) -> u32 {
    return kv_dim / 4u + kv_dim / Q8_BLOCK;
}

// The word holding element `column` of pool row `row`.
fn q8_0_value_word(row: u32, column: u32, kv_dim: u32) -> u32 {
    return row * q8_0_row_words(kv_dim) + column / 4u;
}

// The word holding the scale of element `column` of pool row `row`.
fn q8_0_scale_word(row: u32, column: u32, kv_dim: u32) -> u32 {
    return row * q8_0_row_words(kv_dim) + kv_dim / 4u + column / Q8_BLOCK;
}

fn q8_0_value(word: u32, column: u32, scale: u32) -> f32 {
    return f32(extractBits(bitcast<i32>(word), 8u * (column % 4u), 8u)) * bitcast<f32>(scale);
}

fn key_at(row: u32, column: u32, kv_dim: u32) -> f32 {
    return q8_0_value(k_cache[q8_0_value_word(row, column, kv_dim)], column, k_cache[q8_0_scale_word(row, column, kv_dim)]);
}

fn value_at(row: u32, column: u32, kv_dim: u32) -> f32 {
    return q8_0_value(v_cache[q8_0_value_word(row, column, kv_dim)], column, v_cache[q8_0_scale_word(row, column, kv_dim)]);
}
