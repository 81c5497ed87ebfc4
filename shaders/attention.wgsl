// Causal grouped-query attention over the KV cache: token t at position start_pos + t attends to
// cache positions 0..=start_pos + t. Flash-style: one workgroup per (KV head, block of QUERY_BLOCK
// query rows, key split), the rows being the (token, head) pairs of that KV head's group,
// token-major. Prefill (`attend`) loads each K/V tile once into workgroup memory, shared by the
// block's rows; decode (`attend_by_key`) gives each thread a key. In both an online softmax (a running max and sum per row, earlier outputs rescaled when the max grows)
// means no score matrix is stored and any context length fits.
// Key splits (flash-decoding): a decode step has one query row per head, too few workgroups to fill
// a GPU or to hide the latency of a long context, so its keys are cut into step.key_splits ranges of
// step.keys_per_split, attended in parallel. Each split writes its rows' unnormalised outputs, max
// and sum to `partials`, and `combine` merges them. A pass of one split writes `out` directly.
// Entry points: `attend` (prefill), `attend_by_key` (decode, whole or split), `combine` (after a
// split pass).
// PyTorch: softmax(q @ k.T * scale + causal_mask) @ v, with k/v repeated for each group of query heads

const WG: u32 = 64u;
const MAX_HEAD_DIM: u32 = 256u;
const MASKED: f32 = -1.0e30;
// The most key splits any pass has (crate::gpu::ops::MAX_KEY_SPLITS).
const MAX_KEY_SPLITS: u32 = 32u;

struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    scale: f32,          // 1 / sqrt(head_dim)
    q_stride: u32,       // elements between token rows of q (q heads lead a stacked q/k/v row)
    split_stride: u32,   // partials per (token, head): the most key splits a pass has
    stats_offset: u32,   // where the (max, sum) pairs start in partials
    _pad: u32,
}

struct Step {
    n_tokens: u32,
    start_pos: u32,
    keys_per_split: u32, // keys each split attends to, the last one fewer
    key_splits: u32,     // splits of this pass (their keys cover start_pos + n_tokens); 1: attend writes out
}

@group(0) @binding(0) var<storage, read> q: array<f32>;              // (n_tokens, q_stride), n_heads heads first
@group(0) @binding(1) var<storage, read> k_cache: array<f32>;        // (context, n_kv_heads, head_dim)
@group(0) @binding(2) var<storage, read> v_cache: array<f32>;        // (context, n_kv_heads, head_dim)
@group(0) @binding(3) var<storage, read_write> out: array<f32>;      // (n_tokens, n_heads, head_dim)
@group(0) @binding(4) var<storage, read_write> partials: array<f32>; // (n_tokens, n_heads, split_stride) outputs of head_dim, then their (max, sum) at stats_offset
@group(0) @binding(5) var<uniform> params: Params;
@group(0) @binding(6) var<uniform> step: Step;

// Query rows per workgroup, a power of two up to MAX_QUERY_BLOCK: for the few tokens of a decode
// pass the GQA group's size rounded up, so that a token's heads fill a block (crate::gpu::ops).
override QUERY_BLOCK: u32 = 8u;
override THREADS_PER_ROW: u32 = WG / QUERY_BLOCK;
const MAX_QUERY_BLOCK: u32 = 8u;
const KV_TILE: u32 = 1024u;             // elements of one K or V tile (keys x head_dim)
const KV_TILE_PER_THREAD: u32 = KV_TILE / WG;
const MAX_TILE_KEYS: u32 = 32u;
const DIMS_PER_ROW_THREAD: u32 = MAX_HEAD_DIM / (WG / MAX_QUERY_BLOCK); // the most per thread

var<workgroup> q_block: array<f32, MAX_QUERY_BLOCK * MAX_HEAD_DIM>;  // (QUERY_BLOCK, head_dim), scaled
var<workgroup> kv_tile: array<f32, KV_TILE>; // (tile_keys, head_dim): the K tile, then the V tile
var<workgroup> tile_scores: array<f32, MAX_QUERY_BLOCK * MAX_TILE_KEYS>; // (QUERY_BLOCK, tile_keys)

// One thread's share of a K/V tile: elements li, li + WG, ... of the tile's keys x head_dim.
struct TileShare {
    k: array<f32, KV_TILE_PER_THREAD>,
    v: array<f32, KV_TILE_PER_THREAD>,
}

// Thread li's share of the tile of keys [key0, end_key) (at most tile_keys of them; none if key0 is
// past the end).
fn load_tile(key0: u32, end_key: u32, tile_keys: u32, kv_head: u32, li: u32) -> TileShare {
    var share: TileShare;
    if (key0 >= end_key) {
        return share;
    }
    let hd = params.head_dim;
    let n = min(tile_keys, end_key - key0) * hd;
    for (var i = 0u; i < KV_TILE_PER_THREAD; i++) {
        let e = li + i * WG;
        if (e < n) {
            let at = (key0 + e / hd) * params.n_kv_heads * hd + kv_head * hd + e % hd;
            share.k[i] = k_cache[at];
            share.v[i] = v_cache[at];
        }
    }
    return share;
}

// The query rows a workgroup attends for: the block of QUERY_BLOCK rows of KV head kv_head, and
// the keys [first_key, end_key) of its split. The same for all its threads (its loops hold barriers).
struct Block {
    live: bool,     // false: a workgroup past the pass's rows or splits
    kv_head: u32,
    group: u32,     // query heads per KV head
    row0: u32,
    n_rows: u32,
    split: u32,
    first_key: u32,
    end_key: u32,
}

// Thread li serves row li / THREADS_PER_ROW of its block, head dimensions sub, sub +
// THREADS_PER_ROW, ...
struct Share {
    my_row: u32,
    sub: u32,
    my_pos: u32,
    // How many of those dimensions lie below head_dim: loops stop there. Their constant bound
    // beside it lets the compiler unroll them and keep acc in registers.
    my_dims: u32,
}

fn block_of(wg: vec3<u32>) -> Block {
    var b: Block;
    b.kv_head = wg.x;
    b.group = params.n_heads / params.n_kv_heads;
    b.row0 = wg.y * QUERY_BLOCK;
    b.split = wg.z;
    b.n_rows = step.n_tokens * b.group;
    b.live = b.kv_head < params.n_kv_heads && b.row0 < b.n_rows && b.split < step.key_splits;
    if (!b.live) {
        return b;
    }
    // Rows past the last one repeat it; they are computed but not stored.
    let last_pos = step.start_pos + (min(b.row0 + QUERY_BLOCK, b.n_rows) - 1u) / b.group;
    // This split's keys (the splits cover the step's context).
    b.first_key = b.split * step.keys_per_split;
    b.end_key = min(b.first_key + step.keys_per_split, last_pos + 1u);
    return b;
}

fn share_of(b: Block, li: u32) -> Share {
    let my_row = li / THREADS_PER_ROW;
    let sub = li % THREADS_PER_ROW;
    return Share(my_row, sub, row_pos(b, my_row), (params.head_dim + THREADS_PER_ROW - 1u - sub) / THREADS_PER_ROW);
}

// The position of the block's row r (rows past the last repeat it), the last key it attends to.
fn row_pos(b: Block, r: u32) -> u32 {
    return step.start_pos + min(b.row0 + r, b.n_rows - 1u) / b.group;
}

// The block's queries into q_block, scaled; the caller waits at a barrier before reading them.
fn load_queries(b: Block, li: u32) {
    let hd = params.head_dim;
    for (var i = li; i < QUERY_BLOCK * hd; i += WG) {
        let row = min(b.row0 + i / hd, b.n_rows - 1u);
        let head = b.kv_head * b.group + row % b.group;
        q_block[i] = q[(row / b.group) * params.q_stride + head * hd + i % hd] * params.scale;
    }
}

// A thread's row of outputs once its split's keys are attended: to `out` in a pass of one split,
// else unnormalised to `partials` with the row's (max, sum).
fn store_row(b: Block, t: Share, acc: array<f32, DIMS_PER_ROW_THREAD>, running_max: f32, running_sum: f32) {
    let row = b.row0 + t.my_row;
    if (row >= b.n_rows) {
        return;
    }
    let hd = params.head_dim;
    let token_head = (row / b.group) * params.n_heads + b.kv_head * b.group + row % b.group;
    if (step.key_splits == 1u) {
        for (var i = 0u; i < DIMS_PER_ROW_THREAD && i < t.my_dims; i++) {
            out[token_head * hd + t.sub + i * THREADS_PER_ROW] = acc[i] / running_sum;
        }
        return;
    }
    // A row with no keys in this split (a token before the split's first key) leaves max MASKED,
    // sum 0 and outputs 0, which combine weighs as nothing.
    let partial = token_head * params.split_stride + b.split;
    for (var i = 0u; i < DIMS_PER_ROW_THREAD && i < t.my_dims; i++) {
        partials[partial * hd + t.sub + i * THREADS_PER_ROW] = acc[i];
    }
    if (t.sub == 0u) {
        partials[params.stats_offset + 2u * partial] = running_max;
        partials[params.stats_offset + 2u * partial + 1u] = running_sum;
    }
}

// Prefill (many query rows per KV head): K/V tiles staged in workgroup memory, shared by the
// block's rows.
@compute @workgroup_size(WG)
fn attend(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let b = block_of(wg);
    if (!b.live) {
        return;
    }
    let t = share_of(b, li);
    let hd = params.head_dim;
    // Fewer keys per tile for wider heads: the tile's size is fixed.
    let tile_keys = min(MAX_TILE_KEYS, KV_TILE / hd);
    load_queries(b, li);
    var running_max = MASKED;
    var running_sum = 0.0;
    var acc: array<f32, DIMS_PER_ROW_THREAD>;
    // Tiles are read into registers one ahead: the next tile's K and V loads are in flight while
    // this tile's scores and outputs are computed, so the memory latency hides behind the math.
    var current = load_tile(b.first_key, b.end_key, tile_keys, b.kv_head, li);
    for (var key0 = b.first_key; key0 < b.end_key; key0 += tile_keys) {
        let n_keys = min(tile_keys, b.end_key - key0);
        for (var i = 0u; i < KV_TILE_PER_THREAD; i++) {
            let e = li + i * WG;
            if (e < n_keys * hd) {
                kv_tile[e] = current.k[i];
            }
        }
        workgroupBarrier();
        let next = load_tile(key0 + tile_keys, b.end_key, tile_keys, b.kv_head, li);
        // Scores of every (row, key) pair of the tile, the causal mask applied.
        for (var p = li; p < QUERY_BLOCK * tile_keys; p += WG) {
            let r = p / tile_keys;
            let j = p % tile_keys;
            var s = MASKED;
            if (j < n_keys && key0 + j <= row_pos(b, r)) {
                s = 0.0;
                for (var d = 0u; d < hd; d++) {
                    s += q_block[r * hd + d] * kv_tile[j * hd + d];
                }
            }
            tile_scores[p] = s;
        }
        workgroupBarrier();
        for (var i = 0u; i < KV_TILE_PER_THREAD; i++) {
            let e = li + i * WG;
            if (e < n_keys * hd) {
                kv_tile[e] = current.v[i];
            }
        }
        workgroupBarrier();
        // Each thread updates its row's softmax state (the row's threads alike) and its dimensions.
        let scores = t.my_row * tile_keys;
        var new_max = running_max;
        for (var j = 0u; j < n_keys; j++) {
            new_max = max(new_max, tile_scores[scores + j]);
        }
        let correction = exp(running_max - new_max);
        running_sum *= correction;
        for (var i = 0u; i < DIMS_PER_ROW_THREAD && i < t.my_dims; i++) {
            acc[i] *= correction;
        }
        for (var j = 0u; j < n_keys; j++) {
            let weight = select(0.0, exp(tile_scores[scores + j] - new_max), key0 + j <= t.my_pos);
            running_sum += weight;
            for (var i = 0u; i < DIMS_PER_ROW_THREAD && i < t.my_dims; i++) {
                acc[i] += weight * kv_tile[j * hd + t.sub + i * THREADS_PER_ROW];
            }
        }
        running_max = new_max;
        current = next;
        workgroupBarrier();
    }
    store_row(b, t, acc, running_max, running_sum);
}

// Decode (a few query rows per KV head, too few to share staged tiles): one key per thread. Each
// step takes WG keys; a thread reads its key's row from the cache once and scores it against
// every query row of the block, then each thread adds its row's dimensions over the step's keys,
// reading V rows that the block's rows share through the cache. Two barriers per WG keys, where
// `attend` takes four per tile of 1024 / head_dim keys, and no serial dot products over a tile.
// The step's scores, (QUERY_BLOCK, WG keys), take kv_tile's place.
const _SCORES_FIT: u32 = KV_TILE - MAX_QUERY_BLOCK * WG; // fails to compile if they do not fit

@compute @workgroup_size(WG)
fn attend_by_key(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let b = block_of(wg);
    if (!b.live) {
        return;
    }
    let t = share_of(b, li);
    let hd = params.head_dim;
    let kv_stride = params.n_kv_heads * hd;
    load_queries(b, li);
    workgroupBarrier();
    var running_max = MASKED;
    var running_sum = 0.0;
    var acc: array<f32, DIMS_PER_ROW_THREAD>;
    for (var key0 = b.first_key; key0 < b.end_key; key0 += WG) {
        let key = key0 + li;
        var scores: array<f32, MAX_QUERY_BLOCK>;
        if (key < b.end_key) {
            let k_row = key * kv_stride + b.kv_head * hd;
            for (var d = 0u; d < hd; d++) {
                let k = k_cache[k_row + d];
                for (var r = 0u; r < QUERY_BLOCK; r++) {
                    scores[r] += q_block[r * hd + d] * k;
                }
            }
        }
        for (var r = 0u; r < QUERY_BLOCK; r++) {
            kv_tile[r * WG + li] = select(MASKED, scores[r], key < b.end_key && key <= row_pos(b, r));
        }
        workgroupBarrier();
        let n_keys = min(WG, b.end_key - key0);
        let scores_of_row = t.my_row * WG;
        var new_max = running_max;
        for (var j = 0u; j < n_keys; j++) {
            new_max = max(new_max, kv_tile[scores_of_row + j]);
        }
        let correction = exp(running_max - new_max);
        running_sum *= correction;
        for (var i = 0u; i < DIMS_PER_ROW_THREAD && i < t.my_dims; i++) {
            acc[i] *= correction;
        }
        for (var j = 0u; j < n_keys; j++) {
            let weight = select(0.0, exp(kv_tile[scores_of_row + j] - new_max), key0 + j <= t.my_pos);
            running_sum += weight;
            let v_row = (key0 + j) * kv_stride + b.kv_head * hd + t.sub;
            for (var i = 0u; i < DIMS_PER_ROW_THREAD && i < t.my_dims; i++) {
                acc[i] += weight * v_cache[v_row + i * THREADS_PER_ROW];
            }
        }
        running_max = new_max;
        workgroupBarrier();
    }
    store_row(b, t, acc, running_max, running_sum);
}

// out = the splits' outputs weighed by exp(split max - overall max), over the weighed sums; one
// workgroup per (head, token), its threads over head dimensions.
@compute @workgroup_size(WG)
fn combine(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let head = wg.x;
    let t = wg.y;
    // One split: attend wrote out.
    if (head >= params.n_heads || t >= step.n_tokens || step.key_splits == 1u) {
        return;
    }
    let hd = params.head_dim;
    let first = (t * params.n_heads + head) * params.split_stride;
    var overall_max = MASKED;
    for (var s = 0u; s < step.key_splits; s++) {
        overall_max = max(overall_max, partials[params.stats_offset + 2u * (first + s)]);
    }
    var weights: array<f32, MAX_KEY_SPLITS>;
    var sum = 0.0;
    for (var s = 0u; s < step.key_splits; s++) {
        let stats = params.stats_offset + 2u * (first + s);
        weights[s] = exp(partials[stats] - overall_max);
        sum += weights[s] * partials[stats + 1u];
    }
    for (var d = li; d < hd; d += WG) {
        var value = 0.0;
        for (var s = 0u; s < step.key_splits; s++) {
            value += weights[s] * partials[(first + s) * hd + d];
        }
        out[(t * params.n_heads + head) * hd + d] = value / sum;
    }
}
