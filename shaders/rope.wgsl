// Rotary position embedding of the stacked q/k/v projection output, fused with the KV-cache write:
// q heads are rotated in place, k heads rotated into k_cache and v copied into v_cache at each
// token's position. Halves rotate (dims i and i + head_dim/2), as Hugging Face checkpoints expect.
// Token t sits at position start_pos + t; cos/sin come from a table the host computes once with the
// model's frequency scaling (llama3 rope_type), so every backend rotates by the same f32 angles.
// PyTorch: q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
//          k_cache[pos], v_cache[pos] = k, v

struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    _pad: u32,
}

struct Step {
    n_tokens: u32,
    start_pos: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> cos_sin: array<vec2<f32>>;   // (context, head_dim / 2) (cos, sin)
@group(0) @binding(1) var<storage, read_write> qkv: array<f32>;      // (n_tokens, n_heads + 2 n_kv_heads, head_dim)
@group(0) @binding(2) var<storage, read_write> k_cache: array<f32>;  // (context, n_kv_heads, head_dim)
@group(0) @binding(3) var<storage, read_write> v_cache: array<f32>;  // (context, n_kv_heads, head_dim)
@group(0) @binding(4) var<uniform> params: Params;
@group(0) @binding(5) var<uniform> step: Step;

// One thread per rotated pair of a q or k head, then one per element of v, for each token.
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.y;
    let hd = params.head_dim;
    let half_dim = hd / 2u;
    let kv_dim = params.n_kv_heads * hd;
    let pairs = (params.n_heads + params.n_kv_heads) * half_dim;
    if (t >= step.n_tokens || gid.x >= pairs + kv_dim) {
        return;
    }
    let pos = step.start_pos + t;
    let row = t * (params.n_heads * hd + 2u * kv_dim);
    if (gid.x >= pairs) {
        let j = gid.x - pairs;
        v_cache[pos * kv_dim + j] = qkv[row + params.n_heads * hd + kv_dim + j];
        return;
    }
    // q heads and then k heads lie back to back in the row.
    let head = gid.x / half_dim;
    let i = gid.x % half_dim;
    let lo = row + head * hd + i;
    let cs = cos_sin[pos * half_dim + i];
    let x1 = qkv[lo];
    let x2 = qkv[lo + half_dim];
    let r1 = x1 * cs.x - x2 * cs.y;
    let r2 = x2 * cs.x + x1 * cs.y;
    if (head < params.n_heads) {
        qkv[lo] = r1;
        qkv[lo + half_dim] = r2;
    } else {
        let c = pos * kv_dim + (head - params.n_heads) * hd + i;
        k_cache[c] = r1;
        k_cache[c + half_dim] = r2;
    }
}
