// What the prefill tiles (tiled, and tiled_coop where cooperative matrices exist) stage: 4 inputs
// or weights at a time, zero past the pass's tokens and the part's rows, and the share of a token
// row's sum of squares (RMSNorm) that one of a row's `lanes` threads adds up.

// Inputs col..col + 3 of token t scaled by `scale`, zero past the pass's tokens. With Q8_INPUTS
// or F16_INPUTS the values quantize.wgsl left in x_prepared (its INPUT applied there, so the
// scale is 1).
fn staged_input(t: u32, col: u32, scale: f32) -> vec4<f32> {
    if (t >= step.n_tokens) {
        return vec4(0.0);
    }
    if (F16_INPUTS) {
        if (col >= params.k) {
            return vec4(0.0);
        }
        let at = (t * params.k + col) / 2u;
        return vec4(unpack2x16float(x_prepared[at]), unpack2x16float(x_prepared[at + 1u]));
    }
    if (Q8_INPUTS) {
        if (col >= params.k) {
            return vec4(0.0);
        }
        let row = t * q8_row_words();
        return q8_quad(x_prepared[row + col / 4u], bitcast<f32>(x_prepared[row + params.k / 4u + col / Q8_BLOCK]));
    }
    return input_quad_checked(t * params.in_stride, col) * scale;
}

// Weights col..col + 3 of output slot `slot`, zero past the part's rows.
fn staged_weight(slot: u32, col: u32) -> vec4<f32> {
    if (slot >= params.rows) {
        return vec4(0.0);
    }
    return weight_quad(matrix_row(slot), col);
}

// The sum of squares of token t's inputs lane, lane + lanes, ...; zero past the pass's tokens.
fn squares_share(t: u32, lane: u32, lanes: u32) -> f32 {
    var squares = 0.0;
    if (t < step.n_tokens) {
        for (var col = lane; col < params.k; col += lanes) {
            let v = x_at(t * params.in_stride + col);
            squares += v * v;
        }
    }
    return squares;
}
