// Reads of an f32 or f16 KV pool, bound as arrays of kv_quad_t (vec4 of its type): elements
// column..column + 3 of pool row `row` as f32, rows of kv_dim, column a multiple of 4. One load
// of 16 or 8 bytes per four elements.

fn key_quad(row: u32, column: u32, kv_dim: u32) -> vec4<f32> {
    return vec4<f32>(k_cache[(row * kv_dim + column) / 4u]);
}

fn value_quad(row: u32, column: u32, kv_dim: u32) -> vec4<f32> {
    return vec4<f32>(v_cache[(row * kv_dim + column) / 4u]);
}
