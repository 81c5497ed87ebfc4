// Causal grouped-query attention over the KV cache: token t at position start_pos + t attends to
// cache positions 0..=start_pos + t. Keys are taken in tiles with an online softmax (a running max and
// sum per query, earlier outputs rescaled when the max grows), so no score matrix is stored and any
// context length fits. Entry points:
//   `decode`: one workgroup per (query head, token), its threads splitting each tile's keys; for the
//             few tokens of a decode step, where there are no queries to share keys between.
//   `prefill`: flash-style, one workgroup per (KV head, block of QUERY_BLOCK query rows), the rows
//             being the (token, head) pairs of that KV head's group, token-major; each K/V tile is
//             loaded once into workgroup memory and shared by the block's rows.
// PyTorch: softmax(q @ k.T * scale + causal_mask) @ v, with k/v repeated for each group of query heads

const WG: u32 = 64u;
const MAX_HEAD_DIM: u32 = 256u;
const DIMS_PER_THREAD: u32 = MAX_HEAD_DIM / WG;
const MASKED: f32 = -1.0e30;

struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    scale: f32,    // 1 / sqrt(head_dim)
    q_stride: u32, // elements between token rows of q (q heads lead a stacked q/k/v row)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

struct Step {
    n_tokens: u32,
    start_pos: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> q: array<f32>;         // (n_tokens, q_stride), n_heads heads first
@group(0) @binding(1) var<storage, read> k_cache: array<f32>;   // (context, n_kv_heads, head_dim)
@group(0) @binding(2) var<storage, read> v_cache: array<f32>;   // (context, n_kv_heads, head_dim)
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // (n_tokens, n_heads, head_dim)
@group(0) @binding(4) var<uniform> params: Params;
@group(0) @binding(5) var<uniform> step: Step;

var<workgroup> q_head: array<f32, MAX_HEAD_DIM>;
var<workgroup> scores: array<f32, WG>;
var<workgroup> reduce_max: array<f32, WG>;

@compute @workgroup_size(WG)
fn decode(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let head = wg.x;
    let t = wg.y;
    if (head >= params.n_heads || t >= step.n_tokens) {
        return;
    }
    let hd = params.head_dim;
    let kv_head = head / (params.n_heads / params.n_kv_heads);
    let kv_stride = params.n_kv_heads * hd;
    let pos = step.start_pos + t;
    let q_base = t * params.q_stride + head * hd;
    for (var d = lid.x; d < hd; d += WG) {
        q_head[d] = q[q_base + d];
    }
    workgroupBarrier();

    var running_max = MASKED;
    var running_sum = 0.0;
    var acc: array<f32, DIMS_PER_THREAD>;
    for (var block = 0u; block <= pos; block += WG) {
        // Each thread scores one key of the block.
        let j = block + lid.x;
        var s = MASKED;
        if (j <= pos) {
            let k_base = j * kv_stride + kv_head * hd;
            var dot = 0.0;
            for (var d = 0u; d < hd; d++) {
                dot += q_head[d] * k_cache[k_base + d];
            }
            s = dot * params.scale;
        }
        reduce_max[lid.x] = s;
        workgroupBarrier();
        for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
            if (lid.x < stride) {
                reduce_max[lid.x] = max(reduce_max[lid.x], reduce_max[lid.x + stride]);
            }
            workgroupBarrier();
        }
        let new_max = max(running_max, reduce_max[0]);
        scores[lid.x] = select(0.0, exp(s - new_max), j <= pos);
        workgroupBarrier();

        // Each thread rescales and extends the outputs of its own head dimensions.
        let correction = exp(running_max - new_max);
        let n_keys = min(WG, pos + 1u - block);
        var block_sum = 0.0;
        for (var jj = 0u; jj < n_keys; jj++) {
            block_sum += scores[jj];
        }
        running_sum = running_sum * correction + block_sum;
        for (var i = 0u; i < DIMS_PER_THREAD; i++) {
            let d = lid.x + i * WG;
            if (d < hd) {
                var a = acc[i] * correction;
                for (var jj = 0u; jj < n_keys; jj++) {
                    a += scores[jj] * v_cache[(block + jj) * kv_stride + kv_head * hd + d];
                }
                acc[i] = a;
            }
        }
        running_max = new_max;
        workgroupBarrier();
    }
    for (var i = 0u; i < DIMS_PER_THREAD; i++) {
        let d = lid.x + i * WG;
        if (d < hd) {
            out[(t * params.n_heads + head) * hd + d] = acc[i] / running_sum;
        }
    }
}

const QUERY_BLOCK: u32 = 8u;            // query rows per workgroup
const THREADS_PER_ROW: u32 = WG / QUERY_BLOCK;
const KV_TILE: u32 = 1024u;             // elements of one K or V tile (keys x head_dim)
const MAX_TILE_KEYS: u32 = 32u;
const DIMS_PER_ROW_THREAD: u32 = MAX_HEAD_DIM / THREADS_PER_ROW;

var<workgroup> q_block: array<f32, QUERY_BLOCK * MAX_HEAD_DIM>;  // (QUERY_BLOCK, head_dim), scaled
var<workgroup> kv_tile: array<f32, KV_TILE>; // (tile_keys, head_dim): the K tile, then the V tile
var<workgroup> tile_scores: array<f32, QUERY_BLOCK * MAX_TILE_KEYS>; // (QUERY_BLOCK, tile_keys)

@compute @workgroup_size(WG)
fn prefill(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let kv_head = wg.x;
    let group = params.n_heads / params.n_kv_heads;
    let row0 = wg.y * QUERY_BLOCK;
    let n_rows = step.n_tokens * group;
    if (kv_head >= params.n_kv_heads || row0 >= n_rows) {
        return;
    }
    let hd = params.head_dim;
    let kv_stride = params.n_kv_heads * hd;
    // Fewer keys per tile for wider heads: the tile's size is fixed.
    let tile_keys = min(MAX_TILE_KEYS, KV_TILE / hd);
    // Rows past the last one repeat it; they are computed but not stored.
    let last_pos = step.start_pos + (min(row0 + QUERY_BLOCK, n_rows) - 1u) / group;
    for (var i = li; i < QUERY_BLOCK * hd; i += WG) {
        let row = min(row0 + i / hd, n_rows - 1u);
        let head = kv_head * group + row % group;
        q_block[i] = q[(row / group) * params.q_stride + head * hd + i % hd] * params.scale;
    }

    // Thread li serves row li / THREADS_PER_ROW, head dimensions sub, sub + THREADS_PER_ROW, ...
    let my_row = li / THREADS_PER_ROW;
    let sub = li % THREADS_PER_ROW;
    let my_pos = step.start_pos + min(row0 + my_row, n_rows - 1u) / group;
    // How many of those dimensions lie below head_dim: loops run to it, not to the array's size.
    let my_dims = (hd + THREADS_PER_ROW - 1u - sub) / THREADS_PER_ROW;
    var running_max = MASKED;
    var running_sum = 0.0;
    var acc: array<f32, DIMS_PER_ROW_THREAD>;
    for (var key0 = 0u; key0 <= last_pos; key0 += tile_keys) {
        let n_keys = min(tile_keys, last_pos + 1u - key0);
        for (var i = li; i < n_keys * hd; i += WG) {
            kv_tile[i] = k_cache[(key0 + i / hd) * kv_stride + kv_head * hd + i % hd];
        }
        workgroupBarrier();
        // Scores of every (row, key) pair of the tile, the causal mask applied.
        for (var p = li; p < QUERY_BLOCK * tile_keys; p += WG) {
            let r = p / tile_keys;
            let j = p % tile_keys;
            let pos = step.start_pos + min(row0 + r, n_rows - 1u) / group;
            var s = MASKED;
            if (j < n_keys && key0 + j <= pos) {
                s = 0.0;
                for (var d = 0u; d < hd; d++) {
                    s += q_block[r * hd + d] * kv_tile[j * hd + d];
                }
            }
            tile_scores[p] = s;
        }
        workgroupBarrier();
        for (var i = li; i < n_keys * hd; i += WG) {
            kv_tile[i] = v_cache[(key0 + i / hd) * kv_stride + kv_head * hd + i % hd];
        }
        workgroupBarrier();
        // Each thread updates its row's softmax state (the row's threads alike) and its dimensions.
        let scores = my_row * tile_keys;
        var new_max = running_max;
        for (var j = 0u; j < n_keys; j++) {
            new_max = max(new_max, tile_scores[scores + j]);
        }
        let correction = exp(running_max - new_max);
        running_sum *= correction;
        for (var i = 0u; i < my_dims; i++) {
            acc[i] *= correction;
        }
        for (var j = 0u; j < n_keys; j++) {
            let weight = select(0.0, exp(tile_scores[scores + j] - new_max), key0 + j <= my_pos);
            running_sum += weight;
            for (var i = 0u; i < my_dims; i++) {
                acc[i] += weight * kv_tile[j * hd + sub + i * THREADS_PER_ROW];
            }
        }
        running_max = new_max;
        workgroupBarrier();
    }
    let row = row0 + my_row;
    if (row < n_rows) {
        let head = kv_head * group + row % group;
        for (var i = 0u; i < my_dims; i++) {
            out[((row / group) * params.n_heads + head) * hd + sub + i * THREADS_PER_ROW] = acc[i] / running_sum;
        }
    }
}
