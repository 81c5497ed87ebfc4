use super::{TextError, Tokenizer};

/// Pending tokens past which text that still ends in an incomplete character goes out as it
/// decodes: a character is at most 4 bytes and a token at least one, so these are bytes that
/// never make one (a model emitting stray bytes), and holding them would decode a growing window
/// with every token.
const MAX_PENDING_TOKENS: usize = 16;

/// Turns generated token ids, fed one at a time, into text deltas.
///
/// Byte-level BPE splits a character over several tokens (an emoji is often two or three), so a
/// delta is only released once it does not end in an incomplete character. Each step decodes a
/// short window, not the whole output: `ids[prefix..read]` is text already released, kept as
/// context because some decoders (SentencePiece's leading space) depend on it, and `ids[read..]`
/// is pending. This is the prefix/read offset scheme of text-generation-inference.
pub struct TextStream {
    skip_special: bool,
    /// Only the window; ids before it are dropped.
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Default for TextStream {
    fn default() -> Self {
        Self::new()
    }
}

impl TextStream {
    /// A stream that leaves special tokens (`<|python_tag|>`, ...) out of the text, as serving
    /// stacks do by default.
    pub fn new() -> Self {
        Self { skip_special: true, ids: Vec::new(), prefix: 0, read: 0 }
    }

    /// A stream that writes special tokens as their text.
    pub fn with_special_tokens() -> Self {
        Self { skip_special: false, ..Self::new() }
    }

    /// Adds one token; returns the text it completes, often empty while a character is pending.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, TextError> {
        self.ids.push(id);
        let (released, window) = self.decode_window(tokenizer)?;
        if window.ends_with(char::REPLACEMENT_CHARACTER) && self.ids.len() - self.read < MAX_PENDING_TOKENS {
            return Ok(String::new());
        }
        let delta = suffix_after(&window, &released);
        if delta.is_empty() {
            return Ok(delta);
        }
        self.ids.drain(..self.read);
        self.prefix = 0;
        self.read = self.ids.len();
        Ok(delta)
    }

    /// The text still pending at the end, complete or not; the stream starts afresh after it.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, TextError> {
        let (released, window) = self.decode_window(tokenizer)?;
        self.ids.clear();
        self.prefix = 0;
        self.read = 0;
        Ok(suffix_after(&window, &released))
    }

    fn decode_window(&self, tokenizer: &Tokenizer) -> Result<(String, String), TextError> {
        let released = tokenizer.decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let window = tokenizer.decode(&self.ids[self.prefix..], self.skip_special)?;
        Ok((released, window))
    }
}

/// `window` without its first as many characters as `released` has (released text is a prefix of
/// the window for the decoders in use; counting characters never cuts one in half).
fn suffix_after(window: &str, released: &str) -> String {
    window.chars().skip(released.chars().count()).collect()
}
