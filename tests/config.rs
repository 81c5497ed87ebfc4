//! Hugging Face configs of the real Llama 3, 3.1 and 3.2 and Mistral 7B checkpoints, and the llama3 RoPE frequencies
//! against an independent f64 evaluation of Meta's formula.

mod common;

use common::fixture;
use llama_webgpu::model::{Llama3Scaling, RopeScaling, SamplingDefaults};
use llama_webgpu::Config;

fn llama3(c: &Config) -> &Llama3Scaling {
    match &c.rope.scaling {
        Some(RopeScaling::Llama3(s)) => s,
        other => panic!("llama3 scaling expected, got {other:?}"),
    }
}

fn config(name: &str, generation: Option<&str>) -> Config {
    let read = |f: &str| std::fs::read_to_string(fixture("configs").join(f)).unwrap();
    Config::from_hf_json(&read(name), generation.map(read).as_deref()).unwrap()
}

#[test]
fn llama_3_1_8b() {
    let c = config("llama-3.1-8b-instruct.config.json", None);
    assert_eq!((c.hidden_size, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim), (4096, 32, 32, 8, 128));
    assert_eq!((c.intermediate_size, c.vocab_size, c.max_position_embeddings), (14336, 128256, 131072));
    assert_eq!(c.rope.theta, 500000.0);
    assert_eq!(
        c.rope.scaling,
        Some(RopeScaling::Llama3(Llama3Scaling { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 }))
    );
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.eos_token_ids, [128001, 128008, 128009]);
    assert_eq!(c.bos_token_id, Some(128000));
}

#[test]
fn llama_3_2_1b_is_tied_with_explicit_head_dim() {
    let c = config("llama-3.2-1b-instruct.config.json", None);
    assert_eq!((c.hidden_size, c.n_layers, c.head_dim, c.q_dim(), c.kv_dim()), (2048, 16, 64, 2048, 512));
    assert!(c.tie_word_embeddings);
    assert_eq!(llama3(&c).factor, 32.0);
}

#[test]
fn llama_3_takes_stop_tokens_from_generation_config_and_has_no_scaling() {
    let c = config("llama-3-8b.config.json", Some("llama-3-8b.generation_config.json"));
    assert_eq!(c.eos_token_ids, [128001, 128009]);
    assert_eq!(c.rope.scaling, None);
    assert_eq!(c.max_position_embeddings, 8192);
    assert!(c.sampling_defaults.is_empty());
}

/// generation_config.json's sampling settings (Llama 3.1 Instruct's: temperature 0.6, top_p 0.9)
/// become the model's recommended sampling; a top_k of 0 or less is none.
#[test]
fn sampling_defaults_come_from_generation_config() {
    let read = |f: &str| std::fs::read_to_string(fixture("configs").join(f)).unwrap();
    let parse = |generation: &str| Config::from_hf_json(&read("llama-3.1-8b-instruct.config.json"), Some(generation)).unwrap().sampling_defaults;
    let llama = parse(r#"{"bos_token_id": 128000, "do_sample": true, "eos_token_id": [128001, 128008, 128009], "temperature": 0.6, "top_p": 0.9}"#);
    assert_eq!(llama, SamplingDefaults { temperature: Some(0.6), top_p: Some(0.9), ..Default::default() });
    let all = parse(r#"{"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.05}"#);
    assert_eq!(all, SamplingDefaults { temperature: Some(0.7), top_p: Some(0.8), top_k: Some(20), min_p: Some(0.05), repetition_penalty: Some(1.05) });
    for off in ["-1", "0"] {
        assert_eq!(parse(&format!(r#"{{"top_k": {off}}}"#)).top_k, None);
    }
}

/// Mistral's checkpoints are Llama's architecture; a sliding window bounds the context, within
/// which full attention is the window's.
#[test]
fn mistral_7b_is_llamas_architecture_and_its_window_bounds_the_context() {
    let c = config("mistral-7b-instruct-v0.3.config.json", None);
    assert_eq!((c.hidden_size, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim), (4096, 32, 32, 8, 128));
    assert_eq!((c.intermediate_size, c.vocab_size, c.max_position_embeddings, c.rope.theta), (14336, 32768, 32768, 1_000_000.0));
    assert_eq!((c.bos_token_id, c.eos_token_ids.as_slice(), &c.rope.scaling), (Some(1), &[2][..], &None));
    let text = std::fs::read_to_string(fixture("configs/mistral-7b-instruct-v0.3.config.json")).unwrap();
    let windowed = Config::from_hf_json(&text.replace("\"sliding_window\": null", "\"sliding_window\": 4096"), None).unwrap();
    assert_eq!(windowed.max_position_embeddings, 4096);
    let error = Config::from_hf_json(&text.replace("\"mistral\"", "\"mixtral\""), None).unwrap_err().to_string();
    assert!(error.contains("model_type \"mixtral\""), "{error}");
}

#[test]
fn transformers_5_rope_parameters_are_read() {
    let text = std::fs::read_to_string(fixture("tiny-llama32-tied/config.json")).unwrap();
    let c = Config::from_hf_json(&text, None).unwrap();
    assert_eq!(c.rope.theta, 500000.0);
    assert_eq!(llama3(&c).original_max_position_embeddings, 64);
    assert_eq!((c.hidden_size, c.q_dim()), (96, 128));
}

/// Meta's reference (llama/model.py apply_scaling), in f64.
fn llama3_inv_freq_f64(theta: f64, head_dim: usize, s: &Llama3Scaling) -> Vec<f64> {
    let original = s.original_max_position_embeddings as f64;
    let (low, high, factor) = (s.low_freq_factor as f64, s.high_freq_factor as f64, s.factor as f64);
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < original / high {
                freq
            } else if wavelen > original / low {
                freq / factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                (1.0 - smooth) * freq / factor + smooth * freq
            }
        })
        .collect()
}

#[test]
fn llama3_rope_frequencies_cover_all_three_bands() {
    let c = config("llama-3.1-8b-instruct.config.json", None);
    let scaling = llama3(&c).clone();
    let want = llama3_inv_freq_f64(500000.0, 128, &scaling);
    let got = c.rope_inv_freq();
    let unscaled = Config { rope: llama_webgpu::model::Rope { theta: 500000.0, scaling: None }, ..c.clone() }.rope_inv_freq();
    let (mut kept, mut smoothed, mut divided) = (0, 0, 0);
    for i in 0..64 {
        assert!(((got[i] as f64 - want[i]) / want[i]).abs() < 1e-6, "pair {i}: {} vs {}", got[i], want[i]);
        let ratio = unscaled[i] / got[i];
        match ratio {
            r if (r - 1.0).abs() < 1e-6 => kept += 1,
            r if (r - 8.0).abs() < 1e-4 => divided += 1,
            _ => smoothed += 1,
        }
    }
    assert!(kept > 0 && smoothed > 0 && divided > 0, "bands: {kept} kept, {smoothed} smoothed, {divided} divided");
    // The cos/sin table holds each position's angles.
    let table = c.rope_cos_sin(3);
    let angle = 2.0 * got[5] as f64;
    assert!((table[2 * 64 + 5][0] as f64 - angle.cos()).abs() < 1e-7);
    assert!((table[2 * 64 + 5][1] as f64 - angle.sin()).abs() < 1e-7);
}

#[test]
fn frequency_factors_divide_each_frequency_and_survive_config_json() {
    let c = config("llama-3.1-8b-instruct.config.json", None);
    let unscaled = Config { rope: llama_webgpu::model::Rope { theta: 500000.0, scaling: None }, ..c.clone() };
    let factors: Vec<f32> = (0..64).map(|i| 1.0 + i as f32 / 8.0).collect();
    let scaled = Config { rope: llama_webgpu::model::Rope { theta: 500000.0, scaling: Some(RopeScaling::Factors(factors.clone())) }, ..c.clone() };
    for ((got, base), factor) in scaled.rope_inv_freq().iter().zip(unscaled.rope_inv_freq()).zip(&factors) {
        assert_eq!(*got, base / factor);
    }
    let text = scaled.to_hf_json().to_string();
    assert_eq!(Config::from_hf_json(&text, None).unwrap(), scaled);
    // One factor per pair of head dimensions, each positive.
    for bad in [vec![1.0; 63], [vec![1.0; 63], vec![0.0]].concat()] {
        let wrong = Config { rope: llama_webgpu::model::Rope { theta: 500000.0, scaling: Some(RopeScaling::Factors(bad)) }, ..c.clone() };
        let err = Config::from_hf_json(&wrong.to_hf_json().to_string(), None).unwrap_err().to_string();
        assert!(err.contains("RoPE frequency factors"), "{err}");
    }
}

#[test]
fn a_head_dim_attention_cannot_read_is_refused_by_name() {
    let c = config("llama-3.1-8b-instruct.config.json", None);
    // Attention reads keys and values in quads (130 is not a multiple of 4) and holds a head of at
    // most 256 (300).
    for head_dim in [130, 300] {
        let wrong = Config { head_dim, ..c.clone() };
        let err = Config::from_hf_json(&wrong.to_hf_json().to_string(), None).unwrap_err().to_string();
        assert!(err.contains(&format!("head_dim {head_dim} must be a multiple of 4 and at most 256")), "{err}");
    }
}
