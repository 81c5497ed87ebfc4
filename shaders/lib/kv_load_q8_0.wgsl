// Reads of a q8_0 KV pool (kv_quad_t is u32: one word holds four values; lib/kv_layout_q8_0 says
// where, lib/q8_block reads them): elements column..column + 3 of pool row `row` as f32, column a
// multiple of 4.

fn key_quad(row: u32, column: u32, kv_dim: u32) -> vec4<f32> {
    return q8_quad(k_cache[q8_0_value_word(row, column, kv_dim)], bitcast<f32>(k_cache[q8_0_scale_word(row, column, kv_dim)]));
}

fn value_quad(row: u32, column: u32, kv_dim: u32) -> vec4<f32> {
    return q8_quad(v_cache[q8_0_value_word(row, column, kv_dim)], bitcast<f32>(v_cache[q8_0_scale_word(row, column, kv_dim)]));
}
