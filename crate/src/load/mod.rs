//! Weight sources: where tensor bytes come from before they are uploaded.

mod gguf;
mod safetensors;
#[cfg(not(target_arch = "wasm32"))]
mod file;

pub use self::gguf::{Gguf, GgufHeader, GgufTensor, MetadataValue};
pub use self::safetensors::{index_shards, Safetensors};
#[cfg(not(target_arch = "wasm32"))]
pub use file::{open_safetensors_dir, read_hf_config, read_hf_text};

use std::borrow::Cow;

use crate::quant::DType;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{file}: malformed safetensors header: {message}")]
    Header { file: String, message: String },
    #[error("{file}: the header describes {expected} bytes but the file has {actual} (truncated or corrupt)")]
    FileSize { file: String, expected: usize, actual: usize },
    #[error("{file}: tensor {tensor} has unsupported dtype {dtype}")]
    UnsupportedDType { file: String, tensor: String, dtype: String },
    #[error("tensor {0} is missing from the checkpoint")]
    MissingTensor(String),
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
    #[error("{file}: tensor {tensor} (at offset {offset}) has ggml type {type_id} ({type_name}), not supported (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K)")]
    UnknownGgmlType { file: String, tensor: String, offset: usize, type_id: u32, type_name: &'static str },
    #[error("{file}: tensor {tensor} occupies bytes {start}..{end} but the file has {file_size} (truncated or corrupt)")]
    TensorOutOfBounds { file: String, tensor: String, start: u64, end: u64, file_size: usize },
    #[error("{file}: metadata {key}: {message}")]
    Metadata { file: String, key: String, message: String },
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
