//! Opening a model by its path on this machine, for every native host (CLI, server, tests): a
//! Hugging Face folder or a GGUF file, memory-mapped.

use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::{open_safetensors_dir, ShardDir, read_hf_config, read_hf_text, Gguf, LoadError, Safetensors, WeightSource, WeightStream};
use crate::engine::EngineError;
use crate::text::{ChatTemplate, Tokenizer};
use crate::Config;

/// A model's configuration and weights, opened; its tokenizer and chat template are read on
/// demand ([`ModelFiles::text`]), so a folder without a tokenizer still runs token-id prompts.
pub struct ModelFiles {
    pub path: PathBuf,
    pub config: Config,
    pub weights: ModelWeights,
}

/// Where the tensors come from.
pub enum ModelWeights {
    /// `model.safetensors`, or the shards of `model.safetensors.index.json`.
    Safetensors(Safetensors<Mmap>),
    /// A GGUF file, which also holds the configuration, tokenizer and chat template.
    Gguf(Gguf<Mmap>),
    /// Our shard format: manifest.json, shards, tokenizer.json.
    Shards(ShardDir),
}

/// Opens `path`: a directory is a shard folder when it has a manifest.json, else a Hugging Face
/// model folder (config.json, optional generation_config.json, safetensors weights); a file is a
/// GGUF file.
pub fn open_model(path: &Path) -> Result<ModelFiles, crate::Error> {
    let metadata = std::fs::metadata(path).map_err(LoadError::io(path))?;
    let (config, weights) = if metadata.is_dir() && path.join("manifest.json").exists() {
        let shards = ShardDir::open(path)?;
        (shards.manifest.model_config()?, ModelWeights::Shards(shards))
    } else if metadata.is_dir() {
        (read_hf_config(path)?, ModelWeights::Safetensors(open_safetensors_dir(path)?))
    } else {
        let gguf = Gguf::open(path)?;
        (gguf.config()?, ModelWeights::Gguf(gguf))
    };
    Ok(ModelFiles { path: path.to_path_buf(), config, weights })
}

impl ModelFiles {
    /// The weights as [`crate::Llama::load`] streams them to the GPU.
    pub fn stream(&self) -> &(dyn WeightStream + Send + Sync) {
        match &self.weights {
            ModelWeights::Safetensors(source) => source,
            ModelWeights::Gguf(source) => source,
            ModelWeights::Shards(source) => source,
        }
    }

    /// The tensors one by one, under Hugging Face names.
    pub fn weights(&self) -> &(dyn WeightSource + Send + Sync) {
        match &self.weights {
            ModelWeights::Safetensors(source) => source,
            ModelWeights::Gguf(source) => source,
            ModelWeights::Shards(source) => source,
        }
    }

    /// The tokenizer and chat template: a folder's tokenizer.json and its tokenizer_config.json
    /// or chat_template.jinja template, or a GGUF file's `tokenizer.*` metadata. Either falls back
    /// to Llama 3.1's template when the model has none.
    pub fn text(&self) -> Result<(Tokenizer, ChatTemplate), crate::Error> {
        match &self.weights {
            ModelWeights::Safetensors(_) => read_hf_text(&self.path),
            ModelWeights::Shards(shards) => shards.text(),
            ModelWeights::Gguf(gguf) => {
                let header = gguf.header();
                let tokenizer = Tokenizer::from_gguf(header).map_err(EngineError::from)?;
                let template = ChatTemplate::from_gguf(header).map_err(EngineError::from)?;
                Ok((tokenizer, template))
            }
        }
    }
}
