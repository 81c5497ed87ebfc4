//! The shard format for the web: `manifest.json` (configuration, tokenizer file, chat template,
//! shard list with sizes and sha256, tensor table) beside shard files of whole tensors and
//! `tokenizer.json`. Shards are fetched and checked one by one; each tensor lies in one shard.

use serde::{Deserialize, Serialize};

use super::{LoadError, SourceFile, TensorLocation};
use crate::model::SamplingDefaults;
use crate::quant::DType;
use crate::text::{ChatTemplate, SpecialTokens, TextError};
use crate::Config;

/// The `format` of the manifests this version writes and reads.
pub const FORMAT: &str = "llama-webgpu-shards/1";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    /// A Hugging Face `config.json`.
    pub config: serde_json::Value,
    /// The tokenizer's file name beside the manifest.
    pub tokenizer: String,
    /// The chat template's source; absent means Llama 3.1's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// The texts the template reads as `bos_token` and `eos_token`; absent, those of the
    /// configuration's ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token: Option<String>,
    /// The sampling the model's files recommend, as `generation_config.json` gives it.
    #[serde(default, skip_serializing_if = "SamplingDefaults::is_empty")]
    pub sampling_defaults: SamplingDefaults,
    pub shards: Vec<Shard>,
    pub tensors: Vec<ShardTensor>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Shard {
    pub file: String,
    pub bytes: u64,
    /// Lowercase hex.
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub shard: usize,
    pub offset: u64,
    pub bytes: u64,
}

impl Manifest {
    /// The chat template, reading the manifest's special tokens.
    pub fn template(&self) -> Result<ChatTemplate, TextError> {
        let template = match &self.chat_template {
            Some(source) => ChatTemplate::new(source)?,
            None => ChatTemplate::llama31(),
        };
        Ok(template.with_special_tokens(SpecialTokens { bos: self.bos_token.clone(), eos: self.eos_token.clone() }))
    }

    /// Parses and checks a manifest: known format and dtypes, plain shard names, every tensor
    /// inside its shard and of the size its shape and dtype give.
    pub fn parse(json: &str) -> Result<Self, LoadError> {
        let bad = |message: String| LoadError::Manifest(message);
        let manifest: Manifest = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        if manifest.format != FORMAT {
            return Err(bad(format!("format {:?} is not {FORMAT:?}", manifest.format)));
        }
        for shard in &manifest.shards {
            if !is_plain_file_name(&shard.file) {
                return Err(bad(format!("shard name {:?} must be a plain file name", shard.file)));
            }
            if shard.sha256.len() != 64 || !shard.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!("shard {}: sha256 {:?} is not 64 hex digits", shard.file, shard.sha256)));
            }
        }
        if !is_plain_file_name(&manifest.tokenizer) {
            return Err(bad(format!("tokenizer name {:?} must be a plain file name", manifest.tokenizer)));
        }
        for t in &manifest.tensors {
            let dtype = DType::from_name(&t.dtype).ok_or_else(|| bad(format!("tensor {}: unknown dtype {:?}", t.name, t.dtype)))?;
            let shard = manifest.shards.get(t.shard).ok_or_else(|| bad(format!("tensor {}: no shard {}", t.name, t.shard)))?;
            if t.offset.checked_add(t.bytes).is_none_or(|end| end > shard.bytes) {
                return Err(bad(format!("tensor {} lies outside shard {} of {} bytes", t.name, shard.file, shard.bytes)));
            }
            // Checked: a forged shape's product must not wrap around to the stated size.
            let cols = t.shape.last().copied().unwrap_or(1);
            let rows = t.shape.iter().rev().skip(1).try_fold(1usize, |rows, &d| rows.checked_mul(d));
            let size = rows.zip(dtype.row_bytes(cols)).and_then(|(rows, row_bytes)| row_bytes.checked_mul(rows));
            if size.map(|b| b as u64) != Some(t.bytes) {
                return Err(bad(format!("tensor {}: {} bytes do not hold shape {:?} in {}", t.name, t.bytes, t.shape, t.dtype)));
            }
        }
        Ok(manifest)
    }

    pub fn model_config(&self) -> Result<Config, crate::Error> {
        let generation = serde_json::to_string(&self.sampling_defaults).map_err(|e| LoadError::Manifest(e.to_string()))?;
        Ok(Config::from_hf_json(&self.config.to_string(), Some(&generation))?)
    }

    pub fn files(&self) -> Vec<SourceFile> {
        self.shards
            .iter()
            .map(|s| SourceFile { name: s.file.clone(), size: s.bytes, sha256: Some(parse_hex(&s.sha256)) })
            .collect()
    }

    /// `parse` checked every dtype.
    pub fn locations(&self) -> Vec<TensorLocation> {
        self.tensors
            .iter()
            .filter_map(|t| {
                Some(TensorLocation {
                    name: t.name.clone(),
                    dtype: DType::from_name(&t.dtype)?,
                    shape: t.shape.clone(),
                    file: t.shard,
                    range: t.offset..t.offset + t.bytes,
                    rope_heads: None,
                })
            })
            .collect()
    }
}

fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\\']) && !name.starts_with('.')
}

fn parse_hex(hex: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0);
    }
    out
}
