//! Choosing the next token from the logits with the options every serving stack offers.
//!
//! Order, as transformers applies them: logit bias, repetition penalty (over prompt and output),
//! frequency and presence penalties (over the output, as OpenAI defines them), temperature, top-k,
//! top-p, min-p, then a draw. The random stream is ChaCha8 and the arithmetic uses `libm`, so a seed
//! gives the same tokens for the same logits on every host, native or wasm.

use std::collections::{HashMap, HashSet};

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::api::SamplingParams;
use crate::gpu::ops::{Candidates, MAX_TOP_K};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SampleError {
    #[error("{name} must be {range}, got {value}")]
    OutOfRange { name: &'static str, range: &'static str, value: f32 },
    #[error("logit_bias key {0:?} is not a token id")]
    BadBiasKey(String),
    #[error("logit_bias token {token} is outside the vocabulary of {vocab}")]
    BiasTokenOutOfRange { token: u32, vocab: usize },
}

/// Validated sampling options.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerOptions {
    /// 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: vec![],
        }
    }
}

fn check(name: &'static str, value: f32, range: &'static str, ok: impl Fn(f32) -> bool) -> Result<f32, SampleError> {
    if value.is_finite() && ok(value) {
        Ok(value)
    } else {
        Err(SampleError::OutOfRange { name, range, value })
    }
}

impl SamplerOptions {
    /// Checks a request's options against OpenAI's ranges and the vocabulary.
    pub fn from_params(p: &SamplingParams, vocab: usize) -> Result<Self, SampleError> {
        let d = Self::default();
        let mut logit_bias = vec![];
        for (key, &bias) in p.logit_bias.iter().flatten() {
            let token: u32 = key.trim().parse().map_err(|_| SampleError::BadBiasKey(key.clone()))?;
            if token as usize >= vocab {
                return Err(SampleError::BiasTokenOutOfRange { token, vocab });
            }
            logit_bias.push((token, check("logit_bias", bias, "in [-100, 100]", |v| v.abs() <= 100.0)?));
        }
        logit_bias.sort_by_key(|(token, _)| *token);
        Ok(Self {
            temperature: check("temperature", p.temperature.unwrap_or(d.temperature), "in [0, 2]", |v| (0.0..=2.0).contains(&v))?,
            top_k: p.top_k.unwrap_or(0) as usize,
            top_p: check("top_p", p.top_p.unwrap_or(d.top_p), "in (0, 1]", |v| v > 0.0 && v <= 1.0)?,
            min_p: check("min_p", p.min_p.unwrap_or(d.min_p), "in [0, 1]", |v| (0.0..=1.0).contains(&v))?,
            repetition_penalty: check("repetition_penalty", p.repetition_penalty.unwrap_or(1.0), "positive", |v| v > 0.0)?,
            frequency_penalty: check("frequency_penalty", p.frequency_penalty.unwrap_or(0.0), "in [-2, 2]", |v| v.abs() <= 2.0)?,
            presence_penalty: check("presence_penalty", p.presence_penalty.unwrap_or(0.0), "in [-2, 2]", |v| v.abs() <= 2.0)?,
            logit_bias,
        })
    }

    /// True when the choice is the argmax of the raw logits, which the GPU can make alone.
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature == 0.0
            && self.logit_bias.is_empty()
            && self.repetition_penalty == 1.0
            && self.frequency_penalty == 0.0
            && self.presence_penalty == 0.0
    }
}

/// The sampling state of one request: options, random stream and the tokens seen so far.
pub struct Sampler {
    options: SamplerOptions,
    rng: ChaCha8Rng,
    /// Prompt and output tokens, for the repetition penalty.
    seen: HashSet<u32>,
    /// How often each output token occurred, for the frequency and presence penalties.
    output_counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(options: SamplerOptions, seed: u64, prompt: &[u32]) -> Self {
        Self {
            options,
            rng: ChaCha8Rng::seed_from_u64(seed),
            seen: prompt.iter().copied().collect(),
            output_counts: HashMap::new(),
        }
    }

    pub fn options(&self) -> &SamplerOptions {
        &self.options
    }

    /// Records a token the model produced (whoever chose it).
    pub fn accept(&mut self, token: u32) {
        self.seen.insert(token);
        *self.output_counts.entry(token).or_default() += 1;
    }

    /// Picks the next token from the full vocabulary's logits, bias and penalties applied to a copy.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let o = &self.options;
        let mut candidates: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        for &(token, bias) in &o.logit_bias {
            candidates[token as usize].1 += bias;
        }
        if o.repetition_penalty != 1.0 {
            for &token in &self.seen {
                let l = &mut candidates[token as usize].1;
                *l = if *l > 0.0 { *l / o.repetition_penalty } else { *l * o.repetition_penalty };
            }
        }
        for (&token, &count) in &self.output_counts {
            candidates[token as usize].1 -= o.frequency_penalty * count as f32 + o.presence_penalty;
        }
        self.draw(candidates, None).unwrap_or(0)
    }

    /// How many GPU-selected candidates (see [`Llama::forward_top_k`](crate::Llama::forward_top_k))
    /// can replace the full logits: only without bias or penalties, which need every logit.
    pub fn candidates_wanted(&self) -> Option<usize> {
        let o = &self.options;
        let untouched = o.logit_bias.is_empty()
            && o.repetition_penalty == 1.0
            && o.frequency_penalty == 0.0
            && o.presence_penalty == 0.0;
        match o.top_k {
            _ if !untouched || o.temperature == 0.0 => None,
            k if (1..=MAX_TOP_K).contains(&k) => Some(k),
            0 if o.top_p < 1.0 || o.min_p > 0.0 => Some(MAX_TOP_K),
            _ => None,
        }
    }

    /// Samples from GPU candidates; None when they may not hold every token the filters keep, and
    /// the full logits are needed. Consumes the same random draw as [`Sampler::sample`].
    pub fn sample_candidates(&mut self, candidates: &Candidates) -> Option<u32> {
        let vocabulary_mass = (self.options.top_k == 0).then_some(candidates.exp_sum);
        self.draw(candidates.tokens.clone(), vocabulary_mass)
    }

    /// Filters and draws. `vocabulary_mass`, when the candidates are only the head of the
    /// vocabulary, is the softmax normaliser of all of it (relative to the largest logit).
    fn draw(&mut self, mut candidates: Vec<(u32, f32)>, vocabulary_mass: Option<f32>) -> Option<u32> {
        let o = &self.options;
        // Ties between equal logits go to the lower token id, so candidate order does not matter.
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if o.temperature == 0.0 {
            return candidates.iter().min_by(|a, b| by_logit(a, b)).map(|c| c.0);
        }
        if o.top_k > 0 && o.top_k < candidates.len() {
            candidates.select_nth_unstable_by(o.top_k - 1, by_logit);
            candidates.truncate(o.top_k);
        }
        candidates.sort_unstable_by(by_logit);
        let max = candidates.first()?.1;
        let weights: Vec<f32> = candidates.iter().map(|c| libm::expf((c.1 - max) / o.temperature)).collect();
        let total = vocabulary_mass.unwrap_or_else(|| weights.iter().sum());
        // top-p: the smallest head whose mass reaches top_p; min-p: drop what is below min_p * best.
        let mut keep = weights.len();
        if o.top_p < 1.0 {
            let mut mass = 0.0;
            match weights.iter().position(|w| {
                mass += w / total;
                mass >= o.top_p
            }) {
                Some(i) => keep = i + 1,
                None if vocabulary_mass.is_some() => return None,
                None => {}
            }
        }
        let floor = o.min_p * weights[0];
        let above_floor = weights[..keep].iter().take_while(|&&w| w >= floor).count();
        if vocabulary_mass.is_some() && above_floor == weights.len() {
            return None;
        }
        let kept = &weights[..above_floor.max(1)];
        let target = self.uniform() * kept.iter().sum::<f32>();
        let mut cumulative = 0.0;
        for (i, w) in kept.iter().enumerate() {
            cumulative += w;
            if target < cumulative {
                return Some(candidates[i].0);
            }
        }
        Some(candidates[kept.len() - 1].0)
    }

    /// A uniform draw in [0, 1) from 24 random bits, exact in f32.
    fn uniform(&mut self) -> f32 {
        (self.rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }
}
