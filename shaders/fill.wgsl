// Fills a buffer with hashed words, exponent bits cleared by a mask so that every value is finite
// and small (crate::gpu::ops::fill_mask): synthetic weights of any format then compute finite
// results, even through f16 tiles, and benchmarks build models of real shapes on the GPU without a
// download.

struct Params {
    words: u32,
    seed: u32,
    mask: u32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read_write> out: array<u32>; // (words)
@group(0) @binding(1) var<uniform> params: Params;

// A 32-bit integer hash (lowbias32).
fn hash(v: u32) -> u32 {
    var x = v;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) n_wg: vec3<u32>) {
    let i = gid.x + gid.y * n_wg.x * 64u;
    if (i >= params.words) {
        return;
    }
    out[i] = hash(i ^ hash(params.seed)) & params.mask;
}
