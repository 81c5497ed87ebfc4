//! Text in and out of the model: the tokenizer (Hugging Face `tokenizer.json`, or the vocabulary in
//! a GGUF file's metadata), a streaming detokenizer that never splits a UTF-8 character, and chat
//! templates rendered with minijinja the way transformers' `apply_chat_template` renders them.

mod chat_template;
mod gguf_tokenizer;
mod json;
pub mod reasoning;
mod stream;
mod strftime;
mod tokenizer;
pub mod tool_calls;

pub use chat_template::{today_date_string, ChatTemplate, RenderOptions, SpecialTokens, TEMPLATE_FUEL};
pub use stream::TextStream;
pub use tokenizer::Tokenizer;

/// Errors from tokenizing, detokenizing and rendering chat templates.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("tokenizer.json could not be loaded: {reason}")]
    Load { reason: String },
    /// The tokenizer in a GGUF file's metadata is malformed or of a kind not supported.
    #[error("{file}: tokenizer metadata: {message}")]
    Gguf { file: String, message: String },
    #[error("encoding text failed: {reason}")]
    Encode { reason: String },
    #[error("decoding token ids failed: {reason}")]
    Decode { reason: String },
    #[error("token id {id} is outside the vocabulary of {vocab_size} ids")]
    UnknownTokenId { id: u32, vocab_size: usize },
    #[error("chat template has a syntax error: {reason}")]
    TemplateSyntax { reason: String },
    #[error("chat template failed to render: {reason}")]
    TemplateRender { reason: String },
    /// The template called `raise_exception(message)`, as templates do to reject a conversation.
    #[error("chat template rejected the conversation: {message}")]
    TemplateRaised { message: String },
    /// Content is kept apart from the template's special tokens with private-use characters the
    /// conversation does not use; this one uses them all.
    /// Constrained decoding and logprobs need each token's bytes.
    #[error("the bytes of this tokenizer's tokens are unknown (its decoder is neither byte-level BPE nor SentencePiece byte fallback), so it cannot take response_format, a required tool call or logprobs")]
    UnknownTokenBytes,
    #[error("the conversation uses every Unicode private-use character, so its content cannot be told apart from the template's special tokens")]
    NoPlaceholders,
}
