// Causal grouped-query attention over the paged KV pool: token t, at the position and of the
// sequence its step slot gives, attends to its sequence's positions 0..=position. A sequence keeps
// position p in pool row page_table[sequence, p / PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE of k_cache
// and v_cache. Flash-style: one workgroup per (KV head, block of QUERY_BLOCK query rows, key split),
// the rows being the (token, head) pairs of that KV head's group, token-major. Each K/V tile is
// loaded once into workgroup memory and shared by the block's rows; an online softmax (a running
// max and sum per row, earlier outputs rescaled when the max grows) means no score matrix is stored
// and any context length fits. A block whose rows belong to several sequences (a pass mixing them)
// attends to each run of one sequence's rows in turn, the other rows masked.
// A pool of several buffers (each under the binding limit) is attended one buffer per dispatch,
// the keys whose pages lie in other buffers masked; every dispatch writes partials as key splits
// do, and they are merged after the last.
// Key splits (flash-decoding): a decode step has one query row per head, too few workgroups to fill
// a GPU or to hide the latency of a long context, so its keys are cut into step.key_splits ranges of
// step.keys_per_split, attended in parallel. Each split writes its rows' unnormalised outputs, max
// and sum to `partials`. A pass of one split writes `out` directly.
// The merge: where MERGE_IN_LAST_SPLIT, the last of a block's splits to finish (an arrival count
// per block in `partials`) merges them in the same dispatch; else `combine`, a dispatch of its own.
// The first needs a device-scope barrier between a workgroup's stores and its arrival, which naga's
// SPIR-V storageBarrier is; WGSL promises it nowhere, so browsers take the second.
// Entry points: `attend` (decode: a few query rows a workgroup, keys in splits), `attend_tiles`
// (prefill: many rows, a matmul's register tiles), `attend_coop` (lib/attend_coop.wgsl, in the
// cooperative-matrix form: attend_tiles' blocks on cooperative matrices), `combine` (without
// MERGE_IN_LAST_SPLIT).
// PyTorch: softmax(q @ k.T * scale + causal_mask) @ v, with k/v repeated for each group of query heads

// MAX_HEAD_DIM, MAX_QUERY_BLOCK, PAGE_SIZE, Step (lib/step.wgsl), the KV pool read four elements
// at a time (kv_quad_t) and its reads key_quad / value_quad (lib/kv_load_*, by the pool's type)
// come from Rust (crate::gpu::kernels). HEAD_DIM is a multiple of 4.
const WG: u32 = 64u;
const MASKED: f32 = -1.0e30;

struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    scale: f32,          // 1 / sqrt(HEAD_DIM)
    q_stride: u32,       // elements between token rows of q (q heads lead a stacked q/k/v row)
    stats_offset: u32,   // where the (max, sum) pairs start in partials
    counters_offset: u32, // where the blocks' arrival counts start in partials (MERGE_IN_LAST_SPLIT)
    pages_per_sequence: u32, // columns of page_table
    buffers: u32,        // pool buffers, each attended by a dispatch of its own
    buffer: u32,         // which of them this dispatch binds
    first_page: u32,     // the pool page it starts at
    buffer_pages: u32,   // pool pages it holds
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> q: array<f32>;              // (n_tokens, q_stride), n_heads heads first
@group(0) @binding(1) var<storage, read> k_cache: array<kv_quad_t>;  // this buffer's (pool rows, n_kv_heads, head_dim)
@group(0) @binding(2) var<storage, read> v_cache: array<kv_quad_t>;  // this buffer's (pool rows, n_kv_heads, head_dim)
@group(0) @binding(3) var<storage, read> page_table: array<u32>;     // (sequences, pages_per_sequence) pool pages
@group(0) @binding(4) var<storage, read_write> out: array<f32>;      // (n_tokens, n_heads, head_dim)
// Atomic: workgroups hand partials to one another (f32 bits); see partial().
@group(0) @binding(5) var<storage, read_write> partials: array<atomic<u32>>; // (n_tokens, n_heads, buffers, key_splits) outputs of head_dim, then their (max, sum) at stats_offset, then an arrival count per (query block, KV head) at counters_offset
@group(0) @binding(6) var<uniform> params: Params;
@group(0) @binding(7) var<uniform> step: Step;

// Elements per head (at most MAX_HEAD_DIM): a constant of the pipeline, so that the loops over a
// head's dimensions have constant trip counts the compiler unrolls.
override HEAD_DIM: u32 = 128u;
// Query rows per workgroup, a power of two up to MAX_QUERY_BLOCK: for the few tokens of a decode
// pass the GQA group's size rounded up, so that a token's heads fill a block (crate::gpu::ops).
override QUERY_BLOCK: u32 = 8u;
override THREADS_PER_ROW: u32 = WG / QUERY_BLOCK;
// The last split of a block merges the block's partials (see the top).
override MERGE_IN_LAST_SPLIT: bool = false;
const KV_TILE: u32 = 1024u;             // elements of one K or V tile (keys x head_dim)
const KV_QUADS_PER_THREAD: u32 = KV_TILE / 4u / WG;
const MAX_TILE_KEYS: u32 = 32u;
const DIMS_PER_ROW_THREAD: u32 = MAX_HEAD_DIM / (WG / MAX_QUERY_BLOCK); // the most per thread

var<workgroup> q_block: array<f32, MAX_QUERY_BLOCK * MAX_HEAD_DIM>;  // (QUERY_BLOCK, head_dim), scaled
var<workgroup> kv_tile: array<f32, KV_TILE>; // (tile_keys, head_dim): the K tile, then the V tile
var<workgroup> tile_scores: array<f32, MAX_QUERY_BLOCK * MAX_TILE_KEYS>; // (QUERY_BLOCK, tile_keys, score_lanes) parts of scores
var<workgroup> arrived: u32; // the block's splits that had arrived with this workgroup's

// One thread's share of a K/V tile: quads li, li + WG, ... of the tile's keys x head_dim, so that
// a subgroup's loads cover contiguous memory, four elements to a load.
struct TileShare {
    k: array<vec4<f32>, KV_QUADS_PER_THREAD>,
    v: array<vec4<f32>, KV_QUADS_PER_THREAD>,
}

// The row of this dispatch's buffer holding `key` of the sequence whose page table row starts at
// `pages`, or NOT_HERE when another buffer holds it.
const NOT_HERE: u32 = 0xffffffffu;
fn buffer_row(key: u32, pages: u32) -> u32 {
    let page = page_table[pages + key / PAGE_SIZE];
    if (page < params.first_page || page - params.first_page >= params.buffer_pages) {
        return NOT_HERE;
    }
    return (page - params.first_page) * PAGE_SIZE + key % PAGE_SIZE;
}

// The first key from `key` on that this dispatch's buffer holds, or the run's end: a pool spread
// over several buffers is attended a dispatch per buffer, and each skips the pages of the others
// instead of reading the whole context once per buffer.
fn next_key_here(key: u32, run: Run) -> u32 {
    var next = key;
    while (params.buffers > 1u && next < run.end_key && buffer_row(next, run.pages) == NOT_HERE) {
        next = (next / PAGE_SIZE + 1u) * PAGE_SIZE;
    }
    return min(next, run.end_key);
}

// Thread li's share of the tile of `run`'s keys from key0 (at most tile_keys of them; none if key0
// is past the run's end; zeros for keys of other buffers).
fn load_tile(key0: u32, run: Run, tile_keys: u32, kv_head: u32, li: u32) -> TileShare {
    var share: TileShare;
    if (key0 >= run.end_key) {
        return share;
    }
    let hd = HEAD_DIM;
    let n = min(tile_keys, run.end_key - key0) * hd;
    for (var i = 0u; i < KV_QUADS_PER_THREAD; i++) {
        let e = 4u * (li + i * WG);
        if (e < n) {
            let row = buffer_row(key0 + e / hd, run.pages);
            if (row != NOT_HERE) {
                let column = kv_head * hd + e % hd;
                share.k[i] = key_quad(row, column, params.n_kv_heads * hd);
                share.v[i] = value_quad(row, column, params.n_kv_heads * hd);
            }
        }
    }
    return share;
}

// Puts a thread's share of a K or V tile of `n` elements into kv_tile.
fn store_tile(share: array<vec4<f32>, KV_QUADS_PER_THREAD>, n: u32, li: u32) {
    for (var i = 0u; i < KV_QUADS_PER_THREAD; i++) {
        let e = 4u * (li + i * WG);
        if (e < n) {
            for (var j = 0u; j < 4u; j++) {
                kv_tile[e + j] = share[i][j];
            }
        }
    }
}

// The score of a tile's (row, key) pair from its lanes' parts.
fn tile_score(pair: u32, score_lanes: u32) -> f32 {
    var score = 0.0;
    for (var lane = 0u; lane < score_lanes; lane++) {
        score += tile_scores[pair * score_lanes + lane];
    }
    return score;
}

// A workgroup's query block: rows row0..=last_row of the (token, head) rows of KV head kv_head's
// GQA group (n_rows in the pass), attended over the keys of split `split` from first_key.
struct QueryBlock {
    kv_head: u32,
    group: u32,
    row0: u32,
    last_row: u32,
    n_rows: u32,
    split: u32,
    first_key: u32,
    past_the_pass: bool, // the grid, sized for the largest pass, reaches past this one's rows or splits
}

fn query_block(wg: vec3<u32>, rows: u32) -> QueryBlock {
    let group = params.n_heads / params.n_kv_heads;
    let n_rows = step.n_tokens * group;
    let row0 = wg.y * rows;
    let past = wg.x >= params.n_kv_heads || row0 >= n_rows || wg.z >= step.key_splits;
    return QueryBlock(wg.x, group, row0, min(row0 + rows, n_rows) - 1u, n_rows, wg.z, wg.z * step.keys_per_split, past);
}

// A run of one sequence's rows of a query block, [first, last], and where its keys are: its
// sequence's row of the page table, and the end of its keys in this split (the split's keys of
// the sequence: [first_key, end_key)).
struct Run {
    first: u32,
    last: u32,
    pages: u32,
    end_key: u32,
}

// The run that starts at row `first`: as far as the rows stay in its sequence.
fn run_at(b: QueryBlock, first: u32) -> Run {
    let sequence = step.slots[first / b.group].z;
    var last = first;
    while (last < b.last_row && step.slots[(last + 1u) / b.group].z == sequence) {
        last++;
    }
    // The run's last row has its latest position.
    let end_key = min(b.first_key + step.keys_per_split, step.slots[last / b.group].x + 1u);
    return Run(first, last, sequence * params.pages_per_sequence, end_key);
}

fn run_holds(run: Run, row: u32) -> bool {
    return row >= run.first && row <= run.last;
}

// Row `row`'s index among the pass's (token, head) pairs.
fn token_head_of(b: QueryBlock, row: u32) -> u32 {
    return (row / b.group) * params.n_heads + b.kv_head * b.group + row % b.group;
}

@compute @workgroup_size(WG)
fn attend(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let b = query_block(wg, QUERY_BLOCK);
    if (b.past_the_pass) {
        return;
    }
    let hd = HEAD_DIM;
    // Fewer keys per tile for wider heads: the tile's size is fixed.
    let tile_keys = min(MAX_TILE_KEYS, KV_TILE / hd);
    let score_lanes = max(WG / (QUERY_BLOCK * tile_keys), 1u);
    // Rows past the last one repeat it; they are computed but not stored.
    for (var i = li; i < QUERY_BLOCK * hd; i += WG) {
        let row = min(b.row0 + i / hd, b.n_rows - 1u);
        let head = b.kv_head * b.group + row % b.group;
        q_block[i] = q[(row / b.group) * params.q_stride + head * hd + i % hd] * params.scale;
    }

    // Thread li serves row li / THREADS_PER_ROW, head dimensions sub, sub + THREADS_PER_ROW, ...
    let my_row = li / THREADS_PER_ROW;
    let sub = li % THREADS_PER_ROW;
    let my_clamped_row = min(b.row0 + my_row, b.n_rows - 1u);
    // How many of those dimensions lie below head_dim: loops stop there. Their constant bound
    // beside it lets the compiler unroll them and keep acc in registers.
    let my_dims = (hd + THREADS_PER_ROW - 1u - sub) / THREADS_PER_ROW;
    var running_max = MASKED;
    var running_sum = 0.0;
    var acc: array<f32, DIMS_PER_ROW_THREAD>;
    // Runs of rows of one sequence: one for a block of a single sequence.
    var run_first = b.row0;
    while (run_first <= b.last_row) {
        let run = run_at(b, run_first);
        let in_run = run_holds(run, my_clamped_row);
        // Tiles are read into registers one ahead: the next tile's K and V loads are in flight while
        // this tile's scores and outputs are computed, so the memory latency hides behind the math.
        var key0 = next_key_here(b.first_key, run);
        var current = load_tile(key0, run, tile_keys, b.kv_head, li);
        while (key0 < run.end_key) {
            let n_keys = min(tile_keys, run.end_key - key0);
            store_tile(current.k, n_keys * hd, li);
            workgroupBarrier();
            let next_key0 = next_key_here(key0 + tile_keys, run);
            let next = load_tile(next_key0, run, tile_keys, b.kv_head, li);
            // Scores of every (row, key) pair of the tile, the causal mask and the run applied,
            // each pair's dot product cut over score_lanes threads (lane l takes dimensions l,
            // l + score_lanes, ...), so that a decode block's few pairs keep every thread busy.
            for (var p = li; p < QUERY_BLOCK * tile_keys * score_lanes; p += WG) {
                let pair = p / score_lanes;
                let lane = p % score_lanes;
                let r = pair / tile_keys;
                let j = pair % tile_keys;
                let row = min(b.row0 + r, b.n_rows - 1u);
                let pos = step.slots[row / b.group].x;
                // The lanes' parts add up to the score; a masked pair's to MASKED.
                var s = select(0.0, MASKED, lane == 0u);
                let here = params.buffers == 1u || buffer_row(key0 + j, run.pages) != NOT_HERE;
                if (j < n_keys && run_holds(run, row) && key0 + j <= pos && here) {
                    s = 0.0;
                    for (var d0 = 0u; d0 < hd; d0 += score_lanes) {
                        let d = d0 + lane;
                        if (d < hd) {
                            s += q_block[r * hd + d] * kv_tile[j * hd + d];
                        }
                    }
                }
                tile_scores[p] = s;
            }
            workgroupBarrier();
            store_tile(current.v, n_keys * hd, li);
            workgroupBarrier();
            // Each thread of the run updates its row's softmax state (the row's threads alike) and
            // its dimensions.
            if (in_run) {
                var new_max = running_max;
                for (var j = 0u; j < n_keys; j++) {
                    new_max = max(new_max, tile_score(my_row * tile_keys + j, score_lanes));
                }
                let correction = exp(running_max - new_max);
                running_sum *= correction;
                for (var i = 0u; i < DIMS_PER_ROW_THREAD && i < my_dims; i++) {
                    acc[i] *= correction;
                }
                for (var j = 0u; j < n_keys; j++) {
                    // Masked: past the row's position, or in another buffer.
                    let score = tile_score(my_row * tile_keys + j, score_lanes);
                    let weight = select(0.0, exp(score - new_max), score > MASKED);
                    running_sum += weight;
                    for (var i = 0u; i < DIMS_PER_ROW_THREAD && i < my_dims; i++) {
                        acc[i] += weight * kv_tile[j * hd + sub + i * THREADS_PER_ROW];
                    }
                }
                running_max = new_max;
            }
            current = next;
            key0 = next_key0;
            workgroupBarrier();
        }
        run_first = run.last + 1u;
    }
    // Threads of rows past the last store nothing but stay for the barriers of the merge.
    let stores = b.row0 + my_row < b.n_rows;
    let token_head = token_head_of(b, my_clamped_row);
    if (step.key_splits == 1u && params.buffers == 1u) {
        if (stores) {
            for (var i = 0u; i < DIMS_PER_ROW_THREAD && i < my_dims; i++) {
                out[token_head * hd + sub + i * THREADS_PER_ROW] = acc[i] / running_sum;
            }
        }
        return;
    }
    // A row with no keys in this split (a token before the split's first key, or keys all in other
    // buffers) leaves max MASKED, sum 0 and outputs 0, which the merge weighs as nothing.
    let count = step.key_splits * params.buffers;
    let first = token_head * count;
    let partial_row = first + params.buffer * step.key_splits + b.split;
    if (stores) {
        for (var i = 0u; i < DIMS_PER_ROW_THREAD && i < my_dims; i++) {
            store_partial(partial_row * hd + sub + i * THREADS_PER_ROW, acc[i]);
        }
        if (sub == 0u) {
            store_partial(params.stats_offset + 2u * partial_row, running_max);
            store_partial(params.stats_offset + 2u * partial_row + 1u, running_sum);
        }
    }
    if (merges_here(li, wg.y * params.n_kv_heads + b.kv_head) && stores) {
        let merge = merge_of(first, count);
        for (var i = 0u; i < DIMS_PER_ROW_THREAD && i < my_dims; i++) {
            let d = sub + i * THREADS_PER_ROW;
            out[token_head * hd + d] = merged(merge, d);
        }
    }
}

// Prefill: the same attention as `attend` (runs of one sequence's rows, online softmax, partials
// over a pool of several buffers) for passes of many query rows, computed as a matmul is. A
// workgroup takes PREFILL_ROWS rows and PREFILL_KEYS keys a tile: each thread computes 4 rows x 4
// keys of scores over head dimensions staged DIM_CHUNK at a time (K transposed, so a thread's four
// keys are one load), then 4 rows x up to 4 quads of dimensions of the outputs over V staged a
// few keys at a time: about 1 workgroup-memory load per 4 FMAs, where `attend`'s one pair per
// thread takes 2 loads per FMA.
const PREFILL_KEYS: u32 = 64u;
const DIM_CHUNK: u32 = 16u; // a chunk's K is 16 x 4 keys by 4 quads, its Q 16 dims by 4 x 4 rows: WG threads each
const STAGE_QUADS: u32 = 512u;
const PROBS_STRIDE: u32 = PREFILL_KEYS + 1u; // padded: a column's rows in different banks
const MAX_OUT_QUADS: u32 = MAX_HEAD_DIM / 64u; // output quads per thread and row: 16 threads a row

// The scores step: K chunk transposed (DIM_CHUNK, PREFILL_KEYS) from quad 0, Q chunk transposed
// (DIM_CHUNK, PREFILL_ROWS) from K_CHUNK_QUADS. The outputs step: V rows (keys, head_dim).
var<workgroup> stage: array<vec4<f32>, STAGE_QUADS>;
const K_CHUNK_QUADS: u32 = DIM_CHUNK * PREFILL_KEYS / 4u;
var<workgroup> tile_probs: array<f32, PREFILL_ROWS * PROBS_STRIDE>; // (PREFILL_ROWS, PREFILL_KEYS) scores, then weights
var<workgroup> rows_max: array<f32, PREFILL_ROWS>;     // each row's running max
var<workgroup> rows_rescale: array<f32, PREFILL_ROWS>; // what this tile's max did to earlier weights

@compute @workgroup_size(WG)
fn attend_tiles(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let b = query_block(wg, PREFILL_ROWS);
    if (b.past_the_pass) {
        return;
    }
    let hd = HEAD_DIM;
    let kv_dim = params.n_kv_heads * hd;
    // Scores: rows 4 * (li / 16) + i, keys 4 * (li % 16) + j. Outputs: the same rows, dimension
    // quads li % 16 + 16 m.
    let rows = 4u * (li / 16u);
    let keys = 4u * (li % 16u);
    let row_quads = hd / 4u;
    // Keys of V staged at a time, and output quads per row for this head_dim.
    let v_keys = min(PREFILL_KEYS, STAGE_QUADS / row_quads);
    let out_quads = (row_quads + 15u) / 16u;
    if (li < PREFILL_ROWS) {
        rows_max[li] = MASKED;
    }
    var acc: array<array<vec4<f32>, MAX_OUT_QUADS>, 4>;
    var sums = vec4(0.0, 0.0, 0.0, 0.0);
    var run_first = b.row0;
    while (run_first <= b.last_row) {
        let run = run_at(b, run_first);
        for (var key0 = next_key_here(b.first_key, run); key0 < run.end_key; key0 = next_key_here(key0 + PREFILL_KEYS, run)) {
            // Thread li stages keys 4 (li % 16) .. + 3 (their pool rows found once a tile) at
            // dimension quad li / 16 of each chunk, and writes whole vectors of four keys: threads
            // never write parts of one shared vector.
            var key_rows: array<u32, 4>;
            for (var j = 0u; j < 4u; j++) {
                let key = key0 + 4u * (li % 16u) + j;
                key_rows[j] = NOT_HERE;
                if (key < run.end_key) {
                    key_rows[j] = buffer_row(key, run.pages);
                }
            }
            // Zeroed explicitly: Tint (Chrome, Dawn) zeroes a var declared in a loop without an
            // initializer once, not each time round.
            var scores = array<vec4<f32>, 4>();
            for (var d0 = 0u; d0 < hd; d0 += DIM_CHUNK) {
                let k_dim = d0 + 4u * (li / 16u);
                var k = array<vec4<f32>, 4>();
                for (var j = 0u; j < 4u; j++) {
                    if (key_rows[j] != NOT_HERE && k_dim < hd) {
                        k[j] = key_quad(key_rows[j], b.kv_head * hd + k_dim, kv_dim);
                    }
                }
                for (var e = 0u; e < 4u; e++) {
                    stage[(4u * (li / 16u) + e) * (PREFILL_KEYS / 4u) + li % 16u] = vec4(k[0][e], k[1][e], k[2][e], k[3][e]);
                }
                // Q, scaled: rows 4 (li % 4) .. + 3 at dimension d0 + li / 4.
                let q_dim = d0 + li / 4u;
                var x = vec4(0.0, 0.0, 0.0, 0.0);
                for (var i = 0u; i < 4u && q_dim < hd; i++) {
                    let q_row = min(b.row0 + 4u * (li % 4u) + i, b.n_rows - 1u);
                    let head = b.kv_head * b.group + q_row % b.group;
                    x[i] = q[(q_row / b.group) * params.q_stride + head * hd + q_dim] * params.scale;
                }
                stage[K_CHUNK_QUADS + (li / 4u) * (PREFILL_ROWS / 4u) + li % 4u] = x;
                workgroupBarrier();
                for (var d = 0u; d < DIM_CHUNK; d++) {
                    let qs = stage[K_CHUNK_QUADS + d * (PREFILL_ROWS / 4u) + rows / 4u];
                    let ks = stage[d * (PREFILL_KEYS / 4u) + keys / 4u];
                    for (var i = 0u; i < 4u; i++) {
                        scores[i] += qs[i] * ks;
                    }
                }
                workgroupBarrier();
            }
            // Masked: past the row's position or the run's keys, in another run, in another buffer.
            for (var i = 0u; i < 4u; i++) {
                let row = min(b.row0 + rows + i, b.n_rows - 1u);
                let pos = step.slots[row / b.group].x;
                for (var j = 0u; j < 4u; j++) {
                    let key = key0 + keys + j;
                    let here = params.buffers == 1u || (key < run.end_key && buffer_row(key, run.pages) != NOT_HERE);
                    let valid = key < run.end_key && key <= pos && run_holds(run, row) && here;
                    tile_probs[(rows + i) * PROBS_STRIDE + keys + j] = select(MASKED, scores[i][j], valid);
                }
            }
            workgroupBarrier();
            // Row li / 4's new max over the whole tile; then each of its four threads turns a
            // quarter of its scores into weights.
            let r = li / 4u;
            var new_max = rows_max[r];
            for (var j = 0u; j < PREFILL_KEYS; j++) {
                new_max = max(new_max, tile_probs[r * PROBS_STRIDE + j]);
            }
            let old_max = rows_max[r];
            workgroupBarrier();
            for (var n = 0u; n < PREFILL_KEYS / 4u; n++) {
                let j = r * PROBS_STRIDE + (li % 4u) * (PREFILL_KEYS / 4u) + n;
                tile_probs[j] = select(0.0, exp(tile_probs[j] - new_max), tile_probs[j] > MASKED);
            }
            if (li % 4u == 0u) {
                rows_max[r] = new_max;
                rows_rescale[r] = exp(old_max - new_max);
            }
            workgroupBarrier();
            for (var i = 0u; i < 4u; i++) {
                let rescale = rows_rescale[rows + i];
                sums[i] *= rescale;
                for (var m = 0u; m < MAX_OUT_QUADS && m < out_quads; m++) {
                    acc[i][m] *= rescale;
                }
            }
            for (var kc = 0u; kc < PREFILL_KEYS; kc += v_keys) {
                // Constant trip counts (as every loop here where the compiler should unroll).
                for (var wave = 0u; wave < (v_keys * row_quads + WG - 1u) / WG; wave++) {
                    let n = li + wave * WG;
                    let key = key0 + kc + n / row_quads;
                    var v = vec4(0.0, 0.0, 0.0, 0.0);
                    if (n < v_keys * row_quads && kc + n / row_quads < PREFILL_KEYS && key < run.end_key) {
                        let row = buffer_row(key, run.pages);
                        if (row != NOT_HERE) {
                            v = value_quad(row, b.kv_head * hd + 4u * (n % row_quads), kv_dim);
                        }
                    }
                    if (n < v_keys * row_quads) {
                        stage[n] = v;
                    }
                }
                workgroupBarrier();
                for (var k = 0u; k < v_keys && kc + k < PREFILL_KEYS; k++) {
                    for (var i = 0u; i < 4u; i++) {
                        let weight = tile_probs[(rows + i) * PROBS_STRIDE + kc + k];
                        sums[i] += weight;
                        for (var m = 0u; m < MAX_OUT_QUADS && m < out_quads; m++) {
                            let quad = li % 16u + 16u * m;
                            if (quad < row_quads) {
                                acc[i][m] += weight * stage[k * row_quads + quad];
                            }
                        }
                    }
                }
                workgroupBarrier();
            }
        }
        run_first = run.last + 1u;
    }
    // Each thread's rows and quads: out, or partials (and their merge) as `attend` writes them.
    let count = step.key_splits * params.buffers;
    for (var i = 0u; i < 4u; i++) {
        let row = b.row0 + rows + i;
        let token_head = token_head_of(b, row);
        let partial_row = token_head * count + params.buffer * step.key_splits + b.split;
        for (var m = 0u; m < MAX_OUT_QUADS && m < out_quads && row <= b.last_row && li % 16u + 16u * m < row_quads; m++) {
            let d = 4u * (li % 16u + 16u * m);
            for (var e = 0u; e < 4u; e++) {
                if (count == 1u) {
                    out[token_head * hd + d + e] = acc[i][m][e] / sums[i];
                } else {
                    store_partial(partial_row * hd + d + e, acc[i][m][e]);
                }
            }
        }
        if (count > 1u && li % 16u == 0u && row <= b.last_row) {
            store_partial(params.stats_offset + 2u * partial_row, rows_max[rows + i]);
            store_partial(params.stats_offset + 2u * partial_row + 1u, sums[i]);
        }
    }
    if (count == 1u) {
        return;
    }
    if (!merges_here(li, wg.y * params.n_kv_heads + b.kv_head)) {
        return;
    }
    for (var i = 0u; i < 4u; i++) {
        let row = b.row0 + rows + i;
        if (row <= b.last_row) {
            let token_head = token_head_of(b, row);
            let merge = merge_of(token_head * count, count);
            for (var m = 0u; m < MAX_OUT_QUADS && m < out_quads && li % 16u + 16u * m < row_quads; m++) {
                let d = 4u * (li % 16u + 16u * m);
                for (var e = 0u; e < 4u; e++) {
                    out[token_head * hd + d + e] = merged(merge, d + e);
                }
            }
        }
    }
}

// After a workgroup has stored its partials: where the last split merges, counts its arrival at
// its query block's count `block` and says whether it is the last to arrive, which then merges
// the block. Called by every thread (it holds barriers); the answer is the workgroup's.
fn merges_here(li: u32, block: u32) -> bool {
    // Earlier buffers' dispatches have finished before the last one's starts: only its splits count.
    if (!MERGE_IN_LAST_SPLIT || params.buffer + 1u < params.buffers) {
        return false;
    }
    // This workgroup's partials are stored device-wide before it counts as arrived.
    storageBarrier();
    if (li == 0u) {
        let counter = params.counters_offset + block;
        arrived = atomicAdd(&partials[counter], 1u) + 1u;
        if (arrived == step.key_splits) {
            // Ready for the next pass: every split of this one has arrived.
            atomicStore(&partials[counter], 0u);
        }
    }
    if (workgroupUniformLoad(&arrived) != step.key_splits) {
        return false;
    }
    // And the other splits' partials are seen after their arrivals.
    storageBarrier();
    return true;
}

// The partials are f32 values kept as atomic words.
fn partial(i: u32) -> f32 {
    return bitcast<f32>(atomicLoad(&partials[i]));
}

fn store_partial(i: u32, value: f32) {
    atomicStore(&partials[i], bitcast<u32>(value));
}

// A row's `count` partials from partial row `first`: their overall max and their sums weighed by
// exp(partial max - overall max).
struct Merge {
    first: u32,
    count: u32,
    max: f32,
    sum: f32,
}

fn merge_of(first: u32, count: u32) -> Merge {
    var merge = Merge(first, count, MASKED, 0.0);
    for (var s = 0u; s < count; s++) {
        merge.max = max(merge.max, partial(params.stats_offset + 2u * (first + s)));
    }
    for (var s = 0u; s < count; s++) {
        let stats = params.stats_offset + 2u * (first + s);
        merge.sum += exp(partial(stats) - merge.max) * partial(stats + 1u);
    }
    return merge;
}

// Dimension d of the merged row: the partials' outputs weighed as their sums, over the weighed sum.
fn merged(merge: Merge, d: u32) -> f32 {
    var value = 0.0;
    for (var s = 0u; s < merge.count; s++) {
        let row = merge.first + s;
        value += exp(partial(params.stats_offset + 2u * row) - merge.max) * partial(row * HEAD_DIM + d);
    }
    return value / merge.sum;
}

// The merge as a dispatch of its own: one workgroup per (head, token), its threads over head
// dimensions.
@compute @workgroup_size(WG)
fn combine(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let head = wg.x;
    let t = wg.y;
    let count = step.key_splits * params.buffers;
    // One partial: attend wrote out.
    if (head >= params.n_heads || t >= step.n_tokens || count == 1u) {
        return;
    }
    let token_head = t * params.n_heads + head;
    let merge = merge_of(token_head * count, count);
    for (var d = li; d < HEAD_DIM; d += WG) {
        out[token_head * HEAD_DIM + d] = merged(merge, d);
    }
}
