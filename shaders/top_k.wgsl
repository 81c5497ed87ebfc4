// The k largest logits (value descending, then id ascending) and the softmax normaliser of all of
// them at a temperature, so the host samples from k candidates instead of reading the vocabulary.
// Each of the k rounds finds the largest logit ranked below the previous round's pick.

const WG: u32 = 256u;
const MAX_K: u32 = 64u;

struct Params {
    n: u32,
    k: u32,               // at most MAX_K
    inv_temperature: f32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;    // (n)
@group(0) @binding(1) var<storage, read_write> out: array<u32>; // (2 + 2 k): max, sum of exp((l - max) / T), then (id, logit) pairs; floats as bits
@group(0) @binding(2) var<uniform> params: Params;

var<workgroup> best_value: array<f32, WG>;
var<workgroup> best_index: array<u32, WG>;
var<workgroup> sums: array<f32, WG>;

// Whether (v, i) ranks above (bv, bi): larger value, or equal value and smaller id.
fn ranks_above(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    return v > bv || (v == bv && i < bi);
}

// Reduces the per-thread (best_value, best_index) to slot 0.
fn reduce_best(lid: u32) {
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride && ranks_above(best_value[lid + stride], best_index[lid + stride], best_value[lid], best_index[lid])) {
            best_value[lid] = best_value[lid + stride];
            best_index[lid] = best_index[lid + stride];
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    var prev_value = 0x1.fffffep+127f; // f32 max, exact: Tint rejects the rounded 3.4028235e38
    var prev_index = 0u;
    var max_value = 0.0; // round 0's pick
    for (var round = 0u; round < min(params.k, MAX_K); round++) {
        var value = -0x1.fffffep+127f; // f32 max, exact: Tint rejects the rounded 3.4028235e38
        var index = 0xffffffffu;
        for (var i = lid; i < params.n; i += WG) {
            let v = logits[i];
            let below_previous = round == 0u || ranks_above(prev_value, prev_index, v, i);
            if (below_previous && ranks_above(v, i, value, index)) {
                value = v;
                index = i;
            }
        }
        best_value[lid] = value;
        best_index[lid] = index;
        workgroupBarrier();
        reduce_best(lid);
        prev_value = best_value[0];
        prev_index = best_index[0];
        if (round == 0u) {
            max_value = prev_value;
        }
        if (lid == 0u) {
            out[2u + 2u * round] = prev_index;
            out[3u + 2u * round] = bitcast<u32>(prev_value);
        }
        workgroupBarrier();
    }
    var sum = 0.0;
    for (var i = lid; i < params.n; i += WG) {
        sum += exp((logits[i] - max_value) * params.inv_temperature);
    }
    sums[lid] = sum;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            sums[lid] += sums[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        out[0] = bitcast<u32>(max_value);
        out[1] = bitcast<u32>(sums[0]);
    }
}
