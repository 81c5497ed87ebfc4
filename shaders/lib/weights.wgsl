// Weight decoding: elements of a (rows, k) matrix stored as f32, f16, bf16 or a llama.cpp block
// format, decoded with f32 arithmetic, bit-exact with ggml's dequantize_row_* (crate::quant's CPU
// reference). Reads the module's `w: array<u32>` binding, `params.k`, `params.rows` and the
// WEIGHT_DTYPE override. Blocks are laid out as in the file, but q4_0's, q5_0's, q8_0's, iq4_nl's,
// q3_k's, q6_k's and the grid formats' but iq1_m's: a part holds its blocks without their f16
// scale d (16, 20, 32, 108, 208 or 48-108 bytes each), then the blocks' scales
// (crate::gpu::tensor::ScalesApart), so that every quant word is aligned; a grid format's grid
// follows.

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

// Bytes of a q4_0, q5_0, iq4_nl, q8_0, q3_k and q6_k block without its scale, as a part holds them.
const Q4_0_QUANTS: u32 = DTYPE_Q4_0_BLOCK_BYTES - 2u;
const Q5_0_QUANTS: u32 = DTYPE_Q5_0_BLOCK_BYTES - 2u;
const IQ4_NL_QUANTS: u32 = DTYPE_IQ4_NL_BLOCK_BYTES - 2u;
const Q8_0_QUANTS: u32 = DTYPE_Q8_0_BLOCK_BYTES - 2u;
const Q3_K_QUANTS: u32 = DTYPE_Q3_K_BLOCK_BYTES - 2u;
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

// The scale (6 bits, less 32) of sub-block `sub` (0..15) of the q3_k super-block at byte `base` (a
// word boundary): its low 4 bits the low (sub < 8) or high nibble of scale byte sub % 8, its high 2
// bits bits 2 (sub / 4) of scale byte 8 + sub % 4 (the 12 scale bytes are words 24..26).
fn q3k_scale(base: u32, sub: u32) -> f32 {
    let byte = 8u * (sub % 4u);
    let low = (w[base / 4u + 24u + sub % 8u / 4u] >> (byte + 4u * (sub / 8u))) & 0xfu;
    let high = (w[base / 4u + 26u] >> (byte + 2u * (sub / 4u))) & 3u;
    return f32(low | (high << 4u)) - 32.0;
}

// The grid formats (iq1_s, iq1_m, iq2_xxs, iq2_xs, iq2_s, iq3_xxs, iq3_s; crate::quant's
// iq_grid.rs has their layouts): each group of 8 weights of a block of 32 is a point of the
// format's grid, signed (iq1: offset by +-1/8) and scaled. A part holds the grid after its rows
// (crate::gpu::tensor), and every format's d apart but iq1_m's, which has none.
fn is_grid_format() -> bool {
    switch WEIGHT_DTYPE {
        case DTYPE_IQ1_S, DTYPE_IQ1_M, DTYPE_IQ2_XXS, DTYPE_IQ2_XS, DTYPE_IQ2_S, DTYPE_IQ3_XXS, DTYPE_IQ3_S: { return true; }
        default: { return false; }
    }
}

// A grid format's super-block in the file.
fn grid_block_bytes() -> u32 {
    switch WEIGHT_DTYPE {
        case DTYPE_IQ1_S: { return DTYPE_IQ1_S_BLOCK_BYTES; }
        case DTYPE_IQ1_M: { return DTYPE_IQ1_M_BLOCK_BYTES; }
        case DTYPE_IQ2_XXS: { return DTYPE_IQ2_XXS_BLOCK_BYTES; }
        case DTYPE_IQ2_XS: { return DTYPE_IQ2_XS_BLOCK_BYTES; }
        case DTYPE_IQ2_S: { return DTYPE_IQ2_S_BLOCK_BYTES; }
        case DTYPE_IQ3_XXS: { return DTYPE_IQ3_XXS_BLOCK_BYTES; }
        default: { return DTYPE_IQ3_S_BLOCK_BYTES; }
    }
}

// Word i of the grid after the part's rows (a point is 2 words, iq3's 1).
fn grid_word(i: u32) -> u32 {
    return w[(params.rows * (params.k / 256u) * grid_block_bytes() + 3u) / 4u + i];
}

// iq2's and iq3's 8 signs of a group from 7 stored bits: the eighth makes the ones even
// (crate::quant::sign_bits).
fn sign_bits(stored: u32) -> u32 {
    let bits = stored & 127u;
    return bits | ((countOneBits(bits) & 1u) << 7u);
}

// The 4 bytes of `levels` (each 1..127) negated where bits 0..3 of `signs` are set: bit j moves to
// bit 8j (a multiply by 1 + 2^7 + 2^14 + 2^21, no two terms meeting), a mask of 0xff there flips
// the byte, and one more makes it two's complement (no carry: no level is 0).
fn signed_levels(levels: u32, signs: u32) -> u32 {
    let masks = (((signs & 0xfu) * 0x00204081u) & 0x01010101u) * 0xffu;
    return (levels ^ masks) + (masks & 0x01010101u);
}

// A group of 8 weights of a grid format: their levels as two words of int8 (weights 0..3, 4..7)
// and w = d * (level + offset).
struct GridGroup {
    levels: vec2<u32>,
    d: f32,
    offset: f32,
}

// Group l (0..3: weights 8l..8l + 7) of block `block` of 32 (counted from the part's first, 8 a
// super-block), with ggml's arithmetic (crate::quant's iq_grid.rs).
fn grid_group(block: u32, l: u32) -> GridGroup {
    let sb = block / 8u;
    let ib = block % 8u;
    let quants = grid_block_bytes() - select(2u, 0u, WEIGHT_DTYPE == DTYPE_IQ1_M); // a super-block without its d
    let start = sb * quants;
    let delta = bitcast<f32>(IQ1_DELTA_BITS);
    switch WEIGHT_DTYPE {
        case DTYPE_IQ2_XXS: { // per block two words: 4 point indices; 4 sign indices of 7 bits and the scale
            let indices = w[start / 4u + 2u * ib];
            let signs = w[start / 4u + 2u * ib + 1u];
            let point = 2u * ((indices >> (8u * l)) & 255u);
            let s = sign_bits(signs >> (7u * l));
            let d = block_scale(sb, quants, 256u) * (0.5 + f32(signs >> 28u)) * 0.25;
            return GridGroup(vec2(signed_levels(grid_word(point), s), signed_levels(grid_word(point + 1u), s >> 4u)), d, 0.0);
        }
        case DTYPE_IQ2_XS: { // a u16 a group: 9-bit point, 7-bit sign index; scale nibbles at 64
            let q = (w[start / 4u + 2u * ib + l / 2u] >> (16u * (l % 2u))) & 0xffffu;
            let point = 2u * (q & 511u);
            let s = sign_bits(q >> 9u);
            let scale = (byte_at(start + 64u + ib) >> (4u * (l / 2u))) & 15u;
            let d = block_scale(sb, quants, 256u) * (0.5 + f32(scale)) * 0.25;
            return GridGroup(vec2(signed_levels(grid_word(point), s), signed_levels(grid_word(point + 1u), s >> 4u)), d, 0.0);
        }
        case DTYPE_IQ2_S: { // points' low bytes, signs at 32, high bits at 64, scales at 72
            let high = byte_at(start + 64u + ib);
            let point = 2u * (byte_at(start + 4u * ib + l) | ((high << (8u - 2u * l)) & 0x300u));
            let s = byte_at(start + 32u + 4u * ib + l);
            let scale = (byte_at(start + 72u + ib) >> (4u * (l / 2u))) & 15u;
            let d = block_scale(sb, quants, 256u) * (0.5 + f32(scale)) * 0.25;
            return GridGroup(vec2(signed_levels(grid_word(point), s), signed_levels(grid_word(point + 1u), s >> 4u)), d, 0.0);
        }
        case DTYPE_IQ3_XXS: { // two 4-value points a group; per block a word of sign indices and scale at 64
            let signs = w[start / 4u + 16u + ib];
            let s = sign_bits(signs >> (7u * l));
            let at = start + 8u * ib + 2u * l;
            let d = block_scale(sb, quants, 256u) * (0.5 + f32(signs >> 28u)) * 0.5;
            return GridGroup(vec2(signed_levels(grid_word(byte_at(at)), s), signed_levels(grid_word(byte_at(at + 1u)), s >> 4u)), d, 0.0);
        }
        case DTYPE_IQ3_S: { // points' low bytes, ninth bits at 64, signs at 72, scale nibbles at 104
            let high = byte_at(start + 64u + ib) >> (2u * l);
            let at = start + 8u * ib + 2u * l;
            let points = vec2(byte_at(at) | ((high & 1u) << 8u), byte_at(at + 1u) | ((high & 2u) << 7u));
            let s = byte_at(start + 72u + 4u * ib + l);
            let scale = (byte_at(start + 104u + ib / 2u) >> (4u * (ib % 2u))) & 15u;
            let d = block_scale(sb, quants, 256u) * f32(1u + 2u * scale);
            return GridGroup(vec2(signed_levels(grid_word(points.x), s), signed_levels(grid_word(points.y), s >> 4u)), d, 0.0);
        }
        case DTYPE_IQ1_S: { // points' low bytes; per block a u16 at 32: high bits, scale, delta's sign
            let qh = (w[start / 4u + 8u + ib / 2u] >> (16u * (ib % 2u))) & 0xffffu;
            let point = 2u * (byte_at(start + 4u * ib + l) | (((qh >> (3u * l)) & 7u) << 8u));
            let d = block_scale(sb, quants, 256u) * f32(2u * ((qh >> 12u) & 7u) + 1u);
            return GridGroup(vec2(grid_word(point), grid_word(point + 1u)), d, select(delta, -delta, (qh & 0x8000u) != 0u));
        }
        default: { // iq1_m: points' low bytes, a nibble a group at 32 (high bits, delta's sign), scales at 48
            let sc = vec2(w[start / 4u + 12u], w[start / 4u + 13u]);
            let d_bits = ((sc.x & 0xffffu) >> 12u) | ((sc.x >> 24u) & 0xf0u) | ((sc.y >> 4u) & 0xf00u) | ((sc.y >> 16u) & 0xf000u);
            let scales = (sc[ib / 4u] >> (16u * (ib / 2u % 2u) + 6u * (ib % 2u) + 3u * (l / 2u))) & 7u;
            let nibble = (byte_at(start + 32u + 2u * ib + l / 2u) >> (4u * (l % 2u))) & 15u;
            let point = 2u * (byte_at(start + 4u * ib + l) | ((nibble & 7u) << 8u));
            let d = unpack2x16float(d_bits).x * f32(2u * scales + 1u);
            return GridGroup(vec2(grid_word(point), grid_word(point + 1u)), d, select(delta, -delta, (nibble & 8u) != 0u));
        }
    }
}

// Weights 4h..4h + 3 (h 0..7) of grid block `block`.
fn grid_quad(block: u32, h: u32) -> vec4<f32> {
    let group = grid_group(block, h / 2u);
    return group.d * (signed_bytes(group.levels[h % 2u]) + group.offset);
}

// The super-block formats' unit of decoding: 64 weights whose levels share the same bytes, as two
// runs of 32 (q4_k, q5_k: sub-blocks 2 part and 2 part + 1, the low and high nibbles of 32 bytes;
// q6_k, q3_k, q2_k: quarters part % 2 and part % 2 + 2 of half part / 2, the quarters' low bits
// side by side in the half's bytes). The column (0..255 in the super-block) of run r's element i:
fn unit_column(part: u32, run: u32, i: u32) -> u32 {
    if (WEIGHT_DTYPE == DTYPE_Q4_K || WEIGHT_DTYPE == DTYPE_Q5_K) {
        return 64u * part + 32u * run + i;
    }
    return 128u * (part / 2u) + 32u * (part % 2u + 2u * run) + i;
}

// Where a run's levels lie in the bytes of its unit: the low bits at `low_shifts[run]` under
// `low_mask`, the high bits (q5_k's fifth, q6_k's top two, q3_k's third; none for q4_k and q2_k)
// at `high_shifts[run]` under `high_mask`, set above the low ones at bit `high_at`.
struct LevelBits {
    low_shifts: vec2<u32>,
    low_mask: u32,
    high_shifts: vec2<u32>,
    high_mask: u32,
    high_at: u32,
}

fn level_bits(part: u32) -> LevelBits {
    switch WEIGHT_DTYPE {
        case DTYPE_Q2_K, DTYPE_Q3_K: { // bits 2q of each qs byte for quarter q; q3_k's third bit of quarter q of half h: bit 4h + q
            let quarter = part % 2u;
            let third = 4u * (part / 2u) + quarter;
            return LevelBits(vec2(2u * quarter, 2u * quarter + 4u), 3u, vec2(third, third + 2u), select(0u, 1u, WEIGHT_DTYPE == DTYPE_Q3_K), 2u);
        }
        case DTYPE_Q5_K: { // the fifth bit of sub-block s: bit s of its qh byte
            return LevelBits(vec2(0u, 4u), 0xfu, vec2(2u * part, 2u * part + 1u), 1u, 4u);
        }
        case DTYPE_Q6_K: { // the top two bits of quarter q: bits 2q of its qh byte
            let shift = 2u * (part % 2u);
            return LevelBits(vec2(0u, 4u), 0xfu, vec2(shift, shift + 4u), 3u, 4u);
        }
        default: { // q4_k
            return LevelBits(vec2(0u, 4u), 0xfu, vec2(0u), 0u, 4u);
        }
    }
}

// Run `run`'s levels of the 4 bytes of word `low` (its low bits) and of word `high` (its high bits).
fn quad_levels(low: u32, high: u32, bits: LevelBits, run: u32) -> vec4<u32> {
    let bytes = vec4(0u, 8u, 16u, 24u);
    let low_bits = (vec4(low) >> (bytes + vec4(bits.low_shifts[run]))) & vec4(bits.low_mask);
    return low_bits | (((vec4(high) >> (bytes + vec4(bits.high_shifts[run]))) & vec4(bits.high_mask)) << vec4(bits.high_at));
}

// The offset of the super-block formats' levels: w = scale * (level - offset) (- min).
fn level_offset() -> f32 {
    switch WEIGHT_DTYPE {
        case DTYPE_Q3_K: { return 4.0; }
        case DTYPE_Q6_K: { return 32.0; }
        default: { return 0.0; }
    }
}

// The byte at which super-block `block` (counted from the part's first) starts: q3_k's and q6_k's
// without their d, which lie after the part's blocks.
fn superblock_start(block: u32) -> u32 {
    switch WEIGHT_DTYPE {
        case DTYPE_Q2_K: { return block * DTYPE_Q2_K_BLOCK_BYTES; }
        case DTYPE_Q3_K: { return block * Q3_K_QUANTS; }
        case DTYPE_Q4_K: { return block * DTYPE_Q4_K_BLOCK_BYTES; }
        case DTYPE_Q5_K: { return block * DTYPE_Q5_K_BLOCK_BYTES; }
        default: { return block * Q6_K_QUANTS; }
    }
}

// The bytes of unit `part` of the super-block at byte `start` (all word boundaries): where its 32
// bytes of low bits start, byte i holding element i of both runs, and its 32 bytes of high bits
// (q4_k's and q2_k's, which have none: the low ones again).
fn unit_bytes(start: u32, part: u32) -> vec2<u32> {
    switch WEIGHT_DTYPE {
        case DTYPE_Q2_K: { let low = start + 16u + 32u * (part / 2u); return vec2(low, low); }
        case DTYPE_Q3_K: { return vec2(start + 32u + 32u * (part / 2u), start); }
        case DTYPE_Q4_K: { let low = start + 16u + 32u * part; return vec2(low, low); }
        case DTYPE_Q5_K: { return vec2(start + 48u + 32u * part, start + 16u); }
        default: { return vec2(start + 32u * part, start + 128u + 32u * (part / 2u)); }
    }
}

// The scales and the mins of two elements of super-block `block`, whose bytes start at `start`, at
// `columns` (0..255): w = scale * (level - level_offset()) - min. The block's d (and dmin) read once.
struct ScalesMins {
    scales: vec2<f32>,
    mins: vec2<f32>,
}

fn superblock_scales_mins(block: u32, start: u32, columns: vec2<u32>) -> ScalesMins {
    switch WEIGHT_DTYPE {
        case DTYPE_Q2_K: { // byte `sub` of 16: the scale in its low nibble, the min in its high; f16 d and dmin at 80
            let dm = unpack2x16float(w[start / 4u + 20u]);
            let sc = vec2(byte_at(start + columns.x / 16u), byte_at(start + columns.y / 16u));
            return ScalesMins(dm.x * vec2<f32>(sc & vec2(0xfu)), dm.y * vec2<f32>(sc >> vec2(4u)));
        }
        case DTYPE_Q3_K: {
            let d = block_scale(block, Q3_K_QUANTS, 256u);
            return ScalesMins(d * vec2(q3k_scale(start, columns.x / 16u), q3k_scale(start, columns.y / 16u)), vec2(0.0));
        }
        case DTYPE_Q4_K, DTYPE_Q5_K: {
            let dm = unpack2x16float(w[start / 4u]);
            let a = q4k_scale_min(start, columns.x / 32u);
            let b = q4k_scale_min(start, columns.y / 32u);
            return ScalesMins(dm.x * vec2(a.x, b.x), dm.y * vec2(a.y, b.y));
        }
        default: {
            let d = block_scale(block, Q6_K_QUANTS, 256u);
            return ScalesMins(d * vec2(i8_at(start + 192u + columns.x / 16u), i8_at(start + 192u + columns.y / 16u)), vec2(0.0));
        }
    }
}

// The unit and the run of the super-block element at `column` (unit_column's inverse).
fn column_unit(column: u32) -> vec2<u32> {
    if (WEIGHT_DTYPE == DTYPE_Q4_K || WEIGHT_DTYPE == DTYPE_Q5_K) {
        return vec2(column / 64u, column % 64u / 32u);
    }
    let quarter = column % 128u / 32u;
    return vec2(2u * (column / 128u) + quarter % 2u, quarter / 2u);
}

// Weights column..column + 3 (column a multiple of 4) of super-block `block`.
fn superblock_quad(block: u32, column: u32) -> vec4<f32> {
    let start = superblock_start(block);
    let unit = column_unit(column);
    let at = unit_bytes(start, unit.x) + vec2(column % 32u);
    let levels = quad_levels(w[at.x / 4u], w[at.y / 4u], level_bits(unit.x), unit.y);
    let scale_min = superblock_scales_mins(block, start, vec2(column));
    return scale_min.scales.x * quant_values(levels, level_offset()) - scale_min.mins.x;
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
        case DTYPE_IQ1_S, DTYPE_IQ1_M, DTYPE_IQ2_XXS, DTYPE_IQ2_XS, DTYPE_IQ2_S, DTYPE_IQ3_XXS, DTYPE_IQ3_S: {
            return grid_quad(row * (params.k / 32u) + col / 32u, col % 32u / 4u)[col % 4u];
        }
        default: { // the super-block formats: the element's quad, decoded as the tiles do
            let c = col % 256u;
            return superblock_quad(row * (params.k / 256u) + col / 256u, c - c % 4u)[c % 4u];
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
    return quant_values(quad_nibbles(word, false), 0.0);
}

fn high_nibbles(word: u32) -> vec4<f32> {
    return quant_values(quad_nibbles(word, true), 0.0);
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
        case DTYPE_Q2_K, DTYPE_Q3_K, DTYPE_Q4_K, DTYPE_Q5_K, DTYPE_Q6_K: {
            return superblock_quad(row * (params.k / 256u) + col / 256u, col % 256u);
        }
        case DTYPE_IQ1_S, DTYPE_IQ1_M, DTYPE_IQ2_XXS, DTYPE_IQ2_XS, DTYPE_IQ2_S, DTYPE_IQ3_XXS, DTYPE_IQ3_S: {
            return grid_quad(block, j);
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
