// kv_store for f32 and f16 pools: one element per unit.

fn store_unit(t: u32, row: u32, column: u32) {
    let kv_dim = params.kv_dim;
    k_cache[row * kv_dim + column] = kv_t(k_rows[t * kv_dim + column]);
    v_cache[row * kv_dim + column] = kv_t(v_rows[t * kv_dim + column]);
}
