//! The engine every host drives: a model, its tokenizer and chat template, and a scheduler that
//! runs many sequences together. Requests are added (checked at once), wait for a sequence slot and
//! KV pages, and run: each step is one pass of the model holding the decode token of every running
//! sequence and prefill chunks of newly admitted ones, after which each sequence samples its next
//! token with its own sampler and streams its text. A new request reuses the KV pages of the longest
//! prefix it shares with any running or earlier sequence (whole pages; the partial last page of a
//! finished one too). When every running sequence decodes greedily, each pass is submitted before
//! the tokens of the one before are read: the tokens stay on the GPU.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::api::request::Work;
use crate::api::{ChatCompletionRequest, CompletionRequest, DraftUsage, FinishReason, GeneratedToolCall, SamplingParams, TokenLogprob, TopLogprob, Usage};
use crate::gpu::ops::{Candidates, Selection, TokenSlot};
use crate::grammar::{Constraint, GrammarError, Mask};
use crate::model::{page_hash, Batch, KvPool, PageAllocator, PassOutput, PassTokens, SamplingDefaults, MAX_DRAFTS, PAGE_SIZE};
use crate::sample::{SampleError, Sampler, SamplerOptions};
use crate::text::reasoning::{Part, ThoughtSplit};
use crate::text::tool_calls::{ToolCallFormat, ToolCallStream};
use crate::text::{ChatTemplate, RenderOptions, TextError, TextStream, Tokenizer};
use crate::{Config, Llama, LoadOptions, Result};

mod draft;
mod events;
mod prompter;
mod stop_strings;

use self::draft::{LookupIndex, LOOKUP_NGRAM};
use self::events::deltas;
pub use self::events::{CancelToken, ChoiceResults, Completion, Delta, Echo, Event, Load, SequenceId};
use self::prompter::token_bytes_of;
pub use self::prompter::{Prepared, Prompter, TokenBytes};
pub(crate) use self::stop_strings::StopStrings;

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
    #[error("internal error in the engine: {0}")]
    Internal(String),
    #[error("n = {n} choices: a request takes 1 to {max}")]
    BadChoiceCount { n: usize, max: usize },
    #[error("{prompts} prompts with n = {n}: a request takes at most {max} choices in all")]
    TooManyChoices { prompts: usize, n: usize, max: usize },
    #[error("{alternatives} logprob alternatives per token: a request takes 0 to {max}")]
    TooManyLogprobs { alternatives: usize, max: usize },
    #[error("tool_choice: {0}")]
    ToolChoice(String),
    #[error("messages[{index}].role {role:?} is not one of {known:?}")]
    UnknownRole { index: usize, role: String, known: [&'static str; 5] },
    #[error("builtin_tools: {name:?} is not one of Llama 3.1's built-in tools {known:?}")]
    UnknownBuiltinTool { name: String, known: [&'static str; 3] },
    #[error("the request needs {needed} KV pages ({positions} positions: the prompt's {prompt} and max_tokens {max_tokens}) but the KV pool holds {pool} pages of {page_size}: lower max_tokens or give the pool more memory")]
    DoesNotFit { needed: usize, positions: usize, prompt: usize, max_tokens: usize, pool: usize, page_size: usize },
    #[error("the draft model's {what} is {draft} but the model's {model}: {hint}")]
    DraftModelMismatch { what: &'static str, draft: usize, model: usize, hint: &'static str },
    #[error(transparent)]
    Sample(#[from] SampleError),
    #[error(transparent)]
    Text(#[from] TextError),
    #[error(transparent)]
    Grammar(#[from] GrammarError),
}

/// The endpoint a request came through, which decides the names of some of its fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Chat completions: the prompt is `messages`, the alternatives' count `top_logprobs`.
    Chat,
    /// Text completions: the prompt is `prompt`, the alternatives' count `logprobs`.
    Completion,
}

impl EngineError {
    /// The request field at fault, as OpenAI names it, when the error is the client's (hosts answer
    /// it as a bad request); None when the engine failed.
    pub fn blamed_field(&self, endpoint: Endpoint) -> Option<&'static str> {
        let chat = endpoint == Endpoint::Chat;
        Some(match self {
            Self::EmptyPrompt | Self::PromptTooLong { .. } => if chat { "messages" } else { "prompt" },
            Self::Text(TextError::TemplateRaised { .. }) | Self::UnknownRole { .. } => "messages",
            Self::MaxTokensTooLarge { .. } | Self::DoesNotFit { .. } => "max_tokens",
            Self::BadChoiceCount { .. } => "n",
            Self::TooManyChoices { .. } => "prompt",
            Self::TooManyLogprobs { .. } => if chat { "top_logprobs" } else { "logprobs" },
            Self::ToolChoice(_) => "tool_choice",
            Self::UnknownBuiltinTool { .. } => "builtin_tools",
            Self::Grammar(GrammarError::Invalid(_) | GrammarError::Tokenizer(_)) => "response_format",
            Self::Sample(SampleError::OutOfRange { name, .. }) => name,
            Self::Sample(SampleError::BadBiasKey(_) | SampleError::BiasTokenOutOfRange { .. }) => "logit_bias",
            _ => return None,
        })
    }
}

/// The most choices one request may ask for (OpenAI's limit for `n`).
pub const MAX_CHOICES: usize = 128;

/// The most alternatives returned with each token's log probability (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One request, or one choice of it, from waiting to finished.
struct Sequence {
    id: SequenceId,
    /// The first choice of the same request, whose prompt pages this one waits for.
    after: Option<SequenceId>,
    /// Row of the page table, while running.
    slot: usize,
    /// The prompt, then the generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Positions whose keys and values are in the sequence's pages.
    computed: usize,
    pages: Vec<u32>,
    /// Pages reserved at admission (those its tokens then fill) and not taken yet.
    reserved: usize,
    /// Chain hash of each full page, in order ([`page_hash`]).
    page_hashes: Vec<u64>,
    cached_prompt: usize,
    max_tokens: usize,
    sampler: Sampler,
    stops: StopStrings,
    stream: TextStream,
    text: String,
    cancel: CancelToken,
    /// The grammar the output must follow, and its mask for the token the pass in flight samples
    /// (computed while the GPU runs).
    constraint: Option<Constraint>,
    mask: Option<Result<Mask, GrammarError>>,
    /// Tells its thought from its answer (a reasoning model's chat), and the thought so far.
    thought: Option<ThoughtSplit>,
    reasoning: String,
    reasoning_tokens: usize,
    /// The grammar its answer follows, set aside while it thinks.
    answer_constraint: Option<Constraint>,
    /// Alternatives wanted with each token's log probability, and those recorded so far.
    top_logprobs: Option<usize>,
    logprobs: Vec<TokenLogprob>,
    /// Splits the output into content and tool calls, when tools are offered.
    tool_calls: Option<ToolCallStream>,
    calls: Vec<GeneratedToolCall>,
    /// The prompt to give back; with its log probabilities, every prompt position is an output
    /// row of its pass.
    echo: Option<Echo>,
    /// Tokens drafted, verified by the pass in flight.
    draft: Vec<u32>,
    /// Its runs of tokens, for prompt lookup.
    lookup: LookupIndex,
    /// Positions whose keys and values the draft model holds.
    draft_model_computed: usize,
    /// The prompt's last tokens and the request's predicted output, tokenized ([`draft::predicted_draft`]),
    /// and where in it the latest draft began.
    prediction: Vec<u32>,
    prediction_cursor: usize,
    /// Drafted tokens the model chose and did not: kept from the first draft, or from the start
    /// for a request with a prediction.
    drafts: Option<DraftUsage>,
    /// The most tokens the next draft may have: 2 more after a draft taken whole, 1 fewer after
    /// one that was not (Hugging Face's heuristic for assisted generation), so that a sequence
    /// whose drafts miss stops paying for long ones.
    draft_limit: usize,
    /// Whether it gave its pages back to make room for sequences admitted before it.
    preempted: bool,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Pages it holds or reserved: its positions below that many pages have a page.
    fn pages_held(&self) -> usize {
        self.pages.len() + self.reserved
    }

    fn max_positions(&self, context: usize) -> usize {
        max_positions(self.prompt_len, self.max_tokens, context)
    }

    /// Whether every prompt position's logits are read, to score the prompt's tokens.
    fn scores_prompt(&self) -> bool {
        self.echo.as_ref().is_some_and(|echo| echo.logprobs.is_some())
    }

    /// Whether its prompt's tokens are being scored: until the first token is generated (not
    /// again when its tokens are computed again after a preemption).
    fn scoring(&self) -> bool {
        self.scores_prompt() && self.generated() == 0
    }

    /// Tokens whose keys and values may come from the prefix cache: all but the last, whose
    /// logits give the next token; of a prompt being scored, those whose score is taken.
    fn reusable(&self) -> usize {
        match self.scoring() {
            true => self.echo.as_ref().and_then(|echo| echo.logprobs.as_ref()).map_or(0, Vec::len),
            false => self.tokens.len() - 1,
        }
    }

    /// Whether the next token is the argmax the GPU computes.
    fn plain_greedy(&self) -> bool {
        // Not while a grammar waits for the thought's end: the token after `</think>` takes its mask.
        self.sampler.options().is_plain_greedy() && self.constraint.is_none() && self.answer_constraint.is_none()
    }

    /// How it ends for its length, if it has reached `max_tokens` or the context.
    fn length_reached(&self, context: usize) -> Option<Ending> {
        (self.generated() >= self.max_tokens || self.tokens.len() >= context).then_some(Ok(FinishReason::Length))
    }

    /// Whether the token is chosen from the full logits whatever the GPU's candidates hold: for
    /// the grammar's mask, bias or penalties, or a sampler that draws from the whole vocabulary.
    fn reads_logits(&self) -> bool {
        !self.plain_greedy() && (self.constraint.is_some() || self.sampler.candidates_wanted().is_none())
    }

    /// What the GPU selects from the logits of the next token's row: the sampler's candidates,
    /// and the alternatives and normaliser of the token's log probability.
    fn selection(&self) -> Option<Selection> {
        let sampled = if self.reads_logits() { None } else { self.sampler.candidates_wanted() };
        if sampled.is_none() && self.top_logprobs.is_none() {
            return None;
        }
        let k = sampled.unwrap_or(1).max(self.top_logprobs.unwrap_or(0));
        let temperature = if sampled.is_some() { self.sampler.options().temperature } else { 1.0 };
        Some(Selection { k, temperature, scored_token: None })
    }

    /// Chooses the next token from the full logits: applies the grammar's mask (which leaves
    /// the tokens it allows as they were; computed now where the pass's was taken, for a drafted
    /// token's row), samples.
    fn choose(&mut self, logits: &mut [f32]) -> Result<u32, GrammarError> {
        if let Some(constraint) = &mut self.constraint {
            let mut mask = match self.mask.take() {
                Some(mask) => mask?,
                None => constraint.mask()?,
            };
            // A reasoning model may think before the grammar's answer, as where the prompt opened the thought.
            if let Some(start) = self.thought.as_ref().and_then(ThoughtSplit::may_begin) {
                mask.allow(start);
            }
            mask.apply(logits);
        }
        Ok(self.sampler.sample(logits))
    }
}

/// The log probability of `token`, whose logit is `logit`, and of the `alternatives` most likely
/// tokens, from the GPU's selection of its row (normaliser and candidates in rank order).
fn token_logprob(candidates: &Candidates, token: u32, logit: f32, alternatives: usize, bytes: &dyn Fn(u32) -> Vec<u8>) -> TokenLogprob {
    let top = candidates.tokens.iter().take(alternatives).map(|&(t, l)| TopLogprob { token: t, bytes: bytes(t), logprob: candidates.log_prob(l) }).collect();
    TokenLogprob { token, bytes: bytes(token), logprob: candidates.log_prob(logit), top }
}

/// A sequence's part of a pass: its tokens, how many of the first score the prompt token after
/// them (output rows before the sampled one), whether the pass samples its next token, and how
/// many of its tokens are drafts to verify (the last ones; each has an output row after the
/// sampled one's).
#[derive(Clone, Copy, Debug)]
struct PassRow {
    id: SequenceId,
    tokens: usize,
    scored: usize,
    output: bool,
    drafted: usize,
}

impl PassRow {
    fn output_rows(&self) -> usize {
        self.scored + self.output as usize + self.drafted
    }
}

pub struct Engine {
    model: Llama,
    prompter: Prompter,
    pages: PageAllocator,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    free_slots: Vec<usize>,
    /// The pass submitted and not read yet, by sequence in batch order.
    pending: Option<Vec<PassRow>>,
    next_id: SequenceId,
    /// Seeds for requests that bring none.
    seeds: ChaCha8Rng,
    /// Whether sequences draft by prompt lookup ([`Engine::with_prompt_lookup`]).
    prompt_lookup: bool,
    /// What requests that set no sampling of their own sample with ([`Engine::with_sampling_defaults`]).
    sampling_defaults: SamplingDefaults,
    /// A smaller model of the same vocabulary that drafts tokens ([`Engine::with_draft_model`]).
    draft_model: Option<Llama>,
    /// Sequences that gave their pages back to make room ([`Engine::make_room`]), in all.
    preemptions: u64,
}

impl Engine {
    /// `seed` drives requests without a seed of their own; hosts pass entropy.
    pub fn new(model: Llama, tokenizer: Tokenizer, template: ChatTemplate, seed: u64) -> Result<Self> {
        let model_vocab = model.config().vocab_size;
        if tokenizer.vocab_size() > model_vocab {
            return Err(EngineError::VocabMismatch { tokenizer: tokenizer.vocab_size(), model: model_vocab }.into());
        }
        let pages = PageAllocator::new(model.kv_pool().pages);
        let free_slots = (0..model.max_sequences()).rev().collect();
        let prompter = Prompter::new(tokenizer, template, model.config(), model.context_length());
        let mut sampling_defaults = model.config().sampling_defaults.clone();
        // A bad value in the model's files costs its recommendation, not the load.
        if let Err(error) = SamplerOptions::from_params(&SamplingParams::default().with_defaults(&sampling_defaults), model_vocab) {
            log::warn!("the model's recommended sampling is left out: {error}");
            sampling_defaults = SamplingDefaults::default();
        }
        Ok(Self {
            model,
            prompter,
            pages,
            waiting: VecDeque::new(),
            running: vec![],
            free_slots,
            pending: None,
            next_id: 0,
            seeds: ChaCha8Rng::seed_from_u64(seed),
            prompt_lookup: false,
            sampling_defaults,
            draft_model: None,
            preemptions: 0,
        })
    }

    /// With `on`, sequences draft the tokens that followed an earlier occurrence of their last
    /// tokens (prompt lookup) and verify them in one pass.
    pub fn with_prompt_lookup(mut self, on: bool) -> Self {
        self.prompt_lookup = on;
        self
    }

    /// With `on` (the default), requests sample as the model's files recommend (generation_config.json,
    /// a GGUF's `general.sampling.*`) where they set no temperature, top_p, top_k, min_p or
    /// repetition_penalty of their own, as vLLM and llama.cpp do; without, OpenAI's defaults
    /// (temperature 1, every token).
    pub fn with_sampling_defaults(mut self, on: bool) -> Self {
        if !on {
            self.sampling_defaults = SamplingDefaults::default();
        }
        self
    }

    /// The sampling requests take where they set none ([`Engine::with_sampling_defaults`]).
    pub fn sampling_defaults(&self) -> &SamplingDefaults {
        &self.sampling_defaults
    }

    /// With `on` (the default), the chats of a reasoning model (one whose template speaks of
    /// `<think>` and whose vocabulary has `<think>` and `</think>` as tokens) give its thought
    /// apart from its answer; without, the thought stays in the content.
    pub fn with_reasoning_parsed(mut self, on: bool) -> Self {
        self.prompter.parse_reasoning(on);
        self
    }

    /// Drafts tokens with `draft` (speculative decoding with a draft model, as llama.cpp's
    /// `--model-draft`): a smaller model of the same vocabulary (Llama 3.2 1B for Llama 3.1 8B),
    /// loaded with [`Engine::draft_load_options`]. Its KV pool has this model's pages and its page
    /// tables the same entries, so a sequence's pages hold both models' keys and values.
    pub fn with_draft_model(mut self, draft: Llama) -> Result<Self> {
        let (model, pool) = (&self.model, self.model.kv_pool());
        let hint = "load it with Engine::draft_load_options";
        let checks = [
            ("vocabulary", draft.config().vocab_size, model.config().vocab_size, "a draft model must share the model's tokenizer"),
            ("context", draft.context_length(), model.context_length(), hint),
            ("sequence count", draft.max_sequences(), model.max_sequences(), hint),
            ("KV page count", draft.kv_pool().pages, pool.pages, hint),
        ];
        if let Some((what, draft, model, hint)) = checks.into_iter().find(|c| c.1 != c.2) {
            return Err(EngineError::DraftModelMismatch { what, draft, model, hint }.into());
        }
        self.draft_model = Some(draft);
        Ok(self)
    }

    /// How to load a draft model of `config` for this engine: its context, sequences and as many
    /// KV pages.
    pub fn draft_load_options(&self, config: &Config) -> LoadOptions {
        let pool = self.model.kv_pool();
        LoadOptions {
            context_length: Some(self.model.context_length()),
            max_sequences: self.model.max_sequences(),
            kv_memory: Some(pool.pages as u64 * KvPool::bytes_per_page(config, pool.kv_type)),
            ..Default::default()
        }
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The model that drafts tokens, if one does ([`Engine::with_draft_model`]).
    pub fn draft_model(&self) -> Option<&Llama> {
        self.draft_model.as_ref()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        self.prompter.tokenizer()
    }

    /// What turns this engine's requests into prompts, for hosts that prepare them on threads of
    /// their own ([`Engine::add_prepared`]).
    pub fn prompter(&self) -> &Prompter {
        &self.prompter
    }

    /// Tokens that end generation.
    pub fn stop_tokens(&self) -> &[u32] {
        self.prompter.stop_tokens()
    }

    pub async fn chat(&mut self, request: &ChatCompletionRequest, cancel: &CancelToken, on_delta: &mut dyn FnMut(&Delta)) -> Result<Completion> {
        let prepared = self.prompter.prepare_chat(request, &RenderOptions::default())?;
        let id = self.add_prepared(prepared, cancel.clone(), 1)?[0];
        self.run_to_end(id, &mut deltas(on_delta)).await
    }

    pub async fn complete(&mut self, request: &CompletionRequest, cancel: &CancelToken, on_delta: &mut dyn FnMut(&Delta)) -> Result<Completion> {
        let prompt = self.prompter.text_prompt(&request.prompt)?;
        self.generate(&prompt, &request.sampling, cancel, on_delta).await
    }

    /// Runs one request to its end, calling `on_delta` for every token: [`Engine::add`], then
    /// [`Engine::step`] until it finishes. For hosts that run one request at a time; events of
    /// other sequences added before are dropped.
    pub async fn generate(&mut self, prompt: &[u32], params: &SamplingParams, cancel: &CancelToken, on_delta: &mut dyn FnMut(&Delta)) -> Result<Completion> {
        self.generate_with_events(prompt, params, cancel, &mut deltas(on_delta)).await
    }

    /// Like [`Engine::generate`], calling `on_event` with each of the request's deltas and, for a
    /// prompt longer than a pass, the progress of its prefill.
    pub async fn generate_with_events(&mut self, prompt: &[u32], params: &SamplingParams, cancel: &CancelToken, on_event: &mut dyn FnMut(&Event)) -> Result<Completion> {
        let id = self.add(prompt.to_vec(), params, cancel.clone())?;
        self.run_to_end(id, on_event).await
    }

    /// Runs a chat request alone to its end, as [`Engine::generate_with_events`] runs a prompt:
    /// its deltas tell a reasoning model's thought from its answer, its tools' calls are parsed.
    pub async fn chat_with_events(&mut self, request: &ChatCompletionRequest, cancel: &CancelToken, on_event: &mut dyn FnMut(&Event)) -> Result<Completion> {
        let id = self.add_work(&Work::Chat(request.clone()), &RenderOptions::default(), cancel.clone(), 1)?[0];
        self.run_to_end(id, on_event).await
    }

    async fn run_to_end(&mut self, id: SequenceId, on_event: &mut dyn FnMut(&Event)) -> Result<Completion> {
        loop {
            for (sequence, event) in self.step().await? {
                match event {
                    _ if sequence != id => {}
                    Event::Finished(completion) => return Ok(completion),
                    Event::Failed(error) => return Err(error),
                    event => on_event(&event),
                }
            }
        }
    }

    /// Queues a request after checking everything about it that can be checked now: a request
    /// that could never run is an error here, one that has to wait for room waits.
    pub fn add(&mut self, prompt: Vec<u32>, params: &SamplingParams, cancel: CancelToken) -> Result<SequenceId> {
        Ok(self.add_choices(prompt, params, cancel, 1)?[0])
    }

    /// Adds what a host read from a request ([`crate::api::request`]), `n` choices of it.
    pub fn add_work(&mut self, work: &Work, options: &RenderOptions, cancel: CancelToken, n: usize) -> Result<Vec<SequenceId>> {
        let prepared = self.prompter.prepare(work, options)?;
        self.add_prepared(prepared, cancel, n)
    }

    /// Queues `n` choices of one request (OpenAI's `n`), each a sequence of its own. The choices
    /// after the first wait until the first has its prompt in the KV pool, then start from its
    /// whole pages (the prefix cache), so the prompt is computed once and its pages are shared.
    /// With a seed, choice i samples with seed + i: the same choices as n requests with those seeds.
    pub fn add_choices(&mut self, prompt: Vec<u32>, params: &SamplingParams, cancel: CancelToken, n: usize) -> Result<Vec<SequenceId>> {
        let prepared = self.prompter.prepare(&Work::tokens(prompt, params.clone()), &RenderOptions::default())?;
        self.add_prepared(prepared, cancel, n)
    }

    /// Adds `n` choices of each prompt of a request a [`Prompter`] prepared, as
    /// [`Engine::add_choices`] adds them, prompt by prompt: the choices of each prompt are what a
    /// request of that prompt alone would give. Every prompt is checked before any is queued.
    pub fn add_prepared(&mut self, prepared: Prepared, cancel: CancelToken, n: usize) -> Result<Vec<SequenceId>> {
        let Prepared { prompts, echoes, sampling, constraint, calling, thought, prediction } = prepared;
        let params = &sampling.with_defaults(&self.sampling_defaults);
        let thinking = thought.as_ref().is_some_and(ThoughtSplit::thinking);
        if !(1..=MAX_CHOICES).contains(&n) {
            return Err(EngineError::BadChoiceCount { n, max: MAX_CHOICES }.into());
        }
        if prompts.len() * n > MAX_CHOICES {
            return Err(EngineError::TooManyChoices { prompts: prompts.len(), n, max: MAX_CHOICES }.into());
        }
        let max_tokens: Vec<usize> = prompts.iter().map(|prompt| self.max_tokens(prompt, params)).collect::<Result<_>>()?;
        let options = SamplerOptions::from_params(params, self.model.config().vocab_size).map_err(EngineError::from)?;
        let top_logprobs = params.logprobs_wanted();
        if let Some(alternatives) = top_logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
            return Err(EngineError::TooManyLogprobs { alternatives, max: MAX_TOP_LOGPROBS }.into());
        }
        let mut ids = Vec::with_capacity(prompts.len() * n);
        let mut echoes = echoes.map(Vec::into_iter);
        for (prompt, max_tokens) in prompts.into_iter().zip(max_tokens) {
            let echo = echoes.as_mut().and_then(Iterator::next);
            let first = self.next_id;
            for choice in 0..n {
                let id = self.next_id;
                self.next_id += 1;
                ids.push(id);
                let seed = params.seed.map_or_else(|| self.seeds.next_u64(), |seed| seed.wrapping_add(choice as u64));
                self.waiting.push_back(Sequence {
                    id,
                    after: (id != first).then_some(first),
                    slot: usize::MAX,
                    sampler: Sampler::new(options.clone(), seed, &prompt),
                    prompt_len: prompt.len(),
                    tokens: prompt.clone(),
                    computed: 0,
                    pages: vec![],
                    reserved: 0,
                    page_hashes: vec![],
                    cached_prompt: 0,
                    max_tokens,
                    stops: StopStrings::new(params.stop.clone().map(|s| s.into_vec()).unwrap_or_default()),
                    // Calls are told apart by the special tokens that begin them.
                    stream: if calling.is_some() { TextStream::with_special_tokens() } else { TextStream::new() },
                    text: String::new(),
                    cancel: cancel.clone(),
                    constraint: constraint.as_ref().filter(|_| !thinking).map(Constraint::fork),
                    mask: None,
                    thought: thought.clone(),
                    reasoning: String::new(),
                    reasoning_tokens: 0,
                    answer_constraint: constraint.as_ref().filter(|_| thinking).map(Constraint::fork),
                    top_logprobs,
                    logprobs: vec![],
                    tool_calls: calling.clone().map(|(format, tools)| ToolCallStream::new(format, tools)),
                    calls: vec![],
                    echo: echo.clone(),
                    draft: vec![],
                    lookup: LookupIndex::default(),
                    draft_model_computed: 0,
                    prediction: match prediction.is_empty() {
                        true => vec![],
                        false => [&prompt[prompt.len().saturating_sub(*LOOKUP_NGRAM.end() - 1)..], &prediction].concat(),
                    },
                    prediction_cursor: 0,
                    drafts: params.prediction.is_some().then(DraftUsage::default),
                    draft_limit: MAX_DRAFTS,
                    preempted: false,
                });
            }
        }
        Ok(ids)
    }

    /// The most tokens a sequence of `prompt` may generate (`max_tokens`, or without it until
    /// its context or the whole pool is full), once it is clear that it can ever run.
    fn max_tokens(&self, prompt: &[u32], params: &SamplingParams) -> Result<usize> {
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
            None => context.min(self.pages.total() * PAGE_SIZE).saturating_sub(prompt.len()).max(1),
        };
        let positions = max_positions(prompt.len(), max_tokens, context);
        let needed = positions.div_ceil(PAGE_SIZE);
        if needed > self.pages.total() {
            let pool = self.pages.total();
            return Err(EngineError::DoesNotFit { needed, positions, prompt: prompt.len(), max_tokens, pool, page_size: PAGE_SIZE }.into());
        }
        Ok(max_tokens)
    }

    /// Whether nothing is running, waiting or in flight.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty() && self.pending.is_none()
    }

    pub fn load(&self) -> Load {
        Load {
            running: self.running.len(),
            waiting: self.waiting.len(),
            max_sequences: self.model.max_sequences(),
            kv_pages: self.pages.total(),
            kv_pages_free: self.pages.free(),
            kv_page_size: PAGE_SIZE,
            kv_page_bytes: KvPool::bytes_per_page(self.model.config(), self.model.kv_pool().kv_type),
            kv_buffers: self.model.kv_pool().buffers(),
            preemptions: self.preemptions,
        }
    }

    /// Runs one pass: ends cancelled sequences, admits waiting ones that fit, runs every running
    /// sequence's next tokens, samples, and returns what happened to each sequence. A failure of
    /// the GPU ends every sequence (the error is returned; the engine is empty and ready after).
    pub async fn step(&mut self) -> Result<Vec<(SequenceId, Event)>> {
        let mut events = vec![];
        let result = self.try_step(&mut events).await;
        if let Err(error) = result {
            self.clear();
            return Err(error);
        }
        Ok(events)
    }

    async fn try_step(&mut self, events: &mut Vec<(SequenceId, Event)>) -> Result<()> {
        self.end_cancelled(events);
        let (rows, was_chained) = match self.pending.take() {
            Some(rows) => (rows, true),
            None => {
                self.admit();
                match self.submit_scheduled().await? {
                    Some(rows) => (rows, false),
                    None => return Ok(()),
                }
            }
        };
        // The pass after this one, when it is sure to be the same greedy decode step: submitted
        // before this one's tokens are read, taking them on the GPU.
        let chained = self.chain_after(&rows, was_chained)?;
        self.compute_masks(&rows);
        // A pass of prefill chunks only (no prompt scored) has no outputs to read.
        let output = match rows.iter().any(|r| r.output || r.scored > 0) {
            true => self.model.read_pass().await?,
            false => PassOutput::default(),
        };
        self.finish_pass(&rows, output, events).await?;
        self.pending = chained;
        Ok(())
    }

    /// The grammar masks for the tokens the pass of `rows` samples, computed while it runs.
    fn compute_masks(&mut self, rows: &[PassRow]) {
        for row in rows.iter().filter(|r| r.output) {
            if let Some(sequence) = self.running.iter_mut().find(|s| s.id == row.id) {
                if let Some(constraint) = &mut sequence.constraint {
                    sequence.mask = Some(constraint.mask());
                }
            }
        }
    }

    /// Ends cancelled sequences, waiting or running.
    fn end_cancelled(&mut self, events: &mut Vec<(SequenceId, Event)>) {
        let (cancelled, waiting): (Vec<Sequence>, Vec<Sequence>) = self.waiting.drain(..).partition(|s| s.cancel.is_cancelled());
        self.waiting = waiting.into();
        // A preempted one has its text to release.
        for sequence in cancelled {
            self.close(sequence, Ok(FinishReason::Abort), events);
        }
        while let Some(i) = self.running.iter().position(|s| s.cancel.is_cancelled()) {
            let sequence = self.running.remove(i);
            self.end(sequence, Ok(FinishReason::Abort), events);
        }
    }

    /// Moves waiting sequences, oldest first (those preempted before the rest), into free slots
    /// while the pool holds their tokens' pages and keeps a page free for each running sequence's
    /// next one; each starts from the longest cached prefix of its tokens. The pages a sequence
    /// fills as it decodes are taken then ([`Engine::make_room`]), not promised now: a request's
    /// `max_tokens` (by default the rest of its context) is what it may reach, not what it needs.
    fn admit(&mut self) {
        while let (Some(&slot), Some(sequence)) = (self.free_slots.last(), self.waiting.front()) {
            if sequence.after.is_some_and(|first| self.prompt_pending(first)) {
                break;
            }
            let prefix = self.pages.find_prefix(&sequence.tokens, sequence.reusable());
            let needed = sequence.tokens.len().div_ceil(PAGE_SIZE);
            let Some(pages) = self.pages.admit(&prefix, needed, self.running.len()) else { break };
            let Some(mut sequence) = self.waiting.pop_front() else { break };
            self.free_slots.pop();
            let mut parent = 0;
            for page in sequence.tokens[..prefix.full.len() * PAGE_SIZE].chunks(PAGE_SIZE) {
                parent = page_hash(parent, page);
                sequence.page_hashes.push(parent);
            }
            sequence.slot = slot;
            sequence.reserved = needed - pages.len();
            sequence.computed = prefix.tokens();
            if !sequence.preempted {
                sequence.cached_prompt = prefix.tokens();
            }
            if sequence.scoring() {
                // A prompt preempted while scored: the scores of positions not cached are taken again.
                if let Some(scores) = sequence.echo.as_mut().and_then(|echo| echo.logprobs.as_mut()) {
                    scores.truncate(sequence.computed);
                }
            }
            self.write_page_table(slot, 0, &pages);
            sequence.pages = pages;
            self.running.push(sequence);
        }
    }

    /// Submits a pass of the running sequences' next tokens: every decoding sequence's token (and
    /// the drafts of those that draft), then prefill chunks, oldest sequence first, as far as the batch
    /// size allows. Prompts being scored come last: each of their positions is an output row, and
    /// they take the rows left.
    async fn submit_scheduled(&mut self) -> Result<Option<Vec<PassRow>>> {
        self.make_room();
        let mut budget = self.model.max_batch();
        let mut outputs_left = self.model.max_outputs(); // rows of logits
        // Drafts only while the pass stays small enough to cost what a decode step does (and to
        // sum as one does): few sequences at a time, where a pass is bound by its weight reads.
        let decoding = self.running.iter().filter(|s| s.tokens.len() - s.computed == 1).count();
        let mut draft_room = self.draft_pass_limit().saturating_sub(decoding);
        let mut forced = match draft_room > 0 {
            true => self.forced_drafts(),
            false => HashMap::new(),
        };
        // Forced tokens are certain: guessed ones take only the room none of them needs.
        let mut forced_left: usize = forced.values().map(Vec::len).sum();
        let mut model_drafts = match self.draft_model.is_some() {
            true => self.draft_with_model(draft_room.min(outputs_left.saturating_sub(self.running.len())), &forced, forced_left).await?,
            false => HashMap::new(),
        };
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| {
            let sequence = &self.running[i];
            let prefill = sequence.tokens.len() - sequence.computed > 1;
            (prefill, prefill && sequence.scoring())
        });
        let mut rows = vec![];
        let mut batch = Batch::default();
        let mut ids = vec![];
        for i in order {
            let sequence = &self.running[i];
            let scoring = sequence.scoring();
            let mut take = (sequence.tokens.len() - sequence.computed).min(budget);
            if scoring {
                take = take.min(outputs_left);
            }
            if take == 0 {
                match scoring {
                    true => continue,
                    false => break,
                }
            }
            let first = sequence.computed;
            let output = first + take == sequence.tokens.len();
            if output && take == 1 {
                // Every sequence after this one keeps a row for its sampled token.
                let room = draft_room.min(budget - 1).min(outputs_left.saturating_sub(self.running.len() - rows.len()));
                let id = self.running[i].id;
                let forced = forced.remove(&id).unwrap_or_default();
                forced_left -= forced.len();
                self.draft_for(i, room, forced, forced_left, model_drafts.remove(&id));
            }
            let sequence = &self.running[i];
            let draft = &sequence.draft;
            draft_room -= draft.len();
            // Positions before the prompt's last score the prompt token after them.
            let scored = if scoring { (first + take).min(sequence.prompt_len - 1).saturating_sub(first) } else { 0 };
            ids.extend_from_slice(&sequence.tokens[first..first + take]);
            ids.extend_from_slice(draft);
            let row = PassRow { id: sequence.id, tokens: take + draft.len(), scored, output, drafted: draft.len() };
            budget -= row.tokens;
            self.place(i, first, row.tokens, &mut batch);
            let end = batch.slots.len() as u32;
            let first_row = end - row.tokens as u32;
            batch.outputs.extend(first_row..first_row + scored as u32);
            if output {
                batch.outputs.extend(end - 1 - row.drafted as u32..end);
            }
            outputs_left -= row.output_rows();
            rows.push(row);
        }
        if rows.is_empty() {
            return Ok(None);
        }
        // Top-k selections: each scored position's prompt token and its alternatives, and what
        // each sampled row's sequence wants (see Sequence::selection).
        let wanted = rows.iter().flat_map(|r| {
            let sequence = self.sequence(r.id);
            let scored = sequence.into_iter().flat_map(move |s| {
                let alternatives = s.top_logprobs.unwrap_or(0);
                (s.computed + 1..s.computed + 1 + r.scored).map(move |next| Some(Selection { k: alternatives.max(1), temperature: 1.0, scored_token: Some(s.tokens[next]) }))
            });
            let sampled = if r.output { 1 + r.drafted } else { 0 };
            scored.chain(std::iter::repeat_n(sequence.and_then(Sequence::selection), sampled))
        });
        batch.top_k = selections(wanted);
        self.model.submit(&batch, PassTokens::Host(&ids))?;
        Ok(Some(rows))
    }

    /// Gives every decoding sequence the page its next token's keys and values go to. Where no
    /// page is free, the sequence admitted last gives its pages back and waits to be computed
    /// again (vLLM's preemption by recomputation; its full pages stay in the prefix cache until
    /// they are taken, so often little is recomputed): the oldest sequences always go on.
    fn make_room(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let sequence = &self.running[i];
            let position = sequence.tokens.len() - 1;
            let needs_page = sequence.computed == position && sequence.pages_held() <= position / PAGE_SIZE;
            if needs_page && self.pages.available() == 0 {
                self.preempt(self.running.len() - 1);
                continue;
            }
            if needs_page {
                self.take_pages_through(i, position);
            }
            i += 1;
        }
    }

    /// Puts running sequence `i` back at the head of the queue without its pages: its tokens so
    /// far become the prompt it runs again from, with everything else it holds (sampler, grammar,
    /// text, log probabilities) kept, so its output goes on as if it had never stopped.
    fn preempt(&mut self, i: usize) {
        let mut sequence = self.running.remove(i);
        self.give_back_pages(&sequence);
        sequence.pages.clear();
        sequence.page_hashes.clear();
        sequence.slot = usize::MAX;
        (sequence.reserved, sequence.computed, sequence.draft_model_computed) = (0, 0, 0);
        sequence.preempted = true;
        self.preemptions += 1;
        self.waiting.push_front(sequence);
    }

    /// Adds the slots of running sequence `i`'s positions first..first + n to `batch`, taking
    /// pages where they begin new ones.
    fn place(&mut self, i: usize, first: usize, n: usize, batch: &mut Batch) {
        self.take_pages_through(i, first + n - 1);
        batch.slots.extend((first..first + n).map(|position| token_slot(&self.running[i], position)));
    }

    /// Takes pages for running sequence `i` up to the one of `position`: those it reserved, then
    /// unreserved ones, which the caller made sure of ([`Engine::make_room`], [`Engine::page_reach`]).
    fn take_pages_through(&mut self, i: usize, position: usize) {
        while self.running[i].pages.len() <= position / PAGE_SIZE {
            let sequence = &mut self.running[i];
            let taken = match sequence.reserved {
                0 => self.pages.take_unreserved().expect("a page within the sequence's reach is free"),
                _ => {
                    sequence.reserved -= 1;
                    self.pages.take_reserved()
                }
            };
            sequence.pages.push(taken);
            let (slot, page) = (sequence.slot, sequence.pages.len() - 1);
            self.write_page_table(slot, page, &[taken]);
        }
    }

    /// Sets page table entries of slot `slot` from `first` on, in both models'.
    fn write_page_table(&mut self, slot: usize, first: usize, pages: &[u32]) {
        self.model.write_page_table(slot, first, pages);
        if let Some(draft_model) = &mut self.draft_model {
            draft_model.write_page_table(slot, first, pages);
        }
    }

    /// Whether sequence `id` is waiting, or running with part of its prompt not yet in its pages.
    fn prompt_pending(&self, id: SequenceId) -> bool {
        self.waiting.iter().any(|s| s.id == id) || self.sequence(id).is_some_and(|s| s.computed < s.prompt_len)
    }

    fn sequence(&self, id: SequenceId) -> Option<&Sequence> {
        self.running.iter().find(|s| s.id == id)
    }

    /// Submits the greedy decode step after the pass of `rows`, fed by its tokens on the GPU, when
    /// that step is sure to run: the pass decoded every running sequence, each greedily, each will
    /// run again unless a stop ends it, and no waiting request could be admitted instead. Where a
    /// sequence may draft (from the tokens a pass computes, so not in a chained pass) and the pass
    /// found nothing to draft, every other step is chained: the chain's gain half kept, the
    /// chance to draft every other step.
    fn chain_after(&mut self, rows: &[PassRow], was_chained: bool) -> Result<Option<Vec<PassRow>>> {
        let context = self.model.context_length();
        let admissible = !self.waiting.is_empty() && !self.free_slots.is_empty();
        let all_decode = rows.len() == self.running.len() && rows.iter().all(|r| r.tokens == 1 && r.scored == 0 && r.output);
        // With as many sequences decoding as a pass with drafts holds, none drafts.
        let room_to_draft = rows.len() < self.draft_pass_limit();
        let runs_next = |s: &Sequence| {
            let may_draft = room_to_draft && self.may_draft(s);
            s.plain_greedy() && !(was_chained && may_draft) && s.generated() + 1 < s.max_tokens && s.tokens.len() + 1 < context
        };
        let indices: Vec<usize> = rows.iter().filter_map(|r| self.running.iter().position(|s| s.id == r.id && runs_next(s))).collect();
        // One past the token the pass in flight computes, each within pages it holds or that are free.
        let new_pages = indices.iter().filter(|&&i| self.running[i].pages_held() <= (self.running[i].computed + 1) / PAGE_SIZE).count();
        if admissible || !all_decode || indices.len() != rows.len() || new_pages > self.pages.available() {
            return Ok(None);
        }
        let mut batch = Batch::default();
        for &i in &indices {
            let position = self.running[i].computed + 1;
            self.place(i, position, 1, &mut batch);
            batch.outputs.push(batch.slots.len() as u32 - 1);
        }
        batch.top_k = selections(indices.iter().map(|&i| self.running[i].selection()));
        self.model.submit(&batch, PassTokens::Previous)?;
        Ok(Some(rows.to_vec()))
    }

    /// Takes in a pass's results: positions computed, full pages cached, a token sampled for
    /// every sequence with an output row, and sequences that end.
    async fn finish_pass(&mut self, rows: &[PassRow], output: PassOutput, events: &mut Vec<(SequenceId, Event)>) -> Result<()> {
        // The rows whose tokens take the full logits, read back together: one wait for the GPU per
        // pass, not one per such sequence.
        let (mut reading, mut next_row) = (vec![], 0);
        for row in rows {
            next_row += row.scored;
            if row.output && self.sequence(row.id).is_some_and(Sequence::reads_logits) {
                reading.extend(next_row..next_row + 1 + row.drafted);
            }
            next_row += row.output as usize + row.drafted;
        }
        let mut read_logits: HashMap<usize, Vec<f32>> = reading.iter().copied().zip(self.model.read_logits_rows(&reading).await?).collect();
        // Only log probabilities name tokens by their bytes; their requests built them when prepared.
        let wants_bytes = rows.iter().any(|r| self.sequence(r.id).is_some_and(|s| s.top_logprobs.is_some()));
        let token_bytes = if wants_bytes { self.prompter.token_bytes()? } else { Arc::default() };
        let tokenizer = self.prompter.tokenizer().clone();
        let bytes = token_bytes_of(&token_bytes, &tokenizer);
        let mut output_row = 0;
        for row in rows {
            let scored_rows = output_row..output_row + row.scored;
            let this_row = output_row + row.scored;
            output_row += row.output_rows();
            // A sequence cancelled or ended while the pass ran is gone; its results go unread.
            let Some(i) = self.running.iter().position(|s| s.id == row.id) else { continue };
            let sequence = &mut self.running[i];
            if let (Some(echo), Some(alternatives)) = (&mut sequence.echo, sequence.top_logprobs) {
                let scores = echo.logprobs.get_or_insert_with(Vec::new);
                for (row, position) in scored_rows.zip(sequence.computed..) {
                    let candidates = selected(&output, row)?;
                    let logit = candidates.scored_logit.ok_or_else(|| EngineError::Internal(format!("output row {row} scored no token")))?;
                    scores.push(token_logprob(candidates, sequence.tokens[position + 1], logit, alternatives, &bytes));
                }
            }
            // Drafts' positions count once the model has chosen their tokens.
            sequence.computed += row.tokens - row.drafted;
            self.cache_full_pages(i);
            let sequence = &mut self.running[i];
            if !row.output {
                // A preempted sequence computed again is no prompt's progress.
                if sequence.generated() == 0 {
                    events.push((sequence.id, Event::Prefill { done: sequence.computed, total: sequence.tokens.len() }));
                }
                continue;
            }
            if let Some(echo) = sequence.echo.as_ref().filter(|_| sequence.generated() == 0) {
                let tokens = sequence.tokens[..sequence.prompt_len].to_vec();
                events.push((sequence.id, Event::Echo(Echo { tokens, ..echo.clone() })));
            }
            // A request for its prompt alone (echo, max_tokens 0) ends with it.
            if sequence.max_tokens == 0 {
                let sequence = self.running.remove(i);
                self.end(sequence, Ok(FinishReason::Length), events);
                continue;
            }
            let mut ending = self.choose(i, this_row, &output, &mut read_logits, &bytes, events).await?;
            // While the model chose the drafted token (the token plain decoding chooses from that
            // row: the argmax, or a draw from the same random stream), the keys and values
            // computed for it stand, and its row gives the token after it.
            let draft = std::mem::take(&mut self.running[i].draft);
            let mut accepted = 0;
            for (row, &drafted) in (this_row + 1..).zip(&draft) {
                if ending.is_some() || self.running[i].tokens.last() != Some(&drafted) {
                    break;
                }
                self.running[i].computed += 1;
                accepted += 1;
                ending = self.choose(i, row, &output, &mut read_logits, &bytes, events).await?;
            }
            // The draft model's keys and values stand as far as the tokens they were computed for.
            let sequence = &mut self.running[i];
            sequence.draft_model_computed = sequence.draft_model_computed.min(sequence.computed);
            if !draft.is_empty() {
                self.cache_full_pages(i);
                let sequence = &mut self.running[i];
                let drafts = sequence.drafts.get_or_insert_default();
                drafts.accepted += accepted;
                drafts.rejected += draft.len() as u32 - accepted;
                sequence.draft_limit = match accepted as usize == draft.len() {
                    true => (sequence.draft_limit + 2).min(MAX_DRAFTS),
                    false => sequence.draft_limit.saturating_sub(1).max(1),
                };
            }
            if let Some(ending) = ending {
                let sequence = self.running.remove(i);
                self.end(sequence, ending, events);
            }
        }
        Ok(())
    }

    /// Chooses running sequence `i`'s next token from output row `row` and takes it in (see
    /// [`Engine::accept`]): the GPU's argmax for a plain greedy sequence, else a draw from the
    /// row's candidates or, where they do not suffice, from its full logits (read with the pass's
    /// in `read_logits` when the sequence reads them).
    async fn choose(&mut self, i: usize, row: usize, output: &PassOutput, read_logits: &mut HashMap<usize, Vec<f32>>, bytes: &dyn Fn(u32) -> Vec<u8>, events: &mut Vec<(SequenceId, Event)>) -> Result<Option<Ending>> {
        let sequence = &mut self.running[i];
        let from_gpu = match sequence.plain_greedy() {
            true => Some(output.argmax[row]),
            false if sequence.reads_logits() => None,
            false => output.candidates.get(row).and_then(|c| sequence.sampler.sample_candidates(c)),
        };
        // The chosen token, and its logit where the full logits were read (else the candidates
        // hold it), for its log probability.
        let chosen = match from_gpu {
            Some(token) => Ok((token, None)),
            None => {
                let mut logits = match read_logits.remove(&row) {
                    Some(logits) => logits,
                    // The candidates did not hold every token the filters keep.
                    None => self.model.read_logits(row).await?,
                };
                self.running[i].choose(&mut logits).map(|token| (token, Some(logits[token as usize])))
            }
        };
        Ok(match chosen {
            Ok((token, logit)) => {
                let logprob = logprob_of(output, row, token, logit, self.running[i].top_logprobs, bytes)?;
                self.accept(i, token, logprob, events)
            }
            Err(error) => Some(Err(EngineError::from(error).into())),
        })
    }

    /// Caches the full pages of running sequence `i` not cached yet, for later prompts to share.
    fn cache_full_pages(&mut self, i: usize) {
        let sequence = &mut self.running[i];
        while sequence.page_hashes.len() < sequence.computed / PAGE_SIZE {
            let index = sequence.page_hashes.len();
            let parent = sequence.page_hashes.last().copied().unwrap_or_default();
            let tokens = &sequence.tokens[index * PAGE_SIZE..(index + 1) * PAGE_SIZE];
            sequence.page_hashes.push(self.pages.cache_full(sequence.pages[index], parent, tokens));
        }
    }

    /// Adds a sampled token to sequence `i` and streams its text; returns how the sequence ends,
    /// if it does.
    fn accept(&mut self, i: usize, token: u32, logprob: Option<TokenLogprob>, events: &mut Vec<(SequenceId, Event)>) -> Option<Ending> {
        let context = self.model.context_length();
        let sequence = &mut self.running[i];
        sequence.sampler.accept(token);
        sequence.tokens.push(token);
        if self.prompter.stop_tokens().contains(&token) {
            return Some(Ok(FinishReason::Stop));
        }
        // Log probabilities are of the output's tokens, which a stop token is not.
        sequence.logprobs.extend(logprob.clone());
        let part = sequence.thought.as_mut().map_or(Part::Answer, |split| split.next(token));
        if part != Part::Answer {
            sequence.reasoning_tokens += 1;
            let text = match part {
                Part::Thought => sequence.stream.push(self.prompter.tokenizer(), token),
                // A marker's own text is neither thought nor answer: the thought's pending text goes out.
                _ => sequence.stream.finish(self.prompter.tokenizer()),
            };
            let text = match text {
                Ok(text) => text,
                Err(error) => return Some(Err(EngineError::from(error).into())),
            };
            // The grammar, fed none of the thought, waits for the answer.
            match part {
                Part::ThoughtBegins => sequence.answer_constraint = sequence.constraint.take(),
                Part::ThoughtEnds => sequence.constraint = sequence.answer_constraint.take(),
                Part::Thought | Part::Answer => {}
            }
            sequence.reasoning.push_str(&text);
            events.push((sequence.id, Event::Delta(Delta { text, token: Some(token), logprob, thought: true })));
            return sequence.length_reached(context);
        }
        if let Some(Err(error)) = sequence.constraint.as_mut().map(|c| c.accept(token)) {
            return Some(Err(EngineError::from(error).into()));
        }
        let mut piece = match sequence.stream.push(self.prompter.tokenizer(), token) {
            Ok(piece) => piece,
            Err(error) => return Some(Err(EngineError::from(error).into())),
        };
        if let Some(split) = &mut sequence.thought {
            piece = split.answer_text(piece);
        }
        let (mut emit, stopped) = sequence.stops.push(&piece);
        if let Some(tool_calls) = &mut sequence.tool_calls {
            emit = tool_calls.push(&emit);
        }
        sequence.text.push_str(&emit);
        events.push((sequence.id, Event::Delta(Delta { text: emit, token: Some(token), logprob, thought: false })));
        if stopped {
            return Some(Ok(FinishReason::Stop));
        }
        sequence.length_reached(context)
    }

    /// Ends a running sequence: its pages and slot given back, then closed ([`Engine::close`]).
    fn end(&mut self, sequence: Sequence, ending: Ending, events: &mut Vec<(SequenceId, Event)>) {
        self.give_back_pages(&sequence);
        self.close(sequence, ending, events);
    }

    /// Reports a sequence's end: its held-back text released, its tool calls parsed.
    fn close(&mut self, mut sequence: Sequence, mut ending: Ending, events: &mut Vec<(SequenceId, Event)>) {
        if ending.is_ok() {
            let tail = match sequence.stops.stopped() {
                true => Ok(String::new()),
                false => sequence.stream.finish(self.prompter.tokenizer()),
            };
            let thinking = sequence.thought.as_ref().is_some_and(ThoughtSplit::thinking);
            match tail {
                Ok(tail) if thinking => {
                    if !tail.is_empty() {
                        sequence.reasoning.push_str(&tail);
                        events.push((sequence.id, Event::Delta(Delta { text: tail, token: None, logprob: None, thought: true })));
                    }
                }
                Ok(mut tail) => {
                    if let Some(split) = &mut sequence.thought {
                        tail = split.answer_text(tail);
                    }
                    let mut rest = sequence.stops.flush(&tail);
                    if let Some(mut tool_calls) = sequence.tool_calls.take() {
                        let format = tool_calls.format();
                        tool_calls.push(&rest);
                        let parsed = tool_calls.finish();
                        rest = parsed.content;
                        sequence.calls = parsed.tool_calls.into_iter().map(|call| GeneratedToolCall { id: self.call_id(format), name: call.name, arguments: call.arguments }).collect();
                    }
                    if !rest.is_empty() {
                        sequence.text.push_str(&rest);
                        events.push((sequence.id, Event::Delta(Delta { text: rest, token: None, logprob: None, thought: false })));
                    }
                    if !sequence.calls.is_empty() && ending.as_ref().is_ok_and(|r| *r == FinishReason::Stop) {
                        ending = Ok(FinishReason::ToolCalls);
                    }
                }
                Err(error) => ending = Err(EngineError::from(error).into()),
            }
        }
        let id = sequence.id;
        let event = match ending {
            Ok(reason) => Event::Finished(completion(sequence, reason)),
            Err(error) => Event::Failed(error),
        };
        events.push((id, event));
    }

    /// Gives back a running sequence's pages, its partial last page cached, and its slot.
    fn give_back_pages(&mut self, sequence: &Sequence) {
        let partial = sequence.computed % PAGE_SIZE;
        let last = sequence.computed / PAGE_SIZE;
        if partial > 0 && last < sequence.pages.len() {
            let parent = sequence.page_hashes.get(last.wrapping_sub(1)).copied().unwrap_or_default();
            self.pages.cache_partial(sequence.pages[last], parent, &sequence.tokens[last * PAGE_SIZE..sequence.computed]);
        }
        self.pages.release(&sequence.pages, sequence.reserved);
        self.free_slots.push(sequence.slot);
    }

    /// A fresh id for a tool call written as `format` writes them.
    fn call_id(&mut self, format: ToolCallFormat) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        format.call_id(|| ALPHABET[(self.seeds.next_u32() % ALPHABET.len() as u32) as usize] as char)
    }

    /// Forgets every sequence and page (after a failed pass; a host whose step panicked).
    pub fn clear(&mut self) {
        self.waiting.clear();
        self.running.clear();
        self.pending = None;
        self.model.forget_passes();
        if let Some(draft_model) = &mut self.draft_model {
            draft_model.forget_passes();
        }
        self.pages = PageAllocator::new(self.model.kv_pool().pages);
        self.free_slots = (0..self.model.max_sequences()).rev().collect();
    }
}

/// The GPU's selection from output row `row` of a pass that made one for it.
fn selected(output: &PassOutput, row: usize) -> Result<&Candidates> {
    Ok(output.candidates.get(row).ok_or_else(|| EngineError::Internal(format!("output row {row} has no top-k selection")))?)
}

/// The log probability of `token` chosen from output row `row` (and its `alternatives`), when the
/// request wants them; `logit` where the full logits were read, else the candidates hold it.
fn logprob_of(output: &PassOutput, row: usize, token: u32, logit: Option<f32>, alternatives: Option<usize>, bytes: &dyn Fn(u32) -> Vec<u8>) -> Result<Option<TokenLogprob>> {
    let Some(alternatives) = alternatives else { return Ok(None) };
    let candidates = selected(output, row)?;
    let logit = logit.or_else(|| candidates.logit_of(token));
    let logit = logit.ok_or_else(|| EngineError::Internal(format!("token {token} of output row {row} is not among its candidates")))?;
    Ok(Some(token_logprob(candidates, token, logit, alternatives, &bytes)))
}

/// A pass's top-k selections: one for every output row when any row wants one (the others' go
/// unread), none otherwise.
fn selections(wanted: impl Iterator<Item = Option<Selection>>) -> Vec<Selection> {
    let wanted: Vec<Option<Selection>> = wanted.collect();
    match wanted.iter().any(Option::is_some) {
        true => wanted.into_iter().map(Option::unwrap_or_default).collect(),
        false => vec![],
    }
}

/// Where `sequence`'s `position` goes in a pass: its KV row in the page holding it.
fn token_slot(sequence: &Sequence, position: usize) -> TokenSlot {
    let kv_row = sequence.pages[position / PAGE_SIZE] as usize * PAGE_SIZE + position % PAGE_SIZE;
    TokenSlot { position: position as u32, kv_row: kv_row as u32, sequence: sequence.slot as u32, _pad: 0 }
}

/// Positions a sequence may reach, from which its pages are reserved.
fn max_positions(prompt: usize, max_tokens: usize, context: usize) -> usize {
    (prompt + max_tokens).min(context)
}

/// How a sequence ends: finished for a reason, or failed.
type Ending = Result<FinishReason>;

/// The completion of a sequence that ends for `reason`.
fn completion(sequence: Sequence, reason: FinishReason) -> Completion {
    let prompt_tokens = sequence.prompt_len as u32;
    let completion_tokens = sequence.generated() as u32;
    let thought = sequence.thought.as_ref().is_some_and(ThoughtSplit::thought);
    Completion {
        usage: Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            cached_prompt_tokens: sequence.cached_prompt as u32,
            reasoning_tokens: sequence.reasoning_tokens as u32,
            drafts: sequence.drafts,
        },
        reasoning: thought.then_some(sequence.reasoning),
        prompt_shared: sequence.after.is_some(),
        echo: sequence.echo.map(|echo| Echo { tokens: sequence.tokens[..sequence.prompt_len].to_vec(), ..echo }),
        tokens: sequence.tokens[sequence.prompt_len..].to_vec(),
        text: sequence.text,
        finish_reason: reason,
        logprobs: sequence.top_logprobs.map(|_| sequence.logprobs),
        tool_calls: sequence.calls,
    }
}
