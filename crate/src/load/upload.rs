//! The streaming uploader, one path for every source: each file is read from start to end in chunks
//! that are hashed, staged in one of two mappable buffers and copied on the GPU into the buffers of
//! the tensors they hold. Host memory stays at the two staging chunks plus the few tensors
//! rearranged on the host (norm weights, and q/k rows llama.cpp permuted), whatever the model's size.
//! A matrix whose GPU format differs from its file's (a load that quantizes) is re-encoded a
//! chunk's rows at a time on the way.

use std::borrow::Cow;
use std::collections::HashMap;

use futures_channel::oneshot;
use sha2::{Digest, Sha256};

use super::{LoadError, LoadProgress, TensorLocation, WeightStream};
use crate::gpu::{Gpu, GpuError, PartBytes, WeightMatrix};
use crate::quant::{quantize_rows, DType};

/// Bytes read and uploaded at a time.
pub const CHUNK_BYTES: usize = 8 << 20;

/// Where a tensor's bytes go.
pub enum Destination<'a> {
    /// Straight into the matrix's GPU buffers, from the given row on (tensors stacked by rows).
    Matrix(&'a WeightMatrix, usize),
    /// Gathered on the host and handed back (small tensors the caller converts).
    Host,
}

enum Target<'a> {
    /// The next row to place, and the bytes of an incomplete write.
    Gpu { matrix: &'a WeightMatrix, row: usize, carry: Vec<u8> },
    /// Whole on the host: returned, or (q/k rows to put back in order) uploaded when complete:
    /// (matrix, first row, heads).
    Host { bytes: Vec<u8>, then_upload: Option<(&'a WeightMatrix, usize, usize)> },
}

struct Writer<'a> {
    location: &'a TensorLocation,
    target: Target<'a>,
    written: u64,
}

impl Writer<'_> {
    fn len(&self) -> u64 {
        self.location.range.end - self.location.range.start
    }

    fn push<'s>(&mut self, gpu: &Gpu, stage: &mut Stage<'s>, bytes: &[u8]) -> Result<(), crate::Error>
    where
        Self: 's,
    {
        let done = self.written + bytes.len() as u64 == self.len();
        let stored = self.location.dtype;
        match &mut self.target {
            Target::Host { bytes: held, then_upload } => {
                held.extend_from_slice(bytes);
                if let (true, Some((matrix, row, heads))) = (done, then_upload) {
                    let rows = super::gguf::unpermute_rows(held, &self.location.shape, *heads).ok_or_else(|| LoadError::Gguf {
                        file: self.location.name.clone(),
                        offset: self.location.range.start as usize,
                        message: format!("{heads} heads do not split shape {:?} into heads of even size", self.location.shape),
                    })?;
                    matrix.write_rows(gpu, *row, &in_format(matrix, stored, &rows)?);
                    *held = Vec::new();
                }
            }
            Target::Gpu { matrix, row, carry } => {
                // Rows are placed whole, a write's worth at a time (q4_0's are rearranged for the
                // GPU): the bytes of an incomplete one wait in `carry` for the next chunk. Nothing
                // larger is held between chunks.
                let rows_per_write = matrix.write_unit_bytes() / matrix.row_bytes().max(1);
                let unit = (rows_per_write * stored.row_bytes(matrix.cols).unwrap_or_default()).max(1);
                let mut rest = bytes;
                if !carry.is_empty() {
                    let take = (unit - carry.len()).min(rest.len());
                    carry.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    if carry.len() < unit && !done {
                        self.written += bytes.len() as u64;
                        return Ok(());
                    }
                    *row += place(gpu, stage, matrix, &in_format(matrix, stored, carry)?, *row);
                    carry.clear();
                }
                let ready = if done { rest.len() } else { rest.len() / unit * unit };
                *row += place(gpu, stage, matrix, &in_format(matrix, stored, &rest[..ready])?, *row);
                carry.extend_from_slice(&rest[ready..]);
            }
        }
        self.written += bytes.len() as u64;
        Ok(())
    }
}

/// `bytes`, whole rows stored in `stored`, in `matrix`'s format: re-encoded where a load asks for
/// another ([`crate::model::LoadOptions::quant`]), as `convert` re-encodes.
fn in_format<'b>(matrix: &WeightMatrix, stored: DType, bytes: &'b [u8]) -> Result<Cow<'b, [u8]>, crate::Error> {
    if stored == matrix.dtype || bytes.is_empty() {
        return Ok(Cow::Borrowed(bytes));
    }
    Ok(Cow::Owned(quantize_rows(matrix.dtype, &stored.to_f32(bytes)?, matrix.cols)?))
}

/// Stages `bytes`, whole rows of `matrix` from `row` on, for copying into its buffers; returns
/// the rows.
fn place<'s>(gpu: &Gpu, stage: &mut Stage<'s>, matrix: &'s WeightMatrix, bytes: &[u8], row: usize) -> usize {
    matrix.place_rows(row, bytes, |buffer, at, piece| stage.copy(gpu, piece, buffer, at));
    bytes.len() / matrix.row_bytes().max(1)
}

/// Chunk-sized buffers the host fills while the GPU copies out of the other one.
struct StagingRing {
    buffers: [wgpu::Buffer; 2],
    mapped: [Option<oneshot::Receiver<Result<(), wgpu::BufferAsyncError>>>; 2],
    next: usize,
}

/// Staged bytes are at most a chunk, the rows carried into it and a word of padding per piece; the
/// rest is room for them.
const STAGING_BYTES: u64 = CHUNK_BYTES as u64 + (1 << 20);

impl StagingRing {
    fn new(gpu: &Gpu) -> Self {
        let buffer = || {
            gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("weight staging"),
                size: STAGING_BYTES,
                usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: true,
            })
        };
        Self { buffers: [buffer(), buffer()], mapped: [None, None], next: 0 }
    }

    /// The next buffer, once the GPU has copied out of it and it is mapped again.
    async fn take(&mut self, gpu: &Gpu) -> Result<&wgpu::Buffer, GpuError> {
        let slot = self.next;
        self.next = 1 - slot;
        if let Some(mapped) = self.mapped[slot].take() {
            gpu.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| gpu.check().err().unwrap_or(GpuError::DeviceLost(e.to_string())))?;
            let failed = |e: String| gpu.check().err().unwrap_or(GpuError::Readback(e));
            mapped.await.map_err(|e| failed(e.to_string()))?.map_err(|e| failed(e.to_string()))?;
        }
        Ok(&self.buffers[slot])
    }

    /// Maps the buffer just submitted again for writing, once its copies are done.
    fn recycle(&mut self) {
        let slot = 1 - self.next;
        let (sender, receiver) = oneshot::channel();
        self.buffers[slot].slice(..).map_async(wgpu::MapMode::Write, move |result| {
            let _ = sender.send(result);
        });
        self.mapped[slot] = Some(receiver);
    }
}

/// One chunk's bytes in a mapped staging buffer and the copies that place them.
struct Stage<'a> {
    view: wgpu::BufferViewMut,
    used: u64,
    copies: Vec<(&'a wgpu::Buffer, u64, u64, u64)>, // (destination, its offset, staging offset, bytes)
}

impl<'a> Stage<'a> {
    /// Queues `piece` for `destination` at `offset` (a multiple of 4), padded to a whole word.
    fn copy(&mut self, gpu: &Gpu, piece: PartBytes, destination: &'a wgpu::Buffer, offset: u64) {
        let len = piece.len();
        let padded = (len as u64).next_multiple_of(4);
        if self.used + padded > STAGING_BYTES {
            // Cannot happen with CHUNK_BYTES of input; stay correct if it ever does.
            let mut word_aligned = vec![0; padded as usize];
            piece.write_to((&mut word_aligned[..len]).into());
            gpu.queue.write_buffer(destination, offset, &word_aligned);
            return;
        }
        let at = self.used as usize;
        piece.write_to(self.view.slice(at..at + len));
        self.view.slice(at + len..at + padded as usize).fill(0);
        self.copies.push((destination, offset, self.used, padded));
        self.used += padded;
    }
}

/// Streams every file of `source` that holds a tensor of `wanted`, verifying checksums, and returns
/// the tensors wanted on the host. Fails, naming the file and offset, on a short file or a
/// checksum mismatch; the matrices are then half-written and must be dropped.
pub async fn stream_weights(
    gpu: &Gpu,
    source: &dyn WeightStream,
    wanted: &HashMap<String, Destination<'_>>,
    on_progress: &mut dyn FnMut(LoadProgress),
) -> Result<HashMap<String, Vec<u8>>, crate::Error> {
    let mut writers: Vec<Writer> = source
        .locations()
        .iter()
        .filter_map(|location| {
            let target = match (wanted.get(&location.name)?, location.rope_heads) {
                (Destination::Matrix(matrix, row), None) => Target::Gpu { matrix, row: *row, carry: vec![] },
                (Destination::Matrix(matrix, row), Some(heads)) => {
                    Target::Host { bytes: vec![], then_upload: Some((matrix, *row, heads)) }
                }
                (Destination::Host, _) => Target::Host { bytes: vec![], then_upload: None },
            };
            Some(Writer { location, target, written: 0 })
        })
        .collect();
    writers.sort_by_key(|w| (w.location.file, w.location.range.start));
    let bytes_total: u64 = writers.iter().map(Writer::len).sum();
    let mut bytes_done = 0;
    let mut buffer = vec![0u8; CHUNK_BYTES];
    let mut ring = StagingRing::new(gpu);
    for (index, file) in source.files().iter().enumerate() {
        let first = writers.partition_point(|w| w.location.file < index);
        let last = writers.partition_point(|w| w.location.file <= index);
        if first == last {
            continue;
        }
        // A checksum covers the whole file; without one, reading starts at the first tensor.
        let mut position = match file.sha256 {
            Some(_) => 0,
            None => writers[first].location.range.start,
        };
        let mut reader = source.open(index, position).await?;
        let mut hasher = Sha256::new();
        while position < file.size {
            let want = CHUNK_BYTES.min((file.size - position) as usize);
            let n = reader.read(&mut buffer[..want]).await?;
            if n == 0 {
                return Err(LoadError::Truncated {
                    file: file.name.clone(),
                    offset: position as usize,
                    what: "tensor data".into(),
                    needed: file.size - position,
                    available: 0,
                }
                .into());
            }
            let chunk = &buffer[..n];
            hasher.update(chunk);
            let chunk_range = position..position + n as u64;
            let mut current = "";
            // At most two chunks in flight: this buffer's previous copies are done before it refills.
            let staging = ring.take(gpu).await?;
            let mut stage = Stage { view: staging.slice(..).get_mapped_range_mut().map_err(|e| GpuError::Readback(e.to_string()))?, used: 0, copies: vec![] };
            for writer in &mut writers[first..last] {
                let range = &writer.location.range;
                let (start, end) = (range.start.max(chunk_range.start), range.end.min(chunk_range.end));
                if start < end {
                    writer.push(gpu, &mut stage, &chunk[(start - position) as usize..(end - position) as usize])?;
                    bytes_done += end - start;
                    current = &writer.location.name;
                }
            }
            let Stage { view, copies, .. } = stage;
            drop(view);
            staging.unmap();
            let mut encoder = gpu.device.create_command_encoder(&Default::default());
            for (destination, offset, from, bytes) in copies {
                encoder.copy_buffer_to_buffer(staging, from, destination, offset, bytes);
            }
            gpu.queue.submit([encoder.finish()]);
            ring.recycle();
            position += n as u64;
            on_progress(LoadProgress { tensor: current, bytes_done, bytes_total });
        }
        if let Some(expected) = file.sha256 {
            let actual: [u8; 32] = hasher.finalize().into();
            if actual != expected {
                return Err(LoadError::Checksum { file: file.name.clone(), expected: hex(&expected), actual: hex(&actual) }.into());
            }
        }
    }
    Ok(writers
        .into_iter()
        .filter_map(|w| match w.target {
            Target::Host { bytes, then_upload: None } => Some((w.location.name.clone(), bytes)),
            _ => None,
        })
        .collect())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
