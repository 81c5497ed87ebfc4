// A matmul's input rows prepared before the products read them: each row transformed by INPUT as
// the matmul would (the op before it fused: lib/matmul_input.wgsl), then
// - `quantize` (crate::GpuOptions::q8_activations, for matmul.wgsl's block GEMVs and tiles): cut
//   into blocks of Q8_BLOCK values quantized by lib/q8_block. A token's row in x_prepared is k / 4
//   words of int8 values (value i in byte i % 4 of word i / 4), then each block's scale d, then
//   each block's d * (sum of its values), as f32 bits (crate::gpu::ops::q8_row_words).
// - `to_f16` (for tiled_coop, whose operands are f16 anyway): k / 2 words a row, values 2i and
//   2i + 1 in the low and high half of word i.
// PyTorch, per block b of 32 of y = f(x):  d[b] = y[b].abs().max() / 127;  q[b] = (y[b] / d[b]).round()
//                                          sums[b] = d[b] * q[b].sum()

// One of INPUT_* (crate::gpu::ops::MatmulInput)
override INPUT: u32 = INPUT_PLAIN;

struct Params {
    k: u32,         // elements of a row after INPUT (a multiple of Q8_BLOCK)
    in_stride: u32, // elements between token rows of x
    eps: f32,       // INPUT_RMSNORM: the RMSNorm epsilon
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;     // (n_tokens, in_stride)
@group(0) @binding(1) var<storage, read> norm: array<vec4<f32>>;  // INPUT_RMSNORM: (k); otherwise unread
@group(0) @binding(2) var<storage, read_write> x_prepared: array<u32>;  // (n_tokens, q8 row or k / 2)
@group(0) @binding(3) var<uniform> params: Params;
@group(0) @binding(4) var<uniform> step: Step;

const WG: u32 = 64u;
const SUM_WG: u32 = WG; // lib/workgroup_sum

// Both entry points: workgroups over (blocks / WG, tokens), a block of Q8_BLOCK values per thread.

// The scale of the row at `base`: for RMSNorm every workgroup first sums the squares of its
// token's whole row itself, as the GEMVs do (no dispatch of its own); 1 for other inputs.
fn input_scale(base: u32, li: u32) -> f32 {
    if (INPUT != INPUT_RMSNORM) {
        return 1.0;
    }
    var squares = 0.0;
    for (var col = 4u * li; col < params.k; col += 4u * WG) {
        squares += squares_quad(base, col);
    }
    return row_scale(workgroup_sum(li, squares));
}

// A thread's block of its workgroup's token row, INPUT applied (the row's scale too).
struct InputBlock {
    values: array<f32, Q8_BLOCK>,
    t: u32,     // the token
    block: u32, // the block of its row
    valid: bool, // false past the pass's tokens or the row's blocks
}

fn input_block(wg: vec3<u32>, li: u32) -> InputBlock {
    var b: InputBlock;
    // Uniform over the workgroup (one token each), so all its threads take part in the row's sum;
    // tested on `t`, not `b`, whose other fields vary by thread (uniformity analysis follows whole
    // variables).
    let t = wg.y;
    if (t >= step.n_tokens) {
        return b;
    }
    let base = t * params.in_stride;
    let scale = input_scale(base, li);
    b.t = t;
    b.block = wg.x * WG + li;
    if (b.block >= params.k / Q8_BLOCK) {
        return b;
    }
    for (var i = 0u; i < Q8_BLOCK / 4u; i++) {
        let quad = input_quad(base, b.block * Q8_BLOCK + 4u * i) * scale;
        for (var j = 0u; j < 4u; j++) {
            b.values[4u * i + j] = quad[j];
        }
    }
    b.valid = true;
    return b;
}

@compute @workgroup_size(WG)
fn quantize(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let b = input_block(wg, li);
    if (!b.valid) {
        return;
    }
    let q = q8_block(b.values);
    let blocks = params.k / Q8_BLOCK;
    let row = b.t * (params.k / 4u + 2u * blocks);
    for (var i = 0u; i < Q8_BLOCK / 4u; i++) {
        x_prepared[row + b.block * (Q8_BLOCK / 4u) + i] = q.words[i];
    }
    x_prepared[row + params.k / 4u + b.block] = bitcast<u32>(q.scale);
    x_prepared[row + params.k / 4u + blocks + b.block] = bitcast<u32>(q.scale * f32(q.quant_sum));
}

@compute @workgroup_size(WG)
fn to_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let b = input_block(wg, li);
    if (!b.valid) {
        return;
    }
    let at = (b.t * params.k + b.block * Q8_BLOCK) / 2u;
    for (var i = 0u; i < Q8_BLOCK / 2u; i++) {
        x_prepared[at + i] = pack2x16float(vec2(b.values[2u * i], b.values[2u * i + 1u]));
    }
}
