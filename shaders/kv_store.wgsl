// Writes the keys and values of a pass's tokens into the KV pool where the q/k/v projection cannot
// write them itself (crate::model::KvPool::staged: a pool of several buffers, or of a quantized
// type): the projection leaves token t's rotated key and its value in row t of k_rows and v_rows,
// and one dispatch per pool buffer stores the tokens whose KV rows lie in it, converted to kv_t.
// Workgroups over (units of a row, tokens); a unit is KV_STORE_UNIT elements (from Rust:
// crate::gpu::KvType::store_unit), converted by lib/kv_store_*.

struct Params {
    kv_dim: u32,     // elements of a row: n_kv_heads * head_dim
    first_row: u32,  // the pool row this buffer starts at
    rows: u32,       // pool rows in this buffer
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> k_rows: array<f32>;          // (n_tokens, kv_dim)
@group(0) @binding(1) var<storage, read> v_rows: array<f32>;          // (n_tokens, kv_dim)
@group(0) @binding(2) var<storage, read_write> k_cache: array<kv_t>;  // this buffer's pool rows
@group(0) @binding(3) var<storage, read_write> v_cache: array<kv_t>;
@group(0) @binding(4) var<uniform> params: Params;
@group(0) @binding(5) var<uniform> step: Step;

const WG: u32 = 64u;

@compute @workgroup_size(WG)
fn store(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let t = wg.y;
    let column = (wg.x * WG + li) * KV_STORE_UNIT;
    if (t >= step.n_tokens || column >= params.kv_dim) {
        return;
    }
    let kv_row = step.slots[t].y;
    if (kv_row < params.first_row || kv_row - params.first_row >= params.rows) {
        return;
    }
    store_unit(t, kv_row - params.first_row, column);
}
