//! Weight storage formats and their CPU reference (de)quantizers.
//!
//! The quantized formats are llama.cpp's, byte for byte (`ggml-quants.c`): blocks of 32 (q4_0, q4_1,
//! q5_0, q5_1, q8_0, iq4_nl) or 256 (q2_k, q3_k, q4_k, q5_k, q6_k, iq4_xs and the grid formats
//! iq1_s, iq1_m, iq2_xxs, iq2_xs, iq2_s, iq3_xxs, iq3_s) consecutive elements of a row,
//! little-endian. Dequantization is bit-exact
//! with ggml's and with llama.cpp's `gguf` Python package (tests/quant.rs checks goldens from it);
//! quantization follows ggml's `quantize_row_*_ref`.

mod iq4;
mod iq_grid;
mod iq_grid_tables;
mod k_quants;
mod legacy;

use half::{bf16, f16};

pub use iq4::IQ4_LEVELS;
pub use iq_grid::{sign_bits, IQ1_DELTA};

/// How the elements of a weight tensor are stored, on disk and in GPU buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// 32 weights in 18 bytes: f16 d, 16 bytes of nibbles; w = d * (q - 8).
    Q4_0,
    /// 32 weights in 20 bytes: f16 d, f16 m, 16 bytes of nibbles; w = d * q + m.
    Q4_1,
    /// 32 weights in 22 bytes: f16 d, 4 bytes of fifth bits, 16 bytes of nibbles; w = d * (q - 16).
    Q5_0,
    /// 32 weights in 24 bytes: f16 d, f16 m, 4 bytes of fifth bits, 16 bytes of nibbles; w = d * q + m.
    Q5_1,
    /// 32 weights in 34 bytes: f16 d, 32 int8; w = d * q.
    Q8_0,
    /// 256 weights in 84 bytes: 16 bytes of 4-bit scales and mins for 16 sub-blocks of 16, 64 bytes
    /// of 2-bit levels, f16 d, f16 dmin; w = d * scale * q - dmin * min.
    Q2K,
    /// 256 weights in 110 bytes: 32 bytes of third bits, 64 of low 2 bits, 12 bytes of 6-bit scales
    /// of sub-blocks of 16, f16 d; w = d * (scale - 32) * (q - 4).
    Q3K,
    /// 256 weights in 144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks
    /// of 32, 128 bytes of nibbles; w = d * scale * q - dmin * min.
    Q4K,
    /// 256 weights in 176 bytes: q4_k's header, 32 bytes of fifth bits, 128 bytes of nibbles;
    /// w = d * scale * q - dmin * min.
    Q5K,
    /// 256 weights in 210 bytes: 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales of
    /// sub-blocks of 16, f16 d; w = d * scale * (q - 32).
    Q6K,
    /// 32 weights in 18 bytes: f16 d, 16 bytes of nibbles indexing 16 int8 levels; w = d * level.
    IQ4NL,
    /// 256 weights in 136 bytes: f16 d, 6-bit scales of its 8 blocks of 32 (u16 of high bits, 4
    /// bytes of low nibbles), 128 bytes of iq4_nl's nibbles; w = d * (scale - 32) * level.
    IQ4XS,
    /// 256 weights in 50 bytes: groups of 8 at points of a grid of -1, 0, 1 (11-bit indices), an
    /// offset of +-1/8 and a 3-bit scale per block of 32 (iq_grid.rs has every grid format's layout).
    IQ1S,
    /// 256 weights in 56 bytes: iq1_s's points with scales per 16 weights and an offset per group.
    IQ1M,
    /// 256 weights in 66 bytes: groups of 8 at 8-bit-indexed points of 8, 25, 43, signed.
    IQ2XXS,
    /// 256 weights in 74 bytes: as iq2_xxs with 9-bit indices and scales per 16 weights.
    IQ2XS,
    /// 256 weights in 82 bytes: as iq2_xs with 10-bit indices and every sign stored.
    IQ2S,
    /// 256 weights in 98 bytes: halves of groups at 8-bit-indexed points of 4 values up to 62.
    IQ3XXS,
    /// 256 weights in 110 bytes: as iq3_xxs with 9-bit indices, every sign stored, odd values.
    IQ3S,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    #[error("{dtype}: {len} bytes are not a whole number of {block_bytes}-byte blocks")]
    PartialBlockBytes { dtype: DType, len: usize, block_bytes: usize },
    #[error("{dtype}: {len} values are not a whole number of {block_elements}-element blocks")]
    PartialBlockValues { dtype: DType, len: usize, block_elements: usize },
    #[error("{dtype}: rows of {cols} values are not a whole number of {block_elements}-element blocks")]
    RowNotWholeBlocks { dtype: DType, cols: usize, block_elements: usize },
    #[error("{len} values are not a whole number of rows of {cols}")]
    PartialRow { len: usize, cols: usize },
    #[error("{dtype}: weights are not encoded into this format here (it needs an importance matrix: llama.cpp's llama-quantize --imatrix writes it); choose one of {}", DType::encodable_choices())]
    NotEncodable { dtype: DType },
}

impl DType {
    pub const ALL: [DType; 22] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q2K,
        DType::Q3K,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
        DType::IQ4NL,
        DType::IQ4XS,
        DType::IQ1S,
        DType::IQ1M,
        DType::IQ2XXS,
        DType::IQ2XS,
        DType::IQ2S,
        DType::IQ3XXS,
        DType::IQ3S,
    ];

    /// The llama.cpp block formats.
    pub fn is_block_format(self) -> bool {
        !matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// The formats whose weights are points of a grid (iq1, iq2, iq3), decoded but not encoded here.
    pub fn is_grid_format(self) -> bool {
        self.grid().is_some()
    }

    /// A grid format's points as the GPU reads them after each part's blocks: 8 bytes a point
    /// (iq3: 4), int8 for iq1.
    pub fn grid(self) -> Option<&'static [u8]> {
        use iq_grid_tables::*;
        Some(match self {
            DType::IQ1S | DType::IQ1M => IQ1S_GRID.as_flattened(),
            DType::IQ2XXS => IQ2XXS_GRID.as_flattened(),
            DType::IQ2XS => IQ2XS_GRID.as_flattened(),
            DType::IQ2S => IQ2S_GRID.as_flattened(),
            DType::IQ3XXS => IQ3XXS_GRID.as_flattened(),
            DType::IQ3S => IQ3S_GRID.as_flattened(),
            _ => return None,
        })
    }

    /// The formats [`DType::from_f32`] writes: all but the grid formats.
    pub fn encodable() -> impl Iterator<Item = DType> {
        DType::ALL.into_iter().filter(|dtype| !dtype.is_grid_format())
    }

    /// The format a re-encoding option (`--quant`, JS `quant`) names: one [`DType::from_f32`] writes.
    pub fn encodable_from_name(name: &str) -> Result<DType, String> {
        match DType::from_name(name) {
            Some(dtype) if dtype.is_grid_format() => Err(QuantError::NotEncodable { dtype }.to_string()),
            Some(dtype) => Ok(dtype),
            None => Err(format!("{name:?} is not a weight format: {}", DType::encodable_choices())),
        }
    }

    /// The encodable formats' names, for an error.
    pub fn encodable_choices() -> String {
        crate::error::quoted_choices(&DType::encodable().map(DType::name).collect::<Vec<_>>())
    }

    /// Every block format, in [`DType::ALL`]'s order.
    pub fn block_formats() -> impl Iterator<Item = DType> {
        DType::ALL.into_iter().filter(|dtype| dtype.is_block_format())
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q5_0 => "q5_0",
            DType::Q5_1 => "q5_1",
            DType::Q8_0 => "q8_0",
            DType::Q2K => "q2_k",
            DType::Q3K => "q3_k",
            DType::Q4K => "q4_k",
            DType::Q5K => "q5_k",
            DType::Q6K => "q6_k",
            DType::IQ4NL => "iq4_nl",
            DType::IQ4XS => "iq4_xs",
            DType::IQ1S => "iq1_s",
            DType::IQ1M => "iq1_m",
            DType::IQ2XXS => "iq2_xxs",
            DType::IQ2XS => "iq2_xs",
            DType::IQ2S => "iq2_s",
            DType::IQ3XXS => "iq3_xxs",
            DType::IQ3S => "iq3_s",
        }
    }

    /// The format named as [`DType::name`] gives it ("q4_0", "f16", ...).
    pub fn from_name(name: &str) -> Option<Self> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Every format's name, for an error: `"f32", "f16", ... or "iq4_xs"`.
    pub fn choices() -> String {
        crate::error::quoted_choices(&Self::ALL.map(DType::name))
    }

    /// Elements per block and bytes per block (a block of one element for plain floats).
    pub fn block(self) -> (usize, usize) {
        match self {
            DType::F32 => (1, 4),
            DType::F16 | DType::BF16 => (1, 2),
            DType::Q4_0 => (32, 18),
            DType::Q4_1 => (32, 20),
            DType::Q5_0 => (32, 22),
            DType::Q5_1 => (32, 24),
            DType::Q8_0 => (32, 34),
            DType::Q2K => (256, 84),
            DType::Q3K => (256, 110),
            DType::Q4K => (256, 144),
            DType::Q5K => (256, 176),
            DType::Q6K => (256, 210),
            DType::IQ4NL => (32, 18),
            DType::IQ4XS => (256, 136),
            DType::IQ1S => (256, 50),
            DType::IQ1M => (256, 56),
            DType::IQ2XXS => (256, 66),
            DType::IQ2XS => (256, 74),
            DType::IQ2S => (256, 82),
            DType::IQ3XXS => (256, 98),
            DType::IQ3S => (256, 110),
        }
    }

    /// Bytes of a row of `cols` elements, or None when `cols` is not a whole number of blocks (or
    /// the bytes pass usize).
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        let (elements, bytes) = self.block();
        cols.is_multiple_of(elements).then(|| (cols / elements).checked_mul(bytes)).flatten()
    }

    /// The value of the `WEIGHT_DTYPE` override constant in the kernels that read this format.
    pub fn shader_code(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
            DType::Q4_0 => 3,
            DType::Q4_1 => 4,
            DType::Q5_0 => 5,
            DType::Q5_1 => 6,
            DType::Q8_0 => 7,
            DType::Q2K => 8,
            DType::Q3K => 9,
            DType::Q4K => 10,
            DType::Q5K => 11,
            DType::Q6K => 12,
            DType::IQ4NL => 13,
            DType::IQ4XS => 14,
            DType::IQ1S => 15,
            DType::IQ1M => 16,
            DType::IQ2XXS => 17,
            DType::IQ2XS => 18,
            DType::IQ2S => 19,
            DType::IQ3XXS => 20,
            DType::IQ3S => 21,
        }
    }

    /// Decodes whole blocks of little-endian data to f32 (the CPU reference for the kernels' weight
    /// loads), bit-exact with ggml's `dequantize_row_*`.
    pub fn to_f32(self, bytes: &[u8]) -> Result<Vec<f32>, QuantError> {
        let (elements, block_bytes) = self.block();
        if !bytes.len().is_multiple_of(block_bytes) {
            return Err(QuantError::PartialBlockBytes { dtype: self, len: bytes.len(), block_bytes });
        }
        let blocks = bytes.chunks_exact(block_bytes);
        Ok(match self {
            DType::F32 => blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            DType::F16 => blocks.map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            DType::BF16 => blocks.map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            _ => {
                let dequantize = match self {
                    DType::Q4_0 => legacy::dequantize_q4_0,
                    DType::Q4_1 => legacy::dequantize_q4_1,
                    DType::Q5_0 => legacy::dequantize_q5_0,
                    DType::Q5_1 => legacy::dequantize_q5_1,
                    DType::Q8_0 => legacy::dequantize_q8_0,
                    DType::Q2K => k_quants::dequantize_q2_k,
                    DType::Q3K => k_quants::dequantize_q3_k,
                    DType::Q4K => k_quants::dequantize_q4_k,
                    DType::Q5K => k_quants::dequantize_q5_k,
                    DType::IQ4NL => iq4::dequantize_iq4_nl,
                    DType::IQ4XS => iq4::dequantize_iq4_xs,
                    DType::IQ1S => iq_grid::dequantize_iq1_s,
                    DType::IQ1M => iq_grid::dequantize_iq1_m,
                    DType::IQ2XXS => iq_grid::dequantize_iq2_xxs,
                    DType::IQ2XS => iq_grid::dequantize_iq2_xs,
                    DType::IQ2S => iq_grid::dequantize_iq2_s,
                    DType::IQ3XXS => iq_grid::dequantize_iq3_xxs,
                    DType::IQ3S => iq_grid::dequantize_iq3_s,
                    _ => k_quants::dequantize_q6_k,
                };
                let mut out = vec![0.0; bytes.len() / block_bytes * elements];
                for (block, values) in blocks.zip(out.chunks_exact_mut(elements)) {
                    dequantize(block, values);
                }
                out
            }
        })
    }

    /// Encodes f32 values in this format: floats round to nearest even; q4_0, q4_1, q5_0, q5_1 and
    /// q8_0 are byte-identical to ggml's `quantize_row_*_ref` (as the `gguf` package computes them),
    /// the K-quants and iq4 formats follow ggml's reference quantizers. `values` must be whole blocks;
    /// the grid formats are refused ([`QuantError::NotEncodable`]).
    pub fn from_f32(self, values: &[f32]) -> Result<Vec<u8>, QuantError> {
        let (elements, block_bytes) = self.block();
        if self.is_grid_format() {
            return Err(QuantError::NotEncodable { dtype: self });
        }
        if !values.len().is_multiple_of(elements) {
            return Err(QuantError::PartialBlockValues { dtype: self, len: values.len(), block_elements: elements });
        }
        Ok(match self {
            DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
            DType::BF16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
            _ => {
                let quantize = match self {
                    DType::Q4_0 => legacy::quantize_q4_0,
                    DType::Q4_1 => legacy::quantize_q4_1,
                    DType::Q5_0 => legacy::quantize_q5_0,
                    DType::Q5_1 => legacy::quantize_q5_1,
                    DType::Q8_0 => legacy::quantize_q8_0,
                    DType::Q2K => k_quants::quantize_q2_k,
                    DType::Q3K => k_quants::quantize_q3_k,
                    DType::Q4K => k_quants::quantize_q4_k,
                    DType::Q5K => k_quants::quantize_q5_k,
                    DType::IQ4NL => iq4::quantize_iq4_nl,
                    DType::IQ4XS => iq4::quantize_iq4_xs,
                    DType::Q6K => k_quants::quantize_q6_k,
                    _ => unreachable!("grid formats are refused above"),
                };
                let encode = move |values: &[f32], out: &mut [u8]| {
                    for (block, bytes) in values.chunks_exact(elements).zip(out.chunks_exact_mut(block_bytes)) {
                        quantize(block, bytes);
                    }
                };
                let mut out = vec![0; values.len() / elements * block_bytes];
                // Blocks are encoded on their own: a large matrix (a load that re-encodes, convert)
                // is cut into a range per core. A browser has one thread here.
                let blocks = values.len() / elements;
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(blocks / MIN_BLOCKS_PER_THREAD).max(1);
                if threads == 1 {
                    encode(values, &mut out);
                } else {
                    let per_thread = blocks.div_ceil(threads);
                    std::thread::scope(|scope| {
                        for (values, out) in values.chunks(per_thread * elements).zip(out.chunks_mut(per_thread * block_bytes)) {
                            scope.spawn(move || encode(values, out));
                        }
                    });
                }
                out
            }
        })
    }
}

/// Blocks below which encoding on another thread costs more than it saves.
const MIN_BLOCKS_PER_THREAD: usize = 512;

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Encodes a row-major (rows, cols) matrix row by row, checking that each row is whole blocks (the
/// layout the kernels and GGUF files use: blocks never straddle rows).
pub fn quantize_rows(dtype: DType, values: &[f32], cols: usize) -> Result<Vec<u8>, QuantError> {
    let (block_elements, _) = dtype.block();
    if cols == 0 || !cols.is_multiple_of(block_elements) {
        return Err(QuantError::RowNotWholeBlocks { dtype, cols, block_elements });
    }
    if !values.len().is_multiple_of(cols) {
        return Err(QuantError::PartialRow { len: values.len(), cols });
    }
    dtype.from_f32(values)
}

/// The f16 at `offset` of a block, as f32.
fn read_f16(block: &[u8], offset: usize) -> f32 {
    f16::from_le_bytes([block[offset], block[offset + 1]]).to_f32()
}

fn write_f16(block: &mut [u8], offset: usize, value: f32) {
    block[offset..offset + 2].copy_from_slice(&f16::from_f32(value).to_le_bytes());
}

/// Below this a group of weights counts as all zeros (ggml's GROUP_MAX_EPS).
const GROUP_MAX_EPS: f32 = 1e-15;

/// The first element of largest magnitude, sign kept, and that magnitude (0 and 0 for all zeros),
/// as ggml's quantizers find them.
fn largest_magnitude(x: &[f32]) -> (f32, f32) {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

/// ggml's `nearest_int`: round half to even (exact for |v| < 2^22, the range ggml asserts).
fn nearest_int(v: f32) -> i32 {
    v.round_ties_even() as i32
}
