// A matmul's input rows transformed by the INPUT override on the way in (the op before the
// matmul fused): as they are, RMSNorm'd (without the per-row scale, which row_scale gives), or
// the gated MLP activation silu(x[:, :k]) * x[:, k:2k]. Reads the module's `x`, `norm`, `params`.

fn x_at(i: u32) -> f32 {
    return x[i / 4u][i % 4u];
}

fn norm_at(i: u32) -> f32 {
    return norm[i / 4u][i % 4u];
}

// its per-row scale, which the caller applies to the dot product).
fn input_pair(base: u32, col: u32) -> vec2<f32> {
    let v = vec2(x_at(base + col), x_at(base + col + 1u));
    switch INPUT {
        case INPUT_RMSNORM: { return v * vec2(norm_at(col), norm_at(col + 1u)); }
        case INPUT_SILU_MUL: {
            let up = vec2(x_at(base + params.k + col), x_at(base + params.k + col + 1u));
            return v / (1.0 + exp(-v)) * up;
        }
        default: { return v; }
    }
}

// RMSNorm's 1 / sqrt(mean(x^2) + eps) from a token row's sum of squares; 1 for other inputs.
fn row_scale(sum_of_squares: f32) -> f32 {
    return select(1.0, inverseSqrt(sum_of_squares / f32(params.k) + params.eps), INPUT == INPUT_RMSNORM);
}

// Inputs col..col + 3 of the token row at `base` (both multiples of 4) transformed by INPUT
// (RMSNorm without its per-row scale), and the sum of their squares as read.
fn input_quad(base: u32, col: u32) -> vec4<f32> {
    let v = x[(base + col) / 4u];
    switch INPUT {
        case INPUT_RMSNORM: { return v * norm[col / 4u]; }
        case INPUT_SILU_MUL: { return v / (1.0 + exp(-v)) * x[(base + params.k + col) / 4u]; }
        default: { return v; }
    }
}

fn squares_quad(base: u32, col: u32) -> f32 {
    let v = x[(base + col) / 4u];
    return dot(v, v);
}

fn input_quad_checked(base: u32, col: u32) -> vec4<f32> {
    var v = vec4(0.0, 0.0, 0.0, 0.0);
    if (col < params.k) {
        v = vec4(input_pair(base, col), v.zw);
    }
    if (col + 2u < params.k) {
        v = vec4(v.xy, input_pair(base, col + 2u));
    }
    return v;
}
