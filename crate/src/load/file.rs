//! Native weight files, memory-mapped so tensors are read straight from the page cache.

use std::path::Path;

use super::safetensors::index_shards;
use super::{LoadError, Safetensors};

/// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`, in `dir`.
pub fn open_safetensors_dir(dir: &Path) -> Result<Safetensors<memmap2::Mmap>, LoadError> {
    let index = dir.join("model.safetensors.index.json");
    let names = if index.exists() {
        index_shards(&read_to_string(&index)?)?
    } else {
        vec!["model.safetensors".to_string()]
    };
    let files = names
        .into_iter()
        .map(|name| {
            let path = dir.join(&name);
            let io = LoadError::io(&path);
            let file = std::fs::File::open(&path).map_err(io)?;
            // SAFETY: the map is read-only; a checkpoint changed underneath a running engine is not supported.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
            Ok((name, map))
        })
        .collect::<Result<_, LoadError>>()?;
    Safetensors::new(files)
}

fn read_to_string(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(LoadError::io(path))
}

/// Reads `config.json` and, when present, `generation_config.json` from a Hugging Face model folder.
pub fn read_hf_config(dir: &Path) -> Result<crate::Config, crate::Error> {
    let config = read_to_string(&dir.join("config.json"))?;
    let generation_path = dir.join("generation_config.json");
    let generation = if generation_path.exists() { Some(read_to_string(&generation_path)?) } else { None };
    Ok(crate::Config::from_hf_json(&config, generation.as_deref())?)
}

/// The tokenizer (`tokenizer.json`) and chat template of a Hugging Face model folder: the
/// `chat_template` of `tokenizer_config.json` or `chat_template.jinja` when present, else Llama
/// 3.1's, reading tokenizer_config.json's `bos_token` and `eos_token` as transformers does.
pub fn read_hf_text(dir: &Path) -> Result<(crate::text::Tokenizer, crate::text::ChatTemplate), crate::Error> {
    use crate::engine::EngineError;
    use crate::text::{ChatTemplate, Tokenizer};
    let path = dir.join("tokenizer.json");
    let json = std::fs::read(&path).map_err(LoadError::io(&path))?;
    let tokenizer = Tokenizer::from_json_bytes(&json).map_err(EngineError::from)?;
    let config_path = dir.join("tokenizer_config.json");
    let tokenizer_config: Option<serde_json::Value> = match config_path.exists() {
        true => serde_json::from_str(&read_to_string(&config_path)?).ok(),
        false => None,
    };
    let jinja = dir.join("chat_template.jinja");
    let source = match &tokenizer_config {
        _ if jinja.exists() => Some(read_to_string(&jinja)?),
        Some(config) => chat_template_of(config),
        None => None,
    };
    let template = match source {
        Some(source) => ChatTemplate::new(&source).map_err(EngineError::from)?,
        None => ChatTemplate::llama31(),
    };
    let special_tokens = tokenizer_config.as_ref().map(special_tokens_of).unwrap_or_default();
    Ok((tokenizer, template.with_special_tokens(special_tokens)))
}

/// `bos_token` and `eos_token` of a tokenizer_config.json: a string, or an added token's object
/// (`{"content": ...}`).
fn special_tokens_of(tokenizer_config: &serde_json::Value) -> crate::text::SpecialTokens {
    let text_of = |name: &str| match tokenizer_config.get(name)? {
        serde_json::Value::String(text) => Some(text.clone()),
        token => token.get("content")?.as_str().map(str::to_string),
    };
    crate::text::SpecialTokens { bos: text_of("bos_token"), eos: text_of("eos_token") }
}

/// `chat_template` of a tokenizer_config.json: a string, or a list of named templates ("default").
fn chat_template_of(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(template) => Some(template.clone()),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

/// A folder of our shard format: `manifest.json`, the shards it lists, `tokenizer.json`.
pub struct ShardDir {
    pub dir: std::path::PathBuf,
    pub manifest: super::manifest::Manifest,
    files: Vec<super::SourceFile>,
    locations: Vec<super::TensorLocation>,
}

impl ShardDir {
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        let manifest = super::manifest::Manifest::parse(&read_to_string(&dir.join("manifest.json"))?)?;
        let (files, locations) = (manifest.files(), manifest.locations());
        Ok(Self { dir: dir.to_path_buf(), manifest, files, locations })
    }

    pub fn text(&self) -> Result<(crate::text::Tokenizer, crate::text::ChatTemplate), crate::Error> {
        use crate::engine::EngineError;
        let path = self.dir.join(&self.manifest.tokenizer);
        let json = std::fs::read(&path).map_err(LoadError::io(&path))?;
        let tokenizer = crate::text::Tokenizer::from_json_bytes(&json).map_err(EngineError::from)?;
        let template = self.manifest.template().map_err(EngineError::from)?;
        Ok((tokenizer, template))
    }
}

impl super::WeightStream for ShardDir {
    fn files(&self) -> &[super::SourceFile] {
        &self.files
    }

    fn locations(&self) -> &[super::TensorLocation] {
        &self.locations
    }

    fn open(&self, index: usize, from: u64) -> super::LoadFuture<'_, Box<dyn super::ChunkReader + '_>> {
        use std::io::Seek;
        let path = self.dir.join(&self.files[index].name);
        Box::pin(async move {
            let io = LoadError::io(&path);
            let mut file = std::fs::File::open(&path).map_err(io)?;
            file.seek(std::io::SeekFrom::Start(from)).map_err(io)?;
            Ok(Box::new(FileReader { file, path }) as Box<dyn super::ChunkReader>)
        })
    }
}

/// Reads a tensor's bytes from its shard, for tools that need whole tensors (the converter).
impl super::WeightSource for ShardDir {
    fn tensor(&self, name: &str) -> Result<super::TensorData<'_>, LoadError> {
        use std::io::{Read, Seek};
        let location = self.locations.iter().find(|l| l.name == name).ok_or_else(|| LoadError::MissingTensor(name.to_string()))?;
        let path = self.dir.join(&self.files[location.file].name);
        let io = LoadError::io(&path);
        let mut file = std::fs::File::open(&path).map_err(io)?;
        file.seek(std::io::SeekFrom::Start(location.range.start)).map_err(io)?;
        let mut bytes = vec![0u8; (location.range.end - location.range.start) as usize];
        file.read_exact(&mut bytes).map_err(io)?;
        Ok(super::TensorData { dtype: location.dtype, shape: location.shape.clone(), bytes: std::borrow::Cow::Owned(bytes) })
    }

    fn contains(&self, name: &str) -> bool {
        self.locations.iter().any(|l| l.name == name)
    }
}

/// Plain reads of a file: its pages go through the page cache, never into this process.
struct FileReader {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl super::ChunkReader for FileReader {
    fn read<'a>(&'a mut self, buf: &'a mut [u8]) -> super::LoadFuture<'a, usize> {
        use std::io::Read;
        let mut filled = 0;
        let result = loop {
            match self.file.read(&mut buf[filled..]) {
                Ok(0) => break Ok(filled),
                Ok(n) => {
                    filled += n;
                    if filled == buf.len() {
                        break Ok(filled);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => break Err(LoadError::io(&self.path)(error)),
            }
        };
        Box::pin(std::future::ready(result))
    }
}
