//! Weight sources: where tensor bytes come from before they are uploaded.

mod safetensors;
#[cfg(not(target_arch = "wasm32"))]
mod file;

pub use self::safetensors::{index_shards, Safetensors};
#[cfg(not(target_arch = "wasm32"))]
pub use file::{open_safetensors_dir, read_hf_config};

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
}

/// A tensor's bytes as stored: little-endian, row-major.
#[derive(Debug)]
pub struct TensorData<'a> {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

/// Anything that can hand out tensors by their checkpoint name.
pub trait WeightSource {
    fn tensor(&self, name: &str) -> Result<TensorData<'_>, LoadError>;
    fn contains(&self, name: &str) -> bool;
}
