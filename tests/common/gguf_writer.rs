//! GGUF files written in memory, laid out as llama.cpp's writer lays them out, and the tiny
//! fixtures converted to GGUF as llama.cpp's converter converts Hugging Face checkpoints.

use llama_webgpu::load::{MetadataValue as V, WeightSource};
use llama_webgpu::model::RopeScaling;
use llama_webgpu::quant::DType;
use llama_webgpu::Config;

// ggml type ids (ggml.h).
pub const F32: u32 = 0;
pub const F16: u32 = 1;
pub const Q5_0: u32 = 6;
pub const Q5_1: u32 = 7;
pub const Q8_0: u32 = 8;
pub const Q2_K: u32 = 10;
pub const Q3_K: u32 = 11;
pub const Q5_K: u32 = 13;
pub const IQ2_XXS: u32 = 16;
pub const IQ2_XS: u32 = 17;
pub const IQ3_XXS: u32 = 18;
pub const IQ1_S: u32 = 19;
pub const IQ4_NL: u32 = 20;
pub const IQ3_S: u32 = 21;
pub const IQ2_S: u32 = 22;
pub const IQ4_XS: u32 = 23;
pub const IQ1_M: u32 = 29;
pub const BF16: u32 = 30;


/// Builds GGUF files in memory, laid out as llama.cpp's writer does: header, metadata, tensor infos,
/// padding to the alignment, tensor data each padded to the alignment.
#[derive(Clone)]
pub struct Writer {
    pub version: u32,
    pub alignment: u64,
    pub n_kv: u64,
    /// The metadata as written, for tests that corrupt it.
    pub kv: Vec<u8>,
    pub tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl Writer {
    pub fn new() -> Self {
        Self { version: 3, alignment: 32, n_kv: 0, kv: vec![], tensors: vec![] }
    }

    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    pub fn kv(mut self, key: &str, value: V) -> Self {
        if let ("general.alignment", V::U32(a)) = (key, &value) {
            self.alignment = u64::from(*a);
        }
        put_string(&mut self.kv, key);
        self.kv.extend(type_id(&value).to_le_bytes());
        encode(&value, &mut self.kv);
        self.n_kv += 1;
        self
    }

    /// `dims` innermost first, as GGUF lists them.
    pub fn tensor(mut self, name: &str, dims: &[u64], ggml_type: u32, data: Vec<u8>) -> Self {
        self.tensors.push((name.to_string(), dims.to_vec(), ggml_type, data));
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        let mut offset = 0u64;
        for (name, dims, ggml_type, data) in &self.tensors {
            put_string(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(ggml_type.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset = (offset + data.len() as u64).next_multiple_of(self.alignment);
        }
        for (_, _, _, data) in &self.tensors {
            out.resize((out.len() as u64).next_multiple_of(self.alignment) as usize, 0);
            out.extend(data);
        }
        out
    }
}

pub fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

pub fn type_id(value: &V) -> u32 {
    match value {
        V::U8(_) => 0,
        V::I8(_) => 1,
        V::U16(_) => 2,
        V::I16(_) => 3,
        V::U32(_) => 4,
        V::I32(_) => 5,
        V::F32(_) => 6,
        V::Bool(_) => 7,
        V::String(_) => 8,
        V::Array(_) => 9,
        V::U64(_) => 10,
        V::I64(_) => 11,
        V::F64(_) => 12,
    }
}

pub fn encode(value: &V, out: &mut Vec<u8>) {
    match value {
        V::U8(v) => out.extend(v.to_le_bytes()),
        V::I8(v) => out.extend(v.to_le_bytes()),
        V::U16(v) => out.extend(v.to_le_bytes()),
        V::I16(v) => out.extend(v.to_le_bytes()),
        V::U32(v) => out.extend(v.to_le_bytes()),
        V::I32(v) => out.extend(v.to_le_bytes()),
        V::U64(v) => out.extend(v.to_le_bytes()),
        V::I64(v) => out.extend(v.to_le_bytes()),
        V::F32(v) => out.extend(v.to_le_bytes()),
        V::F64(v) => out.extend(v.to_le_bytes()),
        V::Bool(v) => out.push(*v as u8),
        V::String(s) => put_string(out, s),
        V::Array(items) => {
            out.extend(items.first().map_or(0, type_id).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            items.iter().for_each(|item| encode(item, out));
        }
    }
}

pub fn string(s: &str) -> V {
    V::String(s.to_string())
}

pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}


/// llama.cpp's converter (`LlamaModel.permute`): HF row j * head_dim / 2 + i of each head is stored
/// as row 2i + j, so RoPE rotates adjacent pairs.
pub fn permute_rows(bytes: &[u8], rows: usize, n_heads: usize) -> Vec<u8> {
    let row_bytes = bytes.len() / rows;
    let head_dim = rows / n_heads;
    let mut out = vec![0; bytes.len()];
    for head in 0..n_heads {
        for j in 0..2 {
            for i in 0..head_dim / 2 {
                let (hf, stored) = (head * head_dim + j * head_dim / 2 + i, head * head_dim + 2 * i + j);
                out[stored * row_bytes..][..row_bytes].copy_from_slice(&bytes[hf * row_bytes..][..row_bytes]);
            }
        }
    }
    out
}


/// The converter's llama3 `rope_freqs` (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors):
/// f32 frequencies, then f64 arithmetic.
pub fn converter_rope_freqs(theta: f32, head_dim: usize, factor: f64, low: f64, high: f64, original: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f64::consts::PI / freq as f64;
            if wavelen < original / high {
                1.0
            } else if wavelen > original / low {
                factor as f32
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

/// A GGUF holding `config` as llama.cpp's converter writes it, with tensors converted from `source`
/// (q/k rows permuted, llama.cpp names); llama3 scaling goes into rope_freqs.
pub fn convert_to_gguf(config: &Config, source: &dyn WeightSource) -> Vec<u8> {
    gguf_of(config, source).build()
}

/// [`convert_to_gguf`]'s file before it is built, for more metadata.
pub fn gguf_of(config: &Config, source: &dyn WeightSource) -> Writer {
    let c = config;
    let mut file = Writer::new()
        .kv("general.architecture", string("llama"))
        .kv("llama.context_length", V::U32(c.max_position_embeddings as u32))
        .kv("llama.embedding_length", V::U32(c.hidden_size as u32))
        .kv("llama.block_count", V::U32(c.n_layers as u32))
        .kv("llama.feed_forward_length", V::U32(c.intermediate_size as u32))
        .kv("llama.attention.head_count", V::U32(c.n_heads as u32))
        .kv("llama.attention.head_count_kv", V::U32(c.n_kv_heads as u32))
        .kv("llama.attention.key_length", V::U32(c.head_dim as u32))
        .kv("llama.attention.value_length", V::U32(c.head_dim as u32))
        .kv("llama.rope.dimension_count", V::U32(c.head_dim as u32))
        .kv("llama.attention.layer_norm_rms_epsilon", V::F32(c.rms_norm_eps))
        .kv("llama.rope.freq_base", V::F32(c.rope.theta));
    if let Some(bos) = c.bos_token_id {
        file = file.kv("tokenizer.ggml.bos_token_id", V::U32(bos));
    }
    for (key, id) in ["eos", "eot", "eom"].iter().zip(&c.eos_token_ids) {
        file = file.kv(&format!("tokenizer.ggml.{key}_token_id"), V::U32(*id));
    }
    if let Some(RopeScaling::Llama3(s)) = &c.rope.scaling {
        file = file.kv("llama.rope.scaling.original_context_length", V::U32(s.original_max_position_embeddings as u32));
        let freqs = converter_rope_freqs(
            c.rope.theta,
            c.head_dim,
            s.factor as f64,
            s.low_freq_factor as f64,
            s.high_freq_factor as f64,
            s.original_max_position_embeddings as f64,
        );
        file = file.tensor("rope_freqs.weight", &[freqs.len() as u64], F32, f32_bytes(&freqs));
    }
    let mut names = vec![("model.embed_tokens.weight".to_string(), "token_embd.weight".to_string(), 0)];
    names.push(("model.norm.weight".into(), "output_norm.weight".into(), 0));
    if source.contains("lm_head.weight") {
        names.push(("lm_head.weight".into(), "output.weight".into(), 0));
    }
    for i in 0..c.n_layers {
        for (hf, gguf, heads) in [
            ("self_attn.q_proj", "attn_q", c.n_heads),
            ("self_attn.k_proj", "attn_k", c.n_kv_heads),
            ("self_attn.v_proj", "attn_v", 0),
            ("self_attn.o_proj", "attn_output", 0),
            ("mlp.gate_proj", "ffn_gate", 0),
            ("mlp.up_proj", "ffn_up", 0),
            ("mlp.down_proj", "ffn_down", 0),
            ("input_layernorm", "attn_norm", 0),
            ("post_attention_layernorm", "ffn_norm", 0),
        ] {
            names.push((format!("model.layers.{i}.{hf}.weight"), format!("blk.{i}.{gguf}.weight"), heads));
        }
    }
    for (hf, gguf, heads) in names {
        let t = source.tensor(&hf).unwrap();
        let ggml_type = match t.dtype {
            DType::F32 => F32,
            DType::F16 => F16,
            DType::BF16 => BF16,
            other => panic!("fixture dtype {other}"),
        };
        let bytes = if heads > 0 { permute_rows(&t.bytes, t.shape[0], heads) } else { t.bytes.to_vec() };
        let dims: Vec<u64> = t.shape.iter().rev().map(|&d| d as u64).collect();
        file = file.tensor(&gguf, &dims, ggml_type, bytes);
    }
    file
}
