// Embedding gather: out[t] = table[tokens[t]].
// A table split by rows over several buffers is gathered with one dispatch per part; each dispatch
// writes only the tokens whose row falls in its part.

override WEIGHT_DTYPE: u32 = 0u; // 0 = f32, 1 = f16, 2 = bf16

struct Params {
    dim: u32,       // embedding width (even)
    row_start: u32, // first vocabulary row held by this part
    rows: u32,      // rows held by this part
    _pad: u32,
}

struct Step {
    n_tokens: u32,
    start_pos: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> tokens: array<u32>;    // (n_tokens)
@group(0) @binding(1) var<storage, read> table: array<u32>;     // (rows, dim) weights packed in u32 words
@group(0) @binding(2) var<storage, read_write> out: array<f32>; // (n_tokens, dim)
@group(0) @binding(3) var<uniform> params: Params;
@group(0) @binding(4) var<uniform> step: Step;

// Weights i*2 and i*2+1 of the table as f32.
fn weight_pair(i: u32) -> vec2<f32> {
    switch WEIGHT_DTYPE {
        case 1u: { return unpack2x16float(table[i]); }
        case 2u: { let b = table[i]; return vec2(bitcast<f32>(b << 16u), bitcast<f32>(b & 0xffff0000u)); }
        default: { return vec2(bitcast<f32>(table[2u * i]), bitcast<f32>(table[2u * i + 1u])); }
    }
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.y;
    let pair = gid.x;
    let half_dim = params.dim / 2u;
    if (t >= step.n_tokens || pair >= half_dim) {
        return;
    }
    let token = tokens[t];
    if (token < params.row_start || token >= params.row_start + params.rows) {
        return;
    }
    let w = weight_pair((token - params.row_start) * half_dim + pair);
    out[t * params.dim + 2u * pair] = w.x;
    out[t * params.dim + 2u * pair + 1u] = w.y;
}
