//! Tokenizers from GGUF metadata beyond SmolLM2 (tests/smollm2.rs): Llama 3's vocabulary written as
//! llama.cpp's converter writes it (pre-tokenizer "llama-bpe") must tokenize the 208-string corpus
//! exactly as Meta's tiktoken reference does (tests/fixtures/text/tokenizer_goldens.json), and
//! tokenizers this engine does not implement are refused with errors that name them.
//! Needs target/models/llama3-tokenizer/tokenizer.json from scripts/fetch-tokenizer.

mod common;

use llama_webgpu::load::GgufHeader;
use llama_webgpu::text::{ChatTemplate, TextError, Tokenizer};
use serde::Deserialize;

/// A metadata value as GGUF stores it.
enum Value {
    U32(u32),
    Bool(bool),
    Str(String),
    Strings(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A GGUF v3 file holding only `metadata` (no tensors), parsed back.
fn header(metadata: &[(&str, Value)]) -> GgufHeader {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut out, key);
        match value {
            Value::U32(v) => {
                out.extend_from_slice(&4u32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            Value::Bool(v) => {
                out.extend_from_slice(&7u32.to_le_bytes());
                out.push(u8::from(*v));
            }
            Value::Str(s) => {
                out.extend_from_slice(&8u32.to_le_bytes());
                put_string(&mut out, s);
            }
            Value::Strings(items) => {
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&8u32.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                items.iter().for_each(|s| put_string(&mut out, s));
            }
            Value::I32s(items) => {
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&5u32.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                items.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            }
            Value::F32s(items) => {
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&6u32.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                items.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            }
        }
    }
    GgufHeader::parse("test.gguf", &out).unwrap()
}

fn strings(items: &[&str]) -> Value {
    Value::Strings(items.iter().map(|s| s.to_string()).collect())
}

/// The tokenizer metadata llama.cpp's convert_hf_to_gguf.py writes for Llama 3's tokenizer.json:
/// tokens in id order, special added tokens as CONTROL (3), merges as "left right".
fn llama3_gguf_metadata() -> Vec<(&'static str, Value)> {
    let json: serde_json::Value = serde_json::from_slice(&common::llama3_tokenizer_json()).unwrap();
    let vocab = json["model"]["vocab"].as_object().unwrap();
    let added = json["added_tokens"].as_array().unwrap();
    let size = vocab.len() + added.len();
    let mut tokens = vec![String::new(); size];
    let mut types = vec![1i32; size];
    for (token, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = token.clone();
    }
    for token in added {
        let id = token["id"].as_u64().unwrap() as usize;
        tokens[id] = token["content"].as_str().unwrap().to_string();
        types[id] = if token["special"].as_bool().unwrap() { 3 } else { 4 };
    }
    let merges = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => s.clone(),
            pair => format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
        })
        .collect();
    vec![
        ("tokenizer.ggml.model", Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Value::Str("llama-bpe".into())),
        ("tokenizer.ggml.tokens", Value::Strings(tokens)),
        ("tokenizer.ggml.token_type", Value::I32s(types)),
        ("tokenizer.ggml.merges", Value::Strings(merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(128_000)),
        ("tokenizer.ggml.eos_token_id", Value::U32(128_009)),
    ]
}

#[derive(Deserialize)]
struct Goldens {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    special_ids: Option<Vec<u32>>,
}

#[test]
fn llama3_from_gguf_metadata_matches_tiktoken() {
    let tok = Tokenizer::from_gguf(&header(&llama3_gguf_metadata())).unwrap();
    assert_eq!(tok.vocab_size(), 128_256);
    assert_eq!(tok.encode("<|eot_id|>", true).unwrap(), [128_009]);
    let json = std::fs::read_to_string(common::fixture("text/tokenizer_goldens.json")).unwrap();
    let goldens: Goldens = serde_json::from_str(&json).unwrap();
    let mut failures = vec![];
    for case in &goldens.cases {
        let as_text = tok.encode(&case.text, false).unwrap();
        let parsed = tok.encode(&case.text, true).unwrap();
        if as_text != case.ids {
            failures.push(format!("{:?} as text: got {as_text:?}, tiktoken {:?}", case.text, case.ids));
        }
        if &parsed != case.special_ids.as_ref().unwrap_or(&case.ids) {
            failures.push(format!("{:?} parsed: got {parsed:?}", case.text));
        }
        if tok.decode(&case.ids, false).unwrap() != case.text {
            failures.push(format!("{:?} does not decode back", case.text));
        }
    }
    eprintln!("Llama 3 from GGUF metadata: {} strings, {} mismatches", goldens.cases.len(), failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[derive(Deserialize)]
struct SentencePieceGoldens {
    bos_token_id: u32,
    eos_token_id: u32,
    unknown_token_id: u32,
    /// Piece, score, llama.cpp token type.
    pieces: Vec<(String, f32, i32)>,
    cases: Vec<SentencePieceCase>,
}

#[derive(Deserialize)]
struct SentencePieceCase {
    text: String,
    ids: Vec<u32>,
    decoded: Option<String>,
}

/// A SentencePiece BPE vocabulary (Llama 2's and Mistral's kind, trained by
/// tests/fixtures/text/make_spm_goldens.py) written as llama.cpp's converter writes it: every
/// string of the corpus gets SentencePiece's own ids and decodes as SentencePiece decodes them.
#[test]
fn sentencepiece_from_gguf_metadata_matches_sentencepiece() {
    let json = std::fs::read_to_string(common::fixture("text/spm_goldens.json")).unwrap();
    let goldens: SentencePieceGoldens = serde_json::from_str(&json).unwrap();
    let metadata = |add_space_prefix: bool| {
        vec![
            ("tokenizer.ggml.model", Value::Str("llama".into())),
            ("tokenizer.ggml.tokens", Value::Strings(goldens.pieces.iter().map(|p| p.0.clone()).collect())),
            ("tokenizer.ggml.scores", Value::F32s(goldens.pieces.iter().map(|p| p.1).collect())),
            ("tokenizer.ggml.token_type", Value::I32s(goldens.pieces.iter().map(|p| p.2).collect())),
            ("tokenizer.ggml.bos_token_id", Value::U32(goldens.bos_token_id)),
            ("tokenizer.ggml.eos_token_id", Value::U32(goldens.eos_token_id)),
            ("tokenizer.ggml.unknown_token_id", Value::U32(goldens.unknown_token_id)),
            ("tokenizer.ggml.add_space_prefix", Value::Bool(add_space_prefix)),
        ]
    };
    let tok = Tokenizer::from_gguf(&header(&metadata(true))).unwrap();
    let mut failures = vec![];
    for case in &goldens.cases {
        let ids = tok.encode(&case.text, false).unwrap();
        if ids != case.ids {
            failures.push(format!("{:?}: got {ids:?}, sentencepiece {:?}", case.text, case.ids));
        }
        let decoded = tok.decode(&case.ids, false).unwrap();
        if &decoded != case.decoded.as_ref().unwrap_or(&case.text) {
            failures.push(format!("{:?} decodes as {decoded:?}", case.text));
        }
    }
    eprintln!("SentencePiece from GGUF metadata: {} strings, {} mismatches", goldens.cases.len(), failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Control tokens when special tokens are parsed, each run of text after one with its own space
    // prefix (llama.cpp's `is_prev_special`).
    let (bos, eos) = (goldens.bos_token_id, goldens.eos_token_id);
    let hello = tok.encode("Hello", false).unwrap();
    assert_eq!(tok.encode("<s>Hello</s>", true).unwrap(), [vec![bos], hello.clone(), vec![eos]].concat());
    assert_eq!(tok.decode(&[vec![bos], hello.clone(), vec![eos]].concat(), true).unwrap(), "Hello");
    // Each token's bytes, for grammars and log probabilities: `▁` a space, `<0x0A>` its byte.
    let bytes = tok.token_bytes().unwrap();
    let id = |piece: &str| tok.token_id(piece).unwrap() as usize;
    assert_eq!((bytes[id("▁a")].as_deref(), bytes[id("<0x0A>")].as_deref(), &bytes[bos as usize]), (Some(&b" a"[..]), Some(&[10u8][..]), &None));
    // Without the prefix (`add_space_prefix` false) a word's first piece is the unprefixed one.
    let plain = Tokenizer::from_gguf(&header(&metadata(false))).unwrap();
    let unprefixed = plain.encode("Hello", false).unwrap();
    assert_ne!(unprefixed, hello);
    assert_eq!(plain.decode(&unprefixed, false).unwrap(), "Hello");
}

/// A small byte-level vocabulary with `pre` and `types`.
fn tiny(pre: Option<&str>, types: Option<Vec<i32>>) -> Vec<(&'static str, Value)> {
    let mut metadata = vec![
        ("tokenizer.ggml.model", Value::Str("gpt2".into())),
        ("tokenizer.ggml.tokens", strings(&["a", "b", "ab", "<s>", "<tool>", "<", "s", ">"])),
        ("tokenizer.ggml.merges", strings(&["a b"])),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
    ];
    if let Some(pre) = pre {
        metadata.push(("tokenizer.ggml.pre", Value::Str(pre.into())));
    }
    if let Some(types) = types {
        metadata.push(("tokenizer.ggml.token_type", Value::I32s(types)));
    }
    metadata
}

fn load_error(metadata: &[(&str, Value)]) -> String {
    match Tokenizer::from_gguf(&header(metadata)) {
        Ok(_) => panic!("loaded"),
        Err(e @ TextError::Gguf { .. }) => e.to_string(),
        Err(other) => panic!("unexpected error {other}"),
    }
}

#[test]
fn control_tokens_are_special_and_user_defined_ones_always_whole() {
    let tok = Tokenizer::from_gguf(&header(&tiny(Some("gpt-2"), Some(vec![1, 1, 1, 3, 4, 1, 1, 1])))).unwrap();
    assert_eq!(tok.encode("ab", false).unwrap(), [2]);
    assert_eq!(tok.encode("ab<s>", true).unwrap(), [2, 3]);
    // Control text is plain text unless special tokens are parsed.
    assert_eq!(tok.encode("<s>", false).unwrap(), [5, 6, 7]);
    // llama.cpp matches user-defined tokens whole either way.
    assert_eq!(tok.encode("a<tool>b", false).unwrap(), [0, 4, 1]);
    assert_eq!(tok.decode(&[2, 3], true).unwrap(), "ab");
    assert_eq!(tok.decode(&[2, 3], false).unwrap(), "ab<s>");
}

#[test]
fn unsupported_tokenizers_are_refused_by_name() {
    let mut wordpiece = tiny(None, None);
    wordpiece[0].1 = Value::Str("bert".into());
    let error = load_error(&wordpiece);
    assert!(error.contains("\"bert\" (WordPiece) is not supported"), "{error}");
    assert!(error.starts_with("test.gguf: "), "{error}");
    // A SentencePiece vocabulary needs its scores.
    let mut spm = tiny(None, None);
    spm[0].1 = Value::Str("llama".into());
    assert!(load_error(&spm).contains("tokenizer.ggml.scores is missing"));
    spm.push(("tokenizer.ggml.scores", Value::F32s(vec![0.0; 3])));
    assert!(load_error(&spm).contains("tokenizer.ggml.scores has 3 entries for 8 tokens"));

    let error = load_error(&tiny(Some("qwen2"), None));
    assert!(error.contains("pre-tokenizer \"qwen2\" is not supported"), "{error}");

    let error = load_error(&[("tokenizer.ggml.tokens", strings(&["a"]))]);
    assert!(error.contains("tokenizer.ggml.model is missing"), "{error}");

    let error = load_error(&[("tokenizer.ggml.model", Value::Str("gpt2".into())), ("tokenizer.ggml.tokens", strings(&["a", "a"])), ("tokenizer.ggml.merges", strings(&[]))]);
    assert!(error.contains("appears twice"), "{error}");

    let error = load_error(&tiny(None, Some(vec![1, 1])));
    assert!(error.contains("token_type has 2 entries for 8 tokens"), "{error}");

    let mut bad_merge = tiny(None, None);
    bad_merge[2].1 = strings(&["ab"]);
    assert!(load_error(&bad_merge).contains("merge 0 (\"ab\")"));

    // A metadata value of the wrong type names the key.
    let mut wrong_type = tiny(None, None);
    wrong_type[0].1 = Value::U32(2);
    let error = Tokenizer::from_gguf(&header(&wrong_type)).err().unwrap().to_string();
    assert!(error.contains("tokenizer.ggml.model"), "{error}");
}

#[test]
fn missing_pre_tokenizer_falls_back_to_llama_cpps_default() {
    // llama.cpp's default first splits off runs of punctuation and <=>^~|$+: "<s>" is "<", "s", ">".
    let tok = Tokenizer::from_gguf(&header(&tiny(None, None))).unwrap();
    assert_eq!(tok.encode("aab", false).unwrap(), [0, 2]);
    assert_eq!(tok.encode("<s>", false).unwrap(), [5, 6, 7]);
}

#[test]
fn chat_template_comes_from_metadata_or_defaults_to_llama31() {
    let with = header(&[("tokenizer.chat_template", Value::Str("{{ messages[0]['content'] }}!".into()))]);
    let messages = [llama_webgpu::api::ChatMessage::new("user", "hi")];
    let options = Default::default();
    assert_eq!(ChatTemplate::from_gguf(&with).unwrap().render(&messages, None, false, &options).unwrap(), "hi!");
    let without = header(&[("general.architecture", Value::Str("llama".into()))]);
    let rendered = ChatTemplate::from_gguf(&without).unwrap().render(&messages, None, true, &options).unwrap();
    let llama31 = ChatTemplate::llama31().render(&messages, None, true, &options).unwrap();
    assert_eq!(rendered, llama31);
    // The template reads the vocabulary's BOS and EOS tokens (Llama 2's and Mistral's templates
    // write them), also where prompts start without BOS.
    let special = [
        ("tokenizer.chat_template", Value::Str("{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}".into())),
        ("tokenizer.ggml.tokens", Value::Strings(["<unk>", "<s>", "</s>", "hi"].map(String::from).to_vec())),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
    ];
    assert_eq!(ChatTemplate::from_gguf(&header(&special)).unwrap().render(&messages, None, false, &options).unwrap(), "<s>hi</s>");
    // Without a template a vocabulary other than Llama 3's cannot chat (its tokens would be
    // Llama 3's markup spelled out): a refusal that names the way out.
    let spm_without = header(&[("tokenizer.ggml.tokens", Value::Strings(["<unk>", "<s>", "</s>"].map(String::from).to_vec()))]);
    match ChatTemplate::from_gguf(&spm_without).unwrap().render(&messages, None, true, &options) {
        Err(TextError::TemplateRaised { message }) => assert!(message.contains("--chat-template"), "{message}"),
        other => panic!("{other:?}"),
    }
    let llama3_without = header(&[("tokenizer.ggml.tokens", Value::Strings(["<|begin_of_text|>", "<|start_header_id|>"].map(String::from).to_vec()))]);
    assert_eq!(ChatTemplate::from_gguf(&llama3_without).unwrap().render(&messages, None, true, &options).unwrap(), llama31);
    let broken = header(&[("tokenizer.chat_template", Value::Str("{% if %}".into()))]);
    assert!(matches!(ChatTemplate::from_gguf(&broken), Err(TextError::TemplateSyntax { .. })));
}
