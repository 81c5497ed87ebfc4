//! The engine every host drives: a model, its tokenizer and chat template, and a scheduler that
//! runs many sequences together. Requests are added (checked at once), wait for a sequence slot and
//! KV pages, and run: each step is one pass of the model holding the decode token of every running
//! sequence and prefill chunks of newly admitted ones, after which each sequence samples its next
//! token with its own sampler and streams its text. A new request reuses the KV pages of the longest
//! prefix it shares with any running or earlier sequence (whole pages; the partial last page of a
//! finished one too). When every running sequence decodes greedily, each pass is submitted before
//! the tokens of the one before are read: the tokens stay on the GPU.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::api::{
    ChatCompletionRequest, CompletionRequest, DraftUsage, FinishReason, GeneratedToolCall, Prediction, ResponseFormat, SamplingParams,
    TokenLogprob, Tool, ToolChoice, ToolChoiceMode, TopLogprob, Usage,
};
use crate::api::request::{Prompt, TokenizeInput, Work};
use crate::gpu::ops::{Candidates, Selection, TokenSlot};
use crate::grammar::{Constraint, Grammar, GrammarCompiler, GrammarError, Mask};
use crate::model::{page_hash, Batch, KvPool, PageAllocator, PassOutput, PassTokens, MAX_DRAFTS, MAX_DRAFT_PASS_TOKENS, PAGE_SIZE};
use crate::sample::{SampleError, Sampler, SamplerOptions};
use crate::text::tool_calls::{ToolCallFormat, ToolCallStream, ToolSet, BUILTIN_TOOLS};
use crate::text::{ChatTemplate, RenderOptions, TextError, TextStream, Tokenizer};
use crate::{Config, Llama, LoadOptions, Result};

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
    /// The token's log probability, when the request asked for them.
    pub logprob: Option<TokenLogprob>,
}

/// A finished generation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Completion {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    /// Each generated token's log probability, when the request asked for them.
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// The calls the output makes (then `text` is the content before them).
    pub tool_calls: Vec<GeneratedToolCall>,
    /// A later choice of its prompt, whose prompt tokens are counted with the first choice's.
    pub prompt_shared: bool,
    /// The prompt, when the request asked for it back (text completions' `echo`).
    pub echo: Option<Echo>,
}

/// A completion's prompt given back (text completions' `echo`), and with log probabilities asked
/// for, how likely the model found each of its tokens: what evaluation harnesses score.
#[derive(Clone, Debug, PartialEq)]
pub struct Echo {
    /// The prompt as the request gave it (token ids decoded, special tokens as text).
    pub text: String,
    /// The prompt's tokens; taken from the sequence when it ends.
    pub tokens: Vec<u32>,
    /// Leading tokens the text does not hold: the BOS token a text prompt is given.
    pub unwritten: usize,
    /// The first token's bytes, with the log probabilities (the others' come with theirs).
    pub first_token_bytes: Vec<u8>,
    /// The log probability of each token after the first, given the tokens before it, from the
    /// logits of every prompt position.
    pub logprobs: Option<Vec<TokenLogprob>>,
}

impl Completion {
    /// The usage of a request whose choices ended as `choices`: each prompt counted once (it is
    /// computed once; its cached tokens are its first choice's), the generated tokens of all.
    pub fn usage_of_choices(choices: &[Completion]) -> Usage {
        let firsts = || choices.iter().filter(|c| !c.prompt_shared);
        let prompt_tokens = firsts().map(|c| c.usage.prompt_tokens).sum();
        let completion_tokens = choices.iter().map(|c| c.usage.completion_tokens).sum();
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            cached_prompt_tokens: firsts().map(|c| c.usage.cached_prompt_tokens).sum(),
            drafts: DraftUsage::sum(choices.iter().map(|c| c.usage.drafts)),
        }
    }
}

/// The completions of one request's choices ([`Engine::add_choices`]) as they end, for hosts.
#[derive(Clone, Debug)]
pub struct ChoiceResults(Vec<Option<Completion>>);

impl ChoiceResults {
    pub fn new(choices: usize) -> Self {
        Self(vec![None; choices])
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Records how choice `index` ended; once every choice has, returns them all in order.
    pub fn record(&mut self, index: usize, completion: Completion) -> Option<Vec<Completion>> {
        if let Some(slot) = self.0.get_mut(index) {
            *slot = Some(completion);
        }
        self.0.iter().cloned().collect()
    }
}

/// Names a request from [`Engine::add`] until its [`Event::Finished`] or [`Event::Failed`].
pub type SequenceId = u64;

/// What a step reports of a sequence: each token's text, then exactly one end.
#[derive(Debug)]
pub enum Event {
    /// A pass computed a chunk of the prompt and more is to come: `done` of its `total` tokens are
    /// in the KV cache (a long prompt's progress).
    Prefill { done: usize, total: usize },
    /// A completion's prompt given back (`echo`), with its scores: sent once the prompt is in,
    /// before the first token.
    Echo(Echo),
    Delta(Delta),
    Finished(Completion),
    /// The sequence could not go on (its text could not be decoded); others run on.
    Failed(crate::Error),
}

/// An event callback that passes the deltas on to `on_delta`.
fn deltas(on_delta: &mut dyn FnMut(&Delta)) -> impl FnMut(&Event) + '_ {
    move |event| {
        if let Event::Delta(delta) = event {
            on_delta(delta)
        }
    }
}

/// What the scheduler holds, for `/health` and `info()`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Load {
    pub running: usize,
    pub waiting: usize,
    pub max_sequences: usize,
    pub kv_pages: usize,
    pub kv_pages_free: usize,
    pub kv_page_size: usize,
    /// Bytes a page takes over all layers, keys and values.
    pub kv_page_bytes: u64,
    /// Buffers each layer's keys (and values) lie in: more than one past the binding limit.
    pub kv_buffers: usize,
    /// Sequences that gave their pages back to make room for older ones and ran again from
    /// their tokens, since the engine started.
    pub preemptions: u64,
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
    /// The prompt's last tokens and the request's predicted output, tokenized ([`predicted_draft`]),
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
        self.sampler.options().is_plain_greedy() && self.constraint.is_none()
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
            let mask = match self.mask.take() {
                Some(mask) => mask?,
                None => constraint.mask()?,
            };
            mask.apply(logits);
        }
        Ok(self.sampler.sample(logits))
    }
}

/// Each token's bytes for log probabilities (`token_bytes`, built when a request wanting them
/// was prepared); a special token's are its name.
fn token_bytes_of<'a>(token_bytes: &'a TokenBytes, tokenizer: &'a Tokenizer) -> impl Fn(u32) -> Vec<u8> + 'a {
    move |token| match token_bytes.get(token as usize) {
        Some(Some(bytes)) => bytes.clone(),
        _ => tokenizer.decode(&[token], false).unwrap_or_default().into_bytes(),
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

/// A request made ready for the engine: its prompts rendered and tokenized (ids within the
/// model's vocabulary; one for a chat), its grammar compiled, and how its tool calls are told apart.
/// [`Prompter::prepare`] makes it on any thread, so that a long prompt's rendering and tokenizing
/// (0.8 s for 100,000 tokens on a 2-core machine) or a large grammar's compiling (15 ms for 30
/// tools) does not hold up the sequences the engine runs, which all wait for its thread.
pub struct Prepared {
    prompts: Vec<Vec<u32>>,
    /// Each prompt to give back, when the request asked (`echo`).
    echoes: Option<Vec<Echo>>,
    sampling: SamplingParams,
    constraint: Option<Constraint>,
    calling: Option<ToolCalling>,
    /// The predicted output's tokens (none without a prediction).
    prediction: Vec<u32>,
}

/// Turns requests into prompts: an engine's tokenizer and chat template (both cheap to clone and
/// shared across threads), its model's vocabulary and the tables built from it.
#[derive(Clone)]
pub struct Prompter {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    bos_token_id: Option<u32>,
    vocab_size: usize,
    /// Positions a sequence may reach.
    context: usize,
    stop_tokens: Vec<u32>,
    tables: Arc<VocabularyTables>,
}

/// Built from the vocabulary on first use and shared by every clone of a [`Prompter`]: each
/// token's bytes (for grammars and log probabilities) and the grammar compiler (0.4 s for Llama
/// 3's 128K tokens on a 2-core machine), so neither is built on the engine's thread.
#[derive(Default)]
struct VocabularyTables {
    token_bytes: Mutex<Option<Arc<TokenBytes>>>,
    grammars: Mutex<Option<Arc<GrammarCompiler>>>,
}

/// Each token's bytes, by id; None for special tokens and ids without any.
pub type TokenBytes = Vec<Option<Vec<u8>>>;

/// The value in `cell`, built the first time; callers at the same time wait for that one build.
fn built_once<T>(cell: &Mutex<Option<Arc<T>>>, build: impl FnOnce() -> Result<T>) -> Result<Arc<T>> {
    let mut value = cell.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(built) = &*value {
        return Ok(built.clone());
    }
    let built = Arc::new(build()?);
    *value = Some(built.clone());
    Ok(built)
}

impl Prompter {
    /// What a host read from a request ([`crate::api::request`]), ready for [`Engine::add_prepared`].
    pub fn prepare(&self, work: &Work, options: &RenderOptions) -> Result<Prepared> {
        let (prompts, sampling, echo) = match work {
            Work::Chat(request) => return self.prepare_chat(request, options),
            Work::Complete { prompts, sampling, echo } => (prompts, sampling, *echo),
        };
        if prompts.is_empty() {
            return Err(EngineError::EmptyPrompt.into());
        }
        let ids = prompts
            .iter()
            .map(|prompt| match prompt {
                Prompt::Text(text) => self.text_prompt(text),
                Prompt::Tokens(ids) => match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
                    Some(&id) => Err(EngineError::Text(TextError::UnknownTokenId { id, vocab_size: self.vocab_size }).into()),
                    None => Ok(ids.clone()),
                },
            })
            .collect::<Result<Vec<_>>>()?;
        let grammar = response_format_grammar(sampling)?;
        let mut prepared = self.finish(ids, sampling, grammar, None)?;
        if echo {
            let logprobs = sampling.logprobs_wanted().map(|_| vec![]);
            let token_bytes = if logprobs.is_some() { self.token_bytes()? } else { Arc::default() };
            let bytes = token_bytes_of(&token_bytes, &self.tokenizer);
            let echoes = prompts.iter().zip(&prepared.prompts).map(|(prompt, ids)| {
                let (text, unwritten) = match prompt {
                    Prompt::Text(text) => (text.clone(), self.bos_token_id.is_some() as usize),
                    Prompt::Tokens(given) => (self.tokenizer.decode(given, false).map_err(EngineError::from)?, 0),
                };
                let first_token_bytes = ids.first().filter(|_| logprobs.is_some()).map(|&id| bytes(id)).unwrap_or_default();
                Ok(Echo { text, tokens: vec![], unwritten, first_token_bytes, logprobs: logprobs.clone() })
            });
            prepared.echoes = Some(echoes.collect::<Result<_>>()?);
        }
        Ok(prepared)
    }

    /// A prepared request: its grammar compiled and, when it wants log probabilities, the
    /// tokens' bytes built.
    fn finish(&self, prompts: Vec<Vec<u32>>, sampling: &SamplingParams, grammar: Option<Grammar>, calling: Option<ToolCalling>) -> Result<Prepared> {
        let constraint = match grammar {
            Some(grammar) => Some(self.grammars()?.compile(&grammar).map_err(EngineError::from)?),
            None => None,
        };
        if sampling.logprobs_wanted().is_some() {
            self.token_bytes()?;
        }
        let prediction = match &sampling.prediction {
            Some(Prediction::Content { content }) => self.tokenizer.encode(content, false).map_err(EngineError::from)?,
            None => vec![],
        };
        Ok(Prepared { prompts, echoes: None, sampling: sampling.clone(), constraint, calling, prediction })
    }

    /// Tokens that end generation.
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Positions a sequence may reach (`/tokenize`'s `max_model_len`).
    pub fn context(&self) -> usize {
        self.context
    }

    /// The bytes of each token of the model's vocabulary ([`Tokenizer::token_bytes`]; None for
    /// special tokens and ids without one), computed once.
    pub fn token_bytes(&self) -> Result<Arc<TokenBytes>> {
        built_once(&self.tables.token_bytes, || {
            let mut token_bytes = self.tokenizer.token_bytes().map_err(EngineError::from)?;
            token_bytes.resize(self.vocab_size, None);
            Ok(token_bytes)
        })
    }

    /// The compiler of this vocabulary's grammars, built once.
    pub fn grammars(&self) -> Result<Arc<GrammarCompiler>> {
        built_once(&self.tables.grammars, || {
            let token_bytes = self.token_bytes()?;
            Ok(GrammarCompiler::new(&self.tokenizer, &token_bytes, &self.stop_tokens).map_err(EngineError::from)?)
        })
    }

    /// The tokens a tokenize request asks for: a completion's or a chat request's prompt as the
    /// engine would run it, or a text without BOS.
    pub fn tokenize(&self, input: &TokenizeInput, options: &RenderOptions) -> Result<Vec<u32>> {
        match input {
            TokenizeInput::Text { text, add_special_tokens: true } => self.text_prompt(text),
            TokenizeInput::Text { text, add_special_tokens: false } => Ok(self.tokenizer.encode(text, true).map_err(EngineError::from)?),
            TokenizeInput::Chat { request, add_generation_prompt } => self.render_chat(request, *add_generation_prompt, options),
        }
    }

    /// The prompt tokens of a chat request ([`ChatTemplate::encode`]), with the tools it shows.
    pub fn chat_prompt(&self, request: &ChatCompletionRequest, options: &RenderOptions) -> Result<Vec<u32>> {
        self.render_chat(request, true, options)
    }

    fn render_chat(&self, request: &ChatCompletionRequest, add_generation_prompt: bool, options: &RenderOptions) -> Result<Vec<u32>> {
        // A template renders what it does not know as it likes (Llama 3.1's as a header of that
        // name), so a typo would silently become another turn.
        const ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "ipython"];
        if let Some((index, message)) = request.messages.iter().enumerate().find(|(_, m)| !ROLES.contains(&m.role.as_str())) {
            return Err(EngineError::UnknownRole { index, role: message.role.clone(), known: ROLES }.into());
        }
        let tools = Some(offered_tools(request)).filter(|tools| !tools.is_empty());
        let mut options = options.clone();
        if request.builtin_tools.is_some() {
            options.builtin_tools = request.builtin_tools.clone();
        }
        Ok(self.template.encode(&self.tokenizer, &request.messages, tools, add_generation_prompt, &options).map_err(EngineError::from)?)
    }

    /// A chat request prepared: when it offers tools and the template has a call format, each
    /// output is split into content and calls; `tool_choice` required or a named function makes
    /// the output such calls (constrained decoding).
    fn prepare_chat(&self, request: &ChatCompletionRequest, options: &RenderOptions) -> Result<Prepared> {
        let prompt = self.chat_prompt(request, options)?;
        let calling = self.tool_calling(request, options)?;
        let forced = match &request.tool_choice {
            Some(ToolChoice::Mode(ToolChoiceMode::Required)) => Some(None),
            Some(ToolChoice::Function { function, .. }) => Some(Some(function.name.as_str())),
            _ => None,
        };
        let grammar = match (forced, &calling) {
            (None, _) => response_format_grammar(&request.sampling)?,
            (Some(_), None) => {
                let builtin = request.builtin_tools.as_ref().or(options.builtin_tools.as_ref());
                let reason = match offered_tools(request).is_empty() && builtin.is_none_or(Vec::is_empty) {
                    true => "no tools are offered, so none can be required",
                    false => "this model's chat template has no tool-call format, so no call can be required",
                };
                return Err(EngineError::ToolChoice(reason.into()).into());
            }
            (Some(only), Some((format, tools))) => {
                if request.sampling.response_format.as_ref().is_some_and(|f| *f != ResponseFormat::Text) {
                    return Err(EngineError::ToolChoice("a required tool call and a response_format cannot both shape the output".into()).into());
                }
                if !tools.builtin.is_empty() && *format == ToolCallFormat::Llama3 && self.tokenizer.token_id("<|python_tag|>").is_none() {
                    return Err(EngineError::ToolChoice("built-in tools are called after <|python_tag|>, a token this model's tokenizer does not have".into()).into());
                }
                let parallel = request.parallel_tool_calls.unwrap_or(true);
                Some(Grammar::tool_calls(*format, offered_tools(request), &tools.builtin, only, parallel).map_err(EngineError::ToolChoice)?)
            }
        };
        self.finish(vec![prompt], &request.sampling, grammar, calling)
    }

    /// The tools a chat request offers and how their calls are written, when they can be parsed.
    fn tool_calling(&self, request: &ChatCompletionRequest, options: &RenderOptions) -> Result<Option<ToolCalling>> {
        let tools = offered_tools(request);
        let builtin = request.builtin_tools.clone().or_else(|| options.builtin_tools.clone()).unwrap_or_default();
        if let Some(unknown) = builtin.iter().find(|name| !BUILTIN_TOOLS.contains(&name.as_str())) {
            return Err(EngineError::UnknownBuiltinTool { name: unknown.clone(), known: BUILTIN_TOOLS }.into());
        }
        let functions: Vec<String> = tools.iter().filter_map(|t| t.function.get("name").and_then(|n| n.as_str()).map(str::to_string)).collect();
        if functions.len() != tools.len() {
            return Err(EngineError::ToolChoice("every tool needs a function with a name".into()).into());
        }
        if functions.is_empty() && builtin.is_empty() {
            return Ok(None);
        }
        Ok(ToolCallFormat::detect(self.template.source()).map(|format| (format, ToolSet { functions, builtin })))
    }

    /// The prompt tokens of a raw text completion: the model's BOS token, then the text with
    /// special-token text parsed.
    pub fn text_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut prompt: Vec<u32> = self.bos_token_id.into_iter().collect();
        prompt.extend(self.tokenizer.encode(text, true).map_err(EngineError::from)?);
        Ok(prompt)
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
        let mut stop_tokens = model.config().eos_token_ids.clone();
        for name in ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"] {
            if let Some(id) = tokenizer.token_id(name).filter(|id| !stop_tokens.contains(id)) {
                stop_tokens.push(id);
            }
        }
        let pages = PageAllocator::new(model.kv_pool().pages);
        let free_slots = (0..model.max_sequences()).rev().collect();
        let prompter = Prompter {
            tokenizer,
            template,
            bos_token_id: model.config().bos_token_id,
            vocab_size: model_vocab,
            context: model.context_length(),
            stop_tokens,
            tables: Arc::default(),
        };
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
            draft_model: None,
            preemptions: 0,
        })
    }

    /// With `on`, sequences draft the tokens that followed an earlier occurrence of their last
    /// tokens ([`prompt_lookup`]) and verify them in one pass.
    pub fn with_prompt_lookup(mut self, on: bool) -> Self {
        self.prompt_lookup = on;
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
        &self.prompter.tokenizer
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
        let Prepared { prompts, echoes, sampling: ref params, constraint, calling, prediction } = prepared;
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
                    constraint: constraint.as_ref().map(Constraint::fork),
                    mask: None,
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

    /// Drafts up to `room` tokens for decoding sequence `i` to verify, within its pages' reach:
    /// the tokens its grammar forces (all that fit: they are certain), then up to its draft limit
    /// guessed after them, leaving `others_forced` of the room to the forced tokens of the
    /// sequences after it: from its prediction (moving its cursor), else the draft model's
    /// `model_draft` (drafted after the forced tokens), else by prompt lookup where the engine
    /// does it; cut at the first one its grammar forbids. So a JSON value predicted, drafted or
    /// copied from the prompt is verified in the pass that verifies the key before it.
    fn draft_for(&mut self, i: usize, room: usize, forced: Vec<u32>, others_forced: usize, model_draft: Option<Vec<u32>>) {
        if !self.may_draft(&self.running[i]) {
            return;
        }
        let (room, lookup) = (self.draft_room(i, room), self.prompt_lookup);
        let sequence = &mut self.running[i];
        let mut draft = forced;
        draft.truncate(room);
        let max = (room - draft.len()).saturating_sub(others_forced).min(sequence.draft_limit);
        let last_runs = last_tokens(&sequence.tokens, &draft);
        let mut guessed = if let Some((drafted, begin)) = predicted_draft(&last_runs, &sequence.prediction, sequence.prediction_cursor, max) {
            sequence.prediction_cursor = begin;
            drafted
        } else if let Some(mut drafted) = model_draft {
            drafted.truncate(max);
            drafted
        } else if lookup {
            sequence.lookup.draft(&sequence.tokens, &draft, max)
        } else {
            vec![]
        };
        if let Some(constraint) = sequence.constraint.as_mut().filter(|_| !guessed.is_empty()) {
            // A guess the grammar forbids is never taken: its row and those after it are wasted.
            let allowed = constraint.allowed_run(&[&draft[..], &guessed[..]].concat());
            guessed.truncate(allowed.saturating_sub(draft.len()));
        }
        draft.extend(guessed);
        sequence.draft = draft;
    }

    /// The tokens the grammars of decoding sequences force next (the rest of a JSON schema's
    /// key, a tool call's name), where there are any: drafts the model's masked rows choose, as
    /// the first of them is the only token such a row's mask allows.
    fn forced_drafts(&mut self) -> HashMap<SequenceId, Vec<u32>> {
        let decoding = self.running.iter_mut().filter(|s| s.tokens.len() - s.computed == 1);
        decoding
            .filter_map(|s| {
                let forced = s.constraint.as_mut()?.forced_tokens();
                (!forced.is_empty()).then_some((s.id, forced))
            })
            .collect()
    }

    /// The most tokens decoding sequence `i` may draft, within `room`: the positions it may
    /// reach and those within its pages' reach.
    fn draft_room(&self, i: usize, room: usize) -> usize {
        let sequence = &self.running[i];
        let positions_left = sequence.max_positions(self.model.context_length()).saturating_sub(sequence.tokens.len() + 1);
        let paged = self.page_reach(i).saturating_sub(sequence.tokens.len());
        room.min(positions_left).min(paged)
    }

    /// Positions running sequence `i` may write without preempting anyone: those of its pages,
    /// taken or reserved, and of one page more while the pool has a page unpromised for every
    /// running sequence and one more each besides (a draft's positions reach into one page at
    /// most, so drafts never take the pages decoding needs).
    fn page_reach(&self, i: usize) -> usize {
        let sequence = &self.running[i];
        let spare = self.pages.available() >= 2 * self.running.len();
        (sequence.pages_held() + spare as usize) * PAGE_SIZE
    }

    /// Drafts with the draft model for the decoding sequences that may draft and have no
    /// prediction to draft from, in the room of `room` that the `forced_total` tokens grammars
    /// force leave: a pass that brings each one's keys and values up to its last token and the
    /// tokens its grammar forces after it (`forced`) and gives its first drafted token (a greedy
    /// one), then a one-token pass for each next, fed the argmax of the one before on the GPU.
    /// The same first pass brings the draft model up to the positions the model has computed of
    /// the prompts being prefilled, so that they draft from their first decode step (unless there
    /// is no room to draft now); what does not fit it catches up in later ones. The draft model's
    /// keys and values for drafted tokens stand where they are taken.
    async fn draft_with_model(&mut self, room: usize, forced: &HashMap<SequenceId, Vec<u32>>, forced_total: usize) -> Result<HashMap<SequenceId, Vec<u32>>> {
        let Some(draft_model) = &self.draft_model else { return Ok(HashMap::new()) };
        let guess_room = room.saturating_sub(forced_total);
        let mut budget = draft_model.max_batch();
        let ahead = |s: &Sequence| forced.get(&s.id).map_or(&[][..], Vec::as_slice);
        let wants = |s: &Sequence| {
            s.tokens.len() - s.computed == 1 && predicted_draft(&last_tokens(&s.tokens, ahead(s)), &s.prediction, s.prediction_cursor, 1).is_none()
        };
        let mut drafting: Vec<(usize, usize)> = (0..self.running.len())
            .filter(|&i| wants(&self.running[i]))
            .map(|i| (i, self.draft_room(i, room).saturating_sub(ahead(&self.running[i]).len()).min(guess_room).min(self.running[i].draft_limit)))
            .collect();
        drafting.retain(|&(_, max)| max > 0);
        drafting.truncate(guess_room);
        // The same number of passes for all (each one-token pass takes the argmax of every output
        // row of the pass before), their positions within every sequence's reach.
        let context = self.model.context_length();
        let positions_left = drafting
            .iter()
            .map(|&(i, _)| {
                let sequence = &self.running[i];
                (sequence.max_positions(context) + 1).min(self.page_reach(i) + 1) - sequence.tokens.len() - ahead(sequence).len()
            })
            .min();
        let longest = drafting.iter().map(|d| d.1).max().unwrap_or(0);
        let k = longest.min(guess_room / drafting.len().max(1)).min(positions_left.unwrap_or(0));
        let (mut batch, mut ids, mut drafted) = (Batch::default(), vec![], vec![]);
        for (i, max) in drafting {
            let sequence = &self.running[i];
            let forced = ahead(sequence);
            let (first, len) = (sequence.draft_model_computed.min(sequence.computed), sequence.tokens.len() + forced.len());
            let take = (len - first).min(budget);
            if take == 0 {
                continue;
            }
            budget -= take;
            let caught_up = first + take == len;
            // Positions up to the last drafted token's input.
            self.take_pages_through(i, if caught_up { len + k - 2 } else { first + take - 1 });
            catch_up(&mut self.running[i], forced, first..first + take, &mut batch, &mut ids);
            if caught_up {
                batch.outputs.push(batch.slots.len() as u32 - 1);
                drafted.push((i, max.min(k), Vec::with_capacity(k)));
            }
        }
        // Not while too many sequences decode to draft: their prompts catch up when there is room.
        let prefilling = self.running.iter_mut().filter(|s| room > 0 && s.tokens.len() - s.computed > 1);
        for sequence in prefilling {
            let (first, last) = (sequence.draft_model_computed.min(sequence.computed), sequence.computed);
            let take = (last - first).min(budget);
            budget -= take;
            catch_up(sequence, &[], first..first + take, &mut batch, &mut ids);
        }
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let Some(draft_model) = &mut self.draft_model else { return Ok(HashMap::new()) };
        draft_model.submit(&batch, PassTokens::Host(&ids))?;
        if drafted.is_empty() {
            return Ok(HashMap::new());
        }
        for pass in 1..=k {
            // The next pass goes in before this one is read, the GPU busy meanwhile.
            if pass < k {
                let last_input = |i: usize| self.running[i].tokens.len() + ahead(&self.running[i]).len() - 1;
                let next = Batch {
                    slots: drafted.iter().map(|&(i, ..)| token_slot(&self.running[i], last_input(i) + pass)).collect(),
                    outputs: (0..drafted.len() as u32).collect(),
                    top_k: vec![],
                };
                draft_model.submit(&next, PassTokens::Previous)?;
            }
            let output = draft_model.read_pass().await?;
            for ((.., tokens), &token) in drafted.iter_mut().zip(&output.argmax) {
                tokens.push(token);
            }
        }
        let mut drafts = HashMap::new();
        for (i, max, mut tokens) in drafted {
            let forced = ahead(&self.running[i]).len();
            let sequence = &mut self.running[i];
            sequence.draft_model_computed = sequence.tokens.len() + forced + k - 1;
            tokens.truncate(max);
            drafts.insert(sequence.id, tokens);
        }
        Ok(drafts)
    }

    /// The most tokens a pass with drafts holds: one group of GEMV columns.
    fn draft_pass_limit(&self) -> usize {
        MAX_DRAFT_PASS_TOKENS.min(self.model.gpu().gemv_max_tokens as usize)
    }

    /// Whether `sequence` may draft tokens to verify (and so reads each token before its next pass).
    fn may_draft(&self, sequence: &Sequence) -> bool {
        self.prompt_lookup || self.draft_model.is_some() || !sequence.prediction.is_empty() || sequence.constraint.is_some()
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
        let tokenizer = self.prompter.tokenizer.clone();
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
        if self.prompter.stop_tokens.contains(&token) {
            return Some(Ok(FinishReason::Stop));
        }
        // Log probabilities are of the output's tokens, which a stop token is not.
        sequence.logprobs.extend(logprob.clone());
        if let Some(Err(error)) = sequence.constraint.as_mut().map(|c| c.accept(token)) {
            return Some(Err(EngineError::from(error).into()));
        }
        let piece = match sequence.stream.push(&self.prompter.tokenizer, token) {
            Ok(piece) => piece,
            Err(error) => return Some(Err(EngineError::from(error).into())),
        };
        let (mut emit, stopped) = sequence.stops.push(&piece);
        if let Some(tool_calls) = &mut sequence.tool_calls {
            emit = tool_calls.push(&emit);
        }
        sequence.text.push_str(&emit);
        events.push((sequence.id, Event::Delta(Delta { text: emit, token: Some(token), logprob })));
        if stopped {
            return Some(Ok(FinishReason::Stop));
        }
        (sequence.generated() >= sequence.max_tokens || sequence.tokens.len() >= context).then_some(Ok(FinishReason::Length))
    }

    /// Ends a running sequence: its pages and slot given back, then closed ([`Engine::close`]).
    fn end(&mut self, sequence: Sequence, ending: Ending, events: &mut Vec<(SequenceId, Event)>) {
        self.give_back_pages(&sequence);
        self.close(sequence, ending, events);
    }

    /// Reports a sequence's end: its held-back text released, its tool calls parsed.
    fn close(&mut self, mut sequence: Sequence, mut ending: Ending, events: &mut Vec<(SequenceId, Event)>) {
        if ending.is_ok() {
            let tail = match sequence.stops.stopped {
                true => Ok(String::new()),
                false => sequence.stream.finish(&self.prompter.tokenizer).map(|tail| sequence.stops.flush(&tail)),
            };
            match tail {
                Ok(mut rest) => {
                    if let Some(mut tool_calls) = sequence.tool_calls.take() {
                        tool_calls.push(&rest);
                        let parsed = tool_calls.finish();
                        rest = parsed.content;
                        sequence.calls = parsed.tool_calls.into_iter().map(|call| GeneratedToolCall { id: self.call_id(), name: call.name, arguments: call.arguments }).collect();
                    }
                    if !rest.is_empty() {
                        sequence.text.push_str(&rest);
                        events.push((sequence.id, Event::Delta(Delta { text: rest, token: None, logprob: None })));
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

    /// A fresh id for a tool call, as OpenAI's: `call_` and 24 letters and digits.
    fn call_id(&mut self) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let letters: String = (0..24).map(|_| ALPHABET[(self.seeds.next_u32() % ALPHABET.len() as u32) as usize] as char).collect();
        format!("call_{letters}")
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

/// The grammar a request's `response_format` asks for, if any.
fn response_format_grammar(params: &SamplingParams) -> Result<Option<Grammar>> {
    let format = params.response_format.as_ref().map(Grammar::of_response_format).transpose().map_err(EngineError::from)?;
    Ok(format.flatten())
}

/// The tools a chat request shows the model: none with `tool_choice: "none"`.
fn offered_tools(request: &ChatCompletionRequest) -> &[Tool] {
    match request.tool_choice {
        Some(ToolChoice::Mode(ToolChoiceMode::None)) => &[],
        _ => request.tools.as_deref().unwrap_or_default(),
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

/// The shortest and longest runs of a sequence's last tokens that prompt lookup matches.
const LOOKUP_NGRAM: std::ops::RangeInclusive<usize> = 2..=4;

/// The last tokens of `tokens` followed by `ahead`, as many as the longest run prompt lookup
/// matches.
fn last_tokens(tokens: &[u32], ahead: &[u32]) -> Vec<u32> {
    let n = *LOOKUP_NGRAM.end();
    let from_tokens = n.saturating_sub(ahead.len()).min(tokens.len());
    let mut last = tokens[tokens.len() - from_tokens..].to_vec();
    last.extend_from_slice(&ahead[ahead.len().saturating_sub(n)..]);
    last
}

/// Where `find` locates the longest run of `tokens`' last tokens (LOOKUP_NGRAM long), and how
/// long that run is.
fn longest_match(tokens: &[u32], mut find: impl FnMut(&[u32]) -> Option<usize>) -> Option<(usize, usize)> {
    LOOKUP_NGRAM.rev().filter(|&n| n <= tokens.len()).find_map(|n| find(&tokens[tokens.len() - n..]).map(|start| (start, n)))
}

/// Where each run of 2-4 tokens of a sequence last began, for prompt lookup (vLLM's `ngram`
/// speculation, llama.cpp's lookup decoding) in constant time a token: a scan of the whole
/// sequence took 0.2 ms a step at 128K tokens on a 2-core machine; indexing 128K tokens takes
/// 23 ms, once, at the first lookup. About 75 bytes a token.
#[derive(Default)]
struct LookupIndex {
    /// Each run, padded with an id no vocabulary has, and where it last began.
    latest: ahash::AHashMap<[u32; 4], u32>,
    /// For each run length, the first start not indexed yet.
    next_start: [usize; 3],
}

impl LookupIndex {
    /// Up to `max` tokens that followed the latest earlier occurrence in `tokens` of the last ones
    /// of `tokens` and then `ahead` (tokens drafted already, not indexed), the longest such run
    /// first (4 tokens down to 2). A match that runs into the end goes on as the repetition it is
    /// in. `tokens` only grows from one call to the next.
    fn draft(&mut self, tokens: &[u32], ahead: &[u32], max: usize) -> Vec<u32> {
        let len = tokens.len();
        for (n, next) in LOOKUP_NGRAM.zip(&mut self.next_start) {
            // Every run that begins before the last one of its length.
            while *next + n < len {
                self.latest.insert(run_key(&tokens[*next..*next + n]), *next as u32);
                *next += 1;
            }
        }
        let last_runs = last_tokens(tokens, ahead);
        let Some((start, n)) = longest_match(&last_runs, |run| self.latest.get(&run_key(run)).map(|&start| start as usize)).filter(|_| max > 0) else { return vec![] };
        // What follows the match in tokens, ahead and the draft so far.
        let end = len + ahead.len();
        let mut draft = Vec::with_capacity(max);
        for k in start + n..start + n + max {
            draft.push(match k {
                k if k < len => tokens[k],
                k if k < end => ahead[k - len],
                k => draft[k - end],
            });
        }
        draft
    }
}

fn run_key(run: &[u32]) -> [u32; 4] {
    let mut key = [u32::MAX; 4];
    key[..run.len()].copy_from_slice(run);
    key
}

/// A draft from a `prediction` (the prompt's last tokens, then the predicted output): up to `max`
/// tokens after the first occurrence from `cursor` on of the longest run of `tokens`' last ones
/// (else after its first occurrence anywhere), and where that draft begins, the next cursor. The
/// output goes through the prediction in order, leaving it where it differs and coming back.
pub fn predicted_draft(tokens: &[u32], prediction: &[u32], cursor: usize, max: usize) -> Option<(Vec<u32>, usize)> {
    let occurs_at = |run: &[u32], p: usize| prediction.get(p..p + run.len()) == Some(run) && p + run.len() < prediction.len();
    let first = |run: &[u32]| {
        let from = cursor.saturating_sub(run.len());
        (from..prediction.len()).chain(0..from).find(|&p| occurs_at(run, p))
    };
    let (start, n) = longest_match(tokens, first).filter(|_| max > 0)?;
    let begin = start + n;
    Some((prediction[begin..(begin + max).min(prediction.len())].to_vec(), begin))
}

/// Where `sequence`'s `position` goes in a pass: its KV row in the page holding it.
fn token_slot(sequence: &Sequence, position: usize) -> TokenSlot {
    let kv_row = sequence.pages[position / PAGE_SIZE] as usize * PAGE_SIZE + position % PAGE_SIZE;
    TokenSlot { position: position as u32, kv_row: kv_row as u32, sequence: sequence.slot as u32, _pad: 0 }
}

/// Adds `sequence`'s `positions` (in pages it holds) to the draft model's `batch` and their
/// tokens (its own, then `ahead` of them) to `ids`; its keys and values are computed through them
/// after the pass.
fn catch_up(sequence: &mut Sequence, ahead: &[u32], positions: std::ops::Range<usize>, batch: &mut Batch, ids: &mut Vec<u32>) {
    let len = sequence.tokens.len();
    ids.extend(positions.clone().map(|position| if position < len { sequence.tokens[position] } else { ahead[position - len] }));
    sequence.draft_model_computed = positions.end;
    batch.slots.extend(positions.map(|position| token_slot(sequence, position)));
}

/// Positions a sequence may reach, from which its pages are reserved.
fn max_positions(prompt: usize, max_tokens: usize, context: usize) -> usize {
    (prompt + max_tokens).min(context)
}

/// How a request's tool calls are written, and which tools it may call.
type ToolCalling = (ToolCallFormat, ToolSet);

/// How a sequence ends: finished for a reason, or failed.
type Ending = Result<FinishReason>;

/// The completion of a sequence that ends for `reason`.
fn completion(sequence: Sequence, reason: FinishReason) -> Completion {
    let prompt_tokens = sequence.prompt_len as u32;
    let completion_tokens = sequence.generated() as u32;
    Completion {
        usage: Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            cached_prompt_tokens: sequence.cached_prompt as u32,
            drafts: sequence.drafts,
        },
        prompt_shared: sequence.after.is_some(),
        echo: sequence.echo.map(|echo| Echo { tokens: sequence.tokens[..sequence.prompt_len].to_vec(), ..echo }),
        tokens: sequence.tokens[sequence.prompt_len..].to_vec(),
        text: sequence.text,
        finish_reason: reason,
        logprobs: sequence.top_logprobs.map(|_| sequence.logprobs),
        tool_calls: sequence.calls,
    }
}

/// Holds back text that may be the start of a stop string, and cuts the output at the first one.
/// Each stop string is matched as the text comes (Knuth-Morris-Pratt), so a token costs as much
/// however long the stop strings and the held-back text are: a request's stop strings, up to the
/// body's size, cannot slow the engine every sequence shares.
pub(crate) struct StopStrings {
    stops: Vec<StopString>,
    pending: String,
    stopped: bool,
}

struct StopString {
    bytes: Vec<u8>,
    /// fallback[i]: the length of the longest proper prefix of bytes[..=i] that also ends it.
    fallback: Vec<usize>,
    /// Bytes of the stop string the text seen so far ends with.
    matched: usize,
}

impl StopString {
    fn new(stop: String) -> Self {
        let bytes = stop.into_bytes();
        let mut fallback = vec![0; bytes.len()];
        let mut k = 0;
        for i in 1..bytes.len() {
            while k > 0 && bytes[i] != bytes[k] {
                k = fallback[k - 1];
            }
            if bytes[i] == bytes[k] {
                k += 1;
            }
            fallback[i] = k;
        }
        Self { bytes, fallback, matched: 0 }
    }

    /// Takes the text's next byte; whether the stop string ends with it.
    fn step(&mut self, byte: u8) -> bool {
        while self.matched > 0 && self.bytes[self.matched] != byte {
            self.matched = self.fallback[self.matched - 1];
        }
        if self.bytes[self.matched] == byte {
            self.matched += 1;
        }
        self.matched == self.bytes.len()
    }
}

impl StopStrings {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).map(StopString::new).collect();
        Self { stops, pending: String::new(), stopped: false }
    }

    /// Adds generated text; returns what is safe to emit and whether a stop string was found.
    pub(crate) fn push(&mut self, text: &str) -> (String, bool) {
        let old = self.pending.len();
        self.pending.push_str(text);
        // The earliest start among the stop strings the new text completes. Each begins in the
        // pending text: what was emitted ends with no start of a stop string.
        let mut cut: Option<usize> = None;
        for stop in &mut self.stops {
            if let Some(end) = self.pending.as_bytes()[old..].iter().position(|&byte| stop.step(byte)) {
                let begins = old + end + 1 - stop.bytes.len();
                cut = Some(cut.map_or(begins, |cut| cut.min(begins)));
            }
        }
        if let Some(cut) = cut {
            self.stopped = true;
            let emit = self.pending[..cut].to_string();
            self.pending.clear();
            return (emit, true);
        }
        // The longest end that could still grow into a stop string stays pending (it starts at a
        // character: a stop string's first byte is a character's first).
        let held = self.stops.iter().map(|stop| stop.matched).max().unwrap_or(0);
        let emit: String = self.pending.drain(..self.pending.len() - held).collect();
        (emit, false)
    }

    /// The held-back text plus `tail`, when generation ends for another reason.
    pub(crate) fn flush(&mut self, tail: &str) -> String {
        self.pending.push_str(tail);
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::{longest_match, predicted_draft, LookupIndex, StopStrings};

    fn prompt_lookup(tokens: &[u32], max: usize) -> Vec<u32> {
        LookupIndex::default().draft(tokens, &[], max)
    }

    /// Prompt lookup by scanning `tokens` (latest occurrence first) for the last tokens of
    /// `tokens` and then `ahead`.
    fn scanned_lookup(tokens: &[u32], ahead: &[u32], max: usize) -> Vec<u32> {
        let sequence = [tokens, ahead].concat();
        let len = sequence.len();
        let earlier = |run: &[u32]| (0..tokens.len().saturating_sub(run.len())).rev().find(|&p| &tokens[p..p + run.len()] == run);
        let Some((start, n)) = longest_match(&sequence, earlier).filter(|_| max > 0) else { return vec![] };
        let continued = |k: usize| sequence[start + n + k % (len - start - n)];
        (0..max).map(continued).collect()
    }

    #[test]
    fn prompt_lookup_drafts_what_followed_the_latest_longest_match() {
        // "3 4" last came before 9; "2 3 4" (longer) came before 5.
        assert_eq!(prompt_lookup(&[1, 2, 3, 4, 5, 6, 3, 4, 9, 2, 3, 4], 3), [5, 6, 3]);
        assert_eq!(prompt_lookup(&[7, 3, 4, 9, 1, 3, 4], 2), [9, 1]);
        // Running into the end goes on with the repetition: period 2.
        assert_eq!(prompt_lookup(&[8, 5, 6, 5, 6], 5), [5, 6, 5, 6, 5]);
        // After tokens drafted already ("3 4" forced by a grammar): what followed "2 3 4", then
        // the tokens ahead as the repetition goes on.
        assert_eq!(LookupIndex::default().draft(&[2, 3, 4, 5, 6, 2], &[3, 4], 4), [5, 6, 2, 3]);
        assert_eq!(prompt_lookup(&[1, 2, 3, 4], 4), Vec::<u32>::new());
        assert_eq!(prompt_lookup(&[1, 2, 1, 2], 0), Vec::<u32>::new());
    }

    /// Random sequences over 3 tokens (many matches): every draft follows a match of the last 2-4
    /// tokens, as long as asked for (a prediction's: as far as it goes), and nothing panics.
    #[test]
    fn drafts_follow_a_match_of_the_last_tokens() {
        use rand_chacha::rand_core::{RngCore, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut random = |n: usize| (0..n).map(|_| rng.next_u32() % 3).collect::<Vec<u32>>();
        let ends_with_run_before = |tokens: &[u32], within: &[u32], at: usize| {
            (2..=4).any(|n| n <= at && n <= tokens.len() && within[at - n..at] == tokens[tokens.len() - n..])
        };
        for case in 0..2000 {
            let (tokens, prediction) = (random(1 + case % 13), random(case % 11));
            let max = case % 7;
            let drafted = prompt_lookup(&tokens, max);
            assert!(drafted.is_empty() || drafted.len() == max, "{tokens:?}: {drafted:?}");
            assert_eq!(drafted, scanned_lookup(&tokens, &[], max), "{tokens:?}");
            if let Some((draft, begin)) = predicted_draft(&tokens, &prediction, case % 12, max) {
                assert!(!draft.is_empty() && draft.len() <= max && draft[..] == prediction[begin..begin + draft.len()], "{tokens:?} {prediction:?}");
                assert!(ends_with_run_before(&tokens, &prediction, begin), "{tokens:?} {prediction:?} at {begin}");
            }
        }
    }

    /// An index kept as a sequence grows drafts what a scan of the whole sequence finds, at every
    /// length (over 5 tokens: many matches; over 1,000: few), also after tokens drafted ahead
    /// (which it does not index).
    #[test]
    fn a_growing_lookup_index_drafts_what_a_scan_finds() {
        use rand_chacha::rand_core::{RngCore, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for vocabulary in [5, 1000] {
            let (mut index, mut tokens) = (LookupIndex::default(), vec![]);
            for step in 0..3000 {
                tokens.push(rng.next_u32() % vocabulary);
                let ahead: Vec<u32> = (0..step % 6).map(|_| rng.next_u32() % vocabulary).collect();
                let max = step % 7;
                assert_eq!(index.draft(&tokens, &ahead, max), scanned_lookup(&tokens, &ahead, max), "{vocabulary} tokens, step {step}, {ahead:?} ahead");
            }
        }
    }

    #[test]
    fn a_prediction_is_drafted_in_order_from_where_the_output_stands() {
        // The prompt's last tokens (10, 11, 12), then the prediction.
        let prediction = [10, 11, 12, 1, 2, 3, 1, 2, 4, 5];
        // At the start: the output's first token follows the prompt.
        assert_eq!(predicted_draft(&[9, 10, 11, 12, 1], &prediction, 0, 3), Some((vec![2, 3, 1], 4)));
        // The longest run decides; "1 2" is twice in it: the first from the cursor on counts.
        assert_eq!(predicted_draft(&[12, 1, 2, 3, 1, 2], &prediction, 4, 2), Some((vec![4, 5], 8)));
        assert_eq!(predicted_draft(&[7, 1, 2], &prediction, 4, 2), Some((vec![3, 1], 5)));
        assert_eq!(predicted_draft(&[7, 1, 2], &prediction, 7, 2), Some((vec![4, 5], 8)));
        // Behind the cursor only as a last resort; nothing past the prediction's end.
        assert_eq!(predicted_draft(&[7, 11, 12], &prediction, 9, 4), Some((vec![1, 2, 3, 1], 3)));
        assert_eq!(predicted_draft(&[4, 5], &prediction, 9, 4), None);
        assert_eq!(predicted_draft(&[6, 7], &prediction, 0, 4), None);
    }

    /// What `stops` let through of `pieces`, pushed one at a time, and whether one of them cut it.
    fn through(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let mut stop_strings = StopStrings::new(stops.iter().map(|s| s.to_string()).collect());
        let mut emitted = vec![];
        for piece in pieces {
            let (emit, stopped) = stop_strings.push(piece);
            emitted.push(emit);
            if stopped {
                return (emitted, true);
            }
        }
        emitted.push(stop_strings.flush(""));
        (emitted, false)
    }

    #[test]
    fn stop_strings_hold_what_may_begin_one_and_cut_at_the_first() {
        // Held while it may be a stop string, released once it cannot be.
        assert_eq!(through(&["User:"], &["Hi ", "Us", "ed", " it"]), (vec!["Hi ".into(), "".into(), "Used".into(), " it".into(), "".into()], false));
        // Cut across pieces, at the earliest stop string the completing piece holds; one that
        // began earlier but is not complete yet is not awaited.
        assert_eq!(through(&["User:", "er"], &["a U", "se", "r: b"]), (vec!["a ".into(), "".into(), "".into()], true));
        assert_eq!(through(&["User:", "er"], &["a U", "ser", ": b"]), (vec!["a ".into(), "Us".into()], true));
        assert_eq!(through(&["aab"], &["aa", "aa", "b!"]), (vec!["".into(), "aa".into(), "".into()], true));
        // Characters of several bytes, a stop string inside one piece, and none at all.
        assert_eq!(through(&["天気"], &["Grüße 天", "気 x"]), (vec!["Grüße ".into(), "".into()], true));
        assert_eq!(through(&[""], &["a", "b"]), (vec!["a".into(), "b".into(), "".into()], false));
    }

    #[test]
    fn a_long_stop_string_keeps_what_may_still_be_it() {
        // 100,000 bytes that match all but the end of a stop string are held, and released whole
        // by the byte that rules it out (each piece is matched once, not the held text again).
        let stop = format!("{}c", "a".repeat(100_000));
        let mut pieces = vec!["a".repeat(100); 1000];
        pieces.push("b".to_string());
        let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
        let (emitted, stopped) = through(&[stop.as_str()], &pieces);
        assert!(!stopped);
        assert!(emitted[..1000].iter().all(String::is_empty));
        assert_eq!(emitted[1000], format!("{}b", "a".repeat(100_000)));
    }
}
