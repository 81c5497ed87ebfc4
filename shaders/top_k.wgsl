// The k largest logits (value descending, then id ascending), the softmax normaliser of all of
// them at a temperature and at 1, and the logit of one named token, so the host samples and
// takes log probabilities from k candidates instead of reading the vocabulary.
// Two passes, as in argmax.wgsl: `partial` runs params.partials workgroups, each selecting the top
// k of a strided share of the logits and summing that share's softmax terms; `finish` selects the
// top k of the partials' candidates in one workgroup and merges their sums. (One workgroup taking
// k rounds over a 128256-token vocabulary would stream it k times alone.) A selection takes k
// rounds, each finding the largest candidate ranked below the previous round's pick. Each row of
// logits (one per sequence that samples in the pass) is selected on its own, with its own k and
// temperature: workgroup_id.y is the row.
// PyTorch: values, ids = logits.topk(k); sum = exp((logits - logits.max()) / T).sum();
//          sum_at_one = exp(logits - logits.max()).sum(); scored = logits[token]

// SELECTION_WG threads per workgroup, at most MAX_TOP_K candidates, TOP_K_PARTIALS partial
// selections and SELECTION_HEADER: constants from Rust (crate::gpu::ops).
// Words of one selection, out's layout: SELECTION_HEADER words (max, sum, sum at temperature 1, the
// scored token's logit), then MAX_TOP_K (id, logit) pairs.
const SELECTION_WORDS: u32 = SELECTION_HEADER + 2u * MAX_TOP_K;
const SUM_WG: u32 = SELECTION_WG; // lib/workgroup_sum
const NONE: u32 = 0xffffffffu; // the id of a round that found no candidate
const LOWEST: f32 = -0x1.fffffep+127f; // -(f32 max), exact: Tint rejects the rounded 3.4028235e38

struct Params {
    n: u32,
    partials: u32,        // workgroups of `partial`, at most TOP_K_PARTIALS
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;             // (rows, n)
@group(0) @binding(1) var<storage, read> row_params: array<vec4<u32>>;   // (rows) k (at most MAX_TOP_K), 1 / temperature as bits, the scored token (or NONE), unused
@group(0) @binding(2) var<storage, read_write> out: array<u32>;          // (rows, SELECTION_WORDS): max, sum of exp((l - max) / T), sum of exp(l - max), the scored token's logit, then k (id, logit) pairs; floats as bits
@group(0) @binding(3) var<storage, read_write> selections: array<u32>;   // (rows, partials, SELECTION_WORDS): each partial's, laid out as out
@group(0) @binding(4) var<uniform> params: Params;

var<workgroup> best_value: array<f32, SELECTION_WG>;
var<workgroup> best_index: array<u32, SELECTION_WG>;

// Candidates per selection of `row` (its k, which the host keeps at most MAX_TOP_K).
fn top_k(row: u32) -> u32 {
    return min(row_params[row].x, MAX_TOP_K);
}

// 1 / temperature of `row`'s sampler, then 1: the scales of its two sums' exponents.
fn inverse_temperatures(row: u32) -> vec2<f32> {
    return vec2(bitcast<f32>(row_params[row].y), 1.0);
}

// The first words of a selection: `largest` and the workgroup's totals of `sums`, as bits. Call it
// from uniform control flow.
fn selection_header(lid: u32, largest: f32, sums: vec2<f32>) -> vec3<u32> {
    let totals = vec2(workgroup_sum(lid, sums.x), workgroup_sum(lid, sums.y));
    return vec3(bitcast<u32>(largest), bitcast<vec2<u32>>(totals));
}

// Whether (v, i) ranks above (bv, bi): larger value, or equal value and smaller id.
fn ranks_above(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    return v > bv || (v == bv && i < bi);
}

// A thread's candidates of logits row `row`: `partial`'s logits first, first + stride, ... below n;
// `finish`'s the partials' picks, first, first + SELECTION_WG, ... below partials k.
struct Candidates {
    row: u32,
    from_logits: bool,
    first: u32,
    stride: u32,
    count: u32,
}

// Candidate c as (value, id); NONE ids are the picks of rounds that found nothing.
fn candidate(pool: Candidates, c: u32) -> vec2<u32> {
    if (pool.from_logits) {
        return vec2(bitcast<u32>(logits[pool.row * params.n + c]), c);
    }
    let k = top_k(pool.row);
    let pick = (pool.row * params.partials + c / k) * SELECTION_WORDS + SELECTION_HEADER + 2u * (c % k);
    return vec2(selections[pick + 1u], selections[pick]);
}

// The top k of the workgroup's candidates in rank order, written by thread 0 as (id, logit) pairs
// from word `at` of `out` (dest_is_out) or of `selections`; returns the first pick's value. k comes
// apart from the pool, whose fields vary by thread: the rounds' barriers need a uniform bound.
fn select_top(lid: u32, pool: Candidates, k: u32, dest_is_out: bool, at: u32) -> f32 {
    var prev_value = 0.0;
    var prev_index = NONE;
    var largest = LOWEST;
    for (var round = 0u; round < k; round++) {
        var value = LOWEST;
        var index = NONE;
        for (var c = pool.first; c < pool.count; c += pool.stride) {
            let cand = candidate(pool, c);
            let v = bitcast<f32>(cand.x);
            let below_previous = round == 0u || ranks_above(prev_value, prev_index, v, cand.y);
            if (cand.y != NONE && below_previous && ranks_above(v, cand.y, value, index)) {
                value = v;
                index = cand.y;
            }
        }
        best_value[lid] = value;
        best_index[lid] = index;
        workgroupBarrier();
        for (var stride = SELECTION_WG / 2u; stride > 0u; stride /= 2u) {
            if (lid < stride && ranks_above(best_value[lid + stride], best_index[lid + stride], best_value[lid], best_index[lid])) {
                best_value[lid] = best_value[lid + stride];
                best_index[lid] = best_index[lid + stride];
            }
            workgroupBarrier();
        }
        prev_value = best_value[0];
        prev_index = best_index[0];
        if (round == 0u) {
            largest = prev_value;
        }
        if (lid == 0u) {
            let pair = at + 2u * round;
            if (dest_is_out) {
                out[pair] = prev_index;
                out[pair + 1u] = bitcast<u32>(prev_value);
            } else {
                selections[pair] = prev_index;
                selections[pair + 1u] = bitcast<u32>(prev_value);
            }
        }
        workgroupBarrier();
    }
    return largest;
}

@compute @workgroup_size(SELECTION_WG)
fn partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // Strided by the whole grid, so that each load instruction of a workgroup reads SELECTION_WG neighbours.
    let row = wg.y;
    let pool = Candidates(row, true, wg.x * SELECTION_WG + lid, params.partials * SELECTION_WG, params.n);
    let at = (row * params.partials + wg.x) * SELECTION_WORDS;
    let largest = select_top(lid, pool, top_k(row), false, at + SELECTION_HEADER);
    var sums = vec2(0.0);
    for (var i = pool.first; i < params.n; i += pool.stride) {
        sums += exp((logits[row * params.n + i] - largest) * inverse_temperatures(row));
    }
    let header = selection_header(lid, largest, sums);
    if (lid == 0u) {
        selections[at] = header.x;
        selections[at + 1u] = header.y;
        selections[at + 2u] = header.z;
    }
}

@compute @workgroup_size(SELECTION_WG)
fn finish(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wg.y;
    let pool = Candidates(row, false, lid, SELECTION_WG, params.partials * top_k(row));
    let at_out = row * SELECTION_WORDS;
    let largest = select_top(lid, pool, top_k(row), true, at_out + SELECTION_HEADER);
    // Each partial's sums are relative to its own largest logit: rescaled to the overall one.
    var sums = vec2(0.0);
    if (lid < params.partials) {
        let at = (row * params.partials + lid) * SELECTION_WORDS;
        let partial_sums = bitcast<vec2<f32>>(vec2(selections[at + 1u], selections[at + 2u]));
        sums = partial_sums * exp((bitcast<f32>(selections[at]) - largest) * inverse_temperatures(row));
    }
    let header = selection_header(lid, largest, sums);
    if (lid == 0u) {
        out[at_out] = header.x;
        out[at_out + 1u] = header.y;
        out[at_out + 2u] = header.z;
        let scored = row_params[row].z;
        out[at_out + 3u] = select(0u, bitcast<u32>(logits[row * params.n + min(scored, params.n - 1u)]), scored != NONE);
    }
}
