//! The tokenizer and chat template a GGUF file carries in its metadata, so a GGUF file alone is
//! enough to chat.
//!
//! llama.cpp stores a byte-level BPE vocabulary (`tokenizer.ggml.model` = "gpt2") as the token
//! strings in id order (already in GPT-2's byte-to-character spelling), the merges as "left right"
//! strings in rank order, a type per token, and the name of the pre-tokenizer
//! (`tokenizer.ggml.pre`) whose split regexes llama.cpp hard-codes per name. We compose the
//! equivalent `tokenizer.json` (BPE model, those regexes as isolating splits, byte-level mapping and
//! decoder, control tokens as special added tokens) and load it like any other.
//!
//! A SentencePiece vocabulary (`tokenizer.ggml.model` = "llama": Llama 1 and 2, Mistral, TinyLlama)
//! is pieces with scores and no merges: its BPE merges the adjacent pair whose piece scores
//! highest. That is a BPE model whose merges are every split of every piece into two pieces,
//! ranked by the piece's score (transformers' `SentencePieceExtractor`), over text with spaces
//! written as `▁` and a `▁` before each run of text (llama.cpp's `add_space_prefix`), falling back
//! to `<0xXX>` byte pieces for characters the vocabulary lacks.

use serde_json::{json, Value};

use super::{ChatTemplate, SpecialTokens, TextError, Tokenizer};
use crate::load::{GgufHeader, LoadError, MetadataValue};

/// llama.cpp's `llama_token_type` values in `tokenizer.ggml.token_type`.
const TOKEN_TYPE_UNKNOWN: u64 = 2;
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// GPT-2's split: contractions, letters, numbers, other symbols, each with an optional leading
/// space, and whitespace not followed by a non-space. llama.cpp's `llm_tokenizer_bpe` for
/// LLAMA_VOCAB_PRE_TYPE_GPT2 (and the second expression of SMOLLM / STARCODER and of DEFAULT).
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// Llama 3's split (numbers in runs of at most three, case-insensitive contractions spelled out as
/// llama.cpp adapted them): llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3.
const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How llama.cpp pre-tokenizes text for a `tokenizer.ggml.pre` name (src/llama-vocab.cpp,
/// `llama_vocab::impl::load` and `llm_tokenizer_bpe`): regexes applied one after another, each
/// splitting every piece further into its matches and the text between them; and whether a piece
/// that is itself a vocabulary token skips the merges (`ignore_merges`).
struct PreTokenizer {
    splits: &'static [&'static str],
    ignore_merges: bool,
}

/// The pre-tokenizer llama.cpp uses for `pre`, for the names this engine supports.
fn pre_tokenizer(pre: Option<&str>) -> Option<PreTokenizer> {
    const DEFAULT: &[&str] = &[r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"];
    let (splits, ignore_merges): (&'static [&'static str], bool) = match pre {
        // llama.cpp warns "GENERATION QUALITY WILL BE DEGRADED" when the name is missing.
        None | Some("default") => (DEFAULT, false),
        Some("llama3" | "llama-v3" | "llama-bpe") => (&[LLAMA3_SPLIT], true),
        Some("dbrx" | "smaug-bpe") => (&[LLAMA3_SPLIT], false),
        // Every digit on its own, then GPT-2's split.
        Some("smollm" | "starcoder" | "refact" | "codeshell") => (&[r"\p{N}", GPT2_SPLIT], false),
        Some("gpt-2" | "phi-2" | "mpt" | "olmo") => (&[GPT2_SPLIT], false),
        Some(_) => return None,
    };
    Some(PreTokenizer { splits, ignore_merges })
}

impl Tokenizer {
    /// The tokenizer in a GGUF file's `tokenizer.ggml.*` metadata. Only byte-level BPE ("gpt2", as
    /// Llama 3 and SmolLM2 files have) is supported; SentencePiece ("llama", Llama 1 and 2) and
    /// others are refused with an error naming the model.
    pub fn from_gguf(header: &GgufHeader) -> Result<Self, TextError> {
        let json = tokenizer_json(header)?;
        let bytes = serde_json::to_vec(&json).map_err(|e| TextError::Load { reason: e.to_string() })?;
        Self::from_json_bytes(&bytes)
    }
}

impl ChatTemplate {
    /// The template in a GGUF file's `tokenizer.chat_template`, or Llama 3.1's when it has none
    /// and its vocabulary is Llama 3's (older Llama 2 and Mistral files carry none: their chats
    /// are refused, naming `--chat-template`), reading the vocabulary's BOS and EOS tokens as
    /// llama.cpp's renderer does (whether or not prompts start with BOS).
    pub fn from_gguf(header: &GgufHeader) -> Result<Self, TextError> {
        let tokens = header.get_str_array("tokenizer.ggml.tokens").map_err(metadata_error)?.unwrap_or_default();
        let template = match header.get_str("tokenizer.chat_template").map_err(metadata_error)? {
            Some(source) => Self::new(source)?,
            None if tokens.is_empty() || tokens.contains(&LLAMA3_HEADER_TOKEN) => Self::llama31(),
            None => Self::new(NO_TEMPLATE)?,
        };
        let text_of = |key: &str| -> Result<Option<String>, TextError> {
            let id = header.get_u32(key).map_err(metadata_error)?;
            Ok(id.and_then(|id| tokens.get(id as usize)).map(|token| token.to_string()))
        };
        Ok(template.with_special_tokens(SpecialTokens { bos: text_of("tokenizer.ggml.bos_token_id")?, eos: text_of("tokenizer.ggml.eos_token_id")? }))
    }
}

/// A token of Llama 3's chat markup, which the fallback template writes.
const LLAMA3_HEADER_TOKEN: &str = "<|start_header_id|>";

/// What a GGUF without a template and without Llama 3's vocabulary chats with: a refusal.
const NO_TEMPLATE: &str = "{{ raise_exception('this model carries no chat template, and the fallback, Llama 3.1 Instruct, needs the \
                           Llama 3 vocabulary: give one with --chat-template (JS: chatTemplate), or send text completions') }}";

fn metadata_error(error: LoadError) -> TextError {
    TextError::Load { reason: error.to_string() }
}

/// The `tokenizer.json` equivalent to the GGUF vocabulary.
fn tokenizer_json(header: &GgufHeader) -> Result<Value, TextError> {
    let file = header.file();
    let gguf_error = |message: String| TextError::Gguf { file: file.to_string(), message };
    let required = |key: &str| gguf_error(format!("{key} is missing"));

    let model = header.get_str("tokenizer.ggml.model").map_err(metadata_error)?.ok_or_else(|| required("tokenizer.ggml.model"))?;
    if model != "gpt2" && model != "llama" {
        let kind = match model {
            "bert" => " (WordPiece)",
            "t5" => " (Unigram)",
            _ => "",
        };
        return Err(gguf_error(format!("tokenizer model {model:?}{kind} is not supported (\"gpt2\", byte-level BPE, and \"llama\", SentencePiece BPE, are)")));
    }
    let tokens = header.get_str_array("tokenizer.ggml.tokens").map_err(metadata_error)?.ok_or_else(|| required("tokenizer.ggml.tokens"))?;
    let types = match header.get_array("tokenizer.ggml.token_type").map_err(metadata_error)? {
        Some(types) if types.len() < tokens.len() => {
            return Err(gguf_error(format!("tokenizer.ggml.token_type has {} entries for {} tokens", types.len(), tokens.len())))
        }
        Some(types) => types.iter().map(MetadataValue::as_u64).collect::<Option<Vec<_>>>(),
        None => Some(vec![]),
    };
    let types = types.ok_or_else(|| gguf_error("tokenizer.ggml.token_type holds a value that is not a non-negative integer".into()))?;

    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut texts = Vec::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        // llama.cpp renames empty tokens the same way, so that every token has a distinct text.
        let text = if token.is_empty() { format!("[EMPTY_{id}]") } else { token.to_string() };
        let special = match types.get(id).copied() {
            Some(TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN) => Some(true),
            Some(TOKEN_TYPE_USER_DEFINED) => Some(false),
            _ => None,
        };
        // llama.cpp matches control, unknown and user-defined tokens whole before splitting the
        // text; control and unknown ones only when special tokens are parsed.
        if let Some(special) = special {
            added.push(json!({
                "id": id, "content": text, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": special,
            }));
        }
        texts.push(text.clone());
        if let Some(previous) = vocab.insert(text, json!(id)) {
            return Err(gguf_error(format!("token {token:?} appears twice in tokenizer.ggml.tokens (ids {previous} and {id})")));
        }
    }
    if model == "llama" {
        return sentencepiece_json(header, &texts, &types, vocab, added);
    }

    let pre = header.get_str("tokenizer.ggml.pre").map_err(metadata_error)?;
    let pre_tokenizer = pre_tokenizer(pre).ok_or_else(|| {
        gguf_error(format!(
            "pre-tokenizer {:?} is not supported (supported: default, llama3, llama-v3, llama-bpe, dbrx, smaug-bpe, smollm, \
             starcoder, refact, codeshell, gpt-2, phi-2, mpt, olmo)",
            pre.unwrap_or_default()
        ))
    })?;

    let merges = header.get_str_array("tokenizer.ggml.merges").map_err(metadata_error)?.ok_or_else(|| required("tokenizer.ggml.merges"))?;

    // "left right"; llama.cpp splits at the first space after the first character.
    let merges = merges
        .iter()
        .enumerate()
        .map(|(rank, merge)| {
            let split = merge.char_indices().skip(1).find(|&(_, c)| c == ' ').map(|(at, _)| at);
            let (left, right) = split
                .map(|at| (&merge[..at], &merge[at + 1..]))
                .ok_or_else(|| gguf_error(format!("merge {rank} ({merge:?}) is not two tokens separated by a space")))?;
            Ok(json!([left, right]))
        })
        .collect::<Result<Vec<_>, TextError>>()?;

    let mut pre_tokenizers: Vec<Value> = pre_tokenizer
        .splits
        .iter()
        .map(|pattern| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false}))
        .collect();
    // Bytes to GPT-2's characters, with no further splitting (the regexes above did that).
    pre_tokenizers.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}));

    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": pre_tokenizer.ignore_merges,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

/// The `tokenizer.json` equivalent to a SentencePiece vocabulary (see the module's notes): each
/// token's text, `vocab` and `added` as the byte-level path builds them, merges made from
/// `tokenizer.ggml.scores`.
fn sentencepiece_json(header: &GgufHeader, texts: &[String], types: &[u64], vocab: serde_json::Map<String, Value>, added: Vec<Value>) -> Result<Value, TextError> {
    let gguf_error = |message: String| TextError::Gguf { file: header.file().to_string(), message };
    let scores = header.get_array("tokenizer.ggml.scores").map_err(metadata_error)?.ok_or_else(|| gguf_error("tokenizer.ggml.scores is missing".into()))?;
    if scores.len() < texts.len() {
        return Err(gguf_error(format!("tokenizer.ggml.scores has {} entries for {} tokens", scores.len(), texts.len())));
    }
    let scores = scores.iter().map(MetadataValue::as_f32).collect::<Option<Vec<f32>>>();
    let scores = scores.ok_or_else(|| gguf_error("tokenizer.ggml.scores holds a value that is not a float32".into()))?;
    let add_space_prefix = header.get_bool("tokenizer.ggml.add_space_prefix").map_err(metadata_error)?.unwrap_or(true);
    let unknown = header.get_u32("tokenizer.ggml.unknown_token_id").map_err(metadata_error)?;
    let unknown = unknown.map(|id| id as usize).or_else(|| types.iter().position(|&kind| kind == TOKEN_TYPE_UNKNOWN));

    // Every split of every piece into two pieces, the piece's score its rank: highest first, then
    // the longer left piece, then the longer right one, else in id order (transformers'
    // `generate_merges`, whose stable sort this one is).
    let mut merges = vec![];
    for (id, piece) in texts.iter().enumerate() {
        let mut splits: Vec<(u64, u64, &str, &str)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (left, right) = piece.split_at(at);
                Some((vocab.get(left)?.as_u64()?, vocab.get(right)?.as_u64()?, left, right))
            })
            .collect();
        splits.sort_unstable_by_key(|&(left, right, _, _)| (left, right));
        merges.extend(splits.into_iter().map(|(_, _, left, right)| (scores[id], left, right)));
    }
    let length = |text: &str| text.chars().count();
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(length(b.1).cmp(&length(a.1))).then(length(b.2).cmp(&length(a.2))));
    let merges: Vec<Value> = merges.into_iter().map(|(_, left, right)| json!([left, right])).collect();

    let spaces = json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"});
    let normalizer = match add_space_prefix {
        true => json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, spaces]}),
        false => spaces,
    };
    let mut decoders = vec![json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}), json!({"type": "ByteFallback"}), json!({"type": "Fuse"})];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unknown.and_then(|id| texts.get(id)),
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}
