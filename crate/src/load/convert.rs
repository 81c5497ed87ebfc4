//! The converter: any model this engine opens (Hugging Face folder, GGUF file) to the shard format,
//! re-encoding matrices tensor by tensor, a block of rows at a time, so memory stays at about one
//! block of f32 rows plus what is being written.

use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::manifest::{Manifest, Shard, ShardTensor, FORMAT};
use super::upload::hex;
use super::{open_model, LoadError, LoadProgress};
use crate::model::{checkpoint_tensors, CheckpointTensor};
use crate::quant::DType;

/// Tensors start on this alignment within a shard.
const ALIGN: u64 = 64;
/// Rows re-encoded at a time hold at most this many f32 bytes.
const ROW_BLOCK_BYTES: usize = 16 << 20;

#[derive(Clone, Debug, PartialEq)]
pub struct ConvertReport {
    pub shards: usize,
    pub tensors: usize,
    pub bytes: u64,
}

/// Converts the model at `source` into the folder `out`, which must not exist or be empty:
/// matrices in `quant`, norm weights in f32, shards of at most `shard_bytes` (a larger tensor gets a
/// shard of its own). Everything is written into a folder beside `out` that takes its name only
/// when complete, so an interrupted convert never leaves a folder that looks whole.
pub fn convert(
    source: &Path,
    quant: DType,
    shard_bytes: u64,
    out: &Path,
    on_progress: &mut dyn FnMut(LoadProgress),
) -> Result<ConvertReport, crate::Error> {
    if std::fs::read_dir(out).is_ok_and(|mut entries| entries.next().is_some()) {
        let not_empty = std::io::Error::new(std::io::ErrorKind::AlreadyExists, "the output folder is not empty: remove it or choose another");
        return Err(LoadError::io(out)(not_empty).into());
    }
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let partial = out.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(LoadError::io(&partial))?;
    }
    let report = convert_into(source, quant, shard_bytes, &partial, on_progress);
    if report.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
        return report;
    }
    if out.exists() {
        // Empty (checked above): remove_dir takes nothing else.
        std::fs::remove_dir(out).map_err(LoadError::io(out))?;
    }
    std::fs::rename(&partial, out).map_err(LoadError::io(out))?;
    report
}

fn convert_into(
    source: &Path,
    quant: DType,
    shard_bytes: u64,
    out: &Path,
    on_progress: &mut dyn FnMut(LoadProgress),
) -> Result<ConvertReport, crate::Error> {
    let model = open_model(source)?;
    let (tokenizer, template) = model.text()?;
    let weights = model.weights();
    let config = &model.config;
    std::fs::create_dir_all(out).map_err(LoadError::io(out))?;
    let tensors = checkpoint_tensors(config, config.tie_word_embeddings && !weights.contains("lm_head.weight"));
    let bytes_total = tensors.iter().map(|t| weights.tensor(&t.name).map(|t| t.bytes.len() as u64)).sum::<Result<u64, _>>()?;
    let mut writer = ShardWriter::new(out, shard_bytes);
    let mut bytes_done = 0;
    for CheckpointTensor { name, shape, is_norm } in &tensors {
        let tensor = weights.tensor(name)?;
        if &tensor.shape != shape {
            return Err(crate::model::ModelError::Shape { tensor: name.clone(), expected: shape.clone(), got: tensor.shape }.into());
        }
        let target = if *is_norm { DType::F32 } else { quant };
        let cols = *shape.last().unwrap_or(&1);
        let (row_bytes, target_row_bytes) = match (tensor.dtype.row_bytes(cols), target.row_bytes(cols)) {
            (Some(a), Some(b)) => (a, b),
            _ => return Err(crate::gpu::GpuError::RowLayout { tensor: name.clone(), cols, dtype: target }.into()),
        };
        let rows = tensor.bytes.len() / row_bytes;
        writer.begin(name, target, shape, (rows * target_row_bytes) as u64)?;
        if tensor.dtype == target {
            writer.write(&tensor.bytes)?;
        } else {
            let rows_per_block = (ROW_BLOCK_BYTES / (cols * 4)).max(1);
            for block in tensor.bytes.chunks(rows_per_block * row_bytes) {
                let values = tensor.dtype.to_f32(block)?;
                writer.write(&crate::quant::quantize_rows(target, &values, cols)?)?;
            }
        }
        bytes_done += tensor.bytes.len() as u64;
        on_progress(LoadProgress { tensor: name, bytes_done, bytes_total });
    }
    let (shards, written) = writer.finish()?;
    let tokenizer_path = out.join("tokenizer.json");
    std::fs::write(&tokenizer_path, tokenizer.to_json().map_err(crate::engine::EngineError::from)?).map_err(LoadError::io(&tokenizer_path))?;
    let manifest = Manifest {
        format: FORMAT.to_string(),
        config: config.to_hf_json(),
        tokenizer: "tokenizer.json".into(),
        chat_template: Some(template.source().to_string()),
        bos_token: template.special_tokens().bos.clone(),
        eos_token: template.special_tokens().eos.clone(),
        sampling_defaults: config.sampling_defaults.clone(),
        shards,
        tensors: written,
    };
    let manifest_path = out.join("manifest.json");
    let json = serde_json::to_string_pretty(&manifest).map_err(|e| LoadError::Manifest(e.to_string()))?;
    std::fs::write(&manifest_path, json).map_err(LoadError::io(&manifest_path))?;
    Ok(ConvertReport {
        shards: manifest.shards.len(),
        tensors: manifest.tensors.len(),
        bytes: manifest.shards.iter().map(|s| s.bytes).sum(),
    })
}

/// Writes tensors into numbered shard files, hashing as it goes.
struct ShardWriter<'a> {
    dir: &'a Path,
    shard_bytes: u64,
    open: Option<(std::io::BufWriter<std::fs::File>, Sha256, u64)>,
    shards: Vec<Shard>,
    tensors: Vec<ShardTensor>,
}

impl<'a> ShardWriter<'a> {
    fn new(dir: &'a Path, shard_bytes: u64) -> Self {
        Self { dir, shard_bytes, open: None, shards: vec![], tensors: vec![] }
    }

    fn io(&self, source: std::io::Error) -> LoadError {
        let file = self.shards.len().saturating_sub(1);
        LoadError::io(&self.dir.join(shard_name(file)))(source)
    }

    /// Starts a tensor of `bytes`, in a new shard when the current one would overflow.
    fn begin(&mut self, name: &str, dtype: DType, shape: &[usize], bytes: u64) -> Result<(), LoadError> {
        let used = self.open.as_ref().map(|(_, _, used)| used.next_multiple_of(ALIGN));
        let offset = match used {
            Some(used) if used + bytes <= self.shard_bytes || used == 0 => {
                self.pad_to(used)?;
                used
            }
            _ => {
                self.close()?;
                let path = self.dir.join(shard_name(self.shards.len()));
                let file = std::fs::File::create(&path).map_err(LoadError::io(&path))?;
                self.shards.push(Shard { file: shard_name(self.shards.len()), bytes: 0, sha256: String::new() });
                self.open = Some((std::io::BufWriter::new(file), Sha256::new(), 0));
                0
            }
        };
        let shard = self.shards.len() - 1;
        self.tensors.push(ShardTensor { name: name.to_string(), dtype: dtype.name().to_string(), shape: shape.to_vec(), shard, offset, bytes });
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), LoadError> {
        let result = match &mut self.open {
            Some((file, hasher, used)) => {
                hasher.update(bytes);
                *used += bytes.len() as u64;
                file.write_all(bytes)
            }
            None => Ok(()),
        };
        result.map_err(|e| self.io(e))
    }

    fn pad_to(&mut self, offset: u64) -> Result<(), LoadError> {
        let used = self.open.as_ref().map_or(offset, |(_, _, used)| *used);
        self.write(&vec![0u8; (offset - used) as usize])
    }

    fn close(&mut self) -> Result<(), LoadError> {
        if let Some((mut file, hasher, used)) = self.open.take() {
            file.flush().map_err(|e| self.io(e))?;
            let shard = self.shards.last_mut().expect("an open shard is listed");
            shard.bytes = used;
            shard.sha256 = hex(&hasher.finalize());
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(Vec<Shard>, Vec<ShardTensor>), LoadError> {
        self.close()?;
        Ok((self.shards, self.tensors))
    }
}

fn shard_name(index: usize) -> String {
    format!("shard-{index:05}.bin")
}
