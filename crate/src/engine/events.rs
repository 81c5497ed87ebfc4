//! What the engine reports of the sequences it runs, and what hosts hold of them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::api::{DraftUsage, FinishReason, GeneratedToolCall, TokenLogprob, Usage};

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
    /// Whether the text is the model's thought (before `</think>`), not its answer.
    pub thought: bool,
}

/// A finished generation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Completion {
    pub text: String,
    /// The model's thought, where it wrote one (`reasoning_content`).
    pub reasoning: Option<String>,
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
            reasoning_tokens: choices.iter().map(|c| c.usage.reasoning_tokens).sum(),
            drafts: DraftUsage::sum(choices.iter().map(|c| c.usage.drafts)),
        }
    }
}

/// The completions of one request's choices ([`super::Engine::add_choices`]) as they end, for hosts.
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

/// Names a request from [`super::Engine::add`] until its [`Event::Finished`] or [`Event::Failed`].
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
pub(super) fn deltas(on_delta: &mut dyn FnMut(&Delta)) -> impl FnMut(&Event) + '_ {
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
