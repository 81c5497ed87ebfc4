//! Weight matrices on the GPU, split by rows over as many buffers as the binding limit requires.

use super::{Gpu, GpuError};
use crate::quant::DType;

/// A (rows, cols) weight matrix. Each part is one buffer of whole rows, no larger than the device's
/// `max_storage_buffer_binding_size`, so kernels bind a part at a time.
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
}

impl WeightMatrix {
    /// Allocates the parts; fill them with [`WeightMatrix::write_rows`].
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
        let fitting_rows = (max_part / row_bytes.max(1)) as usize;
        let rows_per_part = if fitting_rows >= rows { rows.max(1) } else { fitting_rows / part_rows * part_rows };
        if rows_per_part == 0 {
            return Err(GpuError::Limit {
                adapter: gpu.info.name.clone(),
                name: "max_storage_buffer_binding_size",
                needed: row_bytes * part_rows as u64,
                available: max_part,
            });
        }
        let parts = (0..rows)
            .step_by(rows_per_part)
            .map(|row_start| {
                let part_rows = rows_per_part.min(rows - row_start);
                let buffer = gpu.storage_buffer(label, part_rows as u64 * row_bytes);
                WeightPart { buffer, row_start, rows: part_rows }
            })
            .collect();
        Ok(Self { dtype, rows, cols, parts })
    }

    pub fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.cols).unwrap_or_default()
    }

    /// Where `row` starts in the row-major matrix.
    pub fn byte_offset(&self, row: usize) -> u64 {
        (row * self.row_bytes()) as u64
    }

    /// Where `len` bytes at byte `offset` of the row-major matrix land: (part buffer, offset in
    /// it, range of the bytes). Parts start on even rows of an even number of bytes, so a piece
    /// starts on a 4-byte word when `offset` does; it can end mid-word only where a part of an odd
    /// number of rows ends, and part buffers are padded to the word.
    pub fn pieces(&self, offset: u64, len: usize) -> impl Iterator<Item = (&wgpu::Buffer, u64, std::ops::Range<usize>)> {
        let row_bytes = self.row_bytes() as u64;
        let end = offset + len as u64;
        self.parts.iter().filter_map(move |part| {
            let part_start = part.row_start as u64 * row_bytes;
            let part_end = part_start + part.rows as u64 * row_bytes;
            let (start, stop) = (offset.max(part_start), end.min(part_end));
            (start < stop).then(|| (&part.buffer, start - part_start, (start - offset) as usize..(stop - offset) as usize))
        })
    }

    /// Writes `bytes` at byte `offset` of the matrix through the queue. `offset` is a multiple of 4,
    /// and so is the length unless the bytes end the matrix.
    pub fn write_bytes(&self, gpu: &Gpu, offset: u64, bytes: &[u8]) {
        for (buffer, at, range) in self.pieces(offset, bytes.len()) {
            let chunk = &bytes[range];
            let aligned = chunk.len() / 4 * 4;
            if aligned > 0 {
                gpu.queue.write_buffer(buffer, at, &chunk[..aligned]);
            }
            if aligned < chunk.len() {
                let mut tail = [0u8; 4];
                tail[..chunk.len() - aligned].copy_from_slice(&chunk[aligned..]);
                gpu.queue.write_buffer(buffer, at + aligned as u64, &tail);
            }
        }
    }
}
