// RMSNorm, one workgroup per token row: out = x / sqrt(mean(x^2) + eps) * weight.
// PyTorch: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

const WG: u32 = 256u;

struct Params {
    dim: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
}

struct Step {
    n_tokens: u32,
    start_pos: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;         // (n_tokens, dim)
@group(0) @binding(1) var<storage, read> weight: array<f32>;    // (dim)
@group(0) @binding(2) var<storage, read_write> out: array<f32>; // (n_tokens, dim)
@group(0) @binding(3) var<uniform> params: Params;
@group(0) @binding(4) var<uniform> step: Step;

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wg.x;
    if (row >= step.n_tokens) {
        return;
    }
    let base = row * params.dim;
    var sum = 0.0;
    for (var i = lid.x; i < params.dim; i += WG) {
        let v = x[base + i];
        sum += v * v;
    }
    partial[lid.x] = sum;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (lid.x < stride) {
            partial[lid.x] += partial[lid.x + stride];
        }
        workgroupBarrier();
    }
    let inv_rms = inverseSqrt(partial[0] / f32(params.dim) + params.eps);
    for (var i = lid.x; i < params.dim; i += WG) {
        out[base + i] = x[base + i] * inv_rms * weight[i];
    }
}
