//! The model: configuration, the paged KV pool and the Llama forward pass.

mod config;
mod kv_pool;
mod llama;
mod memory;

pub use config::{Config, Llama3Scaling, Rope, RopeScaling, SamplingDefaults};
pub use kv_pool::{page_hash, KvPool, PageAllocator, PrefixMatch, PAGE_SIZE};
pub use crate::load::LoadProgress;
pub use llama::{checkpoint_tensors, Batch, CheckpointTensor, Llama, LoadOptions, PassOutput, PassTokens, MAX_DRAFTS, MAX_DRAFT_PASS_TOKENS};
pub use memory::{size_text, MemoryEstimate};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tensor {tensor} has shape {got:?}, expected {expected:?}")]
    Shape { tensor: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("context length {requested} exceeds the model's max_position_embeddings {max}")]
    ContextTooLong { requested: usize, max: usize },
    #[error("a KV pool of {pages} pages ({positions} positions) needs {needed} bytes of {kv_type}; {reason}")]
    KvPoolTooLarge { pages: usize, positions: usize, needed: u64, kv_type: &'static str, reason: String },
    #[error("a {kv_type} KV pool holds rows of a multiple of 32 elements; this model's are {kv_dim} (n_kv_heads x head_dim): choose f16 or f32")]
    KvTypeUnfit { kv_type: &'static str, kv_dim: usize },
    #[error("a KV memory of {bytes} bytes holds no page: one page takes {page_bytes}")]
    KvPoolTooSmall { bytes: u64, page_bytes: u64 },
    #[error("{sequences} sequences do not fit {what}: at most {max}")]
    TooManySequences { sequences: usize, what: &'static str, max: usize },
    #[error("{needed} positions do not fit the context of {context} (start {start_pos} + {n_tokens} tokens)")]
    ContextFull { start_pos: usize, n_tokens: usize, needed: usize, context: usize },
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("no input tokens")]
    EmptyInput,
    #[error("{in_flight} greedy passes are in flight; the next pass needs exactly one to take its token from")]
    GreedyChain { in_flight: usize },
    #[error("a pass whose tokens are the previous pass's outputs needs as many tokens ({tokens}) as that pass had outputs ({outputs})")]
    ChainMismatch { tokens: usize, outputs: usize },
    #[error("a pass of {tokens} tokens with {outputs} outputs exceeds the model's limits ({max_tokens} tokens, {max_outputs} outputs)")]
    BatchTooLarge { tokens: usize, outputs: usize, max_tokens: usize, max_outputs: usize },
    #[error("the logits are not finite (NaN or infinite): the GPU computed garbage")]
    NonFiniteLogits,
}
