//! Safetensors checkpoints, single-file or sharded, over any byte storage (a memory map natively).

use std::borrow::Cow;
use std::collections::HashMap;

use super::{ChunkReader, LoadError, LoadFuture, SliceReader, SourceFile, Storage, TensorData, TensorLocation, WeightSource, WeightStream};
use crate::quant::DType;

/// One or several safetensors files with their tensor tables read and checked.
pub struct Safetensors<B> {
    files: Vec<(String, B)>,
    /// name -> (file index, dtype, shape, byte range within the file)
    tensors: HashMap<String, (usize, DType, Vec<usize>, std::ops::Range<usize>)>,
    stream_files: Vec<SourceFile>,
    locations: Vec<TensorLocation>,
}

impl<B: AsRef<[u8]>> Safetensors<B> {
    /// Reads the header of each (file name, bytes) and checks that every tensor lies within its file.
    pub fn new(files: Vec<(String, B)>) -> Result<Self, LoadError> {
        let mut tensors = HashMap::new();
        for (index, (file, bytes)) in files.iter().enumerate() {
            let bytes = bytes.as_ref();
            let header = |message: String| LoadError::Header { file: file.clone(), message };
            let (header_len, metadata) = ::safetensors::SafeTensors::read_metadata(bytes).map_err(|e| match e {
                ::safetensors::SafeTensorError::MetadataIncompleteBuffer => match claimed_size(bytes) {
                    Some(expected) => LoadError::FileSize { file: file.clone(), expected, actual: bytes.len() },
                    None => header(e.to_string()),
                },
                e => header(e.to_string()),
            })?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let dtype = match info.dtype {
                    ::safetensors::Dtype::F32 => DType::F32,
                    ::safetensors::Dtype::F16 => DType::F16,
                    ::safetensors::Dtype::BF16 => DType::BF16,
                    other => {
                        return Err(LoadError::UnsupportedDType {
                            file: file.clone(),
                            tensor: name,
                            dtype: format!("{other:?}"),
                        })
                    }
                };
                // read_metadata has checked the offsets against the shapes and the file size.
                let (start, end) = info.data_offsets;
                tensors.insert(name, (index, dtype, info.shape.clone(), data_start + start..data_start + end));
            }
        }
        let stream_files = files
            .iter()
            .map(|(name, bytes)| SourceFile { name: name.clone(), size: bytes.as_ref().len() as u64, sha256: None })
            .collect();
        let mut locations: Vec<TensorLocation> = tensors
            .iter()
            .map(|(name, (file, dtype, shape, range))| TensorLocation {
                name: name.clone(),
                dtype: *dtype,
                shape: shape.clone(),
                file: *file,
                range: range.start as u64..range.end as u64,
                rope_heads: None,
            })
            .collect();
        locations.sort_by_key(|l| (l.file, l.range.start));
        Ok(Self { files, tensors, stream_files, locations })
    }
}

impl<B: Storage> WeightStream for Safetensors<B> {
    fn files(&self) -> &[SourceFile] {
        &self.stream_files
    }

    fn locations(&self) -> &[TensorLocation] {
        &self.locations
    }

    fn open(&self, index: usize, from: u64) -> LoadFuture<'_, Box<dyn ChunkReader + '_>> {
        let reader: Box<dyn ChunkReader + '_> = Box::new(SliceReader::new(&self.files[index].1, from));
        Box::pin(std::future::ready(Ok(reader)))
    }
}

impl<B: AsRef<[u8]>> WeightSource for Safetensors<B> {
    fn tensor(&self, name: &str) -> Result<TensorData<'_>, LoadError> {
        let (file, dtype, shape, range) =
            self.tensors.get(name).ok_or_else(|| LoadError::MissingTensor(name.to_string()))?;
        Ok(TensorData { dtype: *dtype, shape: shape.clone(), bytes: Cow::Borrowed(&self.files[*file].1.as_ref()[range.clone()]) })
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// The file size a header describes (header plus the end of its last tensor), read leniently to
/// explain a size mismatch.
fn claimed_size(bytes: &[u8]) -> Option<usize> {
    let header_len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: HashMap<String, serde_json::Value> = serde_json::from_slice(bytes.get(8..8 + header_len)?).ok()?;
    let data_end = header.values().filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64()).max().unwrap_or(0);
    Some(8 + header_len + data_end as usize)
}

/// The shard file names listed by a `model.safetensors.index.json`, in first-use order.
pub fn index_shards(index_json: &str) -> Result<Vec<String>, LoadError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let index: Index = serde_json::from_str(index_json).map_err(|e| LoadError::Index(e.to_string()))?;
    let mut shards: Vec<String> = index.weight_map.into_values().collect();
    shards.sort();
    shards.dedup();
    if let Some(bad) = shards.iter().find(|s| s.contains('/') || s.contains('\\') || s.starts_with('.')) {
        return Err(LoadError::Index(format!("shard name {bad:?} must be a plain file name")));
    }
    Ok(shards)
}
