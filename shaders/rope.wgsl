// Rotary position embedding in place, rotating halves (dims i and i + head_dim/2) as Hugging Face
// checkpoints expect. Token t sits at position start_pos + t; cos/sin come from a table the host
// computes once with the model's frequency scaling (llama3 rope_type), so every backend rotates by
// the same f32 angles.
// PyTorch: x * cos + rotate_half(x) * sin

struct Params {
    n_heads: u32,
    head_dim: u32,
    row_stride: u32,       // elements between consecutive token rows of x
    rows_at_position: u32, // 1: token t is row start_pos + t (a KV cache), 0: row t
}

struct Step {
    n_tokens: u32,
    start_pos: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> cos_sin: array<vec2<f32>>; // (context, head_dim / 2) (cos, sin)
@group(0) @binding(1) var<storage, read_write> x: array<f32>;      // (rows, row_stride), heads first
@group(0) @binding(2) var<uniform> params: Params;
@group(0) @binding(3) var<uniform> step: Step;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.y;
    let half_dim = params.head_dim / 2u;
    if (t >= step.n_tokens || gid.x >= params.n_heads * half_dim) {
        return;
    }
    let head = gid.x / half_dim;
    let i = gid.x % half_dim;
    let pos = step.start_pos + t;
    let row = select(t, pos, params.rows_at_position == 1u);
    let lo = row * params.row_stride + head * params.head_dim + i;
    let hi = lo + half_dim;
    let cs = cos_sin[pos * half_dim + i];
    let x1 = x[lo];
    let x2 = x[hi];
    x[lo] = x1 * cs.x - x2 * cs.y;
    x[hi] = x2 * cs.x + x1 * cs.y;
}
