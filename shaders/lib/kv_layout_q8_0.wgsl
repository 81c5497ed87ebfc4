// Where a q8_0 KV pool (kv_t is u32) keeps an element: a row is its kv_dim int8 values, four to a
// word, then its kv_dim / Q8_BLOCK f32 scales (crate::gpu::KvType::Q8_0).

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
