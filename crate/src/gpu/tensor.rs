//! Weight matrices on the GPU, split by rows over as many buffers as the binding limit requires.

use super::{Gpu, GpuError};
use crate::quant::DType;

/// A (rows, cols) weight matrix. Each part is one buffer of whole rows, no larger than the device's
/// `max_storage_buffer_binding_size`, so kernels bind a part at a time. A grid format's part holds
/// the format's grid after its rows (from the first word past them: [`WeightPart::rows_bytes`]), so
/// that its kernels read the grid through the weights' binding and need no binding more.
#[derive(Debug)]
pub struct WeightMatrix {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub parts: Vec<WeightPart>,
}

#[derive(Debug)]
pub struct WeightPart {
    pub buffer: wgpu::Buffer,
    pub row_start: usize,
    pub rows: usize,
    /// Bytes of the buffer its rows take, to a whole word (a grid follows them).
    pub rows_bytes: u64,
}

impl WeightMatrix {
    /// Allocates the parts; fill them with [`WeightMatrix::write_rows`] or [`WeightMatrix::place_rows`].
    pub fn new(gpu: &Gpu, label: &str, dtype: DType, rows: usize, cols: usize) -> Result<Self, GpuError> {
        Self::in_parts_of(gpu, label, dtype, rows, cols, 2)
    }

    /// [`WeightMatrix::new`] with each part but the last a multiple of `part_rows` rows (even):
    /// whole heads, for a projection whose output is rotated head by head.
    pub fn in_parts_of(gpu: &Gpu, label: &str, dtype: DType, rows: usize, cols: usize, part_rows: usize) -> Result<Self, GpuError> {
        debug_assert!(part_rows.is_multiple_of(2));
        // Kernels read elements in pairs and rows of whole blocks; every format's row is then an even
        // number of bytes, so an even number of rows fills whole u32 words.
        let row_bytes = match dtype.row_bytes(cols) {
            Some(bytes) if cols.is_multiple_of(2) => bytes as u64,
            _ => return Err(GpuError::RowLayout { tensor: label.to_string(), cols, dtype }),
        };
        let max_part = gpu.max_binding();
        let grid = dtype.grid().unwrap_or_default();
        let fitting_rows = (max_part.saturating_sub(grid.len() as u64) / row_bytes.max(1)) as usize;
        let rows_per_part = if fitting_rows >= rows { rows.max(1) } else { fitting_rows / part_rows * part_rows };
        if rows_per_part == 0 {
            return Err(GpuError::Limit {
                adapter: gpu.info.name.clone(),
                name: "max_storage_buffer_binding_size",
                needed: row_bytes * part_rows as u64 + grid.len() as u64,
                available: max_part,
            });
        }
        let parts = (0..rows)
            .step_by(rows_per_part)
            .map(|row_start| {
                let part_rows = rows_per_part.min(rows - row_start);
                let rows_bytes = (part_rows as u64 * row_bytes).next_multiple_of(4);
                let buffer = gpu.storage_buffer(label, rows_bytes + grid.len() as u64);
                if !grid.is_empty() {
                    gpu.queue.write_buffer(&buffer, rows_bytes, grid);
                }
                WeightPart { buffer, row_start, rows: part_rows, rows_bytes }
            })
            .collect();
        Ok(Self { dtype, rows, cols, parts })
    }

    /// Bytes of a row, in the file and (rearranged for q4_0, q5_0, q8_0, iq4_nl, q3_k, q6_k and the grid formats) in a part.
    pub fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.cols).unwrap_or_default()
    }

    /// Rows a write places at a time: one, or two where a row is not a whole number of 4-byte
    /// words, so that every write starts on a word.
    fn rows_per_write(&self) -> usize {
        if self.row_bytes().is_multiple_of(4) {
            1
        } else {
            2
        }
    }

    /// Bytes of rows from `first_row` on to hand [`WeightMatrix::place_rows`] at a time: whole
    /// writes of [`WeightMatrix::rows_per_write`] rows.
    pub fn write_unit_bytes(&self) -> usize {
        self.row_bytes() * self.rows_per_write()
    }

    /// Where `bytes`, whole rows from `first_row` on in the file's layout, land in the parts as
    /// they hold them (the file's layout, but the formats' with a scale apart rearranged: [`PartBytes`]):
    /// `place(buffer, offset, piece)` for each contiguous piece, the offset a multiple of 4 when
    /// `first_row` starts a write ([`WeightMatrix::rows_per_write`]). The caller writes a piece
    /// where it wants it ([`PartBytes::write_to`]), so rearranging takes no memory of its own.
    pub fn place_rows<'a>(&'a self, first_row: usize, bytes: &[u8], mut place: impl FnMut(&'a wgpu::Buffer, u64, PartBytes<'_>)) {
        let row_bytes = self.row_bytes();
        debug_assert!(bytes.len().is_multiple_of(row_bytes.max(1)), "{} bytes are not whole rows", bytes.len());
        let rows = first_row..first_row + bytes.len() / row_bytes.max(1);
        for part in &self.parts {
            let (start, end) = (rows.start.max(part.row_start), rows.end.min(part.row_start + part.rows));
            if start >= end {
                continue;
            }
            let file_rows = &bytes[(start - first_row) * row_bytes..(end - first_row) * row_bytes];
            let local = (start - part.row_start) as u64;
            if let Some(scale_at) = scale_offset(self.dtype) {
                let (elements, block_bytes) = self.dtype.block();
                let blocks = (self.cols / elements) as u64;
                let quant_bytes = (block_bytes - 2) as u64;
                let apart = ScalesApart { rows: file_rows, block_bytes, scale_at };
                place(&part.buffer, quant_bytes * blocks * local, PartBytes::Quants(apart));
                place(&part.buffer, quant_bytes * blocks * part.rows as u64 + 2 * blocks * local, PartBytes::Scales(apart));
            } else {
                place(&part.buffer, row_bytes as u64 * local, PartBytes::Same(file_rows));
            }
        }
    }

    /// Writes `bytes`, whole rows from `first_row` on in the file's layout, through the queue.
    pub fn write_rows(&self, gpu: &Gpu, first_row: usize, bytes: &[u8]) {
        self.place_rows(first_row, bytes, |buffer, offset, piece| {
            // Only a part's last row of an odd number ends mid-word; part buffers are padded.
            let mut word_aligned = vec![0u8; piece.len().next_multiple_of(4)];
            piece.write_to((&mut word_aligned[..piece.len()]).into());
            gpu.queue.write_buffer(buffer, offset, &word_aligned);
        });
    }
}

/// Whole rows of blocks whose 2-byte scale at `scale_at` a part holds apart: every block without
/// its scale (16, 20, 32, 108 or 208 bytes, a whole number of words), then the blocks' scales in the same
/// order (lib/weights.wgsl reads this). A quant word is then one aligned load; in the file's blocks
/// every other block starts off a word, and a word there takes two loads.
#[derive(Clone, Copy)]
pub struct ScalesApart<'b> {
    rows: &'b [u8],
    block_bytes: usize,
    scale_at: usize,
}

/// A contiguous piece of a part's bytes.
pub enum PartBytes<'b> {
    /// File rows as they are.
    Same(&'b [u8]),
    /// The blocks' quants of rows whose scales go apart.
    Quants(ScalesApart<'b>),
    /// Their scales.
    Scales(ScalesApart<'b>),
}

impl PartBytes<'_> {
    pub fn len(&self) -> usize {
        match self {
            PartBytes::Same(bytes) => bytes.len(),
            PartBytes::Quants(apart) => apart.rows.len() / apart.block_bytes * (apart.block_bytes - 2),
            PartBytes::Scales(apart) => apart.rows.len() / apart.block_bytes * 2,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the piece into `out` (a mapped staging range, or host memory), which is
    /// [`PartBytes::len`] bytes long.
    pub fn write_to(&self, mut out: wgpu::WriteOnly<[u8]>) {
        match self {
            PartBytes::Same(bytes) => out.copy_from_slice(bytes),
            PartBytes::Quants(ScalesApart { rows, block_bytes, scale_at }) => {
                let quant_bytes = block_bytes - 2;
                for (i, block) in rows.chunks_exact(*block_bytes).enumerate() {
                    let mut quants = out.slice(i * quant_bytes..(i + 1) * quant_bytes);
                    quants.slice(..*scale_at).copy_from_slice(&block[..*scale_at]);
                    quants.slice(*scale_at..).copy_from_slice(&block[scale_at + 2..]);
                }
            }
            PartBytes::Scales(ScalesApart { rows, block_bytes, scale_at }) => {
                for (i, block) in rows.chunks_exact(*block_bytes).enumerate() {
                    out.slice(2 * i..2 * i + 2).copy_from_slice(&block[*scale_at..scale_at + 2]);
                }
            }
        }
    }
}

/// Where the f16 scale d lies in a block of the formats whose blocks would leave every other
/// block's quants off a word (q4_0's and iq4_nl's 18 bytes, q5_0's 22, q8_0's 34, q3_k's 110, q6_k's 210, the grid formats' but iq1_m's), which a part holds with
/// the scales apart ([`ScalesApart`]).
fn scale_offset(dtype: DType) -> Option<usize> {
    match dtype {
        DType::Q4_0 | DType::Q5_0 | DType::Q8_0 | DType::IQ4NL => Some(0),
        // 50, 66, 74, 82, 98 and 110 bytes, d first: 48 to 108 without it.
        DType::IQ1S | DType::IQ2XXS | DType::IQ2XS | DType::IQ2S | DType::IQ3XXS | DType::IQ3S => Some(0),
        DType::Q3K => Some(108),
        DType::Q6K => Some(208),
        _ => None,
    }
}

