// Greedy decoding on the GPU: the index of the largest logit (the first one on ties, as torch.argmax),
// so the host reads back one token id instead of the whole vocabulary. Two passes: `partial` runs
// params.partials workgroups, each finding the best of a strided share of the logits (a
// vocabulary of 128256 is too much for one workgroup to stream quickly), and `finish` reduces
// their bests in one workgroup. Each row of logits (one per sequence that samples in the pass) is
// reduced on its own: workgroup_id.y is the row.
// PyTorch: out = logits.argmax(dim=-1)

// SELECTION_WG threads per workgroup, and at most ARGMAX_PARTIALS partial bests (`finish` takes
// one per thread): constants from Rust (crate::gpu::ops).

struct Params {
    n: u32,
    partials: u32, // workgroups of `partial`, at most ARGMAX_PARTIALS
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;      // (rows, n)
@group(0) @binding(1) var<storage, read_write> out: array<f32>;   // (rows) the indices as f32, as the embedding reads token ids
@group(0) @binding(2) var<storage, read_write> bests: array<u32>; // (rows, 2 ARGMAX_PARTIALS) each partial's value bits, then its index
@group(0) @binding(3) var<uniform> params: Params;

var<workgroup> best_value: array<f32, SELECTION_WG>;
var<workgroup> best_index: array<u32, SELECTION_WG>;

// The best of every thread's (value, index) in the workgroup, in slot 0.
fn reduce(lid: u32, value: f32, index: u32) {
    best_value[lid] = value;
    best_index[lid] = index;
    workgroupBarrier();
    for (var stride = SELECTION_WG / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            let v = best_value[lid + stride];
            let j = best_index[lid + stride];
            if (v > best_value[lid] || (v == best_value[lid] && j < best_index[lid])) {
                best_value[lid] = v;
                best_index[lid] = j;
            }
        }
        workgroupBarrier();
    }
}

const LOWEST: f32 = -0x1.fffffep+127f; // -(f32 max), exact: Tint rejects the rounded 3.4028235e38

@compute @workgroup_size(SELECTION_WG)
fn partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    var value = LOWEST;
    var index = 0xffffffffu;
    let first = wg.y * params.n;
    // Strided by the whole grid, so that each load instruction of a workgroup reads SELECTION_WG neighbours.
    for (var i = wg.x * SELECTION_WG + lid; i < params.n; i += params.partials * SELECTION_WG) {
        let v = logits[first + i];
        if (v > value) {
            value = v;
            index = i;
        }
    }
    reduce(lid, value, index);
    if (lid == 0u) {
        let row_bests = wg.y * 2u * ARGMAX_PARTIALS;
        bests[row_bests + wg.x] = bitcast<u32>(best_value[0]);
        bests[row_bests + ARGMAX_PARTIALS + wg.x] = best_index[0];
    }
}

@compute @workgroup_size(SELECTION_WG)
fn finish(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    var value = LOWEST;
    var index = 0xffffffffu;
    let row_bests = wg.y * 2u * ARGMAX_PARTIALS;
    if (lid < params.partials) {
        value = bitcast<f32>(bests[row_bests + lid]);
        index = bests[row_bests + ARGMAX_PARTIALS + lid];
    }
    reduce(lid, value, index);
    if (lid == 0u) {
        out[wg.y] = f32(best_index[0]); // exact below 2^24
    }
}
