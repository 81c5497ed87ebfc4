//! The engine every host drives: a model, its tokenizer and chat template, and streaming generation
//! that reuses the KV cache for the prompt prefix it shares with the previous request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::api::{ChatCompletionRequest, CompletionRequest, FinishReason, SamplingParams, Usage};
use crate::sample::{SampleError, Sampler, SamplerOptions};
use crate::text::{ChatTemplate, RenderOptions, TextError, TextStream, Tokenizer};
use crate::{Llama, Result};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens but the context holds {context}")]
    PromptTooLong { prompt: usize, context: usize },
    #[error("max_tokens {max_tokens} is too large: the prompt has {prompt} tokens and the context holds {context}")]
    MaxTokensTooLarge { max_tokens: usize, prompt: usize, context: usize },
    #[error("the tokenizer has {tokenizer} tokens but the model only {model}")]
    VocabMismatch { tokenizer: usize, model: usize },
    #[error(transparent)]
    Sample(#[from] SampleError),
    #[error(transparent)]
    Text(#[from] TextError),
}

/// Cancels a running generation from another task or thread; the engine stays ready.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Text completed by a generated token (empty while a character or a possible stop string is still
/// incomplete), or, without a token, the held-back text released when generation ends.
#[derive(Clone, Debug, PartialEq)]
pub struct Delta {
    pub text: String,
    pub token: Option<u32>,
}

/// A finished generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
}

pub struct Engine {
    model: Llama,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    stop_tokens: Vec<u32>,
    /// Tokens whose keys and values fill the KV cache from position 0.
    cached: Vec<u32>,
    /// Seeds for requests that bring none.
    seeds: ChaCha8Rng,
}

impl Engine {
    /// `seed` drives requests without a seed of their own; hosts pass entropy.
    pub fn new(model: Llama, tokenizer: Tokenizer, template: ChatTemplate, seed: u64) -> Result<Self> {
        let model_vocab = model.config().vocab_size;
        if tokenizer.vocab_size() > model_vocab {
            return Err(EngineError::VocabMismatch { tokenizer: tokenizer.vocab_size(), model: model_vocab }.into());
        }
        let mut stop_tokens = model.config().eos_token_ids.clone();
        for name in ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"] {
            if let Some(id) = tokenizer.token_id(name).filter(|id| !stop_tokens.contains(id)) {
                stop_tokens.push(id);
            }
        }
        Ok(Self { model, tokenizer, template, stop_tokens, cached: vec![], seeds: ChaCha8Rng::seed_from_u64(seed) })
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Tokens that end generation.
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }

    /// The prompt tokens of a chat request: the template rendered, then encoded with special tokens.
    pub fn chat_prompt(&self, request: &ChatCompletionRequest, options: &RenderOptions) -> Result<Vec<u32>> {
        let text = self.template.render(&request.messages, request.tools.as_deref(), true, options).map_err(EngineError::from)?;
        Ok(self.tokenizer.encode(&text, true).map_err(EngineError::from)?)
    }

    pub async fn chat(
        &mut self,
        request: &ChatCompletionRequest,
        cancel: &CancelToken,
        on_delta: &mut dyn FnMut(&Delta),
    ) -> Result<Completion> {
        let prompt = self.chat_prompt(request, &RenderOptions::default())?;
        self.generate(&prompt, &request.sampling, cancel, on_delta).await
    }

    /// A raw text completion: the prompt after the model's BOS token, special-token text parsed.
    pub async fn complete(
        &mut self,
        request: &CompletionRequest,
        cancel: &CancelToken,
        on_delta: &mut dyn FnMut(&Delta),
    ) -> Result<Completion> {
        let mut prompt: Vec<u32> = self.model.config().bos_token_id.into_iter().collect();
        prompt.extend(self.tokenizer.encode(&request.prompt, true).map_err(EngineError::from)?);
        self.generate(&prompt, &request.sampling, cancel, on_delta).await
    }

    /// Generates after `prompt`, calling `on_delta` for every token, until a stop token, a stop
    /// string, max_tokens, a full context or cancellation.
    pub async fn generate(
        &mut self,
        prompt: &[u32],
        params: &SamplingParams,
        cancel: &CancelToken,
        on_delta: &mut dyn FnMut(&Delta),
    ) -> Result<Completion> {
        let context = self.model.context_length();
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt.into());
        }
        if prompt.len() >= context {
            return Err(EngineError::PromptTooLong { prompt: prompt.len(), context }.into());
        }
        let max_tokens = match params.max_tokens {
            Some(n) if prompt.len() + n as usize > context => {
                return Err(EngineError::MaxTokensTooLarge { max_tokens: n as usize, prompt: prompt.len(), context }.into())
            }
            Some(n) => n as usize,
            None => context - prompt.len(),
        };
        let options = SamplerOptions::from_params(params, self.model.config().vocab_size).map_err(EngineError::from)?;
        let seed = params.seed.unwrap_or_else(|| self.seeds.next_u64());
        let mut sampler = Sampler::new(options, seed, prompt);
        let mut stops = StopStrings::new(params.stop.clone().map(|s| s.into_vec()).unwrap_or_default());

        // Reuse the cached prefix; at least one prompt token runs so there are logits to sample.
        let shared = self.cached.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(prompt.len() - 1);
        self.cached.truncate(shared);
        let mut text = String::new();
        let mut tokens = vec![];
        let mut stream = TextStream::new();
        let mut next_input = &prompt[shared..];
        let mut sampled;
        // Plain greedy steps after the first are submitted before the token they take as input is
        // read (it stays on the GPU), whenever the loop is sure to run them.
        let mut in_flight = false;
        let finish_reason = loop {
            if cancel.is_cancelled() {
                break FinishReason::Abort;
            }
            let greedy = sampler.options().is_plain_greedy();
            // Whether the loop runs again unless a stop token, a stop string or a cancel ends it.
            let runs_next = greedy && tokens.len() + 1 < max_tokens && self.cached.len() + next_input.len() + 1 < context;
            let step = if greedy { self.greedy_step(next_input, in_flight, runs_next).await } else { self.step(next_input, &mut sampler).await };
            in_flight = runs_next;
            let token = match step {
                Ok(token) => token,
                Err(error) => {
                    self.cached.clear();
                    return Err(error);
                }
            };
            sampler.accept(token);
            tokens.push(token);
            if self.stop_tokens.contains(&token) {
                break FinishReason::Stop;
            }
            let piece = stream.push(&self.tokenizer, token).map_err(EngineError::from)?;
            let (emit, stopped) = stops.push(&piece);
            text.push_str(&emit);
            on_delta(&Delta { text: emit, token: Some(token) });
            if stopped {
                break FinishReason::Stop;
            }
            if tokens.len() >= max_tokens || self.cached.len() + 1 >= context {
                break FinishReason::Length;
            }
            sampled = [token];
            next_input = &sampled;
        };
        if !stops.stopped {
            let rest = stops.flush(&stream.finish(&self.tokenizer).map_err(EngineError::from)?);
            if !rest.is_empty() {
                text.push_str(&rest);
                on_delta(&Delta { text: rest, token: None });
            }
        }
        let completion_tokens = tokens.len() as u32;
        Ok(Completion {
            text,
            tokens,
            finish_reason,
            usage: Usage {
                prompt_tokens: prompt.len() as u32,
                completion_tokens,
                total_tokens: prompt.len() as u32 + completion_tokens,
                cached_prompt_tokens: shared as u32,
            },
        })
    }

    /// A plain greedy step: runs `input` at the end of the cache unless its pass is already in
    /// flight, submits the step after it (fed by this step's token, which stays on the GPU) when
    /// `runs_next`, and then reads this step's token. A step left in flight when generation stops
    /// goes unread; the KV row it wrote lies past the cached tokens and is rewritten before use.
    async fn greedy_step(&mut self, input: &[u32], in_flight: bool, runs_next: bool) -> Result<u32> {
        let start = self.cached.len();
        if !in_flight {
            self.model.submit_greedy(input, start)?;
        }
        if runs_next {
            self.model.submit_greedy_next(start + input.len())?;
        }
        let token = self.model.read_greedy().await?;
        self.cached.extend_from_slice(input);
        Ok(token)
    }

    /// Runs `input` at the end of the cache and samples the next token, reading back as little as
    /// the sampler needs: top-k candidates, or all the logits.
    async fn step(&mut self, input: &[u32], sampler: &mut Sampler) -> Result<u32> {
        let start = self.cached.len();
        let token = if let Some(k) = sampler.candidates_wanted() {
            let candidates = self.model.forward_top_k(input, start, k, sampler.options().temperature).await?;
            match sampler.sample_candidates(&candidates) {
                Some(token) => token,
                None => sampler.sample(&mut self.model.last_logits().await?),
            }
        } else {
            sampler.sample(&mut self.model.forward(input, start).await?)
        };
        self.cached.extend_from_slice(input);
        Ok(token)
    }
}

/// Holds back text that may be the start of a stop string, and cuts the output at the first one.
struct StopStrings {
    stops: Vec<String>,
    pending: String,
    stopped: bool,
}

impl StopStrings {
    fn new(stops: Vec<String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), pending: String::new(), stopped: false }
    }

    /// Adds generated text; returns what is safe to emit and whether a stop string was found.
    fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(cut) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            self.stopped = true;
            let emit = self.pending[..cut].to_string();
            self.pending.clear();
            return (emit, true);
        }
        // The earliest suffix that could still grow into a stop string stays pending.
        let hold = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.pending[i..])))
            .unwrap_or(self.pending.len());
        let emit = self.pending[..hold].to_string();
        self.pending.drain(..hold);
        (emit, false)
    }

    /// The held-back text plus `tail`, when generation ends for another reason.
    fn flush(&mut self, tail: &str) -> String {
        self.pending.push_str(tail);
        std::mem::take(&mut self.pending)
    }
}
