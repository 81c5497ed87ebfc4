// Causal grouped-query attention over the KV cache, one workgroup per (query head, token): token t at
// position start_pos + t attends to cache positions 0..=start_pos + t. Keys are taken in blocks of WG
// with an online softmax, so no score matrix is stored and any context length fits.
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
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
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
