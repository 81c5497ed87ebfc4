//! The model's hyperparameters, parsed from a Hugging Face `config.json` (Llama 3, 3.1, 3.2; the
//! transformers-4 `rope_scaling` + `rope_theta` style and the transformers-5 `rope_parameters` style).

use serde::{Deserialize, Serialize};

use super::ModelError;

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope: Rope,
    pub tie_word_embeddings: bool,
    /// The token raw (non-chat) prompts start with; None when the model's tokenizer adds none.
    pub bos_token_id: Option<u32>,
    /// Every token that ends generation (Llama 3.1 Instruct: 128001, 128008, 128009).
    pub eos_token_ids: Vec<u32>,
    /// The sampling the model's makers recommend (Llama 3.1 Instruct: temperature 0.6, top_p 0.9).
    pub sampling_defaults: SamplingDefaults,
}

/// Sampling settings a model's files recommend (`generation_config.json`, a GGUF's
/// `general.sampling.*`), which requests that set none of their own take, as vLLM's
/// `--generation-config auto` and llama.cpp give them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingDefaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// 0 or less in the files means every token: none.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "positive_top_k")]
    pub top_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
}

impl SamplingDefaults {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

fn positive_top_k<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    let top_k = Option::<i64>::deserialize(deserializer)?;
    Ok(top_k.filter(|&k| k > 0).map(|k| k.min(u32::MAX as i64) as u32))
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub theta: f32,
    pub scaling: Option<RopeScaling>,
}

/// How the rotary frequencies are scaled for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// transformers' `rope_type: "llama3"`, from its parameters.
    Llama3(Llama3Scaling),
    /// Each frequency divided by its own factor, as llama.cpp applies a GGUF's `rope_freqs.weight`
    /// (whatever parameters produced them).
    Factors(Vec<f32>),
}

/// `rope_type: "llama3"`: low frequencies are divided by `factor`, the band between smoothly blended.
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: usize,
    /// Mistral's: each position attends to at most this many before it.
    sliding_window: Option<usize>,
    rms_norm_eps: f32,
    rope_theta: Option<f32>,
    rope_scaling: Option<HfRope>,
    rope_parameters: Option<HfRope>,
    #[serde(default)]
    tie_word_embeddings: bool,
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
}

#[derive(Deserialize)]
struct HfRope {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    rope_theta: Option<f32>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
    /// This engine's own `rope_type: "frequency_factors"`, for a GGUF's factors written back out.
    factors: Option<Vec<f32>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn into_vec(self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![id],
            TokenIds::Many(ids) => ids,
        }
    }
}

/// The fields of `generation_config.json` the engine uses.
#[derive(Deserialize)]
struct GenerationConfig {
    eos_token_id: Option<TokenIds>,
    #[serde(flatten)]
    sampling: SamplingDefaults,
}

impl Config {
    /// Parses `config.json`, then lets `generation_config.json` (when given) set the stop tokens
    /// and the sampling defaults.
    pub fn from_hf_json(config_json: &str, generation_config_json: Option<&str>) -> Result<Self, ModelError> {
        let hf: HfConfig = serde_json::from_str(config_json).map_err(|e| ModelError::Config(e.to_string()))?;
        // Mistral's checkpoints are Llama's architecture, with a sliding window in some.
        if let Some(model_type) = hf.model_type.as_deref() {
            if model_type != "llama" && model_type != "mistral" {
                return Err(ModelError::Unsupported(format!("model_type {model_type:?} (\"llama\" and \"mistral\" are)")));
            }
        }
        if let Some(act) = hf.hidden_act.as_deref() {
            if act != "silu" {
                return Err(ModelError::Unsupported(format!("hidden_act {act:?} (only \"silu\")")));
            }
        }
        if hf.attention_bias || hf.mlp_bias {
            return Err(ModelError::Unsupported("attention_bias / mlp_bias (Llama has no biases)".into()));
        }
        let rope = rope(hf.rope_theta, hf.rope_parameters.or(hf.rope_scaling))?;
        let mut eos_token_ids = hf.eos_token_id.map(TokenIds::into_vec).unwrap_or_default();
        let mut sampling_defaults = SamplingDefaults::default();
        if let Some(json) = generation_config_json {
            let generation: GenerationConfig =
                serde_json::from_str(json).map_err(|e| ModelError::Config(format!("generation_config.json: {e}")))?;
            sampling_defaults = generation.sampling;
            if let Some(ids) = generation.eos_token_id {
                for id in ids.into_vec() {
                    if !eos_token_ids.contains(&id) {
                        eos_token_ids.push(id);
                    }
                }
            }
        }
        let n_heads = hf.num_attention_heads;
        let config = Config {
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            n_layers: hf.num_hidden_layers,
            n_heads,
            n_kv_heads: hf.num_key_value_heads.unwrap_or(n_heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / n_heads.max(1)),
            vocab_size: hf.vocab_size,
            // Within its window a sliding-window model attends to every position before, as this
            // engine does; past it the two differ, so a context stops at the window (Mistral 7B
            // v0.1's 4,096; v0.2 on have none).
            max_position_embeddings: hf.max_position_embeddings.min(hf.sliding_window.unwrap_or(usize::MAX)),
            rms_norm_eps: hf.rms_norm_eps,
            rope,
            tie_word_embeddings: hf.tie_word_embeddings,
            bos_token_id: hf.bos_token_id.and_then(|ids| ids.into_vec().first().copied()),
            eos_token_ids,
            sampling_defaults,
        };
        config.validate()?;
        Ok(config)
    }

    pub(crate) fn validate(&self) -> Result<(), ModelError> {
        let invalid = |what: String| Err(ModelError::Config(what));
        if self.n_heads == 0 || self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return invalid(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        // Even for RoPE's pairs; attention reads keys and values four elements at a time.
        if !self.head_dim.is_multiple_of(4) || self.head_dim > crate::gpu::ops::MAX_HEAD_DIM {
            return invalid(format!("head_dim {} must be a multiple of 4 and at most {}", self.head_dim, crate::gpu::ops::MAX_HEAD_DIM));
        }
        for (name, value) in [("hidden_size", self.hidden_size), ("intermediate_size", self.intermediate_size)] {
            if value == 0 || value % 2 != 0 {
                return invalid(format!("{name} {value} must be even and positive"));
            }
        }
        if self.n_layers == 0 || self.vocab_size == 0 || self.max_position_embeddings == 0 {
            return invalid("num_hidden_layers, vocab_size and max_position_embeddings must be positive".into());
        }
        // Token ids travel to the GPU as f32, exact below 2^24.
        if self.vocab_size > 1 << 24 {
            return invalid(format!("vocab_size {} is above 2^24", self.vocab_size));
        }
        if let Some(RopeScaling::Factors(factors)) = &self.rope.scaling {
            if factors.len() != self.head_dim / 2 || !factors.iter().all(|f| f.is_finite() && *f > 0.0) {
                return invalid(format!("RoPE frequency factors: {} positive numbers are needed (half the head dimension), got {factors:?}", self.head_dim / 2));
            }
        }
        if let Some(&id) = self.eos_token_ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return invalid(format!("eos_token_id {id} is outside the vocabulary of {}", self.vocab_size));
        }
        Ok(())
    }

    /// The configuration as a Hugging Face `config.json` (transformers-4 style), which
    /// [`Config::from_hf_json`] reads back to the same value.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let rope_scaling = self.rope.scaling.as_ref().map(|scaling| match scaling {
            RopeScaling::Llama3(s) => serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }),
            RopeScaling::Factors(factors) => serde_json::json!({"rope_type": "frequency_factors", "factors": factors}),
        });
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids,
        })
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// The rotary frequency of each pair of head dimensions, scaled as the config says, computed in
    /// f32 step by step as transformers does so the angles agree to the last bit where possible.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let inv_freq = 1.0 / self.rope.theta.powf((2 * i) as f32 / d as f32);
                match &self.rope.scaling {
                    None => inv_freq,
                    Some(RopeScaling::Llama3(s)) => s.scale(inv_freq),
                    Some(RopeScaling::Factors(factors)) => inv_freq / factors[i],
                }
            })
            .collect()
    }

    /// The (positions, head_dim / 2) table of (cos, sin) of each position's angles.
    pub fn rope_cos_sin(&self, positions: usize) -> Vec<[f32; 2]> {
        let inv_freq = self.rope_inv_freq();
        (0..positions)
            .flat_map(|pos| {
                inv_freq.iter().map(move |f| {
                    let angle = (pos as f32 * f) as f64;
                    [angle.cos() as f32, angle.sin() as f32]
                })
            })
            .collect()
    }
}

impl Llama3Scaling {
    fn scale(&self, inv_freq: f32) -> f32 {
        let original = self.original_max_position_embeddings as f32;
        let low_freq_wavelen = original / self.low_freq_factor;
        let high_freq_wavelen = original / self.high_freq_factor;
        let wavelen = 2.0 * std::f32::consts::PI / inv_freq;
        if wavelen < high_freq_wavelen {
            inv_freq
        } else if wavelen > low_freq_wavelen {
            inv_freq / self.factor
        } else {
            let smooth = (original / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - smooth) * inv_freq / self.factor + smooth * inv_freq
        }
    }
}

fn rope(top_level_theta: Option<f32>, params: Option<HfRope>) -> Result<Rope, ModelError> {
    let theta = params.as_ref().and_then(|p| p.rope_theta).or(top_level_theta).unwrap_or(10000.0);
    let Some(p) = params else { return Ok(Rope { theta, scaling: None }) };
    match p.rope_type.as_deref().unwrap_or("default") {
        "default" => Ok(Rope { theta, scaling: None }),
        "llama3" => {
            let missing = |field: &str| ModelError::Config(format!("llama3 rope scaling lacks {field}"));
            let scaling = Llama3Scaling {
                factor: p.factor.ok_or_else(|| missing("factor"))?,
                low_freq_factor: p.low_freq_factor.ok_or_else(|| missing("low_freq_factor"))?,
                high_freq_factor: p.high_freq_factor.ok_or_else(|| missing("high_freq_factor"))?,
                original_max_position_embeddings: p
                    .original_max_position_embeddings
                    .ok_or_else(|| missing("original_max_position_embeddings"))?,
            };
            if scaling.high_freq_factor <= scaling.low_freq_factor || scaling.factor <= 0.0 {
                return Err(ModelError::Config("llama3 rope scaling needs high_freq_factor > low_freq_factor and factor > 0".into()));
            }
            Ok(Rope { theta, scaling: Some(RopeScaling::Llama3(scaling)) })
        }
        "frequency_factors" => Ok(Rope { theta, scaling: Some(RopeScaling::Factors(p.factors.ok_or_else(|| ModelError::Config("frequency_factors rope scaling lacks factors".into()))?)) }),
        other => Err(ModelError::Unsupported(format!("rope_type {other:?} (supported: default, llama3)"))),
    }
}
