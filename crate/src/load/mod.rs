//! Weight sources: where tensor bytes come from before they are uploaded.

mod gguf;
pub mod manifest;
mod safetensors;
mod upload;
#[cfg(not(target_arch = "wasm32"))]
mod file;

pub use self::gguf::{Gguf, GgufHeader, GgufTensor, MetadataValue};
pub use self::safetensors::{index_shards, Safetensors};
#[cfg(not(target_arch = "wasm32"))]
pub use file::{open_safetensors_dir, read_hf_config, read_hf_text, ShardDir};
#[cfg(not(target_arch = "wasm32"))]
mod convert;
#[cfg(not(target_arch = "wasm32"))]
pub use convert::{convert, ConvertReport};
#[cfg(not(target_arch = "wasm32"))]
mod native_model;
#[cfg(not(target_arch = "wasm32"))]
pub use native_model::{open_model, ModelFiles, ModelWeights};
#[cfg(target_arch = "wasm32")]
mod web;
#[cfg(target_arch = "wasm32")]
pub use web::{resolve_reference, WebModel, CACHE_NAME};
#[cfg(target_arch = "wasm32")]
pub(crate) use web::sleep;

use std::borrow::Cow;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;

pub(crate) use upload::{stream_weights, Destination};

use crate::quant::DType;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    // The I/O error in the message, not as a source(): a chain printed whole would say it twice.
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{file}: malformed safetensors header: {message}")]
    Header { file: String, message: String },
    #[error("{file}: the header describes {expected} bytes but the file has {actual} (truncated or corrupt)")]
    FileSize { file: String, expected: usize, actual: usize },
    #[error("{file}: tensor {tensor} has unsupported dtype {dtype}")]
    UnsupportedDType { file: String, tensor: String, dtype: String },
    #[error("tensor {0} is missing from the checkpoint")]
    MissingTensor(String),
    #[error("manifest.json: {0}")]
    Manifest(String),
    #[error("model.safetensors.index.json: {0}")]
    Index(String),
    #[error("{file}: not a GGUF file (starts with {magic:02x?}, expected \"GGUF\")")]
    GgufMagic { file: String, magic: Vec<u8> },
    #[error("{file}: GGUF version {version} is not supported (only 2 and 3, little-endian)")]
    GgufVersion { file: String, version: u32 },
    #[error("{file}: truncated at offset {offset} while reading {what}: needs {needed} bytes, {available} remain")]
    Truncated { file: String, offset: usize, what: String, needed: u64, available: usize },
    #[error("{file}: malformed GGUF at offset {offset}: {message}")]
    Gguf { file: String, offset: usize, message: String },
    #[error("{file}: tensor {tensor} (at offset {offset}) has ggml type {type_id} ({type_name}), not supported (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_NL, IQ4_XS: a Q4_K_M, Q5_K_M, Q6_K or Q8_0 file of the model loads)")]
    UnknownGgmlType { file: String, tensor: String, offset: usize, type_id: u32, type_name: &'static str },
    #[error("{file}: tensor {tensor} occupies bytes {start}..{end} but the file has {file_size} (truncated or corrupt)")]
    TensorOutOfBounds { file: String, tensor: String, start: u64, end: u64, file_size: usize },
    #[error("{file}: sha256 is {actual}, the manifest expects {expected} (corrupt or wrong file)")]
    Checksum { file: String, expected: String, actual: String },
    #[error("{file} changed on the server while part of it was cached (ETag {was:?}, now {now:?}): its cached parts were dropped, so loading it again starts afresh")]
    Changed { file: String, was: String, now: String },
    #[error("{file}: metadata {key}: {message}")]
    Metadata { file: String, key: String, message: String },
}

impl LoadError {
    /// An I/O error's mapping (for `map_err`) that names `path`.
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn io(path: &std::path::Path) -> impl Fn(std::io::Error) -> LoadError + Copy + '_ {
        move |error| LoadError::Io { path: path.display().to_string(), error }
    }
}

/// A tensor's bytes as stored: little-endian, row-major, quantized blocks along rows. Borrowed from
/// the source when they can be, owned when the source had to rearrange them (GGUF's q/k rows).
#[derive(Debug)]
pub struct TensorData<'a> {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Cow<'a, [u8]>,
}

/// Anything that can hand out tensors by their checkpoint name.
pub trait WeightSource {
    fn tensor(&self, name: &str) -> Result<TensorData<'_>, LoadError>;
    fn contains(&self, name: &str) -> bool;
}

/// A file of a checkpoint, as the loader streams it.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceFile {
    pub name: String,
    pub size: u64,
    /// Checked while streaming when known (shard manifests carry one per shard).
    pub sha256: Option<[u8; 32]>,
}

/// Where a tensor's bytes lie: Hugging Face name, format, row-major shape, file and byte range.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorLocation {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub file: usize,
    pub range: Range<u64>,
    /// Heads whose rows llama.cpp's converter permuted for its RoPE; undone on upload.
    pub rope_heads: Option<usize>,
}

/// A future of the loaders, boxed so sources can be trait objects on every host.
pub type LoadFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, LoadError>> + 'a>>;

/// Sequential reads of one file.
pub trait ChunkReader {
    /// Fills as much of `buf` as the file has left; 0 at its end.
    fn read<'a>(&'a mut self, buf: &'a mut [u8]) -> LoadFuture<'a, usize>;
}

/// A checkpoint the loader streams file by file, chunk by chunk, into GPU buffers.
pub trait WeightStream {
    fn files(&self) -> &[SourceFile];
    fn locations(&self) -> &[TensorLocation];
    /// Opens file `index` for reading from byte `from` (0 when the whole file is checksummed; past
    /// the header otherwise, so remote sources fetch only tensor data).
    fn open(&self, index: usize, from: u64) -> LoadFuture<'_, Box<dyn ChunkReader + '_>>;
}

/// Bytes a source streams from: in memory, or memory-mapped.
pub trait Storage: AsRef<[u8]> {
    /// The loader is done with these bytes (a memory map hands their pages back to the page cache,
    /// so streaming a file does not grow the process by its size).
    fn release(&self, _range: Range<usize>) {}
}

impl Storage for Vec<u8> {}
impl Storage for &[u8] {}

#[cfg(not(target_arch = "wasm32"))]
impl Storage for memmap2::Mmap {
    fn release(&self, range: Range<usize>) {
        // SAFETY: the map is read-only; dropped pages are read from the file again if touched.
        let _ = unsafe { self.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len()) };
    }
}

/// Reads a [`Storage`] from a position on, releasing what it has read.
pub struct SliceReader<'a, S: ?Sized> {
    storage: &'a S,
    position: usize,
}

impl<'a, S: Storage + ?Sized> SliceReader<'a, S> {
    pub fn new(storage: &'a S, from: u64) -> Self {
        Self { storage, position: (from as usize).min(storage.as_ref().len()) }
    }
}

impl<S: Storage + ?Sized> ChunkReader for SliceReader<'_, S> {
    fn read<'a>(&'a mut self, buf: &'a mut [u8]) -> LoadFuture<'a, usize> {
        let bytes = self.storage.as_ref();
        let n = buf.len().min(bytes.len() - self.position);
        buf[..n].copy_from_slice(&bytes[self.position..self.position + n]);
        self.storage.release(self.position..self.position + n);
        self.position += n;
        Box::pin(std::future::ready(Ok(n)))
    }
}

/// How far a load has come: weight bytes uploaded of the total, and the tensor being uploaded.
#[derive(Clone, Copy, Debug)]
pub struct LoadProgress<'a> {
    pub tensor: &'a str,
    pub bytes_done: u64,
    pub bytes_total: u64,
}
