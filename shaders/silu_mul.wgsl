// SiLU-gated MLP activation: out = silu(gate) * up.
// PyTorch: F.silu(gate_proj(x)) * up_proj(x)

struct Params {
    width: u32, // elements per token row
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

@group(0) @binding(0) var<storage, read> gate: array<f32>;      // (n_tokens, width)
@group(0) @binding(1) var<storage, read> up: array<f32>;        // (n_tokens, width)
@group(0) @binding(2) var<storage, read_write> out: array<f32>; // (n_tokens, width)
@group(0) @binding(3) var<uniform> params: Params;
@group(0) @binding(4) var<uniform> step: Step;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.y >= step.n_tokens || gid.x >= params.width) {
        return;
    }
    let i = gid.y * params.width + gid.x;
    let g = gate[i];
    out[i] = g / (1.0 + exp(-g)) * up[i];
}
