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

@compute @workgroup_size(WG)
fn quantize(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let t = wg.y;
    if (t >= step.n_tokens) {
        return;
    }
    let base = t * params.in_stride;
    let scale = input_scale(base, li);
    let blocks = params.k / Q8_BLOCK;
    let block = wg.x * WG + li;
    if (block >= blocks) {
        return;
    }
    var values: array<f32, Q8_BLOCK>;
    for (var i = 0u; i < Q8_BLOCK / 4u; i++) {
        let quad = input_quad(base, block * Q8_BLOCK + 4u * i) * scale;
        for (var j = 0u; j < 4u; j++) {
            values[4u * i + j] = quad[j];
        }
    }
    let q = q8_block(values);
    let row = t * (params.k / 4u + 2u * blocks);
    for (var i = 0u; i < Q8_BLOCK / 4u; i++) {
        x_prepared[row + block * (Q8_BLOCK / 4u) + i] = q.words[i];
    }
    x_prepared[row + params.k / 4u + block] = bitcast<u32>(q.scale);
    x_prepared[row + params.k / 4u + blocks + block] = bitcast<u32>(q.scale * f32(q.quant_sum));
}

@compute @workgroup_size(WG)
fn to_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let t = wg.y;
    if (t >= step.n_tokens) {
        return;
    }
    let base = t * params.in_stride;
    let scale = input_scale(base, li);
    let block = wg.x * WG + li;
    if (block >= params.k / Q8_BLOCK) {
        return;
    }
    for (var i = 0u; i < Q8_BLOCK / 4u; i++) {
        let col = block * Q8_BLOCK + 4u * i;
        let quad = input_quad(base, col) * scale;
        let at = (t * params.k + col) / 2u;
        x_prepared[at] = pack2x16float(quad.xy);
        x_prepared[at + 1u] = pack2x16float(quad.zw);
    }
}
