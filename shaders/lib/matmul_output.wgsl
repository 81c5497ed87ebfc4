// Where a matmul's products go, by the OUTPUT override (the op after the matmul fused): into
// `out` (overwritten or accumulated), or rotated by RoPE into q and the KV pool (or the staging
// rows kv_store moves into it).

// The weight row that output slot `slot` of this part computes. Rotary output takes each head's
// rows in rotation pairs, dims i and i + head_dim / 2 in slots 2m and 2m + 1, so that whoever
// computes one (a GEMV workgroup of an even number of rows, a tile thread's 4 rows) has the other.
// Parts and stacked blocks start at whole heads (the host splits them so).
fn matrix_row(slot: u32) -> u32 {
    if (OUTPUT == OUTPUT_ROWS) {
        return slot;
    }
    let half = params.head_dim / 2u;
    let pair = slot / 2u;
    return pair / half * params.head_dim + pair % half + slot % 2u * half;
}

// Token t's value of output slot `slot` stored; `partner` is the value of slot ^ 1, which rotary
// output rotates it with.
fn store(t: u32, slot: u32, value: f32, partner: f32) {
    let column = params.row_start + matrix_row(slot);
    if (OUTPUT == OUTPUT_ROWS) {
        let i = t * params.out_stride + column;
        out[i] = select(value, out[i] + value, params.accumulate == 1u);
        return;
    }
    let pos = step.slots[t].x;
    // A staged pool takes its rows from kv_store: here k and v go to the token's own row.
    let kv_row = select(step.slots[t].y, t, params.kv_staged == 1u);
    if (column >= params.q_dim + params.kv_dim) {
        v_cache[kv_row * params.kv_dim + column - params.q_dim - params.kv_dim] = kv_t(value);
        return;
    }
    // An even slot holds x1 (dim i), an odd one x2 (dim i + half): (x1 cos - x2 sin, x2 cos + x1 sin).
    let half = params.head_dim / 2u;
    let cs = cos_sin[pos * half + column % half];
    let rotated = value * cs.x + select(partner, -partner, slot % 2u == 0u) * cs.y;
    if (column < params.q_dim) {
        out[t * params.out_stride + column] = rotated;
    } else {
        k_cache[kv_row * params.kv_dim + column - params.q_dim] = kv_t(rotated);
    }
}
