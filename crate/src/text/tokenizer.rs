use std::sync::Arc;

use tokenizers::{AddedVocabulary, DecoderWrapper, Model, OffsetType, PreTokenizer};

use super::TextError;

/// A Hugging Face `tokenizer.json` tokenizer. Cloning is cheap: the tables are shared.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    /// The added-token table with special tokens switched off, for encoding their text as text.
    plain_text_tokens: Arc<AddedVocabulary>,
    vocab_size: usize,
}

impl Tokenizer {
    pub fn from_json_bytes(json: &[u8]) -> Result<Self, TextError> {
        let inner = tokenizers::Tokenizer::from_bytes(json).map_err(|e| TextError::Load { reason: e.to_string() })?;
        let mut plain_text_tokens = inner.get_added_vocabulary().clone();
        plain_text_tokens.set_encode_special_tokens(true);
        // Ids are what embeddings are indexed by, so the size is the id range, not the count.
        let vocab_size = inner.get_vocab(true).values().max().map_or(0, |&id| id as usize + 1);
        Ok(Self { inner: Arc::new(inner), plain_text_tokens: Arc::new(plain_text_tokens), vocab_size })
    }

    /// The tokenizer as `tokenizer.json` text, for writing it beside converted weights.
    pub fn to_json(&self) -> Result<String, TextError> {
        self.inner.to_string(false).map_err(|e| TextError::Load { reason: e.to_string() })
    }

    /// Token ids of `text`. Never adds BOS or any other token by itself. With `parse_special`,
    /// special-token text such as `<|eot_id|>` becomes its special id (as in a rendered chat
    /// template); without, it is encoded as the plain text it is (as for user input).
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TextError> {
        let added = if parse_special { self.inner.get_added_vocabulary() } else { &self.plain_text_tokens };
        self.encode_with(added, text, &[])
    }

    /// Token ids of `text` with special-token text parsed, where each placeholder character of
    /// `plain` stands for text encoded as the text it is: the placeholders are put back after the
    /// split at special tokens, so that their text never becomes one, and before pre-tokenization,
    /// so that it is tokenized as if it had been there all along (exactly so for tokenizers without
    /// a normalizer, as Llama 3's).
    pub fn encode_with_plain_text(&self, text: &str, plain: &[(char, String)]) -> Result<Vec<u32>, TextError> {
        self.encode_with(self.inner.get_added_vocabulary(), text, plain)
    }

    /// Token `id`'s piece of the vocabulary as written there (Llama 3's `Ġhello` for " hello").
    pub fn piece(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The text of every special added token (`<|eot_id|>`, ...).
    pub fn special_token_texts(&self) -> Vec<String> {
        self.inner.get_added_tokens_decoder().values().filter(|t| t.special).map(|t| t.content.clone()).collect()
    }

    fn encode_with(&self, added: &AddedVocabulary, text: &str, plain: &[(char, String)]) -> Result<Vec<u32>, TextError> {
        let encode_error = |e: tokenizers::Error| TextError::Encode { reason: e.to_string() };
        // The steps of tokenizers' own encode, with our choice of added-token table; without
        // post-processing, which is where a tokenizer.json adds BOS.
        let mut pieces = added.extract_and_normalize(self.inner.get_normalizer(), text);
        if !plain.is_empty() {
            pieces
                .split(|_, mut piece| {
                    for (placeholder, text) in plain {
                        piece.replace(*placeholder, text)?;
                    }
                    Ok(vec![piece])
                })
                .map_err(encode_error)?;
        }
        if let Some(pre_tokenizer) = self.inner.get_pre_tokenizer() {
            pre_tokenizer.pre_tokenize(&mut pieces).map_err(encode_error)?;
        }
        let model = self.inner.get_model();
        pieces.tokenize(|piece| model.tokenize(piece.get())).map_err(encode_error)?;
        let encoding = pieces.into_encoding(None, 0, OffsetType::None).map_err(encode_error)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`; invalid UTF-8 (a character cut off at the end) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TextError> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(TextError::UnknownTokenId { id, vocab_size: self.vocab_size });
        }
        self.inner.decode(ids, skip_special).map_err(|e| TextError::Decode { reason: e.to_string() })
    }

    /// The id of a token given by its vocabulary string, e.g. `<|eot_id|>` or `Hello`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The bytes each token id stands for: None for special tokens and ids without a token. For
    /// constrained decoding and logprobs, which need the exact bytes, including the pieces of a
    /// character that one token cuts in half.
    pub fn token_bytes(&self) -> Result<Vec<Option<Vec<u8>>>, TextError> {
        let kind = self.inner.get_decoder().and_then(byte_decoding).ok_or(TextError::UnknownTokenBytes)?;
        let added = self.inner.get_added_tokens_decoder();
        let byte_of: std::collections::HashMap<char, u8> = byte_level_chars().iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let bytes_of = |id: u32| -> Option<Vec<u8>> {
            if let Some(token) = added.get(&id) {
                return (!token.special).then(|| token.content.clone().into_bytes());
            }
            let piece = self.inner.id_to_token(id)?;
            match kind {
                ByteDecoding::ByteLevel => piece.chars().map(|c| byte_of.get(&c).copied()).collect(),
                ByteDecoding::ByteFallback => match piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>')) {
                    Some(hex) if hex.len() == 2 => u8::from_str_radix(hex, 16).ok().map(|b| vec![b]),
                    _ => Some(piece.replace('\u{2581}', " ").into_bytes()),
                },
            }
        };
        Ok((0..self.vocab_size as u32).map(bytes_of).collect())
    }

    /// One past the largest token id (128,256 for Llama 3).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

/// How a tokenizer's vocabulary strings spell bytes.
#[derive(Clone, Copy)]
enum ByteDecoding {
    /// GPT-2's byte-to-character table (Llama 3, SmolLM2).
    ByteLevel,
    /// SentencePiece: text with U+2581 for spaces, `<0xNN>` tokens for other bytes (Llama 2).
    ByteFallback,
}

fn byte_decoding(decoder: &DecoderWrapper) -> Option<ByteDecoding> {
    match decoder {
        DecoderWrapper::ByteLevel(_) => Some(ByteDecoding::ByteLevel),
        DecoderWrapper::ByteFallback(_) => Some(ByteDecoding::ByteFallback),
        DecoderWrapper::Sequence(sequence) => sequence.get_decoders().iter().find_map(byte_decoding),
        _ => None,
    }
}

/// GPT-2's table: the character standing for each byte. Printable Latin-1 bytes stand for
/// themselves; the others take the code points from 256 on, in byte order.
fn byte_level_chars() -> [char; 256] {
    let mut chars = ['\0'; 256];
    let mut next = 256;
    for byte in 0..=255u8 {
        let c = byte as char;
        chars[byte as usize] = if matches!(c, '!'..='~' | '\u{a1}'..='\u{ac}' | '\u{ae}'..='\u{ff}') {
            c
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or(c)
        };
    }
    chars
}
