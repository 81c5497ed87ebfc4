// Reads of an f32 or f16 KV pool (kv_t): element `column` of pool row `row`, rows of kv_dim.

fn key_at(row: u32, column: u32, kv_dim: u32) -> f32 {
    return f32(k_cache[row * kv_dim + column]);
}

fn value_at(row: u32, column: u32, kv_dim: u32) -> f32 {
    return f32(v_cache[row * kv_dim + column]);
}
