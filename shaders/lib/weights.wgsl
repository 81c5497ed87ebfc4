// Weight decoding: elements of a (rows, k) matrix stored as f32, f16, bf16 or a llama.cpp block
// format, decoded with f32 arithmetic, bit-exact with ggml's dequantize_row_* (crate::quant's CPU
// reference). Reads the module's `w: array<u32>` binding, `params.k`, `params.rows` and the
// WEIGHT_DTYPE override. Blocks are laid out as in the file, but q4_0's, q5_0's, q8_0's and q6_k's:
// a part holds its blocks without their f16 scale d (16, 20, 32 or 208 bytes each), then the blocks' scales
// (crate::gpu::tensor::ScalesApart), so that every quant word is aligned.

// The byte at which the block holding element `col` of `row` starts, for blocks of `elements`
// weights in `bytes` bytes.
fn block_start(row: u32, col: u32, elements: u32, bytes: u32) -> u32 {
    return (row * (params.k / elements) + col / elements) * bytes;
}

fn byte_at(offset: u32) -> u32 {
    return (w[offset >> 2u] >> ((offset & 3u) * 8u)) & 0xffu;
}

fn f16_at(offset: u32) -> f32 { // offset is even
    return unpack2x16float(w[offset >> 2u] >> ((offset & 2u) * 8u)).x;
}

fn i8_at(offset: u32) -> f32 {
    return f32(bitcast<i32>(byte_at(offset) << 24u) >> 24u);
}

// Bytes of a q4_0, q5_0, q8_0 and q6_k block without its scale, as a part holds them.
const Q4_0_QUANTS: u32 = DTYPE_Q4_0_BLOCK_BYTES - 2u;
const Q5_0_QUANTS: u32 = DTYPE_Q5_0_BLOCK_BYTES - 2u;
const IQ4_NL_QUANTS: u32 = DTYPE_IQ4_NL_BLOCK_BYTES - 2u;
const Q8_0_QUANTS: u32 = DTYPE_Q8_0_BLOCK_BYTES - 2u;
const Q6_K_QUANTS: u32 = DTYPE_Q6_K_BLOCK_BYTES - 2u;

// The scale d of block `block` (counted from the part's first) of those formats: `quants` bytes a
// block, `elements` weights.
fn block_scale(block: u32, quants: u32, elements: u32) -> f32 {
    return f16_at(quants * (params.k / elements) * params.rows + 2u * block);
}

// Word j of the quants of q4_0, q5_0 or q8_0 block `block` (q4_0: low nibbles weights 4j..4j + 3,
// high 16 + 4j..; q5_0: word 0 the fifth bits, bit i weight i, then q4_0's words; q8_0: weights
// 4j..4j + 3).
fn quant_word(block: u32, quants: u32, j: u32) -> u32 {
    return w[quants / 4u * block + j];
}

// The low (or high) nibbles of bytes 0..3 of a word.
fn quad_nibbles(word: u32, high: bool) -> vec4<u32> {
    return (vec4(word) >> (vec4(select(0u, 4u, high)) + vec4(0u, 8u, 16u, 24u))) & vec4(0xfu);
}

// The 4 levels of 5-bit weights 4j..4j + 3 of a q5_0 or q5_1 block (nibbles: word j % 4 of its
// nibble words, high nibbles for j >= 4), their fifth bits bits 4j..4j + 3 of the block's qh.
fn five_bit_levels(nibbles: u32, qh: u32, j: u32) -> vec4<u32> {
    return quad_nibbles(nibbles, j >= 4u) | (((vec4(qh) >> (vec4(4u * j) + vec4(0u, 1u, 2u, 3u))) & vec4(1u)) << vec4(4u));
}

// The int8 levels of four iq4 indices (0..15) as bytes (two's complement): each index picks its
// word of the table (IQ4_LEVELS_*, crate::quant::IQ4_LEVELS four a word) and its byte there.
fn iq4_level_bytes(indices: vec4<u32>) -> vec4<u32> {
    let low = select(vec4(IQ4_LEVELS_0), vec4(IQ4_LEVELS_1), indices >= vec4(4u));
    let high = select(vec4(IQ4_LEVELS_2), vec4(IQ4_LEVELS_3), indices >= vec4(12u));
    return (select(low, high, indices >= vec4(8u)) >> ((indices & vec4(3u)) << vec4(3u))) & vec4(0xffu);
}

// The levels of four iq4 indices as f32.
fn iq4_values(indices: vec4<u32>) -> vec4<f32> {
    return quant_values(iq4_level_bytes(indices) ^ vec4(0x80u), 128.0);
}

// The levels of four iq4 indices packed in a word, index i's in byte i (int8 inputs' products).
fn iq4_levels(indices: vec4<u32>) -> u32 {
    let bytes = iq4_level_bytes(indices);
    return bytes.x | (bytes.y << 8u) | (bytes.z << 16u) | (bytes.w << 24u);
}

// Word j (0..3) of the nibbles of iq4 block `block` of 32 weights (iq4_nl: the part's nibbles,
// then its scales; iq4_xs: f16 d and u16 scales_h, 4 bytes of scales_l, then 16 bytes a block,
// 8 blocks a super-block), laid out as q4_0's.
fn iq4_word(block: u32, j: u32) -> u32 {
    if (WEIGHT_DTYPE == DTYPE_IQ4_XS) {
        return w[block / 8u * (DTYPE_IQ4_XS_BLOCK_BYTES / 4u) + 2u + 4u * (block % 8u) + j];
    }
    return quant_word(block, IQ4_NL_QUANTS, j);
}

// The scale of iq4 block `block`: iq4_nl's d; iq4_xs's d (ls - 32), ls the 6-bit scale of the
// block, its low 4 bits nibble `block % 8` of scales_l, its high 2 bits from scales_h.
fn iq4_scale(block: u32) -> f32 {
    if (WEIGHT_DTYPE == DTYPE_IQ4_XS) {
        let start = block / 8u * (DTYPE_IQ4_XS_BLOCK_BYTES / 4u);
        let ib = block % 8u;
        let low = (w[start + 1u] >> (4u * ib)) & 0xfu;
        let high = (w[start] >> (16u + 2u * ib)) & 3u;
        return unpack2x16float(w[start]).x * (f32(low | (high << 4u)) - 32.0);
    }
    return block_scale(block, IQ4_NL_QUANTS, 32u);
}

// The 6-bit scale and min of sub-block `sub` (0..7) of the q4_k or q5_k super-block at byte `base` (a
// word boundary). Its 12 scale bytes b are 3 words, and sub-block i and i + 4 take their bits
// from b[i], b[4 + i] and b[8 + i], byte i of each word.
fn q4k_scale_min(base: u32, sub: u32) -> vec2<f32> {
    let i = base / 4u + 1u;
    let b = (vec3(w[i], w[i + 1u], w[i + 2u]) >> vec3(8u * (sub % 4u))) & vec3(0xffu);
    let low = vec2(b.x & 63u, b.y & 63u);
    let high = vec2((b.z & 0xfu) | ((b.x >> 6u) << 4u), (b.z >> 4u) | ((b.y >> 6u) << 4u));
    return vec2<f32>(select(high, low, sub < 4u));
}

// Element `col` of `row` for the block formats (llama.cpp's dequantize_row_*).
fn block_weight(row: u32, col: u32) -> f32 {
    switch WEIGHT_DTYPE {
        case DTYPE_Q4_0: { // q4_0: d, 16 bytes; j < 16 low nibbles, j >= 16 high nibbles
            let block = row * (params.k / 32u) + col / 32u;
            let j = col % 32u;
            let q = (quant_word(block, Q4_0_QUANTS, j % 16u / 4u) >> (j % 4u * 8u + j / 16u * 4u)) & 0xfu;
            return block_scale(block, Q4_0_QUANTS, 32u) * (f32(q) - 8.0);
        }
        case DTYPE_Q4_1: { // q4_1: f16 d, f16 m, 16 bytes as q4_0
            let base = block_start(row, col, DTYPE_Q4_1_BLOCK, DTYPE_Q4_1_BLOCK_BYTES);
            let j = col % 32u;
            let q = (byte_at(base + 4u + j % 16u) >> (j / 16u * 4u)) & 0xfu;
            return f16_at(base) * f32(q) + f16_at(base + 2u);
        }
        case DTYPE_Q5_0: { // q5_0: d, qh, 16 bytes as q4_0
            let block = row * (params.k / 32u) + col / 32u;
            let j = col % 32u;
            let q = five_bit_levels(quant_word(block, Q5_0_QUANTS, 1u + j % 16u / 4u), quant_word(block, Q5_0_QUANTS, 0u), j / 4u)[j % 4u];
            return block_scale(block, Q5_0_QUANTS, 32u) * (f32(q) - 16.0);
        }
        case DTYPE_Q5_1: { // q5_1: f16 d, f16 m, qh, 16 bytes as q4_0 (24: word-aligned)
            let start = block_start(row, col, DTYPE_Q5_1_BLOCK, DTYPE_Q5_1_BLOCK_BYTES) / 4u;
            let j = col % 32u;
            let q = five_bit_levels(w[start + 2u + j % 16u / 4u], w[start + 1u], j / 4u)[j % 4u];
            let dm = unpack2x16float(w[start]);
            return dm.x * f32(q) + dm.y;
        }
        case DTYPE_IQ4_NL, DTYPE_IQ4_XS: { // iq4: q4_0's nibbles index the int8 levels
            let block = row * (params.k / 32u) + col / 32u;
            let j = col % 32u;
            let index = (iq4_word(block, j % 16u / 4u) >> (j % 4u * 8u + j / 16u * 4u)) & 0xfu;
            return iq4_scale(block) * iq4_values(vec4(index)).x;
        }
        case DTYPE_Q8_0: { // q8_0: d, 32 int8
            let block = row * (params.k / 32u) + col / 32u;
            let j = col % 32u;
            let q = f32(extractBits(bitcast<i32>(quant_word(block, Q8_0_QUANTS, j / 4u)), 8u * (j % 4u), 8u));
            return block_scale(block, Q8_0_QUANTS, 32u) * q;
        }
        case DTYPE_Q4_K: { // q4_k: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
            let base = block_start(row, col, DTYPE_Q4_K_BLOCK, DTYPE_Q4_K_BLOCK_BYTES);
            let j = col % 256u;
            let sub = j / 32u;
            let scale_min = q4k_scale_min(base, sub);
            let q = (byte_at(base + 16u + j / 64u * 32u + j % 32u) >> (sub % 2u * 4u)) & 0xfu;
            return (f16_at(base) * scale_min.x) * f32(q) - f16_at(base + 2u) * scale_min.y;
        }
        case DTYPE_Q5_K: { // q5_k: q4_k's 16 bytes, 32 bytes of fifth bits (bit `sub` of byte j % 32), 128 of nibbles
            let base = block_start(row, col, DTYPE_Q5_K_BLOCK, DTYPE_Q5_K_BLOCK_BYTES);
            let j = col % 256u;
            let sub = j / 32u;
            let scale_min = q4k_scale_min(base, sub);
            let low = (byte_at(base + 48u + j / 64u * 32u + j % 32u) >> (sub % 2u * 4u)) & 0xfu;
            let q = low | (((byte_at(base + 16u + j % 32u) >> sub) & 1u) << 4u);
            return (f16_at(base) * scale_min.x) * f32(q) - f16_at(base + 2u) * scale_min.y;
        }
        default: { // q6_k: 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales; d
            let block = row * (params.k / 256u) + col / 256u;
            let base = Q6_K_QUANTS * block;
            let j = col % 256u;
            let half = j / 128u;
            let quarter = j % 128u / 32u;
            let l = j % 32u;
            let low = (byte_at(base + half * 64u + l + quarter % 2u * 32u) >> (quarter / 2u * 4u)) & 0xfu;
            let high = (byte_at(base + 128u + half * 32u + l) >> (2u * quarter)) & 3u;
            let scale = i8_at(base + 192u + half * 8u + l / 16u + 2u * quarter);
            return (block_scale(block, Q6_K_QUANTS, 256u) * scale) * (f32(low | (high << 4u)) - 32.0);
        }
    }
}

// Elements col and col + 1 (col even) of `row` as f32.
fn weight_pair(row: u32, col: u32) -> vec2<f32> {
    let i = (row * params.k + col) / 2u;
    switch WEIGHT_DTYPE {
        case DTYPE_F32: { return vec2(bitcast<f32>(w[2u * i]), bitcast<f32>(w[2u * i + 1u])); }
        case DTYPE_F16: { return unpack2x16float(w[i]); }
        case DTYPE_BF16: { let b = w[i]; return vec2(bitcast<f32>(b << 16u), bitcast<f32>(b & 0xffff0000u)); }
        default: { return vec2(block_weight(row, col), block_weight(row, col + 1u)); }
    }
}

// Quant values v - offset, made from their bits (lib/q8_block.wgsl's values_from_bits), or with
// integer-to-float conversions where the host asks for them (INT_CONVERSIONS), for comparison:
// the same values either way.
fn quant_values(v: vec4<u32>, offset: f32) -> vec4<f32> {
    if (INT_CONVERSIONS) {
        return vec4<f32>(v) - offset;
    }
    return values_from_bits(v, offset);
}

// Bytes 0..3 of a word as the low nibbles' values, and as the high nibbles' values.
fn low_nibbles(word: u32) -> vec4<f32> {
    return quant_values((vec4(word) >> vec4(0u, 8u, 16u, 24u)) & vec4(0xfu), 0.0);
}

fn high_nibbles(word: u32) -> vec4<f32> {
    return quant_values((vec4(word) >> vec4(4u, 12u, 20u, 28u)) & vec4(0xfu), 0.0);
}

// Bytes 0..3 of a word as int8 values.
fn signed_bytes(word: u32) -> vec4<f32> {
    return quant_values(biased_bytes(word), 128.0);
}

// Weights col..col + 3 (col a multiple of 4) of `row`, zero past k. The 32-weight block formats
// decode 4 at a time from one quant word (a block's columns 4j..4j + 3 are word j's low nibbles
// for j < 4, word j - 4's high nibbles for j >= 4).
fn weight_quad(row: u32, col: u32) -> vec4<f32> {
    let block = row * (params.k / 32u) + col / 32u;
    let j = col % 32u / 4u;
    switch WEIGHT_DTYPE {
        case DTYPE_Q4_0: { // q4_0
            let word = quant_word(block, Q4_0_QUANTS, j % 4u);
            let q = select(low_nibbles(word), high_nibbles(word), j >= 4u);
            return block_scale(block, Q4_0_QUANTS, 32u) * (q - 8.0);
        }
        case DTYPE_Q4_1: { // q4_1
            let start = block * DTYPE_Q4_1_BLOCK_BYTES; // 20 bytes: every block starts on a word
            let word = w[start / 4u + 1u + j % 4u];
            let q = select(low_nibbles(word), high_nibbles(word), j >= 4u);
            return f16_at(start) * q + f16_at(start + 2u);
        }
        case DTYPE_Q5_0: { // q5_0
            let q = five_bit_levels(quant_word(block, Q5_0_QUANTS, 1u + j % 4u), quant_word(block, Q5_0_QUANTS, 0u), j);
            return block_scale(block, Q5_0_QUANTS, 32u) * quant_values(q, 16.0);
        }
        case DTYPE_Q5_1: { // q5_1
            let start = block * (DTYPE_Q5_1_BLOCK_BYTES / 4u);
            let dm = unpack2x16float(w[start]);
            return dm.x * quant_values(five_bit_levels(w[start + 2u + j % 4u], w[start + 1u], j), 0.0) + dm.y;
        }
        case DTYPE_Q8_0: { // q8_0
            return block_scale(block, Q8_0_QUANTS, 32u) * signed_bytes(quant_word(block, Q8_0_QUANTS, j));
        }
        case DTYPE_IQ4_NL, DTYPE_IQ4_XS: { // iq4: as q4_0, each nibble the index of an int8 level
            return iq4_scale(block) * iq4_values(quad_nibbles(iq4_word(block, j % 4u), j >= 4u));
        }
        case DTYPE_Q4_K: { // q4_k: 4 nibbles of one sub-block from one word (low: even sub-blocks, high: odd)
            let start = block_start(row, col, DTYPE_Q4_K_BLOCK, DTYPE_Q4_K_BLOCK_BYTES);
            let c = col % 256u;
            let sub = c / 32u;
            let word = w[(start + 16u + c / 64u * 32u + c % 32u) / 4u];
            let q = select(low_nibbles(word), high_nibbles(word), sub % 2u == 1u);
            let scale_min = q4k_scale_min(start, sub);
            return f16_at(start) * scale_min.x * q - f16_at(start + 2u) * scale_min.y;
        }
        case DTYPE_Q5_K: { // q5_k: as q4_k, each byte's bit `sub` of the qh word of the same 4 bytes the fifth
            let start = block_start(row, col, DTYPE_Q5_K_BLOCK, DTYPE_Q5_K_BLOCK_BYTES);
            let c = col % 256u;
            let sub = c / 32u;
            let bytes = vec4(0u, 8u, 16u, 24u);
            let low = (vec4(w[(start + 48u + c / 64u * 32u + c % 32u) / 4u]) >> (bytes + vec4(sub % 2u * 4u))) & vec4(0xfu);
            let high = (vec4(w[(start + 16u + c % 32u) / 4u]) >> (bytes + vec4(sub))) & vec4(1u);
            let scale_min = q4k_scale_min(start, sub);
            return f16_at(start) * scale_min.x * quant_values(low | (high << vec4(4u)), 0.0) - f16_at(start + 2u) * scale_min.y;
        }
        case DTYPE_Q6_K: { // q6_k: as block_weight, 4 weights of one quarter at a time (whole words)
            let superblock = row * (params.k / 256u) + col / 256u;
            let start = Q6_K_QUANTS * superblock;
            let c = col % 256u;
            let half = c / 128u;
            let quarter = c % 128u / 32u;
            let l = c % 32u;
            let bytes = vec4(0u, 8u, 16u, 24u);
            let low = (vec4(w[(start + half * 64u + l + quarter % 2u * 32u) / 4u]) >> (bytes + vec4(quarter / 2u * 4u))) & vec4(0xfu);
            let high = (vec4(w[(start + 128u + half * 32u + l) / 4u]) >> (bytes + vec4(2u * quarter))) & vec4(3u);
            let scale = i8_at(start + 192u + half * 8u + l / 16u + 2u * quarter);
            return block_scale(superblock, Q6_K_QUANTS, 256u) * scale * quant_values(low | (high << vec4(4u)), 32.0);
        }
        default: { // k is even, so each pair lies wholly inside or past the row
            var pairs = vec4(0.0, 0.0, 0.0, 0.0);
            if (col < params.k) {
                pairs = vec4(weight_pair(row, col), pairs.zw);
            }
            if (col + 2u < params.k) {
                pairs = vec4(pairs.xy, weight_pair(row, col + 2u));
            }
            return pairs;
        }
    }
}
