// out = x @ W^T for a (rows, k) weight matrix in f32, f16 or bf16 (packed in u32 words), f32 arithmetic.
// Two entry points share the bindings: `gemv` for a few tokens (decode), `tiled` for prompt prefill.
// A weight split by rows over several buffers is multiplied with one dispatch per part, each writing
// its slice of output columns [row_start, row_start + rows).
// PyTorch: out = x @ W.T            (accumulate = 0)
//          out = out + x @ W.T      (accumulate = 1, the residual add fused into the epilogue)

override WEIGHT_DTYPE: u32 = 0u; // 0 = f32, 1 = f16, 2 = bf16

struct Params {
    k: u32,                // input features (even)
    rows: u32,             // weight rows in this part
    row_start: u32,        // output column of this part's first row
    in_stride: u32,        // elements between token rows of x
    out_stride: u32,       // elements between token rows of out
    accumulate: u32,       // 1: add to out instead of overwriting it
    rows_at_position: u32, // 1: token t is written to out row start_pos + t (a KV cache)
    _pad: u32,
}

struct Step {
    n_tokens: u32,
    start_pos: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;         // (n_tokens, in_stride)
@group(0) @binding(1) var<storage, read> w: array<u32>;         // (rows, k) in WEIGHT_DTYPE
@group(0) @binding(2) var<storage, read_write> out: array<f32>; // (out rows, out_stride)
@group(0) @binding(3) var<uniform> params: Params;
@group(0) @binding(4) var<uniform> step: Step;

// Weights i*2 and i*2+1 of the matrix, row-major, as f32.
fn weight_pair(i: u32) -> vec2<f32> {
    switch WEIGHT_DTYPE {
        case 1u: { return unpack2x16float(w[i]); }
        case 2u: { let b = w[i]; return vec2(bitcast<f32>(b << 16u), bitcast<f32>(b & 0xffff0000u)); }
        default: { return vec2(bitcast<f32>(w[2u * i]), bitcast<f32>(w[2u * i + 1u])); }
    }
}

fn store(t: u32, row: u32, value: f32) {
    let out_row = select(t, step.start_pos + t, params.rows_at_position == 1u);
    let i = out_row * params.out_stride + params.row_start + row;
    out[i] = select(value, out[i] + value, params.accumulate == 1u);
}

const GEMV_WG: u32 = 64u;
var<workgroup> gemv_partial: array<f32, GEMV_WG>;

// One workgroup per (weight row, token); rows are laid over x and y so huge matrices fit the grid.
@compute @workgroup_size(GEMV_WG)
fn gemv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) n_wg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wg.x + wg.y * n_wg.x;
    let t = wg.z;
    if (row >= params.rows || t >= step.n_tokens) {
        return;
    }
    let half_k = params.k / 2u;
    let x_base = t * params.in_stride;
    var sum = 0.0;
    for (var j = lid.x; j < half_k; j += GEMV_WG) {
        let wv = weight_pair(row * half_k + j);
        sum += x[x_base + 2u * j] * wv.x + x[x_base + 2u * j + 1u] * wv.y;
    }
    gemv_partial[lid.x] = sum;
    workgroupBarrier();
    for (var stride = GEMV_WG / 2u; stride > 0u; stride /= 2u) {
        if (lid.x < stride) {
            gemv_partial[lid.x] += gemv_partial[lid.x + stride];
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        store(t, row, gemv_partial[0]);
    }
}

// Tiles of TILE tokens x TILE rows; 16x16 threads each compute 2x2 outputs, stepping k by TILE.
const TILE: u32 = 32u;
var<workgroup> x_tile: array<f32, 1024>; // (TILE tokens, TILE k)
var<workgroup> w_tile: array<f32, 1024>; // (TILE rows, TILE k)

@compute @workgroup_size(16, 16)
fn tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
         @builtin(local_invocation_index) li: u32) {
    let row0 = wg.x * TILE;
    let t0 = wg.y * TILE;
    let half_k = params.k / 2u;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var k0 = 0u; k0 < params.k; k0 += TILE) {
        // 256 threads stage 512 pairs of each tile: pair p covers tile row p / 16, k pair p % 16.
        for (var p = li; p < TILE * TILE / 2u; p += 256u) {
            let r = p / 16u;
            let kp = k0 / 2u + p % 16u;
            var xv = vec2(0.0, 0.0);
            var wv = vec2(0.0, 0.0);
            if (kp < half_k) {
                if (t0 + r < step.n_tokens) {
                    let xi = (t0 + r) * params.in_stride + 2u * kp;
                    xv = vec2(x[xi], x[xi + 1u]);
                }
                if (row0 + r < params.rows) {
                    wv = weight_pair((row0 + r) * half_k + kp);
                }
            }
            x_tile[2u * p] = xv.x;
            x_tile[2u * p + 1u] = xv.y;
            w_tile[2u * p] = wv.x;
            w_tile[2u * p + 1u] = wv.y;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TILE; kk++) {
            let xa = x_tile[(2u * lid.y) * TILE + kk];
            let xb = x_tile[(2u * lid.y + 1u) * TILE + kk];
            let wa = w_tile[(2u * lid.x) * TILE + kk];
            let wb = w_tile[(2u * lid.x + 1u) * TILE + kk];
            acc[0] += xa * wa;
            acc[1] += xa * wb;
            acc[2] += xb * wa;
            acc[3] += xb * wb;
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let t = t0 + 2u * lid.y + i / 2u;
        let row = row0 + 2u * lid.x + i % 2u;
        if (t < step.n_tokens && row < params.rows) {
            store(t, row, acc[i]);
        }
    }
}
