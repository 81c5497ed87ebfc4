//! The Llama 3 tokenizer against Meta's tiktoken reference on a 200+ string corpus (goldens from
//! tests/fixtures/text/make_text_goldens.py), decoding, and the streaming detokenizer.
//! Needs target/models/llama3-tokenizer/tokenizer.json from scripts/fetch-tokenizer.

mod common;

use common::llama3_tokenizer as llama3;


use llama_webgpu::text::{TextError, TextStream, Tokenizer};
use serde::Deserialize;

#[derive(Deserialize)]
struct Goldens {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    category: String,
    text: String,
    /// tiktoken, special-token text encoded as text.
    ids: Vec<u32>,
    /// tiktoken with special tokens parsed, where that differs from `ids`.
    special_ids: Option<Vec<u32>>,
}

fn corpus() -> Vec<Case> {
    let json = std::fs::read_to_string(common::fixture("text/tokenizer_goldens.json")).expect("tokenizer goldens");
    let goldens: Goldens = serde_json::from_str(&json).expect("tokenizer goldens parse");
    assert!(goldens.cases.len() >= 200, "corpus has only {} strings", goldens.cases.len());
    goldens.cases
}

#[test]
fn known_ids() {
    let tok = llama3();
    assert_eq!(tok.vocab_size(), 128_256);
    for (token, id) in [
        ("<|begin_of_text|>", 128_000),
        ("<|end_of_text|>", 128_001),
        ("<|start_header_id|>", 128_006),
        ("<|end_header_id|>", 128_007),
        ("<|eom_id|>", 128_008),
        ("<|eot_id|>", 128_009),
        ("<|python_tag|>", 128_010),
        ("<|reserved_special_token_246|>", 128_255),
    ] {
        assert_eq!(tok.token_id(token), Some(id), "{token}");
        assert_eq!(tok.encode(token, true).unwrap(), [id], "{token} parsed as special");
    }
    assert_eq!(tok.token_id("<|image|>"), None, "the Vision-only token must be gone");
    assert_eq!(tok.encode("Hello", false).unwrap(), [9906]);
    assert_eq!(tok.encode("Hello world!", false).unwrap(), [9906, 1917, 0]);
    assert_eq!(tok.encode("Hello world!", true).unwrap(), [9906, 1917, 0], "no BOS added");
    assert_eq!(tok.encode("", true).unwrap(), Vec::<u32>::new());
}

#[test]
fn corpus_matches_tiktoken() {
    let tok = llama3();
    let cases = corpus();
    let mut mismatches = Vec::new();
    for case in &cases {
        let plain = tok.encode(&case.text, false).unwrap();
        let special = tok.encode(&case.text, true).unwrap();
        let want_special = case.special_ids.as_ref().unwrap_or(&case.ids);
        if plain != case.ids || special != *want_special {
            mismatches.push(format!(
                "[{}] {:?}\n  text:    {plain:?} want {:?}\n  special: {special:?} want {want_special:?}",
                case.category, case.text, case.ids
            ));
        }
    }
    println!("tokenizer parity: {}/{} corpus strings match tiktoken", cases.len() - mismatches.len(), cases.len());
    assert!(mismatches.is_empty(), "{} of {} strings differ:\n{}", mismatches.len(), cases.len(), mismatches.join("\n"));
}

#[test]
fn decode_round_trips() {
    let tok = llama3();
    for case in corpus() {
        assert_eq!(tok.decode(&case.ids, false).unwrap(), case.text, "[{}]", case.category);
        if let Some(special) = &case.special_ids {
            assert_eq!(tok.decode(special, false).unwrap(), case.text, "[{}] special ids", case.category);
        }
    }
}

#[test]
fn special_token_text_is_text_unless_parsed() {
    let tok = llama3();
    let plain = tok.encode("<|begin_of_text|>hi", false).unwrap();
    assert!(!plain.iter().any(|&id| id >= 128_000), "special text encoded as text: {plain:?}");
    let parsed = tok.encode("<|begin_of_text|>hi", true).unwrap();
    assert_eq!(parsed[0], 128_000);
    assert_eq!(tok.decode(&parsed, true).unwrap(), "hi");
    assert_eq!(tok.decode(&parsed, false).unwrap(), "<|begin_of_text|>hi");
}

#[test]
fn bad_input_is_named() {
    let err = llama3().decode(&[9906, 200_000], false).unwrap_err();
    assert!(matches!(err, TextError::UnknownTokenId { id: 200_000, vocab_size: 128_256 }), "{err}");
    assert_eq!(err.to_string(), "token id 200000 is outside the vocabulary of 128256 ids");
    let Err(err) = Tokenizer::from_json_bytes(b"{\"model\": ") else { panic!("truncated tokenizer.json loaded") };
    assert!(err.to_string().starts_with("tokenizer.json could not be loaded: "), "{err}");
}

/// Feeds `ids` one at a time; returns the deltas, the last one from `finish`.
fn stream(ids: &[u32], skip_special: bool) -> Vec<String> {
    let mut stream = if skip_special { TextStream::new() } else { TextStream::with_special_tokens() };
    let mut deltas: Vec<String> = ids.iter().map(|&id| stream.push(llama3(), id).unwrap()).collect();
    deltas.push(stream.finish(llama3()).unwrap());
    deltas
}

#[test]
fn streamed_deltas_add_up_to_the_decoded_text() {
    let tok = llama3();
    for case in corpus() {
        let ids = case.special_ids.as_ref().unwrap_or(&case.ids);
        for skip_special in [false, true] {
            let joined: String = stream(ids, skip_special).concat();
            assert_eq!(joined, tok.decode(ids, skip_special).unwrap(), "[{}] {:?}", case.category, case.text);
        }
    }
}

#[test]
fn stream_never_splits_a_character() {
    let tok = llama3();
    // A 4-byte emoji that byte-level BPE spreads over several tokens, between plain words.
    let text = "Llama 🦙 and 𝕳 and 👨‍👩‍👧 end";
    let ids = tok.encode(text, false).unwrap();
    let llama = tok.encode(" 🦙", false).unwrap();
    assert!(llama.len() > 1, "🦙 should take several tokens, got {llama:?}");
    let deltas = stream(&ids, false);
    for delta in &deltas {
        assert!(!delta.contains(char::REPLACEMENT_CHARACTER), "delta {delta:?} in {deltas:?}");
    }
    assert!(deltas.iter().any(String::is_empty), "some token must have been held back: {deltas:?}");
    assert_eq!(deltas.concat(), text);
    assert!(deltas.contains(&" 🦙".to_string()), "the emoji comes out whole: {deltas:?}");

    // An unfinished character at the end comes out of finish() as decode() shows it.
    let cut = &llama[..llama.len() - 1];
    let deltas = stream(cut, false);
    assert_eq!(deltas.concat(), tok.decode(cut, false).unwrap());
    assert!(deltas.last().unwrap().ends_with(char::REPLACEMENT_CHARACTER));
}

#[test]
fn stray_bytes_are_not_held_for_ever() {
    let tok = llama3();
    // Byte 0x80 alone (byte-level BPE spells it U+0122) can never begin a character.
    let stray = tok.token_id("\u{122}").expect("the byte token of 0x80");
    let mut ids = vec![stray; 1000];
    ids.extend(tok.encode(" 🦙 ok", false).unwrap());
    let deltas = stream(&ids, true);
    assert_eq!(deltas.concat(), tok.decode(&ids, true).unwrap());
    // Replacement characters go out while the bytes keep coming, a bounded window at a time.
    let released = deltas[..1000].iter().filter(|d| !d.is_empty()).count();
    assert!(released >= 1000 / 16, "{released} deltas during 1000 stray bytes");
    assert!(deltas[..1000].concat().chars().all(|c| c == char::REPLACEMENT_CHARACTER));
}
