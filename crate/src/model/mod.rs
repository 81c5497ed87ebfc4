//! The model: configuration, KV cache and the Llama forward pass.

mod config;
mod kv_cache;
mod llama;

pub use config::{Config, Llama3Scaling, Rope};
pub use kv_cache::KvCache;
pub use crate::load::LoadProgress;
pub use llama::{checkpoint_tensors, Llama, LoadOptions};

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
    #[error("a KV cache of {context} positions needs {needed} bytes ({per_buffer} per layer buffer); {reason}")]
    KvCacheTooLarge { context: usize, needed: u64, per_buffer: u64, reason: String },
    #[error("{needed} positions do not fit the context of {context} (start {start_pos} + {n_tokens} tokens)")]
    ContextFull { start_pos: usize, n_tokens: usize, needed: usize, context: usize },
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("no input tokens")]
    EmptyInput,
    #[error("{in_flight} greedy passes are in flight; the next pass needs exactly one to take its token from")]
    GreedyChain { in_flight: usize },
    #[error("the logits are not finite (NaN or infinite): the GPU computed garbage")]
    NonFiniteLogits,
}
