// Reading a weight matrix: out = x @ W^T, and the embedding gather out[t] = W[token t], for a
// (rows, k) matrix stored as f32, f16, bf16 or a llama.cpp block format, decoded in the kernel with
// f32 arithmetic. The gather lives here because it shares the block decoding with the products.
// Entry points: for a few tokens (decode steps) `gemv` (f32, f16, bf16), `gemv_blocks` (q4_0,
// q4_1, q5_0, q5_1, q8_0, iq4_nl, iq4_xs) and `gemv_superblocks` (q2_k, q3_k, q4_k, q5_k, q6_k), each taking 1 or MAX_GEMV_COLUMNS tokens per
// workgroup, the last two on f32 inputs or on inputs quantize.wgsl made int8 (Q8_INPUTS) or f16
// (F16_INPUTS, tiled_coop);
// `tiled` for prompt prefill (`tiled_coop` on tensor cores where the device has
// cooperative matrices); `gather` for embeddings.
// A matrix split by rows over several buffers runs one dispatch per part; each writes its slice of
// output columns [row_start, row_start + rows) (the gather: the tokens whose row is in the part).
// The products can transform their input on the way in, fusing the op before them (INPUT):
//   INPUT_PLAIN: x as it is
//   INPUT_RMSNORM: rmsnorm(x) * norm; each workgroup sums the squares of its token rows itself
//   INPUT_SILU_MUL: silu(x[:, :k]) * x[:, k:2k], the gated MLP activation of a stacked gate/up output
// and can write their output rotated into the KV cache, fusing the op after them (OUTPUT):
//   OUTPUT_ROWS: out, overwritten or added to (accumulate = 1, the residual add)
//   OUTPUT_ROTARY: a stacked q/k/v projection with RoPE: q rotated into out, k rotated into k_cache and v into
//      v_cache at each token's KV row (the pool page row its sequence keeps that position in; row t
//      of f32 staging rows instead when kv_staged, for kv_store to move into the pool), the
//      rotation by the token's own position. Halves rotate (dims i and i + head_dim / 2), as Hugging
//      Face checkpoints expect, by the f32 cos/sin table the host computes once with the model's
//      frequency scaling (llama3 rope_type).
// PyTorch: out = f(x) @ W.T            (OUTPUT_ROWS, accumulate = 0)
//          out = out + f(x) @ W.T      (OUTPUT_ROWS, accumulate = 1)
//          q, k, v = (f(x) @ W.T).split(); q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
//          k_cache[kv_row], v_cache[kv_row] = k, v   (OUTPUT_ROTARY)
//          out = W[tokens]             (gather)

// The module is this file composed with the shared pieces the kernel registry lists
// (crate::gpu::kernels): weight decoding (lib/weights.wgsl), the fused input and output stages
// (lib/matmul_input.wgsl, lib/matmul_output.wgsl), the GEMV reduction of the module's form, the
// tiles' staging (lib/tiles.wgsl) and, where the device has cooperative matrices, tiled_coop
// (lib/tiled_coop.wgsl). The constants in capitals that no file declares (DTYPE_*, INPUT_*,
// OUTPUT_*, MAX_BATCH_TOKENS, MAX_GEMV_COLUMNS, Q8_BLOCK, TILE, TILE_ROWS, REGISTER_TILE, tile_t, kv_t) come from
// Rust in the module's first lines.

// One of DTYPE_* (crate::quant::DType::shader_code)
override WEIGHT_DTYPE: u32 = DTYPE_F32;
// One of INPUT_* (crate::gpu::ops::MatmulInput)
override INPUT: u32 = INPUT_PLAIN;
// One of OUTPUT_* (crate::gpu::ops::MatmulOutput)
override OUTPUT: u32 = OUTPUT_ROWS;

struct Params {
    k: u32,                // input features (elements per weight row, even)
    rows: u32,             // weight rows in this part
    row_start: u32,        // output column of this part's first row (gather: its first token id)
    in_stride: u32,        // elements between token rows of x
    out_stride: u32,       // elements between token rows of out
    accumulate: u32,       // 1: add to out instead of overwriting it
    eps: f32,              // INPUT_RMSNORM: the RMSNorm epsilon
    head_dim: u32,         // OUTPUT_ROTARY: elements per head (even)
    q_dim: u32,            // OUTPUT_ROTARY: columns of q (n_heads head_dim), then k's and v's
    kv_dim: u32,           // OUTPUT_ROTARY: columns of k and of v (n_kv_heads head_dim)
    kv_staged: u32,        // OUTPUT_ROTARY: 1: k and v to row t of k_cache and v_cache, kv_store's staging rows
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;   // (n_tokens, in_stride); gather: (n_tokens) ids as f32
@group(0) @binding(1) var<storage, read> w: array<u32>;         // (rows, k) in WEIGHT_DTYPE, rows packed back to back
@group(0) @binding(2) var<storage, read> norm: array<vec4<f32>>; // INPUT_RMSNORM: (k) RMSNorm weight; otherwise unread
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // (n_tokens, out_stride)
@group(0) @binding(4) var<uniform> params: Params;
@group(0) @binding(5) var<uniform> step: Step;
@group(0) @binding(6) var<storage, read> cos_sin: array<vec2<f32>>;   // OUTPUT_ROTARY: (context, head_dim / 2) (cos, sin)
@group(0) @binding(7) var<storage, read_write> k_cache: array<kv_t>;  // OUTPUT_ROTARY: (pool rows, kv_dim)
@group(0) @binding(8) var<storage, read_write> v_cache: array<kv_t>;  // OUTPUT_ROTARY: (pool rows, kv_dim)
// Inputs quantize.wgsl prepared: Q8_INPUTS: (n_tokens, q8 row) of int8 blocks; F16_INPUTS: (n_tokens,
// k / 2) words of two f16 values; otherwise unread.
@group(0) @binding(9) var<storage, read> x_prepared: array<u32>;


const GEMV_WG: u32 = 64u;
// Rows (output slots) per GEMV workgroup, 1, 2 or 4, chosen by the host per matrix
// (ops::gemv_rows): more rows reuse each loaded input more, fewer make more workgroups to fill a
// large GPU. Rotary output needs an even number.
override GEMV_ROWS: u32 = 4u;
// The products read inputs quantize.wgsl made int8 (crate::GpuOptions::q8_activations): the
// block GEMVs multiply them in integers, the tiles stage them dequantized, so that a token's
// products do not depend on the strategy its pass takes.
override Q8_INPUTS: bool = false;
// tiled_coop stages inputs quantize.wgsl's to_f16 made f16, INPUT applied (the host sets INPUT
// plain): half the bytes of f32 and no second read of a row for its RMSNorm scale.
override F16_INPUTS: bool = false;
// Quant values converted from integers instead of made from float bits (weights.wgsl's
// quant_values; crate::GpuOptions::int_conversions), for comparison.
override INT_CONVERSIONS: bool = false;
// Tokens per GEMV workgroup: 1 for a lone sequence's decode step, MAX_GEMV_COLUMNS for a pass of
// several sequences' tokens, which then load and decode each weight once for all of them.
override GEMV_COLUMNS: u32 = 1u;

// A token's totals over the GEMV workgroup: its sums of the workgroup's slots, and the sum of the
// squares of its inputs (RMSNorm).
struct Totals {
    sums: vec4<f32>,
    squares: f32,
}

// The first output slot and the first token of a GEMV workgroup (rows are laid over x and y so
// that huge matrices fit the grid), and whether it has any of either.
struct GemvOrigin {
    row0: u32,
    t0: u32,
    idle: bool,
}

fn gemv_origin(wg: vec3<u32>, n_wg: vec3<u32>) -> GemvOrigin {
    let row0 = (wg.x + wg.y * n_wg.x) * GEMV_ROWS;
    let t0 = wg.z * GEMV_COLUMNS;
    return GemvOrigin(row0, t0, row0 >= params.rows || t0 >= step.n_tokens);
}

// The token of a GEMV workgroup's column c (t0 + c); columns past the pass's tokens read the last
// token's inputs, and their sums are not stored.
fn column_token(t0: u32, c: u32) -> u32 {
    return min(t0 + c, step.n_tokens - 1u);
}

// The end of a GEMV: the workgroup's sums of slots row0.. for each of its tokens (scaled for
// RMSNorm) stored, thread i storing slot i % GEMV_ROWS of token t0 + i / GEMV_ROWS.
fn store_columns(thread: Thread, origin: GemvOrigin, sums: array<vec4<f32>, MAX_GEMV_COLUMNS>, squares: array<f32, MAX_GEMV_COLUMNS>) {
    reduce_columns(thread, sums, squares);
    let c = thread.index / GEMV_ROWS;
    let r = thread.index % GEMV_ROWS;
    if (c < GEMV_COLUMNS && origin.t0 + c < step.n_tokens && origin.row0 + r < params.rows) {
        let totals = column_totals(thread, c);
        let scale = row_scale(totals.squares);
        store(origin.t0 + c, origin.row0 + r, totals.sums[r] * scale, totals.sums[r ^ 1u] * scale);
    }
}

// The matrix row of a GEMV workgroup's slot r; slots past the end repeat the last one, and their
// sums are not stored.
fn slot_row(origin: GemvOrigin, r: u32) -> u32 {
    return matrix_row(min(origin.row0 + r, params.rows - 1u));
}

// GEMV for f32, f16 and bf16, GEMV_ROWS rows of GEMV_COLUMNS tokens per workgroup: each thread
// takes pairs of columns, loading a pair's weights once for every token and each token's inputs
// once for every row.
@compute @workgroup_size(GEMV_WG)
fn gemv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) n_wg: vec3<u32>, thread: Thread) {
    let origin = gemv_origin(wg, n_wg);
    if (origin.idle) {
        return;
    }
    var sums: array<vec4<f32>, MAX_GEMV_COLUMNS>; // per token, slots row0..row0 + GEMV_ROWS - 1
    var squares: array<f32, MAX_GEMV_COLUMNS>;
    for (var col = 2u * thread.index; col < params.k; col += 2u * GEMV_WG) {
        var weights: array<vec2<f32>, 4>;
        for (var r = 0u; r < GEMV_ROWS; r++) {
            weights[r] = weight_pair(slot_row(origin, r), col);
        }
        for (var c = 0u; c < GEMV_COLUMNS; c++) {
            let x_base = column_token(origin.t0, c) * params.in_stride;
            let input = input_pair(x_base, col);
            if (INPUT == INPUT_RMSNORM) {
                let v = vec2(x_at(x_base + col), x_at(x_base + col + 1u));
                squares[c] += dot(v, v);
            }
            for (var r = 0u; r < GEMV_ROWS; r++) {
                sums[c][r] += dot(input, weights[r]);
            }
        }
    }
    store_columns(thread, origin, sums, squares);
}

// The block GEMVs below take their inputs as f32 (f(x) from x, INPUT applied on the way in) or,
// with Q8_INPUTS (crate::GpuOptions::q8_activations), as quantize.wgsl left them in x_prepared: each
// 32-block of a token's inputs as int8 values with an f32 scale d_x and the block's sum. On those,
// 8 weights meet 8 inputs as two words of int8 each in two 4-wide integer dot products
// (dot4I8Packed): the products sum exactly, and one conversion and the scalings per 8 remain. That
// is the product of the dequantized weights with the dequantized inputs, llama.cpp's
// mul_mat_vec_q with an f32 scale. A weight block's offset (q4_1's and q5_1's min, the K-quants') multiplies the
// sum of its inputs, which a q8 block gives whole: each of the block's four lanes adds a quarter.

// Words between token rows of x_prepared: the values (4 a word), each block's scale, each block's sum.
fn q8_row_words() -> u32 {
    return params.k / 4u + 2u * (params.k / Q8_BLOCK);
}

// The scale d_x of q8 input block `block` of the token row at `row`, and a quarter of its sum.
fn q8_block_scales(row: u32, block: u32) -> vec2<f32> {
    let scale_at = row + params.k / 4u + block;
    return vec2(bitcast<f32>(x_prepared[scale_at]), 0.25 * bitcast<f32>(x_prepared[scale_at + params.k / Q8_BLOCK]));
}

// Each byte b of `words` to b - offset in two's complement, for offset <= 128 and bytes up to
// 127 + offset (so that no add carries into the next byte): b + (128 - offset) has its top bit
// set where b >= offset, and flipping it subtracts 128 there and adds it elsewhere (mod 256).
fn offset_bytes(words: vec2<u32>, offset: u32) -> vec2<u32> {
    return (words + vec2((128u - offset) * 0x01010101u)) ^ vec2(0x80808080u);
}

// GEMV for the formats of 32-weight blocks (q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl, and iq4_xs's and
// the grid formats' blocks of 32; a grid format's quarter is a group of 8 on a point), GEMV_ROWS rows of GEMV_COLUMNS tokens per workgroup. Four neighbouring threads
// share a block, each taking a quarter of it: 8 weights, from one nibble word (word j's low
// nibbles are the block's weights 4j..4j + 3, its high nibbles 16 + 4j..; a q5 block's qh word
// adds their fifth bits; an iq4 nibble indexes a table of int8 levels) or two q8_0 words (weights
// 8j..8j + 7). So a subgroup's loads of inputs and of quants each cover contiguous memory; a
// thread decodes each quarter once for every token and loads each token's 8 inputs once for every
// row. The offset comes out of the dot product: q4_0 d * sum x q - 8 d * sum x (on q8 inputs the
// nibbles become q - 8 instead; q5_0 the same with 16), q4_1 and q5_1 d * sum x q + m * sum x. A
// thread takes two quarters per step (GEMV_WG apart) to have twice the loads in flight.

// Whether quarter j of a block is its weights 8j..8j + 7 (q8_0's bytes, a grid format's group),
// not the nibbles of word j.
fn contiguous_quarters() -> bool {
    return WEIGHT_DTYPE == DTYPE_Q8_0 || is_grid_format();
}

// The block columns of quarter j's inputs: two quads, whose weights a Quarter holds in order.
fn quarter_cols(j: u32) -> vec2<u32> {
    if (contiguous_quarters()) {
        return vec2(8u * j, 8u * j + 4u);
    }
    return vec2(4u * j, 16u + 4u * j);
}

// Quarter j's 8 levels of a q5 block as two words of bytes 0..31, in quarter_cols' order: the
// nibbles of word `nibbles` with the fifth bits, bits 4j.. and 16 + 4j.. of `qh`, moved to bit 4 of
// each byte.
fn five_bit_words(nibbles: u32, qh: u32, j: u32) -> vec2<u32> {
    let fifth = vec2(qh >> (4u * j), qh >> (16u + 4u * j));
    let spread = ((fifth & vec2(1u)) << vec2(4u)) | ((fifth & vec2(2u)) << vec2(11u)) | ((fifth & vec2(4u)) << vec2(18u)) | ((fifth & vec2(8u)) << vec2(25u));
    return (vec2(nibbles, nibbles >> 4u) & vec2(0x0f0f0f0fu)) | spread;
}

// Bytes 0..3 of a word as u32 values.
fn bytes_of(word: u32) -> vec4<u32> {
    return (vec4(word) >> vec4(0u, 8u, 16u, 24u)) & vec4(0xffu);
}

// A decoded quarter: its weights as the two quads of quarter_cols, as floats or (Q8_INPUTS) as
// two words of int8, and the scale d and offset m of sum x w = d (sum x q) + m (sum x).
struct Quarter {
    a: vec4<f32>,
    b: vec4<f32>,
    words: vec2<u32>,
    d: f32,
    m: f32,
}

// Quarter j of `block`.
fn quarter_weights(block: u32, j: u32) -> Quarter {
    switch WEIGHT_DTYPE {
        case DTYPE_Q4_0: { // q4_0: the part's quants (4 words a block), then its scales
            let q = quant_word(block, Q4_0_QUANTS, j);
            let d = block_scale(block, Q4_0_QUANTS, 32u);
            if (Q8_INPUTS) {
                return Quarter(vec4(0.0), vec4(0.0), offset_bytes(vec2(q, q >> 4u) & vec2(0x0f0f0f0fu), 8u), d, 0.0);
            }
            return Quarter(low_nibbles(q), high_nibbles(q), vec2(0u), d, -8.0 * d);
        }
        case DTYPE_Q4_1: { // q4_1: f16 d, f16 m, 16 bytes of nibbles (20: word-aligned)
            let start = block * (DTYPE_Q4_1_BLOCK_BYTES / 4u);
            let q = w[start + 1u + j];
            let dm = unpack2x16float(w[start]);
            if (Q8_INPUTS) {
                return Quarter(vec4(0.0), vec4(0.0), vec2(q, q >> 4u) & vec2(0x0f0f0f0fu), dm.x, dm.y);
            }
            return Quarter(low_nibbles(q), high_nibbles(q), vec2(0u), dm.x, dm.y);
        }
        case DTYPE_Q5_0: { // q5_0: the part's qh and nibbles (5 words a block), then its scales
            let levels = five_bit_words(quant_word(block, Q5_0_QUANTS, 1u + j), quant_word(block, Q5_0_QUANTS, 0u), j);
            let d = block_scale(block, Q5_0_QUANTS, 32u);
            if (Q8_INPUTS) {
                return Quarter(vec4(0.0), vec4(0.0), offset_bytes(levels, 16u), d, 0.0);
            }
            return Quarter(quant_values(bytes_of(levels.x), 0.0), quant_values(bytes_of(levels.y), 0.0), vec2(0u), d, -16.0 * d);
        }
        case DTYPE_IQ4_NL, DTYPE_IQ4_XS: { // iq4: q4_0's nibbles as indices of int8 levels
            let q = iq4_word(block, j);
            let d = iq4_scale(block);
            if (Q8_INPUTS) {
                return Quarter(vec4(0.0), vec4(0.0), vec2(iq4_levels(quad_nibbles(q, false)), iq4_levels(quad_nibbles(q, true))), d, 0.0);
            }
            return Quarter(iq4_values(quad_nibbles(q, false)), iq4_values(quad_nibbles(q, true)), vec2(0u), d, 0.0);
        }
        case DTYPE_Q5_1: { // q5_1: f16 d, f16 m, qh, 16 bytes of nibbles (24: word-aligned)
            let start = block * (DTYPE_Q5_1_BLOCK_BYTES / 4u);
            let levels = five_bit_words(w[start + 2u + j], w[start + 1u], j);
            let dm = unpack2x16float(w[start]);
            if (Q8_INPUTS) {
                return Quarter(vec4(0.0), vec4(0.0), levels, dm.x, dm.y);
            }
            return Quarter(quant_values(bytes_of(levels.x), 0.0), quant_values(bytes_of(levels.y), 0.0), vec2(0u), dm.x, dm.y);
        }
        case DTYPE_IQ1_S, DTYPE_IQ1_M, DTYPE_IQ2_XXS, DTYPE_IQ2_XS, DTYPE_IQ2_S, DTYPE_IQ3_XXS, DTYPE_IQ3_S: { // group j of a grid block
            let group = grid_group(block, j);
            let m = group.d * group.offset;
            if (Q8_INPUTS) {
                return Quarter(vec4(0.0), vec4(0.0), group.levels, group.d, m);
            }
            return Quarter(signed_bytes(group.levels.x), signed_bytes(group.levels.y), vec2(0u), group.d, m);
        }
        default: { // q8_0: the part's quants (8 words a block), then its scales
            let words = vec2(quant_word(block, Q8_0_QUANTS, 2u * j), quant_word(block, Q8_0_QUANTS, 2u * j + 1u));
            let d = block_scale(block, Q8_0_QUANTS, 32u);
            if (Q8_INPUTS) {
                return Quarter(vec4(0.0), vec4(0.0), words, d, 0.0);
            }
            return Quarter(signed_bytes(words.x), signed_bytes(words.y), vec2(0u), d, 0.0);
        }
    }
}

// A token's inputs of one quarter, lined up with its Quarter: as floats a and b, or (Q8_INPUTS) as
// two words of int8 with their block's scale d; and the sum of the 8 (on q8 inputs a quarter of the
// block's, for a format whose offset is the block's, but iq1_m's own).
struct QuarterInputs {
    a: vec4<f32>,
    b: vec4<f32>,
    words: vec2<u32>,
    d: f32,
    sum: f32,
}

// Token t's inputs of quarter j of block `block`; zeros where not `live` (selected, not branched
// around: a branch here costs the f32 GEMV on a CPU adapter).
fn quarter_inputs(t: u32, block: u32, j: u32, live: bool) -> QuarterInputs {
    var inputs = QuarterInputs(vec4(0.0), vec4(0.0), vec2(0u), 0.0, 0.0);
    if (Q8_INPUTS) {
        let row = t * q8_row_words();
        let first = row + block * (Q8_BLOCK / 4u);
        var words = vec2(x_prepared[first + j], x_prepared[first + 4u + j]);
        if (contiguous_quarters()) {
            words = vec2(x_prepared[first + 2u * j], x_prepared[first + 2u * j + 1u]);
        }
        let scales = select(vec2(0.0), q8_block_scales(row, block), live);
        inputs.words = select(vec2(0u), words, live);
        inputs.d = scales.x;
        inputs.sum = scales.y;
        if (WEIGHT_DTYPE == DTYPE_IQ1_M) { // its offset changes every 8 weights: their own sum
            let ones = 0x01010101u;
            inputs.sum = inputs.d * f32(dot4I8Packed(inputs.words.x, ones) + dot4I8Packed(inputs.words.y, ones));
        }
    } else {
        let x_base = t * params.in_stride;
        let cols = block * 32u + quarter_cols(j);
        inputs.a = select(vec4(0.0), input_quad(x_base, cols.x), live);
        inputs.b = select(vec4(0.0), input_quad(x_base, cols.y), live);
        inputs.sum = dot(inputs.a + inputs.b, vec4(1.0, 1.0, 1.0, 1.0));
    }
    return inputs;
}

// sum x * w over a quarter.
fn quarter_dot(q: Quarter, x: QuarterInputs) -> f32 {
    if (Q8_INPUTS) {
        return q.d * x.d * f32(dot4I8Packed(q.words.x, x.words.x) + dot4I8Packed(q.words.y, x.words.y)) + q.m * x.sum;
    }
    return q.d * (dot(x.a, q.a) + dot(x.b, q.b)) + q.m * x.sum;
}

@compute @workgroup_size(GEMV_WG)
fn gemv_blocks(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) n_wg: vec3<u32>, thread: Thread) {
    let origin = gemv_origin(wg, n_wg);
    if (origin.idle) {
        return;
    }
    let blocks = params.k / 32u;
    let quarters = 4u * blocks;
    var sums: array<vec4<f32>, MAX_GEMV_COLUMNS>; // per token, rows row0..row0 + GEMV_ROWS - 1
    var squares: array<f32, MAX_GEMV_COLUMNS>;   // INPUT_RMSNORM only (on q8 inputs quantize applied it)
    for (var first = thread.index; first < quarters; first += 2u * GEMV_WG) {
        // Where the row's quarters are not a multiple of 2 GEMV_WG, the last step's second quarter
        // may be past the row: it then takes zero inputs and re-reads the first one's weights.
        let has_second = first + GEMV_WG < quarters;
        for (var i = 0u; i < 2u; i++) {
            let live = i == 0u || has_second;
            let quarter = select(first, first + GEMV_WG, i == 1u && has_second);
            let block = quarter / 4u;
            let j = quarter % 4u;
            var inputs: array<QuarterInputs, MAX_GEMV_COLUMNS>;
            for (var c = 0u; c < GEMV_COLUMNS; c++) {
                let t = column_token(origin.t0, c);
                inputs[c] = quarter_inputs(t, block, j, live);
                if (INPUT == INPUT_RMSNORM && live) {
                    let cols = block * 32u + quarter_cols(j);
                    squares[c] += squares_quad(t * params.in_stride, cols.x) + squares_quad(t * params.in_stride, cols.y);
                }
            }
            for (var r = 0u; r < GEMV_ROWS; r++) {
                let weights = quarter_weights(slot_row(origin, r) * blocks + block, j);
                for (var c = 0u; c < GEMV_COLUMNS; c++) {
                    sums[c][r] += quarter_dot(weights, inputs[c]);
                }
            }
        }
    }
    store_columns(thread, origin, sums, squares);
}

// GEMV for the 256-weight super-block formats (q2_k, q3_k, q4_k, q5_k, q6_k), GEMV_ROWS rows of
// GEMV_COLUMNS tokens per workgroup. A super-block is 4 units of 64 weights: two runs of 32, a and
// b, whose levels share the same 32 bytes (lib/weights.wgsl's unit_column and level_bits: q4_k and
// q5_k: sub-blocks 2i and 2i + 1 in the low and high nibbles, q5_k's fifth bits in its 32 bytes of
// qh; q6_k, q3_k, q2_k: quarters q and q + 2 of a half, whose high bits share the half's 32 bytes of
// qh or hmask). Four neighbouring threads share a unit, each taking 8 of its quant bytes, 8 weights
// of each run: a subgroup's loads of inputs and of quants cover contiguous memory. A thread loads a
// piece's quants and scales once for every token. The mins of q4_k, q5_k and q2_k come out of the
// dot product: d sc (sum x q) - dmin m (sum x) per sub-block. A run is 8 weights of one 32-weight q8
// input block (the sub-blocks and the quarters are 32 long), so on q8 inputs a run's product is one
// integer sum times its scale and the block's d_x.

// A piece of one row: its quant words (the low bits in `low`, the high bits in `high`; Q8_INPUTS:
// runs a's and b's 8 weights as int8 words in `low` and `high`), and each run's scale and min:
// sum x w = scales.a (a . qa) + scales.b (b . qb) - mins . (sum a, sum b).
struct Piece {
    low: vec2<u32>,
    high: vec2<u32>,
    scales: vec2<f32>,
    mins: vec2<f32>,
}

// Runs a's and b's levels of a piece as words of bytes: the low bits with the high bits above them.
fn run_levels(low: vec2<u32>, high: vec2<u32>, bits: LevelBits) -> array<vec2<u32>, 2> {
    let low_mask = vec2(bits.low_mask * 0x01010101u);
    let high_mask = vec2(bits.high_mask * 0x01010101u);
    let a = ((low >> vec2(bits.low_shifts.x)) & low_mask) | (((high >> vec2(bits.high_shifts.x)) & high_mask) << vec2(bits.high_at));
    let b = ((low >> vec2(bits.low_shifts.y)) & low_mask) | (((high >> vec2(bits.high_shifts.y)) & high_mask) << vec2(bits.high_at));
    return array(a, b);
}

// The first super-block column of each run of a piece at unit `part`, quant bytes 8j..8j + 7.
fn piece_columns(part: u32, j: u32) -> vec2<u32> {
    return vec2(unit_column(part, 0u, 8u * j), unit_column(part, 1u, 8u * j));
}

// The piece of super-block `block` at unit `part`, quant bytes 8j..8j + 7, its runs at columns
// `cols`. Each 16 or 32 weights have a scale; this thread's 8 weights of a run lie within one.
fn superblock_piece(block: u32, part: u32, j: u32, cols: vec2<u32>) -> Piece {
    let start = superblock_start(block);
    let at = unit_bytes(start, part) / 4u + vec2(2u * j);
    let low = vec2(w[at.x], w[at.x + 1u]);
    let bits = level_bits(part);
    var high = vec2(0u);
    if (bits.high_mask != 0u) {
        high = vec2(w[at.y], w[at.y + 1u]);
    }
    let scales_mins = superblock_scales_mins(block, start, cols);
    let scales = scales_mins.scales;
    let mins = scales_mins.mins;
    if (Q8_INPUTS) {
        let levels = run_levels(low, high, bits);
        let offset = u32(level_offset());
        if (offset != 0u) {
            return Piece(offset_bytes(levels[0], offset), offset_bytes(levels[1], offset), scales, mins);
        }
        return Piece(levels[0], levels[1], scales, mins);
    }
    return Piece(low, high, scales, mins);
}

// A token's inputs of one piece, lined up with its runs: as floats a and b (two quads each), or
// (Q8_INPUTS) as two int8 words each with their blocks' scales d; and each run's sum (on q8 inputs
// a quarter of its block's, or for q2_k, whose mins change every 16 weights, its own).
struct PieceInputs {
    a: array<vec4<f32>, 2>,
    b: array<vec4<f32>, 2>,
    words: array<vec2<u32>, 2>,
    d: vec2<f32>,
    sums: vec2<f32>,
}

// Token t's inputs of the piece whose runs start at columns `cols`.
fn piece_inputs(t: u32, cols: vec2<u32>) -> PieceInputs {
    var inputs = PieceInputs(array(vec4(0.0), vec4(0.0)), array(vec4(0.0), vec4(0.0)), array(vec2(0u), vec2(0u)), vec2(0.0), vec2(0.0));
    if (Q8_INPUTS) {
        let row = t * q8_row_words();
        let first = row + cols / 4u; // the values lie in column order, 4 a word
        inputs.words = array(vec2(x_prepared[first.x], x_prepared[first.x + 1u]), vec2(x_prepared[first.y], x_prepared[first.y + 1u]));
        let scales_a = q8_block_scales(row, cols.x / Q8_BLOCK);
        let scales_b = q8_block_scales(row, cols.y / Q8_BLOCK);
        inputs.d = vec2(scales_a.x, scales_b.x);
        inputs.sums = vec2(scales_a.y, scales_b.y);
        if (WEIGHT_DTYPE == DTYPE_Q2_K) {
            let ones = 0x01010101u;
            let a = dot4I8Packed(inputs.words[0].x, ones) + dot4I8Packed(inputs.words[0].y, ones);
            let b = dot4I8Packed(inputs.words[1].x, ones) + dot4I8Packed(inputs.words[1].y, ones);
            inputs.sums = inputs.d * vec2<f32>(vec2(a, b));
        }
    } else {
        let x_base = t * params.in_stride;
        inputs.a = array(input_quad(x_base, cols.x), input_quad(x_base, cols.x + 4u));
        inputs.b = array(input_quad(x_base, cols.y), input_quad(x_base, cols.y + 4u));
        let ones = vec4(1.0, 1.0, 1.0, 1.0);
        inputs.sums = vec2(dot(inputs.a[0] + inputs.a[1], ones), dot(inputs.b[0] + inputs.b[1], ones));
    }
    return inputs;
}

// sum x * w over a piece of unit `part`.
fn piece_dot(p: Piece, part: u32, x: PieceInputs) -> f32 {
    var dots = vec2(0.0);
    if (Q8_INPUTS) {
        let a = dot4I8Packed(p.low.x, x.words[0].x) + dot4I8Packed(p.low.y, x.words[0].y);
        let b = dot4I8Packed(p.high.x, x.words[1].x) + dot4I8Packed(p.high.y, x.words[1].y);
        dots = x.d * vec2<f32>(vec2(a, b));
    } else if (WEIGHT_DTYPE == DTYPE_Q4_K) {
        dots.x = dot(x.a[0], low_nibbles(p.low.x)) + dot(x.a[1], low_nibbles(p.low.y));
        dots.y = dot(x.b[0], high_nibbles(p.low.x)) + dot(x.b[1], high_nibbles(p.low.y));
    } else { // the low bits with their high bits
        let bits = level_bits(part);
        for (var i = 0u; i < 2u; i++) {
            dots.x += dot(x.a[i], quant_values(quad_levels(p.low[i], p.high[i], bits, 0u), level_offset()));
            dots.y += dot(x.b[i], quant_values(quad_levels(p.low[i], p.high[i], bits, 1u), level_offset()));
        }
    }
    return p.scales.x * dots.x + p.scales.y * dots.y - dot(p.mins, x.sums);
}

@compute @workgroup_size(GEMV_WG)
fn gemv_superblocks(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) n_wg: vec3<u32>, thread: Thread) {
    let origin = gemv_origin(wg, n_wg);
    if (origin.idle) {
        return;
    }
    let superblocks = params.k / 256u;
    var sums: array<vec4<f32>, MAX_GEMV_COLUMNS>;
    var squares: array<f32, MAX_GEMV_COLUMNS>;
    for (var index = thread.index; index < superblocks * 16u; index += GEMV_WG) {
        let sb = index / 16u;
        let part = index / 4u % 4u; // the unit
        let j = index % 4u;         // its quant bytes 8j..8j + 7, weights 8j..8j + 7 of each run
        let piece_cols = piece_columns(part, j);
        var pieces: array<Piece, 4>;
        for (var r = 0u; r < GEMV_ROWS; r++) {
            pieces[r] = superblock_piece(slot_row(origin, r) * superblocks + sb, part, j, piece_cols);
        }
        let cols = vec2(256u * sb) + piece_cols;
        for (var c = 0u; c < GEMV_COLUMNS; c++) {
            let t = column_token(origin.t0, c);
            let inputs = piece_inputs(t, cols);
            if (INPUT == INPUT_RMSNORM) {
                let x_base = t * params.in_stride;
                squares[c] += squares_quad(x_base, cols.x) + squares_quad(x_base, cols.x + 4u) + squares_quad(x_base, cols.y) + squares_quad(x_base, cols.y + 4u);
            }
            for (var r = 0u; r < GEMV_ROWS; r++) {
                sums[c][r] += piece_dot(pieces[r], part, inputs);
            }
        }
    }
    store_columns(thread, origin, sums, squares);
}

// Tiles of TILE tokens x TILE_ROWS rows, stepping k by TILE_K; each thread computes a register
// tile of REGISTER_TILE tokens x REGISTER_TILE rows. The tiles are stored k-major so that a thread
// reads its inputs and weights of each k as vec4s: REGISTER_TILE^2 FMAs per REGISTER_TILE / 2
// workgroup-memory reads. REGISTER_TILE comes with the module's form: 4 (256 threads, 16 sums
// each) by default, or 8 (64 threads, 64 sums each, twice the FMAs per read: a GPU's workgroup memory serves about a quarter as many floats per clock as its
// cores do FMAs, but a CPU adapter pays for the registers).
// Each k step stages the tile's inputs and its weights, decoded once, in workgroup memory as tile_t,
// where all 64 tokens (rows) of the tile reuse them; a thread reads the next step's into registers
// while the current one is multiplied, so the global loads overlap the FMAs. tile_t is f32, or
// f16 in a module form of its own (where the device has shader-f16), halving the tiles' workgroup
// memory and its traffic. Products and sums stay f32 in
// both: an f16 product overflows (past 65504) on the 1e4-sized gate * up activations of
// random-weight models.
const TILE_K: u32 = 16u;
const TILE_THREADS: u32 = (TILE / REGISTER_TILE) * (TILE_ROWS / REGISTER_TILE);
// Each thread stages 4 elements of STAGED_ROWS token rows and as many weight rows per k step, 4
// threads per row.
const STAGED_ROWS: u32 = TILE * TILE_K / 4u / TILE_THREADS;
const STAGED_STRIDE: u32 = TILE_THREADS / 4u; // rows between a thread's staged rows
var<workgroup> x_tile: array<vec4<tile_t>, 256>;  // (TILE_K k, TILE / 4 token quads)
var<workgroup> w_tile: array<vec4<tile_t>, 256>;  // (TILE_K k, TILE_ROWS / 4 row quads)
var<workgroup> row_squares: array<f32, 256>; // RMSNorm: 4 partial sums of squares per token row


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
    if (INPUT == INPUT_RMSNORM) {
        for (var p = 0u; p < STAGED_ROWS; p++) {
            row_squares[li + TILE_THREADS * p] = squares_share(t0 + r + STAGED_STRIDE * p, li % 4u, 4u);
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

