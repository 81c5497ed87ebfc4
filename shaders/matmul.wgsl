// Reading a weight matrix: out = x @ W^T, and the embedding gather out[t] = W[token t], for a
// (rows, k) matrix stored as f32, f16, bf16 or a llama.cpp block format, decoded in the kernel with
// f32 arithmetic. The gather lives here because it shares the block decoding with the products.
// Entry points: for a few tokens (decode steps) `gemv` (f32, f16, bf16), `gemv_blocks` (q4_0,
// q4_1, q8_0) and `gemv_superblocks` (q4_k, q6_k), each taking 1 or MAX_GEMV_COLUMNS tokens per
// workgroup; `tiled` for prompt prefill; `gather` for embeddings.
// A matrix split by rows over several buffers runs one dispatch per part; each writes its slice of
// output columns [row_start, row_start + rows) (the gather: the tokens whose row is in the part).
// The products can transform their input on the way in, fusing the op before them (INPUT):
//   0: x as it is
//   1: rmsnorm(x) * norm; each workgroup sums the squares of its token rows itself
//   2: silu(x[:, :k]) * x[:, k:2k], the gated MLP activation of a stacked gate/up output
// and can write their output rotated into the KV cache, fusing the op after them (OUTPUT):
//   0: out, overwritten or added to (accumulate = 1, the residual add)
//   1: a stacked q/k/v projection with RoPE: q rotated into out, k rotated into k_cache and v into
//      v_cache at each token's KV row (the pool page row its sequence keeps that position in), the
//      rotation by the token's own position. Halves rotate (dims i and i + head_dim / 2), as Hugging
//      Face checkpoints expect, by the f32 cos/sin table the host computes once with the model's
//      frequency scaling (llama3 rope_type).
// PyTorch: out = f(x) @ W.T            (OUTPUT 0, accumulate = 0)
//          out = out + f(x) @ W.T      (OUTPUT 0, accumulate = 1)
//          q, k, v = (f(x) @ W.T).split(); q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
//          k_cache[kv_row], v_cache[kv_row] = k, v   (OUTPUT 1)
//          out = W[tokens]             (gather)

// 0 f32, 1 f16, 2 bf16, 3 q4_0, 4 q4_1, 5 q8_0, 6 q4_k, 7 q6_k (crate::quant::DType::shader_code)
override WEIGHT_DTYPE: u32 = 0u;
// 0 plain, 1 rmsnorm, 2 silu_mul (crate::gpu::ops::MatmulInput)
override INPUT: u32 = 0u;
// 0 out, 1 q/k/v rotated into out and the KV cache (crate::gpu::ops::MatmulOutput)
override OUTPUT: u32 = 0u;

struct Params {
    k: u32,                // input features (elements per weight row, even)
    rows: u32,             // weight rows in this part
    row_start: u32,        // output column of this part's first row (gather: its first token id)
    in_stride: u32,        // elements between token rows of x
    out_stride: u32,       // elements between token rows of out
    accumulate: u32,       // 1: add to out instead of overwriting it
    eps: f32,              // INPUT 1: the RMSNorm epsilon
    head_dim: u32,         // OUTPUT 1: elements per head (even)
    q_dim: u32,            // OUTPUT 1: columns of q (n_heads head_dim), then k's and v's
    kv_dim: u32,           // OUTPUT 1: columns of k and of v (n_kv_heads head_dim)
    _pad0: u32,
    _pad1: u32,
}

// The most tokens one pass holds (crate::gpu::ops::MAX_BATCH_TOKENS).
const MAX_BATCH_TOKENS: u32 = 256u;

struct Step {
    n_tokens: u32,
    keys_per_split: u32,
    key_splits: u32,
    _pad: u32,
    // Per token: (position, KV row in the pool's pages, sequence slot, 0) (crate::gpu::ops::TokenSlot)
    slots: array<vec4<u32>, MAX_BATCH_TOKENS>,
}

// x and norm are f32 arrays read as vec4s (their buffers are whole vec4s: Gpu::storage_buffer), so
// that the block GEMVs load 4 inputs per instruction; x_at and norm_at read one element.
@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;   // (n_tokens, in_stride); gather: (n_tokens) ids as f32
@group(0) @binding(1) var<storage, read> w: array<u32>;         // (rows, k) in WEIGHT_DTYPE, rows packed back to back
@group(0) @binding(2) var<storage, read> norm: array<vec4<f32>>; // INPUT 1: (k) RMSNorm weight; otherwise unread
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // (n_tokens, out_stride)
@group(0) @binding(4) var<uniform> params: Params;
@group(0) @binding(5) var<uniform> step: Step;
@group(0) @binding(6) var<storage, read> cos_sin: array<vec2<f32>>;   // OUTPUT 1: (context, head_dim / 2) (cos, sin)
@group(0) @binding(7) var<storage, read_write> k_cache: array<f32>;  // OUTPUT 1: (pool rows, kv_dim)
@group(0) @binding(8) var<storage, read_write> v_cache: array<f32>;  // OUTPUT 1: (pool rows, kv_dim)

fn x_at(i: u32) -> f32 {
    return x[i / 4u][i % 4u];
}

fn norm_at(i: u32) -> f32 {
    return norm[i / 4u][i % 4u];
}

fn byte_at(offset: u32) -> u32 {
    return (w[offset >> 2u] >> ((offset & 3u) * 8u)) & 0xffu;
}

fn f16_at(offset: u32) -> f32 { // offset is even
    return unpack2x16float(w[offset >> 2u] >> ((offset & 2u) * 8u)).x;
}

fn i8_at(offset: u32) -> f32 {
    return f32(bitcast<i32>(byte_at(offset) << 24u) >> 24u);
}

// The 6-bit scale and min of sub-block `sub` (0..7) of the q4_k super-block at byte `base` (a
// word boundary). Its 12 scale bytes b are 3 words, and sub-block i and i + 4 take their bits
// from b[i], b[4 + i] and b[8 + i], byte i of each word.
fn q4k_scale_min(base: u32, sub: u32) -> vec2<f32> {
    let i = base / 4u + 1u;
    let b = (vec3(w[i], w[i + 1u], w[i + 2u]) >> vec3(8u * (sub % 4u))) & vec3(0xffu);
    let low = vec2(b.x & 63u, b.y & 63u);
    let high = vec2((b.z & 0xfu) | ((b.x >> 6u) << 4u), (b.z >> 4u) | ((b.y >> 6u) << 4u));
    return vec2<f32>(select(high, low, sub < 4u));
}

// Element `col` of `row` for the block formats (llama.cpp's dequantize_row_*).
fn block_weight(row: u32, col: u32) -> f32 {
    switch WEIGHT_DTYPE {
        case 3u: { // q4_0: f16 d, 16 bytes; j < 16 low nibbles, j >= 16 high nibbles
            let base = (row * (params.k / 32u) + col / 32u) * 18u;
            let j = col % 32u;
            let q = (byte_at(base + 2u + j % 16u) >> (j / 16u * 4u)) & 0xfu;
            return f16_at(base) * (f32(q) - 8.0);
        }
        case 4u: { // q4_1: f16 d, f16 m, 16 bytes as q4_0
            let base = (row * (params.k / 32u) + col / 32u) * 20u;
            let j = col % 32u;
            let q = (byte_at(base + 4u + j % 16u) >> (j / 16u * 4u)) & 0xfu;
            return f16_at(base) * f32(q) + f16_at(base + 2u);
        }
        case 5u: { // q8_0: f16 d, 32 int8
            let base = (row * (params.k / 32u) + col / 32u) * 34u;
            return f16_at(base) * i8_at(base + 2u + col % 32u);
        }
        case 6u: { // q4_k: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
            let base = (row * (params.k / 256u) + col / 256u) * 144u;
            let j = col % 256u;
            let sub = j / 32u;
            let scale_min = q4k_scale_min(base, sub);
            let q = (byte_at(base + 16u + j / 64u * 32u + j % 32u) >> (sub % 2u * 4u)) & 0xfu;
            return (f16_at(base) * scale_min.x) * f32(q) - f16_at(base + 2u) * scale_min.y;
        }
        default: { // q6_k: 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales, f16 d
            let base = (row * (params.k / 256u) + col / 256u) * 210u;
            let j = col % 256u;
            let half = j / 128u;
            let quarter = j % 128u / 32u;
            let l = j % 32u;
            let low = (byte_at(base + half * 64u + l + quarter % 2u * 32u) >> (quarter / 2u * 4u)) & 0xfu;
            let high = (byte_at(base + 128u + half * 32u + l) >> (2u * quarter)) & 3u;
            let scale = i8_at(base + 192u + half * 8u + l / 16u + 2u * quarter);
            return (f16_at(base + 208u) * scale) * (f32(low | (high << 4u)) - 32.0);
        }
    }
}

// Elements col and col + 1 (col even) of `row` as f32.
fn weight_pair(row: u32, col: u32) -> vec2<f32> {
    let i = (row * params.k + col) / 2u;
    switch WEIGHT_DTYPE {
        case 0u: { return vec2(bitcast<f32>(w[2u * i]), bitcast<f32>(w[2u * i + 1u])); }
        case 1u: { return unpack2x16float(w[i]); }
        case 2u: { let b = w[i]; return vec2(bitcast<f32>(b << 16u), bitcast<f32>(b & 0xffff0000u)); }
        default: { return vec2(block_weight(row, col), block_weight(row, col + 1u)); }
    }
}

// Input elements col and col + 1 of the token row at `base`, transformed by INPUT (RMSNorm without
// its per-row scale, which the caller applies to the dot product).
fn input_pair(base: u32, col: u32) -> vec2<f32> {
    let v = vec2(x_at(base + col), x_at(base + col + 1u));
    switch INPUT {
        case 1u: { return v * vec2(norm_at(col), norm_at(col + 1u)); }
        case 2u: {
            let up = vec2(x_at(base + params.k + col), x_at(base + params.k + col + 1u));
            return v / (1.0 + exp(-v)) * up;
        }
        default: { return v; }
    }
}

// RMSNorm's 1 / sqrt(mean(x^2) + eps) from a token row's sum of squares; 1 for other inputs.
fn row_scale(sum_of_squares: f32) -> f32 {
    return select(1.0, inverseSqrt(sum_of_squares / f32(params.k) + params.eps), INPUT == 1u);
}

// The weight row that output slot `slot` of this part computes. Rotary output takes each head's
// rows in rotation pairs, dims i and i + head_dim / 2 in slots 2m and 2m + 1, so that whoever
// computes one (a GEMV workgroup of an even number of rows, a tile thread's 4 rows) has the other.
// Parts and stacked blocks start at whole heads (the host splits them so).
fn matrix_row(slot: u32) -> u32 {
    if (OUTPUT == 0u) {
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
    if (OUTPUT == 0u) {
        let i = t * params.out_stride + column;
        out[i] = select(value, out[i] + value, params.accumulate == 1u);
        return;
    }
    let pos = step.slots[t].x;
    let kv_row = step.slots[t].y;
    if (column >= params.q_dim + params.kv_dim) {
        v_cache[kv_row * params.kv_dim + column - params.q_dim - params.kv_dim] = value;
        return;
    }
    // An even slot holds x1 (dim i), an odd one x2 (dim i + half): (x1 cos - x2 sin, x2 cos + x1 sin).
    let half = params.head_dim / 2u;
    let cs = cos_sin[pos * half + column % half];
    let rotated = value * cs.x + select(partner, -partner, slot % 2u == 0u) * cs.y;
    if (column < params.q_dim) {
        out[t * params.out_stride + column] = rotated;
    } else {
        k_cache[kv_row * params.kv_dim + column - params.q_dim] = rotated;
    }
}

const GEMV_WG: u32 = 64u;
// Rows (output slots) per GEMV workgroup, 1, 2 or 4, chosen by the host per matrix
// (ops::gemv_rows): more rows reuse each loaded input more, fewer make more workgroups to fill a
// large GPU. Rotary output needs an even number.
override GEMV_ROWS: u32 = 4u;
// The most tokens a GEMV workgroup takes (crate::gpu::ops::GEMV_COLUMNS): its per-token arrays
// live in function memory, whose sizes must be constant.
const MAX_GEMV_COLUMNS: u32 = 8u;
// Tokens per GEMV workgroup: 1 for a lone sequence's decode step, MAX_GEMV_COLUMNS for a pass of
// several sequences' tokens, which then load and decode each weight once for all of them.
override GEMV_COLUMNS: u32 = 1u;

// A token's totals over the GEMV workgroup: its sums of the workgroup's slots, and the sum of the
// squares of its inputs (RMSNorm).
struct Totals {
    sums: vec4<f32>,
    squares: f32,
}

// The GEMVs' reduction over their workgroup, of every token at once. The file as it is reduces
// through workgroup memory: a tree of log2(GEMV_WG) = 6 barriers. Its subgroup form
// (Kernel::source_for) replaces the block from "workgroup reduction {" to "} workgroup reduction"
// with the commented block after it, which adds within each subgroup (subgroupAdd) and joins the
// subgroups with one barrier. A swap rather than a switch: a module for an adapter without
// subgroups must not name their builtins at all.
// workgroup reduction {
// The builtins a GEMV thread reads.
struct Thread {
    @builtin(local_invocation_index) index: u32,
}

var<workgroup> thread_sums: array<vec4<f32>, GEMV_WG * GEMV_COLUMNS>;   // (thread, token)
var<workgroup> thread_squares: array<f32, GEMV_WG * GEMV_COLUMNS>;

// Adds up every thread's `sums` and `squares` of each token; column_totals then reads them.
fn reduce_columns(thread: Thread, sums: array<vec4<f32>, MAX_GEMV_COLUMNS>, squares: array<f32, MAX_GEMV_COLUMNS>) {
    for (var c = 0u; c < GEMV_COLUMNS; c++) {
        thread_sums[thread.index * GEMV_COLUMNS + c] = sums[c];
        thread_squares[thread.index * GEMV_COLUMNS + c] = squares[c];
    }
    workgroupBarrier();
    for (var stride = GEMV_WG / 2u; stride > 0u; stride /= 2u) {
        if (thread.index < stride) {
            for (var c = 0u; c < GEMV_COLUMNS; c++) {
                let i = thread.index * GEMV_COLUMNS + c;
                thread_sums[i] += thread_sums[i + stride * GEMV_COLUMNS];
                thread_squares[i] += thread_squares[i + stride * GEMV_COLUMNS];
            }
        }
        workgroupBarrier();
    }
}

fn column_totals(thread: Thread, c: u32) -> Totals {
    return Totals(thread_sums[c], thread_squares[c]);
}
// } workgroup reduction
/* subgroup reduction {
struct Thread {
    @builtin(local_invocation_index) index: u32,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) subgroup: u32,
    @builtin(num_subgroups) subgroups: u32,
}

// One slot per subgroup and token: GEMV_WG / 4 subgroups covers the smallest subgroups an
// adapter may have (4).
var<workgroup> subgroup_sums: array<vec4<f32>, GEMV_WG / 4u * GEMV_COLUMNS>;   // (subgroup, token)
var<workgroup> subgroup_squares: array<f32, GEMV_WG / 4u * GEMV_COLUMNS>;

fn reduce_columns(thread: Thread, sums: array<vec4<f32>, MAX_GEMV_COLUMNS>, squares: array<f32, MAX_GEMV_COLUMNS>) {
    for (var c = 0u; c < GEMV_COLUMNS; c++) {
        let sums_of_subgroup = subgroupAdd(sums[c]);
        let squares_of_subgroup = subgroupAdd(squares[c]);
        if (thread.lane == 0u) {
            subgroup_sums[thread.subgroup * GEMV_COLUMNS + c] = sums_of_subgroup;
            subgroup_squares[thread.subgroup * GEMV_COLUMNS + c] = squares_of_subgroup;
        }
    }
    workgroupBarrier();
}

fn column_totals(thread: Thread, c: u32) -> Totals {
    var totals = Totals(vec4(0.0, 0.0, 0.0, 0.0), 0.0);
    for (var i = 0u; i < thread.subgroups; i++) {
        totals.sums += subgroup_sums[i * GEMV_COLUMNS + c];
        totals.squares += subgroup_squares[i * GEMV_COLUMNS + c];
    }
    return totals;
}
} subgroup reduction */

// The first input row of a GEMV workgroup's column c (token t0 + c); columns past the pass's
// tokens read the last token's row, and their sums are not stored.
fn column_base(t0: u32, c: u32) -> u32 {
    return min(t0 + c, step.n_tokens - 1u) * params.in_stride;
}

// The end of a GEMV: the workgroup's sums of slots row0.. for each of its tokens (scaled for
// RMSNorm) stored, thread i storing slot i % GEMV_ROWS of token t0 + i / GEMV_ROWS.
fn store_columns(thread: Thread, t0: u32, row0: u32, sums: array<vec4<f32>, MAX_GEMV_COLUMNS>, squares: array<f32, MAX_GEMV_COLUMNS>) {
    reduce_columns(thread, sums, squares);
    let c = thread.index / GEMV_ROWS;
    let r = thread.index % GEMV_ROWS;
    if (c < GEMV_COLUMNS && t0 + c < step.n_tokens && row0 + r < params.rows) {
        let totals = column_totals(thread, c);
        let scale = row_scale(totals.squares);
        store(t0 + c, row0 + r, totals.sums[r] * scale, totals.sums[r ^ 1u] * scale);
    }
}

// GEMV for f32, f16 and bf16, GEMV_ROWS rows of GEMV_COLUMNS tokens per workgroup (rows are laid
// over x and y so that huge matrices fit the grid): each thread takes pairs of columns, loading a
// pair's weights once for every token and each token's inputs once for every row.
@compute @workgroup_size(GEMV_WG)
fn gemv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) n_wg: vec3<u32>, thread: Thread) {
    let row0 = (wg.x + wg.y * n_wg.x) * GEMV_ROWS;
    let t0 = wg.z * GEMV_COLUMNS;
    if (row0 >= params.rows || t0 >= step.n_tokens) {
        return;
    }
    var sums: array<vec4<f32>, MAX_GEMV_COLUMNS>; // per token, slots row0..row0 + GEMV_ROWS - 1
    var squares: array<f32, MAX_GEMV_COLUMNS>;
    for (var col = 2u * thread.index; col < params.k; col += 2u * GEMV_WG) {
        var weights: array<vec2<f32>, 4>;
        for (var r = 0u; r < GEMV_ROWS; r++) {
            // Slots past the end repeat the last one; their sums are not stored.
            weights[r] = weight_pair(matrix_row(min(row0 + r, params.rows - 1u)), col);
        }
        for (var c = 0u; c < GEMV_COLUMNS; c++) {
            let x_base = column_base(t0, c);
            let input = input_pair(x_base, col);
            if (INPUT == 1u) {
                let v = vec2(x_at(x_base + col), x_at(x_base + col + 1u));
                squares[c] += dot(v, v);
            }
            for (var r = 0u; r < GEMV_ROWS; r++) {
                sums[c][r] += dot(input, weights[r]);
            }
        }
    }
    store_columns(thread, t0, row0, sums, squares);
}

// GEMV for the formats of 32-weight blocks (q4_0, q4_1, q8_0), GEMV_ROWS rows of GEMV_COLUMNS
// tokens per workgroup. Four neighbouring threads share a block, each taking a quarter of it: 8
// weights, from one q4 quant word (word j's low nibbles are the block's weights 4j..4j + 3, its high
// nibbles 16 + 4j..) or two q8_0 words (weights 8j..8j + 7). So a subgroup's loads of inputs (2 vec4
// per thread and token) and of quants each cover contiguous memory; a thread decodes each quarter
// once for every token and loads each token's 8 inputs once for every row. The offset comes out of
// the dot product: q4_0 d * sum x q - 8 d * sum x, q4_1 d * sum x q + m * sum x. A thread takes two
// quarters per step (GEMV_WG apart) to have twice the loads in flight.

// Inputs col..col + 3 of the token row at `base` (both multiples of 4) transformed by INPUT
// (RMSNorm without its per-row scale), and the sum of their squares as read.
fn input_quad(base: u32, col: u32) -> vec4<f32> {
    let v = x[(base + col) / 4u];
    switch INPUT {
        case 1u: { return v * norm[col / 4u]; }
        case 2u: { return v / (1.0 + exp(-v)) * x[(base + params.k + col) / 4u]; }
        default: { return v; }
    }
}

fn squares_quad(base: u32, col: u32) -> f32 {
    let v = x[(base + col) / 4u];
    return dot(v, v);
}

// The 4 bytes at byte `p` (even) as one word.
fn word_at(p: u32) -> u32 {
    let i = p / 4u;
    if ((p & 2u) == 0u) {
        return w[i];
    }
    return (w[i] >> 16u) | (w[i + 1u] << 16u);
}

// Bytes 0..3 of a word as the low nibbles' values, and as the high nibbles' values.
fn low_nibbles(word: u32) -> vec4<f32> {
    return vec4<f32>((vec4(word) >> vec4(0u, 8u, 16u, 24u)) & vec4(0xfu));
}

fn high_nibbles(word: u32) -> vec4<f32> {
    return vec4<f32>((vec4(word) >> vec4(4u, 12u, 20u, 28u)) & vec4(0xfu));
}

// Bytes 0..3 of a word as int8 values.
fn signed_bytes(word: u32) -> vec4<f32> {
    return vec4<f32>(bitcast<vec4<i32>>(vec4(word) << vec4(24u, 16u, 8u, 0u)) >> vec4(24u));
}

// The block columns of quarter j's inputs: two quads, whose weights a Quarter holds in order.
fn quarter_cols(j: u32) -> vec2<u32> {
    if (WEIGHT_DTYPE == 5u) {
        return vec2(8u * j, 8u * j + 4u);
    }
    return vec2(4u * j, 16u + 4u * j);
}

// A decoded quarter: its quants as the two quads of quarter_cols, and the scale d and offset m of
// sum x w = d (sum x q) + m (sum x).
struct Quarter {
    a: vec4<f32>,
    b: vec4<f32>,
    d: f32,
    m: f32,
}

// Quarter j of `block`.
fn quarter_weights(block: u32, j: u32) -> Quarter {
    switch WEIGHT_DTYPE {
        case 3u: { // q4_0: f16 d, 16 bytes of nibbles
            let start = block * 18u;
            let q = word_at(start + 2u + 4u * j);
            let d = f16_at(start);
            return Quarter(low_nibbles(q), high_nibbles(q), d, -8.0 * d);
        }
        case 4u: { // q4_1: f16 d, f16 m, 16 bytes of nibbles (20: word-aligned)
            let start = block * 5u;
            let q = w[start + 1u + j];
            let dm = unpack2x16float(w[start]);
            return Quarter(low_nibbles(q), high_nibbles(q), dm.x, dm.y);
        }
        default: { // q8_0: f16 d, 32 int8
            let start = block * 34u;
            let p = start + 2u + 8u * j;
            return Quarter(signed_bytes(word_at(p)), signed_bytes(word_at(p + 4u)), f16_at(start), 0.0);
        }
    }
}

// sum x * w over a quarter whose inputs are the quads a and b with the sum x_sum.
fn quarter_dot(q: Quarter, a: vec4<f32>, b: vec4<f32>, x_sum: f32) -> f32 {
    return q.d * (dot(a, q.a) + dot(b, q.b)) + q.m * x_sum;
}

@compute @workgroup_size(GEMV_WG)
fn gemv_blocks(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) n_wg: vec3<u32>, thread: Thread) {
    let row0 = (wg.x + wg.y * n_wg.x) * GEMV_ROWS;
    let t0 = wg.z * GEMV_COLUMNS;
    if (row0 >= params.rows || t0 >= step.n_tokens) {
        return;
    }
    let blocks = params.k / 32u;
    let quarters = 4u * blocks;
    var sums: array<vec4<f32>, MAX_GEMV_COLUMNS>; // per token, rows row0..row0 + GEMV_ROWS - 1
    var squares: array<f32, MAX_GEMV_COLUMNS>;
    for (var first = thread.index; first < quarters; first += 2u * GEMV_WG) {
        // Where the row's quarters are not a multiple of 2 GEMV_WG, the last step's second quarter
        // may be past the row: it then takes zero inputs and re-reads the first one's weights.
        let has_second = first + GEMV_WG < quarters;
        for (var i = 0u; i < 2u; i++) {
            let live = i == 0u || has_second;
            let quarter = select(first, first + GEMV_WG, i == 1u && has_second);
            let cols = quarter / 4u * 32u + quarter_cols(quarter % 4u);
            var a: array<vec4<f32>, MAX_GEMV_COLUMNS>;
            var b: array<vec4<f32>, MAX_GEMV_COLUMNS>;
            var x_sums: array<f32, MAX_GEMV_COLUMNS>;
            for (var c = 0u; c < GEMV_COLUMNS; c++) {
                let x_base = column_base(t0, c);
                a[c] = select(vec4(0.0), input_quad(x_base, cols.x), live);
                b[c] = select(vec4(0.0), input_quad(x_base, cols.y), live);
                x_sums[c] = dot(a[c] + b[c], vec4(1.0, 1.0, 1.0, 1.0));
                if (INPUT == 1u && live) {
                    squares[c] += squares_quad(x_base, cols.x) + squares_quad(x_base, cols.y);
                }
            }
            for (var r = 0u; r < GEMV_ROWS; r++) {
                // Slots past the end repeat the last one; their sums are not stored.
                let weights = quarter_weights(matrix_row(min(row0 + r, params.rows - 1u)) * blocks + quarter / 4u, quarter % 4u);
                for (var c = 0u; c < GEMV_COLUMNS; c++) {
                    sums[c][r] += quarter_dot(weights, a[c], b[c], x_sums[c]);
                }
            }
        }
    }
    store_columns(thread, t0, row0, sums, squares);
}

// GEMV for the 256-weight super-block formats (q4_k, q6_k), GEMV_ROWS rows of GEMV_COLUMNS tokens
// per workgroup. A super-block is 4 units of 64 weights: two runs of 32, a and b, whose quants are
// the low and the high nibbles of the same 32 bytes (q4_k: sub-blocks 2i and 2i + 1; q6_k: quarters
// q and q + 2 of a half, whose 2 high bits share the half's 32 bytes of qh). Four neighbouring
// threads share a unit, each taking 8 of its quant bytes, 8 weights of each run: a subgroup's loads
// of inputs (4 vec4 per thread and token) and of quants cover contiguous memory. A thread loads a
// piece's quants and scales once for every token, and unpacks them for each.
// q4_k's mins come out of the dot product: d sc (sum x q) - dmin m (sum x) per sub-block.

// A piece of one row: its quant words (q4_k: both runs' nibbles in `low`; q6_k: the low nibbles
// and the high 2 bits), and each run's scale and min: sum x w = scales.a (a . qa) + scales.b (b . qb)
// - mins . (sum a, sum b).
struct Piece {
    low: vec2<u32>,
    high: vec2<u32>,
    scales: vec2<f32>,
    mins: vec2<f32>,
}

// The piece of super-block `block` at unit `part`, quant bytes 8j..8j + 7.
fn superblock_piece(block: u32, part: u32, j: u32) -> Piece {
    if (WEIGHT_DTYPE == 6u) { // q4_k: f16 d, f16 dmin, 12 bytes of scales, 128 of nibbles (144: word-aligned)
        let start = block * 144u;
        let quants = (start + 16u + part * 32u) / 4u + 2u * j;
        let sm_a = q4k_scale_min(start, 2u * part);
        let sm_b = q4k_scale_min(start, 2u * part + 1u);
        let dm = unpack2x16float(w[start / 4u]);
        return Piece(vec2(w[quants], w[quants + 1u]), vec2(0u), dm.x * vec2(sm_a.x, sm_b.x), dm.y * vec2(sm_a.y, sm_b.y));
    }
    // q6_k: 128 bytes of low nibbles, 64 of high 2 bits, 16 int8 scales, f16 d. Each 16 weights
    // have a scale: a's are scales 2q and 2q + 1 of the half, b's 2q + 4 and 2q + 5; this thread's
    // 8 weights lie in the (j / 2)th 16 of each run.
    let start = block * 210u;
    let half = part / 2u;
    let quarter = part % 2u;
    let low_at = start + half * 64u + quarter * 32u + 8u * j;
    let high_at = start + 128u + half * 32u + 8u * j;
    let scales = start + 192u + half * 8u + 2u * quarter + j / 2u;
    let d = f16_at(start + 208u);
    return Piece(vec2(word_at(low_at), word_at(low_at + 4u)), vec2(word_at(high_at), word_at(high_at + 4u)),
                 d * vec2(i8_at(scales), i8_at(scales + 4u)), vec2(0.0));
}

// sum x * w over a piece of unit `part` whose inputs are the runs a and b with the sums x_sums.
fn piece_dot(p: Piece, part: u32, a: array<vec4<f32>, 2>, b: array<vec4<f32>, 2>, x_sums: vec2<f32>) -> f32 {
    var dot_a = 0.0;
    var dot_b = 0.0;
    if (WEIGHT_DTYPE == 6u) {
        dot_a = dot(a[0], low_nibbles(p.low.x)) + dot(a[1], low_nibbles(p.low.y));
        dot_b = dot(b[0], high_nibbles(p.low.x)) + dot(b[1], high_nibbles(p.low.y));
    } else {
        let quarter = part % 2u;
        let bytes = vec4(0u, 8u, 16u, 24u);
        for (var i = 0u; i < 2u; i++) {
            let l = vec4(p.low[i]) >> bytes;
            let h = vec4(p.high[i]) >> bytes;
            let qa = vec4<f32>((l & vec4(0xfu)) | (((h >> vec4(2u * quarter)) & vec4(3u)) << vec4(4u))) - 32.0;
            let qb = vec4<f32>(((l >> vec4(4u)) & vec4(0xfu)) | (((h >> vec4(2u * quarter + 4u)) & vec4(3u)) << vec4(4u))) - 32.0;
            dot_a += dot(a[i], qa);
            dot_b += dot(b[i], qb);
        }
    }
    return p.scales.x * dot_a + p.scales.y * dot_b - dot(p.mins, x_sums);
}

@compute @workgroup_size(GEMV_WG)
fn gemv_superblocks(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) n_wg: vec3<u32>, thread: Thread) {
    let row0 = (wg.x + wg.y * n_wg.x) * GEMV_ROWS;
    let t0 = wg.z * GEMV_COLUMNS;
    if (row0 >= params.rows || t0 >= step.n_tokens) {
        return;
    }
    let superblocks = params.k / 256u;
    var sums: array<vec4<f32>, MAX_GEMV_COLUMNS>;
    var squares: array<f32, MAX_GEMV_COLUMNS>;
    for (var index = thread.index; index < superblocks * 16u; index += GEMV_WG) {
        let sb = index / 16u;
        let part = index / 4u % 4u; // the unit
        let j = index % 4u;         // its quant bytes 8j..8j + 7, weights 8j..8j + 7 of each run
        var pieces: array<Piece, 4>;
        for (var r = 0u; r < GEMV_ROWS; r++) {
            // Slots past the end repeat the last one; their sums are not stored.
            pieces[r] = superblock_piece(matrix_row(min(row0 + r, params.rows - 1u)) * superblocks + sb, part, j);
        }
        // q4_k: runs at 64 part and + 32; q6_k: half part / 2, quarters part % 2 and + 2.
        let col_a = sb * 256u + select((part / 2u) * 128u + (part % 2u) * 32u, part * 64u, WEIGHT_DTYPE == 6u) + 8u * j;
        let col_b = col_a + select(64u, 32u, WEIGHT_DTYPE == 6u);
        for (var c = 0u; c < GEMV_COLUMNS; c++) {
            let x_base = column_base(t0, c);
            let a = array(input_quad(x_base, col_a), input_quad(x_base, col_a + 4u));
            let b = array(input_quad(x_base, col_b), input_quad(x_base, col_b + 4u));
            if (INPUT == 1u) {
                squares[c] += squares_quad(x_base, col_a) + squares_quad(x_base, col_a + 4u) + squares_quad(x_base, col_b) + squares_quad(x_base, col_b + 4u);
            }
            let ones = vec4(1.0, 1.0, 1.0, 1.0);
            let x_sums = vec2(dot(a[0] + a[1], ones), dot(b[0] + b[1], ones));
            for (var r = 0u; r < GEMV_ROWS; r++) {
                sums[c][r] += piece_dot(pieces[r], part, a, b, x_sums);
            }
        }
    }
    store_columns(thread, t0, row0, sums, squares);
}

// Tiles of TILE tokens x TILE_ROWS rows, stepping k by TILE_K; each thread computes a register
// tile of REGISTER_TILE tokens x REGISTER_TILE rows. The tiles are stored k-major so that a thread
// reads its inputs and weights of each k as vec4s: REGISTER_TILE^2 FMAs per REGISTER_TILE / 2
// workgroup-memory reads. The file as it is takes 4 (256 threads, 16 sums each); its 8x8 form
// (Kernel::source_for swaps the REGISTER_TILE line) takes 8 (64 threads, 64 sums each, twice the
// FMAs per read: a GPU's workgroup memory serves about a quarter as many floats per clock as its
// cores do FMAs, but a CPU adapter pays for the registers).
// Each k step stages the tile's inputs and its weights, decoded once, in workgroup memory as tile_t,
// where all 64 tokens (rows) of the tile reuse them; a thread reads the next step's into registers
// while the current one is multiplied, so the global loads overlap the FMAs. tile_t is f32 here;
// Kernel::source_for with f16 tiles makes it f16 in a module of its own (where the device has
// shader-f16), halving the tiles' workgroup memory and its traffic. Products and sums stay f32 in
// both: an f16 product overflows (past 65504) on the 1e4-sized gate * up activations of
// random-weight models.
alias tile_t = f32;
const REGISTER_TILE: u32 = 4u;
const TILE: u32 = 64u;
const TILE_ROWS: u32 = 64u;
const TILE_K: u32 = 16u;
const TILE_THREADS: u32 = (TILE / REGISTER_TILE) * (TILE_ROWS / REGISTER_TILE);
// Each thread stages 4 elements of STAGED_ROWS token rows and as many weight rows per k step, 4
// threads per row.
const STAGED_ROWS: u32 = TILE * TILE_K / 4u / TILE_THREADS;
const STAGED_STRIDE: u32 = TILE_THREADS / 4u; // rows between a thread's staged rows
var<workgroup> x_tile: array<vec4<tile_t>, 256>;  // (TILE_K k, TILE / 4 token quads)
var<workgroup> w_tile: array<vec4<tile_t>, 256>;  // (TILE_K k, TILE_ROWS / 4 row quads)
var<workgroup> row_squares: array<f32, 256>; // RMSNorm: 4 partial sums of squares per token row

// Weights col..col + 3 (col a multiple of 4) of `row`, zero past k. The 32-weight block formats
// decode 4 at a time from one quant word (a block's columns 4j..4j + 3 are word j's low nibbles
// for j < 4, word j - 4's high nibbles for j >= 4).
fn weight_quad(row: u32, col: u32) -> vec4<f32> {
    let block = row * (params.k / 32u) + col / 32u;
    let j = col % 32u / 4u;
    switch WEIGHT_DTYPE {
        case 3u: { // q4_0
            let start = block * 18u;
            let word = word_at(start + 2u + 4u * (j % 4u));
            let q = select(low_nibbles(word), high_nibbles(word), j >= 4u);
            return f16_at(start) * (q - 8.0);
        }
        case 4u: { // q4_1
            let start = block * 20u;
            let word = word_at(start + 4u + 4u * (j % 4u));
            let q = select(low_nibbles(word), high_nibbles(word), j >= 4u);
            return f16_at(start) * q + f16_at(start + 2u);
        }
        case 5u: { // q8_0
            let start = block * 34u;
            return f16_at(start) * signed_bytes(word_at(start + 2u + 4u * j));
        }
        case 6u: { // q4_k: 4 nibbles of one sub-block from one word (low: even sub-blocks, high: odd)
            let start = (row * (params.k / 256u) + col / 256u) * 144u;
            let c = col % 256u;
            let sub = c / 32u;
            let word = w[(start + 16u + c / 64u * 32u + c % 32u) / 4u];
            let q = select(low_nibbles(word), high_nibbles(word), sub % 2u == 1u);
            let scale_min = q4k_scale_min(start, sub);
            return f16_at(start) * scale_min.x * q - f16_at(start + 2u) * scale_min.y;
        }
        case 7u: { // q6_k: as block_weight, 4 weights of one quarter at a time
            let start = (row * (params.k / 256u) + col / 256u) * 210u;
            let c = col % 256u;
            let half = c / 128u;
            let quarter = c % 128u / 32u;
            let l = c % 32u;
            let bytes = vec4(0u, 8u, 16u, 24u);
            let low = (vec4(word_at(start + half * 64u + l + quarter % 2u * 32u)) >> (bytes + vec4(quarter / 2u * 4u))) & vec4(0xfu);
            let high = (vec4(word_at(start + 128u + half * 32u + l)) >> (bytes + vec4(2u * quarter))) & vec4(3u);
            let scale = i8_at(start + 192u + half * 8u + l / 16u + 2u * quarter);
            return f16_at(start + 208u) * scale * (vec4<f32>(low | (high << vec4(4u))) - 32.0);
        }
        default: { // k is even, so each pair lies wholly inside or past the row
            var pairs = vec4(0.0, 0.0, 0.0, 0.0);
            if (col < params.k) {
                pairs = vec4(weight_pair(row, col), pairs.zw);
            }
            if (col + 2u < params.k) {
                pairs = vec4(pairs.xy, weight_pair(row, col + 2u));
            }
            return pairs;
        }
    }
}

fn input_quad_checked(base: u32, col: u32) -> vec4<f32> {
    var v = vec4(0.0, 0.0, 0.0, 0.0);
    if (col < params.k) {
        v = vec4(input_pair(base, col), v.zw);
    }
    if (col + 2u < params.k) {
        v = vec4(v.xy, input_pair(base, col + 2u));
    }
    return v;
}

@compute @workgroup_size(TILE_ROWS / REGISTER_TILE, TILE / REGISTER_TILE)
fn tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
         @builtin(local_invocation_index) li: u32) {
    let row0 = wg.x * TILE_ROWS;
    let t0 = wg.y * TILE;
    // Thread li stages elements c..c + 3 of token rows and weight rows r + STAGED_STRIDE p.
    let r = li / 4u;
    let c = 4u * (li % 4u);
    // RMSNorm: 4 threads sum the squares of each of the tile's token rows, and each thread scales
    // the inputs it stages by their row's 1 / rms, so that f16 tiles hold normalised values (the
    // products of GEMV scale the dot product instead).
    var scales: array<f32, STAGED_ROWS>;
    for (var p = 0u; p < STAGED_ROWS; p++) {
        scales[p] = 1.0;
    }
    if (INPUT == 1u) {
        for (var p = 0u; p < STAGED_ROWS; p++) {
            let t = t0 + r + STAGED_STRIDE * p;
            var squares = 0.0;
            if (t < step.n_tokens) {
                for (var col = li % 4u; col < params.k; col += 4u) {
                    let v = x_at(t * params.in_stride + col);
                    squares += v * v;
                }
            }
            row_squares[li + TILE_THREADS * p] = squares;
        }
        workgroupBarrier();
        for (var p = 0u; p < STAGED_ROWS; p++) {
            let first = 4u * (r + STAGED_STRIDE * p);
            scales[p] = row_scale(row_squares[first] + row_squares[first + 1u] + row_squares[first + 2u] + row_squares[first + 3u]);
        }
    }
    var xv: array<vec4<f32>, STAGED_ROWS>;
    var wv: array<vec4<f32>, STAGED_ROWS>;
    for (var p = 0u; p < STAGED_ROWS; p++) {
        xv[p] = staged_input(t0 + r + STAGED_STRIDE * p, c, scales[p]);
        wv[p] = staged_weight(row0 + r + STAGED_STRIDE * p, c);
    }
    const QUADS = REGISTER_TILE / 4u; // a thread's token (row) quads
    // acc[QUADS j + h]: token REGISTER_TILE lid.y + j, rows REGISTER_TILE lid.x + 4h..+ 3
    var acc: array<vec4<f32>, REGISTER_TILE * QUADS>;
    for (var k0 = 0u; k0 < params.k; k0 += TILE_K) {
        for (var p = 0u; p < STAGED_ROWS; p++) {
            let quad = (r + STAGED_STRIDE * p) / 4u;
            let lane = r % 4u;
            for (var i = 0u; i < 4u; i++) {
                x_tile[(c + i) * (TILE / 4u) + quad][lane] = tile_t(xv[p][i]);
                w_tile[(c + i) * (TILE_ROWS / 4u) + quad][lane] = tile_t(wv[p][i]);
            }
        }
        workgroupBarrier();
        if (k0 + TILE_K < params.k) {
            for (var p = 0u; p < STAGED_ROWS; p++) {
                xv[p] = staged_input(t0 + r + STAGED_STRIDE * p, k0 + TILE_K + c, scales[p]);
                wv[p] = staged_weight(row0 + r + STAGED_STRIDE * p, k0 + TILE_K + c);
            }
        }
        for (var kk = 0u; kk < TILE_K; kk++) {
            var ws: array<vec4<f32>, QUADS>;
            for (var q = 0u; q < QUADS; q++) {
                ws[q] = vec4<f32>(w_tile[kk * (TILE_ROWS / 4u) + QUADS * lid.x + q]);
            }
            for (var h = 0u; h < QUADS; h++) {
                let xs = vec4<f32>(x_tile[kk * (TILE / 4u) + QUADS * lid.y + h]);
                let j = 4u * QUADS * h; // acc index of token 4h's first row quad
                for (var q = 0u; q < QUADS; q++) {
                    acc[j + q] += xs.x * ws[q];
                    acc[j + QUADS + q] += xs.y * ws[q];
                    acc[j + 2u * QUADS + q] += xs.z * ws[q];
                    acc[j + 3u * QUADS + q] += xs.w * ws[q];
                }
            }
        }
        workgroupBarrier();
    }
    for (var j = 0u; j < REGISTER_TILE; j++) {
        let t = t0 + REGISTER_TILE * lid.y + j;
        for (var i = 0u; i < REGISTER_TILE; i++) {
            let slot = row0 + REGISTER_TILE * lid.x + i;
            let sums = acc[QUADS * j + i / 4u];
            if (slot < params.rows && t < step.n_tokens) {
                store(t, slot, sums[i % 4u], sums[(i ^ 1u) % 4u]);
            }
        }
    }
}

// Inputs col..col + 3 of token t scaled by `scale`, zero past the pass's tokens.
fn staged_input(t: u32, col: u32, scale: f32) -> vec4<f32> {
    if (t >= step.n_tokens) {
        return vec4(0.0);
    }
    return input_quad_checked(t * params.in_stride, col) * scale;
}

// Weights col..col + 3 of output slot `slot`, zero past the part's rows.
fn staged_weight(slot: u32, col: u32) -> vec4<f32> {
    if (slot >= params.rows) {
        return vec4(0.0);
    }
    return weight_quad(matrix_row(slot), col);
}

// out[t] = W[token t] for the tokens whose row lies in this part; x holds the token ids.
@compute @workgroup_size(64)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.y;
    let col = 2u * gid.x;
    if (t >= step.n_tokens || col >= params.k) {
        return;
    }
    let token = u32(x_at(t));
    if (token < params.row_start || token >= params.row_start + params.rows) {
        return;
    }
    let wv = weight_pair(token - params.row_start, col);
    out[t * params.out_stride + col] = wv.x;
    out[t * params.out_stride + col + 1u] = wv.y;
}
