// Reads of a q8_0 KV pool (kv_quad_t is u32: one word holds four values; lib/kv_layout_q8_0 says
// where): elements column..column + 3 of pool row `row` as f32, column a multiple of 4.

fn q8_0_quad(word: u32, scale: u32) -> vec4<f32> {
    let values = (vec4(bitcast<i32>(word)) << vec4(24u, 16u, 8u, 0u)) >> vec4(24u);
    return vec4<f32>(values) * bitcast<f32>(scale);
}

fn key_quad(row: u32, column: u32, kv_dim: u32) -> vec4<f32> {
    return q8_0_quad(k_cache[q8_0_value_word(row, column, kv_dim)], k_cache[q8_0_scale_word(row, column, kv_dim)]);
}

fn value_quad(row: u32, column: u32, kv_dim: u32) -> vec4<f32> {
    return q8_0_quad(v_cache[q8_0_value_word(row, column, kv_dim)], v_cache[q8_0_scale_word(row, column, kv_dim)]);
}
