// Greedy decoding on the GPU: the index of the largest logit (the first one on ties, as torch.argmax),
// so the host reads back one token id instead of the whole vocabulary.

const WG: u32 = 256u;

struct Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;    // (n)
@group(0) @binding(1) var<storage, read_write> out: array<f32>; // (1) the index as f32, as the embedding reads token ids
@group(0) @binding(2) var<uniform> params: Params;

var<workgroup> best_value: array<f32, WG>;
var<workgroup> best_index: array<u32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_id) lid: vec3<u32>) {
    var value = -0x1.fffffep+127f; // f32 max, exact: Tint rejects the rounded 3.4028235e38
    var index = 0xffffffffu;
    for (var i = lid.x; i < params.n; i += WG) {
        let v = logits[i];
        if (v > value) {
            value = v;
            index = i;
        }
    }
    best_value[lid.x] = value;
    best_index[lid.x] = index;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (lid.x < stride) {
            let v = best_value[lid.x + stride];
            let j = best_index[lid.x + stride];
            if (v > best_value[lid.x] || (v == best_value[lid.x] && j < best_index[lid.x])) {
                best_value[lid.x] = v;
                best_index[lid.x] = j;
            }
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        out[0] = f32(best_index[0]); // exact below 2^24
    }
}
