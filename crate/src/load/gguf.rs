//! GGUF files (llama.cpp's format, versions 2 and 3, little-endian) over any byte storage: the
//! metadata, the tensor table, and a [`WeightSource`] that serves llama.cpp's tensors under Hugging
//! Face names and in Hugging Face's layout, so the Llama loader reads a GGUF file unchanged.
//!
//! Layout: "GGUF", u32 version, u64 tensor count, u64 metadata count, the metadata (string key, u32
//! type, value), the tensor infos (string name, u32 dims, u64 dims innermost first, u32 ggml type,
//! u64 offset), then the tensor data from the next multiple of `general.alignment` (default 32).
//! Strings are a u64 length and UTF-8 bytes; arrays a u32 element type, a u64 count and the elements.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;

use super::{ChunkReader, LoadError, LoadFuture, SliceReader, SourceFile, Storage, TensorData, TensorLocation, WeightSource, WeightStream};
use crate::model::{Config, ModelError, Rope, RopeScaling, SamplingDefaults};
use crate::quant::DType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;
/// Deeper arrays of arrays are refused: a corrupt file could otherwise exhaust the stack.
const MAX_ARRAY_DEPTH: usize = 8;

/// One metadata value. Arrays may nest and hold any type, including strings.
#[derive(Clone, Debug, PartialEq)]
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetadataValue>),
}

impl MetadataValue {
    /// GGUF's name for the value's type.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetadataValue::U8(_) => "uint8",
            MetadataValue::I8(_) => "int8",
            MetadataValue::U16(_) => "uint16",
            MetadataValue::I16(_) => "int16",
            MetadataValue::U32(_) => "uint32",
            MetadataValue::I32(_) => "int32",
            MetadataValue::U64(_) => "uint64",
            MetadataValue::I64(_) => "int64",
            MetadataValue::F32(_) => "float32",
            MetadataValue::F64(_) => "float64",
            MetadataValue::Bool(_) => "bool",
            MetadataValue::String(_) => "string",
            MetadataValue::Array(_) => "array",
        }
    }

    /// Any integer type, when the value is non-negative (writers differ on which type a count gets).
    /// The type and, for scalars, the value, for error messages.
    fn describe(&self) -> String {
        match self {
            MetadataValue::Array(items) => format!("an array of {}", items.len()),
            MetadataValue::String(s) => format!("a string of {} bytes", s.len()),
            scalar => format!("{scalar:?}"),
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetadataValue::U8(v) => Some(v.into()),
            MetadataValue::U16(v) => Some(v.into()),
            MetadataValue::U32(v) => Some(v.into()),
            MetadataValue::U64(v) => Some(v),
            MetadataValue::I8(v) => u64::try_from(v).ok(),
            MetadataValue::I16(v) => u64::try_from(v).ok(),
            MetadataValue::I32(v) => u64::try_from(v).ok(),
            MetadataValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// float32, or float64 rounded to f32.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            MetadataValue::F32(v) => Some(v),
            MetadataValue::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetadataValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            MetadataValue::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensor {
    /// llama.cpp's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    pub dtype: DType,
    /// Row-major, outermost first ([rows, cols] for a matrix), like Hugging Face shapes; the file
    /// lists dimensions innermost first.
    pub shape: Vec<usize>,
    /// Absolute byte range in the file (u64: a header read on wasm32 may describe a larger file).
    pub range: Range<u64>,
}

/// Everything before the tensor data: version, metadata and tensor table.
#[derive(Clone, Debug)]
pub struct GgufHeader {
    file: String,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, MetadataValue)>,
    keys: HashMap<String, usize>,
    tensors: Vec<GgufTensor>,
    names: HashMap<String, usize>,
}

impl GgufHeader {
    /// Parses the header of `file` from `bytes`, which need hold only the header (a prefix of the
    /// file is enough); tensor ranges are not checked against `bytes`.
    pub fn parse(file: &str, bytes: &[u8]) -> Result<Self, LoadError> {
        let head = &bytes[..bytes.len().min(4)];
        if !MAGIC.starts_with(head) || head.is_empty() {
            return Err(LoadError::GgufMagic { file: file.to_string(), magic: head.to_vec() });
        }
        let mut r = Reader { file, bytes, pos: 0 };
        r.take(4, "the magic")?;
        let version = r.u32("the version")?;
        if version != 2 && version != 3 {
            return Err(LoadError::GgufVersion { file: file.to_string(), version });
        }
        let tensor_count = r.u64("the tensor count")?;
        let kv_count = r.u64("the metadata count")?;

        // Each key-value pair takes at least 13 bytes (empty key, type, one-byte value).
        r.check_count(kv_count, 13, "the metadata")?;
        let mut metadata = Vec::new();
        let mut keys = HashMap::new();
        for _ in 0..kv_count {
            let at = r.pos;
            let key = r.string("a metadata key")?;
            let value_type = r.u32(&key)?;
            let value = r.value(value_type, &key, 0)?;
            if keys.insert(key.clone(), metadata.len()).is_some() {
                return Err(r.malformed(at, format!("metadata key {key} appears twice")));
            }
            metadata.push((key, value));
        }
        let mut header = GgufHeader {
            file: file.to_string(),
            version,
            alignment: DEFAULT_ALIGNMENT,
            data_offset: 0,
            metadata,
            keys,
            tensors: Vec::new(),
            names: HashMap::new(),
        };
        if let Some(alignment) = header.get("general.alignment") {
            header.alignment = match alignment {
                MetadataValue::U32(a) if a.is_power_of_two() => u64::from(*a),
                other => return Err(header.metadata_error("general.alignment", format!("{other:?} is not a power of two (uint32)"))),
            };
        }

        // Each tensor info takes at least 32 bytes (empty name, one dimension, type, offset).
        r.check_count(tensor_count, 32, "the tensor infos")?;
        let mut infos = Vec::new();
        for _ in 0..tensor_count {
            let at = r.pos;
            let name = r.string("a tensor name")?;
            let n_dims = r.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.malformed(at, format!("tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")));
            }
            let dims = (0..n_dims).map(|_| r.u64(&name)).collect::<Result<Vec<_>, _>>()?;
            let type_id = r.u32(&name)?;
            let offset = r.u64(&name)?;
            infos.push((at, name, dims, type_id, offset));
        }
        header.data_offset = (r.pos as u64).next_multiple_of(header.alignment);

        for (at, name, dims, type_id, offset) in infos {
            let dtype = ggml_dtype(type_id).ok_or_else(|| LoadError::UnknownGgmlType {
                file: file.to_string(),
                tensor: name.clone(),
                offset: at,
                type_id,
                type_name: ggml_type_name(type_id),
            })?;
            let malformed = |message: String| r.malformed(at, format!("tensor {name}: {message}"));
            let (block_elements, block_bytes) = dtype.block();
            if !dims[0].is_multiple_of(block_elements as u64) {
                return Err(malformed(format!("rows of {} elements are not whole {dtype} blocks of {block_elements}", dims[0])));
            }
            let size = std::iter::once(dims[0] / block_elements as u64)
                .chain(dims[1..].iter().copied())
                .try_fold(block_bytes as u64, u64::checked_mul)
                .ok_or_else(|| malformed(format!("dimensions {dims:?} overflow")))?;
            if !offset.is_multiple_of(header.alignment) {
                return Err(malformed(format!("data offset {offset} is not a multiple of the alignment {}", header.alignment)));
            }
            let start = header.data_offset.checked_add(offset).ok_or_else(|| malformed(format!("data offset {offset} overflows")))?;
            let end = start.checked_add(size).ok_or_else(|| malformed(format!("data offset {offset} overflows")))?;
            let shape = dims
                .iter()
                .rev()
                .map(|&d| usize::try_from(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| malformed(format!("dimensions {dims:?} do not fit this machine's usize")))?;
            if header.names.insert(name.clone(), header.tensors.len()).is_some() {
                return Err(malformed("the name appears twice".into()));
            }
            header.tensors.push(GgufTensor { name, dtype, shape, range: start..end });
        }
        Ok(header)
    }

    pub fn file(&self) -> &str {
        &self.file
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// `general.alignment`, or 32.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Where the tensor data starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Every key and value, in file order.
    pub fn metadata(&self) -> &[(String, MetadataValue)] {
        &self.metadata
    }

    /// The tensor table, in file order.
    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }

    /// A tensor by its llama.cpp name.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.names.get(name).map(|&i| &self.tensors[i])
    }

    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.keys.get(key).map(|&i| &self.metadata[i].1)
    }

    /// The string at `key`: None when absent, an error when it holds another type.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>, LoadError> {
        self.typed(key, "a string", MetadataValue::as_str)
    }

    /// The integer at `key` (any integer type whose value fits a u32).
    pub fn get_u32(&self, key: &str) -> Result<Option<u32>, LoadError> {
        self.typed(key, "an integer that fits a uint32", |v| v.as_u64().and_then(|v| u32::try_from(v).ok()))
    }

    /// The float at `key` (float32, or float64 rounded).
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>, LoadError> {
        self.typed(key, "a float", MetadataValue::as_f32)
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, LoadError> {
        self.typed(key, "a bool", MetadataValue::as_bool)
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&[MetadataValue]>, LoadError> {
        self.typed(key, "an array", MetadataValue::as_array)
    }

    /// An array of strings, e.g. `tokenizer.ggml.tokens` or `tokenizer.ggml.merges`.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>, LoadError> {
        let Some(items) = self.get_array(key)? else { return Ok(None) };
        let strings = items.iter().map(MetadataValue::as_str).collect::<Option<Vec<_>>>();
        strings.map(Some).ok_or_else(|| self.metadata_error(key, "is not an array of strings".into()))
    }

    fn typed<'a, T>(&'a self, key: &str, expected: &str, read: impl Fn(&'a MetadataValue) -> Option<T>) -> Result<Option<T>, LoadError> {
        let Some(value) = self.get(key) else { return Ok(None) };
        read(value).map(Some).ok_or_else(|| self.metadata_error(key, format!("is {}, expected {expected}", value.describe())))
    }

    fn required<T>(&self, key: &str, value: Result<Option<T>, LoadError>) -> Result<T, LoadError> {
        value?.ok_or_else(|| self.metadata_error(key, "is missing".into()))
    }

    fn metadata_error(&self, key: &str, message: String) -> LoadError {
        LoadError::Metadata { file: self.file.clone(), key: key.to_string(), message }
    }
}

impl GgufHeader {
    /// Every tensor under its Hugging Face name (as [`WeightSource`] serves it), for streaming.
    pub fn hf_locations(&self) -> Result<Vec<TensorLocation>, LoadError> {
        let hf_names: HashMap<String, String> = hf_names(self).into_iter().map(|(hf, gguf)| (gguf, hf)).collect();
        self
            .tensors
            .iter()
            .map(|t| {
                let name = hf_names.get(&t.name).cloned().unwrap_or_else(|| t.name.clone());
                let rope_heads = match gguf_name(&name).1 {
                    Some(tensor) => Some(self.rope_heads(tensor)?.1),
                    None => None,
                };
                Ok(TensorLocation { name, dtype: t.dtype, shape: t.shape.clone(), file: 0, range: t.range.clone(), rope_heads })
            })
            .collect()
    }


    /// The model configuration from the `llama.*` and `tokenizer.ggml.*` metadata.
    ///
    /// llama.cpp keeps llama3 RoPE scaling (or any other per-frequency scaling) only as the
    /// `rope_freqs.weight` tensor: per frequency, the factor it is divided by. The config keeps
    /// those factors as given, so every file llama.cpp runs gets llama.cpp's frequencies here.
    /// `rope_freqs` holds the bytes of that tensor, where the file has one.
    pub fn config(&self, rope_freqs: Option<&[u8]>) -> Result<Config, crate::Error> {
        let h = self;
        let architecture = h.required("general.architecture", h.get_str("general.architecture"))?;
        if architecture != "llama" {
            return Err(ModelError::Unsupported(format!("GGUF architecture {architecture:?} (only \"llama\")")).into());
        }
        let count = |key: &str| h.required(key, h.get_u32(key)).map(|v| v as usize);
        let optional_count = |key: &str| h.get_u32(key).map(|v| v.map(|v| v as usize));
        let hidden_size = count("llama.embedding_length")?;
        let n_heads = count("llama.attention.head_count")?;
        let head_dim = optional_count("llama.attention.key_length")?.unwrap_or(hidden_size / n_heads.max(1));
        for key in ["llama.attention.value_length", "llama.rope.dimension_count"] {
            if let Some(dims) = optional_count(key)? {
                if dims != head_dim {
                    return Err(ModelError::Unsupported(format!("{key} {dims} differs from the head dimension {head_dim}")).into());
                }
            }
        }
        if let Some(kind) = h.get_str("llama.rope.scaling.type")? {
            if kind != "none" {
                return Err(ModelError::Unsupported(format!("llama.rope.scaling.type {kind:?} (llama3 scaling comes as rope_freqs)")).into());
            }
        }
        let vocab_size = match h.tensor("token_embd.weight") {
            Some(embedding) => embedding.shape[0],
            None => match h.get_array("tokenizer.ggml.tokens")? {
                Some(tokens) => tokens.len(),
                None => count("llama.vocab_size")?,
            },
        };
        let token = |key: &str| h.get_u32(key);
        let mut eos_token_ids = Vec::new();
        // Chat models end a turn with eot (Llama 3's <|eot_id|>) or eom, not only eos.
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(id) = token(key)? {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        let mut config = Config {
            hidden_size,
            intermediate_size: count("llama.feed_forward_length")?,
            n_layers: count("llama.block_count")?,
            n_heads,
            n_kv_heads: optional_count("llama.attention.head_count_kv")?.unwrap_or(n_heads),
            head_dim,
            vocab_size,
            max_position_embeddings: count("llama.context_length")?,
            rms_norm_eps: h.required("llama.attention.layer_norm_rms_epsilon", h.get_f32("llama.attention.layer_norm_rms_epsilon"))?,
            rope: Rope { theta: h.get_f32("llama.rope.freq_base")?.unwrap_or(10000.0), scaling: None },
            tie_word_embeddings: h.tensor("output.weight").is_none(),
            // Raw prompts start with BOS unless the tokenizer says it adds none (SmolLM2).
            bos_token_id: match h.get_bool("tokenizer.ggml.add_bos_token")? {
                Some(false) => None,
                _ => token("tokenizer.ggml.bos_token_id")?,
            },
            eos_token_ids,
            // As llama.cpp's converter writes generation_config.json's (top_k 0 or less: none).
            sampling_defaults: SamplingDefaults {
                temperature: h.get_f32("general.sampling.temp")?,
                top_p: h.get_f32("general.sampling.top_p")?,
                top_k: h.get("general.sampling.top_k").and_then(MetadataValue::as_u64).filter(|&k| k > 0).map(|k| k.min(u32::MAX.into()) as u32),
                min_p: h.get_f32("general.sampling.min_p")?,
                repetition_penalty: h.get_f32("general.sampling.penalty_repeat")?,
            },
        };
        config.rope.scaling = self.frequency_factors(head_dim, rope_freqs)?;
        config.validate()?;
        Ok(config)
    }

    /// The RoPE scaling of `rope_freqs.weight`, if any (see [`GgufHeader::config`]).
    fn frequency_factors(&self, head_dim: usize, rope_freqs: Option<&[u8]>) -> Result<Option<RopeScaling>, crate::Error> {
        const NAME: &str = "rope_freqs.weight";
        let Some(info) = self.tensor(NAME) else { return Ok(None) };
        let pairs = head_dim / 2;
        if info.shape != [pairs] {
            return Err(ModelError::Shape { tensor: NAME.into(), expected: vec![pairs], got: info.shape.clone() }.into());
        }
        let factors = info.dtype.to_f32(rope_freqs.unwrap_or_default())?;
        Ok((!factors.iter().all(|&f| f == 1.0)).then_some(RopeScaling::Factors(factors)))
    }

    /// The metadata key and count of the heads the rows of q or k are grouped in.
    fn rope_heads(&self, tensor: RopeTensor) -> Result<(String, usize), LoadError> {
        let h = self;
        let architecture = h.required("general.architecture", h.get_str("general.architecture"))?;
        let heads = format!("{architecture}.attention.head_count");
        let n_heads = h.required(&heads, h.get_u32(&heads))?;
        Ok(match tensor {
            RopeTensor::Query => (heads, n_heads as usize),
            RopeTensor::Key => {
                let kv_heads = format!("{heads}_kv");
                let n_kv_heads = h.get_u32(&kv_heads)?.unwrap_or(n_heads);
                (kv_heads, n_kv_heads as usize)
            }
        })
    }
}

/// A GGUF file: its header, checked against the bytes, and the bytes.
pub struct Gguf<B> {
    header: GgufHeader,
    bytes: B,
    stream_file: [SourceFile; 1],
    locations: Vec<TensorLocation>,
}

impl<B: AsRef<[u8]>> Gguf<B> {
    /// Reads the header of `file` and checks that every tensor lies within `bytes`.
    pub fn new(file: &str, bytes: B) -> Result<Self, LoadError> {
        let header = GgufHeader::parse(file, bytes.as_ref())?;
        let file_size = bytes.as_ref().len();
        if let Some(t) = header.tensors.iter().find(|t| t.range.end > file_size as u64) {
            return Err(LoadError::TensorOutOfBounds {
                file: file.to_string(),
                tensor: t.name.clone(),
                start: t.range.start,
                end: t.range.end,
                file_size,
            });
        }
        let stream_file = [SourceFile { name: file.to_string(), size: file_size as u64, sha256: None }];
        let mut gguf = Self { header, bytes, stream_file, locations: vec![] };
        gguf.locations = gguf.header.hf_locations()?;
        Ok(gguf)
    }


    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    /// The model configuration (see [`GgufHeader::config`]).
    pub fn config(&self) -> Result<Config, crate::Error> {
        self.header.config(self.tensor_bytes("rope_freqs.weight"))
    }

    /// A tensor's bytes as stored, by its llama.cpp name.
    pub fn tensor_bytes(&self, name: &str) -> Option<&[u8]> {
        let t = self.header.tensor(name)?;
        // `new` checked the range against the bytes.
        self.bytes.as_ref().get(t.range.start as usize..t.range.end as usize)
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl Gguf<memmap2::Mmap> {
    /// Memory-maps a GGUF file.
    pub fn open(path: &std::path::Path) -> Result<Self, LoadError> {
        let io = LoadError::io(path);
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a file changed underneath a running engine is not supported.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        Self::new(&name, map)
    }
}

/// Serves Hugging Face names (`model.layers.{i}.self_attn.q_proj.weight`, ...) from llama.cpp's
/// (`blk.{i}.attn_q.weight`, ...), with q and k rows back in Hugging Face's order. Other names are
/// looked up as llama.cpp names, as stored.
impl<B: AsRef<[u8]>> WeightSource for Gguf<B> {
    fn tensor(&self, name: &str) -> Result<TensorData<'_>, LoadError> {
        let (gguf_name, rope) = gguf_name(name);
        let missing = || LoadError::MissingTensor(if gguf_name == name { name.to_string() } else { format!("{name} ({gguf_name})") });
        let info = self.header.tensor(&gguf_name).ok_or_else(missing)?;
        let bytes = self.tensor_bytes(&gguf_name).ok_or_else(missing)?;
        let bytes = match rope {
            None => Cow::Borrowed(bytes),
            Some(tensor) => {
                let (key, n_heads) = self.header.rope_heads(tensor)?;
                Cow::Owned(unpermute_rows(bytes, &info.shape, n_heads).ok_or_else(|| {
                    let message = format!("{n_heads} heads do not split tensor {gguf_name} of shape {:?} into heads of even size", info.shape);
                    self.header.metadata_error(&key, message)
                })?)
            }
        };
        Ok(TensorData { dtype: info.dtype, shape: info.shape.clone(), bytes })
    }

    fn contains(&self, name: &str) -> bool {
        self.header.tensor(&gguf_name(name).0).is_some()
    }
}

impl<B: Storage> WeightStream for Gguf<B> {
    fn files(&self) -> &[SourceFile] {
        &self.stream_file
    }

    fn locations(&self) -> &[TensorLocation] {
        &self.locations
    }

    fn open(&self, _index: usize, from: u64) -> LoadFuture<'_, Box<dyn ChunkReader + '_>> {
        let reader: Box<dyn ChunkReader + '_> = Box::new(SliceReader::new(&self.bytes, from));
        Box::pin(std::future::ready(Ok(reader)))
    }
}

/// (Hugging Face name, llama.cpp name) of every tensor a llama model of `header` has.
fn hf_names(header: &GgufHeader) -> Vec<(String, String)> {
    let layers = header.get_u32("llama.block_count").ok().flatten().unwrap_or(0) as usize;
    let mut names: Vec<(String, String)> = MODEL_TENSORS.iter().map(|(hf, gguf)| (hf.to_string(), gguf.to_string())).collect();
    for i in 0..layers {
        for (hf, gguf) in LAYER_TENSORS {
            names.push((format!("model.layers.{i}.{hf}"), format!("blk.{i}.{gguf}")));
        }
    }
    names
}

/// The projections llama.cpp's converter permutes for its RoPE.
#[derive(Clone, Copy, Debug)]
enum RopeTensor {
    Query,
    Key,
}

/// Hugging Face names of whole-model tensors and their llama.cpp names.
const MODEL_TENSORS: [(&str, &str); 3] =
    [("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"), ("lm_head.weight", "output.weight")];

/// Per layer: `model.layers.{i}.` + Hugging Face name, `blk.{i}.` + llama.cpp name.
const LAYER_TENSORS: [(&str, &str); 9] = [
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
];

/// The llama.cpp name for a Hugging Face name (other names unchanged), and whether its rows are
/// permuted for RoPE.
fn gguf_name(name: &str) -> (Cow<'_, str>, Option<RopeTensor>) {
    if let Some((_, gguf)) = MODEL_TENSORS.iter().find(|(hf, _)| *hf == name) {
        return (Cow::Borrowed(*gguf), None);
    }
    let layer = name.strip_prefix("model.layers.").and_then(|rest| rest.split_once('.'));
    let Some((layer, rest)) = layer.and_then(|(layer, rest)| Some((layer.parse::<usize>().ok()?, rest))) else {
        return (Cow::Borrowed(name), None);
    };
    let Some((_, gguf)) = LAYER_TENSORS.iter().find(|(hf, _)| *hf == rest) else {
        return (Cow::Borrowed(name), None);
    };
    let rope = match *gguf {
        "attn_q.weight" => Some(RopeTensor::Query),
        "attn_k.weight" => Some(RopeTensor::Key),
        _ => None,
    };
    (Cow::Owned(format!("blk.{layer}.{gguf}")), rope)
}

/// Undoes the row permutation of llama.cpp's converter (`LlamaModel.permute`), which makes RoPE
/// rotate adjacent pairs: within each head of `head_dim` rows, stored row 2i + j (j = 0, 1) is
/// Hugging Face row j * head_dim / 2 + i, whose RoPE rotates halves. Whole rows move, so this is
/// exact for every block format. None when the rows do not split into heads of even size.
pub(crate) fn unpermute_rows(bytes: &[u8], shape: &[usize], n_heads: usize) -> Option<Vec<u8>> {
    let rows = *shape.first()?;
    if shape.len() != 2 || n_heads == 0 || !rows.is_multiple_of(2 * n_heads) {
        return None;
    }
    let row_bytes = bytes.len() / rows;
    let head_dim = rows / n_heads;
    let mut out = Vec::with_capacity(bytes.len());
    for head in 0..n_heads {
        for j in 0..2 {
            for i in 0..head_dim / 2 {
                let row = head * head_dim + 2 * i + j;
                out.extend_from_slice(&bytes[row * row_bytes..(row + 1) * row_bytes]);
            }
        }
    }
    Some(out)
}

/// The formats this engine reads, by ggml type id.
fn ggml_dtype(type_id: u32) -> Option<DType> {
    Some(match type_id {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::Q4_0,
        3 => DType::Q4_1,
        6 => DType::Q5_0,
        7 => DType::Q5_1,
        8 => DType::Q8_0,
        10 => DType::Q2K,
        11 => DType::Q3K,
        12 => DType::Q4K,
        13 => DType::Q5K,
        14 => DType::Q6K,
        16 => DType::IQ2XXS,
        17 => DType::IQ2XS,
        18 => DType::IQ3XXS,
        19 => DType::IQ1S,
        20 => DType::IQ4NL,
        21 => DType::IQ3S,
        22 => DType::IQ2S,
        23 => DType::IQ4XS,
        29 => DType::IQ1M,
        30 => DType::BF16,
        _ => return None,
    })
}

/// ggml's name for a type id, for error messages.
fn ggml_type_name(type_id: u32) -> &'static str {
    const NAMES: [&str; 42] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2 (removed)", "Q4_3 (removed)", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K",
        "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8",
        "I16", "I32", "I64", "F64", "IQ1_M", "BF16", "Q4_0_4_4 (removed)", "Q4_0_4_8 (removed)", "Q4_0_8_8 (removed)",
        "TQ1_0", "TQ2_0", "IQ4_NL_4_4 (removed)", "IQ4_NL_4_8 (removed)", "IQ4_NL_8_8 (removed)", "MXFP4", "NVFP4", "Q1_0",
    ];
    NAMES.get(type_id as usize).copied().unwrap_or("unknown")
}

/// A position in the header being parsed; every read checks the bytes left.
struct Reader<'a> {
    file: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], LoadError> {
        let available = self.bytes.len() - self.pos;
        if n > available as u64 {
            return Err(self.truncated(what, n));
        }
        let taken = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(taken)
    }

    fn truncated(&self, what: &str, needed: u64) -> LoadError {
        LoadError::Truncated {
            file: self.file.to_string(),
            offset: self.pos,
            what: what.to_string(),
            needed,
            available: self.bytes.len() - self.pos,
        }
    }

    fn malformed(&self, offset: usize, message: String) -> LoadError {
        LoadError::Gguf { file: self.file.to_string(), offset, message }
    }

    /// Refuses `count` items of at least `min_size` bytes each that cannot fit in what is left, before
    /// anything is allocated for them.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<(), LoadError> {
        let needed = count.saturating_mul(min_size);
        if needed > (self.bytes.len() - self.pos) as u64 {
            return Err(self.truncated(what, needed));
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], LoadError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, LoadError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, LoadError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String, LoadError> {
        let at = self.pos;
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.malformed(at, format!("{what} is not valid UTF-8")))
    }

    /// A value of GGUF type `value_type` for metadata `key`.
    fn value(&mut self, value_type: u32, key: &str, depth: usize) -> Result<MetadataValue, LoadError> {
        Ok(match value_type {
            0 => MetadataValue::U8(u8::from_le_bytes(self.array(key)?)),
            1 => MetadataValue::I8(i8::from_le_bytes(self.array(key)?)),
            2 => MetadataValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => MetadataValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => MetadataValue::U32(u32::from_le_bytes(self.array(key)?)),
            5 => MetadataValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => MetadataValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => {
                let at = self.pos;
                match self.array::<1>(key)?[0] {
                    0 => MetadataValue::Bool(false),
                    1 => MetadataValue::Bool(true),
                    other => return Err(self.malformed(at, format!("metadata {key}: bool byte {other} is neither 0 nor 1"))),
                }
            }
            8 => MetadataValue::String(self.string(key)?),
            9 => {
                let at = self.pos;
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.malformed(at, format!("metadata {key}: arrays nest deeper than {MAX_ARRAY_DEPTH}")));
                }
                let item_type = self.u32(key)?;
                let count = self.u64(key)?;
                let min_size = match item_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => return Err(self.malformed(at, format!("metadata {key}: unknown array element type {other}"))),
                };
                self.check_count(count, min_size, key)?;
                let items = (0..count).map(|_| self.value(item_type, key, depth + 1)).collect::<Result<_, _>>()?;
                MetadataValue::Array(items)
            }
            10 => MetadataValue::U64(u64::from_le_bytes(self.array(key)?)),
            11 => MetadataValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => MetadataValue::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(self.malformed(self.pos - 4, format!("metadata {key}: unknown value type {other}"))),
        })
    }
}
